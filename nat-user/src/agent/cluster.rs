//! The agent's part in a cluster: join (lease a block in etcd, or read the one Kubernetes
//! allocated), follow the other nodes on a task of its own, and leave when the agent stops
//! (SIGTERM revokes an etcd lease at once; `kill -9` lets it expire).

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::{
    cluster::{
        Cluster, ClusterConfig, Datastore, NodeRecord, etcd,
        follow::{ClusterMetrics, Follower, follow},
        kubernetes,
    },
    env::Env,
};

/// A node that has its block.
pub enum Joined {
    Etcd(Box<etcd::Membership>),
    Kubernetes(Box<Api<Node>>, NodeRecord),
}

impl Joined {
    /// Give the block back (etcd: revoke the lease) when the agent stops before it runs.
    pub async fn leave(self) {
        if let Self::Etcd(mut m) = self {
            match m.leave().await {
                Ok(()) => info!(block = %m.block, "left the cluster"),
                Err(e) => warn!(error = %format!("{e:#}"), "leaving the cluster failed"),
            }
        }
    }

    /// This node's record: its name, address and block.
    pub fn record(&self) -> Result<NodeRecord> {
        match self {
            Self::Etcd(m) => m.record(),
            Self::Kubernetes(_, r) => Ok(r.clone()),
        }
    }
}

/// Join the cluster: the block is this node's subnet from then on. `address`: the uplink's,
/// which other nodes route the block to (etcd; Kubernetes has the Node's `InternalIP`).
pub async fn join(
    c: &ClusterConfig,
    hostname: &str,
    address: impl AsyncFnOnce() -> Result<Ipv4Addr>,
) -> Result<(Cluster, Joined)> {
    let cluster = c.check(hostname)?;
    let joined = match &cluster.datastore {
        Datastore::Etcd(e) => {
            Joined::Etcd(Box::new(etcd::join(&cluster, e, address().await?).await?))
        }
        Datastore::Kubernetes(k) => {
            let api = kubernetes::connect(k).await?;
            let me = kubernetes::join(&cluster, &api).await?;
            Joined::Kubernetes(Box::new(api), me)
        }
    };
    let me = joined.record()?;
    info!(node = %me.node, block = %me.block, datastore = cluster.datastore_name(), "joined the cluster");
    Ok((cluster, joined))
}

/// The cluster's tasks while the agent runs.
pub struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    moved: mpsc::UnboundedSender<Ipv4Addr>,
}

/// Follow the other nodes (routes, the datapath's cluster prefixes, the view) and, on etcd,
/// keep the lease alive.
pub fn run(
    ctx: &Env,
    cluster: Cluster,
    joined: Joined,
    uplink: String,
    metrics: ClusterMetrics,
) -> Result<Running> {
    let me = joined.record().context("this node's record")?;
    let mut f = Follower::new(ctx.clone(), cluster.clone(), me, uplink, metrics);
    let (stop, mut stopped) = oneshot::channel::<()>();
    let (moved, mut moves) = mpsc::unbounded_channel::<Ipv4Addr>();
    let task = match (joined, cluster.datastore) {
        (Joined::Etcd(mut m), Datastore::Etcd(e)) => {
            let mut nodes = etcd::Nodes {
                client: m.client(),
                prefix: e.prefix.clone(),
            };
            let health = Duration::from_secs(e.lease_ttl_secs);
            tokio::spawn(async move {
                // The uplink's address to publish, until etcd has it (the request that follows
                // a renumbering may meet the connection the old address took down).
                let mut pending: Option<Ipv4Addr> = None;
                loop {
                    if let Some(address) = pending {
                        match m.move_to(address).await {
                            Ok(moved) => {
                                pending = None;
                                if moved {
                                    f.moved_to(address);
                                    info!(%address, "this node's record follows the uplink's new address");
                                }
                            }
                            Err(e) => {
                                warn!(error = %format!("{e:#}"), "publishing the uplink's new address failed; retrying")
                            }
                        }
                    }
                    tokio::select! {
                        () = m.keep_alive() => break,
                        () = follow(&mut nodes, &mut f, health) => break,
                        Some(address) = moves.recv() => pending = Some(address),
                        () = tokio::time::sleep(Duration::from_secs(1)), if pending.is_some() => {}
                        _ = &mut stopped => break,
                    }
                }
                match m.leave().await {
                    Ok(()) => info!(block = %m.block, "left the cluster"),
                    Err(e) => warn!(error = %format!("{e:#}"), "leaving the cluster failed"),
                }
            })
        }
        // The Node's InternalIP is the kubelet's to keep: address changes are not ours.
        (Joined::Kubernetes(api, _), Datastore::Kubernetes(k)) => {
            let mut nodes = kubernetes::Nodes(*api);
            let health = Duration::from_secs(k.timeout_secs);
            tokio::spawn(async move {
                tokio::select! {
                    () = follow(&mut nodes, &mut f, health) => {}
                    _ = stopped => {}
                }
            })
        }
        _ => anyhow::bail!("joined through another datastore than the configured one"),
    };
    Ok(Running { stop, task, moved })
}

impl Running {
    /// The uplink's address is now `address` (published if it changed, on etcd).
    pub fn uplink_address(&self, address: Ipv4Addr) {
        let _ = self.moved.send(address);
    }

    /// Stop following; on etcd, give the block back.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}
