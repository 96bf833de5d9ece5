//! Pod to pod across two nodes: bpfnat cluster nodes (agents on a real etcd, routes of their
//! own, untranslated cluster traffic), with the uplink's XDP off (what `auto` picks on a veth), against plain routing between the same kind of namespaces (a veth per pod and
//! static routes between the nodes, no NAT, no eBPF).

use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use bpfnat_lab::{
    UPLINK,
    cluster::{ClusterLab, ClusterNode, ip_in},
};
use nat_plumbing::netns;

use crate::{
    load::{self, Metric},
    report::Samples,
    topo::Endpoints,
};

/// The two setups, in the report's order.
pub const LABELS: [&str; 2] = ["(a) routing", "(d) bpfnat cluster"];

/// Medians per (setup, metric), as `Samples` keyed `(setup, 0, metric)`.
pub struct ClusterSection {
    pub samples: Samples,
}

/// Plain routing: pod `i` (10.244.i.2) behind node `i` (10.244.i.1 on its veth), each node
/// routing the other's block via the other's underlay address.
fn routed(lab: &ClusterLab, prefix: &str) -> Result<Endpoints> {
    let mut pods = Vec::new();
    for (i, n) in lab.nodes.iter().enumerate() {
        let k = i + 1;
        let pod = format!("{prefix}-pod{k}");
        netns::create(&pod)?;
        let pod_ns = netns::path_of(&pod);
        ip_in(&pod_ns, &["link", "set", "lo", "up"])?;
        ip_in(
            &n.ns,
            &[
                "link", "add", "veth0", "type", "veth", "peer", "name", "eth0", "netns", &pod,
            ],
        )?;
        ip_in(
            &n.ns,
            &["addr", "add", &format!("10.244.{k}.1/24"), "dev", "veth0"],
        )?;
        ip_in(&n.ns, &["link", "set", "veth0", "up"])?;
        ip_in(
            &pod_ns,
            &["addr", "add", &format!("10.244.{k}.2/24"), "dev", "eth0"],
        )?;
        ip_in(&pod_ns, &["link", "set", "eth0", "up"])?;
        ip_in(
            &pod_ns,
            &["route", "add", "default", "via", &format!("10.244.{k}.1")],
        )?;
        netns::run_in(&n.ns, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enable forwarding")
        })?;
        pods.push(pod_ns);
    }
    for (i, n) in lab.nodes.iter().enumerate() {
        let other = 1 - i;
        ip_in(
            &n.ns,
            &[
                "route",
                "add",
                &format!("10.244.{}.0/24", other + 1),
                "via",
                &lab.nodes[other].addr.to_string(),
            ],
        )?;
    }
    Ok(Endpoints {
        client: pods[0].clone(),
        server: pods[1].clone(),
        target: Ipv4Addr::new(10, 244, 2, 2).into(),
    })
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent(lab: &ClusterLab, n: &ClusterNode, xdp: &str) -> Result<Agent> {
    std::fs::create_dir_all(&n.state_dir)?;
    let path = n.state_dir.join("agent.json");
    let port = 9970 + n.name[1..].parse::<u16>().unwrap_or(0);
    let conf = serde_json::json!({
        "uplink": UPLINK,
        "metricsAddr": format!("127.0.0.1:{port}"),
        "xdp": xdp,
        "cluster": {
            "datastore": "etcd", "nodeName": n.name, "clusterCidr": "10.244.0.0/16",
            "etcd": {"endpoints": [lab.etcd_endpoint()], "leaseTtlSecs": 10}
        }
    });
    std::fs::write(&path, conf.to_string())?;
    let config = path.to_string_lossy().into_owned();
    let child = n
        .bpfnat(&["agent", "--config", &config])?
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start the agent")?;
    Ok(Agent(child))
}

/// Until `f` holds, for at most `within`.
fn wait(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + within;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// bpfnat: both agents up on their blocks with a route to each other, a pod on each.
fn bpfnat(lab: &ClusterLab, xdp: &str) -> Result<(Vec<Agent>, Endpoints)> {
    let mut agents = Vec::new();
    let mut pods = Vec::new();
    for n in &lab.nodes {
        agents.push(agent(lab, n, xdp)?);
        wait(Duration::from_secs(30), "the agent", || {
            n.ok(&["-o", "json", "status"])
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .is_some_and(|v| v["up"] == true)
        })?;
        let name = lab.name(&format!("p-{}", n.name));
        n.ok(&["container", "add", &name])?;
        let v: serde_json::Value =
            serde_json::from_str(&n.ok(&["-o", "json", "container", "inspect", &name])?)?;
        let ip: Ipv4Addr = v["ip"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .context("the pod's address")?;
        pods.push((netns::path_of(&name), ip));
    }
    for n in &lab.nodes {
        wait(Duration::from_secs(30), "routes between the nodes", || {
            n.ok(&["-o", "json", "cluster", "status"])
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .is_some_and(|v| v["peers"][0]["routeInstalled"] == true)
        })?;
    }
    Ok((
        agents,
        Endpoints {
            client: pods[0].0.clone(),
            server: pods[1].0.clone(),
            target: pods[1].1.into(),
        },
    ))
}

/// Measure every metric on both setups, interleaved, `reps` times (`Metric::reps`).
pub fn measure(me: &Path, bin: &Path, secs: u32, reps: usize) -> Result<ClusterSection> {
    let routing_lab = ClusterLab::new("bnb-cr", bin, 2)?;
    let routing = routed(&routing_lab, "bnb-cr")?;
    // XDP stays off, as `auto` leaves it on a veth uplink: a native XDP delivery cannot
    // complete the partial checksums a local sender hands to a veth.
    let bpfnat_lab = ClusterLab::new("bnb-cb", bin, 2)?;
    let (_agents, through_bpfnat) = bpfnat(&bpfnat_lab, "off")?;
    let setups = [&routing, &through_bpfnat];
    for (e, label) in setups.iter().zip(LABELS) {
        load::measure(me, e, Metric::Rr, 1).with_context(|| format!("warm-up {label}"))?;
    }
    let mut samples = Samples::new();
    for rep in 0..Metric::max_reps(reps) {
        for (mi, m) in Metric::ALL.iter().enumerate() {
            if rep >= m.reps(reps) {
                continue;
            }
            for si in load::round(setups.len(), rep + mi) {
                let e = setups[si];
                let v = load::measure(me, e, *m, secs)
                    .with_context(|| format!("{} {}", LABELS[si], m.label()))?;
                println!(
                    "bench: cluster rep {} {:<24} {:<20} {v:.2}",
                    rep + 1,
                    m.label(),
                    LABELS[si]
                );
                samples.entry((si, 0, mi)).or_default().push(v);
            }
        }
    }
    // The hand-made pods carry the lab's prefix: dropping the labs removes them too.
    Ok(ClusterSection { samples })
}
