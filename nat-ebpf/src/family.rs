//! The address-family seam of the datapath: what differs between IPv4 and IPv6 under the
//! family-neutral code (conntrack, TCP tracking, NAT, next hops, forwarding): which maps hold
//! a family's connections, how an address is rewritten (IPv4 has a header checksum, IPv6 has
//! none), the hop limit, the FIB lookup's address fields and the checksum's pseudo-header.

use aya_ebpf::bindings::bpf_fib_lookup as FibParams;
use nat_common::{
    Addr4, Addr6, CFG_STATIC_NAT, Config, CtEntry, CtKey, Endpoint, Family, FragKey4, FragKey6,
    FragPorts, Port, PortKey6, PortTarget, Reason, StaticNat, csum_fold32, trail_map,
};
use network_types::ip::Ipv4Hdr;

use crate::{
    addr, explain, ipv6,
    lookup::{container_at, published_port, static_nat},
    maps::{
        CONNTRACK, CONNTRACK_NEW, CONNTRACK6, CONNTRACK6_NEW, FRAGS, FRAGS6, NODE_ADDRS6, PORTS6,
        SCRATCH, SCRATCH6, STATIC_NAT6,
    },
    parse::{
        self, IP_CSUM_OFF, IP_DST_OFF, IP_OFF, IP_SRC_OFF, IP_TTL_OFF, IP6_LEN, Ip, Ip6Hdr, ptr_at,
    },
    pkt::Pkt,
    words::{self, words},
};

/// The family-specific operations, implemented for `Addr4` and `Addr6`.
pub trait Fam: Family {
    /// Offsets of the source and destination address from the Ethernet header.
    const SRC_OFF: usize;
    const DST_OFF: usize;

    /// The connection table's entry for `k`: assured (`conntrack*`) or not yet (`*_new`).
    fn ct_get(k: &CtKey<Self>, fresh: bool) -> Option<*mut CtEntry<Self>>;
    fn ct_insert(k: &CtKey<Self>, v: &CtEntry<Self>, fresh: bool, flags: u64) -> bool;
    fn ct_remove(k: &CtKey<Self>, fresh: bool);
    /// The per-CPU scratch slot `i` for an entry being built.
    fn scratch(i: u32) -> Option<*mut CtEntry<Self>>;

    /// Write `new` over the address at `off` (was `old`) with the checksums that cover it;
    /// `l4`: the L4 checksum's offset and whether it covers the pseudo-header, with the
    /// `bpf_l4_csum_replace` flags to use.
    fn set_addr(
        ctx: &impl Pkt,
        off: usize,
        old: &Self,
        new: &Self,
        l4: Option<(usize, bool)>,
        flags: u64,
    ) -> Result<(), Reason>;
    /// Decrement the TTL or hop limit.
    fn dec_ttl(ctx: &impl Pkt, p: &mut Ip<Self>) -> Result<(), Reason>;
    /// Fill the FIB lookup's family and addresses.
    fn fib_addrs(f: &mut FibParams, p: &Ip<Self>);
    /// The sum of the L4 pseudo-header for `len` bytes of `proto`, as `bpf_csum_diff` would
    /// sum it (ones' complement, folded to 32 bits), in a few adds instead of a helper call.
    fn pseudo_sum(p: &Ip<Self>, len: u32) -> u32;
    /// The container at `addr`, if any (only addresses in the family's subnet are looked up).
    fn container_at(cfg: &Config, addr: &Self) -> Option<Endpoint>;
    /// Whether the IP header's checksum holds (IPv6 has none).
    fn header_ok(ctx: &impl Pkt, p: &Ip<Self>) -> bool;
    /// Whether an ICMP type of the family is an error that quotes a packet (destination
    /// unreachable, packet too big, time exceeded, parameter problem).
    fn is_icmp_error(icmp_type: u8) -> bool;
    /// The packet header an ICMP error quotes at `ip_off`: its addresses, upper-layer
    /// protocol and length, if it is one the datapath can translate.
    fn quoted(ctx: &impl Pkt, ip_off: usize) -> Option<(Self, Self, u8, usize)>;
    /// The mapping for host port `port` (network order) of `proto` on the node address
    /// `dst`: one bound to that address first, then one bound to every address of the
    /// family. Whether `dst` is the node's is `is_node_addr`'s question.
    fn port_target(dst: &Self, port: Port, proto: u8) -> Option<PortTarget<Self>>;
    /// One of the node's own unicast addresses (as userspace keeps them).
    fn is_node_addr(cfg: &Config, a: &Self) -> bool;
    /// The static 1:1 NAT entry for `a`, if any (no lookup while no mapping exists).
    fn static_nat(cfg: &Config, a: &Self) -> Option<StaticNat<Self>>;
    /// The fragment table entry of `p`'s datagram (`frag.rs`).
    fn frags_get(p: &Ip<Self>) -> Option<*mut FragPorts>;
    fn frags_insert(p: &Ip<Self>, v: &FragPorts);
    fn frags_remove(p: &Ip<Self>);
    /// Rewrite the quoted address at `ip_off + field` and the checksum that covers it: the
    /// quoted IPv4 header's own, or (IPv6 has none) the ICMPv6 checksum at `icmp_csum_off`.
    fn set_quoted_addr(
        ctx: &impl Pkt,
        ip_off: usize,
        field: usize,
        old: &Self,
        new: &Self,
        icmp_csum_off: usize,
    ) -> Result<(), Reason>;
}

/// ICMP error types.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// ICMPv6 error types (RFC 4443): 1 destination unreachable, 2 packet too big, 3 time
/// exceeded, 4 parameter problem.
const ICMPV6_ERRORS: core::ops::RangeInclusive<u8> = 1..=4;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The map operations of `Fam` for one family: its two connection tables, its scratch
/// slots and its fragment table (keyed by `$frag_key`), with their `trail_map` ids. The
/// `explain` build records them and commits nothing (`explain.rs`).
macro_rules! family_maps {
    ($ct:ident, $ct_new:ident, $scratch:ident, $frags:ident, $frag_key:ident,
     $ct_id:expr, $ct_new_id:expr, $frags_id:expr) => {
        #[inline(always)]
        fn ct_get(k: &CtKey<Self>, fresh: bool) -> Option<*mut CtEntry<Self>> {
            if fresh {
                explain::found_ptr($ct_new_id, k, $ct_new.get_ptr_mut(k))
            } else {
                explain::found_ptr($ct_id, k, $ct.get_ptr_mut(k))
            }
        }

        #[cfg(not(feature = "explain"))]
        #[inline(always)]
        fn ct_insert(k: &CtKey<Self>, v: &CtEntry<Self>, fresh: bool, flags: u64) -> bool {
            if fresh {
                $ct_new.insert(k, v, flags).is_ok()
            } else {
                $ct.insert(k, v, flags).is_ok()
            }
        }

        /// What the insert would do: `BPF_NOEXIST` fails where the key is taken.
        #[cfg(feature = "explain")]
        #[inline(always)]
        fn ct_insert(k: &CtKey<Self>, v: &CtEntry<Self>, fresh: bool, flags: u64) -> bool {
            let (id, taken) = if fresh {
                ($ct_new_id, $ct_new.get_ptr(k).is_some())
            } else {
                ($ct_id, $ct.get_ptr(k).is_some())
            };
            let ok = flags != u64::from(aya_ebpf::bindings::BPF_NOEXIST) || !taken;
            explain::insert(id, k, v, ok);
            ok
        }

        #[cfg(not(feature = "explain"))]
        #[inline(always)]
        fn ct_remove(k: &CtKey<Self>, fresh: bool) {
            let _ = if fresh {
                $ct_new.remove(k)
            } else {
                $ct.remove(k)
            };
        }

        #[cfg(feature = "explain")]
        #[inline(always)]
        fn ct_remove(k: &CtKey<Self>, fresh: bool) {
            let (id, present) = if fresh {
                ($ct_new_id, $ct_new.get_ptr(k).is_some())
            } else {
                ($ct_id, $ct.get_ptr(k).is_some())
            };
            explain::remove(id, k, present);
        }

        #[inline(always)]
        fn scratch(i: u32) -> Option<*mut CtEntry<Self>> {
            $scratch.get_ptr_mut(i)
        }

        #[inline(always)]
        fn frags_get(p: &Ip<Self>) -> Option<*mut FragPorts> {
            let k = $frag_key(p);
            explain::found_ptr($frags_id, &k, $frags.get_ptr_mut(&k))
        }

        #[inline(always)]
        fn frags_insert(p: &Ip<Self>, v: &FragPorts) {
            #[cfg(not(feature = "explain"))]
            let _ = $frags.insert(&$frag_key(p), v, u64::from(aya_ebpf::bindings::BPF_ANY));
            #[cfg(feature = "explain")]
            explain::insert($frags_id, &$frag_key(p), v, true);
        }

        #[inline(always)]
        fn frags_remove(p: &Ip<Self>) {
            #[cfg(not(feature = "explain"))]
            let _ = $frags.remove(&$frag_key(p));
            #[cfg(feature = "explain")]
            explain::remove($frags_id, &$frag_key(p), true);
        }
    };
}

impl Fam for Addr4 {
    const SRC_OFF: usize = IP_SRC_OFF;
    const DST_OFF: usize = IP_DST_OFF;

    family_maps!(
        CONNTRACK,
        CONNTRACK_NEW,
        SCRATCH,
        FRAGS,
        frag_key4,
        trail_map::CONNTRACK,
        trail_map::CONNTRACK_NEW,
        trail_map::FRAGS
    );

    #[inline(always)]
    fn set_addr(
        ctx: &impl Pkt,
        off: usize,
        old: &Self,
        new: &Self,
        l4: Option<(usize, bool)>,
        flags: u64,
    ) -> Result<(), Reason> {
        let (o, n) = (u32::from_ne_bytes(*old), u32::from_ne_bytes(*new));
        if let Some((csum_off, true)) = l4 {
            ctx.csum_l4(csum_off, o, n, flags | 4)?;
        }
        ctx.csum_l3(IP_CSUM_OFF, o, n, 4)?;
        ctx.put(off, new)
    }

    #[inline(always)]
    fn dec_ttl(ctx: &impl Pkt, p: &mut Ip<Self>) -> Result<(), Reason> {
        let old = u32::from(u16::from_ne_bytes([p.ttl, p.proto]));
        let ttl = p.ttl.wrapping_sub(1);
        let new = u32::from(u16::from_ne_bytes([ttl, p.proto]));
        ctx.csum_l3(IP_CSUM_OFF, old, new, 2)?;
        ctx.put(IP_TTL_OFF, &ttl)?;
        p.ttl = ttl;
        Ok(())
    }

    #[inline(always)]
    fn fib_addrs(f: &mut FibParams, p: &Ip<Self>) {
        f.family = AF_INET;
        f.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(p.src);
        f.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(p.dst);
    }

    #[inline(always)]
    fn pseudo_sum(p: &Ip<Self>, len: u32) -> u32 {
        // Summed here rather than by `bpf_csum_diff`: three words cost less than a call.
        csum_fold32(
            u64::from(u32::from_ne_bytes(p.src))
                + u64::from(u32::from_ne_bytes(p.dst))
                + u64::from(u32::from_ne_bytes([
                    0,
                    p.proto,
                    (len >> 8) as u8,
                    len as u8,
                ])),
        )
    }

    #[inline(always)]
    fn container_at(cfg: &Config, addr: &Self) -> Option<Endpoint> {
        container_at(cfg, addr)
    }

    #[inline(always)]
    fn header_ok(ctx: &impl Pkt, p: &Ip<Self>) -> bool {
        parse::ipv4_csum_ok(ctx, p)
    }

    #[inline(always)]
    fn port_target(dst: &Self, port: Port, proto: u8) -> Option<PortTarget<Self>> {
        published_port(*dst, port, proto)
    }

    #[inline(always)]
    fn is_node_addr(cfg: &Config, a: &Self) -> bool {
        addr::is_node_addr(cfg, a)
    }

    #[inline(always)]
    fn static_nat(cfg: &Config, a: &Self) -> Option<StaticNat<Self>> {
        static_nat(cfg, a)
    }

    #[inline(always)]
    fn is_icmp_error(icmp_type: u8) -> bool {
        matches!(
            icmp_type,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
        )
    }

    #[inline(always)]
    fn quoted(ctx: &impl Pkt, ip_off: usize) -> Option<(Self, Self, u8, usize)> {
        let ip = ptr_at::<Ipv4Hdr>(ctx, ip_off)?;
        // SAFETY: bounds checked by `ptr_at`.
        let h = unsafe { *ip };
        let ihl = usize::from(h.vihl & 0x0f) * 4;
        (ihl >= Ipv4Hdr::LEN).then_some((h.src_addr, h.dst_addr, h.proto, ihl))
    }

    #[inline(always)]
    fn set_quoted_addr(
        ctx: &impl Pkt,
        ip_off: usize,
        field: usize,
        old: &Self,
        new: &Self,
        _: usize,
    ) -> Result<(), Reason> {
        let (o, n) = (u32::from_ne_bytes(*old), u32::from_ne_bytes(*new));
        ctx.csum_l3(ip_off + 10, o, n, 4)?;
        ctx.put(ip_off + field, new)
    }
}

/// The `frags` key of `p`'s datagram.
#[inline(always)]
fn frag_key4(p: &Ip<Addr4>) -> FragKey4 {
    FragKey4 {
        src_addr: p.src,
        dst_addr: p.dst,
        id: [p.id[0], p.id[1]],
        proto: p.proto,
        _pad: 0,
    }
}

/// The `frags6` key of `p`'s datagram.
#[inline(always)]
fn frag_key6(p: &Ip<Addr6>) -> FragKey6 {
    FragKey6 {
        src_addr: p.src,
        dst_addr: p.dst,
        id: p.id,
        proto: p.proto,
        _pad: [0; 3],
    }
}

/// Offset of the IPv6 hop limit.
const HOP_LIMIT_OFF: usize = IP_OFF + 7;

impl Fam for Addr6 {
    const SRC_OFF: usize = IP_OFF + 8;
    const DST_OFF: usize = IP_OFF + 24;

    family_maps!(
        CONNTRACK6,
        CONNTRACK6_NEW,
        SCRATCH6,
        FRAGS6,
        frag_key6,
        trail_map::CONNTRACK6,
        trail_map::CONNTRACK6_NEW,
        trail_map::FRAGS6
    );

    /// IPv6 has no header checksum; the L4 one (ICMPv6's included) covers both addresses
    /// through the pseudo-header, updated by the difference of the two 16-byte values.
    #[inline(always)]
    fn set_addr(
        ctx: &impl Pkt,
        off: usize,
        old: &Self,
        new: &Self,
        l4: Option<(usize, bool)>,
        flags: u64,
    ) -> Result<(), Reason> {
        if let Some((csum_off, true)) = l4 {
            ctx.csum_l4_diff(csum_off, words::csum_diff(old, new), flags)?;
        }
        ctx.put(off, new)
    }

    #[inline(always)]
    fn dec_ttl(ctx: &impl Pkt, p: &mut Ip<Self>) -> Result<(), Reason> {
        let hl = p.ttl.wrapping_sub(1);
        ctx.put(HOP_LIMIT_OFF, &hl)?;
        p.ttl = hl;
        Ok(())
    }

    #[inline(always)]
    fn fib_addrs(f: &mut FibParams, p: &Ip<Self>) {
        f.family = AF_INET6;
        f.__bindgen_anon_3.ipv6_src = words(&p.src);
        f.__bindgen_anon_4.ipv6_dst = words(&p.dst);
    }

    #[inline(always)]
    fn pseudo_sum(p: &Ip<Self>, len: u32) -> u32 {
        let (s, d) = (words(&p.src), words(&p.dst));
        let mut sum = u64::from(len.to_be()) + u64::from(u32::from(p.proto).to_be());
        for i in 0..4 {
            sum += u64::from(s[i]) + u64::from(d[i]);
        }
        csum_fold32(sum)
    }

    #[inline(always)]
    fn container_at(cfg: &Config, addr: &Self) -> Option<Endpoint> {
        ipv6::container_at(cfg, addr)
    }

    #[inline(always)]
    fn header_ok(_: &impl Pkt, _: &Ip<Self>) -> bool {
        true
    }

    #[inline(always)]
    fn is_icmp_error(icmp_type: u8) -> bool {
        ICMPV6_ERRORS.contains(&icmp_type)
    }

    #[inline(always)]
    fn port_target(dst: &Self, port: Port, proto: u8) -> Option<PortTarget<Self>> {
        let mut key = PortKey6 {
            host_addr: *dst,
            host_port: port,
            proto,
            _pad: 0,
        };
        // SAFETY: the value is copied out at once.
        if let Some(t) = explain::found(trail_map::PORTS6, &key, unsafe { PORTS6.get(&key) }) {
            // A volatile read: copied out as loads, not merged with the caller's copy into
            // a `memmove` between two map values (a byte loop on the BPF target).
            // SAFETY: `t` is a live map value.
            return Some(unsafe { core::ptr::read_volatile(t) });
        }
        // Word by word: `= [0; 16]` became a call to `memset`, a byte loop on the BPF
        // target. SAFETY: the key is 4-aligned (`PortKey`), the address its first field.
        unsafe { crate::pkt::zero(&raw mut key.host_addr) };
        // SAFETY: as above.
        explain::found(trail_map::PORTS6, &key, unsafe { PORTS6.get(&key) })
            // SAFETY: as above.
            .map(|t| unsafe { core::ptr::read_volatile(t) })
    }

    #[inline(always)]
    fn is_node_addr(_: &Config, a: &Self) -> bool {
        // SAFETY: the value is copied out at once.
        explain::found(trail_map::NODE_ADDRS6, a, unsafe { NODE_ADDRS6.get(a) }).is_some()
    }

    #[inline(always)]
    fn static_nat(cfg: &Config, a: &Self) -> Option<StaticNat<Self>> {
        if cfg.flags & CFG_STATIC_NAT == 0 {
            return None;
        }
        // SAFETY: the value is copied out at once.
        explain::found(trail_map::STATIC_NAT6, a, unsafe { STATIC_NAT6.get(a) }).copied()
    }

    /// Only a quoted packet whose upper-layer header follows the fixed header: one with
    /// extension headers is not translated (and its error goes to the stack).
    #[inline(always)]
    fn quoted(ctx: &impl Pkt, ip_off: usize) -> Option<(Self, Self, u8, usize)> {
        let ip = ptr_at::<Ip6Hdr>(ctx, ip_off)?;
        // SAFETY: bounds checked by `ptr_at`; fields read in place.
        let h = unsafe { &*ip };
        Some((h.src, h.dst, h.next_hdr, IP6_LEN))
    }

    #[inline(always)]
    fn set_quoted_addr(
        ctx: &impl Pkt,
        ip_off: usize,
        field: usize,
        old: &Self,
        new: &Self,
        icmp_csum_off: usize,
    ) -> Result<(), Reason> {
        // Part of the message, not of the pseudo-header.
        ctx.csum_l4_diff(icmp_csum_off, words::csum_diff(old, new), 0)?;
        ctx.put(ip_off + field, new)
    }
}
