//! `bpfnat map list` and `bpfnat map dump NAME`: the pinned maps, decoded, against what the
//! lab did to them.

use bpfnat_tests::{NODE_ADDR, add_container, fails_with, json, lab_up, udp_out};
use serde_json::Value;

fn mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

#[test]
fn maps_are_listed_and_dumped_decoded() {
    let lab = lab_up("maps");
    let c = add_container(&lab, "c", &["-p", "8080:80"]);
    udp_out(&lab, &c, &[42000], 7200);

    let list = json(&lab, &["map", "list"]);
    let entries = |name: &str| -> Value {
        list.as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed: {list:#?}"))["entries"]
            .clone()
    };
    assert_eq!(entries("endpoints"), 1);
    assert_eq!(entries("ports"), 1);
    assert_eq!(
        entries("conntrack_new"),
        2,
        "one connection, not assured yet"
    );
    assert!(
        entries("events").is_null(),
        "a ring buffer has no entries to count"
    );

    let ports = json(&lab, &["map", "dump", "ports"]);
    assert_eq!(ports.as_array().unwrap().len(), 1, "{ports:#?}");
    let p = &ports[0];
    assert_eq!(
        (
            &p["key"]["host_addr"],
            &p["key"]["host_port"],
            &p["key"]["proto"]
        ),
        (
            &Value::from("0.0.0.0"),
            &Value::from(8080),
            &Value::from("tcp")
        )
    );
    assert_eq!(p["value"]["addr"], c.ip.to_string());
    assert_eq!(p["value"]["port"], 80);

    let eps = json(&lab, &["map", "dump", "endpoints"]);
    assert_eq!(eps[0]["key"]["address"], c.ip.to_string());
    assert_eq!(eps[0]["value"]["mac"], mac(c.mac));
    assert_eq!(eps[0]["value"]["ifindex"], c.host_ifindex);
    assert_eq!(eps[0]["value"]["flags"], serde_json::json!(["container"]));

    let ct = json(&lab, &["map", "dump", "conntrack_new"]);
    let orig = ct
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["value"]["dir"] == "original")
        .unwrap_or_else(|| panic!("{ct:#?}"));
    assert_eq!(orig["key"]["proto"], "udp");
    assert_eq!(orig["key"]["src"], c.ip.to_string());
    assert_eq!(orig["key"]["sport"], 42000);
    assert_eq!(orig["value"]["origin"], "masquerade");
    assert_eq!(orig["value"]["xlate"]["src"], NODE_ADDR.to_string());
    assert_eq!(orig["value"]["ifindex"], c.host_ifindex);
    assert_eq!(orig["value"]["packets"], 1);

    let stats = json(&lab, &["map", "dump", "stats"]);
    let snat = stats
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["key"]["reason"] == "snat_new")
        .unwrap();
    assert_eq!(snat["value"]["packets"], 1);

    // Text: one line per entry, fields by name.
    let text = lab.ok(&["map", "dump", "ports"]).unwrap();
    assert!(
        text.contains("host_addr=0.0.0.0 host_port=8080 proto=tcp =>"),
        "{text}"
    );

    fails_with(
        &lab,
        &["map", "dump", "nosuch"],
        "the pinned maps are config",
    );
    fails_with(&lab, &["map", "dump", "scratch"], "not pinned");
    fails_with(&lab, &["map", "dump", "events"], "bpfnat monitor");
}

#[test]
fn a_conntrack_table_larger_than_a_read_batch_is_read_whole() {
    let lab = lab_up("ctbig");
    // 6,000 connections are 12,000 entries: the loader reads them in three batches.
    bpfnat_tests::fill_conntrack(&lab.bpffs_dir, 6_000).unwrap();
    let s = json(&lab, &["conntrack", "stats"]);
    assert_eq!(
        (&s["entries"], &s["connections"], &s["orphans"]),
        (&Value::from(12_000), &Value::from(6_000), &Value::from(0)),
        "{s:#}"
    );
    assert_eq!(
        json(&lab, &["conntrack", "list"]).as_array().unwrap().len(),
        6_000
    );
    let dumped = json(&lab, &["map", "dump", "conntrack"]);
    assert_eq!(dumped.as_array().unwrap().len(), 12_000);
    assert!(
        dumped[11_999]["key"]["src"].is_string(),
        "decoded: {:#}",
        dumped[11_999]
    );
    assert_eq!(json(&lab, &["conntrack", "flush"])["connections"], 6_000);
    assert_eq!(json(&lab, &["conntrack", "stats"])["entries"], 0);
}
