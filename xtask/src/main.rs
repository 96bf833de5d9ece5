//! `cargo xtask setup | build | demo | test | lint | man | bench`: the project's own
//! automation. Every command that builds runs `setup` first, which installs only what is
//! missing.

mod frames;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "bpfnat's build, test and demo automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (nightly rust-src, bpf-linker, Debian packages).
    Setup,
    /// Build the eBPF object and the bpfnat binary with it embedded.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run `bpfnat demo` (needs root).
    Demo,
    /// Build, then run every test: unit tests and end-to-end tests in namespaces (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// rustfmt and clippy on the host crates and the eBPF crate.
    Lint,
    /// Build, then write the manual pages (bpfnat.1 and one per command) to target/man/.
    Man,
    /// Build in release mode and run the side-by-side benchmark (needs root); the report
    /// lands in target/bench/.
    Bench {
        /// Short measurements, one repetition (under 3 minutes).
        #[arg(long)]
        quick: bool,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c.env("PATH", setup::path_with_cargo_bin());
    c
}

fn build(release: bool) -> Result<PathBuf> {
    setup::ensure()?;
    let mut c = cargo();
    c.args(["build", "--package", "nat-user"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)?;
    Ok(root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("bpfnat"))
}

fn require_root(what: &str) -> Result<()> {
    if !nix_is_root() {
        bail!("{what} needs root (network namespaces, bpffs, eBPF): run it with sudo");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::ensure(),
        Cmd::Build { release } => {
            let bin = build(release)?;
            println!("built {}", bin.display());
            Ok(())
        }
        Cmd::Man => {
            let bin = build(false)?;
            let dir = root().join("target").join("man");
            run(Command::new(bin).arg("man").arg(&dir))?;
            println!(
                "manual pages in {} (man -l {}/bpfnat.1)",
                dir.display(),
                dir.display()
            );
            Ok(())
        }
        Cmd::Demo => {
            require_root("the demo")?;
            let bin = build(false)?;
            run(Command::new(bin).arg("demo"))
        }
        Cmd::Test { args } => {
            require_root("the tests")?;
            let bin = build(false)?;
            let mut c = cargo();
            c.args(["test", "--workspace", "--exclude", "nat-ebpf"])
                .env("BPFNAT_BIN", &bin)
                .args(&args);
            run(&mut c)
        }
        Cmd::Bench { quick } => {
            require_root("the benchmark")?;
            setup::ensure_bench()?;
            let bin = build(true)?;
            run(cargo().args(["build", "--release", "--package", "bpfnat-bench"]))?;
            let bench = bin.with_file_name("bpfnat-bench");
            let mut c = Command::new(bench);
            c.current_dir(root())
                .args(["run", "--bin"])
                .arg(&bin)
                .args(["--out", "target/bench"]);
            if quick {
                c.arg("--quick");
            }
            run(&mut c)
        }
        Cmd::Lint => {
            setup::ensure()?;
            run(cargo().args(["fmt", "--all", "--", "--check"]))?;
            run(cargo().args([
                "clippy",
                "--workspace",
                "--exclude",
                "nat-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            // The rustup proxy, not $CARGO: only the proxy understands `+nightly`.
            // Both builds: the production programs and `bpfnat explain`'s.
            for features in [&[][..], &["--features", "explain"][..]] {
                run(Command::new("cargo")
                    .current_dir(root().join("nat-ebpf"))
                    .env("PATH", setup::path_with_cargo_bin())
                    .args([
                        "+nightly",
                        "clippy",
                        "--target",
                        "bpfel-unknown-none",
                        "-Z",
                        "build-std=core",
                    ])
                    .args(features)
                    .args(["--", "-D", "warnings"]))?;
            }
            // The verifier's view needs root; without it the frames go unchecked, said so.
            if nix_is_root() {
                frames::check(&root())
            } else {
                println!("eBPF frames not checked (needs root to load the programs)");
                Ok(())
            }
        }
    }
}
