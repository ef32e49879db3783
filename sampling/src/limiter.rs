//! A samples-per-insert rate limiter, as Reverb's `SampleToInsertRatio`: after `min_size`
//! inserts, the trainer may draw samples while `samples ≤ samples_per_insert · inserts +
//! error_buffer`. Inserts are never refused — robots keep logging whatever the trainer does —
//! so a fast fleet only means a lower ratio, and a trickle of new data cannot be overfit: the
//! trainer waits for it.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RateLimiter {
    pub samples_per_insert: f64,
    /// Rows needed before the first sample.
    pub min_size: u64,
    /// How far sampling may run ahead of the ratio, in samples.
    pub error_buffer: f64,
    inserts: u64,
    samples: u64,
}

impl RateLimiter {
    pub fn new(samples_per_insert: f64, min_size: u64, error_buffer: f64) -> RateLimiter {
        RateLimiter {
            samples_per_insert,
            min_size,
            error_buffer,
            inserts: 0,
            samples: 0,
        }
    }

    pub fn insert(&mut self, rows: u64) {
        self.inserts += rows;
    }

    /// Whether `n` more samples keep to the ratio.
    pub fn can_sample(&self, n: u64) -> bool {
        self.inserts >= self.min_size
            && (self.samples + n) as f64 <= self.samples_per_insert * self.inserts as f64 + self.error_buffer
    }

    /// Take `n` samples if the ratio allows; false means wait for more inserts.
    pub fn try_sample(&mut self, n: u64) -> bool {
        let ok = self.can_sample(n);
        if ok {
            self.samples += n;
        }
        ok
    }

    /// Inserts still needed before `n` samples are allowed.
    pub fn inserts_needed(&self, n: u64) -> u64 {
        let by_ratio = if self.samples_per_insert > 0.0 {
            let need = ((self.samples + n) as f64 - self.error_buffer) / self.samples_per_insert;
            (need.ceil().max(0.0) as u64).saturating_sub(self.inserts)
        } else {
            0
        };
        by_ratio.max(self.min_size.saturating_sub(self.inserts))
    }

    pub fn inserts(&self) -> u64 {
        self.inserts
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Samples drawn per row inserted so far.
    pub fn ratio(&self) -> f64 {
        self.samples as f64 / self.inserts.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fleet inserting `per_tick` rows every tick and a trainer that can take one batch of
    /// `batch` per `train_every` ticks when the limiter allows: (ratio, ticks the trainer waited).
    fn run(per_tick: u64, batch: u64, train_every: u64, ticks: u64) -> (RateLimiter, u64) {
        let mut l = RateLimiter::new(4.0, 64, 64.0);
        let mut waited = 0;
        for t in 0..ticks {
            l.insert(per_tick);
            if t % train_every == 0 && !l.try_sample(batch) {
                waited += 1;
            }
        }
        (l, waited)
    }

    #[test]
    fn a_slow_fleet_cannot_be_overfit() {
        // 1 row a tick, a trainer that could take 32 every tick: it is held to 4 per row.
        let (l, waited) = run(1, 32, 1, 10_000);
        assert!((l.ratio() - 4.0).abs() < 0.05, "ratio {}", l.ratio());
        assert!(l.samples() as f64 <= 4.0 * l.inserts() as f64 + 64.0);
        assert!(waited > 5_000, "the trainer waited {waited} times");
    }

    #[test]
    fn a_fast_fleet_never_makes_the_trainer_wait() {
        // 100 rows a tick, a trainer taking 32 every tick: below the ratio, never held back.
        let (l, waited) = run(100, 32, 1, 1_000);
        assert_eq!(waited, 0);
        assert!((l.ratio() - 0.32).abs() < 0.01, "ratio {}", l.ratio());
    }

    #[test]
    fn nothing_is_sampled_before_min_size_and_the_wait_is_known() {
        let mut l = RateLimiter::new(2.0, 100, 0.0);
        l.insert(99);
        assert!(!l.try_sample(1));
        assert_eq!(l.inserts_needed(1), 1);
        l.insert(1);
        assert!(l.try_sample(200));
        assert!(!l.try_sample(1));
        assert_eq!(l.inserts_needed(32), 16);
    }
}
