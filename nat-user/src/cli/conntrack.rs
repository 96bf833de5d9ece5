//! `bpfnat conntrack list / flush / stats / gc`.

use std::collections::BTreeMap;

use anyhow::Result;
use clap::Subcommand;
use serde::Serialize;

use super::{Ctx, table};
use crate::datapath::{Flow, Maps};

#[derive(Subcommand, Debug)]
pub enum ConntrackCmd {
    /// Tracked connections: original and reply tuples, state, age, counters.
    List,
    /// Forget every tracked connection.
    Flush,
    /// Table occupancy and connections per state; `--by container`: who holds the table
    /// (as `bpfnat top`).
    Stats {
        #[arg(long, value_enum)]
        by: Option<StatsBy>,
    },
    /// Remove connections idle past their timeout and half connections the LRU broke.
    Gc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StatsBy {
    Container,
}

fn tuple(e: &crate::datapath::FlowEnd) -> String {
    use std::net::SocketAddr;
    format!(
        "{} -> {}",
        SocketAddr::new(e.src, e.sport),
        SocketAddr::new(e.dst, e.dport)
    )
}

#[derive(Serialize)]
struct Cleared {
    connections: usize,
}

/// One family's share of the tables.
#[derive(Serialize)]
struct FamilyStats {
    entries: usize,
    new_entries: usize,
}

#[derive(Serialize)]
struct CtStats {
    /// Both families' entries; each family has tables of its own, of `max_entries` and
    /// `new_max_entries` each (`by_family` has each one's count).
    entries: usize,
    max_entries: u32,
    /// Entries whose partner the LRU evicted when the table was full.
    orphans: usize,
    connections: usize,
    /// Connections assured (in the `conntrack` table, out of a flood's reach).
    assured: usize,
    /// Entries in the table of connections not assured yet: near `new_max_entries`, new
    /// connections displace each other there (a flood, or many unanswered attempts).
    new_entries: usize,
    /// Capacity of the table of connections not assured yet.
    new_max_entries: u32,
    by_state: BTreeMap<String, usize>,
    by_kind: BTreeMap<String, usize>,
    by_family: BTreeMap<&'static str, FamilyStats>,
}

pub fn run(ctx: &Ctx, cmd: ConntrackCmd) -> Result<()> {
    if let ConntrackCmd::Stats {
        by: Some(StatsBy::Container),
    } = cmd
    {
        return super::top::run(ctx);
    }
    let mut maps = Maps::open(&ctx.pins)?;
    match cmd {
        ConntrackCmd::List => {
            let flows = maps.flows()?;
            ctx.emit_list("ConnectionList", &flows, || list_text(&flows))
        }
        ConntrackCmd::Flush => {
            let n = maps.ct_flush()?;
            ctx.emit("Cleared", &Cleared { connections: n }, || {
                format!("flushed {n} connection(s)")
            })
        }
        ConntrackCmd::Gc => {
            let n = maps.ct_gc()?;
            ctx.emit("Cleared", &Cleared { connections: n }, || {
                format!("expired {n} connection(s)")
            })
        }
        ConntrackCmd::Stats { .. } => {
            let flows = maps.flows()?;
            let mut by_state = BTreeMap::new();
            let mut by_kind = BTreeMap::new();
            for f in &flows {
                *by_state
                    .entry(format!("{}/{}", f.proto, f.state))
                    .or_insert(0) += 1;
                *by_kind.entry(f.kind.to_owned()).or_insert(0) += 1;
            }
            let [v4, v6] = maps.ct_lens_by_family()?;
            let by_family = [("ipv4", v4), ("ipv6", v6)]
                .into_iter()
                .map(|(f, (entries, new_entries))| {
                    (
                        f,
                        FamilyStats {
                            entries,
                            new_entries,
                        },
                    )
                })
                .collect();
            let s = CtStats {
                entries: maps.ct_len()?,
                max_entries: maps.ct_max_entries(),
                orphans: maps.ct_orphans()?,
                connections: flows.len(),
                assured: flows.iter().filter(|f| f.assured).count(),
                new_entries: maps.ct_new_len()?,
                new_max_entries: maps.ct_new_max_entries(),
                by_state,
                by_kind,
                by_family,
            };
            ctx.emit("ConntrackStats", &s, || {
                let mut t = format!(
                    "entries:     {} (per family, assured connections: up to {} entries, the least recently used evicted when full; not assured yet: up to {}, which floods of new connections churn)",
                    s.entries, s.max_entries, s.new_max_entries,
                );
                for (f, n) in &s.by_family {
                    t.push_str(&format!(
                        "\n  {f:<20} {} ({} not assured)",
                        n.entries, n.new_entries
                    ));
                }
                t.push_str(&format!(
                    "\norphans:     {}\nconnections: {} ({} assured)",
                    s.orphans, s.connections, s.assured
                ));
                for (k, v) in s.by_kind.iter().chain(s.by_state.iter()) {
                    t.push_str(&format!("\n  {k:<20} {v}"));
                }
                t
            })
        }
    }
}

fn list_text(flows: &[Flow]) -> String {
    if flows.is_empty() {
        return "no tracked connections".to_owned();
    }
    table(
        &[
            "PROTO", "KIND", "ORIGINAL", "REPLY", "STATE", "AGE", "IDLE", "PKTS", "BYTES",
        ],
        &flows
            .iter()
            .map(|f| {
                vec![
                    f.proto.to_owned(),
                    f.kind.to_owned(),
                    tuple(&f.original),
                    tuple(&f.reply),
                    if f.assured {
                        format!("{} [ASSURED]", f.state)
                    } else {
                        f.state.to_owned()
                    },
                    format!("{}s", f.age_secs),
                    format!("{}s", f.idle_secs),
                    format!("{}/{}", f.original.packets, f.reply.packets),
                    format!("{}/{}", f.original.bytes, f.reply.bytes),
                ]
            })
            .collect::<Vec<_>>(),
    )
}
