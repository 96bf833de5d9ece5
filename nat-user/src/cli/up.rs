//! `bpfnat up`, `down`, `status`: arguments and output; the work is `node`'s.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use anyhow::{Context as _, Result};
use aya::programs::{SchedClassifier, TcAttachType};
use clap::Args;
use nat_common::CONNTRACK_MAX_ENTRIES;
use serde::Serialize;

use super::{
    Ctx, Exit,
    view::{DatastoreView, NodeView},
};
use crate::{
    cluster::follow::View,
    datapath::Maps,
    endpoints,
    env::{DEFAULT_BPFFS_DIR, DEFAULT_STATE_DIR},
    net::{Cidr, Cidr6, PortRange},
    netlink::Netlink,
    node::{self, DEFAULT_PORT_RANGE, NodeSpec, Upped, XdpChoice},
    state::{Node, XdpSetting},
};

#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    /// The interface that leads outside (its address is the MASQUERADE address).
    #[arg(long)]
    pub uplink: String,
    /// The container subnet [default: 10.88.0.0/16; none on an IPv6-only node: `--subnet6`
    /// alone, on an uplink without an IPv4 address].
    #[arg(long)]
    pub subnet: Option<Cidr>,
    /// The containers' gateway address (default: the subnet's first address).
    #[arg(long)]
    pub gateway: Option<Ipv4Addr>,
    /// Source address for MASQUERADE instead of the uplink's own address.
    #[arg(long)]
    pub snat_ip: Option<Ipv4Addr>,
    /// Ports MASQUERADE may allocate when a container's source port is taken.
    #[arg(long, default_value = DEFAULT_PORT_RANGE)]
    pub port_range: PortRange,
    /// Conntrack table size in entries (two per connection).
    #[arg(long, default_value_t = CONNTRACK_MAX_ENTRIES)]
    pub conntrack_max: u32,
    /// Never MASQUERADE from a port of the node's own ephemeral range
    /// (net.ipv4.ip_local_port_range): rules out tuple collisions with the node's own
    /// connections from the uplink address, at the price of remapping most container source
    /// ports (and of TIME_WAIT clashes at very high connection rates).
    #[arg(long)]
    pub masquerade_avoid_host_ports: bool,
    /// The uplink's inbound XDP fast path. `auto`: native XDP on a physical uplink, TC alone
    /// on a virtual one (veth, bridge, …), where XDP measured slower than TC's
    /// bpf_redirect_peer and cannot handle the partial checksums of local senders.
    #[arg(long, value_enum, default_value_t = XdpChoice::Auto)]
    pub xdp: XdpChoice,
    /// An IPv6 container subnet beside the IPv4 one, e.g. `fd00:88::/64`: containers get an
    /// address of each, reach each other and the node over both, and reach outside over
    /// IPv6 masqueraded (NAT66) to the uplink's first global IPv6 address. Alone, on an
    /// uplink without an IPv4 address, the node is IPv6-only.
    #[arg(long)]
    pub subnet6: Option<Cidr6>,
    /// The containers' IPv6 gateway (default: the IPv6 subnet's first address, `::1`).
    #[arg(long)]
    pub gateway6: Option<Ipv6Addr>,
    /// Source address for IPv6 MASQUERADE instead of the uplink's first global IPv6 address.
    #[arg(long)]
    pub snat_ip6: Option<Ipv6Addr>,
}

impl From<UpArgs> for NodeSpec {
    fn from(a: UpArgs) -> Self {
        Self {
            uplink: a.uplink,
            subnet: a.subnet,
            gateway: a.gateway,
            snat_ip: a.snat_ip,
            port_range: a.port_range,
            conntrack_max: a.conntrack_max,
            masquerade_avoid_host_ports: a.masquerade_avoid_host_ports,
            xdp: a.xdp,
            subnet6: a.subnet6,
            gateway6: a.gateway6,
            snat_ip6: a.snat_ip6,
        }
    }
}

pub async fn up(ctx: &Ctx, a: UpArgs) -> Result<()> {
    match endpoints::up(ctx, a.into()).await? {
        Upped::Already(n) => ctx.emit("Node", &NodeView::of(&n), || {
            format!("bpfnat is already up on {}", n.uplink)
        }),
        Upped::Repaired(n) => ctx.emit("Node", &NodeView::of(&n), || {
            format!(
                "bpfnat is up again on {}: the pinned datapath was missing and has been restored with every recorded container",
                n.uplink
            )
        }),
        Upped::Fresh(node) => ctx.emit("Node", &NodeView::of(&node), || {
            let v4 = node.v4.as_ref().map(|v| {
                format!(
                    "{} via {} (masquerade as {})",
                    v.cidr(),
                    v.gateway,
                    v.snat_ip
                )
            });
            let v6 = node.v6.as_ref().map(|v| {
                format!(
                    "{} via {} (masquerade as {})",
                    v.cidr(),
                    v.gateway,
                    v.snat.map_or_else(
                        || "nothing until the uplink has a global address".to_owned(),
                        |a| a.to_string()
                    )
                )
            });
            format!(
                "bpfnat is up: uplink {} (XDP {}), containers in {}, pins in {}",
                node.uplink,
                node.xdp,
                v4.into_iter().chain(v6).collect::<Vec<_>>().join(" and "),
                ctx.pins.root().display()
            )
        }),
    }
}

pub async fn down(ctx: &Ctx) -> Result<()> {
    let report = endpoints::down(ctx).await?;
    ctx.emit("DownReport", &report, || {
        if report.was_up {
            format!(
                "bpfnat is down ({} container(s) removed)",
                report.containers_removed.len()
            )
        } else {
            "bpfnat was not up; nothing to do".to_owned()
        }
    })
}

#[derive(Serialize)]
struct Status {
    up: bool,
    /// A node is recorded but its pinned datapath is gone.
    degraded: bool,
    /// The command that restores a degraded node with its recorded settings and containers.
    repair: Option<String>,
    node: Option<NodeView>,
    pins: String,
    containers: usize,
    published_ports: usize,
    conntrack_entries: Option<usize>,
    uplink_programs: Vec<String>,
    /// How XDP is attached to the uplink right now (`native`, `generic`, …), if it is.
    uplink_xdp: Option<&'static str>,
    /// A cluster node: its name, block, datastore health and how many other nodes it knows.
    cluster: Option<StatusCluster>,
}

#[derive(Serialize)]
struct StatusCluster {
    name: String,
    block: String,
    datastore: DatastoreView,
    peers: usize,
}

pub async fn status(ctx: &Ctx) -> Result<()> {
    let store = ctx.store()?;
    let state = store.load()?;
    let installed = ctx.pins.installed();
    let maps = if installed {
        Some(Maps::open(&ctx.pins)?)
    } else {
        None
    };
    let uplink_programs = match &state.node {
        Some(n) => SchedClassifier::query_tcx(&n.uplink, TcAttachType::Ingress)
            .map(|(_, progs)| {
                progs
                    .iter()
                    .map(|p| p.name_as_str().unwrap_or("?").to_owned())
                    .collect()
            })
            .with_context(|| format!("query tc programs on {}", n.uplink))?,
        None => Vec::new(),
    };
    let uplink_xdp = match &state.node {
        Some(n) => Netlink::current()?
            .link(&n.uplink)
            .await?
            .and_then(|l| l.xdp),
        None => None,
    };
    let degraded = state.node.is_some() && !installed;
    let s = Status {
        up: state.node.is_some() && installed,
        degraded,
        repair: state
            .node
            .as_ref()
            .filter(|_| degraded)
            .map(|n| repair_command(ctx, n)),
        node: state.node.as_ref().map(NodeView::of),
        pins: ctx.pins.root().display().to_string(),
        containers: state.containers.len(),
        published_ports: state.containers.values().map(|c| c.ports.len()).sum(),
        conntrack_entries: maps.as_ref().map(Maps::ct_len).transpose()?,
        uplink_programs,
        uplink_xdp,
        cluster: View::load(ctx)?.map(|v| StatusCluster {
            datastore: DatastoreView {
                kind: v.datastore.clone(),
                healthy: v.healthy_now(),
            },
            name: v.node.node,
            block: v.node.block,
            peers: v.peers.len(),
        }),
    };
    ctx.emit("Status", &s, || {
        let Some(n) = &state.node else {
            return "bpfnat is down".to_owned();
        };
        let subnet4 = n.v4.as_ref().map_or_else(String::new, |v| {
            format!(
                "\nmasquerade:   {}\nsubnet:       {} gateway {}",
                v.snat_ip,
                v.cidr(),
                v.gateway
            )
        });
        let subnet6 = n.v6.as_ref().map_or_else(String::new, |v| {
            format!(
                "\nsubnet6:      {}/{} gateway {}, masquerade as {}",
                v.subnet,
                v.prefix_len,
                v.gateway,
                v.snat
                    .map_or_else(|| "nothing (the uplink has no global IPv6 address)".to_owned(), |a| a.to_string())
            )
        });
        let cluster = s.cluster.as_ref().map_or_else(String::new, |c| {
            format!(
                "\ncluster:      node {}, block {}, {} other nodes, datastore {} {}",
                c.name,
                c.block,
                c.peers,
                c.datastore.kind,
                if c.datastore.healthy { "healthy" } else { "UNHEALTHY" }
            )
        });
        format!(
            "state:        {}\nuplink:       {} (ifindex {}, tc ingress: {}, xdp: {})\nsnat ports:   {}-{}{subnet4}{subnet6}\ncontainers:   {}\nports:        {}\nconntrack:    {} entries\npins:         {}{cluster}",
            match &s.repair {
                None => "up".to_owned(),
                Some(cmd) if node::earlier_boot(n).is_some() => format!("degraded: the record is of an earlier boot; `{cmd}` starts the node afresh (its recorded containers went with that boot)"),
                Some(cmd) => format!("degraded: the pinned datapath is gone; `{cmd}` restores it with every recorded container"),
            },
            n.uplink,
            n.uplink_ifindex,
            if s.uplink_programs.is_empty() { "none".to_owned() } else { s.uplink_programs.join(",") },
            match (n.xdp, s.uplink_xdp) {
                (XdpSetting::Off, None) => "off".to_owned(),
                (want, Some(have)) if want.to_string() == have => have.to_owned(),
                (want, have) => format!("{want} configured, {} attached", have.unwrap_or("none")),
            },
            n.port_min,
            n.port_max,
            s.containers,
            s.published_ports,
            s.conntrack_entries.unwrap_or(0),
            s.pins
        )
    })?;
    // As LSB status actions: 3 when not running, 1 when recorded but dead.
    match (s.up, s.degraded) {
        (true, _) => Ok(()),
        (false, true) => Err(Exit(1).into()),
        (false, false) => Err(Exit(3).into()),
    }
}

/// `bpfnat up` with `node`'s recorded settings (and this invocation's directories).
fn repair_command(ctx: &Ctx, n: &Node) -> String {
    let mut cmd = vec!["bpfnat".to_owned()];
    if ctx.bpffs_dir != Path::new(DEFAULT_BPFFS_DIR) {
        cmd.push(format!("--bpffs-dir {}", ctx.bpffs_dir.display()));
    }
    if ctx.state_dir != Path::new(DEFAULT_STATE_DIR) {
        cmd.push(format!("--state-dir {}", ctx.state_dir.display()));
    }
    cmd.push(format!(
        "up --uplink {} --port-range {}-{}",
        n.uplink, n.port_min, n.port_max
    ));
    if let Some(v4) = &n.v4 {
        cmd.push(format!("--subnet {} --gateway {}", v4.cidr(), v4.gateway));
        if !v4.snat_from_uplink {
            cmd.push(format!("--snat-ip {}", v4.snat_ip));
        }
    }
    if n.host_port_min <= n.host_port_max {
        cmd.push("--masquerade-avoid-host-ports".to_owned());
    }
    if let Some(v6) = &n.v6 {
        cmd.push(format!("--subnet6 {} --gateway6 {}", v6.cidr(), v6.gateway));
        if !v6.snat_from_uplink
            && let Some(ip) = v6.snat
        {
            cmd.push(format!("--snat-ip6 {ip}"));
        }
    }
    cmd.join(" ")
}
