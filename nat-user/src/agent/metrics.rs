//! `/metrics` (Prometheus text format) and `/healthz`, over a minimal HTTP/1.0 responder:
//! one request per connection, which is all Prometheus and kubelet probes need.

use std::fmt::Write as _;

use anyhow::Result;
use aya::programs::SchedClassifier;
use nat_common::prog_names;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::{Duration, timeout},
};

use crate::{datapath::Maps, env::Env};

pub async fn serve(ctx: &Env, mut s: TcpStream) -> Result<()> {
    let mut buf = vec![0u8; 2048];
    let n = timeout(Duration::from_secs(2), s.read(&mut buf)).await??;
    let req = String::from_utf8_lossy(&buf[..n]);
    let path = req.split_whitespace().nth(1).unwrap_or("/");
    let (status, body, ctype) = match path {
        "/healthz" => match health(ctx) {
            Ok(()) => ("200 OK", "ok\n".to_owned(), "text/plain"),
            Err(e) => ("503 Service Unavailable", format!("{e:#}\n"), "text/plain"),
        },
        "/metrics" => match render(ctx) {
            Ok(m) => ("200 OK", m, "text/plain; version=0.0.4"),
            Err(e) => (
                "500 Internal Server Error",
                format!("{e:#}\n"),
                "text/plain",
            ),
        },
        _ => ("404 Not Found", "not found\n".to_owned(), "text/plain"),
    };
    let resp = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await?;
    Ok(())
}

fn health(ctx: &Env) -> Result<()> {
    if !ctx.pins.installed() {
        anyhow::bail!("datapath not installed");
    }
    Maps::open(&ctx.pins)?.config()?;
    Ok(())
}

fn render(ctx: &Env) -> Result<String> {
    let maps = Maps::open(&ctx.pins)?;
    let state = ctx.store()?.load()?;
    let mut m = String::new();
    m.push_str("# HELP bpfnat_packets_total Packets by datapath decision.\n# TYPE bpfnat_packets_total counter\n");
    let stats = maps.stats()?;
    for s in &stats {
        let _ = writeln!(
            m,
            "bpfnat_packets_total{{reason=\"{}\"}} {}",
            s.reason, s.packets
        );
    }
    m.push_str("# HELP bpfnat_bytes_total Bytes by datapath decision.\n# TYPE bpfnat_bytes_total counter\n");
    for s in &stats {
        let _ = writeln!(
            m,
            "bpfnat_bytes_total{{reason=\"{}\"}} {}",
            s.reason, s.bytes
        );
    }
    let flows = maps.flows()?;
    let snat_ports: std::collections::HashSet<_> = flows
        .iter()
        .filter(|f| f.kind == "masquerade")
        .map(|f| (f.proto, f.reply.dport))
        .collect();
    let _ = write!(
        m,
        "# HELP bpfnat_conntrack_entries Conntrack entries (two per connection).\n# TYPE bpfnat_conntrack_entries gauge\nbpfnat_conntrack_entries {}\n\
         # HELP bpfnat_conntrack_max_entries Conntrack table size.\n# TYPE bpfnat_conntrack_max_entries gauge\nbpfnat_conntrack_max_entries {}\n\
         # HELP bpfnat_conntrack_connections Tracked connections.\n# TYPE bpfnat_conntrack_connections gauge\nbpfnat_conntrack_connections {}\n\
         # HELP bpfnat_conntrack_assured_connections Assured connections (out of reach of floods of new ones).\n# TYPE bpfnat_conntrack_assured_connections gauge\nbpfnat_conntrack_assured_connections {}\n\
         # HELP bpfnat_conntrack_new_entries Entries of connections not assured yet (near the table size: new connections displace each other).\n# TYPE bpfnat_conntrack_new_entries gauge\nbpfnat_conntrack_new_entries {}\n\
         # HELP bpfnat_conntrack_new_max_entries Size of the table of connections not assured yet.\n# TYPE bpfnat_conntrack_new_max_entries gauge\nbpfnat_conntrack_new_max_entries {}\n\
         # HELP bpfnat_snat_ports_in_use MASQUERADE source ports in use (per protocol).\n# TYPE bpfnat_snat_ports_in_use gauge\nbpfnat_snat_ports_in_use {}\n\
         # HELP bpfnat_containers Containers attached.\n# TYPE bpfnat_containers gauge\nbpfnat_containers {}\n\
         # HELP bpfnat_published_ports Published ports.\n# TYPE bpfnat_published_ports gauge\nbpfnat_published_ports {}\n",
        maps.ct_len()?,
        maps.ct_max_entries(),
        flows.len(),
        flows.iter().filter(|f| f.assured).count(),
        maps.ct_new_len()?,
        maps.ct_new_max_entries(),
        snat_ports.len(),
        state.containers.len(),
        state
            .containers
            .values()
            .map(|c| c.ports.len())
            .sum::<usize>(),
    );
    m.push_str("# HELP bpfnat_program_runs_total Program runs (counted while kernel.bpf_stats_enabled=1).\n# TYPE bpfnat_program_runs_total counter\n");
    for name in [prog_names::TC_CONTAINER, prog_names::TC_UPLINK] {
        if let Ok(p) = SchedClassifier::from_pin(ctx.pins.root().join("progs").join(name))
            && let Ok(info) = p.info()
        {
            let _ = writeln!(
                m,
                "bpfnat_program_runs_total{{program=\"{name}\"}} {}",
                info.run_count()
            );
        }
    }
    Ok(m)
}
