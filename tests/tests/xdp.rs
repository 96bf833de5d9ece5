//! The uplink's XDP fast path with real traffic (`up --xdp native|generic`): published ports,
//! replies to masqueraded connections and static NAT are delivered by XDP (its counter moves),
//! and what XDP passes on still works through TC. The external host sends with transmit
//! checksum offload off, as a NIC would deliver them: XDP cannot complete partial checksums.

use std::{net::Ipv4Addr, time::Duration};

use bpfnat_tests::{
    EXT_ADDR, Lab, NODE_ADDR, UPLINK, counter, json, lab, ping, run_in_ns, traffic, v4,
};
use nat_plumbing::ethtool::{self, Offload};

const WINDOW: Duration = Duration::from_secs(20);

fn xdp_lab(test: &str, mode: &str) -> Lab {
    let l = lab(test);
    l.ext_tx_checksum(false).unwrap();
    l.ok(&["up", "--uplink", UPLINK, "--xdp", mode]).unwrap();
    l
}

fn gro_on(ns: &std::path::Path) -> bool {
    nat_plumbing::netns::run_in(ns, || ethtool::get("eth0", Offload::Gro)).unwrap()
}

/// Published TCP and UDP ports, a masqueraded connection's replies, static NAT: all through
/// XDP, with the right addresses on both ends.
fn exercise(lab: &Lab) {
    let c = lab.name("web");
    lab.ok(&[
        "container",
        "add",
        &c,
        "--ip",
        "10.88.0.2",
        "-p",
        "8080:80",
        "-p",
        "5353:53/udp",
    ])
    .unwrap();
    let ns = lab.container_ns(&c);

    // F3: into the published port; the client's address is preserved.
    let before = counter(lab, "xdp_deliver");
    let srv = traffic::http_server(&ns, v4(Ipv4Addr::UNSPECIFIED, 80), "web", 3, WINDOW).unwrap();
    for _ in 0..3 {
        let body = traffic::http_get(&lab.ext, v4(NODE_ADDR, 8080)).unwrap();
        assert!(body.starts_with("hello from web"), "{body}");
    }
    assert!(srv.join().unwrap().iter().all(|a| a.ip() == EXT_ADDR));
    let after = counter(lab, "xdp_deliver");
    assert!(
        after >= before + 9,
        "SYN, ACKs and FINs of 3 connections went through XDP ({before} -> {after})"
    );
    assert!(counter(lab, "dnat_new") >= 3);

    // UDP to the published port, answered from it.
    let echo = traffic::udp_echo(&ns, v4(Ipv4Addr::UNSPECIFIED, 53), 1, WINDOW).unwrap();
    let got = traffic::udp_ask(
        &lab.ext,
        v4(Ipv4Addr::UNSPECIFIED, 0),
        v4(NODE_ADDR, 5353),
        b"q",
    )
    .unwrap();
    assert!(got.starts_with(&format!("{EXT_ADDR}:")), "{got}");
    assert_eq!(echo.join().unwrap()[0].ip(), EXT_ADDR);

    // F2: the replies of a masqueraded connection come back through XDP.
    let before = counter(lab, "xdp_deliver");
    let srv = traffic::http_server(&lab.ext, v4(EXT_ADDR, 9000), "ext", 1, WINDOW).unwrap();
    traffic::http_get(&ns, v4(EXT_ADDR, 9000)).unwrap();
    assert_eq!(srv.join().unwrap()[0].ip(), NODE_ADDR, "masqueraded");
    assert!(counter(lab, "xdp_deliver") > before);

    // F8: static NAT, in through XDP.
    let sns = bpfnat_tests::static_container(lab, "st", "10.88.0.5", "198.51.100.10");
    let before = counter(lab, "xdp_deliver");
    let srv = traffic::http_server(&sns, v4(Ipv4Addr::UNSPECIFIED, 2222), "st", 1, WINDOW).unwrap();
    let body = traffic::http_get(&lab.ext, v4(Ipv4Addr::new(198, 51, 100, 10), 2222)).unwrap();
    assert!(body.starts_with("hello from st"));
    assert_eq!(srv.join().unwrap()[0].ip(), EXT_ADDR);
    // Static NAT is untracked: the inbound SYN, ACKs and FIN could only go through XDP's
    // static path (the replies leave by TC).
    let after = counter(lab, "xdp_deliver");
    assert!(
        after >= before + 3,
        "static NAT through XDP ({before} -> {after})"
    );

    // What XDP passes on (ARP, ICMP to the node) still works.
    let before = counter(lab, "xdp_pass");
    assert!(ping(&lab.ext, NODE_ADDR));
    assert!(counter(lab, "xdp_pass") > before);
}

#[test]
fn native_xdp_delivers_published_ports_replies_and_static_nat() {
    let lab = xdp_lab("xdp-native", "native");
    let st = json(&lab, &["status"]);
    assert_eq!(st["node"]["xdp"], "native");
    assert_eq!(st["uplink_xdp"], "native");
    exercise(&lab);
    // Containers get NAPI (GRO) so that redirected frames are accepted.
    assert!(gro_on(&lab.container_ns(&lab.name("web"))));

    // `down` takes XDP off the uplink.
    lab.ok(&["down"]).unwrap();
    let (_, links) = run_in_ns(&lab.node, "ip", &["-d", "link", "show", UPLINK]);
    assert!(!links.contains("prog/xdp"), "XDP detached: {links}");
}

#[test]
fn generic_xdp_delivers_the_same_flows() {
    let lab = xdp_lab("xdp-generic", "generic");
    let st = json(&lab, &["status"]);
    assert_eq!(st["node"]["xdp"], "generic");
    assert_eq!(st["uplink_xdp"], "generic");
    exercise(&lab);
    assert!(
        !gro_on(&lab.container_ns(&lab.name("web"))),
        "generic XDP needs no NAPI"
    );
}

#[test]
fn auto_keeps_a_veth_uplink_on_tc() {
    let lab = lab("xdp-auto");
    lab.ok(&["up", "--uplink", UPLINK]).unwrap();
    let st = json(&lab, &["status"]);
    assert_eq!(st["node"]["xdp"], "off");
    assert!(st["uplink_xdp"].is_null());
    // Another mode while up: refused, nothing changed.
    let out = lab
        .run(&["up", "--uplink", UPLINK, "--xdp", "native"])
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("XDP off"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(json(&lab, &["status"])["uplink_xdp"].is_null());
    assert!(
        !lab.run(&["up", "--uplink", UPLINK, "--xdp", "sideways"])
            .unwrap()
            .status
            .success()
    );
}

#[test]
fn native_xdp_on_a_jumbo_veth_is_refused_clearly_and_changes_nothing() {
    let lab = lab("xdp-jumbo");
    for (ns, ifname) in [(&lab.node, UPLINK), (&lab.ext, "eth0")] {
        let (ok, _) = run_in_ns(ns, "ip", &["link", "set", ifname, "mtu", "9000"]);
        assert!(ok, "set MTU 9000 on {ifname}");
    }
    let out = lab
        .run(&["up", "--uplink", UPLINK, "--xdp", "native"])
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("MTU is too large"), "{err}");
    let (code, st) = bpfnat_tests::status(&lab);
    assert_eq!(
        (code, &st["up"]),
        (3, &serde_json::json!(false)),
        "rolled back"
    );
    assert!(!bpfnat_tests::pins(&lab).root().exists(), "no pins left");
    // Generic XDP has no such limit.
    lab.ok(&["up", "--uplink", UPLINK, "--xdp", "generic"])
        .unwrap();
    assert_eq!(json(&lab, &["status"])["uplink_xdp"], "generic");
}

#[test]
fn generic_xdp_delivers_ipv6_published_ports_and_nat66_replies() {
    let lab = lab("xdp6");
    lab.ext_tx_checksum(false).unwrap();
    bpfnat_tests::uplink_v6(&lab);
    lab.ok(&[
        "up",
        "--uplink",
        UPLINK,
        "--xdp",
        "generic",
        "--subnet6",
        "fd00:88::/64",
    ])
    .unwrap();
    let c = lab.name("web");
    lab.ok(&["container", "add", &c, "-p", "8080:80"]).unwrap();
    let ns = lab.container_ns(&c);
    let v6 = |ip: &str, port| std::net::SocketAddr::new(ip.parse().unwrap(), port);
    let (node6, ext6) = (bpfnat_tests::NODE6, bpfnat_tests::EXT6);

    // F3 over IPv6: the connections' segments after the SYN come in through XDP.
    let before = counter(&lab, "xdp_deliver");
    let srv = traffic::http_server(&ns, v6("::", 80), "web", 3, WINDOW).unwrap();
    for _ in 0..3 {
        let body = traffic::http_get(&lab.ext, v6(node6, 8080)).unwrap();
        assert!(body.starts_with("hello from web"), "{body}");
    }
    assert!(
        srv.join()
            .unwrap()
            .iter()
            .all(|a| a.ip().to_string() == ext6)
    );
    let after = counter(&lab, "xdp_deliver");
    assert!(after >= before + 6, "through XDP ({before} -> {after})");

    // F2 over IPv6: the replies of a masqueraded connection come back through XDP.
    let before = counter(&lab, "xdp_deliver");
    let srv = traffic::http_server(&lab.ext, v6("::", 9000), "ext", 1, WINDOW).unwrap();
    traffic::http_get(&ns, v6(ext6, 9000)).unwrap();
    assert_eq!(
        srv.join().unwrap()[0].ip().to_string(),
        node6,
        "masqueraded"
    );
    assert!(counter(&lab, "xdp_deliver") > before);
}
