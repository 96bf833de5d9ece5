//! The record of the node and its containers, and where it is kept (`store`: a snapshot
//! and a journal under `--state-dir`, behind a lock).

mod published;
mod store;

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf, sync::Arc};

pub use published::Published;
pub use store::{Store, lock_file, write_durably};

use serde::{Deserialize, Serialize};

use crate::{
    net::{Cidr, Cidr6},
    spec::PortMapping,
};

/// The node-wide settings `up` was given and derived.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub uplink: String,
    pub uplink_ifindex: u32,
    /// The container subnet's IPv4 part; absent on a v6-only node (`up --subnet6` alone on
    /// an uplink without an IPv4 address). Flattened: a record has these fields at its top
    /// level, as before nodes could be v6-only.
    #[serde(flatten)]
    pub v4: Option<Subnet4>,
    pub port_min: u16,
    pub port_max: u16,
    /// ifindex of the interface that holds the gateway address.
    pub gateway_ifindex: u32,
    pub gateway_if: String,
    /// The uplink's MAC (ARP answers for static NAT addresses).
    pub uplink_mac: [u8; 6],
    /// Cookie of the node's network namespace.
    pub netns_cookie: u64,
    /// The node's ephemeral port range: MASQUERADE leaves it to the node's own sockets.
    #[serde(default)]
    pub host_port_min: u16,
    #[serde(default)]
    pub host_port_max: u16,
    /// How the uplink's XDP fast path runs (`up --xdp`).
    #[serde(default)]
    pub xdp: XdpSetting,
    /// The container subnet's IPv6 part (`up --subnet6`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v6: Option<Subnet6>,
    /// The kernel's boot ID when the node came up (`/proc/sys/kernel/random/boot_id`). A
    /// record kept across a reboot (a state dir on disk) describes namespaces, links and pins
    /// that went with the old boot. Absent in records of earlier versions, until the next
    /// `up`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

impl Node {
    /// The container subnets, CIDR, for messages: `10.88.0.0/16`, `10.88.0.0/16 fd00:88::/64`
    /// or `fd00:88::/64`.
    #[must_use]
    pub fn subnets(&self) -> String {
        let v4 = self.v4.as_ref().map(|v| v.cidr().to_string());
        let v6 = self.v6.as_ref().map(|v| v.cidr().to_string());
        v4.into_iter().chain(v6).collect::<Vec<_>>().join(" ")
    }
}

/// A node's IPv4 container subnet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet4 {
    pub subnet: Ipv4Addr,
    pub prefix_len: u8,
    /// The containers' gateway, held by the node.
    pub gateway: Ipv4Addr,
    /// MASQUERADE's source: `--snat-ip`, or the uplink's own address.
    pub snat_ip: Ipv4Addr,
    /// `snat_ip` is the uplink's own address rather than one given with `--snat-ip`.
    pub snat_from_uplink: bool,
    /// The uplink's own address (host processes reach published ports on it).
    pub node_addr: Ipv4Addr,
}

impl Subnet4 {
    #[must_use]
    pub const fn cidr(&self) -> Cidr {
        Cidr {
            addr: self.subnet,
            prefix: self.prefix_len,
        }
    }
}

impl Subnet6 {
    #[must_use]
    pub const fn cidr(&self) -> Cidr6 {
        Cidr6 {
            addr: self.subnet,
            prefix: self.prefix_len,
        }
    }
}

/// A node's IPv6 container subnet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet6 {
    pub subnet: std::net::Ipv6Addr,
    pub prefix_len: u8,
    /// The containers' IPv6 gateway, held by the node.
    pub gateway: std::net::Ipv6Addr,
    /// MASQUERADE's IPv6 source (NAT66): `--snat-ip6`, or the uplink's first global address;
    /// `None` while the uplink has none (IPv6 for outside is then dropped, never leaked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat: Option<std::net::Ipv6Addr>,
    /// `snat` follows the uplink's address rather than `--snat-ip6`.
    #[serde(default)]
    pub snat_from_uplink: bool,
}

/// How the uplink's inbound XDP fast path runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpSetting {
    /// No XDP: TC does everything (`bpf_redirect_peer` into the containers).
    #[default]
    Off,
    /// XDP in the driver; the containers' interfaces get GRO (NAPI) to accept redirects.
    Native,
    /// XDP on the skb, after the stack's receive allocation.
    Generic,
}

impl std::fmt::Display for XdpSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Native => "native",
            Self::Generic => "generic",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub name: String,
    /// Its IPv4 address; none on a v6-only node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// Its IPv6 address, on a node with an IPv6 subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<std::net::Ipv6Addr>,
    pub mac: [u8; 6],
    pub host_if: String,
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    pub netns: PathBuf,
    /// bpfnat created the namespace (and removes it on `container del`).
    pub owns_netns: bool,
    pub ports: Published,
    pub sysctls: Vec<(String, String)>,
    /// The interface name inside the namespace.
    #[serde(default = "default_ifname")]
    pub ifname: String,
    /// Created through the CNI plugin (CNI GC may remove it).
    #[serde(default)]
    pub cni: bool,
    /// The CNI attachment this is (with `ifname`); absent in records of CNI attachments made
    /// before attachments were keyed by interface, whose name is the container ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_attachment: Option<CniAttachment>,
    /// Recorded before anything was created for it, and cleared once all of it exists: an
    /// add that was killed half way leaves it set, and the next `container add` of the name,
    /// `container del` or `down` removes whatever part of it exists.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
}

/// What identifies a CNI attachment besides its interface name (spec 1.1: the container
/// ID, the interface name and the network name).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniAttachment {
    pub container_id: String,
    pub network: String,
}

impl Container {
    /// Each family's side of the published port `m` as the datapath has it: the host address
    /// spelled out (`0.0.0.0` or `::` for every address) and the container address it leads
    /// to. `8080:80` is both sides on a container with an IPv6 address, as with Docker.
    #[must_use]
    pub fn sides(&self, m: &PortMapping) -> Vec<(PortMapping, std::net::IpAddr)> {
        let mut out = Vec::new();
        if let (Some(a), Some(ip)) = (m.v4(), self.ip) {
            let host = a.unwrap_or(Ipv4Addr::UNSPECIFIED);
            out.push((
                PortMapping {
                    host_ip: Some(host.into()),
                    ..*m
                },
                ip.into(),
            ));
        }
        if let (Some(a), Some(ip6)) = (m.v6(), self.ip6) {
            let host = a.unwrap_or(std::net::Ipv6Addr::UNSPECIFIED);
            out.push((
                PortMapping {
                    host_ip: Some(host.into()),
                    ..*m
                },
                ip6.into(),
            ));
        }
        out
    }

    /// Whether this record is the CNI attachment of interface `ifname` of container `id` on
    /// network `network`. An older record (no attachment recorded) is its container ID's
    /// attachment on any network.
    #[must_use]
    pub fn is_cni_attachment(&self, id: &str, ifname: &str, network: &str) -> bool {
        self.cni
            && self.ifname == ifname
            && match &self.cni_attachment {
                Some(a) => a.container_id == id && a.network == network,
                None => self.name == id,
            }
    }
}

fn default_ifname() -> String {
    "eth0".to_owned()
}

/// A static 1:1 NAT mapping (`bpfnat nat add`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaticMapping {
    /// Both of one family.
    pub external: std::net::IpAddr,
    pub internal: std::net::IpAddr,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub node: Option<Node>,
    /// Shared so that the store's baseline of what it saved costs no copy: a container that
    /// changes is replaced (or `Arc::make_mut`), which is how the store tells it changed.
    pub containers: BTreeMap<String, Arc<Container>>,
    #[serde(default)]
    pub static_nat: Vec<StaticMapping>,
    /// Last generation handed to a port mapping.
    pub generation: u32,
    /// The last journal entry this snapshot includes (`store`; 0 in records written before
    /// the journal). Set by `Store::save`: a caller's value is not read.
    #[serde(default)]
    pub journal_seq: u64,
}

impl State {
    pub fn next_generation(&mut self) -> u32 {
        self.generation = self.generation.wrapping_add(1).max(1);
        self.generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE_V6_ONLY: &str = r#"{"uplink":"eth0","uplink_ifindex":2,"subnet":"10.88.0.0",
        "prefix_len":16,"gateway":"10.88.0.1","snat_ip":"198.51.100.2","snat_from_uplink":true,
        "port_min":1024,"port_max":65535,"gateway_ifindex":5,"gateway_if":"bn-gw",
        "uplink_mac":[2,0,0,0,0,1],"node_addr":"198.51.100.2","netns_cookie":1}"#;

    #[test]
    fn records_from_before_v6_only_nodes_keep_their_ipv4_subnet() {
        let n: Node = serde_json::from_str(BEFORE_V6_ONLY).unwrap();
        let v4 = n.v4.as_ref().expect("the IPv4 subnet");
        assert_eq!(v4.cidr().to_string(), "10.88.0.0/16");
        assert_eq!(v4.node_addr, Ipv4Addr::new(198, 51, 100, 2));
        // Written back, the record has the same shape.
        let again: serde_json::Value = serde_json::to_value(&n).unwrap();
        let before: serde_json::Value = serde_json::from_str(BEFORE_V6_ONLY).unwrap();
        for k in ["subnet", "prefix_len", "gateway", "snat_ip", "node_addr"] {
            assert_eq!(again[k], before[k], "{k}");
        }
        let v6_only = Node { v4: None, ..n };
        let text = serde_json::to_string(&v6_only).unwrap();
        assert!(!text.contains("\"subnet\""), "{text}");
        assert_eq!(serde_json::from_str::<Node>(&text).unwrap(), v6_only);
    }
}
