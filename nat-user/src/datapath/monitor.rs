//! The monitor's maps (`nat_common::monitor`): turning the programs' events on and off,
//! reading them from the ring buffer, and the events they could not send.

use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::maps::{Array, MapData, PerCpuArray, PerCpuValues, RingBuf};
use nat_common::{MonitorCpu, MonitorCtl, MonitorEvent, map_names};
use tokio::io::unix::AsyncFd;

use super::{NOT_UP, Pins, ct_now_ns, open_map};

/// How long the programs keep emitting without a renewal: a monitor that was killed stops
/// costing the datapath anything after this.
pub const LEASE: Duration = Duration::from_secs(5);

/// Events the programs could not send since the monitor started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lost {
    /// Over the per-CPU rate.
    pub rate: u64,
    /// The ring buffer was full: the reader was too slow.
    pub full: u64,
}

/// The pinned monitor maps of a node.
pub struct Monitor {
    ctl: Array<MapData, MonitorCtl>,
    cpu: PerCpuArray<MapData, MonitorCpu>,
    events: AsyncFd<RingBuf<MapData>>,
}

/// The ring buffer, registered with the runtime's reactor.
fn watch(ring: RingBuf<MapData>) -> Result<AsyncFd<RingBuf<MapData>>> {
    // SAFETY: the fd is the map's own, owned by `ring`, which the `AsyncFd` owns from here
    // until it is dropped: it stays open and the same.
    unsafe { AsyncFd::register(ring) }
        .map_err(|e| e.into_parts().1)
        .context("watch the events ring buffer")
}

impl Monitor {
    pub fn open(pins: &Pins) -> Result<Self> {
        if !pins.installed() {
            anyhow::bail!(NOT_UP);
        }
        let ring: RingBuf<MapData> = open_map(pins, map_names::EVENTS)?
            .try_into()
            .context("the events map is not a ring buffer")?;
        Ok(Self {
            ctl: open_map(pins, map_names::MONITOR)?.try_into()?,
            cpu: open_map(pins, map_names::MONITOR_CPU)?.try_into()?,
            events: watch(ring)?,
        })
    }

    /// Make the programs emit what `want` asks for (its flags, rate and filters), from fresh
    /// counters; what is already in the ring buffer is skipped.
    pub fn start(&mut self, want: MonitorCtl) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let fresh = PerCpuValues::try_from(vec![MonitorCpu::default(); cpus])?;
        self.cpu
            .set(0, fresh, 0)
            .context("reset the monitor's per-CPU state")?;
        while self.events.get_mut().next().is_some() {}
        self.write(want)
    }

    /// Extend the lease of what the programs are asked for.
    pub fn renew(&mut self) -> Result<()> {
        let c = self.ctl.get(&0, 0).context("read the monitor map")?;
        self.write(c)
    }

    /// No more events: the programs go back to testing one word.
    pub fn stop(&mut self) -> Result<()> {
        self.ctl
            .set(0, MonitorCtl::default(), 0)
            .context("clear the monitor map")
    }

    fn write(&mut self, want: MonitorCtl) -> Result<()> {
        let ctl = MonitorCtl {
            lease_until_ns: ct_now_ns() + LEASE.as_nanos() as u64,
            ..want
        };
        self.ctl.set(0, ctl, 0).context("write the monitor map")
    }

    /// The events lost so far, all CPUs together.
    pub fn lost(&self) -> Result<Lost> {
        let per_cpu = self.cpu.get(&0, 0).context("read the monitor's counters")?;
        Ok(per_cpu.iter().fold(Lost::default(), |l, c| Lost {
            rate: l.rate + c.lost_rate,
            full: l.full + c.lost_full,
        }))
    }

    /// Wait until events are there, then take all of them (at most `max`).
    pub async fn next_events(&mut self, max: usize) -> Result<Vec<MonitorEvent>> {
        loop {
            let mut guard = self
                .events
                .readable_mut()
                .await
                .context("wait for events")?;
            let ring = guard.get_inner_mut();
            let mut out = Vec::new();
            while out.len() < max
                && let Some(item) = ring.next()
            {
                if let Ok(e) = bytemuck::try_pod_read_unaligned::<MonitorEvent>(&item) {
                    out.push(e);
                }
            }
            if out.len() < max {
                guard.clear_ready();
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}

/// What the programs of the node at `pins` are asked to emit now (`MON_*` flags; 0 while
/// nobody listens).
pub fn requested(pins: &Pins) -> Result<u32> {
    let ctl: Array<MapData, MonitorCtl> = open_map(pins, map_names::MONITOR)?.try_into()?;
    Ok(ctl.get(&0, 0).context("read the monitor map")?.flags)
}
