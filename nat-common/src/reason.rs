//! Why a packet was counted: the `stats` map's slots.

use bytemuck::{Pod, Zeroable};

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
    /// A container's packet to a non-masquerade destination (another node's pod, another
    /// node): routed with the container's own address, untracked.
    ClusterRoute = 37,
    /// A packet from a pod of another node (or from another node) delivered to a local
    /// container with its source preserved, untracked.
    ClusterDeliver = 38,
    /// IPv6 Neighbour Solicitation answered by the datapath (IPv6's ARP): a container's for
    /// the gateway or for another container.
    NdReply = 39,
    /// Dropped: a Neighbour Solicitation for an address the datapath does not know.
    DropNdUnknown = 40,
    /// Dropped: IPv6 from a container that would leave by the uplink untranslated: the node
    /// has no global IPv6 address to masquerade with.
    DropIpv6Out = 41,
    /// Dropped: an IPv6 packet to translate whose extension headers NAT66 must not pass: a
    /// routing header with segments left (its destination is not the final one, which the
    /// checksums cover), or a chain longer than the datapath walks.
    DropIpv6Ext = 42,
}

/// Number of `Reason` slots in the `stats` array.
pub const REASON_COUNT: u32 = 43;

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
        (Self::ClusterRoute, "cluster_route"),
        (Self::ClusterDeliver, "cluster_deliver"),
        (Self::NdReply, "nd_reply"),
        (Self::DropNdUnknown, "drop_nd_unknown"),
        (Self::DropIpv6Out, "drop_ipv6_out"),
        (Self::DropIpv6Ext, "drop_ipv6_ext"),
    ];
}

/// One slot of the per-CPU `stats` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
