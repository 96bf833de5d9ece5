//! The loader's contract: bad input is refused clearly and changes nothing; `container del`
//! and `down` remove what they own; pinned maps are readable with bpftool.

use std::{path::Path, process::Command};

use bpfnat_tests::{
    EXT_ADDR, NODE_ADDR, UPLINK, fails_with, json, lab, lab_up, link_exists, traffic, v4,
};

fn host_if(lab: &bpfnat_tests::Lab, name: &str) -> String {
    json(lab, &["container", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .map(|c| c["host_if"].as_str().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no container {name}"))
}

#[test]
fn duplicate_container_name_is_rejected_and_changes_nothing() {
    let lab = lab_up("dupname");
    let c = lab.name("c");
    lab.ok(&["container", "add", &c, "-p", "8080:80"]).unwrap();
    let before = json(&lab, &["container", "list"]);
    fails_with(
        &lab,
        &["container", "add", &c, "-p", "9090:90"],
        "already exists",
    );
    assert_eq!(json(&lab, &["container", "list"]), before);
    assert_eq!(json(&lab, &["port", "list"]).as_array().unwrap().len(), 1);
}

#[test]
fn malformed_publish_spec_is_rejected() {
    let lab = lab_up("badspec");
    let c = lab.name("c");
    for spec in [":80", "http:80", "8080:80/sctp", "8000-8001:80-82"] {
        fails_with(
            &lab,
            &["container", "add", &c, "-p", spec],
            "invalid port spec",
        );
    }
    assert!(!lab.container_ns(&c).exists(), "no namespace left behind");
    assert!(
        json(&lab, &["container", "list"])
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn publishing_on_an_address_the_node_lacks_or_on_ipv6_without_a_subnet_is_refused_clearly() {
    let lab = lab_up("foreignip");
    let c = lab.name("c");
    // As Docker: a host address that is not the node's cannot take the port.
    fails_with(
        &lab,
        &["container", "add", &c, "-p", "203.0.113.77:8080:80"],
        "203.0.113.77 is not an address of this node",
    );
    for spec in ["[::]:8080:80", "[2001:db8::2]:8080:80/udp"] {
        fails_with(
            &lab,
            &["container", "add", &c, "-p", spec],
            "the node has no IPv6 subnet",
        );
    }
    assert!(!lab.container_ns(&c).exists(), "no namespace left behind");
    assert!(json(&lab, &["port", "list"]).as_array().unwrap().is_empty());
    // The node's own addresses, loopback included, are fine.
    lab.ok(&[
        "container",
        "add",
        &c,
        "-p",
        "127.0.0.1:8080:80",
        "-p",
        &format!("{NODE_ADDR}:8081:81"),
    ])
    .unwrap();
    fails_with(
        &lab,
        &["port", "add", &c, "203.0.113.77:9090:90"],
        "not an address of this node",
    );
    assert_eq!(json(&lab, &["port", "list"]).as_array().unwrap().len(), 2);
}

#[test]
fn host_port_already_published_is_rejected() {
    let lab = lab_up("dupport");
    let (a, b) = (lab.name("a"), lab.name("b"));
    lab.ok(&["container", "add", &a, "-p", "8080:80"]).unwrap();
    fails_with(
        &lab,
        &["container", "add", &b, "-p", "8080:81"],
        "already published by container",
    );
    assert!(!lab.container_ns(&b).exists(), "no namespace left behind");
    lab.ok(&["container", "add", &b]).unwrap();
    fails_with(
        &lab,
        &["port", "add", &b, "127.0.0.1:8080:80"],
        "already published",
    );
    // The same port on the other protocol is free.
    lab.ok(&["port", "add", &b, "8080:80/udp"]).unwrap();
    let ports = json(&lab, &["port", "list"]);
    assert_eq!(ports.as_array().unwrap().len(), 2, "{ports}");
}

#[test]
fn missing_uplink_is_rejected() {
    let lab = lab("nouplink");
    let out = lab.run(&["up", "--uplink", "nope0"]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope0") && err.contains("not found"), "{err}");
    assert!(
        !bpfnat_tests::pins(&lab).root().exists(),
        "no pins left behind"
    );
    assert!(!link_exists(&lab.node, "bn-gw"));
    let (code, st) = bpfnat_tests::status(&lab);
    assert_eq!((code, &st["up"]), (3, &serde_json::json!(false)));
    fails_with(&lab, &["container", "add", &lab.name("c")], "not up");
    // A gateway outside the subnet is refused before anything is made.
    fails_with(
        &lab,
        &[
            "up",
            "--uplink",
            UPLINK,
            "--subnet",
            "10.88.0.0/16",
            "--gateway",
            "10.99.0.1",
        ],
        "not a host address",
    );
    assert_eq!(bpfnat_tests::status(&lab).0, 3);
    assert!(!link_exists(&lab.node, "bn-gw"));
}

#[test]
fn bad_arguments_are_refused() {
    let lab = lab_up("badargs");
    fails_with(&lab, &["container", "add", "a/b"], "invalid name");
    fails_with(
        &lab,
        &["container", "add", &lab.name("x"), "--ip", "192.0.2.7"],
        "not a host address",
    );
    fails_with(
        &lab,
        &["container", "add", &lab.name("x"), "--ip", "10.88.0.1"],
        "gateway",
    );
    fails_with(
        &lab,
        &[
            "container",
            "add",
            &lab.name("x"),
            "--sysctl",
            "kernel.pid_max=5",
        ],
        "net.*",
    );
    fails_with(
        &lab,
        &["container", "del", &lab.name("ghost")],
        "no such container",
    );
    fails_with(
        &lab,
        &["up", "--uplink", UPLINK, "--subnet", "10.99.0.0/16"],
        "already up",
    );
    assert!(!lab.container_ns(&lab.name("x")).exists());
    // `up` with the same settings again is fine.
    lab.ok(&["up", "--uplink", UPLINK]).unwrap();
}

#[test]
fn sysctls_are_set_in_the_container_namespace() {
    let lab = lab_up("sysctl");
    let c = lab.name("c");
    lab.ok(&[
        "container",
        "add",
        &c,
        "--sysctl",
        "net.ipv4.ip_default_ttl=33",
        "--sysctl",
        "net.ipv4.ping_group_range=0 2147483647",
    ])
    .unwrap();
    let read = |key: &str| {
        let path = nat_plumbing::netns::sysctl_path(key).unwrap();
        nat_plumbing::netns::run_in(&lab.container_ns(&c), move || {
            Ok(std::fs::read_to_string(path)?)
        })
        .unwrap()
    };
    assert_eq!(read("net.ipv4.ip_default_ttl").trim(), "33");
    assert_eq!(
        read("net.ipv4.ping_group_range")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["0", "2147483647"]
    );
    // The node's own value is untouched.
    let node = nat_plumbing::netns::run_in(&lab.node, || {
        Ok(std::fs::read_to_string(
            "/proc/sys/net/ipv4/ip_default_ttl",
        )?)
    })
    .unwrap();
    assert_eq!(node.trim(), "64");
}

#[test]
fn container_del_and_down_remove_everything() {
    let lab = lab_up("cleanup");
    let (a, b) = (lab.name("a"), lab.name("b"));
    lab.ok(&["container", "add", &a, "-p", "8080:80"]).unwrap();
    let ifa = host_if(&lab, &a);
    assert!(lab.container_ns(&a).exists() && link_exists(&lab.node, &ifa));
    // The host veth's program: a tc filter of our priority and handle, not a TCX link.
    let (ok, filters) =
        bpfnat_tests::run_in_ns(&lab.node, "tc", &["filter", "show", "dev", &ifa, "ingress"]);
    assert!(
        ok && filters.contains("pref 1 bpf")
            && filters.contains("handle 0x1 tc_container direct-action"),
        "{filters}"
    );
    assert!(!bpfnat_tests::pins(&lab).link(&ifa).exists());

    // Leave a tracked connection behind to see it go with the container.
    let srv = traffic::http_server(
        &lab.ext,
        v4(EXT_ADDR, 9000),
        "ext",
        1,
        std::time::Duration::from_secs(10),
    )
    .unwrap();
    traffic::http_get(&lab.container_ns(&a), v4(EXT_ADDR, 9000)).unwrap();
    srv.join().unwrap();
    assert!(
        json(&lab, &["conntrack", "stats"])["entries"]
            .as_u64()
            .unwrap()
            > 0
    );

    lab.ok(&["container", "del", &a]).unwrap();
    assert!(!lab.container_ns(&a).exists(), "namespace removed");
    assert!(
        !link_exists(&lab.node, &ifa),
        "veth removed, and its filter with it"
    );
    assert!(json(&lab, &["port", "list"]).as_array().unwrap().is_empty());
    assert_eq!(
        json(&lab, &["conntrack", "stats"])["entries"],
        0,
        "its connections are forgotten"
    );
    // The freed host port can be published again.
    lab.ok(&["container", "add", &b, "-p", "8080:80"]).unwrap();
    let ifb = host_if(&lab, &b);

    lab.ok(&["down"]).unwrap();
    assert!(!lab.container_ns(&b).exists());
    assert!(!link_exists(&lab.node, &ifb));
    assert!(!link_exists(&lab.node, "bn-gw"));
    assert!(
        !bpfnat_tests::pins(&lab).root().exists(),
        "every pin removed"
    );
    let (code, st) = bpfnat_tests::status(&lab);
    assert_eq!((code, &st["up"]), (3, &serde_json::json!(false)));
    // Down twice is harmless.
    lab.ok(&["down"]).unwrap();
}

/// The group of link `name` in `ns` (`ip link … group`).
fn link_group(ns: &Path, name: &str) -> String {
    let (ok, out) = bpfnat_tests::run_in_ns(ns, "ip", &["-j", "link", "show", "dev", name]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["group"].as_str().unwrap().to_owned()
}

#[test]
fn down_removes_every_container_at_once_and_nothing_else() {
    let lab = lab_up("downall");
    let names: Vec<String> = (0..4).map(|i| lab.name(&format!("c{i}"))).collect();
    for (i, c) in names.iter().enumerate() {
        let port = format!("{}:80", 8080 + i);
        lab.ok(&["container", "add", c, "-p", &port]).unwrap();
    }
    let runtime = nat_plumbing::netns::create(&lab.name("rt")).unwrap();
    let r = lab.name("r");
    lab.ok(&["container", "add", &r, "--netns", runtime.to_str().unwrap()])
        .unwrap();
    let ifs: Vec<String> = names.iter().chain([&r]).map(|c| host_if(&lab, c)).collect();
    // Not bpfnat's: a veth pair of the node's, in a device group of its own.
    for args in [
        &[
            "link", "add", "keep0", "type", "veth", "peer", "name", "keep1",
        ][..],
        &["link", "set", "keep0", "group", "7"],
    ] {
        let (ok, out) = bpfnat_tests::run_in_ns(&lab.node, "ip", args);
        assert!(ok, "{out}");
    }
    assert!(ifs.iter().all(|i| link_exists(&lab.node, i)));

    let out = lab.ok(&["-o", "json", "down"]).unwrap();
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["containers_removed"].as_array().unwrap().len(), 5);
    for (c, i) in names.iter().zip(&ifs) {
        assert!(!link_exists(&lab.node, i), "{c}'s host veth is gone");
        assert!(!lab.container_ns(c).exists(), "{c}'s namespace is gone");
    }
    assert!(!link_exists(&lab.node, &ifs[4]));
    assert!(runtime.exists(), "the runtime's namespace stays");
    assert!(!link_exists(&runtime, "eth0"), "but its interface is gone");
    assert!(link_exists(&lab.node, "keep0") && link_exists(&lab.node, "keep1"));
    assert_eq!(link_group(&lab.node, "keep0"), "7");
    assert_eq!(link_group(&lab.node, "keep1"), "default");
    let _ = nat_plumbing::netns::remove(&runtime);
}

#[test]
fn externally_created_namespace_is_attached_and_kept() {
    let lab = lab_up("extns");
    let name = lab.name("rt");
    let ns = nat_plumbing::netns::create(&name).unwrap();
    lab.ok(&[
        "container",
        "add",
        &lab.name("c"),
        "--netns",
        ns.to_str().unwrap(),
    ])
    .unwrap();
    let srv = traffic::http_server(
        &lab.ext,
        v4(EXT_ADDR, 9000),
        "ext",
        1,
        std::time::Duration::from_secs(10),
    )
    .unwrap();
    assert!(
        traffic::http_get(&ns, v4(EXT_ADDR, 9000))
            .unwrap()
            .contains(&NODE_ADDR.to_string())
    );
    srv.join().unwrap();
    lab.ok(&["container", "del", &lab.name("c")]).unwrap();
    assert!(
        ns.exists(),
        "a namespace bpfnat did not create is not removed"
    );
    assert!(!link_exists(&ns, "eth0"), "but its interface is");
}

#[test]
fn pinned_maps_dump_with_field_names_in_bpftool() {
    let lab = lab_up("bpftool");
    let c = lab.name("c");
    lab.ok(&["container", "add", &c, "--ip", "10.88.0.2", "-p", "8080:80"])
        .unwrap();
    let srv = traffic::http_server(
        &lab.ext,
        v4(EXT_ADDR, 9000),
        "ext",
        1,
        std::time::Duration::from_secs(10),
    )
    .unwrap();
    traffic::http_get(&lab.container_ns(&c), v4(EXT_ADDR, 9000)).unwrap();
    srv.join().unwrap();

    let dump = |map: &str| -> serde_json::Value {
        let path = bpfnat_tests::pins(&lab).map(map);
        assert!(Path::new(&path).exists(), "{} pinned", path.display());
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&path)
            .output()
            .expect("run bpftool");
        assert!(
            out.status.success(),
            "bpftool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("bpftool JSON")
    };
    let ct = dump("conntrack");
    let entries = ct.as_array().unwrap();
    assert!(!entries.is_empty());
    let f = &entries[0]["formatted"];
    assert!(f["key"]["src_addr"].is_array(), "named key fields: {f}");
    assert!(
        f["value"]["xlate"]["src_addr"].is_array() && f["value"]["meta"]["last_seen_ns"].is_u64(),
        "named value fields: {f}"
    );
    assert!(
        entries
            .iter()
            .any(|e| e["formatted"]["key"]["src_addr"] == serde_json::json!([10, 88, 0, 2]))
    );

    let eps = dump("endpoints");
    assert_eq!(
        eps[0]["formatted"]["key"],
        serde_json::json!([10, 88, 0, 2])
    );
    assert_eq!(
        eps[0]["formatted"]["value"]["mac"],
        serde_json::json!([2, 66, 10, 88, 0, 2])
    );
    let ports = dump("ports");
    assert_eq!(
        ports[0]["formatted"]["key"]["host_port"],
        serde_json::json!([0x1f, 0x90])
    );
    let cfg = dump("config");
    assert_eq!(
        cfg[0]["formatted"]["value"]["v4"]["snat_addr"],
        serde_json::json!(NODE_ADDR.octets())
    );
    dump("stats");
}

#[test]
fn up_works_in_a_namespace_whose_loopback_is_down() {
    let lab = lab("lodown");
    let (ok, _) = bpfnat_tests::run_in_ns(&lab.node, "ip", &["link", "set", "lo", "down"]);
    assert!(ok);
    lab.ok(&["up", "--uplink", UPLINK]).unwrap();
    assert_eq!(json(&lab, &["status"])["up"], true);
}

#[test]
fn status_reports_the_running_datapath() {
    let lab = lab_up("status");
    let s = json(&lab, &["status"]);
    assert_eq!(s["up"], true);
    assert_eq!(s["node"]["uplink"], UPLINK);
    assert_eq!(s["node"]["snat_ip"], NODE_ADDR.to_string());
    assert_eq!(s["uplink_programs"], serde_json::json!(["tc_uplink"]));
    let text = lab.ok(&["status"]).unwrap();
    assert!(text.contains("state:        up"), "{text}");
}

#[test]
fn demo_shows_every_flow_and_cleans_up() {
    // Two at once: each demo has its own lab.
    let spawn = || {
        Command::new(bpfnat_tests::bin())
            .arg("demo")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run bpfnat demo")
    };
    let (first, second) = (spawn(), spawn());
    let out = first.wait_with_output().expect("wait for the demo");
    let other = second.wait_with_output().expect("wait for the demo");
    assert!(
        other.status.success(),
        "the second demo failed: {}",
        String::from_utf8_lossy(&other.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("hello from web, you are 198.51.100.1:"),
        "F3 keeps the client address: {text}"
    );
    assert!(
        text.contains("hello from web, you are 10.88.0.3:"),
        "F1: {text}"
    );
    assert!(
        text.contains("saw the connection come from 198.51.100.2:"),
        "F2: {text}"
    );
    assert!(
        text.contains("masquerade") && text.contains("published"),
        "conntrack table: {text}"
    );
    let left = bpfnat_tests::entries_with_prefix("/run/netns", "bpfnat-demo");
    assert!(left.is_empty(), "demo left namespaces: {left:?}");
    // State directories and bpffs mounts (with their pins) live under /run.
    let run = bpfnat_tests::entries_with_prefix("/run", "bpfnat-bpfnat-demo");
    assert!(run.is_empty(), "demo left state or bpffs mounts: {run:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains("bpfnat-bpfnat-demo"),
        "demo left a bpffs mounted"
    );
}

#[test]
fn a_lab_pins_into_its_own_bpffs_and_takes_it_away() {
    let lab = lab_up("ownfs");
    let mount = lab.bpffs_dir.parent().unwrap().to_owned();
    assert!(
        bpfnat_tests::pins(&lab)
            .map(nat_common::map_names::CONNTRACK)
            .exists()
    );
    let mounted = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(mount.to_str().unwrap()))
    };
    assert!(mounted(), "{} is a mount of its own", mount.display());
    drop(lab);
    assert!(!mounted(), "unmounted");
    assert!(!mount.exists(), "mount point removed");
}

/// A pipe whose reading end is already closed: every write to it fails with EPIPE, as when
/// `bpfnat … | head -1` has exited.
fn closed_pipe() -> std::process::Stdio {
    use std::os::fd::FromRawFd as _;
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned here alone.
    let (read, write) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    drop(read);
    std::process::Stdio::from(write)
}

#[test]
fn every_command_ends_quietly_on_a_closed_pipe() {
    let lab = lab_up("pipe");
    lab.ok(&["container", "add", &lab.name("web"), "-p", "8080:80"])
        .unwrap();
    for args in [
        &["stats"][..],
        &["status"],
        &["container", "list"],
        &["port", "list"],
        &["conntrack", "list"],
        &["-o", "json", "stats"],
    ] {
        let out = lab
            .bpfnat(args)
            .unwrap()
            .stdout(closed_pipe())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.is_empty(),
            "bpfnat {args:?} into a closed pipe: {:?}, stderr {err:?}",
            out.status
        );
    }
    // The demo goes on to clean up after itself.
    let out = Command::new(bpfnat_tests::bin())
        .arg("demo")
        .stdout(closed_pipe())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "demo into a closed pipe: {:?}, stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let left = bpfnat_tests::entries_with_prefix("/run/netns", "bpfnat-demo");
    assert!(left.is_empty(), "demo left namespaces: {left:?}");
}

#[test]
fn status_fails_when_down_and_a_degraded_node_is_repaired_by_up() {
    let lab = lab("degraded");
    // Down: status says so and exits 3; every command that needs the datapath says the same.
    let (code, st) = bpfnat_tests::status(&lab);
    assert_eq!((code, &st["up"]), (3, &serde_json::json!(false)));
    for args in [
        &["stats"][..],
        &["conntrack", "list"],
        &["conntrack", "flush"],
        &["port", "list"],
        &["port", "add", "x", "8080:80"],
    ] {
        let out = lab.run(args).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && err.trim_end()
                    == "error: bpfnat is not up: run `bpfnat up --uplink IFACE` first",
            "bpfnat {args:?}: {err:?}"
        );
    }

    lab.ok(&["up", "--uplink", UPLINK, "--port-range", "20000-29999"])
        .unwrap();
    let (web, client) = (lab.name("web"), lab.name("client"));
    lab.ok(&["container", "add", &web, "-p", "8080:80"])
        .unwrap();
    lab.ok(&["container", "add", &client]).unwrap();
    let serve = |n: usize| {
        traffic::http_server(
            &lab.container_ns(&web),
            v4(std::net::Ipv4Addr::UNSPECIFIED, 80),
            "web",
            n,
            std::time::Duration::from_secs(10),
        )
        .unwrap()
    };
    let flows_work = || {
        let srv = serve(1);
        let published = traffic::http_get(&lab.ext, v4(NODE_ADDR, 8080));
        let _ = srv.join();
        let ext = traffic::http_server(
            &lab.ext,
            v4(EXT_ADDR, 9000),
            "ext",
            1,
            std::time::Duration::from_secs(10),
        )
        .unwrap();
        let out = traffic::http_get(&lab.container_ns(&client), v4(EXT_ADDR, 9000));
        let seen = ext.join().unwrap_or_default();
        published.is_ok_and(|b| b.starts_with("hello from web"))
            && out.is_ok()
            && seen.first().is_some_and(|p| p.ip() == NODE_ADDR)
    };
    assert!(flows_work(), "published and masqueraded flows before");

    // The pins go (bpffs remounted, a careless rm): the node is degraded, not down.
    std::fs::remove_dir_all(bpfnat_tests::pins(&lab).root()).unwrap();
    let (code, st) = bpfnat_tests::status(&lab);
    assert_eq!(
        (code, &st["degraded"]),
        (1, &serde_json::json!(true)),
        "{st}"
    );
    let repair = st["repair"].as_str().unwrap().to_owned();
    let text = String::from_utf8_lossy(&lab.run(&["status"]).unwrap().stdout).into_owned();
    assert!(
        text.contains(&repair) && !text.contains("down"),
        "status advises the repair, nothing destructive: {text}"
    );
    // The advice works: `up` with the recorded settings restores the node and its containers.
    let args: Vec<&str> = repair
        .split_whitespace()
        .skip_while(|a| *a != "up")
        .collect();
    assert!(args.contains(&"20000-29999"), "recorded settings: {repair}");
    let out = lab.ok(&args).unwrap();
    assert!(out.contains("restored"), "{out}");
    let (code, st) = bpfnat_tests::status(&lab);
    assert_eq!((code, &st["up"]), (0, &serde_json::json!(true)), "{st}");
    assert!(
        flows_work(),
        "published and masqueraded flows after the repair"
    );

    // A repair that stopped half way (here: one endpoint gone from the map) is finished by
    // the next `up`, which rewires only what is missing.
    {
        use aya::maps::{HashMap, Map, MapData};
        let pin = bpfnat_tests::pins(&lab).map(nat_common::map_names::ENDPOINTS);
        let mut eps: HashMap<_, [u8; 4], nat_common::Endpoint> =
            Map::from_map_data(MapData::from_pin(&pin).unwrap())
                .unwrap()
                .try_into()
                .unwrap();
        let ip = json(&lab, &["container", "inspect", &client])["ip"]
            .as_str()
            .unwrap()
            .parse::<std::net::Ipv4Addr>()
            .unwrap();
        eps.remove(&ip.octets()).unwrap();
    }
    assert!(
        !flows_work(),
        "the client has no endpoint: its traffic is dropped"
    );
    lab.ok(&args).unwrap();
    assert!(flows_work(), "the next up put the client back");
}

#[test]
fn port_list_shows_the_datapath_and_where_the_state_file_disagrees() {
    use aya::maps::{HashMap, Map, MapData};
    use nat_common::{PortKey4, PortTarget4};
    let lab = lab_up("portlist");
    let web = lab.name("web");
    lab.ok(&["container", "add", &web, "-p", "8080:80"])
        .unwrap();
    let rows = json(&lab, &["port", "list"]);
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["container"], web.as_str());
    assert_eq!(rows[0]["state"], "published");

    // The kernel's table changes behind the state file's back.
    let pin = bpfnat_tests::pins(&lab).map(nat_common::map_names::PORTS);
    let mut ports: HashMap<_, PortKey4, PortTarget4> =
        Map::from_map_data(MapData::from_pin(&pin).unwrap())
            .unwrap()
            .try_into()
            .unwrap();
    let key = |port: u16| PortKey4 {
        host_addr: [0; 4],
        host_port: port.to_be_bytes(),
        proto: nat_common::PROTO_TCP,
        _pad: 0,
    };
    ports.remove(&key(8080)).unwrap();
    let stray = PortTarget4 {
        addr: [10, 88, 0, 9],
        port: 90u16.to_be_bytes(),
        _pad: [0; 2],
        generation: 1,
    };
    ports.insert(key(9090), stray, 0).unwrap();

    let out = lab.run(&["-o", "json", "port", "list"]).unwrap();
    assert!(out.status.success());
    let rows = bpfnat_tests::unwrap_envelope(
        serde_json::from_slice(&out.stdout).unwrap(),
        &["port", "list"],
    );
    let state_of = |port: u64| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["host_port"] == port)
            .map(|r| {
                (
                    r["state"].as_str().unwrap().to_owned(),
                    r["container_ip"].clone(),
                )
            })
    };
    assert_eq!(
        state_of(9090),
        Some(("unrecorded".to_owned(), serde_json::json!("10.88.0.9"))),
        "{rows}"
    );
    assert_eq!(state_of(8080).unwrap().0, "missing", "{rows}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("0.0.0.0:9090/tcp")
            && err.contains("0.0.0.0:8080/tcp")
            && err.contains("disagree"),
        "{err}"
    );
}
