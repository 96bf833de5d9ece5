//! L4 checksum verification, for the packets that create a connection or change its state
//! (nf_conntrack marks a bad checksum INVALID: no entry, no NAT). TC only: the skb knows what
//! was already verified.
//!
//! - CHECKSUM_UNNECESSARY (a NIC or GRO verified it): good.
//! - CHECKSUM_COMPLETE (the device summed the packet): verified here in full.
//! - CHECKSUM_NONE or CHECKSUM_PARTIAL: no helper tells these apart. A partial checksum (what
//!   a local sender, a container among them, hands over a veth) holds only the pseudo-header
//!   sum, which is not a valid complete checksum. So a field that holds exactly the
//!   pseudo-header sum is taken for a partial one (tested first: the segment is not read), and
//!   anything else is verified in full. Forging that value is no easier than forging a right
//!   checksum, so it gains an attacker nothing.
//! - A fragment of a larger datagram: its checksum covers fragments not seen yet; trusted.

use core::{ffi::c_void, ptr::null_mut};

use aya_ebpf::{
    bindings::{__sk_buff, BPF_CSUM_LEVEL_QUERY},
    helpers::{bpf_csum_diff, bpf_csum_level, bpf_csum_update, bpf_loop, bpf_skb_load_bytes},
    programs::TcContext,
};
use nat_common::{PROTO_ICMP, PROTO_UDP};

use crate::{
    family::Fam,
    maps::CSUM_BUF,
    parse::{Ip, l4_csum_off},
};

/// Bytes summed per `bpf_loop` step.
pub const CHUNK: u32 = 256;
/// The scratch buffer's size: a chunk and room to zero-pad it (a power of two for masking).
pub const BUF_LEN: usize = nat_common::CSUM_BUF_LEN;
const _: () = assert!(BUF_LEN.is_power_of_two() && BUF_LEN >= CHUNK as usize + 4);
/// Steps for the longest IPv4 datagram, and the one that finds nothing left.
const MAX_STEPS: u32 = 65536 / CHUNK + 1;

/// State of the walk over the segment, shared with the `bpf_loop` callback. Only `sum` and
/// `failed` change between steps: the step's offset comes from the loop counter, so the
/// verifier sees the same state at every step and checks the callback once or twice instead
/// of once per offset.
#[repr(C)]
struct Walk {
    skb: *mut __sk_buff,
    start: u32,
    end: u32,
    sum: u32,
    failed: u32,
}

/// `n`, stated to be 1..=CHUNK on the register the helper gets. The compiler tests a copy of
/// a length and passes another, which the verifier then takes for anything from 0; the
/// clamp is written where the compiler cannot fold it away (it never changes a value here).
#[inline(always)]
fn size_in_chunk(n: u32) -> u32 {
    let mut n = u64::from(n);
    // SAFETY: arithmetic and branches on one register.
    unsafe {
        core::arch::asm!(
            "if {0} != 0 goto +1",
            "{0} = 1",
            "if {0} <= 256 goto +1",
            "{0} = 256",
            inout(reg) n,
            options(pure, nomem, nostack),
        )
    };
    n as u32
}

/// Step `i`: load chunk `i` into the per-CPU buffer and add it to the sum (1 stops the loop).
unsafe extern "C" fn sum_chunk(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Walk` on the caller's stack that `segment_sum` passed in.
    let w = unsafe { &mut *ctx.cast::<Walk>() };
    let off = w.start + (i as u32) * CHUNK;
    if off >= w.end {
        return 1;
    }
    let Some(buf) = CSUM_BUF.get_ptr_mut(0) else {
        w.failed = 1;
        return 1;
    };
    let left = w.end - off;
    let n = size_in_chunk(if left < CHUNK { left } else { CHUNK });
    // SAFETY: `buf` is the map value, BUF_LEN bytes long; `n` is 1..=CHUNK.
    let r = unsafe { bpf_skb_load_bytes(w.skb as *const c_void, off, buf.cast(), n) };
    if r < 0 {
        w.failed = 1;
        return 1;
    }
    // An odd or short last chunk: the bytes up to the next word add nothing when zero (the
    // checksum pads the segment with zeros). Three stores, no loop: the buffer has room
    // past a chunk.
    for j in 0..3 {
        // SAFETY: n + j < CHUNK + 3, inside the map value (`BUF_LEN`).
        unsafe { (*buf)[((n + j) as usize) & (BUF_LEN - 1)] = 0 };
    }
    let padded = size_in_chunk((n + 3) & !3);
    // SAFETY: `padded` bytes of the map value, a multiple of 4 and at most CHUNK.
    let s = unsafe { bpf_csum_diff(null_mut(), 0, buf.cast(), padded, w.sum) };
    if s < 0 {
        w.failed = 1;
        return 1;
    }
    w.sum = s as u32;
    0
}

/// The unfolded ones' complement sum of `len` bytes at `off`, or `None` when they cannot be
/// read.
#[inline(always)]
fn segment_sum(skb: *mut __sk_buff, off: u32, len: u32) -> Option<u32> {
    let mut w = Walk {
        skb,
        start: off,
        end: off + len,
        sum: 0,
        failed: 0,
    };
    if len <= CHUNK {
        // One chunk (a SYN, most datagrams): summed by a direct call, without the loop
        // helper and its two callback calls.
        // SAFETY: `w` outlives the call, as for the loop below.
        let more = unsafe { sum_chunk(0, (&raw mut w).cast::<c_void>()) };
        return (w.failed == 0 && (more == 0 || len == 0)).then_some(w.sum);
    }
    // SAFETY: the callback only touches `w`, which outlives the call.
    let steps = unsafe {
        bpf_loop(
            MAX_STEPS,
            sum_chunk as *mut c_void,
            (&raw mut w).cast::<c_void>(),
            0,
        )
    };
    // Every chunk was summed when the loop went past the last one.
    let needed = i64::from(len.div_ceil(CHUNK));
    (w.failed == 0 && steps > needed).then_some(w.sum)
}

#[inline(always)]
fn fold(sum: u32) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Whether `p`'s TCP, UDP or ICMP checksum may be trusted: see the module comment.
#[inline(always)]
pub fn l4_ok<A: Fam>(ctx: &TcContext, p: &Ip<A>) -> bool {
    p.frag || !p.l4_present || verify(ctx.skb.skb, p)
}

/// A function of its own, reading the packet through helpers only: inlined, it made the
/// compiler keep packet pointers across the callers' code, which the verifier refuses.
#[inline(never)]
fn verify<A: Fam>(skb: *mut __sk_buff, p: &Ip<A>) -> bool {
    // SAFETY: queries; neither changes the skb (adding 0 to a complete sum keeps it).
    let (unnecessary, complete) = unsafe {
        (
            bpf_csum_level(skb, u64::from(BPF_CSUM_LEVEL_QUERY)) >= 0,
            bpf_csum_update(skb, 0) >= 0,
        )
    };
    if unnecessary {
        return true;
    }
    let Some((field_off, _)) = l4_csum_off(p) else {
        return true;
    };
    let mut field = [0u8; 2];
    // SAFETY: two bytes on the stack.
    if unsafe {
        bpf_skb_load_bytes(
            skb as *const c_void,
            field_off as u32,
            field.as_mut_ptr().cast(),
            2,
        )
    } < 0
    {
        return false;
    }
    let field = u16::from_ne_bytes(field);
    if p.proto == PROTO_UDP && field == 0 {
        // No checksum: IPv4 allows it for UDP, IPv6 does not.
        return A::UDP_CSUM_OPTIONAL;
    }
    let len = u32::from(p.tot_len).saturating_sub(p.ip_hdr_len() as u32);
    if p.proto == PROTO_ICMP {
        return segment_sum(skb, p.l4_off as u32, len).is_some_and(|s| fold(s) == 0xffff);
    }
    let ph = A::pseudo_sum(p, len);
    // The partial form, what a local sender hands over (only the pseudo-header sum; 0 and
    // 0xffff are the same number): accepted as before, but tested first, so the common case
    // from a container skips reading the segment.
    let partial = fold(ph);
    if !complete
        && (field == partial
            || (field == 0xffff && partial == 0)
            || (field == 0 && partial == 0xffff))
    {
        return true;
    }
    let Some(seg) = segment_sum(skb, p.l4_off as u32, len) else {
        return false;
    };
    let (total, carry) = seg.overflowing_add(ph);
    fold(total.wrapping_add(u32::from(carry))) == 0xffff
}
