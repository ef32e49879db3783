//! Running a trained policy: load a checkpoint (a safetensors base with an optional LoRA
//! adapter, or a GGUF export at any precision) and turn decoded observations into a
//! de-normalized action chunk. Used by the HTTP server, the policy actor and the trainer's
//! evaluation.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use thiserror::Error;

use crate::checkpoint::{self, CheckpointError, Meta, NormStats, Role};
use crate::engine::{ChunkInput, Engine, EngineError, Scratch};
use crate::export::{gguf_config, load_gguf_into};
use crate::gguf::{Gguf, Value};
use crate::model::{seeded_randn, ObsBatch, Policy};
use crate::PolicyConfig;

#[derive(Debug, Error)]
pub enum RunnerError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{file}: {reason}")]
    File { file: String, reason: String },
    #[error("observation: {0}")]
    Input(String),
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

pub use crate::preprocess::{rgb_to_chw, Step};

pub struct Runner {
    policy: Policy,
    pub base: VarMap,
    pub adapter: Option<VarMap>,
    pub meta: Meta,
    pub adapter_meta: Option<Meta>,
    /// Where the weights came from, and in which format (`safetensors`, `gguf:mxfp4`, ...).
    pub source: PathBuf,
    pub format: String,
    /// DDIM steps when acting, where not the config's (`nanobot tune` measures the trade).
    sampling_steps: Option<usize>,
    /// The same weights (adapter folded in) laid out for acting.
    engine: Engine,
    /// Buffers of finished calls, reused by the next (one per concurrent caller).
    scratch: std::sync::Mutex<Vec<Scratch>>,
}

fn file_err(path: &Path, reason: impl ToString) -> RunnerError {
    RunnerError::File {
        file: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn build(cfg: &PolicyConfig, with_adapter: bool) -> Result<(Policy, VarMap, Option<VarMap>), RunnerError> {
    let dev = Device::Cpu;
    let base = VarMap::new();
    let adapter = with_adapter.then(VarMap::new);
    let policy = Policy::new(
        cfg,
        VarBuilder::from_varmap(&base, DType::F32, &dev),
        adapter.as_ref().map(|a| VarBuilder::from_varmap(a, DType::F32, &dev)),
    )?;
    Ok((policy, base, adapter))
}

/// What a runner is made of before its engine is compiled.
struct Parts {
    sampling_steps: Option<usize>,
    policy: Policy,
    base: VarMap,
    adapter: Option<VarMap>,
    meta: Meta,
    adapter_meta: Option<Meta>,
    source: PathBuf,
    format: String,
}

/// The base weights with the adapter folded in (`W + (α/r)·B·A` for every adapted linear).
pub(crate) fn merge(base: &VarMap, adapter: Option<&VarMap>, scale: f64) -> Result<VarMap, RunnerError> {
    let out = VarMap::new();
    let base = base.data().lock().unwrap_or_else(|e| e.into_inner());
    let adapter = adapter.map(|a| a.data().lock().unwrap_or_else(|e| e.into_inner()).clone());
    let mut data = out.data().lock().unwrap_or_else(|e| e.into_inner());
    for (name, var) in base.iter() {
        let mut w = var.as_tensor().clone();
        if let (Some(ad), Some(prefix)) = (&adapter, name.strip_suffix(".weight")) {
            if let (Some(a), Some(b)) = (ad.get(&format!("{prefix}.lora_a")), ad.get(&format!("{prefix}.lora_b"))) {
                w = (w + (b.as_tensor().matmul(a.as_tensor())? * scale)?)?;
            }
        }
        data.insert(name.clone(), candle_core::Var::from_tensor(&w)?);
    }
    drop(data);
    Ok(out)
}

impl Runner {
    fn assemble(p: Parts) -> Result<Runner, RunnerError> {
        let merged = merge(&p.base, p.adapter.as_ref(), p.meta.config.lora.scale())?;
        let mut cfg = p.meta.config.clone();
        if let Some(steps) = p.sampling_steps {
            cfg.head.ddim_steps = steps;
            cfg.validate()
                .map_err(|e| RunnerError::Input(format!("ddim_steps = {steps}: {e}")))?;
        }
        let engine = Engine::new(&cfg, &merged)?;
        Ok(Runner {
            sampling_steps: p.sampling_steps,
            policy: p.policy,
            base: p.base,
            adapter: p.adapter,
            meta: p.meta,
            adapter_meta: p.adapter_meta,
            source: p.source,
            format: p.format,
            engine,
            scratch: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Run `f` with a scratch buffer set (taken from the pool, returned after).
    fn with_scratch<T>(&self, f: impl FnOnce(&mut Scratch) -> T) -> T {
        let mut s = self
            .scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default();
        let out = f(&mut s);
        self.scratch.lock().unwrap_or_else(|e| e.into_inner()).push(s);
        out
    }

    /// The candle model (training, and the reference the engine is checked against).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// What identifies these weights and this way of sampling: runners with equal keys act
    /// alike, so their robots' chunks can be computed as one batch with either.
    pub fn weights_key(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}",
            self.source.display(),
            self.format,
            self.meta.version,
            self.adapter_version(),
            self.sampling_steps()
        )
    }

    /// DDIM steps per chunk when acting.
    pub fn sampling_steps(&self) -> usize {
        self.sampling_steps.unwrap_or(self.meta.config.head.ddim_steps)
    }

    /// This policy acting with `steps` DDIM steps per chunk (kept through adapter swaps).
    pub fn with_sampling_steps(&self, steps: usize) -> Result<Runner, RunnerError> {
        Runner::assemble(Parts {
            sampling_steps: Some(steps),
            policy: self.policy.clone(),
            base: self.base.clone(),
            adapter: self.adapter.clone(),
            meta: self.meta.clone(),
            adapter_meta: self.adapter_meta.clone(),
            source: self.source.clone(),
            format: self.format.clone(),
        })
    }

    /// This policy (adapter folded in) with its weights rounded through `dtype` as a GGUF export
    /// stores them: what a robot loading that export acts with.
    pub fn quantized(&self, dtype: crate::quant::DType) -> Result<Runner, RunnerError> {
        let merged = self.merged_base()?;
        let g = crate::export::to_gguf(&merged, &self.meta, dtype).map_err(|e| file_err(&self.source, e))?;
        let (policy, base, _) = build(&self.meta.config, false)?;
        load_gguf_into(&g, &base).map_err(|e| file_err(&self.source, e))?;
        Runner::assemble(Parts {
            sampling_steps: self.sampling_steps,
            policy,
            base,
            adapter: None,
            meta: self.meta.clone(),
            adapter_meta: None,
            source: self.source.clone(),
            format: format!("gguf:{}", dtype.name()),
        })
    }

    /// Load `path` (`.gguf`: an export; anything else: a safetensors base checkpoint) and, for
    /// a safetensors base, the LoRA `adapter` checkpoint made for it.
    pub fn load(path: &Path, adapter: Option<&Path>) -> Result<Runner, RunnerError> {
        if path.extension().is_some_and(|e| e == "gguf") {
            if adapter.is_some() {
                return Err(file_err(
                    path,
                    "a GGUF export has its adapter merged; load adapters on a safetensors base",
                ));
            }
            let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
            let g = Gguf::from_bytes(&bytes).map_err(|e| file_err(path, e))?;
            let config = gguf_config(&g).map_err(|e| file_err(path, e))?;
            let norm: NormStats = g
                .metadata
                .get("nanobot.norm_json")
                .and_then(Value::as_str)
                .and_then(|s| serde_json::from_str(s).ok())
                .ok_or_else(|| file_err(path, "no nanobot.norm_json metadata: not a NanoBot policy export"))?;
            let (policy, base, _) = build(&config, false)?;
            load_gguf_into(&g, &base).map_err(|e| file_err(path, e))?;
            let file_type = g
                .metadata
                .get("general.file_type")
                .and_then(Value::as_str)
                .unwrap_or("f32");
            let version = g
                .metadata
                .get("general.name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            return Runner::assemble(Parts {
                sampling_steps: None,
                policy,
                base,
                adapter: None,
                meta: Meta {
                    kind: Role::Base,
                    version,
                    config,
                    norm,
                },
                adapter_meta: None,
                source: path.to_path_buf(),
                format: format!("gguf:{file_type}"),
            });
        }
        let (meta, _) = checkpoint::read(path)?;
        let (policy, base, adapter_vars) = build(&meta.config, adapter.is_some())?;
        let meta = checkpoint::load_into(path, &base, &meta.config, Role::Base)?;
        let adapter_meta = match (adapter, &adapter_vars) {
            (Some(a), Some(vars)) => Some(checkpoint::load_into(a, vars, &meta.config, Role::Adapter)?),
            _ => None,
        };
        Runner::assemble(Parts {
            sampling_steps: None,
            policy,
            base,
            adapter: adapter_vars,
            meta,
            adapter_meta,
            source: path.to_path_buf(),
            format: "safetensors".into(),
        })
    }

    /// This base with another adapter: `bytes` is an adapter checkpoint (what a trainer ships
    /// and a promotion serves), named `name` in errors. The base's weights are shared, not
    /// copied; the adapter must be made for this base's config, hold every adapter tensor with
    /// its shape and nothing else, and be finite. `self` is untouched whatever happens, so a
    /// robot keeps acting with it when the new adapter is refused.
    pub fn with_adapter_bytes(&self, bytes: &[u8], name: &str) -> Result<Runner, RunnerError> {
        self.check_swappable(name)?;
        let adapter = VarMap::new();
        let policy = Policy::new(
            &self.meta.config,
            VarBuilder::from_varmap(&self.base, DType::F32, &Device::Cpu),
            Some(VarBuilder::from_varmap(&adapter, DType::F32, &Device::Cpu)),
        )?;
        let meta = checkpoint::load_bytes_into(bytes, name, &adapter, &self.meta.config, Role::Adapter)?;
        Runner::assemble(Parts {
            sampling_steps: self.sampling_steps,
            policy,
            base: self.base.clone(),
            adapter: Some(adapter),
            meta: self.meta.clone(),
            adapter_meta: Some(meta),
            source: self.source.clone(),
            format: self.format.clone(),
        })
    }

    /// This base without an adapter (a rollback to the base itself).
    pub fn without_adapter(&self) -> Result<Runner, RunnerError> {
        self.check_swappable("the base")?;
        let policy = Policy::new(
            &self.meta.config,
            VarBuilder::from_varmap(&self.base, DType::F32, &Device::Cpu),
            None,
        )?;
        Runner::assemble(Parts {
            sampling_steps: self.sampling_steps,
            policy,
            base: self.base.clone(),
            adapter: None,
            meta: self.meta.clone(),
            adapter_meta: None,
            source: self.source.clone(),
            format: self.format.clone(),
        })
    }

    /// A fresh adapter for this base (LoRA's initialization: `B = 0`, so it acts as the base
    /// does) as a checkpoint's bytes named `version`: what a trainer starts from, and what a
    /// promotion ships before any training.
    pub fn fresh_adapter(&self, version: &str) -> Result<(VarMap, Vec<u8>), RunnerError> {
        let adapter = VarMap::new();
        Policy::new(
            &self.meta.config,
            VarBuilder::from_varmap(&self.base, DType::F32, &Device::Cpu),
            Some(VarBuilder::from_varmap(&adapter, DType::F32, &Device::Cpu)),
        )?;
        let meta = Meta {
            kind: Role::Adapter,
            version: version.to_string(),
            config: self.meta.config.clone(),
            norm: self.meta.norm.clone(),
        };
        let bytes = checkpoint::to_bytes(&adapter, &meta).map_err(|e| file_err(&self.source, e))?;
        Ok((adapter, bytes))
    }

    fn check_swappable(&self, name: &str) -> Result<(), RunnerError> {
        if self.format != "safetensors" {
            return Err(file_err(
                &self.source,
                format!(
                    "{name}: a {} export has its adapter merged; adapters swap on a safetensors base",
                    self.format
                ),
            ));
        }
        Ok(())
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.meta.config
    }

    pub fn adapter_version(&self) -> String {
        self.adapter_meta
            .as_ref()
            .map(|m| m.version.clone())
            .unwrap_or_default()
    }

    /// Check one step against the config; the error names the field.
    /// The JPEGs this policy can use: its own image size, square.
    pub fn jpeg_limits(&self) -> crate::preprocess::JpegLimits {
        let side = self.config().vision.image_size as u32;
        crate::preprocess::JpegLimits {
            max_width: side,
            max_height: side,
            ..Default::default()
        }
    }

    pub fn check(&self, s: &Step) -> Result<(), RunnerError> {
        let c = self.config();
        let px = c.vision.image_size * c.vision.image_size * 3;
        if s.rgb.len() != px {
            return Err(RunnerError::Input(format!(
                "image has {} RGB bytes, the policy takes {}×{}×3 = {px}",
                s.rgb.len(),
                c.vision.image_size,
                c.vision.image_size
            )));
        }
        if s.state.len() != c.inputs.state_dim {
            return Err(RunnerError::Input(format!(
                "state has {} values, the policy takes {}",
                s.state.len(),
                c.inputs.state_dim
            )));
        }
        let cells = c.inputs.surface_rows * c.inputs.surface_cols;
        if s.surface.len() != cells {
            return Err(RunnerError::Input(format!(
                "surface has {} cells, the policy takes {cells}",
                s.surface.len()
            )));
        }
        if let Some(i) = s.state.iter().chain(&s.surface).position(|v| !v.is_finite()) {
            return Err(RunnerError::Input(format!("value {i} of state/surface is not finite")));
        }
        Ok(())
    }

    /// The observation batch (B = 1) for the last `n_obs_steps` of `history` (oldest first;
    /// a short history repeats its first step).
    pub fn batch(&self, history: &[Step], task: u32) -> Result<ObsBatch, RunnerError> {
        let c = self.config();
        if history.is_empty() {
            return Err(RunnerError::Input("no observation".into()));
        }
        if task as usize >= c.inputs.n_tasks {
            return Err(RunnerError::Input(format!(
                "task {task}: the policy knows {} tasks",
                c.inputs.n_tasks
            )));
        }
        for s in history {
            self.check(s)?;
        }
        let t = c.trunk.n_obs_steps;
        let steps: Vec<&Step> = (0..t)
            .map(|k| {
                let i = history.len() as isize - t as isize + k as isize;
                &history[i.max(0) as usize]
            })
            .collect();
        let n = c.vision.image_size;
        let dev = Device::Cpu;
        let mut img = Vec::with_capacity(t * 3 * n * n);
        for s in &steps {
            rgb_to_chw(&s.rgb, &mut img);
        }
        let state: Vec<f32> = steps
            .iter()
            .flat_map(|s| self.meta.norm.normalize_state(&s.state))
            .collect();
        let surface: Vec<f32> = steps.iter().flat_map(|s| s.surface.iter().copied()).collect();
        Ok(ObsBatch {
            images: Tensor::from_vec(img, (1, t, 3, n, n), &dev)?,
            state: Tensor::from_vec(state, (1, t, c.inputs.state_dim), &dev)?,
            surface: Tensor::from_vec(surface, (1, t, c.inputs.surface_rows, c.inputs.surface_cols), &dev)?,
            task: Tensor::from_vec(vec![task], 1, &dev)?,
        })
    }

    /// The vision tokens of frames (what a rollout caches per observation): one
    /// `image_tokens × width` vector per step, the frames going through the encoder as one batch.
    pub fn frame_tokens(&self, steps: &[&Step]) -> Result<Vec<Vec<f32>>, RunnerError> {
        let n = self.config().vision.image_size;
        let mut px = Vec::with_capacity(steps.len() * 3 * n * n);
        for s in steps {
            self.check(s)?;
            rgb_to_chw(&s.rgb, &mut px);
        }
        let all = self.with_scratch(|s| self.engine.frame_tokens(&px, steps.len(), s))?;
        Ok(all
            .chunks_exact(self.engine.frame_token_len())
            .map(<[f32]>::to_vec)
            .collect())
    }

    /// An action chunk (`horizon × action_dim`, de-normalized) for `history`, with the DDIM
    /// start noise drawn from `seed`. Every frame goes through the vision encoder; a
    /// [`crate::rollout::Rollout`] keeps each frame's tokens for the chunks where it is history.
    pub fn act(&self, history: &[Step], task: u32, seed: u64) -> Result<Vec<f32>, RunnerError> {
        let window = self.window(history)?;
        let req = self.request_window(&window, task, seed)?;
        let tokens = self.frame_tokens(&window)?;
        let refs: Vec<&[f32]> = tokens.iter().map(Vec::as_slice).collect();
        let mut out = self.chunks(&[req.input(&refs)])?;
        Ok(out.pop().unwrap_or_default())
    }

    /// The last `n_obs_steps` of `history` (oldest first; a short history repeats its first
    /// step).
    pub fn window<'a>(&self, history: &'a [Step]) -> Result<Vec<&'a Step>, RunnerError> {
        if history.is_empty() {
            return Err(RunnerError::Input("no observation".into()));
        }
        let t = self.config().trunk.n_obs_steps;
        Ok((0..t)
            .map(|k| &history[(history.len() as isize - t as isize + k as isize).max(0) as usize])
            .collect())
    }

    /// What a chunk needs besides the vision tokens, checked: the window's normalized state and
    /// surface, the task and the start noise drawn from `seed`.
    pub fn request(&self, history: &[Step], task: u32, seed: u64) -> Result<Request, RunnerError> {
        self.request_window(&self.window(history)?, task, seed)
    }

    /// [`Runner::request`] for the window itself (the last `n_obs_steps` steps, oldest first).
    pub fn request_window(&self, window: &[&Step], task: u32, seed: u64) -> Result<Request, RunnerError> {
        let c = self.config();
        if task as usize >= c.inputs.n_tasks {
            return Err(RunnerError::Input(format!(
                "task {task}: the policy knows {} tasks",
                c.inputs.n_tasks
            )));
        }
        if window.len() != c.trunk.n_obs_steps {
            return Err(RunnerError::Input(format!(
                "{} observation steps, the policy takes {}",
                window.len(),
                c.trunk.n_obs_steps
            )));
        }
        for s in window {
            self.check(s)?;
        }
        let mut rng = crate::rng::Normal::new(seed);
        Ok(Request {
            state: window
                .iter()
                .flat_map(|s| self.meta.norm.normalize_state(&s.state))
                .collect(),
            surface: window.iter().flat_map(|s| s.surface.iter().copied()).collect(),
            task,
            noise: (0..c.head.horizon * c.head.action_dim).map(|_| rng.next()).collect(),
        })
    }

    /// De-normalized action chunks for a batch of requests, computed together.
    pub fn chunks(&self, inputs: &[ChunkInput]) -> Result<Vec<Vec<f32>>, RunnerError> {
        let out = self.with_scratch(|s| self.engine.chunks(inputs, s))?;
        Ok(out.iter().map(|a| self.meta.norm.denormalize_action(a)).collect())
    }

    /// [`Runner::act`] through the candle model (what the engine is checked against).
    pub fn act_reference(&self, history: &[Step], task: u32, seed: u64) -> Result<Vec<f32>, RunnerError> {
        let obs = self.batch(history, task)?;
        let c = self.config();
        let (t, n) = (c.trunk.n_obs_steps, c.vision.image_size);
        let img = self
            .policy
            .frame_tokens(&obs.images.reshape((t, 3, n, n))?)?
            .unsqueeze(0)?; // (1, T, image_tokens, width)
        let cond = self.policy.encode_tokens(&img, &obs)?;
        let noise = seeded_randn(seed, &[1, c.head.horizon, c.head.action_dim], &Device::Cpu)?;
        let x = self
            .policy
            .sample_from(&cond, &noise)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(self.meta.norm.denormalize_action(&x))
    }
}

/// One chunk's inputs besides the vision tokens ([`Runner::request`]).
#[derive(Clone, Debug)]
pub struct Request {
    pub state: Vec<f32>,
    pub surface: Vec<f32>,
    pub task: u32,
    pub noise: Vec<f32>,
}

impl Request {
    /// The engine's view of this request with the window's vision tokens.
    pub fn input<'a>(&'a self, tokens: &'a [&'a [f32]]) -> ChunkInput<'a> {
        ChunkInput {
            tokens,
            state: &self.state,
            surface: &self.surface,
            task: self.task,
            noise: &self.noise,
        }
    }
}

impl Runner {
    /// The base weights with the adapter folded in (`W + (α/r)·B·A` for every adapted linear):
    /// one plain model for export. Without an adapter, a copy of the base.
    pub fn merged_base(&self) -> Result<VarMap, RunnerError> {
        merge(&self.base, self.adapter.as_ref(), self.config().lora.scale())
    }
}
