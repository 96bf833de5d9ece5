//! Support for bpfnat's end-to-end tests: every test builds its own lab (namespaces with a
//! test-unique prefix, its own bpffs and state directories) through [`lab`], and the lab
//! removes everything when dropped, also when the test fails.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

pub use bpfnat_lab::{EXT_ADDR, FAR_ADDR, Lab, NODE_ADDR, ROUTER_ADDR, UPLINK, traffic};
use nat_plumbing::netns;

pub mod kube_api;
pub mod monitor;
pub mod packet;
pub mod wire;

/// The bpfnat binary under test: `$BPFNAT_BIN` (set by `cargo xtask test`) or the one cargo
/// built next to this test executable.
#[must_use]
pub fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BPFNAT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/bpfnat
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("bpfnat"))
        .expect("target directory")
}

/// Where bpfnat pins the programs, maps and links of `lab`.
#[must_use]
pub fn pins(lab: &Lab) -> bpfnat::datapath::Pins {
    bpfnat::datapath::Pins::new(&lab.bpffs_dir)
}

/// A fresh lab named after the test.
#[must_use]
pub fn lab(test: &str) -> Lab {
    Lab::new(&format!("bnt-{test}"), &bin()).expect("build the lab")
}

/// A lab with the datapath up.
#[must_use]
pub fn lab_up(test: &str) -> Lab {
    let l = lab(test);
    l.ok(&["up", "--uplink", UPLINK]).expect("bpfnat up");
    l
}

#[must_use]
pub fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// `bpfnat -o json ARGS` in the lab's node, parsed, checked against the schema's envelope
/// (`apiVersion`, `kind`): a list's `items`, or the object.
#[must_use]
pub fn json(lab: &Lab, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["-o", "json"];
    a.extend_from_slice(args);
    let out = lab.ok(&a).expect("bpfnat json command");
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("bpfnat {args:?} printed bad JSON ({e}): {out}"));
    unwrap_envelope(v, args)
}

/// The body of a `-o json` document: its `items` when it is a list.
#[must_use]
pub fn unwrap_envelope(v: serde_json::Value, args: &[&str]) -> serde_json::Value {
    assert_eq!(v["apiVersion"], "bpfnat/v1", "bpfnat {args:?}: {v}");
    let kind = v["kind"]
        .as_str()
        .unwrap_or_else(|| panic!("bpfnat {args:?}: no kind in {v}"));
    if kind.ends_with("List") {
        v["items"].clone()
    } else {
        v
    }
}

/// `bpfnat -o json status`: its exit code (0 up, 1 degraded, 3 down) and its report.
#[must_use]
pub fn status(lab: &Lab) -> (i32, serde_json::Value) {
    let out = lab
        .run(&["-o", "json", "status"])
        .expect("run bpfnat status");
    let text = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("bpfnat status printed bad JSON ({e}): {text}"));
    (
        out.status.code().expect("exit code"),
        unwrap_envelope(v, &["status"]),
    )
}

/// One ping from namespace `ns` to `dst`; true when a reply came back.
#[must_use]
pub fn ping(ns: &Path, dst: Ipv4Addr) -> bool {
    let mut c = Command::new("ping");
    c.args(["-c", "1", "-W", "2", &dst.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    netns::command_in(&mut c, ns).expect("enter namespace");
    c.status().is_ok_and(|s| s.success())
}

/// Run `cmd ARGS` inside namespace `ns`; returns (success, stdout).
#[must_use]
pub fn run_in_ns(ns: &Path, cmd: &str, args: &[&str]) -> (bool, String) {
    let mut c = Command::new(cmd);
    c.args(args).stderr(Stdio::null());
    netns::command_in(&mut c, ns).expect("enter namespace");
    let out = c.output().expect("run command");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Whether interface `name` exists in namespace `ns`.
#[must_use]
pub fn link_exists(ns: &Path, name: &str) -> bool {
    let mut c = Command::new("ip");
    c.args(["link", "show", "dev", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    netns::command_in(&mut c, ns).expect("enter namespace");
    c.status().is_ok_and(|s| s.success())
}

/// Whether a datagram sent from namespace `ns` on a UDP socket connected to `dst` is
/// refused: the ICMP "port unreachable" reached the socket, which happens only when the error
/// quotes the packet exactly as the socket sent it.
#[must_use]
pub fn udp_refused(ns: &Path, dst: SocketAddr) -> bool {
    let any: std::net::IpAddr = if dst.is_ipv6() {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let r = netns::run_in(ns, move || {
        let s = std::net::UdpSocket::bind(SocketAddr::new(any, 0))?;
        s.connect(dst)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
        s.send(b"anyone?")?;
        let mut buf = [0u8; 64];
        Ok(s.recv(&mut buf))
    })
    .expect("UDP probe");
    matches!(r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// A container `short` at `internal` with the static NAT mapping `external` ↔ `internal`;
/// returns its namespace.
#[must_use]
pub fn static_container(lab: &Lab, short: &str, internal: &str, external: &str) -> PathBuf {
    let c = lab.name(short);
    lab.ok(&["container", "add", &c, "--ip", internal])
        .expect("container add");
    lab.ok(&["nat", "add", "--external", external, "--internal", internal])
        .expect("nat add");
    lab.container_ns(&c)
}

/// Names in directory `dir` that start with `prefix` (leftover checks).
#[must_use]
pub fn entries_with_prefix(dir: &str, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// The counter `reason` from `bpfnat -o json stats`.
#[must_use]
pub fn counter(lab: &Lab, reason: &str) -> u64 {
    json(lab, &["stats"])
        .as_array()
        .expect("stats array")
        .iter()
        .find(|s| s["reason"] == reason)
        .and_then(|s| s["packets"].as_u64())
        .unwrap_or_else(|| panic!("no counter {reason}"))
}

/// Tracked connections from `bpfnat -o json conntrack list`.
#[must_use]
pub fn flows(lab: &Lab) -> Vec<serde_json::Value> {
    json(lab, &["conntrack", "list"])
        .as_array()
        .expect("flow array")
        .clone()
}

/// A container as the tests need to address it.
pub struct ContainerInfo {
    pub ns: PathBuf,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    /// The host veth's MAC: the gateway's, as the container sees it.
    pub host_mac: [u8; 6],
    pub host_ifindex: u32,
}

/// `bpfnat container add <lab>-short ARGS` and what `container list` says about it.
#[must_use]
pub fn add_container(lab: &Lab, short: &str, args: &[&str]) -> ContainerInfo {
    let name = lab.name(short);
    let mut a = vec!["container", "add", name.as_str()];
    a.extend_from_slice(args);
    lab.ok(&a).expect("container add");
    let list = json(lab, &["container", "list"]);
    let c = list
        .as_array()
        .expect("container array")
        .iter()
        .find(|c| c["name"] == name)
        .expect("the new container is listed")
        .clone();
    let mac = |k: &str| mac_of(&c[k]);
    ContainerInfo {
        ns: lab.container_ns(&name),
        ip: c["ip"].as_str().expect("ip").parse().expect("IPv4"),
        mac: mac("mac"),
        host_mac: mac("host_mac"),
        host_ifindex: c["host_ifindex"].as_u64().expect("ifindex") as u32,
    }
}

/// The node's uplink MAC, from `bpfnat status`.
#[must_use]
pub fn uplink_mac(lab: &Lab) -> [u8; 6] {
    mac_of(&json(lab, &["status"])["node"]["uplink_mac"])
}

/// A MAC address as bpfnat's JSON prints it (`"02:42:0a:58:00:02"`).
fn mac_of(v: &serde_json::Value) -> [u8; 6] {
    let v: Vec<u8> = v
        .as_str()
        .expect("MAC string")
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("MAC byte"))
        .collect();
    v.try_into().expect("6-byte MAC")
}

/// Fill the `conntrack` table pinned under `bpffs_dir` with `connections` live, assured UDP
/// connections between outside hosts (both entries each): a large table for tests and the
/// benchmark, without the traffic it would take to make one.
pub fn fill_conntrack(bpffs_dir: &Path, connections: u32) -> anyhow::Result<()> {
    use aya::maps::{HashMap, Map, MapData};
    use nat_common::{CtEntry4, CtKey4, CtMeta, DIR_ORIGINAL, DIR_REPLY, PROTO_UDP, dgram_state};
    let pin = bpfnat::datapath::Pins::new(bpffs_dir).map(nat_common::map_names::CONNTRACK);
    let mut ct: HashMap<_, CtKey4, CtEntry4> =
        Map::from_map_data(MapData::from_pin(&pin)?)?.try_into()?;
    let now = bpfnat::datapath::ct_now_ns();
    for i in 0..connections {
        let [_, hi, b, a] = i.to_be_bytes();
        let k = CtKey4::new(
            [203, 0, 113, a],
            [192, 0, 2, b],
            (40000 + u16::from(hi)).to_be_bytes(),
            53u16.to_be_bytes(),
            PROTO_UDP,
        );
        let meta = CtMeta {
            dir: DIR_ORIGINAL,
            state: dgram_state::REPLIED,
            created_ns: now,
            last_seen_ns: now,
            assured: 1,
            ..CtMeta::default()
        };
        let r = k.reversed();
        ct.insert(k, CtEntry4 { xlate: k, meta }, 0)?;
        let meta = CtMeta {
            dir: DIR_REPLY,
            ..meta
        };
        ct.insert(r, CtEntry4 { xlate: r, meta }, 0)?;
    }
    Ok(())
}

/// `ip ARGS` in namespace `ns`, which must succeed.
pub fn ip_in(ns: &Path, args: &[&str]) {
    let mut c = Command::new("ip");
    c.args(args);
    netns::command_in(&mut c, ns).expect("enter namespace");
    let out = c.output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The node's IPv6 address on the uplink's link (`uplink_v6`, `routed_v6`).
pub const NODE6: &str = "2001:db8:1::1";
/// The outside host's on a plain lab (`uplink_v6`); the router's on a routed one.
pub const EXT6: &str = "2001:db8:1::2";
/// The far host's on a routed lab (`routed_v6`).
pub const FAR6: &str = "2001:db8:2::2";

/// IPv6 on a plain lab: the uplink's link gets 2001:db8:1::/64, the node `NODE6`, the
/// outside host `EXT6`.
pub fn uplink_v6(lab: &Lab) {
    ip_in(
        &lab.node,
        &[
            "-6",
            "addr",
            "add",
            &format!("{NODE6}/64"),
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
            &format!("{EXT6}/64"),
            "dev",
            "eth0",
            "nodad",
        ],
    );
}

/// A lab with IPv6 on the uplink's link (`uplink_v6`), up with the IPv6 subnet
/// `fd00:88::/64` beside the IPv4 one.
#[must_use]
pub fn lab_up6(test: &str) -> Lab {
    let lab = lab(test);
    uplink_v6(&lab);
    lab.ok(&["up", "--uplink", UPLINK, "--subnet6", "fd00:88::/64"])
        .expect("up --subnet6");
    lab
}

/// IPv6 on a routed lab (`Lab::with_router`): node `NODE6` ── `EXT6` router 2001:db8:2::1
/// ── `FAR6`, with default routes both ways and the router forwarding.
pub fn routed_v6(lab: &Lab) {
    let router = lab.router.as_ref().expect("a routed lab");
    ip_in(
        &lab.node,
        &[
            "-6",
            "addr",
            "add",
            &format!("{NODE6}/64"),
            "dev",
            UPLINK,
            "nodad",
        ],
    );
    ip_in(&lab.node, &["-6", "route", "add", "default", "via", EXT6]);
    ip_in(
        router,
        &[
            "-6",
            "addr",
            "add",
            &format!("{EXT6}/64"),
            "dev",
            "eth0",
            "nodad",
        ],
    );
    ip_in(
        router,
        &[
            "-6",
            "addr",
            "add",
            "2001:db8:2::1/64",
            "dev",
            "eth1",
            "nodad",
        ],
    );
    netns::set_sysctl(router, "net.ipv6.conf.all.forwarding", "1").expect("router forwarding");
    ip_in(
        &lab.ext,
        &[
            "-6",
            "addr",
            "add",
            &format!("{FAR6}/64"),
            "dev",
            "eth0",
            "nodad",
        ],
    );
    ip_in(
        &lab.ext,
        &["-6", "route", "add", "default", "via", "2001:db8:2::1"],
    );
}

/// What a program did with a frame under BPF_PROG_TEST_RUN.
pub struct Ran {
    pub action: u32,
    pub out: Vec<u8>,
}

/// Run the pinned TC program `prog` once on `frame`, as if it arrived on interface
/// `ifindex`, from the lab's node namespace (so FIB lookups see the lab's routes).
#[must_use]
pub fn test_run(lab: &Lab, prog: &str, ifindex: u32, frame: Vec<u8>) -> Ran {
    use aya::{TestRun as _, TestRunOptions, programs::SchedClassifier};
    let pin = pins(lab).prog(prog);
    netns::run_in(&lab.node, move || {
        let p = SchedClassifier::from_pin(&pin)?;
        // struct __sk_buff: only `ifindex` (offset 40) set; the kernel takes skb->dev from it.
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 64];
        let r = p.test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok(Ran {
            action: r.return_value,
            out,
        })
    })
    .expect("BPF_PROG_TEST_RUN")
}

/// Run `bpfnat ARGS` in the lab, which must fail saying `needle`.
pub fn fails_with(lab: &Lab, args: &[&str], needle: &str) {
    let out = lab.run(args).expect("run bpfnat");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "bpfnat {args:?} should fail");
    assert!(
        err.contains(needle),
        "bpfnat {args:?}: stderr {err:?} lacks {needle:?}"
    );
}

/// UDP datagrams from container `c`, one from each of `sports`, to an echo server on the
/// lab's outside host at `port`, each answered: the sources the server saw.
pub fn udp_out(lab: &Lab, c: &ContainerInfo, sports: &[u16], port: u16) -> Vec<SocketAddr> {
    let window = std::time::Duration::from_secs(3);
    let echo = traffic::udp_echo(
        &lab.ext,
        v4(Ipv4Addr::UNSPECIFIED, port),
        sports.len(),
        window,
    )
    .expect("echo server");
    std::thread::sleep(std::time::Duration::from_millis(100));
    for s in sports {
        let answer = traffic::udp_ask(&c.ns, v4(c.ip, *s), v4(EXT_ADDR, port), b"x").expect("ask");
        assert!(answer.ends_with('x'), "{answer}");
    }
    echo.join().expect("echo server")
}
