//! A rollout: one robot (or one HTTP client) driven by the policy over time. It holds what
//! acting needs beyond the weights: the last `n_obs_steps` observations, the chunk being
//! executed (the plan), the receding-horizon schedule and blending, and the vision tokens of
//! the frames still in the history, keyed by observation sequence number.
//!
//! A chunk answering observation `s` holds the actions for ticks `s ..< s+horizon` (action `k`
//! for tick `s+k`, as training pairs a row's action with its observation); the robot, which
//! gets it a tick or more later, skips the ones whose ticks have passed. Once `n_action_steps −
//! lead − 1` ticks of it have passed the next chunk is due, so it is out before the current one
//! runs out; where the new chunk overlaps the old, its first `blend` actions are
//! cross-faded from old to new. A new episode (or `reset`) starts the history afresh and voids
//! the plan.

use std::collections::VecDeque;

use candle_core::Tensor;

use crate::preprocess::Step;
use crate::runner::{Runner, RunnerError};

/// How a rollout schedules chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Actions executed from each chunk before the next one takes over.
    pub n_action_steps: usize,
    /// Ticks of headroom: the next chunk is computed this many ticks before it is due.
    pub lead: usize,
    /// Overlapping actions cross-faded from the old chunk to the new one.
    pub blend: usize,
}

/// The chunk the robot is executing: actions for ticks `start ..`.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub start: u64,
    pub actions: Vec<f32>,
}

/// A chunk ready to send: the (blended) actions for ticks `obs_seq ..`.
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    pub obs_seq: u64,
    pub actions: Vec<f32>,
    /// The previous plan had run out before this chunk came (the robot waited).
    pub missed_deadline: bool,
}

pub struct Rollout {
    schedule: Schedule,
    n_obs: usize,
    horizon: usize,
    dim: usize,
    episode: Option<u64>,
    /// `(observation seq, step)`, oldest first, at most `n_obs`.
    history: VecDeque<(u64, Step)>,
    /// Vision tokens of history frames, by observation seq.
    tokens: VecDeque<(u64, Tensor)>,
    task: u32,
    plan: Option<Plan>,
}

impl Rollout {
    /// A rollout for `runner`'s policy; `n_action_steps` defaults to the config's.
    pub fn new(
        runner: &Runner,
        n_action_steps: Option<usize>,
        lead: usize,
        blend: usize,
    ) -> Result<Rollout, RunnerError> {
        let c = runner.config();
        let n_action_steps = n_action_steps.unwrap_or(c.head.n_action_steps);
        if n_action_steps == 0 || n_action_steps > c.head.horizon {
            return Err(RunnerError::Input(format!(
                "n_action_steps {n_action_steps} must be within 1..={} (the horizon)",
                c.head.horizon
            )));
        }
        Ok(Rollout {
            schedule: Schedule {
                n_action_steps,
                lead,
                blend,
            },
            n_obs: c.trunk.n_obs_steps,
            horizon: c.head.horizon,
            dim: c.head.action_dim,
            episode: None,
            history: VecDeque::new(),
            tokens: VecDeque::new(),
            task: 0,
            plan: None,
        })
    }

    /// Forget the history, the cached tokens and the plan.
    pub fn reset(&mut self) {
        self.episode = None;
        self.history.clear();
        self.tokens.clear();
        self.plan = None;
    }

    /// Forget the vision tokens kept for the history (the weights that made them changed); the
    /// history and the plan stay, so the robot misses no tick.
    pub fn forget_tokens(&mut self) {
        self.tokens.clear();
    }

    /// Record observation `seq` of `episode`; true when a new chunk is due now.
    pub fn observe(&mut self, episode: u64, seq: u64, task: u32, step: Step) -> bool {
        if self.episode != Some(episode) || self.history.back().is_some_and(|(s, _)| *s >= seq) {
            // A new episode, or the robot's sequence went back (a restart): start afresh.
            self.reset();
            self.episode = Some(episode);
        }
        self.task = task;
        self.history.push_back((seq, step));
        while self.history.len() > self.n_obs {
            self.history.pop_front();
        }
        let oldest = self.history.front().map(|(s, _)| *s).unwrap_or(seq);
        self.tokens.retain(|(s, _)| *s >= oldest);
        self.due(seq)
    }

    /// Whether, at observation `seq`, the next chunk should be computed.
    pub fn due(&self, seq: u64) -> bool {
        match &self.plan {
            None => true,
            Some(p) => {
                seq.saturating_add(1 + self.schedule.lead as u64)
                    >= p.start.saturating_add(self.schedule.n_action_steps as u64)
            }
        }
    }

    /// The chunk for the newest observation (the model's arithmetic: call it off the async
    /// runtime). Frames already seen reuse their vision tokens. `seed` draws the start noise.
    pub fn infer(&mut self, runner: &Runner, seed: u64) -> Result<Vec<f32>, RunnerError> {
        if self.history.is_empty() {
            return Err(RunnerError::Input("no observation".into()));
        }
        let mut tokens = Vec::with_capacity(self.n_obs);
        // A short history repeats its first step, as `Runner::batch` does.
        for k in 0..self.n_obs {
            let i = (self.history.len() as isize - self.n_obs as isize + k as isize).max(0) as usize;
            let (seq, step) = &self.history[i];
            let tok = match self.tokens.iter().find(|(s, _)| s == seq) {
                Some((_, t)) => t.clone(),
                None => {
                    let t = runner.frame_tokens(step)?;
                    self.tokens.push_back((*seq, t.clone()));
                    t
                }
            };
            tokens.push(tok);
        }
        let steps: Vec<Step> = self.history.iter().map(|(_, s)| s.clone()).collect();
        runner.act_with_tokens(&steps, &tokens, self.task, seed)
    }

    /// Adopt `actions`, computed for observation `obs_seq`, as the plan: blended with what the
    /// old plan still holds for the same ticks. `newest_seq` is the newest observation seen by
    /// now (a deadline was missed if the old plan had run out by then).
    pub fn adopt(&mut self, obs_seq: u64, actions: Vec<f32>, newest_seq: u64) -> Chunk {
        let start = obs_seq;
        let (actions, missed_deadline) = match &self.plan {
            Some(p) => (
                blend(p.start, &p.actions, start, &actions, self.dim, self.schedule.blend),
                newest_seq >= p.start.saturating_add(self.horizon as u64),
            ),
            None => (actions, false),
        };
        self.plan = Some(Plan {
            start,
            actions: actions.clone(),
        });
        Chunk {
            obs_seq,
            actions,
            missed_deadline,
        }
    }
}

/// Cross-fade `new` (for ticks `start..`) with what `old` still holds for the same ticks: the
/// first `blend` overlapping actions move linearly from old to new.
pub fn blend(old_start: u64, old: &[f32], new_start: u64, new: &[f32], dim: usize, blend: usize) -> Vec<f32> {
    let mut out = new.to_vec();
    for k in 0..blend {
        let tick = new_start + k as u64;
        let Some(j) = tick.checked_sub(old_start).map(|j| j as usize) else {
            continue;
        };
        if (j + 1) * dim > old.len() || (k + 1) * dim > new.len() {
            break;
        }
        let w = (k + 1) as f32 / (blend + 1) as f32;
        for d in 0..dim {
            out[k * dim + d] = (1.0 - w) * old[j * dim + d] + w * new[k * dim + d];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::blend;

    #[test]
    fn blending_fades_from_the_old_chunk_to_the_new() {
        // Old chunk from tick 10, 1-D actions 0..16; new chunk from tick 16, all 100.
        let old: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let new = vec![100.0; 16];
        let out = blend(10, &old, 16, &new, 1, 3);
        // Ticks 16, 17, 18 overlap old actions 6, 7, 8 with weights 1/4, 2/4, 3/4 on the new.
        assert_eq!(
            &out[..4],
            &[0.75 * 6.0 + 25.0, 0.5 * 7.0 + 50.0, 0.25 * 8.0 + 75.0, 100.0]
        );
        assert_eq!(&out[4..], &new[4..]);
        // No overlap (the old chunk ended): the new chunk as it is.
        assert_eq!(blend(0, &old[..4], 16, &new, 1, 3), new);
    }
}
