//! IPv6 on a node with an IPv6 subnet (`up --subnet6`): the Neighbour Discovery responder
//! (IPv6's ARP: Neighbour Solicitations for the gateway and for other containers are
//! answered here, so all traffic reaches this program as unicast), anti-spoofing, F1
//! (container to container by an endpoint lookup, straight into the peer's namespace) and F2
//! (MASQUERADE as NAT66, on the same conntrack code as IPv4's, in the `conntrack6` tables).
//! Traffic to the node itself goes to the stack; traffic that would leave untranslated (no
//! address to masquerade with, a protocol or extension header NAT66 does not handle) is
//! dropped, never leaked. On the uplink, replies of masqueraded connections are translated
//! back; any other packet for the subnet from outside is dropped (containers are unreachable
//! from outside, as over IPv4). Without an IPv6 subnet, IPv6 is the stack's business.

use core::mem::{MaybeUninit, align_of, size_of};

use aya_ebpf::{helpers::bpf_redirect_peer, programs::TcContext};
use nat_common::{
    Addr6, CFG_MASQUERADE, CFG_STATIC_NAT, Config, CtEntry6, CtKey6, Endpoint, PROTO_ICMPV6,
    PROTO_TCP, PROTO_UDP, PortTarget6, Reason, STATIC_EXTERNAL, STATIC_INTERNAL, WORK6_LEN,
};

use crate::{
    TC_ACT_OK,
    conntrack::{self, now},
    family::Fam as _,
    forward::{self, set_macs},
    frag, icmp,
    ingress::{ifindex, tracked, valid_for_state},
    lookup::config,
    maps::{ENDPOINTS6, WORK6},
    monitor, nat, nd,
    nexthop::{self, NextHop},
    parse::{self, ETH_LEN, IP6_LEN, Ip6, Ip6Hdr, ptr_at},
    pkt::Pkt,
    stats::count,
    verdict, words,
};

pub const NEXT_ICMPV6: u8 = PROTO_ICMPV6;
/// Where the ICMPv6 header starts (no extension headers).
pub const L4_OFF: usize = ETH_LEN + IP6_LEN;

#[inline(always)]
pub fn pass(ctx: &TcContext) -> Result<i32, Reason> {
    count(Reason::Pass, ctx.len());
    Ok(TC_ACT_OK)
}

#[inline(always)]
pub fn endpoint6(addr: &Addr6) -> Option<Endpoint> {
    // SAFETY: the value is copied out at once.
    crate::explain::found(nat_common::trail_map::ENDPOINTS6, addr, unsafe {
        ENDPOINTS6.get(addr)
    })
    .copied()
}

/// The container at `addr`, if any (only addresses in the subnet are looked up).
#[inline(always)]
pub fn container_at(cfg: &Config, addr: &Addr6) -> Option<Endpoint> {
    if in_subnet6(cfg, addr) {
        endpoint6(addr)
    } else {
        None
    }
}

/// Whether `a` lies in the node's IPv6 subnet.
#[inline(always)]
fn in_subnet6(cfg: &Config, a: &Addr6) -> bool {
    let n = &cfg.v6;
    let bits = n.prefix_len as usize;
    if bits == 0 || bits > 128 {
        return false;
    }
    let mut i = 0;
    while i < 16 {
        let left = bits.saturating_sub(i * 8);
        let mask: u8 = if left >= 8 { 0xff } else { !(0xffu8 >> left) };
        if a[i] & mask != n.subnet_addr[i] & mask {
            return false;
        }
        i += 1;
    }
    true
}

/// Link-local (fe80::/10), unspecified (::) or multicast (ff00::/8): Neighbour Discovery,
/// duplicate address detection, router solicitation, MLD — the stack's, which answers them
/// as Linux does.
#[inline(always)]
fn is_local_scope(a: &Addr6) -> bool {
    (a[0] == 0xfe && a[1] & 0xc0 == 0x80) || a[0] == 0xff || {
        let w = words::words(a);
        w[0] | w[1] | w[2] | w[3] == 0
    }
}

/// Everything a container sends over IPv6 (`tc_container` hands it over). The stack is the
/// scarce thing here: a tuple is 40 bytes, so the parsed packet and its tuple live in the
/// per-CPU `work6` map, and each branch that needs much stack is a function of its own
/// whose frame is never stacked on another's.
#[inline(never)]
pub fn from_container(ctx: &TcContext) -> i32 {
    verdict(ctx, dispatch(ctx))
}

#[inline(always)]
fn dispatch(ctx: &TcContext) -> Result<i32, Reason> {
    let cfg = config()?;
    if cfg.v6.prefix_len == 0 {
        return pass(ctx);
    }
    let ifindex = ifindex(ctx);
    let (_, eth_src) = parse::l3(ctx).ok_or(Reason::DropTruncated)?;
    let ip = ptr_at::<Ip6Hdr>(ctx, ETH_LEN).ok_or(Reason::DropTruncated)?;
    // SAFETY: bounds checked by `ptr_at`. The addresses are read in place (copies would
    // cost the frame that the branches below stack theirs on); nothing here changes the
    // packet before they are last used.
    let (next_hdr, src, dst) = unsafe { ((*ip).next_hdr, &(*ip).src, &(*ip).dst) };
    if next_hdr == NEXT_ICMPV6
        && !is_local_scope(src)
        && let Some(nd) = ptr_at::<[u8; 1]>(ctx, L4_OFF)
        // SAFETY: bounds checked by `ptr_at`.
        && unsafe { (*nd)[0] } == nd::ND_SOLICIT
    {
        return Ok(nd::solicitation(ctx));
    }
    if is_local_scope(src) {
        // Link-local or unspecified sources (DAD, router solicitation, MLD): the stack's.
        return pass(ctx);
    }
    // Beyond the subnet: most packets belong to a connection, whose entry vouches for the
    // sender (its veth, MAC and tuple) at the price of the lookup the packet needs anyway.
    let outside = !is_local_scope(dst) && !in_subnet6(cfg, dst);
    let mut missed = false;
    if outside {
        match owned_connection(ctx, ifindex, eth_src) {
            GO_ON => {}
            MISSED => missed = true,
            action => return Ok(action),
        }
    }
    // Read again: the verifier forgets packet pointers across a call that could have moved
    // the packet.
    let ip = ptr_at::<Ip6Hdr>(ctx, ETH_LEN).ok_or(Reason::DropTruncated)?;
    // SAFETY: as above.
    let (src, dst) = unsafe { (&(*ip).src, &(*ip).dst) };
    // A global source must be the sender's own, whatever the destination (a multicast
    // Neighbour Advertisement claiming another container's address included).
    let me = endpoint6(src).ok_or(Reason::DropSpoof)?;
    if me.ifindex != ifindex || me.mac != eth_src {
        return Err(Reason::DropSpoof);
    }
    if is_local_scope(dst) {
        return pass(ctx);
    }
    if in_subnet6(cfg, dst) && *dst != cfg.v6.gateway_addr {
        // F1: one flat L2 segment, as on a bridge: no hop limit change.
        let peer = endpoint6(dst).ok_or(Reason::DropNoEndpoint)?;
        set_macs(ctx, peer.mac, peer.host_mac)?;
        count(Reason::Forward, ctx.len());
        let d = monitor::traced_as_is(Reason::Forward, peer.ifindex);
        crate::explain::redirect(peer.ifindex, nat_common::REDIRECT_PEER);
        // SAFETY: plain helper call.
        let action = unsafe { bpf_redirect_peer(peer.ifindex, 0) } as i32;
        return Ok(action | monitor::tc_mark(d));
    }
    // Beyond the subnet: a tracked connection's packet, or a new one for outside. The
    // source is the sender's own (checked above), so is any connection of this tuple.
    // For the gateway address: the node's (F6), unless it answers a hairpin connection,
    // whose source became the gateway.
    // The source is the sender's own: its first fragments may record ports.
    if outside {
        // Parsed by `owned_connection` already.
        frag::record(&work()?.p);
    } else {
        match parse(ctx, true) {
            GO_ON => {}
            action => return Ok(action),
        }
    }
    let w = work()?;
    let to_gateway = words::same(&w.p.dst, &cfg.v6.gateway_addr);
    if w.p.ttl <= 1 && !to_gateway {
        // Expiring here: the kernel answers it with Time Exceeded.
        return pass(ctx);
    }
    if icmp::is_error(&w.p) && !to_gateway {
        // About a packet the container received (F7): back to its sender, translated.
        match icmp_error(ctx, false) {
            GO_ON => {}
            action => return Ok(action),
        }
    }
    // `missed` leaves the tuple `owned_connection` looked up in `work6.key`: only trackable
    // packets are looked up, and an ICMP error (whose translation uses that slot) is not one.
    if !missed && let Some(e) = tracked_entry(w) {
        return Ok(tracked6(ctx, e));
    }
    if to_gateway {
        return pass(ctx);
    }
    if find_published() {
        // F5 over IPv6: a published port on a node address, possibly the sender's own. The
        // checksums first, in a frame of their own too.
        valid_for_state(ctx, &work()?.p)?;
        return Ok(hairpin(ctx));
    }
    // Three steps, each with a frame of its own: where it goes, the checksums, the new
    // connection.
    match leaves_by_uplink(ctx) {
        GO_ON => {}
        STATIC => return Ok(from_static(ctx)),
        action => return Ok(action),
    }
    valid_for_state(ctx, &work()?.p)?;
    Ok(masquerade(ctx, &me))
}

/// `owned_connection`'s answer that the packet's tuple is in neither conntrack table (it is
/// left in `work6.key`).
const MISSED: i32 = i32::MIN + 3;

/// The fast path for a packet leaving the subnet: parse it into `work6` and, if its
/// connection belongs to the container behind this veth and MAC, send it on as tracked.
/// `MISSED` when no connection has its tuple; `GO_ON` when the lookup does not apply (an
/// expiring or untrackable packet) or the connection is not this sender's: the caller checks
/// the sender and goes on (looking up again in the last case). First fragments record their
/// ports only once the sender is known (here, or in the caller).
#[inline(never)]
fn owned_connection(ctx: &TcContext, ifindex: u32, eth_src: [u8; 6]) -> i32 {
    match parse(ctx, false) {
        GO_ON => {}
        action => return action,
    }
    let Ok(w) = work() else {
        return GO_ON;
    };
    if w.p.ttl <= 1 || !w.p.is_trackable() {
        return GO_ON;
    }
    let Some(e) = tracked_entry(w) else {
        return MISSED;
    };
    // SAFETY: reads of a map value.
    if unsafe { (*e).meta.ifindex != ifindex || (*e).meta.mac != eth_src } {
        return GO_ON;
    }
    frag::record(&w.p);
    tracked6(ctx, e)
}

/// `leaves_by_uplink`'s answer that the sender has a static mapping (its external address
/// waits in `work6.peer`).
const STATIC: i32 = i32::MIN + 2;

/// A step's answer that the decision goes on in the caller (not a TC action).
pub const GO_ON: i32 = i32::MIN;

/// The packet being decided, its tuple, its next hop and the published port it is for
/// (`work6`).
#[repr(C)]
pub struct Work6 {
    pub p: Ip6,
    pub key: CtKey6,
    pub nh: NextHop,
    pub t: PortTarget6,
    /// The other side of a static 1:1 mapping of the packet's address.
    pub peer: Addr6,
}

const _: () = assert!(size_of::<Work6>() <= WORK6_LEN && align_of::<Work6>() <= 8);

/// Parse the packet into `work6` and match its fragments to their first one's ports
/// (`frag.rs`); `record`: the source may record a first fragment's. `GO_ON`, or the drop
/// (counted) of a malformed packet, as ip6_rcv would drop it. A step of its own: the walk of
/// the headers then costs the dispatchers' frames nothing.
#[inline(never)]
fn parse(ctx: &TcContext, record: bool) -> i32 {
    let r = parsed(ctx).map(|w| {
        // A fragment from one of the node's own addresses is forged: never recorded. (The
        // lookup only for fragments: `martian_outside_src` leaves it out.)
        let record =
            record && !(w.p.frag && config().is_ok_and(|cfg| Addr6::is_node_addr(cfg, &w.p.src)));
        if record {
            frag::follow(&mut w.p);
        } else {
            frag::resolve(&mut w.p);
        }
        GO_ON
    });
    verdict(ctx, r)
}

/// For XDP: whether the node has an IPv6 subnet and the packet parsed into `work6`. A step
/// of its own, as `parse` is for TC.
#[inline(never)]
pub fn parse_only(ctx: &impl Pkt) -> bool {
    config().is_ok_and(|cfg| cfg.v6.prefix_len != 0) && parsed(ctx).is_ok()
}

/// Parse the packet into this CPU's `work6` slot (TC or XDP).
#[inline(always)]
pub fn parsed(ctx: &impl Pkt) -> Result<&'static mut Work6, Reason> {
    let w = WORK6
        .get_ptr_mut(0)
        .ok_or(Reason::DropHelper)?
        .cast::<Work6>();
    // SAFETY: this CPU's slot: 8-byte aligned, large enough (asserted above), used by
    // nothing else while the program runs. `p` is written whole (by `parse::ipv6`) before
    // the slot is used as a `Work6`; `key` and `nh` are plain bytes and integers.
    unsafe {
        parse::ipv6(ctx, &mut *(&raw mut (*w).p).cast::<MaybeUninit<Ip6>>())?;
        Ok(&mut *w)
    }
}

/// The packet already parsed into `work6` by the caller.
#[inline(always)]
pub fn work() -> Result<&'static mut Work6, Reason> {
    let w = WORK6.get_ptr_mut(0).ok_or(Reason::DropHelper)?;
    // SAFETY: as in `parsed`, which filled it for this packet.
    Ok(unsafe { &mut *w.cast::<Work6>() })
}

/// The connection `w.p` belongs to, if it is tracked (its tuple left in `w.key`).
#[inline(always)]
fn tracked_entry(w: &mut Work6) -> Option<*mut CtEntry6> {
    if !w.p.is_trackable() {
        return None;
    }
    w.key = w.p.key();
    conntrack::lookup(&w.key)
}

/// An ICMPv6 error about a tracked connection (F7: Packet Too Big, which PMTU discovery
/// depends on, Time Exceeded, Destination Unreachable, Parameter Problem): translated in the
/// outer and the quoted headers and sent on. `GO_ON` when it is about no tracked connection.
/// `from_outside`: it arrived on the uplink. Two steps, each with a frame of its own.
#[inline(always)]
fn icmp_error(ctx: &TcContext, from_outside: bool) -> i32 {
    match translate_error(ctx, from_outside) {
        // Marked whether or not an event was drafted (`monitor::traced_icmp_error`).
        TRANSLATED => deliver(ctx) | monitor::tc_mark(true),
        action => action,
    }
}

/// `translate_error`'s answer that the error is translated and waits in `work6` to be sent.
const TRANSLATED: i32 = i32::MIN + 1;

#[inline(never)]
fn translate_error(ctx: &TcContext, from_outside: bool) -> i32 {
    let r = work().and_then(|w| {
        if from_outside && w.p.ttl <= 1 {
            return Err(Reason::DropTtl);
        }
        let translated = icmp::translate(ctx, &mut w.p, from_outside, &mut w.key)?;
        Ok(if translated { TRANSLATED } else { GO_ON })
    });
    verdict(ctx, r)
}

/// Send the translated packet in `work6` on: into a container when its new destination is
/// one, else towards the outside.
#[inline(never)]
fn deliver(ctx: &TcContext) -> i32 {
    let r = config().and_then(|cfg| {
        let w = work()?;
        match container_at(cfg, &w.p.dst) {
            Some(ep) => forward::to_endpoint(ctx, &mut w.p, &ep, true, Reason::Deliver),
            None => forward::route(ctx, &mut w.p, ifindex(ctx), None),
        }
    });
    verdict(ctx, r)
}

/// Whether the packet in `work6` is for a published port (TCP and UDP with their header) on
/// one of the node's own addresses (`node_addrs6`: never a multicast or loopback address,
/// whatever the FIB says); the mapping is left in `work6.t`. A step of its own: the lookup's
/// key and value would otherwise sit in the dispatcher's frame, under every other step's.
#[inline(never)]
fn find_published() -> bool {
    let (Ok(cfg), Ok(w)) = (config(), work()) else {
        return false;
    };
    let p = &w.p;
    // The address first: a new connection to the outside then costs one lookup, not two.
    if (p.proto != PROTO_TCP && p.proto != PROTO_UDP)
        || !p.l4_present
        || !Addr6::is_node_addr(cfg, &p.dst)
    {
        return false;
    }
    match Addr6::port_target(&p.dst, p.dport, p.proto) {
        Some(t) => {
            // SAFETY: a stack value into this CPU's `work6` (not `w.t = t`, which the
            // compiler made a `memmove` call, a byte loop on the BPF target).
            unsafe { core::ptr::copy_nonoverlapping(&raw const t, &raw mut w.t, 1) };
            true
        }
        None => false,
    }
}

/// A source no packet from outside may carry into a container: unspecified, loopback,
/// multicast, link-local (not routable back), the container subnet (the gateway included)
/// or one of the node's own addresses. Where state would be created.
#[inline(always)]
pub fn forged_outside_src(cfg: &Config, a: &Addr6) -> bool {
    martian_outside_src(cfg, a) || Addr6::is_node_addr(cfg, a)
}

/// `forged_outside_src` but for the node's own addresses, which take a lookup: what every
/// packet from outside is checked against. As over IPv4 (`addr::forged_outside_src`), the
/// node's addresses are checked where state would be created; a tracked packet needs its
/// connection's tuple, which no connection gives a node address from outside.
#[inline(always)]
pub fn martian_outside_src(cfg: &Config, a: &Addr6) -> bool {
    let w = words::words(a);
    let loopback = w[0] | w[1] | w[2] == 0 && w[3] == 1u32.to_be();
    is_local_scope(a) || loopback || in_subnet6(cfg, a)
}

/// F3 over IPv6: a client outside opens a connection to the published port in `work6.t`;
/// its address is kept (DNAT only).
#[inline(never)]
fn dnat(ctx: &TcContext) -> i32 {
    verdict(ctx, dnat_new(ctx))
}

#[inline(always)]
fn dnat_new(ctx: &TcContext) -> Result<i32, Reason> {
    let cfg = config()?;
    let w = work()?;
    if forged_outside_src(cfg, &w.p.src) {
        return Err(Reason::DropMartian);
    }
    let ep = endpoint6(&w.t.addr).ok_or(Reason::DropNoEndpoint)?;
    if w.p.ttl <= 1 {
        return Err(Reason::DropTtl);
    }
    valid_for_state(ctx, &w.p)?;
    let e = conntrack::create_dnat(ctx, &w.p, (&w.key, false), &w.t, cfg, &ep, now())?;
    let d = monitor::traced(Reason::DnatNew, &w.p, e, ep.ifindex);
    count(Reason::DnatNew, ctx.len());
    nat::apply(ctx, &mut w.p, e)?;
    Ok(forward::to_endpoint(ctx, &mut w.p, &ep, true, Reason::Deliver)? | monitor::tc_mark(d))
}

/// F5 over IPv6: a container reaches the published port in `work6.t` on a node address.
/// The source becomes the IPv6 gateway, so that the answer comes back through here.
#[inline(never)]
fn hairpin(ctx: &TcContext) -> i32 {
    verdict(ctx, hairpin_new(ctx))
}

#[inline(always)]
fn hairpin_new(ctx: &TcContext) -> Result<i32, Reason> {
    let cfg = config()?;
    let w = work()?;
    let target = endpoint6(&w.t.addr).ok_or(Reason::DropNoEndpoint)?;
    let gw = cfg.v6.gateway_addr;
    let e = conntrack::create_hairpin(ctx, &w.p, (&w.key, gw), &w.t, cfg, &target, now())?;
    let d = monitor::traced(Reason::HairpinNew, &w.p, e, target.ifindex);
    nat::apply(ctx, &mut w.p, e)?;
    count(Reason::HairpinNew, ctx.len());
    Ok(forward::to_endpoint(ctx, &mut w.p, &target, true, Reason::Deliver)? | monitor::tc_mark(d))
}

/// A packet of a tracked IPv6 connection, either way (`ingress::tracked`).
#[inline(never)]
fn tracked6(ctx: &TcContext, e: *mut CtEntry6) -> i32 {
    let r = config().and_then(|cfg| tracked(ctx, cfg, &mut work()?.p, ifindex(ctx), e));
    verdict(ctx, r)
}

/// A new packet for outside: what the FIB does not send out by the uplink is the stack's
/// (any TC action), and so is one NAT66 cannot translate; `GO_ON` to masquerade the rest,
/// with the next hop left in `work6`.
#[inline(never)]
fn leaves_by_uplink(ctx: &TcContext) -> i32 {
    verdict(ctx, route_out(ctx))
}

#[inline(always)]
fn route_out(ctx: &TcContext) -> Result<i32, Reason> {
    let cfg = config()?;
    let w = work()?;
    w.nh = nexthop::fib(ctx, &w.p, ifindex(ctx));
    let nh = &w.nh;
    if !(nh.forwards() && nh.ifindex == cfg.uplink_ifindex) {
        return pass(ctx);
    }
    if nh.rc == nexthop::FRAG_NEEDED {
        // Untranslated, so that the kernel's Packet Too Big reaches the container.
        count(Reason::MtuExceeded, ctx.len());
        return Ok(TC_ACT_OK);
    }
    if let Some(s) = Addr6::static_nat(cfg, &w.p.src)
        && s.kind == STATIC_INTERNAL
    {
        // F8: the container's own external address, for every protocol.
        w.peer = s.peer;
        return Ok(STATIC);
    }
    if cfg.flags & CFG_MASQUERADE == 0 {
        return pass(ctx);
    }
    if cfg.v6.snat_addr == [0; 16] {
        // No global address to masquerade with (yet).
        return Err(Reason::DropIpv6Out);
    }
    if w.p.bad_ext {
        return Err(Reason::DropIpv6Ext);
    }
    if w.p.frag && !w.p.l4_present && !w.p.ports_known {
        // A later fragment of a datagram whose first fragment was not seen.
        return Err(Reason::DropFragment);
    }
    if !w.p.is_trackable() {
        // Another protocol, or ESP, AH or an unknown header: never leaked untranslated.
        return Err(Reason::DropUnsupported);
    }
    Ok(GO_ON)
}

/// F8 over IPv6, outbound: the packet in `work6` leaves with its sender's external address
/// (`work6.peer`) by the next hop `route_out` left there; an ICMPv6 error quotes that address.
#[inline(never)]
fn from_static(ctx: &TcContext) -> i32 {
    let r = work().and_then(|w| {
        let external = w.peer;
        if icmp::is_error(&w.p) {
            icmp::translate_static(ctx, &w.p, icmp::QUOTED_DST, w.p.src, external)?;
        }
        let d = monitor::traced_addrs(Reason::StaticNat, &w.p, (&external, &w.p.dst), w.nh.ifindex);
        nat::set_src(ctx, &mut w.p, &w.peer)?;
        count(Reason::StaticNat, ctx.len());
        Ok(forward::route(ctx, &mut w.p, ifindex(ctx), Some(w.nh))? | monitor::tc_mark(d))
    });
    verdict(ctx, r)
}

/// F8 over IPv6, inbound: everything for a static external address goes to its container
/// (`work6.peer`); an ICMPv6 error about a packet the container sent quotes it back.
#[inline(never)]
fn to_static(ctx: &TcContext) -> i32 {
    let mut drafted = false;
    let r = work().and_then(|w| {
        if w.p.ttl <= 1 {
            return Err(Reason::DropTtl);
        }
        let internal = w.peer;
        if icmp::is_error(&w.p) {
            icmp::translate_static(ctx, &w.p, icmp::QUOTED_SRC, w.p.dst, internal)?;
        }
        drafted = monitor::traced_addrs(Reason::StaticNat, &w.p, (&w.p.src, &internal), 0);
        nat::set_dst(ctx, &mut w.p, &w.peer)?;
        count(Reason::StaticNat, ctx.len());
        Ok(TRANSLATED)
    });
    match verdict(ctx, r) {
        TRANSLATED => deliver(ctx) | monitor::tc_mark(drafted),
        action => action,
    }
}

/// F2 over IPv6: a new connection of the container `me`, masqueraded (NAT66) and sent by
/// the next hop `route_out` left in `work6`.
#[inline(never)]
fn masquerade(ctx: &TcContext, me: &Endpoint) -> i32 {
    verdict(ctx, masquerade_new(ctx, me))
}

#[inline(always)]
fn masquerade_new(ctx: &TcContext, me: &Endpoint) -> Result<i32, Reason> {
    let cfg = config()?;
    let w = work()?;
    let e = conntrack::create_snat(ctx, &w.p, &w.key, cfg.v6.snat_addr, cfg, me, now())?;
    let d = monitor::traced(Reason::SnatNew, &w.p, e, w.nh.ifindex);
    nat::apply(ctx, &mut w.p, e)?;
    count(Reason::SnatNew, ctx.len());
    Ok(forward::route(ctx, &mut w.p, ifindex(ctx), Some(w.nh))? | monitor::tc_mark(d))
}

/// On the uplink: the replies of masqueraded connections go back to their containers; any
/// other packet from outside for the IPv6 subnet is dropped (no published port reaches it
/// yet); everything else is the node's.
///
/// A function of its own: the IPv4 path's frame is not stacked on it.
#[inline(never)]
pub fn from_uplink(ctx: &TcContext) -> i32 {
    verdict(ctx, uplink(ctx))
}

#[inline(always)]
fn uplink(ctx: &TcContext) -> Result<i32, Reason> {
    let cfg = config()?;
    if cfg.v6.prefix_len == 0 {
        return pass(ctx);
    }
    if cfg.flags & CFG_STATIC_NAT != 0 {
        // Neighbour Solicitations for a static external address are answered here.
        match nd::uplink_solicitation(ctx) {
            GO_ON => {}
            action => return Ok(action),
        }
    }
    // Fragments, as over IPv4: only a source that may come from outside records ports.
    let src = ptr_at::<Addr6>(ctx, ETH_LEN + 8).ok_or(Reason::DropTruncated)?;
    // SAFETY: bounds checked by `ptr_at`. (`parse` asks about the node's own addresses,
    // for first fragments only.)
    let genuine = !martian_outside_src(cfg, unsafe { &*src });
    match parse(ctx, genuine) {
        GO_ON => {}
        action => return Ok(action),
    }
    let w = work()?;
    if let Some(s) = Addr6::static_nat(cfg, &w.p.dst)
        && s.kind == STATIC_EXTERNAL
    {
        w.peer = s.peer;
        return Ok(to_static(ctx));
    }
    if icmp::is_error(&w.p) {
        match icmp_error(ctx, true) {
            GO_ON => {}
            action => return Ok(action),
        }
    }
    if let Some(e) = tracked_entry(w)
        && conntrack::arrives_from_outside(e)
    {
        if w.p.ttl <= 1 {
            return Err(Reason::DropTtl);
        }
        return Ok(tracked6(ctx, e));
    }
    if find_published() {
        return Ok(dnat(ctx));
    }
    if in_subnet6(cfg, &w.p.dst) {
        return Err(Reason::DropNotPublished);
    }
    pass(ctx)
}
