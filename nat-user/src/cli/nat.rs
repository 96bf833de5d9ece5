//! `bpfnat nat add / del / list`: static 1:1 NAT (seed 001's `routerns`: DNAT of an external
//! address to one container plus SNAT of that container back to it).

use std::net::Ipv4Addr;

use anyhow::{Result, anyhow, bail};
use clap::Subcommand;
use serde::Serialize;

use super::{Ctx, table};
use crate::{
    datapath::Maps,
    net::Cidr,
    node::{config_of, require_node},
    state::StaticMapping,
};

#[derive(Subcommand, Debug)]
pub enum NatCmd {
    /// Map an external address to a container address, both ways. The node answers ARP for
    /// the external address on the uplink.
    #[command(
        after_help = "Example:\n  bpfnat nat add --external 203.0.113.10 --internal 10.88.0.5"
    )]
    Add {
        /// The external address, one the node answers ARP for on the uplink, e.g.
        /// `203.0.113.10` (not the node's own, not in the container subnet).
        #[arg(long)]
        external: Ipv4Addr,
        /// A container address of the subnet, e.g. `10.88.0.5`.
        #[arg(long)]
        internal: Ipv4Addr,
    },
    /// Remove the mapping of an external address.
    Del {
        /// The mapping's external address, e.g. `203.0.113.10`.
        #[arg(long)]
        external: Ipv4Addr,
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
            let subnet = Cidr {
                addr: node.subnet,
                prefix: node.prefix_len,
            };
            if subnet.contains(external) {
                bail!("external address {external} is inside the container subnet {subnet}");
            }
            if external == node.snat_ip || external.is_loopback() || external.is_unspecified() {
                bail!(
                    "external address {external} cannot be mapped (it is the node's own or not unicast)"
                );
            }
            if !subnet.contains(internal)
                || internal == node.gateway
                || internal == subnet.broadcast()
                || internal == subnet.addr
            {
                bail!("internal address {internal} is not a container address of {subnet}");
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
            let owner = state
                .containers
                .values()
                .find(|c| c.ip == internal)
                .map(|c| c.name.clone());
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
                    container: state
                        .containers
                        .values()
                        .find(|c| c.ip == m.internal)
                        .map(|c| c.name.clone()),
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
    external: Ipv4Addr,
    internal: Ipv4Addr,
    container: Option<String>,
}
