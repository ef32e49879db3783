//! `policy`: the trained policy driving a robot. It follows the robot's observations
//! (`{fleet}/{robot}/obs`, latest-only), keeps the last `n_obs_steps` of them, and plans with a
//! receding horizon: a chunk of `horizon` actions answers observation `s` and covers ticks
//! `s+1 ..= s+horizon`; once the robot has executed `n_action_steps − lead` of them the next
//! chunk is computed, so it is out before the current one runs out. Where the new chunk
//! overlaps the old, the first `blend` actions are cross-faded from old to new. Inference runs
//! on a blocking thread, so the bus is never held up; a chunk published after the previous one
//! ran out counts as a missed deadline. Every chunk carries the policy and adapter versions.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use nanobot_messages::{topics, ActionChunk, ActionSource, Encoding, Observation, TraceContext};
use nanobot_policy::runner::{Runner, Step};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::Deserialize;

use crate::bus::{Latest, PubQos, Publisher};
use crate::ingest::decode_jpeg_rgb;
use crate::node::{ActorContext, Presence};

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyActorConfig {
    /// A safetensors base checkpoint or a GGUF export.
    pub checkpoint: PathBuf,
    /// A LoRA adapter for the base.
    pub adapter: Option<PathBuf>,
    /// The robot's control rate (the chunk's time step).
    pub rate_hz: f32,
    /// Actions executed from each chunk before the next one takes over (default: the
    /// config's `n_action_steps`).
    pub n_action_steps: Option<usize>,
    /// Ticks of headroom: the next chunk is computed this many ticks before it is due.
    pub lead: usize,
    /// Overlapping actions cross-faded from the old chunk to the new one.
    pub blend: usize,
    /// Threads for the model's arithmetic (1 is fastest for small models).
    pub threads: usize,
}

impl Default for PolicyActorConfig {
    fn default() -> Self {
        PolicyActorConfig {
            checkpoint: PathBuf::from("policy.safetensors"),
            adapter: None,
            rate_hz: 20.0,
            n_action_steps: None,
            lead: 2,
            blend: 4,
            threads: 1,
        }
    }
}

/// The chunk the robot is executing: actions for ticks `start ..`.
#[derive(Clone, Debug)]
struct Plan {
    start: u64,
    actions: Vec<f32>,
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

/// An observation as the policy's input step: the image decoded to RGB8.
pub fn step_of(o: &Observation) -> Result<Step, String> {
    let bytes = o.image.data.to_bytes();
    let rgb = match o.image.encoding {
        Encoding::Jpeg => decode_jpeg_rgb(&bytes)
            .map(|(_, _, px)| px)
            .map_err(|e| format!("image: {e}"))?,
        Encoding::Rgb8 => bytes.to_vec(),
        other => return Err(format!("image encoding {other:?}: send Jpeg or Rgb8")),
    };
    Ok(Step {
        rgb,
        state: o.state.clone(),
        surface: o.surface.cells.clone(),
    })
}

pub struct PolicyActor;

pub enum PolicyMsg {
    Wake,
}

pub struct PolicyState {
    cfg: PolicyActorConfig,
    robot: String,
    runner: Arc<Runner>,
    pool: Arc<rayon::ThreadPool>,
    obs: Latest<Observation>,
    act: Publisher<ActionChunk>,
    presence: Presence,
    history: VecDeque<Step>,
    last_episode: Option<u64>,
    plan: Option<Plan>,
    chunks: u64,
    missed: u64,
    last_ms: f64,
}

impl Actor for PolicyActor {
    type Msg = PolicyMsg;
    type State = PolicyState;
    type Arguments = ActorContext;

    async fn pre_start(
        &self,
        myself: ActorRef<PolicyMsg>,
        ctx: ActorContext,
    ) -> Result<PolicyState, ActorProcessingErr> {
        let cfg: PolicyActorConfig = ctx.config()?;
        if cfg.rate_hz.is_nan() || cfg.rate_hz <= 0.0 || cfg.threads == 0 {
            return Err(ctx.config_error("rate_hz and threads must be positive".into()).into());
        }
        let robot = ctx.robot()?.to_string();
        let fleet = ctx.fleet().to_string();
        let runner = Runner::load(&cfg.checkpoint, cfg.adapter.as_deref())
            .map_err(|e| ctx.config_error(format!("policy {}: {e}", cfg.checkpoint.display())))?;
        let c = runner.config();
        if cfg.n_action_steps.unwrap_or(c.head.n_action_steps) > c.head.horizon {
            return Err(ctx
                .config_error(format!("n_action_steps exceeds the horizon {}", c.head.horizon))
                .into());
        }
        tracing::info!(robot, version = %runner.meta.version, adapter = %runner.adapter_version(), format = %runner.format, "policy loaded");
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads)
            .thread_name(|i| format!("nb-policy-{i}"))
            .build()
            .map_err(|e| ctx.config_error(e.to_string()))?;
        let me = myself.clone();
        let obs = ctx
            .bus
            .subscribe_latest::<Observation>(&topics::obs(&fleet, &robot), move || {
                let _ = me.cast(PolicyMsg::Wake);
            })
            .await
            .map_err(ctx.bus_err())?;
        let act = ctx
            .bus
            .publisher(&topics::act(&fleet, &robot), &robot, PubQos::Control)
            .await
            .map_err(ctx.bus_err())?;
        Ok(PolicyState {
            presence: Presence::announce(&ctx).await?,
            runner: Arc::new(runner),
            pool: Arc::new(pool),
            cfg,
            robot,
            obs,
            act,
            history: VecDeque::new(),
            last_episode: None,
            plan: None,
            chunks: 0,
            missed: 0,
            last_ms: 0.0,
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<PolicyMsg>,
        _msg: PolicyMsg,
        s: &mut PolicyState,
    ) -> Result<(), ActorProcessingErr> {
        let Some(r) = s.obs.take() else { return Ok(()) };
        let c = s.presence.counters.clone();
        let seq = r.header.seq;
        let o = r.msg;
        let step = step_of(&o);
        let step = match step.and_then(|st| s.runner.check(&st).map(|_| st).map_err(|e| e.to_string())) {
            Ok(st) => st,
            Err(e) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(robot = %s.robot, seq, "observation not usable: {e}");
                return Ok(());
            }
        };
        if s.last_episode != Some(o.episode) {
            // A new episode: its history starts here, and the old plan is void.
            s.history.clear();
            s.plan = None;
            s.last_episode = Some(o.episode);
        }
        let n_obs = s.runner.config().trunk.n_obs_steps;
        s.history.push_back(step);
        while s.history.len() > n_obs {
            s.history.pop_front();
        }
        let head = &s.runner.config().head;
        let (horizon, dim) = (head.horizon, head.action_dim);
        let n_exec = s.cfg.n_action_steps.unwrap_or(head.n_action_steps);
        let due = match &s.plan {
            None => true,
            Some(p) => seq + 1 + s.cfg.lead as u64 >= p.start + n_exec as u64,
        };
        if !due {
            return Ok(());
        }
        let (runner, pool) = (s.runner.clone(), s.pool.clone());
        let history: Vec<Step> = s.history.iter().cloned().collect();
        let task = o.task;
        let t0 = Instant::now();
        let result = tokio::task::spawn_blocking(move || pool.install(|| runner.act(&history, task, seq))).await;
        s.last_ms = t0.elapsed().as_secs_f64() * 1e3;
        let actions = match result {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(robot = %s.robot, seq, "inference failed: {e}");
                return Ok(());
            }
            Err(e) => return Err(format!("inference thread: {e}").into()),
        };
        let start = seq + 1;
        let actions = match &s.plan {
            Some(p) => {
                // The robot has moved on while we computed: the old chunk ran out first?
                let newest = s.obs.peek_seq().unwrap_or(seq);
                if newest >= p.start + horizon as u64 {
                    s.missed += 1;
                }
                blend(p.start, &p.actions, start, &actions, dim, s.cfg.blend)
            }
            None => actions,
        };
        let chunk = ActionChunk {
            obs_seq: seq,
            dt_ns: (1e9 / s.cfg.rate_hz as f64) as u64,
            horizon: horizon as u32,
            action_dim: dim as u32,
            actions: actions.clone(),
            source: ActionSource::Policy,
            policy_version: s.runner.meta.version.clone(),
            adapter_version: s.runner.adapter_version(),
        };
        let trace = r.trace.map(|t| t.child()).unwrap_or_else(TraceContext::new_root);
        match s.act.put_traced(&chunk, &trace).await {
            Ok(_) => {
                s.chunks += 1;
                c.handled.fetch_add(1, Ordering::Relaxed);
                s.plan = Some(Plan { start, actions });
            }
            Err(e) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(robot = %s.robot, error = %e, "action chunk not published");
            }
        }
        c.dropped.store(s.obs.stats().dropped(), Ordering::Relaxed);
        c.set("chunks", s.chunks as f64);
        c.set("missed_deadlines", s.missed as f64);
        c.set("inference_ms", s.last_ms);
        Ok(())
    }
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
