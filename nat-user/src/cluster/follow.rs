//! Following the cluster, whatever the datastore: every complete listing of the nodes becomes
//! this node's routes to the other nodes' blocks, the datapath's cluster prefixes
//! (`cluster_nets`), the view `bpfnat cluster status` reads and the metrics. A listing that
//! fails changes nothing but the datastore's health: no route is added or removed until the
//! datastore answers again.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use nat_common::{NET_CLUSTER_SRC, NET_NO_MASQ};
use nat_plumbing::netlink::{Netlink, ProtoRoute};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Cluster, NodeRecord};
use crate::{datapath::Maps, env::Env, net::Cidr, state};

/// The route protocol of bpfnat's routes (`ip route show proto 176`): it only ever touches
/// routes of this protocol.
pub const ROUTE_PROTO: u8 = 176;

/// The view's file in the state directory.
const VIEW_FILE: &str = "cluster.json";

/// What the agent last learnt of the cluster, as `bpfnat cluster status` reads it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct View {
    pub node: NodeRecord,
    /// `etcd` or `kubernetes`.
    pub datastore: String,
    /// The last listing succeeded.
    pub healthy: bool,
    /// When the last listing succeeded (seconds since the epoch).
    pub last_ok: u64,
    /// The datastore's health window (etcd: the lease TTL): a view whose last good listing is
    /// older is unhealthy whatever it says (the agent stopped following).
    pub ttl_secs: u64,
    pub peers: Vec<Peer>,
}

/// Another node, as the datastore last listed it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    #[serde(flatten)]
    pub record: NodeRecord,
    /// When it was last listed (seconds since the epoch).
    pub last_seen: u64,
}

impl View {
    fn path(ctx: &Env) -> PathBuf {
        ctx.state_dir.join(VIEW_FILE)
    }

    /// The view the agent left, if this node is in a cluster.
    pub fn load(ctx: &Env) -> Result<Option<Self>> {
        let path = Self::path(ctx);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b).with_context(|| format!("parse {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!(e).context(format!("read {}", path.display()))),
        }
    }

    /// Forget the view (the node left its cluster: `bpfnat down`).
    pub fn remove(ctx: &Env) -> Result<()> {
        match std::fs::remove_file(Self::path(ctx)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(anyhow::anyhow!(e).context("remove the cluster view")),
        }
    }

    /// Healthy now: the last listing succeeded, less than a TTL ago.
    #[must_use]
    pub fn healthy_now(&self) -> bool {
        self.healthy && now().saturating_sub(self.last_ok) <= self.ttl_secs
    }
}

/// Seconds since the epoch.
#[must_use]
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The cluster's metrics, kept by the follower.
#[derive(Clone, Default)]
pub struct ClusterMetrics {
    pub peers: Gauge,
    pub routes: Gauge,
    pub datastore_errors: Counter,
    pub datastore_healthy: Gauge,
}

/// This node's routes of `ROUTE_PROTO`.
pub async fn routes(nl: &Netlink) -> Result<Vec<ProtoRoute>> {
    nl.routes_of(ROUTE_PROTO).await
}

/// Remove every route of bpfnat's (the node leaves its cluster).
pub async fn remove_routes(nl: &Netlink) -> Result<()> {
    for r in routes(nl).await? {
        nl.del_route(&r, ROUTE_PROTO).await?;
    }
    Ok(())
}

/// The datapath's cluster prefixes for `peers`: the cluster CIDR's pods may reach local pods,
/// local pods reach the non-masquerade CIDRs with their own address, and each other node
/// both (its answers to a pod must reach that pod's address). Each prefix carries the flags
/// of every prefix that contains it, so the longest match alone decides.
#[must_use]
pub fn cluster_nets(cluster: &Cluster, peers: &[Ipv4Addr]) -> BTreeMap<Cidr, u32> {
    let mut nets: Vec<(Cidr, u32)> = vec![(cluster.cidr, NET_CLUSTER_SRC)];
    nets.extend(cluster.non_masquerade.iter().map(|c| (*c, NET_NO_MASQ)));
    nets.extend(peers.iter().map(|a| {
        (
            Cidr {
                addr: *a,
                prefix: 32,
            },
            NET_CLUSTER_SRC | NET_NO_MASQ,
        )
    }));
    let mut out = BTreeMap::new();
    for (net, _) in &nets {
        let flags = nets
            .iter()
            .filter(|(outer, _)| outer.prefix <= net.prefix && outer.contains(net.addr))
            .fold(0, |f, (_, g)| f | g);
        out.insert(*net, flags);
    }
    out
}

/// A datastore's nodes, as the follower reads them.
pub trait Source {
    /// Where a listing was taken, for a watch to start from.
    type Version;
    /// Every node's record: the truth.
    async fn list(&mut self) -> Result<(Vec<NodeRecord>, Self::Version)>;
    /// Return when something may have changed since `from`, or after `within` at most.
    async fn changed(&mut self, from: Self::Version, within: Duration);
}

/// Follow `source` forever: list the nodes (the truth) and apply them, then wait for a change
/// or a third of `health`, and list again. Each request is bounded by half of `health`, so a
/// datastore that stopped answering is reported unhealthy within it; nothing changes until
/// it answers again.
pub async fn follow(source: &mut impl Source, f: &mut Follower, health: Duration) {
    let (every, bound) = (health / 3, health / 2);
    loop {
        let listed = tokio::time::timeout(bound, source.list())
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer in {bound:?}")));
        match listed {
            Ok((recs, version)) => {
                f.apply(recs).await;
                source.changed(version, every).await;
            }
            Err(e) => {
                f.failed(&e);
                tokio::time::sleep(every).await;
            }
        }
    }
}

/// Applies listings of the cluster to this node.
pub struct Follower {
    ctx: Env,
    cluster: Cluster,
    uplink: String,
    metrics: ClusterMetrics,
    view: View,
}

impl Follower {
    #[must_use]
    pub fn new(
        ctx: Env,
        cluster: Cluster,
        me: NodeRecord,
        uplink: String,
        metrics: ClusterMetrics,
    ) -> Self {
        let view = View {
            node: me,
            datastore: cluster.datastore_name().to_owned(),
            healthy: false,
            last_ok: 0,
            ttl_secs: cluster.health_secs(),
            peers: Vec::new(),
        };
        Self {
            ctx,
            cluster,
            uplink,
            metrics,
            view,
        }
    }

    /// This node's address moved (its record says so now).
    pub fn moved_to(&mut self, address: Ipv4Addr) {
        self.view.node.address = address;
        self.save();
    }

    /// A complete listing of the cluster's nodes: routes, prefixes and view follow it.
    /// Records that are not another node's valid block of the cluster CIDR are ignored.
    pub async fn apply(&mut self, records: Vec<NodeRecord>) {
        let seen = now();
        let mut peers: Vec<Peer> = Vec::new();
        for r in records {
            if r.node == self.view.node.node {
                continue;
            }
            let valid = r
                .block
                .parse::<Cidr>()
                .ok()
                .filter(|b| self.cluster.blocks_contain(b) && r.block != self.view.node.block)
                .is_some()
                && !r.address.is_unspecified()
                && !r.address.is_broadcast();
            if !valid {
                warn!(record = ?r, "ignoring a node record that is not a block of the cluster CIDR");
                continue;
            }
            peers.push(Peer {
                record: r,
                last_seen: seen,
            });
        }
        let changed = peers
            .iter()
            .map(|p| &p.record)
            .ne(self.view.peers.iter().map(|p| &p.record));
        if changed {
            info!(peers = ?peers.iter().map(|p| &p.record).collect::<Vec<_>>(), "cluster nodes changed");
        }
        self.view.peers = peers;
        self.view.healthy = true;
        self.view.last_ok = seen;
        self.metrics.datastore_healthy.set(1);
        self.metrics.peers.set(self.view.peers.len() as i64);
        if let Err(e) = self.install().await {
            warn!(error = %format!("{e:#}"), "installing the cluster's routes and prefixes failed");
        }
        self.save();
    }

    /// The datastore did not answer: nothing changes on the datapath.
    pub fn failed(&mut self, e: &anyhow::Error) {
        if self.view.healthy {
            warn!(error = %format!("{e:#}"), "the cluster datastore does not answer; routes stay as they are");
        }
        self.view.healthy = false;
        self.metrics.datastore_errors.inc();
        self.metrics.datastore_healthy.set(0);
        self.save();
    }

    /// Routes `peer-block via peer-address dev uplink proto 176` for exactly the listed peers,
    /// and the datapath's cluster prefixes.
    async fn install(&mut self) -> Result<()> {
        let nl = Netlink::current()?;
        let uplink = nl
            .require_link(&self.uplink)
            .await
            .with_context(|| format!("uplink {}", self.uplink))?;
        let want: Vec<ProtoRoute> = self
            .view
            .peers
            .iter()
            .filter_map(|p| {
                let b = p.record.block.parse::<Cidr>().ok()?;
                Some(ProtoRoute {
                    dst: b.addr,
                    prefix: b.prefix,
                    gateway: Some(p.record.address),
                    oif: Some(uplink.index),
                })
            })
            .collect();
        let have = routes(&nl).await?;
        let mut installed = 0;
        for r in &want {
            if !have.contains(r) {
                match nl.replace_route(r, ROUTE_PROTO).await {
                    Ok(()) => {
                        info!(block = %format!("{}/{}", r.dst, r.prefix), via = ?r.gateway, "route to a node's block installed")
                    }
                    Err(e) => {
                        warn!(error = %format!("{e:#}"), "installing a route to a node's block failed");
                        continue;
                    }
                }
            }
            installed += 1;
        }
        for r in have
            .iter()
            .filter(|r| !want.iter().any(|w| w.dst == r.dst && w.prefix == r.prefix))
        {
            nl.del_route(r, ROUTE_PROTO).await?;
            info!(block = %format!("{}/{}", r.dst, r.prefix), "route to a node that left removed");
        }
        self.metrics.routes.set(installed);
        let peers: Vec<Ipv4Addr> = self.view.peers.iter().map(|p| p.record.address).collect();
        let nets = cluster_nets(&self.cluster, &peers);
        Maps::open(&self.ctx.pins)?.set_cluster_nets(&nets)?;
        Ok(())
    }

    fn save(&self) {
        let write = serde_json::to_vec_pretty(&self.view)
            .context("encode the cluster view")
            .and_then(|b| state::write_durably(&View::path(&self.ctx), &b, 0o644));
        if let Err(e) = write {
            warn!(error = %format!("{e:#}"), "writing the cluster view failed");
        }
    }
}
