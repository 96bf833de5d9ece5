//! The Kubernetes datastore: kube-controller-manager allocates each node's block
//! (`Node.spec.podCIDRs`, with `--allocate-node-cidrs`), so a node only reads its own, and
//! every Node with an `InternalIP` and a pod CIDR is a peer. Nodes are listed, then watched
//! from the listing's `resourceVersion` (`follow::follow` drives it); a deleted Node
//! disappears with the next listing.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result, anyhow};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, Config,
    api::{ListParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use tracing::{info, warn};

use super::{Cluster, KubernetesConfig, NodeRecord, follow::Source};
use crate::net::Cidr;

/// A client of the API server: the kubeconfig given, else the in-cluster service account,
/// else `$KUBECONFIG` / `~/.kube/config`.
pub async fn connect(k: &KubernetesConfig) -> Result<Api<Node>> {
    let config = match &k.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("read kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("use kubeconfig {}", path.display()))?
        }
        None => Config::infer().await.context(
            "find the Kubernetes API (no service account, $KUBECONFIG or ~/.kube/config)",
        )?,
    };
    let mut config = config;
    config.read_timeout = Some(Duration::from_secs(k.timeout_secs));
    let client = Client::try_from(config).context("build a Kubernetes client")?;
    Ok(Api::all(client))
}

/// A Node as bpfnat sees it: name, `InternalIP`, IPv4 pod CIDR. `None` until the node has
/// both.
#[must_use]
pub fn record_of(node: &Node) -> Option<NodeRecord> {
    let name = node.metadata.name.clone()?;
    let address = node
        .status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse::<Ipv4Addr>().ok())?;
    let spec = node.spec.as_ref()?;
    let cidrs = spec
        .pod_cidrs
        .clone()
        .unwrap_or_default()
        .into_iter()
        .chain(spec.pod_cidr.clone());
    let block = cidrs.into_iter().find_map(|c| c.parse::<Cidr>().ok())?;
    Some(NodeRecord {
        node: name,
        address,
        block: block.to_string(),
    })
}

/// This node's record: its Node must have an IPv4 pod CIDR inside the cluster CIDR. Waits
/// (with a warning, backing off up to 10 s) while the API does not answer or the block is not
/// allocated yet.
pub async fn join(cluster: &Cluster, api: &Api<Node>) -> Result<NodeRecord> {
    let mut wait = Duration::from_millis(250);
    loop {
        match api.get(&cluster.node_name).await {
            Ok(node) => match record_of(&node) {
                Some(r) => {
                    let block: Cidr = r.block.parse()?;
                    if !cluster.blocks_contain(&block) {
                        return Err(anyhow!(
                            "Node {}'s pod CIDR {block} is not inside cluster.clusterCidr {}",
                            cluster.node_name,
                            cluster.cidr
                        ));
                    }
                    info!(node = %r.node, block = %r.block, "this node's block, from its Node");
                    return Ok(r);
                }
                None => {
                    warn!(node = %cluster.node_name, "the Node has no IPv4 podCIDR or InternalIP yet (is kube-controller-manager allocating node CIDRs?); waiting")
                }
            },
            Err(e) => {
                warn!(node = %cluster.node_name, error = %e, "cannot read this node's Node; retrying")
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}

/// The Nodes: listed, then watched from the list's `resourceVersion`.
pub struct Nodes(pub Api<Node>);

impl Source for Nodes {
    type Version = String;

    /// Every Node's record (those without a pod CIDR or `InternalIP` skipped).
    async fn list(&mut self) -> Result<(Vec<NodeRecord>, String)> {
        let list = self
            .0
            .list(&ListParams::default())
            .await
            .context("Kubernetes: list Nodes")?;
        let version = list.metadata.resource_version.clone().unwrap_or_default();
        Ok((list.items.iter().filter_map(record_of).collect(), version))
    }

    async fn changed(&mut self, version: String, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        let wp =
            WatchParams::default().timeout(u32::try_from(within.as_secs()).unwrap_or(1).max(1));
        let Ok(Ok(stream)) = tokio::time::timeout_at(deadline, self.0.watch(&wp, &version)).await
        else {
            tokio::time::sleep_until(deadline).await;
            return;
        };
        let mut stream = std::pin::pin!(stream);
        // Bookmarks say nothing changed; a change, an error, the watch's end or the
        // deadline: list again.
        while let Ok(Some(Ok(WatchEvent::Bookmark(_)))) =
            tokio::time::timeout_at(deadline, stream.next()).await
        {}
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{List, api::core::v1::Node};

    use super::record_of;

    #[test]
    fn records_come_from_internal_ip_and_the_ipv4_pod_cidr() {
        let list: List<Node> = serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/k8s/nodes.json"
        )))
        .unwrap();
        let recs: Vec<String> = list
            .items
            .iter()
            .map(|n| format!("{:?}", record_of(n).map(|r| (r.node, r.address, r.block))))
            .collect();
        assert_eq!(
            recs,
            [
                r#"Some(("n1", 192.0.2.11, "10.244.1.0/24"))"#,
                r#"Some(("n2", 192.0.2.12, "10.244.2.0/24"))"#,
                // No pod CIDR allocated yet.
                "None",
            ]
        );
    }
}
