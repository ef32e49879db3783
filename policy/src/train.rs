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
use crate::preprocess::rgb_to_chw;
use crate::rng::Normal;
use crate::{ObsBatch, Policy, PolicyConfig};

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

/// One decoded row of a dataset.
#[derive(Clone, Debug)]
pub struct Row {
    /// (dataset, episode): rows of one episode are contiguous.
    pub episode: (usize, u64),
    pub task: u32,
    pub rgb: Vec<u8>,
    pub state: Vec<f32>,
    pub action: Vec<f32>,
    pub surface: Vec<f32>,
}

impl Row {
    /// Check the row's sizes against the policy config; the error says what differs.
    pub fn check(&self, cfg: &PolicyConfig) -> Result<(), String> {
        let n = cfg.vision.image_size;
        if self.rgb.len() != n * n * 3 {
            return Err(format!(
                "image has {} RGB bytes, the policy takes {n}×{n}×3",
                self.rgb.len()
            ));
        }
        if self.state.len() != cfg.inputs.state_dim || self.action.len() != cfg.head.action_dim {
            return Err(format!(
                "state/action have {}/{} values, the policy config says {}/{}",
                self.state.len(),
                self.action.len(),
                cfg.inputs.state_dim,
                cfg.head.action_dim
            ));
        }
        let cells = cfg.inputs.surface_rows * cfg.inputs.surface_cols;
        if self.surface.len() != cells {
            return Err(format!(
                "surface has {} cells, the policy takes {cells}",
                self.surface.len()
            ));
        }
        Ok(())
    }
}

/// Rows in episode order; every row starts a training window (history before it, actions
/// from it on; a window near an episode's edge repeats the edge row).
pub struct Windows {
    pub rows: Vec<Row>,
}

impl Windows {
    pub fn new(rows: Vec<Row>) -> Result<Windows, TrainError> {
        if rows.is_empty() {
            return Err(TrainError::Data("no rows".into()));
        }
        Ok(Windows { rows })
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Normalization statistics fitted on every row.
    pub fn fit_norm(&self) -> NormStats {
        NormStats::fit(
            &self.rows.iter().map(|r| r.state.clone()).collect::<Vec<_>>(),
            &self.rows.iter().map(|r| r.action.clone()).collect::<Vec<_>>(),
        )
    }

    /// Row `i + k` if it is in the same episode, else the nearest one that is.
    pub fn at(&self, i: usize, k: isize) -> &Row {
        let ep = self.rows[i].episode;
        let mut j = i;
        let target = i as isize + k;
        while (j as isize) < target && j + 1 < self.rows.len() && self.rows[j + 1].episode == ep {
            j += 1;
        }
        while (j as isize) > target && j > 0 && self.rows[j - 1].episode == ep {
            j -= 1;
        }
        &self.rows[j]
    }

    /// The windows starting at rows `idx`: observations (normalized state) and normalized
    /// actions `(B, horizon, action_dim)`.
    pub fn batch(&self, idx: &[usize], cfg: &PolicyConfig, norm: &NormStats) -> Result<(ObsBatch, Tensor), TrainError> {
        let b = self.batch_padded(idx, cfg, norm)?;
        Ok((b.obs, b.actions))
    }

    /// The windows starting at rows `idx`, with their padding marked: observation steps before
    /// the episode's first row and actions after its last repeat the edge row (as LeRobot's
    /// `delta_timestamps` do), and `action_mask` is 0 for those actions (LeRobot's
    /// `action_is_pad`), `obs_pad` 1 for those observation steps. Weights are 1.
    pub fn batch_padded(&self, idx: &[usize], cfg: &PolicyConfig, norm: &NormStats) -> Result<TrainBatch, TrainError> {
        let (t, hz, n) = (cfg.trunk.n_obs_steps, cfg.head.horizon, cfg.vision.image_size);
        let (mut img, mut state, mut surf, mut task, mut act) = (vec![], vec![], vec![], vec![], vec![]);
        let (mut mask, mut obs_pad) = (Vec::with_capacity(idx.len() * hz), Vec::with_capacity(idx.len() * t));
        for &i in idx {
            for k in 0..t {
                let offset = k as isize - (t as isize - 1);
                let r = self.at(i, offset);
                obs_pad.push(u8::from(!self.in_episode(i, offset)));
                rgb_to_chw(&r.rgb, &mut img);
                state.extend(norm.normalize_state(&r.state));
                surf.extend_from_slice(&r.surface);
            }
            for k in 0..hz {
                act.extend(norm.normalize_action(&self.at(i, k as isize).action));
                mask.push(if self.in_episode(i, k as isize) { 1f32 } else { 0.0 });
            }
            task.push(self.rows[i].task);
        }
        let b = idx.len();
        let dev = Device::Cpu;
        Ok(TrainBatch {
            obs: ObsBatch {
                images: Tensor::from_vec(img, (b, t, 3, n, n), &dev)?,
                state: Tensor::from_vec(state, (b, t, cfg.inputs.state_dim), &dev)?,
                surface: Tensor::from_vec(surf, (b, t, cfg.inputs.surface_rows, cfg.inputs.surface_cols), &dev)?,
                task: Tensor::from_vec(task, b, &dev)?,
            },
            actions: Tensor::from_vec(act, (b, hz, cfg.head.action_dim), &dev)?,
            action_mask: Tensor::from_vec(mask, (b, hz), &dev)?,
            obs_pad: Tensor::from_vec(obs_pad, (b, t), &dev)?,
            weights: Tensor::ones(b, candle_core::DType::F32, &dev)?,
        })
    }

    /// Whether row `i + k` exists in row `i`'s episode.
    pub fn in_episode(&self, i: usize, k: isize) -> bool {
        let j = i as isize + k;
        j >= 0 && (j as usize) < self.rows.len() && self.rows[j as usize].episode == self.rows[i].episode
    }
}

/// A batch of training windows: observations, normalized actions, which actions are real,
/// which observation steps are padding, and a weight per window.
pub struct TrainBatch {
    pub obs: ObsBatch,
    /// (B, horizon, action_dim), normalized.
    pub actions: Tensor,
    /// (B, horizon): 1 for a real action, 0 for padding past the episode's end.
    pub action_mask: Tensor,
    /// (B, n_obs_steps) u8: 1 where the observation step is padding before the episode's start.
    pub obs_pad: Tensor,
    /// (B): how much each window counts (interventions up, rewards, preferences).
    pub weights: Tensor,
}

impl TrainBatch {
    /// A batch replay served (`nanobot_messages::ReplayBatch`), checked against the policy's
    /// sizes, normalized with the base's statistics: images to channel-major floats in [0, 1],
    /// states and actions to [-1, 1] as in offline training.
    pub fn from_replay(
        b: &nanobot_messages::ReplayBatch,
        cfg: &PolicyConfig,
        norm: &NormStats,
    ) -> Result<TrainBatch, TrainError> {
        use nanobot_messages::DType as D;
        let n = b.windows as usize;
        let (t, hz, px) = (cfg.trunk.n_obs_steps, cfg.head.horizon, cfg.vision.image_size);
        let (sd, ad) = (cfg.inputs.state_dim, cfg.head.action_dim);
        let (sr, sc) = (cfg.inputs.surface_rows, cfg.inputs.surface_cols);
        let all = b.tensors();
        let get = |name: &str, dtype: D, shape: &[usize]| -> Result<bytes::Bytes, TrainError> {
            let (view, bytes) = all
                .iter()
                .find(|(t, _)| t.name == name)
                .and_then(|(t, bytes)| Some((*t, bytes.clone()?)))
                .ok_or_else(|| {
                    TrainError::Data(format!("replay batch: no tensor `{name}` (or it overruns the blob)"))
                })?;
            let want: Vec<u32> = shape.iter().map(|d| *d as u32).collect();
            if view.dtype != dtype || view.shape != want {
                return Err(TrainError::Data(format!(
                    "replay batch: `{name}` is {:?} {:?}, the policy needs {dtype:?} {want:?}",
                    view.dtype, view.shape
                )));
            }
            Ok(bytes)
        };
        let f32s = |bytes: &[u8]| -> Vec<f32> {
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let image: Vec<f32> = get("image", D::U8, &[n, t, 3, px, px])?
            .iter()
            .map(|&v| v as f32 / 255.0)
            .collect();
        let state: Vec<f32> = f32s(&get("state", D::F32, &[n, t, sd])?)
            .chunks_exact(sd.max(1))
            .flat_map(|r| norm.normalize_state(r))
            .collect();
        let surface = f32s(&get("surface", D::F32, &[n, t, sr * sc])?);
        let task: Vec<u32> = get("task", D::U32, &[n])?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let action: Vec<f32> = f32s(&get("action", D::F32, &[n, hz, ad])?)
            .chunks_exact(ad.max(1))
            .flat_map(|r| norm.normalize_action(r))
            .collect();
        let mask = f32s(&get("action_mask", D::F32, &[n, hz])?);
        let obs_pad = get("obs_pad", D::U8, &[n, t])?.to_vec();
        let weights = f32s(&get("weight", D::F32, &[n])?);
        if let Some(bad) = task.iter().find(|v| **v as usize >= cfg.inputs.n_tasks) {
            return Err(TrainError::Data(format!(
                "replay batch: task {bad}, the policy knows {}",
                cfg.inputs.n_tasks
            )));
        }
        let dev = Device::Cpu;
        Ok(TrainBatch {
            obs: ObsBatch {
                images: Tensor::from_vec(image, (n, t, 3, px, px), &dev)?,
                state: Tensor::from_vec(state, (n, t, sd), &dev)?,
                surface: Tensor::from_vec(surface, (n, t, sr, sc), &dev)?,
                task: Tensor::from_vec(task, n, &dev)?,
            },
            actions: Tensor::from_vec(action, (n, hz, ad), &dev)?,
            action_mask: Tensor::from_vec(mask, (n, hz), &dev)?,
            obs_pad: Tensor::from_vec(obs_pad, (n, t), &dev)?,
            weights: Tensor::from_vec(weights, n, &dev)?,
        })
    }
}

/// AdamW with decoupled weight decay and bias correction — the same arithmetic as candle's,
/// step for step — with its moments in plain sight, by variable name, so that a trainer
/// checkpoint holds them and a resumed run continues exactly.
pub struct AdamW {
    vars: Vec<(String, Var, Var, Var)>,
    step: u64,
    pub params: AdamParams,
}

/// AdamW's settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamParams {
    fn default() -> Self {
        AdamParams {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamW {
    /// Optimize the named variables (a base's, or an adapter's).
    pub fn new(vars: Vec<(String, Var)>, params: AdamParams) -> Result<AdamW, TrainError> {
        let vars = vars
            .into_iter()
            .filter(|(_, v)| v.dtype().is_float())
            .map(|(name, v)| {
                let m = Var::zeros(v.shape(), v.dtype(), v.device())?;
                let s = Var::zeros(v.shape(), v.dtype(), v.device())?;
                Ok((name, v, m, s))
            })
            .collect::<Result<Vec<_>, candle_core::Error>>()?;
        Ok(AdamW { vars, step: 0, params })
    }

    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update from `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<(), TrainError> {
        self.step += 1;
        let p = self.params;
        let lr_lambda = p.lr * p.weight_decay;
        let scale_m = 1f64 / (1f64 - p.beta1.powi(self.step as i32));
        let scale_v = 1f64 / (1f64 - p.beta2.powi(self.step as i32));
        for (_, theta, m, v) in &self.vars {
            if let Some(g) = grads.get(theta) {
                let next_m = ((m.as_tensor() * p.beta1)? + (g * (1.0 - p.beta1))?)?;
                let next_v = ((v.as_tensor() * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
                let m_hat = (&next_m * scale_m)?;
                let v_hat = (&next_v * scale_v)?;
                let next_theta = (theta.as_tensor() * (1f64 - lr_lambda))?;
                let adjusted = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
                let next_theta = (next_theta - (adjusted * p.lr)?)?;
                m.set(&next_m)?;
                v.set(&next_v)?;
                theta.set(&next_theta)?;
            }
        }
        Ok(())
    }

    /// Scale the gradients of the optimized variables so their global L2 norm is at most
    /// `max_norm`; returns the norm before clipping.
    pub fn clip_grad_norm(&self, grads: &mut GradStore, max_norm: f64) -> Result<f64, TrainError> {
        let mut sq = 0f64;
        for (_, theta, _, _) in &self.vars {
            if let Some(g) = grads.get(theta) {
                sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        let norm = sq.sqrt();
        if norm > max_norm && norm.is_finite() {
            let scale = max_norm / (norm + 1e-6);
            for (_, theta, _, _) in &self.vars {
                if let Some(g) = grads.remove(theta) {
                    grads.insert(theta, (g * scale)?);
                }
            }
        }
        Ok(norm)
    }

    /// The trained weights and the moments, by name: `w.NAME`, `m.NAME`, `v.NAME`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.vars.len() * 3);
        for (name, theta, m, v) in &self.vars {
            out.push((format!("w.{name}"), theta.as_tensor().clone()));
            out.push((format!("m.{name}"), m.as_tensor().clone()));
            out.push((format!("v.{name}"), v.as_tensor().clone()));
        }
        out
    }

    /// Put back weights and moments saved by `state_tensors` after `step` updates; every
    /// variable must be there with its shape.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<(), String> {
        for (name, theta, m, v) in &self.vars {
            for (prefix, var) in [("w", theta), ("m", m), ("v", v)] {
                let key = format!("{prefix}.{name}");
                let t = tensors.get(&key).ok_or_else(|| format!("{key} is missing"))?;
                if t.dims() != var.dims() {
                    return Err(format!(
                        "{key} has shape {:?}, the model's is {:?}",
                        t.dims(),
                        var.dims()
                    ));
                }
                var.set(t).map_err(|e| format!("{key}: {e}"))?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// How the learning rate moves: linear warmup, then constant or a cosine decay to
/// `min_ratio · lr` at `total` steps.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LrSchedule {
    Constant,
    Cosine { total: u64, min_ratio: f64 },
}

impl LrSchedule {
    /// The learning rate at 1-based `step`.
    pub fn lr(&self, base: f64, warmup: u64, step: u64) -> f64 {
        let warm = (step as f64 / warmup.max(1) as f64).min(1.0);
        match *self {
            LrSchedule::Constant => base * warm,
            LrSchedule::Cosine { total, min_ratio } => {
                if step <= warmup {
                    return base * warm;
                }
                let span = total.saturating_sub(warmup).max(1) as f64;
                let p = ((step - warmup) as f64 / span).min(1.0);
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * p).cos());
                base * (min_ratio + (1.0 - min_ratio) * cos)
            }
        }
    }
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
