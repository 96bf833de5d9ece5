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
    Global,
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_loop},
};
use nat_common::{
    Config, CtEntry, CtKey, CtMeta, DIR_ORIGINAL, DIR_REPLY, Endpoint, NAT_DNAT, NAT_SNAT,
    ORIGIN_HAIRPIN, ORIGIN_MASQUERADE, ORIGIN_PUBLISHED, PROTO_TCP, PROTO_UDP, Port, PortTarget,
    Reason, ct_timeout_ns, dgram_state, tcp_state, tcp_transition,
};

use crate::{family::Fam, parse::Ip, pkt::Pkt, tcp};

/// The two tables: assured connections, and those not assured yet.
const ASSURED: bool = false;
const FRESH: bool = true;

/// Ports tried from a random start when the original source port is taken.
const SNAT_PROBES: u32 = 32;

/// The tuple the direction of `e` is rewritten to, read in place: a copy would cost the
/// stack (40 bytes for IPv6) on the paths that have the least of it. The fields are written
/// only at creation.
#[inline(always)]
pub fn xlate<A>(e: *const CtEntry<A>) -> &'static CtKey<A> {
    // SAFETY: `e` points at a live map value (or this CPU's scratch slot), which stays
    // mapped while the program runs.
    unsafe { &(*e).xlate }
}

/// The family-neutral part of the entry at `e`.
#[inline(always)]
pub fn meta<A>(e: *mut CtEntry<A>) -> *mut CtMeta {
    // SAFETY: a field address of a live map value; nothing is read.
    unsafe { &raw mut (*e).meta }
}

/// Nanoseconds per jiffy (the kernel's tick, its `TICK_NSEC`), set by the loader
/// (`datapath/clock.rs`); 0 where it could not tell the kernel's HZ.
#[unsafe(no_mangle)]
static CLOCK_JIFFY_NS: Global<u64> = Global::new(0);
/// `CLOCK_MONOTONIC_COARSE` minus `jiffies × CLOCK_JIFFY_NS` (mod 2⁶⁴), set by the loader.
#[unsafe(no_mangle)]
static CLOCK_OFFSET_NS: Global<u64> = Global::new(0);

/// `CLOCK_MONOTONIC_COARSE`, which userspace compares the entries' times with, from the
/// tick count: the verifier inlines `bpf_jiffies64` into a load, where a helper call costs
/// 30–45 ns of every packet on a VM with return thunks.
#[inline(always)]
pub fn now() -> u64 {
    let per = CLOCK_JIFFY_NS.load();
    if per == 0 {
        // SAFETY: helper without arguments.
        return unsafe { bpf_ktime_get_coarse_ns() };
    }
    // SAFETY: helper without arguments.
    unsafe { bpf_jiffies64() }
        .wrapping_mul(per)
        .wrapping_add(CLOCK_OFFSET_NS.load())
}

/// The entry for `key`: assured connections first, then those not assured yet.
#[inline(always)]
pub fn lookup<A: Fam>(key: &CtKey<A>) -> Option<*mut CtEntry<A>> {
    A::ct_get(key, ASSURED).or_else(|| A::ct_get(key, FRESH))
}

/// Delete `key` from both tables.
#[inline(always)]
fn remove<A: Fam>(key: &CtKey<A>) {
    A::ct_remove(key, ASSURED);
    A::ct_remove(key, FRESH);
}

/// Move a connection that just became assured to `conntrack`, where floods of new ones
/// cannot reach it. `e` (the original direction, at `key`) and its peer are copied; the
/// copies left in `conntrack_new` are marked and never found again while `conntrack` holds
/// the connection (a packet being handled on another CPU may still write to them).
#[inline(always)]
fn assure<A: Fam>(key: &CtKey<A>, e: &mut CtEntry<A>) {
    let rk = e.peer_key();
    let Some(r) = A::ct_get(&rk, FRESH) else {
        // Already in `conntrack` (or its other half is gone): nothing to move.
        e.meta.assured = 1;
        return;
    };
    e.meta.assured = 1;
    // SAFETY: a live map value; the helpers below copy it from the map.
    let r = unsafe { &mut *r };
    r.meta.assured = 1;
    if !A::ct_insert(&rk, &*r, ASSURED, u64::from(BPF_ANY))
        || !A::ct_insert(key, &*e, ASSURED, u64::from(BPF_ANY))
    {
        A::ct_remove(&rk, ASSURED);
        e.meta.assured = 0;
        r.meta.assured = 0;
    }
}

/// Whether packets of `e`'s direction come in by the uplink: the replies of a masqueraded
/// connection and the client side of a published one. Container-side directions (and both of
/// a hairpin) are never matched for a packet from outside, whatever its tuple claims.
#[inline(always)]
pub fn arrives_from_outside<A>(e: *const CtEntry<A>) -> bool {
    // SAFETY: read of a live map value; `origin` and `dir` are written only at creation.
    let (origin, dir) = unsafe { ((*e).meta.origin, (*e).meta.dir) };
    (origin == ORIGIN_MASQUERADE && dir == DIR_REPLY)
        || (origin == ORIGIN_PUBLISHED && dir == DIR_ORIGINAL)
}

#[inline(always)]
fn initial_state<A>(p: &Ip<A>) -> u8 {
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
pub fn touch<A: Fam>(
    ctx: &impl Pkt,
    e: *mut CtEntry<A>,
    p: &Ip<A>,
    now: u64,
) -> Result<(), Reason> {
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

/// The key of `e`'s other entry, built in this CPU's second scratch slot instead of on the
/// stack: the port search's callback has little of it (an IPv6 key is 40 bytes). Only while
/// a connection is being set up, before `create` fills that slot.
#[inline(always)]
fn peer_key_tmp<A: Fam>(e: &CtEntry<A>) -> Option<&'static CtKey<A>> {
    let slot = A::scratch(1)?;
    // SAFETY: this CPU's scratch slot, not in use until `create` fills it.
    unsafe {
        (*slot).xlate = e.peer_key();
        Some(&(*slot).xlate)
    }
}

/// Delete the other entry of `e`'s connection.
#[inline(always)]
fn remove_peer<A: Fam>(e: &CtEntry<A>) {
    if let Some(k) = peer_key_tmp(e) {
        remove(k);
    }
}

/// Whether the connection `e` belongs to has been idle past its timeout in both directions.
#[inline(always)]
fn conn_expired<A: Fam>(e: &CtEntry<A>, proto: u8, now: u64) -> bool {
    let mut last = e.meta.last_seen_ns;
    if let Some(peer) = peer_key_tmp(e).and_then(lookup) {
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
fn reclaimable<A: Fam>(e: &CtEntry<A>, proto: u8, now: u64) -> bool {
    let state = e.meta.state;
    (proto == PROTO_TCP && (state == tcp_state::TIME_WAIT || state == tcp_state::CLOSE))
        || conn_expired(e, proto, now)
}

/// Take `key` for a new entry unless a live connection holds it, in either table. Taking
/// over a closed connection's tuple also drops that connection's other entry.
#[inline(always)]
fn claim<A: Fam>(key: &CtKey<A>, e: &CtEntry<A>, now: u64) -> bool {
    if let Some(old) = A::ct_get(key, ASSURED) {
        // SAFETY: a live map value, read in place.
        let old = unsafe { &*old };
        if !reclaimable(old, key.proto, now) {
            return false;
        }
        remove_peer(old);
        A::ct_remove(key, ASSURED);
    }
    if A::ct_insert(key, e, FRESH, u64::from(BPF_NOEXIST)) {
        return true;
    }
    match A::ct_get(key, FRESH) {
        Some(old) => {
            // SAFETY: a live map value, read in place (a copy would cost the callback's
            // stack); a racing writer can only make the reclaim decision stale.
            let old = unsafe { &*old };
            if !reclaimable(old, key.proto, now) {
                return false;
            }
            remove_peer(old);
            A::ct_insert(key, e, FRESH, u64::from(BPF_ANY))
        }
        None => A::ct_insert(key, e, FRESH, u64::from(BPF_NOEXIST)),
    }
}

/// Start a new entry in the scratch slot `e`, owned by the container `owner`.
#[inline(always)]
fn init_entry<A>(e: &mut CtEntry<A>, p: &Ip<A>, now: u64, owner: &Endpoint) {
    // SAFETY: a map value of `CtEntry` (8-byte aligned); all-zero is a valid entry.
    unsafe { crate::pkt::zero(e) };
    e.meta.state = initial_state(p);
    e.meta.ifindex = owner.ifindex;
    e.meta.mac = owner.mac;
    e.meta.created_ns = now;
    e.meta.last_seen_ns = now;
}

/// State of the port search, shared with the `bpf_loop` callback. The reply entry to insert
/// waits in the per-CPU scratch map: the 512-byte stack is shared with the callback.
#[repr(C)]
struct Probe<A> {
    rkey: CtKey<A>,
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
unsafe extern "C" fn probe_one<A: Fam>(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Probe` on the caller's stack that `probe_port` passed in.
    let c = unsafe { &mut *ctx.cast::<Probe<A>>() };
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
    let Some(reply) = A::scratch(0) else {
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
fn probe_port<A: Fam>(rkey: CtKey<A>, cfg: &Config, avoid_host: bool) -> Result<Port, Reason> {
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
            probe_one::<A> as *mut c_void,
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
pub struct NewConn<'a, A> {
    /// The packet's own tuple (`Ip::key`), where the caller keeps it.
    pub key: &'a CtKey<A>,
    /// Source address after translation.
    pub src: A,
    /// Destination address and port after translation.
    pub dst: A,
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
    /// The caller has just found no entry at `key` in either table (so there is none to
    /// remove: a delete of an absent key still takes its bucket's lock).
    pub key_absent: bool,
}

/// Create both entries of a new connection for `p` and return the original direction's.
/// The reply entry is claimed first: its tuple is what must be unique.
#[inline(always)]
pub fn create<A: Fam>(
    ctx: &impl Pkt,
    p: &Ip<A>,
    n: &NewConn<A>,
    cfg: &Config,
    now: u64,
) -> Result<&'static CtKey<A>, Reason> {
    let mut nat = 0;
    if n.src != p.src {
        nat |= NAT_SNAT;
    }
    if n.dst != p.dst || n.dport != p.dport {
        nat |= NAT_DNAT;
    }
    let slot = A::scratch(0).ok_or(Reason::DropHelper)?;
    // SAFETY: per-CPU scratch slot; nothing else on this CPU uses it while we run.
    let reply = unsafe { &mut *slot };
    init_entry(reply, p, now, n.owner);
    reply.xlate = CtKey::new(p.dst, p.src, p.dport, p.sport, p.proto);
    // What the original direction rewrites on the source, the reply rewrites on the
    // destination, and the other way round.
    reply.meta.nat = ((nat & NAT_SNAT) << 1) | ((nat & NAT_DNAT) >> 1);
    reply.meta.dir = DIR_REPLY;
    reply.meta.origin = n.origin;
    reply.meta.generation = n.generation;

    let mut rkey = CtKey::new(n.dst, n.src, n.dport, p.sport, p.proto);
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
        // Published: the client's own tuple, taken over whatever held it. Looked up first: a
        // delete takes the bucket's lock with interrupts off even for a key that is not there,
        // which it almost never is (6 % of the CPU's samples, more than the program's own).
        if A::ct_get(&rkey, ASSURED).is_some() {
            A::ct_remove(&rkey, ASSURED);
        }
        if !A::ct_insert(&rkey, &*reply, FRESH, u64::from(BPF_ANY)) {
            return Err(Reason::DropCtFull);
        }
    }

    // The original direction's entry waits in the second scratch slot, off the stack too.
    let slot = A::scratch(1).ok_or(Reason::DropHelper)?;
    // SAFETY: per-CPU scratch slot, as above.
    let orig = unsafe { &mut *slot };
    init_entry(orig, p, now, n.owner);
    // The packet that opens the connection is its first (as nf_conntrack's accounting).
    orig.meta.packets = 1;
    orig.meta.bytes = u64::from(p.tot_len);
    orig.xlate = rkey.reversed();
    orig.meta.nat = nat;
    orig.meta.dir = DIR_ORIGINAL;
    orig.meta.origin = n.origin;
    orig.meta.generation = n.generation;
    if p.proto == PROTO_TCP {
        tcp::init(ctx, p, &mut orig.meta);
    }
    if !n.key_absent {
        // An assured connection on this tuple would shadow the new one.
        A::ct_remove(n.key, ASSURED);
    }
    if !A::ct_insert(n.key, &*orig, FRESH, u64::from(BPF_ANY)) {
        A::ct_remove(&rkey, FRESH);
        return Err(Reason::DropCtFull);
    }
    Ok(xlate(orig))
}

/// MASQUERADE: `p` from the container `owner` leaves with the SNAT address `snat`.
#[inline(always)]
pub fn create_snat<A: Fam>(
    ctx: &impl Pkt,
    p: &Ip<A>,
    key: &CtKey<A>,
    snat: A,
    cfg: &Config,
    owner: &Endpoint,
    now: u64,
) -> Result<&'static CtKey<A>, Reason> {
    let n = NewConn {
        key,
        src: snat,
        dst: p.dst,
        dport: p.dport,
        alloc_port: true,
        origin: ORIGIN_MASQUERADE,
        generation: 0,
        owner,
        // Only a packet that no connection explains is masqueraded.
        key_absent: true,
    };
    create(ctx, p, &n, cfg, now)
}

/// A client outside connects to the published port `t`; its address is kept. `key`: the
/// packet's tuple, and whether the caller has just found no entry of it in either table.
#[inline(always)]
pub fn create_dnat<A: Fam>(
    ctx: &impl Pkt,
    p: &Ip<A>,
    (key, key_absent): (&CtKey<A>, bool),
    t: &PortTarget<A>,
    cfg: &Config,
    owner: &Endpoint,
    now: u64,
) -> Result<&'static CtKey<A>, Reason> {
    let n = NewConn {
        key,
        src: p.src,
        dst: t.addr,
        dport: t.port,
        alloc_port: false,
        origin: ORIGIN_PUBLISHED,
        generation: t.generation,
        owner,
        // Else an entry of the tuple that a packet from outside must not use may exist.
        key_absent,
    };
    create(ctx, p, &n, cfg, now)
}

/// Hairpin: a container connects to a published port on a node address. The source becomes
/// the family's gateway address `gateway` so that the reply comes back through the datapath
/// (the target may be the sender itself). `key`: the packet's tuple.
#[inline(always)]
pub fn create_hairpin<A: Fam>(
    ctx: &impl Pkt,
    p: &Ip<A>,
    (key, gateway): (&CtKey<A>, A),
    t: &PortTarget<A>,
    cfg: &Config,
    target: &Endpoint,
    now: u64,
) -> Result<&'static CtKey<A>, Reason> {
    let n = NewConn {
        key,
        src: gateway,
        dst: t.addr,
        dport: t.port,
        alloc_port: true,
        origin: ORIGIN_HAIRPIN,
        generation: t.generation,
        owner: target,
        key_absent: true,
    };
    create(ctx, p, &n, cfg, now)
}
