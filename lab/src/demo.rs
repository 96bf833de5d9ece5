//! The scenario of `bpfnat demo`: a self-contained lab that shows the datapath at work, then
//! removes itself. It drives the bpfnat binary it is given as child processes.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use anyhow::{Result, bail};
use nat_plumbing::say;

use crate::{EXT_ADDR, Lab, NODE_ADDR, UPLINK, traffic};

fn step(lab: &Lab, args: &[&str]) -> Result<String> {
    say!("$ bpfnat {}", args.join(" "))?;
    let out = lab.ok(args)?;
    for line in out.lines() {
        say!("  {line}")?;
    }
    Ok(out)
}

/// Run the demo with the bpfnat binary `exe`.
pub fn run(exe: &Path) -> Result<()> {
    let started = std::time::Instant::now();
    // Per process, so that two demos at once do not tear down each other's lab.
    let prefix = format!("bpfnat-demo-{}", std::process::id());
    say!(
        "== building the lab: namespaces {prefix}-ext (external host {EXT_ADDR}) and {prefix}-node (node, uplink {UPLINK} {NODE_ADDR})"
    )?;
    let lab = Lab::new(&prefix, exe)?;
    let web = lab.name("web");
    let client = lab.name("client");

    say!("\n== datapath up, two containers, one published port")?;
    step(&lab, &["up", "--uplink", UPLINK])?;
    step(
        &lab,
        &[
            "container",
            "add",
            &web,
            "--ip",
            "10.88.0.2",
            "-p",
            "8080:80",
        ],
    )?;
    step(&lab, &["container", "add", &client, "--ip", "10.88.0.3"])?;

    let web_ip = Ipv4Addr::new(10, 88, 0, 2);
    let any80 = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 80));
    let srv = traffic::http_server(
        &lab.container_ns(&web),
        any80,
        "web",
        2,
        Duration::from_secs(15),
    )?;

    say!("\n== F3: the external host fetches http://{NODE_ADDR}:8080/ (published to web:80)")?;
    let body = traffic::http_get(&lab.ext, SocketAddr::V4(SocketAddrV4::new(NODE_ADDR, 8080)))?;
    say!("  fetched {} bytes: {}", body.len(), body.trim())?;

    say!(
        "\n== F1: container client fetches http://{web_ip}:80/ directly (eBPF bridge forwarding)"
    )?;
    let body = traffic::http_get(
        &lab.container_ns(&client),
        SocketAddr::V4(SocketAddrV4::new(web_ip, 80)),
    )?;
    say!("  fetched {} bytes: {}", body.len(), body.trim())?;
    let _ = srv.join();

    say!("\n== F2: container client connects to the external host {EXT_ADDR}:9000 (MASQUERADE)")?;
    let ext_srv = traffic::http_server(
        &lab.ext,
        SocketAddr::V4(SocketAddrV4::new(EXT_ADDR, 9000)),
        "the external host",
        1,
        Duration::from_secs(15),
    )?;
    let body = traffic::http_get(
        &lab.container_ns(&client),
        SocketAddr::V4(SocketAddrV4::new(EXT_ADDR, 9000)),
    )?;
    say!("  fetched: {}", body.trim())?;
    let seen = ext_srv.join().unwrap_or_default();
    match seen.first() {
        Some(peer) if peer.ip() == std::net::IpAddr::V4(NODE_ADDR) => {
            say!(
                "  the external host saw the connection come from {peer}: the node's address, not 10.88.0.3"
            )?;
        }
        other => bail!("the external host saw {other:?}, expected the node address {NODE_ADDR}"),
    }

    say!("\n== what the datapath tracked and counted")?;
    step(&lab, &["conntrack", "list"])?;
    let stats = lab.ok(&["stats"])?;
    say!("$ bpfnat stats   (non-zero rows)")?;
    for line in stats.lines().filter(|l| {
        l.starts_with("REASON") || l.split_whitespace().nth(1).is_some_and(|p| p != "0")
    }) {
        say!("  {line}")?;
    }

    say!("\n== tearing down")?;
    step(&lab, &["down"])?;
    drop(lab);
    say!(
        "\ndemo finished in {:.1}s; every namespace, link and pin it made is gone",
        started.elapsed().as_secs_f64()
    )?;
    Ok(())
}
