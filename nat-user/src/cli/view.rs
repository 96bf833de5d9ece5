//! The `-o json` schema (`apiVersion: bpfnat/v1`): what each command prints, separate from
//! what bpfnat records, so the state file can change without breaking scripts. Addresses,
//! MACs and subnets are strings (`"10.88.0.2"`, `"02:42:0a:58:00:02"`, `"10.88.0.0/16"`);
//! "every address of the node" is `"0.0.0.0"` everywhere; nothing internal (ifindexes of
//! helper interfaces, namespace cookies, empty ranges standing for "none") is shown. Every
//! object has `apiVersion` and `kind`; a list is `{"apiVersion", "kind": "…List", "items"}`.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use serde::Serialize;

use crate::{
    net::fmt_mac,
    spec::PortMapping,
    state::{Container, Node},
};

/// The schema's version: bumped only for a change that can break a reader.
pub const API_VERSION: &str = "bpfnat/v1";

/// What `-o json` prints: the kind, then the value's own fields.
#[derive(Serialize)]
pub struct Envelope<'a, T: Serialize> {
    #[serde(rename = "apiVersion")]
    pub api_version: &'static str,
    pub kind: &'a str,
    #[serde(flatten)]
    pub body: &'a T,
}

/// A list's body.
#[derive(Serialize)]
pub struct Items<'a, T: Serialize> {
    pub items: &'a [T],
}

/// How "every address of the node" is spelled.
pub const ALL_ADDRESSES: &str = "0.0.0.0";

fn host_ip(ip: Option<std::net::IpAddr>) -> String {
    ip.map_or_else(|| ALL_ADDRESSES.to_owned(), |i| i.to_string())
}

/// A port range, inclusive.
#[derive(Serialize)]
pub struct Range {
    pub min: u16,
    pub max: u16,
}

/// The node (`up`, `status`).
#[derive(Serialize)]
pub struct NodeView {
    pub uplink: String,
    pub uplink_ifindex: u32,
    pub uplink_mac: String,
    /// The node's own address on the uplink. This and the next four are absent on an
    /// IPv6-only node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_addr: Option<Ipv4Addr>,
    /// The container subnet, CIDR.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// The MASQUERADE source address, and whether it follows the uplink's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat_ip: Option<Ipv4Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat_from_uplink: Option<bool>,
    /// Ports MASQUERADE may allocate.
    pub port_range: Range,
    /// The node's ephemeral ports, which MASQUERADE leaves alone; absent unless
    /// `--masquerade-avoid-host-ports`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avoided_host_ports: Option<Range>,
    /// `off`, `native` or `generic`.
    pub xdp: String,
    /// The IPv6 container subnet, CIDR; absent on a node without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<Ipv6Addr>,
    /// The IPv6 MASQUERADE source (absent while the uplink has no global IPv6 address), and
    /// whether it follows the uplink's; both absent on a node without an IPv6 subnet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat_ip6: Option<Ipv6Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat6_from_uplink: Option<bool>,
}

impl NodeView {
    #[must_use]
    pub fn of(n: &Node) -> Self {
        Self {
            uplink: n.uplink.clone(),
            uplink_ifindex: n.uplink_ifindex,
            uplink_mac: fmt_mac(&n.uplink_mac),
            node_addr: n.v4.as_ref().map(|v| v.node_addr),
            subnet: n.v4.as_ref().map(|v| v.cidr().to_string()),
            gateway: n.v4.as_ref().map(|v| v.gateway),
            snat_ip: n.v4.as_ref().map(|v| v.snat_ip),
            snat_from_uplink: n.v4.as_ref().map(|v| v.snat_from_uplink),
            port_range: Range {
                min: n.port_min,
                max: n.port_max,
            },
            avoided_host_ports: (n.host_port_min <= n.host_port_max).then_some(Range {
                min: n.host_port_min,
                max: n.host_port_max,
            }),
            xdp: n.xdp.to_string(),
            subnet6: n.v6.as_ref().map(|v| v.cidr().to_string()),
            gateway6: n.v6.as_ref().map(|v| v.gateway),
            snat_ip6: n.v6.as_ref().and_then(|v| v.snat),
            snat6_from_uplink: n.v6.as_ref().map(|v| v.snat_from_uplink),
        }
    }
}

/// A published port of a container.
#[derive(Serialize)]
pub struct PortView {
    pub host_ip: String,
    pub host_port: u16,
    pub container_port: u16,
    pub proto: String,
}

impl PortView {
    /// One view per family side of each of `ms`, as `c` publishes them (`8080:80` on a
    /// dual-stack container is `0.0.0.0` and `::`, as Docker shows it).
    #[must_use]
    pub fn all(c: &Container, ms: &[PortMapping]) -> Vec<Self> {
        ms.iter()
            .flat_map(|m| c.sides(m))
            .map(|(m, _)| Self::of(&m))
            .collect()
    }

    #[must_use]
    pub fn of(m: &PortMapping) -> Self {
        Self {
            host_ip: host_ip(m.host_ip),
            host_port: m.host_port,
            container_port: m.container_port,
            proto: m.proto.to_string(),
        }
    }
}

/// The CNI attachment a container is.
#[derive(Serialize)]
pub struct CniView {
    pub container_id: String,
    pub network: String,
}

/// A container (`container add`, `del`, `list`, `inspect`).
#[derive(Serialize)]
pub struct ContainerView {
    pub name: String,
    /// Its IPv4 address; absent on an IPv6-only node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// Its IPv6 address, on a node with an IPv6 subnet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    pub mac: String,
    /// The interface inside the namespace.
    pub ifname: String,
    /// Its host-side veth.
    pub host_if: String,
    pub host_ifindex: u32,
    pub host_mac: String,
    pub netns: String,
    /// bpfnat created the namespace (and removes it with the container).
    pub owns_netns: bool,
    pub ports: Vec<PortView>,
    pub sysctls: BTreeMap<String, String>,
    /// Present for a CNI attachment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cni: Option<CniView>,
    /// Present (true) while an add that was interrupted is unfinished: the next command for
    /// the container finishes or undoes it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
}

impl ContainerView {
    #[must_use]
    pub fn of(c: &Container) -> Self {
        let cni = match &c.cni_attachment {
            Some(a) => Some(CniView {
                container_id: a.container_id.clone(),
                network: a.network.clone(),
            }),
            None if c.cni => Some(CniView {
                container_id: c.name.clone(),
                network: String::new(),
            }),
            None => None,
        };
        Self {
            name: c.name.clone(),
            ip: c.ip,
            ip6: c.ip6,
            mac: fmt_mac(&c.mac),
            ifname: c.ifname.clone(),
            host_if: c.host_if.clone(),
            host_ifindex: c.host_ifindex,
            host_mac: fmt_mac(&c.host_mac),
            netns: c.netns.display().to_string(),
            owns_netns: c.owns_netns,
            ports: PortView::all(c, &c.ports.to_vec()),
            sysctls: c.sysctls.iter().cloned().collect(),
            cni,
            pending: c.pending,
        }
    }
}

/// `cluster status`: this node in its cluster, and every other node.
#[derive(Serialize)]
pub struct ClusterStatusView {
    pub node: ClusterNodeView,
    pub peers: Vec<ClusterPeerView>,
}

#[derive(Serialize)]
pub struct ClusterNodeView {
    pub name: String,
    pub address: Ipv4Addr,
    /// This node's block of the cluster CIDR, CIDR.
    pub block: String,
    pub datastore: DatastoreView,
}

#[derive(Serialize)]
pub struct DatastoreView {
    /// `etcd` or `kubernetes`.
    pub kind: String,
    /// The agent's last listing of the cluster succeeded less than a lease TTL ago.
    pub healthy: bool,
}

/// Another node of the cluster.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterPeerView {
    pub name: String,
    pub address: Ipv4Addr,
    pub block: String,
    /// The route `block via address` is in this node's main table.
    pub route_installed: bool,
    /// Seconds since the datastore last listed it.
    pub last_seen_secs: u64,
}
