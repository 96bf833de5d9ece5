//! Connection tracking: two entries per connection (original and reply tuple), created
//! together, so either direction is one lookup. New connections go to `conntrack_new` and
//! move to `conntrack` once assured, so a flood of new ones cannot evict established ones. Entries are never expired on lookup; a
//! connection's age is the newer `last_seen_ns` of its two entries, which is what port
//! allocation here and garbage collection in userspace both use.

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_loop},
};
use nat_common::{
    Addr4, Config, CtEntry4, CtKey4, CtMeta, DIR_ORIGINAL, DIR_REPLY, Endpoint, NAT_DNAT, NAT_SNAT,
    ORIGIN_HAIRPIN, ORIGIN_MASQUERADE, ORIGIN_PUBLISHED, PROTO_TCP, PROTO_UDP, Port, PortTarget4,
    Reason, ct_timeout_ns, dgram_state, tcp_state, tcp_transition,
};

use crate::{
    maps::{CONNTRACK, CONNTRACK_NEW, SCRATCH},
    parse::Ip4,
    pkt::Pkt,
    tcp,
};

/// Ports tried from a random start when the original source port is taken.
const SNAT_PROBES: u32 = 32;

/// The tuple one direction of a connection is rewritten to: the part of a `CtEntry4` the
/// rewrite needs, small enough to keep on the stack.
#[derive(Clone, Copy)]
pub struct Xlate {
    pub src: Addr4,
    pub dst: Addr4,
    pub sport: Port,
    pub dport: Port,
}

impl Xlate {
    /// Read from a map value (the entry itself stays in the map).
    #[inline(always)]
    pub fn of(e: *const CtEntry4) -> Self {
        // SAFETY: `e` points at a live map value; these fields are written only at creation.
        unsafe {
            Self {
                src: (*e).xlate.src_addr,
                dst: (*e).xlate.dst_addr,
                sport: (*e).xlate.src_port,
                dport: (*e).xlate.dst_port,
            }
        }
    }
}

/// The family-neutral part of the entry at `e`.
#[inline(always)]
pub fn meta(e: *mut CtEntry4) -> *mut CtMeta {
    // SAFETY: a field address of a live map value; nothing is read.
    unsafe { &raw mut (*e).meta }
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The entry for `key`: assured connections first, then those not assured yet.
#[inline(always)]
pub fn lookup(key: &CtKey4) -> Option<*mut CtEntry4> {
    CONNTRACK
        .get_ptr_mut(key)
        .or_else(|| CONNTRACK_NEW.get_ptr_mut(key))
}

/// Delete `key` from both tables.
#[inline(always)]
fn remove(key: &CtKey4) {
    let _ = CONNTRACK.remove(key);
    let _ = CONNTRACK_NEW.remove(key);
}

/// Move a connection that just became assured to `conntrack`, where floods of new ones
/// cannot reach it. `e` (the original direction, at `key`) and its peer are copied; the
/// copies left in `conntrack_new` are marked and never found again while `conntrack` holds
/// the connection (a packet being handled on another CPU may still write to them).
#[inline(always)]
fn assure(key: &CtKey4, e: &mut CtEntry4) {
    let rk = e.peer_key();
    let Some(r) = CONNTRACK_NEW.get_ptr_mut(&rk) else {
        // Already in `conntrack` (or its other half is gone): nothing to move.
        e.meta.assured = 1;
        return;
    };
    e.meta.assured = 1;
    // SAFETY: a live map value; the helpers below copy it from the map.
    let r = unsafe { &mut *r };
    r.meta.assured = 1;
    if CONNTRACK.insert(&rk, &*r, u64::from(BPF_ANY)).is_err()
        || CONNTRACK.insert(key, &*e, u64::from(BPF_ANY)).is_err()
    {
        let _ = CONNTRACK.remove(&rk);
        e.meta.assured = 0;
        r.meta.assured = 0;
    }
}

/// Whether packets of `e`'s direction come in by the uplink: the replies of a masqueraded
/// connection and the client side of a published one. Container-side directions (and both of
/// a hairpin) are never matched for a packet from outside, whatever its tuple claims.
#[inline(always)]
pub fn arrives_from_outside(e: *const CtEntry4) -> bool {
    // SAFETY: read of a live map value; `origin` and `dir` are written only at creation.
    let (origin, dir) = unsafe { ((*e).meta.origin, (*e).meta.dir) };
    (origin == ORIGIN_MASQUERADE && dir == DIR_REPLY)
        || (origin == ORIGIN_PUBLISHED && dir == DIR_ORIGINAL)
}

#[inline(always)]
fn initial_state(p: &Ip4) -> u8 {
    if p.proto == PROTO_TCP {
        tcp_transition(tcp_state::NONE, 0, DIR_ORIGINAL, p.tcp_flags).0
    } else {
        dgram_state::UNREPLIED
    }
}

/// Account a packet to its entry and advance the connection's state in both entries. TCP
/// segments are checked against the window first: `Err` for an RST outside it. A connection
/// that has become assured moves to `conntrack`.
#[inline(always)]
pub fn touch(ctx: &impl Pkt, e: *mut CtEntry4, p: &Ip4, now: u64) -> Result<(), Reason> {
    let both_seen = if p.proto == PROTO_TCP {
        tcp::track(ctx, e, p)?
    } else {
        false
    };
    // SAFETY: `e` points into the map value; the counters are added atomically (packets of
    // one direction may be handled on several CPUs at once), the rest are plain stores that
    // concurrent writers race to the same values.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*e).meta.packets, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
            &raw mut (*e).meta.bytes,
            u64::from(p.tot_len),
        );
    }
    // SAFETY: as above.
    let e = unsafe { &mut *e };
    e.meta.last_seen_ns = now;
    if p.proto != PROTO_TCP && e.meta.dir == DIR_REPLY && e.meta.state != dgram_state::REPLIED {
        e.meta.state = dgram_state::REPLIED;
        if let Some(peer) = lookup(&e.peer_key()) {
            // SAFETY: as above.
            unsafe { (*peer).meta.state = dgram_state::REPLIED };
        }
    }
    // Assured as nf_conntrack has it: TCP established with both sides seen in the window,
    // UDP used again after its answer. ICMP echo stays where it is (short-lived).
    let assured = if p.proto == PROTO_TCP {
        both_seen && e.meta.state == tcp_state::ESTABLISHED
    } else {
        p.proto == PROTO_UDP && e.meta.state == dgram_state::REPLIED
    };
    if assured && e.meta.assured == 0 && e.meta.dir == DIR_ORIGINAL {
        assure(&p.key(), e);
    }
    Ok(())
}

/// Whether the connection `e` belongs to has been idle past its timeout in both directions.
#[inline(always)]
fn conn_expired(e: &CtEntry4, proto: u8, now: u64) -> bool {
    let mut last = e.meta.last_seen_ns;
    if let Some(peer) = lookup(&e.peer_key()) {
        // SAFETY: read of a map value.
        let peer_last = unsafe { (*peer).meta.last_seen_ns };
        if peer_last > last {
            last = peer_last;
        }
    }
    now.saturating_sub(last) > ct_timeout_ns(proto, e.meta.state)
}

/// Whether the connection `e` belongs to may give its tuple to a new one: idle past its
/// timeout, or a closed TCP connection (TIME_WAIT, CLOSE), which nf_nat also reuses — else a
/// busy host would run out of ports to closed connections waiting out their 120 s.
#[inline(always)]
fn reclaimable(e: &CtEntry4, proto: u8, now: u64) -> bool {
    let state = e.meta.state;
    (proto == PROTO_TCP && (state == tcp_state::TIME_WAIT || state == tcp_state::CLOSE))
        || conn_expired(e, proto, now)
}

/// Take `key` for a new entry unless a live connection holds it, in either table. Taking
/// over a closed connection's tuple also drops that connection's other entry.
#[inline(always)]
fn claim(key: &CtKey4, e: &CtEntry4, now: u64) -> bool {
    if let Some(old) = CONNTRACK.get_ptr(key) {
        // SAFETY: a live map value, read in place.
        let old = unsafe { &*old };
        if !reclaimable(old, key.proto, now) {
            return false;
        }
        remove(&old.peer_key());
        let _ = CONNTRACK.remove(key);
    }
    if CONNTRACK_NEW.insert(key, e, u64::from(BPF_NOEXIST)).is_ok() {
        return true;
    }
    match CONNTRACK_NEW.get_ptr(key) {
        Some(old) => {
            // SAFETY: a live map value, read in place (a copy would cost the callback's
            // stack); a racing writer can only make the reclaim decision stale.
            let old = unsafe { &*old };
            if !reclaimable(old, key.proto, now) {
                return false;
            }
            remove(&old.peer_key());
            CONNTRACK_NEW.insert(key, e, u64::from(BPF_ANY)).is_ok()
        }
        None => CONNTRACK_NEW.insert(key, e, u64::from(BPF_NOEXIST)).is_ok(),
    }
}

/// Start a new entry in the scratch slot `e`, owned by the container `owner`.
#[inline(always)]
fn init_entry(e: &mut CtEntry4, p: &Ip4, now: u64, owner: &Endpoint) {
    // SAFETY: a map value of `CtEntry4` (8-byte aligned); all-zero is a valid entry.
    unsafe { crate::pkt::zero(e) };
    e.meta.state = initial_state(p);
    e.meta.ifindex = owner.ifindex;
    e.meta.mac = owner.mac;
    e.meta.created_ns = now;
    e.meta.last_seen_ns = now;
}

/// State of the port search, shared with the `bpf_loop` callback. The reply entry to insert
/// waits in the per-CPU `SCRATCH` map: the 512-byte stack is shared with the callback.
#[repr(C)]
struct Probe {
    rkey: CtKey4,
    start: u32,
    /// How many ports may be picked (the range less the avoided block).
    range: u32,
    min: u16,
    /// Ports to step over (the node's own ephemeral range), inclusive; `avoid_min >
    /// avoid_max` avoids nothing. Kept small: the callback shares the 512-byte stack.
    avoid_min: u16,
    avoid_max: u16,
    found: u16,
}

/// One candidate port: `bpf_loop` callback (1 stops the loop).
unsafe extern "C" fn probe_one(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Probe` on the caller's stack that `probe_port` passed in.
    let c = unsafe { &mut *ctx.cast::<Probe>() };
    let off = c
        .start
        .wrapping_add(i as u32)
        .checked_rem(c.range)
        .unwrap_or(0);
    // `range` counts only the allowed ports: step over the avoided block.
    let mut port = u32::from(c.min) + off;
    if c.avoid_min <= c.avoid_max && port >= u32::from(c.avoid_min) {
        port += u32::from(c.avoid_max - c.avoid_min) + 1;
    }
    c.rkey.dst_port = (port as u16).to_be_bytes();
    let Some(reply) = SCRATCH.get_ptr(0) else {
        return 1;
    };
    // SAFETY: per-CPU scratch slot, written by `create` just before the loop.
    if claim(&c.rkey, unsafe { &*reply }, now()) {
        c.found = 1;
        return 1;
    }
    0
}

/// Claim a free reply tuple by probing `SNAT_PROBES` ports of the configured range from a
/// random start. `bpf_loop` makes the verifier check the body once instead of once per
/// iteration and caller path.
#[inline(always)]
fn probe_port(rkey: CtKey4, cfg: &Config, avoid_host: bool) -> Result<Port, Reason> {
    let min = u32::from(cfg.port_min);
    let max = u32::from(cfg.port_max);
    // The part of the node's ephemeral range that falls inside the allocation range.
    let (mut avoid_min, mut avoid_max) = (1u32, 0u32);
    if avoid_host {
        let lo = u32::from(cfg.host_port_min).max(min);
        let hi = u32::from(cfg.host_port_max).min(max);
        if lo <= hi {
            (avoid_min, avoid_max) = (lo, hi);
        }
    }
    let full = if max >= min { max - min + 1 } else { 1 };
    let skipped = if avoid_min <= avoid_max {
        avoid_max - avoid_min + 1
    } else {
        0
    };
    let mut c = Probe {
        rkey,
        // SAFETY: helper without arguments.
        start: unsafe { bpf_get_prandom_u32() },
        range: if full > skipped { full - skipped } else { 1 },
        min: cfg.port_min,
        avoid_min: avoid_min as u16,
        avoid_max: avoid_max as u16,
        found: 0,
    };
    // SAFETY: the callback only touches `c`, which outlives the call.
    unsafe {
        bpf_loop(
            SNAT_PROBES,
            probe_one as *mut c_void,
            (&raw mut c).cast::<c_void>(),
            0,
        );
    }
    if c.found == 1 {
        Ok(c.rkey.dst_port)
    } else {
        Err(Reason::DropNoPort)
    }
}

/// How a new connection is translated in its original direction.
pub struct NewConn<'a> {
    /// Source address after translation.
    pub src: Addr4,
    /// Destination address and port after translation.
    pub dst: Addr4,
    pub dport: Port,
    /// Find a source port (keep the original when free, else probe the configured range);
    /// `false` keeps the source port as it is.
    pub alloc_port: bool,
    /// `ORIGIN_*`.
    pub origin: u8,
    /// The mapping's generation (published ports).
    pub generation: u32,
    /// The container the connection belongs to.
    pub owner: &'a Endpoint,
}

/// Create both entries of a new connection for `p` and return the original direction's.
/// The reply entry is claimed first: its tuple is what must be unique.
#[inline(always)]
pub fn create(
    ctx: &impl Pkt,
    p: &Ip4,
    n: &NewConn,
    cfg: &Config,
    now: u64,
) -> Result<Xlate, Reason> {
    let mut nat = 0;
    if n.src != p.src {
        nat |= NAT_SNAT;
    }
    if n.dst != p.dst || n.dport != p.dport {
        nat |= NAT_DNAT;
    }
    let slot = SCRATCH.get_ptr_mut(0).ok_or(Reason::DropHelper)?;
    // SAFETY: per-CPU scratch slot; nothing else on this CPU uses it while we run.
    let reply = unsafe { &mut *slot };
    init_entry(reply, p, now, n.owner);
    reply.xlate = CtKey4::new(p.dst, p.src, p.dport, p.sport, p.proto);
    // What the original direction rewrites on the source, the reply rewrites on the
    // destination, and the other way round.
    reply.meta.nat = ((nat & NAT_SNAT) << 1) | ((nat & NAT_DNAT) >> 1);
    reply.meta.dir = DIR_REPLY;
    reply.meta.origin = n.origin;
    reply.meta.generation = n.generation;

    let mut rkey = CtKey4::new(n.dst, n.src, n.dport, p.sport, p.proto);
    if n.alloc_port {
        // TCP/UDP source ports in the node's ephemeral range may be in use by the node itself
        // on the same address: never keep or pick those.
        let avoid_host = p.proto == PROTO_TCP || p.proto == PROTO_UDP;
        let sport = u16::from_be_bytes(p.sport);
        let host_owned = avoid_host && sport >= cfg.host_port_min && sport <= cfg.host_port_max;
        if host_owned || !claim(&rkey, reply, now) {
            rkey.dst_port = probe_port(rkey, cfg, avoid_host)?;
        }
    } else {
        // Published: the client's own tuple, taken over whatever held it.
        let _ = CONNTRACK.remove(&rkey);
        if CONNTRACK_NEW
            .insert(&rkey, &*reply, u64::from(BPF_ANY))
            .is_err()
        {
            return Err(Reason::DropCtFull);
        }
    }

    // The original direction's entry waits in the second scratch slot, off the stack too.
    let slot = SCRATCH.get_ptr_mut(1).ok_or(Reason::DropHelper)?;
    // SAFETY: per-CPU scratch slot, as above.
    let orig = unsafe { &mut *slot };
    init_entry(orig, p, now, n.owner);
    orig.xlate = rkey.reversed();
    orig.meta.nat = nat;
    orig.meta.dir = DIR_ORIGINAL;
    orig.meta.origin = n.origin;
    orig.meta.generation = n.generation;
    if p.proto == PROTO_TCP {
        tcp::init(ctx, p, &mut orig.meta);
    }
    // An assured connection on this tuple would shadow the new one.
    let _ = CONNTRACK.remove(&p.key());
    if CONNTRACK_NEW
        .insert(&p.key(), &*orig, u64::from(BPF_ANY))
        .is_err()
    {
        let _ = CONNTRACK_NEW.remove(&rkey);
        return Err(Reason::DropCtFull);
    }
    Ok(Xlate::of(orig))
}

/// MASQUERADE: `p` from the container behind `ifindex` leaves with the SNAT address.
#[inline(always)]
pub fn create_snat(
    ctx: &impl Pkt,
    p: &Ip4,
    cfg: &Config,
    owner: &Endpoint,
    now: u64,
) -> Result<Xlate, Reason> {
    let n = NewConn {
        src: cfg.v4.snat_addr,
        dst: p.dst,
        dport: p.dport,
        alloc_port: true,
        origin: ORIGIN_MASQUERADE,
        generation: 0,
        owner,
    };
    create(ctx, p, &n, cfg, now)
}

/// A client outside connects to the published port `t`; its address is kept.
#[inline(always)]
pub fn create_dnat(
    ctx: &impl Pkt,
    p: &Ip4,
    t: &PortTarget4,
    cfg: &Config,
    owner: &Endpoint,
    now: u64,
) -> Result<Xlate, Reason> {
    let n = NewConn {
        src: p.src,
        dst: t.addr,
        dport: t.port,
        alloc_port: false,
        origin: ORIGIN_PUBLISHED,
        generation: t.generation,
        owner,
    };
    create(ctx, p, &n, cfg, now)
}

/// Hairpin: a container connects to a published port on a node address. The source becomes
/// the gateway address so that the reply comes back through the datapath (the target may be
/// the sender itself).
#[inline(always)]
pub fn create_hairpin(
    ctx: &impl Pkt,
    p: &Ip4,
    t: &PortTarget4,
    cfg: &Config,
    target: &Endpoint,
    now: u64,
) -> Result<Xlate, Reason> {
    let n = NewConn {
        src: cfg.v4.gateway_addr,
        dst: t.addr,
        dport: t.port,
        alloc_port: true,
        origin: ORIGIN_HAIRPIN,
        generation: t.generation,
        owner: target,
    };
    create(ctx, p, &n, cfg, now)
}
