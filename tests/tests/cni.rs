//! The CNI plugin driven exactly as a runtime drives it: environment variables, the network
//! configuration on stdin, the result (or a CNI error) on stdout.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use bpfnat_tests::{EXT_ADDR, Lab, NODE_ADDR, bin, lab, link_exists, traffic, v4};
use serde_json::{Value, json};

fn conf(lab: &Lab, version: &str, extra: Value) -> Value {
    let mut c = json!({
        "cniVersion": version,
        "name": "bpfnat",
        "type": "bpfnat",
        "uplink": bpfnat_tests::UPLINK,
        "subnet": "10.88.0.0/16",
        "bpffsDir": lab.bpffs_dir,
        "stateDir": lab.state_dir,
    });
    if let (Some(o), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    c
}

/// Run the plugin in the lab's node namespace: (exit success, parsed stdout or Null).
fn cni(lab: &Lab, command: &str, id: &str, netns: &Path, conf: &Value) -> (bool, Value) {
    cni_if(lab, command, id, "eth0", netns, conf)
}

/// `cni` for interface `ifname`.
fn cni_if(
    lab: &Lab,
    command: &str,
    id: &str,
    ifname: &str,
    netns: &Path,
    conf: &Value,
) -> (bool, Value) {
    let mut c = Command::new(bin());
    c.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    nat_plumbing::netns::command_in(&mut c, &lab.node).unwrap();
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{command}: bad JSON ({e}): {text}"))
    };
    (out.status.success(), v)
}

fn sandbox(lab: &Lab, short: &str) -> std::path::PathBuf {
    nat_plumbing::netns::create(&lab.name(short)).unwrap()
}

#[test]
fn add_check_del_with_port_mappings_as_a_runtime_calls_them() {
    let lab = lab("cni");
    let ns = sandbox(&lab, "pod1");
    let id = "a1b2c3d4e5f6";
    let c = conf(
        &lab,
        "1.0.0",
        json!({"runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}}),
    );
    // VERSION lists what podman checks for.
    let (ok, v) = cni(&lab, "VERSION", id, &ns, &json!({"cniVersion": "1.0.0"}));
    assert!(ok);
    assert!(
        v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.1.0"))
    );

    // ADD brings the datapath up from the configuration and wires the sandbox.
    let (ok, r) = cni(&lab, "ADD", id, &ns, &c);
    assert!(ok, "ADD failed: {r}");
    assert_eq!(r["cniVersion"], "1.0.0");
    let ip = r["ips"][0]["address"].as_str().unwrap();
    assert!(ip.starts_with("10.88.") && ip.ends_with("/16"), "{r}");
    assert_eq!(r["ips"][0]["gateway"], "10.88.0.1");
    let sandbox_if = &r["interfaces"][r["ips"][0]["interface"].as_u64().unwrap() as usize];
    assert_eq!(sandbox_if["name"], "eth0");
    assert_eq!(sandbox_if["sandbox"], ns.display().to_string());
    assert!(sandbox_if["mac"].as_str().unwrap().starts_with("02:42:"));
    assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");

    // The pod reaches the outside (MASQUERADE) and its hostPort is published.
    let srv = traffic::http_server(
        &lab.ext,
        v4(EXT_ADDR, 9000),
        "ext",
        1,
        Duration::from_secs(10),
    )
    .unwrap();
    traffic::http_get(&ns, v4(EXT_ADDR, 9000)).unwrap();
    assert_eq!(srv.join().unwrap()[0].ip(), NODE_ADDR);
    let srv = traffic::http_server(
        &ns,
        v4(Ipv4Addr::UNSPECIFIED, 80),
        "pod",
        1,
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(
        traffic::http_get(&lab.ext, v4(NODE_ADDR, 8080))
            .unwrap()
            .starts_with("hello from pod")
    );
    srv.join().unwrap();

    let mut checked = c.clone();
    checked["prevResult"] = r.clone();
    let (ok, e) = cni(&lab, "CHECK", id, &ns, &checked);
    assert!(ok, "CHECK passes on a healthy attachment: {e}");
    assert!(cni(&lab, "STATUS", id, &ns, &c).0);

    // DEL removes it, and is idempotent.
    assert!(cni(&lab, "DEL", id, &ns, &c).0);
    assert!(!link_exists(&ns, "eth0"));
    assert!(ns.exists(), "the runtime's namespace is the runtime's");
    assert!(cni(&lab, "DEL", id, &ns, &c).0, "second DEL");
    let (ok, e) = cni(&lab, "CHECK", id, &ns, &checked);
    assert!(!ok);
    assert_eq!(e["code"], 3, "{e}");
}

#[test]
fn del_after_the_namespace_vanished_and_check_after_the_veth_was_deleted() {
    let lab = lab("cnigone");
    let c = conf(&lab, "1.1.0", json!({}));
    let ns1 = sandbox(&lab, "p1");
    assert!(cni(&lab, "ADD", "pod-one", &ns1, &c).0);
    let ns2 = sandbox(&lab, "p2");
    let (ok, r2) = cni(&lab, "ADD", "pod-two", &ns2, &c);
    assert!(ok, "{r2}");

    // pod-one's sandbox disappears before DEL (a crashed runtime).
    nat_plumbing::netns::remove(&ns1).unwrap();
    assert!(
        cni(&lab, "DEL", "pod-one", &ns1, &c).0,
        "DEL of a vanished sandbox succeeds"
    );

    // Someone deletes pod-two's veth behind our back: CHECK notices.
    let mut ip = Command::new("ip");
    ip.args(["link", "del", "eth0"]);
    nat_plumbing::netns::command_in(&mut ip, &ns2).unwrap();
    assert!(ip.status().unwrap().success());
    let mut checked = c.clone();
    checked["prevResult"] = r2;
    let (ok, e) = cni(&lab, "CHECK", "pod-two", &ns2, &checked);
    assert!(!ok, "CHECK must fail");
    assert!(e["msg"].as_str().unwrap().contains("pod-two"), "{e}");
}

#[test]
fn gc_removes_attachments_the_runtime_no_longer_has() {
    let lab = lab("cnigc");
    let c = conf(&lab, "1.1.0", json!({}));
    let (a, b) = (sandbox(&lab, "a"), sandbox(&lab, "b"));
    assert!(cni(&lab, "ADD", "keep", &a, &c).0);
    assert!(cni(&lab, "ADD", "stale", &b, &c).0);
    let gc = conf(
        &lab,
        "1.1.0",
        json!({"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]}),
    );
    assert!(cni(&lab, "GC", "", &a, &gc).0);
    assert!(link_exists(&a, "eth0"), "valid attachment kept");
    assert!(!link_exists(&b, "eth0"), "stale attachment removed");
}

#[test]
fn parallel_adds_get_distinct_addresses() {
    const N: usize = 8;
    let lab = lab("cnipar");
    let c = conf(&lab, "1.0.0", json!({}));
    let sandboxes: Vec<_> = (0..N).map(|i| sandbox(&lab, &format!("s{i}"))).collect();
    let results: Vec<(bool, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = sandboxes
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let (lab, c) = (&lab, &c);
                s.spawn(move || cni(lab, "ADD", &format!("par{i}"), ns, c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ips: Vec<String> = results
        .iter()
        .map(|(ok, r)| {
            assert!(*ok, "parallel ADD failed: {r}");
            r["ips"][0]["address"].as_str().unwrap().to_owned()
        })
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), N, "every sandbox got its own address");
}

#[test]
fn unsupported_versions_and_bad_environment_are_cni_errors() {
    let lab = lab("cnierr");
    let ns = sandbox(&lab, "x");
    let (ok, e) = cni(&lab, "ADD", "x1", &ns, &conf(&lab, "0.1.0", json!({})));
    assert!(!ok);
    assert_eq!(e["code"], 1, "{e}");
    let (ok, e) = cni(&lab, "ADD", "bad/id", &ns, &conf(&lab, "1.0.0", json!({})));
    assert!(!ok);
    assert_eq!(e["code"], 4, "{e}");
    // STATUS says ready whenever an ADD would succeed: not up yet, but the configuration
    // names an uplink that exists, so the next ADD brings the datapath up.
    let (ok, e) = cni(&lab, "STATUS", "x1", &ns, &conf(&lab, "1.1.0", json!({})));
    assert!(ok, "ready: {e}");
    let (ok, e) = cni(
        &lab,
        "STATUS",
        "x1",
        &ns,
        &conf(&lab, "1.1.0", json!({"uplink": "nope0"})),
    );
    assert!(!ok, "no uplink to bring the datapath up with");
    assert_eq!(e["code"], 50, "{e}");
    // An ipam section is refused (bpfnat assigns addresses itself), a bad CNI_NETNS is an
    // environment error, and neither touches anything.
    let (ok, e) = cni(
        &lab,
        "ADD",
        "x1",
        &ns,
        &conf(&lab, "1.1.0", json!({"ipam": {"type": "host-local"}})),
    );
    assert!(!ok);
    assert_eq!(e["code"], 2, "{e}");
    let (ok, e) = cni(
        &lab,
        "ADD",
        "x1",
        Path::new("/run/netns/bnt-cnierr-nope"),
        &conf(&lab, "1.1.0", json!({})),
    );
    assert!(!ok);
    assert_eq!(e["code"], 4, "{e}");
    // A hostIP that is not the node's is a configuration error.
    let (ok, e) = cni(
        &lab,
        "ADD",
        "x1",
        &ns,
        &conf(
            &lab,
            "1.1.0",
            json!({"runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80, "hostIP": "203.0.113.77"}]}}),
        ),
    );
    assert!(!ok);
    assert_eq!(e["code"], 7, "{e}");
    for id in ["-leading-dash", "a b", "x/y"] {
        let (ok, e) = cni(&lab, "ADD", id, &ns, &conf(&lab, "1.1.0", json!({})));
        assert!(!ok, "{id}");
        assert_eq!(e["code"], 4, "{id}: {e}");
    }
    assert!(
        !bpfnat_tests::pins(&lab).root().exists(),
        "nothing was brought up"
    );
    assert!(!link_exists(&ns, "eth0"));
}

#[test]
fn unusable_subnets_are_refused_before_anything_is_touched() {
    let lab = lab("cninet");
    let ns = sandbox(&lab, "x");
    for subnet in ["127.0.0.0/8", "224.0.0.0/8", "169.254.0.0/16", "0.0.0.0/8"] {
        let (ok, e) = cni(
            &lab,
            "ADD",
            "x1",
            &ns,
            &conf(&lab, "1.0.0", json!({"subnet": subnet})),
        );
        assert!(!ok, "{subnet}");
        assert_eq!(e["code"], 7, "{subnet}: {e}");
        assert!(
            !bpfnat_tests::pins(&lab).root().exists(),
            "{subnet}: the datapath was brought up"
        );
        assert!(!link_exists(&ns, "eth0"), "{subnet}: the sandbox was wired");
    }
    // Positive control: the same call with a usable subnet wires the sandbox.
    let (ok, r) = cni(&lab, "ADD", "x1", &ns, &conf(&lab, "1.0.0", json!({})));
    assert!(ok, "{r}");
    assert!(link_exists(&ns, "eth0"));
}

#[test]
fn chained_after_another_plugin_the_previous_result_is_kept() {
    let lab = lab("cnichain");
    let ns = sandbox(&lab, "c");
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "tap0", "mac": "02:00:00:00:00:01", "sandbox": ns.display().to_string()}],
        "ips": [{"address": "192.0.2.9/32", "interface": 0}],
        "dns": {"nameservers": ["192.0.2.53"]}
    });
    let (ok, r) = cni(
        &lab,
        "ADD",
        "chained",
        &ns,
        &conf(&lab, "1.0.0", json!({"prevResult": prev})),
    );
    assert!(ok, "{r}");
    let ifs = r["interfaces"].as_array().unwrap();
    assert_eq!(ifs.len(), 3, "{r}");
    assert_eq!(
        ifs[0]["name"], "tap0",
        "the previous plugin's interface stays first"
    );
    let ips = r["ips"].as_array().unwrap();
    assert_eq!(ips[0]["address"], "192.0.2.9/32");
    assert_eq!(
        ips[1]["interface"], 2,
        "our address points at our sandbox interface"
    );
    assert_eq!(ifs[2]["name"], "eth0");
    assert_eq!(r["dns"]["nameservers"][0], "192.0.2.53", "dns kept");
}

#[test]
fn a_sandboxs_interfaces_are_separate_attachments() {
    let lab = lab("cnimulti");
    let c = conf(&lab, "1.1.0", json!({}));
    let ns = sandbox(&lab, "pod");
    let id = "multi0";
    let (ok, r0) = cni_if(&lab, "ADD", id, "eth0", &ns, &c);
    assert!(ok, "{r0}");
    // A second interface of the same sandbox (Multus-style, the same datapath).
    let (ok, r1) = cni_if(&lab, "ADD", id, "net1", &ns, &c);
    assert!(ok, "ADD of a second interface: {r1}");
    let addr = |r: &Value| {
        r["ips"][0]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_owned()
    };
    let (a0, a1) = (addr(&r0), addr(&r1));
    assert_ne!(a0, a1);
    for (ifname, r) in [("eth0", &r0), ("net1", &r1)] {
        let mut checked = c.clone();
        checked["prevResult"] = r.clone();
        let (ok, e) = cni_if(&lab, "CHECK", id, ifname, &ns, &checked);
        assert!(ok, "CHECK {ifname}: {e}");
    }
    // Both work: the second interface's address leaves by it (source routing, as the sbr
    // plugin sets up), masqueraded like the first.
    for cmd in [
        vec!["rule", "add", "from", a1.as_str(), "table", "100"],
        vec![
            "route",
            "add",
            "default",
            "via",
            "10.88.0.1",
            "dev",
            "net1",
            "table",
            "100",
        ],
    ] {
        let (ok, _) = bpfnat_tests::run_in_ns(&ns, "ip", &cmd);
        assert!(ok, "ip {cmd:?}");
    }
    let ping_from = |src: &str| {
        bpfnat_tests::run_in_ns(
            &ns,
            "ping",
            &["-c", "1", "-W", "2", "-I", src, &EXT_ADDR.to_string()],
        )
        .0
    };
    assert!(
        ping_from(&a0) && ping_from(&a1),
        "both interfaces reach the outside"
    );

    // GC of another network touches neither.
    let other = conf(
        &lab,
        "1.1.0",
        json!({"name": "other", "cni.dev/valid-attachments": []}),
    );
    assert!(cni(&lab, "GC", "", &ns, &other).0);
    assert!(link_exists(&ns, "eth0") && link_exists(&ns, "net1"));

    // DEL of net1 leaves eth0 as it was.
    assert!(cni_if(&lab, "DEL", id, "net1", &ns, &c).0);
    assert!(!link_exists(&ns, "net1"));
    assert!(link_exists(&ns, "eth0"), "DEL net1 kept eth0");
    let mut checked = c.clone();
    checked["prevResult"] = r0.clone();
    let (ok, e) = cni_if(&lab, "CHECK", id, "eth0", &ns, &checked);
    assert!(ok, "eth0 intact: {e}");
    assert!(ping_from(&a0), "eth0 still reaches the outside");
    let (ok, e) = cni_if(&lab, "CHECK", id, "net1", &ns, &checked);
    assert!(!ok);
    assert_eq!(e["code"], 3, "{e}");
    assert!(cni_if(&lab, "DEL", id, "eth0", &ns, &c).0);
    assert!(!link_exists(&ns, "eth0"));
}

#[test]
fn check_compares_with_the_previous_result() {
    let lab = lab("cnicheck");
    let c = conf(&lab, "1.1.0", json!({}));
    let ns = sandbox(&lab, "pod");
    let (ok, r) = cni(&lab, "ADD", "chk", &ns, &c);
    assert!(ok, "{r}");
    // Positive control.
    let mut good = c.clone();
    good["prevResult"] = r.clone();
    assert!(cni(&lab, "CHECK", "chk", &ns, &good).0);
    // No prevResult: CHECK cannot say the attachment is what ADD returned.
    let (ok, e) = cni(&lab, "CHECK", "chk", &ns, &c);
    assert!(!ok);
    assert!(e["msg"].as_str().unwrap().contains("prevResult"), "{e}");
    // A prevResult with another MAC or another address.
    let i = r["ips"][0]["interface"].as_u64().unwrap() as usize;
    let mut mac = r.clone();
    mac["interfaces"][i]["mac"] = json!("02:00:00:00:00:99");
    let mut ip = r.clone();
    ip["ips"][0]["address"] = json!("10.88.9.9/16");
    for (what, prev) in [("MAC", mac), ("address", ip)] {
        let mut bad = c.clone();
        bad["prevResult"] = prev;
        let (ok, e) = cni(&lab, "CHECK", "chk", &ns, &bad);
        assert!(!ok, "CHECK must notice another {what}");
        assert!(
            e["msg"].as_str().unwrap().contains("prevResult"),
            "{what}: {e}"
        );
    }
}

#[test]
fn a_dual_stack_network_gives_each_attachment_an_address_of_each_family() {
    let lab = lab("cni6");
    let c = conf(&lab, "1.1.0", json!({"subnet6": "fd00:88::/64"}));
    let (ns1, ns2) = (sandbox(&lab, "p1"), sandbox(&lab, "p2"));
    let (ok, r1) = cni(&lab, "ADD", "d1", &ns1, &c);
    assert!(ok, "{r1}");
    let (ok, r2) = cni(&lab, "ADD", "d2", &ns2, &c);
    assert!(ok, "{r2}");
    let addrs = |r: &Value| -> Vec<String> {
        r["ips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| format!("{} via {}", i["address"], i["gateway"]))
            .collect()
    };
    assert_eq!(
        addrs(&r1),
        [
            r#""10.88.0.2/16" via "10.88.0.1""#,
            r#""fd00:88::2/64" via "fd00:88::1""#
        ]
    );
    assert_eq!(r1["routes"][1], json!({"dst": "::/0", "gw": "fd00:88::1"}));
    assert_eq!(r1["ips"][1]["interface"], r1["ips"][0]["interface"]);
    assert_eq!(r2["ips"][1]["address"], "fd00:88::3/64");

    // Both families carry traffic between the pods, and to the node's IPv6 gateway.
    let ping6 = |ns: &Path, to: &str| {
        let mut p = Command::new("ping");
        p.args(["-6", "-c", "1", "-W", "2", to])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        nat_plumbing::netns::command_in(&mut p, ns).unwrap();
        p.status().unwrap().success()
    };
    assert!(ping6(&ns1, "fd00:88::3"));
    assert!(ping6(&ns2, "fd00:88::1"));

    // CHECK knows both addresses: the result passes, one with another IPv6 address does not.
    let mut good = c.clone();
    good["prevResult"] = r1.clone();
    assert!(cni(&lab, "CHECK", "d1", &ns1, &good).0);
    let mut bad = good.clone();
    bad["prevResult"]["ips"][1]["address"] = json!("fd00:88::99/64");
    let (ok, e) = cni(&lab, "CHECK", "d1", &ns1, &bad);
    assert!(
        !ok && e["msg"].as_str().unwrap().contains("fd00:88::2/64"),
        "{e}"
    );

    // 0.4.0 results say which family each address is.
    let old = conf(&lab, "0.4.0", json!({"subnet6": "fd00:88::/64"}));
    let ns3 = sandbox(&lab, "p3");
    let (ok, r3) = cni(&lab, "ADD", "d3", &ns3, &old);
    assert!(ok, "{r3}");
    assert_eq!(
        (&r3["ips"][0]["version"], &r3["ips"][1]["version"]),
        (&json!("4"), &json!("6"))
    );
    for (id, ns) in [("d1", &ns1), ("d2", &ns2), ("d3", &ns3)] {
        assert!(cni(&lab, "DEL", id, ns, &c).0);
    }
    // A malformed IPv6 subnet is a configuration error (code 7) before anything is touched.
    let lab2 = bpfnat_tests::lab("cni6bad");
    let ns = sandbox(&lab2, "p");
    let broken = conf(&lab2, "1.1.0", json!({"subnet6": "fd00:88::1/64"}));
    let (ok, e) = cni(&lab2, "ADD", "x", &ns, &broken);
    assert!(!ok && e["code"] == 7, "{e}");
    assert!(
        !lab2.bpffs_dir.join(nat_common::PIN_VERSION).exists(),
        "nothing touched"
    );
}

#[test]
fn an_ipv6_only_network_gives_ipv6_addresses_only() {
    let lab = lab("cni6only");
    bpfnat_tests::uplink_v6(&lab);
    bpfnat_tests::ip_in(
        &lab.node,
        &["-4", "addr", "flush", "dev", bpfnat_tests::UPLINK],
    );
    let mut c = conf(&lab, "1.1.0", json!({"subnet6": "fd00:88::/64"}));
    c.as_object_mut().unwrap().remove("subnet");
    let ns = sandbox(&lab, "p1");
    let (ok, r) = cni(&lab, "ADD", "d1", &ns, &c);
    assert!(ok, "{r}");
    assert_eq!(
        r["ips"],
        json!([{"address": "fd00:88::2/64", "gateway": "fd00:88::1", "interface": 1}])
    );
    assert_eq!(r["routes"], json!([{"dst": "::/0", "gw": "fd00:88::1"}]));
    let mut good = c.clone();
    good["prevResult"] = r.clone();
    assert!(cni(&lab, "CHECK", "d1", &ns, &good).0);

    // An IPv4 host address cannot be published on it; nothing is left of the refused ADD.
    let mut v4port = c.clone();
    v4port["runtimeConfig"] = json!({"portMappings": [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "0.0.0.0"}
    ]});
    let ns2 = sandbox(&lab, "p2");
    let (ok, e) = cni(&lab, "ADD", "d2", &ns2, &v4port);
    assert!(
        !ok && e["code"] == 7 && e["msg"].as_str().unwrap().contains("IPv6-only"),
        "{e}"
    );
    assert!(!link_exists(&ns2, "eth0"));
    assert!(cni(&lab, "DEL", "d1", &ns, &c).0);
    assert!(!link_exists(&ns, "eth0"));
}
