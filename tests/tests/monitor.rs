//! `bpfnat monitor`: what a user watching the datapath sees for real packets on the wire —
//! the drops with their reason and tuple, the translations of a new connection — what its
//! filters leave out, and that the programs stop emitting once it exits.

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    process::Stdio,
    sync::mpsc::RecvTimeoutError,
    time::{Duration, Instant},
};

use bpfnat_tests::{
    ContainerInfo, EXT_ADDR, Lab, NODE_ADDR, UPLINK, add_container, counter, lab_up,
    monitor::Monitor,
    packet::{self, PROTO_TCP, PROTO_UDP},
    pins, traffic, udp_out, uplink_mac, v4, wire,
};
use serde_json::Value;

const EXT_MAC: [u8; 6] = [0x02, 0, 198, 51, 100, 1];
/// A source address no container owns.
const FORGED: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 99);
const SYN: u8 = 0x02;

/// A UDP datagram container `c` sends from `FORGED` (an address it does not own).
fn spoof(c: &ContainerInfo, sport: u16) -> Vec<u8> {
    packet::frame(
        c.mac,
        c.host_mac,
        FORGED,
        EXT_ADDR,
        PROTO_UDP,
        &packet::udp(FORGED, EXT_ADDR, sport, 53, true),
    )
}

fn from_segment(lab: &Lab, dst: Ipv4Addr, l4: Vec<u8>, proto: u8) -> Vec<u8> {
    packet::frame(EXT_MAC, uplink_mac(lab), EXT_ADDR, dst, proto, &l4)
}

fn tuple(v: &Value) -> (String, u64, String, u64) {
    (
        v["src"].as_str().unwrap_or_default().to_owned(),
        v["sport"].as_u64().unwrap_or_default(),
        v["dst"].as_str().unwrap_or_default().to_owned(),
        v["dport"].as_u64().unwrap_or_default(),
    )
}

/// The events of `reason` whose `field` is `value`.
fn where_<'a>(events: &'a [Value], reason: &str, field: &str, value: &str) -> Vec<&'a Value> {
    with_reason(events, reason)
        .into_iter()
        .filter(|e| e[field] == value)
        .collect()
}

fn with_reason<'a>(events: &'a [Value], reason: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["reason"] == reason).collect()
}

#[test]
fn drops_show_their_reason_tuple_and_container() {
    let lab = lab_up("mon-drop");
    let c = add_container(&lab, "c", &[]);
    let name = lab.name("c");
    let mon = Monitor::start(&lab, &[]);

    // A container forging its source, an outside host knocking on a port nobody
    // published, and a packet whose IP header claims more than the frame holds.
    let forged = spoof(&c, 5555);
    wire::send(&c.ns, "eth0", vec![forged]);
    let knock = from_segment(
        &lab,
        c.ip,
        packet::tcp(EXT_ADDR, c.ip, 40000, 22, SYN),
        PROTO_TCP,
    );
    let mut short = from_segment(
        &lab,
        NODE_ADDR,
        packet::udp(EXT_ADDR, NODE_ADDR, 4000, 4001, true),
        PROTO_UDP,
    );
    short[16..18].copy_from_slice(&400u16.to_be_bytes());
    wire::send(&lab.ext, "eth0", vec![knock, short]);

    let events = mon.events(Duration::from_secs(2));
    let spoofed = with_reason(&events, "drop_spoof");
    assert_eq!(spoofed.len(), 1, "{events:#?}");
    let e = spoofed[0];
    assert_eq!(
        (&e["type"], &e["verdict"], &e["program"], &e["proto"]),
        (
            &Value::from("drop"),
            &Value::from("drop"),
            &Value::from("tc_container"),
            &Value::from("udp")
        )
    );
    assert_eq!(e["container"], name.as_str(), "{e}");
    assert_eq!(
        tuple(&e["before"]),
        (FORGED.to_string(), 5555, EXT_ADDR.to_string(), 53)
    );
    assert!(e["after"].is_null());

    let knocked = with_reason(&events, "drop_not_published");
    assert_eq!(knocked.len(), 1, "{events:#?}");
    assert_eq!(knocked[0]["program"], "tc_uplink");
    assert_eq!(knocked[0]["interface"], UPLINK);
    assert_eq!(
        tuple(&knocked[0]["before"]),
        (EXT_ADDR.to_string(), 40000, c.ip.to_string(), 22)
    );
    assert_eq!(knocked[0]["proto"], "tcp");

    let truncated = with_reason(&events, "drop_truncated");
    assert_eq!(truncated.len(), 1, "{events:#?}");
    assert_eq!(
        tuple(&truncated[0]["before"]),
        (EXT_ADDR.to_string(), 4000, NODE_ADDR.to_string(), 4001)
    );
    // Each event is the drop the counters count.
    for r in ["drop_spoof", "drop_not_published", "drop_truncated"] {
        assert_eq!(counter(&lab, r), 1, "{r}");
    }
}

#[test]
fn a_trace_shows_a_new_masquerade_connection_and_its_translation() {
    let lab = lab_up("mon-trace");
    let c = add_container(&lab, "c", &[]);
    let mon = Monitor::start(&lab, &["--type", "trace", "--proto", "udp"]);
    let seen = udp_out(&lab, &c, &[41000], 7000);
    let events = mon.events(Duration::from_secs(1));

    let new = with_reason(&events, "snat_new");
    assert_eq!(new.len(), 1, "{events:#?}");
    let e = new[0];
    assert_eq!(
        (&e["type"], &e["verdict"]),
        (&Value::from("trace"), &Value::from("forward"))
    );
    assert_eq!(
        tuple(&e["before"]),
        (c.ip.to_string(), 41000, EXT_ADDR.to_string(), 7000)
    );
    // The source the peer saw is the one the event says the packet left with.
    let (src, sport, dst, dport) = tuple(&e["after"]);
    assert_eq!(
        (src.as_str(), dst.as_str(), dport),
        (
            NODE_ADDR.to_string().as_str(),
            EXT_ADDR.to_string().as_str(),
            7000
        )
    );
    assert_eq!(seen, vec![v4(NODE_ADDR, sport as u16)]);
    assert_eq!(e["out_interface"], UPLINK);

    // The answer: a tracked packet translated back into the container.
    let back = where_(&events, "ct_hit", "program", "tc_uplink");
    assert_eq!(back.len(), 1, "{events:#?}");
    assert_eq!(
        tuple(&back[0]["after"]),
        (EXT_ADDR.to_string(), 7000, c.ip.to_string(), 41000)
    );
    assert_eq!(back[0]["out_container"], lab.name("c").as_str());
    // Nothing but UDP passed the filter.
    assert!(events.iter().all(|e| e["proto"] == "udp"), "{events:#?}");
}

#[test]
fn filters_leave_out_what_they_do_not_name() {
    let lab = lab_up("mon-filter");
    let c = add_container(&lab, "c", &[]);
    let mon = Monitor::start(&lab, &["--reason", "drop_spoof", "--port", "5555"]);
    // Kept: a spoof from port 5555. Left out: a spoof from another port, and a drop of
    // another reason on port 5555.
    wire::send(&c.ns, "eth0", vec![spoof(&c, 5555), spoof(&c, 6666)]);
    let knock = from_segment(
        &lab,
        c.ip,
        packet::tcp(EXT_ADDR, c.ip, 5555, 22, SYN),
        PROTO_TCP,
    );
    wire::send(&lab.ext, "eth0", vec![knock]);
    let events = mon.events(Duration::from_secs(2));
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["reason"], "drop_spoof");
    assert_eq!(events[0]["before"]["sport"], 5555);
    // All three were dropped.
    assert_eq!(counter(&lab, "drop_spoof"), 2);
    assert_eq!(counter(&lab, "drop_not_published"), 1);

    let bad = lab.run(&["monitor", "--reason", "spoof"]).unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("drop_spoof"));
}

#[test]
fn the_programs_stop_emitting_when_the_monitor_exits() {
    let lab = lab_up("mon-exit");
    let c = add_container(&lab, "c", &[]);
    let requested = || bpfnat::datapath::monitor::requested(&pins(&lab)).unwrap();
    assert_eq!(requested(), 0, "nobody listens yet");
    let mut mon = Monitor::start(&lab, &["--type", "all"]);
    assert_ne!(requested(), 0, "the programs emit while the monitor runs");
    // One reader at a time.
    let second = lab.run(&["monitor"]).unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another `bpfnat monitor`"),
        "{second:?}"
    );
    let forged = spoof(&c, 5555);
    wire::send(&c.ns, "eth0", vec![forged.clone()]);
    assert_eq!(
        with_reason(&mon.events(Duration::from_secs(1)), "drop_spoof").len(),
        1
    );
    assert!(mon.stop().success(), "Ctrl-C ends the monitor cleanly");
    assert_eq!(requested(), 0, "nothing is emitted once it is gone");
    // The datapath goes on dropping and counting without it.
    wire::send(&c.ns, "eth0", vec![forged]);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(counter(&lab, "drop_spoof"), 2);
}

#[test]
fn a_closed_pipe_ends_the_monitor_quietly() {
    let lab = lab_up("mon-pipe");
    let c = add_container(&lab, "c", &[]);
    let mut child = lab
        .bpfnat(&["monitor"])
        .unwrap()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut ready = String::new();
    err.read_line(&mut ready).unwrap();
    let forged = spoof(&c, 5555);
    // `bpfnat monitor | head -1`: one line read, then the reader is gone.
    wire::send(&c.ns, "eth0", vec![forged.clone()]);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.contains("drop_spoof"), "{line}");
    drop(out);
    let end = Instant::now() + Duration::from_secs(5);
    let status = loop {
        // The next event finds the pipe closed.
        wire::send(&c.ns, "eth0", vec![forged.clone()]);
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "the monitor outlived its reader");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert!(status.success(), "{status}: {rest}");
    assert!(rest.is_empty(), "{rest}");
    assert_eq!(
        bpfnat::datapath::monitor::requested(&pins(&lab)).unwrap(),
        0
    );
}

#[test]
fn the_xdp_fast_path_traces_what_it_translates() {
    let lab = bpfnat_tests::lab("mon-xdp");
    // XDP cannot complete partial checksums: the outside host sends complete ones.
    lab.ext_tx_checksum(false).unwrap();
    lab.ok(&["up", "--uplink", UPLINK, "--xdp", "generic"])
        .unwrap();
    let c = add_container(&lab, "c", &[]);
    let mon = Monitor::start(&lab, &["--type", "trace"]);
    udp_out(&lab, &c, &[43000], 7300);
    let events = mon.events(Duration::from_secs(1));
    // Out by TC (a new connection), back by XDP (a tracked packet), each with its tuples.
    let out = with_reason(&events, "snat_new");
    assert_eq!(out.len(), 1, "{events:#?}");
    assert_eq!(out[0]["program"], "tc_container");
    let back = with_reason(&events, "ct_hit");
    assert_eq!(back.len(), 1, "{events:#?}");
    assert_eq!(back[0]["program"], "xdp_uplink");
    assert_eq!(back[0]["interface"], UPLINK);
    assert_eq!(
        tuple(&back[0]["after"]),
        (EXT_ADDR.to_string(), 7300, c.ip.to_string(), 43000)
    );
    assert_eq!(counter(&lab, "xdp_deliver"), 1);
}

#[test]
fn traces_show_forwarding_between_containers_and_static_nat() {
    let lab = lab_up("mon-stateless");
    let a = add_container(&lab, "a", &[]);
    let b = add_container(&lab, "b", &[]);
    let internal: Ipv4Addr = "10.88.0.50".parse().unwrap();
    let external: Ipv4Addr = "198.51.100.10".parse().unwrap();
    let s = bpfnat_tests::static_container(&lab, "s", "10.88.0.50", "198.51.100.10");
    let mon = Monitor::start(&lab, &["--type", "trace", "--proto", "udp"]);

    // F1: a to b, untranslated, straight into b.
    let window = Duration::from_secs(3);
    let echo = traffic::udp_echo(&b.ns, v4(b.ip, 7400), 1, window).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    traffic::udp_ask(&a.ns, v4(a.ip, 44000), v4(b.ip, 7400), b"x").unwrap();
    assert_eq!(echo.join().unwrap(), vec![v4(a.ip, 44000)]);
    // F8: the outside host to the external address, translated to the internal one.
    let echo = traffic::udp_echo(&s, v4(internal, 7500), 1, window).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    traffic::udp_ask(&lab.ext, v4(EXT_ADDR, 45000), v4(external, 7500), b"y").unwrap();
    assert_eq!(echo.join().unwrap(), vec![v4(EXT_ADDR, 45000)]);
    let events = mon.events(Duration::from_secs(1));

    let f1 = where_(&events, "forward", "container", &lab.name("a"));
    assert_eq!(f1.len(), 1, "{events:#?}");
    let ab = (a.ip.to_string(), 44000, b.ip.to_string(), 7400);
    assert_eq!(tuple(&f1[0]["before"]), ab);
    assert_eq!(tuple(&f1[0]["after"]), ab);
    assert_eq!(f1[0]["out_container"], lab.name("b").as_str());

    let inbound = where_(&events, "static_nat", "program", "tc_uplink");
    assert_eq!(inbound.len(), 1, "{events:#?}");
    assert_eq!(
        tuple(&inbound[0]["before"]),
        (EXT_ADDR.to_string(), 45000, external.to_string(), 7500)
    );
    assert_eq!(
        tuple(&inbound[0]["after"]),
        (EXT_ADDR.to_string(), 45000, internal.to_string(), 7500)
    );
    assert_eq!(inbound[0]["out_container"], lab.name("s").as_str());
    // The answer leaves with the external address.
    let outbound = where_(&events, "static_nat", "program", "tc_container");
    assert_eq!(outbound.len(), 1, "{events:#?}");
    assert_eq!(
        tuple(&outbound[0]["after"]),
        (external.to_string(), 7500, EXT_ADDR.to_string(), 45000)
    );
}

#[test]
fn the_programs_filter_before_the_rate_limit() {
    let lab = lab_up("mon-rate");
    let c = add_container(&lab, "c", &[]);
    // One event per second and CPU: twenty drops of another reason come first, and would
    // use it up if they were filtered only after it.
    let mon = Monitor::start(&lab, &["--reason", "drop_spoof", "--rate", "1"]);
    let knocks: Vec<Vec<u8>> = (0..20)
        .map(|i| {
            let l4 = packet::tcp(EXT_ADDR, c.ip, 40000 + i, 22, SYN);
            from_segment(&lab, c.ip, l4, PROTO_TCP)
        })
        .collect();
    wire::send(&lab.ext, "eth0", knocks);
    wire::send(&c.ns, "eth0", vec![spoof(&c, 5555)]);
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < end {
        match mon.lines.recv_timeout(Duration::from_millis(100)) {
            Ok(v) => got.push(v),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    assert_eq!(counter(&lab, "drop_not_published"), 20);
    let spoofs: Vec<_> = got.iter().filter(|v| v["reason"] == "drop_spoof").collect();
    assert_eq!(spoofs.len(), 1, "{got:#?}");
    assert!(
        got.iter().all(|v| v["kind"] != "MonitorLost"),
        "nothing was lost to the rate: {got:#?}"
    );
}

#[test]
fn ipv6_forwarding_and_static_nat66_are_traced() {
    let lab = bpfnat_tests::lab_up6("mon-v6");
    let (a, b, s) = (lab.name("a"), lab.name("b"), lab.name("s"));
    lab.ok(&["container", "add", &a, "--ip6", "fd00:88::a"])
        .unwrap();
    lab.ok(&["container", "add", &b, "--ip6", "fd00:88::b"])
        .unwrap();
    lab.ok(&["container", "add", &s, "--ip6", "fd00:88::5"])
        .unwrap();
    lab.ok(&[
        "nat",
        "add",
        "--external",
        "2001:db8:1::10",
        "--internal",
        "fd00:88::5",
    ])
    .unwrap();
    let mon = Monitor::start(&lab, &["--type", "trace", "--proto", "udp"]);
    let sa = |ip: &str, port: u16| std::net::SocketAddr::new(ip.parse().unwrap(), port);
    let window = Duration::from_secs(5);

    // F1 over IPv6: a to b, untranslated.
    let echo = traffic::udp_echo(&lab.container_ns(&b), sa("::", 7600), 1, window).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    traffic::udp_ask(
        &lab.container_ns(&a),
        sa("fd00:88::a", 46000),
        sa("fd00:88::b", 7600),
        b"x",
    )
    .unwrap();
    echo.join().unwrap();
    // Static NAT66: the outside host to the external address.
    let echo = traffic::udp_echo(&lab.container_ns(&s), sa("::", 7700), 1, window).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    traffic::udp_ask(&lab.ext, sa("::", 47000), sa("2001:db8:1::10", 7700), b"y").unwrap();
    let seen = echo.join().unwrap();
    let events = mon.events(Duration::from_secs(1));

    let f1 = where_(&events, "forward", "container", &a);
    assert_eq!(f1.len(), 1, "{events:#?}");
    let ab = (
        "fd00:88::a".to_owned(),
        46000,
        "fd00:88::b".to_owned(),
        7600,
    );
    assert_eq!(tuple(&f1[0]["before"]), ab);
    assert_eq!(tuple(&f1[0]["after"]), ab);
    assert_eq!(f1[0]["out_container"], b.as_str());

    let client = seen[0].ip().to_string();
    let inbound = where_(&events, "static_nat", "program", "tc_uplink");
    // One or two: the first datagram may wait on neighbour discovery and be asked again.
    assert!(!inbound.is_empty(), "{events:#?}");
    assert_eq!(
        tuple(&inbound[0]["before"]),
        (client.clone(), 47000, "2001:db8:1::10".to_owned(), 7700)
    );
    assert_eq!(
        tuple(&inbound[0]["after"]),
        (client.clone(), 47000, "fd00:88::5".to_owned(), 7700)
    );
    let outbound = where_(&events, "static_nat", "program", "tc_container");
    assert_eq!(outbound.len(), 1, "{events:#?}");
    assert_eq!(
        tuple(&outbound[0]["after"]),
        ("2001:db8:1::10".to_owned(), 7700, client, 47000)
    );
}

#[test]
fn icmp_errors_are_traced_with_their_translation() {
    let lab = lab_up("mon-icmperr");
    let c = add_container(&lab, "c", &[]);
    let mut mon = Monitor::start(&lab, &["--type", "trace", "--proto", "icmp"]);
    // Nothing listens on the outside host's port 9: its "port unreachable" comes back to
    // the node's address and is translated to the container.
    assert!(
        bpfnat_tests::udp_refused(&c.ns, v4(EXT_ADDR, 9)),
        "the container sees the port refused"
    );
    let events = mon.events(Duration::from_secs(1));
    let errors = with_reason(&events, "icmp_error");
    assert_eq!(errors.len(), 1, "{events:#?}");
    let e = errors[0];
    assert_eq!(
        (&e["program"], &e["proto"]),
        (&Value::from("tc_uplink"), &Value::from("icmp"))
    );
    assert_eq!(
        tuple(&e["before"]),
        (EXT_ADDR.to_string(), 0, NODE_ADDR.to_string(), 0)
    );
    assert_eq!(
        tuple(&e["after"]),
        (EXT_ADDR.to_string(), 0, c.ip.to_string(), 0)
    );
    mon.stop();

    // Nobody listening: the same error is translated, and its action's mark finds no
    // draft to send; a monitor started after it finds nothing left in the ring buffer.
    assert!(bpfnat_tests::udp_refused(&c.ns, v4(EXT_ADDR, 9)));
    assert_eq!(counter(&lab, "icmp_error"), 2);
    let mon = Monitor::start(&lab, &["--type", "all"]);
    let events = mon.events(Duration::from_secs(1));
    assert!(with_reason(&events, "icmp_error").is_empty(), "{events:#?}");
}

#[test]
fn icmpv6_errors_are_traced_too() {
    let lab = bpfnat_tests::lab_up6("mon-icmp6err");
    let c = add_container(&lab, "c", &[]);
    let ip6 = bpfnat_tests::json(&lab, &["container", "inspect", &lab.name("c")])["ip6"]
        .as_str()
        .expect("ip6")
        .to_owned();
    let mon = Monitor::start(&lab, &["--type", "trace", "--proto", "icmp"]);
    let ext: std::net::SocketAddr = "[2001:db8:1::2]:9".parse().expect("address");
    assert!(bpfnat_tests::udp_refused(&c.ns, ext), "refused over IPv6");
    let events = mon.events(Duration::from_secs(1));
    let errors = with_reason(&events, "icmp_error");
    assert_eq!(errors.len(), 1, "{events:#?}");
    assert_eq!(errors[0]["proto"], "icmpv6");
    assert_eq!(
        tuple(&errors[0]["before"]),
        ("2001:db8:1::2".to_owned(), 0, "2001:db8:1::1".to_owned(), 0)
    );
    assert_eq!(
        tuple(&errors[0]["after"]),
        ("2001:db8:1::2".to_owned(), 0, ip6, 0)
    );
}
