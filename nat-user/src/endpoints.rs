//! Endpoints as a service: create a container's network (namespace, veth pair, addresses,
//! routes, datapath hooks, published ports), remove it, and find what an earlier bpfnat left.
//! The CLI's `container` commands and the CNI plugin call these.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::Arc,
};

use anyhow::{Context as _, Result, anyhow, bail};
use nat_common::{EP_CONTAINER, Endpoint};
use serde::Serialize;

use crate::{
    datapath::{self, Maps},
    env::Env,
    ethtool::{self, Offload},
    net::mac_for,
    netlink::{self, Netlink},
    netns,
    node::{self, NodeSpec, Upped, require_node},
    spec::{HostPort, PortMapping, PortSpec, Proto},
    state::{CniAttachment, Container, Node, State, XdpSetting},
};

/// What every host-side veth's name starts with.
const HOST_IF_PREFIX: &str = "bn-";

/// The host-side veth name: `bn-` and a hash of the container name (15 bytes at most).
fn host_if_name(name: &str) -> String {
    // FNV-1a: stable across versions, unlike std's hasher.
    let h = name.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("{HOST_IF_PREFIX}{h:08x}")
}

/// Whether `name` has the shape of a host veth's name (not the gateway's `bn-gw`).
fn is_host_if_name(name: &str) -> bool {
    name.strip_prefix(HOST_IF_PREFIX)
        .is_some_and(|h| h.len() == 8 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The alias of a container's interface: it names its host veth and says whether bpfnat
/// created the namespace, so that `down` finds both even when the state file is lost.
fn owner_alias(host_if: &str, owns_netns: bool) -> String {
    if owns_netns {
        format!("bpfnat:{host_if}:netns")
    } else {
        format!("bpfnat:{host_if}")
    }
}

/// What an earlier bpfnat made that no record describes (a lost state file, or an older
/// version's unfinished add): host veths named `bn-…` in the node's namespace that are not
/// in `recorded`, and the namespaces whose interface carries bpfnat's alias for one of them
/// saying bpfnat created it.
async fn leftovers(
    links: &[netlink::Link],
    recorded: &HashSet<&str>,
) -> Vec<(netlink::Link, Option<PathBuf>)> {
    let ours: Vec<_> = links
        .iter()
        .filter(|l| {
            is_host_if_name(&l.name)
                && l.kind.as_deref() == Some("veth")
                && !recorded.contains(l.name.as_str())
        })
        .collect();
    if ours.is_empty() {
        return Vec::new();
    }
    let mut found: HashMap<String, (netlink::Link, Option<PathBuf>)> = ours
        .iter()
        .map(|l| (owner_alias(&l.name, true), ((*l).clone(), None)))
        .collect();
    // Other namespaces come and go meanwhile: one that cannot be read is not ours to judge.
    if let Ok(dir) = std::fs::read_dir(netns::NETNS_DIR) {
        for entry in dir.flatten() {
            let path = entry.path();
            let Ok(inner) = Netlink::in_netns(&path) else {
                continue;
            };
            let Ok(links) = inner.links().await else {
                continue;
            };
            let alias = links
                .iter()
                .filter_map(|l| l.alias.as_ref())
                .find(|a| found.contains_key(*a));
            if let Some((_, ns)) = alias.and_then(|a| found.get_mut(a)) {
                *ns = Some(path);
            }
        }
    }
    let mut found: Vec<_> = found.into_values().collect();
    found.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    found
}

fn parse_sysctls(raw: &[String]) -> Result<Vec<(String, String)>> {
    raw.iter()
        .map(|s| {
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| anyhow!("invalid --sysctl {s:?}: expected KEY=VALUE"))?;
            netns::sysctl_path(k)?;
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// The container's IPv4 address: `want` if it is a free host address of the node's subnet,
/// else the lowest free one; none on a v6-only node.
fn pick_ip(state: &State, node: &Node, want: Option<Ipv4Addr>) -> Result<Option<Ipv4Addr>> {
    let Some(v4) = &node.v4 else {
        if let Some(ip) = want {
            bail!("--ip {ip}: this node is IPv6-only (it has no IPv4 subnet)");
        }
        return Ok(None);
    };
    let subnet = v4.cidr();
    let holder = |ip: Ipv4Addr| state.containers.values().find(|c| c.ip == Some(ip));
    match want {
        Some(ip) => {
            if !subnet.contains(ip) || ip == subnet.addr || ip == subnet.broadcast() {
                bail!("address {ip} is not a host address of the container subnet {subnet}");
            }
            if ip == v4.gateway {
                bail!("address {ip} is the gateway's");
            }
            if let Some(c) = holder(ip) {
                bail!("address {ip} is already used by container {}", c.name);
            }
            Ok(Some(ip))
        }
        None => {
            // A set, not a scan per candidate: the search is linear in the containers.
            let used: HashSet<Ipv4Addr> = state.containers.values().filter_map(|c| c.ip).collect();
            subnet
                .hosts()
                .find(|ip| *ip != v4.gateway && !used.contains(ip))
                .map(Some)
                .ok_or_else(|| anyhow!("no free address left in {subnet}"))
        }
    }
}

/// The container's IPv6 address: `want` if it is a free host address of the node's IPv6
/// subnet, else the lowest free one; none on a node without an IPv6 subnet.
fn pick_ip6(state: &State, node: &Node, want: Option<Ipv6Addr>) -> Result<Option<Ipv6Addr>> {
    let Some(v6) = &node.v6 else {
        if let Some(ip) = want {
            bail!("--ip6 {ip}: this node has no IPv6 subnet (`bpfnat up --subnet6`)");
        }
        return Ok(None);
    };
    let net = v6.cidr();
    let holder = |ip: Ipv6Addr| state.containers.values().find(|c| c.ip6 == Some(ip));
    match want {
        Some(ip) => {
            if !net.contains(ip) || ip == net.addr {
                bail!("address {ip} is not a host address of the IPv6 subnet {net}");
            }
            if ip == v6.gateway {
                bail!("address {ip} is the IPv6 gateway's");
            }
            if let Some(c) = holder(ip) {
                bail!("address {ip} is already used by container {}", c.name);
            }
            Ok(Some(ip))
        }
        // Bounded: a /64 is not searched to its end.
        None => {
            let used: HashSet<Ipv6Addr> = state.containers.values().filter_map(|c| c.ip6).collect();
            (1..=65_536u128)
                .filter_map(|n| net.nth(n))
                .find(|ip| *ip != v6.gateway && !used.contains(ip))
                .map(Some)
                .ok_or_else(|| anyhow!("no free address left in {net}"))
        }
    }
}

/// Who holds which host port: the published ports of every container, indexed by
/// (protocol, port) so checks stay linear when thousands of ports are published at once.
struct PortBook<'a> {
    held: HashMap<(Proto, u16), Vec<(PortMapping, &'a str)>>,
}

impl<'a> PortBook<'a> {
    /// The book of the host ports `specs` may take (the rest cannot conflict with them: a
    /// node with a large published range pays nothing for it on every other command).
    fn of(state: &'a State, specs: &[PortSpec], ephemeral: (u16, u16)) -> Self {
        let ranges: Vec<(Proto, u16, u16)> = specs
            .iter()
            .flat_map(|s| &s.requests)
            .map(|r| match r.host {
                HostPort::Exact(p) => (r.proto, p, p),
                HostPort::OneOf(a, b) => (r.proto, a, b),
                HostPort::Ephemeral => (r.proto, ephemeral.0, ephemeral.1),
            })
            .collect();
        let wanted = |m: &PortMapping| {
            ranges
                .iter()
                .any(|&(proto, lo, hi)| m.proto == proto && (lo..=hi).contains(&m.host_port))
        };
        let mut held: HashMap<(Proto, u16), Vec<(PortMapping, &'a str)>> = HashMap::new();
        for c in state.containers.values() {
            let runs = c
                .ports
                .runs()
                .iter()
                .filter(|r| ranges.iter().any(|&(proto, lo, hi)| r.meets(proto, lo, hi)));
            for m in runs.flat_map(|r| r.iter()).filter(wanted) {
                held.entry((m.proto, m.host_port))
                    .or_default()
                    .push((m, c.name.as_str()));
            }
        }
        Self { held }
    }

    fn conflict(&self, m: &PortMapping) -> Option<&(PortMapping, &'a str)> {
        self.held
            .get(&(m.proto, m.host_port))?
            .iter()
            .find(|(o, _)| o.conflicts_with(m))
    }

    /// Take `m` for this command (`owner` ""), or say who has it.
    fn take(&mut self, m: PortMapping) -> Result<()> {
        if let Some((o, owner)) = self.conflict(&m) {
            if owner.is_empty() {
                bail!("port {m} conflicts with {o} given in the same command");
            }
            bail!(
                "host port {}/{} is already published by container {owner} ({o})",
                m.host_port,
                m.proto
            );
        }
        self.held
            .entry((m.proto, m.host_port))
            .or_default()
            .push((m, ""));
        Ok(())
    }
}

/// Whether `ip` is an address of this node (its namespace): one a socket can bind, which is
/// what Docker checks, loopback addresses included.
fn is_local_addr(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// Refuse host addresses that are not the node's: nothing could be published on them; and
/// those of a family the node has no subnet of (`v4`, `v6`: which it has).
pub fn check_host_addrs(specs: &[PortSpec], v4: bool, v6: bool) -> Result<()> {
    for ip in specs
        .iter()
        .flat_map(|s| &s.requests)
        .filter_map(|r| r.host_ip)
    {
        if ip.is_ipv6() && !v6 {
            bail!("cannot publish on [{ip}]: the node has no IPv6 subnet (up --subnet6)");
        }
        if ip.is_ipv4() && !v4 {
            bail!(
                "cannot publish on {ip}: the node is IPv6-only (publish on an IPv6 address, or on every address: 8080:80)"
            );
        }
        if ip.is_unspecified() {
            continue;
        }
        if !is_local_addr(ip) {
            bail!(
                "cannot publish on {ip}: {ip} is not an address of this node (publish on one of its addresses, or on all of them: 8080:80)"
            );
        }
    }
    Ok(())
}

/// Choose host ports for `specs` (where they leave a choice) and check the result.
pub fn resolve_ports(state: &State, specs: &[PortSpec]) -> Result<Vec<PortMapping>> {
    if let Some(node) = &state.node {
        check_host_addrs(specs, node.v4.is_some(), node.v6.is_some())?;
    }
    let ephemeral = node::ephemeral_range();
    let mut book = PortBook::of(state, specs, ephemeral);
    let mut all: Vec<PortMapping> = Vec::new();
    for spec in specs {
        let chosen = spec.resolve(ephemeral, |m| book.conflict(m).is_none())?;
        for m in chosen {
            book.take(m)?;
            all.push(m);
        }
    }
    Ok(all)
}

/// What `container add` (and the CNI plugin's ADD) asks for.
pub struct AddRequest {
    pub name: String,
    pub ip: Option<Ipv4Addr>,
    /// On a node with an IPv6 subnet (default: the lowest free address of it).
    pub ip6: Option<Ipv6Addr>,
    pub ports: Vec<PortSpec>,
    pub sysctls: Vec<String>,
    /// An existing namespace to wire instead of creating `/run/netns/NAME`.
    pub netns: Option<PathBuf>,
    /// The interface name inside the namespace.
    pub ifname: String,
    /// The CNI attachment this is (subject to CNI GC), if the CNI plugin asks.
    pub cni: Option<CniAttachment>,
}

/// A container `create` made, and the node it was made on (what a CNI result describes).
pub struct Added {
    pub container: Container,
    pub node: Node,
}

/// Create a container's network; on failure nothing is left behind.
pub async fn create(ctx: &Env, req: AddRequest) -> Result<Added> {
    let AddRequest {
        name,
        ip,
        ip6,
        ports: publish,
        sysctls: sysctl,
        netns: netns_path,
        ifname,
        cni,
    } = req;
    if cni.is_none() {
        netns::validate_name(&name)?;
    }
    if ifname.is_empty() || ifname.len() > 15 || ifname.contains(['/', ' ']) {
        bail!("invalid interface name {ifname:?}");
    }
    let store = ctx.store()?;
    let mut state = store.load()?;
    let node = require_node(&state)?.clone();
    let nl = Netlink::current()?;
    if let Some(old) = state.containers.get(&name).cloned() {
        if !old.pending {
            bail!("container {name} already exists");
        }
        // An add of this name was killed half way: remove what it made, then start over.
        remove(ctx, &nl, &old)
            .await
            .with_context(|| format!("clean up the unfinished container {name}"))?;
        state.containers.remove(&name);
        store.save(&state)?;
    }
    let ip = pick_ip(&state, &node, ip)?;
    let ip6 = pick_ip6(&state, &node, ip6)?;
    let ports = resolve_ports(&state, &publish)?;
    let sysctls = parse_sysctls(&sysctl)?;
    let host_if = host_if_name(&name);
    if nl.link(&host_if).await?.is_some() {
        bail!(
            "interface {host_if} (for container {name}) already exists; `bpfnat down` removes what an earlier bpfnat left"
        );
    }
    if let Some(p) = &netns_path {
        netns::open(p)?;
    }

    let owns_netns = netns_path.is_none();
    if owns_netns && netns::path_of(&name).exists() {
        bail!(
            "network namespace {name} already exists ({}); give it with --netns to use it",
            netns::path_of(&name).display()
        );
    }
    let mut c = Container {
        name: name.clone(),
        ip,
        ip6,
        mac: mac_for(ip, ip6),
        host_if,
        host_ifindex: 0,
        host_mac: [0; 6],
        netns: netns_path.unwrap_or_else(|| netns::path_of(&name)),
        owns_netns,
        ports: ports.into_iter().collect(),
        sysctls,
        ifname,
        cni: cni.is_some(),
        cni_attachment: cni,
        pending: true,
    };
    // The intent first: whatever is created below, a killed command leaves a record of it.
    state.containers.insert(name.clone(), Arc::new(c.clone()));
    store.save_intent(&state)?;
    let made = async {
        if owns_netns && let Err(e) = netns::create(&name) {
            // Not ours after all: the cleanup below must leave it alone.
            c.owns_netns = false;
            return Err(e);
        }
        wire(ctx, &nl, &node, &mut c, &mut state).await
    };
    match made.await {
        Ok(()) => {
            c.pending = false;
            state.containers.insert(name, Arc::new(c.clone()));
            store.save(&state)?;
            Ok(Added { container: c, node })
        }
        Err(e) => {
            let _ = remove(ctx, &nl, &c).await;
            state.containers.remove(&name);
            store.save(&state)?;
            Err(e)
        }
    }
}

/// Everything after the namespace exists; `remove` undoes any prefix of it.
async fn wire(
    ctx: &Env,
    nl: &Netlink,
    node: &Node,
    c: &mut Container,
    state: &mut State,
) -> Result<()> {
    let uplink = nl.check_link(&node.uplink, node.uplink_ifindex).await?;
    nl.add_veth(&c.host_if, &c.ifname, &c.netns, c.mac, uplink.mtu.max(68))
        .await?;
    let host = nl.require_link(&c.host_if).await?;
    c.host_ifindex = host.index;
    c.host_mac = host.mac;
    if node.v6.is_none() {
        no_ipv6_on_host_side(&c.host_if)?;
    }

    configure_inside(node, c).await?;
    // The program before the host side comes up, so that no frame of the container reaches
    // the node without it (it drops them as spoofed until the endpoint is written below).
    datapath::attach_container(&ctx.pins, nl, &c.host_if, host.index).await?;

    nl.set_up(host.index).await?;
    if let (Some(v4), Some(ip)) = (&node.v4, c.ip) {
        nl.add_host_route(ip, host.index, v4.gateway).await?;
    }
    if let Some(ip6) = c.ip6 {
        nl.add_host_route6(ip6, host.index).await?;
        // The node knows the container's MAC (bpfnat chose it): no solicitation needed, and
        // the kernel's own would carry the gateway address from another interface, which
        // the exchange does not survive.
        nl.add_neigh(ip6.into(), c.mac, host.index).await?;
    }

    let mut maps = Maps::open(&ctx.pins)?;
    put_endpoints(&mut maps, c)?;
    if !c.ports.is_empty() {
        // An address added to the node since `up` is a DNAT destination from now on.
        node::sync_node_addrs(nl, &mut maps, node).await?;
    }
    let generation = state.next_generation();
    state.generation = state.generation.wrapping_add(c.ports.len() as u32);
    maps.put_ports(&c.ports.to_vec(), (c.ip, c.ip6), generation)
}

/// Turn IPv6 off on a host veth of a node without an IPv6 subnet, before the link comes up.
/// Nothing of bpfnat's is IPv6 there, and the kernel's IPv6 per device grows with the node:
/// each link up adds a multicast and a link-local route and walks the routing table, and
/// every neighbour or listener message a container sends is looked up among the node's
/// multicast routes, one per device (about a fifth of a `container add` at 1,000 containers).
/// It also leaves the node's services no second way in by link-local IPv6. A kernel without
/// IPv6 has nothing to turn off.
fn no_ipv6_on_host_side(host_if: &str) -> Result<()> {
    if !std::path::Path::new("/proc/sys/net/ipv6").exists() {
        return Ok(());
    }
    netns::set_own_sysctl(&format!("net.ipv6.conf.{host_if}.disable_ipv6"), "1")
}

/// The container's side of its veth: sysctls, `lo`, the interface up with its addresses
/// and default routes.
async fn configure_inside(node: &Node, c: &Container) -> Result<()> {
    // Sysctls first: nothing in the container has used the network yet.
    for (k, v) in &c.sysctls {
        netns::set_sysctl(&c.netns, k, v).with_context(|| format!("container {}", c.name))?;
    }
    let inner = Netlink::in_netns(&c.netns)?;
    inner.lo_up().await?;
    let eth0 = inner.require_link(&c.ifname).await?;
    inner
        .set_alias(eth0.index, &owner_alias(&c.host_if, c.owns_netns))
        .await?;
    inner.set_up(eth0.index).await?;
    if let (Some(v4), Some(ip)) = (&node.v4, c.ip) {
        inner.add_addr(eth0.index, ip, v4.prefix_len).await?;
        inner.add_default_route(v4.gateway, eth0.index).await?;
    }
    if let (Some(v6), Some(ip6)) = (&node.v6, c.ip6) {
        inner.add_addr6(eth0.index, ip6, v6.prefix_len).await?;
        inner.add_default_route(v6.gateway, eth0.index).await?;
    }
    if node.xdp == XdpSetting::Native {
        // Frames the uplink's XDP program redirects into this veth pair are dropped unless
        // this end runs NAPI, which GRO turns on.
        ethtool::set_in(&c.netns, &c.ifname, Offload::Gro, true)
            .with_context(|| format!("container {}", c.name))?;
    }
    Ok(())
}

/// The datapath's endpoints of `c`: by each of its addresses.
fn put_endpoints(maps: &mut Maps, c: &Container) -> Result<()> {
    let ep = Endpoint {
        ifindex: c.host_ifindex,
        flags: EP_CONTAINER,
        mac: c.mac,
        host_mac: c.host_mac,
    };
    if let Some(ip) = c.ip {
        maps.put_endpoint(ip, &ep)?;
    }
    if let Some(ip6) = c.ip6 {
        maps.put_endpoint6(ip6, &ep)?;
    }
    Ok(())
}

/// Undo everything `wire` and `add` did for `c`; tolerant of parts that never happened (an
/// unfinished add's record does not know the veth's ifindex: the veth says).
pub async fn remove(ctx: &Env, nl: &Netlink, c: &Container) -> Result<()> {
    if ctx.pins.installed() {
        let mut maps = Maps::open(&ctx.pins)?;
        maps.unpublish(&c.ports.to_vec())?;
        if let Some(ip) = c.ip {
            maps.remove_endpoint(ip)?;
        }
        if let Some(ip6) = c.ip6 {
            maps.remove_endpoint6(ip6)?;
        }
        let ifindex = match c.host_ifindex {
            0 => nl.link(&c.host_if).await?.map(|l| l.index),
            i => Some(i),
        };
        // Its own connections and those to its ports (hairpins from other containers
        // included), in one walk.
        maps.forget(ifindex, &c.ports.to_vec())?;
    }
    // The veth goes with its filter still on it: detached first, the container's packets
    // would reach the node's stack unjudged until the veth is gone.
    if let Some(l) = nl.link(&c.host_if).await? {
        // Deleting one end of a veth deletes both.
        nl.del_link(l.index).await?;
    }
    datapath::unpin_links(&ctx.pins, &c.host_if)?;
    if c.owns_netns {
        netns::remove(&c.netns)?;
    }
    Ok(())
}

/// What `down` removed.
#[derive(Serialize)]
pub struct DownReport {
    pub containers_removed: Vec<String>,
    pub was_up: bool,
}

/// Bring the node up (`node::up`); when its pinned datapath had to be put back, rewire
/// every recorded endpoint into it, so that `up` with the recorded settings repairs a node
/// whose pins were lost without touching its containers.
pub async fn up(ctx: &Env, spec: NodeSpec) -> Result<Upped> {
    let upped = node::up(ctx, spec).await?;
    match &upped {
        Upped::Repaired(node) => rewire_all(ctx, node, false).await?,
        // A repair that stopped half way (a veth gone, a killed command) is finished here:
        // only the containers the datapath lacks are rewired, so the others keep their
        // published ports' connections.
        Upped::Already(node) => rewire_all(ctx, node, true).await?,
        Upped::Fresh(_) => {}
    }
    Ok(upped)
}

/// Put every recorded container, port and static NAT mapping back into a freshly installed
/// datapath (`only_missing`: only the containers it has no endpoint for). A container whose
/// host veth is gone is left to `container del` (or the agent's reconciler) and named in the
/// error.
async fn rewire_all(ctx: &Env, node: &Node, only_missing: bool) -> Result<()> {
    let store = ctx.store()?;
    let mut state = store.load()?;
    let nl = Netlink::current()?;
    let mut maps = Maps::open(&ctx.pins)?;
    let mut missing = Vec::new();
    let names: Vec<String> = state.containers.keys().cloned().collect();
    for name in names {
        let Some(c) = state.containers.get(&name).cloned() else {
            continue;
        };
        // Its first address stands for all: they are written together.
        let first = c.ip.map(IpAddr::from).or(c.ip6.map(IpAddr::from));
        if c.pending
            || (only_missing && first.map(|a| maps.has_endpoint(a)).transpose()? == Some(true))
        {
            // A killed add: the next command for it finishes or undoes it.
            continue;
        }
        let Some(host) = nl.link(&c.host_if).await? else {
            missing.push(name);
            continue;
        };
        datapath::attach_container(&ctx.pins, &nl, &c.host_if, host.index).await?;
        put_endpoints(
            &mut maps,
            &Container {
                host_ifindex: host.index,
                host_mac: host.mac,
                ..(*c).clone()
            },
        )?;
        let generation = state.next_generation();
        state.generation = state.generation.wrapping_add(c.ports.len() as u32);
        maps.put_ports(&c.ports.to_vec(), (c.ip, c.ip6), generation)?;
    }
    // Rewriting these changes nothing that is already right.
    for m in &state.static_nat {
        maps.put_static_nat(m.external, m.internal)?;
    }
    maps.set_config(&node::config_of(node, !state.static_nat.is_empty()))?;
    store.save(&state)?;
    if !missing.is_empty() {
        bail!(
            "the datapath is back, but these containers' host veths are gone: {} (remove them with `bpfnat container del`)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Take the node down: every endpoint first (recorded or left over), then the node's
/// datapath, gateway and pins.
///
/// Unlike `container del`, endpoints are not taken out of the maps one by one (the maps go
/// with the datapath), and their host veths are deleted in one batch: a veth deleted on its
/// own waits out RCU grace periods, about 30 ms per container on a VM, most of `down`'s
/// time on a full node.
pub async fn down(ctx: &Env) -> Result<DownReport> {
    let store = ctx.store()?;
    let mut state = store.load()?;
    let was_up = state.node.is_some() || ctx.pins.root().exists();
    node::forget_stale_node(ctx, &store, &mut state)?;
    let nl = Netlink::current()?;
    let links = nl.links().await?;
    let recorded: HashSet<&str> = state
        .containers
        .values()
        .map(|c| c.host_if.as_str())
        .collect();
    // Before the veths go: the namespaces left over are known by their interface's alias.
    let left = leftovers(&links, &recorded).await;
    let doomed: Vec<u32> = links
        .iter()
        .filter(|l| recorded.contains(l.name.as_str()))
        .chain(left.iter().map(|(l, _)| l))
        .map(|l| l.index)
        .collect();
    let mut errors = Vec::new();
    if let Err(e) = nl.del_links(&doomed).await {
        errors.push(format!("host veths: {e:#}"));
    }
    let mut removed = Vec::new();
    for (name, c) in std::mem::take(&mut state.containers) {
        let gone = if c.owns_netns {
            netns::remove(&c.netns)
        } else {
            Ok(())
        };
        match gone {
            Ok(()) => removed.push(name),
            Err(e) => errors.push(format!("container {name}: {e:#}")),
        }
    }
    // Then what no record describes any more (a lost state file, a killed older version).
    for (l, ns) in left {
        match ns.as_deref().map_or(Ok(()), netns::remove) {
            Ok(()) => removed.push(format!("{} (unrecorded)", l.name)),
            Err(e) => errors.push(format!("leftover {}: {e:#}", l.name)),
        }
    }
    if let Some(node) = &state.node {
        datapath::detach(&ctx.pins, &node.uplink)?;
    }
    node::teardown(ctx, &nl).await?;
    state.node = None;
    state.static_nat.clear();
    store.save(&state)?;
    store.clear()?;
    if !errors.is_empty() {
        bail!("down finished with errors:\n  {}", errors.join("\n  "));
    }
    Ok(DownReport {
        containers_removed: removed,
        was_up,
    })
}

/// Remove a container's network; `None` when there is no such container.
pub async fn destroy(ctx: &Env, name: &str) -> Result<Option<Container>> {
    let store = ctx.store()?;
    let mut state = store.load()?;
    let Some(c) = state.containers.get(name).cloned() else {
        return Ok(None);
    };
    let nl = Netlink::current()?;
    remove(ctx, &nl, &c).await?;
    state.containers.remove(name);
    store.save(&state)?;
    Ok(Some(Arc::unwrap_or_clone(c)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_interface_names_fit_ifnamsiz() {
        let n = host_if_name("a-very-long-container-name-that-goes-on");
        assert!(is_host_if_name(&n));
        assert!(!is_host_if_name("bn-gw") && !is_host_if_name("bn-gw-p"));
        assert!(n.len() <= 15);
        assert_ne!(host_if_name("a"), host_if_name("b"));
        assert_eq!(host_if_name("web"), host_if_name("web"));
    }

    #[test]
    fn sysctls_need_key_and_value() {
        assert!(parse_sysctls(&["net.ipv4.ip_forward=1".into()]).is_ok());
        assert!(parse_sysctls(&["net.ipv4.ip_forward".into()]).is_err());
        assert!(parse_sysctls(&["kernel.pid_max=5".into()]).is_err());
    }
}
