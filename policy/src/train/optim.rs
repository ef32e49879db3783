//! The optimizer: AdamW with its moments by variable name (so a checkpoint holds them), and the
//! learning-rate schedule.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::*;

/// AdamW with decoupled weight decay and bias correction — the same arithmetic as candle's,
/// step for step — with its moments in plain sight, by variable name, so that a trainer
/// checkpoint holds them and a resumed run continues exactly.
pub struct AdamW {
    pub(super) vars: Vec<(String, Var, Var, Var)>,
    pub(super) step: u64,
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
