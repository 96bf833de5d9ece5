//! Compiles `nat-ebpf` for `bpfel-unknown-none` (nightly + bpf-linker, with BTF) so that
//! `include_bytes_aligned!` can embed it. `cargo xtask setup` installs what this needs.
//!
//! Two objects: `nat-explain` (the `explain` feature: `bpfnat explain`'s dry run) and the
//! production `nat`. aya-build copies the bin it builds to `OUT_DIR/nat`, so the explain
//! build goes first and its object is renamed before the production build.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};

fn build(root: &str, features: &[&str]) -> anyhow::Result<()> {
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "nat-ebpf",
            root_dir: root,
            features,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

fn main() -> anyhow::Result<()> {
    // A position-dependent `bpfnat`: as a PIE, the dynamic loader applied some 40,000
    // relocations at every start, copying 180 pages of `.data.rel.ro` and `.got`, about 1 ms
    // of every CLI and CNI call (a third of starting the process); `container add` is run
    // once per container. Go builds the CNI reference plugins the same way by default.
    println!("cargo:rustc-link-arg-bins=-no-pie");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("nat-user has no parent directory"))?
        .join("nat-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    let out = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    build(root, &["explain"])?;
    // AYA_BUILD_SKIP leaves no object behind.
    let built = out.join("nat");
    if built.exists() {
        let explain = out.join("nat-explain");
        std::fs::rename(&built, &explain)
            .with_context(|| format!("rename {} to {}", built.display(), explain.display()))?;
    }
    build(root, &[])
}
