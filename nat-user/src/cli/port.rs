//! `bpfnat port NAME`, `port add / del / list`.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use anyhow::{Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde::Serialize;

use super::{Ctx, table, view::PortView};
use crate::{
    datapath::Maps,
    endpoints::resolve_ports,
    netlink::Netlink,
    node::{self, require_node},
    spec::{HostPort, PortMapping, PortRequest, PortSpec},
    state::{Container, State},
};

fn describe(r: &PortRequest) -> String {
    let ip = match r.host_ip {
        Some(IpAddr::V6(i)) => format!("[{i}]:"),
        Some(i) => format!("{i}:"),
        None => String::new(),
    };
    match r.host {
        HostPort::Exact(p) => format!("{ip}{p}:{}/{}", r.container_port, r.proto),
        HostPort::OneOf(a, b) => format!("{ip}{a}-{b}:{}/{}", r.container_port, r.proto),
        HostPort::Ephemeral => format!("{ip}?:{}/{}", r.container_port, r.proto),
    }
}

/// `bpfnat port`: a container's published ports (as `docker port NAME`), or a subcommand.
#[derive(Args, Debug)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  bpfnat port web            # web's published ports, as `docker port web`\n  bpfnat port add web 8443:443\n  bpfnat port del web 8443:443\n  bpfnat port list"
)]
pub struct PortArgs {
    #[command(subcommand)]
    cmd: Option<PortCmd>,
    /// A container's name, e.g. `web`: list its published ports.
    name: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum PortCmd {
    /// Publish ports of a running container.
    Add {
        /// The container's name, e.g. `web`.
        name: String,
        /// As `docker -p`: [HOST_IP:][HOST_PORT[-END]:]CONTAINER_PORT[-END][/tcp|/udp], e.g.
        /// `8080:80`, `127.0.0.1:5353:53/udp`, `[::]:8443:443`.
        spec: PortSpec,
    },
    /// Unpublish ports of a container.
    Del {
        /// The container's name, e.g. `web`.
        name: String,
        /// The mapping as it was published, e.g. `8080:80` (`80` removes every mapping of
        /// container port 80/tcp).
        spec: PortSpec,
    },
    /// List published ports, as the kernel has them: every container's, or one's.
    List {
        /// Only this container's, e.g. `web`.
        name: Option<String>,
    },
}

#[derive(Serialize)]
struct PortRow {
    container: String,
    host_ip: String,
    host_port: u16,
    container_ip: String,
    container_port: u16,
    proto: String,
    /// `published`: in the datapath as recorded; `unrecorded`: in the datapath, in no
    /// container's record; `missing`: recorded, not in the datapath; `differs`: in both,
    /// leading elsewhere than recorded.
    state: &'static str,
}

impl PortRow {
    fn new(container: &str, m: &PortMapping, target: IpAddr, state: &'static str) -> Self {
        Self {
            container: container.to_owned(),
            host_ip: m
                .host_ip
                .map_or_else(|| super::view::ALL_ADDRESSES.to_owned(), |i| i.to_string()),
            host_port: m.host_port,
            container_ip: target.to_string(),
            container_port: m.container_port,
            proto: m.proto.to_string(),
            state,
        }
    }
}

/// `ip:port`, with brackets around an IPv6 address (as `docker port` prints it).
fn socket(ip: &str, port: u16) -> String {
    ip.parse::<IpAddr>().map_or_else(
        |_| format!("{ip}:{port}"),
        |ip| SocketAddr::new(ip, port).to_string(),
    )
}

/// What the kernel publishes (the `ports` and `ports6` maps, one row per family), each row
/// checked against the state file.
fn port_rows(kernel: &[(PortMapping, IpAddr)], state: &State) -> Vec<PortRow> {
    let sides: Vec<(&str, PortMapping, IpAddr)> = state
        .containers
        .values()
        .flat_map(|c| {
            c.ports
                .iter()
                .flat_map(|m| c.sides(&m))
                .map(move |(m, ip)| (c.name.as_str(), m, ip))
        })
        .collect();
    let recorded: Vec<(&str, &PortMapping, IpAddr)> =
        sides.iter().map(|(n, m, ip)| (*n, m, *ip)).collect();
    let same_key = |a: &PortMapping, b: &PortMapping| {
        (a.host_ip, a.host_port, a.proto) == (b.host_ip, b.host_port, b.proto)
    };
    let mut rows: Vec<PortRow> = kernel
        .iter()
        .map(
            |(m, target)| match recorded.iter().find(|(_, r, _)| same_key(r, m)) {
                Some((name, r, ip)) if *ip == *target && r.container_port == m.container_port => {
                    PortRow::new(name, m, *target, "published")
                }
                Some((name, ..)) => PortRow::new(name, m, *target, "differs"),
                None => PortRow::new("?", m, *target, "unrecorded"),
            },
        )
        .collect();
    rows.extend(
        recorded
            .iter()
            .filter(|(_, r, _)| !kernel.iter().any(|(m, _)| same_key(m, r)))
            .map(|(name, r, ip)| PortRow::new(name, r, *ip, "missing")),
    );
    rows.sort_by(|a, b| (&a.container, a.host_port).cmp(&(&b.container, b.host_port)));
    rows
}

pub async fn run(ctx: &Ctx, args: PortArgs) -> Result<()> {
    let cmd = match (args.cmd, args.name) {
        (Some(cmd), _) => cmd,
        (None, Some(name)) => return list(ctx, &ctx.store()?.load()?, Some(&name), true),
        (None, None) => {
            bail!("name a container (`bpfnat port web`) or a subcommand (add, del, list)")
        }
    };
    let store = ctx.store()?;
    let mut state = store.load()?;
    match cmd {
        PortCmd::Add { name, spec } => {
            let node = require_node(&state)?.clone();
            if !state.containers.contains_key(&name) {
                bail!("no such container: {name}");
            }
            let mappings = resolve_ports(&state, std::slice::from_ref(&spec))?;
            let mut maps = Maps::open(&ctx.pins)?;
            // An address added to the node since `up` is a DNAT destination from now on.
            node::sync_node_addrs(&Netlink::current()?, &mut maps, &node).await?;
            let target = (state.containers[&name].ip, state.containers[&name].ip6);
            let generation = state.next_generation();
            state.generation = state.generation.wrapping_add(mappings.len() as u32);
            maps.put_ports(&mappings, target, generation)?;
            let done = mappings;
            let items = PortView::all(&state.containers[&name], &done);
            if let Some(c) = state.containers.get_mut(&name) {
                Arc::make_mut(c).ports.extend(done.iter().copied());
            }
            store.save(&state)?;
            ctx.emit_list("PortMappingList", &items, || {
                done.iter()
                    .map(|m| format!("{name}: published {m}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        PortCmd::Del { name, spec } => {
            let c = Arc::make_mut(
                state
                    .containers
                    .get_mut(&name)
                    .ok_or_else(|| anyhow!("no such container: {name}"))?,
            );
            let gone = to_unpublish(c, &spec)?;
            Maps::open(&ctx.pins)?.remove_ports(&gone)?;
            let items = PortView::all(c, &gone);
            let doomed: HashSet<PortMapping> = gone.iter().copied().collect();
            c.ports.retain(|p| !doomed.contains(p));
            store.save(&state)?;
            ctx.emit_list("PortMappingList", &items, || {
                gone.iter()
                    .map(|m| format!("{name}: unpublished {m}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        PortCmd::List { name } => list(ctx, &state, name.as_deref(), false),
    }
}

/// The mappings of `c` that `spec` takes away, one per request in the order asked: each the
/// first mapping (in publishing order) that the request matches and an earlier one did not
/// take. Indexed by what a request names besides the host port, so that a range of 50,000
/// is not 50,000 walks over the container's ports.
fn to_unpublish(c: &Container, spec: &PortSpec) -> Result<Vec<PortMapping>> {
    let mut left: HashMap<_, VecDeque<PortMapping>> = HashMap::new();
    for m in c.ports.iter() {
        left.entry((m.host_ip, m.container_port, m.proto))
            .or_default()
            .push_back(m);
    }
    let mut gone = Vec::with_capacity(spec.requests.len());
    for r in &spec.requests {
        let same = left.get_mut(&(r.host_ip, r.container_port, r.proto));
        let m = same
            .and_then(|l| {
                l.iter()
                    .position(|m| r.matches(m))
                    .and_then(|i| l.remove(i))
            })
            .ok_or_else(|| anyhow!("container {} does not publish {}", c.name, describe(r)))?;
        gone.push(m);
    }
    Ok(gone)
}

/// `port list [NAME]`; `docker_style`: `bpfnat port NAME`'s lines, as `docker port` prints.
fn list(ctx: &Ctx, state: &State, name: Option<&str>, docker_style: bool) -> Result<()> {
    if let Some(name) = name
        && !state.containers.contains_key(name)
    {
        bail!("no such container: {name}");
    }
    let kernel = Maps::open(&ctx.pins)?.published()?;
    let mut rows = port_rows(&kernel, state);
    if let Some(name) = name {
        rows.retain(|r| r.container == name);
    }
    for r in rows.iter().filter(|r| r.state != "published") {
        let what = match r.state {
            "unrecorded" => "is in the datapath, but no container records it",
            "missing" => "is recorded, but not in the datapath",
            _ => "leads elsewhere in the datapath than recorded",
        };
        eprintln!(
            "warning: {}:{}/{} ({}) {what}: the state file and the ports map disagree",
            r.host_ip, r.host_port, r.proto, r.container
        );
    }
    ctx.emit_list("PortList", &rows, || {
        if docker_style {
            return rows
                .iter()
                .map(|r| {
                    format!(
                        "{}/{} -> {}",
                        r.container_port,
                        r.proto,
                        socket(&r.host_ip, r.host_port)
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
        }
        table(
            &["CONTAINER", "HOST", "TARGET", "PROTO"],
            &rows
                .iter()
                .map(|r| {
                    vec![
                        r.container.clone(),
                        socket(&r.host_ip, r.host_port),
                        socket(&r.container_ip, r.container_port),
                        r.proto.clone(),
                    ]
                })
                .collect::<Vec<_>>(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(ports: &str) -> Container {
        serde_json::from_str(&format!(
            r#"{{"name":"c","ip":"10.88.0.2","mac":[2,66,10,88,0,2],"host_if":"bn-1",
            "host_ifindex":5,"host_mac":[2,0,0,0,0,1],"netns":"/run/netns/c",
            "owns_netns":true,"ports":{ports},"sysctls":[]}}"#
        ))
        .unwrap()
    }

    fn del(c: &Container, spec: &str) -> Result<Vec<String>> {
        let gone = to_unpublish(c, &spec.parse()?)?;
        Ok(gone.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn port_del_takes_the_first_match_of_each_request_in_publishing_order() {
        let c = container(
            r#"["10000-59999:10000-59999/tcp","8080:80/tcp","8081:80/tcp","127.0.0.1:9000:90/tcp"]"#,
        );
        // A whole range, one request per port.
        assert_eq!(del(&c, "10000-59999:10000-59999").unwrap().len(), 50_000);
        // Without a host port: the first mapping of the container port, then the next.
        assert_eq!(del(&c, "80").unwrap(), ["8080:80/tcp"]);
        assert_eq!(del(&c, "8081:80").unwrap(), ["8081:80/tcp"]);
        assert_eq!(
            del(&c, "127.0.0.1:9000:90").unwrap(),
            ["127.0.0.1:9000:90/tcp"]
        );
        // What the container does not publish, or not on that address or protocol.
        for spec in ["9000:90", "8080:80/udp", "8082:80", "60000:60000"] {
            let e = del(&c, spec).unwrap_err().to_string();
            assert!(e.contains("container c does not publish"), "{spec}: {e}");
        }
        // A request cannot take a mapping an earlier one of the same command took.
        let one = container(r#"["8080:80/tcp"]"#);
        let twice = PortSpec {
            requests: ["80", "80"]
                .iter()
                .flat_map(|s| s.parse::<PortSpec>().unwrap().requests)
                .collect(),
        };
        assert!(to_unpublish(&one, &twice).is_err());
    }
}
