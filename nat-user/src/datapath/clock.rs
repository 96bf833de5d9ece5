//! The programs' clock. Connection entries are stamped with `CLOCK_MONOTONIC_COARSE`, which
//! userspace compares them with (`ct_now_ns`). The programs compute it from the tick count,
//! `jiffies × CLOCK_JIFFY_NS + CLOCK_OFFSET_NS`: the verifier inlines `bpf_jiffies64` into
//! a load, where `bpf_ktime_get_coarse_ns` is a helper call, 30–45 ns of every packet on a
//! VM with return thunks. The kernel advances jiffies from the monotonic clock in whole
//! ticks, and the coarse clock with them, so once the loader has told the programs the tick
//! length and the offset, the two agree to the tick for as long as the machine runs.

use super::ct_now_ns;

/// The values of the programs' `CLOCK_JIFFY_NS` and `CLOCK_OFFSET_NS` globals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    /// Nanoseconds per jiffy; 0 has the programs call `bpf_ktime_get_coarse_ns` instead.
    pub jiffy_ns: u64,
    /// `CLOCK_MONOTONIC_COARSE − jiffies × jiffy_ns`, modulo 2⁶⁴.
    pub offset_ns: u64,
}

/// The clock of this kernel, from `/proc/timer_list` (its tick count and monotonic time,
/// read within one tick of the coarse clock); the helper's where the file cannot be read or
/// does not tell the HZ apart (`hz_of`).
#[must_use]
pub fn calibrate() -> Clock {
    for _ in 0..3 {
        let before = ct_now_ns();
        let Ok(text) = std::fs::read_to_string("/proc/timer_list") else {
            return Clock::default();
        };
        if ct_now_ns() == before {
            return of_timer_list(&text, before).unwrap_or_default();
        }
        // A tick between the two clock reads: the jiffies read may be either side of it.
    }
    Clock::default()
}

/// The clock from a `/proc/timer_list` read while `CLOCK_MONOTONIC_COARSE` was `coarse`.
fn of_timer_list(text: &str, coarse: u64) -> Option<Clock> {
    let mono: u64 = text.lines().find_map(|l| {
        l.strip_prefix("now at ")?
            .strip_suffix(" nsecs")?
            .parse()
            .ok()
    })?;
    let jiffies: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("jiffies: ")?.trim().parse().ok())?;
    let hz = hz_of(jiffies, mono)?;
    // The kernel's TICK_NSEC.
    let jiffy_ns = (1_000_000_000 + hz / 2) / hz;
    Some(Clock {
        jiffy_ns,
        offset_ns: coarse.wrapping_sub(jiffies.wrapping_mul(jiffy_ns)),
    })
}

/// The kernel's HZ, which no file states: jiffies start at 2³² − 300·HZ (Linux's
/// `INITIAL_JIFFIES`, so that 32 bits wrap five minutes after boot) and the monotonic clock
/// at 0, so the ticks since boot at the right HZ span the clock's `mono` nanoseconds, within
/// the moments the two started apart. Near that wrap, five minutes after boot, every HZ
/// fits: `None` then, and where none or several fit.
fn hz_of(jiffies: u64, mono: u64) -> Option<u64> {
    const SLACK_NS: u64 = 2_000_000_000;
    let mut fits = [100u64, 250, 300, 1000].into_iter().filter(|&hz| {
        let Some(ticks) = jiffies.checked_sub((1u64 << 32) - 300 * hz) else {
            return false;
        };
        let since_boot = u128::from(ticks) * 1_000_000_000 / u128::from(hz);
        since_boot.abs_diff(u128::from(mono)) <= u128::from(SLACK_NS)
    });
    let hz = fits.next()?;
    fits.next().is_none().then_some(hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The start of a real `/proc/timer_list` (HZ 250, 2,432 s after boot) and one of its
    /// tick device lines.
    const TIMER_LIST: &str = "Timer List Version: v0.10\nHRTIMER_MAX_CLOCK_BASES: 8\nnow at 2432051305484 nsecs\n\ncpu: 0\n  .idle_jiffies   : 4295500242\n  .last_jiffies   : 4295500243\njiffies: 4295500243\n";

    #[test]
    fn the_hz_is_the_one_whose_ticks_since_boot_span_the_monotonic_clock() {
        let c = of_timer_list(TIMER_LIST, 2_432_048_000_000).expect("calibrated");
        assert_eq!(c.jiffy_ns, 4_000_000, "HZ 250");
        // The programs' time for that tick is the coarse clock's.
        assert_eq!(
            4_295_500_243u64
                .wrapping_mul(c.jiffy_ns)
                .wrapping_add(c.offset_ns),
            2_432_048_000_000
        );
        // Each HZ, a minute and a day after boot.
        for hz in [100u64, 250, 300, 1000] {
            for secs in [60u64, 86_400] {
                let jiffies = (1u64 << 32) - 300 * hz + secs * hz;
                assert_eq!(hz_of(jiffies, secs * 1_000_000_000 + 300_000_000), Some(hz));
            }
        }
    }

    #[test]
    fn no_calibration_where_the_hz_cannot_be_told() {
        // Five minutes after boot every HZ's jiffies are 2³².
        assert_eq!(hz_of(1 << 32, 300_000_000_000), None);
        // Jiffies that fit no HZ, and a file without them.
        assert_eq!(hz_of(12_345, 2_432_051_305_484), None);
        assert_eq!(of_timer_list("now at 5 nsecs\n", 5), None);
    }
}
