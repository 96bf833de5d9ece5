//! `bpfnat explain`: the trail a dry run of the programs leaves. The loader builds the
//! programs a second time with the `explain` feature: that build commits nothing (no
//! conntrack entry, no fragment record, no counter, no monitor event; a connection's entry
//! is changed only in a copy), and appends each map it consults, with the key and what it
//! found, to its `Explain` global. The production build has neither the global nor the
//! code.

use bytemuck::{Pod, Zeroable};

/// Steps a trail holds; a run that takes more says so in `Trail::overflow`.
pub const TRAIL_STEPS: usize = 32;
/// The largest key recorded: an IPv6 tuple (`CtKey6`).
pub const TRAIL_KEY: usize = 40;
/// The largest value recorded: an IPv6 connection's entry (`CtEntry6`).
pub const TRAIL_VALUE: usize = 152;

/// What a step did.
pub mod op {
    /// A map lookup; `Step::found` says whether it found `value`.
    pub const LOOKUP: u8 = 1;
    /// An insert the production programs would make (`value`: the entry); `found`: 1 if it
    /// would succeed.
    pub const INSERT: u8 = 2;
    /// A delete the production programs would make; `Step::found`: whether the key is
    /// there to delete.
    pub const REMOVE: u8 = 3;
    /// A FIB lookup: `key` the destination address, `value` a `FibStep`.
    pub const FIB: u8 = 4;
    /// The redirect decided: `value` a `RedirectStep`.
    pub const REDIRECT: u8 = 5;
    /// A counter the production programs would move: `key[0]` the `Reason`.
    pub const COUNT: u8 = 6;
}

/// Which map a step consulted (`Step::map`); 0 for steps that are not map operations.
pub mod trail_map {
    pub const NONE: u8 = 0;
    pub const ENDPOINTS: u8 = 1;
    pub const ENDPOINTS6: u8 = 2;
    pub const PORTS: u8 = 3;
    pub const PORTS6: u8 = 4;
    pub const CONNTRACK: u8 = 5;
    pub const CONNTRACK_NEW: u8 = 6;
    pub const CONNTRACK6: u8 = 7;
    pub const CONNTRACK6_NEW: u8 = 8;
    pub const STATIC_NAT: u8 = 9;
    pub const STATIC_NAT6: u8 = 10;
    pub const NODE_ADDRS: u8 = 11;
    pub const NODE_ADDRS6: u8 = 12;
    pub const CLUSTER_NETS: u8 = 13;
    pub const FRAGS: u8 = 14;
    pub const FRAGS6: u8 = 15;
}

/// One thing the programs did, in order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Step {
    /// `op::*`.
    pub op: u8,
    /// `trail_map::*`.
    pub map: u8,
    /// 1: the lookup found `value` (an insert: it would succeed).
    pub found: u8,
    /// Bytes of `key` and of `value` in use.
    pub key_len: u8,
    pub value_len: u8,
    pub _pad: [u8; 3],
    /// The key, as the map stores it (in words: `bytemuck` derives for arrays up to 32).
    pub key: [u64; TRAIL_KEY / 8],
    /// The value found (or that would be inserted), as the map stores it, before the run
    /// changed anything in its copy.
    pub value: [u64; TRAIL_VALUE / 8],
}

/// The per-CPU trail of one run (`trail` map, one entry). Reset by the entry point.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Trail {
    /// Steps recorded (at most `TRAIL_STEPS`).
    pub len: u32,
    /// 1: more steps were taken than the trail holds; the run decided with the lookups it
    /// could not record treated as misses.
    pub overflow: u32,
    pub steps: [Step; TRAIL_STEPS],
}

/// Everything a dry run writes: the explain build's only global (`.bss`), which the loader
/// reads back after the run. A global, not a map: no lookup helper to call, so recording
/// costs the deepest IPv6 paths no extra stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Explain {
    pub trail: Trail,
    /// The copies of the values found, one slot per step: the programs change these instead
    /// of the map's.
    pub shadow: [[u64; TRAIL_VALUE / 8]; TRAIL_STEPS],
}

/// `Step::value` of a FIB lookup (`op::FIB`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FibStep {
    /// `bpf_fib_lookup`'s return code (`BPF_FIB_LKUP_RET_*`).
    pub rc: i32,
    /// The egress interface.
    pub ifindex: u32,
    /// The egress device's MTU. (The MACs are left out: copying them costs the deepest
    /// IPv6 path stack it lacks; the frame the program returns carries them.)
    pub mtu: u32,
}

/// `Step::value` of a redirect (`op::REDIRECT`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct RedirectStep {
    /// The interface the packet is sent to (for `REDIRECT_PEER`, the host side of the veth
    /// whose peer receives it).
    pub ifindex: u32,
    /// `REDIRECT_*`.
    pub how: u32,
}

/// `RedirectStep::how`: out of `ifindex` as it is (`bpf_redirect`).
pub const REDIRECT_EGRESS: u32 = 0;
/// Into the namespace at the other end of the veth `ifindex` (`bpf_redirect_peer`).
pub const REDIRECT_PEER: u32 = 1;
/// Out of `ifindex`, the kernel resolving the neighbour (`bpf_redirect_neigh`).
pub const REDIRECT_NEIGH: u32 = 2;

const _: () = assert!(
    size_of::<crate::CtKey6>() <= TRAIL_KEY
        && size_of::<crate::CtEntry6>() <= TRAIL_VALUE
        && size_of::<crate::FragKey6>() <= TRAIL_KEY
        && size_of::<crate::PortKey6>() <= TRAIL_KEY
        && size_of::<Step>() == 8 + TRAIL_KEY + TRAIL_VALUE
        && size_of::<Step>().is_multiple_of(8)
);
