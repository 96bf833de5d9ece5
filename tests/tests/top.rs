//! `bpfnat top` and `conntrack stats --by container`: the connections, entries and
//! MASQUERADE ports each container holds, attributed to the container that made them.

use bpfnat_tests::{add_container, json, lab_up, udp_out};

#[test]
fn top_attributes_entries_and_ports_to_the_containers_that_made_them() {
    let lab = lab_up("top");
    let a = add_container(&lab, "a", &[]);
    let b = add_container(&lab, "b", &[]);
    let _idle = add_container(&lab, "idle", &[]);
    // a: three connections (three source ports); b: one.
    udp_out(&lab, &a, &[41001, 41002, 41003], 7100);
    udp_out(&lab, &b, &[41001], 7100);

    let rows = json(&lab, &["top"]);
    let rows = rows.as_array().unwrap();
    assert_eq!(
        rows.len(),
        2,
        "a container without connections holds nothing: {rows:#?}"
    );
    let (ra, rb) = (&rows[0], &rows[1]);
    assert_eq!(ra["container"], lab.name("a").as_str(), "largest first");
    assert_eq!(rb["container"], lab.name("b").as_str());
    assert_eq!(
        (ra["connections"].as_u64(), ra["entries"].as_u64()),
        (Some(3), Some(6))
    );
    assert_eq!(
        (rb["connections"].as_u64(), rb["entries"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(ra["snat_ports"]["udp"], 3);
    assert_eq!(rb["snat_ports"]["udp"], 1);
    assert_eq!(ra["snat_ports"]["tcp"], 0);
    assert_eq!(ra["share_percent"], 75.0);
    assert_eq!(rb["share_percent"], 25.0);
    assert!(ra["port_range_percent"].as_f64().unwrap() > 0.0);

    // The same rows from `conntrack stats --by container`, and the text has them too.
    assert_eq!(
        json(&lab, &["conntrack", "stats", "--by", "container"]),
        json(&lab, &["top"])
    );
    let text = lab.ok(&["top"]).unwrap();
    let line_a = text
        .lines()
        .find(|l| l.starts_with(&lab.name("a")))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line_a.contains("75.0%") && line_a.contains("0/3/0"),
        "{text}"
    );
}
