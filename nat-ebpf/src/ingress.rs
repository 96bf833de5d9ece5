//! The two decision paths: packets a container sent (TC ingress of its host veth) and packets
//! from outside (TC ingress of the uplink). Each returns a TC action or the drop reason.

use aya_ebpf::programs::TcContext;
use nat_common::{
    Addr4, CFG_MASQUERADE, Config, CtEntry, CtEntry4, CtKey4, Endpoint, NET_CLUSTER_SRC,
    NET_NO_MASQ, PROTO_TCP, PROTO_UDP, PortTarget4, Reason, STATIC_EXTERNAL, STATIC_INTERNAL,
    tcp_flags,
};

use crate::{
    TC_ACT_OK, addr, arp,
    conntrack::{self, now},
    csum,
    family::Fam,
    forward, frag, icmp,
    lookup::{cluster_flags, config, container_at, endpoint, port_target, static_nat},
    monitor, nat,
    nexthop::{self, Way},
    parse::{self, L3},
    stats::count,
    verdict,
};

#[inline(always)]
fn pass(ctx: &TcContext) -> Result<i32, Reason> {
    count(Reason::Pass, ctx.len());
    Ok(TC_ACT_OK)
}

#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: reading a field of the program's own `__sk_buff`.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Everything a container sends over IPv4 and ARP: ARP answers, anti-spoofing,
/// container-to-container forwarding, conntrack hits, new masqueraded connections, traffic
/// for the node itself. A function of its own beside `ipv6::from_container`: the two frames
/// would not fit in 512 bytes one on top of the other.
#[inline(never)]
pub fn from_container(ctx: &TcContext) -> i32 {
    verdict(ctx, container(ctx))
}

#[inline(always)]
fn container(ctx: &TcContext) -> Result<i32, Reason> {
    let cfg = config()?;
    let ifindex = ifindex(ctx);
    let (l3, eth_src) = parse::l3(ctx).ok_or(Reason::DropTruncated)?;
    match l3 {
        L3::Arp => return arp::from_container(ctx, cfg, ifindex, eth_src),
        L3::Ipv4 => {}
        // `tc_container` sends IPv6 to `ipv6::from_container`.
        L3::Ipv6 | L3::Other => return pass(ctx),
    }
    let mut p = parse::ipv4(ctx)?;
    frag::resolve(&mut p);
    let early = early_lookup(cfg, &p);
    if let Some(Some(e)) = early
        && owned_by(e, ifindex, eth_src)
    {
        // The entry vouches for the sender (its veth, MAC and tuple).
        frag::record(&p);
        return tracked(ctx, cfg, &mut p, ifindex, e);
    }
    let me = sender(&p, ifindex, eth_src)?;
    frag::record(&p);
    if addr::is_group(p.dst) {
        // Linux never forwards broadcast or multicast: the node's stack may deliver it
        // locally, untranslated.
        count(Reason::Broadcast, ctx.len());
        return Ok(TC_ACT_OK);
    }
    if addr::is_martian(p.dst) {
        return Err(Reason::DropMartian);
    }
    // F1: the subnet is one flat L2 segment, as on a bridge: no TTL change.
    if let Some(peer) = container_at(cfg, &p.dst) {
        let d = monitor::traced_addrs(Reason::Forward, &p, (&p.src, &p.dst), peer.ifindex);
        let action = forward::to_endpoint(ctx, &mut p, &peer, false, Reason::Forward)?;
        return Ok(action | monitor::tc_mark(d));
    }
    if p.ttl <= 1 {
        // Everything below is routed or the node's: a packet that expires here is the
        // kernel's, which answers it with ICMP time exceeded (or takes it, if it is for the
        // node itself).
        return pass(ctx);
    }
    if icmp::is_error(&p) && icmp::translate(ctx, &mut p, false, &mut CtKey4::default())? {
        return Ok(deliver(ctx, cfg, &mut p, ifindex)? | monitor::tc_mark(true));
    }
    // The early lookup's answer stands unless it was skipped (a destination in the subnet).
    let entry = match early {
        Some(found) => found,
        None if p.is_trackable() => conntrack::lookup(&p.key()),
        None => None,
    };
    if let Some(e) = entry {
        return tracked(ctx, cfg, &mut p, ifindex, e);
    }
    if p.dst == cfg.v4.gateway_addr {
        // F6: the node, by its gateway address.
        return pass(ctx);
    }
    if parse::in_subnet(p.dst, cfg.v4.subnet_addr, cfg.v4.subnet_mask) {
        // An address in the subnet that no container holds: never route it elsewhere.
        return Err(Reason::DropNoEndpoint);
    }
    if let Some(t) = published(cfg, &p) {
        return hairpin(ctx, cfg, &mut p, &t);
    }
    leave(ctx, cfg, &mut p, ifindex, &me)
}

/// Whether the frame is IPv6.
#[inline(always)]
pub fn is_ipv6(ctx: &TcContext) -> bool {
    matches!(parse::l3(ctx), Some((L3::Ipv6, _)))
}

/// Fast path: the entry of a packet leaving the subnet, looked up before anything else (most
/// packets a container sends belong to a connection). `None` when the lookup does not apply
/// here: an expiring packet, a destination in the subnet, an untrackable packet.
#[inline(always)]
fn early_lookup(cfg: &Config, p: &parse::Ip4) -> Option<Option<*mut CtEntry4>> {
    if p.ttl <= 1
        || parse::in_subnet(p.dst, cfg.v4.subnet_addr, cfg.v4.subnet_mask)
        || !p.is_trackable()
    {
        return None;
    }
    Some(conntrack::lookup(&p.key()))
}

/// Whether the connection of `e` belongs to the container behind this veth and MAC: with the
/// tuple (the container's own source address), the anti-spoof check of a tracked packet; a
/// conntrack entry records the container its connection belongs to.
#[inline(always)]
fn owned_by(e: *mut CtEntry4, ifindex: u32, eth_src: [u8; 6]) -> bool {
    // SAFETY: reads of a map value.
    unsafe { (*e).meta.ifindex == ifindex && (*e).meta.mac == eth_src }
}

/// The container that sent `p`: its source address, veth and MAC must all be its own.
#[inline(always)]
fn sender(p: &parse::Ip4, ifindex: u32, eth_src: [u8; 6]) -> Result<Endpoint, Reason> {
    let me = endpoint(&p.src).ok_or(Reason::DropSpoof)?;
    if me.ifindex != ifindex || me.mac != eth_src {
        return Err(Reason::DropSpoof);
    }
    Ok(me)
}

/// F5, hairpin: a container reaches a published port on a node address, possibly its own.
#[inline(always)]
fn hairpin(
    ctx: &TcContext,
    cfg: &Config,
    p: &mut parse::Ip4,
    t: &PortTarget4,
) -> Result<i32, Reason> {
    let target = endpoint(&t.addr).ok_or(Reason::DropNoEndpoint)?;
    valid_for_state(ctx, p)?;
    let gw = cfg.v4.gateway_addr;
    let e = conntrack::create_hairpin(ctx, p, (&p.key(), gw), t, cfg, &target, now())?;
    let d = monitor::traced(Reason::HairpinNew, p, e, target.ifindex);
    nat::apply(ctx, p, e)?;
    count(Reason::HairpinNew, ctx.len());
    Ok(forward::to_endpoint(ctx, p, &target, true, Reason::Deliver)? | monitor::tc_mark(d))
}

/// A new packet for outside: whatever the FIB does not send out by the uplink is the stack's;
/// the rest leaves with the container's static address (F8) or masqueraded (F2).
#[inline(always)]
fn leave(
    ctx: &TcContext,
    cfg: &Config,
    p: &mut parse::Ip4,
    ifindex: u32,
    me: &Endpoint,
) -> Result<i32, Reason> {
    let nh = nexthop::fib(ctx, p, ifindex);
    let leaves_by_uplink = nh.forwards() && nh.ifindex == cfg.uplink_ifindex;
    if !leaves_by_uplink {
        // F6 (the node's own addresses) and anything routed elsewhere: the stack decides.
        return pass(ctx);
    }
    if nh.rc == nexthop::FRAG_NEEDED && p.df {
        // Untranslated, so that the kernel's "fragmentation needed" reaches the container
        // (without DF the translated packet is handed over below and the kernel fragments it).
        count(Reason::MtuExceeded, ctx.len());
        return Ok(TC_ACT_OK);
    }
    if cluster_flags(&p.dst) & NET_NO_MASQ != 0 {
        // Another node's pod, or another node: the Kubernetes network model's "no NAT",
        // routed with the container's own address (the node's route for the peer's block);
        // the answer arrives from a cluster source and is delivered as it is.
        count(Reason::ClusterRoute, ctx.len());
        let d = monitor::traced_addrs(Reason::ClusterRoute, p, (&p.src, &p.dst), nh.ifindex);
        return Ok(forward::route(ctx, p, ifindex, Some(nh))? | monitor::tc_mark(d));
    }
    if let Some(s) = static_nat(cfg, &p.src)
        && s.kind == STATIC_INTERNAL
    {
        // F8: the container's own external address, for every protocol and fragment.
        if icmp::is_error(p) {
            // About a packet from outside to the external address: quote that address.
            icmp::translate_static(ctx, p, icmp::QUOTED_DST, p.src, s.peer)?;
        }
        let d = monitor::traced_addrs(Reason::StaticNat, p, (&s.peer, &p.dst), nh.ifindex);
        nat::set_src(ctx, p, &s.peer)?;
        count(Reason::StaticNat, ctx.len());
        return Ok(forward::route(ctx, p, ifindex, Some(nh))? | monitor::tc_mark(d));
    }
    if cfg.flags & CFG_MASQUERADE == 0 {
        return pass(ctx);
    }
    if p.frag && !p.l4_present {
        // A later fragment of a datagram whose first fragment we have not seen.
        return Err(Reason::DropFragment);
    }
    if !p.is_trackable() {
        return Err(Reason::DropUnsupported);
    }
    valid_for_state(ctx, p)?;
    let e = conntrack::create_snat(ctx, p, &p.key(), cfg.v4.snat_addr, cfg, me, now())?;
    let d = monitor::traced(Reason::SnatNew, p, e, nh.ifindex);
    nat::apply(ctx, p, e)?;
    count(Reason::SnatNew, ctx.len());
    Ok(forward::route(ctx, p, ifindex, Some(nh))? | monitor::tc_mark(d))
}

/// A packet of a tracked connection, either way: check what could change its state, account
/// it, and send it on translated as its entry says.
#[inline(always)]
pub fn tracked<A: Fam>(
    ctx: &TcContext,
    cfg: &Config,
    p: &mut parse::Ip<A>,
    ifindex: u32,
    e: *mut CtEntry<A>,
) -> Result<i32, Reason> {
    let t = now();
    ctl_csum_ok(ctx, p)?;
    conntrack::touch(ctx, e, p, t)?;
    count(Reason::CtHit, ctx.len());
    let x = conntrack::xlate(e);
    let way = nexthop::tracked_way(ctx, cfg, p, ifindex, conntrack::meta(e), &x.dst_addr, t);
    if let Way::Out(nh) = way
        && nh.rc == nexthop::FRAG_NEEDED
        && p.df
    {
        // Too big for the way out with DF set: to the stack untranslated, whose ICMP
        // "fragmentation needed" then reaches the sender with the addresses it knows.
        count(Reason::MtuExceeded, ctx.len());
        return Ok(TC_ACT_OK);
    }
    match way {
        Way::Peer(hop) => {
            let d = monitor::traced(Reason::CtHit, p, x, hop.ifindex);
            nat::apply(ctx, p, x)?;
            Ok(forward::to_hop(ctx, p, &hop)? | monitor::tc_mark(d))
        }
        Way::Out(nh) => {
            let d = monitor::traced(Reason::CtHit, p, x, nh.ifindex);
            nat::apply(ctx, p, x)?;
            Ok(forward::route(ctx, p, ifindex, Some(nh))? | monitor::tc_mark(d))
        }
    }
}

/// Checksums that must hold before a packet creates a connection: the IPv4 header's (IPv6
/// has none) and the L4 one (as far as `csum::l4_ok` can tell). A function of its own:
/// inlined into the long callers, the compiler kept a pointer into the context across them,
/// which the verifier refuses.
#[inline(never)]
pub fn valid_for_state<A: Fam>(ctx: &TcContext, p: &parse::Ip<A>) -> Result<(), Reason> {
    if !A::header_ok(ctx, p) {
        return Err(Reason::DropInvalid);
    }
    if !csum::l4_ok(ctx, p) {
        return Err(Reason::DropL4Csum);
    }
    Ok(())
}

/// A TCP segment that may change its connection's state (SYN, FIN, RST) needs an L4 checksum
/// that holds; other segments change nothing the endpoint would not reject them for.
#[inline(always)]
fn ctl_csum_ok<A: Fam>(ctx: &TcContext, p: &parse::Ip<A>) -> Result<(), Reason> {
    let ctl = tcp_flags::SYN | tcp_flags::FIN | tcp_flags::RST;
    if p.proto == PROTO_TCP && p.tcp_flags & ctl != 0 && !csum::l4_ok(ctx, p) {
        return Err(Reason::DropL4Csum);
    }
    Ok(())
}

/// Send a translated packet on: into a container when the new destination is one, else
/// towards the outside.
#[inline(always)]
fn deliver(ctx: &TcContext, cfg: &Config, p: &mut parse::Ip4, ifindex: u32) -> Result<i32, Reason> {
    match container_at(cfg, &p.dst) {
        Some(ep) => forward::to_endpoint(ctx, p, &ep, true, Reason::Deliver),
        None => forward::route(ctx, p, ifindex, None),
    }
}

/// The published port `p` is addressed to, if any: a mapping bound to the destination address
/// first, then one bound to every node address. Either way the destination must be one of the
/// node's own unicast addresses: not a broadcast, multicast or loopback address, which the
/// FIB would call local too (iptables' `addrtype LOCAL`). The address is asked first: a
/// container's new connection to the outside then costs one lookup here, not two.
#[inline(always)]
fn published(cfg: &Config, p: &parse::Ip4) -> Option<PortTarget4> {
    if !addr::is_node_addr(cfg, &p.dst) {
        return None;
    }
    port_target(p)
}

/// Everything that arrives on the uplink over IPv4 and ARP: replies to masqueraded
/// connections, packets of connections to published ports, new connections to published
/// ports; the rest is the node's and goes to the stack untouched. A function of its own
/// beside `ipv6::from_uplink`, as for containers.
#[inline(never)]
pub fn from_uplink(ctx: &TcContext) -> i32 {
    verdict(ctx, uplink(ctx))
}

#[inline(always)]
fn uplink(ctx: &TcContext) -> Result<i32, Reason> {
    let cfg = config()?;
    let ifindex = ifindex(ctx);
    match parse::l3(ctx) {
        Some((L3::Ipv4, _)) => {}
        Some((L3::Arp, _)) => return arp::from_uplink(ctx, cfg, ifindex),
        _ => return pass(ctx),
    }
    // Malformed: dropped and counted, as ip_rcv would drop it.
    let mut p = parse::ipv4(ctx)?;
    if addr::is_group(p.dst) {
        // Never DNATed nor matched to a connection; the stack applies its own rules (DHCP's
        // 0.0.0.0 source included).
        count(Reason::Broadcast, ctx.len());
        return Ok(TC_ACT_OK);
    }
    if addr::is_martian(p.dst) || addr::forged_outside_src(cfg, p.src) {
        return Err(Reason::DropMartian);
    }
    frag::follow(&mut p);
    if let Some(s) = static_nat(cfg, &p.dst)
        && s.kind == STATIC_EXTERNAL
    {
        return to_static(ctx, &mut p, s.peer);
    }
    if icmp::is_error(&p) {
        not_expiring(&p)?;
        if icmp::translate(ctx, &mut p, true, &mut CtKey4::default())? {
            return Ok(deliver(ctx, cfg, &mut p, ifindex)? | monitor::tc_mark(true));
        }
    }
    if !p.is_trackable() {
        if parse::in_subnet(p.dst, cfg.v4.subnet_addr, cfg.v4.subnet_mask) {
            return from_cluster(ctx, &mut p);
        }
        if p.frag && !p.l4_present && (p.proto == PROTO_TCP || p.proto == PROTO_UDP) {
            // Ports unknown: never translated; the stack keeps it if the datagram is its own.
            count(Reason::FragUnmatched, ctx.len());
        }
        return pass(ctx);
    }

    let found = conntrack::lookup(&p.key());
    if let Some(e) = found
        && conntrack::arrives_from_outside(e)
    {
        // Expiring here, it changes nothing in its connection.
        not_expiring(&p)?;
        return tracked(ctx, cfg, &mut p, ifindex, e);
    }
    if let Some(t) = published(cfg, &p) {
        return dnat_new(ctx, cfg, &mut p, &t, found.is_none());
    }
    if parse::in_subnet(p.dst, cfg.v4.subnet_addr, cfg.v4.subnet_mask) {
        return from_cluster(ctx, &mut p);
    }
    pass(ctx)
}

/// A packet for a container address that no connection or published port explains: from a
/// pod of another node or from another node (`NET_CLUSTER_SRC`) it is delivered with its
/// source preserved, untracked (ICMP errors included); from anywhere else it is dropped.
#[inline(always)]
fn from_cluster(ctx: &TcContext, p: &mut parse::Ip4) -> Result<i32, Reason> {
    if cluster_flags(&p.src) & NET_CLUSTER_SRC == 0 {
        return Err(Reason::DropNotPublished);
    }
    not_expiring(p)?;
    let ep = endpoint(&p.dst).ok_or(Reason::DropNoEndpoint)?;
    count(Reason::ClusterDeliver, ctx.len());
    let d = monitor::traced_addrs(Reason::ClusterDeliver, p, (&p.src, &p.dst), ep.ifindex);
    Ok(forward::to_endpoint(ctx, p, &ep, true, Reason::Deliver)? | monitor::tc_mark(d))
}

/// A packet from outside that would be routed into a container must not expire here: it is
/// dropped (`drop_ttl`) before it is translated or creates state. (From a container, an
/// expiring packet goes to the kernel instead, which answers it: see `from_container`.)
#[inline(always)]
fn not_expiring(p: &parse::Ip4) -> Result<(), Reason> {
    if p.ttl <= 1 {
        return Err(Reason::DropTtl);
    }
    Ok(())
}

/// F8: everything for a static external address goes to its container (`internal`).
#[inline(always)]
fn to_static(ctx: &TcContext, p: &mut parse::Ip4, internal: Addr4) -> Result<i32, Reason> {
    not_expiring(p)?;
    if icmp::is_error(p) {
        // About a packet the container sent from its external address.
        icmp::translate_static(ctx, p, icmp::QUOTED_SRC, p.dst, internal)?;
    }
    let ep = endpoint(&internal);
    let out = ep.as_ref().map_or(0, |e| e.ifindex);
    let d = monitor::traced_addrs(Reason::StaticNat, p, (&p.src, &internal), out);
    nat::set_dst(ctx, p, &internal)?;
    count(Reason::StaticNat, ctx.len());
    let ep = ep.ok_or(Reason::DropNoEndpoint)?;
    Ok(forward::to_endpoint(ctx, p, &ep, true, Reason::Deliver)? | monitor::tc_mark(d))
}

/// F3: a new connection from outside to the published port `t`. Nothing that would be
/// dropped creates state.
#[inline(always)]
fn dnat_new(
    ctx: &TcContext,
    cfg: &Config,
    p: &mut parse::Ip4,
    t: &PortTarget4,
    key_absent: bool,
) -> Result<i32, Reason> {
    if addr::is_node_addr(cfg, &p.src) {
        // The node's own address from outside: a forged source (rp_filter's rule).
        return Err(Reason::DropMartian);
    }
    let ep = endpoint(&t.addr).ok_or(Reason::DropNoEndpoint)?;
    not_expiring(p)?;
    valid_for_state(ctx, p)?;
    let e = conntrack::create_dnat(ctx, p, (&p.key(), key_absent), t, cfg, &ep, now())?;
    let d = monitor::traced(Reason::DnatNew, p, e, ep.ifindex);
    count(Reason::DnatNew, ctx.len());
    nat::apply(ctx, p, e)?;
    // Into `ep`, whose address the destination now is (no second lookup of it).
    Ok(forward::to_endpoint(ctx, p, &ep, true, Reason::Deliver)? | monitor::tc_mark(d))
}
