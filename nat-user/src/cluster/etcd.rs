//! The etcd datastore. A node leases one free block of the cluster CIDR: the key
//! `<prefix>/subnets/<block>` is created in a transaction only if absent (so two nodes never
//! hold the same block) and bound to a TTL lease the agent keeps alive. A restarted agent takes
//! its own block back (the record names the node); leaving revokes the lease at once, and a
//! node that dies without leaving is forgotten when its lease expires.

use std::{collections::HashSet, net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result, bail};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use tracing::{info, warn};

use super::{Cluster, EtcdConfig, NodeRecord, block_key, follow::Source};
use crate::net::Cidr;

/// Connect, retrying with backoff (up to 10 s between tries) until an endpoint answers, with
/// a warning naming the endpoints at every failure: a node may start before its datastore.
pub async fn connect(endpoints: &[String]) -> Client {
    let mut wait = Duration::from_millis(250);
    loop {
        // HTTP/2 pings find a connection that died under the client (the node's own address
        // changed, a middlebox forgot it) within seconds; the channel then connects anew.
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        match Client::connect(endpoints, Some(opts)).await {
            Ok(mut c) => match c.status().await {
                Ok(_) => return c,
                Err(e) => {
                    warn!(endpoints = ?endpoints, error = %e, "etcd does not answer; retrying")
                }
            },
            Err(e) => warn!(endpoints = ?endpoints, error = %e, "cannot reach etcd; retrying"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}

/// This node's lease of its block.
pub struct Membership {
    client: Client,
    lease: i64,
    key: String,
    value: String,
    pub block: Cidr,
    ttl: i64,
}

fn subnets_prefix(prefix: &str) -> String {
    format!("{}/subnets/", prefix.trim_end_matches('/'))
}

/// Put `value` at `key`, bound to `lease`, if `cond` holds; whether it did.
async fn put_if(
    client: &mut Client,
    cond: Compare,
    key: &str,
    value: &str,
    lease: i64,
) -> Result<bool> {
    let txn = Txn::new().when(vec![cond]).and_then(vec![TxnOp::put(
        key,
        value,
        Some(PutOptions::new().with_lease(lease)),
    )]);
    Ok(client
        .txn(txn)
        .await
        .with_context(|| format!("etcd: write {key}"))?
        .succeeded())
}

/// The key, value and block this node holds under `lease`: its own block again if a record
/// names it, else the lowest free one; `None` when every block is taken.
async fn lease_block(
    client: &mut Client,
    cluster: &Cluster,
    etcd: &EtcdConfig,
    address: Ipv4Addr,
    lease: i64,
) -> Result<Option<(String, String, Cidr)>> {
    let value_of = |block: &Cidr| {
        serde_json::to_string(&NodeRecord {
            node: cluster.node_name.clone(),
            address,
            block: block.to_string(),
        })
    };
    let held = client
        .get(
            subnets_prefix(&etcd.prefix),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .context("etcd: list the leased blocks")?;
    let mut taken = HashSet::new();
    for kv in held.kvs() {
        let key = kv.key_str().unwrap_or_default().to_owned();
        let rec: Option<NodeRecord> = serde_json::from_slice(kv.value()).ok();
        if let Some(rec) = rec
            && rec.node == cluster.node_name
            && let Ok(block) = rec.block.parse::<Cidr>()
            && cluster.blocks().any(|b| b == block)
        {
            // Ours (a restart): take it over, unless someone changed it meanwhile.
            let value = value_of(&block)?;
            let cond = Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision());
            if put_if(client, cond, &key, &value, lease).await? {
                info!(block = %block, key = %key, "took this node's block back");
                return Ok(Some((key, value, block)));
            }
        }
        taken.insert(key);
    }
    for block in cluster.blocks() {
        let key = block_key(&etcd.prefix, &block);
        if taken.contains(&key) {
            continue;
        }
        let value = value_of(&block)?;
        let cond = Compare::create_revision(key.as_str(), CompareOp::Equal, 0);
        if put_if(client, cond, &key, &value, lease).await? {
            info!(block = %block, key = %key, "leased a block of the cluster CIDR");
            return Ok(Some((key, value, block)));
        }
    }
    Ok(None)
}

/// Lease a block for this node: its own again if a record names it, else the lowest free one.
pub async fn join(cluster: &Cluster, etcd: &EtcdConfig, address: Ipv4Addr) -> Result<Membership> {
    let mut client = connect(&etcd.endpoints).await;
    let ttl = i64::try_from(etcd.lease_ttl_secs).unwrap_or(i64::MAX);
    let lease = client
        .lease_grant(ttl, None)
        .await
        .context("etcd: grant a lease")?
        .id();
    match lease_block(&mut client, cluster, etcd, address, lease).await {
        Ok(Some((key, value, block))) => Ok(Membership {
            client,
            lease,
            key,
            value,
            block,
            ttl,
        }),
        Ok(None) => {
            let _ = client.lease_revoke(lease).await;
            bail!(
                "no block of the cluster CIDR {} is free: every /{} is leased by another node (widen clusterCidr or narrow nodeCidrMaskSize)",
                cluster.cidr,
                cluster.mask
            )
        }
        Err(e) => {
            let _ = client.lease_revoke(lease).await;
            Err(e)
        }
    }
}

/// Every node record under the prefix (unreadable ones skipped), and the store's revision.
async fn records(client: &mut Client, prefix: &str) -> Result<(Vec<NodeRecord>, i64)> {
    let resp = client
        .get(
            subnets_prefix(prefix),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .context("etcd: list the nodes")?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let records = resp
        .kvs()
        .iter()
        .filter_map(|kv| match serde_json::from_slice::<NodeRecord>(kv.value()) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(key = %kv.key_str().unwrap_or("?"), error = %e, "ignoring an unreadable node record");
                None
            }
        })
        .collect();
    Ok((records, revision))
}

/// The nodes under the prefix: listed, then watched from the listing's revision.
pub struct Nodes {
    pub client: Client,
    pub prefix: String,
}

impl Source for Nodes {
    type Version = i64;

    async fn list(&mut self) -> Result<(Vec<NodeRecord>, i64)> {
        records(&mut self.client, &self.prefix).await
    }

    async fn changed(&mut self, revision: i64, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let watch = self.client.watch(subnets_prefix(&self.prefix), Some(opts));
        let Ok(Ok(mut stream)) = tokio::time::timeout_at(deadline, watch).await else {
            tokio::time::sleep_until(deadline).await;
            return;
        };
        // The watch being set up, or a progress note: nothing changed yet. A change, the
        // watch's end or the deadline: list again.
        while let Ok(Ok(Some(resp))) = tokio::time::timeout_at(deadline, stream.message()).await
            && resp.events().is_empty()
            && !resp.canceled()
        {}
    }
}

impl Membership {
    /// A client for following the cluster beside the lease.
    #[must_use]
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// What this node published about itself.
    pub fn record(&self) -> Result<NodeRecord> {
        serde_json::from_str(&self.value).context("this node's record")
    }

    /// Keep the lease alive, forever: a keep-alive every third of the TTL. If the lease is
    /// lost anyway (etcd was away longer than the TTL), lease again and put the block back
    /// if nobody took it meanwhile.
    pub async fn keep_alive(&mut self) {
        let every = Duration::from_secs(u64::try_from(self.ttl / 3).unwrap_or(1).max(1));
        loop {
            if let Err(e) = self.keep_alive_once().await {
                warn!(error = %format!("{e:#}"), key = %self.key, "etcd keep-alive failed; retrying");
            }
            tokio::time::sleep(every).await;
        }
    }

    async fn keep_alive_once(&mut self) -> Result<()> {
        let (mut keeper, mut stream) = self
            .client
            .lease_keep_alive(self.lease)
            .await
            .context("etcd: keep-alive")?;
        keeper.keep_alive().await.context("etcd: keep-alive")?;
        let alive = stream
            .message()
            .await
            .context("etcd: keep-alive answer")?
            .is_some_and(|r| r.ttl() > 0);
        if alive {
            return Ok(());
        }
        // Expired: a new lease, and the block again if it is still free.
        self.lease = self
            .client
            .lease_grant(self.ttl, None)
            .await
            .context("etcd: grant a lease")?
            .id();
        let cond = Compare::create_revision(self.key.as_str(), CompareOp::Equal, 0);
        if !put_if(&mut self.client, cond, &self.key, &self.value, self.lease).await? {
            bail!(
                "this node's block {} was leased by another node while this one was away",
                self.block
            );
        }
        info!(block = %self.block, "leased this node's block again after the lease expired");
        Ok(())
    }

    /// The uplink's address changed: publish the new one in this node's record (only if the
    /// record is still ours), so the other nodes route the block to it.
    pub async fn move_to(&mut self, address: Ipv4Addr) -> Result<bool> {
        let mut rec = self.record()?;
        if rec.address == address {
            return Ok(false);
        }
        rec.address = address;
        let value = serde_json::to_string(&rec)?;
        let cond = Compare::lease(self.key.as_str(), CompareOp::Equal, self.lease);
        if !put_if(&mut self.client, cond, &self.key, &value, self.lease).await? {
            bail!(
                "this node's record {} is not held by its lease any more",
                self.key
            );
        }
        self.value = value;
        Ok(true)
    }

    /// Leave: revoke the lease, which deletes the block's key at once.
    pub async fn leave(&mut self) -> Result<()> {
        self.client
            .lease_revoke(self.lease)
            .await
            .context("etcd: revoke the lease")?;
        Ok(())
    }
}
