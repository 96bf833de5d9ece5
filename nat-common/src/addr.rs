//! The address-family seam. Every type that carries an address exists once per family
//! (`CtKey4`, `CtEntry4`, `PortKey4`, `PortTarget4`, `StaticNat4`, `SockKey4`, `FragKey4`,
//! `Net4`, maps keyed by `Addr4`), as Cilium has `ipv4_ct_tuple` beside `ipv6_ct_tuple`;
//! everything that does not (`Endpoint`, `NodeAddr`, `CtMeta`: states, counters, the next-hop
//! cache, TCP window tracking) is shared, so the code that handles it is written once for both
//! families.

/// An IPv4 address, network order (`bpftool` prints it as `[10,88,0,2]`).
pub type Addr4 = [u8; 4];

/// An IPv6 address, network order.
pub type Addr6 = [u8; 16];

/// A port (or ICMP echo identifier), network order.
pub type Port = [u8; 2];
