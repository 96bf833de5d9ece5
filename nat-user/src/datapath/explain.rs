//! `bpfnat explain`'s datapath side: load the programs' `explain` build (the same source,
//! built to commit nothing and to record a trail: `nat_common::explain`) over the node's
//! pinned maps, run one program on a frame with BPF_PROG_TEST_RUN, and read back the
//! action, the frame as the program left it, and the trail with its keys and values decoded.
//!
//! The explain object reads the node's tables through their pins; every map it could write
//! (counters, monitor state, scratch space) is its own, created for the run and gone after
//! it, so even a write the build failed to leave out could not reach the node's state.

use anyhow::{Context as _, Result, bail};
use aya::{
    EbpfLoader, TestRun as _, TestRunOptions,
    maps::{Array, MapData},
    programs::{Program, SchedClassifier, Xdp},
};
use nat_common::{Explain, FibStep, Reason, RedirectStep, Step, map_names as n, op, trail_map};
use serde_json::Value;

use super::{NOT_UP, Pins, ct_now_ns, dump};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nat-explain"));

/// The node's maps a dry run reads: opened through their pins, never created.
const READS: [&str; 16] = [
    n::CONFIG,
    n::ENDPOINTS,
    n::ENDPOINTS6,
    n::PORTS,
    n::PORTS6,
    n::CONNTRACK,
    n::CONNTRACK_NEW,
    n::CONNTRACK6,
    n::CONNTRACK6_NEW,
    n::STATIC_NAT,
    n::STATIC_NAT6,
    n::FRAGS,
    n::FRAGS6,
    n::NODE_ADDRS,
    n::NODE_ADDRS6,
    n::CLUSTER_NETS,
];

/// What one program did with the frame.
#[derive(Debug)]
pub struct Ran {
    /// `tc_container`, `tc_uplink` or `xdp_uplink`.
    pub program: &'static str,
    /// The program's return value (a `TC_ACT_*` or `XDP_*` action).
    pub action: u32,
    /// The frame as the program left it.
    pub out: Vec<u8>,
    pub steps: Vec<TrailStep>,
    /// More steps were taken than the trail holds (the run is then not trusted).
    pub overflow: bool,
}

/// One step of the trail, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum TrailStep {
    /// A lookup of `map` at `key`: what it found (`None`: nothing).
    Lookup {
        map: &'static str,
        key: Value,
        value: Option<Value>,
    },
    /// An entry the production programs would write, and whether the write would succeed.
    Insert {
        map: &'static str,
        key: Value,
        value: Value,
        ok: bool,
    },
    /// An entry the production programs would delete (`present`: there is one).
    Remove {
        map: &'static str,
        key: Value,
        present: bool,
    },
    /// A FIB lookup for `dst`.
    Fib { dst: std::net::IpAddr, fib: FibStep },
    /// The packet is sent to `ifindex` (`how`: `nat_common::REDIRECT_*`).
    Redirect { ifindex: u32, how: u32 },
    /// The counter of this reason would move.
    Count(Reason),
}

/// The program `prog` of the explain build run once on `frame`, as if it arrived on
/// `ifindex` (TC; ignored for XDP), in the calling thread's network namespace (the node's:
/// FIB lookups and interface indexes are its).
pub fn run(pins: &Pins, prog: &'static str, ifindex: u32, frame: &[u8]) -> Result<Ran> {
    if !pins.installed() {
        bail!(NOT_UP);
    }
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, std::path::PathBuf)> = READS.iter().map(|m| (*m, pins.map(m))).collect();
    for (name, path) in &paths {
        // aya creates and pins a map whose pin is missing: refuse instead.
        if !path.exists() {
            bail!(
                "the pinned map {} is missing; run `bpfnat up` again to repair the datapath",
                path.display()
            );
        }
        loader.map_pin_path(name, path.as_path());
    }
    // The production programs' clock, so that the dry run stamps entries as they would.
    let clock = super::calibrate_clock();
    loader.override_global("CLOCK_JIFFY_NS", &clock.jiffy_ns, true);
    loader.override_global("CLOCK_OFFSET_NS", &clock.offset_ns, true);
    let mut ebpf = loader
        .load(OBJECT)
        .context("load the explain build of the eBPF object")?;
    let record: Array<MapData, Explain> = ebpf
        .take_map(n::EXPLAIN_BSS)
        .context("the explain build has no global data")?
        .try_into()
        .context("the explain build's global data is not one `Explain`")?;
    let program = ebpf
        .program_mut(prog)
        .with_context(|| format!("program {prog} missing from the explain build"))?;
    let r = match program {
        Program::SchedClassifier(p) => {
            p.load()
                .with_context(|| format!("load the explain build of {prog} (verifier)"))?;
            test_run_tc(p, ifindex, frame)
        }
        Program::Xdp(p) => {
            p.load()
                .with_context(|| format!("load the explain build of {prog} (verifier)"))?;
            test_run_xdp(p, frame)
        }
        other => bail!(
            "program {prog} has an unexpected type {:?}",
            other.prog_type()
        ),
    };
    let (action, out) = r?;
    let t = record.get(&0, 0).context("read the trail")?.trail;
    let now = ct_now_ns();
    let len = (t.len as usize).min(t.steps.len());
    Ok(Ran {
        program: prog,
        action,
        out,
        steps: t.steps[..len]
            .iter()
            .filter_map(|s| decode(s, now))
            .collect(),
        overflow: t.overflow != 0,
    })
}

/// struct __sk_buff with only `ifindex` (offset 40) set: the kernel takes skb->dev from it.
fn test_run_tc(p: &SchedClassifier, ifindex: u32, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    let mut ctx = [0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + 256];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

fn test_run_xdp(p: &Xdp, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 256];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

fn map_name(id: u8) -> Option<&'static str> {
    Some(match id {
        trail_map::ENDPOINTS => n::ENDPOINTS,
        trail_map::ENDPOINTS6 => n::ENDPOINTS6,
        trail_map::PORTS => n::PORTS,
        trail_map::PORTS6 => n::PORTS6,
        trail_map::CONNTRACK => n::CONNTRACK,
        trail_map::CONNTRACK_NEW => n::CONNTRACK_NEW,
        trail_map::CONNTRACK6 => n::CONNTRACK6,
        trail_map::CONNTRACK6_NEW => n::CONNTRACK6_NEW,
        trail_map::STATIC_NAT => n::STATIC_NAT,
        trail_map::STATIC_NAT6 => n::STATIC_NAT6,
        trail_map::NODE_ADDRS => n::NODE_ADDRS,
        trail_map::NODE_ADDRS6 => n::NODE_ADDRS6,
        trail_map::CLUSTER_NETS => n::CLUSTER_NETS,
        trail_map::FRAGS => n::FRAGS,
        trail_map::FRAGS6 => n::FRAGS6,
        _ => return None,
    })
}

fn bytes<const N: usize>(words: &[u64; N], len: u8) -> &[u8] {
    let all: &[u8] = bytemuck::cast_slice(words);
    &all[..usize::from(len).min(all.len())]
}

/// One recorded step in domain terms (`None` for one this loader cannot read).
fn decode(s: &Step, now: u64) -> Option<TrailStep> {
    let key = bytes(&s.key, s.key_len);
    let value = bytes(&s.value, s.value_len);
    match s.op {
        op::LOOKUP | op::INSERT | op::REMOVE => {
            let map = map_name(s.map)?;
            let found = s.found != 0;
            let (k, v) = dump::decode(
                map,
                key,
                (s.op != op::REMOVE && (found || s.op == op::INSERT)).then_some(value),
                now,
            )?;
            Some(match s.op {
                op::LOOKUP => TrailStep::Lookup {
                    map,
                    key: k,
                    value: v,
                },
                op::INSERT => TrailStep::Insert {
                    map,
                    key: k,
                    value: v?,
                    ok: found,
                },
                _ => TrailStep::Remove {
                    map,
                    key: k,
                    present: found,
                },
            })
        }
        op::FIB => {
            let dst = match key.len() {
                4 => std::net::IpAddr::from(<[u8; 4]>::try_from(key).ok()?),
                16 => std::net::IpAddr::from(<[u8; 16]>::try_from(key).ok()?),
                _ => return None,
            };
            Some(TrailStep::Fib {
                dst,
                fib: bytemuck::pod_read_unaligned(value.get(..size_of::<FibStep>())?),
            })
        }
        op::REDIRECT => {
            let r: RedirectStep =
                bytemuck::pod_read_unaligned(value.get(..size_of::<RedirectStep>())?);
            Some(TrailStep::Redirect {
                ifindex: r.ifindex,
                how: r.how,
            })
        }
        op::COUNT => {
            let r = u32::from_ne_bytes(key.get(..4)?.try_into().ok()?);
            Reason::ALL
                .iter()
                .find(|(reason, _)| *reason as u32 == r)
                .map(|(reason, _)| TrailStep::Count(*reason))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use nat_common::{Explain, MAP_SPECS, map_names as n};

    use super::{OBJECT, READS};

    fn maps(object: &[u8]) -> aya_obj::Object {
        aya_obj::Object::parse(object).expect("parse the built eBPF object")
    }

    #[test]
    fn the_explain_build_has_the_node_maps_and_its_record_and_production_has_neither() {
        let explain = maps(OBJECT);
        for name in READS {
            let spec = MAP_SPECS
                .iter()
                .find(|m| m.name == name)
                .expect("in MAP_SPECS");
            assert!(spec.pinned, "{name} is read through its pin");
            let m = &explain.maps[name];
            assert_eq!(
                (m.key_size() as usize, m.value_size() as usize),
                (spec.key_size, spec.value_size),
                "{name}"
            );
        }
        let bss = &explain.maps[n::EXPLAIN_BSS];
        assert_eq!(bss.value_size() as usize, size_of::<Explain>());
        let production = maps(super::super::OBJECT);
        assert!(
            !production.maps.contains_key(n::EXPLAIN_BSS),
            "the production object carries the explain record"
        );
    }
}
