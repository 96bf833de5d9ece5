//! The `sock_rnat` and `sock_rnat6` maps: what the socket programs remember of a translated
//! socket.

use bytemuck::{Pod, Zeroable};

use crate::{Addr4, Addr6, Port};

/// `sock_rnat` key: a socket whose connect/sendmsg was translated, and the container address
/// it now talks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockKey4 {
    /// `bpf_get_socket_cookie`.
    pub cookie: u64,
    /// Container address, network order.
    pub addr: Addr4,
    /// Container port, network order.
    pub port: Port,
    pub _pad: [u8; 2],
}

/// `sock_rnat` value: the published address and port the application asked for, shown back
/// to it by `getpeername` and `recvmsg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockOrig4 {
    /// Network order.
    pub addr: Addr4,
    /// Network order.
    pub port: Port,
    pub _pad: [u8; 2],
}

/// `sock_rnat6` key: `SockKey4` for a socket translated to a container's IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockKey6 {
    /// `bpf_get_socket_cookie`.
    pub cookie: u64,
    /// Container address, network order.
    pub addr: Addr6,
    /// Container port, network order.
    pub port: Port,
    pub _pad: [u8; 6],
}

/// `sock_rnat6` value: the published IPv6 address and port the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockOrig6 {
    /// Network order.
    pub addr: Addr6,
    /// Network order.
    pub port: Port,
    pub _pad: [u8; 2],
}
