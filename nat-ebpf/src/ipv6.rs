//! IPv6 on a node with an IPv6 subnet (`up --subnet6`): the Neighbour Discovery responder
//! (IPv6's ARP: Neighbour Solicitations for the gateway and for other containers are
//! answered here, so all traffic reaches this program as unicast), anti-spoofing, and F1
//! (container to container by an endpoint lookup, straight into the peer's namespace).
//! Traffic to the node itself goes to the stack; traffic beyond the subnet and the node is
//! dropped until NAT66 exists, never leaked untranslated. On the uplink, a packet for the
//! subnet from outside is dropped (containers are unreachable from outside, as over IPv4).
//! Without an IPv6 subnet, IPv6 is the stack's business, as before.

use aya_ebpf::{
    helpers::{bpf_redirect, bpf_redirect_peer},
    programs::TcContext,
};
use nat_common::{Addr6, Config, Endpoint, Reason};
use network_types::eth::EthHdr;

use crate::{
    TC_ACT_OK,
    forward::set_macs,
    maps::ENDPOINTS6,
    parse::{ETH_LEN, ptr_at},
    pkt::Pkt as _,
    stats::count,
};

const NEXT_ICMPV6: u8 = 58;
const ND_SOLICIT: u8 = 135;
const ND_ADVERT: u8 = 136;
/// NA flags (first byte): router, solicited, override.
const NA_ROUTER: u8 = 0x80;
const NA_SOLICITED: u8 = 0x40;
const NA_OVERRIDE: u8 = 0x20;
/// ND options: source and target link-layer address.
const OPT_SLLA: u8 = 1;
const OPT_TLLA: u8 = 2;
/// An NS without options, and with one link-layer address option.
const NS_LEN: u16 = 24;
const NS_SLLA_LEN: u16 = 32;

/// The fixed IPv6 header.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ip6Hdr {
    vtc_flow: [u8; 4],
    payload_len: [u8; 2],
    next_hdr: u8,
    hop_limit: u8,
    src: Addr6,
    dst: Addr6,
}

const IP6_LEN: usize = 40;
const L4_OFF: usize = ETH_LEN + IP6_LEN;

/// A Neighbour Solicitation or Advertisement without options.
#[repr(C)]
#[derive(Clone, Copy)]
struct Nd {
    ty: u8,
    code: u8,
    csum: [u8; 2],
    flags: [u8; 4],
    target: Addr6,
}

/// A link-layer address option.
#[repr(C)]
#[derive(Clone, Copy)]
struct LlOpt {
    ty: u8,
    len: u8,
    mac: [u8; 6],
}

const OPT_OFF: usize = L4_OFF + 24;

#[inline(always)]
fn pass(ctx: &TcContext) -> Result<i32, Reason> {
    count(Reason::Pass, ctx.len());
    Ok(TC_ACT_OK)
}

#[inline(always)]
fn endpoint6(addr: &Addr6) -> Option<Endpoint> {
    // SAFETY: the value is copied out at once.
    unsafe { ENDPOINTS6.get(addr).copied() }
}

/// Whether `a` lies in the node's IPv6 subnet.
#[inline(always)]
fn in_subnet6(cfg: &Config, a: &Addr6) -> bool {
    let n = &cfg.v6;
    let bits = n.prefix_len as usize;
    if bits == 0 || bits > 128 {
        return false;
    }
    let mut i = 0;
    while i < 16 {
        let left = bits.saturating_sub(i * 8);
        let mask: u8 = if left >= 8 { 0xff } else { !(0xffu8 >> left) };
        if a[i] & mask != n.subnet_addr[i] & mask {
            return false;
        }
        i += 1;
    }
    true
}

/// Link-local (fe80::/10), unspecified (::) or multicast (ff00::/8): Neighbour Discovery,
/// duplicate address detection, router solicitation, MLD — the stack's, which answers them
/// as Linux does.
#[inline(always)]
fn is_local_scope(a: &Addr6) -> bool {
    (a[0] == 0xfe && a[1] & 0xc0 == 0x80) || a[0] == 0xff || *a == [0; 16]
}

/// Everything a container sends over IPv6.
#[inline(always)]
pub fn from_container(
    ctx: &TcContext,
    cfg: &Config,
    ifindex: u32,
    eth_src: [u8; 6],
) -> Result<i32, Reason> {
    if cfg.v6.prefix_len == 0 {
        return pass(ctx);
    }
    let ip = ptr_at::<Ip6Hdr>(ctx, ETH_LEN).ok_or(Reason::DropTruncated)?;
    // SAFETY: bounds checked by `ptr_at`.
    let ip = unsafe { *ip };
    if ip.next_hdr == NEXT_ICMPV6
        && !is_local_scope(&ip.src)
        && let Some(nd) = ptr_at::<[u8; 1]>(ctx, L4_OFF)
        // SAFETY: bounds checked by `ptr_at`.
        && unsafe { (*nd)[0] } == ND_SOLICIT
    {
        return solicitation(ctx, cfg, &ip, ifindex, eth_src);
    }
    if is_local_scope(&ip.src) || is_local_scope(&ip.dst) {
        return pass(ctx);
    }
    let me = endpoint6(&ip.src).ok_or(Reason::DropSpoof)?;
    if me.ifindex != ifindex || me.mac != eth_src {
        return Err(Reason::DropSpoof);
    }
    if in_subnet6(cfg, &ip.dst) && ip.dst != cfg.v6.gateway_addr {
        // F1: one flat L2 segment, as on a bridge: no hop limit change.
        let peer = endpoint6(&ip.dst).ok_or(Reason::DropNoEndpoint)?;
        set_macs(ctx, peer.mac, peer.host_mac)?;
        count(Reason::Forward, ctx.len());
        // SAFETY: plain helper call.
        return Ok(unsafe { bpf_redirect_peer(peer.ifindex, 0) } as i32);
    }
    if ip.dst == cfg.v6.gateway_addr {
        // F6: the node, by its gateway address.
        return pass(ctx);
    }
    Err(Reason::DropIpv6Out)
}

/// A Neighbour Solicitation from a container with a global source: answered for the gateway
/// (with the host veth's MAC, as a router) and for other containers (with their MAC). The
/// sender must be the container that owns the source address, on its veth, with its MAC.
#[inline(always)]
fn solicitation(
    ctx: &TcContext,
    cfg: &Config,
    ip: &Ip6Hdr,
    ifindex: u32,
    eth_src: [u8; 6],
) -> Result<i32, Reason> {
    let len = u16::from_be_bytes(ip.payload_len);
    if ip.hop_limit != 255 || (len != NS_LEN && len != NS_SLLA_LEN) {
        // Not a solicitation a neighbour would accept (RFC 4861 7.1.1), or one with options
        // this responder does not write: the stack's.
        return pass(ctx);
    }
    let ns = ptr_at::<Nd>(ctx, L4_OFF).ok_or(Reason::DropTruncated)?;
    // SAFETY: bounds checked by `ptr_at`.
    let ns = unsafe { *ns };
    let with_opt = len == NS_SLLA_LEN;
    let opt = if with_opt {
        let o = ptr_at::<LlOpt>(ctx, OPT_OFF).ok_or(Reason::DropTruncated)?;
        // SAFETY: bounds checked by `ptr_at`.
        Some(unsafe { *o })
    } else {
        None
    };
    if ns.code != 0 || opt.is_some_and(|o| o.ty != OPT_SLLA || o.len != 1) {
        return pass(ctx);
    }
    let me = endpoint6(&ip.src).ok_or(Reason::DropSpoof)?;
    if me.ifindex != ifindex || me.mac != eth_src || opt.is_some_and(|o| o.mac != eth_src) {
        return Err(Reason::DropSpoof);
    }
    let (mac, router) = if ns.target == cfg.v6.gateway_addr {
        (me.host_mac, NA_ROUTER)
    } else if let Some(peer) = endpoint6(&ns.target)
        && ns.target != ip.src
    {
        (peer.mac, 0)
    } else {
        return Err(Reason::DropNdUnknown);
    };
    advertise(ctx, ip, &ns, (eth_src, mac), router, with_opt, ifindex)
}

/// Sum of big-endian 16-bit words, unfolded.
#[inline(always)]
fn sum16(b: &[u8]) -> u32 {
    let mut s = 0u32;
    let mut i = 0;
    while i + 1 < b.len() {
        s += u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
        i += 2;
    }
    s
}

/// Turn the solicitation into the advertisement "`ns.target` is at `mac`" and send it back
/// out of `ifindex`, where it came from.
#[inline(always)]
fn advertise(
    ctx: &TcContext,
    ip: &Ip6Hdr,
    ns: &Nd,
    (to, mac): ([u8; 6], [u8; 6]),
    router: u8,
    with_opt: bool,
    ifindex: u32,
) -> Result<i32, Reason> {
    let mut na = Nd {
        ty: ND_ADVERT,
        code: 0,
        csum: [0; 2],
        flags: [router | NA_SOLICITED | NA_OVERRIDE, 0, 0, 0],
        target: ns.target,
    };
    let len: u16 = if with_opt { NS_SLLA_LEN } else { NS_LEN };
    // The checksum over the pseudo-header (source, destination, length, next header) and the
    // message as sent.
    let mut s = sum16(&ns.target) + sum16(&ip.src) + u32::from(len) + u32::from(NEXT_ICMPV6);
    s += u32::from(u16::from_be_bytes([ND_ADVERT, 0]));
    s += u32::from(u16::from_be_bytes([na.flags[0], 0]));
    s += sum16(&ns.target);
    if with_opt {
        s += u32::from(u16::from_be_bytes([OPT_TLLA, 1])) + sum16(&mac);
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    na.csum = (!(s as u16)).to_be_bytes();
    let reply = Ip6Hdr {
        vtc_flow: [0x60, 0, 0, 0],
        payload_len: len.to_be_bytes(),
        next_hdr: NEXT_ICMPV6,
        hop_limit: 255,
        src: ns.target,
        dst: ip.src,
    };
    ctx.put(
        0,
        &EthHdr {
            dst_addr: to,
            src_addr: mac,
            ether_type: network_types::eth::EtherType::Ipv6 as u16,
        },
    )?;
    ctx.put(ETH_LEN, &reply)?;
    ctx.put(L4_OFF, &na)?;
    if with_opt {
        ctx.put(
            OPT_OFF,
            &LlOpt {
                ty: OPT_TLLA,
                len: 1,
                mac,
            },
        )?;
    }
    count(Reason::NdReply, ctx.len());
    // SAFETY: plain helper call; egress of the interface the solicitation came in on.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// On the uplink: a packet from outside for the IPv6 subnet is dropped (no NAT66 or
/// published port reaches it yet); everything else is the node's.
#[inline(always)]
pub fn from_uplink(ctx: &TcContext, cfg: &Config) -> Result<i32, Reason> {
    if cfg.v6.prefix_len != 0
        && let Some(ip) = ptr_at::<Ip6Hdr>(ctx, ETH_LEN)
        // SAFETY: bounds checked by `ptr_at`.
        && in_subnet6(cfg, unsafe { &(*ip).dst })
    {
        return Err(Reason::DropNotPublished);
    }
    pass(ctx)
}
