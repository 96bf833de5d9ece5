//! Per-program cost with BPF_PROG_TEST_RUN: each run gets a fresh copy of its packet (the
//! kernel's `repeat` would rerun on the already rewritten buffer), and each "new connection"
//! run a new source port, so every run measures the path it is named after. The paths are
//! measured in interleaved series, each with its own floor: a VM's speed drifts by tens of
//! percent between series, which one series per path would book to the path.

use std::{net::Ipv4Addr, sync::Arc};

use anyhow::{Context as _, Result};
use aya::{
    TestRun as _, TestRunOptions,
    programs::{SchedClassifier, Xdp},
};
use bpfnat_lab::Lab;
use bpfnat_tests::packet::{self, PROTO_TCP, PROTO_UDP};

use crate::topo::{C1, C1_6, EXT, EXT6, NODE, NODE6, RR_PORT};

pub struct PathCost {
    pub name: &'static str,
    /// The median of the series' medians, harness included.
    pub ns_median: f64,
    /// The median of the series' 90th percentiles.
    pub ns_p90: f64,
    /// The least, over the series, of the path's median less its floor's median in the same
    /// series (TC or XDP); `None` when the floor was not measured (`--only`).
    pub ns_over_floor: Option<f64>,
}

/// A Linux client's SYN options: MSS 1460, SACK permitted, timestamps, NOP, window scale 7.
const LINUX_SYN_OPTS: [u8; 20] = [
    2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
];

/// Builds packet `i` of a path's runs.
type Make = Arc<dyn Fn(u32) -> Vec<u8> + Send + Sync>;

/// A path to measure: its name, program, interface and packets.
struct Path {
    name: &'static str,
    prog: &'static str,
    ifindex: u32,
    make: Make,
}

const FLOOR_TC: &str = "floor (non-IP frame, passed at once), TC";
const FLOOR_XDP: &str = "floor (non-IP frame, passed at once), XDP";

fn median_p90(mut v: Vec<u64>) -> (f64, f64) {
    v.sort_unstable();
    let at = |q: f64| {
        v.get(((v.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0) as f64
    };
    (at(0.5), at(0.9))
}

enum Loaded {
    Tc(SchedClassifier),
    Xdp(Xdp),
}

/// The XDP program's pin name; `cost` runs it without a context.
const XDP: &str = "xdp_uplink";

/// `runs` runs of program `prog` (TC as if on `ifindex`, or `XDP`), packet `i` from
/// `make(first + i)`.
fn cost(
    lab: &Lab,
    prog: &str,
    ifindex: u32,
    (first, runs): (u32, u32),
    make: impl Fn(u32) -> Vec<u8> + Send + 'static,
) -> Result<(f64, f64)> {
    let pin = bpfnat_tests::pins(lab).prog(prog);
    let xdp = prog == XDP;
    let samples = nat_plumbing::netns::run_in(&lab.node, move || {
        // On one CPU throughout: a run migrated between CPUs (different frequency, cold
        // caches) measured up to twice as long, series by series.
        pin_to(crate::load::BENCH_CPU)?;
        let ctx = tc_ctx(ifindex);
        let mut out = vec![0u8; 2048];
        let mut v = Vec::with_capacity(runs as usize);
        let prog = Loaded::from_pin(&pin, xdp)?;
        for i in first..first + runs {
            v.push(prog.run(&make(i), &ctx, &mut out)?);
        }
        Ok(v)
    })
    .context("BPF_PROG_TEST_RUN")?;
    Ok(median_p90(samples))
}

impl Loaded {
    fn from_pin(pin: &std::path::Path, xdp: bool) -> Result<Self> {
        Ok(if xdp {
            Self::Xdp(Xdp::from_pin(
                pin,
                aya_obj::programs::XdpAttachType::Interface,
            )?)
        } else {
            Self::Tc(SchedClassifier::from_pin(pin)?)
        })
    }

    /// One run on `data` (TC with the context `ctx`); its duration in ns.
    fn run(&self, data: &[u8], ctx: &[u8], out: &mut [u8]) -> Result<u64> {
        let mut opts = TestRunOptions {
            data_in: Some(data),
            data_out: Some(out),
            ..TestRunOptions::default()
        };
        let r = match self {
            Self::Tc(p) => {
                opts.ctx_in = Some(ctx);
                p.test_run(opts)?
            }
            Self::Xdp(p) => p.test_run(opts)?,
        };
        Ok(r.duration.as_nanos() as u64)
    }
}

/// The TC context for a run as if on `ifindex`.
fn tc_ctx(ifindex: u32) -> [u8; 192] {
    let mut ctx = [0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// Enter the network namespace open as `ns` (this thread only).
fn enter(ns: &std::fs::File) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: a valid namespace file descriptor; only this thread's namespace changes.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("enter a lab's network namespace");
    }
    Ok(())
}

/// What one side of a paired measurement runs.
struct Side {
    ns: std::fs::File,
    prog: std::path::PathBuf,
    ifindex: u32,
    make: Make,
}

/// `runs` paired runs of the same path on two labs, alternating run by run (which side goes
/// first alternates too), on one CPU: both sides share every phase of the machine. Each
/// side's median, and the median of the run-by-run differences (b − a).
fn cost_pair(a: Side, b: Side, xdp: bool, (first, runs): (u32, u32)) -> Result<(f64, f64, f64)> {
    std::thread::spawn(move || -> Result<(f64, f64, f64)> {
        pin_to(crate::load::BENCH_CPU)?;
        let mut out = vec![0u8; 2048];
        let (ctx_a, ctx_b) = (tc_ctx(a.ifindex), tc_ctx(b.ifindex));
        enter(&a.ns)?;
        let pa = Loaded::from_pin(&a.prog, xdp)?;
        enter(&b.ns)?;
        let pb = Loaded::from_pin(&b.prog, xdp)?;
        let (mut va, mut vb, mut diff) = (Vec::new(), Vec::new(), Vec::new());
        for i in first..first + runs {
            let (da, db) = (a.make.as_ref()(i), b.make.as_ref()(i));
            let run_a = |out: &mut [u8]| enter(&a.ns).and_then(|()| pa.run(&da, &ctx_a, out));
            let run_b = |out: &mut [u8]| enter(&b.ns).and_then(|()| pb.run(&db, &ctx_b, out));
            let (ta, tb) = if i % 2 == 0 {
                let ta = run_a(&mut out)?;
                (ta, run_b(&mut out)?)
            } else {
                let tb = run_b(&mut out)?;
                (run_a(&mut out)?, tb)
            };
            va.push(ta as f64);
            vb.push(tb as f64);
            diff.push(tb as f64 - ta as f64);
        }
        Ok((middle(&va), middle(&vb), middle(&diff)))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("paired measurement thread panicked"))?
    .context("BPF_PROG_TEST_RUN, paired")
}

/// Pin the calling thread to `cpu`.
fn pin_to(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed `cpu_set_t` is an empty set; CPU_SET stays within it for cpu < 1024.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = core::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("pin to CPU {cpu}"));
    }
    Ok(())
}

/// SYNs to the published RR port from a new client tuple each run, from clients
/// `198.51.100.<base>` and up (different bases keep two series apart), with the options a
/// Linux client sends (MSS, SACK permitted, timestamps, NOP, window scale).
fn new_clients(base: u8) -> impl Fn(u32) -> Vec<u8> + Send + Sync + Copy + 'static {
    const ANY: [u8; 6] = [0xee; 6];
    const EXT_MAC: [u8; 6] = [2, 0, 198, 51, 100, 1];
    move |i: u32| {
        let sport = 1024 + (i % 60000) as u16;
        let src = Ipv4Addr::new(198, 51, 100, base + (i / 60000) as u8);
        packet::frame(
            EXT_MAC,
            ANY,
            src,
            NODE,
            PROTO_TCP,
            &packet::tcp_syn_opts(src, NODE, sport, RR_PORT, &LINUX_SYN_OPTS),
        )
    }
}

/// A bpfnat lab to measure: c1 (which publishes RR_PORT) by its host-side interface and
/// MAC, and the uplink.
pub struct Target<'a> {
    pub lab: &'a Lab,
    pub c1_ifindex: u32,
    pub c1_mac: [u8; 6],
    pub uplink_ifindex: u32,
}

/// The paths, measured on `t` in `series` interleaved series of `runs / series` runs each.
pub fn paths(
    t: &Target<'_>,
    (runs, series): (u32, u32),
    only: Option<&str>,
) -> Result<Vec<PathCost>> {
    let list = prepare(t, only)?;
    measure(t.lab, &list, runs, series)
}

/// A path's cost on two builds, measured run by run in alternation.
pub struct PairCost {
    pub name: &'static str,
    pub a_ns: f64,
    pub b_ns: f64,
    /// The median of the run-by-run differences, b − a.
    pub diff_ns: f64,
}

/// The paths on two labs, run by run in alternation (`cost_pair`), in `series` rounds.
pub fn paired(
    a: &Target<'_>,
    b: &Target<'_>,
    (runs, series): (u32, u32),
    only: Option<&str>,
) -> Result<Vec<PairCost>> {
    let (la, lb) = (prepare(a, only)?, prepare(b, only)?);
    let series = series.max(1);
    let per = (runs / series).max(1);
    let mut acc: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = vec![Default::default(); la.len()];
    for round in 0..series {
        for (i, (pa, pb)) in la.iter().zip(&lb).enumerate() {
            let side = |t: &Target<'_>, p: &Path| -> Result<Side> {
                Ok(Side {
                    ns: std::fs::File::open(&t.lab.node).context("open a lab's namespace")?,
                    prog: bpfnat_tests::pins(t.lab).prog(p.prog),
                    ifindex: p.ifindex,
                    make: Arc::clone(&p.make),
                })
            };
            let (ma, mb, d) = cost_pair(
                side(a, pa)?,
                side(b, pb)?,
                pa.prog == XDP,
                (round * per, per),
            )?;
            acc[i].0.push(ma);
            acc[i].1.push(mb);
            acc[i].2.push(d);
        }
    }
    Ok(la
        .iter()
        .zip(acc)
        .map(|(p, (va, vb, vd))| PairCost {
            name: p.name,
            a_ns: middle(&va),
            b_ns: middle(&vb),
            diff_ns: middle(&vd),
        })
        .collect())
}

/// Set `t` up for the paths (an assured TCP connection, an assured NAT66 flow) and list
/// them, less those `only` leaves out.
fn prepare(t: &Target<'_>, only: Option<&str>) -> Result<Vec<Path>> {
    let Target {
        lab,
        c1_ifindex,
        c1_mac,
        uplink_ifindex,
    } = *t;
    const ANY: [u8; 6] = [0xee; 6];
    const EXT_MAC: [u8; 6] = [2, 0, 198, 51, 100, 1];
    let far = Ipv4Addr::new(203, 0, 113, 80);
    let mut list: Vec<Path> = Vec::new();
    // Lists one named path, unless `only` leaves it out (profiling one path at a time).
    let mut add =
        |name: &'static str, prog: &'static str, ifindex: u32, make: Make| -> Result<()> {
            if only.is_none_or(|o| name.contains(o)) {
                list.push(Path {
                    name,
                    prog,
                    ifindex,
                    make,
                });
            }
            Ok(())
        };

    // Established: one connection, assured by a full handshake as real traffic's is (it then
    // lives in `conntrack`, found by the first lookup), hit by every run.
    let seg = move |from_c1: bool, seq: u32, ack: u32, flags: u8| {
        let (src, dst, sport, dport, mac) = if from_c1 {
            (C1, far, 33000, 443, c1_mac)
        } else {
            (far, NODE, 443, 33000, EXT_MAC)
        };
        packet::frame(
            mac,
            ANY,
            src,
            dst,
            PROTO_TCP,
            &packet::tcp_seg(src, dst, sport, dport, seq, ack, flags, true),
        )
    };
    let (syn, ack) = (0x02, 0x10);
    let _ = cost(lab, "tc_container", c1_ifindex, (0, 1), move |_| {
        seg(true, 1000, 0, syn)
    })?;
    let _ = cost(lab, "tc_uplink", uplink_ifindex, (0, 1), move |_| {
        seg(false, 5000, 1001, syn | ack)
    })?;
    let est = move |_| seg(true, 1001, 5001, ack);
    let _ = cost(lab, "tc_container", c1_ifindex, (0, 1), est)?;
    add(
        "established (container → outside, conntrack hit)",
        "tc_container",
        c1_ifindex,
        Arc::new(est),
    )?;

    // The replies of that connection, inbound: TC, then the XDP fast path.
    let reply = move |_| seg(false, 5001, 1001, ack);
    add(
        "established (outside → container, conntrack hit), TC",
        "tc_uplink",
        uplink_ifindex,
        Arc::new(reply),
    )?;
    add(
        "established (outside → container, conntrack hit), XDP",
        XDP,
        0,
        Arc::new(reply),
    )?;

    let snat = move |i: u32| {
        let sport = 1024 + (i % 60000) as u16;
        let dst = Ipv4Addr::new(203, 0, 113, 1 + (i / 60000) as u8);
        packet::frame(
            c1_mac,
            ANY,
            C1,
            dst,
            PROTO_UDP,
            &packet::udp(C1, dst, sport, 53, true),
        )
    };
    add(
        "new MASQUERADE connection",
        "tc_container",
        c1_ifindex,
        Arc::new(snat),
    )?;

    add(
        "new connection to a published port, TC",
        "tc_uplink",
        uplink_ifindex,
        Arc::new(new_clients(100)),
    )?;
    // Other clients than the TC run's, so each run is a new connection again. XDP hands new
    // connections to TC (only TC knows whether their checksum was verified): this is its cost
    // of doing so, before TC's.
    add(
        "new connection to a published port, XDP (handed to TC)",
        XDP,
        0,
        Arc::new(new_clients(150)),
    )?;

    // Over IPv6 (NAT66), UDP: one flow, assured by an answer and a second datagram, then its
    // established cost both ways; and a new NAT66 connection per run.
    let udp6 = |(src, dst), mac: [u8; 6], (sport, dport)| {
        packet::udp6(
            (src, dst),
            (mac, ANY),
            (PROTO_UDP, &[]),
            (sport, dport),
            b"x",
            None,
        )
    };
    let out6 = move |_| udp6((C1_6, EXT6), c1_mac, (34000, 53));
    let in6 = move |_| udp6((EXT6, NODE6), EXT_MAC, (53, 34000));
    let _ = cost(lab, "tc_container", c1_ifindex, (0, 1), out6)?;
    let _ = cost(lab, "tc_uplink", uplink_ifindex, (0, 1), in6)?;
    let _ = cost(lab, "tc_container", c1_ifindex, (0, 1), out6)?;
    add(
        "IPv6: established UDP (container → outside, NAT66)",
        "tc_container",
        c1_ifindex,
        Arc::new(out6),
    )?;
    add(
        "IPv6: established UDP (outside → container), TC",
        "tc_uplink",
        uplink_ifindex,
        Arc::new(in6),
    )?;
    add(
        "IPv6: established UDP (outside → container), XDP",
        XDP,
        0,
        Arc::new(in6),
    )?;
    add(
        "IPv6: new NAT66 connection (UDP)",
        "tc_container",
        c1_ifindex,
        Arc::new(move |i: u32| udp6((C1_6, EXT6), c1_mac, (1024 + (i % 60000) as u16, 54))),
    )?;

    let floor = move |_| {
        let mut f = packet::frame(
            EXT_MAC,
            ANY,
            EXT,
            NODE,
            PROTO_TCP,
            &packet::tcp(EXT, NODE, 40000, 22, 0x10),
        );
        // An EtherType nobody uses: the program returns at its first check.
        f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        f
    };
    add(FLOOR_TC, "tc_uplink", uplink_ifindex, Arc::new(floor))?;
    add(FLOOR_XDP, XDP, 0, Arc::new(floor))?;

    let miss = move |_| {
        packet::frame(
            EXT_MAC,
            ANY,
            EXT,
            NODE,
            PROTO_TCP,
            &packet::tcp(EXT, NODE, 40000, 22, 0x10),
        )
    };
    add(
        "miss (the node's own traffic, passed to the stack)",
        "tc_uplink",
        uplink_ifindex,
        Arc::new(miss),
    )?;
    Ok(list)
}

/// Every path of `list` in `series` rounds, one series of `runs / series` runs per path and
/// round; new-connection paths get new packets in every round (`first`).
fn measure(lab: &Lab, list: &[Path], runs: u32, series: u32) -> Result<Vec<PathCost>> {
    let series = series.max(1);
    let per = (runs / series).max(1);
    // medians[path][round], p90s[path][round]
    let mut medians = vec![Vec::new(); list.len()];
    let mut p90s = vec![Vec::new(); list.len()];
    for round in 0..series {
        for (i, p) in list.iter().enumerate() {
            let make = Arc::clone(&p.make);
            let (m, p90) = cost(lab, p.prog, p.ifindex, (round * per, per), move |i| make(i))?;
            medians[i].push(m);
            p90s[i].push(p90);
        }
    }
    let floor_of = |name: &str| list.iter().position(|p| p.name == name);
    let (floor_tc, floor_xdp) = (floor_of(FLOOR_TC), floor_of(FLOOR_XDP));
    Ok(list
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let floor = if p.prog == XDP { floor_xdp } else { floor_tc };
            let ns_over_floor = floor.map(|f| {
                medians[i]
                    .iter()
                    .zip(&medians[f])
                    .map(|(m, fl)| m - fl)
                    .fold(f64::INFINITY, f64::min)
            });
            PathCost {
                name: p.name,
                ns_median: middle(&medians[i]),
                ns_p90: middle(&p90s[i]),
                ns_over_floor,
            }
        })
        .collect())
}

/// The median of a few values (the upper middle one of an even count).
fn middle(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
