//! The node as a service: bring the datapath up from a `NodeSpec`, take it down, forget a
//! record another namespace left. The CLI, the agent and the CNI plugin call these; showing
//! the result is theirs.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result, anyhow, bail};
use nat_common::{CFG_MASQUERADE, CFG_STATIC_NAT, CONNTRACK_MAX_ENTRIES, Config, Net4, Net6};

use crate::{
    datapath::{self, Maps, XdpAttach},
    env::Env,
    net::{Cidr, Cidr6, PortRange},
    netlink::{Link, Netlink},
    netns,
    state::{Node, State, Store, Subnet4, Subnet6, XdpSetting},
};

/// The interface that holds the container gateway address (one end of a veth pair whose
/// other end is `GATEWAY_PEER`; deleting either deletes both).
pub const GATEWAY_IF: &str = "bn-gw";
const GATEWAY_PEER: &str = "bn-gw-p";

/// The container subnet when none is given.
pub const DEFAULT_SUBNET: &str = "10.88.0.0/16";
/// The ports MASQUERADE may allocate when none are given.
pub const DEFAULT_PORT_RANGE: &str = "1024-65535";

/// What a node is brought up with. `NodeSpec::new` holds every default.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// The interface that leads outside (its address is the MASQUERADE address).
    pub uplink: String,
    /// Default: `DEFAULT_SUBNET`, except on a v6-only node (`--subnet6` alone, on an uplink
    /// without an IPv4 address), which has none.
    pub subnet: Option<Cidr>,
    /// Default: the subnet's first address.
    pub gateway: Option<Ipv4Addr>,
    /// Default: the uplink's own address.
    pub snat_ip: Option<Ipv4Addr>,
    pub port_range: PortRange,
    /// Conntrack table size in entries (two per connection).
    pub conntrack_max: u32,
    /// Never MASQUERADE from a port of the node's own ephemeral range.
    pub masquerade_avoid_host_ports: bool,
    pub xdp: XdpChoice,
    /// An IPv6 container subnet beside the IPv4 one.
    pub subnet6: Option<Cidr6>,
    /// Default: the IPv6 subnet's first address after the subnet-router anycast one.
    pub gateway6: Option<Ipv6Addr>,
    /// NAT66 source. Default: the uplink's first global IPv6 address.
    pub snat_ip6: Option<Ipv6Addr>,
}

impl NodeSpec {
    /// A node on `uplink` with every default.
    #[must_use]
    pub fn new(uplink: String) -> Self {
        Self {
            uplink,
            subnet: None,
            gateway: None,
            snat_ip: None,
            port_range: DEFAULT_PORT_RANGE
                .parse()
                .expect("the default port range parses"),
            conntrack_max: CONNTRACK_MAX_ENTRIES,
            masquerade_avoid_host_ports: false,
            xdp: XdpChoice::Auto,
            subnet6: None,
            gateway6: None,
            snat_ip6: None,
        }
    }
}

/// What `up` found or made.
pub enum Upped {
    /// The node was already up with these settings.
    Already(Node),
    /// The node is up now.
    Fresh(Node),
    /// The node was recorded with these settings but its pinned datapath was gone (pins
    /// removed, bpffs remounted): the node's part is back; its endpoints must be rewired
    /// (`endpoints::up` does).
    Repaired(Node),
}

impl Upped {
    /// The node as it is now, however it got there.
    #[must_use]
    pub fn into_node(self) -> Node {
        match self {
            Self::Already(n) | Self::Fresh(n) | Self::Repaired(n) => n,
        }
    }
}

/// The uplink's inbound XDP fast path (`up --xdp`). `auto`: native XDP on a physical uplink,
/// TC alone on a virtual one (veth, bridge, …), where XDP measured slower than TC's
/// bpf_redirect_peer and cannot handle the partial checksums of local senders.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpChoice {
    #[default]
    Auto,
    Native,
    Generic,
    Off,
}

impl XdpChoice {
    /// What to attach to `uplink`.
    fn resolve(self, uplink: &Link) -> XdpSetting {
        match self {
            Self::Auto if uplink.kind.is_none() => XdpSetting::Native,
            Self::Auto | Self::Off => XdpSetting::Off,
            Self::Native => XdpSetting::Native,
            Self::Generic => XdpSetting::Generic,
        }
    }
}

/// The node's ephemeral port range, where Docker picks host ports that were left open.
pub fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(str::parse::<u16>);
            Some((it.next()?.ok()?, it.next()?.ok()?))
        })
        .unwrap_or((32768, 60999))
}

/// This boot of the kernel, as `/proc/sys/kernel/random/boot_id` names it; `None` where it
/// cannot be read (no procfs), and then no record is taken for another boot's.
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The boot `node` came up in and this one, when they differ.
pub fn earlier_boot(node: &Node) -> Option<(String, String)> {
    let then = node.boot_id.as_ref()?;
    boot_id()
        .filter(|now| now != then)
        .map(|now| (then.clone(), now))
}

/// How many ports two inclusive ranges share.
fn overlap(a: (u16, u16), b: (u16, u16)) -> u32 {
    let lo = a.0.max(b.0);
    let hi = a.1.min(b.1);
    if lo > hi { 0 } else { u32::from(hi - lo) + 1 }
}

/// Fail with a hint unless the node is up.
pub fn require_node(state: &State) -> Result<&Node> {
    state.node.as_ref().ok_or_else(|| anyhow!(datapath::NOT_UP))
}

/// The datapath's `config` for `node`; `static_nat`: whether any static NAT mapping exists.
pub fn config_of(node: &Node, static_nat: bool) -> Config {
    Config {
        uplink_ifindex: node.uplink_ifindex,
        flags: CFG_MASQUERADE | if static_nat { CFG_STATIC_NAT } else { 0 },
        port_min: node.port_min,
        port_max: node.port_max,
        host_port_min: node.host_port_min,
        host_port_max: node.host_port_max,
        uplink_mac: node.uplink_mac,
        netns_cookie: node.netns_cookie,
        v4: node.v4.as_ref().map_or_else(Net4::none, |v| Net4 {
            snat_addr: v.snat_ip.octets(),
            gateway_addr: v.gateway.octets(),
            node_addr: v.node_addr.octets(),
            subnet_addr: v.subnet.octets(),
            subnet_mask: v.cidr().mask().octets(),
        }),
        v6: node.v6.as_ref().map_or_else(Net6::default, |v| Net6 {
            subnet_addr: v.subnet.octets(),
            gateway_addr: v.gateway.octets(),
            snat_addr: v.snat.map_or([0; 16], |a| a.octets()),
            prefix_len: v.prefix_len,
            _pad: [0; 7],
        }),
        ..Config::default()
    }
}

/// When the recorded node lives in another network namespace than this one (the node's
/// namespace was deleted and made again: a runtime's node, a lab), or came up in an earlier
/// boot (a state dir that outlived a reboot; the host's namespace has the same cookie in
/// every boot), nothing recorded is true here: its ifindexes, its cookie, its containers'
/// veths are gone with it, while what it left in files stays (pins of another namespace's
/// node with their TCX and cgroup links, namespace files). Remove those, forget the record,
/// and say so. Returns whether there was such a record.
pub fn forget_stale_node(ctx: &Env, store: &Store, state: &mut State) -> Result<bool> {
    let Some(node) = &state.node else {
        return Ok(false);
    };
    let here = datapath::netns_cookie()?;
    let why = match earlier_boot(node) {
        Some((then, now)) => {
            format!("came up in an earlier boot of this machine (boot ID {then}, now {now})")
        }
        None if node.netns_cookie != here => {
            format!("belongs to a network namespace that is not this one (cookie {here})")
        }
        None => return Ok(false),
    };
    eprintln!(
        "warning: the recorded bpfnat node (uplink {}, netns cookie {}) {why}: removing what is left of it and starting fresh",
        node.uplink, node.netns_cookie
    );
    for c in state.containers.values().filter(|c| c.owns_netns) {
        netns::remove(&c.netns)
            .with_context(|| format!("remove the namespace of container {}", c.name))?;
    }
    datapath::uninstall(&ctx.pins)?;
    *state = State {
        generation: state.generation,
        ..State::default()
    };
    store.save(state)?;
    Ok(true)
}

pub async fn up(ctx: &Env, a: NodeSpec) -> Result<Upped> {
    if a.conntrack_max < 1024 {
        bail!(
            "--conntrack-max {} is too small (at least 1024)",
            a.conntrack_max
        );
    }
    // (1, 0): an empty range, nothing avoided.
    let host_ports = if a.masquerade_avoid_host_ports {
        ephemeral_range()
    } else {
        (1, 0)
    };
    let outside = (u32::from(a.port_range.max - a.port_range.min) + 1)
        .saturating_sub(overlap((a.port_range.min, a.port_range.max), host_ports));
    if outside == 0 {
        bail!(
            "--port-range {}-{} lies inside the node's ephemeral ports {}-{} (net.ipv4.ip_local_port_range), which MASQUERADE leaves to the node's own connections: choose ports outside it",
            a.port_range.min,
            a.port_range.max,
            host_ports.0,
            host_ports.1
        );
    }
    if a.subnet.is_some() || a.gateway.is_some() {
        // Refused before anything is looked at or changed (`subnet4` decides the rest).
        subnet_and_gateway(&a)?;
    }
    let mut v6 = subnet6(&a)?;
    let store = ctx.store()?;
    let mut state = store.load()?;
    forget_stale_node(ctx, &store, &mut state)?;
    let nl = Netlink::current()?;
    let uplink = nl
        .link(&a.uplink)
        .await?
        .ok_or_else(|| anyhow!("attach to uplink {}: interface not found", a.uplink))?;
    let uplink_addr = nl
        .ipv4_addrs(uplink.index)
        .await?
        .first()
        .map(|(ip, _)| *ip);
    if let Some(v6) = &mut v6
        && v6.snat_from_uplink
    {
        v6.snat = nl.global_ipv6_addrs(uplink.index).await?.first().copied();
    }
    let had_v4 = state.node.as_ref().map(|n| n.v4.is_some());
    let node = Node {
        uplink: a.uplink.clone(),
        uplink_ifindex: uplink.index,
        v4: subnet4(&a, uplink_addr, had_v4)?,
        port_min: a.port_range.min,
        port_max: a.port_range.max,
        gateway_ifindex: 0,
        gateway_if: GATEWAY_IF.to_owned(),
        uplink_mac: uplink.mac,
        netns_cookie: datapath::netns_cookie()?,
        host_port_min: host_ports.0,
        host_port_max: host_ports.1,
        xdp: a.xdp.resolve(&uplink),
        v6,
        boot_id: boot_id(),
    };
    if let Some(old) = &state.node {
        let same = Node {
            gateway_ifindex: old.gateway_ifindex,
            // A record of an earlier version has none (`forget_stale_node` took one of
            // another boot's).
            boot_id: old.boot_id.clone(),
            // `auto` may have fallen back to off.
            xdp: if a.xdp == XdpChoice::Auto {
                old.xdp
            } else {
                node.xdp
            },
            ..node.clone()
        };
        if *old == same && ctx.pins.installed() {
            // The node's addresses may have changed since: the next command converges.
            sync_node_addrs(&nl, &mut Maps::open(&ctx.pins)?, old).await?;
            let mut old = old.clone();
            if old.boot_id.is_none() && node.boot_id.is_some() {
                old.boot_id.clone_from(&node.boot_id);
                state.node = Some(old.clone());
                store.save(&state)?;
            }
            return Ok(Upped::Already(old));
        }
        if *old == same {
            // Recorded, but the datapath is gone: put it back with the recorded settings.
            let node = Node {
                boot_id: node.boot_id.clone(),
                ..old.clone()
            };
            let node = install_node(ctx, &nl, node, a.conntrack_max, a.xdp).await?;
            state.node = Some(node.clone());
            store.save(&state)?;
            return Ok(Upped::Repaired(node));
        }
        bail!(
            "bpfnat is already up with other settings (uplink {}, subnets {}, XDP {}): run `bpfnat down` first to change them",
            old.uplink,
            old.subnets(),
            old.xdp
        );
    }

    let node = install_node(ctx, &nl, node, a.conntrack_max, a.xdp).await?;
    state.node = Some(node.clone());
    store.save(&state)?;
    Ok(Upped::Fresh(node))
}

/// The IPv4 subnet `up` asks for, checked: the gateway a host address of it, the MASQUERADE
/// source the uplink's address unless given. `None` makes a v6-only node, as Docker's
/// `--ipv4=false`: `--subnet6` with nothing IPv4 asked for, on an uplink without an IPv4
/// address (`had_v4`: the recorded node's choice, which a repeated `up` keeps).
fn subnet4(
    a: &NodeSpec,
    uplink_addr: Option<Ipv4Addr>,
    had_v4: Option<bool>,
) -> Result<Option<Subnet4>> {
    let asked = a.subnet.is_some() || a.gateway.is_some() || a.snat_ip.is_some();
    if !asked && a.subnet6.is_some() && !had_v4.unwrap_or(uplink_addr.is_some()) {
        return Ok(None);
    }
    let (subnet, gateway) = subnet_and_gateway(a)?;
    let snat_ip = match (a.snat_ip, uplink_addr) {
        (Some(ip), _) | (None, Some(ip)) => ip,
        (None, None) => bail!(
            "uplink {} has no IPv4 address to masquerade with: add one or pass --snat-ip (or, for an IPv6-only node, give --subnet6 alone)",
            a.uplink
        ),
    };
    Ok(Some(Subnet4 {
        subnet: subnet.addr,
        prefix_len: subnet.prefix,
        gateway,
        snat_ip,
        snat_from_uplink: a.snat_ip.is_none(),
        node_addr: uplink_addr.unwrap_or(snat_ip),
    }))
}

/// The IPv4 subnet (given or the default) and its gateway (given or the first address),
/// checked: the gateway must be a host address of the subnet.
fn subnet_and_gateway(a: &NodeSpec) -> Result<(Cidr, Ipv4Addr)> {
    let subnet = match a.subnet {
        Some(s) => s,
        None => DEFAULT_SUBNET.parse()?,
    };
    let gateway = a
        .gateway
        .unwrap_or_else(|| subnet.hosts().next().unwrap_or(subnet.addr));
    if !subnet.contains(gateway) || gateway == subnet.addr || gateway == subnet.broadcast() {
        bail!("gateway {gateway} is not a host address of subnet {subnet}");
    }
    Ok((subnet, gateway))
}

/// The IPv6 subnet `up` asks for, checked: the gateway a host address of it, the NAT66
/// source outside it. The source from the uplink is filled in by the caller.
fn subnet6(a: &NodeSpec) -> Result<Option<Subnet6>> {
    let Some(net) = a.subnet6 else {
        if let Some(gw) = a.gateway6 {
            bail!("--gateway6 {gw} needs --subnet6");
        }
        if let Some(ip) = a.snat_ip6 {
            bail!("--snat-ip6 {ip} needs --subnet6");
        }
        return Ok(None);
    };
    if let Some(ip) = a.snat_ip6
        && (net.contains(ip) || ip.is_unspecified() || ip.is_loopback() || ip.is_multicast())
    {
        bail!(
            "--snat-ip6 {ip} cannot be a source for outside: choose a unicast address outside {net}"
        );
    }
    let gateway = match a.gateway6 {
        Some(gw) => gw,
        None => net.nth(1).context("the IPv6 subnet has no first address")?,
    };
    if !net.contains(gateway) || gateway == net.addr {
        bail!("gateway {gateway} is not a host address of IPv6 subnet {net}");
    }
    Ok(Some(Subnet6 {
        subnet: net.addr,
        prefix_len: net.prefix,
        gateway,
        snat: a.snat_ip6,
        snat_from_uplink: a.snat_ip6.is_none(),
    }))
}

/// With forwarding on, Linux ignores router advertisements on an interface whose `accept_ra`
/// is 1 (the default): an uplink that takes its address or default route from them loses
/// both when they expire. Docker has the same caveat; say so rather than change it.
fn warn_accept_ra(uplink: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{uplink}/accept_ra");
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
        eprintln!(
            "warning: IPv6 forwarding is now on, so {uplink} ignores router advertisements (accept_ra=1); if it is configured by them, set net.ipv6.conf.{uplink}.accept_ra=2"
        );
    }
}

/// Install the node's datapath, or leave nothing half-done behind.
async fn install_node(
    ctx: &Env,
    nl: &Netlink,
    node: Node,
    ct_max: u32,
    xdp: XdpChoice,
) -> Result<Node> {
    datapath::ensure_bpffs(&ctx.bpffs_dir)?;
    match bring_up(ctx, nl, node, ct_max, xdp).await {
        Ok(node) => Ok(node),
        Err(e) => {
            let _ = teardown(ctx, nl).await;
            Err(e)
        }
    }
}

async fn bring_up(
    ctx: &Env,
    nl: &Netlink,
    mut node: Node,
    ct_max: u32,
    xdp: XdpChoice,
) -> Result<Node> {
    if let Some(stale) = nl.link(GATEWAY_IF).await? {
        nl.del_link(stale.index).await?;
    }
    nl.add_local_veth(GATEWAY_IF, GATEWAY_PEER).await?;
    let gw = nl.require_link(GATEWAY_IF).await?;
    if let Some(v4) = &node.v4 {
        netns::set_own_sysctl("net.ipv4.ip_forward", "1")?;
        nl.add_addr(gw.index, v4.gateway, 32).await?;
    }
    if let Some(v6) = &node.v6 {
        // The node answers its containers on the IPv6 gateway address too (F6). Forwarding
        // on, as for IPv4: the datapath's FIB lookups for NAT66 need it, and what the
        // datapath hands to the stack (packets that expire, too big ones) is routed there.
        nl.add_addr6(gw.index, v6.gateway, 128).await?;
        netns::set_own_sysctl("net.ipv6.conf.all.forwarding", "1")?;
        warn_accept_ra(&node.uplink);
    }
    node.gateway_ifindex = gw.index;

    datapath::install(&ctx.pins, ct_max)?;
    let mut maps = Maps::open(&ctx.pins)?;
    maps.set_config(&config_of(&node, false))?;
    sync_node_addrs(nl, &mut maps, &node).await?;
    datapath::attach_uplink(&ctx.pins, &node.uplink)?;
    let how = match node.xdp {
        XdpSetting::Off => None,
        XdpSetting::Native => Some(XdpAttach::Native),
        XdpSetting::Generic => Some(XdpAttach::Generic),
    };
    if let Some(how) = how
        && let Err(e) = datapath::attach_xdp(&ctx.pins, &node.uplink, how)
    {
        if xdp != XdpChoice::Auto {
            return Err(e);
        }
        // A driver without native XDP: the TC path does the same work.
        eprintln!("warning: {e:#}; continuing without XDP (TC does the same work)");
        node.xdp = XdpSetting::Off;
    }
    datapath::attach_sock(&ctx.pins)?;
    Ok(node)
}

/// Tell the datapath which addresses are the node's own unicast addresses (every address in
/// the namespace but loopback and the container subnet, whose gateway address the node
/// holds): the only destinations a packet from outside is DNATed from.
pub async fn sync_node_addrs(nl: &Netlink, maps: &mut Maps, node: &Node) -> Result<()> {
    let subnet = node.v4.as_ref().map(Subnet4::cidr);
    let addrs: Vec<(Ipv4Addr, u32)> = nl
        .all_ipv4_addrs()
        .await?
        .into_iter()
        .filter(|(_, a)| !a.is_loopback() && !subnet.is_some_and(|n| n.contains(*a)))
        .map(|(i, a)| (a, i))
        .collect();
    maps.set_node_addrs(&addrs)?;
    // The same over IPv6: global addresses, the containers' subnet left out.
    let v6 = node.v6.as_ref().map(Subnet6::cidr);
    let addrs6: Vec<(Ipv6Addr, u32)> = nl
        .all_global_ipv6_addrs()
        .await?
        .into_iter()
        .filter(|(_, a)| !v6.is_some_and(|n| n.contains(*a)))
        .map(|(i, a)| (a, i))
        .collect();
    maps.set_node_addrs6(&addrs6)
}

/// Remove the gateway interface and every pin; idempotent.
pub async fn teardown(ctx: &Env, nl: &Netlink) -> Result<()> {
    if let Some(gw) = nl.link(GATEWAY_IF).await? {
        nl.del_link(gw.index).await?;
    }
    // A cluster node's routes to the other nodes' blocks, and what it knew of them.
    crate::cluster::follow::remove_routes(nl).await?;
    crate::cluster::follow::View::remove(ctx)?;
    datapath::uninstall(&ctx.pins)
}
