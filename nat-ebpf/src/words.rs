//! Addresses a 32-bit word at a time. An address is a byte array (alignment 1), and the BPF
//! target has no unaligned loads, so the compiler compares, copies and sums an IPv6 address
//! byte by byte: about 50 instructions for one comparison, where four word loads do. The
//! loads and stores here are single instructions written out (`asm!`), so they are defined
//! at any alignment; the verifier allows an unaligned one everywhere but on the stack, and
//! the places they are used on (`Ip`, `CtKey`, map values) are 4-byte aligned anyway, but
//! for the packet headers `parse` reads addresses and ports from (see `quad_at`).

use core::arch::asm;

use nat_common::{Addr6, csum_fold32, csum_word_diff};

/// The 32-bit word at `p + OFF`, as stored (network byte order stays).
#[inline(always)]
fn load<const OFF: usize>(p: *const u8) -> u32 {
    let v: u64;
    // SAFETY: one load of memory the caller's reference covers.
    unsafe {
        asm!(
            "{v} = *(u32 *)({p} + {off})",
            v = out(reg) v,
            p = in(reg) p,
            off = const OFF,
            options(readonly, nostack, preserves_flags),
        );
    }
    v as u32
}

/// Store `v` as the 32-bit word at `p + OFF`.
#[inline(always)]
fn store<const OFF: usize>(p: *mut u8, v: u32) {
    // SAFETY: one store into memory the caller's `&mut` covers.
    unsafe {
        asm!(
            "*(u32 *)({p} + {off}) = {v}",
            v = in(reg) u64::from(v),
            p = in(reg) p,
            off = const OFF,
            options(nostack, preserves_flags),
        );
    }
}

/// The four bytes at `p + OFF` in one load (an IPv4 address or a pair of ports read out of
/// a packet header): copied as bytes, each is loaded, spilled and reassembled on its own.
/// A packet header may be only 2-aligned: the verifier checks a packet access's alignment
/// only where the architecture lacks efficient unaligned access (not x86-64 or arm64).
///
/// # Safety
/// `p + OFF .. p + OFF + 4` must be readable (inside the bounds the verifier was shown).
#[inline(always)]
pub unsafe fn quad_at<const OFF: usize>(p: *const u8) -> [u8; 4] {
    load::<OFF>(p).to_ne_bytes()
}

/// A copy of an IPv6 address (in a packet header, say) read a word at a time: copied as
/// bytes, each byte is loaded and stored on its own.
#[inline(always)]
pub fn addr6(a: &Addr6) -> Addr6 {
    // SAFETY: 16 bytes either way; the words keep the address's byte order.
    unsafe { core::mem::transmute::<[u32; 4], Addr6>(words(a)) }
}

/// An IPv6 address as four native-order words (the byte order stays the packet's).
#[inline(always)]
pub fn words(a: &Addr6) -> [u32; 4] {
    let p = a.as_ptr();
    [load::<0>(p), load::<4>(p), load::<8>(p), load::<12>(p)]
}

/// Whether two addresses (4 or 16 bytes) are equal: one branch on the words' differences.
#[inline(always)]
pub fn same<A>(a: &A, b: &A) -> bool {
    let (a, b) = ((a as *const A).cast::<u8>(), (b as *const A).cast::<u8>());
    let mut diff = load::<0>(a) ^ load::<0>(b);
    if size_of::<A>() == 16 {
        diff |= (load::<4>(a) ^ load::<4>(b))
            | (load::<8>(a) ^ load::<8>(b))
            | (load::<12>(a) ^ load::<12>(b));
    }
    diff == 0
}

/// `*dst = *src` for an address (4 or 16 bytes), a word at a time.
#[inline(always)]
pub fn copy<A>(dst: &mut A, src: &A) {
    let (d, s) = ((dst as *mut A).cast::<u8>(), (src as *const A).cast::<u8>());
    store::<0>(d, load::<0>(s));
    if size_of::<A>() == 16 {
        store::<4>(d, load::<4>(s));
        store::<8>(d, load::<8>(s));
        store::<12>(d, load::<12>(s));
    }
}

/// `nat_common::csum_diff16` of two IPv6 addresses, each word summed as it is loaded.
#[inline(always)]
pub fn csum_diff(old: &Addr6, new: &Addr6) -> u32 {
    let (o, n) = (old.as_ptr(), new.as_ptr());
    csum_fold32(
        csum_word_diff(load::<0>(o), load::<0>(n))
            + csum_word_diff(load::<4>(o), load::<4>(n))
            + csum_word_diff(load::<8>(o), load::<8>(n))
            + csum_word_diff(load::<12>(o), load::<12>(n)),
    )
}
