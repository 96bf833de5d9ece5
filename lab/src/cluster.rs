//! A cluster lab: node namespaces on one underlay segment, with a real etcd on it and a
//! router to an "internet".
//!
//! ```text
//!  <prefix>-ul: br0 192.0.2.2/24, etcd on http://192.0.2.2:2379
//!     ├── <prefix>-n1: uplink0 192.0.2.11/24, default via 192.0.2.1
//!     ├── <prefix>-n2: uplink0 192.0.2.12/24
//!     ├── …
//!     └── <prefix>-rt: eth0 192.0.2.1/24 ── eth1 203.0.113.1/24
//!                                              └── <prefix>-inet: eth0 203.0.113.2/24
//! ```
//! The router is outside the cluster: a packet it sends to a pod address comes from a source
//! that is neither a pod nor a node.
//! Each node has its own bpffs mount and state directory. Dropping the lab stops etcd and
//! removes every namespace, pin, mount and directory it made.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nat_plumbing::{netlink::Netlink, netns};

use crate::{UPLINK, block_on, bpfnat_in, stdout_of};

/// `ip ARGS` inside namespace `ns`; fails with its stderr.
pub fn ip_in(ns: &Path, args: &[&str]) -> Result<()> {
    let mut c = Command::new("ip");
    c.args(args);
    netns::command_in(&mut c, ns)?;
    let out = c.output().context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The underlay's address of etcd.
pub const ETCD_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The router's address on the underlay (the nodes' default gateway).
pub const ROUTER_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The "internet" host behind the router.
pub const INET_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);

/// One node of a cluster lab.
pub struct ClusterNode {
    /// Short name, e.g. `n1` (also the cluster node name the tests give the agent).
    pub name: String,
    pub ns: PathBuf,
    /// Its uplink's address on the underlay.
    pub addr: Ipv4Addr,
    pub bpffs_dir: PathBuf,
    pub state_dir: PathBuf,
    bpffs_mount: PathBuf,
    bin: PathBuf,
}

impl ClusterNode {
    /// `bpfnat --bpffs-dir … --state-dir … ARGS` inside this node.
    pub fn bpfnat(&self, args: &[&str]) -> Result<Command> {
        bpfnat_in(&self.bin, &self.ns, &self.bpffs_dir, &self.state_dir, args)
    }

    /// Run bpfnat in the node; its output whatever the exit status.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        self.bpfnat(args)?
            .output()
            .with_context(|| format!("run {}", self.bin.display()))
    }

    /// Run bpfnat in the node; fail with its stderr unless it succeeds. Returns stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        stdout_of(
            self.run(args)?,
            &format!("bpfnat {} on {}", args.join(" "), self.name),
        )
    }

    fn cleanup(&self) {
        if self.ns.exists() && self.bin.exists() {
            let _ = self.run(&["down"]);
        }
        while nix::mount::umount2(&self.bpffs_mount, nix::mount::MntFlags::MNT_DETACH).is_ok() {}
        let _ = std::fs::remove_dir(&self.bpffs_mount);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

fn node(prefix: &str, bin: &Path, i: usize) -> ClusterNode {
    ClusterNode {
        name: format!("n{i}"),
        ns: netns::path_of(&format!("{prefix}-n{i}")),
        addr: Ipv4Addr::new(192, 0, 2, 10 + i as u8),
        bpffs_dir: PathBuf::from(format!("/run/bpfnat-{prefix}-n{i}.bpffs/bpfnat")),
        state_dir: PathBuf::from(format!("/run/bpfnat-{prefix}-n{i}")),
        bpffs_mount: PathBuf::from(format!("/run/bpfnat-{prefix}-n{i}.bpffs")),
        bin: bin.to_owned(),
    }
}

/// Nodes and etcd on one segment.
pub struct ClusterLab {
    prefix: String,
    /// The underlay namespace (the segment's bridge, and etcd).
    pub underlay: PathBuf,
    /// The router between the underlay and the internet (outside the cluster).
    pub router: PathBuf,
    /// The internet host.
    pub inet: PathBuf,
    pub nodes: Vec<ClusterNode>,
    bin: PathBuf,
    etcd: Option<Child>,
    etcd_dir: PathBuf,
}

impl ClusterLab {
    /// `nodes` nodes (`n1` … `nN`) and a running etcd; `bin` is the bpfnat binary.
    pub fn new(prefix: &str, bin: &Path, nodes: usize) -> Result<Self> {
        let mut lab = Self {
            prefix: prefix.to_owned(),
            underlay: netns::path_of(&format!("{prefix}-ul")),
            router: netns::path_of(&format!("{prefix}-rt")),
            inet: netns::path_of(&format!("{prefix}-inet")),
            nodes: (1..=nodes).map(|i| node(prefix, bin, i)).collect(),
            bin: bin.to_owned(),
            etcd: None,
            etcd_dir: PathBuf::from(format!("/run/bpfnat-{prefix}-etcd")),
        };
        lab.cleanup();
        if let Err(e) = lab.build().and_then(|()| lab.start_etcd()) {
            lab.cleanup();
            lab.prefix.clear();
            return Err(e);
        }
        Ok(lab)
    }

    /// The etcd endpoint, as agents configure it.
    #[must_use]
    pub fn etcd_endpoint(&self) -> String {
        format!("http://{ETCD_ADDR}:2379")
    }

    /// A container name unique to this lab.
    #[must_use]
    pub fn name(&self, short: &str) -> String {
        format!("{}-{short}", self.prefix)
    }

    fn build(&self) -> Result<()> {
        netns::create(&format!("{}-ul", self.prefix))?;
        ip_in(&self.underlay, &["link", "set", "lo", "up"])?;
        ip_in(&self.underlay, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(
            &self.underlay,
            &["addr", "add", "192.0.2.2/24", "dev", "br0"],
        )?;
        ip_in(&self.underlay, &["link", "set", "br0", "up"])?;
        self.build_router()?;
        for n in &self.nodes {
            self.build_node(n)?;
        }
        Ok(())
    }

    /// The router (on the underlay as 192.0.2.1) and the internet host behind it.
    fn build_router(&self) -> Result<()> {
        let (rt, inet) = (
            format!("{}-rt", self.prefix),
            format!("{}-inet", self.prefix),
        );
        netns::create(&rt)?;
        netns::create(&inet)?;
        let (r, i, u) = (&self.router, &self.inet, &self.underlay);
        ip_in(r, &["link", "set", "lo", "up"])?;
        ip_in(i, &["link", "set", "lo", "up"])?;
        ip_in(
            r,
            &["link", "add", "eth0", "type", "veth", "peer", "name", "rt"],
        )?;
        ip_in(
            r,
            &["link", "set", "rt", "netns", &format!("{}-ul", self.prefix)],
        )?;
        ip_in(u, &["link", "set", "rt", "master", "br0", "up"])?;
        ip_in(r, &["addr", "add", "192.0.2.1/24", "dev", "eth0"])?;
        ip_in(r, &["link", "set", "eth0", "up"])?;
        ip_in(
            r,
            &[
                "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", &inet,
            ],
        )?;
        ip_in(r, &["addr", "add", "203.0.113.1/24", "dev", "eth1"])?;
        ip_in(r, &["link", "set", "eth1", "up"])?;
        ip_in(i, &["addr", "add", "203.0.113.2/24", "dev", "eth0"])?;
        ip_in(i, &["link", "set", "eth0", "up"])?;
        ip_in(i, &["route", "add", "default", "via", "203.0.113.1"])?;
        netns::run_in(r, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enable forwarding")
        })?;
        Ok(())
    }

    /// Another node (`n<N+1>`) on the underlay, with no agent yet.
    pub fn add_node(&mut self) -> Result<&ClusterNode> {
        let n = node(&self.prefix, &self.bin, self.nodes.len() + 1);
        self.nodes.push(n);
        let n = &self.nodes[self.nodes.len() - 1];
        self.build_node(n)?;
        Ok(n)
    }

    /// Delete node `i`'s namespace (a node that is gone, agent and all).
    pub fn remove_node(&self, i: usize) -> Result<()> {
        netns::remove(&self.nodes[i].ns)
    }

    fn build_node(&self, n: &ClusterNode) -> Result<()> {
        {
            std::fs::create_dir_all(&n.bpffs_mount)?;
            nix::mount::mount(
                Some("bpf"),
                &n.bpffs_mount,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .with_context(|| format!("mount bpffs on {}", n.bpffs_mount.display()))?;
            netns::create(&format!("{}-{}", self.prefix, n.name))?;
            let (ns, ul, peer, addr) =
                (n.ns.clone(), self.underlay.clone(), n.name.clone(), n.addr);
            block_on(async move {
                let h = Netlink::in_netns(&ns)?;
                h.lo_up().await?;
                let o = addr.octets();
                h.add_veth(
                    UPLINK,
                    &peer,
                    &ul,
                    [0x02, 0x00, o[0], o[1], o[2], o[3]],
                    1500,
                )
                .await?;
                let up = h.require_link(UPLINK).await?;
                h.add_addr(up.index, addr, 24).await?;
                h.set_up(up.index).await?;
                Ok(())
            })
            .with_context(|| format!("build node {}", n.name))?;
            ip_in(
                &self.underlay,
                &["link", "set", &n.name, "master", "br0", "up"],
            )?;
            ip_in(&n.ns, &["route", "add", "default", "via", "192.0.2.1"])?;
        }
        Ok(())
    }

    /// Start etcd on the underlay (again, after `stop_etcd`, with the same data).
    pub fn start_etcd(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.etcd_dir)?;
        let client = self.etcd_endpoint();
        let mut c = Command::new("etcd");
        c.args(["--name", "lab", "--data-dir"])
            .arg(self.etcd_dir.join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "lab=http://127.0.0.1:2380"])
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.etcd_dir.join("etcd.log"))
                    .map_or_else(|_| Stdio::null(), Stdio::from),
            );
        netns::command_in(&mut c, &self.underlay)?;
        self.etcd = Some(
            c.spawn()
                .context("start etcd (cargo xtask setup installs etcd-server)")?,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let up = netns::run_in(&self.underlay, || {
                Ok(TcpStream::connect_timeout(
                    &SocketAddr::from((ETCD_ADDR, 2379)),
                    Duration::from_millis(200),
                )
                .is_ok())
            })?;
            if up {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("etcd did not start listening in 20 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stop etcd (its data stays for `start_etcd`).
    pub fn stop_etcd(&mut self) {
        if let Some(mut c) = self.etcd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn cleanup(&mut self) {
        if self.prefix.is_empty() {
            return;
        }
        for n in &self.nodes {
            n.cleanup();
        }
        self.stop_etcd();
        if let Ok(dir) = std::fs::read_dir(netns::NETNS_DIR) {
            let mine = format!("{}-", self.prefix);
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with(&mine) {
                    let _ = netns::remove(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.etcd_dir);
    }
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        self.cleanup();
    }
}
