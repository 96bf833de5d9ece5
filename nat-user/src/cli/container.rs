//! `bpfnat container add / del / list`: arguments and output; the work is `endpoints`'s.

use std::{net::Ipv4Addr, path::PathBuf};

use anyhow::{Result, anyhow};
use clap::Subcommand;
use serde::Serialize;

use super::{Ctx, table};
use crate::{
    endpoints::{AddRequest, create, destroy},
    net::fmt_mac,
    spec::PortSpec,
    state::Container,
};

#[derive(Subcommand, Debug)]
pub enum ContainerCmd {
    /// Create a container network: namespace, veth pair, address, routes, datapath hooks.
    Add {
        name: String,
        /// Address in the node's subnet (default: the lowest free one).
        #[arg(long)]
        ip: Option<Ipv4Addr>,
        /// Publish a port: [HOST_IP:]HOST_PORT[-END]:CONTAINER_PORT[-END][/tcp|/udp].
        #[arg(short = 'p', long = "publish")]
        publish: Vec<PortSpec>,
        /// A per-namespace sysctl set before the container's interfaces come up (net.*).
        #[arg(long = "sysctl", value_name = "KEY=VALUE")]
        sysctl: Vec<String>,
        /// Use this existing network namespace (a runtime's) instead of creating one.
        #[arg(long)]
        netns: Option<PathBuf>,
    },
    /// Remove a container's network (and its namespace, if bpfnat created it).
    Del { name: String },
    /// List containers.
    List,
}

pub async fn run(ctx: &Ctx, cmd: ContainerCmd) -> Result<()> {
    match cmd {
        ContainerCmd::Add {
            name,
            ip,
            publish,
            sysctl,
            netns,
        } => add(ctx, name, ip, publish, sysctl, netns).await,
        ContainerCmd::Del { name } => del(ctx, &name).await,
        ContainerCmd::List => list(ctx),
    }
}

async fn add(
    ctx: &Ctx,
    name: String,
    ip: Option<Ipv4Addr>,
    publish: Vec<PortSpec>,
    sysctl: Vec<String>,
    netns_path: Option<PathBuf>,
) -> Result<()> {
    let c = create(
        ctx,
        AddRequest {
            name,
            ip,
            ports: publish,
            sysctls: sysctl,
            netns: netns_path,
            ifname: "eth0".to_owned(),
            cni: None,
        },
    )
    .await?;
    ctx.emit(&c, || {
        let mut s = format!(
            "container {} added: {} ({}) on {}, netns {}",
            c.name,
            c.ip,
            fmt_mac(&c.mac),
            c.host_if,
            c.netns.display()
        );
        for p in &c.ports {
            s.push_str(&format!("\n  published {p}"));
        }
        s
    })
}

async fn del(ctx: &Ctx, name: &str) -> Result<()> {
    let c = destroy(ctx, name)
        .await?
        .ok_or_else(|| anyhow!("no such container: {name}"))?;
    ctx.emit(&c, || format!("container {name} removed"))
}

#[derive(Serialize)]
struct Row<'a> {
    #[serde(flatten)]
    c: &'a Container,
    mac_str: String,
}

fn list(ctx: &Ctx) -> Result<()> {
    let store = ctx.store()?;
    let state = store.load()?;
    let rows: Vec<Row<'_>> = state
        .containers
        .values()
        .map(|c| Row {
            c,
            mac_str: fmt_mac(&c.mac),
        })
        .collect();
    ctx.emit(&rows, || {
        table(
            &["NAME", "IP", "MAC", "HOST-IF", "NETNS", "PORTS"],
            &rows
                .iter()
                .map(|r| {
                    vec![
                        r.c.name.clone(),
                        r.c.ip.to_string(),
                        r.mac_str.clone(),
                        r.c.host_if.clone(),
                        r.c.netns.display().to_string(),
                        r.c.ports
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                    ]
                })
                .collect::<Vec<_>>(),
        )
    })
}
