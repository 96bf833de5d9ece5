//! What a container or an outside host must not be able to do, with real packets: spoofed
//! frames written on a raw socket, IP options, truncated headers, unpublished addresses.

use std::{net::Ipv4Addr, os::fd::AsRawFd as _, process::Command, time::Duration};

use bpfnat_tests::{
    ContainerInfo, EXT_ADDR, NODE_ADDR, add_container, counter, json, lab_up,
    packet::{self, PROTO_UDP},
    traffic, v4, wire,
};

const WINDOW: Duration = Duration::from_secs(5);

fn container(lab: &bpfnat_tests::Lab, short: &str) -> ContainerInfo {
    add_container(lab, short, &[])
}

/// Write `frame` as it is on the container's eth0, bypassing its IP stack.
fn send_raw(c: &ContainerInfo, frame: Vec<u8>) {
    wire::send(&c.ns, "eth0", vec![frame]);
}

#[test]
fn a_container_cannot_send_with_another_address_or_mac() {
    let lab = lab_up("spoof");
    let c = container(&lab, "c");
    let _victim = container(&lab, "v");
    let echo = traffic::udp_echo(&lab.ext, v4(EXT_ADDR, 7777), 10, WINDOW).unwrap();
    let udp = |src: Ipv4Addr| packet::udp(src, EXT_ADDR, 5555, 7777, true);

    // Honest frame first: proves the raw path itself reaches the external host.
    send_raw(
        &c,
        packet::frame(c.mac, c.host_mac, c.ip, EXT_ADDR, PROTO_UDP, &udp(c.ip)),
    );
    // Another container's address, an address nobody has, and a forged MAC.
    let victim = Ipv4Addr::new(10, 88, 0, 3);
    send_raw(
        &c,
        packet::frame(c.mac, c.host_mac, victim, EXT_ADDR, PROTO_UDP, &udp(victim)),
    );
    let nobody = Ipv4Addr::new(10, 88, 9, 9);
    send_raw(
        &c,
        packet::frame(c.mac, c.host_mac, nobody, EXT_ADDR, PROTO_UDP, &udp(nobody)),
    );
    let forged = [0x02, 0x42, 10, 88, 0, 3];
    send_raw(
        &c,
        packet::frame(forged, c.host_mac, c.ip, EXT_ADDR, PROTO_UDP, &udp(c.ip)),
    );

    let seen = echo.join().unwrap();
    assert_eq!(seen.len(), 1, "only the honest datagram arrives: {seen:?}");
    assert_eq!(seen[0].ip(), NODE_ADDR);
    assert_eq!(counter(&lab, "drop_spoof"), 3);
}

#[test]
fn truncated_headers_are_dropped_and_counted() {
    let lab = lab_up("trunc");
    let c = container(&lab, "c");
    let good = packet::frame(
        c.mac,
        c.host_mac,
        c.ip,
        EXT_ADDR,
        PROTO_UDP,
        &packet::udp(c.ip, EXT_ADDR, 5555, 7777, true),
    );
    // IPv4 header claims 60 bytes of options that are not there.
    let mut bad_ihl = good[..14 + 24].to_vec();
    bad_ihl[14] = 0x4f;
    send_raw(&c, bad_ihl);
    // UDP header cut short.
    send_raw(&c, good[..14 + 20 + 4].to_vec());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(counter(&lab, "drop_truncated"), 2);
    assert!(
        json(&lab, &["conntrack", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn packets_with_ip_options_are_translated_correctly() {
    let lab = lab_up("ipopts");
    let c = container(&lab, "c");
    let echo = traffic::udp_echo(&lab.ext, v4(EXT_ADDR, 7777), 1, Duration::from_secs(10)).unwrap();
    let reply = nat_plumbing::netns::run_in(&c.ns, || {
        let sock = std::net::UdpSocket::bind(v4(Ipv4Addr::UNSPECIFIED, 26000))?;
        // Four NOP options: the IPv4 header grows to 24 bytes.
        let opts = [1u8, 1, 1, 1];
        // SAFETY: setsockopt with a valid buffer and length.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_OPTIONS,
                opts.as_ptr().cast(),
                4,
            )
        };
        assert_eq!(rc, 0, "IP_OPTIONS");
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        sock.send_to(b"opts", v4(EXT_ADDR, 7777))?;
        let mut buf = [0u8; 256];
        let (n, _) = sock.recv_from(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .unwrap();
    assert_eq!(reply, format!("{NODE_ADDR}:26000 opts"));
    assert_eq!(echo.join().unwrap().len(), 1);
}

#[test]
fn container_addresses_are_not_reachable_from_outside() {
    let lab = lab_up("noroute");
    let c = container(&lab, "c");
    // The outside host routes the container subnet at the node, as a neighbour could.
    let mut r = Command::new("ip");
    r.args([
        "route",
        "add",
        "10.88.0.0/16",
        "via",
        &NODE_ADDR.to_string(),
    ]);
    nat_plumbing::netns::command_in(&mut r, &lab.ext).unwrap();
    assert!(r.status().unwrap().success());
    let srv = traffic::http_server(
        &c.ns,
        v4(Ipv4Addr::UNSPECIFIED, 22),
        "c",
        1,
        Duration::from_secs(4),
    )
    .unwrap();
    assert!(traffic::http_get(&lab.ext, v4(c.ip, 22)).is_err());
    assert!(srv.join().unwrap().is_empty());
    assert!(counter(&lab, "drop_not_published") >= 1);
}
