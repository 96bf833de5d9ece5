//! F7: ICMP errors about translated connections reach the socket they are about, so PMTU
//! discovery, traceroute and "connection refused" work through bpfnat.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    time::Duration,
};

use bpfnat_tests::{
    EXT_ADDR, FAR_ADDR, Lab, NODE_ADDR, ROUTER_ADDR, UPLINK, bin, counter, lab_up, run_in_ns,
    udp_refused, v4,
};

const BULK: usize = 256 * 1024;

#[test]
fn path_mtu_discovery_works_through_masquerade() {
    let lab = Lab::with_router("bnt-pmtu", &bin(), 1280).unwrap();
    lab.ok(&["up", "--uplink", UPLINK]).unwrap();
    let c = lab.name("c");
    lab.ok(&["container", "add", &c]).unwrap();
    let ns = lab.container_ns(&c);

    let listener =
        nat_plumbing::netns::run_in(&lab.ext, || Ok(TcpListener::bind(v4(FAR_ADDR, 9000))?))
            .unwrap();
    let server = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        let mut data = Vec::new();
        s.read_to_end(&mut data)?;
        s.write_all(data.len().to_string().as_bytes())?;
        Ok(data.len())
    });
    // Full-size segments with DF cannot cross the router's 1280-byte link: unless the
    // router's "fragmentation needed" reaches the container, this upload stalls.
    let answer = nat_plumbing::netns::run_in(&ns, || {
        let mut s = TcpStream::connect_timeout(&v4(FAR_ADDR, 9000), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        s.set_write_timeout(Some(Duration::from_secs(15)))?;
        s.write_all(&vec![7u8; BULK])?;
        s.shutdown(Shutdown::Write)?;
        let mut a = String::new();
        s.read_to_string(&mut a)?;
        Ok(a)
    })
    .expect("upload through a smaller-MTU router");
    assert_eq!(answer, BULK.to_string());
    assert_eq!(server.join().unwrap().unwrap(), BULK);
    let (_, route) = run_in_ns(&ns, "ip", &["route", "get", &FAR_ADDR.to_string()]);
    assert!(
        route.contains("mtu 1280"),
        "the container learned the path MTU: {route}"
    );
    assert!(counter(&lab, "icmp_error") >= 1);
}

#[test]
fn an_uplink_mtu_below_the_containers_is_learned_by_the_container() {
    let lab = lab_up("mtu-down");
    let c = lab.name("c");
    lab.ok(&["container", "add", &c]).unwrap();
    let ns = lab.container_ns(&c);
    // The container got the uplink's 1500; the uplink shrinks afterwards. (The external host
    // keeps 1500, as a far peer would, so it advertises a full-size MSS.)
    let (ok, _) = run_in_ns(&lab.node, "ip", &["link", "set", UPLINK, "mtu", "1400"]);
    assert!(ok, "set the uplink MTU");

    let listener =
        nat_plumbing::netns::run_in(&lab.ext, || Ok(TcpListener::bind(v4(EXT_ADDR, 9001))?))
            .unwrap();
    let server = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        let mut data = Vec::new();
        s.read_to_end(&mut data)?;
        Ok(data.len())
    });
    // Full-size segments with DF do not fit the uplink: unless the node's "fragmentation
    // needed" reaches the container (not the masquerade address), this upload stalls.
    nat_plumbing::netns::run_in(&ns, || {
        let mut s = TcpStream::connect_timeout(&v4(EXT_ADDR, 9001), Duration::from_secs(5))?;
        s.set_write_timeout(Some(Duration::from_secs(15)))?;
        s.write_all(&vec![7u8; BULK])?;
        s.shutdown(Shutdown::Write)?;
        Ok(())
    })
    .expect("upload through a smaller uplink MTU");
    assert_eq!(server.join().unwrap().unwrap(), BULK);
    let (_, route) = run_in_ns(&ns, "ip", &["route", "get", &EXT_ADDR.to_string()]);
    assert!(
        route.contains("mtu 1400"),
        "the container learned the uplink's MTU: {route}"
    );
    assert!(counter(&lab, "mtu_exceeded") >= 1);
}

#[test]
fn traceroute_through_masquerade_sees_each_hop() {
    let lab = Lab::with_router("bnt-trace", &bin(), 1500).unwrap();
    lab.ok(&["up", "--uplink", UPLINK]).unwrap();
    let c = lab.name("c");
    lab.ok(&["container", "add", &c]).unwrap();
    let ns = lab.container_ns(&c);
    let far = FAR_ADDR.to_string();
    // Hop 2 is the router: its "time exceeded" went to the node's address and was translated.
    let (_, hop2) = run_in_ns(&ns, "ping", &["-n", "-c", "1", "-W", "2", "-t", "2", &far]);
    assert!(
        hop2.contains(&format!("From {ROUTER_ADDR}")) && hop2.contains("Time to live exceeded"),
        "hop 2: {hop2}"
    );
    // Hop 1 is the node itself.
    let (_, hop1) = run_in_ns(&ns, "ping", &["-n", "-c", "1", "-W", "2", "-t", "1", &far]);
    assert!(hop1.contains("Time to live exceeded"), "hop 1: {hop1}");
    let (ok, _) = run_in_ns(&ns, "ping", &["-n", "-c", "1", "-W", "2", &far]);
    assert!(ok, "and the destination answers");
    assert!(counter(&lab, "icmp_error") >= 1);
}

#[test]
fn port_unreachable_reaches_the_sender_in_both_directions() {
    let lab = lab_up("icmpunreach");
    let c = lab.name("c");
    lab.ok(&["container", "add", &c, "-p", "5353:53/udp"])
        .unwrap();
    // Container -> outside (MASQUERADE): the external host refuses.
    assert!(
        udp_refused(&lab.container_ns(&c), v4(EXT_ADDR, 9999)),
        "error of a masqueraded flow"
    );
    // Outside -> published port, nothing listening in the container: the container refuses.
    assert!(
        udp_refused(&lab.ext, v4(NODE_ADDR, 5353)),
        "error of a published flow"
    );
    assert!(counter(&lab, "icmp_error") >= 2);
}
