//! `bpfnat container add / del / list / inspect`: arguments and output; the work is
//! `endpoints`'s.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use anyhow::{Result, anyhow};
use clap::Subcommand;

use super::{
    Ctx, table,
    view::{ContainerView, PortView},
};
use crate::{
    endpoints::{AddRequest, Added, create, destroy},
    net::fmt_mac,
    spec::PortSpec,
};

#[derive(Subcommand, Debug)]
pub enum ContainerCmd {
    /// Create a container network: namespace, veth pair, address, routes, datapath hooks.
    #[command(
        after_help = "Examples:\n  bpfnat container add web -p 8080:80\n  bpfnat container add db --ip 10.88.0.10 -p 127.0.0.1:5432:5432 --sysctl net.ipv4.ip_unprivileged_port_start=0"
    )]
    Add {
        /// The container's name, e.g. `web`: also its namespace, /run/netns/web (1-64 of A-Z
        /// a-z 0-9 - _ .).
        name: String,
        /// Address in the node's subnet, e.g. `10.88.0.10` (default: the lowest free one).
        #[arg(long)]
        ip: Option<Ipv4Addr>,
        /// IPv6 address in the node's IPv6 subnet, e.g. `fd00:88::10` (default: the lowest
        /// free one; only on a node brought up with `--subnet6`).
        #[arg(long)]
        ip6: Option<Ipv6Addr>,
        /// Publish a port, as `docker -p`: [HOST_IP:][HOST_PORT[-END]:]CONTAINER_PORT[-END][/tcp|/udp],
        /// e.g. `8080:80` (both families), `127.0.0.1:5353:53/udp`, `[::]:8080:80` (IPv6 only),
        /// `8000-8010:80`.
        #[arg(short = 'p', long = "publish", value_name = "SPEC")]
        publish: Vec<PortSpec>,
        /// A per-namespace sysctl set before the container's interfaces come up (net.*),
        /// e.g. `net.ipv4.ip_unprivileged_port_start=0`.
        #[arg(long = "sysctl", value_name = "KEY=VALUE")]
        sysctl: Vec<String>,
        /// Use this existing network namespace (a runtime's) instead of creating one, e.g.
        /// `/run/netns/pod1`.
        #[arg(long, value_name = "PATH")]
        netns: Option<PathBuf>,
    },
    /// Remove a container's network (and its namespace, if bpfnat created it).
    Del {
        /// The container's name, e.g. `web`.
        name: String,
    },
    /// List containers.
    List,
    /// Everything bpfnat knows about one container (as `docker inspect`).
    Inspect {
        /// The container's name, e.g. `web`.
        name: String,
    },
}

pub async fn run(ctx: &Ctx, cmd: ContainerCmd) -> Result<()> {
    match cmd {
        ContainerCmd::Add {
            name,
            ip,
            ip6,
            publish,
            sysctl,
            netns,
        } => add(ctx, name, (ip, ip6), publish, sysctl, netns).await,
        ContainerCmd::Del { name } => del(ctx, &name).await,
        ContainerCmd::List => list(ctx),
        ContainerCmd::Inspect { name } => inspect(ctx, &name),
    }
}

async fn add(
    ctx: &Ctx,
    name: String,
    (ip, ip6): (Option<Ipv4Addr>, Option<Ipv6Addr>),
    publish: Vec<PortSpec>,
    sysctl: Vec<String>,
    netns_path: Option<PathBuf>,
) -> Result<()> {
    let Added { container: c, .. } = create(
        ctx,
        AddRequest {
            name,
            ip,
            ip6,
            ports: publish,
            sysctls: sysctl,
            netns: netns_path,
            ifname: "eth0".to_owned(),
            cni: None,
        },
    )
    .await?;
    ctx.emit("Container", &ContainerView::of(&c), || {
        let mut s = format!(
            "container {} added: {} ({}) on {}, netns {}",
            c.name,
            addresses(c.ip, c.ip6),
            fmt_mac(&c.mac),
            c.host_if,
            c.netns.display()
        );
        for p in c.ports.iter() {
            s.push_str(&format!("\n  published {p}"));
        }
        s
    })
}

async fn del(ctx: &Ctx, name: &str) -> Result<()> {
    let c = destroy(ctx, name)
        .await?
        .ok_or_else(|| anyhow!("no such container: {name}"))?;
    ctx.emit("Container", &ContainerView::of(&c), || {
        format!("container {name} removed")
    })
}

fn list(ctx: &Ctx) -> Result<()> {
    let state = ctx.store()?.load()?;
    let rows: Vec<ContainerView> = state
        .containers
        .values()
        .map(|c| ContainerView::of(c))
        .collect();
    ctx.emit_list("ContainerList", &rows, || {
        table(
            &["NAME", "IP", "MAC", "HOST-IF", "NETNS", "PORTS"],
            &rows
                .iter()
                .map(|r| {
                    vec![
                        if r.pending {
                            format!("{} (unfinished)", r.name)
                        } else {
                            r.name.clone()
                        },
                        addresses(r.ip, r.ip6),
                        r.mac.clone(),
                        r.host_if.clone(),
                        r.netns.clone(),
                        r.ports.iter().map(port_text).collect::<Vec<_>>().join(","),
                    ]
                })
                .collect::<Vec<_>>(),
        )
    })
}

/// A container's addresses, IPv4 first, space-separated.
fn addresses(ip: Option<Ipv4Addr>, ip6: Option<Ipv6Addr>) -> String {
    let ip = ip.map(IpAddr::from);
    let ip6 = ip6.map(IpAddr::from);
    ip.into_iter()
        .chain(ip6)
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

fn port_text(p: &PortView) -> String {
    let host = if p.host_ip.contains(':') {
        format!("[{}]", p.host_ip)
    } else {
        p.host_ip.clone()
    };
    format!("{host}:{}:{}/{}", p.host_port, p.container_port, p.proto)
}

fn inspect(ctx: &Ctx, name: &str) -> Result<()> {
    let state = ctx.store()?.load()?;
    let c = state
        .containers
        .get(name)
        .ok_or_else(|| anyhow!("no such container: {name}"))?;
    let v = ContainerView::of(c);
    ctx.emit("Container", &v, || {
        let mut t = format!(
            "name:       {}\naddress:    {} ({} {})\nhost side:  {} ({}, ifindex {})\nnetns:      {}{}",
            v.name,
            addresses(v.ip, v.ip6),
            v.ifname,
            v.mac,
            v.host_if,
            v.host_mac,
            v.host_ifindex,
            v.netns,
            if v.owns_netns { " (created by bpfnat)" } else { "" }
        );
        if let Some(cni) = &v.cni {
            t.push_str(&format!(
                "\ncni:        container {} on network {}",
                cni.container_id, cni.network
            ));
        }
        for p in &v.ports {
            t.push_str(&format!("\nport:       {}", port_text(p)));
        }
        for (k, val) in &v.sysctls {
            t.push_str(&format!("\nsysctl:     {k}={val}"));
        }
        t
    })
}
