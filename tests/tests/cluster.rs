//! Many nodes: each agent leases its own block of the cluster CIDR in a real etcd, keeps it
//! across a `kill -9` and restart, gives it back on SIGTERM, and says so when none is free;
//! pods reach each other across nodes with their own addresses, through routes that follow
//! the nodes coming and going, and outsiders still cannot reach them.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bpfnat_lab::{
    cluster::{ClusterLab, ClusterNode, ETCD_ADDR, INET_ADDR},
    traffic,
};
use bpfnat_tests::{
    bin,
    kube_api::{self, KubeApi},
    monitor::Monitor,
    v4,
};
use nat_plumbing::netns;
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
    netns::command_in(&mut c, &lab.underlay).unwrap();
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

const TTL: Duration = Duration::from_secs(4);

/// A node's agent log, read when shown.
struct Log<'a>(&'a ClusterNode);

impl std::fmt::Display for Log<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let log = std::fs::read_to_string(self.0.state_dir.join("agent.log")).unwrap_or_default();
        write!(f, "{}'s agent: {log}", self.0.name)
    }
}

/// Poll `f` until it returns `Some`, or fail after `within` saying `what`.
fn wait_for<T>(
    within: Duration,
    what: impl std::fmt::Display,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `bpfnat cluster status -o json` on the node.
fn cluster_status(n: &ClusterNode) -> Option<Value> {
    let out = n.run(&["-o", "json", "cluster", "status"]).ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())?
}

/// Wait until the node's agent follows the cluster, healthy, with exactly `peers` (by name)
/// and a route installed to each.
fn wait_peers(n: &ClusterNode, peers: &[&str]) -> Value {
    wait_for(
        TTL * 3,
        format!("{} sees {peers:?}: {}", n.name, Log(n)),
        || {
            let st = cluster_status(n)?;
            let names: Vec<&str> = st["peers"]
                .as_array()?
                .iter()
                .filter_map(|p| p["name"].as_str())
                .collect();
            let mut want = peers.to_vec();
            want.sort_unstable();
            let mut have = names.clone();
            have.sort_unstable();
            let routed = st["peers"]
                .as_array()?
                .iter()
                .all(|p| p["routeInstalled"] == true);
            (st["node"]["datastore"]["healthy"] == true && have == want && routed).then_some(st)
        },
    )
}

/// The node's routes of bpfnat's protocol, as `ip route` shows them.
fn bpfnat_routes(n: &ClusterNode) -> String {
    let mut c = Command::new("ip");
    c.args(["-4", "route", "show", "proto", "176"]);
    netns::command_in(&mut c, &n.ns).unwrap();
    String::from_utf8_lossy(&c.output().unwrap().stdout).into_owned()
}

/// The agent's `/metrics`, once it serves them.
fn metrics(n: &ClusterNode) -> Option<String> {
    let port = 9980 + n.name[1..].parse::<u16>().unwrap();
    let addr = v4(Ipv4Addr::LOCALHOST, port);
    netns::run_in(&n.ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .ok()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A pod on `n` with port 8080 published to its port 80: its name and address.
fn pod(lab: &ClusterLab, n: &ClusterNode) -> (String, Ipv4Addr) {
    let name = lab.name(&format!("p-{}", n.name));
    n.ok(&["container", "add", &name, "-p", "8080:80"]).unwrap();
    let out = n
        .ok(&["-o", "json", "container", "inspect", &name])
        .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    (name, v["ip"].as_str().unwrap().parse().unwrap())
}

/// TCP from pod `from` to pod `to`: what the receiver saw as the source, if it got through.
fn tcp_source(from: &(String, Ipv4Addr), to: &(String, Ipv4Addr)) -> Option<Ipv4Addr> {
    let srv = traffic::http_server(
        &netns::path_of(&to.0),
        v4(Ipv4Addr::UNSPECIFIED, 80),
        &to.0,
        1,
        Duration::from_secs(6),
    )
    .unwrap();
    let got = traffic::http_get(&netns::path_of(&from.0), v4(to.1, 80));
    let seen = srv.join().unwrap_or_default();
    got.ok().and(seen.first().map(|p| match p.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    }))
}

fn ping(from: &str, to: Ipv4Addr) -> bool {
    let mut c = Command::new("ping");
    c.args(["-c", "1", "-W", "2", &to.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    netns::command_in(&mut c, &netns::path_of(from)).unwrap();
    c.status().unwrap().success()
}

/// The datapath's counter for `reason` on node `n`.
fn counter(n: &ClusterNode, reason: &str) -> u64 {
    let out = n.ok(&["-o", "json", "stats"]).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["reason"] == reason)
        .and_then(|c| c["packets"].as_u64())
        .unwrap_or(0)
}

#[test]
fn pods_reach_each_other_across_nodes_with_their_own_addresses() {
    let mut lab = ClusterLab::new("bnt-pod", &bin(), 3).unwrap();
    let cidr = "10.244.0.0/16";
    let mut agents: Vec<Option<Agent>> = Vec::new();
    let mut blocks = Vec::new();
    for n in &lab.nodes {
        let (a, s) = start(&lab, n, cidr);
        agents.push(Some(a));
        blocks.push(s);
    }
    let mut distinct = blocks.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "three distinct blocks: {blocks:?}");
    let pods: Vec<(String, Ipv4Addr)> = lab.nodes.iter().map(|n| pod(&lab, n)).collect();
    for (n, others) in lab
        .nodes
        .iter()
        .zip([["n2", "n3"], ["n1", "n3"], ["n1", "n2"]])
    {
        let st = wait_peers(n, &others);
        assert_eq!(st["node"]["name"], n.name.as_str());
        assert_eq!(st["node"]["address"], n.addr.to_string());
        assert_eq!(st["node"]["datastore"]["kind"], "etcd");
        for p in st["peers"].as_array().unwrap() {
            assert!(p["lastSeenSecs"].as_u64().unwrap() <= TTL.as_secs(), "{p}");
        }
    }
    // The CNI's and the CLI's addresses come from the node's block only.
    let foreign = blocks[1].replace(".0/24", ".77");
    let out = lab.nodes[0]
        .run(&["container", "add", &lab.name("x"), "--ip", &foreign])
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains(&blocks[0]),
        "an address of another node's block is refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Pod to pod across nodes, every pair in a ring: TCP, UDP and ping, with the receiver
    // seeing the sender's own pod address. The first node's monitor traces both ways.
    let mon = Monitor::spawn(
        lab.nodes[0]
            .bpfnat(&["-o", "json", "monitor", "--type", "trace", "--proto", "udp"])
            .unwrap(),
    );
    for (a, b) in [(0, 1), (1, 2), (2, 0)] {
        assert_eq!(
            tcp_source(&pods[a], &pods[b]),
            Some(pods[a].1),
            "TCP {} -> {}",
            pods[a].0,
            pods[b].0
        );
        let echo = traffic::udp_echo(
            &netns::path_of(&pods[b].0),
            v4(Ipv4Addr::UNSPECIFIED, 5353),
            1,
            Duration::from_secs(5),
        )
        .unwrap();
        let reply = traffic::udp_ask(
            &netns::path_of(&pods[a].0),
            v4(Ipv4Addr::UNSPECIFIED, 0),
            v4(pods[b].1, 5353),
            b"hi",
        )
        .unwrap();
        let _ = echo.join();
        assert!(
            reply.starts_with(&format!("{}:", pods[a].1)),
            "UDP source preserved: {reply}"
        );
        assert!(
            ping(&pods[a].0, pods[b].1),
            "ping {} -> {}",
            pods[a].0,
            pods[b].0
        );
    }
    let events = mon.events(Duration::from_millis(500));
    let traced = |reason: &str| {
        events
            .iter()
            .filter(|e| e["reason"] == reason)
            .map(|e| (e["before"]["src"].clone(), e["after"]["dst"].clone()))
            .collect::<Vec<_>>()
    };
    // Out from the first node's pod to the second's, untranslated; in from the third's.
    let (p0, p1, p2) = (
        pods[0].1.to_string(),
        pods[1].1.to_string(),
        pods[2].1.to_string(),
    );
    assert!(
        traced("cluster_route").contains(&(p0.clone().into(), p1.into())),
        "{events:#?}"
    );
    assert!(
        traced("cluster_deliver").contains(&(p2.into(), p0.into())),
        "{events:#?}"
    );
    drop(mon);
    // ICMP errors too: a datagram to a closed port of another node's pod comes back as
    // "port unreachable" to the sender's own address.
    let p0 = pods[0].1;
    let refused = netns::run_in(&netns::path_of(&pods[1].0), move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(v4(p0, 9))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        for _ in 0..3 {
            s.send(b"x")?;
            if let Err(e) = s.recv(&mut [0u8; 8])
                && e.kind() == std::io::ErrorKind::ConnectionRefused
            {
                return Ok(true);
            }
        }
        Ok(false)
    })
    .unwrap();
    assert!(refused, "port unreachable from another node's pod");
    // Another node itself reaches a pod with its own address (a kubelet's probe).
    let srv = traffic::http_server(
        &netns::path_of(&pods[0].0),
        v4(Ipv4Addr::UNSPECIFIED, 80),
        "p1",
        1,
        Duration::from_secs(6),
    )
    .unwrap();
    let got = traffic::http_get(&lab.nodes[1].ns, v4(pods[0].1, 80));
    let seen = srv.join().unwrap();
    assert!(got.is_ok(), "n2 -> pod on n1: {got:?}");
    assert_eq!(
        seen[0].ip(),
        lab.nodes[1].addr,
        "the pod sees n2's own address"
    );
    assert!(counter(&lab.nodes[0], "cluster_deliver") > 0);
    assert!(counter(&lab.nodes[0], "cluster_route") > 0);

    // To the internet a pod is masqueraded to its own node's address; published ports work
    // on every node.
    for (i, n) in lab.nodes.iter().enumerate() {
        let srv = traffic::http_server(
            &lab.inet,
            v4(INET_ADDR, 9000),
            "inet",
            1,
            Duration::from_secs(6),
        )
        .unwrap();
        let got = traffic::http_get(&netns::path_of(&pods[i].0), v4(INET_ADDR, 9000));
        let seen = srv.join().unwrap();
        assert!(got.is_ok(), "{} reaches the internet: {got:?}", pods[i].0);
        assert_eq!(seen[0].ip(), n.addr, "masqueraded to {}'s address", n.name);

        let srv = traffic::http_server(
            &netns::path_of(&pods[i].0),
            v4(Ipv4Addr::UNSPECIFIED, 80),
            &pods[i].0,
            1,
            Duration::from_secs(6),
        )
        .unwrap();
        let body = traffic::http_get(&lab.inet, v4(n.addr, 8080));
        let _ = srv.join();
        assert!(
            body.as_ref().is_ok_and(|b| b.contains(&pods[i].0)),
            "published port on {}: {body:?}",
            n.name
        );
    }

    // A source outside the cluster (the router, routing n1's block to n1) still cannot reach
    // a pod address; the same request from a pod of another node does (above).
    let mut c = Command::new("ip");
    c.args([
        "route",
        "add",
        &blocks[0],
        "via",
        &lab.nodes[0].addr.to_string(),
    ]);
    netns::command_in(&mut c, &lab.router).unwrap();
    assert!(c.status().unwrap().success());
    let dropped = counter(&lab.nodes[0], "drop_not_published");
    let srv = traffic::http_server(
        &netns::path_of(&pods[0].0),
        v4(Ipv4Addr::UNSPECIFIED, 80),
        "p1",
        1,
        Duration::from_secs(3),
    )
    .unwrap();
    let outsider = traffic::http_get_raw(&lab.router, v4(pods[0].1, 80));
    assert!(
        srv.join().unwrap().is_empty() && outsider.is_err(),
        "{outsider:?}"
    );
    assert!(counter(&lab.nodes[0], "drop_not_published") > dropped);
    assert_eq!(tcp_source(&pods[1], &pods[0]), Some(pods[1].1), "control");

    // A fourth node joins: a fourth block, reached by all.
    lab.add_node().unwrap();
    let (a4, s4) = start(&lab, &lab.nodes[3], cidr);
    agents.push(Some(a4));
    assert!(!blocks.contains(&s4), "a fourth block: {s4} vs {blocks:?}");
    let p4 = pod(&lab, &lab.nodes[3]);
    for (i, n) in lab.nodes.iter().enumerate().take(3) {
        let mut others: Vec<&str> = ["n1", "n2", "n3", "n4"].into_iter().collect();
        others.retain(|o| *o != n.name);
        wait_peers(n, &others);
        assert_eq!(
            tcp_source(&pods[i], &p4),
            Some(pods[i].1),
            "{} -> n4",
            pods[i].0
        );
    }

    // n4 goes away (agent killed, namespace deleted): the others forget it within the lease
    // TTL and a few seconds, routes included.
    drop(agents[3].take());
    lab.remove_node(3).unwrap();
    let gone = Instant::now();
    for (n, others) in lab
        .nodes
        .iter()
        .zip([["n2", "n3"], ["n1", "n3"], ["n1", "n2"]])
    {
        wait_peers(n, &others);
        assert!(
            !bpfnat_routes(n).contains(&s4),
            "{}: {}",
            n.name,
            bpfnat_routes(n)
        );
    }
    assert!(
        gone.elapsed() < TTL + Duration::from_secs(5),
        "{:?}",
        gone.elapsed()
    );

    // kill -9 and a restart of n1's agent: the same block, and an established cross-node
    // connection goes on.
    let listener = netns::run_in(&netns::path_of(&pods[0].0), || {
        Ok(TcpListener::bind("0.0.0.0:7000")?)
    })
    .unwrap();
    let p1 = pods[0].1;
    let mut client = netns::run_in(&netns::path_of(&pods[1].0), move || {
        Ok(TcpStream::connect_timeout(
            &v4(p1, 7000),
            Duration::from_secs(5),
        )?)
    })
    .unwrap();
    let (mut server, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), pods[1].1);
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 6];
    client.write_all(b"before").unwrap();
    server.read_exact(&mut buf).unwrap();
    drop(agents[0].take());
    let (a1, again) = start(&lab, &lab.nodes[0], cidr);
    agents[0] = Some(a1);
    assert_eq!(again, blocks[0], "n1 keeps its block");
    wait_for(TTL * 3, "n1's agent serves metrics again", || {
        metrics(&lab.nodes[0])
    });
    wait_peers(&lab.nodes[0], &["n2", "n3"]);
    client.write_all(b"after!").unwrap();
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"after!", "the connection survived the restart");

    // etcd away: nothing on the datapath changes, the datastore is reported unhealthy within
    // the TTL, and the agents recover when it is back.
    lab.stop_etcd();
    let stopped = Instant::now();
    wait_for(TTL * 2, "n1 reports the datastore unhealthy", || {
        let st = cluster_status(&lab.nodes[0])?;
        (st["node"]["datastore"]["healthy"] == false).then_some(())
    });
    assert!(
        stopped.elapsed() <= TTL + Duration::from_secs(1),
        "{:?}",
        stopped.elapsed()
    );
    let out = lab.nodes[0].run(&["-o", "json", "status"]).unwrap();
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["cluster"]["datastore"]["healthy"], false, "{st}");
    assert_eq!(st["cluster"]["block"], blocks[0].as_str());
    assert!(out.status.success(), "the datapath is up: status exits 0");
    std::thread::sleep(TTL);
    for n in &lab.nodes[..3] {
        assert_eq!(
            bpfnat_routes(n).lines().count(),
            2,
            "{}: routes kept",
            n.name
        );
    }
    assert_eq!(
        tcp_source(&pods[2], &pods[0]),
        Some(pods[2].1),
        "pods still reach each other"
    );
    let m = metrics(&lab.nodes[0]).unwrap();
    assert!(
        metric(&m, "bpfnat_cluster_datastore_errors_total").unwrap() >= 1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "bpfnat_cluster_datastore_healthy"), Some(0.0));
    assert_eq!(metric(&m, "bpfnat_cluster_peers"), Some(2.0));
    assert_eq!(metric(&m, "bpfnat_cluster_routes_installed"), Some(2.0));
    lab.start_etcd().unwrap();
    for (n, others) in lab
        .nodes
        .iter()
        .zip([["n2", "n3"], ["n1", "n2"], ["n1", "n2"]])
        .take(1)
    {
        wait_peers(n, &others);
    }
    wait_peers(&lab.nodes[1], &["n1", "n3"]);
    wait_peers(&lab.nodes[2], &["n1", "n2"]);
    client.write_all(b"again!").unwrap();
    server.read_exact(&mut buf).unwrap();
    drop(agents);
}

#[test]
fn the_kubernetes_datastore_follows_recorded_nodes() {
    let lab = ClusterLab::new("bnt-k8s", &bin(), 2).unwrap();
    let read = |f: &str| std::fs::read_to_string(kube_api::fixtures().join(f)).unwrap();
    let list: Value = serde_json::from_str(&read("nodes.json")).unwrap();
    let api = KubeApi::start(&lab.underlay, v4(ETCD_ADDR, 6443), &list).unwrap();
    let mut agents = Vec::new();
    let mut subnets = Vec::new();
    for n in &lab.nodes {
        std::fs::create_dir_all(&n.state_dir).unwrap();
        let kubeconfig = n.state_dir.join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
        let path = n.state_dir.join("agent.json");
        let port = 9980 + n.name[1..].parse::<u16>().unwrap();
        let conf = json!({
            "uplink": bpfnat_lab::UPLINK,
            "metricsAddr": format!("127.0.0.1:{port}"),
            "cniConfDir": n.state_dir.join("net.d"),
            "cluster": {
                "datastore": "kubernetes",
                "nodeName": n.name,
                "clusterCidr": "10.244.0.0/16",
                "kubernetes": {"kubeconfig": kubeconfig, "timeoutSecs": 4}
            }
        });
        std::fs::write(&path, conf.to_string()).unwrap();
        agents.push(Agent(spawn(n, &path)));
        subnets.push(wait_for(Duration::from_secs(20), Log(n), || subnet(n)));
    }
    // Each node's subnet is its Node's spec.podCIDRs (IPv4), as kube-controller-manager
    // allocated it.
    assert_eq!(subnets, ["10.244.1.0/24", "10.244.2.0/24"]);
    // The CNI configuration the agent writes hands out addresses of the node's block.
    for (n, block) in lab.nodes.iter().zip(&subnets) {
        let path = n.state_dir.join("net.d/10-bpfnat.conflist");
        let conf: Value = wait_for(Duration::from_secs(10), Log(n), || {
            serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()
        });
        assert_eq!(conf["plugins"][0]["subnet"], block.as_str(), "{conf}");
    }
    // n3's Node has no pod CIDR yet: it is not a peer.
    let st = wait_peers(&lab.nodes[0], &["n2"]);
    assert_eq!(st["node"]["datastore"]["kind"], "kubernetes");
    assert_eq!(st["peers"][0]["address"], "192.0.2.12");
    assert_eq!(st["peers"][0]["block"], "10.244.2.0/24");
    wait_peers(&lab.nodes[1], &["n1"]);
    let pods: Vec<(String, Ipv4Addr)> = lab.nodes.iter().map(|n| pod(&lab, n)).collect();
    assert_eq!(tcp_source(&pods[0], &pods[1]), Some(pods[0].1));
    assert_eq!(tcp_source(&pods[1], &pods[0]), Some(pods[1].1));

    // The Node n2 is deleted (a recorded watch stream): n1 forgets it and its route.
    assert!(bpfnat_routes(&lab.nodes[0]).contains("10.244.2.0/24"));
    api.play(&read("watch-n2-deleted.jsonl")).unwrap();
    wait_peers(&lab.nodes[0], &[]);
    assert!(
        bpfnat_routes(&lab.nodes[0]).is_empty(),
        "{}",
        bpfnat_routes(&lab.nodes[0])
    );
    assert_eq!(
        tcp_source(&pods[1], &pods[0]),
        None,
        "no route back to n2's pods"
    );
    drop(agents);
}

#[test]
fn an_agent_that_cannot_start_gives_its_block_back_at_once() {
    let lab = ClusterLab::new("bnt-clq", &bin(), 1).unwrap();
    let n = &lab.nodes[0];
    // The node is up on a subnet of its own: the agent leases a block, sees the datapath on
    // another subnet and stops.
    n.ok(&[
        "up",
        "--uplink",
        bpfnat_lab::UPLINK,
        "--subnet",
        "10.99.0.0/16",
    ])
    .unwrap();
    let mut agent = spawn(n, &config(&lab, n, "10.244.0.0/16"));
    let status = wait_for(Duration::from_secs(20), Log(n), || {
        agent.try_wait().unwrap()
    });
    assert!(!status.success());
    let log = std::fs::read_to_string(n.state_dir.join("agent.log")).unwrap();
    assert!(log.contains("bpfnat down"), "{log}");
    // Well within the lease's TTL, the block is free again.
    let recs = records(&lab);
    assert!(recs.is_empty(), "the block was given back: {recs:?}");
}

#[test]
fn a_node_whose_uplink_address_changes_is_routed_to_its_new_address() {
    let lab = ClusterLab::new("bnt-clm", &bin(), 2).unwrap();
    let cidr = "10.244.0.0/16";
    let agents: Vec<Agent> = lab.nodes.iter().map(|n| start(&lab, n, cidr).0).collect();
    let pods: Vec<(String, Ipv4Addr)> = lab.nodes.iter().map(|n| pod(&lab, n)).collect();
    wait_peers(&lab.nodes[0], &["n2"]);
    assert_eq!(tcp_source(&pods[0], &pods[1]), Some(pods[0].1), "before");

    // n2 is renumbered (a new DHCP lease, say): 192.0.2.12 -> 192.0.2.22.
    let n2 = &lab.nodes[1];
    for args in [
        &["addr", "del", "192.0.2.12/24", "dev", bpfnat_lab::UPLINK][..],
        &["addr", "add", "192.0.2.22/24", "dev", bpfnat_lab::UPLINK],
        &["route", "replace", "default", "via", "192.0.2.1"],
    ] {
        bpfnat_lab::cluster::ip_in(&n2.ns, args).unwrap();
    }
    let st = wait_for(TTL * 3, Log(n2), || {
        let st = cluster_status(&lab.nodes[0])?;
        (st["peers"][0]["address"] == "192.0.2.22" && st["peers"][0]["routeInstalled"] == true)
            .then_some(st)
    });
    assert!(
        bpfnat_routes(&lab.nodes[0]).contains("via 192.0.2.22"),
        "{st} {}",
        bpfnat_routes(&lab.nodes[0])
    );
    let own = cluster_status(n2).unwrap();
    assert_eq!(own["node"]["address"], "192.0.2.22", "{own}");
    assert_eq!(tcp_source(&pods[0], &pods[1]), Some(pods[0].1), "after");
    assert_eq!(
        tcp_source(&pods[1], &pods[0]),
        Some(pods[1].1),
        "after, back"
    );
    drop(agents);
}
