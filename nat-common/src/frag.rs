//! The `frags` map: the ports of fragmented datagrams, learned from their first fragment.

use bytemuck::{Pod, Zeroable};

use crate::{Addr4, Addr6, Port};

/// `frags` key: one fragmented datagram as it arrived at a hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragKey4 {
    /// Network order.
    pub src_addr: Addr4,
    /// Network order.
    pub dst_addr: Addr4,
    /// IPv4 identification, network order.
    pub id: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}

/// `frags6` key: one fragmented IPv6 datagram as it arrived at a hook (RFC 8200: source,
/// destination and the Fragment header's 32-bit identification).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragKey6 {
    /// Network order.
    pub src_addr: Addr6,
    /// Network order.
    pub dst_addr: Addr6,
    /// Fragment identification, network order.
    pub id: [u8; 4],
    /// The upper-layer protocol after the extension headers.
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `frags`/`frags6` value: the ports the first fragment carried, for the fragments that do not, and
/// what is needed to forget the datagram once it has passed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragPorts {
    /// Network order.
    pub src_port: Port,
    /// Network order.
    pub dst_port: Port,
    /// IP payload bytes of the datagram's fragments seen so far.
    pub seen: u32,
    /// The datagram's IP payload length, known from its last fragment (offset + payload);
    /// 0 until then. The entry is deleted when `seen` reaches it.
    pub total: u32,
    pub _pad: u32,
    /// CLOCK_MONOTONIC_COARSE of the first fragment: the entry is ignored after
    /// `FRAG_TIMEOUT_NS`.
    pub created_ns: u64,
}

/// How long the fragments of one datagram are matched to its first fragment: Linux's
/// `ipfrag_time` (30 s), after which it gives up reassembling too.
pub const FRAG_TIMEOUT_NS: u64 = 30_000_000_000;
