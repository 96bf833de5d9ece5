//! The conntrack maps in connection terms: pairs of entries shown as flows, expiry,
//! flushing. Each family has its two tables (`conntrack`/`conntrack_new`, and the IPv6
//! twins); everything here is written once for both (`Tables<A>`), and `Maps` answers for
//! both together.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{HashMap, IterableMap as _, MapData};
use nat_common::{
    Addr4, Addr6, CtEntry, CtKey, DIR_ORIGINAL, Family, ORIGIN_HAIRPIN, ORIGIN_MASQUERADE,
    ORIGIN_PUBLISHED, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Port, ct_timeout_ns,
    dgram_state, map_names, tcp_state,
};
use serde::Serialize;

use super::{Maps, Pins, batch, deleted, open_map, port_key, port_key6};
use crate::spec::PortMapping;

/// An address family as the conntrack tables hold it.
pub trait CtFamily: Family + Hash
where
    CtKey<Self>: aya::Pod,
    CtEntry<Self>: aya::Pod,
{
    /// The pinned tables: assured connections, and those not assured yet.
    const TABLES: (&'static str, &'static str);
    fn ip(self) -> IpAddr;
}

impl CtFamily for Addr4 {
    const TABLES: (&'static str, &'static str) = (map_names::CONNTRACK, map_names::CONNTRACK_NEW);
    fn ip(self) -> IpAddr {
        Ipv4Addr::from(self).into()
    }
}

impl CtFamily for Addr6 {
    const TABLES: (&'static str, &'static str) = (map_names::CONNTRACK6, map_names::CONNTRACK6_NEW);
    fn ip(self) -> IpAddr {
        Ipv6Addr::from(self).into()
    }
}

/// One family's two conntrack tables.
pub struct Tables<A>
where
    A: CtFamily,
    CtKey<A>: aya::Pod,
    CtEntry<A>: aya::Pod,
{
    /// Assured connections (`conntrack`, `conntrack6`).
    assured: HashMap<MapData, CtKey<A>, CtEntry<A>>,
    /// Connections not assured yet (see `map_names::CONNTRACK_NEW`).
    fresh: HashMap<MapData, CtKey<A>, CtEntry<A>>,
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the clock the datapath stamps entries with
/// (computed from jiffies, `clock.rs`; tick resolution, as nf_conntrack's jiffies).
pub fn ct_now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// One direction of a flow, as its packets are on the wire at the node.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FlowEnd {
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub packets: u64,
    pub bytes: u64,
}

/// A tracked connection.
#[derive(Clone, Debug, Serialize)]
pub struct Flow {
    pub proto: &'static str,
    /// `masquerade` (a container's connection out) or `published` (a client's connection in).
    pub kind: &'static str,
    pub state: &'static str,
    /// The direction that opened the connection.
    pub original: FlowEnd,
    /// The answering direction.
    pub reply: FlowEnd,
    pub age_secs: u64,
    pub idle_secs: u64,
    pub timeout_secs: u64,
    /// ifindex of the container's host veth.
    pub ifindex: u32,
    /// Assured (nf_conntrack's `[ASSURED]`): established with both sides seen (TCP), or
    /// answered and used again (UDP). Only connections not assured yet can be displaced by
    /// a flood of new ones.
    pub assured: bool,
}

pub(super) fn proto_name(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        PROTO_ICMP => "icmp",
        PROTO_ICMPV6 => "icmpv6",
        _ => "other",
    }
}

pub(super) fn state_name(proto: u8, s: u8) -> &'static str {
    if proto == PROTO_TCP {
        match s {
            tcp_state::SYN_SENT => "SYN_SENT",
            tcp_state::SYN_RECV => "SYN_RECV",
            tcp_state::ESTABLISHED => "ESTABLISHED",
            tcp_state::FIN_WAIT => "FIN_WAIT",
            tcp_state::CLOSE_WAIT => "CLOSE_WAIT",
            tcp_state::LAST_ACK => "LAST_ACK",
            tcp_state::TIME_WAIT => "TIME_WAIT",
            tcp_state::CLOSE => "CLOSE",
            _ => "NONE",
        }
    } else if s == dgram_state::REPLIED {
        "REPLIED"
    } else {
        "UNREPLIED"
    }
}

/// One direction of a flow: its tuple `k` and its entry's counters.
fn end<A: CtFamily>(k: &CtKey<A>, e: Option<&CtEntry<A>>) -> FlowEnd
where
    CtKey<A>: aya::Pod,
    CtEntry<A>: aya::Pod,
{
    FlowEnd {
        src: k.src_addr.ip(),
        sport: u16::from_be_bytes(k.src_port),
        dst: k.dst_addr.ip(),
        dport: u16::from_be_bytes(k.dst_port),
        packets: e.map_or(0, |e| e.meta.packets),
        bytes: e.map_or(0, |e| e.meta.bytes),
    }
}

const NS: u64 = 1_000_000_000;

/// How old a lone entry must be before garbage collection takes it for an orphan.
const ORPHAN_GRACE_NS: u64 = 2 * NS;

impl<A> Tables<A>
where
    A: CtFamily,
    CtKey<A>: aya::Pod,
    CtEntry<A>: aya::Pod,
{
    pub fn open(pins: &Pins) -> Result<Self> {
        Ok(Self {
            assured: open_map(pins, A::TABLES.0)?.try_into()?,
            fresh: open_map(pins, A::TABLES.1)?.try_into()?,
        })
    }

    /// Every entry of both tables. An entry of `conntrack_new` whose connection has moved to
    /// `conntrack` (the datapath leaves the old copy behind) is left out.
    fn entries(&self) -> Result<Vec<(CtKey<A>, CtEntry<A>)>> {
        let mut all = self.assured_entries()?;
        let assured: HashSet<CtKey<A>> = all.iter().map(|(k, _)| *k).collect();
        for (k, e) in self.fresh_entries()? {
            if !assured.contains(&k) {
                all.push((k, e));
            }
        }
        Ok(all)
    }

    /// Every entry of `conntrack`, read in batches.
    fn assured_entries(&self) -> Result<Vec<(CtKey<A>, CtEntry<A>)>> {
        batch::dump(self.assured.map()).with_context(|| format!("read map {}", A::TABLES.0))
    }

    /// Every entry of `conntrack_new` (moved copies included), read in batches.
    fn fresh_entries(&self) -> Result<Vec<(CtKey<A>, CtEntry<A>)>> {
        batch::dump(self.fresh.map()).with_context(|| format!("read map {}", A::TABLES.1))
    }

    /// Delete `k` from both tables (a moved connection's old copy goes too).
    fn remove(&mut self, k: &CtKey<A>) -> Result<()> {
        deleted(self.assured.remove(k)).context("delete conntrack entry")?;
        deleted(self.fresh.remove(k)).context("delete conntrack_new entry")
    }

    /// Every connection, original direction first. Entries whose partner was evicted are
    /// shown with an empty reply side.
    fn flows(&self) -> Result<Vec<Flow>> {
        let entries = self.entries()?;
        let index: StdHashMap<CtKey<A>, CtEntry<A>> = entries.iter().copied().collect();
        let now = ct_now_ns();
        let find = |k: &CtKey<A>| index.get(k).copied();
        let mut out = Vec::new();
        for (k, e) in &entries {
            if e.meta.dir != DIR_ORIGINAL {
                continue;
            }
            let rk = e.peer_key();
            let r = find(&rk);
            let last = r.map_or(e.meta.last_seen_ns, |r| {
                r.meta.last_seen_ns.max(e.meta.last_seen_ns)
            });
            out.push(Flow {
                proto: proto_name(k.proto),
                kind: match e.meta.origin {
                    ORIGIN_MASQUERADE => "masquerade",
                    ORIGIN_PUBLISHED => "published",
                    ORIGIN_HAIRPIN => "hairpin",
                    _ => "other",
                },
                state: state_name(k.proto, e.meta.state),
                original: end(k, Some(e)),
                reply: end(&rk, r.as_ref()),
                age_secs: now.saturating_sub(e.meta.created_ns) / NS,
                idle_secs: now.saturating_sub(last) / NS,
                timeout_secs: ct_timeout_ns(k.proto, e.meta.state) / NS,
                ifindex: e.meta.ifindex,
                assured: e.meta.assured != 0,
            });
        }
        Ok(out)
    }

    /// Number of entries (two per connection).
    pub fn len(&self) -> Result<usize> {
        Ok(self.entries()?.len())
    }

    /// Entries whose partner is gone (evicted by the LRU when the table was full).
    pub fn orphans(&self) -> Result<usize> {
        let entries = self.entries()?;
        let keys: HashSet<CtKey<A>> = entries.iter().map(|(k, _)| *k).collect();
        Ok(entries
            .iter()
            .filter(|(_, e)| !keys.contains(&e.peer_key()))
            .count())
    }

    /// The entry at `k` as the kernel has it now.
    fn get(&self, k: &CtKey<A>) -> Result<Option<CtEntry<A>>> {
        for map in [&self.assured, &self.fresh] {
            match map.get(k, 0) {
                Ok(e) => return Ok(Some(e)),
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(anyhow!(e).context("read conntrack entry")),
            }
        }
        Ok(None)
    }

    /// Delete both entries of every connection matching `pred`; returns connections removed.
    ///
    /// The datapath keeps creating and refreshing entries while the table is dumped, so a
    /// snapshot judges nothing by itself: a connection created during the dump may have one
    /// entry on each side of the cursor, and an idle one may have woken up. Each candidate is
    /// read again from the kernel, and `pred` decides again on what is there now (the partner
    /// included) just before the delete.
    fn remove_where(
        &mut self,
        pred: impl Fn(&CtKey<A>, &CtEntry<A>, Option<&CtEntry<A>>) -> bool,
    ) -> Result<usize> {
        let entries = self.entries()?;
        let index: StdHashMap<CtKey<A>, CtEntry<A>> = entries.iter().copied().collect();
        let mut conns = 0;
        for (k, e) in &entries {
            let peer = e.peer_key();
            let p = index.get(&peer);
            // Judge each connection once, from its original entry (or a lone entry), and
            // only candidates again from the kernel.
            if (e.meta.dir != DIR_ORIGINAL && p.is_some()) || !pred(k, e, p) {
                continue;
            }
            let Some(e) = self.get(k)? else {
                continue;
            };
            let peer = e.peer_key();
            let p = self.get(&peer)?.filter(|p| p.peer_key() == *k);
            if pred(k, &e, p.as_ref()) {
                conns += 1;
                self.remove(k)?;
                if p.is_some() {
                    self.remove(&peer)?;
                }
            }
        }
        Ok(conns)
    }

    /// Remove connections idle past their timeout, and half connections whose other entry the
    /// LRU evicted (they can no longer carry traffic both ways); returns how many. A lone
    /// entry younger than `ORPHAN_GRACE_NS` may be a connection the datapath is creating
    /// right now (the reply entry goes in first), so it is left for the next run.
    pub fn gc(&mut self) -> Result<usize> {
        self.drop_moved_copies()?;
        let now = ct_now_ns();
        self.remove_where(|k, e, p| {
            let Some(p) = p else {
                return now.saturating_sub(e.meta.created_ns) > ORPHAN_GRACE_NS;
            };
            let last = p.meta.last_seen_ns.max(e.meta.last_seen_ns);
            now.saturating_sub(last) > ct_timeout_ns(k.proto, e.meta.state)
        })
    }

    /// Delete the copies in `conntrack_new` of connections that moved to `conntrack`.
    fn drop_moved_copies(&mut self) -> Result<()> {
        let moved: Vec<CtKey<A>> = self
            .fresh_entries()?
            .into_iter()
            .filter(|(_, e)| e.meta.assured != 0)
            .map(|(k, _)| k)
            .collect();
        for k in moved {
            if self.assured.get(&k, 0).is_ok() {
                deleted(self.fresh.remove(&k)).context("delete conntrack_new entry")?;
            }
        }
        Ok(())
    }

    /// Remove every connection; returns how many.
    pub fn flush(&mut self) -> Result<usize> {
        self.remove_where(|_, _, _| true)
    }

    /// Forget the connections of the container behind host veth `ifindex`, if given, and
    /// those made to the published ports `keys` (host address, all zero for any; host port;
    /// protocol), in one pass over the tables.
    fn forget(&mut self, ifindex: Option<u32>, keys: &HashSet<(A, Port, u8)>) -> Result<usize> {
        if ifindex.is_none() && keys.is_empty() {
            return Ok(0);
        }
        self.remove_where(|k, e, _| {
            ifindex == Some(e.meta.ifindex)
                || ((e.meta.origin == ORIGIN_PUBLISHED || e.meta.origin == ORIGIN_HAIRPIN)
                    && (keys.contains(&(A::default(), k.dst_port, k.proto))
                        || keys.contains(&(k.dst_addr, k.dst_port, k.proto))))
        })
    }
}

impl Maps {
    /// Every connection of both families, original direction first. Entries whose partner
    /// was evicted are shown with an empty reply side.
    pub fn flows(&self) -> Result<Vec<Flow>> {
        let mut out = self.ct4.flows()?;
        out.extend(self.ct6.flows()?);
        out.sort_by(|a, b| {
            (a.proto, a.original.src, a.original.sport).cmp(&(
                b.proto,
                b.original.src,
                b.original.sport,
            ))
        });
        Ok(out)
    }

    /// Number of entries of both families (two per connection).
    pub fn ct_len(&self) -> Result<usize> {
        Ok(self.ct4.len()? + self.ct6.len()?)
    }

    /// Each family's entries and entries not assured yet, IPv4 first: each family has
    /// tables of its own, each of the sizes `ct_max_entries` and `ct_new_max_entries` say.
    pub fn ct_lens_by_family(&self) -> Result<[(usize, usize); 2]> {
        Ok([
            (self.ct4.len()?, self.ct4.new_len()?),
            (self.ct6.len()?, self.ct6.new_len()?),
        ])
    }

    /// Entries whose partner is gone (evicted by the LRU when the table was full).
    pub fn ct_orphans(&self) -> Result<usize> {
        Ok(self.ct4.orphans()? + self.ct6.orphans()?)
    }

    /// Garbage collection of both families (`Tables::gc`); returns connections removed.
    pub fn ct_gc(&mut self) -> Result<usize> {
        Ok(self.ct4.gc()? + self.ct6.gc()?)
    }

    /// Remove every connection; returns how many.
    pub fn ct_flush(&mut self) -> Result<usize> {
        Ok(self.ct4.flush()? + self.ct6.flush()?)
    }

    /// Forget the connections of the container behind host veth `ifindex` (if known) and
    /// those made to its published ports `ms`, in one pass over each family's tables: a
    /// container's removal walks them once, not once per purpose.
    pub fn forget(&mut self, ifindex: Option<u32>, ms: &[PortMapping]) -> Result<usize> {
        let keys: HashSet<(Addr4, Port, u8)> = ms
            .iter()
            .filter_map(port_key)
            .map(|k| (k.host_addr, k.host_port, k.proto))
            .collect();
        let keys6: HashSet<(Addr6, Port, u8)> = ms
            .iter()
            .filter_map(port_key6)
            .map(|k| (k.host_addr, k.host_port, k.proto))
            .collect();
        Ok(self.ct4.forget(ifindex, &keys)? + self.ct6.forget(ifindex, &keys6)?)
    }

    /// Forget connections made to the published ports `ms`, over both families.
    pub fn forget_ports(&mut self, ms: &[PortMapping]) -> Result<()> {
        self.forget(None, ms).map(|_| ())
    }
}

impl<A> Tables<A>
where
    A: CtFamily,
    CtKey<A>: aya::Pod,
    CtEntry<A>: aya::Pod,
{
    /// Add this family's tables to `sum`, in one walk of each. MASQUERADE ports are counted
    /// per protocol, ICMPv6 echo ids with ICMP's.
    fn summarize(&self, sum: &mut CtSummary) -> Result<()> {
        let mut all = self.assured_entries()?;
        let assured_keys: HashSet<CtKey<A>> = all.iter().map(|(k, _)| *k).collect();
        for (k, e) in self.fresh_entries()? {
            if e.meta.assured == 0 {
                sum.new_entries += 1;
            }
            if !assured_keys.contains(&k) {
                all.push((k, e));
            }
        }
        let originals = || all.iter().filter(|(_, e)| e.meta.dir == DIR_ORIGINAL);
        // (owner, protocol, port): a port two containers' connections share (to different
        // destinations) is in use by each.
        let mut ports: HashSet<(u32, u8, Port)> = HashSet::new();
        for (k, e) in originals().filter(|(_, e)| e.meta.origin == ORIGIN_MASQUERADE) {
            let proto = if k.proto == PROTO_ICMPV6 {
                PROTO_ICMP
            } else {
                k.proto
            };
            ports.insert((e.meta.ifindex, proto, e.xlate.src_port));
        }
        for (i, p) in [PROTO_TCP, PROTO_UDP, PROTO_ICMP].into_iter().enumerate() {
            let of_proto: HashSet<Port> = ports
                .iter()
                .filter(|(_, q, _)| *q == p)
                .map(|(_, _, port)| *port)
                .collect();
            sum.snat_ports[i].1 += of_proto.len();
        }
        for (_, e) in &all {
            let u = sum.by_owner.entry(e.meta.ifindex).or_default();
            u.entries += 1;
            u.connections += usize::from(e.meta.dir == DIR_ORIGINAL);
        }
        for (owner, proto, _) in ports {
            let u = sum.by_owner.entry(owner).or_default();
            match proto {
                PROTO_TCP => u.snat_ports.tcp += 1,
                PROTO_UDP => u.snat_ports.udp += 1,
                _ => u.snat_ports.icmp += 1,
            }
        }
        sum.entries += all.len();
        sum.connections += originals().count();
        sum.assured += originals().filter(|(_, e)| e.meta.assured != 0).count();
        Ok(())
    }

    /// Entries in the table of connections not assured yet (copies already moved left out).
    fn new_len(&self) -> Result<usize> {
        Ok(self
            .fresh_entries()?
            .iter()
            .filter(|(_, e)| e.meta.assured == 0)
            .count())
    }
}

impl Maps {
    /// The capacity of each family's conntrack table.
    pub fn ct_max_entries(&self) -> u32 {
        self.conntrack_max
    }

    /// What the metrics report of all four tables, in one walk of each.
    pub fn ct_summary(&self) -> Result<CtSummary> {
        let mut sum = CtSummary {
            snat_ports: [PROTO_TCP, PROTO_UDP, PROTO_ICMP]
                .into_iter()
                .map(|p| (proto_name(p), 0))
                .collect(),
            ..CtSummary::default()
        };
        self.ct4.summarize(&mut sum)?;
        self.ct6.summarize(&mut sum)?;
        Ok(sum)
    }

    /// Entries in the tables of connections not assured yet (copies already moved left out).
    pub fn ct_new_len(&self) -> Result<usize> {
        Ok(self.ct4.new_len()? + self.ct6.new_len()?)
    }

    /// The capacity of each family's table of connections not assured yet.
    pub fn ct_new_max_entries(&self) -> u32 {
        nat_common::conntrack_new_max(self.conntrack_max)
    }
}

/// The conntrack tables of both families, summed up (`Maps::ct_summary`).
#[derive(Clone, Debug, Default)]
pub struct CtSummary {
    /// Entries, two per connection.
    pub entries: usize,
    /// Entries of connections not assured yet.
    pub new_entries: usize,
    pub connections: usize,
    pub assured: usize,
    /// MASQUERADE source ports in use, per protocol (`tcp`, `udp`, `icmp`: echo ids).
    pub snat_ports: Vec<(&'static str, usize)>,
    /// Who holds the table: usage by the ifindex of the container's host veth each
    /// connection belongs to.
    pub by_owner: std::collections::BTreeMap<u32, Usage>,
}

/// One container's share of the conntrack tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Entries, two per connection (one while its partner is evicted).
    pub entries: usize,
    pub connections: usize,
    /// MASQUERADE source ports its connections hold.
    pub snat_ports: PortsByProto,
}

/// A count of ports per protocol (`icmp`: echo ids, both families).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PortsByProto {
    pub tcp: usize,
    pub udp: usize,
    pub icmp: usize,
}

impl PortsByProto {
    /// The most ports of one protocol: what runs out first.
    #[must_use]
    pub fn most(&self) -> usize {
        self.tcp.max(self.udp).max(self.icmp)
    }
}
