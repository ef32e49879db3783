//! Sampling: what replay hands the trainer next.
//!
//! - [`limiter`]: a samples-per-insert rate limiter (as DeepMind's Reverb has), so the trainer
//!   neither overfits a trickle of new data nor stalls the fleet;
//! - [`weights`]: how much each row counts, from what people and the world said — Sirius-style
//!   intervention weighting (an expert's correction up, the robot's own steps just before it
//!   down), episode rewards and operators' preferences;
//! - [`sampler`]: which rows to draw — uniform, recency-weighted, balanced per robot or task, and
//!   a mix of fresh fleet data with a retained share of older data (against forgetting).
//!
//! Pure logic over row descriptors: the replay actor feeds it from the datasets on disk, and the
//! training windows themselves come from `nanobot_policy::train`.

pub mod limiter;
pub mod sampler;
pub mod weights;

pub use limiter::RateLimiter;
pub use sampler::{RowMeta, Sampler, Strategy};
pub use weights::{EpisodeFeedback, RowKind, WeightConfig};

/// SplitMix64: the same draws from the same seed everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
