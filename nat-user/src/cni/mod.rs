//! The CNI plugin (spec 0.4.0, 1.0.0, 1.1.0): the `bpfnat` binary acts as one when
//! `CNI_COMMAND` is set (install it, or a link to it, as `/opt/cni/bin/bpfnat`). ADD wires the
//! sandbox's namespace like `bpfnat container add --netns`, bringing the datapath up from the
//! network configuration if it is not; DEL is idempotent; CHECK, STATUS, GC and VERSION as the
//! spec says. `runtimeConfig.portMappings` (the `portMappings` capability) publishes
//! Kubernetes `hostPort`s. Errors are CNI error objects on stdout with a non-zero exit.

use std::{
    io::Read as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::Result;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    datapath,
    endpoints::{self, AddRequest, Added},
    env::{DEFAULT_BPFFS_DIR, DEFAULT_STATE_DIR, Env},
    net::{Cidr, Cidr6, fmt_mac},
    netlink::Netlink,
    netns,
    node::{self, NodeSpec},
    spec::{HostPort, PortRequest, PortSpec, Proto},
    state::{CniAttachment, Container, Node, State, Store},
};

pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

/// CNI error codes (spec "Error" section).
mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const PLUGIN: u32 = 100;
}

#[derive(Debug)]
struct CniError {
    code: u32,
    msg: String,
    details: String,
}

fn err(code: u32, msg: impl Into<String>) -> CniError {
    CniError {
        code,
        msg: msg.into(),
        details: String::new(),
    }
}

impl From<anyhow::Error> for CniError {
    fn from(e: anyhow::Error) -> Self {
        CniError {
            code: code::PLUGIN,
            msg: e.to_string(),
            details: format!("{e:#}"),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PortMapping {
    host_port: u16,
    container_port: u16,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(rename = "hostIP", default)]
    host_ip: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RuntimeConfig {
    #[serde(default)]
    port_mappings: Vec<PortMapping>,
}

#[derive(Deserialize)]
struct Attachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

/// The network configuration on stdin.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    /// The network's name: part of an attachment's key.
    #[serde(default)]
    name: String,
    /// bpfnat assigns addresses itself: an `ipam` section is refused, not ignored.
    #[serde(default)]
    ipam: Option<Value>,
    #[serde(default)]
    uplink: Option<String>,
    #[serde(default)]
    subnet: Option<String>,
    #[serde(default)]
    gateway: Option<Ipv4Addr>,
    /// An IPv6 subnet beside the IPv4 one (dual-stack: one address of each per attachment).
    #[serde(default)]
    subnet6: Option<String>,
    #[serde(default)]
    gateway6: Option<Ipv6Addr>,
    #[serde(default, rename = "snatIP")]
    snat_ip: Option<Ipv4Addr>,
    #[serde(default)]
    bpffs_dir: Option<PathBuf>,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    runtime_config: RuntimeConfig,
    #[serde(default)]
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    valid_attachments: Option<Vec<Attachment>>,
}

fn env(name: &str) -> Result<String, CniError> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| err(code::INVALID_ENV, format!("{name} is not set")))
}

/// Run the plugin; returns the process exit code.
pub fn main() -> i32 {
    let mut input = String::new();
    let _ = std::io::stdin().read_to_string(&mut input);
    let version = serde_json::from_str::<Value>(&input)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "1.1.0".to_owned());
    match run(&input, &version) {
        Ok(Some(out)) => {
            let _ = nat_plumbing::stdout::line(&out.to_string());
            0
        }
        Ok(None) => 0,
        Err(e) => {
            let _ = nat_plumbing::stdout::line(
                &json!({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details})
                    .to_string(),
            );
            1
        }
    }
}

fn run(input: &str, version: &str) -> Result<Option<Value>, CniError> {
    let command = env("CNI_COMMAND")?;
    if command == "VERSION" {
        return Ok(Some(
            json!({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}),
        ));
    }
    let conf: NetConf = serde_json::from_str(input)
        .map_err(|e| err(code::DECODE, format!("decode network configuration: {e}")))?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(err(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {} is not supported (supported: {})",
                conf.cni_version,
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    if conf.name.is_empty() && command != "STATUS" {
        return Err(err(
            code::INVALID_CONFIG,
            "the network configuration has no \"name\"",
        ));
    }
    if conf.ipam.is_some() {
        return Err(err(
            code::UNSUPPORTED_FIELD,
            "the \"ipam\" section is not supported: bpfnat assigns addresses from its own subnet",
        ));
    }
    let ctx = Env::new(
        conf.bpffs_dir
            .as_deref()
            .unwrap_or(Path::new(DEFAULT_BPFFS_DIR)),
        conf.state_dir
            .as_deref()
            .unwrap_or(Path::new(DEFAULT_STATE_DIR)),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| err(code::PLUGIN, format!("tokio runtime: {e}")))?;
    rt.block_on(async {
        match command.as_str() {
            "ADD" => {
                // Refused before anything is touched, whether or not the datapath is up yet.
                conf_subnet(&conf)?;
                add(&ctx, &conf).await.map(Some)
            }
            "DEL" => del(&ctx, &conf).await.map(|()| None),
            "CHECK" => check(&ctx, &conf).await.map(|()| None),
            "STATUS" => status(&ctx, &conf).await.map(|()| None),
            "GC" => gc(&ctx, &conf).await.map(|()| None),
            other => Err(err(
                code::INVALID_ENV,
                format!("unknown CNI_COMMAND {other}"),
            )),
        }
    })
}

/// The attachment a call is about: spec 1.1 keys it by container ID, interface name and
/// network name, so a sandbox may have several (one per interface).
struct Key {
    id: String,
    ifname: String,
    network: String,
}

impl Key {
    fn of(conf: &NetConf) -> Result<Self, CniError> {
        let id = env("CNI_CONTAINERID")?;
        // The spec's rule: an alphanumeric first, then alphanumerics, `_`, `.` and `-`.
        let valid = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !valid {
            return Err(err(
                code::INVALID_ENV,
                format!(
                    "CNI_CONTAINERID {id:?} is not a valid container ID (an alphanumeric, then alphanumerics, '_', '.', '-')"
                ),
            ));
        }
        let ifname = env("CNI_IFNAME")?;
        if ifname.len() > 15
            || ifname == "."
            || ifname == ".."
            || ifname.contains(['/', ':'])
            || ifname.chars().any(char::is_whitespace)
        {
            return Err(err(
                code::INVALID_ENV,
                format!("CNI_IFNAME {ifname:?} is not a valid interface name"),
            ));
        }
        Ok(Self {
            id,
            ifname,
            network: conf.name.clone(),
        })
    }

    /// The record's name in bpfnat's state: `CONTAINERID/IFNAME`.
    fn record_name(&self) -> String {
        format!("{}/{}", self.id, self.ifname)
    }

    /// This attachment's record, if there is one.
    fn find<'a>(&self, state: &'a State) -> Option<&'a Container> {
        state
            .containers
            .values()
            .find(|c| c.is_cni_attachment(&self.id, &self.ifname, &self.network))
            .map(|c| &**c)
    }
}

/// The configuration's subnet, if any (`NodeSpec` has the default), refused with code 7
/// when it is malformed or unusable for containers (loopback, multicast, link-local …).
fn conf_subnet(conf: &NetConf) -> Result<Option<Cidr>, CniError> {
    conf.subnet
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e: anyhow::Error| err(code::INVALID_CONFIG, e.to_string()))
}

/// The configuration's IPv6 subnet, if any, refused with code 7 when it is malformed.
fn conf_subnet6(conf: &NetConf) -> Result<Option<Cidr6>, CniError> {
    conf.subnet6
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e: anyhow::Error| err(code::INVALID_CONFIG, e.to_string()))
}

/// The node, brought up first when it is not (as the configuration says).
async fn ensure_up(ctx: &Env, conf: &NetConf) -> Result<Node, CniError> {
    {
        let store = Store::open(&ctx.state_dir)?;
        let mut state = store.load()?;
        node::forget_stale_node(ctx, &store, &mut state)?;
        if ctx.pins.installed()
            && let Some(node) = state.node
        {
            return Ok(node);
        }
    }
    let uplink = conf.uplink.clone().ok_or_else(|| {
        err(
            code::INVALID_CONFIG,
            "the datapath is not up and the configuration names no \"uplink\"",
        )
    })?;
    let subnet = conf_subnet(conf)?;
    let mut spec = NodeSpec::new(uplink);
    spec.subnet = subnet;
    spec.gateway = conf.gateway;
    spec.snat_ip = conf.snat_ip;
    spec.subnet6 = conf_subnet6(conf)?;
    spec.gateway6 = conf.gateway6;
    Ok(endpoints::up(ctx, spec).await?.into_node())
}

/// A result's `ips` entry for `addr` and its default route via `gateway`.
fn ip_and_route(version: &str, addr: IpAddr, prefix: u8, gateway: IpAddr) -> (Value, Value) {
    let mut ip = json!({
        "address": format!("{addr}/{prefix}"),
        "gateway": gateway.to_string(),
    });
    if version == "0.4.0" {
        ip["version"] = json!(if addr.is_ipv4() { "4" } else { "6" });
    }
    let default = if addr.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
    (ip, json!({"dst": default, "gw": gateway.to_string()}))
}

fn result(version: &str, c: &Container, node: &Node, prev: Option<&Value>) -> Value {
    // Dual-stack: the IPv6 address and route beside the IPv4 ones.
    let v4 = node
        .v4
        .as_ref()
        .zip(c.ip)
        .map(|(v, ip)| ip_and_route(version, ip.into(), v.prefix_len, v.gateway.into()));
    let v6 = node
        .v6
        .as_ref()
        .zip(c.ip6)
        .map(|(v, ip)| ip_and_route(version, ip.into(), v.prefix_len, v.gateway.into()));
    let mut out = prev.cloned().unwrap_or_else(|| json!({}));
    out["cniVersion"] = json!(version);
    let mut interfaces = out["interfaces"].as_array().cloned().unwrap_or_default();
    let base = interfaces.len();
    interfaces.push(json!({"name": c.host_if, "mac": fmt_mac(&c.host_mac)}));
    interfaces.push(
        json!({"name": c.ifname, "mac": fmt_mac(&c.mac), "sandbox": c.netns.display().to_string()}),
    );
    let mut ips = out["ips"].as_array().cloned().unwrap_or_default();
    let mut routes = out["routes"].as_array().cloned().unwrap_or_default();
    for (mut ip, route) in v4.into_iter().chain(v6) {
        ip["interface"] = json!(base + 1);
        ips.push(ip);
        routes.push(route);
    }
    out["interfaces"] = json!(interfaces);
    out["ips"] = json!(ips);
    out["routes"] = json!(routes);
    if out.get("dns").is_none() {
        out["dns"] = json!({});
    }
    out
}

/// A `portMappings` entry as the value the service takes (a Kubernetes `hostPort` is one
/// exact port).
fn port_request(m: &PortMapping) -> Result<PortSpec, CniError> {
    let bad = |why: String| err(code::INVALID_CONFIG, format!("portMappings: {why}"));
    let proto = match m
        .protocol
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("tcp") => Proto::Tcp,
        Some("udp") => Proto::Udp,
        Some(p) => return Err(bad(format!("protocol {p:?} is not tcp or udp"))),
    };
    // Empty: every address of the node, in each family the container has; `0.0.0.0` or
    // `::`: every address of that family; else that address (as the portmap plugin).
    let host_ip = match m.host_ip.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(ip) => Some(
            ip.parse::<IpAddr>()
                .map_err(|_| bad(format!("hostIP {ip:?} is not an IP address")))?,
        ),
    };
    if m.host_port == 0 || m.container_port == 0 {
        return Err(bad(format!(
            "ports must be 1-65535 (hostPort {}, containerPort {})",
            m.host_port, m.container_port
        )));
    }
    Ok(PortSpec {
        requests: vec![PortRequest {
            host_ip,
            host: HostPort::Exact(m.host_port),
            container_port: m.container_port,
            proto,
        }],
    })
}

async fn add(ctx: &Env, conf: &NetConf) -> Result<Value, CniError> {
    let key = Key::of(conf)?;
    let netns_path = PathBuf::from(env("CNI_NETNS")?);
    netns::open(&netns_path).map_err(|e| err(code::INVALID_ENV, format!("CNI_NETNS: {e:#}")))?;
    let ports = conf
        .runtime_config
        .port_mappings
        .iter()
        .map(port_request)
        .collect::<Result<Vec<_>, _>>()?;
    let bad_ports = |e: anyhow::Error| err(code::INVALID_CONFIG, format!("portMappings: {e:#}"));
    // Refused before anything is touched as far as the configuration tells; whether the node
    // is IPv6-only is known once it is up.
    endpoints::check_host_addrs(&ports, true, conf.subnet6.is_some()).map_err(bad_ports)?;
    let node = ensure_up(ctx, conf).await?;
    endpoints::check_host_addrs(&ports, node.v4.is_some(), node.v6.is_some()).map_err(bad_ports)?;
    // The node the container was made on: a `down` and `up` in between may have changed it.
    let Added { container, node } = endpoints::create(
        ctx,
        AddRequest {
            name: key.record_name(),
            ip: None,
            ip6: None,
            ports,
            sysctls: Vec::new(),
            netns: Some(netns_path),
            ifname: key.ifname.clone(),
            cni: Some(CniAttachment {
                container_id: key.id.clone(),
                network: key.network.clone(),
            }),
        },
    )
    .await?;
    Ok(result(
        &conf.cni_version,
        &container,
        &node,
        conf.prev_result.as_ref(),
    ))
}

async fn del(ctx: &Env, conf: &NetConf) -> Result<(), CniError> {
    let key = Key::of(conf)?;
    let state = Store::open(&ctx.state_dir)?.load()?;
    // Idempotent: an unknown attachment, or one whose namespace is gone, is fine. Only this
    // attachment goes: the sandbox's other interfaces stay.
    if let Some(c) = key.find(&state) {
        let name = c.name.clone();
        drop(state);
        endpoints::destroy(ctx, &name).await?;
    }
    Ok(())
}

/// Whether `prev` (the result ADD returned) describes `c`: its sandbox interface with the
/// MAC bpfnat gave it, and its address on that interface.
fn check_prev_result(prev: &Value, c: &Container, node: &Node) -> Result<(), CniError> {
    let differs = |what: String| {
        err(
            code::PLUGIN,
            format!("prevResult does not match attachment {}: {what}", c.name),
        )
    };
    let ifs = prev["interfaces"].as_array().cloned().unwrap_or_default();
    let Some(i) = ifs.iter().position(|i| {
        i["name"] == c.ifname.as_str() && i["sandbox"] == c.netns.display().to_string()
    }) else {
        return Err(differs(format!(
            "no interface {} in sandbox {}",
            c.ifname,
            c.netns.display()
        )));
    };
    let mac = fmt_mac(&c.mac);
    if !ifs[i]["mac"]
        .as_str()
        .is_some_and(|m| m.eq_ignore_ascii_case(&mac))
    {
        return Err(differs(format!(
            "interface {} has MAC {}, prevResult says {}",
            c.ifname, mac, ifs[i]["mac"]
        )));
    }
    let mut addresses = Vec::new();
    if let (Some(v4), Some(ip)) = (&node.v4, c.ip) {
        addresses.push(format!("{ip}/{}", v4.prefix_len));
    }
    if let (Some(v6), Some(ip6)) = (&node.v6, c.ip6) {
        addresses.push(format!("{ip6}/{}", v6.prefix_len));
    }
    for address in addresses {
        let has_ip = prev["ips"].as_array().is_some_and(|ips| {
            ips.iter()
                .any(|ip| ip["address"] == address.as_str() && ip["interface"] == i)
        });
        if !has_ip {
            return Err(differs(format!(
                "address {address} on interface {} is not in prevResult",
                c.ifname
            )));
        }
    }
    Ok(())
}

async fn check(ctx: &Env, conf: &NetConf) -> Result<(), CniError> {
    let key = Key::of(conf)?;
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        err(
            code::INVALID_CONFIG,
            "CHECK needs prevResult (the result ADD returned)",
        )
    })?;
    let state = Store::open(&ctx.state_dir)?.load()?;
    let c = key.find(&state).ok_or_else(|| {
        err(
            code::UNKNOWN_CONTAINER,
            format!(
                "no attachment of interface {} for container {} on network {}",
                key.ifname, key.id, key.network
            ),
        )
    })?;
    let node = state
        .node
        .as_ref()
        .ok_or_else(|| err(code::NOT_AVAILABLE, datapath::NOT_UP))?;
    check_prev_result(prev, c, node)?;
    let name = &c.name;
    let nl = Netlink::current()?;
    nl.check_link(&c.host_if, c.host_ifindex)
        .await
        .map_err(|e| err(code::PLUGIN, format!("host side of {name}: {e:#}")))?;
    let inner = Netlink::in_netns(&c.netns).map_err(|e| err(code::PLUGIN, format!("{e:#}")))?;
    let link = inner
        .require_link(&c.ifname)
        .await
        .map_err(|e| err(code::PLUGIN, format!("sandbox side of {name}: {e:#}")))?;
    if link.mac != c.mac {
        return Err(err(
            code::PLUGIN,
            format!(
                "sandbox side of {name}: {} has MAC {}, not {}",
                c.ifname,
                fmt_mac(&link.mac),
                fmt_mac(&c.mac)
            ),
        ));
    }
    if !ctx.pins.installed() {
        return Err(err(code::NOT_AVAILABLE, datapath::NOT_UP));
    }
    Ok(())
}

/// Ready whenever an ADD would succeed: the datapath is up, or the configuration can bring
/// it up (an uplink that exists here, a usable subnet).
async fn status(ctx: &Env, conf: &NetConf) -> Result<(), CniError> {
    if ctx.pins.installed() {
        return Ok(());
    }
    let not_ready = |why: String| err(code::NOT_AVAILABLE, why);
    let uplink = conf.uplink.as_deref().ok_or_else(|| {
        not_ready(
            "the datapath is not up and the configuration names no \"uplink\" to bring it up"
                .to_owned(),
        )
    })?;
    conf_subnet(conf)?;
    conf_subnet6(conf)?;
    match Netlink::current()?.link(uplink).await? {
        Some(_) => Ok(()),
        None => Err(not_ready(format!(
            "the datapath is not up and its uplink {uplink} does not exist here"
        ))),
    }
}

/// Remove this network's attachments the runtime no longer has; every failure is reported,
/// none stops the others.
async fn gc(ctx: &Env, conf: &NetConf) -> Result<(), CniError> {
    let Some(valid) = &conf.valid_attachments else {
        return Err(err(
            code::INVALID_CONFIG,
            "GC without cni.dev/valid-attachments",
        ));
    };
    let state = Store::open(&ctx.state_dir)?.load()?;
    let stale: Vec<String> = state
        .containers
        .values()
        .filter(|c| {
            let ours = match &c.cni_attachment {
                Some(a) => a.network == conf.name,
                None => c.cni,
            };
            ours && !valid
                .iter()
                .any(|a| c.is_cni_attachment(&a.container_id, &a.ifname, &conf.name))
        })
        .map(|c| c.name.clone())
        .collect();
    drop(state);
    let mut failed = Vec::new();
    for name in stale {
        if let Err(e) = endpoints::destroy(ctx, &name).await {
            failed.push(format!("{name}: {e:#}"));
        }
    }
    if failed.is_empty() {
        return Ok(());
    }
    Err(CniError {
        code: code::PLUGIN,
        msg: format!("GC could not remove {} attachment(s)", failed.len()),
        details: failed.join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(proto: Option<&str>, ip: Option<&str>, host: u16) -> PortMapping {
        PortMapping {
            host_port: host,
            container_port: 80,
            protocol: proto.map(str::to_owned),
            host_ip: ip.map(str::to_owned),
        }
    }

    #[test]
    fn port_mappings_become_exact_requests_without_a_string_round_trip() {
        let r = port_request(&mapping(None, None, 8080)).unwrap().requests[0];
        assert_eq!(
            (r.host_ip, r.host, r.container_port, r.proto),
            (None, HostPort::Exact(8080), 80, Proto::Tcp)
        );
        let r = port_request(&mapping(Some("UDP"), Some("0.0.0.0"), 53))
            .unwrap()
            .requests[0];
        assert_eq!(
            (r.host_ip, r.proto),
            (Some(Ipv4Addr::UNSPECIFIED.into()), Proto::Udp)
        );
        let r = port_request(&mapping(None, Some("127.0.0.1"), 8080))
            .unwrap()
            .requests[0];
        assert_eq!(r.host_ip, Some(Ipv4Addr::LOCALHOST.into()));
        let r = port_request(&mapping(None, Some("2001:db8::2"), 8080))
            .unwrap()
            .requests[0];
        assert_eq!(r.host_ip, Some("2001:db8::2".parse().unwrap()));
        for bad in [
            mapping(Some("sctp"), None, 8080),
            mapping(None, Some("localhost"), 8080),
            mapping(None, None, 0),
        ] {
            assert_eq!(port_request(&bad).unwrap_err().code, code::INVALID_CONFIG);
        }
    }
}
