//! Compiles `nat-ebpf` for `bpfel-unknown-none` (nightly + bpf-linker, with BTF) so that
//! `include_bytes_aligned!` can embed it. `cargo xtask setup` installs what this needs.

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow::anyhow!("nat-user has no parent directory"))?
        .join("nat-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "nat-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
