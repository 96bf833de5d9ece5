//! Events for `bpfnat monitor`: a dropped packet, a new connection, a tracked packet's
//! translation. While nobody listens the `monitor` word is zero, and a packet pays one array
//! read and a test where a decision is traced or a drop decided.
//!
//! A decision deep in the call chain only fills in this CPU's draft event (`dropped`,
//! `traced`) and sets `DRAFTED` in the action it returns; the entry point strips the bit
//! and sends the event (`report_tc`, `report_xdp`), where the 512-byte stack has room for
//! the call that does, straight into the ring buffer's memory, after a per-CPU token bucket
//! admits it.

use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};
use nat_common::{
    CtKey, EV_DROP, EV_TRACE, EvTuple, HOOK_TC_CONTAINER, HOOK_TC_UPLINK, HOOK_XDP_UPLINK,
    MON_DROP, MON_TRACE, MonitorCpu, MonitorCtl, MonitorEvent, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    PROTO_UDP, Reason,
};

use crate::{
    family::Fam,
    lookup::config,
    maps::{EVENTS, MONITOR, MONITOR_CPU},
    parse::{IP_OFF, Ip, ptr_at},
    pkt::{Pkt, zero},
};

/// Whether events of `flags` (`MON_*`) are wanted.
#[inline(always)]
fn wanted(flags: u32) -> bool {
    // The `explain` build sends nothing.
    !cfg!(feature = "explain") && MONITOR.get(0).is_some_and(|c| c.flags & flags != 0)
}

/// This CPU's monitor state.
#[inline(always)]
fn cpu() -> Option<&'static mut MonitorCpu> {
    // SAFETY: this CPU's slot; nothing else writes it while the program runs.
    MONITOR_CPU.get_ptr_mut(0).map(|c| unsafe { &mut *c })
}

/// The bit a decision that drafted an event sets in its program's action (TC and XDP
/// actions are small non-negative numbers).
const DRAFTED: u32 = 1 << 30;

/// `DRAFTED` as a TC action bit, when `drafted`.
#[inline(always)]
pub fn tc_mark(drafted: bool) -> i32 {
    if drafted { DRAFTED as i32 } else { 0 }
}

/// `DRAFTED` as an XDP action bit, when `drafted`.
#[inline(always)]
pub fn xdp_mark(drafted: bool) -> u32 {
    if drafted { DRAFTED } else { 0 }
}

/// A packet is dropped for `reason` (called by the programs' verdicts, wherever they are).
/// Whether an event was drafted.
#[inline(always)]
pub fn dropped(reason: Reason) -> bool {
    if wanted(MON_DROP)
        && let Some(c) = cpu()
    {
        c.draft.kind = EV_DROP;
        c.draft.reason = reason as u32;
        return true;
    }
    false
}

/// A decision that sends a packet of `p`'s tuple on as `x` (a new connection's translation,
/// a tracked packet's) to the interface `out`. Whether an event was drafted.
#[inline(always)]
pub fn traced<A: Fam>(reason: Reason, p: &Ip<A>, x: &CtKey<A>, out: u32) -> bool {
    if wanted(MON_TRACE)
        && let Some(c) = cpu()
    {
        draft(c, reason, p, out);
        let after = &mut c.draft.after;
        fill(after, &x.src_addr, &x.dst_addr, x.src_port, x.dst_port);
        return true;
    }
    false
}

/// A decision without a connection (forwarding between containers, static NAT) that sends
/// `p` on with the addresses `(src, dst)` and its ports as they are. Whether an event was
/// drafted.
#[inline(always)]
pub fn traced_addrs<A: Fam>(reason: Reason, p: &Ip<A>, (src, dst): (&A, &A), out: u32) -> bool {
    if wanted(MON_TRACE)
        && let Some(c) = cpu()
    {
        draft(c, reason, p, out);
        fill(&mut c.draft.after, src, dst, p.sport, p.dport);
        return true;
    }
    false
}

/// An ICMP error about a tracked connection, sent on with the outer addresses `(src, dst)`
/// (F7). Its caller marks its action `DRAFTED` whether or not an event was drafted (`send`
/// finds none then): errors are rare, and a constant mark leaves the verifier one path
/// through the delivery that follows instead of two.
#[inline(always)]
pub fn traced_icmp_error<A: Fam>(p: &Ip<A>, (src, dst): (&A, &A)) {
    let _ = traced_addrs(Reason::IcmpError, p, (src, dst), 0);
}

/// A decision that sends the packet on untranslated to `out` (forwarding between containers
/// before the packet is parsed): its tuple is read from its headers when the event is sent.
/// Whether an event was drafted.
#[inline(always)]
pub fn traced_as_is(reason: Reason, out: u32) -> bool {
    if wanted(MON_TRACE)
        && let Some(c) = cpu()
    {
        let d = &mut c.draft;
        d.kind = EV_TRACE;
        d.reason = reason as u32;
        d.out_ifindex = out;
        // No family yet: `send` reads the headers.
        d.family = 0;
        return true;
    }
    false
}

/// A trace draft's common part: the decision, the packet as it arrived, where it goes.
#[inline(always)]
fn draft<A: Fam>(c: &mut MonitorCpu, reason: Reason, p: &Ip<A>, out: u32) {
    let d = &mut c.draft;
    d.kind = EV_TRACE;
    d.reason = reason as u32;
    d.family = if size_of::<A>() == 4 { 4 } else { 6 };
    d.proto = p.proto;
    d.out_ifindex = out;
    fill(&mut d.before, &p.src, &p.dst, p.sport, p.dport);
}

#[inline(always)]
fn fill<A>(t: &mut EvTuple, src: &A, dst: &A, sport: [u8; 2], dport: [u8; 2]) {
    let n = size_of::<A>().min(16);
    // SAFETY: `A` is a 4- or 16-byte address; `n` bytes of each fit the tuple's fields.
    unsafe {
        core::ptr::copy_nonoverlapping((src as *const A).cast::<u8>(), t.src.as_mut_ptr(), n);
        core::ptr::copy_nonoverlapping((dst as *const A).cast::<u8>(), t.dst.as_mut_ptr(), n);
    }
    t.sport = sport;
    t.dport = dport;
}

/// At a TC program's entry point, as it returns `action`: send the event a decision drafted,
/// if one did, and return the action without its `DRAFTED` bit.
#[inline(always)]
pub fn report_tc(ctx: &TcContext, action: i32) -> i32 {
    if action >= 0 && action as u32 & DRAFTED != 0 {
        send(ctx);
        return action & !(DRAFTED as i32);
    }
    action
}

/// The same for XDP.
#[inline(always)]
pub fn report_xdp(ctx: &XdpContext, action: u32) -> u32 {
    if action & DRAFTED != 0 {
        send(ctx);
        return action & !DRAFTED;
    }
    action
}

/// The program a packet is seen by, and the interface it arrived on.
pub trait Seen: Pkt {
    fn seen(&self) -> (u8, u32);
}

impl Seen for TcContext {
    #[inline(always)]
    fn seen(&self) -> (u8, u32) {
        // SAFETY: reading a field of the program's own `__sk_buff`.
        let ifindex = unsafe { (*self.skb.skb).ifindex };
        let uplink = config().is_ok_and(|c| c.uplink_ifindex == ifindex);
        let hook = if uplink {
            HOOK_TC_UPLINK
        } else {
            HOOK_TC_CONTAINER
        };
        (hook, ifindex)
    }
}

impl Seen for XdpContext {
    #[inline(always)]
    fn seen(&self) -> (u8, u32) {
        (HOOK_XDP_UPLINK, self.ingress_ifindex() as u32)
    }
}

/// Take one of this CPU's tokens (refilled at `MonitorCtl::rate` per second, at most a
/// second's worth kept), while the monitor's lease holds; a refusal is counted.
#[inline(always)]
fn admit(c: &mut MonitorCpu, now: u64) -> bool {
    let Some(ctl) = MONITOR.get(0) else {
        return false;
    };
    if now > ctl.lease_until_ns {
        return false;
    }
    let rate = u64::from(ctl.rate);
    let elapsed = now.saturating_sub(c.refilled_ns).min(1_000_000_000);
    let refill = elapsed * rate / 1_000_000_000;
    if refill > 0 {
        c.tokens = (c.tokens + refill).min(rate);
        c.refilled_ns = now;
    }
    if c.tokens == 0 {
        c.lost_rate += 1;
        return false;
    }
    c.tokens -= 1;
    true
}

/// Count an event the full ring buffer refused.
#[inline(always)]
fn lost_full(c: &mut MonitorCpu) {
    c.lost_full += 1;
}

#[inline(never)]
fn send<C: Seen>(ctx: &C) {
    let Some(c) = cpu() else {
        return;
    };
    let kind = c.draft.kind;
    if kind == 0 {
        return;
    }
    c.draft.kind = 0;
    let Some(ctl) = MONITOR.get(0) else {
        return;
    };
    // A draft left behind by a decision that ended otherwise, under other flags.
    let wants = if kind == EV_DROP { MON_DROP } else { MON_TRACE };
    if ctl.flags & wants == 0 {
        return;
    }
    let d = &mut c.draft;
    if kind == EV_DROP || d.family == 0 {
        // A drop's tuple, and an untranslated packet's, is what its headers show.
        let (reason, out) = (d.reason, d.out_ifindex);
        // SAFETY: a map value of `MonitorEvent` (8-aligned); all-zero is valid.
        unsafe { zero(d) };
        d.reason = reason;
        peek(ctx, d);
        if kind == EV_TRACE {
            d.out_ifindex = out;
            d.after = d.before;
        }
    }
    let (hook, ifindex) = ctx.seen();
    d.kind = kind;
    d.hook = hook;
    d.ifindex = ifindex;
    d.len = ctx.bytes();
    let keep = shown(ctl, d);
    d.kind = 0;
    if !keep {
        return;
    }
    // The precise clock for the event's time (the coarse one ticks in milliseconds).
    // SAFETY: helper without arguments.
    let t = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    if !admit(c, t) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve_untyped::<MonitorEvent>(0) else {
        lost_full(c);
        return;
    };
    // SAFETY: the reservation is a whole, 8-aligned `MonitorEvent`, written whole here.
    let e = unsafe { &mut *entry.as_mut_ptr() };
    // Not `*e = c.draft`: between two map values the compiler made that a `memmove` call,
    // a byte loop on the BPF target; this is expanded in line.
    // SAFETY: the draft (this CPU's map value) and the reservation are distinct.
    unsafe { core::ptr::copy_nonoverlapping(&raw const c.draft, e, 1) };
    e.kind = kind;
    e.time_ns = t;
    entry.submit(0);
}

/// Whether the monitor's filters (`MonitorCtl`) let the event `d` through.
#[inline(always)]
fn shown(ctl: &MonitorCtl, d: &MonitorEvent) -> bool {
    let iface = ctl.ifindex == 0 || d.ifindex == ctl.ifindex || d.out_ifindex == ctl.ifindex;
    let reason = ctl.reason == 0 || d.reason + 1 == ctl.reason;
    let proto = match ctl.proto {
        0 => true,
        PROTO_ICMP => d.proto == PROTO_ICMP || d.proto == PROTO_ICMPV6,
        p => d.proto == p,
    };
    let p = ctl.port;
    let port = p == [0, 0]
        || d.before.sport == p
        || d.before.dport == p
        || d.after.sport == p
        || d.after.dport == p;
    iface && reason && proto && port
}

/// The addresses, protocol and ports of the packet as it is, read straight from its headers
/// (IPv4 options and IPv6 extension headers are not walked: ports then stay zero).
#[inline(always)]
fn peek(ctx: &impl Pkt, e: &mut MonitorEvent) {
    let Some(ty) = ptr_at::<[u8; 2]>(ctx, 12) else {
        return;
    };
    // SAFETY: bounds checked by `ptr_at`.
    let ty = unsafe { &*ty };
    let l4_off = if *ty == [0x08, 0x00] {
        let Some(h) = ptr_at::<[u8; 20]>(ctx, IP_OFF) else {
            return;
        };
        // SAFETY: as above.
        let h = unsafe { &*h };
        e.family = 4;
        e.proto = h[9];
        e.before.src[..4].copy_from_slice(&h[12..16]);
        e.before.dst[..4].copy_from_slice(&h[16..20]);
        let later_fragment = (u16::from_be_bytes([h[6], h[7]]) & 0x1fff) != 0;
        if h[0] != 0x45 || later_fragment {
            return;
        }
        IP_OFF + 20
    } else if *ty == [0x86, 0xdd] {
        let Some(h) = ptr_at::<[u8; 40]>(ctx, IP_OFF) else {
            return;
        };
        // SAFETY: as above.
        let h = unsafe { &*h };
        e.family = 6;
        e.proto = h[6];
        e.before.src.copy_from_slice(&h[8..24]);
        e.before.dst.copy_from_slice(&h[24..40]);
        IP_OFF + 40
    } else {
        return;
    };
    let Some(l4) = ptr_at::<[u8; 8]>(ctx, l4_off) else {
        return;
    };
    // SAFETY: as above.
    let l4 = unsafe { &*l4 };
    match e.proto {
        PROTO_TCP | PROTO_UDP => {
            e.before.sport = [l4[0], l4[1]];
            e.before.dport = [l4[2], l4[3]];
        }
        // Echo request/reply: the id, where conntrack keys it.
        PROTO_ICMP | PROTO_ICMPV6 if matches!(l4[0], 0 | 8 | 128 | 129) => {
            if l4[0] == 8 || l4[0] == 128 {
                e.before.sport = [l4[4], l4[5]];
            } else {
                e.before.dport = [l4[4], l4[5]];
            }
        }
        _ => {}
    }
}
