//! `bpfnat explain`: what the programs decide for a crafted packet — a published port, a
//! MASQUERADE flow, a static NAT address, a spoofed source, an unpublished port, a tracked
//! flow — without committing anything (both conntrack tables, the published ports and every
//! counter are the same before and after), and that a real packet then does what it said.

use std::{net::Ipv4Addr, time::Duration};

use bpfnat_tests::{
    EXT_ADDR, Lab, NODE_ADDR, UPLINK, add_container, counter, fails_with, json, lab, lab_up,
    packet::{self, PROTO_TCP, PROTO_UDP},
    static_container, traffic, udp_out, uplink_mac, v4, wire,
};
use serde_json::Value;

const EXT_MAC: [u8; 6] = [0x02, 0, 198, 51, 100, 1];
const WINDOW: Duration = Duration::from_secs(3);

/// The counters the lab's own background traffic moves while a test runs (IPv6 neighbour
/// discovery and multicast listener reports, ARP, handed to the stack), left out of the
/// snapshot. Every other counter must stay, those the explained packets would move first.
const BACKGROUND: [&str; 2] = ["pass", "xdp_pass"];

/// The node state `explain` must not touch: both conntrack tables (without the ages, which
/// follow the clock), the published ports and every counter but `BACKGROUND`.
fn snapshot(lab: &Lab) -> Vec<Value> {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("age_secs");
                m.remove("idle_secs");
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    ["conntrack", "conntrack_new", "ports", "stats"]
        .iter()
        .map(|m| {
            let mut d = json(lab, &["map", "dump", m]);
            strip(&mut d);
            if let Value::Array(a) = &mut d {
                a.retain(|e| !BACKGROUND.iter().any(|r| e["key"]["reason"] == *r));
            }
            d
        })
        .collect()
}

/// `bpfnat -o json explain ARGS`, checked to have left the node's state as it was.
fn explain(lab: &Lab, args: &[&str]) -> Value {
    let before = snapshot(lab);
    let mut a = vec!["explain"];
    a.extend_from_slice(args);
    let e = json(lab, &a);
    assert_eq!(e["kind"], "Explanation", "{e}");
    assert_eq!(
        snapshot(lab),
        before,
        "explain {args:?} changed the node's state"
    );
    e
}

fn tuple(v: &Value) -> (String, String, u64, String, u64) {
    (
        v["proto"].as_str().unwrap_or_default().to_owned(),
        v["src"].as_str().unwrap_or_default().to_owned(),
        v["sport"].as_u64().unwrap_or_default(),
        v["dst"].as_str().unwrap_or_default().to_owned(),
        v["dport"].as_u64().unwrap_or_default(),
    )
}

fn udp(src: Ipv4Addr, sport: u64, dst: Ipv4Addr, dport: u64) -> (String, String, u64, String, u64) {
    ("udp".into(), src.to_string(), sport, dst.to_string(), dport)
}

/// Every step of every program the explanation ran.
fn steps(e: &Value) -> Vec<&Value> {
    e["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .flat_map(|p| p["steps"].as_array().expect("steps"))
        .collect()
}

/// The reasons whose counters the explanation says the packet moves.
fn counted(e: &Value) -> Vec<String> {
    steps(e)
        .iter()
        .filter(|s| s["op"] == "count")
        .map(|s| s["reason"].as_str().expect("reason").to_owned())
        .collect()
}

fn lookups<'a>(e: &'a Value, map: &str) -> Vec<&'a Value> {
    steps(e)
        .into_iter()
        .filter(|s| s["op"] == "lookup" && s["map"] == map)
        .collect()
}

fn creates(e: &Value) -> usize {
    steps(e).iter().filter(|s| s["op"] == "insert").count()
}

/// The counters of `reasons`.
fn counters(lab: &Lab, reasons: &[String]) -> Vec<u64> {
    reasons.iter().map(|r| counter(lab, r)).collect()
}

#[test]
fn a_published_port_and_then_its_tracked_flow() {
    let lab = lab_up("exp-pub");
    let c = add_container(&lab, "web", &["-p", "8080:80/udp"]);
    let name = lab.name("web");
    let args = ["udp", "198.51.100.1:40000", "198.51.100.2:8080"];

    let e = explain(&lab, &args);
    assert_eq!(e["arrives_on"]["name"], UPLINK, "{e:#}");
    assert_eq!(e["arrives_on"]["uplink"], true);
    assert_eq!(e["programs"][0]["program"], "tc_uplink");
    assert_eq!(e["verdict"], "forward", "{e:#}");
    assert_eq!(tuple(&e["translated"]), udp(EXT_ADDR, 40000, c.ip, 80));
    assert_eq!(e["out"]["container"], name.as_str());
    let ports = lookups(&e, "ports");
    assert!(
        ports
            .iter()
            .any(|s| s["value"]["addr"] == c.ip.to_string() && s["value"]["port"] == 80),
        "{e:#}"
    );
    // The connection it would create, both directions.
    assert_eq!(creates(&e), 2, "{e:#}");
    let moved = counted(&e);
    assert!(moved.contains(&"dnat_new".to_owned()), "{moved:?}");

    // A real datagram: it reaches the container from the same source, and moves the
    // counters the explanation named.
    let before = counters(&lab, &moved);
    let echo = traffic::udp_echo(&c.ns, v4(c.ip, 80), 1, WINDOW).expect("echo");
    std::thread::sleep(Duration::from_millis(100));
    traffic::udp_ask(&lab.ext, v4(EXT_ADDR, 40000), v4(NODE_ADDR, 8080), b"x").expect("ask");
    assert_eq!(echo.join().expect("echo"), vec![v4(EXT_ADDR, 40000)]);
    let after = counters(&lab, &moved);
    assert!(
        before.iter().zip(&after).all(|(b, a)| a > b),
        "{moved:?}: {before:?} -> {after:?}"
    );

    // Now tracked: the explanation shows the connection's entry as it is (one packet, its
    // answer seen), and that this second datagram would make it assured, moving both
    // entries to `conntrack` — which it leaves undone, as the snapshot checks.
    let e = explain(&lab, &args);
    assert_eq!(e["verdict"], "forward", "{e:#}");
    assert_eq!(tuple(&e["translated"]), udp(EXT_ADDR, 40000, c.ip, 80));
    let found: Vec<&Value> = steps(&e)
        .into_iter()
        .filter(|s| {
            s["op"] == "lookup"
                && s["map"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("conntrack"))
                && !s["value"].is_null()
        })
        .collect();
    assert!(!found.is_empty(), "{e:#}");
    let entry = &found[0]["value"];
    assert_eq!(
        (&entry["origin"], &entry["dir"]),
        (&Value::from("published"), &Value::from("original")),
        "{entry}"
    );
    assert_eq!(
        (&entry["packets"], &entry["state"], &entry["assured"]),
        (
            &Value::from(1),
            &Value::from("REPLIED"),
            &Value::from(false)
        ),
        "{entry}"
    );
    let inserts: Vec<&Value> = steps(&e)
        .into_iter()
        .filter(|s| s["op"] == "insert")
        .collect();
    assert_eq!(inserts.len(), 2, "{e:#}");
    assert!(
        inserts
            .iter()
            .all(|s| s["map"] == "conntrack" && s["value"]["assured"] == true),
        "{e:#}"
    );
    assert_eq!(e["reason"], "ct_hit", "{e:#}");
}

#[test]
fn a_masquerade_flow_leaves_with_the_predicted_source() {
    let lab = lab_up("exp-masq");
    let c = add_container(&lab, "c", &[]);
    let e = explain(
        &lab,
        &["udp", &format!("{}:41000", c.ip), "198.51.100.1:7000"],
    );
    // From the container whose address the source is, by default.
    assert_eq!(
        e["arrives_on"]["container"],
        lab.name("c").as_str(),
        "{e:#}"
    );
    assert_eq!(e["programs"][0]["program"], "tc_container");
    assert_eq!(e["verdict"], "forward", "{e:#}");
    assert_eq!(
        tuple(&e["translated"]),
        udp(NODE_ADDR, 41000, EXT_ADDR, 7000)
    );
    assert_eq!(e["out"]["uplink"], true, "{e:#}");
    assert!(counted(&e).contains(&"snat_new".to_owned()), "{e:#}");

    let seen = udp_out(&lab, &c, &[41000], 7000);
    assert_eq!(seen, vec![v4(NODE_ADDR, 41000)]);
}

#[test]
fn a_static_nat_address_is_translated_to_its_container() {
    let lab = lab_up("exp-static");
    let internal = Ipv4Addr::new(10, 88, 0, 50);
    let ns = static_container(&lab, "s", "10.88.0.50", "198.51.100.10");
    let e = explain(&lab, &["udp", "198.51.100.1:45000", "198.51.100.10:7500"]);
    assert_eq!(e["verdict"], "forward", "{e:#}");
    assert_eq!(e["reason"], "static_nat", "{e:#}");
    assert_eq!(
        tuple(&e["translated"]),
        udp(EXT_ADDR, 45000, internal, 7500)
    );
    assert!(
        lookups(&e, "static_nat")
            .iter()
            .any(|s| s["value"]["peer"] == internal.to_string()),
        "{e:#}"
    );
    assert_eq!(e["out"]["container"], lab.name("s").as_str());

    let echo = traffic::udp_echo(&ns, v4(internal, 7500), 1, WINDOW).expect("echo");
    std::thread::sleep(Duration::from_millis(100));
    traffic::udp_ask(
        &lab.ext,
        v4(EXT_ADDR, 45000),
        v4(Ipv4Addr::new(198, 51, 100, 10), 7500),
        b"y",
    )
    .expect("ask");
    assert_eq!(echo.join().expect("echo"), vec![v4(EXT_ADDR, 45000)]);
}

#[test]
fn a_spoofed_source_is_dropped_as_predicted() {
    let lab = lab_up("exp-spoof");
    let c = add_container(&lab, "c", &[]);
    let name = lab.name("c");
    let forged = Ipv4Addr::new(10, 88, 0, 99);
    let e = explain(
        &lab,
        &[
            "udp",
            "10.88.0.99:5555",
            "198.51.100.1:53",
            "--from",
            "container",
            &name,
        ],
    );
    assert_eq!(
        (&e["verdict"], &e["reason"]),
        (&Value::from("drop"), &Value::from("drop_spoof")),
        "{e:#}"
    );
    assert!(e["translated"].is_null() && e["out"].is_null(), "{e:#}");
    // The control: the container's own address is forwarded.
    let ok = explain(
        &lab,
        &[
            "udp",
            &format!("{}:5555", c.ip),
            "198.51.100.1:53",
            "--from",
            "container",
            &name,
        ],
    );
    assert_eq!(ok["verdict"], "forward", "{ok:#}");

    // The real forged datagram is dropped for that reason, and never arrives.
    let echo =
        traffic::udp_echo(&lab.ext, v4(EXT_ADDR, 53), 1, Duration::from_secs(1)).expect("echo");
    let before = counter(&lab, "drop_spoof");
    let frame = packet::frame(
        c.mac,
        c.host_mac,
        forged,
        EXT_ADDR,
        PROTO_UDP,
        &packet::udp(forged, EXT_ADDR, 5555, 53, true),
    );
    wire::send(&c.ns, "eth0", vec![frame]);
    assert!(echo.join().expect("echo").is_empty());
    assert_eq!(counter(&lab, "drop_spoof"), before + 1);
}

#[test]
fn an_unpublished_port_is_dropped_as_predicted() {
    let lab = lab_up("exp-closed");
    let c = add_container(&lab, "c", &["-p", "8080:80"]);
    let e = explain(
        &lab,
        &["tcp", "198.51.100.1:40000", &format!("{}:22", c.ip)],
    );
    assert_eq!(
        (&e["verdict"], &e["reason"]),
        (&Value::from("drop"), &Value::from("drop_not_published")),
        "{e:#}"
    );
    // The control: the published port is forwarded, SYN by default.
    let ok = explain(&lab, &["tcp", "198.51.100.1:40000", "198.51.100.2:8080"]);
    assert_eq!(ok["verdict"], "forward", "{ok:#}");
    assert_eq!(tuple(&ok["translated"]).3, c.ip.to_string());

    let before = counter(&lab, "drop_not_published");
    let syn = packet::frame(
        EXT_MAC,
        uplink_mac(&lab),
        EXT_ADDR,
        c.ip,
        PROTO_TCP,
        &packet::tcp(EXT_ADDR, c.ip, 40000, 22, 0x02),
    );
    wire::send(&lab.ext, "eth0", vec![syn]);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(counter(&lab, "drop_not_published"), before + 1);
}

#[test]
fn the_text_form_and_bad_input() {
    let down = lab("exp-down");
    fails_with(
        &down,
        &["explain", "udp", "198.51.100.1:1", "198.51.100.2:2"],
        "not up",
    );
    drop(down);

    let lab = lab_up("exp-text");
    let _c = add_container(&lab, "web", &["-p", "8080:80"]);
    let out = lab
        .ok(&["explain", "tcp", "198.51.100.1:40000", "198.51.100.2:8080"])
        .expect("explain");
    for needle in [
        "packet      tcp 198.51.100.1:40000 -> 198.51.100.2:8080",
        "arrives on  uplink0 (uplink)",
        "tc_uplink: redirect",
        "lookup   ports",
        "create   conntrack_new",
        // The client's tuple is looked up in the assured table before it is taken over.
        "lookup   conntrack      proto=tcp src=10.88.0.2 sport=80 dst=198.51.100.1 dport=40000 => not found",
        "verdict     forward (dnat_new, deliver)",
        "translated  tcp 198.51.100.1:40000 -> 10.88.0.2:80",
        "committed   nothing",
    ] {
        assert!(out.contains(needle), "{needle:?} missing from:\n{out}");
    }
    let any = ["explain", "udp", "198.51.100.1:1", "198.51.100.2:2"];
    let bad: [(Vec<&str>, &str); 4] = [
        (
            vec!["explain", "udp", "198.51.100.1", "198.51.100.2:2"],
            "ADDR:PORT",
        ),
        (
            vec!["explain", "udp", "198.51.100.1:1", "[2001:db8::1]:2"],
            "one family",
        ),
        (
            [&any[..], &["--from", "container", "nope"]].concat(),
            "no such container",
        ),
        (
            [&any[..], &["--from", "elsewhere"]].concat(),
            "--from takes",
        ),
    ];
    for (args, needle) in bad {
        fails_with(&lab, &args, needle);
    }
}

#[test]
fn the_xdp_fast_path_is_explained_before_tc() {
    let lab = lab("exp-xdp");
    // XDP cannot complete partial checksums: the outside host sends complete ones.
    lab.ext_tx_checksum(false).expect("checksums");
    lab.ok(&["up", "--uplink", UPLINK, "--xdp", "generic"])
        .expect("up --xdp generic");
    let c = add_container(&lab, "c", &[]);
    udp_out(&lab, &c, &[43000], 7300);

    // The answer of that connection: XDP translates and redirects it itself.
    let e = explain(&lab, &["udp", "198.51.100.1:7300", "198.51.100.2:43000"]);
    let progs: Vec<&Value> = e["programs"].as_array().expect("programs").iter().collect();
    assert_eq!(progs.len(), 1, "{e:#}");
    assert_eq!(
        (&progs[0]["program"], &progs[0]["action"]),
        (&Value::from("xdp_uplink"), &Value::from("redirect"))
    );
    assert_eq!(
        (&e["verdict"], &e["reason"]),
        (&Value::from("forward"), &Value::from("ct_hit")),
        "{e:#}"
    );
    assert_eq!(tuple(&e["translated"]), udp(EXT_ADDR, 7300, c.ip, 43000));
    assert!(
        e["counted"]
            .as_array()
            .expect("counted")
            .contains(&Value::from("xdp_deliver")),
        "{e:#}"
    );

    // A packet no connection explains: XDP passes it on, and TC decides.
    let e = explain(&lab, &["udp", "198.51.100.1:7300", "198.51.100.2:43001"]);
    let names: Vec<&Value> = e["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .map(|p| &p["program"])
        .collect();
    assert_eq!(
        names,
        [&Value::from("xdp_uplink"), &Value::from("tc_uplink")],
        "{e:#}"
    );
    assert_eq!(e["programs"][0]["action"], "pass");
}

#[test]
fn ipv6_masquerade_is_explained_too() {
    let lab = bpfnat_tests::lab_up6("exp-v6");
    let _c = add_container(&lab, "c", &[]);
    let name = lab.name("c");
    let ip6 = json(&lab, &["container", "inspect", &name])["ip6"]
        .as_str()
        .expect("ip6")
        .to_owned();
    let e = explain(
        &lab,
        &["udp", &format!("[{ip6}]:40123"), "[2001:db8:1::2]:5353"],
    );
    assert_eq!(e["arrives_on"]["container"], name.as_str(), "{e:#}");
    assert_eq!(e["verdict"], "forward", "{e:#}");
    assert_eq!(e["reason"], "snat_new", "{e:#}");
    let t = &e["translated"];
    assert_eq!(
        (&t["src"], &t["sport"], &t["dst"], &t["dport"]),
        (
            &Value::from("2001:db8:1::1"),
            &Value::from(40123),
            &Value::from("2001:db8:1::2"),
            &Value::from(5353)
        ),
        "{e:#}"
    );

    let v6 = |ip: &str, port| std::net::SocketAddr::new(ip.parse().expect("IPv6"), port);
    let echo = traffic::udp_echo(&lab.ext, v6("::", 5353), 1, WINDOW).expect("echo");
    std::thread::sleep(Duration::from_millis(100));
    traffic::udp_ask(
        &lab.container_ns(&name),
        v6("::", 40123),
        v6("2001:db8:1::2", 5353),
        b"z",
    )
    .expect("ask");
    assert_eq!(echo.join().expect("echo"), vec![v6("2001:db8:1::1", 40123)]);
}
