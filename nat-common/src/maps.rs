//! The eBPF object's maps, described once: names, kinds, key and value layouts, sizes, and
//! whether they are pinned. The loader pins from this table, checks pinned maps against it,
//! and a test compares it with the maps in the built object, so a map can be neither left
//! out nor described twice.

use core::mem::size_of;

use crate::{
    Addr4, Addr6, ClusterNet, Config, Counter, CtEntry4, CtEntry6, CtKey4, CtKey6, EVENTS_BYTES,
    Endpoint, FragKey4, FragKey6, FragPorts, Lpm4, MonitorCpu, MonitorCtl, NodeAddr, PortKey4,
    PortKey6, PortTarget4, PortTarget6, REASON_COUNT, SockKey4, SockKey6, SockOrig4, SockOrig6,
    StaticNat4, StaticNat6,
};

/// Map names as the kernel and bpftool see them (also the pin file names).
pub mod map_names {
    pub const CONFIG: &str = "config";
    pub const ENDPOINTS: &str = "endpoints";
    /// The containers by IPv6 address (`Addr6` → `Endpoint`).
    pub const ENDPOINTS6: &str = "endpoints6";
    pub const PORTS: &str = "ports";
    /// The published ports' IPv6 side (`PortKey6` → `PortTarget6`).
    pub const PORTS6: &str = "ports6";
    pub const CONNTRACK: &str = "conntrack";
    /// Connections not assured yet (no answer seen): an LRU of their own, so that a flood of
    /// them never displaces an established connection in `conntrack`.
    pub const CONNTRACK_NEW: &str = "conntrack_new";
    /// The IPv6 twins of `conntrack` and `conntrack_new` (`CtKey6` → `CtEntry6`), sized as
    /// they are.
    pub const CONNTRACK6: &str = "conntrack6";
    pub const CONNTRACK6_NEW: &str = "conntrack6_new";
    pub const STATS: &str = "stats";
    pub const STATIC_NAT: &str = "static_nat";
    /// IPv6 static 1:1 NAT (`Addr6` → `StaticNat6`).
    pub const STATIC_NAT6: &str = "static_nat6";
    pub const SOCK_RNAT: &str = "sock_rnat";
    /// The IPv6 sockets the socket programs translated (`SockKey6` → `SockOrig6`).
    pub const SOCK_RNAT6: &str = "sock_rnat6";
    pub const FRAGS: &str = "frags";
    /// The same for IPv6 datagrams (`FragKey6` → `FragPorts`).
    pub const FRAGS6: &str = "frags6";
    pub const NODE_ADDRS: &str = "node_addrs";
    /// The node's own global IPv6 addresses (`Addr6` → `NodeAddr`).
    pub const NODE_ADDRS6: &str = "node_addrs6";
    /// The cluster's prefixes (`Lpm4` → `ClusterNet`): where pods go without MASQUERADE and
    /// which sources reach pods directly. Empty on a node that is not in a cluster.
    pub const CLUSTER_NETS: &str = "cluster_nets";
    /// Per-CPU room for the two entries of a connection being created.
    pub const SCRATCH: &str = "scratch";
    /// The same for an IPv6 connection.
    pub const SCRATCH6: &str = "scratch6";
    /// Per-CPU room for the IPv6 packet being decided and its tuple (`WORK6_LEN` bytes).
    pub const WORK6: &str = "work6";
    /// Per-CPU room for checksum chunks and TCP options.
    pub const CSUM_BUF: &str = "csum_buf";
    /// What the programs emit for `bpfnat monitor` (`MonitorCtl`; zero: nothing).
    pub const MONITOR: &str = "monitor";
    /// Per-CPU rate limit and lost-event counts of the monitor (`MonitorCpu`).
    pub const MONITOR_CPU: &str = "monitor_cpu";
    /// The ring buffer of `MonitorEvent`s.
    pub const EVENTS: &str = "events";
    /// `bpfnat explain`'s build only: its global data, the trail of a dry run (`Explain`).
    pub const EXPLAIN_BSS: &str = ".bss";
}

/// Default size of the conntrack table (entries; two per connection).
pub const CONNTRACK_MAX_ENTRIES: u32 = 262_144;

/// Size of the table of connections not assured yet, for a `conntrack` table of `max`
/// entries: a quarter of it, at least 1024.
#[must_use]
pub const fn conntrack_new_max(max: u32) -> u32 {
    let q = max / 4;
    if q < 1024 { 1024 } else { q }
}
pub const ENDPOINTS_MAX_ENTRIES: u32 = 65_536;
pub const PORTS_MAX_ENTRIES: u32 = 262_144;
pub const STATIC_NAT_MAX_ENTRIES: u32 = 8_192;
pub const SOCK_RNAT_MAX_ENTRIES: u32 = 65_536;
pub const FRAGS_MAX_ENTRIES: u32 = 16_384;
pub const NODE_ADDRS_MAX_ENTRIES: u32 = 1_024;
/// Room for the cluster CIDR, the non-masquerade CIDRs and one address per node.
pub const CLUSTER_NETS_MAX_ENTRIES: u32 = 16_384;
/// Slots of the `scratch` map (0: reply entry, 1: original entry).
pub const SCRATCH_SLOTS: u32 = 2;
/// Bytes of the `work6` value: the datapath's parsed IPv6 packet and its 40-byte tuple, which
/// the 512-byte stack of the IPv6 path cannot spare.
pub const WORK6_LEN: usize = 192;
/// Bytes of the `csum_buf` value: a 256-byte chunk and room to zero-pad it.
pub const CSUM_BUF_LEN: usize = 512;

/// The kernel's map type of a map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Array,
    Hash,
    LruHash,
    PerCpuArray,
    /// Longest-prefix match (`BPF_F_NO_PREALLOC`).
    LpmTrie,
    /// A ring buffer: no key or value; its size in bytes is its entries.
    RingBuf,
}

/// One map of the eBPF object.
#[derive(Clone, Copy, Debug)]
pub struct MapSpec {
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: usize,
    pub value_size: usize,
    /// Entries when the number is part of the layout (arrays indexed by meaning, such as one
    /// slot per `Reason`); `None` when it is only a capacity (possibly set at load).
    pub fixed_entries: Option<u32>,
    /// Pinned under `<bpffs-dir>/<PIN_VERSION>/maps/` and shared by every load of the programs, so it
    /// outlives a reload; per-CPU scratch space is not.
    pub pinned: bool,
}

/// A map with key `K` and value `V`.
const fn map<K, V>(
    name: &'static str,
    kind: MapKind,
    fixed_entries: Option<u32>,
    pinned: bool,
) -> MapSpec {
    MapSpec {
        name,
        kind,
        key_size: size_of::<K>(),
        value_size: size_of::<V>(),
        fixed_entries,
        pinned,
    }
}

const PINNED: bool = true;
const PER_LOAD: bool = false;

/// Every map of the eBPF object.
pub const MAP_SPECS: [MapSpec; 26] = {
    use MapKind::{Array, Hash, LpmTrie, LruHash, PerCpuArray, RingBuf};
    use map_names as n;
    [
        map::<u32, Config>(n::CONFIG, Array, Some(1), PINNED),
        map::<Addr4, Endpoint>(n::ENDPOINTS, Hash, None, PINNED),
        map::<Addr6, Endpoint>(n::ENDPOINTS6, Hash, None, PINNED),
        map::<PortKey4, PortTarget4>(n::PORTS, Hash, None, PINNED),
        map::<PortKey6, PortTarget6>(n::PORTS6, Hash, None, PINNED),
        map::<CtKey4, CtEntry4>(n::CONNTRACK, LruHash, None, PINNED),
        map::<CtKey4, CtEntry4>(n::CONNTRACK_NEW, LruHash, None, PINNED),
        map::<CtKey6, CtEntry6>(n::CONNTRACK6, LruHash, None, PINNED),
        map::<CtKey6, CtEntry6>(n::CONNTRACK6_NEW, LruHash, None, PINNED),
        map::<u32, Counter>(n::STATS, PerCpuArray, Some(REASON_COUNT), PINNED),
        map::<Addr4, StaticNat4>(n::STATIC_NAT, Hash, None, PINNED),
        map::<Addr6, StaticNat6>(n::STATIC_NAT6, Hash, None, PINNED),
        map::<SockKey4, SockOrig4>(n::SOCK_RNAT, LruHash, None, PINNED),
        map::<SockKey6, SockOrig6>(n::SOCK_RNAT6, LruHash, None, PINNED),
        map::<FragKey4, FragPorts>(n::FRAGS, LruHash, None, PINNED),
        map::<FragKey6, FragPorts>(n::FRAGS6, LruHash, None, PINNED),
        map::<Addr4, NodeAddr>(n::NODE_ADDRS, Hash, None, PINNED),
        map::<Addr6, NodeAddr>(n::NODE_ADDRS6, Hash, None, PINNED),
        map::<Lpm4, ClusterNet>(n::CLUSTER_NETS, LpmTrie, None, PINNED),
        map::<u32, CtEntry4>(n::SCRATCH, PerCpuArray, Some(SCRATCH_SLOTS), PER_LOAD),
        map::<u32, CtEntry6>(n::SCRATCH6, PerCpuArray, Some(SCRATCH_SLOTS), PER_LOAD),
        map::<u32, [u64; WORK6_LEN / 8]>(n::WORK6, PerCpuArray, Some(1), PER_LOAD),
        map::<u32, [u8; CSUM_BUF_LEN]>(n::CSUM_BUF, PerCpuArray, Some(1), PER_LOAD),
        map::<u32, MonitorCtl>(n::MONITOR, Array, Some(1), PINNED),
        map::<u32, MonitorCpu>(n::MONITOR_CPU, PerCpuArray, Some(1), PINNED),
        map::<(), ()>(n::EVENTS, RingBuf, Some(EVENTS_BYTES), PINNED),
    ]
};
