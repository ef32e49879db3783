//! `trainer`: continual LoRA fine-tuning on the fleet's data.
//!
//! It loads the base checkpoint (`base`; while the file is missing it waits and says so), puts a
//! LoRA adapter on the trunk and head (the base stays constant: its tensors are not even
//! variables), and trains the adapter on windows from replay (`{fleet}/replay/sample`): AdamW,
//! warmup then constant or cosine, gradient clipping, the DDPM noise-prediction loss weighted
//! per window — the policy crate's training step, the one `nanobot train` uses. Replay's rate
//! limiter paces it: when replay says wait, it waits and asks again, and new segments reach it
//! without a restart. The next batch is fetched while a step runs.
//!
//! Every `checkpoint_every` steps it writes its training state (adapter, optimizer moments,
//! step, schedule, RNG) to `state_dir`, atomically and fsynced; a trainer killed with
//! `kill -9` resumes from the last one, bit-identically (batch `n` is always requested with the
//! same seed). Every `candidate_every` steps or `candidate_every_s` seconds it publishes a
//! `Candidate` on `{fleet}/ckpt/candidate`: the adapter's safetensors bytes, their sha256, the
//! base it applies to, the training loss, and the held-out loss of the adapter and of the base
//! alone on episodes replay never trains on. The model's math runs on the trainer's own
//! thread (`nb-train`).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use nanobot_messages::{topics, Blob, Candidate, Metric, ReplayBatch, ReplayRequest};
use nanobot_policy::checkpoint::{self, Meta, Role};
use nanobot_policy::model::seeded_init;
use nanobot_policy::train::{LrSchedule, TrainBatch, TrainConfig, Trainer};
use nanobot_policy::{Policy, PolicyConfig};
use serde::Deserialize;

use crate::bus::{PubQos, Publisher};
use crate::runtime::{ActorError, Ctx, Input, Metrics, NodeActor, Worker};

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainerConfig {
    /// The base checkpoint the adapter trains on.
    pub base: String,
    /// Where the training state and the latest adapter are kept; `{fleet}` and `{node}` expand.
    pub state_dir: String,
    pub batch: u32,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub grad_clip: Option<f64>,
    pub schedule: LrSchedule,
    /// Shards of each batch trained at once, one core each (see `TrainConfig::shards`).
    pub shards: usize,
    /// Seeds the adapter's initialization, the diffusion noise and replay's draws.
    pub seed: u64,
    pub checkpoint_every: u64,
    pub candidate_every: u64,
    pub candidate_every_s: f64,
    /// Held-out windows each candidate is measured on.
    pub held_out_windows: u32,
    /// Stop training after this many steps (0: never).
    pub max_steps: u64,
    /// How long to wait for replay's answer.
    pub timeout_ms: u64,
    /// How long to wait before asking again when replay says wait (or the base is missing).
    pub retry_ms: u64,
    /// How much lower than the robots' threads the training threads run (Linux nice, 0..19):
    /// training takes the CPU the control loops leave.
    pub nice: i32,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            base: "policy.safetensors".into(),
            state_dir: "state/{fleet}/trainer".into(),
            batch: 32,
            lr: 3e-4,
            warmup: 50,
            weight_decay: 0.0,
            grad_clip: Some(1.0),
            schedule: LrSchedule::Constant,
            shards: 1,
            seed: 0,
            checkpoint_every: 50,
            candidate_every: 200,
            candidate_every_s: 120.0,
            held_out_windows: 64,
            max_steps: 0,
            timeout_ms: 10_000,
            retry_ms: 500,
            nice: 10,
        }
    }
}

/// The model side, on the trainer's thread.
pub struct TrainCore {
    pub config: PolicyConfig,
    pub base: Meta,
    /// Lower-case hex sha256 of the base file.
    pub base_sha256: String,
    policy: Policy,
    base_only: Policy,
    adapter: VarMap,
    trainer: Trainer,
    state_path: PathBuf,
    adapter_path: PathBuf,
}

/// What a candidate carries, made on the trainer's thread.
pub struct Made {
    pub id: String,
    pub bytes: Vec<u8>,
    /// Lower-case hex sha256 of `bytes`.
    pub sha256: String,
    pub held_out_loss: f32,
    pub held_out_loss_base: f32,
}

impl TrainCore {
    /// Load the base at `base`, put a fresh adapter on it, and continue from the training state
    /// in `state_dir` when one was written for this base.
    pub fn open(base: &Path, state_dir: &Path, tcfg: TrainConfig) -> Result<TrainCore, String> {
        let (meta, tensors) = checkpoint::read(base).map_err(|e| e.to_string())?;
        if meta.kind != Role::Base {
            return Err(format!(
                "{}: holds an adapter, the trainer needs a base",
                base.display()
            ));
        }
        let (base_sha256, _) = nanobot_dataset::sha256_file(base).map_err(|e| e.to_string())?;
        let dev = Device::Cpu;
        let base_vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
        let adapter = VarMap::new();
        let model = |a: Option<VarBuilder<'static>>| {
            Policy::new(&meta.config, base_vb.clone(), a).map_err(|e| format!("{}: {e}", base.display()))
        };
        let policy = model(Some(VarBuilder::from_varmap(&adapter, DType::F32, &dev)))?;
        let base_only = model(None)?;
        seeded_init(&adapter, tcfg.seed).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(state_dir).map_err(|e| format!("{}: {e}", state_dir.display()))?;
        let tag = &base_sha256[..16];
        let state_path = state_dir.join(format!("{tag}.train_state.safetensors"));
        let adapter_path = state_dir.join(format!("{tag}.adapter.safetensors"));
        let trainer = if state_path.exists() {
            let t = Trainer::resume(Trainer::named(&adapter), &state_path).map_err(|e| e.to_string())?;
            tracing::info!(state = %state_path.display(), step = t.steps_done(), "training resumed");
            t
        } else {
            Trainer::new(Trainer::named(&adapter), tcfg).map_err(|e| e.to_string())?
        };
        Ok(TrainCore {
            config: meta.config.clone(),
            base: meta,
            base_sha256,
            policy,
            base_only,
            adapter,
            trainer,
            state_path,
            adapter_path,
        })
    }

    pub fn steps_done(&self) -> u64 {
        self.trainer.steps_done() as u64
    }

    pub fn learning_rate(&self) -> f64 {
        self.trainer.learning_rate()
    }

    /// One step on a replay batch; its loss.
    pub fn step(&mut self, batch: &ReplayBatch) -> Result<f32, String> {
        let b = TrainBatch::from_replay(batch, &self.config, &self.base.norm).map_err(|e| e.to_string())?;
        self.trainer
            .step_on(&self.policy, &b, &self.config)
            .map_err(|e| e.to_string())
    }

    /// Write the training state, and the adapter beside it.
    pub fn checkpoint(&self) -> Result<(), String> {
        self.trainer.save_state(&self.state_path).map_err(|e| e.to_string())?;
        checkpoint::save(
            &self.adapter_path,
            &self.adapter,
            &self.adapter_meta(&self.adapter_id()),
        )
        .map_err(|e| e.to_string())
    }

    fn adapter_id(&self) -> String {
        format!("{}+lora.{}", self.base.version, self.steps_done())
    }

    fn adapter_meta(&self, id: &str) -> Meta {
        Meta {
            kind: Role::Adapter,
            version: id.to_string(),
            config: self.config.clone(),
            norm: self.base.norm.clone(),
        }
    }

    /// The adapter as it stands, measured on `held_out` (with the base alone beside it).
    pub fn candidate(&self, held_out: Option<&ReplayBatch>, seed: u64) -> Result<Made, String> {
        let (mut held_out_loss, mut held_out_loss_base) = (f32::NAN, f32::NAN);
        if let Some(h) = held_out {
            let b = TrainBatch::from_replay(h, &self.config, &self.base.norm).map_err(|e| e.to_string())?;
            held_out_loss = Trainer::eval(&self.policy, &b, &self.config, seed).map_err(|e| e.to_string())?;
            held_out_loss_base = Trainer::eval(&self.base_only, &b, &self.config, seed).map_err(|e| e.to_string())?;
        }
        let id = self.adapter_id();
        let bytes = checkpoint::to_bytes(&self.adapter, &self.adapter_meta(&id))?;
        Ok(Made {
            id,
            sha256: nanobot_dataset::sha256_hex(&bytes),
            bytes,
            held_out_loss,
            held_out_loss_base,
        })
    }
}

pub enum TrainerEvent {
    /// Take the next step (or try again to load the base, or to get a batch).
    Continue,
}

pub struct TrainerActor {
    cfg: TrainerConfig,
    state_dir: PathBuf,
    key: String,
    core: Option<Worker<TrainCore>>,
    base_sha256: String,
    base_version: String,
    n_obs_steps: u32,
    horizon: u32,
    step: u64,
    next: Option<ReplayBatch>,
    candidates: Publisher<Candidate>,
    losses: Vec<f32>,
    last_loss: f32,
    samples_per_s: f64,
    data_age_s: f32,
    intervention_share: f32,
    held_out_loss: f32,
    held_out_loss_base: f32,
    lr: f64,
    waits: u64,
    sent: u64,
    last_candidate: Instant,
    last_wait_log: Option<Instant>,
    done: bool,
}

impl TrainerActor {
    fn again(&self, ctx: &Ctx<Self>, after: Duration) {
        let s = ctx.sender();
        if after.is_zero() {
            s.send(TrainerEvent::Continue);
        } else {
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                s.send(TrainerEvent::Continue);
            });
        }
    }

    fn waiting(&mut self, what: &str) {
        self.waits += 1;
        if self
            .last_wait_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            self.last_wait_log = Some(Instant::now());
            tracing::info!(step = self.step, "trainer waiting: {what}");
        }
    }

    /// Batch `step` (training) or the held-out batch, from replay; `None` when there is none
    /// now (replay says wait, or did not answer), with the reason.
    async fn fetch(&self, ctx: &Ctx<Self>, step: u64, held_out: bool) -> Result<ReplayBatch, String> {
        let req = ReplayRequest {
            batch_size: if held_out {
                self.cfg.held_out_windows
            } else {
                self.cfg.batch
            },
            n_obs_steps: self.n_obs_steps,
            horizon: self.horizon,
            seed: if held_out {
                self.cfg.seed ^ 0x4e1d_0017_u64
            } else {
                self.cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(step)
            },
            held_out,
        };
        let replies = ctx
            .bus
            .get::<ReplayRequest, ReplayBatch>(&self.key, "", &req, Duration::from_millis(self.cfg.timeout_ms))
            .await
            .map_err(|e| e.to_string())?;
        let reply = replies
            .into_iter()
            .next()
            .ok_or_else(|| "no replay answered".to_string())?;
        let batch = reply.map_err(|e| e.to_string())?.msg;
        if batch.windows == 0 {
            return Err(format!("replay: {}", batch.wait));
        }
        Ok(batch)
    }

    async fn open(&mut self, ctx: &Ctx<Self>) -> Result<bool, ActorError> {
        let base = PathBuf::from(&self.cfg.base);
        if !base.exists() {
            self.waiting(&format!("no base checkpoint at {} yet", base.display()));
            return Ok(false);
        }
        let tcfg = TrainConfig {
            batch: self.cfg.batch as usize,
            lr: self.cfg.lr,
            warmup: self.cfg.warmup,
            weight_decay: self.cfg.weight_decay,
            seed: self.cfg.seed,
            grad_clip: self.cfg.grad_clip,
            schedule: self.cfg.schedule,
            shards: self.cfg.shards.max(1),
        };
        let dir = self.state_dir.clone();
        let nice = self.cfg.nice;
        let worker = Worker::spawn("nb-train".into(), move || {
            crate::runtime::lower_priority(nice);
            TrainCore::open(&base, &dir, tcfg)
        })
        .await
        .map_err(|e| ctx.config_error(e))?;
        let info = worker
            .call(|c| {
                (
                    c.base_sha256.clone(),
                    c.base.version.clone(),
                    c.config.trunk.n_obs_steps as u32,
                    c.config.head.horizon as u32,
                    c.steps_done(),
                )
            })
            .await
            .ok_or_else(|| ctx.failed("trainer thread ended"))?;
        (
            self.base_sha256,
            self.base_version,
            self.n_obs_steps,
            self.horizon,
            self.step,
        ) = info;
        tracing::info!(base = %self.cfg.base, version = %self.base_version, step = self.step, "trainer ready");
        self.core = Some(worker);
        Ok(true)
    }

    async fn publish_candidate(&mut self, ctx: &Ctx<Self>) -> Result<(), ActorError> {
        let held = match self.fetch(ctx, 0, true).await {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::info!("candidate without a held-out loss: {e}");
                None
            }
        };
        let seed = self.cfg.seed ^ 0xe7a1;
        let core = self.core.as_ref().ok_or_else(|| ctx.failed("no model"))?;
        let made = core
            .call(move |c| c.candidate(held.as_ref(), seed))
            .await
            .ok_or_else(|| ctx.failed("trainer thread ended"))?
            .map_err(|e| ctx.failed(e))?;
        let train_loss = if self.losses.is_empty() {
            f32::NAN
        } else {
            self.losses.iter().sum::<f32>() / self.losses.len() as f32
        };
        self.losses.clear();
        self.held_out_loss = made.held_out_loss;
        self.held_out_loss_base = made.held_out_loss_base;
        let metric = |name: &str, value: f64| Metric {
            name: name.into(),
            value,
        };
        let msg = Candidate {
            adapter_id: made.id.clone(),
            base_version: self.base_version.clone(),
            step: self.step,
            sha256: made.sha256,
            metrics: vec![
                metric("train_loss", train_loss as f64),
                metric("held_out_loss", made.held_out_loss as f64),
                metric("held_out_loss_base", made.held_out_loss_base as f64),
                metric("data_age_s", self.data_age_s as f64),
                metric("intervention_share", self.intervention_share as f64),
            ],
            adapter: Blob::new(made.bytes),
        };
        // The base this adapter applies to, by content (a version name can repeat).
        let base = format!("{} (sha256 {})", msg.base_version, self.base_sha256);
        match self.candidates.put(&msg).await {
            Ok(_) => {
                self.sent += 1;
                tracing::info!(id = %msg.adapter_id, base, train_loss, held_out = made.held_out_loss, held_out_base = made.held_out_loss_base, "candidate published");
            }
            Err(e) => {
                ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "candidate not published");
            }
        }
        self.last_candidate = Instant::now();
        Ok(())
    }

    async fn checkpoint(&self, ctx: &Ctx<Self>) -> Result<(), ActorError> {
        let core = self.core.as_ref().ok_or_else(|| ctx.failed("no model"))?;
        if let Some(Err(e)) = core.call(|c| c.checkpoint()).await {
            ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!("training state not written: {e}");
        }
        Ok(())
    }

    /// One step: the batch fetched ahead (or fetched now), trained on while the next one is
    /// fetched.
    async fn train_once(&mut self, ctx: &Ctx<Self>) -> Result<Duration, ActorError> {
        let want = self.step + 1;
        let batch = match self.next.take() {
            Some(b) => b,
            None => match self.fetch(ctx, want, false).await {
                Ok(b) => b,
                Err(e) => {
                    self.waiting(&e);
                    return Ok(Duration::from_millis(self.cfg.retry_ms));
                }
            },
        };
        let (share, age, windows) = (batch.intervention_share, batch.mean_age_s, batch.windows);
        let core = self.core.as_ref().ok_or_else(|| ctx.failed("no model"))?;
        let t0 = Instant::now();
        let prefetch = self.cfg.max_steps == 0 || want < self.cfg.max_steps;
        let (stepped, next) = tokio::join!(
            core.call(move |c| c.step(&batch).map(|l| (l, c.steps_done(), c.learning_rate()))),
            async {
                if prefetch {
                    self.fetch(ctx, want + 1, false).await.ok()
                } else {
                    None
                }
            }
        );
        self.next = next;
        let (loss, step, lr) = match stepped.ok_or_else(|| ctx.failed("trainer thread ended"))? {
            Ok(x) => x,
            Err(e) => {
                ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(step = want, "training step failed, batch skipped: {e}");
                return Ok(Duration::from_millis(self.cfg.retry_ms));
            }
        };
        let rate = windows as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        self.samples_per_s = if self.samples_per_s == 0.0 {
            rate
        } else {
            0.9 * self.samples_per_s + 0.1 * rate
        };
        (
            self.step,
            self.last_loss,
            self.lr,
            self.data_age_s,
            self.intervention_share,
        ) = (step, loss, lr, age, share);
        self.losses.push(loss);
        ctx.counters.handled.fetch_add(1, Ordering::Relaxed);
        if self.cfg.checkpoint_every > 0 && step % self.cfg.checkpoint_every == 0 {
            self.checkpoint(ctx).await?;
        }
        let by_steps = self.cfg.candidate_every > 0 && step % self.cfg.candidate_every == 0;
        let by_time = self.cfg.candidate_every_s > 0.0
            && self.last_candidate.elapsed() >= Duration::from_secs_f64(self.cfg.candidate_every_s);
        if by_steps || by_time {
            self.publish_candidate(ctx).await?;
        }
        Ok(Duration::ZERO)
    }
}

impl NodeActor for TrainerActor {
    const KIND: &'static str = "trainer";
    type Config = TrainerConfig;
    type Event = TrainerEvent;

    fn grants(fleet: &str, _robots: &[String]) -> crate::access::Grants {
        use nanobot_messages::topics;
        crate::access::Grants::default()
            .put([topics::ckpt_candidate(fleet)])
            .query([topics::replay_sample(fleet)])
    }

    async fn start(ctx: &Ctx<Self>, cfg: TrainerConfig) -> Result<Self, ActorError> {
        if cfg.batch == 0 || cfg.held_out_windows == 0 || cfg.timeout_ms == 0 || cfg.lr.is_nan() || cfg.lr <= 0.0 {
            return Err(ctx.config_error("batch, held_out_windows, timeout_ms and lr must be positive"));
        }
        let fleet = ctx.fleet().to_string();
        let state_dir = ctx.path(&cfg.state_dir);
        let me = TrainerActor {
            key: topics::replay_sample(&fleet),
            candidates: ctx.publisher(&topics::ckpt_candidate(&fleet), "", PubQos::Data).await?,
            state_dir,
            core: None,
            base_sha256: String::new(),
            base_version: String::new(),
            n_obs_steps: 0,
            horizon: 0,
            step: 0,
            next: None,
            losses: Vec::new(),
            last_loss: f32::NAN,
            samples_per_s: 0.0,
            data_age_s: 0.0,
            intervention_share: 0.0,
            held_out_loss: f32::NAN,
            held_out_loss_base: f32::NAN,
            lr: 0.0,
            waits: 0,
            sent: 0,
            last_candidate: Instant::now(),
            last_wait_log: None,
            done: false,
            cfg,
        };
        me.again(ctx, Duration::ZERO);
        Ok(me)
    }

    async fn handle(&mut self, ctx: &Ctx<Self>, _input: Input<TrainerEvent>) -> Result<(), ActorError> {
        if self.done {
            return Ok(());
        }
        if self.core.is_none() && !self.open(ctx).await? {
            self.again(ctx, Duration::from_millis(self.cfg.retry_ms));
            return Ok(());
        }
        if self.cfg.max_steps > 0 && self.step >= self.cfg.max_steps {
            self.checkpoint(ctx).await?;
            self.publish_candidate(ctx).await?;
            tracing::info!(step = self.step, "trainer reached max_steps and stopped training");
            self.done = true;
            return Ok(());
        }
        let after = self.train_once(ctx).await?;
        self.again(ctx, after);
        Ok(())
    }

    fn metrics(&self, m: &mut Metrics) {
        m.set("step", self.step as f64);
        m.set("loss", self.last_loss as f64);
        m.set("samples_per_s", self.samples_per_s);
        m.set("lr", self.lr);
        m.set("data_age_s", self.data_age_s as f64);
        m.set("intervention_share", self.intervention_share as f64);
        m.set("held_out_loss", self.held_out_loss as f64);
        m.set("held_out_loss_base", self.held_out_loss_base as f64);
        m.set("waits", self.waits as f64);
        m.set("candidates", self.sent as f64);
    }

    async fn stop(&mut self, ctx: &Ctx<Self>) {
        if self.core.is_some() && self.step > 0 {
            let _ = self.checkpoint(ctx).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use nanobot_policy::checkpoint::NormStats;
    use nanobot_sampling::Strategy;

    use super::*;
    use crate::replay::fixtures::dataset;
    use crate::replay::{Store, StoreConfig};

    /// A random tiny base with statistics fitted on the fixture's values, saved at `path`.
    fn base(path: &Path) {
        let cfg =
            PolicyConfig::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/policy/tiny.toml")).unwrap();
        let vars = VarMap::new();
        Policy::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu), None).unwrap();
        seeded_init(&vars, 1).unwrap();
        let states: Vec<Vec<f32>> = (0..40).map(|s| vec![s as f32, 0.0, 0.0, 0.0, 0.0, 0.0]).collect();
        let actions: Vec<Vec<f32>> = (0..40).map(|s| vec![s as f32, 1.0]).collect();
        let meta = Meta {
            kind: Role::Base,
            version: "fixture".into(),
            config: cfg,
            norm: NormStats::fit(&states, &actions),
        };
        checkpoint::save(path, &vars, &meta).unwrap();
    }

    fn train_cfg() -> TrainConfig {
        TrainConfig {
            batch: 16,
            lr: 1e-2,
            warmup: 5,
            weight_decay: 0.0,
            seed: 3,
            grad_clip: Some(1.0),
            schedule: LrSchedule::Constant,
            shards: 2,
        }
    }

    fn req(step: u64) -> ReplayRequest {
        ReplayRequest {
            batch_size: 16,
            n_obs_steps: 2,
            horizon: 16,
            seed: step,
            held_out: false,
        }
    }

    #[test]
    fn the_loss_falls_the_base_stays_bit_identical_and_a_resumed_run_matches() {
        let dir = tempfile::tempdir().unwrap();
        dataset(&dir.path().join("data/r0"), 0..40, 20);
        let base_path = dir.path().join("base.safetensors");
        base(&base_path);
        let base_bytes = std::fs::read(&base_path).unwrap();
        let mut store = Store::new(StoreConfig {
            strategy: Strategy::Uniform,
            samples_per_insert: 1e9,
            min_rows: 1,
            held_out_every: 0,
            ..StoreConfig::default()
        });
        store.index_datasets(&dir.path().join("data"));
        let batches: Vec<ReplayBatch> = (0..=60).map(|s| store.sample(&req(s), 0).unwrap()).collect();
        let fixed = &batches[0];

        let mut core = TrainCore::open(&base_path, &dir.path().join("a"), train_cfg()).unwrap();
        let before = core.candidate(Some(fixed), 9).unwrap();
        // A fresh adapter is the base (up to rounding: a graph through the adapter takes the
        // training kernels).
        let rel = (before.held_out_loss - before.held_out_loss_base).abs() / before.held_out_loss_base;
        assert!(rel < 1e-5, "{} vs {}", before.held_out_loss, before.held_out_loss_base);
        let mut la = Vec::new();
        for b in &batches[1..=60] {
            la.push(core.step(b).unwrap());
        }
        let after = core.candidate(Some(fixed), 9).unwrap();
        assert!(
            after.held_out_loss < 0.8 * before.held_out_loss,
            "loss {} → {}",
            before.held_out_loss,
            after.held_out_loss
        );
        assert_eq!(
            after.held_out_loss_base, before.held_out_loss_base,
            "the base computes what it did"
        );
        assert_eq!(std::fs::read(&base_path).unwrap(), base_bytes);

        // Interrupted at step 25 (its state written), reopened, and run to 60: the same adapter.
        let mut first = TrainCore::open(&base_path, &dir.path().join("b"), train_cfg()).unwrap();
        let mut lb = Vec::new();
        for b in &batches[1..=25] {
            lb.push(first.step(b).unwrap());
        }
        first.checkpoint().unwrap();
        drop(first);
        let mut resumed = TrainCore::open(&base_path, &dir.path().join("b"), train_cfg()).unwrap();
        assert_eq!(resumed.steps_done(), 25);
        for b in &batches[26..=60] {
            lb.push(resumed.step(b).unwrap());
        }
        assert_eq!(la, lb, "every step's loss, resumed or not");
        let again = resumed.candidate(None, 9).unwrap();
        assert_eq!(again.id, after.id);
        assert!(
            again.bytes == after.bytes,
            "resumed adapter differs from the uninterrupted one"
        );
    }
}
