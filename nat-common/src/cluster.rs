//! Many nodes: the `cluster_nets` LPM trie, which says which addresses are the cluster's.

use bytemuck::{Pod, Zeroable};

use crate::Addr4;

/// `ClusterNet::flags`: a container's packet to this destination leaves with the container's
/// own address, routed, never masqueraded (`nonMasqueradeCidrs`, and the other nodes'
/// addresses, whose answers must come back to the pod address they were sent to).
pub const NET_NO_MASQ: u32 = 1 << 0;
/// `ClusterNet::flags`: a packet from this source that arrives on the uplink reaches the
/// node's containers by their own addresses (a pod of another node: `clusterCidr`; another
/// node: its registered address). From any other source a container address stays
/// unreachable unless a port is published.
pub const NET_CLUSTER_SRC: u32 = 1 << 1;

/// `cluster_nets` key, laid out as the kernel's `bpf_lpm_trie_key` (aya's `lpm_trie::Key`).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Lpm4 {
    /// Prefix length in bits (0–32).
    pub prefix_len: u32,
    /// Network address (network order).
    pub addr: Addr4,
}

/// `cluster_nets` value. The loader stores, for each prefix, the flags of every configured
/// prefix that contains it, so the longest match alone answers both questions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ClusterNet {
    /// `NET_*` bits.
    pub flags: u32,
}
