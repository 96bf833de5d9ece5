//! The address-family seam. Every type that carries an address exists once per family
//! (`CtKey4`, `CtEntry4`, `PortKey4`, `PortTarget4`, `StaticNat4`, `SockKey4`, `FragKey4`,
//! `Net4`, maps keyed by `Addr4`), as Cilium has `ipv4_ct_tuple` beside `ipv6_ct_tuple`;
//! everything that does not (`Endpoint`, `NodeAddr`, `CtMeta`: states, counters, the next-hop
//! cache, TCP window tracking) is shared, so the code that handles it is written once for both
//! families.

/// An IPv4 address, network order (`bpftool` prints it as `[10,88,0,2]`).
pub type Addr4 = [u8; 4];

/// An IPv6 address, network order.
pub type Addr6 = [u8; 16];

/// A port (or ICMP echo identifier), network order.
pub type Port = [u8; 2];

/// What the datapath's family-neutral code needs to know of an address family, implemented
/// by `Addr4` and `Addr6`.
pub trait Family:
    Copy + Eq + Default + core::hash::Hash + core::fmt::Debug + bytemuck::Pod + 'static
{
    /// The family's ICMP protocol number (1, or 58 for ICMPv6).
    const PROTO_ICMP: u8;
    /// ICMP echo request and reply types.
    const ECHO_REQUEST: u8;
    const ECHO_REPLY: u8;
    /// Whether a zero UDP checksum means "none" (IPv4) rather than a bad one (IPv6, RFC 8200).
    const UDP_CSUM_OPTIONAL: bool;

    /// A conntrack key from its fields, padding zeroed. Built from whole words: field by
    /// field, the compiler zeroes the three padding bytes with a call to `memset`, which on
    /// BPF is a subprogram with a loop that the verifier walks at every call and whose frame
    /// the 512-byte stack can hardly spare.
    fn key(src: Self, dst: Self, src_port: Port, dst_port: Port, proto: u8) -> crate::CtKey<Self>;
}
