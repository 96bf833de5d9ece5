//! Header rewrites with incremental checksum updates, for TC and XDP alike (`Pkt` says how a
//! checksum is updated in each).

use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR};
use nat_common::{Addr4, PROTO_ICMP, PROTO_UDP, Port, Reason};

use crate::parse::{
    ICMP_ECHO_REQUEST, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP_TTL_OFF, Ip4, l4_csum_off,
};
use crate::{conntrack::Xlate, pkt::Pkt};

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
    ctx: &impl Pkt,
    p: &Ip4,
    addr_off: usize,
    old: Addr4,
    new: Addr4,
) -> Result<(), Reason> {
    let (o, n) = (u32::from_ne_bytes(old), u32::from_ne_bytes(new));
    if let Some((csum_off, pseudo)) = l4_csum_off(p)
        && pseudo
    {
        ctx.csum_l4(
            csum_off,
            o,
            n,
            u64::from(BPF_F_PSEUDO_HDR) | l4_flags(p) | 4,
        )?;
    }
    ctx.csum_l3(IP_CSUM_OFF, o, n, 4)?;
    ctx.put(addr_off, &new)
}

/// Replace a port (or the ICMP echo id) at `off` and fix the L4 checksum.
#[inline(always)]
pub fn set_port(ctx: &impl Pkt, p: &Ip4, off: usize, old: Port, new: Port) -> Result<(), Reason> {
    let (o, n) = (
        u32::from(u16::from_ne_bytes(old)),
        u32::from(u16::from_ne_bytes(new)),
    );
    if let Some((csum_off, _)) = l4_csum_off(p) {
        ctx.csum_l4(csum_off, o, n, l4_flags(p) | 2)?;
    }
    ctx.put(off, &new)
}

/// Rewrite the packet to the tuple `e` says this direction translates to. Fragments after
/// the first carry no L4 header: only their addresses change.
#[inline(always)]
pub fn apply(ctx: &impl Pkt, p: &mut Ip4, e: &Xlate) -> Result<(), Reason> {
    if e.src != p.src {
        set_addr(ctx, p, IP_SRC_OFF, p.src, e.src)?;
        p.src = e.src;
    }
    if e.dst != p.dst {
        set_addr(ctx, p, IP_DST_OFF, p.dst, e.dst)?;
        p.dst = e.dst;
    }
    if !p.l4_present {
        p.sport = e.sport;
        p.dport = e.dport;
        return Ok(());
    }
    if p.proto == PROTO_ICMP {
        // The echo id is the "source port" of a request and the "destination port" of a reply.
        let (old, new) = if p.icmp_type == ICMP_ECHO_REQUEST {
            (p.sport, e.sport)
        } else {
            (p.dport, e.dport)
        };
        if old != new {
            set_port(ctx, p, p.l4_off + 4, old, new)?;
        }
        p.sport = e.sport;
        p.dport = e.dport;
        return Ok(());
    }
    if e.sport != p.sport {
        set_port(ctx, p, p.l4_off, p.sport, e.sport)?;
        p.sport = e.sport;
    }
    if e.dport != p.dport {
        set_port(ctx, p, p.l4_off + 2, p.dport, e.dport)?;
        p.dport = e.dport;
    }
    Ok(())
}

/// Static 1:1 NAT: rewrite only the source or the destination address, whatever the
/// protocol (ports, ICMP ids and fragments stay as they are).
#[inline(always)]
pub fn set_src(ctx: &impl Pkt, p: &mut Ip4, new: Addr4) -> Result<(), Reason> {
    set_addr(ctx, p, IP_SRC_OFF, p.src, new)?;
    p.src = new;
    Ok(())
}

#[inline(always)]
pub fn set_dst(ctx: &impl Pkt, p: &mut Ip4, new: Addr4) -> Result<(), Reason> {
    set_addr(ctx, p, IP_DST_OFF, p.dst, new)?;
    p.dst = new;
    Ok(())
}

/// Decrement the TTL of a routed packet. Callers hand packets with TTL <= 1 to the stack
/// beforehand, so that the kernel answers with ICMP time exceeded.
#[inline(always)]
pub fn dec_ttl(ctx: &impl Pkt, p: &mut Ip4) -> Result<(), Reason> {
    let old = u32::from(u16::from_ne_bytes([p.ttl, p.proto]));
    let ttl = p.ttl.wrapping_sub(1);
    let new = u32::from(u16::from_ne_bytes([ttl, p.proto]));
    ctx.csum_l3(IP_CSUM_OFF, old, new, 2)?;
    ctx.put(IP_TTL_OFF, &ttl)?;
    p.ttl = ttl;
    Ok(())
}
