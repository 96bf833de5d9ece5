//! Detect and install what the build and the tests need; a no-op when all is there: the
//! nightly `rust-src`, bpf-linker built against the nightly toolchain's own LLVM (no prebuilt
//! binary can be downloaded here), and the Debian packages the tests and the demo use.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::run;

/// Debian packages the build and the tests use, and a command each provides (shown when
/// missing).
const PACKAGES: &[(&str, &str)] = &[
    // etcd-client compiles etcd's protobuf definitions when it builds; they import the
    // well-known types (`google/protobuf/*.proto`), which only the -dev package ships (a
    // recommendation of protobuf-compiler's, which `--no-install-recommends` leaves out).
    ("protobuf-compiler", "protoc"),
    (
        "libprotobuf-dev",
        "/usr/include/google/protobuf/descriptor.proto",
    ),
    ("bpftool", "bpftool"),
    ("iproute2", "ip"),
    ("iputils-ping", "ping"),
    ("util-linux", "nsenter"),
    // The cluster tests: a real etcd, and etcdctl to read what the agents wrote.
    ("etcd-server", "etcd"),
    ("etcd-client", "etcdctl"),
    // The durability test watches the state file's fsync and rename.
    ("strace", "strace"),
    // The container-runtime test: podman with the CNI backend, runc, and a static busybox
    // to build its image from.
    ("podman", "podman"),
    // The reference plugins: `loopback`, which the agent installs beside bpfnat.
    ("containernetworking-plugins", "/usr/lib/cni/loopback"),
    ("runc", "runc"),
    ("conmon", "conmon"),
    ("busybox-static", "busybox"),
];

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

/// PATH with `~/.cargo/bin` in it (where `cargo install` puts bpf-linker).
pub fn path_with_cargo_bin() -> OsString {
    let bin = home().join(".cargo").join("bin");
    let mut parts: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if !parts.contains(&bin) {
        parts.push(bin);
    }
    std::env::join_paths(parts).unwrap_or_default()
}

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.env("PATH", path_with_cargo_bin())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .env("PATH", path_with_cargo_bin())
        .output()
        .with_context(|| format!("run {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have_command(name: &str) -> bool {
    quiet_ok(Command::new("sh").args(["-c", &format!("command -v {name}")]))
}

fn installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f", "${Status}", pkg]))
        .is_ok_and(|s| s.contains("install ok installed"))
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(pkg, _)| !installed(pkg))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("the nightly toolchain is needed to build the eBPF crate (rustup toolchain list)")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    println!("setup: adding rust-src to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// The nightly toolchain's LLVM shared library (`libLLVM.so.<ver>-rust-…`).
fn nightly_llvm() -> Result<(PathBuf, String)> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let name = std::fs::read_dir(&lib)
        .with_context(|| format!("read {}", lib.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM.so."))
        .ok_or_else(|| anyhow!("no libLLVM.so.* in {}", lib.display()))?;
    Ok((lib, name))
}

fn llvm_major() -> Result<String> {
    let v = output(Command::new("rustc").args(["+nightly", "--version", "--verbose"]))?;
    v.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("cannot tell nightly rustc's LLVM version"))
}

fn bpf_linker() -> Result<()> {
    if quiet_ok(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    let (lib, name) = nightly_llvm()?;
    let major = llvm_major()?;
    let prefix = home().join(".cache").join("bpfnat").join("llvm-prefix");
    let pl = prefix.join("lib");
    std::fs::create_dir_all(&pl).with_context(|| format!("create {}", pl.display()))?;
    for link in [pl.join("libLLVM.so"), pl.join(&name)] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&name), &link)
            .with_context(|| format!("link {}", link.display()))?;
    }
    println!(
        "setup: building bpf-linker against the nightly toolchain's LLVM {major} (about a minute)"
    );
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .env("PATH", path_with_cargo_bin()))?;
    if !quiet_ok(Command::new("bpf-linker").arg("--version")) {
        bail!("bpf-linker was built but does not run");
    }
    Ok(())
}

/// What only the benchmark needs: its traffic tools and the baselines' rule engines.
const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("iperf3", "iperf3"),
    ("iptables", "iptables-restore"),
    ("nftables", "nft"),
];

pub fn ensure_bench() -> Result<()> {
    ensure()?;
    let missing: Vec<&str> = BENCH_PACKAGES
        .iter()
        .filter(|(_, c)| !have_command(c))
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!(
        "setup: installing Debian packages for the benchmark: {}",
        missing.join(" ")
    );
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

pub fn ensure() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    if crate::nix_is_root() {
        debian_packages()?;
    } else {
        let missing: Vec<&str> = PACKAGES
            .iter()
            .filter(|(p, _)| !installed(p))
            .map(|(p, _)| *p)
            .collect();
        if !missing.is_empty() {
            println!(
                "setup: not root, not installing Debian packages: {}",
                missing.join(" ")
            );
        }
    }
    Ok(())
}
