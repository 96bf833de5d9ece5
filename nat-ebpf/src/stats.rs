//! Per-reason packet and byte counters (`bpfnat stats`).

use nat_common::Reason;

#[cfg(not(feature = "explain"))]
use crate::maps::STATS;

#[cfg(feature = "explain")]
#[inline(always)]
pub fn count(reason: Reason, _bytes: u32) {
    crate::explain::count(reason);
}

#[cfg(not(feature = "explain"))]
#[inline(always)]
pub fn count(reason: Reason, bytes: u32) {
    if let Some(c) = STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(bytes);
        }
    }
}
