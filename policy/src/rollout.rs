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

use crate::preprocess::Step;
use crate::runner::{Request, Runner, RunnerError};

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
    tokens: VecDeque<(u64, Vec<f32>)>,
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
        infer_batch(runner, &mut [(self, seed)])
            .pop()
            .unwrap_or_else(|| Err(RunnerError::Input("no chunk".into())))
    }

    /// The observation seqs of the chunk's window, oldest first (a short history repeats its
    /// first step, as `Runner::act` does).
    fn window(&self) -> Vec<usize> {
        (0..self.n_obs)
            .map(|k| (self.history.len() as isize - self.n_obs as isize + k as isize).max(0) as usize)
            .collect()
    }
}

/// The chunks of several rollouts (robots) computed as one batch: the frames none of them has
/// tokens for yet go through the vision encoder together, then every chunk through the trunk
/// and the denoiser together. Each rollout keeps its own history, tokens and plan; one whose
/// inputs are wrong gets its error without failing the others. The results are in `items`'
/// order.
pub fn infer_batch(runner: &Runner, items: &mut [(&mut Rollout, u64)]) -> Vec<Result<Vec<f32>, RunnerError>> {
    let mut out: Vec<Option<Result<Vec<f32>, RunnerError>>> = (0..items.len()).map(|_| None).collect();
    // Requests, and the frames still to encode.
    let mut requests: Vec<Option<Request>> = Vec::with_capacity(items.len());
    let mut missing: Vec<(usize, u64)> = Vec::new();
    for (i, (r, seed)) in items.iter().enumerate() {
        if r.history.is_empty() {
            out[i] = Some(Err(RunnerError::Input("no observation".into())));
            requests.push(None);
            continue;
        }
        // The window's steps by reference: no frame is copied to make a request.
        let window: Vec<&Step> = r.window().into_iter().map(|k| &r.history[k].1).collect();
        match runner.request_window(&window, r.task, *seed) {
            Ok(q) => requests.push(Some(q)),
            Err(e) => {
                out[i] = Some(Err(e));
                requests.push(None);
                continue;
            }
        }
        for k in r.window() {
            let seq = r.history[k].0;
            if !r.tokens.iter().any(|(s, _)| *s == seq) && !missing.contains(&(i, seq)) {
                missing.push((i, seq));
            }
        }
    }
    if !missing.is_empty() {
        let steps: Vec<&Step> = missing
            .iter()
            .map(|&(i, seq)| {
                let r = &items[i].0;
                &r.history
                    .iter()
                    .find(|(s, _)| *s == seq)
                    .expect("a window's seq is in the history")
                    .1
            })
            .collect();
        match runner.frame_tokens(&steps) {
            Ok(tokens) => {
                for (&(i, seq), t) in missing.iter().zip(tokens) {
                    items[i].0.tokens.push_back((seq, t));
                }
            }
            Err(e) => {
                let why = e.to_string();
                for &(i, _) in &missing {
                    out[i].get_or_insert_with(|| Err(RunnerError::Input(why.clone())));
                }
            }
        }
    }
    // One batch of every request still standing.
    let live: Vec<usize> = (0..items.len()).filter(|&i| out[i].is_none()).collect();
    let windows: Vec<Vec<&[f32]>> = live
        .iter()
        .map(|&i| {
            let r = &items[i].0;
            r.window()
                .into_iter()
                .map(|k| {
                    let seq = r.history[k].0;
                    r.tokens
                        .iter()
                        .find(|(s, _)| *s == seq)
                        .map(|(_, t)| t.as_slice())
                        .expect("every window frame was encoded above")
                })
                .collect()
        })
        .collect();
    let inputs: Vec<_> = live
        .iter()
        .zip(&windows)
        .map(|(&i, w)| requests[i].as_ref().expect("a live request").input(w))
        .collect();
    match runner.chunks(&inputs) {
        Ok(chunks) => {
            for (&i, c) in live.iter().zip(chunks) {
                out[i] = Some(Ok(c));
            }
        }
        Err(e) => {
            let why = e.to_string();
            for &i in &live {
                out[i] = Some(Err(RunnerError::Input(why.clone())));
            }
        }
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(RunnerError::Input("no chunk".into()))))
        .collect()
}

impl Rollout {
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
