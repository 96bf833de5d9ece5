//! Host-local access to published ports (F4) at the socket, as Cilium's socket LB does: a node
//! process that connects (or sends) to a published port on 127.0.0.0/8, the node's address or
//! the gateway (over IPv6: `::1`, the node's global addresses or the IPv6 gateway) gets the
//! container's address instead, before any packet exists. No per-packet
//! NAT, and the container sees the node's real source address. `getpeername` and `recvmsg`
//! show the application the address it asked for.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use nat_common::{Addr6, PROTO_TCP, PROTO_UDP, Reason, SockKey4, SockKey6, SockOrig4, SockOrig6};

use crate::{
    family::Fam as _,
    lookup,
    maps::{SOCK_RNAT, SOCK_RNAT6},
    stats::count,
};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

/// The node's settings, when the socket lives in the node's namespace (cgroups span
/// namespaces; other namespaces are not this node's to translate).
#[inline(always)]
fn in_our_netns(ctx: &SockAddrContext) -> Option<&'static nat_common::Config> {
    let cfg = lookup::config().ok()?;
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    (cookie == cfg.netns_cookie).then_some(cfg)
}

/// Rewrite the destination of a connect/sendmsg to a published port. Always allows the call.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext) -> i32 {
    let Some(cfg) = in_our_netns(ctx) else {
        return 1;
    };
    // SAFETY: the context is the kernel's `bpf_sock_addr` for this call.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = proto_of(sa.type_) else {
        return 1;
    };
    let dst = sa.user_ip4.to_ne_bytes();
    let port = (sa.user_port as u16).to_ne_bytes();
    let local = dst[0] == 127 || dst == cfg.v4.node_addr || dst == cfg.v4.gateway_addr;
    if !local {
        return 1;
    }
    let Some(target) = lookup::published_port(dst, port, proto) else {
        return 1;
    };
    let rkey = SockKey4 {
        // SAFETY: helper on the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) },
        addr: target.addr,
        port: target.port,
        _pad: [0; 2],
    };
    let orig = SockOrig4 {
        addr: dst,
        port,
        _pad: [0; 2],
    };
    if SOCK_RNAT.insert(&rkey, &orig, u64::from(BPF_ANY)).is_err() {
        // Without the reverse entry replies would show the container address: do not translate.
        return 1;
    }
    sa.user_ip4 = u32::from_ne_bytes(target.addr);
    sa.user_port = u32::from(u16::from_ne_bytes(target.port));
    count(Reason::SockXlate, 0);
    1
}

/// Show the application the published address instead of the container's.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    if in_our_netns(ctx).is_none() {
        return 1;
    }
    // SAFETY: the context is the kernel's `bpf_sock_addr` for this call.
    let sa = unsafe { &mut *ctx.sock_addr };
    let key = SockKey4 {
        // SAFETY: helper on the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) },
        addr: sa.user_ip4.to_ne_bytes(),
        port: (sa.user_port as u16).to_ne_bytes(),
        _pad: [0; 2],
    };
    // SAFETY: the value is copied out at once.
    if let Some(o) = unsafe { SOCK_RNAT.get(&key) }.copied() {
        sa.user_ip4 = u32::from_ne_bytes(o.addr);
        sa.user_port = u32::from(u16::from_ne_bytes(o.port));
    }
    1
}

/// The protocol of a socket the programs translate for.
#[inline(always)]
fn proto_of(type_: u32) -> Option<u8> {
    match type_ {
        SOCK_STREAM => Some(PROTO_TCP),
        SOCK_DGRAM => Some(PROTO_UDP),
        _ => None,
    }
}

/// The IPv6 address in a `bpf_sock_addr` (four network-order words) as bytes. The kernel
/// allows only 4-byte loads of `user_ip6`: volatile reads keep the compiler from merging
/// them.
#[inline(always)]
fn addr6(w: &[u32; 4]) -> Addr6 {
    // SAFETY: reads of the program's own context, field by field.
    let w: [u32; 4] = unsafe {
        [
            read_volatile(&raw const w[0]),
            read_volatile(&raw const w[1]),
            read_volatile(&raw const w[2]),
            read_volatile(&raw const w[3]),
        ]
    };
    // SAFETY: 16 bytes either way; the words hold the address in network order.
    unsafe { core::mem::transmute::<[u32; 4], Addr6>(w) }
}

/// An IPv6 address as four native-order words, copied (it may sit anywhere on the stack,
/// where the word loads of `words.rs` would have to be aligned).
#[inline(always)]
fn words(a: &Addr6) -> [u32; 4] {
    // SAFETY: 16 bytes either way; any bits are valid words.
    unsafe { core::mem::transmute::<Addr6, [u32; 4]>(*a) }
}

/// Write `a` into a `bpf_sock_addr`'s `user_ip6`, with 4-byte stores only (as for loads).
#[inline(always)]
fn set_ip6(to: &mut [u32; 4], a: &Addr6) {
    let w = words(a);
    // SAFETY: writes of the program's own context, field by field.
    unsafe {
        write_volatile(&raw mut to[0], w[0]);
        write_volatile(&raw mut to[1], w[1]);
        write_volatile(&raw mut to[2], w[2]);
        write_volatile(&raw mut to[3], w[3]);
    }
}

/// `translate` over IPv6. A v4-mapped destination (an IPv6 socket reaching an IPv4 address)
/// is not one of the node's IPv6 addresses and is left alone.
#[inline(always)]
pub fn translate6(ctx: &SockAddrContext) -> i32 {
    let Some(cfg) = in_our_netns(ctx) else {
        return 1;
    };
    if cfg.v6.prefix_len == 0 {
        return 1;
    }
    // SAFETY: the context is the kernel's `bpf_sock_addr` for this call.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = proto_of(sa.type_) else {
        return 1;
    };
    let dst = addr6(&sa.user_ip6);
    let port = (sa.user_port as u16).to_ne_bytes();
    let loopback = dst == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let local = loopback || dst == cfg.v6.gateway_addr || Addr6::is_node_addr(cfg, &dst);
    if !local {
        return 1;
    }
    let Some(target) = Addr6::port_target(&dst, port, proto) else {
        return 1;
    };
    let rkey = SockKey6 {
        // SAFETY: helper on the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) },
        addr: target.addr,
        port: target.port,
        _pad: [0; 6],
    };
    let orig = SockOrig6 {
        addr: dst,
        port,
        _pad: [0; 2],
    };
    if SOCK_RNAT6.insert(&rkey, &orig, u64::from(BPF_ANY)).is_err() {
        // Without the reverse entry replies would show the container address: do not translate.
        return 1;
    }
    set_ip6(&mut sa.user_ip6, &target.addr);
    sa.user_port = u32::from(u16::from_ne_bytes(target.port));
    count(Reason::SockXlate, 0);
    1
}

/// `reverse` over IPv6.
#[inline(always)]
pub fn reverse6(ctx: &SockAddrContext) -> i32 {
    if in_our_netns(ctx).is_none() {
        return 1;
    }
    // SAFETY: the context is the kernel's `bpf_sock_addr` for this call.
    let sa = unsafe { &mut *ctx.sock_addr };
    let key = SockKey6 {
        // SAFETY: helper on the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) },
        addr: addr6(&sa.user_ip6),
        port: (sa.user_port as u16).to_ne_bytes(),
        _pad: [0; 6],
    };
    // SAFETY: the value is copied out at once.
    if let Some(o) = unsafe { SOCK_RNAT6.get(&key) }.copied() {
        set_ip6(&mut sa.user_ip6, &o.addr);
        sa.user_port = u32::from(u16::from_ne_bytes(o.port));
    }
    1
}
