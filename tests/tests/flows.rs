//! End-to-end packet flows through the datapath, with real sockets in namespaces.

use std::{net::Ipv4Addr, time::Duration};

use bpfnat_tests::{
    EXT_ADDR, NODE_ADDR, UPLINK, counter, flows, json, lab_up, lab_up6, ping, traffic, v4,
};

const C1: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);
const C2: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 3);
const GW: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
const WINDOW: Duration = Duration::from_secs(20);

/// An HTTP server on port 80 of every address of namespace `ns`, answering `n` requests
/// as `tag` within `WINDOW`.
fn serve80(ns: &std::path::Path, tag: &str, n: usize) -> traffic::Seen {
    traffic::http_server(ns, v4(Ipv4Addr::UNSPECIFIED, 80), tag, n, WINDOW).unwrap()
}

#[test]
fn bridge_forwarding_connects_containers_directly() {
    let lab = lab_up("f1");
    let (a, b) = (lab.name("a"), lab.name("b"));
    lab.ok(&["container", "add", &a, "--ip", "10.88.0.2"])
        .unwrap();
    lab.ok(&["container", "add", &b, "--ip", "10.88.0.3"])
        .unwrap();

    let srv = serve80(&lab.container_ns(&b), "b", 1);
    let body = traffic::http_get(&lab.container_ns(&a), v4(C2, 80)).unwrap();
    assert!(body.contains("you are 10.88.0.2:"), "b saw: {body}");
    assert_eq!(srv.join().unwrap()[0].ip(), C1);
    assert!(ping(&lab.container_ns(&b), C1), "ping b -> a");

    assert!(counter(&lab, "forward") > 0, "forwarded by the datapath");
    assert!(
        counter(&lab, "arp_reply") > 0,
        "ARP answered by the datapath"
    );
    assert!(
        flows(&lab).is_empty(),
        "container-to-container traffic needs no NAT state"
    );
}

#[test]
fn masquerade_rewrites_source_to_uplink_address() {
    let lab = lab_up("f2tcp");
    let c = lab.name("c");
    lab.ok(&["container", "add", &c, "--ip", "10.88.0.2"])
        .unwrap();
    let srv = traffic::http_server(&lab.ext, v4(EXT_ADDR, 9000), "ext", 1, WINDOW).unwrap();
    let body = traffic::http_get(&lab.container_ns(&c), v4(EXT_ADDR, 9000)).unwrap();
    let seen = srv.join().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].ip(),
        NODE_ADDR,
        "the external host must see the node's address"
    );
    assert!(body.contains(&format!("you are {NODE_ADDR}:")));

    let f = flows(&lab);
    let flow = f
        .iter()
        .find(|f| f["proto"] == "tcp" && f["original"]["dport"] == 9000)
        .unwrap_or_else(|| panic!("no conntrack entry for the connection: {f:?}"));
    assert_eq!(flow["kind"], "masquerade");
    assert_eq!(flow["original"]["src"], C1.to_string());
    assert_eq!(flow["original"]["dst"], EXT_ADDR.to_string());
    assert_eq!(flow["reply"]["src"], EXT_ADDR.to_string());
    assert_eq!(flow["reply"]["dst"], NODE_ADDR.to_string());
    assert_eq!(flow["reply"]["dport"], u64::from(seen[0].port()));
    assert!(flow["original"]["packets"].as_u64().unwrap() >= 3);
    assert!(flow["reply"]["packets"].as_u64().unwrap() >= 2);
    assert!(counter(&lab, "snat_new") >= 1);
    assert!(
        counter(&lab, "next_hop_cached") >= 1,
        "later packets skip the FIB lookup"
    );
}

#[test]
fn masquerade_carries_udp_and_ping() {
    let lab = lab_up("f2udp");
    let c = lab.name("c");
    lab.ok(&["container", "add", &c]).unwrap();
    let ns = lab.container_ns(&c);
    let echo = traffic::udp_echo(&lab.ext, v4(EXT_ADDR, 7777), 10, WINDOW).unwrap();
    let reply = traffic::udp_ask(
        &ns,
        v4(Ipv4Addr::UNSPECIFIED, 20000),
        v4(EXT_ADDR, 7777),
        b"hi",
    )
    .unwrap();
    assert_eq!(
        reply,
        format!("{NODE_ADDR}:20000 hi"),
        "source port is kept when free"
    );

    assert!(ping(&ns, EXT_ADDR), "ping through MASQUERADE");
    let f = flows(&lab);
    assert!(
        f.iter().any(|f| f["proto"] == "udp"
            && f["reply"]["dst"] == NODE_ADDR.to_string()
            && f["state"] == "REPLIED"),
        "udp flow: {f:?}"
    );
    assert!(
        f.iter().any(|f| f["proto"] == "icmp"
            && f["original"]["src"] == C1.to_string()
            && f["reply"]["dst"] == NODE_ADDR.to_string()),
        "icmp flow: {f:?}"
    );
    drop(echo);
}

#[test]
fn masquerade_allocates_another_port_when_the_source_port_is_taken() {
    let lab = lab_up("f2port");
    let (a, b) = (lab.name("a"), lab.name("b"));
    lab.ok(&["container", "add", &a]).unwrap();
    lab.ok(&["container", "add", &b]).unwrap();
    let echo = traffic::udp_echo(&lab.ext, v4(EXT_ADDR, 7777), 10, WINDOW).unwrap();
    let from = v4(Ipv4Addr::UNSPECIFIED, 21000);
    let ra = traffic::udp_ask(&lab.container_ns(&a), from, v4(EXT_ADDR, 7777), b"a").unwrap();
    let rb = traffic::udp_ask(&lab.container_ns(&b), from, v4(EXT_ADDR, 7777), b"b").unwrap();
    assert_eq!(ra, format!("{NODE_ADDR}:21000 a"));
    let (peer, payload) = rb.split_once(' ').unwrap();
    assert_eq!(payload, "b", "each reply reaches the container that asked");
    let peer: std::net::SocketAddr = peer.parse().unwrap();
    assert_eq!(peer.ip(), NODE_ADDR);
    assert_ne!(
        peer.port(),
        21000,
        "the second container needs another port"
    );
    assert!((1024..=65535).contains(&peer.port()));
    drop(echo);
}

#[test]
fn masquerade_never_collides_with_the_nodes_own_connections() {
    use std::io::{Read as _, Write as _};
    const PORT: u16 = 45000; // inside the node's ephemeral range
    let lab = bpfnat_tests::lab("f2host");
    lab.ok(&["up", "--uplink", UPLINK, "--masquerade-avoid-host-ports"])
        .unwrap();
    let c = lab.name("c");
    lab.ok(&["container", "add", &c]).unwrap();
    let listener = nat_plumbing::netns::run_in(&lab.ext, || {
        Ok(std::net::TcpListener::bind(v4(EXT_ADDR, 9000))?)
    })
    .unwrap();
    // The node talks to the external host from its uplink address and port 45000 ...
    let mut node = nat_plumbing::netns::run_in(&lab.node, || {
        let s = std::net::TcpStream::connect(v4(EXT_ADDR, 9000));
        // Bind explicitly: a node connection that happens to use 45000.
        drop(s);
        let sock = libc_bind_connect(v4(NODE_ADDR, PORT), v4(EXT_ADDR, 9000))?;
        Ok(sock)
    })
    .unwrap();
    let (_, _) = listener.accept().unwrap();
    let (mut node_peer, node_addr) = listener.accept().unwrap();
    assert_eq!(node_addr, v4(NODE_ADDR, PORT));
    // ... and a container uses the same source port to the same destination.
    let mut cont = nat_plumbing::netns::run_in(&lab.container_ns(&c), || {
        Ok(libc_bind_connect(
            v4(Ipv4Addr::UNSPECIFIED, PORT),
            v4(EXT_ADDR, 9000),
        )?)
    })
    .unwrap();
    let (mut cont_peer, cont_addr) = listener.accept().unwrap();
    assert_eq!(cont_addr.ip(), NODE_ADDR);
    assert_ne!(
        cont_addr.port(),
        PORT,
        "MASQUERADE left the node's port alone"
    );
    // Both connections carry their own data.
    for (mine, peer, tag) in [
        (&mut node, &mut node_peer, b'n'),
        (&mut cont, &mut cont_peer, b'c'),
    ] {
        mine.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        peer.write_all(&[tag]).unwrap();
        let mut b = [0u8; 1];
        mine.read_exact(&mut b).unwrap();
        assert_eq!(b[0], tag);
    }
}

/// A TCP connection from exactly `local` (SO_REUSEADDR, so the port can be chosen).
fn libc_bind_connect(
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd as _;
    let std::net::SocketAddr::V4(l) = local else {
        unreachable!("IPv4 only")
    };
    let std::net::SocketAddr::V4(r) = remote else {
        unreachable!("IPv4 only")
    };
    let sin = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: plain socket calls on a descriptor owned by the returned stream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let s = std::net::TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            4,
        );
        let la = sin(l);
        if libc::bind(
            fd,
            (&raw const la).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let ra = sin(r);
        if libc::connect(
            fd,
            (&raw const ra).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(s)
    }
}

#[test]
fn published_tcp_port_preserves_client_address() {
    let lab = lab_up("f3tcp");
    let c = lab.name("web");
    lab.ok(&["container", "add", &c, "-p", "8080:80"]).unwrap();
    let srv = serve80(&lab.container_ns(&c), "web", 1);
    let body = traffic::http_get(&lab.ext, v4(NODE_ADDR, 8080)).unwrap();
    assert!(body.starts_with("hello from web"));
    let seen = srv.join().unwrap();
    assert_eq!(
        seen[0].ip(),
        EXT_ADDR,
        "the container sees the real client address"
    );
    let f = flows(&lab);
    let flow = f
        .iter()
        .find(|f| f["kind"] == "published")
        .expect("published flow");
    assert_eq!(flow["original"]["dst"], NODE_ADDR.to_string());
    assert_eq!(flow["original"]["dport"], 8080);
    assert_eq!(flow["reply"]["src"], C1.to_string());
    assert_eq!(flow["reply"]["sport"], 80);
    assert!(counter(&lab, "dnat_new") >= 1);
    assert!(
        counter(&lab, "deliver") >= 3,
        "redirected into the container"
    );
}

#[test]
fn published_udp_port_preserves_client_address() {
    let lab = lab_up("f3udp");
    let c = lab.name("dns");
    lab.ok(&["container", "add", &c, "-p", "5353:53/udp"])
        .unwrap();
    let echo = traffic::udp_echo(
        &lab.container_ns(&c),
        v4(Ipv4Addr::UNSPECIFIED, 53),
        10,
        WINDOW,
    )
    .unwrap();
    let reply = traffic::udp_ask(&lab.ext, v4(EXT_ADDR, 45000), v4(NODE_ADDR, 5353), b"q").unwrap();
    assert_eq!(reply, format!("{EXT_ADDR}:45000 q"));
    drop(echo);
    // Nothing else is reachable: an unpublished port goes to the node's own stack.
    assert!(traffic::udp_ask(&lab.ext, v4(EXT_ADDR, 45001), v4(NODE_ADDR, 5354), b"q").is_err());
}

#[test]
fn node_and_containers_reach_each_other() {
    let lab = lab_up("f6");
    let c = lab.name("c");
    lab.ok(&["container", "add", &c, "--ip", "10.88.0.2"])
        .unwrap();
    let ns = lab.container_ns(&c);

    // Container -> node, on the gateway address and on the uplink address.
    let srv = traffic::http_server(
        &lab.node,
        v4(Ipv4Addr::UNSPECIFIED, 7000),
        "node",
        2,
        WINDOW,
    )
    .unwrap();
    assert!(
        traffic::http_get(&ns, v4(GW, 7000))
            .unwrap()
            .contains("you are 10.88.0.2:")
    );
    assert!(
        traffic::http_get(&ns, v4(NODE_ADDR, 7000))
            .unwrap()
            .contains("you are 10.88.0.2:")
    );
    srv.join().unwrap();
    assert!(ping(&ns, GW), "ping the gateway");

    // Node -> container.
    let srv = serve80(&ns, "c", 1);
    assert!(
        traffic::http_get(&lab.node, v4(C1, 80))
            .unwrap()
            .contains("you are 10.88.0.1:")
    );
    srv.join().unwrap();
    assert!(ping(&lab.node, C1), "ping the container from the node");
    assert!(
        flows(&lab).is_empty(),
        "node <-> container traffic is not translated"
    );
}

#[test]
fn masquerade_carries_200_concurrent_connections() {
    let lab = lab_up("f2many");
    let c = lab.name("c");
    lab.ok(&["container", "add", &c]).unwrap();
    concurrent_connections(&lab, &c, v4(EXT_ADDR, 9000), NODE_ADDR.into());
}

#[test]
fn nat66_carries_200_concurrent_connections() {
    let lab = lab_up6("f2many6");
    let c = lab.name("c");
    lab.ok(&["container", "add", &c]).unwrap();
    let ext6: std::net::Ipv6Addr = bpfnat_tests::EXT6.parse().unwrap();
    let node6: std::net::Ipv6Addr = bpfnat_tests::NODE6.parse().unwrap();
    concurrent_connections(&lab, &c, (ext6, 9000).into(), node6.into());
}

/// 200 concurrent connections from container `c` to `server` (outside), masqueraded to
/// `snat`: each answered, each its own port and conntrack connection, no half connections.
fn concurrent_connections(
    lab: &bpfnat_tests::Lab,
    c: &str,
    server: std::net::SocketAddr,
    snat: std::net::IpAddr,
) {
    const N: usize = 200;
    let any = std::net::SocketAddr::new(
        if server.is_ipv6() {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        } else {
            Ipv4Addr::UNSPECIFIED.into()
        },
        server.port(),
    );
    let srv = traffic::http_server(&lab.ext, any, "ext", N, Duration::from_secs(60)).unwrap();
    let ns = lab.container_ns(c);
    let you_are = match snat {
        std::net::IpAddr::V4(a) => format!("you are {a}:"),
        std::net::IpAddr::V6(a) => format!("you are [{a}]:"),
    };
    let clients: Vec<_> = (0..N)
        .map(|_| {
            let ns = ns.clone();
            std::thread::spawn(move || traffic::http_get(&ns, server))
        })
        .collect();
    let ok = clients
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|r| r.as_ref().is_ok_and(|b| b.contains(&you_are)))
        .count();
    let seen = srv.join().unwrap();
    assert_eq!(ok, N, "every connection got its answer ({you_are})");
    assert_eq!(seen.len(), N);
    assert!(seen.iter().all(|p| p.ip() == snat));
    // One tracked connection per client connection; the distinct source ports the external
    // host saw are the MASQUERADE ports. (A closed connection's entries may already have
    // been reclaimed by a later one, so the table can hold fewer than N.)
    assert_eq!(
        counter(lab, "snat_new"),
        N as u64,
        "one conntrack connection per client connection"
    );
    let ports: std::collections::HashSet<u16> =
        seen.iter().map(std::net::SocketAddr::port).collect();
    assert!(
        ports.len() >= N * 9 / 10,
        "connections got their own ports: {}",
        ports.len()
    );
    let s = json(lab, &["conntrack", "stats"]);
    assert!(s["entries"].as_u64().unwrap() <= 2 * N as u64);
    assert_eq!(s["orphans"], 0, "no half connections");
}

/// Poll `bpfnat conntrack list` until a flow matches `pred` (the last ACK of a close may
/// still be in flight when the client returns).
fn wait_flow(
    lab: &bpfnat_tests::Lab,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let f = flows(lab);
        if let Some(x) = f.iter().find(|x| pred(x)) {
            return x.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no matching flow in {f:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn conntrack_follows_tcp_states_and_gc_expires_dead_connections() {
    use std::io::{Read as _, Write as _};
    let lab = lab_up("ctgc");
    let c = lab.name("c");
    lab.ok(&["container", "add", &c]).unwrap();
    let ns = lab.container_ns(&c);

    // A finished exchange walks to TIME_WAIT.
    let srv = traffic::http_server(&lab.ext, v4(EXT_ADDR, 9000), "ext", 1, WINDOW).unwrap();
    traffic::http_get(&ns, v4(EXT_ADDR, 9000)).unwrap();
    srv.join().unwrap();
    wait_flow(&lab, |f| {
        f["original"]["dport"] == 9000 && f["state"] == "TIME_WAIT"
    });

    // An open connection is ESTABLISHED.
    let listener = nat_plumbing::netns::run_in(&lab.ext, || {
        Ok(std::net::TcpListener::bind(v4(EXT_ADDR, 9001))?)
    })
    .unwrap();
    let mut held = nat_plumbing::netns::run_in(&ns, || {
        Ok(std::net::TcpStream::connect(v4(EXT_ADDR, 9001))?)
    })
    .unwrap();
    let (mut peer, _) = listener.accept().unwrap();
    held.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    peer.read_exact(&mut one).unwrap();
    wait_flow(&lab, |f| {
        f["original"]["dport"] == 9001 && f["state"] == "ESTABLISHED"
    });

    // A refused connection ends in CLOSE (RST), whose timeout is 10 s.
    let refused = nat_plumbing::netns::run_in(&ns, || {
        Ok(std::net::TcpStream::connect(v4(EXT_ADDR, 9002)).is_err())
    })
    .unwrap();
    assert!(refused, "nothing listens on 9002");
    wait_flow(&lab, |f| {
        f["original"]["dport"] == 9002 && f["state"] == "CLOSE"
    });

    std::thread::sleep(Duration::from_secs(11));
    let gc = json(&lab, &["conntrack", "gc"]);
    assert_eq!(
        gc["connections"], 1,
        "only the closed connection is past its timeout"
    );
    let f = flows(&lab);
    assert!(f.iter().all(|x| x["original"]["dport"] != 9002), "{f:?}");
    assert!(
        f.iter().any(|x| x["original"]["dport"] == 9001),
        "live connection kept"
    );
    // The kept connection still works after gc.
    held.write_all(b"y").unwrap();
    peer.read_exact(&mut one).unwrap();
    assert_eq!(&one, b"y");

    let flushed = json(&lab, &["conntrack", "flush"]);
    assert_eq!(flushed["connections"], 2);
    assert!(flows(&lab).is_empty());
}

#[test]
fn hairpin_reaches_published_ports_from_containers_including_their_own() {
    let lab = lab_up("f5");
    let (web, other) = (lab.name("web"), lab.name("other"));
    lab.ok(&[
        "container",
        "add",
        &web,
        "--ip",
        "10.88.0.2",
        "-p",
        "8080:80",
    ])
    .unwrap();
    lab.ok(&["container", "add", &other, "--ip", "10.88.0.3"])
        .unwrap();
    let srv = serve80(&lab.container_ns(&web), "web", 2);
    let from_other = traffic::http_get(&lab.container_ns(&other), v4(NODE_ADDR, 8080)).unwrap();
    let from_self = traffic::http_get(&lab.container_ns(&web), v4(NODE_ADDR, 8080)).unwrap();
    let seen = srv.join().unwrap();
    assert!(from_other.starts_with("hello from web") && from_self.starts_with("hello from web"));
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter().all(|p| p.ip() == GW),
        "hairpin traffic comes from the gateway: {seen:?}"
    );
    let f = flows(&lab);
    let hp: Vec<_> = f.iter().filter(|f| f["kind"] == "hairpin").collect();
    assert_eq!(hp.len(), 2, "{f:?}");
    assert!(
        hp.iter()
            .all(|f| f["original"]["dst"] == NODE_ADDR.to_string()
                && f["reply"]["src"] == C1.to_string())
    );
    assert!(counter(&lab, "hairpin_new") >= 2);
}

#[test]
fn container_del_forgets_the_connections_to_its_ports_and_keeps_the_others() {
    let lab = lab_up("delfg");
    let (web, other) = (lab.name("web"), lab.name("other"));
    lab.ok(&["container", "add", &web, "-p", "8080:80"])
        .unwrap();
    lab.ok(&["container", "add", &other]).unwrap();
    let srv = serve80(&lab.container_ns(&web), "web", 1);
    let ext = traffic::http_server(&lab.ext, v4(EXT_ADDR, 9000), "ext", 1, WINDOW).unwrap();
    // From the other container: a hairpin to web's published port (tracked as the other
    // container's), and a connection of its own to the outside.
    let ns = lab.container_ns(&other);
    assert!(
        traffic::http_get(&ns, v4(NODE_ADDR, 8080))
            .unwrap()
            .starts_with("hello from web")
    );
    traffic::http_get(&ns, v4(EXT_ADDR, 9000)).unwrap();
    srv.join().unwrap();
    ext.join().unwrap();
    let kinds = |lab: &bpfnat_tests::Lab| -> Vec<String> {
        let mut k: Vec<String> = flows(lab)
            .iter()
            .map(|f| f["kind"].as_str().unwrap().to_owned())
            .collect();
        k.sort();
        k
    };
    assert_eq!(kinds(&lab), ["hairpin", "masquerade"]);

    lab.ok(&["container", "del", &web]).unwrap();
    assert_eq!(
        kinds(&lab),
        ["masquerade"],
        "the hairpin to its port goes with web; the other container's own connection stays"
    );
}

#[test]
fn node_processes_reach_published_ports_on_localhost_and_node_address() {
    let lab = lab_up("f4");
    let web = lab.name("web");
    lab.ok(&[
        "container",
        "add",
        &web,
        "--ip",
        "10.88.0.2",
        "-p",
        "8080:80",
        "-p",
        "127.0.0.1:8081:80",
        "-p",
        "5353:53/udp",
    ])
    .unwrap();
    let ns = lab.container_ns(&web);
    let srv = serve80(&ns, "web", 4);
    let localhost = Ipv4Addr::LOCALHOST;
    for target in [
        v4(localhost, 8080),
        v4(NODE_ADDR, 8080),
        v4(localhost, 8081),
    ] {
        let body =
            traffic::http_get(&lab.node, target).unwrap_or_else(|e| panic!("{target}: {e:#}"));
        assert!(
            body.contains("you are 10.88.0.1:"),
            "{target}: the container sees the node: {body}"
        );
    }
    // The application sees the address it connected to, not the container's.
    let peer = nat_plumbing::netns::run_in(&lab.node, move || {
        let s = std::net::TcpStream::connect(v4(localhost, 8080))?;
        Ok(s.peer_addr()?)
    })
    .unwrap();
    assert_eq!(peer, v4(localhost, 8080));
    assert_eq!(srv.join().unwrap().len(), 4);

    // UDP: the reply appears to come from 127.0.0.1:5353 (udp_ask insists on it).
    let echo = traffic::udp_echo(&ns, v4(Ipv4Addr::UNSPECIFIED, 53), 1, WINDOW).unwrap();
    let reply = traffic::udp_ask(
        &lab.node,
        v4(Ipv4Addr::UNSPECIFIED, 0),
        v4(localhost, 5353),
        b"q",
    )
    .unwrap();
    assert!(reply.starts_with("10.88.0.1:"), "{reply}");
    assert_eq!(echo.join().unwrap().len(), 1);
    assert!(counter(&lab, "sock_xlate") >= 5);

    // Other namespaces' localhost is theirs: the socket programs act only in the node.
    assert!(traffic::http_get(&lab.ext, v4(localhost, 8080)).is_err());
}

#[test]
fn fragmented_udp_datagrams_are_translated_both_ways() {
    let lab = lab_up("frags");
    let c = lab.name("c");
    lab.ok(&["container", "add", &c, "-p", "5353:53/udp"])
        .unwrap();
    let ns = lab.container_ns(&c);
    // 4000 bytes: three fragments at MTU 1500, each way.
    let big: Vec<u8> = (0..4000u32).map(|i| b'a' + (i % 26) as u8).collect();

    // Out through MASQUERADE, and the fragmented echo back in.
    let echo = traffic::udp_echo(&lab.ext, v4(EXT_ADDR, 7777), 1, WINDOW).unwrap();
    let reply = traffic::udp_ask(
        &ns,
        v4(Ipv4Addr::UNSPECIFIED, 27000),
        v4(EXT_ADDR, 7777),
        &big,
    )
    .unwrap();
    assert_eq!(reply.len(), format!("{NODE_ADDR}:27000 ").len() + big.len());
    assert!(
        reply.starts_with(&format!("{NODE_ADDR}:27000 "))
            && reply.ends_with(std::str::from_utf8(&big).unwrap())
    );
    assert_eq!(echo.join().unwrap()[0].ip(), NODE_ADDR);

    // In through a published port, and the fragmented answer back out.
    let echo = traffic::udp_echo(&ns, v4(Ipv4Addr::UNSPECIFIED, 53), 1, WINDOW).unwrap();
    let reply = traffic::udp_ask(&lab.ext, v4(EXT_ADDR, 47001), v4(NODE_ADDR, 5353), &big).unwrap();
    assert!(reply.starts_with(&format!("{EXT_ADDR}:47001 ")) && reply.len() > big.len());
    assert_eq!(echo.join().unwrap().len(), 1);
    assert_eq!(counter(&lab, "drop_fragment"), 0);
}

#[test]
fn a_full_conntrack_table_evicts_the_least_recently_used_and_keeps_working() {
    const FLOWS: u16 = 900;
    let lab = bpfnat_tests::lab("ctfull");
    lab.ok(&["up", "--uplink", UPLINK, "--conntrack-max", "1024"])
        .unwrap();
    let c = lab.name("c");
    lab.ok(&["container", "add", &c]).unwrap();
    let echo = traffic::udp_echo(
        &lab.ext,
        v4(EXT_ADDR, 7777),
        usize::from(FLOWS),
        Duration::from_secs(60),
    )
    .unwrap();
    // 900 connections need 1800 entries: twice what the table holds.
    let answered = nat_plumbing::netns::run_in(&lab.container_ns(&c), || {
        let mut ok = 0;
        let mut buf = [0u8; 256];
        for i in 0..FLOWS {
            let s = std::net::UdpSocket::bind(v4(Ipv4Addr::UNSPECIFIED, 20000 + i))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.send_to(b"x", v4(EXT_ADDR, 7777))?;
            if s.recv_from(&mut buf).is_ok() {
                ok += 1;
            }
        }
        Ok(ok)
    })
    .unwrap();
    assert_eq!(
        answered, FLOWS,
        "every new connection was admitted and answered"
    );
    assert_eq!(echo.join().unwrap().len(), usize::from(FLOWS));
    let s = json(&lab, &["conntrack", "stats"]);
    assert_eq!(s["max_entries"], 1024);
    assert!(s["entries"].as_u64().unwrap() <= 1024, "{s}");
    // The newest connection survived eviction.
    let last = 20000 + FLOWS - 1;
    assert!(
        flows(&lab)
            .iter()
            .any(|f| f["original"]["sport"] == u64::from(last))
    );
    // gc clears half connections the eviction left behind.
    let _ = json(&lab, &["conntrack", "gc"]);
    assert_eq!(json(&lab, &["conntrack", "stats"])["orphans"], 0);
}
