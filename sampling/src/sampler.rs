//! Which rows to draw. Every strategy multiplies by the rows' own weights (`weights`), so a
//! dropped row (weight 0) is never drawn.

use serde::{Deserialize, Serialize};

use crate::Rng;

/// What the sampler knows of a row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowMeta {
    /// The robot that recorded it (an index the replay actor assigns).
    pub robot: u32,
    pub task: u32,
    /// Insertion order: larger is newer.
    pub inserted: u64,
    pub weight: f32,
}

/// Groups to balance over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Group {
    Robot,
    Task,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Strategy {
    /// Every row alike.
    Uniform,
    /// A row's chance halves every `half_life` rows inserted after it.
    Recency { half_life: u64 },
    /// Every robot (or task) alike, however many rows each has.
    Balanced { by: Group },
    /// `fresh_fraction` of each batch from the newest `fresh_rows` rows, the rest from the older
    /// ones kept (against forgetting); all fresh while nothing older exists.
    Mix { fresh_fraction: f64, fresh_rows: u64 },
}

/// Draws rows by a strategy. Rows are appended as they are inserted.
pub struct Sampler {
    strategy: Strategy,
    rows: Vec<RowMeta>,
    /// Cumulative draw weights of `rows` (of the older part, for `Mix`), rebuilt when stale.
    cum: Vec<f64>,
    /// For `Mix`: cumulative weights of the fresh part, and where it starts.
    cum_fresh: Vec<f64>,
    fresh_from: usize,
    stale: bool,
}

impl Sampler {
    pub fn new(strategy: Strategy) -> Sampler {
        Sampler {
            strategy,
            rows: Vec::new(),
            cum: Vec::new(),
            cum_fresh: Vec::new(),
            fresh_from: 0,
            stale: true,
        }
    }

    pub fn push(&mut self, row: RowMeta) {
        self.rows.push(row);
        self.stale = true;
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Change a row's weight (an intervention or a preference that came later).
    pub fn set_weight(&mut self, i: usize, weight: f32) {
        if let Some(r) = self.rows.get_mut(i) {
            r.weight = weight;
            self.stale = true;
        }
    }

    fn draw_weights(&self, range: std::ops::Range<usize>) -> Vec<f64> {
        let rows = &self.rows[range];
        let newest = self.rows.iter().map(|r| r.inserted).max().unwrap_or(0);
        match self.strategy {
            Strategy::Uniform | Strategy::Mix { .. } => rows.iter().map(|r| r.weight.max(0.0) as f64).collect(),
            Strategy::Recency { half_life } => rows
                .iter()
                .map(|r| {
                    let age = newest.saturating_sub(r.inserted) as f64;
                    r.weight.max(0.0) as f64 * 0.5f64.powf(age / half_life.max(1) as f64)
                })
                .collect(),
            Strategy::Balanced { by } => {
                let key = |r: &RowMeta| match by {
                    Group::Robot => r.robot,
                    Group::Task => r.task,
                };
                let mut totals = std::collections::HashMap::<u32, f64>::new();
                for r in rows {
                    *totals.entry(key(r)).or_default() += r.weight.max(0.0) as f64;
                }
                rows.iter()
                    .map(|r| {
                        let t = totals[&key(r)];
                        if t > 0.0 {
                            r.weight.max(0.0) as f64 / t
                        } else {
                            0.0
                        }
                    })
                    .collect()
            }
        }
    }

    fn cumulative(w: Vec<f64>) -> Vec<f64> {
        let mut acc = 0.0;
        w.into_iter()
            .map(|x| {
                acc += x;
                acc
            })
            .collect()
    }

    fn rebuild(&mut self) {
        let n = self.rows.len();
        self.fresh_from = match self.strategy {
            Strategy::Mix { fresh_rows, .. } => n.saturating_sub(fresh_rows as usize),
            _ => n,
        };
        self.cum = Self::cumulative(self.draw_weights(0..self.fresh_from));
        self.cum_fresh = Self::cumulative(self.draw_weights(self.fresh_from..n));
        self.stale = false;
    }

    fn pick(cum: &[f64], rng: &mut Rng) -> Option<usize> {
        let total = *cum.last()?;
        if total <= 0.0 {
            return None;
        }
        let x = rng.unit() * total;
        Some(cum.partition_point(|c| *c <= x).min(cum.len() - 1))
    }

    /// `k` row indices (with replacement); fewer when every row weighs 0.
    pub fn sample(&mut self, k: usize, rng: &mut Rng) -> Vec<usize> {
        if self.stale {
            self.rebuild();
        }
        let fresh_k = match self.strategy {
            Strategy::Mix { fresh_fraction, .. } if self.cum.last().is_some_and(|t| *t > 0.0) => {
                (k as f64 * fresh_fraction.clamp(0.0, 1.0)).round() as usize
            }
            Strategy::Mix { .. } => k,
            _ => 0,
        };
        let mut out = Vec::with_capacity(k);
        for j in 0..k {
            let drawn = if j < fresh_k {
                Self::pick(&self.cum_fresh, rng).map(|i| i + self.fresh_from)
            } else {
                Self::pick(&self.cum, rng)
            };
            out.extend(drawn);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: u64, robot: u32, from: u64) -> Vec<RowMeta> {
        (0..n)
            .map(|i| RowMeta {
                robot,
                task: (i % 2) as u32,
                inserted: from + i,
                weight: 1.0,
            })
            .collect()
    }

    fn sampler(strategy: Strategy, rs: &[RowMeta]) -> Sampler {
        let mut s = Sampler::new(strategy);
        rs.iter().for_each(|r| s.push(*r));
        s
    }

    #[test]
    fn uniform_draws_every_row_alike_and_never_a_dropped_one() {
        let mut rs = rows(100, 0, 0);
        rs[7].weight = 0.0;
        let mut s = sampler(Strategy::Uniform, &rs);
        let mut counts = vec![0u32; 100];
        let mut rng = Rng::new(1);
        for i in s.sample(100_000, &mut rng) {
            counts[i] += 1;
        }
        assert_eq!(counts[7], 0);
        let (lo, hi) = counts
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 7)
            .fold((u32::MAX, 0), |(lo, hi), (_, c)| (lo.min(*c), hi.max(*c)));
        assert!(lo > 850 && hi < 1_170, "about 1010 each: {lo}..{hi}");
    }

    #[test]
    fn recency_halves_a_rows_chance_every_half_life() {
        let mut s = sampler(Strategy::Recency { half_life: 100 }, &rows(200, 0, 0));
        let mut rng = Rng::new(2);
        let draws = s.sample(60_000, &mut rng);
        let newer = draws.iter().filter(|i| **i >= 100).count() as f64;
        let older = draws.len() as f64 - newer;
        assert!(
            (newer / older - 2.0).abs() < 0.1,
            "newer half twice as likely: {}",
            newer / older
        );
    }

    #[test]
    fn balancing_gives_a_robot_with_few_rows_its_share() {
        let mut rs = rows(1_000, 0, 0);
        rs.extend(rows(10, 1, 1_000));
        let mut s = sampler(Strategy::Balanced { by: Group::Robot }, &rs);
        let mut rng = Rng::new(3);
        let draws = s.sample(20_000, &mut rng);
        let small = draws.iter().filter(|i| rs[**i].robot == 1).count() as f64 / draws.len() as f64;
        assert!((small - 0.5).abs() < 0.02, "robot 1's share {small}");
    }

    #[test]
    fn a_mix_keeps_a_retained_share_of_older_rows() {
        let mut s = sampler(
            Strategy::Mix {
                fresh_fraction: 0.75,
                fresh_rows: 50,
            },
            &rows(1_000, 0, 0),
        );
        let mut rng = Rng::new(4);
        let draws = s.sample(4_000, &mut rng);
        let fresh = draws.iter().filter(|i| **i >= 950).count();
        assert_eq!(fresh, 3_000, "three quarters of every batch from the newest 50 rows");
        // With nothing older, all fresh.
        let mut young = sampler(
            Strategy::Mix {
                fresh_fraction: 0.75,
                fresh_rows: 50,
            },
            &rows(20, 0, 0),
        );
        assert_eq!(young.sample(10, &mut rng).len(), 10);
    }

    #[test]
    fn later_weights_apply_and_all_zero_draws_nothing() {
        let mut s = sampler(Strategy::Uniform, &rows(3, 0, 0));
        let mut rng = Rng::new(5);
        s.set_weight(0, 0.0);
        s.set_weight(1, 0.0);
        assert!(s.sample(100, &mut rng).iter().all(|i| *i == 2));
        s.set_weight(2, 0.0);
        assert!(s.sample(10, &mut rng).is_empty());
    }
}
