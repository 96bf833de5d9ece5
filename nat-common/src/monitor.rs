//! Live datapath events (`bpfnat monitor`): the `monitor` control array, the per-CPU
//! `monitor_cpu` rate limiter and the `events` ring buffer the programs write to while
//! someone listens.

use bytemuck::{Pod, Zeroable};

/// `MonitorCtl::flags`: emit an event for every dropped packet.
pub const MON_DROP: u32 = 1 << 0;
/// `MonitorCtl::flags`: emit an event for every new connection and every translation or
/// redirect decision of a tracked connection.
pub const MON_TRACE: u32 = 1 << 1;

/// Bytes of the `events` ring buffer (a power of two pages): about 10,000 events.
pub const EVENTS_BYTES: u32 = 1 << 20;

/// The single entry of the `monitor` array: what the programs emit. All zero while nobody
/// listens, and then the programs test one flag word and emit nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct MonitorCtl {
    /// `MON_*` bits.
    pub flags: u32,
    /// Events per second each CPU may emit; more are counted in `MonitorCpu::lost_rate`.
    pub rate: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) time after which nothing is emitted whatever `flags` say: the
    /// monitor renews it every second, so one that was killed stops costing within seconds.
    pub lease_until_ns: u64,
    /// Filters, applied before the rate limit so that it is spent on what the monitor shows;
    /// zero: any. The interface a packet arrived on or is sent to (a container's host veth).
    pub ifindex: u32,
    /// The `Reason` plus one.
    pub reason: u32,
    /// A source or destination port, before or after translation (network order).
    pub port: [u8; 2],
    /// The IP protocol; `PROTO_ICMP` stands for ICMPv6 too.
    pub proto: u8,
    pub _pad: [u8; 5],
}

/// The per-CPU entry of `monitor_cpu`: a token bucket, and the events it or the ring buffer
/// refused (the monitor shows them as lost).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct MonitorCpu {
    /// Events this CPU may still emit (at most `MonitorCtl::rate`).
    pub tokens: u64,
    /// When the bucket was last refilled (`bpf_ktime_get_ns`).
    pub refilled_ns: u64,
    /// Events not emitted: over the rate.
    pub lost_rate: u64,
    /// Events not emitted: the ring buffer was full (the monitor reads too slowly).
    pub lost_full: u64,
    /// The event of the packet being decided on this CPU (`kind` 0: none yet). The decision
    /// fills it in wherever it is taken; the program's entry point sends it as it returns,
    /// where the 512-byte stack has room for the call that does.
    pub draft: MonitorEvent,
}

/// `MonitorEvent::kind`.
pub const EV_DROP: u8 = 1;
pub const EV_TRACE: u8 = 2;

/// `MonitorEvent::hook`: which program saw the packet.
pub const HOOK_TC_CONTAINER: u8 = 1;
pub const HOOK_TC_UPLINK: u8 = 2;
pub const HOOK_XDP_UPLINK: u8 = 3;

/// A packet's addresses and ports as an event carries them: an IPv4 address in the first
/// four bytes of its field, the rest zero. Network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct EvTuple {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Ports, or for ICMP echo the id (as conntrack keys it); zero when there are none.
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}

/// One record of the `events` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct MonitorEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the packet was decided.
    pub time_ns: u64,
    /// `EV_*`.
    pub kind: u8,
    /// `HOOK_*`.
    pub hook: u8,
    /// 4 or 6; 0 when the packet is not IP (or too short to tell).
    pub family: u8,
    /// IP protocol (IPv6: the upper-layer header's), 0 when unknown.
    pub proto: u8,
    /// The `Reason` the packet was counted under: why it was dropped, or the decision traced.
    pub reason: u32,
    /// The interface the packet arrived on.
    pub ifindex: u32,
    /// Its length (the whole frame).
    pub len: u32,
    /// Trace: the interface it is sent to (0: handed to the stack).
    pub out_ifindex: u32,
    pub _pad: u32,
    /// The tuple as the packet arrived.
    pub before: EvTuple,
    /// Trace: the tuple after translation (equal to `before` when nothing changed). Drop: zero.
    pub after: EvTuple,
}
