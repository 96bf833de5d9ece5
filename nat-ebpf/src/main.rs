//! bpfnat's eBPF programs. Entry points only; the rules live in the modules, by subject.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![feature(asm_experimental_arch)]
#![expect(
    internal_features,
    reason = "the BPF target has no atomic read-modify-write in core::sync::atomic; the intrinsic lowers to BPF's atomic add (conntrack counters)"
)]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference so no extra copy lands on the 512-byte BPF stack"
)]

mod addr;
mod arp;
mod conntrack;
mod csum;
mod explain;
mod family;
mod forward;
mod frag;
mod icmp;
mod ingress;
mod ipv6;
mod lookup;
mod maps;
mod monitor;
mod nat;
mod nd;
mod nexthop;
mod parse;
mod pkt;
mod sock;
mod stats;
mod tcp;
mod words;
mod xdp;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

pub(crate) const TC_ACT_OK: i32 = 0;
pub(crate) const TC_ACT_SHOT: i32 = 2;

/// The TC action for a decision: a drop is counted under its reason here.
///
/// Functions of their own (`#[inline(never)]`) return this rather than a `Result`: a
/// `Result` comes back through memory, and the compiler may leave a pointer into the
/// caller's stack in R0 at their exit, which the verifier refuses.
#[inline(always)]
pub(crate) fn verdict(ctx: &TcContext, r: Result<i32, nat_common::Reason>) -> i32 {
    r.unwrap_or_else(|reason| {
        stats::count(reason, ctx.len());
        TC_ACT_SHOT | monitor::tc_mark(monitor::dropped(reason))
    })
}

/// TC ingress of a container's host-side veth.
#[classifier]
pub fn tc_container(ctx: TcContext) -> i32 {
    explain::reset();
    let action = if ingress::is_ipv6(&ctx) {
        ipv6::from_container(&ctx)
    } else {
        ingress::from_container(&ctx)
    };
    monitor::report_tc(&ctx, action)
}

/// TC ingress of the uplink.
#[classifier]
pub fn tc_uplink(ctx: TcContext) -> i32 {
    explain::reset();
    let action = if ingress::is_ipv6(&ctx) {
        ipv6::from_uplink(&ctx)
    } else {
        ingress::from_uplink(&ctx)
    };
    monitor::report_tc(&ctx, action)
}

/// XDP on the uplink: the inbound fast path in front of `tc_uplink`.
#[xdp]
pub fn xdp_uplink(ctx: XdpContext) -> u32 {
    explain::reset();
    monitor::report_xdp(&ctx, xdp::from_uplink(&ctx))
}

/// cgroup connect4: node processes connecting to a published port (F4).
#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx)
}

/// cgroup sendmsg4: unconnected UDP sends to a published port (F4).
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx)
}

/// cgroup recvmsg4: datagrams from the container appear to come from the published address.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

/// cgroup getpeername4: the peer is the published address.
#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

/// cgroup connect6: node processes connecting to a published port over IPv6 (F4).
#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::translate6(&ctx)
}

/// cgroup sendmsg6: unconnected UDP sends to a published port over IPv6.
#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::translate6(&ctx)
}

/// cgroup recvmsg6: datagrams from the container appear to come from the published address.
#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx)
}

/// cgroup getpeername6: the peer is the published address.
#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The kernel allows the FIB and redirect helpers only to GPL-compatible programs.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
