//! `policy`: the trained policy driving a robot. It follows the robot's observations
//! (`{fleet}/{robot}/obs`, latest-only), keeps the last `n_obs_steps` of them, and plans with a
//! receding horizon: a chunk of `horizon` actions answers observation `s` and covers ticks
//! `s+1 ..= s+horizon`; once the robot has executed `n_action_steps − lead` of them the next
//! chunk is computed, so it is out before the current one runs out. Where the new chunk
//! overlaps the old, the first `blend` actions are cross-faded from old to new (all of it is
//! `nanobot_policy::rollout::Rollout`, which `nanobot serve` uses too). JPEG decoding and
//! inference run on a blocking thread, so the bus is never held up; a chunk published after the
//! previous one ran out counts as a missed deadline. Every chunk carries the policy and adapter
//! versions.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use nanobot_messages::{topics, ActionChunk, ActionSource, Observation, TraceContext};
use nanobot_policy::preprocess::step_of;
use nanobot_policy::rollout::Rollout;
use nanobot_policy::runner::Runner;
use serde::Deserialize;

use crate::bus::{Inbox, Keep, PubQos, Publisher, Received};
use crate::runtime::{ActorError, Ctx, Input, Metrics, NodeActor};

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

pub struct PolicyActor {
    cfg: PolicyActorConfig,
    robot: String,
    runner: Arc<Runner>,
    pool: Arc<rayon::ThreadPool>,
    /// Taken while a blocking task decodes and infers with it.
    rollout: Option<Rollout>,
    obs: Inbox<Received<Observation>>,
    act: Publisher<ActionChunk>,
    chunks: u64,
    missed: u64,
    last_ms: f64,
}

/// The policy actor's one event: an observation is waiting.
#[derive(Clone, Copy, Debug)]
pub struct ObservationWaiting;

/// What the blocking side made of one observation.
enum Outcome {
    /// Not usable (the reason names the field).
    Refused(String),
    /// In the history; no chunk due yet.
    Recorded,
    Chunk(Result<Vec<f32>, String>),
}

impl NodeActor for PolicyActor {
    const KIND: &'static str = "policy";
    type Config = PolicyActorConfig;
    type Event = ObservationWaiting;

    async fn start(ctx: &Ctx<Self>, cfg: PolicyActorConfig) -> Result<Self, ActorError> {
        if cfg.rate_hz.is_nan() || cfg.rate_hz <= 0.0 || cfg.threads == 0 {
            return Err(ctx.config_error("rate_hz and threads must be positive"));
        }
        let robot = ctx.robot()?.to_string();
        let fleet = ctx.fleet();
        let (path, adapter) = (cfg.checkpoint.clone(), cfg.adapter.clone());
        let runner = tokio::task::spawn_blocking(move || Runner::load(&path, adapter.as_deref()))
            .await
            .map_err(|e| ctx.failed(format!("loading the policy: {e}")))?
            .map_err(|e| ctx.config_error(format!("policy {}: {e}", cfg.checkpoint.display())))?;
        let rollout = Rollout::new(&runner, cfg.n_action_steps, cfg.lead, cfg.blend)
            .map_err(|e| ctx.config_error(e.to_string()))?;
        tracing::info!(robot, version = %runner.meta.version, adapter = %runner.adapter_version(), format = %runner.format, "policy loaded");
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads)
            .thread_name(|i| format!("nb-policy-{i}"))
            .build()
            .map_err(|e| ctx.config_error(e.to_string()))?;
        let obs = ctx
            .subscribe(
                "obs",
                &topics::obs(fleet, &robot),
                Keep::Latest,
                Some(|| ObservationWaiting),
            )
            .await?;
        let act = ctx
            .bus
            .publisher(&topics::act(fleet, &robot), &robot, PubQos::Control)
            .await
            .map_err(ctx.bus_err())?;
        Ok(PolicyActor {
            runner: Arc::new(runner),
            pool: Arc::new(pool),
            rollout: Some(rollout),
            cfg,
            robot,
            obs,
            act,
            chunks: 0,
            missed: 0,
            last_ms: 0.0,
        })
    }

    async fn handle(&mut self, ctx: &Ctx<Self>, _input: Input<ObservationWaiting>) -> Result<(), ActorError> {
        let Some(r) = self.obs.take() else { return Ok(()) };
        let c = &ctx.counters;
        let seq = r.header.seq;
        let o = r.msg;
        let (runner, pool) = (self.runner.clone(), self.pool.clone());
        let mut rollout = self.rollout.take().ok_or_else(|| ctx.failed("rollout lost"))?;
        let (episode, task) = (o.episode, o.task);
        let t0 = Instant::now();
        // JPEG decoding and the model's arithmetic run on the policy's own pool, off the bus.
        let joined = tokio::task::spawn_blocking(move || {
            let step = match step_of(&o).map_err(|e| e.to_string()).and_then(|st| {
                runner.check(&st).map_err(|e| e.to_string())?;
                Ok(st)
            }) {
                Ok(st) => st,
                Err(e) => return (rollout, Outcome::Refused(e)),
            };
            if !rollout.observe(episode, seq, task, step) {
                return (rollout, Outcome::Recorded);
            }
            let a = pool.install(|| rollout.infer(&runner, seq)).map_err(|e| e.to_string());
            (rollout, Outcome::Chunk(a))
        })
        .await
        .map_err(|e| ctx.failed(format!("inference thread: {e}")))?;
        let (rollout, outcome) = joined;
        let rollout = self.rollout.insert(rollout);
        let actions = match outcome {
            Outcome::Refused(e) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(robot = %self.robot, seq, "observation not usable: {e}");
                return Ok(());
            }
            Outcome::Recorded => return Ok(()),
            Outcome::Chunk(Err(e)) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(robot = %self.robot, seq, "inference failed: {e}");
                return Ok(());
            }
            Outcome::Chunk(Ok(a)) => a,
        };
        self.last_ms = t0.elapsed().as_secs_f64() * 1e3;
        // The robot has moved on while we computed: the old chunk ran out first?
        let newest = self.obs.peek(|r| r.header.seq).unwrap_or(seq);
        let planned = rollout.adopt(seq, actions, newest);
        self.missed += planned.missed_deadline as u64;
        let head = &self.runner.config().head;
        let chunk = ActionChunk {
            obs_seq: seq,
            dt_ns: (1e9 / self.cfg.rate_hz as f64) as u64,
            horizon: head.horizon as u32,
            action_dim: head.action_dim as u32,
            actions: planned.actions,
            source: ActionSource::Policy,
            policy_version: self.runner.meta.version.clone(),
            adapter_version: self.runner.adapter_version(),
        };
        let trace = r.trace.map(|t| t.child()).unwrap_or_else(TraceContext::new_root);
        match self.act.put_traced(&chunk, &trace).await {
            Ok(_) => {
                self.chunks += 1;
                c.handled.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(robot = %self.robot, error = %e, "action chunk not published");
            }
        }
        Ok(())
    }

    fn metrics(&self, m: &mut Metrics) {
        m.set("chunks", self.chunks as f64);
        m.set("missed_deadlines", self.missed as f64);
        m.set("inference_ms", self.last_ms);
    }
}
