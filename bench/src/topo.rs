//! The five datapaths the benchmark compares, each built in its own namespaces with the same
//! addresses, dual-stack: an external host (198.51.100.1, 2001:db8:1::1), a node (uplink
//! 198.51.100.2, 2001:db8:1::2), containers c1 (10.88.0.2, fd00:88::2, the server) and c2
//! (10.88.0.3, fd00:88::3) behind it.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
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

/// The same over IPv6 (Docker's ip6tables rules and nftables' `ip6` tables for the
/// baselines, `up --subnet6` for bpfnat).
pub const C1_6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x88, 0, 0, 0, 0, 0, 2);
const C2_6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x88, 0, 0, 0, 0, 0, 3);
const GW6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x88, 0, 0, 0, 0, 0, 1);
const SUBNET6: &str = "fd00:88::/64";
pub const EXT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
pub const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
const DIRECT_SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 9);

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

/// Which way traffic goes, and over which family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// F3: outside client to a published port of c1.
    Inbound,
    /// F2: c1 to a server outside, through MASQUERADE.
    Outbound,
    /// F1: c2 to c1 on the node.
    Local,
    /// The same three over IPv6 (F2 is NAT66).
    Inbound6,
    Outbound6,
    Local6,
}

impl Flow {
    pub const ALL: [Self; 6] = [
        Self::Inbound,
        Self::Outbound,
        Self::Local,
        Self::Inbound6,
        Self::Outbound6,
        Self::Local6,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Self::Inbound => "F3 inbound (published port)",
            Self::Outbound => "F2 outbound (MASQUERADE)",
            Self::Local => "F1 container to container",
            Self::Inbound6 => "F3 inbound, IPv6",
            Self::Outbound6 => "F2 outbound, IPv6 (NAT66)",
            Self::Local6 => "F1 container to container, IPv6",
        }
    }

    /// The IPv4 flow this one repeats over IPv6, or itself.
    const fn base(self) -> Self {
        match self {
            Self::Inbound6 => Self::Inbound,
            Self::Outbound6 => Self::Outbound,
            Self::Local6 => Self::Local,
            f => f,
        }
    }

    const fn v6(self) -> bool {
        matches!(self, Self::Inbound6 | Self::Outbound6 | Self::Local6)
    }
}

/// Client namespace, server namespace and the address the client connects to.
pub struct Endpoints {
    pub client: PathBuf,
    pub server: PathBuf,
    pub target: IpAddr,
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
            sh(&format!(
                "ip -n {prefix}-node addr add {NODE6}/64 dev {} nodad
                 ip -n {prefix}-ext addr add {EXT6}/64 dev eth0 nodad",
                bpfnat_lab::UPLINK
            ))?;
            lab.ok(&[
                "up",
                "--uplink",
                bpfnat_lab::UPLINK,
                "--xdp",
                o.xdp,
                "--subnet6",
                SUBNET6,
            ])?;
            let (c1, c2) = (lab.name("c1"), lab.name("c2"));
            let p = |port: u16, proto: &str| format!("{port}:{port}/{proto}");
            lab.ok(&[
                "container",
                "add",
                &c1,
                "--ip",
                "10.88.0.2",
                "--ip6",
                &C1_6.to_string(),
                "-p",
                &p(IPERF_PORT, "tcp"),
                "-p",
                &p(IPERF_PORT, "udp"),
                "-p",
                &p(RR_PORT, "tcp"),
            ])?;
            lab.ok(&[
                "container",
                "add",
                &c2,
                "--ip",
                "10.88.0.3",
                "--ip6",
                &C2_6.to_string(),
            ])?;
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
                 ip -n {p}-ext addr add {EXT6}/64 dev eth0 nodad
                 ip -n {p}-c1 addr add {DIRECT_SERVER6}/64 dev eth0 nodad
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
             ip -n {p}-node addr add {NODE6}/64 dev uplink0 nodad
             ip -n {p}-ext addr add {EXT6}/64 dev eth0 nodad
             ip netns exec {p}-node sysctl -qw net.ipv6.conf.all.forwarding=1
             ip -n {p}-node link add br0 type bridge
             ip -n {p}-node addr add 10.88.0.1/16 dev br0; ip -n {p}-node link set br0 up
             ip -n {p}-node addr add {GW6}/64 dev br0 nodad
"
        );
        for (c, ip, ip6) in [("c1", "10.88.0.2", C1_6), ("c2", "10.88.0.3", C2_6)] {
            let _ = write!(
                s,
                "ip -n {p}-node link add v{c} type veth peer name eth0 netns {p}-{c}
                 ip -n {p}-node link set v{c} master br0 up
                 ip -n {p}-{c} addr add {ip}/16 dev eth0; ip -n {p}-{c} link set eth0 up
                 ip -n {p}-{c} addr add {ip6}/64 dev eth0 nodad
                 ip -n {p}-{c} link set lo up; ip -n {p}-{c} route add default via 10.88.0.1
                 ip -n {p}-{c} -6 route add default via {GW6}
"
            );
        }
        sh(&s)?;
        match self.dp {
            Dp::Routing => sh(&format!(
                "ip -n {p}-ext route add 10.88.0.0/16 via {NODE}
                 ip -n {p}-ext -6 route add {SUBNET6} via {NODE6}"
            )),
            Dp::Iptables => self.iptables_rules(&[]),
            Dp::Nftables => self.nft_rules(0),
            _ => Ok(()),
        }
    }

    /// Docker's rules: MASQUERADE, a DOCKER chain of DNATs reached from PREROUTING, FORWARD
    /// accepting established and published traffic, in iptables and (as Docker 27 writes
    /// them by default) ip6tables. `extra` DNAT rules go before the real IPv4 ones.
    pub fn iptables_rules(&self, extra: &[u16]) -> Result<()> {
        for (restore, rules) in [
            (
                "iptables-restore",
                docker_rules(&C1.into(), "10.88.0.0/16", extra),
            ),
            (
                "ip6tables-restore",
                docker_rules(&C1_6.into(), SUBNET6, &[]),
            ),
        ] {
            let file = std::env::temp_dir().join(format!("{}-{restore}.rules", self.prefix));
            std::fs::write(&file, rules)?;
            sh(&format!(
                "ip netns exec {}-node {restore} < {}",
                self.prefix,
                file.display()
            ))?;
        }
        Ok(())
    }

    /// The same in nftables, the DNATs in one map per family (with `extra` non-matching
    /// entries in the IPv4 one).
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
table ip6 nat {{
  map published_tcp6 {{ type ipv6_addr . inet_service : ipv6_addr . inet_service; elements = {{ {NODE6} . {IPERF_PORT} : {C1_6} . {IPERF_PORT}, {NODE6} . {RR_PORT} : {C1_6} . {RR_PORT} }} }}
  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;
    iifname != \"br0\" fib daddr type local dnat ip6 addr . port to ip6 daddr . tcp dport map @published_tcp6
    iifname != \"br0\" fib daddr type local udp dport {IPERF_PORT} dnat ip6 to [{C1_6}]:{IPERF_PORT}
  }}
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;
    ip6 saddr {SUBNET6} oifname != \"br0\" masquerade
  }}
}}
table ip6 filter {{
  chain forward {{ type filter hook forward priority filter; policy drop;
    oifname \"br0\" ct state related,established accept
    ip6 daddr {C1_6} iifname != \"br0\" oifname \"br0\" tcp dport {{ {IPERF_PORT}, {RR_PORT} }} accept
    ip6 daddr {C1_6} iifname != \"br0\" oifname \"br0\" udp dport {IPERF_PORT} accept
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
        let pick = |v4: Ipv4Addr, v6: Ipv6Addr| -> IpAddr {
            if flow.v6() { v6.into() } else { v4.into() }
        };
        let (client, server, target) = match (self.dp, flow.base()) {
            (Dp::Direct, Flow::Outbound) => (&self.c1, &self.ext, pick(EXT, EXT6)),
            (Dp::Direct, _) => (&self.ext, &self.c1, pick(DIRECT_SERVER, DIRECT_SERVER6)),
            (Dp::Routing, Flow::Inbound) => (&self.ext, &self.c1, pick(C1, C1_6)),
            (_, Flow::Inbound) => (&self.ext, &self.c1, pick(NODE, NODE6)),
            (_, Flow::Outbound) => (&self.c1, &self.ext, pick(EXT, EXT6)),
            (_, _) => (&self.c2, &self.c1, pick(C1, C1_6)),
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

/// Docker's iptables-restore input for one family: its container `c1`, its subnet.
fn docker_rules(c1: &IpAddr, subnet: &str, extra: &[u16]) -> String {
    // `[fd00:88::2]:80` in a DNAT target, `/128` for a host.
    let (to, host) = match c1 {
        IpAddr::V4(a) => (a.to_string(), format!("{a}/32")),
        IpAddr::V6(a) => (format!("[{a}]"), format!("{a}/128")),
    };
    let mut r = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\n",
    );
    r.push_str("-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n");
    let _ = writeln!(r, "-A POSTROUTING -s {subnet} ! -o br0 -j MASQUERADE");
    r.push_str("-A DOCKER -i br0 -j RETURN\n");
    for port in extra {
        let _ = writeln!(
            r,
            "-A DOCKER ! -i br0 -p tcp -m tcp --dport {port} -j DNAT --to-destination {to}:{RR_PORT}"
        );
    }
    for (proto, port) in [("tcp", IPERF_PORT), ("udp", IPERF_PORT), ("tcp", RR_PORT)] {
        let _ = writeln!(
            r,
            "-A DOCKER ! -i br0 -p {proto} -m {proto} --dport {port} -j DNAT --to-destination {to}:{port}"
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
            "-A DOCKER -d {host} ! -i br0 -o br0 -p tcp -m tcp --dport {port} -j ACCEPT"
        );
    }
    for (proto, port) in [("tcp", IPERF_PORT), ("udp", IPERF_PORT), ("tcp", RR_PORT)] {
        let _ = writeln!(
            r,
            "-A DOCKER -d {host} ! -i br0 -o br0 -p {proto} -m {proto} --dport {port} -j ACCEPT"
        );
    }
    r.push_str(
        "-A FORWARD -i br0 ! -o br0 -j ACCEPT\n-A FORWARD -i br0 -o br0 -j ACCEPT\nCOMMIT\n",
    );
    r
}

impl Drop for Topo {
    fn drop(&mut self) {
        self.cleanup();
    }
}
