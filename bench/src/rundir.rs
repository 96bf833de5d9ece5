//! `/run` as the bench measures with it. bpfnat keeps its record in `/run/bpfnat` and `ip
//! netns` its namespaces' files in `/run/netns`: both describe kernel objects that do not
//! outlive a reboot, and systemd hosts mount a tmpfs there. Where `/run` is a directory of
//! a disk filesystem instead (as on this project's VMs: ext4), every namespace file is an
//! inode to allocate on disk and every record update a disk flush, and the control-plane
//! figures would measure that disk. The bench, and everything it starts, then run in a mount
//! namespace of their own with a fresh tmpfs on `/run`, which no other process sees and
//! which goes with the bench.

use std::{path::Path, sync::OnceLock};

use anyhow::{Context as _, Result};
use nix::{
    mount::{MsFlags, mount},
    sched::{CloneFlags, unshare},
    sys::statfs::{TMPFS_MAGIC, statfs},
};

/// Whether the bench mounted a tmpfs of its own on `/run`.
static OWN: OnceLock<bool> = OnceLock::new();

fn is_tmpfs(p: &Path) -> bool {
    statfs(p).is_ok_and(|s| s.filesystem_type() == TMPFS_MAGIC)
}

/// Make `/run` a tmpfs for this process and its children if it is not one. Call it before
/// any thread or lab exists: a mount namespace is per thread until the next `clone`.
pub fn volatile() -> Result<()> {
    if is_tmpfs(Path::new("/run")) {
        let _ = OWN.set(false);
        return Ok(());
    }
    unshare(CloneFlags::CLONE_NEWNS).context("a mount namespace of the bench's own")?;
    // Nothing mounted from here on reaches the host's mount namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("make the bench's mounts private")?;
    mount(
        Some("tmpfs"),
        "/run",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=755"),
    )
    .context("mount a tmpfs on /run for the bench")?;
    let _ = OWN.set(true);
    Ok(())
}

/// What `/run` was during the run, for the report.
pub fn describe() -> &'static str {
    match OWN.get() {
        Some(true) => "a tmpfs of the bench's own (this machine's `/run` is not a tmpfs)",
        _ if is_tmpfs(Path::new("/run")) => "a tmpfs",
        _ => "not a tmpfs (the figures include its disk)",
    }
}
