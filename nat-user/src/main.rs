use clap::Parser as _;

fn main() {
    let cli = bpfnat::cli::Cli::parse();
    if let Err(e) = bpfnat::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
