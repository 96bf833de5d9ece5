//! Address classes that decide what may be translated at all: martians (never on the wire),
//! broadcast and multicast (never translated or forwarded), and the node's own unicast
//! addresses (the only destinations a packet from outside is DNATed from), as Linux's martian
//! rules, rp_filter and iptables' `addrtype LOCAL` decide them.

use nat_common::{Addr4, Config};

use crate::{maps::NODE_ADDRS, parse::in_subnet};

/// 0.0.0.0/8 ("this network") and 127.0.0.0/8: Linux drops them as martians when they
/// arrive on an interface other than `lo` (without `route_localnet`).
#[inline(always)]
pub fn is_martian(a: Addr4) -> bool {
    a[0] == 0 || a[0] == 127
}

/// 224.0.0.0/4 multicast, 240.0.0.0/4 (reserved) and the limited broadcast 255.255.255.255.
#[inline(always)]
pub fn is_group(a: Addr4) -> bool {
    a[0] >= 224
}

/// One of the node's own unicast addresses (the uplink's, or another interface's, as
/// userspace keeps them in `node_addrs`).
#[inline(always)]
pub fn is_node_addr(cfg: &Config, a: &Addr4) -> bool {
    // SAFETY: the value is copied out at once.
    *a == cfg.v4.node_addr
        || crate::explain::found(nat_common::trail_map::NODE_ADDRS, a, unsafe {
            NODE_ADDRS.get(a)
        })
        .is_some()
}

/// A source address no packet from outside may carry: a martian, a group address, the
/// container subnet (the gateway included), or the node's uplink address. (The node's other
/// addresses are checked where state would be created: `is_node_addr`.)
#[inline(always)]
pub fn forged_outside_src(cfg: &Config, a: Addr4) -> bool {
    is_martian(a)
        || is_group(a)
        || a == cfg.v4.node_addr
        || in_subnet(a, cfg.v4.subnet_addr, cfg.v4.subnet_mask)
}
