//! `bpfnat map list` and `bpfnat map dump NAME`: any pinned map, decoded.

use anyhow::Result;
use clap::Subcommand;
use serde_json::Value;

use super::{Ctx, table};
use crate::datapath::dump;

#[derive(Subcommand, Debug)]
pub enum MapCmd {
    /// Every pinned map: its kind, key and value sizes, capacity, entries in use and pin.
    List,
    /// A pinned map's entries with addresses, ports, protocols, states, reasons and flags
    /// decoded (where `bpftool map dump` prints byte arrays).
    Dump {
        /// The map's name, as `map list` shows it (`conntrack`, `ports`, `endpoints`, …).
        name: String,
    },
}

pub fn run(ctx: &Ctx, cmd: MapCmd) -> Result<()> {
    match cmd {
        MapCmd::List => {
            let maps = dump::list(&ctx.pins)?;
            ctx.emit_list("MapList", &maps, || {
                table(
                    &["NAME", "KIND", "KEY", "VALUE", "MAX", "ENTRIES", "PIN"],
                    &maps
                        .iter()
                        .map(|m| {
                            vec![
                                m.name.to_owned(),
                                m.kind.to_owned(),
                                m.key_size.to_string(),
                                m.value_size.to_string(),
                                m.max_entries.to_string(),
                                m.entries.map_or_else(|| "-".to_owned(), |n| n.to_string()),
                                m.pin.clone(),
                            ]
                        })
                        .collect::<Vec<_>>(),
                )
            })
        }
        MapCmd::Dump { name } => {
            let entries = dump::dump(&ctx.pins, &name)?;
            ctx.emit_list("MapEntryList", &entries, || {
                if entries.is_empty() {
                    return format!("{name}: no entries");
                }
                entries
                    .iter()
                    .map(|e| format!("{} => {}", fields(&e.key), fields(&e.value)))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
    }
}

/// An object as `name=value` pairs, nested objects as `outer.inner=value`, nulls left out.
pub(super) fn fields(v: &Value) -> String {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            Value::Null => {}
            Value::String(s) => out.push(format!("{prefix}={s}")),
            Value::Array(a) => out.push(format!(
                "{prefix}={}",
                a.iter()
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                    .collect::<Vec<_>>()
                    .join(",")
            )),
            other => out.push(format!("{prefix}={other}")),
        }
    }
    let mut out = Vec::new();
    walk("", v, &mut out);
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn entries_read_as_name_value_pairs() {
        let v = json!({"proto": "tcp", "src": "10.88.0.2", "sport": 40000, "next_hop": null,
            "tcp": {"end": 5, "tracked": true}, "flags": ["masquerade", "static_nat"], "empty": []});
        assert_eq!(
            super::fields(&v),
            "proto=tcp src=10.88.0.2 sport=40000 tcp.end=5 tcp.tracked=true flags=masquerade,static_nat empty="
        );
    }
}
