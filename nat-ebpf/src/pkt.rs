//! The packet the translation core works on, TC or XDP. Parsing and rewriting are written
//! once against `Pkt`. Bytes are written directly and the IPv4 header checksum is updated by
//! hand (RFC 1624, eqn. 3) in both: that checksum is always complete. Only the L4 checksum
//! differs:
//! - TC uses `bpf_l4_csum_replace`, which keeps CHECKSUM_PARTIAL skbs (what containers and
//!   local senders hand over a veth) and CHECKSUM_COMPLETE ones correct.
//! - XDP has no skb and no checksum state: it updates the field by hand too, which is right
//!   for every packet whose checksum is complete, i.e. everything a NIC receives.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_MARK_MANGLED_0},
    helpers::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};
use nat_common::{Reason, csum_add_diff, csum_replace};

/// Byte access and checksum updates on a packet. Offsets count from the Ethernet header.
///
/// Direct writes in TC: the verifier gives such programs a prologue that unclones the skb, and
/// a rewrite of the IPv4 header that keeps its checksum right leaves a CHECKSUM_COMPLETE sum
/// unchanged (the header sums to zero before and after).
pub trait Pkt {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    /// Length for the byte counters.
    fn bytes(&self) -> u32;
    /// Write `v` at `off`.
    #[inline(always)]
    fn put<T>(&self, off: usize, v: &T) -> Result<(), Reason> {
        write(self.start(), self.end(), off, v)
    }
    /// Update the IP header checksum at `off` for a 2- or 4-byte (`size`) field that changed
    /// from `old` to `new` (both as read from the packet, in native order).
    #[inline(always)]
    fn csum_l3(&self, off: usize, old: u32, new: u32, size: u64) -> Result<(), Reason> {
        fix_csum(self.start(), self.end(), off, old, new, size, false)
    }
    /// Update the L4 checksum at `off`; `flags` as for `bpf_l4_csum_replace` (size in the low
    /// bits, `BPF_F_PSEUDO_HDR`, `BPF_F_MARK_MANGLED_0`).
    fn csum_l4(&self, off: usize, old: u32, new: u32, flags: u64) -> Result<(), Reason>;
    /// Update the L4 checksum at `off` by `diff`, a ones' complement sum of what changed
    /// (`bpf_csum_diff` of the old and new bytes), for fields wider than four bytes (IPv6
    /// addresses); `flags` as for `csum_l4`, without a size.
    fn csum_l4_diff(&self, off: usize, diff: u32, flags: u64) -> Result<(), Reason>;
    /// Copy `len` bytes at `off` (anywhere in the packet, not only its linear part) to `to`.
    ///
    /// # Safety
    /// `to` must be valid for `len` bytes of writes (a map value or stack buffer the
    /// verifier knows the size of).
    unsafe fn load(&self, off: u32, to: *mut u8, len: u32) -> bool;
}

#[inline(always)]
fn helper(r: Result<(), i64>) -> Result<(), Reason> {
    r.map_err(|_| Reason::DropHelper)
}

/// Offsets of `data` and `data_end` in `__sk_buff`.
const SKB_DATA: usize = core::mem::offset_of!(__sk_buff, data);
const SKB_DATA_END: usize = core::mem::offset_of!(__sk_buff, data_end);

/// Load a `u32` field of the context in one instruction. Through plain Rust, the compiler may
/// compute the field's address once and keep it across a long function (spilled to the
/// stack); the verifier refuses to dereference such a moved context pointer.
macro_rules! ctx_field {
    ($skb:expr, $off:expr) => {{
        let v: u64;
        // SAFETY: a read of a field of the program's own context.
        unsafe {
            core::arch::asm!(
                "{v} = *(u32 *)({skb} + {off})",
                v = out(reg) v,
                skb = in(reg) $skb,
                off = const $off,
                options(readonly, nostack, preserves_flags),
            )
        };
        v as usize
    }};
}

impl Pkt for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        ctx_field!(self.skb.skb, SKB_DATA)
    }

    #[inline(always)]
    fn end(&self) -> usize {
        ctx_field!(self.skb.skb, SKB_DATA_END)
    }

    #[inline(always)]
    fn bytes(&self) -> u32 {
        self.len()
    }

    #[inline(always)]
    fn csum_l4(&self, off: usize, old: u32, new: u32, flags: u64) -> Result<(), Reason> {
        helper(self.l4_csum_replace(off, u64::from(old), u64::from(new), flags))
    }

    #[inline(always)]
    fn csum_l4_diff(&self, off: usize, diff: u32, flags: u64) -> Result<(), Reason> {
        // Size 0: `to` is a checksum difference (`inet_proto_csum_replace_by_diff`).
        helper(self.l4_csum_replace(off, 0, u64::from(diff), flags & !0xf))
    }

    #[inline(always)]
    unsafe fn load(&self, off: u32, to: *mut u8, len: u32) -> bool {
        // SAFETY: the caller vouches for `to`; the helper checks the packet side.
        unsafe { bpf_skb_load_bytes(self.skb.skb as *const c_void, off, to.cast(), len) >= 0 }
    }
}

/// Furthest offset a rewrite touches.
const MAX_WRITE_OFF: usize = 255;

/// A writable pointer to `T` at `off` in the packet `[start, end)`, bounds-checked.
#[inline(always)]
fn at_mut<T>(start: usize, end: usize, off: usize) -> Result<*mut T, Reason> {
    // The verifier only allows pointer arithmetic with a bounded offset; every header we
    // rewrite (quoted ICMP headers included) starts well within this.
    if off > MAX_WRITE_OFF || start + off + size_of::<T>() > end {
        return Err(Reason::DropTruncated);
    }
    Ok((start + off) as *mut T)
}

#[inline(always)]
fn write<T>(start: usize, end: usize, off: usize, v: &T) -> Result<(), Reason> {
    let p = at_mut::<T>(start, end, off)?;
    // SAFETY: bounds checked by `at_mut`; packet data has no alignment guarantee.
    unsafe { core::ptr::write_unaligned(p, core::ptr::read(v)) };
    Ok(())
}

/// Update the checksum at `off` by hand; `keep_zero` for UDP, where zero means "none".
#[inline(always)]
fn fix_csum(
    start: usize,
    end: usize,
    off: usize,
    old: u32,
    new: u32,
    size: u64,
    keep_zero: bool,
) -> Result<(), Reason> {
    let p = at_mut::<[u8; 2]>(start, end, off)?;
    // SAFETY: bounds checked by `at_mut`; byte arrays need no alignment.
    let csum = u16::from_ne_bytes(unsafe { *p });
    if keep_zero && csum == 0 {
        return Ok(());
    }
    let mut c = csum_replace(csum, old, new, size);
    if keep_zero && c == 0 {
        c = 0xffff;
    }
    // SAFETY: as above.
    unsafe { *p = c.to_ne_bytes() };
    Ok(())
}

impl Pkt for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }

    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }

    #[inline(always)]
    fn bytes(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }

    #[inline(always)]
    fn csum_l4(&self, off: usize, old: u32, new: u32, flags: u64) -> Result<(), Reason> {
        let keep_zero = flags & u64::from(BPF_F_MARK_MANGLED_0) != 0;
        fix_csum(
            self.data(),
            self.data_end(),
            off,
            old,
            new,
            flags & 0xf,
            keep_zero,
        )
    }

    #[inline(always)]
    fn csum_l4_diff(&self, off: usize, diff: u32, flags: u64) -> Result<(), Reason> {
        let keep_zero = flags & u64::from(BPF_F_MARK_MANGLED_0) != 0;
        let p = at_mut::<[u8; 2]>(self.data(), self.data_end(), off)?;
        // SAFETY: bounds checked by `at_mut`; byte arrays need no alignment.
        let csum = u16::from_ne_bytes(unsafe { *p });
        if keep_zero && csum == 0 {
            return Ok(());
        }
        let mut c = csum_add_diff(csum, diff);
        if keep_zero && c == 0 {
            c = 0xffff;
        }
        // SAFETY: as above.
        unsafe { *p = c.to_ne_bytes() };
        Ok(())
    }

    #[inline(always)]
    unsafe fn load(&self, off: u32, to: *mut u8, len: u32) -> bool {
        // SAFETY: the caller vouches for `to`; the helper checks the packet side.
        unsafe { bpf_xdp_load_bytes(self.ctx, off, to.cast(), len) >= 0 }
    }
}

/// Zero `*p` with word stores the compiler cannot merge into a `memset` call: on BPF that is
/// a subprogram with a byte loop, which the verifier walks at every call site.
///
/// # Safety
/// `p` must be valid for writes of `T`, 4-byte aligned, and all-zero must be a valid `T`.
#[inline(always)]
pub unsafe fn zero<T>(p: *mut T) {
    let words = p.cast::<u32>();
    let mut i = 0;
    while i < size_of::<T>() / 4 {
        // SAFETY: within `*p` (the caller's promise); volatile keeps each store a store.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
        i += 1;
    }
}
