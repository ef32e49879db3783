//! `policy`: the trained policy driving a robot. It follows the robot's observations
//! (`{fleet}/{robot}/obs`, latest-only), keeps the last `n_obs_steps` of them, and plans with a
//! receding horizon: a chunk of `horizon` actions answers observation `s` and holds the actions
//! for ticks `s ..< s+horizon` (the robot skips those already past when it arrives); once
//! `n_action_steps − lead − 1` of its ticks have passed the next chunk is computed, so it is out before the current one runs out. Where the new chunk
//! overlaps the old, the first `blend` actions are cross-faded from old to new (all of it is
//! `nanobot_policy::rollout::Rollout`, which `nanobot serve` uses too). JPEG decoding runs on a
//! blocking thread and inference on the node's policy worker ([`batcher`]), which computes the
//! chunks of every robot of the node that are due together as one batch; the bus is never held
//! up. A chunk published after the previous one ran out counts as a missed deadline. Every chunk
//! carries the policy and adapter versions.
//!
//! Adapters come from the promoter: the rollout on `{fleet}/ckpt/promoted` names the adapter
//! this robot should run; its manifest's signature must verify against the fleet's public key
//! (`trusted_key`), its bytes (fetched from `{fleet}/ckpt/adapter`) must have the manifest's
//! length and sha256, and it must load on this base (its base version, config, every tensor's
//! shape, all finite). It is built on a blocking thread while the current adapter keeps acting,
//! and swapped in between two observations, so no tick is missed. Anything wrong keeps the
//! current adapter and is counted (`adapters_refused`) and reported on `{fleet}/{robot}/policy`,
//! where the robot also says what it runs.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use nanobot_messages::{
    codec::now_ns, topics, ActionChunk, ActionSource, AdapterBytes, AdapterManifest, AdapterRequest, Observation,
    PolicyStatus, Promoted,
};
use nanobot_policy::preprocess::step_of_within;
use nanobot_policy::rollout::Rollout;
use nanobot_policy::runner::Runner;
use serde::Deserialize;

mod batcher;

use batcher::Batcher;

use crate::bus::{Bus, Feeder, HopKind, Inbox, Keep, PubQos, Publisher, Received};
use crate::keys::TrustedKey;
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
    /// Threads of the node's policy worker (shared by the policy actors of a node that give the
    /// same `threads` and `max_batch`; each thread computes one batch at a time).
    pub threads: usize,
    /// The most robots in one batch.
    pub max_batch: usize,
    /// DDIM steps per chunk (default: the checkpoint config's; `nanobot tune` measures fewer
    /// against the actions they change).
    pub ddim_steps: Option<usize>,
    /// Follow the promoter's rollout (`{fleet}/ckpt/promoted`).
    pub promotions: bool,
    /// The fleet's public key (`nanobot keys init`'s `fleet.pub`); `{fleet}` expands. Read when
    /// the first promotion comes; no adapter loads without it.
    pub trusted_key: String,
    /// How long fetching an adapter's bytes may take.
    pub fetch_timeout_ms: u64,
    /// A signed rollout more than this many generations ahead of the one followed is refused
    /// (a promoter that went wrong cannot push the generation out of reach).
    pub max_generation_step: u64,
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
            max_batch: 32,
            ddim_steps: None,
            promotions: true,
            trusted_key: "state/{fleet}/keys/fleet.pub".into(),
            fetch_timeout_ms: 3000,
            max_generation_step: 1_000_000,
        }
    }
}

pub struct PolicyActor {
    cfg: PolicyActorConfig,
    robot: String,
    runner: Arc<Runner>,
    /// The node's policy worker.
    batcher: Arc<Batcher>,
    /// Taken while a blocking task decodes and while the worker infers with it.
    rollout: Option<Rollout>,
    obs: Inbox<Received<Observation>>,
    act: Publisher<ActionChunk>,
    chunks: u64,
    missed: u64,
    last_ms: f64,
    /// Observation-to-chunk times (decode, queue, inference) of the last chunks, ms.
    recent_ms: std::collections::VecDeque<f64>,
    /// Robots in the batch of the last chunks.
    recent_batch: std::collections::VecDeque<usize>,
    /// Observations refused before inference, by reason (a handful of fixed names).
    obs_refused: std::collections::BTreeMap<&'static str, u64>,
    promo: Promotions,
}

/// Chunks the latency and batch figures in Stats are over.
const RECENT: usize = 256;

/// What the policy actor knows of the promoter's rollout.
struct Promotions {
    rollouts: Option<Inbox<Received<Promoted>>>,
    swaps: Inbox<Swap>,
    swap_feeder: Feeder<Swap>,
    status: Publisher<PolicyStatus>,
    key_path: PathBuf,
    key: Option<TrustedKey>,
    /// The sha256 of the adapter acting (empty: the base alone, or the launch file's).
    sha256: String,
    /// The rollout generation acted on, and the adapter being fetched for it.
    generation: u64,
    fetching: Option<String>,
    /// The (generation, sha256) refused last: not tried again when the rollout is announced
    /// again, only when it changes.
    refused_for: Option<(u64, String)>,
    refused: u64,
    /// Rollouts refused whole (unsigned, stale, expired, too far ahead, naming a revoked
    /// adapter): they change nothing, not even the generation followed.
    rollouts_refused: u64,
    swaps_done: u64,
    last_error: String,
}

/// A fetched and built adapter, or why not.
struct Swap {
    generation: u64,
    sha256: String,
    adapter_id: String,
    runner: Result<Runner, String>,
}

/// What wakes the policy actor.
#[derive(Clone, Copy, Debug)]
pub enum PolicyEvent {
    /// An observation is waiting.
    Observation,
    /// The promoter's rollout changed (or was announced again).
    Rollout,
    /// An adapter was fetched and built (or refused).
    Swap,
}

/// What the blocking side made of one observation.
enum Outcome {
    /// Not usable: the reason for counting (`width`, `jpeg`, `shape`, ...) and the message,
    /// which names the field.
    Refused(&'static str, String),
    /// In the history; no chunk due yet.
    Recorded,
    /// In the history, and a chunk is due.
    Due,
}

impl NodeActor for PolicyActor {
    const KIND: &'static str = "policy";
    type Config = PolicyActorConfig;
    type Event = PolicyEvent;

    fn grants(fleet: &str, robots: &[String]) -> crate::access::Grants {
        use nanobot_messages::topics;
        crate::access::Grants::default()
            .put(
                robots
                    .iter()
                    .flat_map(|r| [topics::act(fleet, r), topics::policy_status(fleet, r)]),
            )
            .query([topics::ckpt_adapter(fleet)])
    }

    async fn start(ctx: &Ctx<Self>, cfg: PolicyActorConfig) -> Result<Self, ActorError> {
        if cfg.rate_hz.is_nan() || cfg.rate_hz <= 0.0 || cfg.threads == 0 {
            return Err(ctx.config_error("rate_hz and threads must be positive"));
        }
        let robot = ctx.robot()?.to_string();
        let fleet = ctx.fleet();
        let (path, adapter) = (cfg.checkpoint.clone(), cfg.adapter.clone());
        let steps = cfg.ddim_steps;
        // One copy of the weights per node: the robots of a node that run the same checkpoint
        // share it (and their chunks batch together on the node's policy worker).
        let services = ctx.services.clone();
        let key = format!("policy-runner/{}/{:?}/{steps:?}", path.display(), adapter);
        let runner = tokio::task::spawn_blocking(move || {
            services.get_or_start(&key, || {
                let r = Runner::load(&path, adapter.as_deref()).map_err(|e| e.to_string())?;
                match steps {
                    Some(s) => r.with_sampling_steps(s).map_err(|e| e.to_string()),
                    None => Ok(r),
                }
            })
        })
        .await
        .map_err(|e| ctx.failed(format!("loading the policy: {e}")))?
        .map_err(|e| ctx.config_error(format!("policy {}: {e}", cfg.checkpoint.display())))?;
        let rollout = Rollout::new(&runner, cfg.n_action_steps, cfg.lead, cfg.blend)
            .map_err(|e| ctx.config_error(e.to_string()))?;
        tracing::info!(robot, version = %runner.meta.version, adapter = %runner.adapter_version(), format = %runner.format, "policy loaded");
        let (threads, max_batch) = (cfg.threads, cfg.max_batch);
        let batcher = ctx
            .services
            .get_or_start(&format!("policy-worker/{threads}/{max_batch}"), || {
                Batcher::start(threads, max_batch, 1024)
            })
            .map_err(|e| ctx.failed(e))?;
        let obs = ctx
            .subscribe(
                "obs",
                &topics::obs(fleet, &robot),
                Keep::Latest,
                Some(|| PolicyEvent::Observation),
            )
            .await?;
        let rollouts = if cfg.promotions {
            Some(
                ctx.subscribe(
                    "rollouts",
                    &topics::ckpt_promoted(fleet),
                    Keep::Latest,
                    Some(|| PolicyEvent::Rollout),
                )
                .await?,
            )
        } else {
            None
        };
        let (swap_feeder, swaps) = ctx.input("swaps", Keep::Latest, Some(|| PolicyEvent::Swap));
        let status = ctx
            .publisher(&topics::policy_status(fleet, &robot), &robot, PubQos::Data)
            .await?;
        ctx.every(std::time::Duration::from_secs(2));
        let key_path = ctx.path(&cfg.trusted_key);
        let act = ctx
            .bus
            .publisher(&topics::act(fleet, &robot), &robot, PubQos::Control)
            .await
            .map_err(ctx.bus_err())?;
        Ok(PolicyActor {
            runner,
            batcher,
            rollout: Some(rollout),
            cfg,
            robot,
            obs,
            act,
            chunks: 0,
            missed: 0,
            last_ms: 0.0,
            recent_ms: Default::default(),
            recent_batch: Default::default(),
            obs_refused: Default::default(),
            promo: Promotions {
                rollouts,
                swaps,
                swap_feeder,
                status,
                key_path,
                key: None,
                sha256: String::new(),
                generation: 0,
                fetching: None,
                refused_for: None,
                refused: 0,
                rollouts_refused: 0,
                swaps_done: 0,
                last_error: String::new(),
            },
        })
    }

    async fn handle(&mut self, ctx: &Ctx<Self>, input: Input<PolicyEvent>) -> Result<(), ActorError> {
        match input {
            Input::Event(PolicyEvent::Observation) => self.act(ctx).await,
            Input::Event(PolicyEvent::Rollout) => {
                self.follow_rollout(ctx).await;
                Ok(())
            }
            Input::Event(PolicyEvent::Swap) => {
                self.swap(ctx).await;
                Ok(())
            }
            Input::Tick => {
                self.report().await;
                Ok(())
            }
        }
    }

    fn metrics(&self, m: &mut Metrics) {
        m.set("chunks", self.chunks as f64);
        m.set("missed_deadlines", self.missed as f64);
        m.set("obs_refused", self.obs_refused.values().sum::<u64>() as f64);
        for (reason, n) in &self.obs_refused {
            m.set(format!("obs_refused.{reason}"), *n as f64);
        }
        m.set("inference_ms", self.last_ms);
        m.set("ddim_steps", self.runner.sampling_steps() as f64);
        let mut ms: Vec<f64> = self.recent_ms.iter().copied().collect();
        ms.sort_by(f64::total_cmp);
        let q = |p: f64| {
            ms.get(((ms.len().max(1) - 1) as f64 * p).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        m.set("inference_p50_ms", q(0.5));
        m.set("inference_p99_ms", q(0.99));
        let n = self.recent_batch.len().max(1) as f64;
        m.set("batch_mean", self.recent_batch.iter().sum::<usize>() as f64 / n);
        m.set(
            "worker_batches",
            self.batcher.stats.batches.load(Ordering::Relaxed) as f64,
        );
        m.set(
            "worker_largest_batch",
            self.batcher.stats.largest.load(Ordering::Relaxed) as f64,
        );
        m.set(
            "worker_refused",
            self.batcher.stats.refused.load(Ordering::Relaxed) as f64,
        );
        m.set("adapter_generation", self.promo.generation as f64);
        m.set("adapters_swapped", self.promo.swaps_done as f64);
        m.set("adapters_refused", self.promo.refused as f64);
        m.set("rollouts_refused", self.promo.rollouts_refused as f64);
    }
}

impl PolicyActor {
    async fn report(&self) {
        let s = PolicyStatus {
            base_version: self.runner.meta.version.clone(),
            adapter_id: self.runner.adapter_version(),
            generation: self.promo.generation,
            refused: self.promo.refused,
            last_error: self.promo.last_error.clone(),
        };
        if let Err(e) = self.promo.status.put(&s).await {
            tracing::debug!(robot = %self.robot, error = %e, "policy status not published");
        }
    }

    fn refuse(&mut self, ctx: &Ctx<Self>, generation: u64, sha256: &str, what: &str, why: String) {
        self.promo.refused += 1;
        self.promo.refused_for = Some((generation, sha256.to_string()));
        self.promo.generation = generation;
        ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(robot = %self.robot, generation, "adapter {what} refused, keeping {:?}: {why}", self.runner.adapter_version());
        self.promo.last_error = format!("{what}: {why}");
    }

    /// The rollout says which adapter this robot runs: start fetching it if it is not the one
    /// acting (the signature is checked before anything is fetched).
    async fn follow_rollout(&mut self, ctx: &Ctx<Self>) {
        let Some(p) = self.promo.rollouts.as_ref().and_then(|r| r.take()).map(|r| r.msg) else {
            return;
        };
        // Generation 0: nothing was ever promoted; the launch file's adapter stands.
        if p.generation == 0 {
            return;
        }
        if let Err(why) = self.check_rollout(&p) {
            self.promo.rollouts_refused += 1;
            self.promo.refused += 1;
            ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(robot = %self.robot, generation = p.generation, "rollout refused, keeping {:?}: {why}", self.runner.adapter_version());
            self.promo.last_error = format!("rollout {}: {why}", p.generation);
            self.report().await;
            return;
        }
        let want: Option<AdapterManifest> = p.for_robot(&self.robot).cloned();
        let want_sha = want.as_ref().map(|m| m.sha256.clone()).unwrap_or_default();
        if want_sha == self.promo.sha256 && (want.is_some() || self.runner.adapter.is_none()) {
            if self.promo.generation != p.generation {
                self.promo.generation = p.generation;
                self.promo.last_error.clear();
                self.report().await;
            }
            return;
        }
        if self.promo.fetching.as_deref() == Some(want_sha.as_str())
            || self.promo.refused_for == Some((p.generation, want_sha.clone()))
        {
            return;
        }
        let what = want
            .as_ref()
            .map(|m| m.adapter_id.clone())
            .unwrap_or_else(|| "base".into());
        if let Some(m) = &want {
            let verified = self
                .trusted_key()
                .and_then(|k| k.verify(&m.signed_text(), &m.signature).map_err(|e| e.to_string()));
            if let Err(e) = verified {
                self.refuse(ctx, p.generation, &want_sha, &what, e);
                self.report().await;
                return;
            }
            if m.base_version != self.runner.meta.version {
                let why = format!(
                    "made for base {:?}, this robot runs {:?}",
                    m.base_version, self.runner.meta.version
                );
                self.refuse(ctx, p.generation, &want_sha, &what, why);
                self.report().await;
                return;
            }
        }
        self.promo.fetching = Some(want_sha.clone());
        let job = Fetch {
            bus: ctx.bus.clone(),
            key: topics::ckpt_adapter(ctx.fleet()),
            robot: self.robot.clone(),
            runner: self.runner.clone(),
            want,
            generation: p.generation,
            timeout: std::time::Duration::from_millis(self.cfg.fetch_timeout_ms),
            feeder: self.promo.swap_feeder.clone(),
        };
        tokio::spawn(job.run());
    }

    /// The fleet's public key, read from `trusted_key` when a promotion first needs it.
    fn trusted_key(&mut self) -> Result<&TrustedKey, String> {
        if self.promo.key.is_none() {
            self.promo.key = TrustedKey::load(&self.promo.key_path)
                .map_err(|e| tracing::warn!(robot = %self.robot, "{e}"))
                .ok();
        }
        self.promo
            .key
            .as_ref()
            .ok_or_else(|| format!("no trusted fleet key at {}", self.promo.key_path.display()))
    }

    /// Whether a rollout is the promoter's and current: signed whole with the fleet key, not
    /// older than the generation followed, not expired, not too far ahead, and not asking
    /// this robot to run an adapter it revokes.
    fn check_rollout(&mut self, p: &Promoted) -> Result<(), String> {
        self.trusted_key()?
            .verify(&p.signed_text(), &p.signature)
            .map_err(|e| format!("not signed by the fleet key ({e})"))?;
        let current = self.promo.generation;
        if p.generation < current {
            return Err(format!("generation {} is older than {current}: a replay", p.generation));
        }
        if current > 0 && p.generation - current > self.cfg.max_generation_step {
            return Err(format!(
                "generation {} is more than {} ahead of {current}",
                p.generation, self.cfg.max_generation_step
            ));
        }
        let now = now_ns() / 1_000_000;
        if p.expires_ms < now {
            return Err(format!("expired {} ms ago", now - p.expires_ms));
        }
        if let Some(m) = p.for_robot(&self.robot).filter(|m| p.revoked.contains(&m.adapter_id)) {
            return Err(format!("it asks for {}, which it revokes", m.adapter_id));
        }
        Ok(())
    }

    /// An adapter was fetched and built, or refused: swap it in between two observations.
    async fn swap(&mut self, ctx: &Ctx<Self>) {
        let Some(s) = self.promo.swaps.take() else { return };
        if self.promo.fetching.as_deref() == Some(s.sha256.as_str()) {
            self.promo.fetching = None;
        }
        match s.runner {
            Err(e) => self.refuse(ctx, s.generation, &s.sha256, &s.adapter_id, e),
            Ok(runner) => {
                tracing::info!(robot = %self.robot, generation = s.generation, from = %self.runner.adapter_version(), to = %s.adapter_id, "adapter swapped");
                self.runner = Arc::new(runner);
                if let Some(r) = self.rollout.as_mut() {
                    r.forget_tokens();
                }
                self.promo.sha256 = s.sha256;
                self.promo.generation = s.generation;
                self.promo.swaps_done += 1;
                self.promo.last_error.clear();
            }
        }
        self.report().await;
        // A newer rollout may have come while this one was fetched.
        ctx.sender().send(PolicyEvent::Rollout);
    }

    async fn act(&mut self, ctx: &Ctx<Self>) -> Result<(), ActorError> {
        let Some(r) = self.obs.take() else { return Ok(()) };
        let c = &ctx.counters;
        let seq = r.header.seq;
        let o = r.msg;
        let runner = self.runner.clone();
        let mut rollout = self.rollout.take().ok_or_else(|| ctx.failed("rollout lost"))?;
        let (episode, task) = (o.episode, o.task);
        let (t0, start_ns) = (Instant::now(), now_ns());
        // JPEG decoding on a blocking thread, off the bus.
        let check = runner.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let step = match step_of_within(&o, &check.jpeg_limits())
                .map_err(|e| (e.reason(), e.to_string()))
                .and_then(|st| {
                    check.check(&st).map_err(|e| ("shape", e.to_string()))?;
                    Ok(st)
                }) {
                Ok(st) => st,
                Err((reason, e)) => return (rollout, Outcome::Refused(reason, e)),
            };
            if rollout.observe(episode, seq, task, step) {
                (rollout, Outcome::Due)
            } else {
                (rollout, Outcome::Recorded)
            }
        })
        .await
        .map_err(|e| ctx.failed(format!("decoding thread: {e}")))?;
        let (rollout, outcome) = joined;
        match outcome {
            Outcome::Refused(reason, e) => {
                self.rollout = Some(rollout);
                c.errors.fetch_add(1, Ordering::Relaxed);
                *self.obs_refused.entry(reason).or_default() += 1;
                tracing::warn!(robot = %self.robot, seq, "observation not usable: {e}");
                return Ok(());
            }
            Outcome::Recorded => {
                self.rollout = Some(rollout);
                return Ok(());
            }
            Outcome::Due => {}
        }
        // The model's arithmetic on the node's policy worker, batched with the other robots'.
        let (rollout, chunk, batch) = match self.batcher.infer(runner.clone(), rollout, seq).await {
            Ok(a) => (a.rollout, a.chunk, a.batch),
            Err((rollout, e)) => {
                let rollout = match rollout {
                    Some(r) => r,
                    None => Rollout::new(&runner, self.cfg.n_action_steps, self.cfg.lead, self.cfg.blend)
                        .map_err(|e| ctx.failed(e.to_string()))?,
                };
                (rollout, Err(e), 0)
            }
        };
        let rollout = self.rollout.insert(rollout);
        let actions = match chunk {
            Err(e) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(robot = %self.robot, seq, "inference failed: {e}");
                return Ok(());
            }
            Ok(a) => a,
        };
        self.last_ms = t0.elapsed().as_secs_f64() * 1e3;
        if self.recent_ms.len() == RECENT {
            self.recent_ms.pop_front();
            self.recent_batch.pop_front();
        }
        self.recent_ms.push_back(self.last_ms);
        self.recent_batch.push_back(batch);
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
        // The chunk continues the observation's trace if it is sampled (none is started here).
        let trace = r.trace.map(|t| t.child());
        match self.act.put_traced(&chunk, trace.as_ref()).await {
            Ok(_) => {
                let parent = r.trace.as_ref();
                ctx.bus.hop(
                    "policy.chunk",
                    trace.as_ref(),
                    parent,
                    start_ns,
                    &self.robot,
                    seq,
                    HopKind::Producer,
                );
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
}

/// Fetch an adapter's bytes, check them against the manifest, build the runner.
struct Fetch {
    bus: Bus,
    key: String,
    robot: String,
    runner: Arc<Runner>,
    want: Option<AdapterManifest>,
    generation: u64,
    timeout: std::time::Duration,
    feeder: Feeder<Swap>,
}

impl Fetch {
    async fn run(self) {
        let (sha256, adapter_id) = self
            .want
            .as_ref()
            .map(|m| (m.sha256.clone(), m.adapter_id.clone()))
            .unwrap_or_else(|| (String::new(), "base".into()));
        let runner = self.build().await;
        self.feeder.push(Swap {
            generation: self.generation,
            sha256,
            adapter_id,
            runner,
        });
    }

    async fn build(&self) -> Result<Runner, String> {
        let base = self.runner.clone();
        let Some(m) = self.want.clone() else {
            return tokio::task::spawn_blocking(move || base.without_adapter().map_err(|e| e.to_string()))
                .await
                .map_err(|e| e.to_string())?;
        };
        let req = AdapterRequest {
            sha256: m.sha256.clone(),
        };
        let replies = self
            .bus
            .get::<AdapterRequest, AdapterBytes>(&self.key, &self.robot, &req, self.timeout)
            .await
            .map_err(|e| e.to_string())?;
        // Any peer may answer: take the first reply whose bytes are the signed ones.
        let candidates: Vec<bytes::Bytes> = replies
            .into_iter()
            .filter_map(|r| r.map(|r| r.msg.data.to_bytes()).ok())
            .collect();
        if candidates.is_empty() {
            return Err(format!("no bytes from {}", self.key));
        }
        tokio::task::spawn_blocking(move || {
            let mut errors = Vec::new();
            for bytes in candidates {
                if bytes.len() as u64 != m.bytes {
                    errors.push(format!("{} bytes arrived, the manifest says {}", bytes.len(), m.bytes));
                    continue;
                }
                let sha = nanobot_dataset::sha256_hex(&bytes);
                if sha != m.sha256 {
                    errors.push(format!("sha256 of the bytes is {sha}, the manifest says {}", m.sha256));
                    continue;
                }
                return base
                    .with_adapter_bytes(&bytes, &m.adapter_id)
                    .map_err(|e| e.to_string());
            }
            Err(errors.join("; "))
        })
        .await
        .map_err(|e| e.to_string())?
    }
}
