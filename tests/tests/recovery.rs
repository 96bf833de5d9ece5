//! Commands that were killed half way and state that was lost: the next command converges,
//! and `down` removes everything bpfnat made, recognised by its names, pins and aliases.

use std::{path::Path, process::Stdio, time::Instant};

use bpfnat_tests::{Lab, json, lab_up, run_in_ns};

/// What bpfnat made for containers that still exists: host veths in the node's namespace
/// (their tc filters go with them), any pinned link of a container veth (there should be
/// none: containers have filters), and the named namespaces of `names`.
fn leftovers(lab: &Lab, names: &[&str]) -> Vec<String> {
    let (ok, links) = run_in_ns(&lab.node, "ip", &["-o", "link", "show"]);
    assert!(ok, "ip link");
    let mut left: Vec<String> = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with("bn-") && !n.starts_with("bn-gw"))
        .collect();
    left.extend(
        bpfnat_tests::pins(lab)
            .linked_interfaces()
            .into_iter()
            .filter(|n| n.starts_with("bn-") && !n.starts_with("bn-gw"))
            .map(|n| format!("pin {n}")),
    );
    left.extend(
        names
            .iter()
            .filter(|n| Path::new("/run/netns").join(n).exists())
            .map(|n| format!("netns {n}")),
    );
    left
}

fn listed(lab: &Lab) -> Vec<serde_json::Value> {
    json(lab, &["container", "list"])
        .as_array()
        .expect("container array")
        .clone()
}

#[test]
fn a_killed_container_add_is_finished_or_undone_by_the_next_command() {
    let lab = lab_up("killadd");
    let name = lab.name("k");
    let add = ["container", "add", name.as_str(), "-p", "8086:86"];
    // How long an add takes here, so that the kills below land inside one.
    let t = Instant::now();
    lab.ok(&add).unwrap();
    let took = t.elapsed();
    lab.ok(&["container", "del", &name]).unwrap();

    let mut interrupted = 0;
    for i in 0..12u32 {
        let mut child = lab
            .bpfnat(&add)
            .unwrap()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(took * i / 10);
        let _ = child.kill();
        let _ = child.wait();
        let l = listed(&lab);
        let finished = l.len() == 1 && l[0].get("pending").is_none();
        if !finished && (!l.is_empty() || !leftovers(&lab, &[&name]).is_empty()) {
            interrupted += 1;
        }
        if i % 2 == 0 && !finished {
            lab.ok(&add)
                .unwrap_or_else(|e| panic!("retry after a kill at step {i}: {e:#}"));
            let l = listed(&lab);
            assert_eq!(l.len(), 1);
            assert!(l[0].get("pending").is_none(), "finished: {l:?}");
            assert_eq!(json(&lab, &["port", "list"]).as_array().unwrap().len(), 1);
            lab.ok(&["container", "del", &name]).unwrap();
        } else {
            let out = lab.run(&["container", "del", &name]).unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() || err.contains("no such container"),
                "del after a kill at step {i}: {err}"
            );
        }
        assert!(listed(&lab).is_empty(), "step {i}");
        assert!(json(&lab, &["port", "list"]).as_array().unwrap().is_empty());
        assert_eq!(leftovers(&lab, &[&name]), Vec::<String>::new(), "step {i}");
    }
    assert!(
        interrupted >= 2,
        "the kills landed inside an add {interrupted} time(s): the test proved nothing"
    );
}

#[test]
fn down_after_the_state_file_was_lost_removes_what_bpfnat_made() {
    let lab = lab_up("lostst");
    let (a, b) = (lab.name("a"), lab.name("b"));
    lab.ok(&["container", "add", &a, "-p", "8087:87"]).unwrap();
    lab.ok(&["container", "add", &b]).unwrap();
    // A runtime's namespace: bpfnat wires it but must never delete it.
    let runtime = lab.name("rt");
    let rt_path = nat_plumbing::netns::create(&runtime).unwrap();
    lab.ok(&[
        "container",
        "add",
        &lab.name("r"),
        "--netns",
        rt_path.to_str().unwrap(),
    ])
    .unwrap();
    assert_eq!(
        leftovers(&lab, &[&a, &b]).len(),
        3 + 2,
        "three veths, two namespaces"
    );

    std::fs::remove_file(lab.state_dir.join("state.json")).unwrap();
    lab.ok(&["down"]).unwrap();

    assert_eq!(leftovers(&lab, &[&a, &b]), Vec::<String>::new());
    assert!(
        rt_path.exists(),
        "the runtime's namespace is not bpfnat's to remove"
    );
    assert!(!bpfnat_tests::pins(&lab).root().exists(), "no pins left");
    // And the node can come up again from scratch.
    lab.ok(&["up", "--uplink", bpfnat_tests::UPLINK]).unwrap();
    lab.ok(&["container", "add", &a]).unwrap();
}

#[test]
fn state_left_by_a_node_namespace_that_is_gone_is_cleared_by_the_next_up() {
    let lab = lab_up("newns");
    let a = lab.name("a");
    lab.ok(&["container", "add", &a, "-p", "8088:88"]).unwrap();
    // The node's namespace made again: a fresh one with the same uplink, under the same state
    // and pin directories (the recorded cookie and ifindexes are another namespace's).
    let node2 = nat_plumbing::netns::create(&lab.name("node2")).unwrap();
    for args in [
        &[
            "link", "add", "uplink0", "type", "veth", "peer", "name", "far0",
        ][..],
        &["addr", "add", "198.51.100.2/24", "dev", "uplink0"],
        &["link", "set", "uplink0", "up"],
        &["link", "set", "far0", "up"],
    ] {
        assert!(run_in_ns(&node2, "ip", args).0, "ip {args:?}");
    }
    let in_node2 = |args: &[&str]| {
        let mut cmd = std::process::Command::new(bpfnat_tests::bin());
        cmd.arg("--bpffs-dir")
            .arg(&lab.bpffs_dir)
            .arg("--state-dir")
            .arg(&lab.state_dir)
            .args(args);
        nat_plumbing::netns::command_in(&mut cmd, &node2).unwrap();
        cmd.output().unwrap()
    };
    let up = in_node2(&["up", "--uplink", "uplink0"]);
    let err = String::from_utf8_lossy(&up.stderr);
    assert!(up.status.success(), "up in the new namespace: {err}");
    assert!(err.contains("starting fresh"), "says so: {err}");
    assert!(
        !Path::new("/run/netns").join(&a).exists(),
        "the old node's container namespace is removed"
    );
    let add = in_node2(&["container", "add", &lab.name("b"), "-p", "8088:88"]);
    assert!(
        add.status.success(),
        "container add on the new node: {}",
        String::from_utf8_lossy(&add.stderr)
    );
    let down = in_node2(&["down"]);
    assert!(down.status.success());
    assert!(!bpfnat_tests::pins(&lab).root().exists(), "no pins left");
}

/// The system calls of `bpfnat ARGS` that write the state directory, as `strace -y` shows
/// them (file descriptors with their paths).
fn state_syscalls(lab: &Lab, args: &[&str]) -> Vec<String> {
    let trace = lab.state_dir.join("strace.out");
    let mut cmd = std::process::Command::new("strace");
    cmd.args([
        "-f",
        "-qq",
        "-y",
        "-e",
        "trace=write,fsync,fdatasync,rename,renameat,renameat2",
        "-o",
    ])
    .arg(&trace)
    .arg(bpfnat_tests::bin())
    .arg("--bpffs-dir")
    .arg(&lab.bpffs_dir)
    .arg("--state-dir")
    .arg(&lab.state_dir)
    .args(args);
    nat_plumbing::netns::command_in(&mut cmd, &lab.node).unwrap();
    let out = cmd
        .output()
        .expect("run strace (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = std::fs::read_to_string(&trace).unwrap();
    std::fs::remove_file(&trace).unwrap();
    let dir = lab.state_dir.display().to_string();
    calls
        .lines()
        .filter(|l| l.contains(&dir))
        .map(str::to_owned)
        .collect()
}

/// The record survives a crash or power loss. A snapshot (here, of a static NAT change) is
/// written to a temporary file that is synced, renamed over `state.json`, and the directory
/// is synced after the rename; a container's change is a line appended to `state.journal`
/// with one write, and the finished record is synced before the command returns.
#[test]
fn the_state_file_is_replaced_atomically_and_durably() {
    let lab = lab_up("durable");
    let dir = lab.state_dir.display().to_string();
    let c = lab.name("c");
    lab.ok(&["container", "add", &c]).unwrap();

    let lines = state_syscalls(
        &lab,
        &[
            "nat",
            "add",
            "--external",
            "203.0.113.10",
            "--internal",
            "10.88.0.2",
        ],
    );
    let calls = lines.join("\n");
    let state = format!("{dir}/state.json\"");
    let renames: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].contains("rename") && lines[i].contains(&state))
        .collect();
    assert!(!renames.is_empty(), "no rename onto state.json:\n{calls}");
    for i in renames {
        // The source of the rename: the first quoted path of the call.
        let src = lines[i].split('"').nth(1).unwrap();
        assert!(
            lines[..i]
                .iter()
                .any(|l| l.contains("fsync(") && l.contains(&format!("<{src}>"))),
            "{src} is synced before it replaces state.json:\n{calls}"
        );
        assert!(
            lines[i + 1..]
                .iter()
                .any(|l| l.contains("fsync(") && l.contains(&format!("<{dir}>"))),
            "{dir} is synced after the rename:\n{calls}"
        );
    }

    let lines = state_syscalls(&lab, &["container", "add", &lab.name("d")]);
    let calls = lines.join("\n");
    let journal = format!("<{dir}/state.journal>");
    let appends: Vec<usize> = (0..lines.len())
        .filter(|&i| {
            lines[i].starts_with(|c: char| c.is_ascii_digit())
                && lines[i].contains(" write(")
                && lines[i].contains(&journal)
        })
        .collect();
    assert_eq!(
        appends.len(),
        2,
        "the intent and the finished record, a write each:\n{calls}"
    );
    // The intent is not waited onto the disk (what it guards does not outlive a power loss
    // either); the finished record is, and with it the intent.
    let last = appends[1];
    assert!(
        lines[last + 1..]
            .first()
            .is_some_and(|l| l.contains("fdatasync(") && l.contains(&journal)),
        "the journal is synced right after the finished record:\n{calls}"
    );
    assert!(
        !calls.contains(&state),
        "a container add does not rewrite the snapshot:\n{calls}"
    );
    // And what was written is what the next command reads.
    let list = lab.ok(&["container", "list"]).unwrap();
    assert!(list.contains(&lab.name("d")) && list.contains(&c), "{list}");
}

/// The record's node, as `state.json` has it (a node's changes are always in the snapshot).
fn recorded_node(lab: &Lab) -> serde_json::Value {
    let text = std::fs::read_to_string(lab.state_dir.join("state.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["node"].clone()
}

/// Set (or with `None` remove) the recorded node's boot ID.
fn record_boot_id(lab: &Lab, id: Option<&str>) {
    let path = lab.state_dir.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let node = state["node"].as_object_mut().unwrap();
    match id {
        Some(id) => node.insert("boot_id".into(), id.into()),
        None => node.remove("boot_id"),
    };
    std::fs::write(&path, state.to_string()).unwrap();
}

#[test]
fn a_record_that_outlived_a_reboot_is_cleared_by_the_next_up() {
    let lab = lab_up("reboot");
    let a = lab.name("a");
    lab.ok(&["container", "add", &a, "-p", "8089:89"]).unwrap();
    let this_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(recorded_node(&lab)["boot_id"], this_boot.trim());

    // The control: `up` again in the same boot keeps the node and its container, and a
    // record of an earlier version (no boot ID) is kept and learns this boot's.
    record_boot_id(&lab, None);
    let up = lab.run(&["up", "--uplink", bpfnat_tests::UPLINK]).unwrap();
    let err = String::from_utf8_lossy(&up.stderr);
    assert!(
        up.status.success() && !err.contains("starting fresh"),
        "{err}"
    );
    assert_eq!(listed(&lab).len(), 1, "the container is still recorded");
    assert_eq!(recorded_node(&lab)["boot_id"], this_boot.trim());

    // A reboot with the state dir on disk: bpffs comes back empty, the container's namespace
    // file stays without its mount (and the namespace goes, its veths with it), the node's
    // gateway interface is gone; the host's namespace has the same cookie as before.
    std::fs::remove_dir_all(&lab.bpffs_dir).unwrap();
    let ns_file = Path::new("/run/netns").join(&a);
    let umount = std::process::Command::new("umount")
        .arg("--lazy")
        .arg(&ns_file)
        .status()
        .unwrap();
    assert!(umount.success(), "umount {}", ns_file.display());
    assert!(run_in_ns(&lab.node, "ip", &["link", "del", "bn-gw"]).0);
    record_boot_id(&lab, Some("00000000-0000-4000-8000-000000000000"));
    let status = lab.run(&["status"]).unwrap();
    let said = String::from_utf8_lossy(&status.stdout);
    assert_eq!(status.status.code(), Some(1), "degraded: {said}");
    assert!(said.contains("earlier boot"), "{said}");

    let up = lab.run(&["up", "--uplink", bpfnat_tests::UPLINK]).unwrap();
    let err = String::from_utf8_lossy(&up.stderr);
    assert!(up.status.success(), "up after the reboot: {err}");
    assert!(
        err.contains("earlier boot") && err.contains("starting fresh"),
        "says so: {err}"
    );
    assert_eq!(listed(&lab), Vec::<serde_json::Value>::new(), "forgotten");
    assert!(!ns_file.exists(), "the namespace file it left is removed");
    assert_eq!(recorded_node(&lab)["boot_id"], this_boot.trim());
    // The name, its address and its port are free again, and the new datapath works.
    lab.ok(&["container", "add", &a, "-p", "8089:89"]).unwrap();
    assert_eq!(listed(&lab)[0]["ip"], "10.88.0.2");
    let srv = bpfnat_tests::traffic::http_server(
        &lab.ext,
        bpfnat_tests::v4(bpfnat_tests::EXT_ADDR, 9000),
        "ext",
        1,
        std::time::Duration::from_secs(10),
    )
    .unwrap();
    let seen = bpfnat_tests::traffic::http_get(
        &lab.container_ns(&a),
        bpfnat_tests::v4(bpfnat_tests::EXT_ADDR, 9000),
    )
    .unwrap();
    srv.join().unwrap();
    assert!(
        seen.contains(&bpfnat_tests::NODE_ADDR.to_string()),
        "masqueraded as the node: {seen}"
    );
}
