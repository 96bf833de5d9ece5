//! The datapath's lookups, shared by the TC, XDP and socket programs: the node's settings,
//! endpoints, containers, static NAT and published ports. Each hides its map and the cheap
//! checks that let most packets skip it.

use nat_common::{
    Addr4, CFG_STATIC_NAT, Config, Endpoint, PROTO_TCP, PROTO_UDP, Port, PortKey4, PortTarget4,
    Reason, StaticNat4, trail_map,
};

use crate::{
    explain,
    maps::{CLUSTER_NETS, CONFIG, ENDPOINTS, PORTS, STATIC_NAT},
    parse::{self, Ip4},
};

/// The node's settings, read in place (a copy would cost stack the port search needs).
#[inline(always)]
pub fn config() -> Result<&'static Config, Reason> {
    match CONFIG.get(0) {
        Some(c) if c.uplink_ifindex != 0 => Ok(c),
        _ => Err(Reason::DropNoConfig),
    }
}

/// The endpoint (container) at `addr`, if any.
#[inline(always)]
pub fn endpoint(addr: &Addr4) -> Option<Endpoint> {
    // SAFETY: the value is copied out at once.
    explain::found(trail_map::ENDPOINTS, addr, unsafe { ENDPOINTS.get(addr) }).copied()
}

/// The static NAT entry for `addr`, if any. Skips the lookup while no mapping exists.
#[inline(always)]
pub fn static_nat(cfg: &Config, addr: &Addr4) -> Option<StaticNat4> {
    if cfg.flags & CFG_STATIC_NAT == 0 {
        return None;
    }
    // SAFETY: the value is copied out at once.
    explain::found(trail_map::STATIC_NAT, addr, unsafe { STATIC_NAT.get(addr) }).copied()
}

/// The `NET_*` flags of the cluster prefix `addr` falls in (0 outside the cluster, and on a
/// node that is not in one).
#[inline(always)]
pub fn cluster_flags(addr: &Addr4) -> u32 {
    let key = aya_ebpf::btf_maps::lpm_trie::Key::new(32, *addr);
    explain::found(trail_map::CLUSTER_NETS, &key, CLUSTER_NETS.get(&key)).map_or(0, |n| n.flags)
}

/// The container at `addr`, if any. Addresses outside the subnet skip the map lookup: that is
/// every packet leaving for the outside.
#[inline(always)]
pub fn container_at(cfg: &Config, addr: &Addr4) -> Option<Endpoint> {
    if parse::in_subnet(*addr, cfg.v4.subnet_addr, cfg.v4.subnet_mask) {
        endpoint(addr)
    } else {
        None
    }
}

/// The mapping for host port `port` (network order) of protocol `proto` on the node address
/// `dst`: one bound to that address first, then one bound to every node address. Whether
/// `dst` is the node's is the caller's check.
#[inline(always)]
pub fn published_port(dst: Addr4, port: Port, proto: u8) -> Option<PortTarget4> {
    let mut key = PortKey4 {
        host_addr: dst,
        host_port: port,
        proto,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    if let Some(t) = explain::found(trail_map::PORTS, &key, unsafe { PORTS.get(&key) }) {
        return Some(*t);
    }
    key.host_addr = [0; 4];
    // SAFETY: as above.
    explain::found(trail_map::PORTS, &key, unsafe { PORTS.get(&key) }).copied()
}

/// The mapping for `p`'s destination port (TCP and UDP with their header only).
#[inline(always)]
pub fn port_target(p: &Ip4) -> Option<PortTarget4> {
    if (p.proto != PROTO_TCP && p.proto != PROTO_UDP) || !p.l4_present {
        return None;
    }
    published_port(p.dst, p.dport, p.proto)
}
