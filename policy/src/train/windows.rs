//! Training windows: decoded rows, `n_obs_steps` observations and `horizon` actions within one
//! episode, padded and masked at its edges, and a batch of them as tensors.

use candle_core::{Device, Tensor};

use crate::checkpoint::NormStats;
use crate::preprocess::rgb_to_chw;
use crate::{ObsBatch, PolicyConfig};

use super::*;

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
