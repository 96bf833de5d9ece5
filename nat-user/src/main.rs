use clap::Parser as _;

fn main() {
    if std::env::var_os("CNI_COMMAND").is_some() {
        // Invoked by a container runtime as a CNI plugin.
        std::process::exit(bpfnat::cni::main());
    }
    let cli = bpfnat::cli::Cli::parse();
    if let Err(e) = bpfnat::cli::run(cli) {
        if let Some(bpfnat::cli::Exit(code)) = e.downcast_ref() {
            std::process::exit(*code);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
