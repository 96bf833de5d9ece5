//! Fragments, of either family. Only the first fragment carries the ports that conntrack keys
//! on; it records them here under the datagram's reassembly key (src, dst, protocol, IP id:
//! RFC 791; the Fragment header's 32-bit id for IPv6, RFC 8200), and the later fragments look
//! them up, so a whole datagram follows one translation.
//!
//! An entry lives as long as its datagram: it counts the payload bytes that passed and is
//! deleted once they add up to the length the last fragment revealed (in whatever order the
//! fragments came), and it is ignored after `FRAG_TIMEOUT_NS` (Linux's `ipfrag_time`). So the
//! next datagram that reuses the IP id never inherits the ports of an earlier one. A later
//! fragment that arrives before its first cannot be matched: the caller decides (dropped and
//! counted where it would need translation, the stack's otherwise, counted as
//! `frag_unmatched`).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use nat_common::{FRAG_TIMEOUT_NS, FragPorts, PROTO_TCP, PROTO_UDP};

use crate::{conntrack::now, family::Fam, parse::Ip};

/// The fragmentable part of this fragment (after the IP header and, for IPv6, the extension
/// headers up to the Fragment header's end).
#[inline(always)]
fn payload<A>(p: &Ip<A>) -> u32 {
    u32::from(p.tot_len).saturating_sub(u32::from(p.frag_data_off))
}

/// Remember the ports of a first fragment, for the fragments that follow it. Called only
/// once the packet's source is known to be genuine (a container's own address and veth, or
/// a source that may come from outside), so that nobody can write a record for another
/// host's datagrams.
#[inline(never)]
pub fn record<A: Fam>(p: &Ip<A>) {
    if !p.frag || !p.l4_present || (p.proto != PROTO_TCP && p.proto != PROTO_UDP) {
        return;
    }
    record_first(p);
}

/// `record`'s work, for a first fragment of TCP or UDP.
#[inline(always)]
fn record_first<A: Fam>(p: &Ip<A>) {
    let f = FragPorts {
        src_port: p.sport,
        dst_port: p.dport,
        seen: payload(p),
        total: 0,
        _pad: 0,
        created_ns: now(),
    };
    A::frags_insert(p, &f);
}

/// Recover the ports of a later fragment from its datagram's first fragment (before any
/// rewrite). A function of its own: inlined at the top of both programs, its branches
/// multiplied the paths the verifier walks through everything after it.
#[inline(never)]
pub fn resolve<A: Fam>(p: &mut Ip<A>) {
    if !p.frag || p.l4_present || (p.proto != PROTO_TCP && p.proto != PROTO_UDP) {
        return;
    }
    resolve_later(p);
}

/// `record` and `resolve` in one call, where both follow each other: a first fragment is
/// recorded, a later one resolved. Whole packets (nearly all) pay one call, not two.
#[inline(never)]
pub fn follow<A: Fam>(p: &mut Ip<A>) {
    if !p.frag || (p.proto != PROTO_TCP && p.proto != PROTO_UDP) {
        return;
    }
    if p.l4_present {
        record_first(p);
    } else {
        resolve_later(p);
    }
}

/// `resolve`'s work, for a later fragment of TCP or UDP.
#[inline(always)]
fn resolve_later<A: Fam>(p: &mut Ip<A>) {
    let Some(f) = A::frags_get(p) else {
        return;
    };
    // SAFETY: `f` points into the map value; `seen` is added atomically (fragments of one
    // datagram may be handled on several CPUs at once).
    let f = unsafe { &mut *f };
    if now().saturating_sub(f.created_ns) > FRAG_TIMEOUT_NS {
        A::frags_remove(p);
        return;
    }
    p.sport = f.src_port;
    p.dport = f.dst_port;
    p.ports_known = true;
    if !p.more_fragments {
        f.total = u32::from(p.frag_offset) * 8 + payload(p);
    }
    // SAFETY: as above. (The BPF target's atomic add returns nothing: `seen` is read after.)
    unsafe {
        atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(&raw mut f.seen, payload(p));
    }
    if f.total != 0 && f.seen >= f.total {
        // Every byte has passed: the next datagram with this IP id is another one.
        A::frags_remove(p);
    }
}
