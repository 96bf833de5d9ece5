//! `bpfnat agent`: the long-running node agent. It brings the datapath up (or adopts the one
//! that is pinned), removes endpoints whose namespace is gone, follows the uplink's address,
//! garbage-collects conntrack, and serves Prometheus metrics and `/healthz`. It never tears
//! the datapath down: programs, links and maps are pinned, so killing, restarting or upgrading
//! the agent drops no connection.

mod cluster;
mod metrics;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use futures::StreamExt as _;
use rtnetlink::{MulticastGroup, packet_core::NetlinkPayload, packet_route::RouteNetlinkMessage};
use serde::Deserialize;
use tracing::{info, warn};

use crate::{
    cluster::{ClusterConfig, follow::ClusterMetrics},
    datapath::Maps,
    endpoints,
    env::Env,
    net::{Cidr, Cidr6},
    netlink::Netlink,
    node::{self, NodeSpec, XdpChoice},
    state,
};

/// `--config FILE` (JSON).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// The uplink; with it the agent brings the datapath up when it is not.
    #[serde(default)]
    pub uplink: Option<String>,
    #[serde(default)]
    pub subnet: Option<String>,
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default, rename = "snatIP")]
    pub snat_ip: Option<Ipv4Addr>,
    /// An IPv6 container subnet beside the IPv4 one (`up --subnet6`).
    #[serde(default)]
    pub subnet6: Option<String>,
    #[serde(default)]
    pub gateway6: Option<std::net::Ipv6Addr>,
    /// The IPv6 MASQUERADE source (`up --snat-ip6`).
    #[serde(default, rename = "snatIP6")]
    pub snat_ip6: Option<std::net::Ipv6Addr>,
    /// Where `/metrics` and `/healthz` are served.
    #[serde(default = "default_metrics")]
    pub metrics_addr: SocketAddr,
    /// Seconds between conntrack garbage collections.
    #[serde(default = "default_gc")]
    pub gc_interval_secs: u64,
    /// Install this binary as the CNI plugin `bpfnat` here (e.g. /opt/cni/bin).
    #[serde(default)]
    pub cni_bin_dir: Option<std::path::PathBuf>,
    /// Write the CNI network configuration `10-bpfnat.conflist` here (e.g. /etc/cni/net.d).
    #[serde(default)]
    pub cni_conf_dir: Option<std::path::PathBuf>,
    /// The uplink's XDP fast path: "auto" (default), "native", "generic" or "off", as
    /// `bpfnat up --xdp`.
    #[serde(default)]
    pub xdp: XdpChoice,
    /// Many nodes: the pod subnet is a block of the cluster CIDR leased in a datastore.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
}

fn default_metrics() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9967))
}

const fn default_gc() -> u64 {
    30
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            uplink: None,
            subnet: None,
            gateway: None,
            snat_ip: None,
            subnet6: None,
            gateway6: None,
            snat_ip6: None,
            metrics_addr: default_metrics(),
            gc_interval_secs: default_gc(),
            cni_bin_dir: None,
            cni_conf_dir: None,
            xdp: XdpChoice::Auto,
            cluster: None,
        }
    }
}

pub fn load_config(path: Option<&Path>) -> Result<AgentConfig> {
    let Some(path) = path else {
        return Ok(AgentConfig::default());
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let cfg: AgentConfig = serde_json::from_str(&text)
        .with_context(|| format!("parse agent configuration {}", path.display()))?;
    if cfg.cluster.is_some() && cfg.subnet.is_some() {
        bail!(
            "{}: \"subnet\" and \"cluster\" exclude each other: a cluster node's subnet is the block it leases from cluster.clusterCidr",
            path.display()
        );
    }
    Ok(cfg)
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
}

pub async fn run(ctx: &Env, mut cfg: AgentConfig) -> Result<()> {
    init_logs();
    let joined = match &cfg.cluster {
        Some(c) => {
            let (cluster, j) =
                cluster::join(c, &hostname(), async || uplink_address(&cfg).await).await?;
            cfg.subnet = Some(j.record()?.block);
            Some((cluster, j))
        }
        None => None,
    };
    let started = match bring_up(ctx, &cfg).await {
        Ok(()) => check_subnet(ctx, &cfg),
        Err(e) => Err(e),
    };
    if let Err(e) = started {
        // The block is not used after all: give it back now rather than at the TTL.
        if let Some((_, j)) = joined {
            j.leave().await;
        }
        return Err(e);
    }
    let cluster_metrics = joined.as_ref().map(|_| ClusterMetrics::default());
    let in_cluster = match joined {
        Some((cluster, j)) => Some(cluster::run(
            ctx,
            cluster,
            j,
            cfg.uplink.clone().unwrap_or_default(),
            cluster_metrics.clone().unwrap_or_default(),
        )?),
        None => None,
    };
    let served = serve(ctx, &cfg, cluster_metrics.as_ref(), in_cluster.as_ref()).await;
    if let Some(c) = in_cluster {
        c.stop().await;
    }
    info!("agent stopping; the datapath stays pinned and keeps forwarding");
    served
}

/// The agent's work until SIGTERM or Ctrl-C: the CNI files, the reconciler, the uplink's
/// address (also for the cluster, when in one), `/metrics`, conntrack garbage collection.
async fn serve(
    ctx: &Env,
    cfg: &AgentConfig,
    cluster_metrics: Option<&ClusterMetrics>,
    in_cluster: Option<&cluster::Running>,
) -> Result<()> {
    install_cni(ctx, cfg)?;
    reconcile(ctx).await?;
    follow_uplink(ctx).await?;

    let listener = tokio::net::TcpListener::bind(cfg.metrics_addr)
        .await
        .with_context(|| format!("listen on {}", cfg.metrics_addr))?;
    info!(addr = %cfg.metrics_addr, "serving /metrics and /healthz");
    let (registry, gc_metrics) = metrics::registry(ctx, cluster_metrics);
    let app = metrics::router(ctx.clone(), registry);
    let http = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "the metrics server stopped");
        }
    });
    let gc = tokio::spawn(gc_loop(
        ctx.clone(),
        Duration::from_secs(cfg.gc_interval_secs.max(1)),
        gc_metrics,
    ));

    let (mut events, watch_conn) = address_events()?;
    tokio::spawn(watch_conn);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            ev = events.next() => {
                if ev.is_none() {
                    bail!("the rtnetlink event stream ended");
                }
                if let Err(e) = follow_uplink(ctx).await {
                    warn!(error = %format!("{e:#}"), "following the uplink address failed");
                }
                if let Some(c) = in_cluster
                    && let Ok(address) = uplink_address(cfg).await
                {
                    c.uplink_address(address);
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    http.abort();
    gc.abort();
    Ok(())
}

/// The uplink's IPv4 address, which other nodes route this node's block to.
async fn uplink_address(cfg: &AgentConfig) -> Result<Ipv4Addr> {
    let uplink = cfg
        .uplink
        .as_deref()
        .context("a cluster node needs \"uplink\" in its configuration")?;
    let nl = Netlink::current()?;
    let link = nl
        .link(uplink)
        .await?
        .with_context(|| format!("uplink {uplink} not found"))?;
    nl.ipv4_addrs(link.index)
        .await?
        .first()
        .map(|(ip, _)| *ip)
        .with_context(|| {
            format!("uplink {uplink} has no IPv4 address for the other nodes to route to")
        })
}

/// The UTS hostname (the default node name).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// A datapath adopted from before must use the block the cluster gave this node.
fn check_subnet(ctx: &Env, cfg: &AgentConfig) -> Result<()> {
    let Some(want) = cfg.subnet.as_deref().filter(|_| cfg.cluster.is_some()) else {
        return Ok(());
    };
    let state = ctx.store()?.load()?;
    if let Some(n) = &state.node {
        let have = n.v4.as_ref().map(|v| v.cidr().to_string());
        if have.as_deref() != Some(want) {
            let have = have.unwrap_or_else(|| "none (IPv6-only)".to_owned());
            bail!(
                "this node's datapath uses subnet {have}, but its cluster block is {want}: run `bpfnat down` to start it over on the block"
            );
        }
    }
    Ok(())
}

/// Garbage-collect conntrack every `every`, off the event loop: a walk of a large table takes
/// a while. Each pass leaves the summary the metrics report.
async fn gc_loop(ctx: Env, every: Duration, m: metrics::GcMetrics) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let pins = ctx.pins.clone();
        let pass = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let mut maps = Maps::open(&pins)?;
            let deleted = maps.ct_gc()?;
            let took = started.elapsed();
            Ok::<_, anyhow::Error>((deleted, took, maps.ct_summary()?))
        })
        .await;
        match pass {
            Ok(Ok((deleted, took, summary))) => {
                if deleted > 0 {
                    info!(connections = deleted, "conntrack gc");
                }
                m.record(deleted, took, summary);
            }
            Ok(Err(e)) => {
                m.failed();
                warn!(error = %format!("{e:#}"), "conntrack gc failed");
            }
            Err(e) => {
                m.failed();
                warn!(error = %e, "conntrack gc task failed");
            }
        }
    }
}

async fn bring_up(ctx: &Env, cfg: &AgentConfig) -> Result<()> {
    {
        let store = ctx.store()?;
        let mut state = store.load()?;
        node::forget_stale_node(ctx, &store, &mut state)?;
        if state.node.is_some() && ctx.pins.installed() {
            info!("adopting the pinned datapath");
            return Ok(());
        }
    }
    let Some(uplink) = cfg.uplink.clone() else {
        bail!("the datapath is not up and the agent configuration names no \"uplink\"");
    };
    let mut spec = NodeSpec::new(uplink);
    if let Some(subnet) = cfg.subnet.as_deref() {
        spec.subnet = Some(subnet.parse::<Cidr>()?);
    }
    spec.gateway = cfg.gateway;
    spec.snat_ip = cfg.snat_ip;
    spec.xdp = cfg.xdp;
    if let Some(s) = cfg.subnet6.as_deref() {
        spec.subnet6 = Some(s.parse::<Cidr6>()?);
    }
    spec.gateway6 = cfg.gateway6;
    spec.snat_ip6 = cfg.snat_ip6;
    endpoints::up(ctx, spec).await?;
    info!("datapath up");
    Ok(())
}

/// Where distributions install the reference CNI plugins (`loopback` among them).
const CNI_PLUGIN_DIRS: [&str; 3] = ["/opt/cni/bin", "/usr/lib/cni", "/usr/libexec/cni"];

/// containerd sets up a pod's `lo` with the `loopback` plugin from the CNI bin directory and
/// fails every pod without it: copy the node's own when the directory lacks it, or warn.
fn install_loopback(dir: &Path) -> Result<()> {
    let path = dir.join("loopback");
    if path.exists() {
        return Ok(());
    }
    let found = CNI_PLUGIN_DIRS
        .iter()
        .map(|d| Path::new(d).join("loopback"))
        .find(|p| p.is_file() && p != &path);
    match found {
        Some(src) => {
            let bytes = std::fs::read(&src).with_context(|| format!("read {}", src.display()))?;
            state::write_durably(&path, &bytes, 0o755)?;
            info!(from = %src.display(), path = %path.display(), "installed the loopback CNI plugin");
        }
        None => warn!(
            path = %path.display(),
            "no loopback CNI plugin here or in {}: containerd needs it to start pods (install the reference CNI plugins, e.g. Debian's containernetworking-plugins)",
            CNI_PLUGIN_DIRS.join(", ")
        ),
    }
    Ok(())
}

/// Install the CNI plugin (this very binary) and a network configuration matching the
/// running datapath.
fn install_cni(ctx: &Env, cfg: &AgentConfig) -> Result<()> {
    if let Some(dir) = &cfg.cni_bin_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let me = std::env::current_exe().context("find this binary")?;
        let bytes = std::fs::read(&me).with_context(|| format!("read {}", me.display()))?;
        let path = dir.join("bpfnat");
        state::write_durably(&path, &bytes, 0o755)?;
        info!(path = %path.display(), "installed the CNI plugin");
        install_loopback(dir)?;
    }
    if let Some(dir) = &cfg.cni_conf_dir {
        let state = ctx.store()?.load()?;
        let node = state.node.context("the datapath is not up")?;
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        // 1.1.0: libcni sends GC and STATUS only to networks of that version.
        let mut conf = serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "bpfnat",
            "plugins": [{
                "type": "bpfnat",
                "uplink": node.uplink,
                "bpffsDir": ctx.bpffs_dir,
                "stateDir": ctx.state_dir,
                "capabilities": {"portMappings": true}
            }]
        });
        if let Some(v4) = &node.v4 {
            conf["plugins"][0]["subnet"] = v4.cidr().to_string().into();
        }
        if let Some(v6) = &node.v6 {
            // Dual-stack: an address of each family per pod.
            conf["plugins"][0]["subnet6"] = v6.cidr().to_string().into();
            conf["plugins"][0]["gateway6"] = v6.gateway.to_string().into();
        }
        let path = dir.join("10-bpfnat.conflist");
        state::write_durably(
            &path,
            serde_json::to_string_pretty(&conf)?.as_bytes(),
            0o644,
        )?;
        info!(path = %path.display(), "installed the CNI network configuration");
    }
    Ok(())
}

/// Remove endpoints whose namespace no longer exists (a sandbox deleted while we were away).
async fn reconcile(ctx: &Env) -> Result<()> {
    let state = ctx.store()?.load()?;
    let gone: Vec<String> = state
        .containers
        .values()
        .filter(|c| !c.netns.exists())
        .map(|c| c.name.clone())
        .collect();
    drop(state);
    for name in gone {
        endpoints::destroy(ctx, &name).await?;
        info!(container = %name, "removed: its network namespace is gone");
    }
    Ok(())
}

type Events = futures::channel::mpsc::UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// Address change notifications (only that something changed; `follow_uplink` re-reads).
fn address_events() -> Result<(impl futures::Stream<Item = ()>, impl Future<Output = ()>)> {
    let (conn, _handle, messages): (_, _, Events) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
    ])
    .context("subscribe to address changes")?;
    let events = messages.filter_map(|(m, _)| async move {
        match m.payload {
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewAddress(_) | RouteNetlinkMessage::DelAddress(_),
            ) => Some(()),
            _ => None,
        }
    });
    Ok((Box::pin(events), conn))
}

/// Make the datapath use the uplink's current addresses (MASQUERADE over both families,
/// unless `--snat-ip`/`--snat-ip6` fixed them, and host access to published ports).
async fn follow_uplink(ctx: &Env) -> Result<()> {
    let store = ctx.store()?;
    let mut state = store.load()?;
    let static_nat = !state.static_nat.is_empty();
    let Some(node) = state.node.as_mut() else {
        return Ok(());
    };
    let nl = Netlink::current()?;
    node::sync_node_addrs(&nl, &mut Maps::open(&ctx.pins)?, node).await?;
    let mut changed = false;
    if let Some(v6) = node.v6.as_mut()
        && v6.snat_from_uplink
    {
        let addr = nl
            .global_ipv6_addrs(node.uplink_ifindex)
            .await?
            .first()
            .copied();
        if addr != v6.snat {
            info!(uplink = %node.uplink, old = ?v6.snat, new = ?addr, "uplink IPv6 address changed");
            v6.snat = addr;
            changed = true;
        }
    }
    if let Some(v4) = node.v4.as_mut() {
        match nl
            .ipv4_addrs(node.uplink_ifindex)
            .await?
            .first()
            .map(|(a, _)| *a)
        {
            None => warn!(uplink = %node.uplink, "the uplink has no IPv4 address"),
            Some(addr) if addr != v4.node_addr || (v4.snat_from_uplink && addr != v4.snat_ip) => {
                info!(uplink = %node.uplink, old = %v4.node_addr, new = %addr, "uplink address changed");
                v4.node_addr = addr;
                if v4.snat_from_uplink {
                    v4.snat_ip = addr;
                }
                changed = true;
            }
            Some(_) => {}
        }
    }
    if !changed {
        return Ok(());
    }
    Maps::open(&ctx.pins)?.set_config(&node::config_of(node, static_nat))?;
    store.save(&state)
}
