//! The node agent: metrics and health, connections surviving `kill -9` and restart, following
//! the uplink's address, reconciling endpoints whose namespace is gone.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bpfnat_tests::{EXT_ADDR, Lab, NODE_ADDR, json, lab, traffic, v4};

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(lab: &Lab, port: u16) -> Agent {
    start_agent_with(lab, port, "")
}

/// An agent whose configuration has `extra` (`"key": value, ` pairs) besides the usual.
fn start_agent_with(lab: &Lab, port: u16, extra: &str) -> Agent {
    // Inside the lab's state directory, so the lab removes it.
    std::fs::create_dir_all(&lab.state_dir).unwrap();
    let cfg = lab.state_dir.join("agent.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{{extra}"uplink": "{}", "metricsAddr": "127.0.0.1:{port}", "gcIntervalSecs": 1}}"#,
            bpfnat_tests::UPLINK
        ),
    )
    .unwrap();
    let mut c = lab
        .bpfnat(&["agent", "--config", cfg.to_str().unwrap()])
        .unwrap();
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let agent = Agent(c.spawn().unwrap());
    // Ready when /healthz answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if get(lab, port, "/healthz").is_some_and(|b| b.trim() == "ok") {
            return agent;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the agent did not become healthy");
}

/// GET `path` from the agent in the node namespace.
fn get(lab: &Lab, port: u16, path: &str) -> Option<String> {
    let path = path.to_owned();
    nat_plumbing::netns::run_in(&lab.node, move || {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_millis(500),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
        let mut r = String::new();
        s.read_to_string(&mut r)?;
        Ok(r.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default())
    })
    .ok()
}

fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{body}"))
}

#[test]
fn a_stream_keeps_flowing_across_agent_kill_and_restart_and_metrics_count_it() {
    let lab = lab("agentrst");
    let agent = start_agent(&lab, 9971);
    let c = lab.name("c");
    lab.ok(&["container", "add", &c]).unwrap();
    let listener =
        nat_plumbing::netns::run_in(&lab.ext, || Ok(TcpListener::bind(v4(EXT_ADDR, 9000))?))
            .unwrap();
    let mut client = nat_plumbing::netns::run_in(&lab.container_ns(&c), || {
        Ok(TcpStream::connect(v4(EXT_ADDR, 9000))?)
    })
    .unwrap();
    let (mut server, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), NODE_ADDR);
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut ping = |tag: u8| {
        client.write_all(&[tag]).unwrap();
        let mut b = [0u8; 1];
        server.read_exact(&mut b).unwrap();
        server.write_all(&b).unwrap();
        client.read_exact(&mut b).unwrap();
        assert_eq!(b[0], tag);
    };
    ping(1);

    let m = get(&lab, 9971, "/metrics").unwrap();
    assert!(metric(&m, "bpfnat_packets_total{reason=\"ct_hit\"}") > 0.0);
    assert_eq!(metric(&m, "bpfnat_containers"), 1.0);
    // Conntrack figures come from the garbage collector's last walk (every second here).
    let deadline = Instant::now() + Duration::from_secs(5);
    let m = loop {
        let m = get(&lab, 9971, "/metrics").unwrap();
        if m.contains("bpfnat_conntrack_connections ")
            && metric(&m, "bpfnat_conntrack_connections") >= 1.0
        {
            break m;
        }
        assert!(Instant::now() < deadline, "no conntrack figures:\n{m}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(metric(&m, "bpfnat_snat_ports_in_use{proto=\"tcp\"}"), 1.0);
    // Who holds them: the container, by name.
    let of_c = format!("{{container=\"{c}\"}}");
    assert_eq!(
        metric(&m, &format!("bpfnat_container_conntrack_entries{of_c}")),
        2.0
    );
    assert_eq!(
        metric(&m, &format!("bpfnat_container_snat_ports{of_c}")),
        1.0
    );
    assert!(metric(&m, "bpfnat_conntrack_gc_runs_total") >= 1.0);
    assert_eq!(metric(&m, "bpfnat_datapath_up"), 1.0);
    assert!(m.contains("bpfnat_build_info{version=\""), "{m}");
    assert!(metric(&m, "process_resident_memory_bytes") > 0.0);
    assert!(m.ends_with("# EOF\n"), "a complete OpenMetrics exposition");

    // kill -9: nothing the agent holds is needed for forwarding.
    drop(agent);
    ping(2);
    let _agent = start_agent(&lab, 9971);
    ping(3);
    let srv = traffic::http_server(
        &lab.ext,
        v4(EXT_ADDR, 9001),
        "ext",
        1,
        Duration::from_secs(10),
    )
    .unwrap();
    traffic::http_get(&lab.container_ns(&c), v4(EXT_ADDR, 9001)).unwrap();
    srv.join().unwrap();
}

#[test]
fn the_agent_follows_the_uplink_address() {
    let lab = lab("agentaddr");
    let _agent = start_agent(&lab, 9972);
    let c = lab.name("c");
    lab.ok(&["container", "add", &c]).unwrap();
    let new_addr = Ipv4Addr::new(198, 51, 100, 5);
    let mut ip = Command::new("sh");
    // Deleting a primary address also deletes its secondaries: renumber, as DHCP would.
    ip.args(["-c", &format!("ip addr del {NODE_ADDR}/24 dev uplink0 && ip addr add {new_addr}/24 dev uplink0 && ip route replace default via {EXT_ADDR}")]);
    nat_plumbing::netns::command_in(&mut ip, &lab.node).unwrap();
    assert!(ip.status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while json(&lab, &["status"])["node"]["snat_ip"] != new_addr.to_string() {
        assert!(
            Instant::now() < deadline,
            "the agent did not pick up the new address"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let srv = traffic::http_server(
        &lab.ext,
        v4(EXT_ADDR, 9000),
        "ext",
        1,
        Duration::from_secs(10),
    )
    .unwrap();
    traffic::http_get(&lab.container_ns(&c), v4(EXT_ADDR, 9000)).unwrap();
    assert_eq!(
        srv.join().unwrap()[0].ip(),
        new_addr,
        "masquerading with the new address"
    );
}

/// `sh -c script` in the lab's node namespace.
fn node_sh(lab: &Lab, script: &str) {
    let mut c = Command::new("sh");
    c.args(["-c", script]);
    nat_plumbing::netns::command_in(&mut c, &lab.node).unwrap();
    assert!(c.status().unwrap().success(), "{script}");
}

/// Wait until `status` shows `want` as the IPv6 MASQUERADE address (`None`: none).
fn wait_snat6(lab: &Lab, want: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = json(lab, &["status"]);
        if st["node"]["snat_ip6"].as_str() == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not pick up {want:?}: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_agent_follows_the_uplinks_ipv6_address() {
    let lab = lab("agentaddr6");
    let _agent = start_agent_with(&lab, 9978, r#""subnet6": "fd00:88::/64", "#);
    // No global address yet: nothing to masquerade with.
    wait_snat6(&lab, None);
    let c = lab.name("c");
    lab.ok(&["container", "add", &c]).unwrap();
    let mut ext = Command::new("ip");
    ext.args([
        "-6",
        "addr",
        "add",
        "2001:db8:1::2/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    nat_plumbing::netns::command_in(&mut ext, &lab.ext).unwrap();
    assert!(ext.status().unwrap().success());
    let to = SocketAddr::from(("2001:db8:1::2".parse::<Ipv6Addr>().unwrap(), 9000));
    for addr in ["2001:db8:1::1", "2001:db8:1::5"] {
        // Renumbered, as by a router advertisement: the new address, then the old one gone.
        node_sh(
            &lab,
            &format!(
                "ip -6 addr add {addr}/64 dev uplink0 nodad && for a in $(ip -6 -o addr show dev uplink0 scope global | awk '{{print $4}}' | grep -v '^{addr}/'); do ip -6 addr del $a dev uplink0; done"
            ),
        );
        wait_snat6(&lab, Some(addr));
        let srv = traffic::http_server(&lab.ext, to, "ext", 1, Duration::from_secs(10)).unwrap();
        traffic::http_get(&lab.container_ns(&c), to).unwrap();
        assert_eq!(
            srv.join().unwrap()[0].ip().to_string(),
            addr,
            "masquerading with the uplink's address"
        );
    }
}

#[test]
fn the_agent_removes_endpoints_whose_namespace_is_gone() {
    let lab = lab("agentrec");
    lab.ok(&["up", "--uplink", bpfnat_tests::UPLINK]).unwrap();
    let ns = nat_plumbing::netns::create(&lab.name("sandbox")).unwrap();
    lab.ok(&[
        "container",
        "add",
        &lab.name("c"),
        "--netns",
        ns.to_str().unwrap(),
    ])
    .unwrap();
    // The runtime deleted the sandbox while no agent was running.
    nat_plumbing::netns::remove(&ns).unwrap();
    let _agent = start_agent(&lab, 9973);
    assert!(
        json(&lab, &["container", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn the_agent_garbage_collects_dead_connections() {
    let lab = lab("agentgc");
    let _agent = start_agent(&lab, 9975);
    let c = lab.name("c");
    lab.ok(&["container", "add", &c]).unwrap();
    // Refused: the connection ends in CLOSE, whose timeout is 10 s.
    let refused = nat_plumbing::netns::run_in(&lab.container_ns(&c), || {
        Ok(TcpStream::connect_timeout(&v4(EXT_ADDR, 9099), Duration::from_secs(2)).is_err())
    })
    .unwrap();
    assert!(refused);
    let count = || {
        json(&lab, &["conntrack", "stats"])["connections"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(count(), 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while count() != 0 {
        assert!(
            Instant::now() < deadline,
            "the agent did not collect the closed connection"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn stalled_metrics_clients_do_not_hold_up_the_agent() {
    let lab = lab("agentslow");
    let _agent = start_agent(&lab, 9976);
    let answered = nat_plumbing::netns::run_in(&lab.node, || {
        let addr = SocketAddr::from(([127, 0, 0, 1], 9976));
        // Three clients that connect and say nothing: the agent gives each 2 s to speak.
        let _stalled: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(500)))
            .collect::<Result<_, _>>()?;
        std::thread::sleep(Duration::from_millis(200));
        // A probe meanwhile is answered at once, not after the stalled ones time out.
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n")?;
        let mut r = String::new();
        s.read_to_string(&mut r)?;
        Ok(r)
    })
    .expect("probe the agent while other clients stall");
    assert!(answered.ends_with("ok\n"), "{answered}");
}

/// Status line, headers (lower-case names), body.
type Reply = (String, Vec<(String, String)>, String);

/// One HTTP/1.1 response from `r`: status line, headers (lower-case names) and body; `head`
/// when it answers a HEAD request (no body follows whatever Content-Length says).
fn response(r: &mut std::io::BufReader<TcpStream>, head: bool) -> std::io::Result<Reply> {
    use std::io::BufRead as _;
    let mut status = String::new();
    r.read_line(&mut status)?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; if head { 0 } else { len }];
    r.read_exact(&mut body)?;
    Ok((
        status.trim_end().to_owned(),
        headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

#[test]
fn metrics_speak_http_as_scrapers_and_probes_expect() {
    let lab = lab("agenthttp");
    let _agent = start_agent(&lab, 9977);
    let replies = nat_plumbing::netns::run_in(&lab.node, || {
        let s = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], 9977)),
            Duration::from_millis(500),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut w = s.try_clone()?;
        let mut r = std::io::BufReader::new(s);
        // Three requests on one connection: keep-alive, a query string, HEAD.
        w.write_all(b"GET /metrics?name[]=bpfnat_packets_total HTTP/1.1\r\nHost: node\r\n\r\n")?;
        let a = response(&mut r, false)?;
        w.write_all(b"HEAD /healthz HTTP/1.1\r\nHost: node\r\n\r\n")?;
        let b = response(&mut r, true)?;
        w.write_all(b"GET /healthz?verbose=1 HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")?;
        let c = response(&mut r, false)?;
        Ok([a, b, c])
    })
    .expect("three requests on one connection");
    let [(s1, h1, metrics), (s2, _, empty), (s3, _, ok)] = replies;
    assert!(s1.starts_with("HTTP/1.1 200"), "{s1}");
    assert!(
        h1.iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("application/openmetrics-text")),
        "{h1:?}"
    );
    assert!(
        metrics.contains("bpfnat_packets_total{reason="),
        "{metrics}"
    );
    assert!(
        s2.starts_with("HTTP/1.1 200") && empty.is_empty(),
        "HEAD: {s2} {empty:?}"
    );
    assert!(
        s3.starts_with("HTTP/1.1 200") && ok == "ok\n",
        "{s3} {ok:?}"
    );
}
