//! `bpfnat monitor`: the datapath's drop and trace events, live, one line each (`-o json`:
//! one JSON object per line), until Ctrl-C or until the reader of the output goes away.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use nat_common::{
    EV_DROP, EvTuple, HOOK_TC_CONTAINER, HOOK_TC_UPLINK, HOOK_XDP_UPLINK, MON_DROP, MON_TRACE,
    MonitorCtl, MonitorEvent, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Reason,
};
use nat_plumbing::{netlink::Netlink, stdout};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};

use super::{Ctx, Format, view};
use crate::datapath::{
    ct_now_ns,
    monitor::{Lost, Monitor},
};

#[derive(Args, Debug)]
pub struct MonitorArgs {
    /// Which events: drops, traces (new connections, translations and redirects of tracked
    /// packets), or both.
    #[arg(long = "type", value_enum, default_value_t = EventType::Drop)]
    pub kind: EventType,
    /// Only events of this container's interface (what it sent or what was sent to it).
    #[arg(long)]
    pub container: Option<String>,
    /// Only events counted under this reason (as `bpfnat stats` names them).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only this protocol.
    #[arg(long, value_enum)]
    pub proto: Option<ProtoFilter>,
    /// Only packets with this source or destination port, before or after translation.
    #[arg(long)]
    pub port: Option<u16>,
    /// Events per second each CPU may send; more are counted as lost.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EventType {
    Drop,
    Trace,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProtoFilter {
    Tcp,
    Udp,
    Icmp,
}

impl ProtoFilter {
    /// The protocol number the programs filter on (`PROTO_ICMP` stands for ICMPv6 too).
    const fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
            Self::Icmp => PROTO_ICMP,
        }
    }

    fn matches(self, proto: u8) -> bool {
        match self {
            Self::Tcp => proto == PROTO_TCP,
            Self::Udp => proto == PROTO_UDP,
            Self::Icmp => proto == PROTO_ICMP || proto == PROTO_ICMPV6,
        }
    }
}

/// One event as `-o json` prints it (kind `MonitorEvent`).
#[derive(Serialize, Debug)]
pub struct EventView {
    /// RFC 3339, microseconds, UTC.
    pub time: String,
    /// `drop` or `trace`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `tc_container`, `tc_uplink` or `xdp_uplink`.
    pub program: &'static str,
    /// The interface the packet arrived on, and the container it belongs to.
    pub interface: String,
    pub container: Option<String>,
    /// `drop`, or `forward` (sent on to `out_interface`).
    pub verdict: &'static str,
    pub reason: &'static str,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, or the protocol number; absent when the packet is
    /// not IP.
    pub proto: Option<String>,
    pub before: Option<TupleView>,
    /// The tuple after translation (traces).
    pub after: Option<TupleView>,
    pub out_interface: Option<String>,
    pub out_container: Option<String>,
    pub len: u32,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct TupleView {
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

/// Events lost since the monitor started (kind `MonitorLost`), printed when they grow.
#[derive(Serialize, Debug)]
pub struct LostView {
    pub over_rate: u64,
    pub ring_full: u64,
}

pub async fn run(ctx: &Ctx, a: MonitorArgs) -> Result<()> {
    let reason = a.reason.as_deref().map(reason_named).transpose()?;
    // One reader at a time: each event goes to one of them.
    let (lock, _) = crate::state::lock_file(&ctx.state_dir, "monitor.lock")?;
    if lock.try_lock().is_err() {
        bail!("another `bpfnat monitor` is reading this node's events; stop it first");
    }
    let mut names = Names::new(ctx);
    names.refresh().await?;
    let container_if = match &a.container {
        Some(c) => Some(names.host_ifindex(c).with_context(|| {
            format!("no such container: {c} (`bpfnat container list` shows them)")
        })?),
        None => None,
    };
    let flags = match a.kind {
        EventType::Drop => MON_DROP,
        EventType::Trace => MON_TRACE,
        EventType::All => MON_DROP | MON_TRACE,
    };
    let mut mon = Monitor::open(&ctx.pins)?;
    let mut sigint = signal(SignalKind::interrupt()).context("catch SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("catch SIGTERM")?;
    // The programs filter too, so that the rate is spent on what is shown; the same filter
    // runs here as well (`Filter::keeps`), which is what the tests of its meaning exercise.
    mon.start(MonitorCtl {
        flags,
        rate: a.rate,
        ifindex: container_if.unwrap_or(0),
        reason: reason.map_or(0, |r| r + 1),
        port: a.port.unwrap_or(0).to_be_bytes(),
        proto: a.proto.map_or(0, ProtoFilter::number),
        ..MonitorCtl::default()
    })?;
    let clock = Clock::now();
    eprintln!(
        "bpfnat monitor: {} events, at most {} per second per CPU (Ctrl-C to stop)",
        match a.kind {
            EventType::Drop => "drop",
            EventType::Trace => "trace",
            EventType::All => "drop and trace",
        },
        a.rate
    );
    let filter = Filter {
        container_if,
        reason,
        proto: a.proto,
        port: a.port,
    };
    let r = stream(
        ctx,
        &mut mon,
        &mut names,
        &filter,
        &clock,
        (&mut sigint, &mut sigterm),
    )
    .await;
    // Whatever ended the stream, the programs go back to emitting nothing.
    let stopped = mon.stop();
    r.and(stopped)
}

async fn stream(
    ctx: &Ctx,
    mon: &mut Monitor,
    names: &mut Names<'_>,
    filter: &Filter,
    clock: &Clock,
    (sigint, sigterm): (
        &mut tokio::signal::unix::Signal,
        &mut tokio::signal::unix::Signal,
    ),
) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut lost = Lost::default();
    loop {
        tokio::select! {
            _ = sigint.recv() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
            _ = tick.tick() => {
                mon.renew()?;
                let now = mon.lost()?;
                if now != lost {
                    lost = now;
                    print_lost(ctx, lost)?;
                }
            }
            events = mon.next_events(256) => {
                for e in events? {
                    if !filter.keeps(&e) {
                        continue;
                    }
                    let v = names.view(&e, clock).await;
                    print_event(ctx, &v)?;
                }
            }
        }
        if stdout::closed() {
            return Ok(());
        }
    }
}

/// `--reason`'s name as a `Reason` number.
fn reason_named(name: &str) -> Result<u32> {
    Reason::ALL
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(r, _)| *r as u32)
        .with_context(|| {
            let all: Vec<&str> = Reason::ALL.iter().map(|(_, n)| *n).collect();
            format!("unknown reason {name:?}; one of: {}", all.join(", "))
        })
}

fn reason_name(r: u32) -> &'static str {
    Reason::ALL
        .get(r as usize)
        .map_or("unknown", |(_, name)| *name)
}

struct Filter {
    container_if: Option<u32>,
    reason: Option<u32>,
    proto: Option<ProtoFilter>,
    port: Option<u16>,
}

impl Filter {
    fn keeps(&self, e: &MonitorEvent) -> bool {
        let ports =
            [e.before.sport, e.before.dport, e.after.sport, e.after.dport].map(u16::from_be_bytes);
        self.container_if
            .is_none_or(|i| e.ifindex == i || e.out_ifindex == i)
            && self.reason.is_none_or(|r| e.reason == r)
            && self.proto.is_none_or(|p| p.matches(e.proto))
            && self.port.is_none_or(|p| ports.contains(&p))
    }
}

/// Event times (`CLOCK_MONOTONIC`) as wall-clock times.
struct Clock {
    wall: SystemTime,
    mono_ns: u64,
}

impl Clock {
    fn now() -> Self {
        Self {
            wall: SystemTime::now(),
            mono_ns: mono_ns(),
        }
    }

    fn rfc3339(&self, t_ns: u64) -> String {
        let at = if t_ns >= self.mono_ns {
            self.wall + Duration::from_nanos(t_ns - self.mono_ns)
        } else {
            self.wall - Duration::from_nanos(self.mono_ns - t_ns)
        };
        let d = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = d.as_secs();
        let (days, rest) = (secs / 86_400, secs % 86_400);
        let (y, m, dd) = civil_from_days(days as i64);
        format!(
            "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:06}Z",
            rest / 3600,
            rest % 3600 / 60,
            rest % 60,
            d.subsec_micros()
        )
    }
}

/// `bpf_ktime_get_ns`'s clock (the coarse clock `ct_now_ns` reads lags it by a tick).
fn mono_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or_else(
        |_| ct_now_ns(),
        |t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64,
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Interface and container names by ifindex, read again (at most once a second) when an
/// event names an interface they do not know.
struct Names<'a> {
    ctx: &'a Ctx,
    links: HashMap<u32, String>,
    containers: HashMap<u32, String>,
    refreshed: Option<Instant>,
}

impl<'a> Names<'a> {
    fn new(ctx: &'a Ctx) -> Self {
        Self {
            ctx,
            links: HashMap::new(),
            containers: HashMap::new(),
            refreshed: None,
        }
    }

    async fn refresh(&mut self) -> Result<()> {
        self.refreshed = Some(Instant::now());
        self.links = Netlink::current()?
            .links()
            .await?
            .into_iter()
            .map(|l| (l.index, l.name))
            .collect();
        let state = self.ctx.store()?.load()?;
        self.containers = state
            .containers
            .values()
            .map(|c| (c.host_ifindex, c.name.clone()))
            .collect();
        Ok(())
    }

    fn host_ifindex(&self, container: &str) -> Option<u32> {
        self.containers
            .iter()
            .find(|(_, n)| *n == container)
            .map(|(i, _)| *i)
    }

    async fn name(&mut self, ifindex: u32) -> (String, Option<String>) {
        if !self.links.contains_key(&ifindex)
            && self
                .refreshed
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            // Names are a courtesy: an event is shown with its ifindex when they fail.
            let _ = self.refresh().await;
        }
        let link = self
            .links
            .get(&ifindex)
            .cloned()
            .unwrap_or_else(|| format!("if{ifindex}"));
        (link, self.containers.get(&ifindex).cloned())
    }

    async fn view(&mut self, e: &MonitorEvent, clock: &Clock) -> EventView {
        let (interface, container) = self.name(e.ifindex).await;
        let (out_interface, out_container) = if e.out_ifindex == 0 {
            (None, None)
        } else {
            let (i, c) = self.name(e.out_ifindex).await;
            (Some(i), c)
        };
        let drop = e.kind == EV_DROP;
        EventView {
            time: clock.rfc3339(e.time_ns),
            kind: if drop { "drop" } else { "trace" },
            program: match e.hook {
                HOOK_TC_CONTAINER => "tc_container",
                HOOK_TC_UPLINK => "tc_uplink",
                HOOK_XDP_UPLINK => "xdp_uplink",
                _ => "unknown",
            },
            interface,
            container,
            verdict: if drop { "drop" } else { "forward" },
            reason: reason_name(e.reason),
            proto: (e.family != 0).then(|| proto_name(e.proto)),
            before: tuple(e.family, &e.before),
            after: if drop {
                None
            } else {
                tuple(e.family, &e.after)
            },
            out_interface,
            out_container,
            len: e.len,
        }
    }
}

fn proto_name(p: u8) -> String {
    match p {
        PROTO_TCP => "tcp".to_owned(),
        PROTO_UDP => "udp".to_owned(),
        PROTO_ICMP => "icmp".to_owned(),
        PROTO_ICMPV6 => "icmpv6".to_owned(),
        n => n.to_string(),
    }
}

fn tuple(family: u8, t: &EvTuple) -> Option<TupleView> {
    let addr = |a: &[u8; 16]| -> Option<IpAddr> {
        match family {
            4 => Some(Ipv4Addr::new(a[0], a[1], a[2], a[3]).into()),
            6 => Some(Ipv6Addr::from(*a).into()),
            _ => None,
        }
    };
    Some(TupleView {
        src: addr(&t.src)?,
        sport: u16::from_be_bytes(t.sport),
        dst: addr(&t.dst)?,
        dport: u16::from_be_bytes(t.dport),
    })
}

fn endpoint(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// `src:sport > dst:dport`, as tcpdump writes a packet; ICMP echo as `src > dst id N`, an ICMP
/// error (no id) as `src > dst`.
fn flow(t: &TupleView, icmp: bool) -> String {
    if icmp && t.sport == 0 && t.dport == 0 {
        return format!("{} > {}", t.src, t.dst);
    }
    if icmp {
        let id = if t.sport != 0 { t.sport } else { t.dport };
        return format!("{} > {} id {id}", t.src, t.dst);
    }
    format!(
        "{} > {}",
        endpoint(t.src, t.sport),
        endpoint(t.dst, t.dport)
    )
}

fn print_event(ctx: &Ctx, v: &EventView) -> Result<()> {
    match ctx.format {
        Format::Json => stdout::line(&serde_json::to_string(&view::Envelope {
            api_version: view::API_VERSION,
            kind: "MonitorEvent",
            body: v,
        })?)?,
        Format::Text => {
            let mut s = format!("{} {:<5} {:<18} {}", v.time, v.kind, v.reason, v.program);
            s.push(' ');
            s.push_str(&v.interface);
            if let Some(c) = &v.container {
                s.push_str(&format!(" ({c})"));
            }
            if let Some(p) = &v.proto {
                s.push(' ');
                s.push_str(p);
            }
            let icmp = matches!(v.proto.as_deref(), Some("icmp" | "icmpv6"));
            if let Some(b) = &v.before {
                s.push(' ');
                s.push_str(&flow(b, icmp));
            }
            if let Some(a) = &v.after
                && Some(a) != v.before.as_ref()
            {
                s.push_str(" => ");
                s.push_str(&flow(a, icmp));
            }
            if let Some(o) = &v.out_interface {
                s.push_str(" out ");
                s.push_str(o);
                if let Some(c) = &v.out_container {
                    s.push_str(&format!(" ({c})"));
                }
            }
            s.push_str(&format!(" len {}", v.len));
            stdout::line(&s)?;
        }
    }
    Ok(())
}

fn print_lost(ctx: &Ctx, l: Lost) -> Result<()> {
    let v = LostView {
        over_rate: l.rate,
        ring_full: l.full,
    };
    match ctx.format {
        Format::Json => stdout::line(&serde_json::to_string(&view::Envelope {
            api_version: view::API_VERSION,
            kind: "MonitorLost",
            body: &v,
        })?)?,
        Format::Text => stdout::line(&format!(
            "lost {} events so far: {} over the rate (--rate), {} with the ring buffer full",
            l.rate + l.full,
            l.rate,
            l.full
        ))?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_times_are_rfc3339_utc() {
        let clock = Clock {
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_036_400),
            mono_ns: 5_000_000_000,
        };
        assert_eq!(
            clock.rfc3339(5_000_000_000 + 1_500),
            "2026-11-30T11:00:00.000001Z"
        );
        assert_eq!(clock.rfc3339(4_000_000_000), "2026-11-30T10:59:59.000000Z");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn reasons_are_known_by_their_stats_names() {
        assert_eq!(
            reason_named("drop_spoof").unwrap(),
            Reason::DropSpoof as u32
        );
        assert_eq!(reason_name(Reason::SnatNew as u32), "snat_new");
        let e = reason_named("spoof").unwrap_err().to_string();
        assert!(e.contains("drop_spoof"), "{e}");
    }
}
