//! `bpfnat explain`'s dry run (`nat_common::explain`). Built with the `explain` feature, the
//! programs record every map they consult in the `EXPLAIN` global, hand their callers a
//! copy of each conntrack entry found (so touching a connection changes the copy),
//! and replace every insert, delete and counter with a step saying what it would have done.
//! Without the feature each function here is empty or returns its argument: the production
//! programs carry none of it.

#[cfg(feature = "explain")]
use nat_common::{
    Explain, FibStep, Reason, RedirectStep, Step, TRAIL_KEY, TRAIL_VALUE, op, trail_map,
};

use crate::nexthop::NextHop;

/// The dry run's record. One run at a time: the explain build is loaded by one `bpfnat
/// explain` for its own run and never attached, so nothing else writes it.
#[cfg(feature = "explain")]
#[unsafe(no_mangle)]
// SAFETY: `Explain` is plain data; all zero is an empty trail.
static mut EXPLAIN: Explain = unsafe { core::mem::zeroed() };

#[cfg(feature = "explain")]
#[inline(always)]
fn state() -> &'static mut Explain {
    // SAFETY: see `EXPLAIN`: a single writer.
    unsafe { &mut *core::ptr::addr_of_mut!(EXPLAIN) }
}

/// Start the trail (every entry point, first).
#[inline(always)]
pub fn reset() {
    #[cfg(feature = "explain")]
    {
        let t = &mut state().trail;
        t.len = 0;
        t.overflow = 0;
    }
}

/// The next free step and its index, or `None` (and the overflow flag) when the trail is full.
#[cfg(feature = "explain")]
#[inline(always)]
fn next(op: u8, map: u8) -> Option<(&'static mut Step, usize)> {
    let t = &mut state().trail;
    let i = t.len as usize;
    let Some(s) = t.steps.get_mut(i) else {
        t.overflow = 1;
        return None;
    };
    t.len += 1;
    s.op = op;
    s.map = map;
    s.found = 0;
    s.key_len = 0;
    s.value_len = 0;
    Some((s, i))
}

/// Copy `v` (at most `N` words) into `dst`; `len`: its size in bytes.
#[cfg(feature = "explain")]
#[inline(always)]
fn put<V, const N: usize>(dst: &mut [u64; N], v: &V) -> u8 {
    const { assert!(size_of::<V>() <= N * 8) };
    // SAFETY: `dst` holds at least `size_of::<V>()` bytes and is 8-aligned; `v` is a
    // plain-data map key or value.
    unsafe {
        core::ptr::copy_nonoverlapping(
            (v as *const V).cast::<u8>(),
            dst.as_mut_ptr().cast::<u8>(),
            size_of::<V>(),
        )
    };
    size_of::<V>() as u8
}

/// A lookup of `map` at `key` that found `v` (a pointer into the map): what the caller may
/// use. Under `explain`, a per-CPU copy the caller may write to.
#[inline(always)]
pub fn found_ptr<K, V>(map: u8, key: &K, v: Option<*mut V>) -> Option<*mut V> {
    #[cfg(feature = "explain")]
    {
        const { assert!(size_of::<V>() <= TRAIL_VALUE && size_of::<K>() <= TRAIL_KEY) };
        let (s, i) = next(op::LOOKUP, map)?;
        s.key_len = put(&mut s.key, key);
        let v = v?;
        // SAFETY: `v` points at a live map value.
        let v = unsafe { &*v };
        s.found = 1;
        s.value_len = put(&mut s.value, v);
        let copy = state().shadow.get_mut(i)?;
        put(copy, v);
        Some(copy.as_mut_ptr().cast::<V>())
    }
    #[cfg(not(feature = "explain"))]
    {
        let _ = (map, key);
        v
    }
}

/// A lookup of `map` at `key` whose value (in the map) the caller only reads. The value is
/// recorded from the map, not from a copy: the stack has no room for one.
#[inline(always)]
pub fn found<'a, K, V>(map: u8, key: &K, v: Option<&'a V>) -> Option<&'a V> {
    #[cfg(feature = "explain")]
    {
        if let Some((s, _)) = next(op::LOOKUP, map) {
            s.key_len = put(&mut s.key, key);
            if let Some(v) = v {
                s.found = 1;
                s.value_len = put(&mut s.value, v);
            }
        }
    }
    #[cfg(not(feature = "explain"))]
    let _ = (map, key);
    v
}

/// An insert of `v` at `key` into `map` the production programs would make; `ok`: whether
/// it would succeed.
#[cfg(feature = "explain")]
#[inline(always)]
pub fn insert<K, V>(map: u8, key: &K, v: &V, ok: bool) {
    if let Some((s, _)) = next(op::INSERT, map) {
        s.key_len = put(&mut s.key, key);
        s.value_len = put(&mut s.value, v);
        s.found = u8::from(ok);
    }
}

/// A delete of `key` from `map` the production programs would make; `present`: whether
/// there is an entry to delete.
#[cfg(feature = "explain")]
#[inline(always)]
pub fn remove<K>(map: u8, key: &K, present: bool) {
    if let Some((s, _)) = next(op::REMOVE, map) {
        s.key_len = put(&mut s.key, key);
        s.found = u8::from(present);
    }
}

/// A FIB lookup for `dst` and what it said.
#[inline(always)]
pub fn fib<A>(dst: &A, nh: &NextHop) {
    #[cfg(feature = "explain")]
    if let Some((s, _)) = next(op::FIB, trail_map::NONE) {
        s.key_len = put(&mut s.key, dst);
        // Written in place: a `FibStep` on the stack would not fit beside the caller's.
        // SAFETY: `value` is 8-aligned and larger than a `FibStep`.
        let f = unsafe { &mut *s.value.as_mut_ptr().cast::<FibStep>() };
        f.rc = nh.rc;
        f.ifindex = nh.ifindex;
        f.mtu = nh.mtu;
        s.value_len = size_of::<FibStep>() as u8;
    }
    #[cfg(not(feature = "explain"))]
    let _ = (dst, nh);
}

/// The packet is redirected to `ifindex` (`how`: `nat_common::REDIRECT_*`).
#[inline(always)]
pub fn redirect(ifindex: u32, how: u32) {
    #[cfg(feature = "explain")]
    if let Some((s, _)) = next(op::REDIRECT, trail_map::NONE) {
        // SAFETY: as in `fib`.
        let r = unsafe { &mut *s.value.as_mut_ptr().cast::<RedirectStep>() };
        r.ifindex = ifindex;
        r.how = how;
        s.value_len = size_of::<RedirectStep>() as u8;
    }
    #[cfg(not(feature = "explain"))]
    let _ = (ifindex, how);
}

/// The counter of `reason` would move (`stats::count`).
#[cfg(feature = "explain")]
#[inline(always)]
pub fn count(reason: Reason) {
    if let Some((s, _)) = next(op::COUNT, trail_map::NONE) {
        s.key[0] = u64::from(reason as u32);
        s.key_len = 4;
    }
}
