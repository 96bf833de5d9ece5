//! `bpfnat nat add / del / list`: static 1:1 NAT (seed 001's `routerns`: DNAT of an external
//! address to one container plus SNAT of that container back to it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Result, anyhow, bail};
use clap::Subcommand;
use serde::Serialize;

use super::{Ctx, table};
use crate::{
    datapath::Maps,
    node::{config_of, require_node},
    state::{Node, StaticMapping},
};

#[derive(Subcommand, Debug)]
pub enum NatCmd {
    /// Map an external address to a container address, both ways, over IPv4 or IPv6. The
    /// node answers ARP (Neighbour Solicitations) for the external address on the uplink.
    #[command(
        after_help = "Examples:\n  bpfnat nat add --external 203.0.113.10 --internal 10.88.0.5\n  bpfnat nat add --external 2001:db8:1::10 --internal fd00:88::5"
    )]
    Add {
        /// The external address, one the node answers for on the uplink, e.g.
        /// `203.0.113.10` or `2001:db8:1::10` (not the node's own, not in a container subnet).
        #[arg(long)]
        external: IpAddr,
        /// A container address of the subnet of the same family, e.g. `10.88.0.5`.
        #[arg(long)]
        internal: IpAddr,
    },
    /// Remove the mapping of an external address.
    Del {
        /// The mapping's external address, e.g. `203.0.113.10`.
        #[arg(long)]
        external: IpAddr,
    },
    /// List static mappings.
    List,
}

pub fn run(ctx: &Ctx, cmd: NatCmd) -> Result<()> {
    let store = ctx.store()?;
    let mut state = store.load()?;
    match cmd {
        NatCmd::Add { external, internal } => {
            let node = require_node(&state)?.clone();
            match (external, internal) {
                (IpAddr::V4(e), IpAddr::V4(i)) => check4(&node, e, i)?,
                (IpAddr::V6(e), IpAddr::V6(i)) => check6(&node, e, i)?,
                _ => bail!(
                    "external address {external} and internal address {internal} are of different families"
                ),
            }
            if let Some(m) = state
                .static_nat
                .iter()
                .find(|m| m.external == external || m.internal == internal)
            {
                bail!("{} is already mapped to {}", m.external, m.internal);
            }
            let m = StaticMapping { external, internal };
            let mut maps = Maps::open(&ctx.pins)?;
            maps.put_static_nat(external, internal)?;
            if let Err(e) = maps.set_config(&config_of(&node, true)) {
                let _ = maps.remove_static_nat(external, internal);
                return Err(e);
            }
            state.static_nat.push(m);
            store.save(&state)?;
            let owner = owner(&state, internal);
            ctx.emit("StaticNat", &m, || match owner {
                Some(name) => format!("{external} <-> {internal} (container {name})"),
                None => format!("{external} <-> {internal} (no container has {internal} yet)"),
            })
        }
        NatCmd::Del { external } => {
            let node = require_node(&state)?.clone();
            let i = state
                .static_nat
                .iter()
                .position(|m| m.external == external)
                .ok_or_else(|| anyhow!("{external} has no static NAT mapping"))?;
            let m = state.static_nat[i];
            let mut maps = Maps::open(&ctx.pins)?;
            if state.static_nat.len() == 1 {
                maps.set_config(&config_of(&node, false))?;
            }
            maps.remove_static_nat(m.external, m.internal)?;
            state.static_nat.remove(i);
            store.save(&state)?;
            ctx.emit("StaticNat", &m, || {
                format!("removed {} <-> {}", m.external, m.internal)
            })
        }
        NatCmd::List => {
            let rows: Vec<NatRow> = state
                .static_nat
                .iter()
                .map(|m| NatRow {
                    external: m.external,
                    internal: m.internal,
                    container: owner(&state, m.internal),
                })
                .collect();
            ctx.emit_list("StaticNatList", &rows, || {
                table(
                    &["EXTERNAL", "INTERNAL", "CONTAINER"],
                    &rows
                        .iter()
                        .map(|r| {
                            vec![
                                r.external.to_string(),
                                r.internal.to_string(),
                                r.container.clone().unwrap_or_else(|| "-".to_owned()),
                            ]
                        })
                        .collect::<Vec<_>>(),
                )
            })
        }
    }
}

/// A static NAT mapping and the container that holds its internal address, if any.
#[derive(Serialize)]
struct NatRow {
    external: IpAddr,
    internal: IpAddr,
    container: Option<String>,
}

/// The container that holds `ip`, if any.
fn owner(state: &crate::state::State, ip: IpAddr) -> Option<String> {
    state
        .containers
        .values()
        .find(|c| c.ip.map(IpAddr::from) == Some(ip) || c.ip6.map(IpAddr::from) == Some(ip))
        .map(|c| c.name.clone())
}

/// An IPv4 mapping: the external address outside the container subnet and not the node's,
/// the internal one a container address of it.
fn check4(node: &Node, external: Ipv4Addr, internal: Ipv4Addr) -> Result<()> {
    let Some(v4) = &node.v4 else {
        bail!("the node is IPv6-only: it has no IPv4 subnet to map {external} to");
    };
    let subnet = v4.cidr();
    if subnet.contains(external) {
        bail!("external address {external} is inside the container subnet {subnet}");
    }
    if external == v4.snat_ip || external.is_loopback() || external.is_unspecified() {
        bail!("external address {external} cannot be mapped (it is the node's own or not unicast)");
    }
    if !subnet.contains(internal)
        || internal == v4.gateway
        || internal == subnet.broadcast()
        || internal == subnet.addr
    {
        bail!("internal address {internal} is not a container address of {subnet}");
    }
    Ok(())
}

/// The same over IPv6, on a node with an IPv6 subnet.
fn check6(node: &Node, external: Ipv6Addr, internal: Ipv6Addr) -> Result<()> {
    let Some(v6) = &node.v6 else {
        bail!("the node has no IPv6 subnet (up --subnet6) to map {external} to");
    };
    let subnet = v6.cidr();
    if subnet.contains(external) {
        bail!("external address {external} is inside the container subnet {subnet}");
    }
    let link_local = external.segments()[0] & 0xffc0 == 0xfe80;
    if Some(external) == v6.snat
        || external.is_loopback()
        || external.is_unspecified()
        || external.is_multicast()
        || link_local
    {
        bail!(
            "external address {external} cannot be mapped (it is the node's own or not global unicast)"
        );
    }
    if !subnet.contains(internal) || internal == v6.gateway || internal == subnet.addr {
        bail!("internal address {internal} is not a container address of {subnet}");
    }
    Ok(())
}
