//! Map keys, values and constants shared by the eBPF programs (`nat-ebpf`) and the loader
//! (`nat-user`).
//!
//! Every type is `#[repr(C)]` with explicit, zeroed padding: the kernel hashes raw key bytes,
//! and `bytemuck::Pod` refuses to derive for a type with implicit padding. Addresses and ports
//! are byte arrays in network order so that `bpftool map dump` prints them readably
//! (`[10,88,0,2]`, `[0,80]`); integers that people do not read as addresses are native-endian.
#![no_std]

/// Version of the pinned layout. Bumped whenever a map's key or value changes, so that a new
/// loader never silently reuses an old, differently shaped map pinned by an earlier version.
pub const PIN_VERSION: &str = "v5";

mod addr;
mod cluster;
mod conntrack;
mod csum;
mod explain;
mod frag;
mod maps;
mod monitor;
mod node;
mod ports;
mod reason;
mod sock;
mod static_nat;

pub use addr::*;
pub use cluster::*;
pub use conntrack::*;
pub use csum::*;
pub use explain::*;
pub use frag::*;
pub use maps::*;
pub use monitor::*;
pub use node::*;
pub use ports::*;
pub use reason::*;
pub use sock::*;
pub use static_nat::*;

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
    /// The same four over IPv6.
    pub const SOCK_CONNECT6: &str = "sock_connect6";
    pub const SOCK_SENDMSG6: &str = "sock_sendmsg6";
    pub const SOCK_RECVMSG6: &str = "sock_recvmsg6";
    pub const SOCK_GETPEERNAME6: &str = "sock_getpeername6";
}

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// ICMPv6 (IPv6's next header value).
pub const PROTO_ICMPV6: u8 = 58;

#[cfg(feature = "user")]
mod user {
    use super::{
        ClusterNet, Config, Counter, CtEntry4, CtEntry6, CtKey4, CtKey6, CtMeta, Endpoint, Explain,
        FibStep, FragKey4, FragKey6, FragPorts, Lpm4, MonitorCpu, MonitorCtl, Net4, Net6, NodeAddr,
        PortKey4, PortKey6, PortTarget4, PortTarget6, RedirectStep, SockKey4, SockKey6, SockOrig4,
        SockOrig6, StaticNat4, StaticNat6, Step, Trail,
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
        Config,
        Net4,
        Endpoint,
        PortKey4,
        PortTarget4,
        PortKey6,
        PortTarget6,
        CtKey4,
        CtEntry4,
        CtKey6,
        CtEntry6,
        CtMeta,
        Counter,
        StaticNat4,
        StaticNat6,
        SockKey4,
        SockOrig4,
        SockKey6,
        SockOrig6,
        FragKey4,
        FragKey6,
        FragPorts,
        NodeAddr,
        ClusterNet,
        Lpm4,
        Net6,
        MonitorCtl,
        MonitorCpu,
        Trail,
        Explain,
        Step,
        FibStep,
        RedirectStep,
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
    fn an_address_replaced_through_its_difference_gives_the_recomputed_checksum() {
        let mut pkt = [0u8; 64];
        for (i, b) in pkt.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(11);
        }
        let cases: [([u8; 16], [u8; 16]); 4] = [
            (
                [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                [0xfd, 0, 0, 0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3],
            ),
            ([0xff; 16], [0; 16]),
            ([0; 16], [0xff; 16]),
            // Word sums that carry out of 32 bits.
            ([0; 16], [0xfe; 16]),
        ];
        for (old, new) in cases {
            pkt[8..24].copy_from_slice(&old);
            let before = full(&pkt);
            pkt[8..24].copy_from_slice(&new);
            let after = full(&pkt);
            let words = |a: [u8; 16]| -> [u32; 4] {
                core::array::from_fn(|i| {
                    u32::from_ne_bytes(a[4 * i..4 * i + 4].try_into().unwrap())
                })
            };
            let got = csum_add_diff(before, csum_diff16(words(old), words(new)));
            // 0 and 0xffff are the same value in ones' complement.
            assert!(
                got == after || (got ^ after) == 0xffff && (got == 0 || after == 0),
                "{old:?} -> {new:?}: {got:#x} vs {after:#x}"
            );
        }
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
        let k = CtKey4 {
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
    fn an_ipv6_key_is_its_fields_with_zeroed_padding() {
        let src: Addr6 = [0xfd, 0, 0, 0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let dst: Addr6 = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let k = CtKey6::new(
            src,
            dst,
            40000u16.to_be_bytes(),
            80u16.to_be_bytes(),
            PROTO_TCP,
        );
        assert_eq!(
            k,
            CtKey6 {
                src_addr: src,
                dst_addr: dst,
                src_port: 40000u16.to_be_bytes(),
                dst_port: 80u16.to_be_bytes(),
                proto: PROTO_TCP,
                _pad: [0; 3],
            }
        );
        assert_eq!(k.reversed().src_addr, dst);
        assert_eq!(k.reversed().reversed(), k);
    }

    #[test]
    fn a_checksum_difference_updates_like_a_recomputation() {
        // A UDP-like payload covered with a 16-byte address, as NAT66 rewrites it.
        let mut data: [u8; 40] = core::array::from_fn(|i| (i as u8).wrapping_mul(37));
        data[34..36].copy_from_slice(&[0, 0]);
        let c = full(&data);
        data[34..36].copy_from_slice(&c.to_ne_bytes());
        let new: [u8; 16] = [
            0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 1,
        ];
        // What `bpf_csum_diff(old, 16, new, 16, 0)` returns: the sum of the new words and of
        // the complements of the old ones.
        let word = |w: &[u8]| u64::from(u32::from_ne_bytes(w.try_into().unwrap()));
        let mut diff: u64 = 0;
        for (old, new) in data[0..16].chunks(4).zip(new.chunks(4)) {
            diff += (!word(old) & 0xffff_ffff) + word(new);
        }
        while diff > 0xffff_ffff {
            diff = (diff & 0xffff_ffff) + (diff >> 32);
        }
        let csum = u16::from_ne_bytes([data[34], data[35]]);
        data[0..16].copy_from_slice(&new);
        data[34..36].copy_from_slice(&csum_add_diff(csum, diff as u32).to_ne_bytes());
        assert_eq!(full(&data), 0);
    }

    #[test]
    fn layouts_have_the_sizes_bpftool_shows() {
        assert_eq!(size_of::<CtKey4>(), 16);
        assert_eq!(size_of::<CtEntry4>(), 128);
        assert_eq!(size_of::<CtKey6>(), 40);
        assert_eq!(size_of::<CtEntry6>(), 152);
        assert_eq!(size_of::<CtMeta>(), 112);
        assert_eq!(size_of::<Net4>(), 20);
        assert_eq!(size_of::<PortKey4>(), 8);
        assert_eq!(size_of::<PortTarget4>(), 12);
        assert_eq!(size_of::<Endpoint>(), 20);
        assert_eq!(size_of::<Net6>(), 56);
        assert_eq!(size_of::<Config>(), 112);
        assert_eq!(size_of::<StaticNat4>(), 8);
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
