//! IPv4 fragments. Only the first fragment carries the ports that conntrack keys on; it
//! records them here under the datagram's (src, dst, id, proto), and the later fragments look
//! them up, so a whole datagram follows one translation. A later fragment that arrives before
//! its first cannot be matched: the caller decides (dropped and counted where it would need
//! translation, the stack's otherwise).

use aya_ebpf::bindings::BPF_ANY;
use nat_common::{FragKey, FragPorts, PROTO_TCP, PROTO_UDP};

use crate::{maps::FRAGS, parse::Ip4};

#[inline(always)]
fn key(p: &Ip4) -> FragKey {
    FragKey {
        src_addr: p.src,
        dst_addr: p.dst,
        id: p.id,
        proto: p.proto,
        _pad: 0,
    }
}

/// Record or recover the ports of a fragmented TCP/UDP datagram (before any rewrite).
#[inline(always)]
pub fn resolve(p: &mut Ip4) {
    if !p.frag || (p.proto != PROTO_TCP && p.proto != PROTO_UDP) {
        return;
    }
    if p.l4_present {
        let ports = FragPorts {
            src_port: p.sport,
            dst_port: p.dport,
        };
        let _ = FRAGS.insert(&key(p), &ports, u64::from(BPF_ANY));
    } else if let Some(f) = FRAGS.get_ptr(&key(p)) {
        // SAFETY: read of a map value.
        let f = unsafe { *f };
        p.sport = f.src_port;
        p.dport = f.dst_port;
        p.ports_known = true;
    }
}
