//! `bpfnat explain`: what the datapath would do with one packet, decided by its own programs
//! (their explain build: `datapath::explain`) on a crafted frame, from the node's tables, as
//! if it arrived from outside on the uplink or from a container. Nothing is committed: no
//! connection, no port, no counter, no monitor event.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context as _, Result, bail};
use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};
use nat_common::{REDIRECT_EGRESS, REDIRECT_NEIGH, REDIRECT_PEER, Reason, prog_names};
use serde::Serialize;

use crate::{
    datapath::{
        Pins,
        explain::{self, Ran, TrailStep},
    },
    state::{Container, State, XdpSetting},
};

/// The protocols a packet can be crafted for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    /// An echo request (ICMPv6 over IPv6); its id is the source "port".
    Icmp,
}

/// Where the packet arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum From {
    /// From outside, on the uplink.
    Uplink,
    /// Sent by this container.
    Container(String),
}

/// The packet to explain.
#[derive(Clone, Debug)]
pub struct Query {
    pub proto: Proto,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// `None`: from the container whose address `src` is, else from the uplink.
    pub from: Option<From>,
    /// TCP flags (`SYN` when none are given: a new connection).
    pub tcp_flags: TcpFlags,
}

/// The TCP flags of the crafted segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

/// A packet's tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Tuple {
    pub proto: Proto,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

impl std::fmt::Display for Tuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        };
        write!(
            f,
            "{proto} {} -> {}",
            SocketAddr::new(self.src, self.sport),
            SocketAddr::new(self.dst, self.dport)
        )
    }
}

/// An interface, and the container it belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Interface {
    pub ifindex: u32,
    pub name: Option<String>,
    /// The container whose host-side veth this is.
    pub container: Option<String>,
    /// This is the node's uplink.
    pub uplink: bool,
}

/// One program's run.
#[derive(Debug, Serialize)]
pub struct ProgramRun {
    /// `xdp_uplink`, `tc_uplink` or `tc_container`.
    pub program: &'static str,
    /// What it returned: `pass`, `drop`, `redirect` (or `tx`).
    pub action: &'static str,
    pub steps: Vec<StepView>,
}

/// One step of a program's trail.
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum StepView {
    /// A map lookup and what it found (`value` null: nothing).
    Lookup {
        map: &'static str,
        key: serde_json::Value,
        value: Option<serde_json::Value>,
    },
    /// An entry the datapath would create (`ok`: it would succeed).
    Insert {
        map: &'static str,
        key: serde_json::Value,
        value: serde_json::Value,
        ok: bool,
    },
    /// An entry the datapath would delete (`present`: there is one; the datapath deletes a
    /// tuple without looking first).
    Remove {
        map: &'static str,
        key: serde_json::Value,
        present: bool,
    },
    /// A FIB lookup: the route to `dst`.
    Fib {
        dst: IpAddr,
        /// `success`, `no_neighbour`, `frag_needed`, `not_forwarded`, ...
        result: &'static str,
        out: Option<Interface>,
        mtu: Option<u32>,
    },
    /// Where the packet is sent.
    Redirect {
        out: Interface,
        /// `into_namespace` (straight into the container), `egress`, `egress_resolve_neighbour`.
        how: &'static str,
    },
    /// The counter the packet would move (`bpfnat stats`).
    Count { reason: &'static str },
}

/// What the datapath would do.
#[derive(Debug, Serialize)]
pub struct Explanation {
    /// The packet as crafted.
    pub packet: Tuple,
    pub arrives_on: Interface,
    pub programs: Vec<ProgramRun>,
    /// `drop`, `forward` (sent by the datapath to `out`), or `stack` (handed to the node's
    /// network stack: the node's own traffic, or what the kernel routes).
    pub verdict: &'static str,
    /// Why: a drop's reason, else the rule that decided (the first counter it moves).
    pub reason: Option<&'static str>,
    /// Every counter the packet would move, in order (`bpfnat stats` names).
    pub counted: Vec<&'static str>,
    /// The tuple as the packet leaves the programs.
    pub translated: Option<Tuple>,
    pub out: Option<Interface>,
}

/// Run the programs on `q`'s packet. `state`: the node's record; `names`: interface names
/// by index (for the output).
pub fn explain(
    pins: &Pins,
    state: &State,
    names: &dyn Fn(u32) -> Option<String>,
    q: &Query,
) -> Result<Explanation> {
    let node = state.node.as_ref().context(crate::datapath::NOT_UP)?;
    if q.src.is_ipv4() != q.dst.is_ipv4() {
        bail!("the source and destination must be of one family");
    }
    let sender = match &q.from {
        Some(From::Container(name)) => Some(state.containers.get(name).with_context(|| {
            format!("no such container: {name} (`bpfnat container list` shows them)")
        })?),
        Some(From::Uplink) => None,
        None => state.containers.values().find(|c| owns(c, q.src.ip())),
    };
    let iface = |ifindex: u32| Interface {
        ifindex,
        name: names(ifindex),
        container: state
            .containers
            .values()
            .find(|c| c.host_ifindex == ifindex)
            .map(|c| c.name.clone()),
        uplink: ifindex == node.uplink_ifindex,
    };
    // The other end's MAC does not matter to the programs: any unicast one.
    const OUTSIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
    let (frame, ifindex, progs): (Vec<u8>, u32, &[&'static str]) = match sender {
        Some(c) => (
            craft(q, c.mac, c.host_mac)?,
            c.host_ifindex,
            &[prog_names::TC_CONTAINER],
        ),
        None => (
            craft(q, OUTSIDE_MAC, node.uplink_mac)?,
            node.uplink_ifindex,
            if node.xdp == XdpSetting::Off {
                &[prog_names::TC_UPLINK]
            } else {
                &[prog_names::XDP_UPLINK, prog_names::TC_UPLINK]
            },
        ),
    };
    let packet = tuple_of(&frame).context("parse the crafted frame")?;
    let mut runs = Vec::new();
    let mut frame = frame;
    let mut last: Option<Ran> = None;
    for prog in progs {
        let ran = explain::run(pins, prog, ifindex, &frame)?;
        if ran.overflow {
            bail!(
                "{prog} took more steps than the trail holds; this explanation would be incomplete"
            );
        }
        let xdp = *prog == prog_names::XDP_UPLINK;
        let action = action_name(xdp, ran.action);
        runs.push(ProgramRun {
            program: prog,
            action,
            steps: ran.steps.iter().map(|s| step_view(s, &iface)).collect(),
        });
        frame.clone_from(&ran.out);
        let passed_on = xdp && action == "pass";
        last = Some(ran);
        if !passed_on {
            break;
        }
    }
    let ran = last.context("no program ran")?;
    let counted: Vec<&'static str> = runs
        .iter()
        .flat_map(|r| &r.steps)
        .filter_map(|s| match s {
            StepView::Count { reason } => Some(*reason),
            _ => None,
        })
        .collect();
    let out = ran.steps.iter().rev().find_map(|s| match s {
        TrailStep::Redirect { ifindex, .. } => Some(iface(*ifindex)),
        _ => None,
    });
    let xdp = ran.program == prog_names::XDP_UPLINK;
    let verdict = match action_name(xdp, ran.action) {
        "drop" => "drop",
        "redirect" | "tx" => "forward",
        _ => "stack",
    };
    let reason = if verdict == "drop" {
        counted.last()
    } else {
        counted.first()
    }
    .copied();
    Ok(Explanation {
        packet,
        arrives_on: iface(ifindex),
        programs: runs,
        verdict,
        reason,
        counted,
        translated: (verdict != "drop").then(|| tuple_of(&ran.out)).flatten(),
        out,
    })
}

/// Whether `ip` is one of `c`'s addresses.
fn owns(c: &Container, ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => c.ip == Some(a),
        IpAddr::V6(a) => c.ip6 == Some(a),
    }
}

/// The Ethernet frame of `q`'s packet, from `smac` to `dmac`.
fn craft(q: &Query, smac: [u8; 6], dmac: [u8; 6]) -> Result<Vec<u8>> {
    let eth = PacketBuilder::ethernet2(smac, dmac);
    let ip = match (q.src.ip(), q.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => bail!("the source and destination must be of one family"),
    };
    // A payload, so that a datagram is not empty; TCP carries none (a SYN has none).
    const PAYLOAD: &[u8] = b"bpfnat explain";
    let mut out = Vec::new();
    let (sport, dport) = (q.src.port(), q.dst.port());
    let r = match q.proto {
        Proto::Tcp => {
            let mut b = ip.tcp(sport, dport, 1_000_000, 64_240);
            let f = q.tcp_flags;
            if f.syn {
                b = b.syn();
            }
            if f.ack {
                b = b.ack(1);
            }
            if f.fin {
                b = b.fin();
            }
            if f.rst {
                b = b.rst();
            }
            b.write(&mut out, &[])
        }
        Proto::Udp => ip.udp(sport, dport).write(&mut out, PAYLOAD),
        Proto::Icmp => match q.src.ip() {
            IpAddr::V4(_) => ip.icmpv4_echo_request(sport, 1).write(&mut out, PAYLOAD),
            IpAddr::V6(_) => ip.icmpv6_echo_request(sport, 1).write(&mut out, PAYLOAD),
        },
    };
    r.context("build the packet")?;
    Ok(out)
}

/// The tuple of an IP packet in an Ethernet frame (ICMP: the echo id as both ports).
fn tuple_of(frame: &[u8]) -> Option<Tuple> {
    let h = PacketHeaders::from_ethernet_slice(frame).ok()?;
    let (src, dst) = match h.net? {
        NetHeaders::Ipv4(ip, _) => (IpAddr::from(ip.source), IpAddr::from(ip.destination)),
        NetHeaders::Ipv6(ip, _) => (IpAddr::from(ip.source), IpAddr::from(ip.destination)),
        NetHeaders::Arp(_) => return None,
    };
    let (proto, sport, dport) = match h.transport? {
        TransportHeader::Tcp(t) => (Proto::Tcp, t.source_port, t.destination_port),
        TransportHeader::Udp(u) => (Proto::Udp, u.source_port, u.destination_port),
        TransportHeader::Icmpv4(i) => {
            let id = echo_id(&i.to_bytes()[..])?;
            (Proto::Icmp, id, id)
        }
        TransportHeader::Icmpv6(i) => {
            let id = echo_id(&i.to_bytes()[..])?;
            (Proto::Icmp, id, id)
        }
        TransportHeader::Igmp(_) => return None,
    };
    Some(Tuple {
        proto,
        src,
        sport,
        dst,
        dport,
    })
}

/// The identifier of an ICMP echo header (bytes 4–5).
fn echo_id(header: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*header.get(4)?, *header.get(5)?]))
}

fn action_name(xdp: bool, action: u32) -> &'static str {
    if xdp {
        match action {
            1 => "drop",
            2 => "pass",
            3 => "tx",
            4 => "redirect",
            _ => "aborted",
        }
    } else {
        match action {
            0 => "pass",
            2 => "drop",
            7 => "redirect",
            _ => "other",
        }
    }
}

fn reason_name(r: Reason) -> &'static str {
    Reason::ALL
        .iter()
        .find(|(x, _)| *x == r)
        .map_or("unknown", |(_, n)| *n)
}

/// `bpf_fib_lookup`'s return codes (`BPF_FIB_LKUP_RET_*`).
fn fib_result(rc: i32) -> &'static str {
    match rc {
        0 => "success",
        1 => "blackhole",
        2 => "unreachable",
        3 => "prohibit",
        4 => "not_forwarded",
        5 => "forwarding_disabled",
        6 => "unsupported_lwt",
        7 => "no_neighbour",
        8 => "frag_needed",
        9 => "no_source_address",
        _ => "unknown",
    }
}

fn step_view(s: &TrailStep, iface: &dyn Fn(u32) -> Interface) -> StepView {
    match s.clone() {
        TrailStep::Lookup { map, key, value } => StepView::Lookup { map, key, value },
        TrailStep::Insert {
            map,
            key,
            value,
            ok,
        } => StepView::Insert {
            map,
            key,
            value,
            ok,
        },
        TrailStep::Remove { map, key, present } => StepView::Remove { map, key, present },
        TrailStep::Fib { dst, fib } => {
            let routed = matches!(fib.rc, 0 | 7 | 8);
            StepView::Fib {
                dst,
                result: fib_result(fib.rc),
                out: routed.then(|| iface(fib.ifindex)),
                mtu: (fib.rc == 0 || fib.rc == 8).then_some(fib.mtu),
            }
        }
        TrailStep::Redirect { ifindex, how } => StepView::Redirect {
            out: iface(ifindex),
            how: match how {
                REDIRECT_PEER => "into_namespace",
                REDIRECT_NEIGH => "egress_resolve_neighbour",
                REDIRECT_EGRESS => "egress",
                _ => "unknown",
            },
        },
        TrailStep::Count(r) => StepView::Count {
            reason: reason_name(r),
        },
    }
}
