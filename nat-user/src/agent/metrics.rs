//! The agent's `/metrics` (OpenMetrics text, from `prometheus-client`) and `/healthz`, served
//! by axum: keep-alive, `HEAD` and query strings work as any HTTP client expects.
//!
//! A scrape never walks the conntrack table: the garbage collector, which walks it anyway
//! on its own task, leaves a summary behind (`CtSummary`), and the scrape reads that. What a
//! scrape does read is small and fixed: the per-reason counters (one per-CPU array), the
//! programs' run counts, the state file and `/proc/self`.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Result, bail};
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use aya::programs::SchedClassifier;
use nat_common::prog_names;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::Registry,
};

use crate::{
    cluster::follow::ClusterMetrics,
    datapath::{CtSummary, Maps, Usage},
    env::Env,
    state,
};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The last conntrack summary and when it was taken (seconds since the epoch).
type Snapshot = Arc<Mutex<Option<(CtSummary, f64)>>>;

/// What the agent's own work adds to the metrics: the conntrack garbage collector's runs.
#[derive(Clone)]
pub struct GcMetrics {
    runs: Counter,
    failures: Counter,
    deleted: Counter,
    duration: Histogram,
    snapshot: Snapshot,
}

impl GcMetrics {
    /// Record a successful pass that removed `deleted` connections and left `summary`.
    pub fn record(&self, deleted: usize, took: Duration, summary: CtSummary) {
        self.runs.inc();
        self.deleted.inc_by(deleted as u64);
        self.duration.observe(took.as_secs_f64());
        if let Ok(mut s) = self.snapshot.lock() {
            *s = Some((summary, now_secs()));
        }
    }

    pub fn failed(&self) {
        self.runs.inc();
        self.failures.inc();
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The registry the agent serves, and the handle its garbage collector reports to.
pub fn registry(ctx: &Env, cluster: Option<&ClusterMetrics>) -> (Arc<Registry>, GcMetrics) {
    let mut r = Registry::default();
    r.register(
        "bpfnat_build",
        "bpfnat's version",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    let gc = GcMetrics {
        runs: Counter::default(),
        failures: Counter::default(),
        deleted: Counter::default(),
        duration: Histogram::new(exponential_buckets(0.001, 4.0, 10)),
        snapshot: Arc::default(),
    };
    r.register(
        "bpfnat_conntrack_gc_runs",
        "Conntrack garbage collection passes",
        gc.runs.clone(),
    );
    r.register(
        "bpfnat_conntrack_gc_failures",
        "Conntrack garbage collection passes that failed",
        gc.failures.clone(),
    );
    r.register(
        "bpfnat_conntrack_gc_deleted_connections",
        "Connections removed by garbage collection (idle past their timeout)",
        gc.deleted.clone(),
    );
    r.register(
        "bpfnat_conntrack_gc_duration_seconds",
        "How long a garbage collection pass (a walk of both conntrack tables) took",
        gc.duration.clone(),
    );
    r.register_collector(Box::new(Datapath {
        env: ctx.clone(),
        snapshot: gc.snapshot.clone(),
    }));
    r.register_collector(Box::new(ProcessMetrics));
    if let Some(c) = cluster {
        r.register(
            "bpfnat_cluster_peers",
            "Other nodes of the cluster, as the datastore last listed them",
            c.peers.clone(),
        );
        r.register(
            "bpfnat_cluster_routes_installed",
            "Routes to other nodes' pod blocks this node has installed",
            c.routes.clone(),
        );
        r.register(
            "bpfnat_cluster_datastore_errors",
            "Requests to the cluster datastore that failed or timed out",
            c.datastore_errors.clone(),
        );
        r.register(
            "bpfnat_cluster_datastore_healthy",
            "1 while the cluster datastore answers, else 0",
            c.datastore_healthy.clone(),
        );
    }
    (Arc::new(r), gc)
}

#[derive(Clone)]
struct AppState {
    env: Env,
    registry: Arc<Registry>,
}

/// `/metrics` and `/healthz`.
pub fn router(env: Env, registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(AppState { env, registry })
}

async fn metrics(State(s): State<AppState>) -> Response {
    // The collectors read maps, the state file (under its lock) and /proc: off the event loop.
    let rendered = tokio::task::spawn_blocking(move || {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &s.registry).map(|()| out)
    })
    .await;
    match rendered {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response(),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed\n",
        )
            .into_response(),
    }
}

async fn healthz(State(s): State<AppState>) -> Response {
    match health(&s.env) {
        Ok(()) => "ok\n".into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}\n")).into_response(),
    }
}

fn health(ctx: &Env) -> Result<()> {
    if !ctx.pins.installed() {
        bail!("datapath not installed");
    }
    Maps::open(&ctx.pins)?.config()?;
    Ok(())
}

/// Encode one metric without labels.
fn one(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    m: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    m.encode(e.encode_descriptor(name, help, None, m.metric_type())?)
}

/// Encode one metric per label set.
fn labelled<M: EncodeMetric>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[([(&str, &str); 1], M)],
) -> Result<(), std::fmt::Error> {
    let Some((_, first)) = rows.first() else {
        return Ok(());
    };
    let mut fam = e.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, m) in rows {
        m.encode(fam.encode_family(labels)?)?;
    }
    Ok(())
}

/// The datapath as the kernel has it at scrape time, and the last conntrack summary.
#[derive(Debug)]
struct Datapath {
    env: Env,
    snapshot: Snapshot,
}

impl Collector for Datapath {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let maps = Maps::open(&self.env.pins).ok();
        one(
            &mut e,
            "bpfnat_datapath_up",
            "1 when the pinned datapath is there",
            &ConstGauge::new(i64::from(maps.is_some())),
        )?;
        let Some(maps) = maps else {
            return Ok(());
        };
        if let Ok(stats) = maps.stats() {
            let packets: Vec<_> = stats
                .iter()
                .map(|s| ([("reason", s.reason)], ConstCounter::new(s.packets)))
                .collect();
            labelled(
                &mut e,
                "bpfnat_packets",
                "Packets by datapath decision",
                &packets,
            )?;
            let bytes: Vec<_> = stats
                .iter()
                .map(|s| ([("reason", s.reason)], ConstCounter::new(s.bytes)))
                .collect();
            labelled(&mut e, "bpfnat_bytes", "Bytes by datapath decision", &bytes)?;
        }
        one(
            &mut e,
            "bpfnat_conntrack_max_entries",
            "Conntrack table size",
            &ConstGauge::new(i64::from(maps.ct_max_entries())),
        )?;
        one(
            &mut e,
            "bpfnat_conntrack_new_max_entries",
            "Size of the table of connections not assured yet",
            &ConstGauge::new(i64::from(maps.ct_new_max_entries())),
        )?;
        let state = self.env.store().and_then(|s| s.load()).ok();
        let snapshot = self.snapshot.lock().ok().and_then(|s| s.clone());
        if let Some((s, at)) = snapshot {
            let gauge = |n: usize| ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX));
            one(
                &mut e,
                "bpfnat_conntrack_summary_timestamp_seconds",
                "When the conntrack figures below were taken (by the last garbage collection pass)",
                &ConstGauge::new(at),
            )?;
            one(
                &mut e,
                "bpfnat_conntrack_entries",
                "Conntrack entries (two per connection)",
                &gauge(s.entries),
            )?;
            one(
                &mut e,
                "bpfnat_conntrack_connections",
                "Tracked connections",
                &gauge(s.connections),
            )?;
            one(
                &mut e,
                "bpfnat_conntrack_assured_connections",
                "Assured connections (out of reach of floods of new ones)",
                &gauge(s.assured),
            )?;
            one(
                &mut e,
                "bpfnat_conntrack_new_entries",
                "Entries of connections not assured yet (near the table size: new connections displace each other)",
                &gauge(s.new_entries),
            )?;
            let ports: Vec<_> = s
                .snat_ports
                .iter()
                .map(|(proto, n)| ([("proto", *proto)], gauge(*n)))
                .collect();
            labelled(
                &mut e,
                "bpfnat_snat_ports_in_use",
                "MASQUERADE source ports in use, per protocol",
                &ports,
            )?;
            let rows = by_container(&s, state.as_ref());
            let entries: Vec<_> = rows
                .iter()
                .map(|(c, u)| ([("container", c.as_str())], gauge(u.entries)))
                .collect();
            labelled(
                &mut e,
                "bpfnat_container_conntrack_entries",
                "Conntrack entries of each container's connections (the largest holders; the rest as \"(other)\")",
                &entries,
            )?;
            let ports: Vec<_> = rows
                .iter()
                .map(|(c, u)| {
                    let p = u.snat_ports;
                    ([("container", c.as_str())], gauge(p.tcp + p.udp + p.icmp))
                })
                .collect();
            labelled(
                &mut e,
                "bpfnat_container_snat_ports",
                "MASQUERADE source ports each container's connections hold, all protocols",
                &ports,
            )?;
        }
        if let Some(state) = &state {
            one(
                &mut e,
                "bpfnat_containers",
                "Containers attached",
                &ConstGauge::new(state.containers.len() as i64),
            )?;
            one(
                &mut e,
                "bpfnat_published_ports",
                "Published ports",
                &ConstGauge::new(
                    state
                        .containers
                        .values()
                        .map(|c| c.ports.len())
                        .sum::<usize>() as i64,
                ),
            )?;
        }
        let runs: Vec<_> = [prog_names::TC_CONTAINER, prog_names::TC_UPLINK]
            .into_iter()
            .filter_map(|name| {
                let p = SchedClassifier::from_pin(self.env.pins.prog(name)).ok()?;
                let info = p.info().ok()?;
                Some(([("program", name)], ConstCounter::new(info.run_count())))
            })
            .collect();
        labelled(
            &mut e,
            "bpfnat_program_runs",
            "Program runs (counted while kernel.bpf_stats_enabled=1)",
            &runs,
        )
    }
}

/// Containers with a series of their own in the per-container metrics: the largest holders
/// of the table; the others are summed up as `(other)`, so the series stay bounded however
/// many containers a node runs.
const TOP_CONTAINERS: usize = 10;

/// Per-container usage, named, the largest `TOP_CONTAINERS` and `(other)`.
fn by_container(s: &CtSummary, state: Option<&state::State>) -> Vec<(String, Usage)> {
    let name = |ifindex: u32| {
        state
            .and_then(|st| st.containers.values().find(|c| c.host_ifindex == ifindex))
            .map_or_else(|| "(gone)".to_owned(), |c| c.name.clone())
    };
    let mut rows: Vec<(String, Usage)> = s.by_owner.iter().map(|(i, u)| (name(*i), *u)).collect();
    rows.sort_by(|a, b| b.1.entries.cmp(&a.1.entries).then_with(|| a.0.cmp(&b.0)));
    if rows.len() > TOP_CONTAINERS {
        let rest = rows.split_off(TOP_CONTAINERS);
        let mut other = Usage::default();
        for (_, u) in rest {
            other.entries += u.entries;
            other.connections += u.connections;
            other.snat_ports.tcp += u.snat_ports.tcp;
            other.snat_ports.udp += u.snat_ports.udp;
            other.snat_ports.icmp += u.snat_ports.icmp;
        }
        rows.push(("(other)".to_owned(), other));
    }
    rows
}

/// The standard process metrics (`process_*`), from `/proc/self`.
#[derive(Debug)]
struct ProcessMetrics;

impl Collector for ProcessMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(me) = procfs::process::Process::myself() else {
            return Ok(());
        };
        let tps = procfs::ticks_per_second() as f64;
        if let Ok(stat) = me.stat() {
            one(
                &mut e,
                "process_cpu_seconds",
                "User and system CPU time spent in seconds",
                &ConstCounter::new((stat.utime + stat.stime) as f64 / tps),
            )?;
            one(
                &mut e,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                &ConstGauge::new((stat.rss * procfs::page_size()) as i64),
            )?;
            one(
                &mut e,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                &ConstGauge::new(stat.vsize as i64),
            )?;
            if let Ok(boot) = procfs::boot_time_secs() {
                one(
                    &mut e,
                    "process_start_time_seconds",
                    "Start time of the process since the epoch in seconds",
                    &ConstGauge::new(boot as f64 + stat.starttime as f64 / tps),
                )?;
            }
        }
        if let Ok(n) = me.fd_count() {
            one(
                &mut e,
                "process_open_fds",
                "Open file descriptors",
                &ConstGauge::new(n as i64),
            )?;
        }
        if let Ok(l) = me.limits()
            && let procfs::process::LimitValue::Value(max) = l.max_open_files.soft_limit
        {
            one(
                &mut e,
                "process_max_fds",
                "Maximum number of open file descriptors",
                &ConstGauge::new(max as i64),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_container_series_stay_bounded() {
        let mut s = CtSummary::default();
        for i in 0..(TOP_CONTAINERS as u32 + 5) {
            let u = s.by_owner.entry(100 + i).or_default();
            u.entries = 2 * (i as usize + 1);
            u.connections = i as usize + 1;
            u.snat_ports.tcp = 1;
        }
        let rows = by_container(&s, None);
        assert_eq!(rows.len(), TOP_CONTAINERS + 1);
        // Largest first; the five smallest (2, 4, 6, 8, 10 entries) summed up.
        assert_eq!(rows[0].1.entries, 2 * (TOP_CONTAINERS + 5));
        let (name, other) = rows.last().unwrap();
        assert_eq!(name, "(other)");
        assert_eq!((other.entries, other.snat_ports.tcp), (30, 5));
        let total: usize = rows.iter().map(|(_, u)| u.entries).sum();
        assert_eq!(total, s.by_owner.values().map(|u| u.entries).sum::<usize>());
    }
}
