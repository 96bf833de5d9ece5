//! The `conntrack` and `conntrack_new` maps: the tuple, the entry, TCP and datagram states,
//! their transitions and timeouts.

use core::mem::size_of;

use bytemuck::{Pod, Zeroable};

use crate::{Addr4, Addr6, Family, PROTO_TCP, PROTO_UDP, Port};

/// `conntrack` (`CtKey4`) and `conntrack6` (`CtKey6`) key: a packet's tuple exactly as it is on
/// the wire at the hook that looks it up.
///
/// For ICMP echo, the identifier stands in for a port: requests use
/// `src_port = id, dst_port = 0`, replies `src_port = 0, dst_port = id`, so that swapping the
/// two ends of a request's tuple yields its reply's.
///
/// Aligned to 4 (where it is stored, it always is): the datapath then compares and copies
/// its addresses a word at a time instead of byte by byte.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey<A> {
    /// Source address.
    pub src_addr: A,
    /// Destination address.
    pub dst_addr: A,
    /// Source port (or ICMP id).
    pub src_port: Port,
    /// Destination port (or ICMP id).
    pub dst_port: Port,
    /// IP protocol number (ICMPv6 is 58).
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// The IPv4 tuple (16 bytes).
pub type CtKey4 = CtKey<Addr4>;
/// The IPv6 tuple (40 bytes).
pub type CtKey6 = CtKey<Addr6>;

// SAFETY: `#[repr(C)]` of `u8` arrays only, 16 or 40 bytes in all (multiples of the
// alignment, so no padding the compiler adds): any bits are valid, all-zero included.
unsafe impl Zeroable for CtKey4 {}
// SAFETY: as above.
unsafe impl Pod for CtKey4 {}
// SAFETY: as above.
unsafe impl Zeroable for CtKey6 {}
// SAFETY: as above.
unsafe impl Pod for CtKey6 {}
const _: () = assert!(size_of::<CtKey4>() == 16 && size_of::<CtKey6>() == 40);

impl<A: Family> CtKey<A> {
    /// A key from its fields, padding zeroed (see `Family::key`).
    #[must_use]
    #[inline(always)]
    pub fn new(src_addr: A, dst_addr: A, src_port: Port, dst_port: Port, proto: u8) -> Self {
        A::key(src_addr, dst_addr, src_port, dst_port, proto)
    }

    /// The tuple of the packets that travel the other way.
    #[must_use]
    #[inline(always)]
    pub fn reversed(&self) -> Self {
        Self::new(
            self.dst_addr,
            self.src_addr,
            self.dst_port,
            self.src_port,
            self.proto,
        )
    }
}

/// The ports and protocol of a key as one native-order word.
#[inline(always)]
const fn ports_word(src_port: Port, dst_port: Port) -> u32 {
    u32::from_ne_bytes([src_port[0], src_port[1], dst_port[0], dst_port[1]])
}

impl Family for Addr4 {
    const PROTO_ICMP: u8 = crate::PROTO_ICMP;
    const ECHO_REQUEST: u8 = 8;
    const ECHO_REPLY: u8 = 0;
    const UDP_CSUM_OPTIONAL: bool = true;

    #[inline(always)]
    fn key(src: Self, dst: Self, src_port: Port, dst_port: Port, proto: u8) -> CtKey<Self> {
        let words: [u32; 4] = [
            u32::from_ne_bytes(src),
            u32::from_ne_bytes(dst),
            ports_word(src_port, dst_port),
            u32::from_ne_bytes([proto, 0, 0, 0]),
        ];
        // SAFETY: `CtKey4` is 16 bytes of `u8` arrays, `#[repr(C)]`: any bits are valid.
        unsafe { core::mem::transmute::<[u32; 4], CtKey4>(words) }
    }
}

impl Family for Addr6 {
    const PROTO_ICMP: u8 = crate::PROTO_ICMPV6;
    const ECHO_REQUEST: u8 = 128;
    const ECHO_REPLY: u8 = 129;
    const UDP_CSUM_OPTIONAL: bool = false;

    #[inline(always)]
    fn key(src: Self, dst: Self, src_port: Port, dst_port: Port, proto: u8) -> CtKey<Self> {
        let s: [u32; 4] = bytemuck::cast(src);
        let d: [u32; 4] = bytemuck::cast(dst);
        let words: [u32; 10] = [
            s[0],
            s[1],
            s[2],
            s[3],
            d[0],
            d[1],
            d[2],
            d[3],
            ports_word(src_port, dst_port),
            u32::from_ne_bytes([proto, 0, 0, 0]),
        ];
        // SAFETY: `CtKey6` is 40 bytes of `u8` arrays, `#[repr(C)]`: any bits are valid.
        unsafe { core::mem::transmute::<[u32; 10], CtKey6>(words) }
    }
}

/// `CtMeta::nat`: the source is rewritten (MASQUERADE, or the reply of a DNAT).
pub const NAT_SNAT: u8 = 1;
/// `CtMeta::nat`: the destination is rewritten (DNAT, or the reply of a MASQUERADE).
pub const NAT_DNAT: u8 = 2;

/// `CtMeta::dir`: the direction that created the connection.
pub const DIR_ORIGINAL: u8 = 0;
/// `CtMeta::dir`: the answering direction.
pub const DIR_REPLY: u8 = 1;

/// `CtMeta::origin`: a container's connection to the outside, masqueraded.
pub const ORIGIN_MASQUERADE: u8 = 1;
/// `CtMeta::origin`: an outside client's connection to a published port.
pub const ORIGIN_PUBLISHED: u8 = 2;
/// `CtMeta::origin`: a container's connection to a published port on a node address.
pub const ORIGIN_HAIRPIN: u8 = 3;

/// TCP states (`CtMeta::state` for TCP), after nf_conntrack's.
pub mod tcp_state {
    pub const NONE: u8 = 0;
    pub const SYN_SENT: u8 = 1;
    pub const SYN_RECV: u8 = 2;
    pub const ESTABLISHED: u8 = 3;
    pub const FIN_WAIT: u8 = 4;
    pub const CLOSE_WAIT: u8 = 5;
    pub const LAST_ACK: u8 = 6;
    pub const TIME_WAIT: u8 = 7;
    pub const CLOSE: u8 = 8;
}

/// TCP flag bits as in the header's flags byte.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// `CtMeta::flags`: a FIN was seen from the original direction.
pub const CT_FIN_ORIG: u8 = 1 << 0;
/// `CtMeta::flags`: a FIN was seen from the reply direction.
pub const CT_FIN_REPLY: u8 = 1 << 1;

/// The TCP state (and FIN bits, `CT_FIN_*`) after a packet with TCP `flags` travelling in
/// direction `dir` (`DIR_*`).
///
/// Loose like nf_conntrack: a connection first seen mid-stream starts ESTABLISHED; a SYN on a
/// closed connection reopens it, one on an open connection changes nothing. FIN_WAIT: one side sent FIN; CLOSE_WAIT: the other
/// side acknowledged it; LAST_ACK: both sent FIN; TIME_WAIT: the last FIN was acknowledged.
#[must_use]
pub const fn tcp_transition(state: u8, fins: u8, dir: u8, flags: u8) -> (u8, u8) {
    use tcp_flags::{ACK, FIN, RST, SYN};
    use tcp_state::{
        CLOSE, CLOSE_WAIT, ESTABLISHED, FIN_WAIT, LAST_ACK, NONE, SYN_RECV, SYN_SENT, TIME_WAIT,
    };
    if flags & RST != 0 {
        return (CLOSE, fins);
    }
    if flags & SYN != 0 {
        if flags & ACK == 0 {
            // A new SYN reopens only a connection that is not open (nf_conntrack ignores one
            // on an established connection; the endpoint answers it with a challenge ACK).
            let reopens = matches!(state, NONE | SYN_SENT | TIME_WAIT | CLOSE);
            return if dir == DIR_ORIGINAL && reopens {
                (SYN_SENT, 0)
            } else {
                (state, fins)
            };
        }
        return if dir == DIR_REPLY && state == SYN_SENT {
            (SYN_RECV, fins)
        } else {
            (state, fins)
        };
    }
    let mine = if dir == DIR_ORIGINAL {
        CT_FIN_ORIG
    } else {
        CT_FIN_REPLY
    };
    if flags & FIN != 0 {
        let fins = fins | mine;
        if fins == CT_FIN_ORIG | CT_FIN_REPLY {
            return (LAST_ACK, fins);
        }
        return (FIN_WAIT, fins);
    }
    if state == NONE {
        return (ESTABLISHED, fins);
    }
    if flags & ACK != 0 {
        let next = match state {
            SYN_RECV => ESTABLISHED,
            // The side that has not closed acknowledges the other's FIN.
            FIN_WAIT if fins & mine == 0 => CLOSE_WAIT,
            LAST_ACK => TIME_WAIT,
            s => s,
        };
        return (next, fins);
    }
    (state, fins)
}

/// UDP/ICMP states (`CtMeta::state` for those protocols).
pub mod dgram_state {
    /// Only the original direction has been seen.
    pub const UNREPLIED: u8 = 0;
    /// Packets have been seen both ways.
    pub const REPLIED: u8 = 1;
}

/// Timeouts in nanoseconds, after nf_conntrack's defaults.
pub mod timeout {
    const S: u64 = 1_000_000_000;
    pub const TCP_SYN_SENT: u64 = 120 * S;
    pub const TCP_SYN_RECV: u64 = 60 * S;
    pub const TCP_ESTABLISHED: u64 = 432_000 * S;
    pub const TCP_FIN_WAIT: u64 = 120 * S;
    pub const TCP_CLOSE_WAIT: u64 = 60 * S;
    pub const TCP_LAST_ACK: u64 = 30 * S;
    pub const TCP_TIME_WAIT: u64 = 120 * S;
    pub const TCP_CLOSE: u64 = 10 * S;
    pub const UDP_UNREPLIED: u64 = 30 * S;
    pub const UDP_REPLIED: u64 = 120 * S;
    pub const ICMP: u64 = 30 * S;
}

/// How long an entry in `state` for protocol `proto` may stay idle.
#[must_use]
pub const fn ct_timeout_ns(proto: u8, state: u8) -> u64 {
    match proto {
        PROTO_TCP => match state {
            tcp_state::SYN_SENT | tcp_state::NONE => timeout::TCP_SYN_SENT,
            tcp_state::SYN_RECV => timeout::TCP_SYN_RECV,
            tcp_state::ESTABLISHED => timeout::TCP_ESTABLISHED,
            tcp_state::FIN_WAIT => timeout::TCP_FIN_WAIT,
            tcp_state::CLOSE_WAIT => timeout::TCP_CLOSE_WAIT,
            tcp_state::LAST_ACK => timeout::TCP_LAST_ACK,
            tcp_state::TIME_WAIT => timeout::TCP_TIME_WAIT,
            _ => timeout::TCP_CLOSE,
        },
        PROTO_UDP => {
            if state == dgram_state::REPLIED {
                timeout::UDP_REPLIED
            } else {
                timeout::UDP_UNREPLIED
            }
        }
        _ => timeout::ICMP,
    }
}

/// `conntrack` (`CtEntry4`) and `conntrack6` (`CtEntry6`) value: what to do with packets of
/// one direction of a connection.
///
/// A connection has two entries, created together: one keyed by the original direction's
/// tuple and one by the reply direction's, so either direction is a single lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry<A> {
    /// The tuple this direction's packets are rewritten to (`proto` included).
    pub xlate: CtKey<A>,
    /// Everything else, the same for both families.
    pub meta: CtMeta,
}

/// An IPv4 connection's entry (112 bytes).
pub type CtEntry4 = CtEntry<Addr4>;
/// An IPv6 connection's entry (136 bytes).
pub type CtEntry6 = CtEntry<Addr6>;

// SAFETY: `#[repr(C)]`; the key's size (16 or 40) is a multiple of `CtMeta`'s alignment (8),
// so there is no padding: any bits are valid.
unsafe impl Zeroable for CtEntry4 {}
// SAFETY: as above.
unsafe impl Pod for CtEntry4 {}
// SAFETY: as above.
unsafe impl Zeroable for CtEntry6 {}
// SAFETY: as above.
unsafe impl Pod for CtEntry6 {}
const _: () = assert!(size_of::<CtEntry4>() == 16 + 112 && size_of::<CtEntry6>() == 40 + 112);

impl<A: Family> CtEntry<A> {
    /// The key of the entry for the other direction of this entry's connection: the reverse
    /// of the tuple this direction is translated to.
    #[must_use]
    #[inline(always)]
    pub fn peer_key(&self) -> CtKey<A> {
        self.xlate.reversed()
    }
}

/// The family-neutral part of a conntrack entry: the connection's state, this direction's
/// counters, next-hop cache and TCP window, and a copy of the other direction's window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtMeta {
    /// `NAT_SNAT` / `NAT_DNAT` bits.
    pub nat: u8,
    /// `DIR_ORIGINAL` or `DIR_REPLY`.
    pub dir: u8,
    /// `tcp_state::*` or `dgram_state::*`; kept equal in both entries.
    pub state: u8,
    /// `ORIGIN_*`: which rule created the connection.
    pub origin: u8,
    /// Generation of the port mapping that created the connection (published ports only).
    pub generation: u32,
    /// ifindex of the container's host veth this connection belongs to.
    pub ifindex: u32,
    /// `CT_FIN_*` bits; kept equal in both entries.
    pub flags: u8,
    /// 1: the cached next hop is a container (`nh_ifindex` is its host veth, the packet goes
    /// into its namespace); 0: a FIB next hop on the way out.
    pub nh_peer: u8,
    /// TCP: this direction's window scale (shift) from its SYN; 0 when either SYN lacked the
    /// option (RFC 7323: scaling is used only when both sides offer it).
    pub tcp_wscale: u8,
    /// TCP: `TCP_SEEN` once a segment of this direction has set the `tcp_*` window fields,
    /// `TCP_PEER_COPY` while `peer_*` hold a copy of the other direction's (the datapath's
    /// own bits, 2 to 8, are `nat-ebpf/src/tcp.rs`'s).
    pub tcp_track: u8,
    /// CLOCK_MONOTONIC_COARSE at creation (the programs' `conntrack::now`).
    pub created_ns: u64,
    /// CLOCK_MONOTONIC_COARSE of the last packet in this direction.
    pub last_seen_ns: u64,
    /// Packets seen in this direction.
    pub packets: u64,
    /// Bytes (IP total length) seen in this direction.
    pub bytes: u64,
    /// Next hop cached for packets of this direction, from the FIB (leaving by the uplink) or
    /// the endpoint table (into a container): egress ifindex (0 = none cached).
    pub nh_ifindex: u32,
    /// The FIB next hop's device MTU: packets up to it skip the MTU check helper.
    pub nh_mtu: u32,
    /// Next hop's MAC (the container's, or the FIB's neighbour).
    pub nh_dmac: [u8; 6],
    /// Egress interface's MAC (the container's host veth, or the uplink).
    pub nh_smac: [u8; 6],
    /// MAC of the container the connection belongs to (with `ifindex`, what a packet from
    /// that container's veth must carry to take the conntrack fast path).
    pub mac: [u8; 6],
    /// 1 once the connection is assured (TCP established with both sides seen, UDP answered
    /// and used again) and lives in `conntrack`; entries in `conntrack_new` with 1 are
    /// copies already moved there, left for the LRU or garbage collection.
    pub assured: u8,
    pub _pad: u8,
    /// TCP window tracking (nf_conntrack's `tcp_in_window`), host order. The sequence number
    /// after the highest byte this direction has sent (SYN and FIN count one).
    pub tcp_end: u32,
    /// The highest sequence number this direction allows the other to send: the largest
    /// acknowledgement plus scaled window it has advertised.
    pub tcp_limit: u32,
    /// The largest scaled window this direction has advertised (at least 1).
    pub tcp_maxwin: u32,
    /// CLOCK_MONOTONIC_COARSE until which the cached next hop is used without a FIB lookup.
    pub nh_until_ns: u64,
    /// TCP, a direction whose packets come from outside (valid with `TCP_PEER_COPY`): the
    /// other direction's `tcp_end` as this entry last read it from the other entry. The
    /// three `peer_*` fields only grow while the connection is established, so a segment in
    /// the window by them is in it by the other entry's own fields: steady segments from
    /// outside are checked without a second lookup.
    pub peer_end: u32,
    /// The other direction's `tcp_limit`, read with `peer_end`.
    pub peer_limit: u32,
    /// The other direction's `tcp_maxwin`, read with `peer_end`.
    pub peer_maxwin: u32,
    /// Keeps the entry a multiple of 8 bytes without implicit padding.
    pub _pad2: u32,
}

/// `CtMeta::tcp_track`: this direction's window fields are set.
pub const TCP_SEEN: u8 = 1;
/// `CtMeta::tcp_track`: the `peer_*` fields hold a copy of the other direction's window
/// fields, taken while the connection was established (a new SYN clears it).
pub const TCP_PEER_COPY: u8 = 16;

/// How long a cached next hop is trusted: route and neighbour changes take effect within it.
pub const NEXT_HOP_CACHE_NS: u64 = 1_000_000_000;
