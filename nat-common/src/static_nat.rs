//! The `static_nat` and `static_nat6` maps: 1:1 NAT between an external address and a
//! container's.

use core::mem::size_of;

use bytemuck::{Pod, Zeroable};

use crate::{Addr4, Addr6};

/// `StaticNat::kind`: the key is the external address, `peer` the container's.
pub const STATIC_EXTERNAL: u8 = 1;
/// `StaticNat::kind`: the key is the container's address, `peer` the external one.
pub const STATIC_INTERNAL: u8 = 2;

/// `static_nat` (`StaticNat4`, keyed by `Addr4`) and `static_nat6` (`StaticNat6`, keyed by
/// `Addr6`) hash map value. A 1:1 mapping has two entries, one per direction, so either side
/// is one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StaticNat<A> {
    /// The address on the other side of the mapping, network order.
    pub peer: A,
    /// `STATIC_EXTERNAL` or `STATIC_INTERNAL`.
    pub kind: u8,
    pub _pad: [u8; 3],
}

/// An IPv4 mapping's entry (8 bytes).
pub type StaticNat4 = StaticNat<Addr4>;
/// An IPv6 mapping's entry (20 bytes).
pub type StaticNat6 = StaticNat<Addr6>;

// SAFETY: `#[repr(C)]` of `u8` arrays and a `u8` (alignment 1): no padding the compiler adds,
// any bits valid.
unsafe impl Zeroable for StaticNat4 {}
// SAFETY: as above.
unsafe impl Pod for StaticNat4 {}
// SAFETY: as above.
unsafe impl Zeroable for StaticNat6 {}
// SAFETY: as above.
unsafe impl Pod for StaticNat6 {}
const _: () = assert!(size_of::<StaticNat4>() == 8 && size_of::<StaticNat6>() == 20);
