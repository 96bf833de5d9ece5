//! Many nodes: each agent leases its own block of the cluster CIDR in a real etcd, keeps it
//! across a `kill -9` and restart, gives it back on SIGTERM, and says so when none is free.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bpfnat_lab::cluster::{ClusterLab, ClusterNode};
use bpfnat_tests::bin;
use serde_json::{Value, json};

struct Agent(Child);

impl Agent {
    fn term(mut self) -> std::process::ExitStatus {
        // SAFETY: signalling a child this test started.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let status = self.0.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config(lab: &ClusterLab, n: &ClusterNode, cidr: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(&n.state_dir).unwrap();
    let path = n.state_dir.join("agent.json");
    let port = 9980 + n.name[1..].parse::<u16>().unwrap();
    let conf = json!({
        "uplink": bpfnat_lab::UPLINK,
        "metricsAddr": format!("127.0.0.1:{port}"),
        "cluster": {
            "datastore": "etcd",
            "nodeName": n.name,
            "clusterCidr": cidr,
            "nodeCidrMaskSize": 24,
            "etcd": {"endpoints": [lab.etcd_endpoint()], "leaseTtlSecs": 4}
        }
    });
    std::fs::write(&path, conf.to_string()).unwrap();
    path
}

fn spawn(n: &ClusterNode, config: &Path) -> Child {
    let log = std::fs::File::create(n.state_dir.join("agent.log")).unwrap();
    n.bpfnat(&["agent", "--config", config.to_str().unwrap()])
        .unwrap()
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// The node's subnet once its agent has it up.
fn subnet(n: &ClusterNode) -> Option<String> {
    let out = n.run(&["-o", "json", "status"]).ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    (v["up"] == true).then(|| v["node"]["subnet"].as_str().map(str::to_owned))?
}

fn start(lab: &ClusterLab, n: &ClusterNode, cidr: &str) -> (Agent, String) {
    let agent = Agent(spawn(n, &config(lab, n, cidr)));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = subnet(n) {
            return (agent, s);
        }
        assert!(
            Instant::now() < deadline,
            "{} did not come up: {}",
            n.name,
            std::fs::read_to_string(n.state_dir.join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The block records under the lab's etcd, as `etcdctl` sees them.
fn records(lab: &ClusterLab) -> Vec<Value> {
    let mut c = Command::new("etcdctl");
    c.args(["--endpoints", &lab.etcd_endpoint()])
        .args(["get", "--prefix", "/bpfnat/subnets/", "--print-value-only"])
        .env("ETCDCTL_API", "3");
    nat_plumbing::netns::command_in(&mut c, &lab.underlay).unwrap();
    let out = c
        .output()
        .expect("etcdctl (cargo xtask setup installs etcd-client)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn nodes_lease_distinct_blocks_keep_them_across_a_restart_and_give_them_back() {
    let lab = ClusterLab::new("bnt-clu", &bin(), 3).unwrap();
    let cidr = "10.244.0.0/22";
    let (a1, s1) = start(&lab, &lab.nodes[0], cidr);
    let (a2, s2) = start(&lab, &lab.nodes[1], cidr);
    let (a3, s3) = start(&lab, &lab.nodes[2], cidr);
    let mut blocks = vec![s1.clone(), s2.clone(), s3.clone()];
    blocks.sort();
    blocks.dedup();
    assert_eq!(blocks.len(), 3, "distinct blocks: {s1} {s2} {s3}");
    for b in &blocks {
        assert!(b.starts_with("10.244.") && b.ends_with("/24"), "{b}");
    }
    let recs = records(&lab);
    assert_eq!(recs.len(), 3, "{recs:?}");
    for (n, s) in lab.nodes.iter().zip([&s1, &s2, &s3]) {
        assert!(
            recs.iter().any(|r| r["node"] == n.name.as_str()
                && r["address"] == n.addr.to_string()
                && r["block"] == s.as_str()),
            "{}'s record: {recs:?}",
            n.name
        );
    }

    // kill -9 and a restart: the same block, taken back before its lease expired.
    drop(a2);
    let (a2, again) = start(&lab, &lab.nodes[1], cidr);
    assert_eq!(again, s2, "n2 keeps its block");
    assert_eq!(records(&lab).len(), 3);

    // SIGTERM: a graceful leave gives the block back at once.
    assert!(a3.term().success());
    let recs = records(&lab);
    assert_eq!(recs.len(), 2, "n3's block given back: {recs:?}");
    assert!(recs.iter().all(|r| r["node"] != "n3"));

    // No block free: n3, on a cluster CIDR of two blocks that n1 and n2 hold, says so.
    lab.nodes[2].ok(&["down"]).unwrap();
    let mut exhausted = spawn(&lab.nodes[2], &config(&lab, &lab.nodes[2], "10.244.0.0/23"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = exhausted.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the agent kept running without a block"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(lab.nodes[2].state_dir.join("agent.log")).unwrap();
    assert!(
        log.contains("10.244.0.0/23") && log.contains("no block"),
        "names the CIDR: {log}"
    );
    drop((a1, a2));
}

#[test]
fn a_subnet_beside_the_cluster_section_is_refused() {
    let dir = std::env::temp_dir().join(format!("bpfnat-clucfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("agent.json");
    std::fs::write(
        &path,
        json!({
            "uplink": "eth0",
            "subnet": "10.88.0.0/16",
            "cluster": {"datastore": "etcd", "clusterCidr": "10.244.0.0/16",
                        "etcd": {"endpoints": ["http://192.0.2.2:2379"]}}
        })
        .to_string(),
    )
    .unwrap();
    let e = bpfnat::agent::load_config(Some(&path)).unwrap_err();
    assert!(format!("{e:#}").contains("exclude each other"), "{e:#}");
    std::fs::remove_dir_all(&dir).unwrap();
}
