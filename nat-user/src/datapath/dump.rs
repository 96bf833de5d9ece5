//! Every pinned map decoded (`bpfnat map list`, `bpfnat map dump NAME`): addresses, ports,
//! protocols, states, reasons and flags by name, where `bpftool map dump` prints byte arrays.
//! The field names are part of the JSON schema.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result, bail};
use aya::maps::{
    Array, HashMap, IterableMap as _, LpmTrie, MapData, MapInfo, PerCpuArray,
    lpm_trie::Key as LpmKey,
};
use nat_common::{
    Addr4, Addr6, CFG_MASQUERADE, CFG_STATIC_NAT, ClusterNet, Config, Counter, CtEntry, CtKey,
    DIR_ORIGINAL, EP_CONTAINER, Endpoint, FragKey4, FragKey6, FragPorts, Lpm4, MAP_SPECS, MON_DROP,
    MON_TRACE, MapKind, MonitorCpu, MonitorCtl, NAT_DNAT, NAT_SNAT, NET_CLUSTER_SRC, NET_NO_MASQ,
    NodeAddr, ORIGIN_HAIRPIN, ORIGIN_MASQUERADE, ORIGIN_PUBLISHED, Port, PortKey, PortTarget,
    Reason, STATIC_EXTERNAL, STATIC_INTERNAL, SockKey4, SockKey6, SockOrig4, SockOrig6, StaticNat,
    map_names as n,
};
use serde::Serialize;
use serde_json::{Value, json};

use super::{
    Pins, batch,
    conntrack::{proto_name, state_name},
    ct_now_ns, open_map,
};

/// A pinned map as `map list` shows it.
#[derive(Serialize, Debug)]
pub struct MapSummary {
    pub name: &'static str,
    /// `array`, `hash`, `lru_hash`, `percpu_array`, `lpm_trie`, `ringbuf`.
    pub kind: &'static str,
    pub key_size: usize,
    pub value_size: usize,
    pub max_entries: u32,
    /// Entries in use (arrays: their length; the ring buffer: none).
    pub entries: Option<usize>,
    pub pin: String,
}

/// One decoded entry: `key` and `value` are objects with named fields.
#[derive(Serialize, Debug)]
pub struct Entry {
    pub key: Value,
    pub value: Value,
}

fn kind_name(k: MapKind) -> &'static str {
    match k {
        MapKind::Array => "array",
        MapKind::Hash => "hash",
        MapKind::LruHash => "lru_hash",
        MapKind::PerCpuArray => "percpu_array",
        MapKind::LpmTrie => "lpm_trie",
        MapKind::RingBuf => "ringbuf",
    }
}

/// Every pinned map of the node.
pub fn list(pins: &Pins) -> Result<Vec<MapSummary>> {
    if !pins.installed() {
        bail!(super::NOT_UP);
    }
    MAP_SPECS
        .iter()
        .filter(|m| m.pinned)
        .map(|m| {
            let path = pins.map(m.name);
            let info = MapInfo::from_pin(&path)
                .with_context(|| format!("inspect pinned map {}", path.display()))?;
            let entries = match m.kind {
                MapKind::RingBuf => None,
                MapKind::Array | MapKind::PerCpuArray => Some(info.max_entries() as usize),
                _ => Some(dump(pins, m.name)?.len()),
            };
            Ok(MapSummary {
                name: m.name,
                kind: kind_name(m.kind),
                key_size: m.key_size,
                value_size: m.value_size,
                max_entries: info.max_entries(),
                entries,
                pin: path.display().to_string(),
            })
        })
        .collect()
}

/// The decoded entries of the pinned map `name`.
pub fn dump(pins: &Pins, name: &str) -> Result<Vec<Entry>> {
    let Some(spec) = MAP_SPECS.iter().find(|m| m.name == name) else {
        let all: Vec<&str> = MAP_SPECS
            .iter()
            .filter(|m| m.pinned)
            .map(|m| m.name)
            .collect();
        bail!("no map {name:?}; the pinned maps are {}", all.join(", "));
    };
    if !spec.pinned {
        bail!("{name} is per-load scratch space, not pinned: nothing outlives a packet in it");
    }
    if !pins.installed() {
        bail!(super::NOT_UP);
    }
    let now = ct_now_ns();
    match name {
        n::CONFIG => {
            let a: Array<MapData, Config> = open_map(pins, name)?.try_into()?;
            Ok(vec![Entry {
                key: json!({ "index": 0 }),
                value: config(&a.get(&0, 0).context("read config")?),
            }])
        }
        n::STATS => {
            let a: PerCpuArray<MapData, Counter> = open_map(pins, name)?.try_into()?;
            Reason::ALL
                .iter()
                .map(|(r, reason)| {
                    let per_cpu = a.get(&(*r as u32), 0).context("read stats")?;
                    let (p, b) = per_cpu
                        .iter()
                        .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
                    Ok(Entry {
                        key: json!({ "index": *r as u32, "reason": reason }),
                        value: json!({ "packets": p, "bytes": b }),
                    })
                })
                .collect()
        }
        n::CLUSTER_NETS => {
            let t: LpmTrie<MapData, Addr4, ClusterNet> = open_map(pins, name)?.try_into()?;
            t.iter()
                .map(|r| {
                    let (k, v): (LpmKey<Addr4>, ClusterNet) = r.context("read cluster_nets")?;
                    Ok(Entry {
                        key: json!({ "prefix": format!("{}/{}", ip4(k.data()), k.prefix_len()) }),
                        value: cluster_net(&v),
                    })
                })
                .collect()
        }
        n::MONITOR => {
            let a: Array<MapData, MonitorCtl> = open_map(pins, name)?.try_into()?;
            let c = a.get(&0, 0).context("read monitor")?;
            Ok(vec![Entry {
                key: json!({ "index": 0 }),
                value: json!({
                    "flags": names(c.flags, &[(MON_DROP, "drop"), (MON_TRACE, "trace")]),
                    "rate": c.rate,
                    "lease_left_ms": c.lease_until_ns.saturating_sub(now) / 1_000_000,
                }),
            }])
        }
        n::MONITOR_CPU => {
            let a: PerCpuArray<MapData, MonitorCpu> = open_map(pins, name)?.try_into()?;
            let per_cpu = a.get(&0, 0).context("read monitor_cpu")?;
            Ok(per_cpu
                .iter()
                .enumerate()
                .map(|(cpu, c)| Entry {
                    key: json!({ "cpu": cpu }),
                    value: json!({
                        "tokens": c.tokens,
                        "lost_over_rate": c.lost_rate,
                        "lost_ring_full": c.lost_full,
                    }),
                })
                .collect())
        }
        n::EVENTS => bail!("events is the monitor's ring buffer: `bpfnat monitor` reads it"),
        other => codec(other, FromPin { pins, name, now })
            .unwrap_or_else(|| bail!("no decoder for map {other}")),
    }
}

/// Receives the key and value decoders of a hash map (`codec`), typed.
trait Visit {
    type Out;
    fn visit<K: aya::Pod, V: aya::Pod>(
        self,
        key: fn(&K) -> Value,
        value: fn(&V, u64) -> Value,
    ) -> Self::Out;
}

/// The decoders of the hash map `name` (of every kind but arrays), given to `v`; `None` for
/// another map. The one place that knows how each map's keys and values read.
fn codec<T: Visit>(name: &str, v: T) -> Option<T::Out> {
    Some(match name {
        n::ENDPOINTS => v.visit::<Addr4, Endpoint>(|k| addr_key(ip4(*k)), |e, _| endpoint(e)),
        n::ENDPOINTS6 => v.visit::<Addr6, Endpoint>(|k| addr_key(ip6(*k)), |e, _| endpoint(e)),
        n::PORTS => v.visit::<PortKey<Addr4>, PortTarget<Addr4>>(
            |k| port_key(ip4(k.host_addr), k.host_port, k.proto),
            |t, _| port_target(ip4(t.addr), t),
        ),
        n::PORTS6 => v.visit::<PortKey<Addr6>, PortTarget<Addr6>>(
            |k| port_key(ip6(k.host_addr), k.host_port, k.proto),
            |t, _| port_target(ip6(t.addr), t),
        ),
        n::CONNTRACK | n::CONNTRACK_NEW => v.visit::<CtKey<Addr4>, CtEntry<Addr4>>(
            |k| {
                tuple(
                    ip4(k.src_addr),
                    k.src_port,
                    ip4(k.dst_addr),
                    k.dst_port,
                    k.proto,
                )
            },
            |e, now| ct_entry(e, ip4(e.xlate.src_addr), ip4(e.xlate.dst_addr), now),
        ),
        n::CONNTRACK6 | n::CONNTRACK6_NEW => v.visit::<CtKey<Addr6>, CtEntry<Addr6>>(
            |k| {
                tuple(
                    ip6(k.src_addr),
                    k.src_port,
                    ip6(k.dst_addr),
                    k.dst_port,
                    k.proto,
                )
            },
            |e, now| ct_entry(e, ip6(e.xlate.src_addr), ip6(e.xlate.dst_addr), now),
        ),
        n::STATIC_NAT => v.visit::<Addr4, StaticNat<Addr4>>(
            |k| addr_key(ip4(*k)),
            |s, _| static_nat(ip4(s.peer), s.kind),
        ),
        n::STATIC_NAT6 => v.visit::<Addr6, StaticNat<Addr6>>(
            |k| addr_key(ip6(*k)),
            |s, _| static_nat(ip6(s.peer), s.kind),
        ),
        n::SOCK_RNAT => v.visit::<SockKey4, SockOrig4>(
            |k| sock_key(k.cookie, ip4(k.addr), k.port),
            |o, _| addr_port(ip4(o.addr), o.port),
        ),
        n::SOCK_RNAT6 => v.visit::<SockKey6, SockOrig6>(
            |k| sock_key(k.cookie, ip6(k.addr), k.port),
            |o, _| addr_port(ip6(o.addr), o.port),
        ),
        n::FRAGS => v.visit::<FragKey4, FragPorts>(
            |k| {
                frag_key(
                    ip4(k.src_addr),
                    ip4(k.dst_addr),
                    u32::from(u16::from_be_bytes(k.id)),
                    k.proto,
                )
            },
            frag_ports,
        ),
        n::FRAGS6 => v.visit::<FragKey6, FragPorts>(
            |k| {
                frag_key(
                    ip6(k.src_addr),
                    ip6(k.dst_addr),
                    u32::from_be_bytes(k.id),
                    k.proto,
                )
            },
            frag_ports,
        ),
        n::NODE_ADDRS => v.visit::<Addr4, NodeAddr>(|k| addr_key(ip4(*k)), |a, _| node_addr(a)),
        n::NODE_ADDRS6 => v.visit::<Addr6, NodeAddr>(|k| addr_key(ip6(*k)), |a, _| node_addr(a)),
        n::CLUSTER_NETS => v.visit::<Lpm4, ClusterNet>(
            |k| json!({ "prefix": format!("{}/{}", ip4(k.addr), { k.prefix_len }) }),
            |c, _| cluster_net(c),
        ),
        _ => return None,
    })
}

/// `codec` over a pinned map's entries.
struct FromPin<'a> {
    pins: &'a Pins,
    name: &'a str,
    now: u64,
}

impl Visit for FromPin<'_> {
    type Out = Result<Vec<Entry>>;

    fn visit<K: aya::Pod, V: aya::Pod>(
        self,
        key: fn(&K) -> Value,
        value: fn(&V, u64) -> Value,
    ) -> Self::Out {
        hash::<K, V>(self.pins, self.name, key, |v| value(v, self.now))
    }
}

/// `codec` over one key and value as the map stores them.
struct FromBytes<'a> {
    key: &'a [u8],
    value: Option<&'a [u8]>,
    now: u64,
}

impl Visit for FromBytes<'_> {
    type Out = Option<(Value, Option<Value>)>;

    fn visit<K: aya::Pod, V: aya::Pod>(
        self,
        key: fn(&K) -> Value,
        value: fn(&V, u64) -> Value,
    ) -> Self::Out {
        let k = read::<K>(self.key)?;
        let v = match self.value {
            Some(b) => Some(value(&read::<V>(b)?, self.now)),
            None => None,
        };
        Some((key(&k), v))
    }
}

fn read<T: aya::Pod>(b: &[u8]) -> Option<T> {
    // SAFETY: `aya::Pod`: any bytes of the right length are a valid `T`.
    (b.len() == size_of::<T>()).then(|| unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

/// A key of the map `name` and the value found for it, decoded from the bytes the map stores
/// (`bpfnat explain`'s trail); `None` when the map has no decoder or the lengths are wrong.
pub fn decode(
    name: &str,
    key: &[u8],
    value: Option<&[u8]>,
    now: u64,
) -> Option<(Value, Option<Value>)> {
    codec(name, FromBytes { key, value, now }).flatten()
}

/// A hash map's entries, each side decoded by its function.
fn hash<K: aya::Pod, V: aya::Pod>(
    pins: &Pins,
    name: &str,
    key: impl Fn(&K) -> Value,
    value: impl Fn(&V) -> Value,
) -> Result<Vec<Entry>> {
    let m: HashMap<MapData, K, V> = open_map(pins, name)?.try_into()?;
    Ok(batch::dump::<K, V>(m.map())
        .with_context(|| format!("read map {name}"))?
        .iter()
        .map(|(k, v)| Entry {
            key: key(k),
            value: value(v),
        })
        .collect())
}

fn ip4(a: Addr4) -> IpAddr {
    Ipv4Addr::from(a).into()
}

fn ip6(a: Addr6) -> IpAddr {
    Ipv6Addr::from(a).into()
}

fn mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// The names of the bits of `flags` that `known` names, and any other bits as a number.
fn names(flags: u32, known: &[(u32, &str)]) -> Vec<Value> {
    let mut out: Vec<Value> = known
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| Value::from(*name))
        .collect();
    let rest = flags & !known.iter().fold(0, |m, (bit, _)| m | bit);
    if rest != 0 {
        out.push(Value::from(rest));
    }
    out
}

fn addr_key(a: IpAddr) -> Value {
    json!({ "address": a })
}

fn addr_port(a: IpAddr, p: Port) -> Value {
    json!({ "address": a, "port": u16::from_be_bytes(p) })
}

fn tuple(src: IpAddr, sport: Port, dst: IpAddr, dport: Port, proto: u8) -> Value {
    json!({
        "proto": proto_name(proto),
        "src": src,
        "sport": u16::from_be_bytes(sport),
        "dst": dst,
        "dport": u16::from_be_bytes(dport),
    })
}

fn config(c: &Config) -> Value {
    let v6 = &c.v6;
    json!({
        "uplink_ifindex": c.uplink_ifindex,
        "flags": names(c.flags, &[(CFG_MASQUERADE, "masquerade"), (CFG_STATIC_NAT, "static_nat")]),
        "port_min": c.port_min,
        "port_max": c.port_max,
        "host_port_min": c.host_port_min,
        "host_port_max": c.host_port_max,
        "uplink_mac": mac(c.uplink_mac),
        "netns_cookie": c.netns_cookie,
        "v4": {
            "snat_addr": ip4(c.v4.snat_addr),
            "gateway_addr": ip4(c.v4.gateway_addr),
            "node_addr": ip4(c.v4.node_addr),
            "subnet": format!("{}/{}", ip4(c.v4.subnet_addr), u32::from_be_bytes(c.v4.subnet_mask).count_ones()),
        },
        "v6": (v6.prefix_len != 0).then(|| json!({
            "subnet": format!("{}/{}", ip6(v6.subnet_addr), v6.prefix_len),
            "gateway_addr": ip6(v6.gateway_addr),
            "snat_addr": (v6.snat_addr != [0; 16]).then(|| ip6(v6.snat_addr)),
        })),
    })
}

fn endpoint(e: &Endpoint) -> Value {
    json!({
        "ifindex": e.ifindex,
        "flags": names(e.flags, &[(EP_CONTAINER, "container")]),
        "mac": mac(e.mac),
        "host_mac": mac(e.host_mac),
    })
}

fn port_key(host: IpAddr, port: Port, proto: u8) -> Value {
    json!({
        "host_addr": host,
        "host_port": u16::from_be_bytes(port),
        "proto": proto_name(proto),
    })
}

fn port_target<A>(addr: IpAddr, t: &PortTarget<A>) -> Value {
    json!({
        "addr": addr,
        "port": u16::from_be_bytes(t.port),
        "generation": t.generation,
    })
}

fn ct_entry<A>(e: &CtEntry<A>, xsrc: IpAddr, xdst: IpAddr, now: u64) -> Value {
    let m = &e.meta;
    let proto = e.xlate.proto;
    json!({
        "xlate": tuple(xsrc, e.xlate.src_port, xdst, e.xlate.dst_port, proto),
        "dir": if m.dir == DIR_ORIGINAL { "original" } else { "reply" },
        "state": state_name(proto, m.state),
        "origin": match m.origin {
            ORIGIN_MASQUERADE => "masquerade",
            ORIGIN_PUBLISHED => "published",
            ORIGIN_HAIRPIN => "hairpin",
            _ => "unknown",
        },
        "nat": names(u32::from(m.nat), &[(u32::from(NAT_SNAT), "snat"), (u32::from(NAT_DNAT), "dnat")]),
        "assured": m.assured != 0,
        "ifindex": m.ifindex,
        "mac": mac(m.mac),
        "generation": m.generation,
        "age_secs": now.saturating_sub(m.created_ns) / 1_000_000_000,
        "idle_secs": now.saturating_sub(m.last_seen_ns) / 1_000_000_000,
        "packets": m.packets,
        "bytes": m.bytes,
        "next_hop": (m.nh_ifindex != 0).then(|| json!({
            "ifindex": m.nh_ifindex,
            "container": m.nh_peer != 0,
            "dmac": mac(m.nh_dmac),
            "smac": mac(m.nh_smac),
            "mtu": m.nh_mtu,
        })),
        "tcp": (proto == nat_common::PROTO_TCP).then(|| json!({
            "end": m.tcp_end,
            "limit": m.tcp_limit,
            "max_window": m.tcp_maxwin,
            "window_scale": m.tcp_wscale,
            "tracked": m.tcp_track != 0,
            // What packets from outside are checked against before the other entry is read.
            "peer_copy": (m.tcp_track & nat_common::TCP_PEER_COPY != 0).then(|| json!({
                "end": m.peer_end,
                "limit": m.peer_limit,
                "max_window": m.peer_maxwin,
            })),
        })),
    })
}

fn static_nat(peer: IpAddr, kind: u8) -> Value {
    json!({
        "peer": peer,
        "kind": match kind {
            STATIC_EXTERNAL => "external",
            STATIC_INTERNAL => "internal",
            _ => "unknown",
        },
    })
}

fn sock_key(cookie: u64, addr: IpAddr, port: Port) -> Value {
    json!({ "cookie": cookie, "address": addr, "port": u16::from_be_bytes(port) })
}

fn frag_key(src: IpAddr, dst: IpAddr, id: u32, proto: u8) -> Value {
    json!({ "src": src, "dst": dst, "id": id, "proto": proto_name(proto) })
}

fn frag_ports(f: &FragPorts, now: u64) -> Value {
    json!({
        "sport": u16::from_be_bytes(f.src_port),
        "dport": u16::from_be_bytes(f.dst_port),
        "seen_bytes": f.seen,
        "total_bytes": f.total,
        "age_ms": now.saturating_sub(f.created_ns) / 1_000_000,
    })
}

fn cluster_net(c: &ClusterNet) -> Value {
    json!({
        "flags": names(c.flags, &[(NET_NO_MASQ, "no_masquerade"), (NET_CLUSTER_SRC, "cluster_source")]),
    })
}

fn node_addr(a: &NodeAddr) -> Value {
    json!({ "ifindex": a.ifindex })
}
