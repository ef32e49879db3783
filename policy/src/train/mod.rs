//! Training: windows of decoded rows (`n_obs_steps` observations and `horizon` actions within
//! one episode) and the DDPM training step (AdamW with linear warmup). `nanobot train`
//! pretrains the base with it; the online trainer runs the same step on LoRA adapters.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::checkpoint::NormStats;
use crate::model::seeded_randn;
use crate::rng::Normal;
use crate::{ObsBatch, Policy, PolicyConfig};

mod optim;
mod windows;

pub use optim::*;
pub use windows::*;

#[derive(Debug, Error)]
pub enum TrainError {
    #[error("{0}")]
    Data(String),
    #[error("step {step}: the loss is {loss}; lower the learning rate")]
    Diverged { step: usize, loss: f32 },
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    #[error("training state {file}: {reason}")]
    State { file: String, reason: String },
}

/// Optimizer settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub seed: u64,
    /// Clip the gradients' global norm to this (none: no clipping).
    #[serde(default)]
    pub grad_clip: Option<f64>,
    #[serde(default = "constant")]
    pub schedule: LrSchedule,
    /// Train each batch as this many shards at once, each on a thread of its own with
    /// one-thread math, their gradients summed (data parallelism across cores: the small model's
    /// ops are too small to split). 1: the whole batch on the caller's thread.
    #[serde(default = "one")]
    pub shards: usize,
}

fn one() -> usize {
    1
}

fn constant() -> LrSchedule {
    LrSchedule::Constant
}

/// The training loop's state: optimizer (with its moments), step count, learning-rate
/// schedule and the sampling RNG — everything a resumed run needs to continue exactly.
pub struct Trainer {
    cfg: TrainConfig,
    opt: AdamW,
    rng: Normal,
    /// One single-thread pool per shard (none for one shard).
    pools: Vec<rayon::ThreadPool>,
}

/// What a training-state file holds besides tensors.
#[derive(Serialize, Deserialize)]
struct StateMeta {
    step: u64,
    rng_state: u64,
    rng_spare: Option<f32>,
    config: TrainConfig,
    params: AdamParams,
}

const STATE_META: &str = "nanobot.train_state";

impl Trainer {
    /// Train the named variables `vars` (the base's, or an adapter's; the others stay as they
    /// are).
    pub fn new(vars: Vec<(String, Var)>, cfg: TrainConfig) -> Result<Trainer, TrainError> {
        let opt = AdamW::new(
            vars,
            AdamParams {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..AdamParams::default()
            },
        )?;
        let pools = if cfg.shards > 1 {
            (0..cfg.shards)
                .map(|i| {
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .thread_name(move |_| format!("nb-train-shard{i}"))
                        .build()
                        .map_err(|e| TrainError::Data(format!("training shard threads: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            Vec::new()
        };
        Ok(Trainer {
            rng: Normal::new(cfg.seed ^ 0x7a11),
            cfg,
            opt,
            pools,
        })
    }

    /// Every variable of `map`, by name (a `VarMap`'s own order is not stable).
    pub fn named(map: &candle_nn::VarMap) -> Vec<(String, Var)> {
        let data = map.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn steps_done(&self) -> usize {
        self.opt.steps() as usize
    }

    pub fn learning_rate(&self) -> f64 {
        self.opt.params.lr
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Draw `n` row indices below `len` from the trainer's RNG (so a resumed run draws what
    /// the uninterrupted one would have).
    pub fn draw(&mut self, n: usize, len: usize) -> Vec<usize> {
        (0..n).map(|_| self.rng.below(len as u32) as usize).collect()
    }

    fn begin_step(&mut self) -> u64 {
        let step = self.opt.steps() + 1;
        self.opt.params.lr = self.cfg.schedule.lr(self.cfg.lr, self.cfg.warmup as u64, step);
        step
    }

    fn finish_step(&mut self, loss: &Tensor, step: u64) -> Result<f32, TrainError> {
        let l = loss.to_scalar::<f32>()?;
        if !l.is_finite() {
            return Err(TrainError::Diverged {
                step: step as usize,
                loss: l,
            });
        }
        let mut grads = loss.backward()?;
        if let Some(max) = self.cfg.grad_clip {
            self.opt.clip_grad_norm(&mut grads, max)?;
        }
        self.opt.step(&grads)?;
        Ok(l)
    }

    /// One step on a batch of uniformly drawn windows (offline pretraining); returns its loss.
    pub fn step(
        &mut self,
        policy: &Policy,
        data: &Windows,
        pcfg: &PolicyConfig,
        norm: &NormStats,
    ) -> Result<f32, TrainError> {
        let step = self.begin_step();
        let batch = self.cfg.batch;
        let idx = self.draw(batch, data.len());
        let (obs, actions) = data.batch(&idx, pcfg, norm)?;
        let eps = seeded_randn(self.cfg.seed.wrapping_add(step * 7919), actions.dims(), &Device::Cpu)?;
        let t: Vec<u32> = (0..batch)
            .map(|_| self.rng.below(pcfg.head.train_steps as u32))
            .collect();
        let loss = policy.loss(&obs, &actions, &eps, &t)?;
        self.finish_step(&loss, step)
    }

    /// One step on a given batch (weighted, padding masked), with timesteps drawn from the
    /// trainer's RNG; returns its loss.
    pub fn step_on(&mut self, policy: &Policy, batch: &TrainBatch, pcfg: &PolicyConfig) -> Result<f32, TrainError> {
        let step = self.begin_step();
        let b = batch.actions.dim(0)?;
        let eps = seeded_randn(
            self.cfg.seed.wrapping_add(step * 7919),
            batch.actions.dims(),
            &Device::Cpu,
        )?;
        let t: Vec<u32> = (0..b).map(|_| self.rng.below(pcfg.head.train_steps as u32)).collect();
        if self.pools.len() < 2 || b < self.pools.len() {
            let loss =
                policy.loss_weighted(&batch.obs, &batch.actions, &eps, &t, &batch.weights, &batch.action_mask)?;
            return self.finish_step(&loss, step);
        }
        let (l, mut grads) = self.sharded_grads(policy, batch, &eps, &t)?;
        if !l.is_finite() {
            return Err(TrainError::Diverged {
                step: step as usize,
                loss: l,
            });
        }
        if let Some(max) = self.cfg.grad_clip {
            self.opt.clip_grad_norm(&mut grads, max)?;
        }
        self.opt.step(&grads)?;
        Ok(l)
    }

    /// The batch's loss and gradients, computed as shards at once (one per pool), each shard's
    /// loss normalized by the whole batch's weights so that the parts add up to the whole.
    fn sharded_grads(
        &self,
        policy: &Policy,
        batch: &TrainBatch,
        eps: &Tensor,
        t: &[u32],
    ) -> Result<(f32, GradStore), TrainError> {
        let b = batch.actions.dim(0)?;
        let n = self.pools.len();
        let total = batch.weights.sum_all()?.to_scalar::<f32>()? as f64;
        let shard = |start: usize, len: usize| -> Result<(f32, GradStore), TrainError> {
            let cut = |x: &Tensor| x.narrow(0, start, len);
            let obs = ObsBatch {
                images: cut(&batch.obs.images)?,
                state: cut(&batch.obs.state)?,
                surface: cut(&batch.obs.surface)?,
                task: cut(&batch.obs.task)?,
            };
            let loss = policy.loss_weighted_over(
                &obs,
                &cut(&batch.actions)?,
                &cut(eps)?,
                &t[start..start + len],
                &cut(&batch.weights)?,
                &cut(&batch.action_mask)?,
                total,
            )?;
            Ok((loss.to_scalar::<f32>()?, loss.backward()?))
        };
        let ranges: Vec<(usize, usize)> = (0..n).map(|i| (i * b / n, (i + 1) * b / n - i * b / n)).collect();
        let parts: Vec<Result<(f32, GradStore), TrainError>> = std::thread::scope(|s| {
            let handles: Vec<_> = ranges
                .iter()
                .zip(&self.pools)
                .map(|(&(start, len), pool)| s.spawn(move || pool.install(|| shard(start, len))))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(TrainError::Data("a training shard panicked".into())))
                })
                .collect()
        });
        let mut parts = parts.into_iter();
        let (mut loss, mut grads) = parts.next().ok_or_else(|| TrainError::Data("no shards".into()))??;
        for part in parts {
            let (l, g) = part?;
            loss += l;
            for (_, var, _, _) in &self.opt.vars {
                if let Some(add) = g.get(var) {
                    let sum = match grads.remove(var) {
                        Some(have) => (have + add)?,
                        None => add.clone(),
                    };
                    grads.insert(var, sum);
                }
            }
        }
        Ok((loss, grads))
    }

    /// The loss of `batch` without training (held-out evaluation), with fixed noise from `seed`.
    pub fn eval(policy: &Policy, batch: &TrainBatch, pcfg: &PolicyConfig, seed: u64) -> Result<f32, TrainError> {
        let b = batch.actions.dim(0)?;
        let eps = seeded_randn(seed, batch.actions.dims(), &Device::Cpu)?;
        let mut rng = Normal::new(seed ^ 0xe7a1);
        let t: Vec<u32> = (0..b).map(|_| rng.below(pcfg.head.train_steps as u32)).collect();
        let loss = policy.loss_weighted(&batch.obs, &batch.actions, &eps, &t, &batch.weights, &batch.action_mask)?;
        Ok(loss.to_scalar::<f32>()?)
    }

    /// Write the whole training state (trained weights, moments, step, schedule, RNG) to
    /// `path`, atomically and durably (temporary file, fsync, rename, fsync of the directory):
    /// a trainer killed with `kill -9` resumes from the last one written.
    pub fn save_state(&self, path: &Path) -> Result<(), TrainError> {
        let file = path.display().to_string();
        let err = |reason: String| TrainError::State {
            file: file.clone(),
            reason,
        };
        let (rng_state, rng_spare) = self.rng.state();
        let meta = StateMeta {
            step: self.opt.steps(),
            rng_state,
            rng_spare,
            config: self.cfg.clone(),
            params: self.opt.params,
        };
        let mut md = HashMap::new();
        md.insert(
            STATE_META.to_string(),
            serde_json::to_string(&meta).map_err(|e| err(e.to_string()))?,
        );
        let tensors = self.opt.state_tensors();
        let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(md))
            .map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        let io = |e: std::io::Error| err(e.to_string());
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }

    /// Continue from a state `save_state` wrote: the trained variables (which must be the
    /// same names and shapes as `vars`) take its weights, the optimizer its moments and step,
    /// the RNG its position. The settings are the saved ones.
    pub fn resume(vars: Vec<(String, Var)>, path: &Path) -> Result<Trainer, TrainError> {
        let file = path.display().to_string();
        let err = |reason: String| TrainError::State {
            file: file.clone(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| err(e.to_string()))?;
        let meta: StateMeta = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(STATE_META))
            .ok_or_else(|| err(format!("no {STATE_META} metadata: not a training state")))
            .and_then(|s| serde_json::from_str(s).map_err(|e| err(e.to_string())))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let t =
                candle_core::safetensors::Load::load(&view, &Device::Cpu).map_err(|e| err(format!("{name}: {e}")))?;
            tensors.insert(name, t);
        }
        let mut t = Trainer::new(vars, meta.config)?;
        t.opt.params = meta.params;
        t.opt.load_state(&tensors, meta.step).map_err(err)?;
        t.rng = Normal::from_state((meta.rng_state, meta.rng_spare));
        Ok(t)
    }
}
