//! Bounds-checked header reads: `ptr_at` is how a header is read in place (rewrites go
//! through `pkt.rs`, whole-packet walks through load helpers).

use core::mem::{MaybeUninit, size_of};

use crate::{pkt::Pkt, words};
use nat_common::{
    Addr4, Addr6, CtKey, Family, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Port, Reason,
};
use network_types::{
    arp::ArpHdr,
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

pub const ETH_LEN: usize = EthHdr::LEN;
pub const IP_OFF: usize = ETH_LEN;
pub const IP_TTL_OFF: usize = IP_OFF + 8;
pub const IP_CSUM_OFF: usize = IP_OFF + 10;
pub const IP_SRC_OFF: usize = IP_OFF + 12;
pub const IP_DST_OFF: usize = IP_OFF + 16;

/// Furthest offset a header is read at: every header we parse (quoted ICMP headers included)
/// starts well within it.
pub const MAX_HDR_OFF: usize = 255;

/// A whole `T` at `off`, or `None` when the packet is shorter.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Pkt, off: usize) -> Option<*const T> {
    let start = ctx.start();
    let end = ctx.end();
    // The bound also tells the verifier the offset's range, whatever the compiler did with it.
    if off > MAX_HDR_OFF || start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

/// What the Ethernet header carries.
pub enum L3 {
    Arp,
    Ipv4,
    Ipv6,
    Other,
}

#[inline(always)]
pub fn l3(ctx: &impl Pkt) -> Option<(L3, [u8; 6])> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: `ptr_at` checked the whole header is inside the packet.
    let (ty, src) = unsafe { ((*eth).ether_type, (*eth).src_addr) };
    let l3 = if ty == EtherType::Ipv4 as u16 {
        L3::Ipv4
    } else if ty == EtherType::Arp as u16 {
        L3::Arp
    } else if ty == EtherType::Ipv6 as u16 {
        L3::Ipv6
    } else {
        L3::Other
    };
    Some((l3, src))
}

/// The ARP header after the Ethernet header.
#[inline(always)]
pub fn arp(ctx: &impl Pkt) -> Option<ArpHdr> {
    let p = ptr_at::<ArpHdr>(ctx, ETH_LEN)?;
    // SAFETY: bounds checked by `ptr_at`.
    Some(unsafe { *p })
}

/// The fields of an IP packet the datapath decides on, for either family (`Ip4`, `Ip6`).
///
/// In C order, the 8-byte offset first: the addresses then sit at 8-byte aligned offsets, so
/// the compiler copies them a word at a time and `words.rs` may compare them so (byte by
/// byte, an IPv6 address costs about 50 instructions per comparison). The order of the rest
/// packs it to 40 bytes (IPv4) and 64 (IPv6).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ip<A> {
    /// Offset of the L4 header (Ethernet + IP header with options or extension headers).
    pub l4_off: usize,
    pub src: A,
    pub dst: A,
    /// Source port, or for ICMP echo the id of a request (0 for a reply).
    pub sport: Port,
    /// Destination port, or for ICMP echo the id of a reply (0 for a request).
    pub dport: Port,
    /// The IP datagram's length, headers included (IPv6: 40 + payload length).
    pub tot_len: u16,
    /// Fragment offset in 8-byte units.
    pub frag_offset: u16,
    /// Where the fragmentable data starts, counted from the IP header: IPv4's header length,
    /// or the end of IPv6's Fragment header (the offsets count from there).
    pub frag_data_off: u16,
    /// IPv4: identification (first two bytes); IPv6: the Fragment header's. Fragments of
    /// one datagram share it.
    pub id: [u8; 4],
    /// IP protocol (IPv6: the upper-layer header's next header value).
    pub proto: u8,
    /// TTL, or IPv6 hop limit.
    pub ttl: u8,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    /// Part of a fragmented datagram (MF set or a non-zero offset).
    pub frag: bool,
    /// Don't fragment (always set over IPv6: routers never fragment).
    pub df: bool,
    /// The L4 header is in this packet (not a non-first fragment).
    pub l4_present: bool,
    /// A non-first fragment whose ports were learned from its first fragment.
    pub ports_known: bool,
    /// MF: more fragments follow.
    pub more_fragments: bool,
    /// IPv6: an extension header NAT66 must not pass (a routing header with segments left,
    /// or a chain longer than `EXT_MAX`): `drop_ipv6_ext` where it would be translated.
    pub bad_ext: bool,
}

const _: () = assert!(size_of::<Ip<Addr4>>() == 40 && size_of::<Ip<Addr6>>() == 64);

pub type Ip4 = Ip<Addr4>;
pub type Ip6 = Ip<Addr6>;

impl<A: Family> Ip<A> {
    #[inline(always)]
    pub fn key(&self) -> CtKey<A> {
        CtKey::new(self.src, self.dst, self.sport, self.dport, self.proto)
    }

    /// TCP, UDP, or an ICMP echo request/reply whose ports (ids) are known: the packets that
    /// conntrack and NAT handle.
    #[inline(always)]
    pub fn is_trackable(&self) -> bool {
        match self.proto {
            PROTO_TCP | PROTO_UDP => self.l4_present || self.ports_known,
            p if p == A::PROTO_ICMP => {
                self.l4_present
                    && (self.icmp_type == A::ECHO_REQUEST || self.icmp_type == A::ECHO_REPLY)
            }
            _ => false,
        }
    }
}

impl<A> Ip<A> {
    /// The IP header's length (options or extension headers included).
    #[inline(always)]
    pub fn ip_hdr_len(&self) -> usize {
        self.l4_off - IP_OFF
    }
}

/// Parse the IPv4 header and the L4 ports. Only the first fragment carries L4 headers; later
/// fragments come back with zero ports and `frag` set.
#[inline(always)]
pub fn ipv4(ctx: &impl Pkt) -> Result<Ip4, Reason> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, IP_OFF).ok_or(Reason::DropTruncated)?;
    // SAFETY: bounds checked by `ptr_at`; read field by field, not copied whole.
    let h = unsafe { &*ip };
    let ihl = usize::from(h.vihl & 0x0f) * 4;
    if h.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(Reason::DropTruncated);
    }
    // ip_rcv's rules: a header or total length past the frame is a truncated packet (the
    // frame may be longer: Ethernet padding), a total length below the header is malformed.
    // `bytes` is the skb's whole length in TC, non-linear part included.
    let tot_len = u16::from_be_bytes(h.tot_len);
    let frame = ctx.bytes() as usize;
    if IP_OFF + ihl > frame || IP_OFF + usize::from(tot_len) > frame {
        return Err(Reason::DropTruncated);
    }
    if usize::from(tot_len) < ihl {
        return Err(Reason::DropInvalid);
    }
    // SAFETY: both addresses are inside the header `ptr_at` checked.
    let (src, dst) = unsafe {
        (
            words::quad_at::<12>(ip.cast()),
            words::quad_at::<16>(ip.cast()),
        )
    };
    let frags = u16::from_be_bytes(h.frags);
    let more_fragments = frags & 0x2000 != 0;
    let offset = frags & 0x1fff;
    let mut p = Ip4 {
        src,
        dst,
        sport: [0; 2],
        dport: [0; 2],
        proto: h.proto,
        ttl: h.ttl,
        tcp_flags: 0,
        icmp_type: 0,
        frag: more_fragments || offset != 0,
        df: frags & 0x4000 != 0,
        l4_present: offset == 0,
        ports_known: false,
        id: [h.id[0], h.id[1], 0, 0],
        frag_data_off: ihl as u16,
        bad_ext: false,
        l4_off: IP_OFF + ihl,
        tot_len,
        frag_offset: offset,
        more_fragments,
    };
    if offset != 0 {
        return Ok(p);
    }
    l4(ctx, &mut p)?;
    Ok(p)
}

/// Read the ports (TCP, UDP), flags (TCP) or echo id (ICMP) of a packet that carries its L4
/// header, and check the header's lengths against the datagram's.
#[inline(always)]
fn l4<A: Family>(ctx: &impl Pkt, p: &mut Ip<A>) -> Result<(), Reason> {
    // The L4 lengths are checked against this packet only when it holds the whole datagram.
    let l4_len = usize::from(p.tot_len).saturating_sub(p.ip_hdr_len());
    match p.proto {
        PROTO_TCP => {
            // The whole fixed header: the checksum a rewrite updates is at offset 16.
            let t = ptr_at::<[u8; 20]>(ctx, p.l4_off).ok_or(Reason::DropTruncated)?;
            // SAFETY: bounds checked by `ptr_at` (20 bytes); read in place.
            let (ports, t) = unsafe { (words::quad_at::<0>(t.cast()), &*t) };
            p.sport = [ports[0], ports[1]];
            p.dport = [ports[2], ports[3]];
            p.tcp_flags = t[13];
            let doff = usize::from(t[12] >> 4) * 4;
            if doff < 20 || (!p.frag && doff > l4_len) {
                return Err(Reason::DropInvalid);
            }
        }
        PROTO_UDP => {
            let u = ptr_at::<[u8; 8]>(ctx, p.l4_off).ok_or(Reason::DropTruncated)?;
            // SAFETY: bounds checked by `ptr_at` (8 bytes); read in place.
            let (ports, u) = unsafe { (words::quad_at::<0>(u.cast()), &*u) };
            p.sport = [ports[0], ports[1]];
            p.dport = [ports[2], ports[3]];
            let ulen = usize::from(u16::from_be_bytes([u[4], u[5]]));
            // Shorter than the packet is padding (udp_rcv trims it); longer is a lie.
            if ulen < 8 || (!p.frag && ulen > l4_len) {
                return Err(Reason::DropInvalid);
            }
        }
        proto if proto == A::PROTO_ICMP => {
            // type, code, checksum, id, sequence.
            let i = ptr_at::<[u8; 8]>(ctx, p.l4_off).ok_or(Reason::DropTruncated)?;
            // SAFETY: bounds checked by `ptr_at`.
            let i = unsafe { *i };
            p.icmp_type = i[0];
            if i[0] == A::ECHO_REQUEST {
                p.sport = [i[4], i[5]];
            } else if i[0] == A::ECHO_REPLY {
                p.dport = [i[4], i[5]];
            }
        }
        _ => {}
    }
    Ok(())
}

/// The fixed IPv6 header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ip6Hdr {
    pub vtc_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub src: Addr6,
    pub dst: Addr6,
}

pub const IP6_LEN: usize = size_of::<Ip6Hdr>();

/// Extension headers the IPv6 parser walks at most; a longer chain is `bad_ext`.
const EXT_MAX: usize = 4;
/// Next header values of the extension headers: hop-by-hop options, routing, fragment,
/// destination options.
const EXT_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_FRAGMENT: u8 = 44;
const EXT_DEST: u8 = 60;

/// Parse the IPv6 header, its extension headers and the L4 ports into `out` (per-CPU memory:
/// the IPv6 path's stack cannot spare the room). The rules for extension headers:
/// - hop-by-hop and destination options are stepped over (nothing in them is translated,
///   and the checksums do not cover them);
/// - a routing header with segments left makes the packet `bad_ext` (its destination is not
///   the final one, which the upper layer's checksum covers); with none left it is stepped
///   over;
/// - a Fragment header makes the packet a fragment, tracked as IPv4 fragments are (`frag.rs`):
///   the first one carries the ports, the later ones have no upper-layer header;
/// - anything else (ESP, AH, unknown) ends the walk: `proto` is that header, and the packet
///   is not trackable, so it is never translated (`drop_unsupported` where it would be);
/// - more than `EXT_MAX` extension headers: `bad_ext`.
#[inline(always)]
pub fn ipv6<'a>(ctx: &impl Pkt, out: &'a mut MaybeUninit<Ip6>) -> Result<&'a mut Ip6, Reason> {
    let ip = ptr_at::<Ip6Hdr>(ctx, IP_OFF).ok_or(Reason::DropTruncated)?;
    // SAFETY: bounds checked by `ptr_at`; read field by field, not copied whole.
    let h = unsafe { &*ip };
    if h.vtc_flow[0] >> 4 != 6 {
        return Err(Reason::DropTruncated);
    }
    let payload = u16::from_be_bytes(h.payload_len);
    // ip6_rcv's rule: a payload past the frame is a truncated packet (a longer frame is
    // padding). A zero payload length (a jumbogram's) is never ours to translate.
    if IP_OFF + IP6_LEN + usize::from(payload) > ctx.bytes() as usize || payload > 65535 - 40 {
        return Err(Reason::DropTruncated);
    }
    let p = out.write(Ip6 {
        src: words::addr6(&h.src),
        dst: words::addr6(&h.dst),
        sport: [0; 2],
        dport: [0; 2],
        proto: h.next_hdr,
        ttl: h.hop_limit,
        tcp_flags: 0,
        icmp_type: 0,
        frag: false,
        df: true,
        l4_present: true,
        ports_known: false,
        id: [0; 4],
        l4_off: IP_OFF + IP6_LEN,
        tot_len: payload + IP6_LEN as u16,
        frag_offset: 0,
        more_fragments: false,
        frag_data_off: IP6_LEN as u16,
        bad_ext: false,
    });
    if matches!(p.proto, EXT_HOP | EXT_ROUTING | EXT_FRAGMENT | EXT_DEST) {
        extension_headers(ctx, p)?;
    }
    if p.l4_present && !p.bad_ext {
        l4(ctx, p)?;
    }
    Ok(p)
}

/// Walk `p`'s extension headers (the rules are `ipv6`'s): `proto` and `l4_off` end up at the
/// upper-layer header, or the packet is a later fragment or `bad_ext`.
#[inline(always)]
fn extension_headers(ctx: &impl Pkt, p: &mut Ip6) -> Result<(), Reason> {
    let mut i = 0;
    while i < EXT_MAX {
        let off = p.l4_off;
        match p.proto {
            EXT_HOP | EXT_DEST | EXT_ROUTING => {
                // Next header, length in 8-octet units past the first 8; routing: type and
                // segments left.
                let e = ptr_at::<[u8; 4]>(ctx, off).ok_or(Reason::DropTruncated)?;
                // SAFETY: bounds checked by `ptr_at`.
                let e = unsafe { *e };
                if p.proto == EXT_ROUTING && e[3] != 0 {
                    p.bad_ext = true;
                    return Ok(());
                }
                p.proto = e[0];
                p.l4_off = off + (usize::from(e[1]) + 1) * 8;
            }
            EXT_FRAGMENT => {
                // Next header, reserved, offset (13 bits) and M, identification.
                let f = ptr_at::<[u8; 8]>(ctx, off).ok_or(Reason::DropTruncated)?;
                // SAFETY: bounds checked by `ptr_at`.
                let f = unsafe { *f };
                let word = u16::from_be_bytes([f[2], f[3]]);
                p.proto = f[0];
                p.l4_off = off + 8;
                p.frag_data_off = (p.l4_off - IP_OFF) as u16;
                p.frag_offset = word >> 3;
                p.more_fragments = word & 1 != 0;
                p.frag = p.frag_offset != 0 || p.more_fragments;
                p.id = [f[4], f[5], f[6], f[7]];
                if p.frag_offset != 0 {
                    // A later fragment: no upper-layer header here.
                    p.l4_present = false;
                    return Ok(());
                }
            }
            _ => return Ok(()),
        }
        if p.l4_off > MAX_HDR_OFF {
            p.bad_ext = true;
            return Ok(());
        }
        i += 1;
    }
    if matches!(p.proto, EXT_HOP | EXT_ROUTING | EXT_FRAGMENT | EXT_DEST) {
        p.bad_ext = true;
    }
    Ok(())
}

/// Whether the IPv4 header checksum of `p` is right (options included). Checked before a
/// packet creates state; packets of known connections are translated with incremental
/// updates, which keep a wrong checksum wrong for the receiver to drop.
#[inline(always)]
pub fn ipv4_csum_ok(ctx: &impl Pkt, p: &Ip4) -> bool {
    let Some(h) = ptr_at::<[u8; 20]>(ctx, IP_OFF) else {
        return false;
    };
    // SAFETY: bounds checked by `ptr_at`.
    let h = unsafe { *h };
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([h[i], h[i + 1]]));
        i += 2;
    }
    // Options: up to 40 more bytes, four at a time.
    let mut off = IP_OFF + 20;
    let mut n = 0;
    while n < 10 && off < p.l4_off {
        let Some(w) = ptr_at::<[u8; 4]>(ctx, off) else {
            return false;
        };
        // SAFETY: bounds checked by `ptr_at`.
        let w = unsafe { *w };
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]))
            + u32::from(u16::from_be_bytes([w[2], w[3]]));
        off += 4;
        n += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum == 0xffff
}

/// Offset of the L4 checksum field, and whether it covers the pseudo-header (ICMPv6's does,
/// ICMP's does not).
#[inline(always)]
pub fn l4_csum_off<A>(p: &Ip<A>) -> Option<(usize, bool)> {
    if !p.l4_present {
        return None;
    }
    match p.proto {
        PROTO_TCP => Some((p.l4_off + 16, true)),
        PROTO_UDP => Some((p.l4_off + 6, true)),
        PROTO_ICMP => Some((p.l4_off + 2, false)),
        PROTO_ICMPV6 => Some((p.l4_off + 2, true)),
        _ => None,
    }
}

#[inline(always)]
pub fn in_subnet(addr: Addr4, base: Addr4, mask: Addr4) -> bool {
    u32::from_ne_bytes(addr) & u32::from_ne_bytes(mask) == u32::from_ne_bytes(base)
}
