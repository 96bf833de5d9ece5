//! Map definitions. Every map is a BTF map, so `bpftool map dump` prints named fields; the
//! loader pins them under `<bpffs-dir>/v4/` and overrides sizes where the user asks. Each one
//! is described in `nat_common::MAP_SPECS` too (the macro wants its name as a literal); a
//! test compares the two.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use nat_common::{
    Addr4, Addr6, CLUSTER_NETS_MAX_ENTRIES, CONNTRACK_MAX_ENTRIES, ClusterNet, Config, Counter,
    CtEntry4, CtEntry6, CtKey4, CtKey6, ENDPOINTS_MAX_ENTRIES, EVENTS_BYTES, Endpoint,
    FRAGS_MAX_ENTRIES, FragKey4, FragKey6, FragPorts, MonitorCpu, MonitorCtl,
    NODE_ADDRS_MAX_ENTRIES, NodeAddr, PORTS_MAX_ENTRIES, PortKey4, PortKey6, PortTarget4,
    PortTarget6, REASON_COUNT, SCRATCH_SLOTS, SOCK_RNAT_MAX_ENTRIES, STATIC_NAT_MAX_ENTRIES,
    SockKey4, SockKey6, SockOrig4, SockOrig6, StaticNat4, StaticNat6, WORK6_LEN, conntrack_new_max,
};

#[btf_map(name = "config")]
pub static CONFIG: Array<Config, 1> = Array::new();

/// Container IPv4 address (network order) → its veth and MACs.
#[btf_map(name = "endpoints")]
pub static ENDPOINTS: HashMap<Addr4, Endpoint, { ENDPOINTS_MAX_ENTRIES as usize }> = HashMap::new();

/// Container IPv6 address (network order) → its veth and MACs.
#[btf_map(name = "endpoints6")]
pub static ENDPOINTS6: HashMap<Addr6, Endpoint, { ENDPOINTS_MAX_ENTRIES as usize }> =
    HashMap::new();

#[btf_map(name = "ports")]
pub static PORTS: HashMap<PortKey4, PortTarget4, { PORTS_MAX_ENTRIES as usize }> = HashMap::new();

#[btf_map(name = "ports6")]
pub static PORTS6: HashMap<PortKey6, PortTarget6, { PORTS_MAX_ENTRIES as usize }> = HashMap::new();

/// Common (not per-CPU) LRU: a per-CPU LRU evicts live NAT entries long before the table is full.
#[btf_map(name = "conntrack")]
pub static CONNTRACK: LruHashMap<CtKey4, CtEntry4, { CONNTRACK_MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// Connections not assured yet: a flood of them churns this LRU only, never `conntrack`
/// (nf_conntrack's rule: an assured connection is never dropped to admit a new one). The
/// loader sizes it from `conntrack`'s size (`conntrack_new_max`).
#[btf_map(name = "conntrack_new")]
pub static CONNTRACK_NEW: LruHashMap<
    CtKey4,
    CtEntry4,
    { conntrack_new_max(CONNTRACK_MAX_ENTRIES) as usize },
> = LruHashMap::new();

/// The IPv6 twins of `conntrack` and `conntrack_new`, sized alike by the loader.
#[btf_map(name = "conntrack6")]
pub static CONNTRACK6: LruHashMap<CtKey6, CtEntry6, { CONNTRACK_MAX_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map(name = "conntrack6_new")]
pub static CONNTRACK6_NEW: LruHashMap<
    CtKey6,
    CtEntry6,
    { conntrack_new_max(CONNTRACK_MAX_ENTRIES) as usize },
> = LruHashMap::new();

#[btf_map(name = "stats")]
pub static STATS: PerCpuArray<Counter, { REASON_COUNT as usize }> = PerCpuArray::new();

/// Per-CPU scratch space for values too large for the shared 512-byte stack: the two entries
/// of a connection being created (0: reply, 1: original direction).
#[btf_map(name = "scratch")]
pub static SCRATCH: PerCpuArray<CtEntry4, { SCRATCH_SLOTS as usize }> = PerCpuArray::new();

/// The same for an IPv6 connection.
#[btf_map(name = "scratch6")]
pub static SCRATCH6: PerCpuArray<CtEntry6, { SCRATCH_SLOTS as usize }> = PerCpuArray::new();

/// The IPv6 packet being decided and its tuple (`ipv6::Work6`), off the stack.
#[btf_map(name = "work6")]
pub static WORK6: PerCpuArray<[u64; WORK6_LEN / 8], 1> = PerCpuArray::new();

/// Static 1:1 NAT: address → the other side of its mapping (two entries per mapping).
#[btf_map(name = "static_nat")]
pub static STATIC_NAT: HashMap<Addr4, StaticNat4, { STATIC_NAT_MAX_ENTRIES as usize }> =
    HashMap::new();

/// IPv6 static 1:1 NAT, as `static_nat`.
#[btf_map(name = "static_nat6")]
pub static STATIC_NAT6: HashMap<Addr6, StaticNat6, { STATIC_NAT_MAX_ENTRIES as usize }> =
    HashMap::new();

/// Sockets whose destination the socket programs rewrote: what to show the application back.
#[btf_map(name = "sock_rnat")]
pub static SOCK_RNAT: LruHashMap<SockKey4, SockOrig4, { SOCK_RNAT_MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// The same for sockets translated to a container's IPv6 address.
#[btf_map(name = "sock_rnat6")]
pub static SOCK_RNAT6: LruHashMap<SockKey6, SockOrig6, { SOCK_RNAT_MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// Ports of fragmented datagrams, learned from their first fragment.
#[btf_map(name = "frags")]
pub static FRAGS: LruHashMap<FragKey4, FragPorts, { FRAGS_MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// The same for IPv6 datagrams.
#[btf_map(name = "frags6")]
pub static FRAGS6: LruHashMap<FragKey6, FragPorts, { FRAGS_MAX_ENTRIES as usize }> =
    LruHashMap::new();

/// The node's own unicast addresses (besides `Net4::node_addr`), kept by userspace.
#[btf_map(name = "node_addrs")]
pub static NODE_ADDRS: HashMap<Addr4, NodeAddr, { NODE_ADDRS_MAX_ENTRIES as usize }> =
    HashMap::new();

/// The node's own global IPv6 addresses, kept by userspace.
#[btf_map(name = "node_addrs6")]
pub static NODE_ADDRS6: HashMap<Addr6, NodeAddr, { NODE_ADDRS_MAX_ENTRIES as usize }> =
    HashMap::new();

/// Per-CPU scratch bytes: chunks of a segment whose checksum is being verified, a SYN's TCP
/// options. Never pinned: nothing in it outlives one packet.
#[btf_map(name = "csum_buf")]
pub static CSUM_BUF: PerCpuArray<[u8; crate::csum::BUF_LEN], 1> = PerCpuArray::new();

/// The cluster's prefixes (`nat_common::NET_*` flags), kept by the agent of a cluster node.
#[btf_map(name = "cluster_nets")]
pub static CLUSTER_NETS: LpmTrie<Addr4, ClusterNet, { CLUSTER_NETS_MAX_ENTRIES as usize }> =
    LpmTrie::new();

/// What `bpfnat monitor` asks for (`monitor.rs`); zero while nobody listens.
#[btf_map(name = "monitor")]
pub static MONITOR: Array<MonitorCtl, 1> = Array::new();

/// The monitor's per-CPU token bucket and lost-event counts.
#[btf_map(name = "monitor_cpu")]
pub static MONITOR_CPU: PerCpuArray<MonitorCpu, 1> = PerCpuArray::new();

/// The monitor's events.
#[btf_map(name = "events")]
pub static EVENTS: RingBuf<(), { EVENTS_BYTES as usize }> = RingBuf::new();
