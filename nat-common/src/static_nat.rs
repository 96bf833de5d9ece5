//! The `static_nat` map: 1:1 NAT between an external address and a container's.

use bytemuck::{Pod, Zeroable};

use crate::Addr4;

/// `StaticNat4::kind`: the key is the external address, `peer` the container's.
pub const STATIC_EXTERNAL: u8 = 1;
/// `StaticNat4::kind`: the key is the container's address, `peer` the external one.
pub const STATIC_INTERNAL: u8 = 2;

/// `static_nat` hash map value, keyed by an IPv4 address (`Addr4`). A 1:1
/// mapping has two entries, one per direction, so either side is one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct StaticNat4 {
    /// The address on the other side of the mapping, network order.
    pub peer: Addr4,
    /// `STATIC_EXTERNAL` or `STATIC_INTERNAL`.
    pub kind: u8,
    pub _pad: [u8; 3],
}
