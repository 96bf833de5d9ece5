//! `target/bench/report.md` and its SVG charts.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};

use crate::{
    load::{Metric, Placement},
    testrun::PathCost,
    topo::{Dp, Flow},
};

/// Every sample of one (datapath, flow, metric).
pub type Samples = BTreeMap<(usize, usize, usize), Vec<f64>>;

pub fn key(dp: Dp, flow: Flow, m: Metric) -> (usize, usize, usize) {
    let i = |x: usize| x;
    (
        i(Dp::ALL.iter().position(|d| *d == dp).unwrap_or(0)),
        i(Flow::ALL.iter().position(|f| *f == flow).unwrap_or(0)),
        i(Metric::ALL.iter().position(|x| *x == m).unwrap_or(0)),
    )
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// The median of the round-by-round ratios `a[i] / b[i]`. Each round measures every setup
/// back to back, within seconds, while the VM's speed drifts by tens of percent between
/// rounds: a ratio within a round cancels that drift, where the ratio of two medians mixes
/// it in (a setup whose median fell in a fast round against one in a slow round).
pub fn paired_ratio(a: &[f64], b: &[f64]) -> f64 {
    let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    median(&r)
}

fn fmt(m: Metric, v: f64) -> String {
    if v.is_nan() {
        return "–".to_owned();
    }
    match m {
        Metric::TcpGbps => format!("{v:.2}"),
        _ if v >= 10_000.0 => format!("{:.0}k", v / 1000.0),
        _ => format!("{v:.0}"),
    }
}

pub struct Scaling {
    pub ports: Vec<u32>,
    /// Per datapath label: transactions/s at each port count.
    pub series: Vec<(&'static str, Vec<f64>)>,
}

pub struct ControlPlane {
    /// Ports published by one `port add` with a range, and the seconds it took.
    pub ports: u32,
    pub publish_s: f64,
    /// Containers added one `container add` at a time, and the seconds it took.
    pub containers: u32,
    pub add_s: f64,
    /// `bpfnat down` on the node those containers (and the published ports) are on.
    pub down_s: f64,
    /// The same number of CNI ADDs, 8 at a time.
    pub cni_s: f64,
    /// Those ADDs through the reference `bridge` plugin (`host-local`, `ipMasq`) instead.
    pub cni_bridge_s: f64,
    pub scrape: crate::scrape::Scrape,
    /// What `/run` (the state directory, the namespaces' files) was: `rundir::describe`.
    pub run_dir: &'static str,
}

/// The XDP comparison: variants (by label) × flows × metrics.
pub struct XdpSection {
    pub labels: Vec<&'static str>,
    pub flows: Vec<Flow>,
    /// Keyed by (variant, index into `flows`, metric).
    pub samples: Samples,
    /// `bpfnat stats` lines of the native variant's XDP counters.
    pub counters: Vec<String>,
}

pub struct Report<'a> {
    pub quick: bool,
    pub secs: u32,
    pub reps: usize,
    /// One per `Placement::ALL`.
    pub samples: &'a [Samples],
    pub scaling: &'a Scaling,
    pub control: &'a ControlPlane,
    pub paths: &'a [PathCost],
    pub xdp: &'a XdpSection,
    pub cluster: &'a crate::cluster::ClusterSection,
    pub machine: String,
    pub elapsed_s: f64,
}

/// Every sample of (dp, f, m) measured with placement `pi`, in round order.
fn samples(r: &Report<'_>, pi: usize, dp: Dp, f: Flow, m: Metric) -> Vec<f64> {
    r.samples
        .get(pi)
        .and_then(|s| s.get(&key(dp, f, m)))
        .cloned()
        .unwrap_or_default()
}

/// Median, min and max of (dp, f, m) measured with placement `pi`.
fn stat(r: &Report<'_>, pi: usize, dp: Dp, f: Flow, m: Metric) -> (f64, f64, f64) {
    let v = samples(r, pi, dp, f, m);
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median(&v), lo, hi)
}

pub fn write(dir: &Path, r: &Report<'_>) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut md = String::new();
    let _ = writeln!(md, "# bpfnat benchmark\n");
    let tcp_reps = Metric::TcpGbps.reps(r.reps);
    let more = if tcp_reps == r.reps {
        String::new()
    } else {
        format!(" ({tcp_reps} of TCP Gbit/s, whose single stream varies most)")
    };
    let _ = writeln!(
        md,
        "{} run: {} s per measurement, {} interleaved repetition(s){more}, each round of datapaths starting at another one; medians with [min–max]; ratios to (a) plain routing and (b) Docker-style iptables are the medians of the round-by-round ratios (a round measures the datapaths back to back, so the machine's drift between rounds cancels). {:.0} s in all.\n",
        if r.quick { "Quick" } else { "Full" },
        r.secs,
        r.reps,
        r.elapsed_s
    );
    let _ = writeln!(md, "Machine: {}\n", r.machine);
    let _ = writeln!(
        md,
        "bpfnat runs its TC datapath (XDP off); every datapath sees the same traffic from local sockets with default offloads (TSO/GSO and tx checksum offload on). Each flow is measured two ways, interleaved: with the receiver on the sender's CPU (a rate is the CPU cost of one operation, receiving included) and with the receiver on the other CPU (the cost of sending and forwarding it). The charts show the first.\n"
    );
    for (pi, at) in Placement::ALL.iter().enumerate() {
        flow_tables(&mut md, r, pi, *at);
    }
    for (i, m) in Metric::ALL.iter().enumerate() {
        let _ = writeln!(md, "![{}](chart-{i}.svg)\n", m.label());
        std::fs::write(dir.join(format!("chart-{i}.svg")), bars(r, *m))?;
    }

    let _ = writeln!(
        md,
        "## Cost as published ports grow (F3, new TCP connections/s)\n"
    );
    let _ = writeln!(
        md,
        "The ports that do not match are installed in front of the one that does: iptables DNAT rules in the nat DOCKER chain and ACCEPT rules in the filter DOCKER chain (as Docker writes them), nftables map entries, bpfnat `ports` map entries. New connections are measured because that is where rule lists are walked: established packets skip the NAT table and are accepted before Docker's per-port rules.\n"
    );
    let _ = write!(md, "| datapath |");
    for n in &r.scaling.ports {
        let _ = write!(md, " {n} ports |");
    }
    let _ = write!(md, "\n| --- |");
    for _ in &r.scaling.ports {
        let _ = write!(md, " ---: |");
    }
    md.push('\n');
    for (label, v) in &r.scaling.series {
        let _ = write!(md, "| {label} |");
        for x in v {
            let _ = write!(md, " {} |", fmt(Metric::Crr, *x));
        }
        md.push('\n');
    }
    let _ = writeln!(md, "\n![scaling](scaling.svg)\n");
    std::fs::write(dir.join("scaling.svg"), lines(r.scaling))?;

    let _ = writeln!(md, "## Control plane\n");
    let cp = r.control;
    // The performance issue's targets hold for the full run's sizes only.
    let target = |full: bool, s: f64| {
        if full {
            format!("< {s}")
        } else {
            "—".to_owned()
        }
    };
    let (full_ports, full_adds) = (cp.ports == 50_000, cp.containers == 1_000);
    let _ = writeln!(
        md,
        "| operation | seconds | target |\n| --- | ---: | ---: |"
    );
    let _ = writeln!(
        md,
        "| publish {} ports (`bpfnat port add` with a range) | {:.2} | {} |",
        cp.ports,
        cp.publish_s,
        target(full_ports, 1.0)
    );
    let _ = writeln!(
        md,
        "| add {} containers (`bpfnat container add`, one by one) | {:.2} | {} |",
        cp.containers,
        cp.add_s,
        target(full_adds, 10.0)
    );
    let _ = writeln!(
        md,
        "| take that node down (`bpfnat down` with {} containers) | {:.2} | — |",
        cp.containers + 1,
        cp.down_s
    );
    let _ = writeln!(
        md,
        "| add {} containers through the CNI plugin, 8 ADDs at a time | {:.2} | {} |",
        cp.containers,
        cp.cni_s,
        target(full_adds, 10.0)
    );
    let _ = writeln!(
        md,
        "| the same ADDs through the reference `bridge` plugin (`host-local`, `ipMasq`: what bpfnat replaces) | {:.2} | — |",
        cp.cni_bridge_s
    );
    let sc = &r.control.scrape;
    let _ = writeln!(
        md,
        "| the agent's `/metrics` with {} conntrack entries, while the garbage collector walks them / after | {:.4} / {:.4} | — |",
        sc.entries,
        sc.during_gc_ms / 1e3,
        sc.after_gc_ms / 1e3
    );
    let _ = writeln!(
        md,
        "| that walk (`bpfnat_conntrack_gc_duration_seconds`; on its own task, off the event loop) | {:.2} | — |\n",
        sc.gc_s
    );
    let _ = writeln!(
        md,
        "`/run`, where the state directories and the namespaces' files are: {}.\n",
        cp.run_dir
    );
    let _ = writeln!(
        md,
        "bpfnat's CNI ADDs took {:.2}× the reference plugin's time in the same run: a ratio that \
         holds while this machine's speed moves, which the seconds do not. Both plugins get \
         sandbox namespaces made beforehand and run in the node's namespace; the reference \
         one writes an iptables chain per container for `ipMasq`, bpfnat a map entry.\n",
        cp.cni_s / cp.cni_bridge_s
    );

    xdp_tables(&mut md, r);
    cluster_table(&mut md, r);

    let _ = writeln!(md, "## Per-path cost of the programs (BPF_PROG_TEST_RUN)\n");
    let _ = writeln!(
        md,
        "One program run per sample on a fresh copy of the packet (the kernel's `repeat` would rerun on the rewritten buffer). Each sample includes the test harness's fixed cost, shown by the floor rows: a frame the programs pass at once. The paths are measured in interleaved series; the median and p90 are the middle of the series' own, \"over the floor\" the least over the series of the path's median less its floor's (TC or XDP) in the same series, which a VM's drift between series does not move: compare that column between builds.\n"
    );
    let _ = writeln!(
        md,
        "| path | ns/packet (median) | p90 | over the floor |\n| --- | ---: | ---: | ---: |"
    );
    for p in r.paths {
        let over = p
            .ns_over_floor
            .map_or_else(|| "—".to_owned(), |o| format!("{o:.0}"));
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {over} |",
            p.name, p.ns_median, p.ns_p90
        );
    }
    std::fs::write(dir.join("report.md"), md)?;
    Ok(())
}

/// One table per flow for the measurements with placement `pi` (`at`).
fn flow_tables(md: &mut String, r: &Report<'_>, pi: usize, at: Placement) {
    let _ = writeln!(
        md,
        "## Client on CPU {}, {}\n",
        crate::load::BENCH_CPU,
        at.label()
    );
    for f in Flow::ALL {
        let _ = writeln!(md, "### {}\n", f.label());
        let _ = write!(md, "| datapath |");
        for m in Metric::ALL {
            let _ = write!(md, " {} | ×(a) | ×(b) |", m.label());
        }
        let _ = write!(md, "\n| --- |");
        for _ in Metric::ALL {
            let _ = write!(md, " ---: | ---: | ---: |");
        }
        md.push('\n');
        for dp in Dp::ALL {
            let _ = write!(md, "| {} |", dp.label());
            for m in Metric::ALL {
                let (med, lo, hi) = stat(r, pi, dp, f, m);
                let v = samples(r, pi, dp, f, m);
                let a = paired_ratio(&v, &samples(r, pi, Dp::Routing, f, m));
                let b = paired_ratio(&v, &samples(r, pi, Dp::Iptables, f, m));
                let spread = if r.reps > 1 {
                    format!(" [{}–{}]", fmt(m, lo), fmt(m, hi))
                } else {
                    String::new()
                };
                let _ = write!(md, " {}{spread} | {a:.2} | {b:.2} |", fmt(m, med));
            }
            md.push('\n');
        }
        md.push('\n');
    }
}

fn cluster_table(md: &mut String, r: &Report<'_>) {
    let _ = writeln!(md, "## Pod to pod across two nodes\n");
    let _ = writeln!(
        md,
        "Two nodes on one segment, a pod behind each. (a): a veth per pod and a static route per node to the other's block, the kernel forwarding, nothing else. (d): two `bpfnat agent`s on a real etcd, which lease the blocks and install the routes; pod traffic is routed untranslated and untracked by the programs (`cluster_route` out, `cluster_deliver` in), with the uplink's XDP off (TC only, what `auto` picks on a veth uplink: a native XDP delivery cannot complete the partial checksums a local sender hands to a veth). Ratio to (a), round by round (the median of the rounds' ratios).\n"
    );
    let _ = write!(md, "| setup |");
    for m in Metric::ALL {
        let _ = write!(md, " {} | ×routing |", m.label());
    }
    let _ = write!(md, "\n| --- |");
    for _ in Metric::ALL {
        let _ = write!(md, " ---: | ---: |");
    }
    md.push('\n');
    let of = |si: usize, mi: usize| {
        r.cluster
            .samples
            .get(&(si, 0, mi))
            .cloned()
            .unwrap_or_default()
    };
    let med = |si: usize, mi: usize| median(&of(si, mi));
    for (si, label) in crate::cluster::LABELS.iter().enumerate() {
        let _ = write!(md, "| {label} |");
        for (mi, m) in Metric::ALL.iter().enumerate() {
            let _ = write!(
                md,
                " {} | {:.2} |",
                fmt(*m, med(si, mi)),
                paired_ratio(&of(si, mi), &of(0, mi))
            );
        }
        md.push('\n');
    }
    md.push('\n');
}

fn xdp_tables(md: &mut String, r: &Report<'_>) {
    let x = r.xdp;
    let _ = writeln!(md, "## XDP on the uplink against TC (veth uplink)\n");
    let _ = writeln!(
        md,
        "Every figure here has the external host's transmit checksum offload off (and so no TSO): XDP has no skb and cannot complete the partial checksums a local sender hands to a veth, which a NIC never delivers. These figures compare with each other only, not with the tables above. Ratios are to routing and to bpfnat's TC path in this same setting, round by round (the median of the rounds' ratios). XDP handles inbound traffic: all of F3, the replies of F2 (a quick run measures F3 only, without generic XDP).\n"
    );
    let of =
        |vi: usize, fi: usize, mi: usize| x.samples.get(&(vi, fi, mi)).cloned().unwrap_or_default();
    let stat = |vi: usize, fi: usize, mi: usize| {
        let v = of(vi, fi, mi);
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (median(&v), lo, hi)
    };
    for (fi, f) in x.flows.iter().enumerate() {
        let _ = writeln!(md, "### {}\n", f.label());
        let _ = write!(md, "| datapath |");
        for m in Metric::ALL {
            let _ = write!(md, " {} | ×routing | ×TC |", m.label());
        }
        let _ = write!(md, "\n| --- |");
        for _ in Metric::ALL {
            let _ = write!(md, " ---: | ---: | ---: |");
        }
        md.push('\n');
        for (vi, label) in x.labels.iter().enumerate() {
            let _ = write!(md, "| {label} |");
            for (mi, m) in Metric::ALL.iter().enumerate() {
                let (med, lo, hi) = stat(vi, fi, mi);
                let spread = if r.reps > 1 {
                    format!(" [{}–{}]", fmt(*m, lo), fmt(*m, hi))
                } else {
                    String::new()
                };
                let _ = write!(
                    md,
                    " {}{spread} | {:.2} | {:.2} |",
                    fmt(*m, med),
                    paired_ratio(&of(vi, fi, mi), &of(0, fi, mi)),
                    paired_ratio(&of(vi, fi, mi), &of(1, fi, mi))
                );
            }
            md.push('\n');
        }
        md.push('\n');
    }
    if !x.counters.is_empty() {
        let _ = writeln!(
            md,
            "XDP counters of the native variant after its runs (packets, bytes):\n\n```\n{}\n```\n",
            x.counters.join("\n")
        );
    }
}

const COLORS: [&str; 5] = ["#9e9e9e", "#4e79a7", "#e15759", "#f28e2b", "#59a14f"];

/// The x axis line and the y axis's top label (`top`) of a chart laid out as
/// (width, height, left margin, bottom margin, plot height).
fn axis(s: &mut String, (w, h, left, bottom, plot_h): (f64, f64, f64, f64, f64), top: &str) {
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>",
        h - bottom,
        w - 10.0,
        h - bottom
    );
    let _ = writeln!(
        s,
        "<text x=\"4\" y=\"{:.1}\">{top}</text>",
        h - bottom - plot_h
    );
}

/// Grouped bars: one group per flow, one bar per datapath.
fn bars(r: &Report<'_>, m: Metric) -> String {
    // Wide enough for each flow's label under its group.
    let w = 90.0 + 200.0 * Flow::ALL.len() as f64;
    let (h, left, bottom) = (340.0, 70.0, 60.0);
    let max = Flow::ALL
        .iter()
        .flat_map(|f| Dp::ALL.iter().map(move |d| stat(r, 0, *d, *f, m).0))
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"{left}\" y=\"18\" font-size=\"14\">{}</text>\n",
        m.label()
    );
    let plot_h = h - bottom - 30.0;
    let group_w = (w - left - 20.0) / Flow::ALL.len() as f64;
    let bar_w = group_w / (Dp::ALL.len() as f64 + 1.0);
    for (fi, f) in Flow::ALL.iter().enumerate() {
        let gx = left + fi as f64 * group_w;
        for (di, dp) in Dp::ALL.iter().enumerate() {
            let v = stat(r, 0, *dp, *f, m).0;
            let v = if v.is_finite() { v } else { 0.0 };
            let bh = plot_h * v / max;
            let x = gx + (di as f64 + 0.5) * bar_w;
            let y = h - bottom - bh;
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>{} {}: {}</title></rect>",
                bar_w * 0.9,
                COLORS[di],
                dp.label(),
                f.label(),
                fmt(m, v)
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            gx + group_w / 2.0,
            h - bottom + 16.0,
            f.label()
        );
    }
    axis(&mut s, (w, h, left, bottom, plot_h), &fmt(m, max));
    for (di, dp) in Dp::ALL.iter().enumerate() {
        let x = left + di as f64 * 130.0;
        let _ = writeln!(
            s,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            h - 22.0,
            COLORS[di],
            x + 14.0,
            h - 13.0,
            dp.label()
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Transactions/s against the number of published ports (log scale).
fn lines(sc: &Scaling) -> String {
    let (w, h, left, bottom) = (760.0, 340.0, 70.0, 60.0);
    let max = sc
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    let n = sc.ports.len().max(2) as f64 - 1.0;
    let plot_w = w - left - 30.0;
    let plot_h = h - bottom - 30.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"{left}\" y=\"18\" font-size=\"14\">new TCP connections/s (F3) vs published ports</text>\n"
    );
    for (i, p) in sc.ports.iter().enumerate() {
        let x = left + plot_w * i as f64 / n;
        let _ = writeln!(
            s,
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{p}</text>",
            h - bottom + 16.0
        );
    }
    for (si, (label, v)) in sc.series.iter().enumerate() {
        let color = COLORS[(si + 2).min(4)];
        let pts: Vec<String> = v
            .iter()
            .enumerate()
            .map(|(i, y)| {
                let y = if y.is_finite() { *y } else { 0.0 };
                format!(
                    "{:.1},{:.1}",
                    left + plot_w * i as f64 / n,
                    h - bottom - plot_h * y / max
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            pts.join(" ")
        );
        let x = left + si as f64 * 160.0;
        let _ = writeln!(
            s,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.1}\">{label}</text>",
            h - 22.0,
            x + 14.0,
            h - 13.0
        );
    }
    axis(&mut s, (w, h, left, bottom, plot_h), &fmt(Metric::Crr, max));
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::{median, paired_ratio};

    #[test]
    fn a_paired_ratio_compares_within_rounds() {
        // F2 conn/s of a real run, routing then bpfnat: the third round caught bpfnat in a
        // slow phase, which the ratio of the medians (0.70) takes for the datapath's cost.
        let routing = [5789.9, 8391.0, 8342.7];
        let bpfnat = [5864.0, 9788.9, 5861.4];
        assert!((median(&bpfnat) / median(&routing) - 0.703).abs() < 0.001);
        assert!((paired_ratio(&bpfnat, &routing) - 5864.0 / 5789.9).abs() < 1e-12);
        assert!(paired_ratio(&[], &routing).is_nan());
    }
}
