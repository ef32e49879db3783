//! The policy network, in candle-transformers' habit (config, `new(cfg, vb)`, `forward`):
//! a small ViT over each camera frame with a projector to the trunk width, a sensor projector
//! (state → one token), a surface projector (grid patches → tokens), a task embedding; a
//! transformer trunk over those tokens for `n_obs_steps` of history; and a diffusion head that
//! predicts the noise in an action chunk, FiLM-conditioned on the trunk and the timestep.
//! The encoder runs once per chunk; only the head runs at each denoising step.
//!
//! LoRA adapters (from a second `VarBuilder`) wrap the trunk's and the head's linear layers,
//! as `cfg.lora.targets` says; the vision tower and the embeddings stay base-only.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{layer_norm, LayerNorm, LayerNormConfig, VarBuilder, VarMap};

use crate::config::PolicyConfig;
use crate::fused::silu;
use crate::lora::LoraLinear;
use crate::schedule::{DdimSampler, DdpmSchedule};

/// Observations for a batch: `images` (B, T, 3, H, W) in [0, 1], `state` (B, T, state_dim)
/// and `surface` (B, T, rows, cols) normalized, `task` (B) u32.
#[derive(Clone, Debug)]
pub struct ObsBatch {
    pub images: Tensor,
    pub state: Tensor,
    pub surface: Tensor,
    pub task: Tensor,
}

/// The adapter of the sub-module `name` of an adapted module (its builder, rank and alpha).
fn sub<'a>(adapter: Option<&(VarBuilder<'a>, usize, f64)>, name: &str) -> Option<(VarBuilder<'a>, usize, f64)> {
    adapter.map(|(vb, r, al)| (vb.pp(name), *r, *al))
}

fn linear(
    i: usize,
    o: usize,
    base: &VarBuilder,
    adapter: Option<&(VarBuilder, usize, f64)>,
    name: &str,
) -> Result<LoraLinear> {
    LoraLinear::new(i, o, base.pp(name), adapter.map(|(vb, r, a)| (vb.pp(name), *r, *a)))
}

/// Whether the policy is building a graph to train. candle's fast layer-norm kernel has no
/// backward pass (`apply_op3_no_bwd`): a graph through it gives no gradient to anything before
/// the norm — with it, training reached only the diffusion head, and the whole encoder (ViT,
/// sensor, surface and task projectors, trunk) kept its random initial weights. While the switch
/// is on, norms that a gradient must pass take `fused::layer_norm` (one kernel each way);
/// inference keeps candle's kernel.
#[derive(Clone, Debug, Default)]
struct TrainSwitch(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl TrainSwitch {
    /// Some training graph is being built (a count: shards of one batch train at once).
    fn on(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed) > 0
    }
}

/// Sets a policy's train switch for as long as it lives.
struct Training<'a>(&'a TrainSwitch);

impl<'a> Training<'a> {
    fn start(s: &'a TrainSwitch) -> Training<'a> {
        s.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Training(s)
    }
}

impl Drop for Training<'_> {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A layer norm: candle's kernel for inference, the fused differentiable one while training.
#[derive(Clone, Debug)]
struct Norm {
    fast: LayerNorm,
    weight: Tensor,
    bias: Tensor,
    eps: f32,
    train: TrainSwitch,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Only where a gradient must flow: through trained weights, or into a tracked input (a
        // frozen tower under LoRA takes the fast kernel even while the rest trains).
        if self.train.on() && (x.track_op() || self.weight.track_op() || self.bias.track_op()) {
            crate::fused::layer_norm(x, &self.weight, &self.bias, self.eps)
        } else {
            self.fast.forward(x)
        }
    }
}

fn ln(dim: usize, vb: VarBuilder, train: &TrainSwitch) -> Result<Norm> {
    let cfg = LayerNormConfig::default();
    let fast = layer_norm(dim, cfg, vb)?;
    let bias = fast
        .bias()
        .cloned()
        .ok_or_else(|| candle_core::Error::Msg("layer norm without a bias".into()))?;
    Ok(Norm {
        weight: fast.weight().clone(),
        bias,
        eps: cfg.eps as f32,
        fast,
        train: train.clone(),
    })
}

/// A pre-norm transformer block (SiLU MLP: cheaper than GELU on CPU at these sizes).
#[derive(Clone, Debug)]
struct Block {
    ln1: Norm,
    qkv: LoraLinear,
    proj: LoraLinear,
    ln2: Norm,
    fc1: LoraLinear,
    fc2: LoraLinear,
    heads: usize,
}

impl Block {
    fn new(
        dim: usize,
        heads: usize,
        vb: VarBuilder,
        adapter: Option<&(VarBuilder, usize, f64)>,
        train: &TrainSwitch,
    ) -> Result<Self> {
        Ok(Block {
            ln1: ln(dim, vb.pp("ln1"), train)?,
            qkv: linear(dim, 3 * dim, &vb, adapter, "qkv")?,
            proj: linear(dim, dim, &vb, adapter, "proj")?,
            ln2: ln(dim, vb.pp("ln2"), train)?,
            fc1: linear(dim, 4 * dim, &vb, adapter, "fc1")?,
            fc2: linear(4 * dim, dim, &vb, adapter, "fc2")?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let dh = d / self.heads;
        let h = self.ln1.forward(x)?;
        let qkv = self
            .qkv
            .forward(&h)?
            .reshape((b, n, 3, self.heads, dh))?
            .permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (
            qkv.get(0)?.contiguous()?,
            qkv.get(1)?.contiguous()?,
            qkv.get(2)?.contiguous()?,
        );
        let att = (q.matmul(&k.t()?)? / (dh as f64).sqrt())?;
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let o = att.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        let x = (x + self.proj.forward(&o)?)?;
        let h = silu(&self.fc1.forward(&self.ln2.forward(&x)?)?)?;
        x + self.fc2.forward(&h)?
    }
}

/// The ViT over one camera frame, projected to the trunk width.
#[derive(Clone, Debug)]
struct Vision {
    patch_embed: LoraLinear,
    pos: Tensor,
    blocks: Vec<Block>,
    ln: Norm,
    projector: LoraLinear,
    patch: usize,
    keypoints: Option<Keypoints>,
}

impl Vision {
    fn new(
        cfg: &PolicyConfig,
        vb: VarBuilder,
        adapter: Option<&(VarBuilder, usize, f64)>,
        train: &TrainSwitch,
    ) -> Result<Self> {
        let v = &cfg.vision;
        let n = cfg.image_tokens();
        Ok(Vision {
            patch_embed: linear(3 * v.patch * v.patch, v.dim, &vb, None, "patch_embed")?,
            pos: vb.get_with_hints((n, v.dim), "pos", candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 })?,
            blocks: (0..v.depth)
                .map(|i| {
                    let a = sub(adapter, &format!("block{i}"));
                    Block::new(v.dim, v.heads, vb.pp(format!("block{i}")), a.as_ref(), train)
                })
                .collect::<Result<_>>()?,
            ln: ln(v.dim, vb.pp("ln"), train)?,
            projector: linear(v.dim, cfg.trunk.width, &vb, adapter, "projector")?,
            patch: v.patch,
            keypoints: (v.keypoints > 0)
                .then(|| Keypoints::new(cfg, &vb, adapter))
                .transpose()?,
        })
    }

    /// (N, 3, H, W) → (N, frame_rows, width): the patch tokens, then the keypoints' row.
    fn forward(&self, img: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = img.dims4()?;
        let p = self.patch;
        let x = img
            .reshape((n, c, h / p, p, w / p, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((n, (h / p) * (w / p), c * p * p))?;
        let mut x = self.patch_embed.forward(&x)?.broadcast_add(&self.pos)?;
        for b in &self.blocks {
            x = b.forward(&x)?;
        }
        let tokens = self.projector.forward(&self.ln.forward(&x)?)?;
        match &self.keypoints {
            Some(k) => {
                let points = k.forward(img)?; // (N, 2K)
                let width = tokens.dim(2)?;
                let row = points.pad_with_zeros(1, 0, width - points.dim(1)?)?.unsqueeze(1)?;
                Tensor::cat(&[tokens, row], 1)
            }
            None => Ok(tokens),
        }
    }
}

/// Spatial-softmax keypoints: each of K keypoints scores every pixel by its colour (a linear
/// map of RGB), a softmax over the frame's pixels turns the scores into weights, and the
/// weighted mean of the pixel centres is the keypoint's (x, y) in `[-1, 1]²`.
#[derive(Clone, Debug)]
struct Keypoints {
    score: LoraLinear,
    /// The log of each keypoint's softmax gain (its inverse temperature), learned.
    log_gain: Tensor,
    /// (H·W, 2): every pixel's centre.
    coords: Tensor,
}

impl Keypoints {
    /// The softmax gain a keypoint starts with: over a 64×64 frame, a colour that scores 0.5
    /// above the rest takes nearly all of the weight.
    pub const INITIAL_GAIN: f32 = 20.0;

    /// The scorers' first weights (K × 3): colour-opponent detectors, as the first layer of a
    /// pretrained image network learns them (red, green, blue against the other two, each
    /// way round, then brightness each way), repeated for K over 8. A keypoint starts out
    /// following the most red, green, ... thing in view, and training refines it.
    pub fn opponent_colours(k: usize) -> Vec<f32> {
        const ROWS: [[f32; 3]; 8] = [
            [1.0, -0.5, -0.5],
            [-0.5, 1.0, -0.5],
            [-0.5, -0.5, 1.0],
            [-1.0, 0.5, 0.5],
            [0.5, -1.0, 0.5],
            [0.5, 0.5, -1.0],
            [0.5, 0.5, 0.5],
            [-0.5, -0.5, -0.5],
        ];
        (0..k).flat_map(|i| ROWS[i % ROWS.len()]).collect()
    }

    fn new(cfg: &PolicyConfig, vb: &VarBuilder, adapter: Option<&(VarBuilder, usize, f64)>) -> Result<Self> {
        let v = &cfg.vision;
        let vk = vb.pp("keypoints");
        let ak = sub(adapter, "keypoints");
        Ok(Keypoints {
            score: linear(3, v.keypoints, &vk, ak.as_ref(), "score")?,
            log_gain: vk.get_with_hints(
                v.keypoints,
                "log_gain",
                candle_nn::Init::Const(f64::from(Self::INITIAL_GAIN.ln())),
            )?,
            coords: Tensor::from_vec(
                pixel_centres(v.image_size),
                (v.image_size * v.image_size, 2),
                vb.device(),
            )?,
        })
    }

    /// (N, 3, H, W) frames → (N, 2K): each keypoint's (x, y).
    fn forward(&self, img: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = img.dims4()?;
        let px = img.reshape((n, c, h * w))?.transpose(1, 2)?.contiguous()?; // (N, HW, 3)
        let scores = self.score.forward(&px)?.broadcast_mul(&self.log_gain.exp()?)?; // (N, HW, K)
        let attn = candle_nn::ops::softmax_last_dim(&scores.transpose(1, 2)?.contiguous()?)?; // (N, K, HW)
        let k = attn.dim(1)?;
        attn.broadcast_matmul(&self.coords)?.reshape((n, 2 * k)) // (N, K, 2) → (N, 2K)
    }
}

/// The centre of every pixel of a `size × size` frame, row-major, as (x, y) in `[-1, 1]²`
/// (the left or top edge is −1).
pub fn pixel_centres(size: usize) -> Vec<f32> {
    let at = |k: usize| 2.0 * (k as f32 + 0.5) / size as f32 - 1.0;
    (0..size * size).flat_map(|i| [at(i % size), at(i / size)]).collect()
}

/// Sinusoidal embedding of diffusion timesteps (B) → (B, dim).
fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f32.ln()) * i as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::new(freqs.as_slice(), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs.unsqueeze(0)?)?;
    Tensor::cat(&[args.sin()?, args.cos()?], 1)
}

/// The denoiser: a residual MLP over the flattened action chunk, FiLM-conditioned.
#[derive(Clone, Debug)]
struct Head {
    time_mlp1: LoraLinear,
    time_mlp2: LoraLinear,
    cond_proj: LoraLinear,
    input: LoraLinear,
    blocks: Vec<(Norm, LoraLinear, LoraLinear, LoraLinear)>,
    output: LoraLinear,
    hidden: usize,
}

impl Head {
    fn new(
        cfg: &PolicyConfig,
        vb: VarBuilder,
        adapter: Option<&(VarBuilder, usize, f64)>,
        train: &TrainSwitch,
    ) -> Result<Self> {
        let h = cfg.head.hidden;
        let chunk = cfg.head.horizon * cfg.head.action_dim;
        let blocks = (0..cfg.head.depth)
            .map(|i| {
                let vbi = vb.pp(format!("block{i}"));
                let ad = sub(adapter, &format!("block{i}"));
                Ok((
                    ln(h, vbi.pp("ln"), train)?,
                    linear(h, 2 * h, &vbi, ad.as_ref(), "film")?,
                    linear(h, 2 * h, &vbi, ad.as_ref(), "fc1")?,
                    linear(2 * h, h, &vbi, ad.as_ref(), "fc2")?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Head {
            time_mlp1: linear(h, h, &vb, adapter, "time_mlp1")?,
            time_mlp2: linear(h, h, &vb, adapter, "time_mlp2")?,
            cond_proj: linear(cfg.trunk.width, h, &vb, adapter, "cond_proj")?,
            input: linear(chunk, h, &vb, adapter, "input")?,
            blocks,
            output: linear(h, chunk, &vb, adapter, "output")?,
            hidden: h,
        })
    }

    /// The conditioning vector of one denoising step: trunk summary + timestep.
    fn condition(&self, cond: &Tensor, t: &Tensor) -> Result<Tensor> {
        let te = self
            .time_mlp2
            .forward(&silu(&self.time_mlp1.forward(&timestep_embedding(t, self.hidden)?)?)?)?;
        silu(&(self.cond_proj.forward(cond)? + te)?)
    }

    /// FiLM scale-and-shift of every block for conditioning vectors `c` (B, hidden).
    fn films(&self, c: &Tensor) -> Result<Vec<Tensor>> {
        self.blocks.iter().map(|(_, film, _, _)| film.forward(c)).collect()
    }

    /// Predicted noise (B, chunk) for noisy actions (B, chunk).
    fn forward(&self, noisy: &Tensor, c: &Tensor) -> Result<Tensor> {
        self.forward_films(noisy, &self.films(c)?)
    }

    /// Each block's FiLM output (B, 2·hidden) as `(1 + scale, shift)`, both contiguous.
    fn film_terms(&self, films: &[Tensor]) -> Result<Vec<(Tensor, Tensor)>> {
        films
            .iter()
            .map(|ss| {
                Ok((
                    (ss.narrow(1, 0, self.hidden)? + 1.0)?,
                    ss.narrow(1, self.hidden, self.hidden)?.contiguous()?,
                ))
            })
            .collect()
    }

    /// The same, with each block's FiLM terms given: sampling computes them for every step of
    /// a chunk at once.
    fn forward_films(&self, noisy: &Tensor, films: &[Tensor]) -> Result<Tensor> {
        self.forward_terms(noisy, &self.film_terms(films)?)
    }

    fn forward_terms(&self, noisy: &Tensor, terms: &[(Tensor, Tensor)]) -> Result<Tensor> {
        let mut h = self.input.forward(noisy)?;
        for ((norm, _, fc1, fc2), (scale1, shift)) in self.blocks.iter().zip(terms) {
            let x = norm.forward(&h)?.broadcast_mul(scale1)?.broadcast_add(shift)?;
            h = (h + fc2.forward(&silu(&fc1.forward(&x)?)?)?)?;
        }
        self.output.forward(&h)
    }
}

/// The whole policy.
#[derive(Clone, Debug)]
pub struct Policy {
    pub cfg: PolicyConfig,
    vision: Vision,
    sensor1: LoraLinear,
    sensor2: LoraLinear,
    surface: LoraLinear,
    task: candle_nn::Embedding,
    token_pos: Tensor,
    step_pos: Tensor,
    trunk: Vec<Block>,
    trunk_ln: Norm,
    head: Head,
    train: TrainSwitch,
    pub schedule: DdpmSchedule,
    pub sampler: DdimSampler,
    device: Device,
}

impl Policy {
    /// The base weights come from `base`; `adapter`, when given, supplies LoRA adapters for
    /// the parts `cfg.lora.targets` names.
    pub fn new(cfg: &PolicyConfig, base: VarBuilder, adapter: Option<VarBuilder>) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let w = cfg.trunk.width;
        let ad = |part: &str| {
            adapter
                .as_ref()
                .filter(|_| cfg.lora.targets(part))
                .map(|vb| (vb.pp(part), cfg.lora.rank, cfg.lora.alpha))
        };
        let (vision_ad, trunk_ad, head_ad) = (ad("vision"), ad("trunk"), ad("head"));
        // The sensor MLP's layers sit at the base's top level (`sensor1`, `sensor2`), and so do
        // their adapters, so that an adapter's names are its base layer's names.
        let sensor_ad = adapter
            .as_ref()
            .filter(|_| cfg.lora.targets("sensor"))
            .map(|vb| (vb.clone(), cfg.lora.rank, cfg.lora.alpha));
        let i = &cfg.inputs;
        let sp = i.surface_patch;
        let schedule = DdpmSchedule::squared_cosine(cfg.head.train_steps).map_err(candle_core::Error::msg)?;
        let sampler =
            DdimSampler::new(schedule.clone(), cfg.head.ddim_steps, Some(1.0)).map_err(candle_core::Error::msg)?;
        let tv = base.pp("trunk");
        let train = TrainSwitch::default();
        Ok(Policy {
            vision: Vision::new(cfg, base.pp("vision"), vision_ad.as_ref(), &train)?,
            sensor1: linear(cfg.sensor_inputs(), w, &base, sensor_ad.as_ref(), "sensor1")?,
            sensor2: linear(w, w, &base, sensor_ad.as_ref(), "sensor2")?,
            surface: linear(sp * sp, w, &base, None, "surface")?,
            task: candle_nn::embedding(i.n_tasks, w, base.pp("task"))?,
            token_pos: base.get_with_hints(
                (cfg.tokens_per_step(), w),
                "token_pos",
                candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 },
            )?,
            step_pos: base.get_with_hints(
                (cfg.trunk.n_obs_steps, w),
                "step_pos",
                candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 },
            )?,
            trunk: (0..cfg.trunk.depth)
                .map(|k| {
                    let a = sub(trunk_ad.as_ref(), &format!("block{k}"));
                    Block::new(w, cfg.trunk.heads, tv.pp(format!("block{k}")), a.as_ref(), &train)
                })
                .collect::<Result<_>>()?,
            trunk_ln: ln(w, tv.pp("ln"), &train)?,
            head: Head::new(cfg, base.pp("head"), head_ad.as_ref(), &train)?,
            train,
            schedule,
            sampler,
            device: base.device().clone(),
            cfg: cfg.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The trunk's summary of the observations: (B, width). Run once per chunk.
    pub fn encode(&self, obs: &ObsBatch) -> Result<Tensor> {
        let (b, t, c, h, w) = obs.images.dims5()?;
        let img = self.frame_tokens(&obs.images.reshape((b * t, c, h, w))?)?; // (B·T, n_img, W)
        let img = img.reshape((b, t, self.cfg.frame_rows(), self.cfg.trunk.width))?;
        self.encode_tokens(&img, obs)
    }

    /// The vision tower's tokens of frames (N, 3, H, W): (N, image_tokens, width). They depend
    /// on the frame alone, so a caller streaming frames keeps them for the next chunk, where
    /// this frame is history.
    pub fn frame_tokens(&self, frames: &Tensor) -> Result<Tensor> {
        self.vision.forward(frames)
    }

    /// [`encode`](Self::encode) with the frames' rows (B, T, frame_rows, width) given;
    /// `obs.images` is not read.
    pub fn encode_tokens(&self, rows: &Tensor, obs: &ObsBatch) -> Result<Tensor> {
        let (b, t, _, width) = rows.dims4()?;
        let n_img = self.cfg.image_tokens();
        let img = rows.narrow(2, 0, n_img)?;
        let sensed = match self.cfg.vision.keypoints {
            0 => obs.state.clone(),
            k => {
                let points = rows.narrow(2, n_img, 1)?.squeeze(2)?.narrow(2, 0, 2 * k)?;
                Tensor::cat(&[&obs.state, &points], 2)?
            }
        };
        let sensor = self
            .sensor2
            .forward(&silu(&self.sensor1.forward(&sensed)?)?)?
            .unsqueeze(2)?; // (B, T, 1, W)
        let (rows, cols) = (self.cfg.inputs.surface_rows, self.cfg.inputs.surface_cols);
        let sp = self.cfg.inputs.surface_patch;
        let surf = obs
            .surface
            .reshape((b, t, rows / sp, sp, cols / sp, sp))?
            .permute((0, 1, 2, 4, 3, 5))?
            .reshape((b, t, self.cfg.surface_tokens(), sp * sp))?;
        let surf = self.surface.forward(&surf)?;
        let task = self
            .task
            .forward(&obs.task)?
            .unsqueeze(1)?
            .unsqueeze(1)?
            .repeat((1, t, 1, 1))?; // (B, T, 1, W)
        let tokens = Tensor::cat(&[img, sensor, surf, task], 2)?; // (B, T, per_step, W)
        let tokens = tokens
            .broadcast_add(&self.token_pos)?
            .broadcast_add(&self.step_pos.narrow(0, 0, t)?.unsqueeze(1)?)?;
        let mut x = tokens.reshape((b, t * self.cfg.tokens_per_step(), width))?;
        for blk in &self.trunk {
            x = blk.forward(&x)?;
        }
        self.trunk_ln.forward(&x)?.mean(1)
    }

    /// Predicted noise for noisy action chunks (B, horizon, action_dim) at timesteps `t` (B).
    pub fn denoise(&self, noisy: &Tensor, t: &Tensor, cond: &Tensor) -> Result<Tensor> {
        let (b, hz, ad) = noisy.dims3()?;
        let c = self.head.condition(cond, t)?;
        self.head
            .forward(&noisy.reshape((b, hz * ad))?, &c)?
            .reshape((b, hz, ad))
    }

    /// The denoiser's noise prediction for `actions` noised with `eps` at timesteps `t`, built
    /// as a training graph (every weight reachable).
    fn predict_noise(&self, obs: &ObsBatch, actions: &Tensor, eps: &Tensor, t: &[u32]) -> Result<Tensor> {
        let _training = Training::start(&self.train);
        let b = actions.dim(0)?;
        let (mut wa, mut wb) = (Vec::with_capacity(b), Vec::with_capacity(b));
        for &ti in t {
            let (a, s) = self
                .schedule
                .noise_weights(ti as usize)
                .map_err(candle_core::Error::msg)?;
            wa.push(a as f32);
            wb.push(s as f32);
        }
        let wa = Tensor::from_vec(wa, (b, 1, 1), &self.device)?;
        let wb = Tensor::from_vec(wb, (b, 1, 1), &self.device)?;
        let noisy = (actions.broadcast_mul(&wa)? + eps.broadcast_mul(&wb)?)?;
        let tt = Tensor::from_vec(t.iter().map(|&x| x as f32).collect::<Vec<_>>(), b, &self.device)?;
        self.denoise(&noisy, &tt, &self.encode(obs)?)
    }

    /// The DDPM training loss: MSE between the true noise and its prediction, for normalized
    /// action chunks `actions` (B, horizon, action_dim), noise `eps` of the same shape and
    /// training timesteps `t` (B, u32).
    pub fn loss(&self, obs: &ObsBatch, actions: &Tensor, eps: &Tensor, t: &[u32]) -> Result<Tensor> {
        (self.predict_noise(obs, actions, eps, t)? - eps)?.sqr()?.mean_all()
    }

    /// The DDPM loss with a weight per sample (B) and a mask of the actions that are real
    /// (B, horizon; 0 where a window ran past its episode and the action is padding, as
    /// LeRobot's `action_is_pad`): Σ_b w_b · mean over real actions of the squared error, over
    /// Σ_b w_b. Samples whose weight is 0 do not train.
    pub fn loss_weighted(
        &self,
        obs: &ObsBatch,
        actions: &Tensor,
        eps: &Tensor,
        t: &[u32],
        weights: &Tensor,
        action_mask: &Tensor,
    ) -> Result<Tensor> {
        let total = weights.sum_all()?.to_scalar::<f32>()? as f64;
        self.loss_weighted_over(obs, actions, eps, t, weights, action_mask, total)
    }

    /// [`loss_weighted`](Self::loss_weighted) of part of a batch whose weights sum to `total`:
    /// the parts' losses (and gradients) add up to the whole batch's.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_weighted_over(
        &self,
        obs: &ObsBatch,
        actions: &Tensor,
        eps: &Tensor,
        t: &[u32],
        weights: &Tensor,
        action_mask: &Tensor,
        total: f64,
    ) -> Result<Tensor> {
        let (b, hz, ad) = actions.dims3()?;
        let pred = self.predict_noise(obs, actions, eps, t)?;
        let mask = action_mask.reshape((b, hz, 1))?;
        let err = (pred - eps)?.sqr()?.broadcast_mul(&mask)?.sum((1, 2))?; // (B)
        let real = (mask.sum((1, 2))? * ad as f64)?.clamp(1.0, f64::MAX)?; // (B)
        let per_sample = (err / real)?;
        (per_sample * weights)?.sum_all()? / total.max(1e-12)
    }

    /// Sample normalized action chunks (B, horizon, action_dim) with DDIM from `noise`.
    pub fn sample(&self, obs: &ObsBatch, noise: &Tensor) -> Result<Tensor> {
        let cond = self.encode(obs)?;
        self.sample_from(&cond, noise)
    }

    /// DDIM from an already encoded observation (the encoder's output is reused by every step).
    /// What does not change between steps is computed once: the conditioning and the FiLM
    /// parameters of every step go through the head's MLPs as one batch, and the DDIM update
    /// itself is a few dozen floats done in plain arithmetic.
    pub fn sample_from(&self, cond: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let (b, hz, ad) = noise.dims3()?;
        let steps = &self.sampler.timesteps;
        let n = steps.len();
        let tt: Vec<f32> = steps.iter().flat_map(|&t| std::iter::repeat_n(t as f32, b)).collect();
        let tt = Tensor::from_vec(tt, n * b, &self.device)?;
        let c_all = self.head.condition(&cond.repeat((n, 1))?, &tt)?; // (n·B, hidden), step-major
        let terms_all = self.head.film_terms(&self.head.films(&c_all)?)?;
        let per_step = (0..n)
            .map(|k| {
                terms_all
                    .iter()
                    .map(|(s, h)| Ok((s.narrow(0, k * b, b)?, h.narrow(0, k * b, b)?)))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let mut x = noise.flatten_all()?.to_vec1::<f32>()?;
        for (k, &t) in steps.iter().enumerate() {
            let xt = Tensor::from_vec(x.clone(), (b, hz * ad), &self.device)?;
            let eps = self
                .head
                .forward_terms(&xt, &per_step[k])?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let a_t = self.schedule.alphas_cumprod[t];
            let a_prev = steps
                .get(k + 1)
                .map(|&p| self.schedule.alphas_cumprod[p])
                .unwrap_or(1.0);
            let (sa, sb) = (a_t.sqrt() as f32, (1.0 - a_t).sqrt() as f32);
            let (pa, pb) = (a_prev.sqrt() as f32, (1.0 - a_prev).sqrt() as f32);
            for (xi, ei) in x.iter_mut().zip(&eps) {
                let x0 = ((*xi - ei * sb) / sa).clamp(-1.0, 1.0);
                *xi = x0 * pa + ei * pb;
            }
        }
        Tensor::from_vec(x, (b, hz, ad), &self.device)
    }
}

/// Give every variable a deterministic value from `seed`: weights ~ N(0, 1/fan_in),
/// embeddings ~ N(0, 0.02²), biases, LayerNorm shifts and LoRA `B` zero, LayerNorm scales one.
pub fn seeded_init(vars: &VarMap, seed: u64) -> Result<()> {
    let data = vars.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = crate::rng::Normal::new(seed);
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let is_ln = name.contains("ln") && dims.len() == 1;
        let values: Vec<f32> = if name.ends_with("keypoints.score.weight") {
            Keypoints::opponent_colours(dims[0])
        } else if name.ends_with("keypoints.log_gain") {
            vec![Keypoints::INITIAL_GAIN.ln(); n]
        } else if name.ends_with("lora_b") || name.ends_with("bias") {
            vec![0.0; n]
        } else if is_ln && name.ends_with("weight") {
            vec![1.0; n]
        } else if name.ends_with("pos") || name.contains("task") {
            (0..n).map(|_| rng.next() * 0.02).collect()
        } else {
            let fan_in = *dims.last().unwrap_or(&1) as f32;
            let std = 1.0 / fan_in.sqrt();
            (0..n).map(|_| rng.next() * std).collect()
        };
        var.set(&Tensor::from_vec(values, dims, var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// Standard normal values from `seed`, as a tensor of `shape`.
pub fn seeded_randn(seed: u64, shape: &[usize], device: &Device) -> Result<Tensor> {
    let mut rng = crate::rng::Normal::new(seed);
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| rng.next()).collect::<Vec<f32>>(), shape, device)
}
