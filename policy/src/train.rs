//! Training: windows of decoded rows (`n_obs_steps` observations and `horizon` actions within
//! one episode) and the DDPM training step (AdamW with linear warmup). `nanobot train`
//! pretrains the base with it; the online trainer runs the same step on LoRA adapters.

use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
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
        let (t, hz, n) = (cfg.trunk.n_obs_steps, cfg.head.horizon, cfg.vision.image_size);
        let (mut img, mut state, mut surf, mut task, mut act) = (vec![], vec![], vec![], vec![], vec![]);
        for &i in idx {
            for k in 0..t {
                let r = self.at(i, k as isize - (t as isize - 1));
                rgb_to_chw(&r.rgb, &mut img);
                state.extend(norm.normalize_state(&r.state));
                surf.extend_from_slice(&r.surface);
            }
            for k in 0..hz {
                act.extend(norm.normalize_action(&self.at(i, k as isize).action));
            }
            task.push(self.rows[i].task);
        }
        let b = idx.len();
        let dev = Device::Cpu;
        Ok((
            ObsBatch {
                images: Tensor::from_vec(img, (b, t, 3, n, n), &dev)?,
                state: Tensor::from_vec(state, (b, t, cfg.inputs.state_dim), &dev)?,
                surface: Tensor::from_vec(surf, (b, t, cfg.inputs.surface_rows, cfg.inputs.surface_cols), &dev)?,
                task: Tensor::from_vec(task, b, &dev)?,
            },
            Tensor::from_vec(act, (b, hz, cfg.head.action_dim), &dev)?,
        ))
    }
}

/// Optimizer settings.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub seed: u64,
}

/// The DDPM training loop's state: optimizer, step count and the sampling RNG.
pub struct Trainer {
    cfg: TrainConfig,
    opt: AdamW,
    rng: Normal,
    step: usize,
}

impl Trainer {
    /// Train `vars` (the base's, or an adapter's).
    pub fn new(vars: Vec<Var>, cfg: TrainConfig) -> Result<Trainer, TrainError> {
        let opt = AdamW::new(
            vars,
            ParamsAdamW {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
        )?;
        Ok(Trainer {
            rng: Normal::new(cfg.seed ^ 0x7a11),
            cfg,
            opt,
            step: 0,
        })
    }

    pub fn steps_done(&self) -> usize {
        self.step
    }

    pub fn learning_rate(&self) -> f64 {
        self.opt.learning_rate()
    }

    /// One step on a batch of uniformly drawn windows; returns its loss.
    pub fn step(
        &mut self,
        policy: &Policy,
        data: &Windows,
        pcfg: &PolicyConfig,
        norm: &NormStats,
    ) -> Result<f32, TrainError> {
        self.step += 1;
        let (step, c) = (self.step, &self.cfg);
        self.opt
            .set_learning_rate(c.lr * (step as f64 / c.warmup.max(1) as f64).min(1.0));
        let idx: Vec<usize> = (0..c.batch)
            .map(|_| self.rng.below(data.len() as u32) as usize)
            .collect();
        let (obs, actions) = data.batch(&idx, pcfg, norm)?;
        let eps = seeded_randn(c.seed.wrapping_add(step as u64 * 7919), actions.dims(), &Device::Cpu)?;
        let t: Vec<u32> = (0..c.batch)
            .map(|_| self.rng.below(pcfg.head.train_steps as u32))
            .collect();
        let loss = policy.loss(&obs, &actions, &eps, &t)?;
        let l = loss.to_scalar::<f32>()?;
        if !l.is_finite() {
            return Err(TrainError::Diverged { step, loss: l });
        }
        self.opt.backward_step(&loss)?;
        Ok(l)
    }
}
