//! The `ports` map: published ports (`docker -p`).

use bytemuck::{Pod, Zeroable};

use crate::{Addr4, Port};

/// `ports` hash map key: a published port. `host_addr` all zero means every node address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct PortKey4 {
    /// Host address the port is bound to, network order; `[0,0,0,0]` = any.
    pub host_addr: Addr4,
    /// Host port, network order.
    pub host_port: Port,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    pub _pad: u8,
}

/// `ports` hash map value: where a published port leads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PortTarget4 {
    /// Container address, network order.
    pub addr: Addr4,
    /// Container port, network order.
    pub port: Port,
    pub _pad: [u8; 2],
    /// Incremented whenever the mapping is (re)written; conntrack entries created under an older
    /// generation are not reused.
    pub generation: u32,
}
