//! The five datapaths the benchmark compares, each built in its own namespaces with the same
//! addresses: an external host (198.51.100.1), a node (uplink 198.51.100.2), containers c1
//! (10.88.0.2, the server) and c2 (10.88.0.3) behind it.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use bpfnat_lab::Lab;
use nat_plumbing::netns;

pub const C1: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);
pub const EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The server's address when there is no node at all.
const DIRECT_SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);

/// Published ports every datapath forwards to c1: iperf3 (TCP and UDP) and the RR/CRR server.
pub const IPERF_PORT: u16 = 5201;
pub const RR_PORT: u16 = 7000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dp {
    /// (0) the peer on a single veth pair, no node hop: the machine's physical limit.
    Direct,
    /// (a) a Linux bridge and plain routing through the node, no NAT: the ceiling.
    Routing,
    /// (b) Docker's bridge network: bridge + iptables MASQUERADE / DNAT / FORWARD.
    Iptables,
    /// (c) the same rules in nftables.
    Nftables,
    /// (d) bpfnat.
    Bpfnat,
}

impl Dp {
    pub const ALL: [Self; 5] = [
        Self::Direct,
        Self::Routing,
        Self::Iptables,
        Self::Nftables,
        Self::Bpfnat,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Self::Direct => "(0) direct",
            Self::Routing => "(a) routing",
            Self::Iptables => "(b) iptables",
            Self::Nftables => "(c) nftables",
            Self::Bpfnat => "(d) bpfnat",
        }
    }

    const fn tag(self) -> &'static str {
        match self {
            Self::Direct => "0",
            Self::Routing => "a",
            Self::Iptables => "b",
            Self::Nftables => "c",
            Self::Bpfnat => "d",
        }
    }
}

/// Which way traffic goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// F3: outside client to a published port of c1.
    Inbound,
    /// F2: c1 to a server outside, through MASQUERADE.
    Outbound,
    /// F1: c2 to c1 on the node.
    Local,
}

impl Flow {
    pub const ALL: [Self; 3] = [Self::Inbound, Self::Outbound, Self::Local];

    pub const fn label(self) -> &'static str {
        match self {
            Self::Inbound => "F3 inbound (published port)",
            Self::Outbound => "F2 outbound (MASQUERADE)",
            Self::Local => "F1 container to container",
        }
    }
}

/// Client namespace, server namespace and the address the client connects to.
pub struct Endpoints {
    pub client: PathBuf,
    pub server: PathBuf,
    pub target: Ipv4Addr,
}

pub struct Topo {
    pub dp: Dp,
    prefix: String,
    /// The bpfnat lab, for (d).
    pub lab: Option<Lab>,
    pub ext: PathBuf,
    pub c1: PathBuf,
    pub c2: PathBuf,
}

fn sh(script: &str) -> Result<()> {
    let out = Command::new("sh")
        .args(["-e", "-c", script])
        .output()
        .context("run sh")?;
    if !out.status.success() {
        bail!(
            "setup failed: {}\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// How a datapath is set up beyond its kind.
#[derive(Clone, Copy, Debug)]
pub struct Opts {
    /// bpfnat's `up --xdp` (ignored by the baselines).
    pub xdp: &'static str,
    /// Turn the external host's transmit checksum offload off (and with it TSO): its packets
    /// then carry complete checksums, as from a NIC, which XDP needs.
    pub ext_tx_off: bool,
    /// Appended to the namespace prefix, so variants of one kind can coexist.
    pub tag: &'static str,
}

impl Opts {
    pub const DEFAULT: Self = Self {
        xdp: "off",
        ext_tx_off: false,
        tag: "",
    };
}

impl Topo {
    pub fn build(dp: Dp, bin: &Path) -> Result<Self> {
        Self::build_with(dp, bin, Opts::DEFAULT)
    }

    pub fn build_with(dp: Dp, bin: &Path, o: Opts) -> Result<Self> {
        let prefix = format!("bnb-{}{}", dp.tag(), o.tag);
        if dp == Dp::Bpfnat {
            let lab = Lab::new(&prefix, bin)?;
            if o.ext_tx_off {
                lab.ext_tx_checksum(false)?;
            }
            lab.ok(&["up", "--uplink", bpfnat_lab::UPLINK, "--xdp", o.xdp])?;
            let (c1, c2) = (lab.name("c1"), lab.name("c2"));
            let p = |port: u16, proto: &str| format!("{port}:{port}/{proto}");
            lab.ok(&[
                "container",
                "add",
                &c1,
                "--ip",
                "10.88.0.2",
                "-p",
                &p(IPERF_PORT, "tcp"),
                "-p",
                &p(IPERF_PORT, "udp"),
                "-p",
                &p(RR_PORT, "tcp"),
            ])?;
            lab.ok(&["container", "add", &c2, "--ip", "10.88.0.3"])?;
            return Ok(Self {
                dp,
                ext: lab.ext.clone(),
                c1: lab.container_ns(&c1),
                c2: lab.container_ns(&c2),
                prefix,
                lab: Some(lab),
            });
        }
        let t = Self {
            dp,
            ext: netns::path_of(&format!("{prefix}-ext")),
            c1: netns::path_of(&format!("{prefix}-c1")),
            c2: netns::path_of(&format!("{prefix}-c2")),
            prefix,
            lab: None,
        };
        t.cleanup();
        let built = t.build_baseline().and_then(|()| {
            if o.ext_tx_off {
                nat_plumbing::ethtool::set_in(
                    &t.ext,
                    "eth0",
                    nat_plumbing::ethtool::Offload::TxChecksum,
                    false,
                )
            } else {
                Ok(())
            }
        });
        if let Err(e) = built {
            t.cleanup();
            return Err(e);
        }
        Ok(t)
    }

    fn build_baseline(&self) -> Result<()> {
        let p = &self.prefix;
        for n in ["ext", "node", "c1", "c2"] {
            netns::create(&format!("{p}-{n}"))?;
        }
        if self.dp == Dp::Direct {
            return sh(&format!(
                "ip -n {p}-ext link add eth0 type veth peer name eth0 netns {p}-c1
                 ip -n {p}-ext addr add {EXT}/24 dev eth0; ip -n {p}-ext link set eth0 up
                 ip -n {p}-c1 addr add {DIRECT_SERVER}/24 dev eth0; ip -n {p}-c1 link set eth0 up
                 ip -n {p}-ext link set lo up; ip -n {p}-c1 link set lo up"
            ));
        }
        let mut s = format!(
            "ip -n {p}-node link add uplink0 type veth peer name eth0 netns {p}-ext
             ip -n {p}-node addr add {NODE}/24 dev uplink0; ip -n {p}-node link set uplink0 up
             ip -n {p}-ext addr add {EXT}/24 dev eth0; ip -n {p}-ext link set eth0 up
             ip -n {p}-node link set lo up; ip -n {p}-ext link set lo up
             ip -n {p}-node route add default via {EXT}
             ip netns exec {p}-node sysctl -qw net.ipv4.ip_forward=1
             ip -n {p}-node link add br0 type bridge
             ip -n {p}-node addr add 10.88.0.1/16 dev br0; ip -n {p}-node link set br0 up
"
        );
        for (c, ip) in [("c1", "10.88.0.2"), ("c2", "10.88.0.3")] {
            let _ = write!(
                s,
                "ip -n {p}-node link add v{c} type veth peer name eth0 netns {p}-{c}
                 ip -n {p}-node link set v{c} master br0 up
                 ip -n {p}-{c} addr add {ip}/16 dev eth0; ip -n {p}-{c} link set eth0 up
                 ip -n {p}-{c} link set lo up; ip -n {p}-{c} route add default via 10.88.0.1
"
            );
        }
        sh(&s)?;
        match self.dp {
            Dp::Routing => sh(&format!("ip -n {p}-ext route add 10.88.0.0/16 via {NODE}")),
            Dp::Iptables => self.iptables_rules(&[]),
            Dp::Nftables => self.nft_rules(0),
            _ => Ok(()),
        }
    }

    /// Docker's rules: MASQUERADE, a DOCKER chain of DNATs reached from PREROUTING, FORWARD
    /// accepting established and published traffic. `extra` DNAT rules go before the real ones.
    pub fn iptables_rules(&self, extra: &[u16]) -> Result<()> {
        let mut r = String::from(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\n",
        );
        r.push_str("-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n");
        r.push_str("-A POSTROUTING -s 10.88.0.0/16 ! -o br0 -j MASQUERADE\n");
        r.push_str("-A DOCKER -i br0 -j RETURN\n");
        for port in extra {
            let _ = writeln!(
                r,
                "-A DOCKER ! -i br0 -p tcp -m tcp --dport {port} -j DNAT --to-destination {C1}:{RR_PORT}"
            );
        }
        for (proto, port) in [("tcp", IPERF_PORT), ("udp", IPERF_PORT), ("tcp", RR_PORT)] {
            let _ = writeln!(
                r,
                "-A DOCKER ! -i br0 -p {proto} -m {proto} --dport {port} -j DNAT --to-destination {C1}:{port}"
            );
        }
        r.push_str("COMMIT\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n:DOCKER - [0:0]\n");
        r.push_str("-A FORWARD -o br0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
        // Docker's order: established traffic first, then a DOCKER chain with one ACCEPT per
        // published port, which every new connection walks.
        r.push_str("-A FORWARD -o br0 -j DOCKER\n");
        for port in extra {
            let _ = writeln!(
                r,
                "-A DOCKER -d {C1}/32 ! -i br0 -o br0 -p tcp -m tcp --dport {port} -j ACCEPT"
            );
        }
        for (proto, port) in [("tcp", IPERF_PORT), ("udp", IPERF_PORT), ("tcp", RR_PORT)] {
            let _ = writeln!(
                r,
                "-A DOCKER -d {C1}/32 ! -i br0 -o br0 -p {proto} -m {proto} --dport {port} -j ACCEPT"
            );
        }
        r.push_str(
            "-A FORWARD -i br0 ! -o br0 -j ACCEPT\n-A FORWARD -i br0 -o br0 -j ACCEPT\nCOMMIT\n",
        );
        let file = std::env::temp_dir().join(format!("{}-iptables.rules", self.prefix));
        std::fs::write(&file, r)?;
        sh(&format!(
            "ip netns exec {}-node iptables-restore < {}",
            self.prefix,
            file.display()
        ))
    }

    /// The same in nftables, the DNATs in one map (with `extra` non-matching entries).
    pub fn nft_rules(&self, extra: u32) -> Result<()> {
        let mut m = String::new();
        for i in 0..extra {
            let _ = write!(
                m,
                "198.51.100.{} . {} : {C1} . {RR_PORT}, ",
                10 + i / 55_000,
                10_000 + i % 55_000
            );
        }
        let _ = write!(
            m,
            "{NODE} . {IPERF_PORT} : {C1} . {IPERF_PORT}, {NODE} . {RR_PORT} : {C1} . {RR_PORT}"
        );
        let r = format!(
            "flush ruleset
table ip nat {{
  map published_tcp {{ type ipv4_addr . inet_service : ipv4_addr . inet_service; elements = {{ {m} }} }}
  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;
    iifname != \"br0\" fib daddr type local dnat ip addr . port to ip daddr . tcp dport map @published_tcp
    iifname != \"br0\" fib daddr type local udp dport {IPERF_PORT} dnat ip to {C1}:{IPERF_PORT}
  }}
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;
    ip saddr 10.88.0.0/16 oifname != \"br0\" masquerade
  }}
}}
table ip filter {{
  chain forward {{ type filter hook forward priority filter; policy drop;
    oifname \"br0\" ct state related,established accept
    ip daddr {C1} iifname != \"br0\" oifname \"br0\" tcp dport {{ {IPERF_PORT}, {RR_PORT} }} accept
    ip daddr {C1} iifname != \"br0\" oifname \"br0\" udp dport {IPERF_PORT} accept
    iifname \"br0\" accept
  }}
}}
"
        );
        let file = std::env::temp_dir().join(format!("{}-nft.rules", self.prefix));
        std::fs::write(&file, r)?;
        sh(&format!(
            "ip netns exec {}-node nft -f {}",
            self.prefix,
            file.display()
        ))
    }

    /// Client, server and target address for `flow`.
    pub fn endpoints(&self, flow: Flow) -> Endpoints {
        let (client, server, target) = match (self.dp, flow) {
            (Dp::Direct, Flow::Outbound) => (&self.c1, &self.ext, EXT),
            (Dp::Direct, _) => (&self.ext, &self.c1, DIRECT_SERVER),
            (Dp::Routing, Flow::Inbound) => (&self.ext, &self.c1, C1),
            (_, Flow::Inbound) => (&self.ext, &self.c1, NODE),
            (_, Flow::Outbound) => (&self.c1, &self.ext, EXT),
            (_, Flow::Local) => (&self.c2, &self.c1, C1),
        };
        Endpoints {
            client: client.clone(),
            server: server.clone(),
            target,
        }
    }

    fn cleanup(&self) {
        if self.lab.is_some() {
            return;
        }
        for n in ["ext", "node", "c1", "c2"] {
            let _ = netns::remove(&netns::path_of(&format!("{}-{n}", self.prefix)));
        }
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        self.cleanup();
    }
}
