//! Header rewrites with incremental checksum updates, for TC and XDP alike (`Pkt` says how a
//! checksum is updated in each).

use aya_ebpf::bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR};
use nat_common::{CtKey, PROTO_UDP, Port, Reason};

use crate::parse::{Ip, l4_csum_off};
use crate::{family::Fam, pkt::Pkt, words};

#[inline(always)]
fn l4_flags<A>(p: &Ip<A>) -> u64 {
    if p.proto == PROTO_UDP {
        // A zero UDP checksum means "none" and must stay zero.
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    }
}

/// Replace one address (at `addr_off`) and fix the checksums that cover it.
#[inline(always)]
fn set_addr<A: Fam>(
    ctx: &impl Pkt,
    p: &Ip<A>,
    addr_off: usize,
    old: &A,
    new: &A,
) -> Result<(), Reason> {
    let flags = u64::from(BPF_F_PSEUDO_HDR) | l4_flags(p);
    A::set_addr(ctx, addr_off, old, new, l4_csum_off(p), flags)
}

/// Replace a port (or the ICMP echo id) at `off` and fix the L4 checksum.
#[inline(always)]
pub fn set_port<A>(
    ctx: &impl Pkt,
    p: &Ip<A>,
    off: usize,
    old: Port,
    new: Port,
) -> Result<(), Reason> {
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
pub fn apply<A: Fam>(ctx: &impl Pkt, p: &mut Ip<A>, e: &CtKey<A>) -> Result<(), Reason> {
    if !words::same(&e.src_addr, &p.src) {
        set_addr(ctx, p, A::SRC_OFF, &p.src, &e.src_addr)?;
        words::copy(&mut p.src, &e.src_addr);
    }
    if !words::same(&e.dst_addr, &p.dst) {
        set_addr(ctx, p, A::DST_OFF, &p.dst, &e.dst_addr)?;
        words::copy(&mut p.dst, &e.dst_addr);
    }
    if !p.l4_present {
        p.sport = e.src_port;
        p.dport = e.dst_port;
        return Ok(());
    }
    if p.proto == A::PROTO_ICMP {
        // The echo id is the "source port" of a request and the "destination port" of a reply.
        let (old, new) = if p.icmp_type == A::ECHO_REQUEST {
            (p.sport, e.src_port)
        } else {
            (p.dport, e.dst_port)
        };
        if old != new {
            set_port(ctx, p, p.l4_off + 4, old, new)?;
        }
        p.sport = e.src_port;
        p.dport = e.dst_port;
        return Ok(());
    }
    if e.src_port != p.sport {
        set_port(ctx, p, p.l4_off, p.sport, e.src_port)?;
        p.sport = e.src_port;
    }
    if e.dst_port != p.dport {
        set_port(ctx, p, p.l4_off + 2, p.dport, e.dst_port)?;
        p.dport = e.dst_port;
    }
    Ok(())
}

/// Static 1:1 NAT: rewrite only the source or the destination address, whatever the
/// protocol (ports, ICMP ids and fragments stay as they are).
#[inline(always)]
pub fn set_src<A: Fam>(ctx: &impl Pkt, p: &mut Ip<A>, new: &A) -> Result<(), Reason> {
    set_addr(ctx, p, A::SRC_OFF, &p.src, new)?;
    words::copy(&mut p.src, new);
    Ok(())
}

#[inline(always)]
pub fn set_dst<A: Fam>(ctx: &impl Pkt, p: &mut Ip<A>, new: &A) -> Result<(), Reason> {
    set_addr(ctx, p, A::DST_OFF, &p.dst, new)?;
    words::copy(&mut p.dst, new);
    Ok(())
}

/// Decrement the TTL (hop limit) of a routed packet. Callers hand packets with TTL <= 1 to
/// the stack beforehand, so that the kernel answers with ICMP time exceeded.
#[inline(always)]
pub fn dec_ttl<A: Fam>(ctx: &impl Pkt, p: &mut Ip<A>) -> Result<(), Reason> {
    A::dec_ttl(ctx, p)
}
