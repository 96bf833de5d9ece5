//! Hand-built packets for `BPF_PROG_TEST_RUN` tests, and checksum verification of what the
//! programs write back. Checksums are computed from scratch here, independently of the
//! incremental updates the datapath does.

use std::net::Ipv4Addr;

pub use nat_common::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};

/// Internet checksum of `data` starting from the partial sum `init`.
#[must_use]
pub fn csum(data: &[u8], init: u32) -> u16 {
    let mut sum = init;
    for chunk in data.chunks(2) {
        let w = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum()
}

/// A TCP segment with `flags` and a short payload, checksummed for `src -> dst`.
#[must_use]
pub fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&1_000u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&65_535u16.to_be_bytes());
    t.extend_from_slice(b"hello");
    let c = csum(&t, pseudo(src, dst, PROTO_TCP, t.len()));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// A SYN carrying the TCP options `opts` (padded with EOL to a multiple of four bytes),
/// checksummed for `src -> dst`.
#[must_use]
pub fn tcp_syn_opts(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, opts: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&1_000u32.to_be_bytes());
    t.extend_from_slice(opts);
    t.resize(20 + opts.len().div_ceil(4) * 4, 0);
    t[12] = ((t.len() / 4) as u8) << 4;
    t[13] = 0x02;
    t[14..16].copy_from_slice(&65_535u16.to_be_bytes());
    let c = csum(&t, pseudo(src, dst, PROTO_TCP, t.len()));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// A TCP segment with the given numbers and no payload, checksummed for `src -> dst`
/// (`good = false` breaks the checksum).
#[must_use]
#[expect(
    clippy::too_many_arguments,
    reason = "a segment's fields, named at the call"
)]
pub fn tcp_seg(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    good: bool,
) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&1024u16.to_be_bytes());
    let mut c = csum(&t, pseudo(src, dst, PROTO_TCP, t.len()));
    if !good {
        c ^= 0x5a5a;
    }
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// The sequence and acknowledgement numbers, flags and payload length of a TCP segment in an
/// Ethernet frame, if it is one from `src` to `dst`.
#[must_use]
pub fn tcp_numbers(
    f: &[u8],
    src: std::net::SocketAddrV4,
    dst: std::net::SocketAddrV4,
) -> Option<(u32, u32, u8, u32)> {
    if f.len() < 54 || f[12..14] != [0x08, 0x00] || f[23] != PROTO_TCP {
        return None;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    let t = f.get(14 + ihl..14 + total)?;
    let addr = |o: usize| Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]);
    let port = |o: usize| u16::from_be_bytes([t[o], t[o + 1]]);
    if addr(26) != *src.ip()
        || addr(30) != *dst.ip()
        || port(0) != src.port()
        || port(2) != dst.port()
    {
        return None;
    }
    let word = |o: usize| u32::from_be_bytes([t[o], t[o + 1], t[o + 2], t[o + 3]]);
    let doff = usize::from(t[12] >> 4) * 4;
    Some((word(4), word(8), t[13], (t.len() - doff) as u32))
}

/// A UDP datagram; `checksum = false` leaves the field 0 ("no checksum").
#[must_use]
pub fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, checksum: bool) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(b"query");
    let len = u.len() as u16;
    u[4..6].copy_from_slice(&len.to_be_bytes());
    if checksum {
        let c = csum(&u, pseudo(src, dst, PROTO_UDP, u.len()));
        u[6..8].copy_from_slice(&c.to_be_bytes());
    }
    u
}

/// An ICMP echo request.
#[must_use]
pub fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut i = vec![8, 0, 0, 0];
    i.extend_from_slice(&id.to_be_bytes());
    i.extend_from_slice(&seq.to_be_bytes());
    i.extend_from_slice(b"ping-payload");
    let c = csum(&i, 0);
    i[2..4].copy_from_slice(&c.to_be_bytes());
    i
}

/// Ethernet + IPv4 (TTL 64, DF) around `l4`.
#[must_use]
pub fn frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    l4: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(34 + l4.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, proto, 0, 0];
    ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = csum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(l4);
    f
}

/// The frame `whole` (from `frame`) as two IPv4 fragments with IP id `id`: the first `split`
/// bytes of its L4 part (a multiple of 8, MF set) and the rest (at offset `split`).
#[must_use]
pub fn fragments(whole: &[u8], id: u16, split: usize) -> [Vec<u8>; 2] {
    assert_eq!(split % 8, 0, "fragment offsets count 8-byte units");
    let (head, l4) = whole.split_at(34);
    let part = |data: &[u8], frag: u16| {
        let mut f = head.to_vec();
        f[16..18].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
        f[18..20].copy_from_slice(&id.to_be_bytes());
        f[20..22].copy_from_slice(&frag.to_be_bytes());
        f[24..26].copy_from_slice(&[0, 0]);
        let c = csum(&f[14..34], 0);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(data);
        f
    };
    [
        part(&l4[..split], 0x2000),
        part(&l4[split..], (split / 8) as u16),
    ]
}

/// The parsed view of a frame the program wrote back.
#[derive(Debug)]
pub struct Seen {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub sport: u16,
    pub dport: u16,
    pub l4_csum: u16,
}

/// Parse `f` and assert that its IPv4 and L4 checksums are correct.
#[must_use]
pub fn verify(f: &[u8]) -> Seen {
    assert!(f.len() >= 34, "frame too short: {}", f.len());
    let ip = &f[14..34];
    assert_eq!(csum(ip, 0), 0, "IPv4 header checksum is wrong");
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let l4 = &f[34..14 + total];
    let proto = ip[9];
    let (sport, dport, l4_csum) = match proto {
        PROTO_TCP | PROTO_UDP => {
            let c = u16::from_be_bytes(if proto == PROTO_TCP {
                [l4[16], l4[17]]
            } else {
                [l4[6], l4[7]]
            });
            if !(proto == PROTO_UDP && c == 0) {
                assert_eq!(
                    csum(l4, pseudo(src, dst, proto, l4.len())),
                    0,
                    "L4 checksum is wrong"
                );
            }
            (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
                c,
            )
        }
        _ => {
            assert_eq!(csum(l4, 0), 0, "ICMP checksum is wrong");
            (
                u16::from_be_bytes([l4[4], l4[5]]),
                0,
                u16::from_be_bytes([l4[2], l4[3]]),
            )
        }
    };
    Seen {
        dst_mac: f[0..6].try_into().unwrap_or_default(),
        src_mac: f[6..12].try_into().unwrap_or_default(),
        src,
        dst,
        ttl: ip[8],
        sport,
        dport,
        l4_csum,
    }
}

/// The IPv6 pseudo-header sum for `len` bytes of `proto` from `src` to `dst`.
fn pseudo6(src: std::net::Ipv6Addr, dst: std::net::Ipv6Addr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::with_capacity(40);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&(len as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, proto]);
    p.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum()
}

/// An Ethernet frame with an IPv6 header from `src` to `dst`, then `ext` (extension headers,
/// whose first next-header is `first`), then a UDP datagram `sport -> dport` carrying
/// `payload`, checksummed over the pseudo-header (the UDP length is the datagram's, even when
/// `cut` keeps only its first `cut` bytes: a first fragment).
#[must_use]
pub fn udp6(
    (src, dst): (std::net::Ipv6Addr, std::net::Ipv6Addr),
    (eth_src, eth_dst): ([u8; 6], [u8; 6]),
    (first, ext): (u8, &[u8]),
    (sport, dport): (u16, u16),
    payload: &[u8],
    cut: Option<usize>,
) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut u = Vec::with_capacity(len);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&(len as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    // A computed 0 is sent as 0xffff: over IPv6 a zero UDP checksum means none, which is
    // invalid (RFC 8200) and dropped.
    let c = match csum(&u, pseudo6(src, dst, PROTO_UDP, len)) {
        0 => 0xffff,
        c => c,
    };
    u[6..8].copy_from_slice(&c.to_be_bytes());
    if let Some(n) = cut {
        u.truncate(n);
    }
    ipv6_frame((src, dst), (eth_src, eth_dst), (first, ext), &u)
}

/// An Ethernet frame with an ICMPv6 message `msg` (its checksum field zero) from `src` to
/// `dst`, hop limit 255, checksummed over the pseudo-header.
#[must_use]
pub fn icmpv6(
    (src, dst): (std::net::Ipv6Addr, std::net::Ipv6Addr),
    (eth_src, eth_dst): ([u8; 6], [u8; 6]),
    msg: &[u8],
) -> Vec<u8> {
    let mut m = msg.to_vec();
    let c = csum(&m, pseudo6(src, dst, nat_common::PROTO_ICMPV6, m.len()));
    m[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = ipv6_frame(
        (src, dst),
        (eth_src, eth_dst),
        (nat_common::PROTO_ICMPV6, &[]),
        &m,
    );
    f[21] = 255;
    f
}

/// An Ethernet frame carrying an IPv6 header, `ext` (first next-header `first`) and `body`.
#[must_use]
pub fn ipv6_frame(
    (src, dst): (std::net::Ipv6Addr, std::net::Ipv6Addr),
    (eth_src, eth_dst): ([u8; 6], [u8; 6]),
    (first, ext): (u8, &[u8]),
    body: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&eth_src);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((ext.len() + body.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[first, 64]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(ext);
    f.extend_from_slice(body);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_packets_verify() {
        let a = Ipv4Addr::new(10, 88, 0, 2);
        let b = Ipv4Addr::new(198, 51, 100, 1);
        let s = verify(&frame(
            [2; 6],
            [4; 6],
            a,
            b,
            PROTO_TCP,
            &tcp(a, b, 1, 2, 0x02),
        ));
        assert_eq!((s.sport, s.dport, s.ttl), (1, 2, 64));
        let s = verify(&frame(
            [2; 6],
            [4; 6],
            a,
            b,
            PROTO_UDP,
            &udp(a, b, 3, 4, false),
        ));
        assert_eq!(s.l4_csum, 0);
        let s = verify(&frame(
            [2; 6],
            [4; 6],
            a,
            b,
            PROTO_ICMP,
            &echo_request(9, 1),
        ));
        assert_eq!(s.sport, 9);
    }

    #[test]
    #[should_panic(expected = "checksum")]
    fn corrupted_packets_do_not_verify() {
        let a = Ipv4Addr::new(10, 88, 0, 2);
        let mut f = frame([2; 6], [4; 6], a, a, PROTO_TCP, &tcp(a, a, 1, 2, 0x02));
        f[40] ^= 1;
        let _ = verify(&f);
    }
}
