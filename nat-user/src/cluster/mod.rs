//! Many nodes: the agent configuration's `cluster` section, the blocks of the cluster CIDR
//! that nodes lease as their pod subnets, and the datastores that hold those leases
//! (`etcd`). Absent `cluster`, a node is on its own, as before.

pub mod etcd;
pub mod follow;
pub mod kubernetes;

use std::net::Ipv4Addr;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::net::Cidr;

/// `cluster` in the agent configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterConfig {
    /// Where the nodes' leases live.
    pub datastore: DatastoreKind,
    /// This node's name (default: the hostname).
    #[serde(default)]
    pub node_name: Option<String>,
    /// The pod addresses of the whole cluster, e.g. `10.244.0.0/16`.
    pub cluster_cidr: String,
    /// The prefix length of each node's block (default 24).
    #[serde(default = "default_mask")]
    pub node_cidr_mask_size: u8,
    /// Destinations a pod reaches with its own address (default: the cluster CIDR).
    #[serde(default)]
    pub non_masquerade_cidrs: Option<Vec<String>>,
    #[serde(default)]
    pub etcd: Option<EtcdConfig>,
    #[serde(default)]
    pub kubernetes: Option<KubernetesConfig>,
}

const fn default_mask() -> u8 {
    24
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DatastoreKind {
    Etcd,
    Kubernetes,
}

/// `cluster.etcd`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EtcdConfig {
    /// e.g. `["http://192.0.2.10:2379"]`.
    pub endpoints: Vec<String>,
    /// Key prefix (default `/bpfnat`).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// The lease's time to live: how soon a node that stopped without leaving is forgotten
    /// (default 10 s).
    #[serde(default = "default_ttl")]
    pub lease_ttl_secs: u64,
}

fn default_prefix() -> String {
    "/bpfnat".to_owned()
}

const fn default_ttl() -> u64 {
    10
}

/// `cluster.kubernetes` (optional with the `kubernetes` datastore).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesConfig {
    /// A kubeconfig file; default: the in-cluster service account, else `$KUBECONFIG` or
    /// `~/.kube/config`.
    #[serde(default)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// How long the API server may not answer before the datastore is reported unhealthy
    /// (default 10 s).
    #[serde(default = "default_ttl")]
    pub timeout_secs: u64,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            timeout_secs: default_ttl(),
        }
    }
}

/// Where the cluster's nodes and blocks live.
#[derive(Clone, Debug)]
pub enum Datastore {
    /// Blocks leased by the nodes themselves under a prefix of a real etcd.
    Etcd(EtcdConfig),
    /// Blocks allocated by kube-controller-manager (`Node.spec.podCIDRs`).
    Kubernetes(KubernetesConfig),
}

/// A checked `cluster` section.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub node_name: String,
    pub cidr: Cidr,
    pub mask: u8,
    pub non_masquerade: Vec<Cidr>,
    pub datastore: Datastore,
}

impl ClusterConfig {
    /// Check everything that can be checked without the datastore. `hostname`: the default
    /// node name.
    pub fn check(&self, hostname: &str) -> Result<Cluster> {
        let cidr: Cidr = self
            .cluster_cidr
            .parse()
            .map_err(|e: anyhow::Error| e.context("cluster.clusterCidr"))?;
        let mask = self.node_cidr_mask_size;
        if mask < cidr.prefix || mask > 28 {
            bail!(
                "cluster.nodeCidrMaskSize {mask} must lie between the cluster CIDR's prefix ({}) and 28",
                cidr.prefix
            );
        }
        let non_masquerade = match &self.non_masquerade_cidrs {
            None => vec![cidr],
            Some(list) => list
                .iter()
                .map(|s| {
                    s.parse::<Cidr>()
                        .map_err(|e| e.context("cluster.nonMasqueradeCidrs"))
                })
                .collect::<Result<_>>()?,
        };
        let node_name = match (&self.node_name, self.datastore) {
            (Some(n), _) => n.clone(),
            // The downward API's `spec.nodeName`, as the DaemonSet sets it.
            (None, DatastoreKind::Kubernetes) => std::env::var("NODE_NAME").unwrap_or_default(),
            (None, DatastoreKind::Etcd) => hostname.to_owned(),
        };
        if node_name.is_empty() && self.datastore == DatastoreKind::Kubernetes {
            bail!(
                "cluster.nodeName is not set and $NODE_NAME is empty: set NODE_NAME from the downward API (fieldPath spec.nodeName) or give cluster.nodeName"
            );
        }
        if node_name.is_empty()
            || !node_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            bail!("cluster.nodeName {node_name:?}: use letters, digits, '-', '.', '_'");
        }
        let datastore = match (self.datastore, &self.etcd, &self.kubernetes) {
            (DatastoreKind::Etcd, Some(e), None) if !e.endpoints.is_empty() => {
                if e.lease_ttl_secs < 2 {
                    bail!("cluster.etcd.leaseTtlSecs must be at least 2");
                }
                Datastore::Etcd(e.clone())
            }
            (DatastoreKind::Etcd, _, None) => {
                bail!("cluster.datastore \"etcd\" needs cluster.etcd.endpoints")
            }
            (DatastoreKind::Kubernetes, None, k) => {
                let k = k.clone().unwrap_or_default();
                if k.timeout_secs < 2 {
                    bail!("cluster.kubernetes.timeoutSecs must be at least 2");
                }
                Datastore::Kubernetes(k)
            }
            (DatastoreKind::Etcd, _, Some(_)) => {
                bail!(
                    "cluster.kubernetes is for the \"kubernetes\" datastore; this one is \"etcd\""
                )
            }
            (DatastoreKind::Kubernetes, Some(_), _) => {
                bail!("cluster.etcd is for the \"etcd\" datastore; this one is \"kubernetes\"")
            }
        };
        Ok(Cluster {
            node_name,
            cidr,
            mask,
            non_masquerade,
            datastore,
        })
    }
}

impl Cluster {
    /// The datastore's name, as status shows it.
    #[must_use]
    pub const fn datastore_name(&self) -> &'static str {
        match self.datastore {
            Datastore::Etcd(_) => "etcd",
            Datastore::Kubernetes(_) => "kubernetes",
        }
    }

    /// How long the datastore may not answer before it is reported unhealthy: the lease TTL
    /// (etcd), the API timeout (Kubernetes).
    #[must_use]
    pub const fn health_secs(&self) -> u64 {
        match &self.datastore {
            Datastore::Etcd(e) => e.lease_ttl_secs,
            Datastore::Kubernetes(k) => k.timeout_secs,
        }
    }

    /// Whether `block` can be a node's block: inside the cluster CIDR, no wider than it
    /// (kube-controller-manager's blocks have the size it was given; etcd's have `mask`).
    #[must_use]
    pub fn blocks_contain(&self, block: &Cidr) -> bool {
        block.prefix >= self.cidr.prefix && self.cidr.contains(block.addr)
    }

    /// Every block of the cluster CIDR, lowest first.
    pub fn blocks(&self) -> impl Iterator<Item = Cidr> + '_ {
        let count = 1u64 << (self.mask - self.cidr.prefix);
        let size = 1u64 << (32 - self.mask);
        let base = u64::from(u32::from(self.cidr.addr));
        (0..count).map(move |i| Cidr {
            addr: Ipv4Addr::from((base + i * size) as u32),
            prefix: self.mask,
        })
    }
}

/// What a node publishes about itself under its block's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node: String,
    pub address: Ipv4Addr,
    pub block: String,
}

/// A block's key: `<prefix>/subnets/10.244.3.0-24`.
#[must_use]
pub fn block_key(prefix: &str, block: &Cidr) -> String {
    format!(
        "{}/subnets/{}-{}",
        prefix.trim_end_matches('/'),
        block.addr,
        block.prefix
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(json: &str) -> ClusterConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn blocks_cover_the_cluster_cidr_in_order() {
        let c = conf(
            r#"{"datastore": "etcd", "clusterCidr": "10.244.0.0/22", "nodeCidrMaskSize": 24,
                "etcd": {"endpoints": ["http://192.0.2.10:2379"]}}"#,
        )
        .check("node-a")
        .unwrap();
        let blocks: Vec<String> = c.blocks().map(|b| b.to_string()).collect();
        assert_eq!(
            blocks,
            [
                "10.244.0.0/24",
                "10.244.1.0/24",
                "10.244.2.0/24",
                "10.244.3.0/24"
            ]
        );
        assert_eq!(c.node_name, "node-a");
        assert_eq!(c.non_masquerade, [c.cidr]);
        let Datastore::Etcd(etcd) = &c.datastore else {
            panic!("etcd")
        };
        assert_eq!(etcd.prefix, "/bpfnat");
        assert_eq!(etcd.lease_ttl_secs, 10);
        assert_eq!(
            block_key(&etcd.prefix, &c.blocks().nth(3).unwrap()),
            "/bpfnat/subnets/10.244.3.0-24"
        );
    }

    #[test]
    fn bad_sections_are_refused_clearly() {
        for (json, why) in [
            (
                r#"{"datastore": "etcd", "clusterCidr": "10.244.0.0/16", "nodeCidrMaskSize": 12,
                    "etcd": {"endpoints": ["http://x:2379"]}}"#,
                "nodeCidrMaskSize",
            ),
            (
                r#"{"datastore": "etcd", "clusterCidr": "10.244.0.0/16"}"#,
                "endpoints",
            ),
            (
                r#"{"datastore": "etcd", "clusterCidr": "10.244.1.0/16",
                    "etcd": {"endpoints": ["http://x:2379"]}}"#,
                "clusterCidr",
            ),
        ] {
            let e = conf(json).check("n").unwrap_err();
            assert!(format!("{e:#}").contains(why), "{why}: {e:#}");
        }
    }
}
