//! `bpfnat container add / del / list`.

use std::{collections::HashMap, net::Ipv4Addr, path::PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Subcommand;
use nat_common::{EP_CONTAINER, Endpoint};
use serde::Serialize;

use super::{Ctx, table, up::require_node};
use crate::{
    datapath::{self, Hook, Maps},
    ethtool::{self, Offload},
    net::{Cidr, fmt_mac, mac_for},
    netlink::Netlink,
    netns,
    spec::{PortMapping, PortSpec, Proto},
    state::{Container, Node, State, XdpSetting},
};

#[derive(Subcommand, Debug)]
pub enum ContainerCmd {
    /// Create a container network: namespace, veth pair, address, routes, datapath hooks.
    Add {
        name: String,
        /// Address in the node's subnet (default: the lowest free one).
        #[arg(long)]
        ip: Option<Ipv4Addr>,
        /// Publish a port: [HOST_IP:]HOST_PORT[-END]:CONTAINER_PORT[-END][/tcp|/udp].
        #[arg(short = 'p', long = "publish")]
        publish: Vec<PortSpec>,
        /// A per-namespace sysctl set before the container's interfaces come up (net.*).
        #[arg(long = "sysctl", value_name = "KEY=VALUE")]
        sysctl: Vec<String>,
        /// Use this existing network namespace (a runtime's) instead of creating one.
        #[arg(long)]
        netns: Option<PathBuf>,
    },
    /// Remove a container's network (and its namespace, if bpfnat created it).
    Del { name: String },
    /// List containers.
    List,
}

pub async fn run(ctx: &Ctx, cmd: ContainerCmd) -> Result<()> {
    match cmd {
        ContainerCmd::Add {
            name,
            ip,
            publish,
            sysctl,
            netns,
        } => add(ctx, name, ip, publish, sysctl, netns).await,
        ContainerCmd::Del { name } => del(ctx, &name).await,
        ContainerCmd::List => list(ctx),
    }
}

/// The host-side veth name: `bn-` and a hash of the container name (15 bytes at most).
fn host_if_name(name: &str) -> String {
    // FNV-1a: stable across versions, unlike std's hasher.
    let h = name.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("bn-{h:08x}")
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

fn subnet_of(node: &Node) -> Cidr {
    Cidr {
        addr: node.subnet,
        prefix: node.prefix_len,
    }
}

fn pick_ip(state: &State, node: &Node, want: Option<Ipv4Addr>) -> Result<Ipv4Addr> {
    let subnet = subnet_of(node);
    let used = |ip: Ipv4Addr| ip == node.gateway || state.containers.values().any(|c| c.ip == ip);
    match want {
        Some(ip) => {
            if !subnet.contains(ip) || ip == subnet.addr || ip == subnet.broadcast() {
                bail!("address {ip} is not a host address of the container subnet {subnet}");
            }
            if ip == node.gateway {
                bail!("address {ip} is the gateway's");
            }
            if let Some(c) = state.containers.values().find(|c| c.ip == ip) {
                bail!("address {ip} is already used by container {}", c.name);
            }
            Ok(ip)
        }
        None => subnet
            .hosts()
            .find(|ip| !used(*ip))
            .ok_or_else(|| anyhow!("no free address left in {subnet}")),
    }
}

/// Who holds which host port: the published ports of every container, indexed by
/// (protocol, port) so checks stay linear when thousands of ports are published at once.
struct PortBook<'a> {
    held: HashMap<(Proto, u16), Vec<(PortMapping, &'a str)>>,
}

impl<'a> PortBook<'a> {
    fn of(state: &'a State) -> Self {
        let mut held: HashMap<(Proto, u16), Vec<(PortMapping, &'a str)>> = HashMap::new();
        for c in state.containers.values() {
            for m in &c.ports {
                held.entry((m.proto, m.host_port))
                    .or_default()
                    .push((*m, c.name.as_str()));
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

/// Choose host ports for `specs` (where they leave a choice) and check the result.
pub fn resolve_ports(state: &State, specs: &[PortSpec]) -> Result<Vec<PortMapping>> {
    let ephemeral = ephemeral_range();
    let mut book = PortBook::of(state);
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

/// What `container add` (and the CNI plugin's ADD) asks for.
pub struct AddRequest {
    pub name: String,
    pub ip: Option<Ipv4Addr>,
    pub ports: Vec<PortSpec>,
    pub sysctls: Vec<String>,
    /// An existing namespace to wire instead of creating `/run/netns/NAME`.
    pub netns: Option<PathBuf>,
    /// The interface name inside the namespace.
    pub ifname: String,
    /// Created by the CNI plugin (subject to CNI GC).
    pub cni: bool,
}

async fn add(
    ctx: &Ctx,
    name: String,
    ip: Option<Ipv4Addr>,
    publish: Vec<PortSpec>,
    sysctl: Vec<String>,
    netns_path: Option<PathBuf>,
) -> Result<()> {
    let c = create(
        ctx,
        AddRequest {
            name,
            ip,
            ports: publish,
            sysctls: sysctl,
            netns: netns_path,
            ifname: "eth0".to_owned(),
            cni: false,
        },
    )
    .await?;
    ctx.emit(&c, || {
        let mut s = format!(
            "container {} added: {} ({}) on {}, netns {}",
            c.name,
            c.ip,
            fmt_mac(&c.mac),
            c.host_if,
            c.netns.display()
        );
        for p in &c.ports {
            s.push_str(&format!("\n  published {p}"));
        }
        s
    })
}

/// Create a container's network; on failure nothing is left behind.
pub async fn create(ctx: &Ctx, req: AddRequest) -> Result<Container> {
    let AddRequest {
        name,
        ip,
        ports: publish,
        sysctls: sysctl,
        netns: netns_path,
        ifname,
        cni,
    } = req;
    netns::validate_name(&name)?;
    if ifname.is_empty() || ifname.len() > 15 || ifname.contains(['/', ' ']) {
        bail!("invalid interface name {ifname:?}");
    }
    let store = ctx.store()?;
    let mut state = store.load()?;
    let node = require_node(&state)?.clone();
    if state.containers.contains_key(&name) {
        bail!("container {name} already exists");
    }
    let ip = pick_ip(&state, &node, ip)?;
    let ports = resolve_ports(&state, &publish)?;
    let sysctls = parse_sysctls(&sysctl)?;
    let host_if = host_if_name(&name);
    let nl = Netlink::current()?;
    if nl.link(&host_if).await?.is_some() {
        bail!("interface {host_if} (for container {name}) already exists");
    }
    if let Some(p) = &netns_path {
        netns::open(p)?;
    }

    let (ns, owns_netns) = match netns_path {
        Some(p) => (p, false),
        None => (netns::create(&name)?, true),
    };
    let mut c = Container {
        name: name.clone(),
        ip,
        mac: mac_for(ip),
        host_if,
        host_ifindex: 0,
        host_mac: [0; 6],
        netns: ns,
        owns_netns,
        ports: Vec::new(),
        sysctls,
        ifname,
        cni,
    };
    match wire(ctx, &nl, &node, &mut c, &ports, &mut state).await {
        Ok(()) => {
            state.containers.insert(name, c.clone());
            store.save(&state)?;
            Ok(c)
        }
        Err(e) => {
            let _ = remove(ctx, &nl, &c).await;
            Err(e)
        }
    }
}

/// Everything after the namespace exists; `remove` undoes any prefix of it.
async fn wire(
    ctx: &Ctx,
    nl: &Netlink,
    node: &Node,
    c: &mut Container,
    ports: &[PortMapping],
    state: &mut State,
) -> Result<()> {
    let uplink = nl.check_link(&node.uplink, node.uplink_ifindex).await?;
    nl.add_veth(&c.host_if, &c.ifname, &c.netns, c.mac, uplink.mtu.max(68))
        .await?;
    let host = nl.require_link(&c.host_if).await?;
    c.host_ifindex = host.index;
    c.host_mac = host.mac;

    // Sysctls first: nothing in the container has used the network yet.
    for (k, v) in &c.sysctls {
        netns::set_sysctl(&c.netns, k, v).with_context(|| format!("container {}", c.name))?;
    }
    let inner = Netlink::in_netns(&c.netns)?;
    inner.lo_up().await?;
    let eth0 = inner.require_link(&c.ifname).await?;
    inner.add_addr(eth0.index, c.ip, node.prefix_len).await?;
    inner.set_up(eth0.index).await?;
    inner.add_default_route(node.gateway, eth0.index).await?;
    if node.xdp == XdpSetting::Native {
        // Frames the uplink's XDP program redirects into this veth pair are dropped unless
        // this end runs NAPI, which GRO turns on.
        ethtool::set_in(&c.netns, &c.ifname, Offload::Gro, true)
            .with_context(|| format!("container {}", c.name))?;
    }

    nl.set_up(host.index).await?;
    nl.add_host_route(c.ip, host.index, node.gateway).await?;
    datapath::attach(&ctx.pins, Hook::Container, &c.host_if)?;

    let mut maps = Maps::open(&ctx.pins)?;
    maps.put_endpoint(
        c.ip,
        &Endpoint {
            ifindex: c.host_ifindex,
            flags: EP_CONTAINER,
            mac: c.mac,
            host_mac: c.host_mac,
        },
    )?;
    if !ports.is_empty() {
        // An address added to the node since `up` is a DNAT destination from now on.
        super::up::sync_node_addrs(nl, &mut maps, node).await?;
    }
    let generation = state.next_generation();
    state.generation = state.generation.wrapping_add(ports.len() as u32);
    maps.put_ports(ports, c.ip, generation)?;
    c.ports.extend_from_slice(ports);
    Ok(())
}

/// Undo everything `wire` and `add` did for `c`; tolerant of parts that never happened.
pub async fn remove(ctx: &Ctx, nl: &Netlink, c: &Container) -> Result<()> {
    if ctx.pins.installed() {
        let mut maps = Maps::open(&ctx.pins)?;
        maps.remove_ports(&c.ports)?;
        maps.remove_endpoint(c.ip)?;
        if c.host_ifindex != 0 {
            maps.forget_container(c.host_ifindex)?;
        }
    }
    datapath::detach(&ctx.pins, &c.host_if)?;
    if let Some(l) = nl.link(&c.host_if).await? {
        // Deleting one end of a veth deletes both.
        nl.del_link(l.index).await?;
    }
    if c.owns_netns {
        netns::remove(&c.netns)?;
    }
    Ok(())
}

async fn del(ctx: &Ctx, name: &str) -> Result<()> {
    let c = destroy(ctx, name)
        .await?
        .ok_or_else(|| anyhow!("no such container: {name}"))?;
    ctx.emit(&c, || format!("container {name} removed"))
}

/// Remove a container's network; `None` when there is no such container.
pub async fn destroy(ctx: &Ctx, name: &str) -> Result<Option<Container>> {
    let store = ctx.store()?;
    let mut state = store.load()?;
    let Some(c) = state.containers.get(name).cloned() else {
        return Ok(None);
    };
    let nl = Netlink::current()?;
    remove(ctx, &nl, &c).await?;
    state.containers.remove(name);
    store.save(&state)?;
    Ok(Some(c))
}

#[derive(Serialize)]
struct Row<'a> {
    #[serde(flatten)]
    c: &'a Container,
    mac_str: String,
}

fn list(ctx: &Ctx) -> Result<()> {
    let store = ctx.store()?;
    let state = store.load()?;
    let rows: Vec<Row<'_>> = state
        .containers
        .values()
        .map(|c| Row {
            c,
            mac_str: fmt_mac(&c.mac),
        })
        .collect();
    ctx.emit(&rows, || {
        table(
            &["NAME", "IP", "MAC", "HOST-IF", "NETNS", "PORTS"],
            &rows
                .iter()
                .map(|r| {
                    vec![
                        r.c.name.clone(),
                        r.c.ip.to_string(),
                        r.mac_str.clone(),
                        r.c.host_if.clone(),
                        r.c.netns.display().to_string(),
                        r.c.ports
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                    ]
                })
                .collect::<Vec<_>>(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_interface_names_fit_ifnamsiz() {
        let n = host_if_name("a-very-long-container-name-that-goes-on");
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
