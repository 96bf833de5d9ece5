//! The uplink's XDP fast path: replies to masqueraded connections, packets of connections to
//! published ports and static NAT are translated (and packets from another node's pods
//! delivered untranslated) and redirected to the container's host veth
//! before the kernel allocates an skb. Over IPv6, the same for tracked connections (NAT66
//! replies and published ports); static NAT66 is TC's. Everything else (new connections, TCP segments with
//! SYN, FIN or RST, ARP, fragments, ICMP errors, expiring TTLs, traffic for the node, what
//! needs a FIB lookup, anything that would be dropped) is passed on untouched, to the
//! uplink's TC program and the stack, which make the same decisions the slow way: only TC
//! knows whether an L4 checksum was verified.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_redirect,
    programs::XdpContext,
};
use nat_common::{Config, CtEntry, Endpoint, NET_CLUSTER_SRC, Reason, STATIC_EXTERNAL, tcp_flags};

use crate::{
    addr,
    conntrack::{self, now},
    family::Fam,
    forward, icmp, ipv6,
    lookup::{cluster_flags, config, container_at, endpoint, static_nat},
    monitor, nat,
    nexthop::{self, Hop},
    parse::{self, L3},
    pkt::Pkt,
    stats::count,
};

/// TCP segments that may change a connection's state: TC verifies their checksum first.
const CTL: u8 = tcp_flags::SYN | tcp_flags::FIN | tcp_flags::RST;

#[inline(always)]
fn pass(ctx: &XdpContext) -> Result<u32, Reason> {
    count(Reason::XdpPass, ctx.bytes());
    Ok(XDP_PASS)
}

/// The program's verdict: a drop is counted with its reason.
#[inline(always)]
pub fn verdict(ctx: &XdpContext, r: Result<u32, Reason>) -> u32 {
    r.unwrap_or_else(|reason| {
        count(reason, ctx.bytes());
        XDP_DROP | monitor::xdp_mark(monitor::dropped(reason))
    })
}

/// Everything that arrives on the uplink, before the stack sees it: each family in a
/// function of its own, so that neither frame is stacked on the other's.
#[inline(always)]
pub fn from_uplink(ctx: &XdpContext) -> u32 {
    match parse::l3(ctx) {
        Some((L3::Ipv4, _)) => from_uplink4(ctx),
        Some((L3::Ipv6, _)) => from_uplink6(ctx),
        _ => verdict(ctx, pass(ctx)),
    }
}

#[inline(never)]
fn from_uplink4(ctx: &XdpContext) -> u32 {
    verdict(ctx, fast4(ctx))
}

#[inline(always)]
fn fast4(ctx: &XdpContext) -> Result<u32, Reason> {
    let Ok(cfg) = config() else {
        return pass(ctx);
    };
    let Ok(mut p) = parse::ipv4(ctx) else {
        return pass(ctx);
    };
    // Fragments need the fragment table, ICMP errors their quoted headers rewritten, and an
    // expiring TTL an ICMP answer: TC does those.
    if p.frag || p.ttl <= 1 || icmp::is_error(&p) {
        return pass(ctx);
    }
    // Group and martian destinations, forged sources: TC drops or passes them, counted.
    if addr::is_group(p.dst) || addr::is_martian(p.dst) || addr::forged_outside_src(cfg, p.src) {
        return pass(ctx);
    }
    if let Some(s) = static_nat(cfg, &p.dst)
        && s.kind == STATIC_EXTERNAL
    {
        let Some(ep) = endpoint(&s.peer) else {
            return pass(ctx);
        };
        let d = monitor::traced_addrs(Reason::StaticNat, &p, (&p.src, &s.peer), ep.ifindex);
        nat::set_dst(ctx, &mut p, &s.peer)?;
        count(Reason::StaticNat, ctx.bytes());
        return Ok(deliver(ctx, &mut p, &hop_of(&ep))? | monitor::xdp_mark(d));
    }
    if let Some(ep) = container_at(cfg, &p.dst)
        && cluster_flags(&p.src) & NET_CLUSTER_SRC != 0
    {
        // Another node's pod (or another node) to a local pod: untracked, as TC would.
        count(Reason::ClusterDeliver, ctx.bytes());
        let d = monitor::traced_addrs(Reason::ClusterDeliver, &p, (&p.src, &p.dst), ep.ifindex);
        return Ok(deliver(ctx, &mut p, &hop_of(&ep))? | monitor::xdp_mark(d));
    }
    if !p.is_trackable() || p.tcp_flags & CTL != 0 {
        return pass(ctx);
    }
    // New connections go to TC, which knows whether the L4 checksum was verified (an XDP
    // frame has no checksum state) before creating anything.
    let Some(e) = conntrack::lookup(&p.key()) else {
        return pass(ctx);
    };
    established(ctx, cfg, &mut p, e)
}

/// A packet of the tracked connection `e`, either family: translated and delivered when it
/// comes from outside and ends in a container (the cached hop says so), else TC's.
#[inline(always)]
fn established<A: Fam>(
    ctx: &XdpContext,
    cfg: &Config,
    p: &mut parse::Ip<A>,
    e: *mut CtEntry<A>,
) -> Result<u32, Reason> {
    if !conntrack::arrives_from_outside(e) {
        return pass(ctx);
    }
    let t = now();
    // SAFETY: read of a map value.
    let to = unsafe { (*e).xlate.dst_addr };
    let Some(hop) = nexthop::peer_hop(cfg, conntrack::meta(e), &to, t) else {
        return pass(ctx);
    };
    conntrack::touch(ctx, e, p, t)?;
    count(Reason::CtHit, ctx.bytes());
    let d = monitor::traced(Reason::CtHit, p, conntrack::xlate(e), hop.ifindex);
    nat::apply(ctx, p, conntrack::xlate(e))?;
    Ok(deliver(ctx, p, &hop)? | monitor::xdp_mark(d))
}

/// The IPv6 fast path: a tracked connection's packet from outside that ends in a container.
/// A function of its own (the IPv4 path's frame is not stacked on it); the packet and its
/// tuple live in `work6`, as on TC's IPv6 path.
#[inline(never)]
fn from_uplink6(ctx: &XdpContext) -> u32 {
    if !ipv6::parse_only(ctx) {
        return verdict(ctx, pass(ctx));
    }
    verdict(ctx, fast6(ctx))
}

#[inline(always)]
fn fast6(ctx: &XdpContext) -> Result<u32, Reason> {
    let cfg = config()?;
    let w = ipv6::work()?;
    let p = &mut w.p;
    // Fragments, odd extension headers, ICMPv6 errors, expiring hop limits, control
    // segments, new connections and forged sources: TC's, as over IPv4.
    if p.frag
        || p.bad_ext
        || p.ttl <= 1
        || icmp::is_error(p)
        || !p.is_trackable()
        || p.tcp_flags & CTL != 0
        || ipv6::martian_outside_src(cfg, &p.src)
    {
        return pass(ctx);
    }
    w.key = p.key();
    let Some(e) = conntrack::lookup(&w.key) else {
        return pass(ctx);
    };
    established(ctx, cfg, p, e)
}

#[inline(always)]
fn hop_of(ep: &Endpoint) -> Hop {
    Hop {
        ifindex: ep.ifindex,
        dmac: ep.mac,
        smac: ep.host_mac,
    }
}

/// Redirect the translated frame to the container's host veth; the veth hands it to its peer,
/// the container's interface (which needs NAPI: GRO on, set up by `container add`).
#[inline(always)]
fn deliver<A: Fam>(ctx: &XdpContext, p: &mut parse::Ip<A>, hop: &Hop) -> Result<u32, Reason> {
    nat::dec_ttl(ctx, p)?;
    forward::set_macs(ctx, hop.dmac, hop.smac)?;
    count(Reason::XdpDeliver, ctx.bytes());
    crate::explain::redirect(hop.ifindex, nat_common::REDIRECT_EGRESS);
    // SAFETY: plain helper call; in XDP it returns XDP_REDIRECT.
    Ok(unsafe { bpf_redirect(hop.ifindex, 0) } as u32)
}
