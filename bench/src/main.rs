//! `bpfnat-bench`: the side-by-side benchmark behind `cargo xtask bench`. It builds five
//! datapaths in their own namespaces — (0) direct, (a) plain routing, (b) Docker-style
//! iptables, (c) nftables, (d) bpfnat — drives the same traffic through each, interleaved,
//! and writes `report.md` with SVG charts. Bounded traffic, own namespaces only, everything
//! torn down at the end.

mod cluster;
mod load;
mod profile;
mod report;
mod rundir;
mod scrape;
mod testrun;
mod topo;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Parser, Subcommand};

use crate::{
    load::{Metric, Placement},
    report::{ControlPlane, Samples, Scaling, XdpSection},
    topo::{Dp, Flow, Opts, RR_PORT, Topo},
};

#[derive(Parser)]
#[command(about = "bpfnat's side-by-side benchmark (run as root; `cargo xtask bench` wraps it)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the benchmark and write the report.
    Run {
        /// Short measurements, one repetition: under 4 minutes.
        #[arg(long)]
        quick: bool,
        /// Where the report goes.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// The bpfnat binary (default: next to this one).
        #[arg(long)]
        bin: Option<PathBuf>,
    },
    /// Only the per-path BPF_PROG_TEST_RUN costs (for profiling the programs).
    Paths {
        #[arg(long)]
        bin: Option<PathBuf>,
        #[arg(long, default_value_t = 20_000)]
        runs: u32,
        /// Interleaved series the runs are split into (each path's cost over the floor is
        /// the least over them).
        #[arg(long, default_value_t = 5)]
        series: u32,
        /// Another bpfnat build to compare with, run by run in alternation on a lab of its
        /// own (then with the labs swapped): prints each build's median and the median of
        /// the run-by-run differences (against − bin).
        #[arg(long)]
        against: Option<PathBuf>,
        /// Only the paths whose name contains this text (for a profile of one path).
        #[arg(long)]
        only: Option<String>,
    },
    /// Where one path's time goes: `perf` samples of the benchmark CPU while `paths` runs it,
    /// by line of the eBPF source (through the JIT's line info) and by kernel function.
    Profile {
        #[arg(long)]
        bin: Option<PathBuf>,
        #[arg(long, default_value_t = 2_000_000)]
        runs: u32,
        /// The paths whose name contains this text (`paths` lists them all).
        #[arg(long)]
        only: String,
    },
    /// Only pod to pod across two cluster nodes, against plain routing.
    Cluster {
        #[arg(long)]
        bin: Option<PathBuf>,
        #[arg(long, default_value_t = 2)]
        secs: u32,
    },
    /// Only the control-plane timings (publishing, adding containers by CLI and by CNI).
    Control {
        #[arg(long)]
        bin: Option<PathBuf>,
        /// 200 containers and 10,000 ports instead of 1,000 and 50,000.
        #[arg(long)]
        quick: bool,
    },
    /// Only the agent's /metrics scrape against a full conntrack table.
    Scrape {
        #[arg(long)]
        bin: Option<PathBuf>,
        #[arg(long, default_value_t = 1_000_000)]
        entries: u32,
    },
    /// (internal) UDP flood, 64-byte datagrams in sendmmsg batches; prints the count sent.
    #[command(hide = true)]
    UdpFlood {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        secs: u64,
    },
    /// (internal) UDP sink; prints the count received.
    #[command(hide = true)]
    UdpSink {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        secs: u64,
    },
    /// (internal) request/response server.
    #[command(hide = true)]
    RrServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// (internal) request/response client; prints operations per second.
    #[command(hide = true)]
    RrClient {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        secs: u64,
        #[arg(long)]
        mode: String,
    },
}

fn main() -> Result<()> {
    let cmd = Cli::parse().cmd;
    if matches!(
        cmd,
        Cmd::Run { .. }
            | Cmd::Paths { .. }
            | Cmd::Cluster { .. }
            | Cmd::Control { .. }
            | Cmd::Scrape { .. }
            | Cmd::Profile { .. }
    ) {
        rundir::volatile()?;
    }
    match cmd {
        Cmd::RrServer { listen } => load::rr_server(listen),
        Cmd::UdpFlood { addr, secs } => {
            println!("{}", load::udp_flood(addr, secs)?);
            Ok(())
        }
        Cmd::UdpSink { listen, secs } => {
            println!("{}", load::udp_sink(listen, secs)?);
            Ok(())
        }
        Cmd::RrClient { addr, secs, mode } => {
            let rate = load::rr_client(addr, secs, mode == "crr")?;
            println!("{rate:.1}");
            Ok(())
        }
        Cmd::Run { quick, out, bin } => {
            let me = std::env::current_exe().context("find this binary")?;
            let bin = bpfnat_bin(&me, bin)?;
            run(&me, &bin, quick, &out)
        }
        Cmd::Cluster { bin, secs } => {
            let me = std::env::current_exe().context("find this binary")?;
            let c = cluster::measure(&me, &bpfnat_bin(&me, bin)?, secs, 1)?;
            for (mi, m) in Metric::ALL.iter().enumerate() {
                let v = |si: usize| {
                    c.samples
                        .get(&(si, 0, mi))
                        .map_or(0.0, |v| report::median(v))
                };
                println!(
                    "{:<24} routing {:>12.2}  bpfnat {:>12.2} ×{:.2}",
                    m.label(),
                    v(0),
                    v(1),
                    v(1) / v(0)
                );
            }
            Ok(())
        }
        Cmd::Control { bin, quick } => {
            let me = std::env::current_exe().context("find this binary")?;
            control_plane(&bpfnat_bin(&me, bin)?, quick)?;
            Ok(())
        }
        Cmd::Scrape { bin, entries } => {
            let me = std::env::current_exe().context("find this binary")?;
            let s = scrape::measure(&bpfnat_bin(&me, bin)?, entries)?;
            println!(
                "{} entries: scrape {:.1} ms during the first gc walk, {:.1} ms after; the walk took {:.2} s",
                s.entries, s.during_gc_ms, s.after_gc_ms, s.gc_s
            );
            Ok(())
        }
        Cmd::Profile { bin, runs, only } => {
            let me = std::env::current_exe().context("find this binary")?;
            let topo = Topo::build(Dp::Bpfnat, &bpfnat_bin(&me, bin)?)?;
            let lab = topo
                .lab
                .as_ref()
                .ok_or_else(|| anyhow!("bpfnat lab missing"))?;
            profile::profile(&bpfnat_tests::pins(lab), load::BENCH_CPU, || {
                let paths = paths_of(&topo, (runs, 1), Some(&only))?;
                if paths.is_empty() {
                    bail!("no path's name contains {only:?} (`bpfnat-bench paths` lists them)");
                }
                for p in paths {
                    println!("{:>6.0} ns  p90 {:>6.0}  {}", p.ns_median, p.ns_p90, p.name);
                }
                Ok(())
            })
        }
        Cmd::Paths {
            bin,
            runs,
            series,
            against: Some(against),
            only,
        } => {
            let me = std::env::current_exe().context("find this binary")?;
            let bin = bpfnat_bin(&me, bin)?;
            // Each build on each lab in turn: the second lab measured up to 5 % faster than
            // the first with the same build on both (memory placement), a bias that the
            // swap cancels.
            let mut orders = Vec::new();
            for (first, second) in [(&bin, &against), (&against, &bin)] {
                let l1 = Topo::build(Dp::Bpfnat, first)?;
                let l2 = Topo::build_with(
                    Dp::Bpfnat,
                    second,
                    Opts {
                        tag: "b",
                        ..Opts::DEFAULT
                    },
                )?;
                let (t1, t2) = (target_of(&l1)?, target_of(&l2)?);
                orders.push(testrun::paired(&t1, &t2, (runs, series), only.as_deref())?);
            }
            println!("   bin ns  against ns   difference  path");
            if let [ab, ba] = orders.as_slice() {
                for (x, y) in ab.iter().zip(ba) {
                    // x: bin on lab 1, against on lab 2; y: the other way round.
                    println!(
                        "{:>9.0} {:>11.0} {:>+12.0}  {}",
                        (x.a_ns + y.b_ns) / 2.0,
                        (x.b_ns + y.a_ns) / 2.0,
                        (x.diff_ns - y.diff_ns) / 2.0,
                        x.name
                    );
                }
            }
            Ok(())
        }
        Cmd::Paths {
            bin,
            runs,
            series,
            against: None,
            only,
        } => {
            let me = std::env::current_exe().context("find this binary")?;
            let topo = Topo::build(Dp::Bpfnat, &bpfnat_bin(&me, bin)?)?;
            for p in paths_of(&topo, (runs, series), only.as_deref())? {
                let over = p
                    .ns_over_floor
                    .map_or_else(|| "-".to_owned(), |o| format!("{o:.0}"));
                println!(
                    "{:>6.0} ns  p90 {:>6.0}  over floor {over:>5}  {}",
                    p.ns_median, p.ns_p90, p.name
                );
            }
            if let Some(lab) = &topo.lab {
                let stats = lab.ok(&["stats"])?;
                for l in stats
                    .lines()
                    .filter(|l| l.split_whitespace().nth(1).is_some_and(|n| n != "0"))
                {
                    println!("  {l}");
                }
            }
            Ok(())
        }
    }
}

fn bpfnat_bin(me: &Path, bin: Option<PathBuf>) -> Result<PathBuf> {
    match bin {
        Some(b) => Ok(b),
        None => me
            .parent()
            .map(|d| d.join("bpfnat"))
            .ok_or_else(|| anyhow!("no directory for {}", me.display())),
    }
}

/// The per-path costs on the bpfnat datapath of `t`.
fn paths_of(
    t: &Topo,
    runs_series: (u32, u32),
    only: Option<&str>,
) -> Result<Vec<testrun::PathCost>> {
    testrun::paths(&target_of(t)?, runs_series, only)
}

/// The bpfnat lab of `t`, ready for BPF_PROG_TEST_RUN.
fn target_of(t: &Topo) -> Result<testrun::Target<'_>> {
    let d = t
        .lab
        .as_ref()
        .ok_or_else(|| anyhow!("bpfnat lab missing"))?;
    // The node must know its next hops' MACs (both families), as it would after any
    // traffic: otherwise every run takes the "neighbour unresolved" path.
    let mut ping = std::process::Command::new("ping");
    ping.args(["-c", "1", "-W", "1", &topo::EXT.to_string()])
        .stdout(std::process::Stdio::null());
    nat_plumbing::netns::command_in(&mut ping, &d.node)?;
    let _ = ping.status();
    let mut ping6 = std::process::Command::new("ping");
    ping6
        .args(["-6", "-c", "1", "-W", "1", &topo::EXT6.to_string()])
        .stdout(std::process::Stdio::null());
    nat_plumbing::netns::command_in(&mut ping6, &d.node)?;
    let _ = ping6.status();
    let list: serde_json::Value =
        serde_json::from_str(&d.ok(&["-o", "json", "container", "list"])?)?;
    let c1 = &list["items"][0];
    // As the JSON schema prints it: "02:42:0a:58:00:02".
    let mac: Vec<u8> = c1["mac"]
        .as_str()
        .unwrap_or_default()
        .split(':')
        .filter_map(|b| u8::from_str_radix(b, 16).ok())
        .collect();
    let status: serde_json::Value = serde_json::from_str(&d.ok(&["-o", "json", "status"])?)?;
    Ok(testrun::Target {
        lab: d,
        c1_ifindex: c1["host_ifindex"].as_u64().unwrap_or(0) as u32,
        c1_mac: mac
            .try_into()
            .map_err(|_| anyhow!("bad MAC in container list"))?,
        uplink_ifindex: status["node"]["uplink_ifindex"].as_u64().unwrap_or(0) as u32,
    })
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024 / 1024);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} × {cpu}, {mem} GiB, Linux {}", kernel.trim())
}

fn run(me: &Path, bin: &Path, quick: bool, out: &Path) -> Result<()> {
    if !bin.exists() {
        bail!(
            "{} not found: build it first (cargo xtask bench does)",
            bin.display()
        );
    }
    // What the baselines and the traffic need; `cargo xtask setup` installs them for `cargo
    // xtask bench`, and a missing one would otherwise fail deep inside a topology build.
    let missing: Vec<&str> = ["iperf3", "iptables-restore", "nft"]
        .into_iter()
        .filter(|tool| {
            !std::env::var_os("PATH").is_some_and(|path| {
                std::env::split_paths(&path).any(|dir| dir.join(tool).is_file())
            })
        })
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} not installed: run the benchmark through `cargo xtask bench`, which installs \
             them, or install the Debian packages iperf3, iptables and nftables",
            missing.join(", ")
        );
    }
    let started = Instant::now();
    let (secs, reps) = if quick { (1, 1) } else { (3, 3) };
    println!("bench: waiting for an idle machine");
    load::wait_idle(0.7, Duration::from_secs(if quick { 10 } else { 60 }));

    println!("bench: building the five datapaths");
    let topos: Vec<Topo> = Dp::ALL
        .iter()
        .map(|dp| Topo::build(*dp, bin).with_context(|| format!("build {}", dp.label())))
        .collect::<Result<_>>()?;

    // Warm up: ARP, route caches, first connections.
    for t in &topos {
        for f in Flow::ALL {
            load::measure(me, &t.endpoints(f), Metric::Rr, 1)
                .with_context(|| format!("warm-up {} {}", t.dp.label(), f.label()))?;
        }
    }

    // One set of samples per placement, in `Placement::ALL`'s order.
    let mut samples = vec![Samples::new(); Placement::ALL.len()];
    for rep in 0..Metric::max_reps(reps) {
        for (pi, at) in Placement::ALL.iter().enumerate() {
            for (fi, f) in Flow::ALL.into_iter().enumerate() {
                for (mi, m) in Metric::ALL.into_iter().enumerate() {
                    if rep >= m.reps(reps) {
                        continue;
                    }
                    for i in load::round(topos.len(), rep + fi + mi) {
                        let t = &topos[i];
                        let v = load::measure_placed(me, &t.endpoints(f), m, secs, *at)
                            .with_context(|| {
                                format!("{} {} {}", t.dp.label(), f.label(), m.label())
                            })?;
                        println!(
                            "bench: rep {} {:<8} {:<32} {:<24} {:<14} {v:.2}",
                            rep + 1,
                            if pi == 0 { "shared" } else { "split" },
                            f.label(),
                            m.label(),
                            t.dp.label()
                        );
                        samples[pi]
                            .entry(report::key(t.dp, f, m))
                            .or_default()
                            .push(v);
                    }
                }
            }
        }
    }

    let scaling = scale(me, &topos, quick)?;
    let control = control_plane(bin, quick)?;

    let d = topos
        .iter()
        .find(|t| t.dp == Dp::Bpfnat)
        .ok_or_else(|| anyhow!("bpfnat datapath missing"))?;
    let paths = paths_of(d, if quick { (2_000, 2) } else { (20_000, 5) }, None)?;
    drop(topos);
    let xdp = xdp_section(me, bin, quick, secs, reps)?;
    println!("bench: pod to pod across two cluster nodes");
    let cluster = cluster::measure(me, bin, secs, reps)?;

    report::write(
        out,
        &report::Report {
            quick,
            secs,
            reps,
            samples: &samples,
            scaling: &scaling,
            control: &control,
            paths: &paths,
            xdp: &xdp,
            cluster: &cluster,
            machine: machine(),
            elapsed_s: started.elapsed().as_secs_f64(),
        },
    )?;
    println!("bench: report in {}", out.join("report.md").display());
    Ok(())
}

/// The uplink's XDP fast path against bpfnat's TC path and plain routing, all with the
/// external sender's transmit checksum offload off (what XDP on a veth needs; it also costs
/// the sender TSO, so these figures compare only with each other). Inbound traffic is what
/// XDP handles: F3 entirely, F2 its replies.
fn xdp_section(me: &Path, bin: &Path, quick: bool, secs: u32, reps: usize) -> Result<XdpSection> {
    let mut variants = vec![
        ("(a) routing", Dp::Routing, ("off", "x")),
        ("(d) bpfnat, TC", Dp::Bpfnat, ("off", "x")),
        ("(d) bpfnat, XDP native", Dp::Bpfnat, ("native", "n")),
        ("(d) bpfnat, XDP generic", Dp::Bpfnat, ("generic", "g")),
    ];
    if quick {
        // Keeps --quick under three minutes; the full run measures generic XDP too.
        variants.truncate(3);
    }
    let variants: Vec<(&'static str, Dp, Opts)> = variants
        .into_iter()
        .map(|(label, dp, (xdp, tag))| {
            (
                label,
                dp,
                Opts {
                    xdp,
                    ext_tx_off: true,
                    tag,
                },
            )
        })
        .collect();
    let flows: Vec<Flow> = if quick {
        vec![Flow::Inbound]
    } else {
        vec![Flow::Inbound, Flow::Outbound]
    };
    println!("bench: building the XDP comparison (external sender's tx checksum offload off)");
    let topos: Vec<Topo> = variants
        .iter()
        .map(|(label, dp, o)| {
            Topo::build_with(*dp, bin, *o).with_context(|| format!("build {label}"))
        })
        .collect::<Result<_>>()?;
    for (t, (label, ..)) in topos.iter().zip(&variants) {
        for f in &flows {
            load::measure(me, &t.endpoints(*f), Metric::Rr, 1)
                .with_context(|| format!("warm-up {label} {}", f.label()))?;
        }
    }
    let mut samples = Samples::new();
    for rep in 0..Metric::max_reps(reps) {
        for (fi, f) in flows.iter().enumerate() {
            for (mi, m) in Metric::ALL.iter().enumerate() {
                if rep >= m.reps(reps) {
                    continue;
                }
                for vi in load::round(topos.len(), rep + fi + mi) {
                    let (t, label) = (&topos[vi], variants[vi].0);
                    let v = load::measure(me, &t.endpoints(*f), *m, secs)
                        .with_context(|| format!("{label} {} {}", f.label(), m.label()))?;
                    println!(
                        "bench: xdp rep {} {:<28} {:<24} {:<24} {v:.2}",
                        rep + 1,
                        f.label(),
                        m.label(),
                        label
                    );
                    samples.entry((vi, fi, mi)).or_default().push(v);
                }
            }
        }
    }
    // What XDP did: its counters on the native variant.
    let counters = topos
        .get(2)
        .and_then(|t| t.lab.as_ref())
        .map(|l| l.ok(&["stats"]))
        .transpose()?
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("xdp_"))
        .map(str::to_owned)
        .collect();
    Ok(XdpSection {
        labels: variants.iter().map(|v| v.0).collect(),
        flows,
        samples,
        counters,
    })
}

/// F3 new connections/s with N published ports, for iptables, nftables and bpfnat. New
/// connections are where rule lists are walked: established packets skip the NAT table, and
/// Docker accepts them before its per-port FORWARD rules.
fn scale(me: &Path, topos: &[Topo], quick: bool) -> Result<Scaling> {
    let ports: Vec<u32> = if quick {
        vec![1, 1_000, 10_000]
    } else {
        vec![1, 100, 1_000, 10_000, 100_000]
    };
    let secs = if quick { 1 } else { 2 };
    let find = |dp| {
        topos
            .iter()
            .find(|t| t.dp == dp)
            .ok_or_else(|| anyhow!("no {dp:?}"))
    };
    let (b, c, d) = (find(Dp::Iptables)?, find(Dp::Nftables)?, find(Dp::Bpfnat)?);
    let lab = d
        .lab
        .as_ref()
        .ok_or_else(|| anyhow!("bpfnat lab missing"))?;
    let c1 = lab.name("c1");
    // The extra ports go on addresses of their own, which the node must hold (a host address
    // that is not the node's is refused, as by Docker).
    for k in 0..2 {
        let mut ip = std::process::Command::new("ip");
        ip.args([
            "addr",
            "add",
            &format!("198.51.100.{}/32", 10 + k),
            "dev",
            bpfnat_lab::UPLINK,
        ]);
        nat_plumbing::netns::command_in(&mut ip, &lab.node)?;
        let out = ip.output().context("run ip")?;
        if !out.status.success() {
            bail!(
                "ip addr add: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let mut series = vec![
        (Dp::Iptables.label(), Vec::new()),
        (Dp::Nftables.label(), Vec::new()),
        (Dp::Bpfnat.label(), Vec::new()),
    ];
    for &n in &ports {
        let extra = n - 1;
        let rules: Vec<u16> = (0..extra).map(|i| 10_000 + (i % 55_000) as u16).collect();
        b.iptables_rules(&rules)?;
        c.nft_rules(extra)?;
        // bpfnat: the extra ports on other host addresses, 55,000 per address, clear of the
        // ports the traffic uses.
        let specs: Vec<String> = (0..extra.div_ceil(55_000))
            .map(|k| {
                let count = (extra - k * 55_000).min(55_000);
                format!(
                    "198.51.100.{}:10000-{}:10000-{}",
                    10 + k,
                    9999 + count,
                    9999 + count
                )
            })
            .collect();
        for s in &specs {
            lab.ok(&["port", "add", &c1, s])?;
        }
        for (i, t) in [b, c, d].iter().enumerate() {
            let v = load::measure(me, &t.endpoints(Flow::Inbound), Metric::Crr, secs)?;
            println!(
                "bench: scaling {n:>6} ports {:<14} {v:.0} conn/s",
                t.dp.label()
            );
            series[i].1.push(v);
        }
        for s in &specs {
            lab.ok(&["port", "del", &c1, s])?;
        }
    }
    b.iptables_rules(&[])?;
    c.nft_rules(0)?;
    let _ = RR_PORT;
    Ok(Scaling { ports, series })
}

/// Wall-clock time of the control-plane operations users wait for: publishing a range of
/// ports at once, adding containers one CLI call at a time, and adding them through the CNI
/// plugin with 8 ADDs in flight, as a runtime starting pods does.
fn control_plane(bin: &Path, quick: bool) -> Result<ControlPlane> {
    let (ports, containers) = if quick {
        (10_000, 200)
    } else {
        (50_000, 1_000)
    };
    println!("bench: /run is {}", rundir::describe());
    let lab = bpfnat_lab::Lab::new("bnb-cp", bin)?;
    lab.ok(&["up", "--uplink", bpfnat_lab::UPLINK])?;
    let c = lab.name("p");
    lab.ok(&["container", "add", &c])?;
    let t = Instant::now();
    let last = 10_000 + ports - 1;
    lab.ok(&["port", "add", &c, &format!("10000-{last}:10000-{last}")])?;
    let publish_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..containers {
        lab.ok(&["container", "add", &lab.name(&format!("n{i}"))])?;
    }
    let add_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    lab.ok(&["down"])?;
    let down_s = t.elapsed().as_secs_f64();
    println!(
        "bench: publish {ports} ports {publish_s:.2} s, add {containers} containers {add_s:.2} s, down {down_s:.2} s"
    );
    drop(lab);
    let cni_s = cni_adds(bin, containers, 8)?;
    println!("bench: {containers} CNI ADDs, 8 at a time: {cni_s:.2} s");
    let cni_bridge_s = cni_bridge_adds(bin, containers, 8)?;
    println!(
        "bench: {containers} CNI ADDs of the reference bridge plugin (host-local, ipMasq), 8 at a time: {cni_bridge_s:.2} s"
    );
    let scrape = scrape::measure(bin, 1_000_000)?;
    println!(
        "bench: /metrics with 1,000,000 conntrack entries: {:.1} ms during the gc walk, {:.1} ms after; the walk {:.2} s",
        scrape.during_gc_ms, scrape.after_gc_ms, scrape.gc_s
    );
    Ok(ControlPlane {
        ports,
        publish_s,
        containers,
        add_s,
        down_s,
        cni_s,
        cni_bridge_s,
        scrape,
        run_dir: rundir::describe(),
    })
}

/// A CNI plugin as the bench runs it: its binary, its network configuration (on stdin) and
/// the `CNI_PATH` it finds its delegates (IPAM) in.
struct Plugin {
    bin: PathBuf,
    conf: String,
    path: &'static str,
}

/// The reference plugins' directory (Debian's containernetworking-plugins).
const CNI_REFERENCE_DIR: &str = "/usr/lib/cni";

/// Seconds for `n` CNI ADDs of bpfnat's plugin (`bin`), `parallel` at a time.
fn cni_adds(bin: &Path, n: u32, parallel: u32) -> Result<f64> {
    let lab = bpfnat_lab::Lab::new("bnb-cni", bin)?;
    let conf = serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "bpfnat",
        "type": "bpfnat",
        "uplink": bpfnat_lab::UPLINK,
        "bpffsDir": lab.bpffs_dir,
        "stateDir": lab.state_dir,
    })
    .to_string();
    let plugin = Plugin {
        bin: bin.to_owned(),
        conf,
        path: "/opt/cni/bin",
    };
    time_cni_adds(&lab, &plugin, n, parallel)
}

/// The same ADDs through what bpfnat replaces: the reference `bridge` plugin with
/// `host-local` addresses and `ipMasq` (its iptables chain per container), as a CNI bridge
/// network (and podman's default one) is configured. Its own lab, whose node namespace
/// holds the bridge and the rules; `bin` only builds that lab.
fn cni_bridge_adds(bin: &Path, n: u32, parallel: u32) -> Result<f64> {
    let lab = bpfnat_lab::Lab::new("bnb-br", bin)?;
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "bnb-bridge",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "ipMasq": true,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.88.0.0/16"}]],
            // Inside the lab's state directory, which goes with the lab.
            "dataDir": lab.state_dir.join("ipam"),
        },
    })
    .to_string();
    let plugin = Plugin {
        bin: Path::new(CNI_REFERENCE_DIR).join("bridge"),
        conf,
        path: CNI_REFERENCE_DIR,
    };
    time_cni_adds(&lab, &plugin, n, parallel)
}

/// Seconds for `n` ADDs of `plugin` (as a runtime runs it: environment, configuration on
/// stdin, in the node's namespace), `parallel` at a time, each for a sandbox namespace of
/// its own made beforehand.
fn time_cni_adds(lab: &bpfnat_lab::Lab, plugin: &Plugin, n: u32, parallel: u32) -> Result<f64> {
    use std::io::Write as _;
    let sandboxes: Vec<PathBuf> = (0..n)
        .map(|i| nat_plumbing::netns::create(&lab.name(&format!("s{i}"))))
        .collect::<Result<_>>()?;
    let add = |i: usize| -> Result<()> {
        let mut c = std::process::Command::new(&plugin.bin);
        c.env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", format!("bench{i}"))
            .env("CNI_NETNS", &sandboxes[i])
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", plugin.path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        nat_plumbing::netns::command_in(&mut c, &lab.node)?;
        let mut child = c
            .spawn()
            .with_context(|| format!("run the CNI plugin {}", plugin.bin.display()))?;
        child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("no stdin"))?
            .write_all(plugin.conf.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "CNI ADD {i} ({}): {}",
                plugin.bin.display(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(())
    };
    let next = std::sync::atomic::AtomicUsize::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..parallel)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= sandboxes.len() {
                            return Ok(());
                        }
                        add(i)?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().map_err(|_| anyhow!("a CNI worker panicked"))?)
    })?;
    Ok(t.elapsed().as_secs_f64())
}
