//! The eBPF programs' stack frames and verifier work, as the kernel's verifier reports them:
//! the built object is loaded with bpftool into a bpffs of its own, inside a private mount
//! namespace (nothing is attached, nothing is left behind). `cargo xtask lint` fails when a
//! program outgrows its budget, so that the headroom the IPv6 work needs is not eaten
//! silently. Raise a budget only with a reason in ARCHITECTURE.md ("Verifier budget").

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// Per program: the largest single frame in bytes, and verified instructions.
const BUDGETS: [(&str, u32, u64); 3] = [
    ("tc_container", 448, 350_000),
    ("tc_uplink", 400, 180_000),
    ("xdp_uplink", 448, 100_000),
];

/// Calls to `memmove` and `memset` in the object, at most: the BPF target has them only as
/// byte loops (compiler-builtins), which cost 20–40 ns per 16–52 bytes where a copy or a
/// zeroing written another way is expanded in line (`copy_nonoverlapping`, `pkt::zero`).
/// What is left is off the established paths (fragments, ICMP errors, new IPv6 connections,
/// the socket programs). Lower it when one goes; never raise it for a hot path.
const BYTE_LOOP_CALLS: usize = 15;

/// The calls to `memmove`/`memset` in `obj`, by calling section and symbol.
fn byte_loop_calls(obj: &Path) -> Result<Vec<String>> {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};
    let data = std::fs::read(obj).with_context(|| format!("read {}", obj.display()))?;
    let file = object::File::parse(&*data).context("parse the eBPF object")?;
    let mut calls = Vec::new();
    for section in file.sections() {
        for (_, reloc) in section.relocations() {
            let RelocationTarget::Symbol(i) = reloc.target() else {
                continue;
            };
            let name = file.symbol_by_index(i).and_then(|s| s.name()).unwrap_or("");
            if name == "memmove" || name == "memset" {
                calls.push(format!("{name} in {}", section.name().unwrap_or("?")));
            }
        }
    }
    Ok(calls)
}

/// The eBPF object the last build embedded (the newest one under `target/`).
fn object(root: &Path) -> Result<PathBuf> {
    let build = root.join("target/debug/build");
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&build)
        .with_context(|| format!("read {}", build.display()))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("nat-user-"))
        .map(|e| e.path().join("out/nat"))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, p)| p)
        .context("no built eBPF object under target/debug/build: build nat-user first")
}

/// What the verifier said about each program: (name, frames, instructions).
fn measure(obj: &Path) -> Result<Vec<(String, Vec<u32>, u64)>> {
    let dir = std::env::temp_dir().join(format!("bpfnat-frames-{}", std::process::id()));
    let script = format!(
        "mkdir -p {d} && mount -t bpf bpf {d} && bpftool -d prog loadall {o} {d}/p; rc=$?; umount {d}; rmdir {d}; exit $rc",
        d = dir.display(),
        o = obj.display()
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .context("run bpftool in a private mount namespace (unshare, bpftool)")?;
    let log =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        bail!(
            "the verifier refused the object:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let mut progs = Vec::new();
    let mut current: Option<(String, Vec<u32>)> = None;
    for line in log.lines() {
        if let Some(rest) = line.strip_prefix("libbpf: prog '")
            && let Some((name, tail)) = rest.split_once('\'')
            && tail.contains("BEGIN PROG LOAD LOG")
        {
            current = Some((name.to_owned(), Vec::new()));
        } else if let Some(depths) = line.strip_prefix("stack depth ")
            && let Some((_, frames)) = current.as_mut()
        {
            *frames = depths
                .split('+')
                .filter_map(|d| d.trim().parse().ok())
                .collect();
        } else if let Some(rest) = line.strip_prefix("processed ")
            && let Some((name, frames)) = current.take()
        {
            let insns = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            progs.push((name, frames, insns));
        }
    }
    Ok(progs)
}

pub fn check(root: &Path) -> Result<()> {
    let obj = object(root)?;
    let progs = measure(&obj)?;
    let mut over = Vec::new();
    println!("eBPF stack frames (bytes, per function) and verified instructions:");
    for (name, max_frame, max_insns) in BUDGETS {
        let Some((_, frames, insns)) = progs.iter().find(|(n, ..)| n == name) else {
            bail!("no verifier report for {name}");
        };
        let largest = frames.iter().copied().max().unwrap_or(0);
        println!(
            "  {name:<14} frames {:<28} largest {largest:>3}/{max_frame}  insns {insns:>7}/{max_insns}",
            frames
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join("+")
        );
        if largest > max_frame || *insns > max_insns {
            over.push(name);
        }
    }
    let calls = byte_loop_calls(&obj)?;
    println!(
        "  memmove/memset byte-loop calls {}/{BYTE_LOOP_CALLS}",
        calls.len()
    );
    if calls.len() > BYTE_LOOP_CALLS {
        over.push("byte-loop calls");
    }
    if !over.is_empty() {
        bail!("over budget: {} (see xtask/src/frames.rs)", over.join(", "));
    }
    Ok(())
}
