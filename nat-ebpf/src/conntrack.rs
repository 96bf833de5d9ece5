//! Connection tracking: two entries per connection (original and reply tuple), created
//! together, so either direction is one lookup. Entries are never expired on lookup; a
//! connection's age is the newer `last_seen_ns` of its two entries, which is what port
//! allocation here and garbage collection in userspace both use.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_boot_ns},
};
use nat_common::{
    Config, CtEntry, CtKey, DIR_ORIGINAL, DIR_REPLY, NAT_DNAT, NAT_SNAT, ORIGIN_MASQUERADE,
    ORIGIN_PUBLISHED, PROTO_TCP, PortTarget, Reason, ct_timeout_ns, dgram_state, tcp_state,
    tcp_transition,
};

use crate::{maps::CONNTRACK, parse::Ip4};

/// Ports tried from a random start when the original source port is taken.
const SNAT_PROBES: u32 = 32;

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_boot_ns() }
}

#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtEntry> {
    CONNTRACK.get_ptr_mut(key)
}

/// The key of the entry for the other direction of `e`'s connection.
#[inline(always)]
fn peer_key(e: &CtEntry, proto: u8) -> CtKey {
    CtKey {
        src_addr: e.xlate_dst_addr,
        dst_addr: e.xlate_src_addr,
        src_port: e.xlate_dst_port,
        dst_port: e.xlate_src_port,
        proto,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn initial_state(p: &Ip4) -> u8 {
    if p.proto == PROTO_TCP {
        tcp_transition(tcp_state::NONE, DIR_ORIGINAL, p.tcp_flags)
    } else {
        dgram_state::UNREPLIED
    }
}

/// Account a packet to its entry and advance the connection's state in both entries.
#[inline(always)]
pub fn touch(e: *mut CtEntry, p: &Ip4, now: u64) {
    // SAFETY: `e` points into the map value; concurrent updates from other CPUs can only
    // lose a count, never corrupt the translation fields, which are not written here.
    let e = unsafe { &mut *e };
    e.last_seen_ns = now;
    e.packets += 1;
    e.bytes += u64::from(p.tot_len);
    let next = if p.proto == PROTO_TCP {
        tcp_transition(e.state, e.dir, p.tcp_flags)
    } else if e.dir == DIR_REPLY {
        dgram_state::REPLIED
    } else {
        e.state
    };
    if next != e.state {
        e.state = next;
        if let Some(peer) = lookup(&peer_key(e, p.proto)) {
            // SAFETY: as above.
            unsafe { (*peer).state = next };
        }
    }
}

/// Whether the connection `e` belongs to has been idle past its timeout in both directions.
#[inline(always)]
fn conn_expired(e: &CtEntry, proto: u8, now: u64) -> bool {
    let mut last = e.last_seen_ns;
    if let Some(peer) = lookup(&peer_key(e, proto)) {
        // SAFETY: read of a map value.
        let peer_last = unsafe { (*peer).last_seen_ns };
        if peer_last > last {
            last = peer_last;
        }
    }
    now.saturating_sub(last) > ct_timeout_ns(proto, e.state)
}

/// Take `key` for a new entry unless a live connection holds it.
#[inline(always)]
fn claim(key: &CtKey, e: &CtEntry, now: u64) -> bool {
    if CONNTRACK.insert(key, e, u64::from(BPF_NOEXIST)).is_ok() {
        return true;
    }
    match lookup(key) {
        // SAFETY: read of a map value.
        Some(old) if conn_expired(unsafe { &*old }, key.proto, now) => {
            CONNTRACK.insert(key, e, u64::from(BPF_ANY)).is_ok()
        }
        Some(_) => false,
        None => CONNTRACK.insert(key, e, u64::from(BPF_NOEXIST)).is_ok(),
    }
}

#[inline(always)]
fn entry(p: &Ip4, now: u64, ifindex: u32) -> CtEntry {
    CtEntry {
        state: initial_state(p),
        ifindex,
        created_ns: now,
        last_seen_ns: now,
        ..CtEntry::default()
    }
}

/// Create a MASQUERADE connection for `p` (sent by the container behind `ifindex`) and return
/// the entry for its original direction. The source port is kept when the reply tuple is free,
/// otherwise a port is probed for from a random start within the configured range.
#[inline(always)]
pub fn create_snat(p: &Ip4, cfg: &Config, ifindex: u32, now: u64) -> Result<CtEntry, Reason> {
    let mut reply = entry(p, now, ifindex);
    reply.xlate_src_addr = p.dst;
    reply.xlate_dst_addr = p.src;
    reply.xlate_src_port = p.dport;
    reply.xlate_dst_port = p.sport;
    reply.nat = NAT_DNAT;
    reply.dir = DIR_REPLY;
    reply.origin = ORIGIN_MASQUERADE;
    reply.packets = 0;
    reply.bytes = 0;
    // A reply direction nobody has heard from yet: created == last_seen keeps it young.

    let mut rkey = CtKey {
        src_addr: p.dst,
        dst_addr: cfg.snat_addr,
        src_port: p.dport,
        dst_port: p.sport,
        proto: p.proto,
        _pad: [0; 3],
    };
    if !claim(&rkey, &reply, now) {
        let min = u32::from(cfg.port_min);
        let max = u32::from(cfg.port_max);
        let range = if max >= min { max - min + 1 } else { 1 };
        // SAFETY: helper without arguments.
        let start = unsafe { bpf_get_prandom_u32() };
        let mut found = false;
        for i in 0..SNAT_PROBES {
            let port = (min + (start.wrapping_add(i) % range)) as u16;
            rkey.dst_port = port.to_be_bytes();
            if claim(&rkey, &reply, now) {
                found = true;
                break;
            }
        }
        if !found {
            return Err(Reason::DropNoPort);
        }
    }

    let mut orig = entry(p, now, ifindex);
    orig.xlate_src_addr = cfg.snat_addr;
    orig.xlate_dst_addr = p.dst;
    orig.xlate_src_port = rkey.dst_port;
    orig.xlate_dst_port = p.dport;
    orig.nat = NAT_SNAT;
    orig.dir = DIR_ORIGINAL;
    orig.origin = ORIGIN_MASQUERADE;
    if CONNTRACK
        .insert(&p.key(), &orig, u64::from(BPF_ANY))
        .is_err()
    {
        let _ = CONNTRACK.remove(&rkey);
        return Err(Reason::DropCtFull);
    }
    Ok(orig)
}

/// Create a connection from an outside client to the published port that `t` describes and
/// return the entry for its original direction.
#[inline(always)]
pub fn create_dnat(p: &Ip4, t: &PortTarget, ifindex: u32, now: u64) -> Result<CtEntry, Reason> {
    let mut orig = entry(p, now, ifindex);
    orig.xlate_src_addr = p.src;
    orig.xlate_dst_addr = t.addr;
    orig.xlate_src_port = p.sport;
    orig.xlate_dst_port = t.port;
    orig.nat = NAT_DNAT;
    orig.dir = DIR_ORIGINAL;
    orig.origin = ORIGIN_PUBLISHED;
    orig.generation = t.generation;

    let mut reply = orig;
    reply.xlate_src_addr = p.dst;
    reply.xlate_dst_addr = p.src;
    reply.xlate_src_port = p.dport;
    reply.xlate_dst_port = p.sport;
    reply.nat = NAT_SNAT;
    reply.dir = DIR_REPLY;
    let rkey = peer_key(&orig, p.proto);
    if CONNTRACK.insert(&rkey, &reply, u64::from(BPF_ANY)).is_err() {
        return Err(Reason::DropCtFull);
    }
    if CONNTRACK
        .insert(&p.key(), &orig, u64::from(BPF_ANY))
        .is_err()
    {
        let _ = CONNTRACK.remove(&rkey);
        return Err(Reason::DropCtFull);
    }
    Ok(orig)
}
