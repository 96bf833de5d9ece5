//! The Neighbour Discovery responder, IPv6's ARP: a container's Neighbour Solicitation for
//! the gateway is answered with the host veth's MAC (as a router), one for another container
//! with that container's MAC, so that all traffic reaches `tc_container` as unicast. The
//! sender must be the container that owns the source address, on its veth, with its MAC.

use core::ptr::null_mut;

use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_redirect},
    programs::TcContext,
};
use nat_common::{Addr6, Reason, STATIC_EXTERNAL};

use crate::{
    family::Fam as _,
    forward::set_macs,
    ingress::ifindex,
    ipv6::{GO_ON, L4_OFF, NEXT_ICMPV6, endpoint6, pass},
    lookup::config,
    parse::{self, ETH_LEN, Ip6Hdr, ptr_at},
    pkt::Pkt as _,
    stats::count,
    verdict,
};

pub const ND_SOLICIT: u8 = 135;
const ND_ADVERT: u8 = 136;
/// NA flags (first byte): router, solicited, override.
const NA_ROUTER: u8 = 0x80;
const NA_SOLICITED: u8 = 0x40;
const NA_OVERRIDE: u8 = 0x20;
/// ND options: source and target link-layer address.
const OPT_SLLA: u8 = 1;
const OPT_TLLA: u8 = 2;
/// An NS without options, and with one link-layer address option.
const NS_LEN: u16 = 24;
const NS_SLLA_LEN: u16 = 32;

/// Offsets in the frame: the IPv6 addresses, and the ND message's fields.
const IP_VTC_OFF: usize = ETH_LEN;
const IP_SRC_OFF: usize = ETH_LEN + 8;
const IP_DST_OFF: usize = ETH_LEN + 24;
const ND_TARGET_OFF: usize = L4_OFF + 8;
const OPT_OFF: usize = L4_OFF + 24;

/// A Neighbour Solicitation from a container with a global source.
///
/// A function of its own, which reads what it needs itself, and turns the solicitation into
/// the advertisement in place: its frame then never adds to the NAT66 path's.
#[inline(never)]
pub fn solicitation(ctx: &TcContext) -> i32 {
    verdict(ctx, solicit(ctx))
}

#[inline(always)]
fn solicit(ctx: &TcContext) -> Result<i32, Reason> {
    let cfg = config()?;
    let ifindex = ifindex(ctx);
    let (_, eth_src) = parse::l3(ctx).ok_or(Reason::DropTruncated)?;
    let ip = ptr_at::<Ip6Hdr>(ctx, ETH_LEN).ok_or(Reason::DropTruncated)?;
    // SAFETY: bounds checked by `ptr_at`; fields are read in place.
    let (len, hop_limit) = unsafe { (u16::from_be_bytes((*ip).payload_len), (*ip).hop_limit) };
    if hop_limit != 255 || (len != NS_LEN && len != NS_SLLA_LEN) {
        // Not a solicitation a neighbour would accept (RFC 4861 7.1.1), or one with options
        // this responder does not write: the stack's.
        return pass(ctx);
    }
    let with_opt = len == NS_SLLA_LEN;
    let code = ptr_at::<[u8; 2]>(ctx, L4_OFF).ok_or(Reason::DropTruncated)?;
    // SAFETY: bounds checked by `ptr_at`.
    if unsafe { (*code)[1] } != 0 {
        return pass(ctx);
    }
    if with_opt {
        let o = ptr_at::<[u8; 8]>(ctx, OPT_OFF).ok_or(Reason::DropTruncated)?;
        // SAFETY: bounds checked by `ptr_at`.
        let o = unsafe { &*o };
        if o[0] != OPT_SLLA || o[1] != 1 {
            return pass(ctx);
        }
        if o[2..8] != eth_src {
            return Err(Reason::DropSpoof);
        }
    }
    let src = ptr_at::<Addr6>(ctx, IP_SRC_OFF).ok_or(Reason::DropTruncated)?;
    let target = ptr_at::<Addr6>(ctx, ND_TARGET_OFF).ok_or(Reason::DropTruncated)?;
    // SAFETY: bounds checked by `ptr_at`; the lookups take the addresses in place, and both
    // are copied before the packet is rewritten.
    let (src, target) = unsafe { (&*src, &*target) };
    let me = endpoint6(src).ok_or(Reason::DropSpoof)?;
    if me.ifindex != ifindex || me.mac != eth_src {
        return Err(Reason::DropSpoof);
    }
    let (mac, router) = if *target == cfg.v6.gateway_addr {
        (me.host_mac, NA_ROUTER)
    } else if let Some(peer) = endpoint6(target)
        && target != src
    {
        (peer.mac, 0)
    } else {
        return Err(Reason::DropNdUnknown);
    };
    let (asker, target) = (*src, *target);
    advertise(ctx, (&asker, &target), (eth_src, mac), router, with_opt)?;
    count(Reason::NdReply, ctx.len());
    // SAFETY: plain helper call; egress of the interface the solicitation came in on.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// A Neighbour Solicitation on the uplink for a static external address (F8): answered
/// with the uplink's MAC, as the ARP responder answers for IPv4. `GO_ON` for any other
/// packet, which goes on through the uplink's path.
#[inline(never)]
pub fn uplink_solicitation(ctx: &TcContext) -> i32 {
    verdict(ctx, answer_uplink(ctx))
}

#[inline(always)]
fn answer_uplink(ctx: &TcContext) -> Result<i32, Reason> {
    let cfg = config()?;
    let Some(ip) = ptr_at::<Ip6Hdr>(ctx, ETH_LEN) else {
        return Ok(GO_ON);
    };
    // SAFETY: bounds checked by `ptr_at`; fields are read in place.
    let (next_hdr, len, hop_limit) = unsafe {
        (
            (*ip).next_hdr,
            u16::from_be_bytes((*ip).payload_len),
            (*ip).hop_limit,
        )
    };
    let Some(head) = ptr_at::<[u8; 2]>(ctx, L4_OFF) else {
        return Ok(GO_ON);
    };
    // SAFETY: bounds checked by `ptr_at`.
    let head = unsafe { *head };
    if next_hdr != NEXT_ICMPV6
        || head != [ND_SOLICIT, 0]
        || hop_limit != 255
        || (len != NS_LEN && len != NS_SLLA_LEN)
    {
        return Ok(GO_ON);
    }
    let with_opt = len == NS_SLLA_LEN;
    if with_opt {
        let o = ptr_at::<[u8; 2]>(ctx, OPT_OFF).ok_or(Reason::DropTruncated)?;
        // SAFETY: bounds checked by `ptr_at`.
        if unsafe { *o } != [OPT_SLLA, 1] {
            return Ok(GO_ON);
        }
    }
    let src = ptr_at::<Addr6>(ctx, IP_SRC_OFF).ok_or(Reason::DropTruncated)?;
    let target = ptr_at::<Addr6>(ctx, ND_TARGET_OFF).ok_or(Reason::DropTruncated)?;
    // SAFETY: bounds checked by `ptr_at`; copied before the packet is rewritten.
    let (asker, target) = unsafe { (*src, *target) };
    if asker == [0; 16] {
        // Duplicate address detection: the stack's.
        return Ok(GO_ON);
    }
    if !Addr6::static_nat(cfg, &target).is_some_and(|s| s.kind == STATIC_EXTERNAL) {
        return Ok(GO_ON);
    }
    let (_, eth_src) = parse::l3(ctx).ok_or(Reason::DropTruncated)?;
    advertise(
        ctx,
        (&asker, &target),
        (eth_src, cfg.uplink_mac),
        0,
        with_opt,
    )?;
    count(Reason::NdReply, ctx.len());
    // SAFETY: plain helper call; back out of the uplink.
    Ok(unsafe { bpf_redirect(ifindex(ctx), 0) } as i32)
}

/// Rewrite the solicitation in place into the advertisement "`target` is at `mac`" for
/// `asker` (at `to`): same length, the target field already where it belongs.
#[inline(always)]
fn advertise(
    ctx: &TcContext,
    (asker, target): (&Addr6, &Addr6),
    (to, mac): ([u8; 6], [u8; 6]),
    router: u8,
    with_opt: bool,
) -> Result<(), Reason> {
    set_macs(ctx, to, mac)?;
    ctx.put(IP_VTC_OFF, &[0x60u8, 0, 0, 0])?;
    ctx.put(IP_SRC_OFF, target)?;
    ctx.put(IP_DST_OFF, asker)?;
    // Type, code, checksum (zero while the sum is taken), flags.
    ctx.put(
        L4_OFF,
        &[
            ND_ADVERT,
            0,
            0,
            0,
            router | NA_SOLICITED | NA_OVERRIDE,
            0,
            0,
            0,
        ],
    )?;
    let len = if with_opt {
        ctx.put(OPT_OFF, &[OPT_TLLA, 1])?;
        ctx.put(OPT_OFF + 2, &mac)?;
        NS_SLLA_LEN
    } else {
        NS_LEN
    };
    // The checksum over the pseudo-header (the two addresses, the length, the next header)
    // and the message, summed where they are.
    let addrs = ptr_at::<[u8; 32]>(ctx, IP_SRC_OFF).ok_or(Reason::DropTruncated)?;
    let msg = ptr_at::<[u8; NS_SLLA_LEN as usize]>(ctx, L4_OFF);
    let msg_short = ptr_at::<[u8; NS_LEN as usize]>(ctx, L4_OFF).ok_or(Reason::DropTruncated)?;
    let seed = u32::from(len)
        .to_be()
        .wrapping_add(u32::from(NEXT_ICMPV6).to_be());
    // SAFETY: both ranges were bounds-checked by `ptr_at`; the helper only reads them.
    let sum = unsafe {
        let s = bpf_csum_diff(null_mut(), 0, addrs.cast_mut().cast(), 32, seed);
        match (with_opt, msg) {
            (true, Some(m)) => bpf_csum_diff(null_mut(), 0, m.cast_mut().cast(), 32, s as u32),
            (true, None) => return Err(Reason::DropTruncated),
            _ => bpf_csum_diff(null_mut(), 0, msg_short.cast_mut().cast(), 24, s as u32),
        }
    };
    if sum < 0 {
        return Err(Reason::DropHelper);
    }
    let csum = !fold(sum as u64);
    ctx.put(L4_OFF + 2, &csum.to_ne_bytes())
}

/// Fold a ones' complement sum to 16 bits.
#[inline(always)]
fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}
