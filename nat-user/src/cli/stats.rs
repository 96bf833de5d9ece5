//! `bpfnat stats`: the datapath's per-reason counters.

use anyhow::Result;

use super::{Ctx, table};
use crate::datapath::Maps;

pub fn run(ctx: &Ctx) -> Result<()> {
    let maps = Maps::open(&ctx.pins)?;
    let stats = maps.stats()?;
    ctx.emit_list("CounterList", &stats, || {
        table(
            &["REASON", "PACKETS", "BYTES"],
            &stats
                .iter()
                .map(|s| {
                    vec![
                        s.reason.to_owned(),
                        s.packets.to_string(),
                        s.bytes.to_string(),
                    ]
                })
                .collect::<Vec<_>>(),
        )
    })
}
