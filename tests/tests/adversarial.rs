//! bpfnat as an attacker meets it: forged frames from a host on the uplink's segment and from
//! inside containers, written on raw sockets, and what a user would see happen. One test per
//! defect found; each negative check has a positive control in the same lab (the honest
//! version of the packet gets through), so a broken lab cannot pass for a safe datapath.

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::Duration,
};

use bpfnat_tests::{
    EXT_ADDR, Lab, NODE_ADDR, add_container, counter, json, lab_up, lab_up6,
    packet::{self, PROTO_UDP},
    run_in_ns, traffic, uplink_mac, v4, wire,
};

const EXT_MAC: [u8; 6] = [0x02, 0, 198, 51, 100, 1];
const WINDOW: Duration = Duration::from_secs(3);
/// The source port of every forged datagram: what a server must never see.
const FORGED_PORT: u16 = 5555;

/// A UDP datagram from `src` to `dst:dport` as a host on the uplink's segment would put it on
/// the wire, addressed to the node's MAC.
fn from_segment(lab: &Lab, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    packet::frame(
        EXT_MAC,
        uplink_mac(lab),
        src,
        dst,
        PROTO_UDP,
        &packet::udp(src, dst, sport, dport, true),
    )
}

#[test]
fn ports_published_on_localhost_or_reached_by_broadcast_stay_closed_to_the_wire() {
    let lab = lab_up("adv-local");
    let c = add_container(
        &lab,
        "c",
        &["-p", "127.0.0.1:8080:80/udp", "-p", "9090:90/udp"],
    );
    let only_local = traffic::udp_echo(&c.ns, v4(Ipv4Addr::UNSPECIFIED, 80), 10, WINDOW).unwrap();
    let everywhere = traffic::udp_echo(&c.ns, v4(Ipv4Addr::UNSPECIFIED, 90), 10, WINDOW).unwrap();
    let cap = wire::capture(&lab.ext, "eth0", WINDOW);
    let frames = vec![
        // Positive control: the same forged-by-hand frame to the node's address.
        from_segment(&lab, EXT_ADDR, FORGED_PORT, NODE_ADDR, 9090),
        from_segment(&lab, EXT_ADDR, FORGED_PORT + 1, Ipv4Addr::LOCALHOST, 8080),
        from_segment(&lab, EXT_ADDR, FORGED_PORT + 2, Ipv4Addr::LOCALHOST, 9090),
        from_segment(
            &lab,
            EXT_ADDR,
            FORGED_PORT + 3,
            Ipv4Addr::new(198, 51, 100, 255),
            9090,
        ),
        from_segment(&lab, EXT_ADDR, FORGED_PORT + 4, Ipv4Addr::BROADCAST, 9090),
        from_segment(
            &lab,
            EXT_ADDR,
            FORGED_PORT + 5,
            Ipv4Addr::new(224, 0, 0, 251),
            9090,
        ),
    ];
    wire::send(&lab.ext, "eth0", frames);

    assert!(
        only_local.join().unwrap().is_empty(),
        "a port published on 127.0.0.1 was reached from the wire"
    );
    let seen = everywhere.join().unwrap();
    assert_eq!(
        seen,
        vec![v4(EXT_ADDR, FORGED_PORT)],
        "only the datagram to the node's own address arrives"
    );
    let leaked: Vec<_> = cap
        .join()
        .unwrap()
        .iter()
        .filter_map(|f| wire::ipv4_ports(f))
        .filter(|(src, ..)| src.is_loopback())
        .collect();
    assert!(leaked.is_empty(), "left the uplink from 127/8: {leaked:?}");
    assert_eq!(counter(&lab, "drop_martian"), 2);
    assert_eq!(counter(&lab, "broadcast"), 2);
    assert_eq!(counter(&lab, "dnat_new"), 1);
}

#[test]
fn internal_and_martian_sources_from_outside_are_dropped() {
    let lab = lab_up("adv-src");
    let c = add_container(&lab, "c", &["-p", "9091:91/udp"]);
    let v = add_container(&lab, "v", &[]);
    let published = traffic::udp_echo(&c.ns, v4(Ipv4Addr::UNSPECIFIED, 91), 10, WINDOW).unwrap();
    let far = traffic::udp_echo(&lab.ext, v4(EXT_ADDR, 7000), 10, WINDOW).unwrap();
    // The victim's masqueraded flow, answered once.
    let answer = traffic::udp_ask(
        &v.ns,
        v4(Ipv4Addr::UNSPECIFIED, 6000),
        v4(EXT_ADDR, 7000),
        b"legit",
    )
    .unwrap();
    assert_eq!(answer, format!("{NODE_ADDR}:6000 legit"));

    let gateway = Ipv4Addr::new(10, 88, 0, 1);
    let frames = vec![
        // Positive control.
        from_segment(&lab, EXT_ADDR, FORGED_PORT, NODE_ADDR, 9091),
        // Another container's, the gateway's, the node's own and a loopback source.
        from_segment(&lab, v.ip, FORGED_PORT, NODE_ADDR, 9091),
        from_segment(&lab, gateway, FORGED_PORT, NODE_ADDR, 9091),
        from_segment(&lab, NODE_ADDR, FORGED_PORT, NODE_ADDR, 9091),
        from_segment(&lab, Ipv4Addr::LOCALHOST, FORGED_PORT, NODE_ADDR, 9091),
        // Injection into the victim's flow: its own tuple, as if it came from the container.
        from_segment(&lab, v.ip, 6000, EXT_ADDR, 7000),
    ];
    wire::send(&lab.ext, "eth0", frames);

    assert_eq!(
        published.join().unwrap(),
        vec![v4(EXT_ADDR, FORGED_PORT)],
        "only the honest client reached the published port"
    );
    assert_eq!(
        far.join().unwrap(),
        vec![v4(NODE_ADDR, 6000)],
        "nothing was injected into the masqueraded flow"
    );
    assert_eq!(counter(&lab, "drop_martian"), 5);
}

#[test]
fn broadcast_and_multicast_from_containers_are_never_masqueraded() {
    let lab = lab_up("adv-bcast");
    let c = add_container(&lab, "c", &[]);
    let cap = wire::capture(&lab.ext, "eth0", WINDOW);
    nat_plumbing::netns::run_in(&c.ns, || {
        let s = UdpSocket::bind(v4(Ipv4Addr::UNSPECIFIED, 0))?;
        s.set_broadcast(true)?;
        // Positive control first.
        s.send_to(b"unicast", v4(EXT_ADDR, 7001))?;
        s.send_to(b"limited", v4(Ipv4Addr::BROADCAST, 7001))?;
        s.send_to(b"subnet", v4(Ipv4Addr::new(10, 88, 255, 255), 7001))?;
        s.send_to(b"mdns", v4(Ipv4Addr::new(224, 0, 0, 251), 7001))?;
        Ok(())
    })
    .unwrap();
    let out: Vec<_> = cap
        .join()
        .unwrap()
        .iter()
        .filter_map(|f| wire::ipv4_ports(f))
        .filter(|(.., dport)| *dport == 7001)
        .collect();
    assert_eq!(out.len(), 1, "only the unicast datagram left: {out:?}");
    assert_eq!((out[0].0, out[0].2), (NODE_ADDR, EXT_ADDR));
    assert_eq!(counter(&lab, "broadcast"), 2);
    assert!(counter(&lab, "drop_no_endpoint") >= 1);
}

/// The link-local address Linux gives an interface with MAC `mac` (EUI-64).
fn link_local(mac: [u8; 6]) -> String {
    format!(
        "fe80::{:02x}{:02x}:{:02x}ff:fe{:02x}:{:02x}{:02x}",
        mac[0] ^ 2,
        mac[1],
        mac[2],
        mac[3],
        mac[4],
        mac[5]
    )
}

/// The IPv6 addresses of `dev` in `ns`, as `ip -6 -o addr` prints them.
fn ipv6_addrs(ns: &std::path::Path, dev: &str) -> String {
    run_in_ns(ns, "ip", &["-6", "-o", "addr", "show", "dev", dev]).1
}

/// Whether `dev` in `ns` gets a usable link-local address (its duplicate address detection
/// done) within five seconds.
fn link_local_ready(ns: &std::path::Path, dev: &str) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let a = ipv6_addrs(ns, dev);
        if a.contains("fe80::") && !a.contains("tentative") {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the node answers a ping from the container in `ns` to the link-local address
/// its host veth has (or would have) by `host_mac`.
fn node_answers_link_local(ns: &std::path::Path, host_mac: [u8; 6]) -> bool {
    let to = format!("{}%eth0", link_local(host_mac));
    run_in_ns(ns, "ping", &["-6", "-c", "1", "-W", "2", &to]).0
}

/// Container `short` of `lab` (added here) and its host veth's name.
fn container_and_host_if(lab: &Lab, short: &str) -> (bpfnat_tests::ContainerInfo, String) {
    let c = add_container(lab, short, &[]);
    let v = json(lab, &["container", "inspect", &lab.name(short)]);
    (c, v["host_if"].as_str().unwrap().to_owned())
}

#[test]
fn a_node_without_an_ipv6_subnet_gives_containers_no_ipv6_way_to_it() {
    // Positive control: on a dual-stack node the host veth has its link-local address, and
    // the node's stack answers the container on it.
    let lab6 = lab_up6("adv-ll6");
    let (c6, host_if6) = container_and_host_if(&lab6, "c");
    assert!(link_local_ready(&lab6.node, &host_if6));
    assert!(link_local_ready(&c6.ns, "eth0"));
    assert!(node_answers_link_local(&c6.ns, c6.host_mac));

    let lab = lab_up("adv-ll4");
    let (c, host_if) = container_and_host_if(&lab, "c");
    assert_eq!(ipv6_addrs(&lab.node, &host_if), "", "no IPv6 on {host_if}");
    // The container's own side keeps its IPv6 (it is the container's business).
    assert!(link_local_ready(&c.ns, "eth0"));
    assert!(!node_answers_link_local(&c.ns, c.host_mac));
    // IPv4 to the node still works.
    assert!(bpfnat_tests::ping(&c.ns, Ipv4Addr::new(10, 88, 0, 1)));
}

/// `n` UDP flows from namespace `ns` to the external echo server on port 7002: one datagram
/// out and its answer each, then, once `between` returns, a second round on every socket.
/// Returns how many exchanges got no answer.
fn udp_flows(ns: &std::path::Path, n: usize, between: impl FnOnce()) -> usize {
    // Sockets belong to the namespace they were made in, wherever they are used from.
    let socks: Vec<UdpSocket> = nat_plumbing::netns::run_in(ns, move || {
        (0..n)
            .map(|_| {
                let s = UdpSocket::bind(v4(Ipv4Addr::UNSPECIFIED, 0))?;
                s.connect(v4(EXT_ADDR, 7002))?;
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                Ok(s)
            })
            .collect::<std::io::Result<_>>()
            .map_err(Into::into)
    })
    .expect("UDP sockets");
    let round = || {
        let mut buf = [0u8; 128];
        socks
            .iter()
            .filter(|s| s.send(b"ping").is_err() || s.recv(&mut buf).is_err())
            .count()
    };
    let failed = round();
    between();
    failed + round()
}

#[test]
fn garbage_collection_during_new_connections_breaks_none() {
    let lab = lab_up("adv-gc");
    let c = add_container(&lab, "c", &[]);
    bpfnat_tests::fill_conntrack(&lab.bpffs_dir, 40_000).unwrap();
    const FLOWS: usize = 320;
    let echo = traffic::udp_echo(
        &lab.ext,
        v4(EXT_ADDR, 7002),
        2 * FLOWS,
        Duration::from_secs(30),
    )
    .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let (runs, failed) = std::thread::scope(|scope| {
        let gc = scope.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                lab.ok(&["conntrack", "gc"]).expect("conntrack gc");
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        // The second round waits for two whole gc runs over the new connections (bounded:
        // a slow machine runs gc slowly).
        let failed = udp_flows(&c.ns, FLOWS, || {
            let start = done.load(std::sync::atomic::Ordering::Relaxed);
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while done.load(std::sync::atomic::Ordering::Relaxed) < start + 2
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        gc.join().expect("gc thread");
        (done.load(std::sync::atomic::Ordering::Relaxed), failed)
    });
    drop(echo);
    assert!(runs >= 2, "gc ran {runs} times only");
    assert_eq!(failed, 0, "flows broken while gc ran");
    let stats = json(&lab, &["conntrack", "stats"]);
    assert_eq!(stats["orphans"], 0, "{stats}");
    assert_eq!(
        stats["connections"].as_u64().unwrap(),
        40_000 + FLOWS as u64,
        "{stats}"
    );
}

/// Recompute the IPv4 header checksum of frame `f` after a test changed the header.
fn fix_ip_csum(f: &mut [u8]) {
    f[24] = 0;
    f[25] = 0;
    let c = packet::csum(&f[14..34], 0);
    f[24..26].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn malformed_packets_from_outside_create_no_state_and_are_counted() {
    let lab = lab_up("adv-invalid");
    let c = add_container(&lab, "c", &["-p", "9092:92/udp", "-p", "9093:93/tcp"]);
    let srv = traffic::udp_echo(&c.ns, v4(Ipv4Addr::UNSPECIFIED, 92), 10, WINDOW).unwrap();
    let udp = |sport: u16| from_segment(&lab, EXT_ADDR, sport, NODE_ADDR, 9092);

    let mut longer_than_frame = udp(FORGED_PORT + 1);
    longer_than_frame[17] += 100;
    fix_ip_csum(&mut longer_than_frame);
    let mut shorter_than_header = udp(FORGED_PORT + 2);
    shorter_than_header[16..18].copy_from_slice(&16u16.to_be_bytes());
    fix_ip_csum(&mut shorter_than_header);
    let mut udp_len_lies = udp(FORGED_PORT + 3);
    udp_len_lies[39] += 10;
    let mut bad_ip_csum = udp(FORGED_PORT + 4);
    bad_ip_csum[25] ^= 0x55;
    let mut ttl_1 = udp(FORGED_PORT + 5);
    ttl_1[22] = 1;
    fix_ip_csum(&mut ttl_1);
    let mut tcp_doff_4 = packet::frame(
        EXT_MAC,
        uplink_mac(&lab),
        EXT_ADDR,
        NODE_ADDR,
        packet::PROTO_TCP,
        &packet::tcp(EXT_ADDR, NODE_ADDR, FORGED_PORT + 6, 9093, 0x02),
    );
    tcp_doff_4[46] = 4 << 4;
    // Complete L4 checksums that are wrong (a raw frame's skb is CHECKSUM_NONE).
    let mut bad_udp_csum = udp(FORGED_PORT + 7);
    bad_udp_csum[40] ^= 0x55;
    let mut bad_syn_csum = packet::frame(
        EXT_MAC,
        uplink_mac(&lab),
        EXT_ADDR,
        NODE_ADDR,
        packet::PROTO_TCP,
        &packet::tcp(EXT_ADDR, NODE_ADDR, FORGED_PORT + 8, 9093, 0x02),
    );
    bad_syn_csum[50] ^= 0x55;
    // UDP without a checksum (0) is valid over IPv4.
    let no_udp_csum = packet::frame(
        EXT_MAC,
        uplink_mac(&lab),
        EXT_ADDR,
        NODE_ADDR,
        PROTO_UDP,
        &packet::udp(EXT_ADDR, NODE_ADDR, FORGED_PORT + 9, 9092, false),
    );
    wire::send(
        &lab.ext,
        "eth0",
        vec![
            longer_than_frame,
            shorter_than_header,
            udp_len_lies,
            bad_ip_csum,
            ttl_1,
            tcp_doff_4,
            bad_udp_csum,
            bad_syn_csum,
            no_udp_csum,
            // Positive control, last: the lab delivered everything before it.
            udp(FORGED_PORT),
        ],
    );
    assert_eq!(
        srv.join().unwrap(),
        vec![v4(EXT_ADDR, FORGED_PORT + 9), v4(EXT_ADDR, FORGED_PORT)],
        "only the well-formed datagrams arrive"
    );
    let flows = bpfnat_tests::flows(&lab);
    assert_eq!(flows.len(), 2, "only the controls created state: {flows:?}");
    assert_eq!(counter(&lab, "drop_truncated"), 1);
    assert_eq!(counter(&lab, "drop_invalid"), 4);
    assert_eq!(counter(&lab, "drop_ttl"), 1);
    assert_eq!(counter(&lab, "drop_l4_csum"), 2);
}

#[test]
fn a_container_cannot_open_a_connection_with_a_wrong_checksum() {
    let lab = lab_up("adv-csum");
    let c = add_container(&lab, "c", &[]);
    let far = traffic::udp_echo(&lab.ext, v4(EXT_ADDR, 7003), 10, WINDOW).unwrap();
    let datagram = |sport: u16, good: bool| {
        let mut f = packet::frame(
            c.mac,
            c.host_mac,
            c.ip,
            EXT_ADDR,
            PROTO_UDP,
            &packet::udp(c.ip, EXT_ADDR, sport, 7003, true),
        );
        if !good {
            f[40] ^= 0x55;
        }
        f
    };
    // Complete and wrong, then the same datagram right (the control, last).
    wire::send(
        &c.ns,
        "eth0",
        vec![
            datagram(FORGED_PORT + 1, false),
            datagram(FORGED_PORT, true),
        ],
    );
    assert_eq!(
        far.join().unwrap(),
        vec![v4(NODE_ADDR, FORGED_PORT)],
        "only the datagram with a right checksum was masqueraded"
    );
    assert_eq!(counter(&lab, "drop_l4_csum"), 1);
    assert_eq!(bpfnat_tests::flows(&lab).len(), 1);
}

/// An ICMP "port unreachable" from `src` to `dst` quoting a UDP datagram
/// `q_src:q_sport → q_dst:q_dport`, as an Ethernet frame from `smac` to `dmac`.
#[expect(clippy::too_many_arguments, reason = "a packet is its fields")]
fn port_unreachable(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    q_src: Ipv4Addr,
    q_sport: u16,
    q_dst: Ipv4Addr,
    q_dport: u16,
) -> Vec<u8> {
    let quoted = packet::frame(
        [0; 6],
        [0; 6],
        q_src,
        q_dst,
        PROTO_UDP,
        &packet::udp(q_src, q_dst, q_sport, q_dport, true),
    );
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted[14..14 + 28]);
    let c = packet::csum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    packet::frame(smac, dmac, src, dst, packet::PROTO_ICMP, &icmp)
}

/// A UDP socket in `ns` bound to `port` and connected to `dst`, which has sent one datagram
/// (so a masqueraded connection exists).
fn connected_udp(ns: &std::path::Path, port: u16, dst: std::net::SocketAddr) -> UdpSocket {
    nat_plumbing::netns::run_in(ns, move || {
        let s = UdpSocket::bind(v4(Ipv4Addr::UNSPECIFIED, port))?;
        s.connect(dst)?;
        s.set_read_timeout(Some(Duration::from_millis(700)))?;
        s.send(b"hello")?;
        Ok(s)
    })
    .unwrap()
}

/// Whether the next receive on `s` reports "connection refused" (an ICMP error reached it).
fn refused(s: &UdpSocket) -> bool {
    let mut buf = [0u8; 64];
    matches!(s.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

#[test]
fn icmp_errors_that_do_not_fit_the_connection_they_quote_are_dropped() {
    let lab = lab_up("adv-icmp");
    let c = add_container(&lab, "c", &[]);
    let v = add_container(&lab, "v", &[]);
    // A silent peer: it neither answers nor refuses.
    let _silent =
        nat_plumbing::netns::run_in(&lab.ext, || Ok(UdpSocket::bind(v4(EXT_ADDR, 7003))?)).unwrap();
    let cs = connected_udp(&c.ns, 6001, v4(EXT_ADDR, 7003));
    let vs = connected_udp(&v.ns, 6002, v4(EXT_ADDR, 7003));
    std::thread::sleep(Duration::from_millis(100));
    let mac = uplink_mac(&lab);
    let from_ext = |dst: Ipv4Addr| {
        port_unreachable(EXT_MAC, mac, EXT_ADDR, dst, NODE_ADDR, 6001, EXT_ADDR, 7003)
    };

    // From outside: an error not addressed to the quoted packet's sender is a reflection.
    wire::send(
        &lab.ext,
        "eth0",
        vec![from_ext(Ipv4Addr::new(203, 0, 113, 9))],
    );
    assert!(!refused(&cs), "a reflected error reached the container");
    // Positive control: the same error to the node's address reaches it.
    wire::send(&lab.ext, "eth0", vec![from_ext(NODE_ADDR)]);
    assert!(
        refused(&cs),
        "the genuine error did not reach the container"
    );

    // From a container: an error about another container's connection would leave with a
    // private source address.
    let cap = wire::capture(&lab.ext, "eth0", Duration::from_secs(2));
    let about_v = |from: &bpfnat_tests::ContainerInfo| {
        port_unreachable(
            from.mac,
            from.host_mac,
            from.ip,
            EXT_ADDR,
            EXT_ADDR,
            7003,
            v.ip,
            6002,
        )
    };
    wire::send(&c.ns, "eth0", vec![about_v(&c)]);
    // Positive control: the victim itself may send it.
    wire::send(&v.ns, "eth0", vec![about_v(&v)]);
    let icmp_out: Vec<Ipv4Addr> = cap
        .join()
        .unwrap()
        .iter()
        .filter(|f| f.len() > 34 && f[12..14] == [8, 0] && f[23] == packet::PROTO_ICMP)
        .map(|f| Ipv4Addr::new(f[26], f[27], f[28], f[29]))
        .collect();
    assert_eq!(
        icmp_out,
        vec![NODE_ADDR],
        "only the victim's own error left, masqueraded"
    );
    assert_eq!(counter(&lab, "drop_icmp_mismatch"), 2);
    drop(vs);
}

/// An open TCP connection between two namespaces, the server echoing what it reads.
struct Held {
    client: std::net::TcpStream,
    /// The client's address as the server saw it (for a masqueraded client, the node's).
    seen: std::net::SocketAddrV4,
}

fn hold(
    server_ns: &std::path::Path,
    listen: std::net::SocketAddr,
    client_ns: &std::path::Path,
    dst: std::net::SocketAddr,
) -> Held {
    use std::io::{Read as _, Write as _};
    let listener =
        nat_plumbing::netns::run_in(server_ns, move || Ok(std::net::TcpListener::bind(listen)?))
            .unwrap();
    let client = nat_plumbing::netns::run_in(client_ns, move || {
        Ok(std::net::TcpStream::connect_timeout(&dst, WINDOW)?)
    })
    .unwrap();
    client.set_read_timeout(Some(WINDOW)).unwrap();
    let (mut s, peer) = listener.accept().unwrap();
    std::thread::spawn(move || {
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let mut buf = [0u8; 64];
        while let Ok(n @ 1..) = s.read(&mut buf) {
            if s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let std::net::SocketAddr::V4(seen) = peer else {
        panic!("IPv4 peer expected")
    };
    Held { client, seen }
}

/// One byte there and back: whether the connection still carries data.
fn round_trip(h: &mut Held) -> bool {
    use std::io::{Read as _, Write as _};
    let mut b = [0u8; 1];
    h.client.write_all(b"x").is_ok() && h.client.read_exact(&mut b).is_ok() && b == *b"x"
}

/// The outside side's next sequence number and acknowledgement on the wire, from a capture
/// on the external host during one round trip.
fn next_numbers(
    lab: &Lab,
    h: &mut Held,
    from: std::net::SocketAddrV4,
    to: std::net::SocketAddrV4,
) -> (u32, u32) {
    let cap = wire::capture(&lab.ext, "eth0", Duration::from_secs(1));
    assert!(round_trip(h), "the connection carries data");
    let frames = cap.join().unwrap();
    let (seq, ack, flags, len) = frames
        .iter()
        .rev()
        .find_map(|f| packet::tcp_numbers(f, from, to))
        .expect("a segment from the outside side was captured");
    (
        seq.wrapping_add(len).wrapping_add(u32::from(flags & 1)),
        ack,
    )
}

/// A TCP segment from `from` to `to` as a host on the uplink's segment forges it, its
/// checksum right when `good`.
fn forged_tcp(
    lab: &Lab,
    (from, to): (std::net::SocketAddrV4, std::net::SocketAddrV4),
    (seq, ack): (u32, u32),
    flags: u8,
    good: bool,
) -> Vec<u8> {
    packet::frame(
        EXT_MAC,
        uplink_mac(lab),
        *from.ip(),
        *to.ip(),
        packet::PROTO_TCP,
        &packet::tcp_seg(
            *from.ip(),
            *to.ip(),
            from.port(),
            to.port(),
            seq,
            ack,
            flags,
            good,
        ),
    )
}

/// The client's own port of a held connection.
fn local_port(h: &Held) -> u16 {
    match h.client.local_addr().unwrap() {
        std::net::SocketAddr::V4(a) => a.port(),
        other => panic!("{other}"),
    }
}

fn tcp_state_of(lab: &Lab, dport: u16) -> String {
    bpfnat_tests::flows(lab)
        .iter()
        .find(|f| f["proto"] == "tcp" && f["original"]["dport"] == dport)
        .map(|f| f["state"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_else(|| "none".to_owned())
}

#[test]
fn forged_tcp_segments_outside_the_window_or_with_bad_checksums_change_no_state() {
    use nat_common::tcp_flags::{ACK, FIN, RST, SYN};
    let lab = lab_up("adv-rst");
    let c = add_container(&lab, "c", &["-p", "8081:81"]);
    let node = |port| std::net::SocketAddrV4::new(NODE_ADDR, port);
    let ext = |port| std::net::SocketAddrV4::new(EXT_ADDR, port);

    // Published: the outside side is the client. Masqueraded: the outside side is the server.
    let mut published = hold(
        &c.ns,
        v4(Ipv4Addr::UNSPECIFIED, 81),
        &lab.ext,
        v4(NODE_ADDR, 8081),
    );
    let client_port = local_port(&published);
    let mut masq = hold(&lab.ext, v4(EXT_ADDR, 9100), &c.ns, v4(EXT_ADDR, 9100));
    let cases = [
        (&mut published, ext(client_port), node(8081), 8081u16),
        (&mut masq, ext(9100), node(0), 9100u16),
    ];
    for (h, from, to, dport) in cases {
        let to = if to.port() == 0 { h.seen } else { to };
        assert_eq!(tcp_state_of(&lab, dport), "ESTABLISHED");
        let forge = |seq: u32, ack: u32, flags: u8, good: bool| {
            forged_tcp(&lab, (from, to), (seq, ack), flags, good)
        };
        let (seq, ack) = next_numbers(&lab, h, from, to);
        let (win, csum) = (
            counter(&lab, "drop_tcp_window"),
            counter(&lab, "drop_l4_csum"),
        );
        wire::send(
            &lab.ext,
            "eth0",
            vec![
                // Blind: far outside the window.
                forge(seq.wrapping_add(0x4000_0000), ack, RST | ACK, true),
                forge(seq.wrapping_sub(0x4000_0000), ack, RST, true),
                // The exact next sequence number, but a checksum the endpoint would reject.
                forge(seq, ack, RST | ACK, false),
                // A FIN outside the window and a SYN on the open connection: forwarded (the
                // endpoint answers them) but they move nothing.
                forge(seq.wrapping_add(0x4000_0000), ack, FIN | ACK, true),
                forge(seq.wrapping_add(12345), ack, SYN, true),
            ],
        );
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            tcp_state_of(&lab, dport),
            "ESTABLISHED",
            "forged segments moved {dport}"
        );
        assert_eq!(counter(&lab, "drop_tcp_window"), win + 2, "{dport}");
        assert_eq!(counter(&lab, "drop_l4_csum"), csum + 1, "{dport}");
        lab.ok(&["conntrack", "gc"]).unwrap();
        assert!(round_trip(h), "{dport} survived the forged segments and gc");
        assert_eq!(tcp_state_of(&lab, dport), "ESTABLISHED");

        // Positive control: the same RST in the window and with its checksum right does
        // close the connection.
        let (seq, ack) = next_numbers(&lab, h, from, to);
        let rst = forge(seq, ack, RST | ACK, true);
        wire::send(&lab.ext, "eth0", vec![rst]);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            tcp_state_of(&lab, dport),
            "CLOSE",
            "an honest RST closes {dport}"
        );
        assert_eq!(counter(&lab, "drop_tcp_window"), win + 2);
    }
}

/// The `tcp` part of the assured entry whose key is `src:sport → dst:dport`, as `map dump`
/// decodes it.
fn ct_tcp(lab: &Lab, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> serde_json::Value {
    let ct = json(lab, &["map", "dump", "conntrack"]);
    ct.as_array()
        .expect("entry array")
        .iter()
        .find(|e| {
            let k = &e["key"];
            k["proto"] == "tcp"
                && k["src"] == src.to_string()
                && k["sport"] == sport
                && k["dst"] == dst.to_string()
                && k["dport"] == dport
        })
        .map(|e| e["value"]["tcp"].clone())
        .unwrap_or_else(|| panic!("no entry {src}:{sport} → {dst}:{dport} in {ct:#}"))
}

fn num(v: &serde_json::Value) -> u32 {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .expect("a u32")
}

/// Segments from outside of an established connection are checked against the copy of the
/// container's window fields their entry keeps, without reading the container's entry; the
/// copy follows the container (a segment acknowledging data sent since it was taken reads the
/// entry and refreshes it), admits nothing the container's own fields would not (an
/// acknowledgement of data never sent teaches nothing), and goes with the connection's end.
#[test]
fn segments_from_outside_are_checked_against_a_copy_that_admits_nothing_more() {
    use nat_common::tcp_flags::{ACK, RST};
    let lab = lab_up("adv-copy");
    let c = add_container(&lab, "c", &["-p", "8082:82"]);
    let mut published = hold(
        &c.ns,
        v4(Ipv4Addr::UNSPECIFIED, 82),
        &lab.ext,
        v4(NODE_ADDR, 8082),
    );
    let client_port = local_port(&published);
    let mut masq = hold(&lab.ext, v4(EXT_ADDR, 9101), &c.ns, v4(EXT_ADDR, 9101));
    let masq_port = local_port(&masq);
    let node = |port| std::net::SocketAddrV4::new(NODE_ADDR, port);
    let ext = |port| std::net::SocketAddrV4::new(EXT_ADDR, port);
    // (connection, outside end, node end as outside sees it, container's own tuple)
    let seen = masq.seen;
    let cases = [
        (
            &mut published,
            ext(client_port),
            node(8082),
            (82, client_port),
        ),
        (&mut masq, ext(9101), seen, (masq_port, 9101)),
    ];
    for (h, from, to, (c_sport, c_dport)) in cases {
        let outside = || ct_tcp(&lab, *from.ip(), from.port(), *to.ip(), to.port());
        let inside = || ct_tcp(&lab, c.ip, c_sport, EXT_ADDR, c_dport);
        // Round trips; then time for delayed acknowledgements, so nothing moves below but
        // what the test sends.
        assert!(round_trip(h) && round_trip(h), "{to} carries data");
        std::thread::sleep(Duration::from_millis(300));
        let (o, i) = (outside(), inside());
        let copy = &o["peer_copy"];
        assert!(
            copy.is_object(),
            "{to}: no copy in the outside entry: {o:#}"
        );
        assert_eq!(
            copy["end"], i["end"],
            "{to}: the copy follows the container"
        );
        assert!(
            num(&i["limit"]).wrapping_sub(num(&copy["limit"])) as i32 >= 0,
            "{to}: the copy's limit is the container's or older: {o:#} {i:#}"
        );

        let forge =
            |seq: u32, ack: u32, flags: u8| forged_tcp(&lab, (from, to), (seq, ack), flags, true);
        let (seq, ack) = next_numbers(&lab, h, from, to);
        std::thread::sleep(Duration::from_millis(300));
        let before = outside();
        // In the sequence window, acknowledging 16 MiB the container never sent: learned
        // from, it would raise what the outside side lets the container send.
        wire::send(
            &lab.ext,
            "eth0",
            vec![forge(seq, ack.wrapping_add(0x0100_0000), ACK)],
        );
        std::thread::sleep(Duration::from_millis(200));
        let after = outside();
        assert_eq!(
            after["limit"], before["limit"],
            "{to}: learned a forged ack"
        );
        assert_eq!(after["end"], before["end"], "{to}");
        assert!(round_trip(h), "{to} carries data after the forged segment");

        // Positive control: the same segment with the real acknowledgement (and a larger
        // window than the endpoint's own) is learned from.
        let (seq, ack) = next_numbers(&lab, h, from, to);
        std::thread::sleep(Duration::from_millis(300));
        let before = outside();
        wire::send(&lab.ext, "eth0", vec![forge(seq, ack, ACK)]);
        std::thread::sleep(Duration::from_millis(200));
        let after = outside();
        assert_ne!(
            after["limit"], before["limit"],
            "{to}: the honest segment was learned"
        );

        // The connection's end takes the copy with it.
        let (seq, ack) = next_numbers(&lab, h, from, to);
        wire::send(&lab.ext, "eth0", vec![forge(seq, ack, RST | ACK)]);
        std::thread::sleep(Duration::from_millis(200));
        let o = outside();
        assert!(
            o["peer_copy"].is_null(),
            "{to}: a closed connection keeps a copy: {o:#}"
        );
    }
}

/// A TCP connection between two namespaces with both ends kept: (client, server).
fn pair(
    server_ns: &std::path::Path,
    listen: std::net::SocketAddr,
    client_ns: &std::path::Path,
    dst: std::net::SocketAddr,
) -> (std::net::TcpStream, std::net::TcpStream) {
    let listener =
        nat_plumbing::netns::run_in(server_ns, move || Ok(std::net::TcpListener::bind(listen)?))
            .unwrap();
    let client = nat_plumbing::netns::run_in(client_ns, move || {
        Ok(std::net::TcpStream::connect_timeout(&dst, WINDOW)?)
    })
    .unwrap();
    let (server, _) = listener.accept().unwrap();
    for s in [&client, &server] {
        s.set_read_timeout(Some(WINDOW)).unwrap();
    }
    (client, server)
}

/// `from` writes a byte and `to` reads it: whether it arrived.
fn says(from: &mut std::net::TcpStream, to: &mut std::net::TcpStream) -> bool {
    use std::io::{Read as _, Write as _};
    let mut b = [0u8; 1];
    from.write_all(b"y").is_ok() && to.read_exact(&mut b).is_ok() && b == *b"y"
}

#[test]
fn a_syn_flood_never_evicts_established_connections() {
    const SYNS: u32 = 20_000;
    let lab = bpfnat_tests::lab("adv-flood");
    lab.ok(&[
        "up",
        "--uplink",
        bpfnat_tests::UPLINK,
        "--conntrack-max",
        "4096",
    ])
    .unwrap();
    let c = add_container(
        &lab,
        "c",
        &["-p", "8083:83", "-p", "8084:84", "-p", "8085:85"],
    );
    let (mut pc, mut ps) = pair(
        &c.ns,
        v4(Ipv4Addr::UNSPECIFIED, 83),
        &lab.ext,
        v4(NODE_ADDR, 8083),
    );
    let (mut mc, mut ms) = pair(&lab.ext, v4(EXT_ADDR, 9200), &c.ns, v4(EXT_ADDR, 9200));
    // Both directions once: established, both sides seen, assured.
    assert!(says(&mut pc, &mut ps) && says(&mut ps, &mut pc));
    assert!(says(&mut mc, &mut ms) && says(&mut ms, &mut mc));
    let held = |lab: &Lab| {
        bpfnat_tests::flows(lab)
            .into_iter()
            .filter(|f| {
                f["proto"] == "tcp"
                    && (f["original"]["dport"] == 8083 || f["original"]["dport"] == 9200)
                    && f["state"] == "ESTABLISHED"
                    && f["assured"] == true
            })
            .count()
    };
    assert_eq!(held(&lab), 2, "both connections are assured");

    // SYNs from spoofed outside sources, five times what the whole table holds.
    let mac = uplink_mac(&lab);
    let mut x: u32 = 0x1234_5678;
    let frames: Vec<Vec<u8>> = (0..SYNS)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let [a, b, p, q] = x.to_be_bytes();
            let src = if a & 1 == 0 {
                Ipv4Addr::new(203, 0, 113, b.max(1))
            } else {
                Ipv4Addr::new(192, 0, 2, b.max(1))
            };
            let sport = 1024 + (u16::from_be_bytes([p, q]) % 60_000);
            packet::frame(
                EXT_MAC,
                mac,
                src,
                NODE_ADDR,
                packet::PROTO_TCP,
                &packet::tcp_seg(
                    src,
                    NODE_ADDR,
                    sport,
                    8083,
                    x,
                    0,
                    nat_common::tcp_flags::SYN,
                    true,
                ),
            )
        })
        .collect();
    let before = counter(&lab, "dnat_new");
    // An active connection keeps talking through the flood.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (active_ok, active_rounds) = std::thread::scope(|scope| {
        let talker = scope.spawn(|| {
            let (mut ac, mut asrv) = pair(
                &c.ns,
                v4(Ipv4Addr::UNSPECIFIED, 85),
                &lab.ext,
                v4(NODE_ADDR, 8085),
            );
            let (mut ok, mut rounds) = (true, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || rounds < 5 {
                ok &= says(&mut ac, &mut asrv) && says(&mut asrv, &mut ac);
                rounds += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            (ok, rounds)
        });
        wire::send(&lab.ext, "eth0", frames);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        talker.join().unwrap()
    });
    assert!(
        active_ok,
        "the active connection kept working through the flood ({active_rounds} rounds)"
    );
    assert!(
        counter(&lab, "dnat_new") >= before + u64::from(SYNS) / 2,
        "the flood reached the datapath"
    );

    // The idle connections survive, each spoken to first by the side that would expose a
    // lost entry: the container's answer would leave masqueraded from the wrong port, the
    // outside server's would go to the node's stack and be reset.
    assert!(
        says(&mut ps, &mut pc),
        "the published connection survived the flood"
    );
    assert!(
        says(&mut ms, &mut mc),
        "the masqueraded connection survived the flood"
    );
    assert_eq!(held(&lab), 2);
    // The flood is visible, in its own table: that of connections not assured yet.
    let stats = json(&lab, &["conntrack", "stats"]);
    assert!(
        stats["new_entries"].as_u64().unwrap() * 2 >= stats["new_max_entries"].as_u64().unwrap(),
        "{stats}"
    );
    assert_eq!(stats["assured"], 3, "{stats}");
    // Positive control: a new connection still gets through after the flood.
    let body = traffic::http_server(&c.ns, v4(Ipv4Addr::UNSPECIFIED, 84), "c", 1, WINDOW).unwrap();
    assert!(
        traffic::http_get(&lab.ext, v4(NODE_ADDR, 8084))
            .unwrap()
            .starts_with("hello from c")
    );
    assert_eq!(body.join().unwrap().len(), 1);
}

#[test]
fn a_fragment_never_follows_the_ports_of_an_earlier_datagram_with_its_ip_id() {
    const ID: u16 = 0x4242;
    let lab = lab_up("adv-frag");
    let a = add_container(&lab, "a", &["-p", "9094:94/udp"]);
    let _b = add_container(&lab, "b", &["-p", "9095:95/udp"]);
    let mac = uplink_mac(&lab);
    let datagram = |dport: u16| {
        let whole = packet::frame(
            EXT_MAC,
            mac,
            EXT_ADDR,
            NODE_ADDR,
            PROTO_UDP,
            &packet::udp(EXT_ADDR, NODE_ADDR, FORGED_PORT, dport, true),
        );
        packet::fragments(&whole, ID, 8)
    };
    // Positive control: a fragmented datagram for a is reassembled there.
    let echo = traffic::udp_echo(&a.ns, v4(Ipv4Addr::UNSPECIFIED, 94), 10, WINDOW).unwrap();
    wire::send(&lab.ext, "eth0", datagram(9094).to_vec());
    // The next datagram with the same IP id (for b), its last fragment first.
    let [_, last] = datagram(9095);
    let cap = wire::capture(&a.ns, "eth0", Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(100));
    wire::send(&lab.ext, "eth0", vec![last]);
    let into_a: Vec<_> = cap
        .join()
        .unwrap()
        .into_iter()
        .filter(|f| f.len() > 34 && f[12..14] == [8, 0] && f[18..20] == ID.to_be_bytes())
        .collect();
    assert_eq!(
        echo.join().unwrap(),
        vec![v4(EXT_ADDR, FORGED_PORT)],
        "the first datagram was reassembled in a"
    );
    assert!(
        into_a.is_empty(),
        "a fragment of b's datagram went into a: {} frame(s)",
        into_a.len()
    );
    assert_eq!(
        counter(&lab, "frag_unmatched"),
        1,
        "counted, not lost silently"
    );
    assert_eq!(counter(&lab, "drop_fragment"), 0);
}

#[test]
fn a_container_cannot_steer_someone_elses_fragments() {
    const ID: u16 = 0x4343;
    let lab = lab_up("adv-fragsteer");
    let a = add_container(&lab, "a", &["-p", "9096:96/udp"]);
    let b = add_container(&lab, "b", &["-p", "9097:97/udp"]);
    let attacker = add_container(&lab, "x", &[]);
    let mac = uplink_mac(&lab);
    // The outside host's datagram for a, in two fragments.
    let whole = packet::frame(
        EXT_MAC,
        mac,
        EXT_ADDR,
        NODE_ADDR,
        PROTO_UDP,
        &packet::udp(EXT_ADDR, NODE_ADDR, FORGED_PORT, 9096, true),
    );
    let [first, last] = packet::fragments(&whole, ID, 8);
    // The attacker's forgery: the same datagram's first fragment, aimed at b's port.
    let forged = packet::frame(
        attacker.mac,
        attacker.host_mac,
        EXT_ADDR,
        NODE_ADDR,
        PROTO_UDP,
        &packet::udp(EXT_ADDR, NODE_ADDR, FORGED_PORT, 9097, true),
    );
    let [forged_first, _] = packet::fragments(&forged, ID, 8);

    let echo = traffic::udp_echo(&a.ns, v4(Ipv4Addr::UNSPECIFIED, 96), 10, WINDOW).unwrap();
    let cap = wire::capture(&b.ns, "eth0", Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(100));
    wire::send(&lab.ext, "eth0", vec![first]);
    wire::send(&attacker.ns, "eth0", vec![forged_first]);
    wire::send(&lab.ext, "eth0", vec![last]);
    let into_b = cap
        .join()
        .unwrap()
        .into_iter()
        .filter(|f| f.len() > 34 && f[12..14] == [8, 0] && f[18..20] == ID.to_be_bytes())
        .count();
    assert_eq!(into_b, 0, "a fragment for a was steered into b");
    assert_eq!(
        echo.join().unwrap(),
        vec![v4(EXT_ADDR, FORGED_PORT)],
        "the datagram was reassembled in a, where it belongs"
    );
    assert_eq!(
        counter(&lab, "drop_spoof"),
        1,
        "the forgery is dropped and counted"
    );
}
