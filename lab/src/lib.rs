//! The standard lab: an "external" host namespace, a "node" namespace where bpfnat runs, and
//! containers behind the node. Used by `bpfnat demo` (the scenario in [`demo`]), the end-to-end
//! tests and the benchmarks. It drives bpfnat only as a binary, never as a library.
//!
//! ```text
//!  <prefix>-ext: eth0 198.51.100.1/24  ──veth──  <prefix>-node: uplink0 198.51.100.2/24
//!                                                 default via 198.51.100.1
//! ```
//! The external host has no route to the container subnet: anything that reaches it from a
//! container was masqueraded. Each lab pins into its own bpffs instance, mounted at
//! `/run/bpfnat-<prefix>.bpffs`, so it never touches the host's `/sys/fs/bpf`. Dropping the
//! [`Lab`] removes every namespace, pin, mount and state file it made, also when a test failed
//! half-way.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, Result, bail};

use nat_plumbing::{netlink::Netlink, netns};

pub mod cluster;
pub mod demo;

pub const EXT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// In a routed lab: the router's address on the node's link (the node's default gateway).
pub const ROUTER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// In a routed lab: the external host, behind the router.
pub const FAR_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const ROUTER_FAR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const UPLINK: &str = "uplink0";

pub struct Lab {
    pub prefix: String,
    pub ext: PathBuf,
    pub node: PathBuf,
    /// bpfnat's `--bpffs-dir`, inside the lab's own bpffs mount.
    pub bpffs_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Where the lab's bpffs instance is mounted.
    bpffs_mount: PathBuf,
    /// The router between node and external host, in a routed lab.
    pub router: Option<PathBuf>,
    bin: PathBuf,
}

/// `bin --bpffs-dir … --state-dir … ARGS`, to be run inside the namespace `ns`.
fn bpfnat_in(
    bin: &Path,
    ns: &Path,
    bpffs_dir: &Path,
    state_dir: &Path,
    args: &[&str],
) -> Result<Command> {
    let mut cmd = Command::new(bin);
    cmd.arg("--bpffs-dir")
        .arg(bpffs_dir)
        .arg("--state-dir")
        .arg(state_dir)
        .args(args);
    netns::command_in(&mut cmd, ns)?;
    Ok(cmd)
}

/// A command's standard output, or its standard error as the failure of `what`.
fn stdout_of(out: Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn block_on<T>(f: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

impl Lab {
    /// Build the lab. `bin` is the bpfnat binary that [`Lab::bpfnat`] runs.
    pub fn new(prefix: &str, bin: &Path) -> Result<Self> {
        Self::make(prefix, bin, None)
    }

    /// A routed lab: node ── router ── external host ([`FAR_ADDR`]), where the router's link
    /// to the external host has MTU `far_mtu`. For ICMP errors (PMTU discovery, traceroute).
    pub fn with_router(prefix: &str, bin: &Path, far_mtu: u32) -> Result<Self> {
        Self::make(prefix, bin, Some(far_mtu))
    }

    fn make(prefix: &str, bin: &Path, far_mtu: Option<u32>) -> Result<Self> {
        let mut lab = Self {
            prefix: prefix.to_owned(),
            ext: netns::path_of(&format!("{prefix}-ext")),
            node: netns::path_of(&format!("{prefix}-node")),
            bpffs_dir: PathBuf::from(format!("/run/bpfnat-{prefix}.bpffs/bpfnat")),
            state_dir: PathBuf::from(format!("/run/bpfnat-{prefix}")),
            bpffs_mount: PathBuf::from(format!("/run/bpfnat-{prefix}.bpffs")),
            router: far_mtu.map(|_| netns::path_of(&format!("{prefix}-router"))),
            bin: bin.to_owned(),
        };
        // Leftovers of an earlier run that died: start clean.
        lab.cleanup();
        let built = lab.mount_bpffs().and_then(|()| match far_mtu {
            None => lab.build(),
            Some(mtu) => lab.build_routed(mtu),
        });
        if let Err(e) = built {
            lab.cleanup();
            lab.prefix.clear();
            return Err(e);
        }
        Ok(lab)
    }

    /// A bpffs instance of the lab's own (the kernel also puts its `maps.debug` and
    /// `progs.debug` iterators in every new instance; they go with the unmount).
    fn mount_bpffs(&self) -> Result<()> {
        std::fs::create_dir_all(&self.bpffs_mount)
            .with_context(|| format!("create {}", self.bpffs_mount.display()))?;
        nix::mount::mount(
            Some("bpf"),
            &self.bpffs_mount,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mount bpffs on {}", self.bpffs_mount.display()))
    }

    fn build_routed(&self, far_mtu: u32) -> Result<()> {
        netns::create(&format!("{}-ext", self.prefix))?;
        netns::create(&format!("{}-node", self.prefix))?;
        let router = netns::create(&format!("{}-router", self.prefix))?;
        netns::set_sysctl(&router, "net.ipv4.ip_forward", "1")?;
        let (ext, node) = (self.ext.clone(), self.node.clone());
        block_on(async move {
            let n = Netlink::in_netns(&node)?;
            let r = Netlink::in_netns(&router)?;
            let e = Netlink::in_netns(&ext)?;
            for h in [&n, &r, &e] {
                h.lo_up().await?;
            }
            n.add_veth(UPLINK, "eth0", &router, [0x02, 0x00, 198, 51, 100, 1], 1500)
                .await?;
            r.add_veth("eth1", "eth0", &ext, [0x02, 0x00, 203, 0, 113, 2], 1500)
                .await?;
            let up = n.require_link(UPLINK).await?;
            n.add_addr(up.index, NODE_ADDR, 24).await?;
            n.set_up(up.index).await?;
            n.add_default_route(ROUTER_ADDR, up.index).await?;
            let r0 = r.require_link("eth0").await?;
            let r1 = r.require_link("eth1").await?;
            r.add_addr(r0.index, ROUTER_ADDR, 24).await?;
            r.add_addr(r1.index, ROUTER_FAR, 24).await?;
            // Only the router's side is narrow: it must send "fragmentation needed".
            r.set_mtu(r1.index, far_mtu).await?;
            r.set_up(r0.index).await?;
            r.set_up(r1.index).await?;
            let e0 = e.require_link("eth0").await?;
            e.add_addr(e0.index, FAR_ADDR, 24).await?;
            e.set_up(e0.index).await?;
            e.add_default_route(ROUTER_FAR, e0.index).await?;
            Ok(())
        })
        .context("build the routed lab topology")
    }

    fn build(&self) -> Result<()> {
        netns::create(&format!("{}-ext", self.prefix))?;
        netns::create(&format!("{}-node", self.prefix))?;
        let (ext, node) = (self.ext.clone(), self.node.clone());
        block_on(async move {
            let n = Netlink::in_netns(&node)?;
            let e = Netlink::in_netns(&ext)?;
            n.lo_up().await?;
            e.lo_up().await?;
            n.add_veth(UPLINK, "eth0", &ext, [0x02, 0x00, 198, 51, 100, 1], 1500)
                .await?;
            let up = n.require_link(UPLINK).await?;
            n.add_addr(up.index, NODE_ADDR, 24).await?;
            n.set_up(up.index).await?;
            n.add_default_route(EXT_ADDR, up.index).await?;
            let eth0 = e.require_link("eth0").await?;
            e.add_addr(eth0.index, EXT_ADDR, 24).await?;
            e.set_up(eth0.index).await?;
            Ok(())
        })
        .context("build the lab topology")
    }

    /// A container name unique to this lab.
    #[must_use]
    pub fn name(&self, short: &str) -> String {
        format!("{}-{short}", self.prefix)
    }

    /// Turn the external host's transmit checksum offload off (or back on). Its packets then
    /// leave with complete checksums, as from a real NIC: what XDP on the node's uplink needs
    /// (XDP cannot see that a local sender's checksum is only partial).
    pub fn ext_tx_checksum(&self, on: bool) -> Result<()> {
        use nat_plumbing::ethtool;
        ethtool::set_in(&self.ext, "eth0", ethtool::Offload::TxChecksum, on)
    }

    /// The namespace of container `name` (as created by `bpfnat container add`).
    #[must_use]
    pub fn container_ns(&self, name: &str) -> PathBuf {
        netns::path_of(name)
    }

    /// `bpfnat --bpffs-dir … --state-dir … ARGS`, to be run inside the node namespace.
    pub fn bpfnat(&self, args: &[&str]) -> Result<Command> {
        bpfnat_in(
            &self.bin,
            &self.node,
            &self.bpffs_dir,
            &self.state_dir,
            args,
        )
    }

    /// Run bpfnat in the node and return its output, whatever the exit status.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        self.bpfnat(args)?
            .output()
            .with_context(|| format!("run {}", self.bin.display()))
    }

    /// Run bpfnat in the node; fail with its stderr unless it succeeds. Returns stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        stdout_of(self.run(args)?, &format!("bpfnat {}", args.join(" ")))
    }

    /// Remove everything the lab and bpfnat made for it. Idempotent.
    pub fn cleanup(&self) {
        if self.prefix.is_empty() {
            return;
        }
        if self.node.exists() && self.bin.exists() {
            let _ = self.run(&["down"]);
        }
        if let Ok(dir) = std::fs::read_dir(netns::NETNS_DIR) {
            let mine = format!("{}-", self.prefix);
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with(&mine) {
                    let _ = netns::remove(&e.path());
                }
            }
        }
        // Every instance that is stacked there (an earlier run may have died mounted).
        while nix::mount::umount2(&self.bpffs_mount, nix::mount::MntFlags::MNT_DETACH).is_ok() {}
        let _ = std::fs::remove_dir(&self.bpffs_mount);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Bounded traffic helpers for the lab: every socket is made inside a namespace, every wait
/// has a deadline.
pub mod traffic {
    use std::{
        io::{Read as _, Write as _},
        net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
        path::Path,
        thread::JoinHandle,
        time::{Duration, Instant},
    };

    use anyhow::{Context as _, Result, bail};

    use nat_plumbing::netns::run_in;

    const IO_TIMEOUT: Duration = Duration::from_secs(5);

    /// What a server saw: the peers of the connections or datagrams it answered.
    pub type Seen = JoinHandle<Vec<SocketAddr>>;

    /// A TCP server in namespace `ns` on `addr` that answers up to `max` connections (or
    /// until `window` passes) with an HTTP response naming `who` and the peer it saw.
    pub fn http_server(
        ns: &Path,
        addr: SocketAddr,
        who: &str,
        max: usize,
        window: Duration,
    ) -> Result<Seen> {
        let listener = run_in(ns, move || {
            TcpListener::bind(addr).with_context(|| format!("bind {addr}"))
        })?;
        listener.set_nonblocking(true)?;
        let who = who.to_owned();
        Ok(std::thread::spawn(move || {
            let deadline = Instant::now() + window;
            let mut seen = Vec::new();
            while seen.len() < max && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(IO_TIMEOUT));
                        let mut buf = [0u8; 1024];
                        let mut req = Vec::new();
                        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => req.extend_from_slice(&buf[..n]),
                            }
                        }
                        let body = format!("hello from {who}, you are {peer}\n");
                        let resp = format!(
                            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = s.write_all(resp.as_bytes());
                        seen.push(peer);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            seen
        }))
    }

    /// `GET /` from namespace `ns` to `addr`: the whole response (any server, any status).
    pub fn http_get_raw(ns: &Path, addr: SocketAddr) -> Result<String> {
        run_in(ns, move || {
            let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
                .with_context(|| format!("connect to {addr}"))?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.write_all(format!("GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)
                .with_context(|| format!("read the response from {addr}"))?;
            Ok(resp)
        })
    }

    /// `GET /` from namespace `ns` to `addr`; returns the body of a 200 response.
    pub fn http_get(ns: &Path, addr: SocketAddr) -> Result<String> {
        let resp = http_get_raw(ns, addr)?;
        match resp.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.0 200") => Ok(body.to_owned()),
            _ => bail!("unexpected response from {addr}: {resp:?}"),
        }
    }

    /// A UDP server in `ns` on `addr` that echoes up to `max` datagrams, prefixed with the
    /// peer address it saw (`"<peer> <payload>"`).
    pub fn udp_echo(ns: &Path, addr: SocketAddr, max: usize, window: Duration) -> Result<Seen> {
        let sock = run_in(ns, move || {
            UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))
        })?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(std::thread::spawn(move || {
            let deadline = Instant::now() + window;
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 65536];
            while seen.len() < max && Instant::now() < deadline {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    let mut reply = format!("{peer} ").into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = sock.send_to(&reply, peer);
                    seen.push(peer);
                }
            }
            seen
        }))
    }

    /// Send `payload` from `ns` (bound to `local`, port 0 = any) to `dst` and wait for one
    /// reply; retries a few times, since the first datagram may race ARP.
    pub fn udp_ask(
        ns: &Path,
        local: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
    ) -> Result<String> {
        let payload = payload.to_vec();
        run_in(ns, move || {
            let sock = UdpSocket::bind(local).with_context(|| format!("bind udp {local}"))?;
            sock.set_read_timeout(Some(Duration::from_millis(500)))?;
            let mut buf = vec![0u8; 65536];
            for _ in 0..6 {
                sock.send_to(&payload, dst)
                    .with_context(|| format!("send to {dst}"))?;
                if let Ok((n, from)) = sock.recv_from(&mut buf)
                    && from == dst
                {
                    return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
            bail!("no UDP reply from {dst}")
        })
    }
}
