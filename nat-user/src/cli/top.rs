//! `bpfnat top` (and `conntrack stats --by container`): who holds the conntrack table and
//! the MASQUERADE ports, container by container, largest first.

use anyhow::Result;
use serde::Serialize;

use super::{Ctx, table};
use crate::datapath::{CtSummary, Maps, PortsByProto};

/// One container's row (JSON kind `ContainerUsageList`).
#[derive(Serialize, Debug)]
pub struct UsageView {
    /// The container's name; `(gone)` for connections of a container no longer recorded.
    pub container: String,
    pub connections: usize,
    /// Conntrack entries, two per connection.
    pub entries: usize,
    /// Percent of the entries in use.
    pub share_percent: f64,
    /// MASQUERADE source ports its connections hold, per protocol.
    pub snat_ports: PortsByProto,
    /// The most ports of one protocol as a percent of the MASQUERADE port range.
    pub port_range_percent: f64,
}

/// Every container's usage, largest first, from one walk of the tables.
pub fn usage(ctx: &Ctx) -> Result<(Vec<UsageView>, CtSummary, u32)> {
    let maps = Maps::open(&ctx.pins)?;
    let sum = maps.ct_summary()?;
    let state = ctx.store()?.load()?;
    let range = state
        .node
        .as_ref()
        .map_or(0, |n| u32::from(n.port_max.saturating_sub(n.port_min)) + 1);
    let name_of = |ifindex: u32| {
        state
            .containers
            .values()
            .find(|c| c.host_ifindex == ifindex)
            .map_or_else(|| "(gone)".to_owned(), |c| c.name.clone())
    };
    let percent = |part: usize, whole: usize| {
        if whole == 0 {
            0.0
        } else {
            part as f64 * 100.0 / whole as f64
        }
    };
    let mut rows: Vec<UsageView> = sum
        .by_owner
        .iter()
        .map(|(ifindex, u)| UsageView {
            container: name_of(*ifindex),
            connections: u.connections,
            entries: u.entries,
            share_percent: percent(u.entries, sum.entries),
            snat_ports: u.snat_ports,
            port_range_percent: percent(u.snat_ports.most(), range as usize),
        })
        .collect();
    rows.sort_by(|a, b| {
        (b.entries, b.snat_ports.most(), &a.container).cmp(&(
            a.entries,
            a.snat_ports.most(),
            &b.container,
        ))
    });
    Ok((rows, sum, maps.ct_max_entries()))
}

pub fn run(ctx: &Ctx) -> Result<()> {
    let (rows, sum, max) = usage(ctx)?;
    ctx.emit_list("ContainerUsageList", &rows, || text(&rows, &sum, max))
}

pub fn text(rows: &[UsageView], sum: &CtSummary, max: u32) -> String {
    let mut t = format!(
        "conntrack: {} entries in use ({} connection{}), tables of {} entries per family\n",
        sum.entries,
        sum.connections,
        if sum.connections == 1 { "" } else { "s" },
        max
    );
    if rows.is_empty() {
        t.push_str("no tracked connections");
        return t;
    }
    t.push_str(&table(
        &[
            "CONTAINER",
            "CONNECTIONS",
            "ENTRIES",
            "SHARE",
            "SNAT PORTS TCP/UDP/ICMP",
            "OF PORT RANGE",
        ],
        &rows
            .iter()
            .map(|r| {
                vec![
                    r.container.clone(),
                    r.connections.to_string(),
                    r.entries.to_string(),
                    format!("{:.1}%", r.share_percent),
                    format!(
                        "{}/{}/{}",
                        r.snat_ports.tcp, r.snat_ports.udp, r.snat_ports.icmp
                    ),
                    format!("{:.3}%", r.port_range_percent),
                ]
            })
            .collect::<Vec<_>>(),
    ));
    t
}
