//! Docker's `-p` semantics end to end: host-address binding, ranges, ports chosen by bpfnat,
//! `port add/del` on a running container, and no stale conntrack entry shadowing a mapping.

use std::{net::Ipv4Addr, process::Command, time::Duration};

use bpfnat_tests::{EXT_ADDR, NODE_ADDR, UPLINK, json, lab_up, lab_up6, traffic, v4};

const WINDOW: Duration = Duration::from_secs(20);
const NODE_ADDR2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);

fn add_node_address(lab: &bpfnat_tests::Lab, addr: Ipv4Addr) {
    let mut c = Command::new("ip");
    c.args(["addr", "add", &format!("{addr}/24"), "dev", UPLINK]);
    nat_plumbing::netns::command_in(&mut c, &lab.node).unwrap();
    assert!(c.status().unwrap().success());
}

fn ports_of(lab: &bpfnat_tests::Lab, name: &str) -> Vec<serde_json::Value> {
    json(lab, &["port", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["container"] == name)
        .cloned()
        .collect()
}

#[test]
fn host_ip_binding_limits_where_a_port_is_reachable() {
    let lab = lab_up("pubip");
    add_node_address(&lab, NODE_ADDR2);
    let (a, b, l) = (lab.name("a"), lab.name("b"), lab.name("l"));
    lab.ok(&["container", "add", &a, "-p", "198.51.100.2:8081:80"])
        .unwrap();
    // The same port on another address belongs to someone else.
    lab.ok(&["container", "add", &b, "-p", "198.51.100.3:8081:80"])
        .unwrap();
    lab.ok(&["container", "add", &l, "-p", "127.0.0.1:8082:80"])
        .unwrap();
    let sa = traffic::http_server(
        &lab.container_ns(&a),
        v4(Ipv4Addr::UNSPECIFIED, 80),
        "a",
        1,
        WINDOW,
    )
    .unwrap();
    let sb = traffic::http_server(
        &lab.container_ns(&b),
        v4(Ipv4Addr::UNSPECIFIED, 80),
        "b",
        1,
        WINDOW,
    )
    .unwrap();
    let sl = traffic::http_server(
        &lab.container_ns(&l),
        v4(Ipv4Addr::UNSPECIFIED, 80),
        "l",
        1,
        Duration::from_secs(3),
    )
    .unwrap();
    assert!(
        traffic::http_get(&lab.ext, v4(NODE_ADDR, 8081))
            .unwrap()
            .starts_with("hello from a")
    );
    assert!(
        traffic::http_get(&lab.ext, v4(NODE_ADDR2, 8081))
            .unwrap()
            .starts_with("hello from b")
    );
    sa.join().unwrap();
    sb.join().unwrap();
    // Published on 127.0.0.1 only: not reachable from outside on any node address.
    assert!(traffic::http_get(&lab.ext, v4(NODE_ADDR, 8082)).is_err());
    assert!(traffic::http_get(&lab.ext, v4(NODE_ADDR2, 8082)).is_err());
    assert!(
        sl.join().unwrap().is_empty(),
        "the 127.0.0.1-only container was reached from outside"
    );
}

#[test]
fn ranges_and_chosen_host_ports_work() {
    let lab = lab_up("pubrange");
    let c = lab.name("c");
    lab.ok(&[
        "container",
        "add",
        &c,
        "-p",
        "9000-9001:7000-7001/udp",
        "-p",
        "80",
        "-p",
        "8000-8010:81",
    ])
    .unwrap();
    let ports = ports_of(&lab, &c);
    assert_eq!(ports.len(), 4, "{ports:?}");
    let host_for = |cport: u64| {
        ports.iter().find(|p| p["container_port"] == cport).unwrap()["host_port"]
            .as_u64()
            .unwrap() as u16
    };
    assert_eq!(host_for(7000), 9000);
    assert_eq!(host_for(7001), 9001);
    assert_eq!(host_for(81), 8000);
    let eph = host_for(80);
    assert!(eph >= 1024 && eph != 8000, "ephemeral host port {eph}");

    let ns = lab.container_ns(&c);
    let e0 = traffic::udp_echo(&ns, v4(Ipv4Addr::UNSPECIFIED, 7000), 1, WINDOW).unwrap();
    let e1 = traffic::udp_echo(&ns, v4(Ipv4Addr::UNSPECIFIED, 7001), 1, WINDOW).unwrap();
    assert!(traffic::udp_ask(&lab.ext, v4(EXT_ADDR, 0), v4(NODE_ADDR, 9000), b"x").is_ok());
    assert!(traffic::udp_ask(&lab.ext, v4(EXT_ADDR, 0), v4(NODE_ADDR, 9001), b"y").is_ok());
    assert_eq!(e0.join().unwrap().len(), 1);
    assert_eq!(e1.join().unwrap().len(), 1);
    let s = traffic::http_server(&ns, v4(Ipv4Addr::UNSPECIFIED, 80), "c", 1, WINDOW).unwrap();
    assert!(traffic::http_get(&lab.ext, v4(NODE_ADDR, eph)).is_ok());
    s.join().unwrap();

    // A second container asking for the same host range gets the next free port.
    let d = lab.name("d");
    lab.ok(&["container", "add", &d, "-p", "8000-8010:81"])
        .unwrap();
    assert_eq!(ports_of(&lab, &d)[0]["host_port"], 8001);
}

#[test]
fn ports_are_added_and_removed_on_a_running_container() {
    let lab = lab_up("pubaddel");
    let c = lab.name("c");
    lab.ok(&["container", "add", &c]).unwrap();
    let ns = lab.container_ns(&c);
    assert!(
        traffic::http_get(&lab.ext, v4(NODE_ADDR, 8080)).is_err(),
        "nothing published yet"
    );
    lab.ok(&["port", "add", &c, "8080:80"]).unwrap();
    let s = traffic::http_server(&ns, v4(Ipv4Addr::UNSPECIFIED, 80), "c", 1, WINDOW).unwrap();
    assert!(
        traffic::http_get(&lab.ext, v4(NODE_ADDR, 8080))
            .unwrap()
            .starts_with("hello from c")
    );
    s.join().unwrap();
    lab.ok(&["port", "del", &c, "8080:80"]).unwrap();
    let s = traffic::http_server(
        &ns,
        v4(Ipv4Addr::UNSPECIFIED, 80),
        "c",
        1,
        Duration::from_secs(3),
    )
    .unwrap();
    assert!(
        traffic::http_get(&lab.ext, v4(NODE_ADDR, 8080)).is_err(),
        "unpublished"
    );
    assert!(s.join().unwrap().is_empty());
    let out = lab.run(&["port", "del", &c, "8080:80"]).unwrap();
    assert!(
        !out.status.success(),
        "deleting what is not published is an error"
    );
}

#[test]
fn a_new_mapping_is_not_shadowed_by_earlier_traffic() {
    let lab = lab_up("stale");
    no_stale_shadowing(
        &lab,
        v4(EXT_ADDR, 45000),
        v4(NODE_ADDR, 5353),
        v4(Ipv4Addr::UNSPECIFIED, 53),
    );
}

#[test]
fn a_new_ipv6_mapping_is_not_shadowed_by_earlier_traffic() {
    let lab = lab_up6("stale6");
    let v6 = |ip: &str, port| std::net::SocketAddr::new(ip.parse().unwrap(), port);
    no_stale_shadowing(
        &lab,
        v6(bpfnat_tests::EXT6, 45000),
        v6(bpfnat_tests::NODE6, 5353),
        v6("::", 53),
    );
}

/// Traffic from `client` to host port `target` before anything is published, then after it
/// is published to one container, then moved to another: the first packet after each change
/// follows the mapping (containers listen on `listen`).
fn no_stale_shadowing(
    lab: &bpfnat_tests::Lab,
    client: std::net::SocketAddr,
    target: std::net::SocketAddr,
    listen: std::net::SocketAddr,
) {
    let (a, b) = (lab.name("a"), lab.name("b"));
    lab.ok(&["container", "add", &a]).unwrap();
    lab.ok(&["container", "add", &b]).unwrap();
    // Traffic to the host port before anything is published (Docker's and kube-proxy's
    // UDP case: the kernel tracked it as the node's own).
    assert!(traffic::udp_ask(&lab.ext, client, target, b"early").is_err());

    lab.ok(&["port", "add", &a, "5353:53/udp"]).unwrap();
    let ea = traffic::udp_echo(&lab.container_ns(&a), listen, 1, WINDOW).unwrap();
    assert!(
        traffic::udp_ask(&lab.ext, client, target, b"one").is_ok(),
        "the first packet after publishing gets through"
    );
    assert_eq!(ea.join().unwrap().len(), 1);

    // Move the mapping to another container: the same client flow follows at once.
    lab.ok(&["port", "del", &a, "5353:53/udp"]).unwrap();
    lab.ok(&["port", "add", &b, "5353:53/udp"]).unwrap();
    let eb = traffic::udp_echo(&lab.container_ns(&b), listen, 1, WINDOW).unwrap();
    assert!(traffic::udp_ask(&lab.ext, client, target, b"two").is_ok());
    assert_eq!(
        eb.join().unwrap().len(),
        1,
        "the packet reached the new target"
    );
}
