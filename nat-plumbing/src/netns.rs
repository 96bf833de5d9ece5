//! Network namespaces: create and remove named ones (`/run/netns/NAME`, so `ip netns exec`
//! works), and run code or commands inside one.
//!
//! Creation never forks: a dedicated thread unshares its network namespace and bind-mounts
//! it, which is safe in a multi-threaded program (rtnetlink's `NetworkNamespace::add` forks).

use std::{
    fs::File,
    io,
    os::{fd::AsFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};
use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns, unshare},
};

pub const NETNS_DIR: &str = "/run/netns";

/// Path of the named namespace `name`.
#[must_use]
pub fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Make `/run/netns` a shared mount point, as `ip netns add` does, so that namespace mounts
/// made under it are seen by every mount namespace.
fn prepare_netns_dir() -> Result<()> {
    std::fs::create_dir_all(NETNS_DIR).with_context(|| format!("create {NETNS_DIR}"))?;
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    if mount(None::<&str>, NETNS_DIR, None::<&str>, shared, None::<&str>).is_ok() {
        return Ok(());
    }
    mount(
        Some(NETNS_DIR),
        NETNS_DIR,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("bind-mount {NETNS_DIR} onto itself"))?;
    mount(None::<&str>, NETNS_DIR, None::<&str>, shared, None::<&str>)
        .with_context(|| format!("make {NETNS_DIR} shared"))
}

/// A machine-wide lock for one-time host setup (mounting bpffs, sharing /run/netns), which
/// concurrent bpfnat processes would otherwise race on. Released on drop.
pub fn host_lock() -> Result<File> {
    let path = "/run/bpfnat.host.lock";
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("open {path}"))?;
    f.lock().with_context(|| format!("lock {path}"))?;
    Ok(f)
}

/// Create the named network namespace `name`. Fails if it exists.
pub fn create(name: &str) -> Result<PathBuf> {
    validate_name(name)?;
    {
        let _lock = host_lock()?;
        prepare_netns_dir()?;
    }
    let path = path_of(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                anyhow!(
                    "network namespace {name} already exists ({})",
                    path.display()
                )
            } else {
                anyhow!(e).context(format!("create {}", path.display()))
            }
        })?;
    let target = path.clone();
    let made = std::thread::spawn(move || -> Result<()> {
        unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("bind-mount the new namespace on {}", target.display()))
    })
    .join()
    .map_err(|_| anyhow!("namespace creation thread panicked"))?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// Remove the named namespace at `path` (unmount and delete the file). Missing is fine.
pub fn remove(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(anyhow!(e).context(format!("unmount {}", path.display()))),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow!(e).context(format!("remove {}", path.display()))),
    }
}

/// Names end up as file names and in interface-name hashes: keep them boring.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if !ok {
        bail!(
            "invalid name {name:?}: use 1-64 characters from A-Z a-z 0-9 - _ . (not starting with a dot)"
        );
    }
    Ok(())
}

/// Open a namespace file, with a useful error.
pub fn open(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("open network namespace {}", path.display()))
}

/// Run `f` on a new thread that has entered the namespace at `path`. Sockets `f` creates stay
/// in that namespace for their whole life, whichever thread uses them later.
pub fn run_in<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = open(path)?;
    let shown = path.display().to_string();
    std::thread::spawn(move || {
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("enter network namespace {shown}"))?;
        f()
    })
    .join()
    .map_err(|_| anyhow!("thread inside {} panicked", path.display()))?
}

/// Make `cmd` start inside the namespace at `path` (like `nsenter --net=PATH`, without
/// remounting /sys the way `ip netns exec` does, so /sys/fs/bpf stays visible).
pub fn command_in(cmd: &mut Command, path: &Path) -> Result<()> {
    let ns = open(path)?;
    // SAFETY: only async-signal-safe work (setns) between fork and exec.
    unsafe {
        cmd.pre_exec(move || setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from));
    }
    Ok(())
}

/// Write a sysctl of the namespace at `path`, e.g. `net.ipv4.ip_forward` = `1`.
pub fn set_sysctl(path: &Path, key: &str, value: &str) -> Result<()> {
    let file = sysctl_path(key)?;
    let (k, v) = (key.to_owned(), value.to_owned());
    run_in(path, move || {
        std::fs::write(&file, v.as_bytes()).with_context(|| format!("set sysctl {k}={v}"))
    })
}

/// Write a sysctl of the calling process's own namespace.
pub fn set_own_sysctl(key: &str, value: &str) -> Result<()> {
    let file = sysctl_path(key)?;
    std::fs::write(&file, value.as_bytes()).with_context(|| format!("set sysctl {key}={value}"))
}

/// `/proc/sys/...` for a sysctl key; only per-network-namespace keys (`net.*`) are accepted,
/// the ones that a container's own namespace isolates.
pub fn sysctl_path(key: &str) -> Result<PathBuf> {
    let ok = key.starts_with("net.")
        && key.split('.').all(|p| {
            !p.is_empty()
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        });
    if !ok {
        bail!(
            "sysctl {key:?} is not a per-network-namespace key: only net.* keys can be set for a container"
        );
    }
    Ok(Path::new("/proc/sys").join(key.replace('.', "/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_keys_map_to_proc_paths() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").unwrap(),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert!(sysctl_path("kernel.pid_max").is_err());
        assert!(sysctl_path("net..ipv4").is_err());
        assert!(sysctl_path("net.ipv4/../../x").is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("web-1.a_b").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name(".hidden").is_err());
    }
}
