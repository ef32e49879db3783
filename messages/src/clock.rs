//! The wall clock every envelope is stamped with: nanoseconds since the Unix epoch.
//!
//! Reading the system's real-time clock costs ~50 ns on a virtual machine (the vDSO reads the
//! TSC, then scales it under a sequence lock), a noticeable share of what Zenoh spends on a
//! small message. Where the CPU's time-stamp counter is invariant (it ticks at a constant rate
//! in every power state, as the kernel's `tsc` clock source requires), a stamp here is one TSC
//! read scaled from a per-thread anchor: a (TSC, real-time) pair taken again every
//! [`REANCHOR`], with the TSC's rate measured against the monotonic clock over the process's
//! whole life.
//!
//! A stamp so drifts from the real-time clock by at most the rate's error over one anchor
//! period, and follows every step or slew of the real-time clock within one period. Each clock
//! read is paired with TSC reads at most 50,000 ticks (10–25 µs) apart, so the drift is at most
//! ~25 µs just after calibration and less as the process ages; a test holds stamps within
//! 100 µs. Elsewhere, and during the first [`CALIBRATE`] of a process, a stamp is the system
//! clock read directly.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often a thread takes a new (TSC, real-time) anchor.
pub const REANCHOR: Duration = Duration::from_millis(50);
/// How long the TSC is counted against the monotonic clock before its rate is trusted.
pub const CALIBRATE: Duration = Duration::from_millis(100);

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> u64 {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = tsc::now_ns() {
        return t;
    }
    system_now_ns()
}

/// The system's real-time clock, read directly.
pub fn system_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(target_arch = "x86_64")]
mod tsc {
    use std::cell::Cell;
    use std::sync::OnceLock;
    use std::time::Instant;

    use super::{system_now_ns, CALIBRATE, REANCHOR};

    /// The TSC and the monotonic clock read together when the process first stamped.
    struct Origin {
        tsc: u64,
        at: Instant,
    }

    /// Ticks allowed between the two TSC reads around a clock read: 10 µs at 5 GHz. A thread
    /// preempted between them would pair the clock with a stale count; it reads again.
    const PAIR_TICKS: u64 = 50_000;

    /// `read()` with the TSC count at the same moment (the midpoint of two reads around it);
    /// `None` when every try was interrupted.
    fn paired<T>(read: impl Fn() -> T) -> Option<(u64, T)> {
        for _ in 0..4 {
            let before = rdtsc();
            let value = read();
            let after = rdtsc();
            if after >= before && after - before < PAIR_TICKS {
                return Some((before + (after - before) / 2, value));
            }
        }
        None
    }

    /// One thread's anchor: a stamp is `wall + (tsc - anchor tsc) * ns_per_tick`.
    #[derive(Clone, Copy)]
    struct Anchor {
        tsc: u64,
        wall: u64,
        /// Nanoseconds per tick, 32.32 fixed point.
        ns_per_tick_q32: u64,
        /// Ticks after which the anchor is taken again ([`REANCHOR`]).
        lifetime: u64,
    }

    static ORIGIN: OnceLock<Option<Origin>> = OnceLock::new();

    thread_local! {
        static ANCHOR: Cell<Option<Anchor>> = const { Cell::new(None) };
    }

    fn rdtsc() -> u64 {
        // SAFETY: RDTSC exists on every x86_64 CPU and has no preconditions.
        unsafe { core::arch::x86_64::_rdtsc() }
    }

    /// CPUID leaf 0x8000_0007, EDX bit 8: the TSC is invariant.
    fn invariant_tsc() -> bool {
        // SAFETY: CPUID exists on every x86_64 CPU; extended leaves above the reported maximum
        // are not queried. (Newer compilers call `__cpuid` safe.)
        #[allow(unused_unsafe)]
        unsafe {
            let max = core::arch::x86_64::__cpuid(0x8000_0000).eax;
            max >= 0x8000_0007 && core::arch::x86_64::__cpuid(0x8000_0007).edx & (1 << 8) != 0
        }
    }

    /// A stamp from the TSC; `None` where it cannot be trusted (not invariant, or its rate
    /// not yet measured).
    pub(super) fn now_ns() -> Option<u64> {
        let origin = ORIGIN
            .get_or_init(|| {
                if !invariant_tsc() {
                    return None;
                }
                paired(Instant::now).map(|(tsc, at)| Origin { tsc, at })
            })
            .as_ref()?;
        let tsc = rdtsc();
        ANCHOR.with(|cell| {
            if let Some(a) = cell.get() {
                let ticks = tsc.wrapping_sub(a.tsc);
                // A TSC that went backwards wraps to a huge count and re-anchors.
                if ticks < a.lifetime {
                    // ticks < lifetime (≈ 50 ms of ticks, < 2^31 below 40 GHz) and
                    // ns_per_tick_q32 < 2^32 above 1 GHz: the product fits in u64.
                    return Some(a.wall + ((ticks as u128 * a.ns_per_tick_q32 as u128) >> 32) as u64);
                }
            }
            let anchor = reanchor(origin)?;
            cell.set(Some(anchor));
            Some(anchor.wall)
        })
    }

    fn reanchor(origin: &Origin) -> Option<Anchor> {
        let (now, elapsed) = paired(|| origin.at.elapsed())?;
        let ticks = now.wrapping_sub(origin.tsc);
        if elapsed < CALIBRATE || ticks == 0 || ticks > (1 << 62) {
            return None;
        }
        let (tsc, wall) = paired(system_now_ns)?;
        let ns_per_tick_q32 = u64::try_from((elapsed.as_nanos() << 32) / ticks as u128).ok()?;
        if ns_per_tick_q32 == 0 || ns_per_tick_q32 >= (1 << 32) {
            // A TSC slower than 1 GHz or a nonsense measurement: stay on the system clock.
            return None;
        }
        let lifetime = u64::try_from((REANCHOR.as_nanos() << 32) / ns_per_tick_q32 as u128).ok()?;
        Some(Anchor {
            tsc,
            wall,
            ns_per_tick_q32,
            lifetime: lifetime.min(1 << 31),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stamps agree with the system clock within 100 µs, across anchor periods and on several
    /// threads, and never step back more than that on one thread.
    #[test]
    fn stamps_follow_the_system_clock() {
        let check = || {
            let mut last = 0u64;
            let start = std::time::Instant::now();
            let mut worst = 0i64;
            while start.elapsed() < CALIBRATE + 4 * REANCHOR {
                let before = system_now_ns();
                let t = now_ns();
                let after = system_now_ns();
                let off = if t < before {
                    before as i64 - t as i64
                } else if t > after {
                    t as i64 - after as i64
                } else {
                    0
                };
                worst = worst.max(off);
                assert!(t + 100_000 >= last, "a stamp stepped back {} ns", last - t);
                last = t;
                std::thread::sleep(Duration::from_micros(300));
            }
            worst
        };
        let threads: Vec<_> = (0..3).map(|_| std::thread::spawn(check)).collect();
        for t in threads {
            let worst = t.join().unwrap();
            assert!(worst < 100_000, "a stamp was {worst} ns off the system clock");
        }
    }
}
