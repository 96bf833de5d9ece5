//! What scripts and people read: the `-o json` schema, `docker port`-style listings,
//! `container inspect`, help with examples, shell completions and manual pages.

use std::process::Command;

use bpfnat_tests::{EXT_ADDR, Lab, bin, json, lab_up, ping};
use serde_json::Value;

/// `bpfnat -o json ARGS`, the whole document (envelope included).
fn document(lab: &Lab, args: &[&str]) -> Value {
    let mut a = vec!["-o", "json"];
    a.extend_from_slice(args);
    let out = lab.ok(&a).unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: bad JSON ({e}): {out}"))
}

fn is_mac(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        s.len() == 17
            && s.split(':')
                .all(|b| b.len() == 2 && u8::from_str_radix(b, 16).is_ok())
    })
}

#[test]
fn json_output_follows_the_documented_schema() {
    let lab = lab_up("schema");
    let web = lab.name("web");
    let added = document(
        &lab,
        &[
            "container",
            "add",
            &web,
            "-p",
            "8080:80",
            "-p",
            "127.0.0.1:8081:81",
        ],
    );
    assert_eq!(added["kind"], "Container", "{added}");
    lab.ok(&[
        "nat",
        "add",
        "--external",
        "203.0.113.10",
        "--internal",
        "10.88.0.9",
    ])
    .unwrap();
    assert!(
        ping(&lab.container_ns(&web), EXT_ADDR),
        "a tracked connection"
    );

    let mut kinds = Vec::new();
    for args in [
        &["status"][..],
        &["up", "--uplink", bpfnat_tests::UPLINK],
        &["container", "list"],
        &["container", "inspect", &web],
        &["port", "list"],
        &["port", &web],
        &["nat", "list"],
        &["conntrack", "list"],
        &["conntrack", "stats"],
        &["stats"],
    ] {
        let d = document(&lab, args);
        assert_eq!(d["apiVersion"], "bpfnat/v1", "{args:?}: {d}");
        let kind = d["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("{args:?}: no kind: {d}"));
        if kind.ends_with("List") {
            assert!(d["items"].is_array(), "{args:?}: {d}");
        }
        // Nothing internal, no placeholder standing for "none".
        let text = d.to_string();
        for internal in [
            "host_port_min",
            "gateway_ifindex",
            "netns_cookie",
            "prefix_len",
            "mac_str",
        ] {
            assert!(
                !text.contains(internal),
                "{args:?} shows {internal}: {text}"
            );
        }
        kinds.push(kind.to_owned());
    }
    assert_eq!(
        kinds,
        [
            "Status",
            "Node",
            "ContainerList",
            "Container",
            "PortList",
            "PortList",
            "StaticNatList",
            "ConnectionList",
            "ConntrackStats",
            "CounterList"
        ]
    );

    let node = &json(&lab, &["status"])["node"];
    assert_eq!(
        node["subnet"], "10.88.0.0/16",
        "a subnet is CIDR text: {node}"
    );
    assert!(is_mac(&node["uplink_mac"]), "{node}");
    assert_eq!(node["port_range"]["min"], 1024);
    assert!(
        node.get("avoided_host_ports").is_none(),
        "no avoided range: {node}"
    );

    // Every column of the text listing, addresses and MACs as strings, and every address
    // of the node spelled 0.0.0.0.
    let c = &json(&lab, &["container", "list"])[0];
    for column in ["name", "ip", "mac", "host_if", "netns", "ports"] {
        assert!(c.get(column).is_some(), "{column}: {c}");
    }
    assert!(is_mac(&c["mac"]) && is_mac(&c["host_mac"]), "{c}");
    assert_eq!(c["ip"], "10.88.0.2");
    let hosts: Vec<&str> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["host_ip"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["0.0.0.0", "127.0.0.1"]);
    let ports = json(&lab, &["port", "list"]);
    assert_eq!(ports[0]["host_ip"], "0.0.0.0", "{ports}");
    let nat = &json(&lab, &["nat", "list"])[0];
    assert_eq!(nat["internal"], "10.88.0.9");
    assert!(
        nat.get("container").is_some(),
        "the text's CONTAINER column: {nat}"
    );

    // The demo has no JSON to give, and says so.
    let out = Command::new(bin())
        .args(["-o", "json", "demo"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no JSON output"));
}

#[test]
fn docker_style_port_listing_and_inspect() {
    let lab = lab_up("dport");
    let web = lab.name("web");
    lab.ok(&[
        "container",
        "add",
        &web,
        "-p",
        "8080:80",
        "-p",
        "127.0.0.1:5353:53/udp",
    ])
    .unwrap();
    lab.ok(&["container", "add", &lab.name("other"), "-p", "9090:90"])
        .unwrap();
    // As `docker port web`.
    let lines: Vec<String> = lab
        .ok(&["port", &web])
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        lines,
        ["53/udp -> 127.0.0.1:5353", "80/tcp -> 0.0.0.0:8080"]
    );
    let only = json(&lab, &["port", "list", &web]);
    assert_eq!(only.as_array().unwrap().len(), 2, "{only}");
    assert!(lab.run(&["port", "nosuch"]).unwrap().status.code() == Some(1));

    let text = lab.ok(&["container", "inspect", &web]).unwrap();
    assert!(
        text.contains("10.88.0.2") && text.contains("0.0.0.0:8080:80/tcp"),
        "{text}"
    );
    let v = json(&lab, &["container", "inspect", &web]);
    assert_eq!(v["name"], web.as_str());
    assert_eq!(v["ports"].as_array().unwrap().len(), 2);
    assert_eq!(v["owns_netns"], true);
}

#[test]
fn help_has_examples_and_completions_and_manual_pages_are_generated() {
    let help = |args: &[&str]| {
        let out = Command::new(bin())
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The description of `arg` in a long help text: from its entry to the blank line after.
    let entry = |text: &str, arg: &str| -> String {
        let start = text
            .lines()
            .position(|l| {
                let l = l.trim_start();
                l.starts_with(arg) || l.starts_with(&format!("-p, {arg}"))
            })
            .unwrap_or_else(|| panic!("{arg} in:\n{text}"));
        text.lines()
            .skip(start)
            .take_while(|l| !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let add = help(&["container", "add"]);
    for arg in [
        "<NAME>",
        "--publish <SPEC>",
        "--netns <PATH>",
        "--sysctl <KEY=VALUE>",
        "--ip <IP>",
    ] {
        let e = entry(&add, arg);
        assert!(e.contains("e.g."), "{arg} has an example: {e}");
    }
    let nat = help(&["nat", "add"]);
    for arg in ["--external", "--internal"] {
        let e = entry(&nat, arg);
        assert!(e.contains("e.g."), "{arg} has an example: {e}");
    }
    let port = help(&["port", "add"]);
    for arg in ["<NAME>", "<SPEC>"] {
        let e = entry(&port, arg);
        assert!(e.contains("e.g."), "{arg} has an example: {e}");
    }

    let completion = |shell: &str| {
        let out = Command::new(bin())
            .args(["completion", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "completion {shell}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let bash = completion("bash");
    assert!(
        bash.contains("_bpfnat") && bash.contains("conntrack"),
        "{bash}"
    );
    assert!(completion("zsh").starts_with("#compdef bpfnat"));
    assert!(completion("fish").contains("complete -c bpfnat"));

    let dir = std::env::temp_dir().join(format!("bpfnat-man-{}", std::process::id()));
    let out = Command::new(bin()).arg("man").arg(&dir).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = std::fs::read_to_string(dir.join("bpfnat.1")).unwrap();
    assert!(page.contains(".TH bpfnat"), "{page}");
    let add = std::fs::read_to_string(dir.join("bpfnat-container-add.1")).unwrap();
    assert!(add.contains("publish"), "{add}");
    assert!(!dir.join("bpfnat-help.1").exists(), "no page for `help`");
    std::fs::remove_dir_all(&dir).unwrap();
}
