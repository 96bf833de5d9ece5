//! Map keys, values and constants shared by the eBPF programs (`nat-ebpf`) and the loader
//! (`nat-user`).
//!
//! Every type is `#[repr(C)]` with explicit, zeroed padding: the kernel hashes raw key bytes,
//! and `bytemuck::Pod` refuses to derive for a type with implicit padding. Addresses and ports
//! are byte arrays in network order so that `bpftool map dump` prints them readably
//! (`[10,88,0,2]`, `[0,80]`); integers that people do not read as addresses are native-endian.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Version of the pinned layout. Bumped whenever a map's key or value changes, so that a new
/// loader never silently reuses an old, differently shaped map pinned by an earlier version.
pub const PIN_VERSION: &str = "v1";

mod maps;
pub use maps::*;

/// Program names in the eBPF object.
pub mod prog_names {
    /// TC ingress of a container's host-side veth: everything the container sends.
    pub const TC_CONTAINER: &str = "tc_container";
    /// TC ingress of the uplink: everything that arrives from outside.
    pub const TC_UPLINK: &str = "tc_uplink";
    /// XDP on the uplink: the inbound fast path (`up --xdp native|generic`).
    pub const XDP_UPLINK: &str = "xdp_uplink";
    /// cgroup `connect4`: node processes connecting to a published port.
    pub const SOCK_CONNECT4: &str = "sock_connect4";
    /// cgroup `sendmsg4`: unconnected UDP sends to a published port.
    pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
    /// cgroup `recvmsg4`: replies shown as coming from the published address.
    pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
    /// cgroup `getpeername4`: the peer shown as the published address.
    pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
}

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `Config::flags`: masquerade traffic from the container subnet that leaves by the uplink.
pub const CFG_MASQUERADE: u32 = 1 << 0;
/// `Config::flags`: at least one static NAT mapping exists (else inbound packets skip the
/// `static_nat` lookup).
pub const CFG_STATIC_NAT: u32 = 1 << 1;

/// Node-wide settings, the single entry (index 0) of the `config` array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    /// ifindex of the uplink in the node's namespace; 0 while the datapath is down.
    pub uplink_ifindex: u32,
    /// `CFG_*` bits.
    pub flags: u32,
    /// Source address written by MASQUERADE (network order).
    pub snat_addr: [u8; 4],
    /// Virtual gateway address of the container subnet (network order).
    pub gateway_addr: [u8; 4],
    /// The node's own address on the uplink (network order): host processes reach published
    /// ports on it, on 127.0.0.0/8 and on the gateway address.
    pub node_addr: [u8; 4],
    /// Container subnet base address (network order).
    pub subnet_addr: [u8; 4],
    /// Container subnet mask (network order), e.g. `[255,255,0,0]`.
    pub subnet_mask: [u8; 4],
    /// First port MASQUERADE may allocate when the original source port is taken (host order).
    pub port_min: u16,
    /// Last port MASQUERADE may allocate (host order, inclusive).
    pub port_max: u16,
    /// MAC address of the uplink: ARP for static NAT addresses is answered with it.
    pub uplink_mac: [u8; 6],
    /// The node's own ephemeral port range (`ip_local_port_range`, host order, inclusive).
    /// MASQUERADE never takes a TCP/UDP source port from it: the node's own connections from
    /// the uplink address use those ports, and conntrack does not see them.
    pub host_port_min: u16,
    pub host_port_max: u16,
    pub _pad: [u8; 6],
    /// Cookie of the node's network namespace (`SO_NETNS_COOKIE`): the socket programs are
    /// attached to a cgroup, which spans namespaces, and act only for sockets of this one.
    pub netns_cookie: u64,
}

/// `node_addrs` hash map value, keyed by one of the node's own unicast IPv4 addresses
/// (`[u8; 4]`, network order; loopback and container-subnet addresses are not listed). Only
/// these (and `Config::node_addr`) are DNAT destinations for packets from outside, as
/// iptables' `-m addrtype --dst-type LOCAL` allows: never a broadcast, multicast or 127/8
/// address, whatever the FIB says.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NodeAddr {
    /// ifindex of the interface that holds the address in the node's namespace.
    pub ifindex: u32,
}

/// Endpoint flag: the entry is a container attached to this node.
pub const EP_CONTAINER: u32 = 1 << 0;

/// `endpoints` hash map value, keyed by the container's IPv4 address (`[u8; 4]`, network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Endpoint {
    /// ifindex of the container's host-side veth in the node's namespace.
    pub ifindex: u32,
    /// `EP_*` bits.
    pub flags: u32,
    /// MAC address of the container's `eth0`.
    pub mac: [u8; 6],
    /// MAC address of the host-side veth; ARP for the gateway is answered with it.
    pub host_mac: [u8; 6],
}

/// `sock_rnat` key: a socket whose connect/sendmsg was translated, and the container address
/// it now talks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockKey {
    /// `bpf_get_socket_cookie`.
    pub cookie: u64,
    /// Container address, network order.
    pub addr: [u8; 4],
    /// Container port, network order.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// `sock_rnat` value: the published address and port the application asked for, shown back
/// to it by `getpeername` and `recvmsg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockOrig {
    /// Network order.
    pub addr: [u8; 4],
    /// Network order.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// `frags` key: one fragmented datagram as it arrived at a hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragKey {
    /// Network order.
    pub src_addr: [u8; 4],
    /// Network order.
    pub dst_addr: [u8; 4],
    /// IPv4 identification, network order.
    pub id: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}

/// `frags` value: the ports the first fragment carried, for the fragments that do not, and
/// what is needed to forget the datagram once it has passed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragPorts {
    /// Network order.
    pub src_port: [u8; 2],
    /// Network order.
    pub dst_port: [u8; 2],
    /// IP payload bytes of the datagram's fragments seen so far.
    pub seen: u32,
    /// The datagram's IP payload length, known from its last fragment (offset + payload);
    /// 0 until then. The entry is deleted when `seen` reaches it.
    pub total: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns` of the first fragment: the entry is ignored after
    /// `FRAG_TIMEOUT_NS`.
    pub created_ns: u64,
}

/// How long the fragments of one datagram are matched to its first fragment: Linux's
/// `ipfrag_time` (30 s), after which it gives up reassembling too.
pub const FRAG_TIMEOUT_NS: u64 = 30_000_000_000;

/// `StaticNat::kind`: the key is the external address, `peer` the container's.
pub const STATIC_EXTERNAL: u8 = 1;
/// `StaticNat::kind`: the key is the container's address, `peer` the external one.
pub const STATIC_INTERNAL: u8 = 2;

/// `static_nat` hash map value, keyed by an IPv4 address (`[u8; 4]`, network order). A 1:1
/// mapping has two entries, one per direction, so either side is one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct StaticNat {
    /// The address on the other side of the mapping, network order.
    pub peer: [u8; 4],
    /// `STATIC_EXTERNAL` or `STATIC_INTERNAL`.
    pub kind: u8,
    pub _pad: [u8; 3],
}

/// `ports` hash map key: a published port. `host_addr` all zero means every node address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct PortKey {
    /// Host address the port is bound to, network order; `[0,0,0,0]` = any.
    pub host_addr: [u8; 4],
    /// Host port, network order.
    pub host_port: [u8; 2],
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    pub _pad: u8,
}

/// `ports` hash map value: where a published port leads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PortTarget {
    /// Container address, network order.
    pub addr: [u8; 4],
    /// Container port, network order.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
    /// Incremented whenever the mapping is (re)written; conntrack entries created under an older
    /// generation are not reused.
    pub generation: u32,
}

/// `conntrack` key: a packet's tuple exactly as it is on the wire at the hook that looks it up.
///
/// For ICMP echo, the identifier stands in for a port: requests use
/// `src_port = id, dst_port = 0`, replies `src_port = 0, dst_port = id`, so that swapping the
/// two ends of a request's tuple yields its reply's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtKey {
    /// Source address, network order.
    pub src_addr: [u8; 4],
    /// Destination address, network order.
    pub dst_addr: [u8; 4],
    /// Source port (or ICMP id), network order.
    pub src_port: [u8; 2],
    /// Destination port (or ICMP id), network order.
    pub dst_port: [u8; 2],
    /// IP protocol number.
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl CtKey {
    /// A key from its fields, padding zeroed. Built as four whole words: field by field, the
    /// compiler zeroes the three padding bytes with a call to `memset`, which on BPF is a
    /// subprogram with a loop that the verifier walks at every call and whose frame the
    /// 512-byte stack can hardly spare.
    #[must_use]
    #[inline(always)]
    pub const fn new(
        src_addr: [u8; 4],
        dst_addr: [u8; 4],
        src_port: [u8; 2],
        dst_port: [u8; 2],
        proto: u8,
    ) -> Self {
        let words: [u32; 4] = [
            u32::from_ne_bytes(src_addr),
            u32::from_ne_bytes(dst_addr),
            u32::from_ne_bytes([src_port[0], src_port[1], dst_port[0], dst_port[1]]),
            u32::from_ne_bytes([proto, 0, 0, 0]),
        ];
        // SAFETY: `CtKey` is 16 bytes of `u8` arrays, `#[repr(C)]`: any bits are valid.
        unsafe { core::mem::transmute::<[u32; 4], Self>(words) }
    }

    /// The tuple of the packets that travel the other way.
    #[must_use]
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        Self::new(
            self.dst_addr,
            self.src_addr,
            self.dst_port,
            self.src_port,
            self.proto,
        )
    }
}

/// `CtEntry::nat`: the source is rewritten (MASQUERADE, or the reply of a DNAT).
pub const NAT_SNAT: u8 = 1;
/// `CtEntry::nat`: the destination is rewritten (DNAT, or the reply of a MASQUERADE).
pub const NAT_DNAT: u8 = 2;

/// `CtEntry::dir`: the direction that created the connection.
pub const DIR_ORIGINAL: u8 = 0;
/// `CtEntry::dir`: the answering direction.
pub const DIR_REPLY: u8 = 1;

/// `CtEntry::origin`: a container's connection to the outside, masqueraded.
pub const ORIGIN_MASQUERADE: u8 = 1;
/// `CtEntry::origin`: an outside client's connection to a published port.
pub const ORIGIN_PUBLISHED: u8 = 2;
/// `CtEntry::origin`: a container's connection to a published port on a node address.
pub const ORIGIN_HAIRPIN: u8 = 3;

/// TCP states (`CtEntry::state` for TCP), after nf_conntrack's.
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

/// `CtEntry::flags`: a FIN was seen from the original direction.
pub const CT_FIN_ORIG: u8 = 1 << 0;
/// `CtEntry::flags`: a FIN was seen from the reply direction.
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

/// UDP/ICMP states (`CtEntry::state` for those protocols).
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

/// The Internet checksum `csum` after a `size`-byte (2 or 4) field it covers changed from
/// `old` to `new`, all as read from the packet in native order: HC' = ~(~HC + ~m + m')
/// (RFC 1624, eqn. 3). What XDP uses where TC has the kernel's checksum helpers.
#[must_use]
#[inline(always)]
pub const fn csum_replace(csum: u16, old: u32, new: u32, size: u64) -> u16 {
    let mut sum = (!csum) as u32;
    if size == 4 {
        let nold = !old;
        sum += (nold & 0xffff) + (nold >> 16) + (new & 0xffff) + (new >> 16);
    } else {
        sum += (!(old as u16)) as u32 + (new as u16) as u32;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// `conntrack` value: what to do with packets of one direction of a connection.
///
/// A connection has two entries, created together: one keyed by the original direction's
/// tuple and one by the reply direction's, so either direction is a single lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtEntry {
    /// Source address after translation, network order.
    pub xlate_src_addr: [u8; 4],
    /// Destination address after translation, network order.
    pub xlate_dst_addr: [u8; 4],
    /// Source port (ICMP id) after translation, network order.
    pub xlate_src_port: [u8; 2],
    /// Destination port (ICMP id) after translation, network order.
    pub xlate_dst_port: [u8; 2],
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
    /// `bpf_ktime_get_coarse_ns` at creation (CLOCK_MONOTONIC_COARSE).
    pub created_ns: u64,
    /// `bpf_ktime_get_coarse_ns` of the last packet in this direction.
    pub last_seen_ns: u64,
    /// Packets seen in this direction.
    pub packets: u64,
    /// Bytes (IP total length) seen in this direction.
    pub bytes: u64,
    /// `CT_FIN_*` bits; kept equal in both entries.
    pub flags: u8,
    /// 1: the cached next hop is a container (`nh_ifindex` is its host veth, the packet goes
    /// into its namespace); 0: a FIB next hop on the way out.
    pub nh_peer: u8,
    /// TCP: this direction's window scale (shift) from its SYN; 0 when either SYN lacked the
    /// option (RFC 7323: scaling is used only when both sides offer it).
    pub tcp_wscale: u8,
    /// TCP: `TCP_SEEN` once a segment of this direction has set the `tcp_*` window fields.
    pub tcp_track: u8,
    /// Next hop cached for packets of this direction, from the FIB (leaving by the uplink) or
    /// the endpoint table (into a container): egress ifindex (0 = none cached).
    pub nh_ifindex: u32,
    /// Next hop's MAC (the container's, or the FIB's neighbour).
    pub nh_dmac: [u8; 6],
    /// Egress interface's MAC (the container's host veth, or the uplink).
    pub nh_smac: [u8; 6],
    /// The FIB next hop's device MTU: packets up to it skip the MTU check helper.
    pub nh_mtu: u32,
    /// `bpf_ktime_get_coarse_ns` until which the cached next hop is used without a FIB lookup.
    pub nh_until_ns: u64,
    /// MAC of the container the connection belongs to (with `ifindex`, what a packet from
    /// that container's veth must carry to take the conntrack fast path).
    pub mac: [u8; 6],
    /// 1 once the connection is assured (TCP established with both sides seen, UDP answered
    /// and used again) and lives in `conntrack`; entries in `conntrack_new` with 1 are
    /// copies already moved there, left for the LRU or garbage collection.
    pub assured: u8,
    pub _pad3: u8,
    /// TCP window tracking (nf_conntrack's `tcp_in_window`), host order. The sequence number
    /// after the highest byte this direction has sent (SYN and FIN count one).
    pub tcp_end: u32,
    /// The highest sequence number this direction allows the other to send: the largest
    /// acknowledgement plus scaled window it has advertised.
    pub tcp_limit: u32,
    /// The largest scaled window this direction has advertised (at least 1).
    pub tcp_maxwin: u32,
    pub _pad4: u32,
}

/// `CtEntry::tcp_track`: this direction's window fields are set.
pub const TCP_SEEN: u8 = 1;

/// How long a cached next hop is trusted: route and neighbour changes take effect within it.
pub const NEXT_HOP_CACHE_NS: u64 = 1_000_000_000;

/// Why a packet was counted: the index into the per-CPU `stats` array.
///
/// A packet counts once for the decision taken on it (`ct_hit`, `snat_new`, a drop, …) and
/// once more for how it left (`fib_redirect`, `deliver`, …). Append only: the numbers are
/// part of the pinned layout.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Handed to the kernel stack unchanged (not ours to handle).
    Pass = 0,
    /// Container to container, redirected to the peer's veth.
    Forward = 1,
    /// A new masqueraded connection.
    SnatNew = 2,
    /// A new connection to a published port.
    DnatNew = 3,
    /// A packet of a tracked connection, translated.
    CtHit = 4,
    /// ARP request answered by the datapath.
    ArpReply = 5,
    /// Packet redirected to the uplink after a FIB lookup.
    FibRedirect = 6,
    /// Packet redirected to the uplink, neighbour resolved by the kernel.
    NeighRedirect = 7,
    /// Translated, then handed to the stack (no FIB result to redirect with).
    StackAfterNat = 8,
    /// Dropped: source address or MAC not the one the container owns.
    DropSpoof = 9,
    /// Dropped: header truncated.
    DropTruncated = 10,
    /// Dropped: a fragment that needs translation but whose first fragment (with the ports)
    /// has not been seen.
    DropFragment = 11,
    /// Dropped: no free SNAT port within the probe budget.
    DropNoPort = 12,
    /// Dropped: conntrack insert failed.
    DropCtFull = 13,
    /// Dropped: ARP for an address the datapath does not know.
    DropArpUnknown = 14,
    /// Dropped: a helper (store, checksum, redirect) failed.
    DropHelper = 15,
    /// Dropped: a published port points at a container that is not attached.
    DropNoEndpoint = 16,
    /// Dropped: datapath not configured (`config` empty).
    DropNoConfig = 17,
    /// Dropped: TTL would reach zero.
    DropTtl = 18,
    /// Dropped: protocol that cannot be masqueraded (not TCP, UDP or ICMP echo).
    DropUnsupported = 19,
    /// Dropped: an outside packet for a container address that no published port or tracked
    /// connection allows.
    DropNotPublished = 20,
    /// Redirected into a container's namespace after translation.
    Deliver = 21,
    /// A new hairpin connection (container to a published port on a node address).
    HairpinNew = 22,
    /// Translated by a static 1:1 NAT mapping.
    StaticNat = 23,
    /// A node process's connect/sendmsg to a published port, translated at the socket.
    SockXlate = 24,
    /// An ICMP error about a tracked connection, translated outside and inside.
    IcmpError = 25,
    /// Redirected to the uplink with the next hop cached in the conntrack entry.
    NextHopCached = 26,
    /// Redirected into a container's veth by the uplink's XDP program (the packet also counts
    /// for its decision: `ct_hit`, `dnat_new`, `static_nat`).
    XdpDeliver = 27,
    /// Handed on by the uplink's XDP program untouched, to TC and the stack (fragments, ICMP
    /// errors, ARP, traffic for the node, anything XDP does not finish).
    XdpPass = 28,
    /// Too big for the way out with DF set: handed to the stack untranslated, which answers
    /// the container with ICMP "fragmentation needed" (PMTU discovery keeps working when the
    /// uplink's MTU is below the container's).
    MtuExceeded = 29,
    /// Dropped: an address that never comes from the wire. From outside: a loopback, "this
    /// network" (0/8), broadcast or multicast source, or a source that is the node's own, the
    /// gateway's or in the container subnet (rp_filter's and Linux's martian rules); a
    /// loopback or 0/8 destination (a port published on 127.0.0.1 is never reachable from
    /// outside). From a container: a loopback or 0/8 destination.
    DropMartian = 30,
    /// Broadcast or multicast (224.0.0.0/4, 255.255.255.255): never translated nor forwarded
    /// by the datapath; handed to the node's stack as it is, which delivers it locally at most.
    Broadcast = 31,
    /// Dropped: malformed in a way the kernel would not accept either: an IPv4 total length
    /// below the header, a TCP data offset below 5 or past the packet, a UDP length that
    /// disagrees with the datagram, or (before a connection is created) a wrong IPv4 header
    /// checksum. Such packets never create state nor get translated.
    DropInvalid = 32,
    /// Dropped: an ICMP error that quotes a tracked connection but does not fit it, as
    /// nf_conntrack requires: it is not addressed to the quoted packet's sender (a
    /// reflection), it travels a direction that does not arrive where it came in, or a
    /// container sends it about a packet it did not receive (its private source would leak).
    DropIcmpMismatch = 33,
    /// Dropped: a TCP RST outside the connection's window (nf_conntrack's `tcp_in_window`):
    /// a blind forgery, which the endpoint would ignore too. Segments outside the window
    /// without RST are forwarded but change no state.
    DropTcpWindow = 34,
    /// Dropped: a TCP or UDP checksum that is complete and wrong, on a packet that would
    /// create a connection or change its state (SYN, FIN, RST). nf_conntrack marks those
    /// INVALID; the endpoint would drop them too.
    DropL4Csum = 35,
    /// A later fragment whose first fragment has not been seen (reordered, lost, or from a
    /// datagram already complete or older than `FRAG_TIMEOUT_NS`): its ports are unknown,
    /// so it is never translated. From outside it goes to the node's stack as it is (which
    /// discards it unless the datagram is the node's). From a container the same fragment
    /// is dropped and counted as `drop_fragment`.
    FragUnmatched = 36,
}

/// Number of `Reason` slots in the `stats` array.
pub const REASON_COUNT: u32 = 37;

impl Reason {
    /// Every reason with its stable name, in index order.
    pub const ALL: [(Self, &'static str); REASON_COUNT as usize] = [
        (Self::Pass, "pass"),
        (Self::Forward, "forward"),
        (Self::SnatNew, "snat_new"),
        (Self::DnatNew, "dnat_new"),
        (Self::CtHit, "ct_hit"),
        (Self::ArpReply, "arp_reply"),
        (Self::FibRedirect, "fib_redirect"),
        (Self::NeighRedirect, "neigh_redirect"),
        (Self::StackAfterNat, "stack_after_nat"),
        (Self::DropSpoof, "drop_spoof"),
        (Self::DropTruncated, "drop_truncated"),
        (Self::DropFragment, "drop_fragment"),
        (Self::DropNoPort, "drop_no_port"),
        (Self::DropCtFull, "drop_ct_full"),
        (Self::DropArpUnknown, "drop_arp_unknown"),
        (Self::DropHelper, "drop_helper"),
        (Self::DropNoEndpoint, "drop_no_endpoint"),
        (Self::DropNoConfig, "drop_no_config"),
        (Self::DropTtl, "drop_ttl"),
        (Self::DropUnsupported, "drop_unsupported"),
        (Self::DropNotPublished, "drop_not_published"),
        (Self::Deliver, "deliver"),
        (Self::HairpinNew, "hairpin_new"),
        (Self::StaticNat, "static_nat"),
        (Self::SockXlate, "sock_xlate"),
        (Self::IcmpError, "icmp_error"),
        (Self::NextHopCached, "next_hop_cached"),
        (Self::XdpDeliver, "xdp_deliver"),
        (Self::XdpPass, "xdp_pass"),
        (Self::MtuExceeded, "mtu_exceeded"),
        (Self::DropMartian, "drop_martian"),
        (Self::Broadcast, "broadcast"),
        (Self::DropInvalid, "drop_invalid"),
        (Self::DropIcmpMismatch, "drop_icmp_mismatch"),
        (Self::DropTcpWindow, "drop_tcp_window"),
        (Self::DropL4Csum, "drop_l4_csum"),
        (Self::FragUnmatched, "frag_unmatched"),
    ];
}

/// One slot of the per-CPU `stats` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
mod user {
    use super::{
        Config, Counter, CtEntry, CtKey, Endpoint, FragKey, FragPorts, NodeAddr, PortKey,
        PortTarget, SockKey, SockOrig, StaticNat,
    };

    /// `aya::Pod` for map key and value types.
    macro_rules! pod {
        ($($t:ty),* $(,)?) => {$(
            // SAFETY: `#[repr(C)]` and `bytemuck::Pod` (checked at compile time): no padding,
            // any bit pattern valid.
            unsafe impl aya::Pod for $t {}
        )*};
    }
    pod!(
        Config, Endpoint, PortKey, PortTarget, CtKey, CtEntry, Counter, StaticNat, SockKey,
        SockOrig, FragKey, FragPorts, NodeAddr,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Internet checksum of `data` from scratch, as stored (native-order words).
    fn full(data: &[u8]) -> u16 {
        let mut sum: u32 = data
            .chunks(2)
            .map(|c| u32::from(u16::from_ne_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn incremental_checksum_matches_a_recomputation() {
        // An IPv4 header with its checksum, then every 4-byte and 2-byte rewrite NAT does.
        let mut h: [u8; 20] = [
            0x45, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 64, 6, 0, 0, 198, 51, 100, 1, 198, 51, 100, 2,
        ];
        let c = full(&h);
        h[10..12].copy_from_slice(&c.to_ne_bytes());
        assert_eq!(full(&h), 0);
        for new in [
            [10, 88, 0, 2],
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [203, 0, 113, 9],
        ] {
            let old: [u8; 4] = h[16..20].try_into().unwrap();
            let csum = u16::from_ne_bytes([h[10], h[11]]);
            let n = csum_replace(csum, u32::from_ne_bytes(old), u32::from_ne_bytes(new), 4);
            h[16..20].copy_from_slice(&new);
            h[10..12].copy_from_slice(&n.to_ne_bytes());
            assert_eq!(full(&h), 0, "after writing {new:?}");
        }
        for ttl in [63u8, 1, 0, 255] {
            let old = u16::from_ne_bytes([h[8], h[9]]);
            let new = u16::from_ne_bytes([ttl, h[9]]);
            let csum = u16::from_ne_bytes([h[10], h[11]]);
            let n = csum_replace(csum, u32::from(old), u32::from(new), 2);
            h[8] = ttl;
            h[10..12].copy_from_slice(&n.to_ne_bytes());
            assert_eq!(full(&h), 0, "after ttl {ttl}");
        }
    }

    #[test]
    fn reversed_swaps_both_ends() {
        let k = CtKey {
            src_addr: [10, 88, 0, 2],
            dst_addr: [198, 51, 100, 1],
            src_port: 40000u16.to_be_bytes(),
            dst_port: 80u16.to_be_bytes(),
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        let r = k.reversed();
        assert_eq!(r.src_addr, k.dst_addr);
        assert_eq!(r.dst_port, k.src_port);
        assert_eq!(r.reversed(), k);
    }

    #[test]
    fn layouts_have_the_sizes_bpftool_shows() {
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtEntry>(), 112);
        assert_eq!(size_of::<PortKey>(), 8);
        assert_eq!(size_of::<PortTarget>(), 12);
        assert_eq!(size_of::<Endpoint>(), 20);
        assert_eq!(size_of::<Config>(), 56);
        assert_eq!(size_of::<StaticNat>(), 8);
    }

    #[test]
    fn reason_table_is_in_index_order() {
        for (i, (r, _)) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }

    #[test]
    fn tcp_handshake_and_close_walk_the_states() {
        use tcp_flags::{ACK, FIN, RST, SYN};
        use tcp_state::*;
        let step = |(s, f): (u8, u8), dir, flags| tcp_transition(s, f, dir, flags);
        let mut c = (NONE, 0);
        c = step(c, DIR_ORIGINAL, SYN);
        assert_eq!(c.0, SYN_SENT);
        c = step(c, DIR_REPLY, SYN | ACK);
        assert_eq!(c.0, SYN_RECV);
        c = step(c, DIR_ORIGINAL, ACK);
        assert_eq!(c.0, ESTABLISHED);
        c = step(c, DIR_ORIGINAL, FIN | ACK);
        assert_eq!(c, (FIN_WAIT, CT_FIN_ORIG));
        // The closing side's own ACKs do not move it; the other side's ACK does.
        assert_eq!(step(c, DIR_ORIGINAL, ACK).0, FIN_WAIT);
        c = step(c, DIR_REPLY, ACK);
        assert_eq!(c.0, CLOSE_WAIT);
        c = step(c, DIR_REPLY, FIN | ACK);
        assert_eq!(c.0, LAST_ACK);
        c = step(c, DIR_ORIGINAL, ACK);
        assert_eq!(c.0, TIME_WAIT);
        assert_eq!(step(c, DIR_ORIGINAL, SYN), (SYN_SENT, 0), "reopened");
        assert_eq!(
            step((CLOSE, 0), DIR_ORIGINAL, SYN),
            (SYN_SENT, 0),
            "reopened"
        );
        assert_eq!(
            step((ESTABLISHED, 0), DIR_ORIGINAL, SYN),
            (ESTABLISHED, 0),
            "a SYN on an open connection changes nothing"
        );
        assert_eq!(
            step((CLOSE_WAIT, CT_FIN_ORIG), DIR_ORIGINAL, SYN),
            (CLOSE_WAIT, CT_FIN_ORIG)
        );
        assert_eq!(step((ESTABLISHED, 0), DIR_REPLY, RST).0, CLOSE);
        assert_eq!(step((NONE, 0), DIR_ORIGINAL, ACK).0, ESTABLISHED);
        // Simultaneous close: both FINs before any ACK.
        let c = step(
            step((ESTABLISHED, 0), DIR_ORIGINAL, FIN),
            DIR_REPLY,
            FIN | ACK,
        );
        assert_eq!(c.0, LAST_ACK);
    }

    #[test]
    fn timeouts_follow_state() {
        assert_eq!(
            ct_timeout_ns(PROTO_TCP, tcp_state::ESTABLISHED),
            timeout::TCP_ESTABLISHED
        );
        assert_eq!(
            ct_timeout_ns(PROTO_UDP, dgram_state::REPLIED),
            timeout::UDP_REPLIED
        );
        assert_eq!(ct_timeout_ns(PROTO_ICMP, 0), timeout::ICMP);
    }
}
