//! Sending packets that are already translated (or need none): into a container, straight
//! into its namespace, or out by a next hop that `nexthop` chose.

use core::ptr::null_mut;

use aya_ebpf::{
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use nat_common::{Endpoint, REDIRECT_EGRESS, REDIRECT_NEIGH, REDIRECT_PEER, Reason};

use crate::{
    TC_ACT_OK, explain,
    family::Fam,
    nat::dec_ttl,
    nexthop::{Hop, NO_NEIGH, NextHop, SUCCESS, fib},
    parse::Ip,
    pkt::Pkt,
    stats::count,
};

#[inline(always)]
pub fn set_macs(ctx: &impl Pkt, dst: [u8; 6], src: [u8; 6]) -> Result<(), Reason> {
    let macs = [
        dst[0], dst[1], dst[2], dst[3], dst[4], dst[5], src[0], src[1], src[2], src[3], src[4],
        src[5],
    ];
    ctx.put(0, &macs)
}

/// Deliver `p` into the container behind `ep`, straight into its namespace.
#[inline(always)]
pub fn to_endpoint<A: Fam>(
    ctx: &TcContext,
    p: &mut Ip<A>,
    ep: &Endpoint,
    routed: bool,
    reason: Reason,
) -> Result<i32, Reason> {
    if routed {
        dec_ttl(ctx, p)?;
    }
    set_macs(ctx, ep.mac, ep.host_mac)?;
    count(reason, ctx.len());
    explain::redirect(ep.ifindex, REDIRECT_PEER);
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect_peer(ep.ifindex, 0) } as i32)
}

/// Deliver a routed `p` into the container behind `hop`, straight into its namespace.
#[inline(always)]
pub fn to_hop<A: Fam>(ctx: &TcContext, p: &mut Ip<A>, hop: &Hop) -> Result<i32, Reason> {
    dec_ttl(ctx, p)?;
    set_macs(ctx, hop.dmac, hop.smac)?;
    count(Reason::Deliver, ctx.len());
    explain::redirect(hop.ifindex, REDIRECT_PEER);
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect_peer(hop.ifindex, 0) } as i32)
}

/// Send an already translated `p` on towards the outside, using `hint` when the caller has
/// already done the FIB lookup for this destination.
#[inline(always)]
pub fn route<A: Fam>(
    ctx: &TcContext,
    p: &mut Ip<A>,
    ifindex: u32,
    hint: Option<NextHop>,
) -> Result<i32, Reason> {
    let f = match hint {
        Some(h) => h,
        None => fib(ctx, p, ifindex),
    };
    let rc = f.rc;
    if rc == SUCCESS {
        dec_ttl(ctx, p)?;
        set_macs(ctx, f.dmac, f.smac)?;
        count(
            if f.cached {
                Reason::NextHopCached
            } else {
                Reason::FibRedirect
            },
            ctx.len(),
        );
        explain::redirect(f.ifindex, REDIRECT_EGRESS);
        // SAFETY: plain helper call.
        return Ok(unsafe { bpf_redirect(f.ifindex, 0) } as i32);
    }
    if rc == NO_NEIGH {
        dec_ttl(ctx, p)?;
        count(Reason::NeighRedirect, ctx.len());
        explain::redirect(f.ifindex, REDIRECT_NEIGH);
        // SAFETY: a null `params` asks the kernel to resolve the next hop itself.
        return Ok(unsafe { bpf_redirect_neigh(f.ifindex, null_mut(), 0, 0) } as i32);
    }
    count(Reason::StackAfterNat, ctx.len());
    Ok(TC_ACT_OK)
}
