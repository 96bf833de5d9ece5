//! Every pinned map decoded (`bpfnat map list`, `bpfnat map dump NAME`): addresses, ports,
//! protocols, states, reasons and flags by name, where `bpftool map dump` prints byte arrays.
//! The field names are part of the JSON schema.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, HashMap, LpmTrie, MapData, MapInfo, PerCpuArray, lpm_trie::Key as LpmKey};
use nat_common::{
    Addr4, Addr6, CFG_MASQUERADE, CFG_STATIC_NAT, ClusterNet, Config, Counter, CtEntry, CtKey,
    DIR_ORIGINAL, EP_CONTAINER, Endpoint, FragKey4, FragKey6, FragPorts, MAP_SPECS, MON_DROP,
    MON_TRACE, MapKind, MonitorCpu, MonitorCtl, NAT_DNAT, NAT_SNAT, NET_CLUSTER_SRC, NET_NO_MASQ,
    NodeAddr, ORIGIN_HAIRPIN, ORIGIN_MASQUERADE, ORIGIN_PUBLISHED, Port, PortKey, PortTarget,
    Reason, STATIC_EXTERNAL, STATIC_INTERNAL, SockKey4, SockKey6, SockOrig4, SockOrig6, StaticNat,
    map_names as n,
};
use serde::Serialize;
use serde_json::{Value, json};

use super::{
    Pins,
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
        n::ENDPOINTS => hash::<Addr4, Endpoint>(pins, name, |k| addr_key(ip4(*k)), endpoint),
        n::ENDPOINTS6 => hash::<Addr6, Endpoint>(pins, name, |k| addr_key(ip6(*k)), endpoint),
        n::PORTS => hash::<PortKey<Addr4>, PortTarget<Addr4>>(
            pins,
            name,
            |k| port_key(ip4(k.host_addr), k.host_port, k.proto),
            |v| port_target(ip4(v.addr), v),
        ),
        n::PORTS6 => hash::<PortKey<Addr6>, PortTarget<Addr6>>(
            pins,
            name,
            |k| port_key(ip6(k.host_addr), k.host_port, k.proto),
            |v| port_target(ip6(v.addr), v),
        ),
        n::CONNTRACK | n::CONNTRACK_NEW => hash::<CtKey<Addr4>, CtEntry<Addr4>>(
            pins,
            name,
            |k| {
                tuple(
                    ip4(k.src_addr),
                    k.src_port,
                    ip4(k.dst_addr),
                    k.dst_port,
                    k.proto,
                )
            },
            |e| ct_entry(e, ip4(e.xlate.src_addr), ip4(e.xlate.dst_addr), now),
        ),
        n::CONNTRACK6 | n::CONNTRACK6_NEW => hash::<CtKey<Addr6>, CtEntry<Addr6>>(
            pins,
            name,
            |k| {
                tuple(
                    ip6(k.src_addr),
                    k.src_port,
                    ip6(k.dst_addr),
                    k.dst_port,
                    k.proto,
                )
            },
            |e| ct_entry(e, ip6(e.xlate.src_addr), ip6(e.xlate.dst_addr), now),
        ),
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
        n::STATIC_NAT => hash::<Addr4, StaticNat<Addr4>>(
            pins,
            name,
            |k| addr_key(ip4(*k)),
            |v| static_nat(ip4(v.peer), v.kind),
        ),
        n::STATIC_NAT6 => hash::<Addr6, StaticNat<Addr6>>(
            pins,
            name,
            |k| addr_key(ip6(*k)),
            |v| static_nat(ip6(v.peer), v.kind),
        ),
        n::SOCK_RNAT => hash::<SockKey4, SockOrig4>(
            pins,
            name,
            |k| sock_key(k.cookie, ip4(k.addr), k.port),
            |v| addr_port(ip4(v.addr), v.port),
        ),
        n::SOCK_RNAT6 => hash::<SockKey6, SockOrig6>(
            pins,
            name,
            |k| sock_key(k.cookie, ip6(k.addr), k.port),
            |v| addr_port(ip6(v.addr), v.port),
        ),
        n::FRAGS => hash::<FragKey4, FragPorts>(
            pins,
            name,
            |k| {
                frag_key(
                    ip4(k.src_addr),
                    ip4(k.dst_addr),
                    u32::from(u16::from_be_bytes(k.id)),
                    k.proto,
                )
            },
            |v| frag_ports(v, now),
        ),
        n::FRAGS6 => hash::<FragKey6, FragPorts>(
            pins,
            name,
            |k| {
                frag_key(
                    ip6(k.src_addr),
                    ip6(k.dst_addr),
                    u32::from_be_bytes(k.id),
                    k.proto,
                )
            },
            |v| frag_ports(v, now),
        ),
        n::NODE_ADDRS => hash::<Addr4, NodeAddr>(pins, name, |k| addr_key(ip4(*k)), node_addr),
        n::NODE_ADDRS6 => hash::<Addr6, NodeAddr>(pins, name, |k| addr_key(ip6(*k)), node_addr),
        n::CLUSTER_NETS => {
            let t: LpmTrie<MapData, Addr4, ClusterNet> = open_map(pins, name)?.try_into()?;
            t.iter()
                .map(|r| {
                    let (k, v): (LpmKey<Addr4>, ClusterNet) = r.context("read cluster_nets")?;
                    Ok(Entry {
                        key: json!({ "prefix": format!("{}/{}", ip4(k.data()), k.prefix_len()) }),
                        value: json!({
                            "flags": names(v.flags, &[(NET_NO_MASQ, "no_masquerade"), (NET_CLUSTER_SRC, "cluster_source")]),
                        }),
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
        other => bail!("no decoder for map {other}"),
    }
}

/// A hash map's entries, each side decoded by its function.
fn hash<K: aya::Pod, V: aya::Pod>(
    pins: &Pins,
    name: &str,
    key: impl Fn(&K) -> Value,
    value: impl Fn(&V) -> Value,
) -> Result<Vec<Entry>> {
    let m: HashMap<MapData, K, V> = open_map(pins, name)?.try_into()?;
    m.iter()
        .map(|r| {
            let (k, v) = r.with_context(|| format!("read map {name}"))?;
            Ok(Entry {
                key: key(&k),
                value: value(&v),
            })
        })
        .collect()
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

fn node_addr(a: &NodeAddr) -> Value {
    json!({ "ifindex": a.ifindex })
}
