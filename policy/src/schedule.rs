//! Diffusion noise schedules: DDPM for training, DDIM for sampling (Diffusion Policy's
//! choices: 100 training steps, the squared-cosine schedule, epsilon prediction, samples
//! clipped to [-1, 1]).
//!
//! Formulas (Ho et al. 2020; Nichol & Dhariwal 2021; Song et al. 2021), as diffusers writes
//! them (`squaredcos_cap_v2`, DDIM with `set_alpha_to_one` and "leading" timestep spacing):
//! - `ᾱ(t) = cos²((t + 0.008) / 1.008 · π/2)`, `β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), 0.999)`
//! - `ᾱ_t = Π_{i≤t} (1 − β_i)`; forward noising `x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε`
//! - DDIM (η = 0): `x̂_0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t`, clipped; `x_prev = √ᾱ_prev x̂_0 + √(1−ᾱ_prev) ε̂`

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum ScheduleError {
    #[error("train_steps must be at least 1, got {0}")]
    TrainSteps(usize),
    #[error("inference steps must be in 1..={train}, got {got}")]
    InferenceSteps { got: usize, train: usize },
    #[error("timestep {t} is outside 0..{train}")]
    Timestep { t: usize, train: usize },
    #[error("sample has {sample} values but the noise prediction has {eps}")]
    Shape { sample: usize, eps: usize },
}

/// The DDPM noise schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct DdpmSchedule {
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
}

impl DdpmSchedule {
    /// The squared-cosine schedule over `train_steps` steps.
    pub fn squared_cosine(train_steps: usize) -> Result<Self, ScheduleError> {
        if train_steps == 0 {
            return Err(ScheduleError::TrainSteps(0));
        }
        let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
        let t = train_steps as f64;
        let betas: Vec<f64> = (0..train_steps)
            .map(|i| (1.0 - alpha_bar((i + 1) as f64 / t) / alpha_bar(i as f64 / t)).min(0.999))
            .collect();
        let mut acc = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        Ok(DdpmSchedule { betas, alphas_cumprod })
    }

    pub fn train_steps(&self) -> usize {
        self.betas.len()
    }

    /// `(√ᾱ_t, √(1−ᾱ_t))`: the weights of `x_0` and `ε` in the forward process.
    pub fn noise_weights(&self, t: usize) -> Result<(f64, f64), ScheduleError> {
        let a = *self.alphas_cumprod.get(t).ok_or(ScheduleError::Timestep {
            t,
            train: self.train_steps(),
        })?;
        Ok((a.sqrt(), (1.0 - a).sqrt()))
    }

    /// `x_t` from a clean sample and noise.
    pub fn add_noise(&self, x0: &[f32], eps: &[f32], t: usize) -> Result<Vec<f32>, ScheduleError> {
        if x0.len() != eps.len() {
            return Err(ScheduleError::Shape {
                sample: x0.len(),
                eps: eps.len(),
            });
        }
        let (a, b) = self.noise_weights(t)?;
        Ok(x0
            .iter()
            .zip(eps)
            .map(|(&x, &e)| (a * x as f64 + b * e as f64) as f32)
            .collect())
    }
}

/// DDIM sampling over a subset of the training timesteps.
#[derive(Clone, Debug, PartialEq)]
pub struct DdimSampler {
    pub schedule: DdpmSchedule,
    /// Timesteps visited, from noisiest to cleanest (e.g. 90, 80, …, 0 for 10 of 100).
    pub timesteps: Vec<usize>,
    step_ratio: usize,
    /// Clip the predicted clean sample to `[-clip, clip]` (None: no clipping).
    pub clip: Option<f64>,
}

impl DdimSampler {
    pub fn new(schedule: DdpmSchedule, steps: usize, clip: Option<f64>) -> Result<Self, ScheduleError> {
        let train = schedule.train_steps();
        if steps == 0 || steps > train {
            return Err(ScheduleError::InferenceSteps { got: steps, train });
        }
        let step_ratio = train / steps;
        let timesteps = (0..steps).rev().map(|i| i * step_ratio).collect();
        Ok(DdimSampler {
            schedule,
            timesteps,
            step_ratio,
            clip,
        })
    }

    /// One deterministic DDIM step from timestep `t`, given the predicted noise.
    pub fn step(&self, sample: &[f32], eps: &[f32], t: usize) -> Result<Vec<f32>, ScheduleError> {
        if sample.len() != eps.len() {
            return Err(ScheduleError::Shape {
                sample: sample.len(),
                eps: eps.len(),
            });
        }
        let a_t = *self.schedule.alphas_cumprod.get(t).ok_or(ScheduleError::Timestep {
            t,
            train: self.schedule.train_steps(),
        })?;
        let a_prev = t
            .checked_sub(self.step_ratio)
            .map(|p| self.schedule.alphas_cumprod[p])
            .unwrap_or(1.0);
        let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let (pa, pb) = (a_prev.sqrt(), (1.0 - a_prev).sqrt());
        Ok(sample
            .iter()
            .zip(eps)
            .map(|(&x, &e)| {
                let (x, e) = (x as f64, e as f64);
                let mut x0 = (x - sb * e) / sa;
                if let Some(c) = self.clip {
                    x0 = x0.clamp(-c, c);
                }
                (pa * x0 + pb * e) as f32
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_shape_and_bounds() {
        let s = DdpmSchedule::squared_cosine(100).unwrap();
        assert_eq!(s.betas.len(), 100);
        assert!(s.betas.iter().all(|&b| b > 0.0 && b <= 0.999));
        assert!(s.alphas_cumprod.windows(2).all(|w| w[1] < w[0]), "ᾱ decreases");
        assert!(s.alphas_cumprod[99] < 1e-3);
        assert!(DdpmSchedule::squared_cosine(0).is_err());
    }

    #[test]
    fn ddim_with_the_true_noise_recovers_the_clean_sample() {
        let s = DdpmSchedule::squared_cosine(100).unwrap();
        let d = DdimSampler::new(s.clone(), 10, Some(1.0)).unwrap();
        assert_eq!(d.timesteps, vec![90, 80, 70, 60, 50, 40, 30, 20, 10, 0]);
        let x0 = [0.3f32, -0.7, 0.9, 0.0];
        let eps = [1.0f32, -0.5, 0.25, 2.0];
        let mut x = s.add_noise(&x0, &eps, 90).unwrap();
        for &t in &d.timesteps {
            // The exact noise at every step: a perfect denoiser.
            let (a, b) = s.noise_weights(t).unwrap();
            let e: Vec<f32> = x
                .iter()
                .zip(&x0)
                .map(|(&xt, &c)| ((xt as f64 - a * c as f64) / b) as f32)
                .collect();
            x = d.step(&x, &e, t).unwrap();
        }
        for (got, want) in x.iter().zip(x0) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
        assert!(DdimSampler::new(s.clone(), 0, None).is_err());
        assert!(d.step(&x, &[0.0], 90).is_err());
        assert!(d.step(&x, &x0, 100).is_err());
    }
}
