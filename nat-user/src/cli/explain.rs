//! `bpfnat explain PROTO SRC DST`: what the datapath would do with that packet, step by
//! step, decided by its programs without committing anything (`crate::explain`).

use std::{collections::HashMap, fmt::Write as _, net::SocketAddr};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use nat_plumbing::netlink::Netlink;
use serde_json::Value;

use super::{Ctx, map::fields};
use crate::explain::{self, Explanation, From, Interface, Proto, Query, StepView, TcpFlags};

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// The protocol (`icmp`: an echo request, whose id is the source port).
    #[arg(value_enum)]
    pub proto: ProtoArg,
    /// Source, `ADDR:PORT` (`[ADDR]:PORT` for IPv6; the port may be left out for icmp).
    pub src: String,
    /// Destination, as the source.
    pub dst: String,
    /// Where the packet arrives: `uplink` (from outside) or `container NAME` (sent by it).
    /// By default, from the container whose address the source is, else from the uplink.
    #[arg(long, num_args = 1..=2, value_names = ["uplink|container", "NAME"])]
    pub from: Vec<String>,
    /// TCP flags of the segment, comma separated (`syn`, `ack`, `fin`, `rst`): `syn` opens
    /// a connection; `ack` is a segment of one already open.
    #[arg(long, default_value = "syn", value_delimiter = ',')]
    pub tcp_flags: Vec<TcpFlag>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProtoArg {
    Tcp,
    Udp,
    Icmp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TcpFlag {
    Syn,
    Ack,
    Fin,
    Rst,
}

/// `ADDR:PORT`, `[ADDR]:PORT`, or (when `port_optional`) a bare address with port 1.
fn endpoint(s: &str, port_optional: bool) -> Result<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if port_optional && let Ok(ip) = s.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, 1));
    }
    bail!("{s:?} is not ADDR:PORT ([ADDR]:PORT for IPv6)")
}

fn query(a: &ExplainArgs) -> Result<Query> {
    let proto = match a.proto {
        ProtoArg::Tcp => Proto::Tcp,
        ProtoArg::Udp => Proto::Udp,
        ProtoArg::Icmp => Proto::Icmp,
    };
    let icmp = proto == Proto::Icmp;
    let from = match a.from.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => None,
        ["uplink"] => Some(From::Uplink),
        ["container", name] => Some(From::Container(name.to_owned())),
        _ => bail!("--from takes `uplink` or `container NAME`"),
    };
    let mut tcp_flags = TcpFlags::default();
    for f in &a.tcp_flags {
        match f {
            TcpFlag::Syn => tcp_flags.syn = true,
            TcpFlag::Ack => tcp_flags.ack = true,
            TcpFlag::Fin => tcp_flags.fin = true,
            TcpFlag::Rst => tcp_flags.rst = true,
        }
    }
    Ok(Query {
        proto,
        src: endpoint(&a.src, icmp).context("source")?,
        dst: endpoint(&a.dst, icmp).context("destination")?,
        from,
        tcp_flags,
    })
}

pub async fn run(ctx: &Ctx, a: ExplainArgs) -> Result<()> {
    let q = query(&a)?;
    // The record is read, and its lock released, before the programs are verified.
    let state = ctx.store()?.load()?;
    let links: HashMap<u32, String> = Netlink::current()?
        .links()
        .await?
        .into_iter()
        .map(|l| (l.index, l.name))
        .collect();
    let names = |i: u32| links.get(&i).cloned();
    let e = explain::explain(&ctx.pins, &state, &names, &q)?;
    ctx.emit("Explanation", &e, || text(&e))
}

fn iface(i: &Interface) -> String {
    let name = i
        .name
        .clone()
        .unwrap_or_else(|| format!("ifindex {}", i.ifindex));
    match &i.container {
        Some(c) => format!("{name} (container {c})"),
        None if i.uplink => format!("{name} (uplink)"),
        None => name,
    }
}

fn text(e: &Explanation) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "packet      {}", e.packet);
    let _ = writeln!(s, "arrives on  {}", iface(&e.arrives_on));
    for run in &e.programs {
        let _ = writeln!(s, "\n{}: {}", run.program, run.action);
        for (n, step) in run.steps.iter().enumerate() {
            let _ = writeln!(s, "  {:>2} {}", n + 1, step_text(step));
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "verdict     {}{}",
        e.verdict,
        if e.counted.is_empty() {
            String::new()
        } else {
            format!(" ({})", e.counted.join(", "))
        }
    );
    if let Some(t) = &e.translated {
        if *t == e.packet {
            let _ = writeln!(s, "translated  no ({t})");
        } else {
            let _ = writeln!(s, "translated  {t}");
        }
    }
    if let Some(o) = &e.out {
        let _ = writeln!(s, "out         {}", iface(o));
    }
    let _ = write!(
        s,
        "committed   nothing: no connection, port or counter was touched"
    );
    s
}

/// A value as `name=value` pairs; a connection's entry by what tells it apart (`-o json`
/// and `map dump` have every field).
fn value_text(map: &str, v: &Value) -> String {
    if !map.starts_with("conntrack") {
        return fields(v);
    }
    let x = &v["xlate"];
    let mut t = format!(
        "xlate={}:{}->{}:{}",
        x["src"].as_str().unwrap_or("?"),
        x["sport"],
        x["dst"].as_str().unwrap_or("?"),
        x["dport"]
    );
    for k in [
        "dir",
        "state",
        "origin",
        "assured",
        "packets",
        "bytes",
        "idle_secs",
    ] {
        let f = &v[k];
        let _ = write!(
            t,
            " {k}={}",
            f.as_str().map_or_else(|| f.to_string(), str::to_owned)
        );
    }
    t
}

fn step_text(step: &StepView) -> String {
    match step {
        StepView::Lookup { map, key, value } => format!(
            "lookup   {map:<14} {} => {}",
            fields(key),
            value
                .as_ref()
                .map_or_else(|| "not found".to_owned(), |v| value_text(map, v))
        ),
        StepView::Insert {
            map,
            key,
            value,
            ok,
        } => format!(
            "{} {map:<14} {} => {}",
            if *ok { "create  " } else { "refused " },
            fields(key),
            value_text(map, value)
        ),
        StepView::Remove { map, key, present } => format!(
            "delete   {map:<14} {}{}",
            fields(key),
            if *present { "" } else { " => not there" }
        ),
        StepView::Fib {
            dst,
            result,
            out,
            mtu,
        } => {
            let mut t = format!("fib      {dst} => {result}");
            if let Some(o) = out {
                let _ = write!(t, " out={}", iface(o));
            }
            if let Some(m) = mtu {
                let _ = write!(t, " mtu={m}");
            }
            t
        }
        StepView::Redirect { out, how } => format!(
            "redirect {} {}",
            iface(out),
            match *how {
                "into_namespace" => "into its namespace",
                "egress_resolve_neighbour" => "out, the kernel resolving the neighbour",
                _ => "out",
            }
        ),
        StepView::Count { reason } => format!("count    {reason}"),
    }
}
