//! ICMP and ICMPv6 errors about tracked connections (F7): destination unreachable (including
//! "fragmentation needed"), packet too big (IPv6's, which PMTU discovery depends on), time
//! exceeded (traceroute) and parameter problem. The outer header is translated like any
//! packet travelling in the error's direction, and the embedded header back to what its
//! sender saw, so the error reaches the socket it is about. Written once for both families
//! (`Fam` says how each quotes and checksums).
//!
//! Checksums: an embedded IPv4 address change is matched by its embedded header checksum
//! change, which leaves the ICMP checksum as it was; an embedded IPv6 address change (no
//! header checksum) is folded into the ICMPv6 checksum, as is any embedded port (or echo id)
//! change. The outer addresses are in the ICMPv6 checksum's pseudo-header, not in ICMP's.
//! The embedded TCP/UDP checksum is left alone: receivers do not check it and the embedded
//! segment is usually cut short anyway.

use nat_common::{CtKey, PROTO_TCP, PROTO_UDP, Port, Reason};

use crate::{
    conntrack,
    family::Fam,
    monitor, nat,
    parse::{IP_OFF, Ip, ptr_at},
    pkt::Pkt,
    stats::count,
    words,
};

/// Whether `p` is an ICMP (ICMPv6) error message.
#[inline(always)]
pub fn is_error<A: Fam>(p: &Ip<A>) -> bool {
    p.proto == A::PROTO_ICMP && p.l4_present && A::is_icmp_error(p.icmp_type)
}

/// The packet an error message quotes.
struct Inner<A> {
    /// Offset of the quoted IP header.
    ip_off: usize,
    /// Offset of the quoted L4 header.
    l4_off: usize,
    /// The quoted packet's tuple (ICMP echo: id as the port, as in `parse`).
    key: CtKey<A>,
    /// The quoted ICMP type, when the quoted packet is ICMP.
    icmp_type: u8,
}

/// Offset of the quoted IP header in the error `p`.
#[inline(always)]
fn quoted_off<A>(p: &Ip<A>) -> usize {
    // Masked so the verifier sees the bound it lost when `l4_off` went through the stack
    // (Ethernet + a 60-byte IPv4 header, or the 40-byte IPv6 one, ends below 128).
    (p.l4_off & 0x7f) + 8
}

/// Which quoted address `translate_static` looks at.
pub const QUOTED_SRC: bool = true;
pub const QUOTED_DST: bool = false;

/// Static 1:1 NAT for the error `p`: when the quoted header's source (`QUOTED_SRC`) or
/// destination address is `old`, the mapped side of the address the outer header was
/// translated for, make it `new`, so that the receiver recognises the packet it sent.
#[inline(always)]
pub fn translate_static<A: Fam>(
    ctx: &impl Pkt,
    p: &Ip<A>,
    quoted_src: bool,
    old: A,
    new: A,
) -> Result<(), Reason> {
    let ip_off = quoted_off(p);
    let field = if quoted_src {
        A::SRC_OFF - IP_OFF
    } else {
        A::DST_OFF - IP_OFF
    };
    let Some(quoted) = ptr_at::<A>(ctx, ip_off + field) else {
        return Ok(());
    };
    // SAFETY: bounds checked by `ptr_at`.
    if unsafe { *quoted } != old {
        return Ok(());
    }
    set_inner_addr(ctx, p, ip_off, field, &old, &new)
}

#[inline(always)]
fn inner<A: Fam>(ctx: &impl Pkt, p: &Ip<A>) -> Option<Inner<A>> {
    let ip_off = quoted_off(p);
    let (src, dst, proto, hdr_len) = A::quoted(ctx, ip_off)?;
    let l4_off = ip_off + hdr_len;
    // Only the first 8 bytes of the quoted L4 header are guaranteed to be there.
    let l4 = ptr_at::<[u8; 8]>(ctx, l4_off)?;
    // SAFETY: bounds checked by `ptr_at`.
    let b = unsafe { *l4 };
    let mut key = CtKey::new(src, dst, [0; 2], [0; 2], proto);
    let mut icmp_type = 0;
    match proto {
        PROTO_TCP | PROTO_UDP => {
            key.src_port = [b[0], b[1]];
            key.dst_port = [b[2], b[3]];
        }
        q if q == A::PROTO_ICMP => {
            icmp_type = b[0];
            if b[0] == A::ECHO_REQUEST {
                key.src_port = [b[4], b[5]];
            } else if b[0] == A::ECHO_REPLY {
                key.dst_port = [b[4], b[5]];
            } else {
                return None;
            }
        }
        _ => return None,
    }
    Some(Inner {
        ip_off,
        l4_off,
        key,
        icmp_type,
    })
}

/// Rewrite a quoted address (at `field` within the quoted header) and the checksum that
/// covers it (`Fam::set_quoted_addr`).
#[inline(always)]
fn set_inner_addr<A: Fam>(
    ctx: &impl Pkt,
    p: &Ip<A>,
    ip_off: usize,
    field: usize,
    old: &A,
    new: &A,
) -> Result<(), Reason> {
    if words::same(old, new) {
        return Ok(());
    }
    A::set_quoted_addr(ctx, ip_off, field, old, new, p.l4_off + 2)
}

/// Rewrite a quoted port or echo id at `off`: the outer packet is ICMP, so `set_port` folds
/// the change into the ICMP checksum.
#[inline(always)]
fn set_inner_port<A>(
    ctx: &impl Pkt,
    p: &Ip<A>,
    off: usize,
    old: Port,
    new: Port,
) -> Result<(), Reason> {
    if old == new {
        return Ok(());
    }
    nat::set_port(ctx, p, off, old, new)
}

/// Translate the error `p` if it is about a tracked connection (and draft its monitor event:
/// the caller marks its action, `monitor::traced_icmp_error`). `Ok(false)`: it is not.
/// `from_outside`: it arrived on the uplink (else from a container, whose address anti-spoofing
/// has checked). `key`: room for the lookup's key (the IPv6 path keeps it off the stack).
#[inline(always)]
pub fn translate<A: Fam>(
    ctx: &impl Pkt,
    p: &mut Ip<A>,
    from_outside: bool,
    key: &mut CtKey<A>,
) -> Result<bool, Reason> {
    let Some(i) = inner(ctx, p) else {
        return Ok(false);
    };
    // The error travels against the quoted packet: its connection entry is keyed by the
    // quoted tuple reversed.
    *key = i.key.reversed();
    let Some(e) = conntrack::lookup(key) else {
        return Ok(false);
    };
    // It must go back to the quoted packet's sender (nf_conntrack's rule) along a direction
    // that starts where it came in. From a container it must be about a packet that
    // container received, so that its outer source is always translated below.
    // (`key` is the quoted tuple reversed: its destination is the quoted source.)
    if !words::same(&p.dst, &key.dst_addr)
        || conntrack::arrives_from_outside(e) != from_outside
        || (!from_outside && !words::same(&p.src, &key.src_addr))
    {
        return Err(Reason::DropIcmpMismatch);
    }
    let e = conntrack::xlate(e);
    let quoted_receiver = words::same(&p.src, &key.src_addr);
    let src = if quoted_receiver { &e.src_addr } else { &p.src };
    monitor::traced_icmp_error(p, (src, &e.dst_addr));

    // Outer: to whom the error goes, and from whom if the quoted packet's receiver sent it
    // (a router on the way outside keeps its own address).
    if quoted_receiver {
        nat::set_src(ctx, p, &e.src_addr)?;
    }
    nat::set_dst(ctx, p, &e.dst_addr)?;

    // Quoted: the packet as its sender saw it (its addresses are `key`'s, swapped).
    set_inner_addr(
        ctx,
        p,
        i.ip_off,
        A::SRC_OFF - IP_OFF,
        &key.dst_addr,
        &e.dst_addr,
    )?;
    set_inner_addr(
        ctx,
        p,
        i.ip_off,
        A::DST_OFF - IP_OFF,
        &key.src_addr,
        &e.src_addr,
    )?;
    if i.key.proto == A::PROTO_ICMP {
        let (old, new) = if i.icmp_type == A::ECHO_REQUEST {
            (i.key.src_port, e.dst_port)
        } else {
            (i.key.dst_port, e.src_port)
        };
        set_inner_port(ctx, p, i.l4_off + 4, old, new)?;
    } else {
        set_inner_port(ctx, p, i.l4_off, i.key.src_port, e.dst_port)?;
        set_inner_port(ctx, p, i.l4_off + 2, i.key.dst_port, e.src_port)?;
    }
    count(Reason::IcmpError, ctx.bytes());
    Ok(true)
}
