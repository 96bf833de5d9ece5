//! IPv6 on a dual-stack node (`up --subnet6`): containers get an address of each family,
//! the datapath answers their Neighbour Solicitations, forwards between them by an endpoint
//! lookup, refuses forged sources, hands the node's gateway address to the stack, masquerades
//! what leaves by the uplink (NAT66), drops what would leave untranslated, and keeps
//! container addresses unreachable from outside.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use bpfnat_tests::{
    EXT_ADDR, EXT6, NODE_ADDR, NODE6, UPLINK, counter, fails_with, flows, ip_in, json, lab,
    lab_up6, ping, status, traffic, uplink_v6, v4,
};
use nat_plumbing::netns;

/// `ping -6` from `ns` (from `src` if given) to `to`: whether an answer came.
fn ping6(ns: &Path, src: Option<&str>, to: &str) -> bool {
    let mut c = Command::new("ping");
    c.args(["-6", "-c", "1", "-W", "2"]);
    if let Some(s) = src {
        c.args(["-I", s]);
    }
    c.arg(to).stdout(Stdio::null()).stderr(Stdio::null());
    netns::command_in(&mut c, ns).unwrap();
    c.status().unwrap().success()
}

fn v6(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::from((ip.parse::<Ipv6Addr>().unwrap(), port))
}

#[test]
fn containers_reach_each_other_and_the_node_over_ipv6() {
    let lab = lab("v6");
    lab.ok(&["up", "--uplink", UPLINK, "--subnet6", "fd00:88::/64"])
        .unwrap();
    let (_, st) = status(&lab);
    assert_eq!(st["node"]["subnet6"], "fd00:88::/64", "{st}");
    assert_eq!(st["node"]["gateway6"], "fd00:88::1", "{st}");
    let (a, b) = (lab.name("a"), lab.name("b"));
    lab.ok(&["container", "add", &a]).unwrap();
    lab.ok(&["container", "add", &b, "--ip6", "fd00:88::10"])
        .unwrap();
    let ia = json(&lab, &["container", "inspect", &a])["ip6"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(ia, "fd00:88::2", "the lowest free address");
    assert_eq!(
        json(&lab, &["container", "inspect", &b])["ip6"],
        "fd00:88::10"
    );
    for (args, why) in [
        (vec!["--ip6", "fd00:99::5"], "not a host address"),
        (vec!["--ip6", "fd00:88::10"], "already used"),
        (vec!["--ip6", "fd00:88::1"], "gateway"),
    ] {
        let mut cmd = vec!["container", "add"];
        let name = lab.name("x");
        cmd.push(&name);
        cmd.extend(args.iter().copied());
        fails_with(&lab, &cmd, why);
    }
    let (na, nb) = (lab.container_ns(&a), lab.container_ns(&b));

    // F1 over IPv6: TCP with the sender's own address, and ping; the datapath answered the
    // neighbour solicitations and forwarded.
    let srv = traffic::http_server(&nb, v6("::", 80), "b", 1, Duration::from_secs(10)).unwrap();
    let got = traffic::http_get(&na, v6("fd00:88::10", 80));
    let seen = srv.join().unwrap();
    assert!(got.is_ok_and(|b| b.starts_with("hello from b")));
    assert_eq!(
        seen[0].ip().to_string(),
        ia,
        "the receiver sees a's address"
    );
    assert!(ping6(&nb, None, &ia), "b -> a");
    assert!(counter(&lab, "nd_reply") > 0);
    assert!(counter(&lab, "forward") > 0);
    // F6: the node, on the gateway address.
    assert!(
        ping6(&na, None, "fd00:88::1"),
        "a -> the node's gateway address"
    );

    // Another container's address is refused (with a control from a's own).
    ip_in(
        &na,
        &[
            "-6",
            "addr",
            "add",
            "fd00:88::10/128",
            "dev",
            "eth0",
            "nodad",
        ],
    );
    let spoofed = counter(&lab, "drop_spoof");
    assert!(!ping6(&na, Some("fd00:88::10"), "fd00:88::1"));
    assert!(counter(&lab, "drop_spoof") > spoofed);
    assert!(ping6(&na, Some(&ia), "fd00:88::1"), "control");

    // Out by the uplink while the node has no global IPv6 address to masquerade with:
    // dropped rather than leaked (the route exists; the node's own forwarding is on).
    ip_in(
        &lab.node,
        &["-6", "route", "add", "2001:db8:99::/64", "dev", UPLINK],
    );
    let out = counter(&lab, "drop_ipv6_out");
    assert!(!ping6(&na, Some(&ia), "2001:db8:99::1"));
    assert!(counter(&lab, "drop_ipv6_out") > out);

    // From outside, a container's IPv6 address stays unreachable, even with the node
    // forwarding IPv6 and the outside routing the subnet to it (control: the node itself).
    ip_in(
        &lab.node,
        &[
            "-6",
            "addr",
            "add",
            "2001:db8:1::1/64",
            "dev",
            UPLINK,
            "nodad",
        ],
    );
    ip_in(
        &lab.ext,
        &[
            "-6",
            "addr",
            "add",
            "2001:db8:1::2/64",
            "dev",
            "eth0",
            "nodad",
        ],
    );
    ip_in(
        &lab.ext,
        &["-6", "route", "add", "fd00:88::/64", "via", "2001:db8:1::1"],
    );
    netns::run_in(&lab.node, || {
        std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
        Ok(())
    })
    .unwrap();
    assert!(ping6(&lab.ext, None, "2001:db8:1::1"), "control: the node");
    let dropped = counter(&lab, "drop_not_published");
    assert!(!ping6(&lab.ext, None, &ia));
    assert!(counter(&lab, "drop_not_published") > dropped);
}

#[test]
fn a_node_without_an_ipv6_subnet_refuses_ip6_and_leaves_ipv6_alone() {
    let lab = lab("v6off");
    lab.ok(&["up", "--uplink", UPLINK]).unwrap();
    fails_with(
        &lab,
        &["container", "add", &lab.name("a"), "--ip6", "fd00:88::2"],
        "no IPv6 subnet",
    );
    let c = lab.name("b");
    lab.ok(&["container", "add", &c]).unwrap();
    let v = json(&lab, &["container", "inspect", &c]);
    assert!(v.get("ip6").is_none(), "{v}");
    let out = lab
        .run(&["up", "--uplink", UPLINK, "--gateway6", "fd00:88::1"])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs --subnet6"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn containers_reach_outside_masqueraded_to_the_uplinks_ipv6_address() {
    let lab = lab_up6("nat66");
    let (_, st) = status(&lab);
    assert_eq!(st["node"]["snat_ip6"], "2001:db8:1::1", "{st}");
    assert_eq!(st["node"]["snat6_from_uplink"], true, "{st}");
    let a = lab.name("a");
    lab.ok(&["container", "add", &a]).unwrap();
    let na = lab.container_ns(&a);
    let new = counter(&lab, "snat_new");

    // TCP: the outside host sees the node's address, and the answer comes back.
    let srv =
        traffic::http_server(&lab.ext, v6("::", 80), "ext", 1, Duration::from_secs(10)).unwrap();
    let got = traffic::http_get(&na, v6("2001:db8:1::2", 80));
    let seen = srv.join().unwrap();
    assert!(
        got.as_ref().is_ok_and(|b| b.starts_with("hello from ext")),
        "{got:?}"
    );
    assert_eq!(seen[0].ip().to_string(), "2001:db8:1::1", "masqueraded");

    // UDP, keeping the container's source port when it is free.
    let echo = traffic::udp_echo(&lab.ext, v6("::", 5353), 1, Duration::from_secs(10)).unwrap();
    let reply = traffic::udp_ask(&na, v6("::", 40123), v6("2001:db8:1::2", 5353), b"hi");
    let seen = echo.join().unwrap();
    assert!(
        reply.as_ref().is_ok_and(|r| r.ends_with(" hi")),
        "{reply:?}"
    );
    assert_eq!(seen[0], v6("2001:db8:1::1", 40123), "source port kept");

    // ICMPv6 echo, by its identifier.
    assert!(ping6(&na, None, "2001:db8:1::2"), "ping through NAT66");
    assert!(
        counter(&lab, "snat_new") >= new + 3,
        "three new connections"
    );

    // Tracked in the IPv6 tables, listed with the IPv4 ones, flushed with them.
    let list = flows(&lab);
    for proto in ["tcp", "udp", "icmpv6"] {
        assert!(
            list.iter().any(|f| f["proto"] == proto
                && f["kind"] == "masquerade"
                && f["original"]["src"] == "fd00:88::2"
                && f["reply"]["dst"] == "2001:db8:1::1"),
            "{proto}: {list:?}"
        );
    }
    let text = lab.ok(&["conntrack", "list"]).unwrap();
    assert!(text.contains("[fd00:88::2]:40123"), "{text}");
    // `conntrack stats` says which family's tables hold them.
    let st = json(&lab, &["conntrack", "stats"]);
    let fam = |f: &str| st["by_family"][f]["entries"].as_u64().unwrap();
    assert!(
        fam("ipv6") >= 6,
        "three connections, two entries each: {st}"
    );
    assert_eq!(fam("ipv4") + fam("ipv6"), st["entries"].as_u64().unwrap());
    lab.ok(&["conntrack", "flush"]).unwrap();
    assert!(flows(&lab).is_empty());

    // An unsolicited packet from outside for the container's address is still refused.
    ip_in(
        &lab.ext,
        &["-6", "route", "add", "fd00:88::/64", "via", "2001:db8:1::1"],
    );
    let dropped = counter(&lab, "drop_not_published");
    assert!(!ping6(&lab.ext, None, "fd00:88::2"));
    assert!(counter(&lab, "drop_not_published") > dropped);
}

#[test]
fn snat_ip6_fixes_the_ipv6_masquerade_address_and_is_checked() {
    let lab = lab("snat6");
    uplink_v6(&lab);
    // A second address on the uplink, chosen over the first.
    ip_in(
        &lab.node,
        &[
            "-6",
            "addr",
            "add",
            "2001:db8:1::7/64",
            "dev",
            UPLINK,
            "nodad",
        ],
    );
    for (args, why) in [
        (vec!["--snat-ip6", "2001:db8:1::7"], "needs --subnet6"),
        (
            vec!["--subnet6", "fd00:88::/64", "--snat-ip6", "fd00:88::9"],
            "cannot be a source",
        ),
    ] {
        let mut cmd = vec!["up", "--uplink", UPLINK];
        cmd.extend(args.iter().copied());
        fails_with(&lab, &cmd, why);
        assert_eq!(status(&lab).0, 3, "nothing was set up");
    }
    lab.ok(&[
        "up",
        "--uplink",
        UPLINK,
        "--subnet6",
        "fd00:88::/64",
        "--snat-ip6",
        "2001:db8:1::7",
    ])
    .unwrap();
    let (_, st) = status(&lab);
    assert_eq!(st["node"]["snat_ip6"], "2001:db8:1::7", "{st}");
    assert_eq!(st["node"]["snat6_from_uplink"], false, "{st}");
    let a = lab.name("a");
    lab.ok(&["container", "add", &a]).unwrap();
    let srv =
        traffic::http_server(&lab.ext, v6("::", 80), "ext", 1, Duration::from_secs(10)).unwrap();
    let got = traffic::http_get(&lab.container_ns(&a), v6("2001:db8:1::2", 80));
    let seen = srv.join().unwrap();
    assert!(got.is_ok(), "{got:?}");
    assert_eq!(seen[0].ip().to_string(), "2001:db8:1::7");
}

#[test]
fn a_published_port_answers_over_ipv6_too() {
    let lab = lab_up6("pub6");
    let web = lab.name("web");
    lab.ok(&[
        "container",
        "add",
        &web,
        "-p",
        "8080:80",
        "-p",
        "5353:53/udp",
    ])
    .unwrap();
    let nw = lab.container_ns(&web);
    let window = Duration::from_secs(10);

    // A client outside that claims a container address is refused (control: the same
    // datagram from its own address is answered).
    ip_in(
        &lab.ext,
        &[
            "-6",
            "addr",
            "add",
            "fd00:88::99/128",
            "dev",
            "eth0",
            "nodad",
        ],
    );
    let echo = traffic::udp_echo(&nw, v6("::", 53), 1, window).unwrap();
    let martians = counter(&lab, "drop_martian");
    let forged = traffic::udp_ask(&lab.ext, v6("fd00:88::99", 0), v6(NODE6, 5353), b"x");
    assert!(forged.is_err(), "{forged:?}");
    assert!(counter(&lab, "drop_martian") > martians);
    let control = traffic::udp_ask(&lab.ext, v6(EXT6, 0), v6(NODE6, 5353), b"x");
    assert!(control.is_ok(), "{control:?}");
    assert_eq!(echo.join().unwrap()[0].ip().to_string(), EXT6);

    // F3: `8080:80` publishes on every address of both families, as Docker does; the
    // client's address is kept.
    let dnat = counter(&lab, "dnat_new");
    let srv = traffic::http_server(&nw, v6("::", 80), "web", 2, window).unwrap();
    let got6 = traffic::http_get(&lab.ext, v6(NODE6, 8080));
    let got4 = traffic::http_get(&lab.ext, v4(NODE_ADDR, 8080));
    let seen = srv.join().unwrap();
    assert!(
        got6.as_ref().is_ok_and(|b| b.starts_with("hello from web")),
        "{got6:?}"
    );
    assert!(got4.is_ok(), "and over IPv4: {got4:?}");
    assert_eq!(seen[0].ip().to_string(), EXT6, "the client's address, kept");
    assert!(counter(&lab, "dnat_new") >= dnat + 2);

    // F5: another container reaches the published port on the node's IPv6 address; the
    // source becomes the IPv6 gateway so that the answer comes back the same way.
    let cli = lab.name("cli");
    lab.ok(&["container", "add", &cli]).unwrap();
    let hairpin = counter(&lab, "hairpin_new");
    let srv = traffic::http_server(&nw, v6("::", 80), "web", 1, window).unwrap();
    let got = traffic::http_get(&lab.container_ns(&cli), v6(NODE6, 8080));
    let seen = srv.join().unwrap();
    assert!(got.is_ok(), "{got:?}");
    assert_eq!(seen[0].ip().to_string(), "fd00:88::1");
    assert!(counter(&lab, "hairpin_new") > hairpin);

    // `docker port`: one line per family.
    let text = lab.ok(&["port", &web]).unwrap();
    assert!(
        text.contains("80/tcp -> 0.0.0.0:8080") && text.contains("80/tcp -> [::]:8080"),
        "{text}"
    );

    // Unpublished: gone from both families.
    lab.ok(&["port", "del", &web, "8080:80"]).unwrap();
    let srv = traffic::http_server(&nw, v6("::", 80), "web", 1, Duration::from_secs(3)).unwrap();
    assert!(traffic::http_get(&lab.ext, v6(NODE6, 8080)).is_err());
    assert!(srv.join().unwrap().is_empty());
}

#[test]
fn ipv6_host_addresses_publish_over_ipv6_only() {
    let lab = lab_up6("hostip6");
    let web = lab.name("web");
    let on_node6 = format!("[{NODE6}]:8082:80");
    lab.ok(&[
        "container",
        "add",
        &web,
        "-p",
        "[::]:8081:80",
        "-p",
        &on_node6,
        "-p",
        "0.0.0.0:8083:80",
    ])
    .unwrap();
    let srv = traffic::http_server(
        &lab.container_ns(&web),
        v6("::", 80),
        "web",
        3,
        Duration::from_secs(10),
    )
    .unwrap();
    for (to, published) in [
        (v6(NODE6, 8081), true),
        (v4(NODE_ADDR, 8081), false),
        (v6(NODE6, 8082), true),
        (v6(NODE6, 8083), false),
        (v4(NODE_ADDR, 8083), true),
    ] {
        let got = traffic::http_get(&lab.ext, to);
        assert_eq!(got.is_ok(), published, "{to}: {got:?}");
    }
    assert_eq!(srv.join().unwrap().len(), 3);
    let v = json(&lab, &["container", "inspect", &web]);
    let hosts: Vec<&str> = v["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["host_ip"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["::", NODE6, "0.0.0.0"], "{v}");

    for (spec, why) in [
        ("[::]:8081:81", "already published"),
        ("8081:81", "already published"),
        ("[2001:db8:99::1]:8084:80", "not an address of this node"),
    ] {
        fails_with(&lab, &["port", "add", &web, spec], why);
    }
    // IPv4 on the same port as an IPv6-only mapping is free; IPv6 loopback is the node's
    // processes' (F4), as 127.0.0.1 is.
    lab.ok(&["port", "add", &web, "0.0.0.0:8081:81"]).unwrap();
    lab.ok(&["port", "add", &web, "[::1]:8085:80"]).unwrap();
}

#[test]
fn an_ipv6_host_address_needs_an_ipv6_subnet() {
    let lab = lab("hostip6off");
    lab.ok(&["up", "--uplink", UPLINK]).unwrap();
    let out = lab
        .run(&["container", "add", &lab.name("web"), "-p", "[::]:8080:80"])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no IPv6 subnet"),
        "{err}"
    );
    assert!(
        json(&lab, &["container", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn node_processes_reach_published_ports_over_ipv6() {
    let lab = lab_up6("f4v6");
    let web = lab.name("web");
    lab.ok(&[
        "container",
        "add",
        &web,
        "-p",
        "8080:80",
        "-p",
        "[::1]:8081:80",
        "-p",
        "5353:53/udp",
    ])
    .unwrap();
    let ns = lab.container_ns(&web);
    let window = Duration::from_secs(10);
    let srv = traffic::http_server(&ns, v6("::", 80), "web", 5, window).unwrap();
    for target in [
        v6("::1", 8080),
        v6(NODE6, 8080),
        v6("fd00:88::1", 8080),
        v6("::1", 8081),
    ] {
        let body =
            traffic::http_get(&lab.node, target).unwrap_or_else(|e| panic!("{target}: {e:#}"));
        assert!(
            body.starts_with("hello from web") && !body.contains("you are [::1]"),
            "{target}: {body}"
        );
    }
    // The application sees the address it connected to, not the container's.
    let peer = netns::run_in(&lab.node, || {
        let s = TcpStream::connect(v6("::1", 8080))?;
        Ok(s.peer_addr()?)
    })
    .unwrap();
    assert_eq!(peer, v6("::1", 8080));
    assert_eq!(srv.join().unwrap().len(), 5);

    // UDP: the reply appears to come from [::1]:5353 (udp_ask insists on it).
    let echo = traffic::udp_echo(&ns, v6("::", 53), 1, window).unwrap();
    let reply = traffic::udp_ask(&lab.node, v6("::", 0), v6("::1", 5353), b"q");
    assert!(reply.is_ok(), "{reply:?}");
    assert_eq!(echo.join().unwrap().len(), 1);
    assert!(counter(&lab, "sock_xlate") >= 6);

    // Other namespaces' loopback is theirs.
    assert!(traffic::http_get(&lab.ext, v6("::1", 8080)).is_err());
}

#[test]
fn a_static_ipv6_mapping_reaches_its_container_both_ways() {
    let lab = lab_up6("static6");
    let c = lab.name("c");
    lab.ok(&["container", "add", &c, "--ip6", "fd00:88::5"])
        .unwrap();
    for (ext, int, why) in [
        ("fd00:88::9", "fd00:88::5", "inside the container subnet"),
        ("2001:db8:1::10", "10.88.0.2", "different families"),
        ("2001:db8:1::10", "fd00:99::5", "not a container address"),
        ("fe80::10", "fd00:88::5", "not global unicast"),
    ] {
        fails_with(
            &lab,
            &["nat", "add", "--external", ext, "--internal", int],
            why,
        );
    }
    lab.ok(&[
        "nat",
        "add",
        "--external",
        "2001:db8:1::10",
        "--internal",
        "fd00:88::5",
    ])
    .unwrap();
    let list = json(&lab, &["nat", "list"]);
    assert_eq!(list[0]["container"], c.as_str(), "{list}");
    let nc = lab.container_ns(&c);
    let window = Duration::from_secs(10);

    // Inbound, any protocol: the node answers Neighbour Solicitations for the external
    // address, and the client's address is kept.
    let answered = counter(&lab, "nd_reply");
    let srv = traffic::http_server(&nc, v6("::", 80), "c", 1, window).unwrap();
    let got = traffic::http_get(&lab.ext, v6("2001:db8:1::10", 80));
    assert!(got.is_ok(), "{got:?}");
    assert_eq!(srv.join().unwrap()[0].ip().to_string(), EXT6);
    assert!(
        ping6(&lab.ext, None, "2001:db8:1::10"),
        "ping the external address"
    );
    assert!(counter(&lab, "nd_reply") > answered);

    // Outbound: the container's connections leave from its external address.
    let srv = traffic::http_server(&lab.ext, v6("::", 81), "ext", 1, window).unwrap();
    let got = traffic::http_get(&nc, v6(EXT6, 81));
    assert!(got.is_ok(), "{got:?}");
    assert_eq!(srv.join().unwrap()[0].ip().to_string(), "2001:db8:1::10");
    assert!(counter(&lab, "static_nat") >= 2);

    // Removed: the external address answers no more.
    lab.ok(&["nat", "del", "--external", "2001:db8:1::10"])
        .unwrap();
    ip_in(&lab.ext, &["-6", "neigh", "flush", "dev", "eth0"]);
    assert!(!ping6(&lab.ext, None, "2001:db8:1::10"));
}

/// Extension headers, each by its rule (`parse::ipv6`), and fragments, on crafted packets
/// through the real `tc_container` (BPF_PROG_TEST_RUN): stepped over and translated,
/// dropped with their reason, or matched to their first fragment.
#[test]
fn extension_headers_and_fragments_follow_their_rules() {
    use bpfnat_tests::packet::{self, PROTO_UDP};

    let lab = lab_up6("ext6");
    let c = bpfnat_tests::add_container(&lab, "c", &["--ip6", "fd00:88::5"]);
    let run = |frame: Vec<u8>| {
        let r = bpfnat_tests::test_run(
            &lab,
            nat_common::prog_names::TC_CONTAINER,
            c.host_ifindex,
            frame,
        );
        (r.action, r.out)
    };
    const SHOT: u32 = 2;
    const REDIRECT: u32 = 7;
    let me: Ipv6Addr = "fd00:88::5".parse().unwrap();
    let peer: Ipv6Addr = EXT6.parse().unwrap();
    let node: Ipv6Addr = NODE6.parse().unwrap();
    let macs = (c.mac, c.host_mac);
    let src_of = |out: &[u8]| Ipv6Addr::from(<[u8; 16]>::try_from(&out[22..38]).unwrap());
    let udp = |first: u8, ext: &[u8], sport: u16, cut: Option<usize>| {
        packet::udp6((me, peer), macs, (first, ext), (sport, 53), &[7u8; 64], cut)
    };

    // Hop-by-hop options (PadN), stepped over: translated, the checksum kept right.
    let hop = [PROTO_UDP, 0, 1, 4, 0, 0, 0, 0];
    let (action, out) = run(udp(0, &hop, 41000, None));
    assert_eq!(action, REDIRECT);
    assert_eq!(src_of(&out), node, "masqueraded past a hop-by-hop header");
    let udp_off = 14 + 40 + 8;
    let seen = packet::udp6(
        (node, peer),
        macs,
        (0, &hop),
        (u16::from_be_bytes([out[udp_off], out[udp_off + 1]]), 53),
        &[7u8; 64],
        None,
    );
    assert_eq!(
        out[udp_off + 6..udp_off + 8],
        seen[udp_off + 6..udp_off + 8],
        "the UDP checksum, recomputed from scratch"
    );

    // A routing header with segments left: its destination is not the final one.
    let mut routing = vec![PROTO_UDP, 2, 4, 1, 0, 0, 0, 0];
    routing.extend_from_slice(&"2001:db8:1::99".parse::<Ipv6Addr>().unwrap().octets());
    let dropped = counter(&lab, "drop_ipv6_ext");
    assert_eq!(run(udp(43, &routing, 41001, None)).0, SHOT);
    assert_eq!(counter(&lab, "drop_ipv6_ext"), dropped + 1);
    // Control: with no segments left, it is stepped over.
    routing[3] = 0;
    assert_eq!(run(udp(43, &routing, 41002, None)).0, REDIRECT);

    // ESP: not translated, never leaked.
    let unsupported = counter(&lab, "drop_unsupported");
    let esp = packet::ipv6_frame((me, peer), macs, (50, &[]), &[0u8; 32]);
    assert_eq!(run(esp).0, SHOT);
    assert_eq!(counter(&lab, "drop_unsupported"), unsupported + 1);

    // Fragments: the first carries the ports, the later one follows its translation.
    let first = [PROTO_UDP, 0, 0, 1, 0, 0, 0x12, 0x34];
    let (action, out) = run(udp(44, &first, 41003, Some(40)));
    assert_eq!(action, REDIRECT, "first fragment");
    assert_eq!(src_of(&out), node);
    let later = [PROTO_UDP, 0, 0, 5 << 3, 0, 0, 0x12, 0x34];
    let body = [7u8; 32];
    let (action, out) = run(packet::ipv6_frame((me, peer), macs, (44, &later), &body));
    assert_eq!(action, REDIRECT, "later fragment");
    assert_eq!(src_of(&out), node, "translated as its first fragment");
    // Truncated: an extension header cut short. (A cut fixed header never reaches a program
    // through BPF_PROG_TEST_RUN, which pulls it first.)
    let truncated = counter(&lab, "drop_truncated");
    let cut_ext = packet::ipv6_frame((me, peer), macs, (0, &[PROTO_UDP, 0, 1]), &[]);
    assert_eq!(run(cut_ext).0, SHOT);
    assert_eq!(counter(&lab, "drop_truncated"), truncated + 1);

    // A later fragment whose first was never seen cannot be translated.
    let orphan = [PROTO_UDP, 0, 0, 5 << 3, 0, 0, 0x56, 0x78];
    let lost = counter(&lab, "drop_fragment");
    let frame = packet::ipv6_frame((me, peer), macs, (44, &orphan), &body);
    assert_eq!(run(frame).0, SHOT);
    assert_eq!(counter(&lab, "drop_fragment"), lost + 1);
}

#[test]
fn fragmented_udp_datagrams_cross_nat66_both_ways() {
    let lab = lab_up6("frags6");
    let c = lab.name("c");
    lab.ok(&["container", "add", &c, "-p", "5353:53/udp"])
        .unwrap();
    let nc = lab.container_ns(&c);
    let window = Duration::from_secs(10);
    // 4000 bytes: three fragments at MTU 1500, each way.
    let big: Vec<u8> = (0..4000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let text = std::str::from_utf8(&big).unwrap();

    // Out through NAT66, and the fragmented echo back in.
    let echo = traffic::udp_echo(&lab.ext, v6("::", 7777), 1, window).unwrap();
    let reply = traffic::udp_ask(&nc, v6("::", 27000), v6(EXT6, 7777), &big).unwrap();
    assert!(
        reply.starts_with(&format!("[{NODE6}]:27000 ")) && reply.ends_with(text),
        "{}",
        &reply[..60]
    );
    assert_eq!(echo.join().unwrap()[0].ip().to_string(), NODE6);

    // In through a published port, and the fragmented answer back out.
    let echo = traffic::udp_echo(&nc, v6("::", 53), 1, window).unwrap();
    let reply = traffic::udp_ask(&lab.ext, v6(EXT6, 47001), v6(NODE6, 5353), &big).unwrap();
    assert!(reply.starts_with(&format!("[{EXT6}]:47001 ")) && reply.ends_with(text));
    assert_eq!(echo.join().unwrap().len(), 1);
    assert_eq!(counter(&lab, "drop_fragment"), 0);
}

/// A container that advertises another container's address (an unsolicited Neighbour
/// Advertisement with the override flag, from its own address or from the victim's) changes
/// nothing: the node's entries for containers are permanent, other containers' neighbours
/// are answered by the datapath, and a forged source is dropped.
#[test]
fn a_container_cannot_claim_another_containers_ipv6_address() {
    use bpfnat_tests::{add_container, packet, wire};
    let lab = lab_up6("na6");
    let a = add_container(&lab, "a", &["--ip6", "fd00:88::2"]);
    let b = add_container(&lab, "b", &["--ip6", "fd00:88::3"]);
    let c = add_container(&lab, "c", &["--ip6", "fd00:88::4"]);
    let victim: Ipv6Addr = "fd00:88::3".parse().unwrap();
    let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
    let advert = |from: Ipv6Addr| {
        // Type 136, code 0, checksum, flags (override), target, target link-layer option.
        let mut m = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
        m.extend_from_slice(&victim.octets());
        m.extend_from_slice(&[2, 1]);
        m.extend_from_slice(&a.mac);
        packet::icmpv6((from, all_nodes), (a.mac, [0x33, 0x33, 0, 0, 0, 1]), &m)
    };
    let spoofed = counter(&lab, "drop_spoof");
    wire::send(
        &a.ns,
        "eth0",
        vec![advert("fd00:88::2".parse().unwrap()), advert(victim)],
    );
    assert_eq!(
        counter(&lab, "drop_spoof"),
        spoofed + 1,
        "the advertisement from the victim's address is dropped"
    );
    // Control and check: the victim is still reached, by the node and by another container,
    // and the node still has its own entry for it.
    assert!(ping6(&lab.node, None, "fd00:88::3"), "the node reaches b");
    assert!(ping6(&c.ns, None, "fd00:88::3"), "c reaches b");
    let mac = b
        .mac
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let out = Command::new("ip")
        .args(["-n", lab.node.file_name().unwrap().to_str().unwrap()])
        .args(["-6", "neigh", "show", "fd00:88::3"])
        .output()
        .unwrap();
    let neigh = String::from_utf8_lossy(&out.stdout);
    assert!(
        neigh.contains(&mac) && neigh.contains("PERMANENT"),
        "{neigh}"
    );
}

#[test]
fn subnet6_alone_on_an_uplink_without_ipv4_makes_an_ipv6_only_node() {
    let lab = lab("v6only");
    uplink_v6(&lab);
    ip_in(&lab.node, &["-4", "addr", "flush", "dev", UPLINK]);
    let up = ["up", "--uplink", UPLINK, "--subnet6", "fd00:88::/64"];
    lab.ok(&up).unwrap();
    let (_, st) = status(&lab);
    assert_eq!(st["node"]["subnet6"], "fd00:88::/64", "{st}");
    for k in ["subnet", "gateway", "snat_ip", "node_addr"] {
        assert!(st["node"][k].is_null(), "no IPv4 {k}: {st}");
    }
    let text = lab.ok(&["status"]).unwrap();
    assert!(
        text.contains("snat ports:") && text.contains("subnet6:") && !text.contains("\nsubnet: "),
        "{text}"
    );
    // Repeated, it is the same node (even once the uplink has an IPv4 address again).
    ip_in(
        &lab.node,
        &["addr", "add", &format!("{NODE_ADDR}/24"), "dev", UPLINK],
    );
    lab.ok(&up).unwrap();
    assert!(status(&lab).1["node"]["subnet"].is_null());

    // Nothing IPv4 can be asked of it.
    let x = lab.name("x");
    fails_with(
        &lab,
        &["container", "add", &x, "--ip", "10.88.0.5"],
        "IPv6-only",
    );
    fails_with(
        &lab,
        &["container", "add", &x, "-p", "0.0.0.0:8080:80"],
        "IPv6-only",
    );
    fails_with(
        &lab,
        &[
            "nat",
            "add",
            "--external",
            "198.51.100.7",
            "--internal",
            "10.88.0.2",
        ],
        "IPv6-only",
    );
    assert!(
        json(&lab, &["container", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );

    // A container gets an IPv6 address and route only; `8080:80` publishes over IPv6.
    let (web, cli) = (lab.name("web"), lab.name("cli"));
    lab.ok(&["container", "add", &web, "-p", "8080:80"])
        .unwrap();
    lab.ok(&["container", "add", &cli]).unwrap();
    let c = json(&lab, &["container", "inspect", &web]);
    assert!(c["ip"].is_null(), "{c}");
    assert_eq!(c["ip6"], "fd00:88::2", "{c}");
    assert_eq!(c["mac"], "02:42:00:00:00:02", "{c}");
    let (nw, nc) = (lab.container_ns(&web), lab.container_ns(&cli));
    let (_, addrs) = bpfnat_tests::run_in_ns(&nw, "ip", &["-4", "addr", "show", "dev", "eth0"]);
    assert!(!addrs.contains("inet "), "{addrs}");
    let text = lab.ok(&["port", &web]).unwrap();
    assert!(
        text.contains("80/tcp -> [::]:8080") && !text.contains("0.0.0.0"),
        "{text}"
    );
    let window = Duration::from_secs(10);

    // F1, F2 (NAT66 to the uplink's address) and F3 (the client kept).
    assert!(ping6(&nc, None, "fd00:88::2"), "cli -> web");
    let srv = traffic::http_server(&lab.ext, v6("::", 80), "ext", 1, window).unwrap();
    let got = traffic::http_get(&nw, v6(EXT6, 80));
    assert!(got.is_ok(), "{got:?}");
    assert_eq!(srv.join().unwrap()[0].ip().to_string(), NODE6);
    let srv = traffic::http_server(&nw, v6("::", 80), "web", 1, window).unwrap();
    let got = traffic::http_get(&lab.ext, v6(NODE6, 8080));
    assert!(
        got.as_ref().is_ok_and(|b| b.starts_with("hello from web")),
        "{got:?}"
    );
    assert_eq!(srv.join().unwrap()[0].ip().to_string(), EXT6);

    // IPv4 a container sends goes nowhere, even from an address it gave itself and with
    // its frames addressed to the gateway's MAC; the node's own IPv4 (the address added
    // above) is untouched.
    let host_mac = c["host_mac"].as_str().unwrap().to_owned();
    ip_in(&nw, &["addr", "add", "192.0.2.50/32", "dev", "eth0"]);
    ip_in(&nw, &["route", "add", "198.51.100.0/24", "dev", "eth0"]);
    ip_in(
        &nw,
        &[
            "neigh",
            "add",
            "198.51.100.1",
            "lladdr",
            &host_mac,
            "dev",
            "eth0",
        ],
    );
    let echo = traffic::udp_echo(&lab.ext, v4(EXT_ADDR, 7), 1, Duration::from_secs(3)).unwrap();
    let spoofed = counter(&lab, "drop_spoof");
    let got = traffic::udp_ask(&nw, v4(Ipv4Addr::UNSPECIFIED, 0), v4(EXT_ADDR, 7), b"x");
    assert!(got.is_err(), "{got:?}");
    assert!(echo.join().unwrap().is_empty());
    assert!(counter(&lab, "drop_spoof") > spoofed);
    assert!(ping(&lab.ext, NODE_ADDR), "the node's own IPv4");
}

/// Over IPv6, a connection's entry vouches for its sender only on the veth and MAC that
/// opened it: another container sending on that connection's tuple is dropped as spoofed,
/// and the owner's next datagram on it still goes out (the control).
#[test]
fn a_container_cannot_send_on_another_containers_ipv6_connection() {
    use bpfnat_tests::{add_container, packet, wire};
    let lab = lab_up6("own6");
    let a = add_container(&lab, "a", &["--ip6", "fd00:88::2"]);
    let b = add_container(&lab, "b", &["--ip6", "fd00:88::3"]);
    let echo = traffic::udp_echo(&lab.ext, v6(EXT6, 7777), 3, Duration::from_secs(3)).unwrap();
    traffic::udp_ask(&a.ns, v6("::", 27000), v6(EXT6, 7777), b"first").unwrap();
    let forged = packet::udp6(
        ("fd00:88::2".parse().unwrap(), EXT6.parse().unwrap()),
        (b.mac, b.host_mac),
        (packet::PROTO_UDP, &[]),
        (27000, 7777),
        b"forged",
        None,
    );
    let spoofed = counter(&lab, "drop_spoof");
    wire::send(&b.ns, "eth0", vec![forged]);
    traffic::udp_ask(&a.ns, v6("::", 27000), v6(EXT6, 7777), b"second").unwrap();
    let seen = echo.join().unwrap();
    assert_eq!(
        seen.len(),
        2,
        "only the owner's two datagrams got out: {seen:?}"
    );
    assert!(seen.iter().all(|p| p.ip().to_string() == NODE6), "{seen:?}");
    assert_eq!(
        counter(&lab, "drop_spoof"),
        spoofed + 1,
        "the forgery is dropped and counted"
    );
}
