//! The agent's part in a cluster: join (lease a block in etcd, or read the one Kubernetes
//! allocated), follow the other nodes on a task of its own, and leave when the agent stops
//! (SIGTERM revokes an etcd lease at once; `kill -9` lets it expire).

use std::time::Duration;

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use tokio::{sync::oneshot, task::JoinHandle};
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
    address: impl AsyncFnOnce() -> Result<std::net::Ipv4Addr>,
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
    let (stop, stopped) = oneshot::channel::<()>();
    let task = match (joined, cluster.datastore) {
        (Joined::Etcd(mut m), Datastore::Etcd(e)) => {
            let mut nodes = etcd::Nodes {
                client: m.client(),
                prefix: e.prefix.clone(),
            };
            let health = Duration::from_secs(e.lease_ttl_secs);
            tokio::spawn(async move {
                tokio::select! {
                    () = m.keep_alive() => {}
                    () = follow(&mut nodes, &mut f, health) => {}
                    _ = stopped => {}
                }
                match m.leave().await {
                    Ok(()) => info!(block = %m.block, "left the cluster"),
                    Err(e) => warn!(error = %format!("{e:#}"), "leaving the cluster failed"),
                }
            })
        }
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
    Ok(Running { stop, task })
}

impl Running {
    /// Stop following; on etcd, give the block back.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}
