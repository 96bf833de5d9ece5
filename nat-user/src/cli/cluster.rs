//! `bpfnat cluster status`: this node's place in its cluster (name, block, datastore health)
//! and every other node with its route, as the agent last learnt them.

use anyhow::{Context as _, Result};
use clap::Subcommand;
use nat_plumbing::netlink::Netlink;

use super::{
    Ctx, table,
    view::{ClusterNodeView, ClusterPeerView, ClusterStatusView, DatastoreView},
};
use crate::{
    cluster::follow::{self, View},
    net::Cidr,
};

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// This node's name, block and datastore health, and every other node: its address,
    /// block, whether its route is installed, how long ago it was last seen.
    Status,
}

pub async fn run(ctx: &Ctx, cmd: ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::Status => status(ctx).await,
    }
}

async fn status(ctx: &Ctx) -> Result<()> {
    let view = View::load(ctx)?.context(
        "this node is not in a cluster: no agent with a \"cluster\" section has run here since the last `bpfnat down`",
    )?;
    let routes = follow::routes(&Netlink::current()?).await?;
    let now = follow::now();
    let peers: Vec<ClusterPeerView> = view
        .peers
        .iter()
        .map(|p| {
            let block = p.record.block.parse::<Cidr>().ok();
            ClusterPeerView {
                name: p.record.node.clone(),
                address: p.record.address,
                block: p.record.block.clone(),
                route_installed: block.is_some_and(|b| {
                    routes.iter().any(|r| {
                        r.dst == b.addr
                            && r.prefix == b.prefix
                            && r.gateway == Some(p.record.address)
                    })
                }),
                last_seen_secs: now.saturating_sub(p.last_seen),
            }
        })
        .collect();
    let out = ClusterStatusView {
        node: ClusterNodeView {
            name: view.node.node.clone(),
            address: view.node.address,
            block: view.node.block.clone(),
            datastore: DatastoreView {
                kind: view.datastore.clone(),
                healthy: view.healthy_now(),
            },
        },
        peers,
    };
    ctx.emit("ClusterStatus", &out, || {
        let n = &out.node;
        let health = if n.datastore.healthy {
            "healthy"
        } else {
            "UNHEALTHY (routes kept as they were)"
        };
        let mut s = format!(
            "node:       {} ({}), block {}\ndatastore:  {} {health}\n\n",
            n.name, n.address, n.block, n.datastore.kind
        );
        s.push_str(&table(
            &["PEER", "ADDRESS", "BLOCK", "ROUTE", "LAST SEEN"],
            &out.peers
                .iter()
                .map(|p| {
                    vec![
                        p.name.clone(),
                        p.address.to_string(),
                        p.block.clone(),
                        if p.route_installed {
                            "installed"
                        } else {
                            "missing"
                        }
                        .to_owned(),
                        format!("{}s ago", p.last_seen_secs),
                    ]
                })
                .collect::<Vec<_>>(),
        ));
        s
    })
}
