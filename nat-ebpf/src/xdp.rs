//! The uplink's XDP fast path: replies to masqueraded connections, packets of connections to
//! published ports and static NAT are translated (and packets from another node's pods
//! delivered untranslated) and redirected to the container's host veth
//! before the kernel allocates an skb. Everything else (new connections, TCP segments with
//! SYN, FIN or RST, ARP, fragments, ICMP errors, expiring TTLs, traffic for the node, what
//! needs a FIB lookup, anything that would be dropped) is passed on untouched, to the
//! uplink's TC program and the stack, which make the same decisions the slow way: only TC
//! knows whether an L4 checksum was verified.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_redirect,
    programs::XdpContext,
};
use nat_common::{Endpoint, NET_CLUSTER_SRC, Reason, STATIC_EXTERNAL, tcp_flags};

use crate::{
    addr,
    conntrack::{self, now},
    forward, icmp,
    lookup::{cluster_flags, config, container_at, endpoint, static_nat},
    nat,
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
        XDP_DROP
    })
}

/// Everything that arrives on the uplink, before the stack sees it.
#[inline(always)]
pub fn from_uplink(ctx: &XdpContext) -> Result<u32, Reason> {
    let Ok(cfg) = config() else {
        return pass(ctx);
    };
    if !matches!(parse::l3(ctx), Some((L3::Ipv4, _))) {
        return pass(ctx);
    }
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
        nat::set_dst(ctx, &mut p, s.peer)?;
        count(Reason::StaticNat, ctx.bytes());
        return deliver(ctx, &mut p, &hop_of(&ep));
    }
    if let Some(ep) = container_at(cfg, &p.dst)
        && cluster_flags(&p.src) & NET_CLUSTER_SRC != 0
    {
        // Another node's pod (or another node) to a local pod: untracked, as TC would.
        count(Reason::ClusterDeliver, ctx.bytes());
        return deliver(ctx, &mut p, &hop_of(&ep));
    }
    if !p.is_trackable() || p.tcp_flags & CTL != 0 {
        return pass(ctx);
    }
    // New connections go to TC, which knows whether the L4 checksum was verified (an XDP
    // frame has no checksum state) before creating anything.
    let Some(e) = conntrack::lookup(&p.key()) else {
        return pass(ctx);
    };
    if !conntrack::arrives_from_outside(e) {
        return pass(ctx);
    }
    let t = now();
    // Only connections that end in a container are XDP's; the cached hop says so.
    // SAFETY: read of a map value.
    let to = unsafe { (*e).xlate.dst_addr };
    let Some(hop) = nexthop::peer_hop(cfg, conntrack::meta(e), &to, t) else {
        return pass(ctx);
    };
    conntrack::touch(ctx, e, &p, t)?;
    count(Reason::CtHit, ctx.bytes());
    nat::apply(ctx, &mut p, conntrack::xlate(e))?;
    deliver(ctx, &mut p, &hop)
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
fn deliver(ctx: &XdpContext, p: &mut parse::Ip4, hop: &Hop) -> Result<u32, Reason> {
    nat::dec_ttl(ctx, p)?;
    forward::set_macs(ctx, hop.dmac, hop.smac)?;
    count(Reason::XdpDeliver, ctx.bytes());
    // SAFETY: plain helper call; in XDP it returns XDP_REDIRECT.
    Ok(unsafe { bpf_redirect(hop.ifindex, 0) } as u32)
}
