//! The node's settings and the endpoints attached to it: the `config`, `node_addrs` and
//! `endpoints` maps.

use bytemuck::{Pod, Zeroable};

use crate::{Addr4, Addr6};

/// `Config::flags`: masquerade traffic from the container subnet that leaves by the uplink.
pub const CFG_MASQUERADE: u32 = 1 << 0;
/// `Config::flags`: at least one static NAT mapping exists (else inbound packets skip the
/// `static_nat` lookup).
pub const CFG_STATIC_NAT: u32 = 1 << 1;

/// Node-wide settings, the single entry (index 0) of the `config` array map. The
/// family-neutral settings come first; each family's addresses are a part of their own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    /// ifindex of the uplink in the node's namespace; 0 while the datapath is down.
    pub uplink_ifindex: u32,
    /// `CFG_*` bits.
    pub flags: u32,
    /// First port MASQUERADE may allocate when the original source port is taken (host order).
    pub port_min: u16,
    /// Last port MASQUERADE may allocate (host order, inclusive).
    pub port_max: u16,
    /// The node's own ephemeral port range (`ip_local_port_range`, host order, inclusive).
    /// MASQUERADE never takes a TCP/UDP source port from it: the node's own connections from
    /// the uplink address use those ports, and conntrack does not see them.
    pub host_port_min: u16,
    pub host_port_max: u16,
    /// MAC address of the uplink: ARP for static NAT addresses is answered with it.
    pub uplink_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// Cookie of the node's network namespace (`SO_NETNS_COOKIE`): the socket programs are
    /// attached to a cgroup, which spans namespaces, and act only for sockets of this one.
    pub netns_cookie: u64,
    /// The node's IPv4 addresses.
    pub v4: Net4,
    pub _pad2: [u8; 4],
    /// The container subnet's IPv6 part (`prefix_len` 0: the node has none, and IPv6 is the
    /// stack's business as before).
    pub v6: Net6,
}

/// The IPv6 part of `Config`; addresses network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Net6 {
    /// Container subnet base address (`up --subnet6`).
    pub subnet_addr: Addr6,
    /// The containers' IPv6 gateway (a node address; Neighbour Solicitations for it are
    /// answered with the host veth's MAC).
    pub gateway_addr: Addr6,
    /// Source address written by MASQUERADE (NAT66): the uplink's first global unicast
    /// address or `up --snat-ip6`; all zero while there is none, and then IPv6 traffic for
    /// outside is dropped (`drop_ipv6_out`) rather than sent untranslated.
    pub snat_addr: Addr6,
    /// The subnet's prefix length; 0 when the node has no IPv6 subnet.
    pub prefix_len: u8,
    pub _pad: [u8; 7],
}

/// The IPv4 part of `Config`; all addresses network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Net4 {
    /// Source address written by MASQUERADE.
    pub snat_addr: Addr4,
    /// Virtual gateway address of the container subnet.
    pub gateway_addr: Addr4,
    /// The node's own address on the uplink: host processes reach published ports on it, on
    /// 127.0.0.0/8 and on the gateway address.
    pub node_addr: Addr4,
    /// Container subnet base address.
    pub subnet_addr: Addr4,
    /// Container subnet mask, e.g. `[255,255,0,0]`.
    pub subnet_mask: Addr4,
}

impl Net4 {
    /// A v6-only node's IPv4 part: the "subnet" 0.0.0.0/32 and every address 0.0.0.0, which
    /// is a martian everywhere the datapath looks (it is dropped before any of these
    /// matter), so no IPv4 address is a container's, the gateway's or the node's. With no
    /// IPv4 endpoint, every IPv4 packet a container sends is `drop_spoof`; IPv4 from outside
    /// is the stack's.
    #[must_use]
    pub const fn none() -> Self {
        Self {
            snat_addr: [0; 4],
            gateway_addr: [0; 4],
            node_addr: [0; 4],
            subnet_addr: [0; 4],
            subnet_mask: [255; 4],
        }
    }
}

/// `node_addrs` hash map value, keyed by one of the node's own unicast IPv4 addresses
/// (`Addr4`; loopback and container-subnet addresses are not listed). Only
/// these (and `Net4::node_addr`) are DNAT destinations for packets from outside, as
/// iptables' `-m addrtype --dst-type LOCAL` allows: never a broadcast, multicast or 127/8
/// address, whatever the FIB says.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NodeAddr {
    /// ifindex of the interface that holds the address in the node's namespace.
    pub ifindex: u32,
}

/// Endpoint flag: the entry is a container attached to this node.
pub const EP_CONTAINER: u32 = 1 << 0;

/// `endpoints` hash map value, keyed by the container's IPv4 address (`Addr4`); also the
/// `endpoints6` value, keyed by its IPv6 address (`Addr6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Endpoint {
    /// ifindex of the container's host-side veth in the node's namespace.
    pub ifindex: u32,
    /// `EP_*` bits.
    pub flags: u32,
    /// MAC address of the container's `eth0`.
    pub mac: [u8; 6],
    /// MAC address of the host-side veth; ARP for the gateway is answered with it.
    pub host_mac: [u8; 6],
}
