//! Header rewrites with incremental checksum updates. TC only uses the kernel helpers
//! (`bpf_l3_csum_replace` / `bpf_l4_csum_replace`): they keep CHECKSUM_PARTIAL skbs, which is
//! what containers send over veth, correct, where a hand-computed checksum would corrupt them.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use nat_common::{CtEntry, PROTO_ICMP, PROTO_UDP, Reason};

use crate::parse::{
    ICMP_ECHO_REQUEST, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP_TTL_OFF, Ip4, l4_csum_off,
};

#[inline(always)]
pub fn helper(r: Result<(), i64>) -> Result<(), Reason> {
    r.map_err(|_| Reason::DropHelper)
}

#[inline(always)]
fn l4_flags(p: &Ip4) -> u64 {
    if p.proto == PROTO_UDP {
        // A zero UDP checksum means "none" and must stay zero.
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    }
}

/// Replace one IPv4 address (at `addr_off`) and fix the IP and L4 checksums.
#[inline(always)]
fn set_addr(
    ctx: &TcContext,
    p: &Ip4,
    addr_off: usize,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), Reason> {
    let (o, n) = (
        u64::from(u32::from_ne_bytes(old)),
        u64::from(u32::from_ne_bytes(new)),
    );
    if let Some((csum_off, pseudo)) = l4_csum_off(p)
        && pseudo
    {
        helper(ctx.l4_csum_replace(
            csum_off,
            o,
            n,
            u64::from(BPF_F_PSEUDO_HDR) | l4_flags(p) | 4,
        ))?;
    }
    helper(ctx.l3_csum_replace(IP_CSUM_OFF, o, n, 4))?;
    helper(ctx.store(addr_off, &new, 0))
}

/// Replace a port (or the ICMP echo id) at `off` and fix the L4 checksum.
#[inline(always)]
pub fn set_port(
    ctx: &TcContext,
    p: &Ip4,
    off: usize,
    old: [u8; 2],
    new: [u8; 2],
) -> Result<(), Reason> {
    let (o, n) = (
        u64::from(u16::from_ne_bytes(old)),
        u64::from(u16::from_ne_bytes(new)),
    );
    if let Some((csum_off, _)) = l4_csum_off(p) {
        helper(ctx.l4_csum_replace(csum_off, o, n, l4_flags(p) | 2))?;
    }
    helper(ctx.store(off, &new, 0))
}

/// Rewrite the packet to the tuple `e` says this direction translates to. Fragments after
/// the first carry no L4 header: only their addresses change.
#[inline(always)]
pub fn apply(ctx: &TcContext, p: &mut Ip4, e: &CtEntry) -> Result<(), Reason> {
    if e.xlate_src_addr != p.src {
        set_addr(ctx, p, IP_SRC_OFF, p.src, e.xlate_src_addr)?;
        p.src = e.xlate_src_addr;
    }
    if e.xlate_dst_addr != p.dst {
        set_addr(ctx, p, IP_DST_OFF, p.dst, e.xlate_dst_addr)?;
        p.dst = e.xlate_dst_addr;
    }
    if !p.l4_present {
        p.sport = e.xlate_src_port;
        p.dport = e.xlate_dst_port;
        return Ok(());
    }
    if p.proto == PROTO_ICMP {
        // The echo id is the "source port" of a request and the "destination port" of a reply.
        let (old, new) = if p.icmp_type == ICMP_ECHO_REQUEST {
            (p.sport, e.xlate_src_port)
        } else {
            (p.dport, e.xlate_dst_port)
        };
        if old != new {
            set_port(ctx, p, p.l4_off + 4, old, new)?;
        }
        p.sport = e.xlate_src_port;
        p.dport = e.xlate_dst_port;
        return Ok(());
    }
    if e.xlate_src_port != p.sport {
        set_port(ctx, p, p.l4_off, p.sport, e.xlate_src_port)?;
        p.sport = e.xlate_src_port;
    }
    if e.xlate_dst_port != p.dport {
        set_port(ctx, p, p.l4_off + 2, p.dport, e.xlate_dst_port)?;
        p.dport = e.xlate_dst_port;
    }
    Ok(())
}

/// Static 1:1 NAT: rewrite only the source or the destination address, whatever the
/// protocol (ports, ICMP ids and fragments stay as they are).
#[inline(always)]
pub fn set_src(ctx: &TcContext, p: &mut Ip4, new: [u8; 4]) -> Result<(), Reason> {
    set_addr(ctx, p, IP_SRC_OFF, p.src, new)?;
    p.src = new;
    Ok(())
}

#[inline(always)]
pub fn set_dst(ctx: &TcContext, p: &mut Ip4, new: [u8; 4]) -> Result<(), Reason> {
    set_addr(ctx, p, IP_DST_OFF, p.dst, new)?;
    p.dst = new;
    Ok(())
}

/// Decrement the TTL of a routed packet. Callers hand packets with TTL <= 1 to the stack
/// beforehand, so that the kernel answers with ICMP time exceeded.
#[inline(always)]
pub fn dec_ttl(ctx: &TcContext, p: &mut Ip4) -> Result<(), Reason> {
    let old = u64::from(u16::from_ne_bytes([p.ttl, p.proto]));
    let ttl = p.ttl.wrapping_sub(1);
    let new = u64::from(u16::from_ne_bytes([ttl, p.proto]));
    helper(ctx.l3_csum_replace(IP_CSUM_OFF, old, new, 2))?;
    helper(ctx.store(IP_TTL_OFF, &ttl, 0))?;
    p.ttl = ttl;
    Ok(())
}
