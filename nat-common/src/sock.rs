//! The `sock_rnat` map: what the socket programs remember of a translated socket.

use bytemuck::{Pod, Zeroable};

use crate::{Addr4, Port};

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
