//! The `ports` and `ports6` maps: published ports (`docker -p`), one map per family.

use core::mem::size_of;

use bytemuck::{Pod, Zeroable};

use crate::{Addr4, Addr6, Port};

/// `ports` (`PortKey4`) and `ports6` (`PortKey6`) hash map key: a published port. `host_addr`
/// all zero means every node address of the family. Aligned to 4 (8 and 20 bytes: no
/// padding), so the datapath writes the address a word at a time: a 1-aligned IPv6 address
/// was zeroed by a call to `memset`, a byte loop on the BPF target.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey<A> {
    /// Host address the port is bound to, network order; all zero = any.
    pub host_addr: A,
    /// Host port, network order.
    pub host_port: Port,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    pub _pad: u8,
}

/// An IPv4 published port (8 bytes).
pub type PortKey4 = PortKey<Addr4>;
/// An IPv6 published port (20 bytes).
pub type PortKey6 = PortKey<Addr6>;

/// `ports`/`ports6` hash map value: where a published port leads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortTarget<A> {
    /// Container address, network order.
    pub addr: A,
    /// Container port, network order.
    pub port: Port,
    pub _pad: [u8; 2],
    /// Incremented whenever the mapping is (re)written; conntrack entries created under an older
    /// generation are not reused.
    pub generation: u32,
}

/// Where an IPv4 published port leads (12 bytes).
pub type PortTarget4 = PortTarget<Addr4>;
/// Where an IPv6 published port leads (24 bytes).
pub type PortTarget6 = PortTarget<Addr6>;

// SAFETY: `#[repr(C)]`; the keys are `u8` arrays only (alignment 1), the targets' address and
// port fill a multiple of 4 before the `u32`: no padding the compiler adds, any bits valid.
unsafe impl Zeroable for PortKey4 {}
// SAFETY: as above.
unsafe impl Pod for PortKey4 {}
// SAFETY: as above.
unsafe impl Zeroable for PortKey6 {}
// SAFETY: as above.
unsafe impl Pod for PortKey6 {}
// SAFETY: as above.
unsafe impl Zeroable for PortTarget4 {}
// SAFETY: as above.
unsafe impl Pod for PortTarget4 {}
// SAFETY: as above.
unsafe impl Zeroable for PortTarget6 {}
// SAFETY: as above.
unsafe impl Pod for PortTarget6 {}
const _: () = assert!(
    size_of::<PortKey4>() == 8
        && size_of::<PortKey6>() == 20
        && size_of::<PortTarget4>() == 12
        && size_of::<PortTarget6>() == 24
);
