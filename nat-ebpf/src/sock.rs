//! Host-local access to published ports (F4) at the socket, as Cilium's socket LB does: a node
//! process that connects (or sends) to a published port on 127.0.0.0/8, the node's address or
//! the gateway gets the container's address instead, before any packet exists. No per-packet
//! NAT, and the container sees the node's real source address. `getpeername` and `recvmsg`
//! show the application the address it asked for.

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use nat_common::{PROTO_TCP, PROTO_UDP, Reason, SockKey4, SockOrig4};

use crate::{lookup, maps::SOCK_RNAT, stats::count};

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
    let proto = match sa.type_ {
        SOCK_STREAM => PROTO_TCP,
        SOCK_DGRAM => PROTO_UDP,
        _ => return 1,
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
