//! F7: ICMP errors about translated connections reach the socket they are about, so PMTU
//! discovery, traceroute and "connection refused" work through bpfnat, over IPv4 and over
//! IPv6 (NAT66: Packet Too Big, Time Exceeded, Destination Unreachable). The scenarios are
//! shared: each runs once per family.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    time::Duration,
};

use bpfnat_tests::{
    EXT_ADDR, EXT6, FAR_ADDR, FAR6, Lab, NODE_ADDR, ROUTER_ADDR, UPLINK, bin, counter, lab_up,
    lab_up6, routed_v6, run_in_ns, udp_refused, v4,
};

const BULK: usize = 256 * 1024;

fn v6(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::from((ip.parse::<Ipv6Addr>().unwrap(), port))
}

/// A routed lab whose far link has MTU `far_mtu`, up in `family` (4, or 6: dual-stack with
/// IPv6 addressing), with one container; returns the lab, the container's namespace and the
/// far host's address.
fn routed(name: &str, far_mtu: u32, family: u8) -> (Lab, std::path::PathBuf, std::net::IpAddr) {
    let lab = Lab::with_router(name, &bin(), far_mtu).unwrap();
    let far = if family == 6 {
        routed_v6(&lab);
        lab.ok(&["up", "--uplink", UPLINK, "--subnet6", "fd00:88::/64"])
            .unwrap();
        FAR6.parse::<Ipv6Addr>().unwrap().into()
    } else {
        lab.ok(&["up", "--uplink", UPLINK]).unwrap();
        FAR_ADDR.into()
    };
    let c = lab.name("c");
    lab.ok(&["container", "add", &c]).unwrap();
    let ns = lab.container_ns(&c);
    (lab, ns, far)
}

#[test]
fn path_mtu_discovery_works_through_masquerade() {
    let (lab, ns, far) = routed("bnt-pmtu", 1280, 4);
    path_mtu_discovery(&lab, &ns, SocketAddr::new(far, 9000));
}

#[test]
fn path_mtu_discovery_works_through_nat66() {
    // 1280 is IPv6's minimum MTU: the router's Packet Too Big is the only way to learn it.
    let (lab, ns, far) = routed("bnt-pmtu6", 1280, 6);
    path_mtu_discovery(&lab, &ns, SocketAddr::new(far, 9000));
}

/// Upload from the container `ns` to `far`, beyond a 1280-byte link: full-size segments
/// (with DF, or IPv6, which routers never fragment) cannot cross it, so unless the router's
/// error reaches the container, the upload stalls.
fn path_mtu_discovery(lab: &Lab, ns: &Path, far: SocketAddr) {
    let listener = nat_plumbing::netns::run_in(&lab.ext, move || {
        Ok(TcpListener::bind(SocketAddr::new(
            if far.is_ipv6() {
                Ipv6Addr::UNSPECIFIED.into()
            } else {
                far.ip()
            },
            far.port(),
        ))?)
    })
    .unwrap();
    let server = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        let mut data = Vec::new();
        s.read_to_end(&mut data)?;
        s.write_all(data.len().to_string().as_bytes())?;
        Ok(data.len())
    });
    let answer = nat_plumbing::netns::run_in(ns, move || {
        let mut s = TcpStream::connect_timeout(&far, Duration::from_secs(5))?;
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
    let (_, route) = run_in_ns(ns, "ip", &["route", "get", &far.ip().to_string()]);
    assert!(
        route.contains("mtu 1280"),
        "the container learned the path MTU: {route}"
    );
    assert!(counter(lab, "icmp_error") >= 1);
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
    let (lab, ns, far) = routed("bnt-trace", 1500, 4);
    traceroute(
        &lab,
        &ns,
        &far.to_string(),
        &ROUTER_ADDR.to_string(),
        "Time to live exceeded",
    );
}

#[test]
fn traceroute_through_nat66_sees_each_hop() {
    let (lab, ns, far) = routed("bnt-trace6", 1500, 6);
    traceroute(&lab, &ns, &far.to_string(), EXT6, "Time exceeded");
}

/// ICMP echo from the container `ns` to `far` with a hop limit of 2 and 1: the router
/// (`router`) and then the node itself answer with `exceeded`, then `far` itself.
fn traceroute(lab: &Lab, ns: &Path, far: &str, router: &str, exceeded: &str) {
    // Hop 2 is the router: its error went to the node's address and was translated.
    let (_, hop2) = run_in_ns(ns, "ping", &["-n", "-c", "1", "-W", "2", "-t", "2", far]);
    assert!(
        hop2.contains(&format!("From {router}")) && hop2.contains(exceeded),
        "hop 2: {hop2}"
    );
    // Hop 1 is the node itself.
    let (_, hop1) = run_in_ns(ns, "ping", &["-n", "-c", "1", "-W", "2", "-t", "1", far]);
    assert!(hop1.contains(exceeded), "hop 1: {hop1}");
    let (ok, _) = run_in_ns(ns, "ping", &["-n", "-c", "1", "-W", "2", far]);
    assert!(ok, "and the destination answers");
    assert!(counter(lab, "icmp_error") >= 1);
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

#[test]
fn port_unreachable_reaches_the_sender_in_both_directions_over_ipv6() {
    let lab = lab_up6("icmpunreach6");
    let c = lab.name("c");
    lab.ok(&["container", "add", &c]).unwrap();
    lab.ok(&["port", "add", &c, "5353:53/udp"]).unwrap();
    let before = counter(&lab, "icmp_error");
    assert!(
        udp_refused(&lab.container_ns(&c), v6(EXT6, 9999)),
        "error of a masqueraded flow"
    );
    // Outside -> published port, nothing listening in the container: the container refuses.
    assert!(
        udp_refused(&lab.ext, v6(bpfnat_tests::NODE6, 5353)),
        "error of a published flow"
    );
    assert!(counter(&lab, "icmp_error") >= before + 2);
}
