//! The translation core on crafted packets with BPF_PROG_TEST_RUN: parsing, header rewrites,
//! checksum updates (verified by recomputing them from scratch), port allocation, drops.
//! The programs run from the lab's node namespace, so FIB lookups see the lab's routes.

use std::net::Ipv4Addr;

use aya::{TestRun as _, TestRunOptions, programs::Xdp};
use bpfnat_tests::{
    ContainerInfo, EXT_ADDR, Lab, NODE_ADDR, Ran, UPLINK, add_container, counter, json, lab,
    packet::{self, PROTO_ICMP, PROTO_TCP, PROTO_UDP},
    test_run as run,
};

const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// Run the pinned XDP program once on `frame`.
fn run_xdp(lab: &Lab, frame: Vec<u8>) -> Ran {
    let pin = bpfnat_tests::pins(lab).prog(nat_common::prog_names::XDP_UPLINK);
    nat_plumbing::netns::run_in(&lab.node, move || {
        let p = Xdp::from_pin(&pin, aya_obj::programs::XdpAttachType::Interface)?;
        let mut out = vec![0u8; frame.len() + 64];
        let r = p.test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok(Ran {
            action: r.return_value,
            out,
        })
    })
    .expect("BPF_PROG_TEST_RUN (XDP)")
}

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

fn container(lab: &Lab, short: &str, ip: &str, extra: &[&str]) -> ContainerInfo {
    let mut args = vec!["--ip", ip];
    args.extend_from_slice(extra);
    add_container(lab, short, &args)
}

fn uplink_ifindex(lab: &Lab) -> u32 {
    json(lab, &["status"])["node"]["uplink_ifindex"]
        .as_u64()
        .unwrap() as u32
}

fn up(lab: &Lab, extra: &[&str]) {
    let mut args = vec!["up", "--uplink", UPLINK];
    args.extend_from_slice(extra);
    lab.ok(&args).unwrap();
}

const EXT_MAC: [u8; 6] = [0x02, 0, 198, 51, 100, 1];
const ANY_MAC: [u8; 6] = [0xee; 6];

/// A frame from the external host to the node's address.
fn from_ext(proto: u8, l4: &[u8]) -> Vec<u8> {
    packet::frame(EXT_MAC, ANY_MAC, EXT_ADDR, NODE_ADDR, proto, l4)
}

/// A frame from container `c` to the external host.
fn to_ext(c: &ContainerInfo, proto: u8, l4: &[u8]) -> Vec<u8> {
    packet::frame(c.mac, ANY_MAC, c.ip, EXT_ADDR, proto, l4)
}

#[test]
fn dnat_rewrites_destination_and_keeps_checksums_valid() {
    let lab = lab("tr-dnat");
    up(&lab, &[]);
    let web = container(
        &lab,
        "web",
        "10.88.0.2",
        &["-p", "8080:80", "-p", "5353:53/udp"],
    );
    let up_if = uplink_ifindex(&lab);

    let syn = from_ext(
        PROTO_TCP,
        &packet::tcp(EXT_ADDR, NODE_ADDR, 40000, 8080, SYN),
    );
    let r = run(&lab, "tc_uplink", up_if, syn);
    assert_eq!(r.action, TC_ACT_REDIRECT, "delivered into the container");
    let s = packet::verify(&r.out);
    assert_eq!(
        (s.src, s.sport),
        (EXT_ADDR, 40000),
        "client address preserved"
    );
    assert_eq!((s.dst, s.dport), (web.ip, 80));
    assert_eq!(s.ttl, 63);
    assert_eq!(s.dst_mac, web.mac);

    // UDP without a checksum keeps "no checksum".
    let q = from_ext(
        PROTO_UDP,
        &packet::udp(EXT_ADDR, NODE_ADDR, 40001, 5353, false),
    );
    let r = run(&lab, "tc_uplink", up_if, q);
    assert_eq!(r.action, TC_ACT_REDIRECT);
    let s = packet::verify(&r.out);
    assert_eq!((s.dst, s.dport, s.l4_csum), (web.ip, 53, 0));
    let q = from_ext(
        PROTO_UDP,
        &packet::udp(EXT_ADDR, NODE_ADDR, 40002, 5353, true),
    );
    let s = packet::verify(&run(&lab, "tc_uplink", up_if, q).out);
    assert_ne!(s.l4_csum, 0);

    // The reply is translated back to the published address and port.
    let synack = packet::frame(
        web.mac,
        ANY_MAC,
        web.ip,
        EXT_ADDR,
        PROTO_TCP,
        &packet::tcp(web.ip, EXT_ADDR, 80, 40000, SYN | ACK),
    );
    let r = run(&lab, "tc_container", web.host_ifindex, synack);
    assert!(
        r.action == TC_ACT_REDIRECT || r.action == 0,
        "action {}",
        r.action
    );
    let s = packet::verify(&r.out);
    assert_eq!(
        (s.src, s.sport, s.dst, s.dport),
        (NODE_ADDR, 8080, EXT_ADDR, 40000)
    );
    assert_eq!(counter(&lab, "dnat_new"), 3);
}

#[test]
fn snat_rewrites_source_and_keeps_checksums_valid() {
    let lab = lab("tr-snat");
    up(&lab, &["--masquerade-avoid-host-ports"]);
    let c = container(&lab, "c", "10.88.0.2", &[]);
    let syn = to_ext(&c, PROTO_TCP, &packet::tcp(c.ip, EXT_ADDR, 20000, 80, SYN));
    let r = run(&lab, "tc_container", c.host_ifindex, syn);
    assert_eq!(r.action, TC_ACT_REDIRECT, "sent on to the uplink");
    let s = packet::verify(&r.out);
    assert_eq!(
        (s.src, s.sport),
        (NODE_ADDR, 20000),
        "masqueraded, port kept"
    );
    assert_eq!((s.dst, s.dport, s.ttl), (EXT_ADDR, 80, 63));

    // A source port from the node's own ephemeral range is never kept.
    let syn2 = to_ext(&c, PROTO_TCP, &packet::tcp(c.ip, EXT_ADDR, 40000, 81, SYN));
    let s2 = packet::verify(&run(&lab, "tc_container", c.host_ifindex, syn2).out);
    assert_eq!(s2.src, NODE_ADDR);
    assert!(
        !(32768..=60999).contains(&s2.sport),
        "remapped out of the node's range: {}",
        s2.sport
    );

    let ping = to_ext(&c, PROTO_ICMP, &packet::echo_request(777, 1));
    let s = packet::verify(&run(&lab, "tc_container", c.host_ifindex, ping).out);
    assert_eq!((s.src, s.sport), (NODE_ADDR, 777));

    // The reply comes back to the container, checksums intact.
    let synack = from_ext(
        PROTO_TCP,
        &packet::tcp(EXT_ADDR, NODE_ADDR, 80, 20000, SYN | ACK),
    );
    let r = run(&lab, "tc_uplink", uplink_ifindex(&lab), synack);
    assert_eq!(r.action, TC_ACT_REDIRECT);
    let s = packet::verify(&r.out);
    assert_eq!((s.dst, s.dport, s.dst_mac), (c.ip, 20000, c.mac));
}

#[test]
fn the_window_scale_a_syn_offers_is_read_whatever_options_come_first() {
    let lab = lab("tr-wscale");
    up(&lab, &[]);
    let c = container(&lab, "c", "10.88.0.2", &[]);
    const TS: [u8; 10] = [8, 10, 0, 0, 0, 1, 0, 0, 0, 0];
    let linux: Vec<u8> = [&[2, 4, 5, 0xb4, 4, 2][..], &TS, &[1, 3, 3, 7]].concat();
    // (source port, options, the scale the entry must hold)
    let cases: [(u16, Vec<u8>, u64); 6] = [
        // What Linux sends: MSS, SACK permitted, timestamps, NOP, window scale last.
        (21001, linux, 7),
        (21002, vec![3, 3, 5, 1], 5),
        (21003, [vec![1; 30], vec![3, 3, 9]].concat(), 9),
        // Larger than RFC 7323's 14: clamped.
        (21004, vec![3, 3, 20, 1], 14),
        // None offered; then one behind the end-of-options marker, which does not count.
        (21005, vec![2, 4, 5, 0xb4, 1, 1, 4, 2], 0),
        (21006, vec![2, 4, 5, 0xb4, 0, 0, 3, 3, 8], 0),
    ];
    for (sport, opts, _) in &cases {
        let syn = to_ext(
            &c,
            PROTO_TCP,
            &packet::tcp_syn_opts(c.ip, EXT_ADDR, *sport, 80, opts),
        );
        let r = run(&lab, "tc_container", c.host_ifindex, syn);
        assert_eq!(
            r.action, TC_ACT_REDIRECT,
            "SYN from port {sport} masqueraded"
        );
    }
    let ct = json(&lab, &["map", "dump", "conntrack_new"]);
    for (sport, _, scale) in cases {
        let e = ct
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["value"]["dir"] == "original" && e["key"]["sport"] == sport)
            .unwrap_or_else(|| panic!("no entry for port {sport}: {ct:#?}"));
        assert_eq!(
            e["value"]["tcp"]["window_scale"], scale,
            "port {sport}: {e:#?}"
        );
    }
}

#[test]
fn snat_port_allocation_stays_in_range_and_counts_exhaustion() {
    let lab = lab("tr-ports");
    up(&lab, &["--port-range", "30000-30001"]);
    let dst = Ipv4Addr::new(203, 0, 113, 53);
    let mut ports = Vec::new();
    for (i, short) in ["a", "b", "c"].iter().enumerate() {
        let c = container(&lab, short, &format!("10.88.0.{}", i + 2), &[]);
        let f = packet::frame(
            c.mac,
            ANY_MAC,
            c.ip,
            dst,
            PROTO_UDP,
            &packet::udp(c.ip, dst, 5000, 53, true),
        );
        let r = run(&lab, "tc_container", c.host_ifindex, f);
        assert_eq!(r.action, TC_ACT_REDIRECT);
        let s = packet::verify(&r.out);
        assert_eq!(s.src, NODE_ADDR);
        ports.push(s.sport);
    }
    assert_eq!(ports[0], 5000, "the first keeps its port");
    let mut rest = ports[1..].to_vec();
    rest.sort_unstable();
    assert_eq!(rest, [30000, 30001], "the others get the configured range");

    let d = container(&lab, "d", "10.88.0.5", &[]);
    let f = packet::frame(
        d.mac,
        ANY_MAC,
        d.ip,
        dst,
        PROTO_UDP,
        &packet::udp(d.ip, dst, 5000, 53, true),
    );
    assert_eq!(
        run(&lab, "tc_container", d.host_ifindex, f).action,
        TC_ACT_SHOT,
        "range exhausted"
    );
    assert_eq!(counter(&lab, "drop_no_port"), 1);

    // Freeing the conntrack table frees the ports.
    lab.ok(&["conntrack", "flush"]).unwrap();
    let f = packet::frame(
        d.mac,
        ANY_MAC,
        d.ip,
        dst,
        PROTO_UDP,
        &packet::udp(d.ip, dst, 5000, 53, true),
    );
    assert_eq!(
        run(&lab, "tc_container", d.host_ifindex, f).action,
        TC_ACT_REDIRECT
    );
}

#[test]
fn malformed_and_spoofed_packets_are_dropped_and_counted() {
    let lab = lab("tr-drops");
    up(&lab, &[]);
    let c = container(&lab, "c", "10.88.0.2", &[]);
    let good = to_ext(&c, PROTO_TCP, &packet::tcp(c.ip, EXT_ADDR, 40000, 80, SYN));

    let truncated = good[..14 + 20 + 6].to_vec();
    assert_eq!(
        run(&lab, "tc_container", c.host_ifindex, truncated).action,
        TC_ACT_SHOT
    );
    assert_eq!(counter(&lab, "drop_truncated"), 1);

    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x43;
    assert_eq!(
        run(&lab, "tc_container", c.host_ifindex, bad_ihl).action,
        TC_ACT_SHOT
    );
    assert_eq!(counter(&lab, "drop_truncated"), 2);

    let other = Ipv4Addr::new(10, 88, 0, 9);
    let spoofed = packet::frame(
        c.mac,
        ANY_MAC,
        other,
        EXT_ADDR,
        PROTO_TCP,
        &packet::tcp(other, EXT_ADDR, 40000, 80, SYN),
    );
    assert_eq!(
        run(&lab, "tc_container", c.host_ifindex, spoofed).action,
        TC_ACT_SHOT
    );
    let wrong_mac = packet::frame(
        [2, 0, 0, 0, 0, 9],
        ANY_MAC,
        c.ip,
        EXT_ADDR,
        PROTO_TCP,
        &packet::tcp(c.ip, EXT_ADDR, 40000, 80, SYN),
    );
    assert_eq!(
        run(&lab, "tc_container", c.host_ifindex, wrong_mac).action,
        TC_ACT_SHOT
    );
    assert_eq!(counter(&lab, "drop_spoof"), 2);

    // A non-first fragment that would need translation is dropped, not leaked untranslated.
    let mut frag = good.clone();
    frag[20] = 0x00;
    frag[21] = 0x10;
    let ipc = packet::csum(
        &{
            let mut h = frag[14..34].to_vec();
            h[10] = 0;
            h[11] = 0;
            h
        },
        0,
    );
    frag[24..26].copy_from_slice(&ipc.to_be_bytes());
    assert_eq!(
        run(&lab, "tc_container", c.host_ifindex, frag).action,
        TC_ACT_SHOT
    );
    assert_eq!(counter(&lab, "drop_fragment"), 1);

    // Outside packets to container addresses are not routed in.
    let probe = packet::frame(
        EXT_MAC,
        ANY_MAC,
        EXT_ADDR,
        c.ip,
        PROTO_TCP,
        &packet::tcp(EXT_ADDR, c.ip, 40000, 22, SYN),
    );
    assert_eq!(
        run(&lab, "tc_uplink", uplink_ifindex(&lab), probe).action,
        TC_ACT_SHOT
    );
    assert_eq!(counter(&lab, "drop_not_published"), 1);
    assert!(
        json(&lab, &["conntrack", "list"])
            .as_array()
            .unwrap()
            .is_empty(),
        "nothing was tracked"
    );
}

#[test]
fn closed_tcp_connections_give_their_masquerade_port_back() {
    let lab = lab("tr-reuse");
    up(
        &lab,
        &[
            "--port-range",
            "30000-30000",
            "--masquerade-avoid-host-ports",
        ],
    );
    let dst = Ipv4Addr::new(203, 0, 113, 80);
    let a = container(&lab, "a", "10.88.0.2", &[]);
    let b = container(&lab, "b", "10.88.0.3", &[]);
    // Both use a source port from the node's ephemeral range: each needs the one port 30000.
    let syn = |c: &ContainerInfo, flags: u8| {
        packet::frame(
            c.mac,
            ANY_MAC,
            c.ip,
            dst,
            PROTO_TCP,
            &packet::tcp(c.ip, dst, 40000, 443, flags),
        )
    };
    let s = packet::verify(&run(&lab, "tc_container", a.host_ifindex, syn(&a, SYN)).out);
    assert_eq!(s.sport, 30000);
    assert_eq!(
        run(&lab, "tc_container", b.host_ifindex, syn(&b, SYN)).action,
        TC_ACT_SHOT,
        "the port is taken"
    );
    // a's connection is reset: closed connections give their tuple to the next one.
    const RST: u8 = 0x04;
    let _ = run(&lab, "tc_container", a.host_ifindex, syn(&a, RST));
    let r = run(&lab, "tc_container", b.host_ifindex, syn(&b, SYN));
    assert_eq!(r.action, TC_ACT_REDIRECT);
    assert_eq!(packet::verify(&r.out).sport, 30000);
    let flows = json(&lab, &["conntrack", "list"]);
    assert_eq!(
        flows.as_array().unwrap().len(),
        1,
        "a's entries are gone: {flows}"
    );
}

#[test]
fn xdp_translates_like_tc_and_passes_on_what_it_does_not_finish() {
    let lab = lab("tr-xdp");
    up(&lab, &[]);
    let web = container(
        &lab,
        "web",
        "10.88.0.2",
        &["-p", "8080:80", "-p", "5353:53/udp"],
    );
    let c = container(&lab, "c", "10.88.0.3", &[]);

    let up_if = uplink_ifindex(&lab);

    // A new connection to a published port is TC's (only TC knows whether its checksum was
    // verified): XDP passes the SYN on untouched. The connection's next segment is XDP's:
    // DNAT, TTL, MACs, checksums.
    let syn = from_ext(
        PROTO_TCP,
        &packet::tcp(EXT_ADDR, NODE_ADDR, 40000, 8080, SYN),
    );
    let r = run_xdp(&lab, syn.clone());
    assert_eq!((r.action, &r.out), (XDP_PASS, &syn), "a SYN goes to TC");
    assert_eq!(run(&lab, "tc_uplink", up_if, syn).action, TC_ACT_REDIRECT);
    assert_eq!(counter(&lab, "dnat_new"), 1);
    let ack = from_ext(
        PROTO_TCP,
        &packet::tcp(EXT_ADDR, NODE_ADDR, 40000, 8080, ACK),
    );
    let r = run_xdp(&lab, ack);
    assert_eq!(r.action, XDP_REDIRECT, "redirected to the container's veth");
    let s = packet::verify(&r.out);
    assert_eq!(
        (s.src, s.sport, s.dst, s.dport),
        (EXT_ADDR, 40000, web.ip, 80)
    );
    assert_eq!((s.ttl, s.dst_mac, s.src_mac), (63, web.mac, web.host_mac));

    // UDP: "no checksum" stays zero, a real one stays right.
    for (sport, with) in [(40001, false), (40002, true)] {
        let q = from_ext(
            PROTO_UDP,
            &packet::udp(EXT_ADDR, NODE_ADDR, sport, 5353, with),
        );
        assert_eq!(run_xdp(&lab, q.clone()).action, XDP_PASS, "new: TC's");
        assert_eq!(
            run(&lab, "tc_uplink", up_if, q.clone()).action,
            TC_ACT_REDIRECT
        );
        let r = run_xdp(&lab, q);
        assert_eq!(r.action, XDP_REDIRECT);
        let s = packet::verify(&r.out);
        assert_eq!((s.dst, s.dport), (web.ip, 53));
        assert_eq!(s.l4_csum == 0, !with);
    }

    // Replies to a masqueraded TCP connection and ping.
    let out = to_ext(&c, PROTO_TCP, &packet::tcp(c.ip, EXT_ADDR, 20000, 80, SYN));
    let sent = packet::verify(&run(&lab, "tc_container", c.host_ifindex, out).out);
    let reply = from_ext(
        PROTO_TCP,
        &packet::tcp(EXT_ADDR, NODE_ADDR, 80, sent.sport, ACK),
    );
    let r = run_xdp(&lab, reply);
    assert_eq!(r.action, XDP_REDIRECT);
    let s = packet::verify(&r.out);
    assert_eq!(
        (s.src, s.sport, s.dst, s.dport),
        (EXT_ADDR, 80, c.ip, 20000)
    );

    let req = to_ext(&c, PROTO_ICMP, &packet::echo_request(777, 1));
    let sent = packet::verify(&run(&lab, "tc_container", c.host_ifindex, req).out);
    let mut reply = packet::echo_request(sent.sport, 1);
    reply[0] = 0;
    reply[2..4].copy_from_slice(&[0, 0]);
    let ck = packet::csum(&reply, 0);
    reply[2..4].copy_from_slice(&ck.to_be_bytes());
    let r = run_xdp(
        &lab,
        packet::frame(EXT_MAC, ANY_MAC, EXT_ADDR, NODE_ADDR, PROTO_ICMP, &reply),
    );
    assert_eq!(r.action, XDP_REDIRECT);
    let s = packet::verify(&r.out);
    assert_eq!((s.dst, s.sport), (c.ip, 777), "echo id translated back");
    assert_eq!(counter(&lab, "xdp_deliver"), 5);

    // Passed on untouched: a port nobody published, TTL 1, a fragment, ARP.
    let before = counter(&lab, "xdp_pass");
    let other = from_ext(PROTO_TCP, &packet::tcp(EXT_ADDR, NODE_ADDR, 40003, 22, SYN));
    let mut ttl1 = from_ext(
        PROTO_TCP,
        &packet::tcp(EXT_ADDR, NODE_ADDR, 40004, 8080, SYN),
    );
    ttl1[22] = 1;
    let mut frag = other.clone();
    frag[20] = 0x20; // MF
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&EXT_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&EXT_MAC);
    arp.extend_from_slice(&EXT_ADDR.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&NODE_ADDR.octets());
    for f in [other, ttl1, frag, arp] {
        let r = run_xdp(&lab, f.clone());
        assert_eq!(r.action, XDP_PASS);
        assert_eq!(r.out, f, "passed on unchanged");
    }
    assert_eq!(counter(&lab, "xdp_pass"), before + 4);
    assert_eq!(
        counter(&lab, "dnat_new"),
        3,
        "the TTL-1 SYN created nothing"
    );
}

#[test]
fn a_tracked_connection_is_only_fast_pathed_from_the_veth_it_belongs_to() {
    let lab = lab("tr-owner");
    up(&lab, &[]);
    let a = container(&lab, "a", "10.88.0.2", &[]);
    let b = container(&lab, "b", "10.88.0.3", &[]);
    let syn = |mac| {
        packet::frame(
            mac,
            ANY_MAC,
            a.ip,
            EXT_ADDR,
            PROTO_TCP,
            &packet::tcp(a.ip, EXT_ADDR, 20000, 80, SYN),
        )
    };
    let r = run(&lab, "tc_container", a.host_ifindex, syn(a.mac));
    assert_eq!(r.action, TC_ACT_REDIRECT);
    assert_eq!(packet::verify(&r.out).src, NODE_ADDR);
    // The same tuple from b's veth (b claiming a's address) is spoofed, not translated.
    let r = run(&lab, "tc_container", b.host_ifindex, syn(b.mac));
    assert_eq!(r.action, TC_ACT_SHOT);
    assert_eq!(counter(&lab, "drop_spoof"), 1);
    assert_eq!(counter(&lab, "ct_hit"), 0);
    // From a's veth it is a conntrack hit.
    let r = run(&lab, "tc_container", a.host_ifindex, syn(a.mac));
    assert_eq!(r.action, TC_ACT_REDIRECT);
    assert_eq!(counter(&lab, "ct_hit"), 1);
}

#[test]
fn connections_are_stamped_with_the_clock_userspace_reads() {
    // The programs compute the coarse monotonic clock from the tick count, with what the
    // loader measured; userspace reads the clock itself. Were the two apart, ages would read
    // 0 (the programs' clock ahead) or far too many seconds (behind), and garbage collection
    // would expire live connections or keep dead ones.
    let lab = lab("tr-clock");
    up(&lab, &[]);
    let c = container(&lab, "c", "10.88.0.2", &[]);
    let out = to_ext(&c, PROTO_UDP, &packet::udp(c.ip, EXT_ADDR, 5000, 53, true));
    assert_eq!(
        run(&lab, "tc_container", c.host_ifindex, out).action,
        TC_ACT_REDIRECT
    );
    let flow = || json(&lab, &["conntrack", "list"])[0].clone();
    assert_eq!(flow()["age_secs"], 0, "{}", flow());
    std::thread::sleep(std::time::Duration::from_millis(2_100));
    let reply = from_ext(PROTO_UDP, &packet::udp(EXT_ADDR, NODE_ADDR, 53, 5000, true));
    assert_eq!(
        run(&lab, "tc_uplink", uplink_ifindex(&lab), reply).action,
        TC_ACT_REDIRECT
    );
    let f = flow();
    let age = f["age_secs"].as_u64().unwrap();
    assert!((2..=3).contains(&age), "two seconds old: {f}");
    assert_eq!(f["idle_secs"], 0, "the reply was just now: {f}");
    assert_eq!(f["state"], "REPLIED");
}
