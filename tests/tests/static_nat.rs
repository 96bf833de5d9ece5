//! F8: static 1:1 NAT, seed 001's `routerns` example — an external address that belongs to one
//! container in both directions, for every protocol.

use std::{net::Ipv4Addr, time::Duration};

use bpfnat_tests::{
    EXT_ADDR, NODE_ADDR, counter, json, lab_up, ping, static_container, traffic, udp_refused, v4,
};

const EXTERNAL: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const WINDOW: Duration = Duration::from_secs(20);

#[test]
fn static_nat_maps_an_external_address_to_one_container_both_ways() {
    let lab = lab_up("static");
    let ns = static_container(&lab, "c", "10.88.0.5", "198.51.100.10");
    let list = json(&lab, &["nat", "list"]);
    assert_eq!(list[0]["external"], EXTERNAL.to_string());

    // In: any port, the client's address preserved; ICMP too.
    let srv = traffic::http_server(&ns, v4(Ipv4Addr::UNSPECIFIED, 2222), "c", 1, WINDOW).unwrap();
    let body = traffic::http_get(&lab.ext, v4(EXTERNAL, 2222)).unwrap();
    assert!(body.starts_with("hello from c"));
    assert_eq!(srv.join().unwrap()[0].ip(), EXT_ADDR);
    assert!(ping(&lab.ext, EXTERNAL), "ping the external address");

    // Out: the container appears as its external address, not the node's.
    let srv = traffic::http_server(&lab.ext, v4(EXT_ADDR, 9000), "ext", 1, WINDOW).unwrap();
    traffic::http_get(&ns, v4(EXT_ADDR, 9000)).unwrap();
    assert_eq!(srv.join().unwrap()[0].ip(), EXTERNAL);
    assert!(counter(&lab, "static_nat") > 0);

    // Refused: the same address twice, an address inside the subnet.
    assert!(
        !lab.run(&[
            "nat",
            "add",
            "--external",
            "198.51.100.10",
            "--internal",
            "10.88.0.6"
        ])
        .unwrap()
        .status
        .success()
    );
    assert!(
        !lab.run(&[
            "nat",
            "add",
            "--external",
            "10.88.0.9",
            "--internal",
            "10.88.0.7"
        ])
        .unwrap()
        .status
        .success()
    );

    // Removed: the container masquerades again and the address is gone.
    lab.ok(&["nat", "del", "--external", "198.51.100.10"])
        .unwrap();
    let srv = traffic::http_server(&lab.ext, v4(EXT_ADDR, 9001), "ext", 1, WINDOW).unwrap();
    traffic::http_get(&ns, v4(EXT_ADDR, 9001)).unwrap();
    assert_eq!(srv.join().unwrap()[0].ip(), NODE_ADDR);
    assert!(json(&lab, &["nat", "list"]).as_array().unwrap().is_empty());
    assert!(
        !ping(&lab.ext, EXTERNAL),
        "the external address no longer answers"
    );
}

#[test]
fn icmp_errors_about_statically_mapped_packets_reach_the_sender() {
    let lab = lab_up("staticicmp");
    let ns = static_container(&lab, "c", "10.88.0.5", "198.51.100.10");
    assert!(
        udp_refused(&ns, v4(EXT_ADDR, 9999)),
        "the external host's error reaches the container"
    );
    assert!(
        udp_refused(&lab.ext, v4(EXTERNAL, 9999)),
        "the container's error reaches the external host"
    );
}
