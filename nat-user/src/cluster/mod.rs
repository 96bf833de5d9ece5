//! Many nodes: the agent configuration's `cluster` section, the blocks of the cluster CIDR
//! that nodes lease as their pod subnets, and the datastores that hold those leases
//! (`etcd`). Absent `cluster`, a node is on its own, as before.

pub mod etcd;
pub mod follow;

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

/// A checked `cluster` section.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub node_name: String,
    pub cidr: Cidr,
    pub mask: u8,
    pub non_masquerade: Vec<Cidr>,
    pub etcd: EtcdConfig,
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
        let node_name = match &self.node_name {
            Some(n) => n.clone(),
            None => hostname.to_owned(),
        };
        if node_name.is_empty()
            || !node_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            bail!("cluster.nodeName {node_name:?}: use letters, digits, '-', '.', '_'");
        }
        let etcd = match (self.datastore, &self.etcd) {
            (DatastoreKind::Etcd, Some(e)) if !e.endpoints.is_empty() => e.clone(),
            (DatastoreKind::Etcd, _) => {
                bail!("cluster.datastore \"etcd\" needs cluster.etcd.endpoints")
            }
            (DatastoreKind::Kubernetes, _) => {
                bail!("cluster.datastore \"kubernetes\" is not supported yet; use \"etcd\"")
            }
        };
        if etcd.lease_ttl_secs < 2 {
            bail!("cluster.etcd.leaseTtlSecs must be at least 2");
        }
        Ok(Cluster {
            node_name,
            cidr,
            mask,
            non_masquerade,
            etcd,
        })
    }
}

impl Cluster {
    /// The datastore's name, as status shows it.
    #[must_use]
    pub const fn datastore_name(&self) -> &'static str {
        "etcd"
    }

    /// Whether `block` is one of the cluster CIDR's blocks.
    #[must_use]
    pub fn blocks_contain(&self, block: &Cidr) -> bool {
        block.prefix == self.mask && self.cidr.contains(block.addr)
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
        assert_eq!(c.etcd.prefix, "/bpfnat");
        assert_eq!(c.etcd.lease_ttl_secs, 10);
        assert_eq!(
            block_key(&c.etcd.prefix, &c.blocks().nth(3).unwrap()),
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
