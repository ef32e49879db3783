//! How much each row counts.
//!
//! Interventions, as Sirius weights them (intervention-weighted behaviour cloning): the rows an
//! expert drove are what the policy most needs to learn, so they count `intervention` times;
//! the robot's own rows just before an intervention are what led to it, so they count only
//! `pre_intervention` (0 drops them); the rest count 1. Episodes are then scaled by what people
//! and the world said of them: a reward (advantage-weighted: `exp(β · (R − baseline))`, capped)
//! and an operator's thumbs-up or -down.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WeightConfig {
    /// Weight of a row the expert drove.
    pub intervention: f32,
    /// How many of the robot's rows before an intervention count as having led to it.
    pub pre_intervention_steps: u64,
    /// Weight of those rows.
    pub pre_intervention: f32,
    /// β of the reward weighting (0: rewards are ignored).
    pub reward_beta: f32,
    /// Cap of the reward factor (and 1 / cap its floor).
    pub max_reward_factor: f32,
    /// Factor of an episode an operator liked, and of one they did not.
    pub thumbs_up: f32,
    pub thumbs_down: f32,
}

impl Default for WeightConfig {
    fn default() -> Self {
        WeightConfig {
            intervention: 2.0,
            pre_intervention_steps: 10,
            pre_intervention: 0.0,
            reward_beta: 1.0,
            max_reward_factor: 4.0,
            thumbs_up: 2.0,
            thumbs_down: 0.0,
        }
    }
}

/// What was said of one episode.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EpisodeFeedback {
    /// Frame ranges `[start, end)` in which the expert drove.
    pub interventions: Vec<(u64, u64)>,
    /// The episode's return, if it has one.
    pub reward: Option<f32>,
    /// An operator's verdict: positive up, negative down.
    pub preference: Option<i8>,
}

/// Which kind of row a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowKind {
    Robot,
    PreIntervention,
    Intervention,
}

impl WeightConfig {
    /// The kind of frame `i` of an episode with `fb`.
    pub fn kind(&self, i: u64, fb: &EpisodeFeedback) -> RowKind {
        let mut sorted = fb.interventions.clone();
        sorted.sort_unstable();
        self.kind_in(i, &sorted)
    }

    /// The kind of frame `i` given intervention ranges `[start, end)` sorted by start and not
    /// overlapping (a binary search: replay asks this for every row it holds).
    pub fn kind_in(&self, i: u64, sorted: &[(u64, u64)]) -> RowKind {
        let next = sorted.partition_point(|(s, _)| *s <= i);
        if next > 0 && i < sorted[next - 1].1 {
            RowKind::Intervention
        } else if next < sorted.len() && i + self.pre_intervention_steps >= sorted[next].0 {
            RowKind::PreIntervention
        } else {
            RowKind::Robot
        }
    }

    /// A row's weight: its kind's, times its episode's factor.
    pub fn weight(&self, kind: RowKind, episode_factor: f32) -> f32 {
        episode_factor
            * match kind {
                RowKind::Robot => 1.0,
                RowKind::PreIntervention => self.pre_intervention,
                RowKind::Intervention => self.intervention,
            }
    }

    /// The episode-level factor: reward (against `baseline`, the mean return) and preference.
    pub fn episode_factor(&self, fb: &EpisodeFeedback, baseline: f32) -> f32 {
        let cap = self.max_reward_factor.max(1.0);
        let reward = match fb.reward {
            Some(r) if self.reward_beta != 0.0 => (self.reward_beta * (r - baseline)).exp().clamp(1.0 / cap, cap),
            _ => 1.0,
        };
        let pref = match fb.preference {
            Some(p) if p > 0 => self.thumbs_up,
            Some(p) if p < 0 => self.thumbs_down,
            _ => 1.0,
        };
        reward * pref
    }

    /// The weight of every frame of an episode of `len` frames.
    pub fn row_weights(&self, len: u64, fb: &EpisodeFeedback, baseline: f32) -> Vec<f32> {
        let f = self.episode_factor(fb, baseline);
        let mut sorted = fb.interventions.clone();
        sorted.sort_unstable();
        (0..len).map(|i| self.weight(self.kind_in(i, &sorted), f)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interventions_count_more_and_what_led_to_them_less() {
        let cfg = WeightConfig {
            pre_intervention_steps: 3,
            pre_intervention: 0.25,
            ..WeightConfig::default()
        };
        let fb = EpisodeFeedback {
            interventions: vec![(10, 14)],
            ..Default::default()
        };
        let w = cfg.row_weights(20, &fb, 0.0);
        assert_eq!(&w[..7], &[1.0; 7]);
        assert_eq!(
            &w[7..10],
            &[0.25; 3],
            "the robot's last 3 steps before the expert took over"
        );
        assert_eq!(&w[10..14], &[2.0; 4], "the expert's steps");
        assert_eq!(&w[14..], &[1.0; 6], "the robot again after the hand-back");
        assert_eq!(cfg.kind(12, &fb), RowKind::Intervention);
    }

    #[test]
    fn rewards_and_preferences_scale_whole_episodes() {
        let cfg = WeightConfig::default();
        let good = EpisodeFeedback {
            reward: Some(1.0),
            ..Default::default()
        };
        let bad = EpisodeFeedback {
            reward: Some(-1.0),
            ..Default::default()
        };
        let (g, b) = (cfg.episode_factor(&good, 0.0), cfg.episode_factor(&bad, 0.0));
        assert!((g - 1f32.exp()).abs() < 1e-6 && (b - (-1f32).exp()).abs() < 1e-6);
        let huge = EpisodeFeedback {
            reward: Some(100.0),
            ..Default::default()
        };
        assert_eq!(cfg.episode_factor(&huge, 0.0), 4.0, "capped");
        let down = EpisodeFeedback {
            preference: Some(-1),
            ..Default::default()
        };
        assert_eq!(
            cfg.row_weights(3, &down, 0.0),
            vec![0.0; 3],
            "a thumbs-down drops the episode"
        );
        let up = EpisodeFeedback {
            preference: Some(1),
            reward: Some(0.0),
            ..Default::default()
        };
        assert_eq!(cfg.row_weights(2, &up, 0.0), vec![2.0; 2]);
    }
}
