//! The inference engine: the policy's forward pass for acting, on plain `f32` slices.
//!
//! At this model's sizes an action chunk is about 35 M multiply-adds but, through candle, about
//! 25 tensor ops per DDIM step and a few hundred per chunk, each allocating and walking a
//! tensor: the chunk was overhead-bound. Here the weights are read once out of the variables
//! (LoRA adapters folded in, `W + (α/r)·B·A`), every product is one GEMM call on preallocated
//! buffers ([`Scratch`], reused from chunk to chunk), the norms, softmax and SiLU are single
//! passes, and the DDIM loop allocates nothing. It computes what [`crate::Policy`] computes
//! (the engine's tests hold them within 1e-4 of each other) and it is batched: the chunks of
//! many robots, each with its own history, go through every layer together, so a node serving a
//! fleet pays the weights' memory traffic once per batch instead of once per robot.
//!
//! Training stays on candle (it needs the graph); only acting comes here.

use std::collections::HashMap;

use candle_core::Var;
use candle_nn::VarMap;
use thiserror::Error;

use crate::config::PolicyConfig;
use crate::schedule::{DdimSampler, DdpmSchedule};

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("weights: no tensor {0:?}")]
    Missing(String),
    #[error("weights: tensor {name:?} has {got} values, the config makes it {want}")]
    Shape { name: String, got: usize, want: usize },
    #[error("weights: {0}")]
    Read(String),
    #[error("input: {0}")]
    Input(String),
}

/// `y = x Wᵀ + b`; `wt` is `Wᵀ` (in × out, row-major: candle keeps `W` as out × in).
#[derive(Clone, Debug)]
struct Linear {
    wt: kernels::Packed,
    b: Vec<f32>,
    inp: usize,
    out: usize,
}

#[derive(Clone, Debug)]
struct Norm {
    g: Vec<f32>,
    b: Vec<f32>,
}

#[derive(Clone, Debug)]
struct Block {
    ln1: Norm,
    qkv: Linear,
    proj: Linear,
    ln2: Norm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

#[derive(Clone, Debug)]
struct HeadBlock {
    ln: Norm,
    film: Linear,
    fc1: Linear,
    fc2: Linear,
}

/// The spatial-softmax keypoints' weights ([`crate::model`]'s `Keypoints`).
#[derive(Clone, Debug)]
struct Keypoints {
    score: Linear,
    gain: Vec<f32>,
    coords: Vec<f32>,
}

impl Keypoints {
    /// One frame's keypoints' (x, y) (`2K` floats) into `out`.
    fn forward(&self, chw: &[f32], pixels: usize, s: &mut Scratch, out: &mut [f32]) {
        let k = self.gain.len();
        let px = grow(&mut s.wide, pixels * 3);
        for (p, row) in px.chunks_exact_mut(3).enumerate() {
            for c in 0..3 {
                row[c] = chw[c * pixels + p];
            }
        }
        let scores = grow(&mut s.att, pixels * k);
        self.score.forward(&s.wide[..pixels * 3], pixels, scores);
        let points = out;
        for (j, g) in self.gain.iter().enumerate() {
            let max = (0..pixels)
                .map(|p| scores[p * k + j] * g)
                .fold(f32::NEG_INFINITY, f32::max);
            let (mut sum, mut x, mut y) = (0.0f32, 0.0f32, 0.0f32);
            for p in 0..pixels {
                let e = (scores[p * k + j] * g - max).exp();
                sum += e;
                x += e * self.coords[2 * p];
                y += e * self.coords[2 * p + 1];
            }
            points[2 * j] = x / sum;
            points[2 * j + 1] = y / sum;
        }
    }
}

/// One DDIM step's constants: the timestep and `√ᾱ_t, √(1−ᾱ_t), √ᾱ_prev, √(1−ᾱ_prev)`.
#[derive(Clone, Copy, Debug)]
struct DdimStep {
    t: f32,
    sa: f32,
    sb: f32,
    pa: f32,
    pb: f32,
}

/// The policy's weights laid out for acting. Immutable and shared; the buffers a call needs are
/// the caller's [`Scratch`].
#[derive(Clone, Debug)]
pub struct Engine {
    cfg: PolicyConfig,
    patch_embed: Linear,
    vision_pos: Vec<f32>,
    vision_blocks: Vec<Block>,
    vision_ln: Norm,
    projector: Linear,
    keypoints: Option<Keypoints>,
    sensor1: Linear,
    sensor2: Linear,
    surface: Linear,
    task: Vec<f32>,
    token_pos: Vec<f32>,
    step_pos: Vec<f32>,
    trunk: Vec<Block>,
    trunk_ln: Norm,
    time_mlp1: Linear,
    time_mlp2: Linear,
    cond_proj: Linear,
    input: Linear,
    head_blocks: Vec<HeadBlock>,
    output: Linear,
    steps: Vec<DdimStep>,
}

/// One robot's chunk request: its history's vision tokens and sensors, its task and the DDIM
/// start noise.
#[derive(Clone, Copy, Debug)]
pub struct ChunkInput<'a> {
    /// The vision tokens of each of the last `n_obs_steps` frames, oldest first, each
    /// `image_tokens × width` ([`Engine::frame_tokens`]).
    pub tokens: &'a [&'a [f32]],
    /// `n_obs_steps × state_dim`, normalized.
    pub state: &'a [f32],
    /// `n_obs_steps × rows × cols`.
    pub surface: &'a [f32],
    pub task: u32,
    /// `horizon × action_dim` standard normal values.
    pub noise: &'a [f32],
}

/// The buffers of a forward pass, kept between calls so that acting allocates nothing once
/// they have grown to the largest batch seen.
#[derive(Default, Debug)]
pub struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    wide: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    small: Vec<f32>,
    cond: Vec<f32>,
    te: Vec<f32>,
    films: Vec<Vec<f32>>,
    act: Vec<f32>,
}

fn grow(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

type Tensors = HashMap<String, Var>;

fn get(t: &Tensors, name: &str, want: usize) -> Result<Vec<f32>, EngineError> {
    let v = t.get(name).ok_or_else(|| EngineError::Missing(name.to_string()))?;
    let got = v.elem_count();
    if got != want {
        return Err(EngineError::Shape {
            name: name.to_string(),
            got,
            want,
        });
    }
    v.as_tensor()
        .flatten_all()
        .and_then(|x| x.to_dtype(candle_core::DType::F32))
        .and_then(|x| x.to_vec1::<f32>())
        .map_err(|e| EngineError::Read(format!("{name}: {e}")))
}

fn linear(t: &Tensors, name: &str, inp: usize, out: usize) -> Result<Linear, EngineError> {
    let w = get(t, &format!("{name}.weight"), inp * out)?;
    let mut wt = vec![0.0; inp * out];
    for (o, row) in w.chunks_exact(inp).enumerate() {
        for (i, v) in row.iter().enumerate() {
            wt[i * out + o] = *v;
        }
    }
    Ok(Linear {
        wt: kernels::Packed::new(&wt, inp, out),
        b: get(t, &format!("{name}.bias"), out)?,
        inp,
        out,
    })
}

fn norm(t: &Tensors, name: &str, dim: usize) -> Result<Norm, EngineError> {
    Ok(Norm {
        g: get(t, &format!("{name}.weight"), dim)?,
        b: get(t, &format!("{name}.bias"), dim)?,
    })
}

fn block(t: &Tensors, name: &str, dim: usize, heads: usize) -> Result<Block, EngineError> {
    Ok(Block {
        ln1: norm(t, &format!("{name}.ln1"), dim)?,
        qkv: linear(t, &format!("{name}.qkv"), dim, 3 * dim)?,
        proj: linear(t, &format!("{name}.proj"), dim, dim)?,
        ln2: norm(t, &format!("{name}.ln2"), dim)?,
        fc1: linear(t, &format!("{name}.fc1"), dim, 4 * dim)?,
        fc2: linear(t, &format!("{name}.fc2"), 4 * dim, dim)?,
        heads,
    })
}

impl Engine {
    /// The engine for `cfg` with the weights in `vars` (a base with any adapter already folded
    /// in: [`crate::runner::Runner::merged_base`]). A missing tensor or one of the wrong size is
    /// an error naming it.
    pub fn new(cfg: &PolicyConfig, vars: &VarMap) -> Result<Engine, EngineError> {
        let t = vars.data().lock().unwrap_or_else(|e| e.into_inner()).clone();
        let (v, w, i, hd) = (&cfg.vision, cfg.trunk.width, &cfg.inputs, &cfg.head);
        let h = hd.hidden;
        let chunk = hd.horizon * hd.action_dim;
        let schedule = DdpmSchedule::squared_cosine(hd.train_steps).map_err(|e| EngineError::Read(e.to_string()))?;
        let sampler = DdimSampler::new(schedule.clone(), hd.ddim_steps, Some(1.0))
            .map_err(|e| EngineError::Read(e.to_string()))?;
        let ts = &sampler.timesteps;
        let steps = ts
            .iter()
            .enumerate()
            .map(|(k, &t)| {
                let a_t = schedule.alphas_cumprod[t];
                let a_prev = ts.get(k + 1).map(|&p| schedule.alphas_cumprod[p]).unwrap_or(1.0);
                DdimStep {
                    t: t as f32,
                    sa: a_t.sqrt() as f32,
                    sb: (1.0 - a_t).sqrt() as f32,
                    pa: a_prev.sqrt() as f32,
                    pb: (1.0 - a_prev).sqrt() as f32,
                }
            })
            .collect();
        Ok(Engine {
            patch_embed: linear(&t, "vision.patch_embed", 3 * v.patch * v.patch, v.dim)?,
            vision_pos: get(&t, "vision.pos", cfg.image_tokens() * v.dim)?,
            vision_blocks: (0..v.depth)
                .map(|k| block(&t, &format!("vision.block{k}"), v.dim, v.heads))
                .collect::<Result<_, _>>()?,
            vision_ln: norm(&t, "vision.ln", v.dim)?,
            projector: linear(&t, "vision.projector", v.dim, w)?,
            keypoints: if v.keypoints > 0 {
                let k = v.keypoints;
                Some(Keypoints {
                    score: linear(&t, "vision.keypoints.score", 3, k)?,
                    gain: get(&t, "vision.keypoints.log_gain", k)?
                        .into_iter()
                        .map(f32::exp)
                        .collect(),
                    coords: crate::model::pixel_centres(v.image_size),
                })
            } else {
                None
            },
            sensor1: linear(&t, "sensor1", cfg.sensor_inputs(), w)?,
            sensor2: linear(&t, "sensor2", w, w)?,
            surface: linear(&t, "surface", i.surface_patch * i.surface_patch, w)?,
            task: get(&t, "task.weight", i.n_tasks * w)?,
            token_pos: get(&t, "token_pos", cfg.tokens_per_step() * w)?,
            step_pos: get(&t, "step_pos", cfg.trunk.n_obs_steps * w)?,
            trunk: (0..cfg.trunk.depth)
                .map(|k| block(&t, &format!("trunk.block{k}"), w, cfg.trunk.heads))
                .collect::<Result<_, _>>()?,
            trunk_ln: norm(&t, "trunk.ln", w)?,
            time_mlp1: linear(&t, "head.time_mlp1", h, h)?,
            time_mlp2: linear(&t, "head.time_mlp2", h, h)?,
            cond_proj: linear(&t, "head.cond_proj", w, h)?,
            input: linear(&t, "head.input", chunk, h)?,
            head_blocks: (0..hd.depth)
                .map(|k| {
                    let p = format!("head.block{k}");
                    Ok(HeadBlock {
                        ln: norm(&t, &format!("{p}.ln"), h)?,
                        film: linear(&t, &format!("{p}.film"), h, 2 * h)?,
                        fc1: linear(&t, &format!("{p}.fc1"), h, 2 * h)?,
                        fc2: linear(&t, &format!("{p}.fc2"), 2 * h, h)?,
                    })
                })
                .collect::<Result<_, EngineError>>()?,
            output: linear(&t, "head.output", h, chunk)?,
            steps,
            cfg: cfg.clone(),
        })
    }

    /// Floats of one frame's vision rows (`frame_rows × width`: its tokens, and its
    /// keypoints' row if it has keypoints).
    pub fn frame_token_len(&self) -> usize {
        self.cfg.frame_rows() * self.cfg.trunk.width
    }

    /// The vision tokens of `frames` camera frames, each `3 × H × W` in [0, 1] (channel-major,
    /// as [`crate::preprocess::rgb_to_chw`] writes them), one after another in `chw`; the
    /// result holds `frames × image_tokens × width`.
    pub fn frame_tokens(&self, chw: &[f32], frames: usize, s: &mut Scratch) -> Result<Vec<f32>, EngineError> {
        let (n, p) = (self.cfg.vision.image_size, self.cfg.vision.patch);
        let frame = 3 * n * n;
        if chw.len() != frames * frame {
            return Err(EngineError::Input(format!(
                "{} pixel values for {frames} frames of 3×{n}×{n}",
                chw.len()
            )));
        }
        let (g, pp) = (n / p, 3 * p * p);
        let tokens = g * g;
        let rows = frames * tokens;
        let patches = grow(&mut s.wide, rows * pp);
        for f in 0..frames {
            let img = &chw[f * frame..(f + 1) * frame];
            for gy in 0..g {
                for gx in 0..g {
                    let row = &mut patches[(f * tokens + gy * g + gx) * pp..][..pp];
                    for c in 0..3 {
                        for py in 0..p {
                            let src = &img[c * n * n + (gy * p + py) * n + gx * p..][..p];
                            row[c * p * p + py * p..][..p].copy_from_slice(src);
                        }
                    }
                }
            }
        }
        let d = self.cfg.vision.dim;
        let x = grow(&mut s.x, rows * d);
        self.patch_embed.forward(patches, rows, x);
        for (r, row) in x.chunks_exact_mut(d).enumerate() {
            let pos = &self.vision_pos[(r % tokens) * d..][..d];
            row.iter_mut().zip(pos).for_each(|(a, b)| *a += b);
        }
        for b in &self.vision_blocks {
            b.forward(frames, tokens, d, s);
        }
        let (x, h) = (&s.x[..rows * d], grow(&mut s.h, rows * d));
        self.vision_ln.forward(x, d, h);
        let w = self.cfg.trunk.width;
        let mut out = vec![0.0; rows * w];
        self.projector.forward(h, rows, &mut out);
        let Some(kp) = &self.keypoints else {
            return Ok(out);
        };
        // Each frame's patch tokens, then its keypoints' row (zero-padded).
        let per = (tokens + 1) * w;
        let k2 = 2 * self.cfg.vision.keypoints;
        let mut all = vec![0.0; frames * per];
        for f in 0..frames {
            let dst = &mut all[f * per..(f + 1) * per];
            dst[..tokens * w].copy_from_slice(&out[f * tokens * w..(f + 1) * tokens * w]);
            kp.forward(&chw[f * frame..(f + 1) * frame], n * n, s, &mut dst[tokens * w..][..k2]);
        }
        Ok(all)
    }

    /// Normalized action chunks (`horizon × action_dim` each), one per input, computed as one
    /// batch.
    pub fn chunks(&self, inputs: &[ChunkInput], s: &mut Scratch) -> Result<Vec<Vec<f32>>, EngineError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        self.check(inputs)?;
        self.encode(inputs, s);
        self.sample(inputs, s);
        let chunk = self.cfg.head.horizon * self.cfg.head.action_dim;
        Ok(s.act[..inputs.len() * chunk]
            .chunks_exact(chunk)
            .map(<[f32]>::to_vec)
            .collect())
    }

    fn check(&self, inputs: &[ChunkInput]) -> Result<(), EngineError> {
        let (c, t) = (&self.cfg, self.cfg.trunk.n_obs_steps);
        let i = &c.inputs;
        for (k, r) in inputs.iter().enumerate() {
            let bad = if r.tokens.len() != t {
                Some(format!("{} frames of tokens for {t} observation steps", r.tokens.len()))
            } else if let Some(f) = r.tokens.iter().position(|f| f.len() != self.frame_token_len()) {
                Some(format!(
                    "frame {f} has {} token values, not {}",
                    r.tokens[f].len(),
                    self.frame_token_len()
                ))
            } else if r.state.len() != t * i.state_dim {
                Some(format!("{} state values, not {t}×{}", r.state.len(), i.state_dim))
            } else if r.surface.len() != t * i.surface_rows * i.surface_cols {
                Some(format!(
                    "{} surface values, not {t}×{}×{}",
                    r.surface.len(),
                    i.surface_rows,
                    i.surface_cols
                ))
            } else if r.task as usize >= i.n_tasks {
                Some(format!("task {}: the policy knows {} tasks", r.task, i.n_tasks))
            } else if r.noise.len() != c.head.horizon * c.head.action_dim {
                Some(format!(
                    "{} noise values, not {}",
                    r.noise.len(),
                    c.head.horizon * c.head.action_dim
                ))
            } else {
                None
            };
            if let Some(why) = bad {
                return Err(EngineError::Input(format!("request {k}: {why}")));
            }
        }
        Ok(())
    }

    /// The trunk's summary of each request (B × width) into `s.cond`.
    fn encode(&self, inputs: &[ChunkInput], s: &mut Scratch) {
        let c = &self.cfg;
        let (b, t, w) = (inputs.len(), c.trunk.n_obs_steps, c.trunk.width);
        let (n_img, n_surf, per) = (c.image_tokens(), c.surface_tokens(), c.tokens_per_step());
        let i = &c.inputs;
        let (sp, cols) = (i.surface_patch, i.surface_cols);
        let (state_dim, k2) = (i.state_dim, 2 * c.vision.keypoints);
        let sd = state_dim + k2;
        // Sensor tokens: sensor2(silu(sensor1(state ⊕ keypoints))) for every (request, step).
        let states = grow(&mut s.small, b * t * sd);
        for (k, r) in inputs.iter().enumerate() {
            for st in 0..t {
                let row = &mut states[(k * t + st) * sd..][..sd];
                row[..state_dim].copy_from_slice(&r.state[st * state_dim..][..state_dim]);
                if k2 > 0 {
                    row[state_dim..].copy_from_slice(&r.tokens[st][n_img * w..][..k2]);
                }
            }
        }
        let s1 = grow(&mut s.o, b * t * w);
        self.sensor1.forward(states, b * t, s1);
        silu(s1);
        let sensor = grow(&mut s.att, b * t * w);
        self.sensor2.forward(s1, b * t, sensor);
        // Surface patches: (rows/sp, sp, cols/sp, sp) → (rows/sp · cols/sp, sp·sp).
        let cells = i.surface_rows * cols;
        let patches = grow(&mut s.te, b * t * n_surf * sp * sp);
        let gc = cols / sp;
        for (k, r) in inputs.iter().enumerate() {
            for st in 0..t {
                let grid = &r.surface[st * cells..][..cells];
                for tok in 0..n_surf {
                    let (gy, gx) = (tok / gc, tok % gc);
                    let row = &mut patches[((k * t + st) * n_surf + tok) * sp * sp..][..sp * sp];
                    for py in 0..sp {
                        row[py * sp..][..sp].copy_from_slice(&grid[(gy * sp + py) * cols + gx * sp..][..sp]);
                    }
                }
            }
        }
        let surf = grow(&mut s.h, b * t * n_surf * w);
        self.surface.forward(patches, b * t * n_surf, surf);
        // The token sequence of each request: per step [image, sensor, surface, task] + positions.
        let n = t * per;
        let x = grow(&mut s.x, b * n * w);
        for (k, r) in inputs.iter().enumerate() {
            for st in 0..t {
                let base = (k * n + st * per) * w;
                x[base..][..n_img * w].copy_from_slice(&r.tokens[st][..n_img * w]);
                x[base + n_img * w..][..w].copy_from_slice(&sensor[(k * t + st) * w..][..w]);
                x[base + (n_img + 1) * w..][..n_surf * w]
                    .copy_from_slice(&surf[(k * t + st) * n_surf * w..][..n_surf * w]);
                x[base + (n_img + 1 + n_surf) * w..][..w].copy_from_slice(&self.task[r.task as usize * w..][..w]);
                for j in 0..per {
                    let row = &mut x[base + j * w..][..w];
                    let (tp, spos) = (&self.token_pos[j * w..][..w], &self.step_pos[st * w..][..w]);
                    for ((v, a), bb) in row.iter_mut().zip(tp).zip(spos) {
                        *v = *v + a + bb;
                    }
                }
            }
        }
        for blk in &self.trunk {
            blk.forward(b, n, w, s);
        }
        let h = grow(&mut s.h, b * n * w);
        self.trunk_ln.forward(&s.x[..b * n * w], w, h);
        let cond = grow(&mut s.cond, b * w);
        for k in 0..b {
            let out = &mut cond[k * w..][..w];
            out.fill(0.0);
            for row in h[k * n * w..][..n * w].chunks_exact(w) {
                out.iter_mut().zip(row).for_each(|(a, v)| *a += v);
            }
            out.iter_mut().for_each(|a| *a /= n as f32);
        }
    }

    /// DDIM from each request's noise, conditioned on `s.cond`, into `s.act`.
    fn sample(&self, inputs: &[ChunkInput], s: &mut Scratch) {
        let c = &self.cfg;
        let (b, w, h) = (inputs.len(), c.trunk.width, c.head.hidden);
        let steps = self.steps.len();
        let chunk = c.head.horizon * c.head.action_dim;
        // Conditioning of (step k, request j), step-major: silu(cond_proj(cond_j) + te_k).
        let half = h / 2;
        let temb = grow(&mut s.small, steps * h);
        for (k, st) in self.steps.iter().enumerate() {
            for f in 0..half {
                let freq = (-(10000f32.ln()) * f as f32 / half as f32).exp();
                let a = st.t * freq;
                temb[k * h + f] = a.sin();
                temb[k * h + half + f] = a.cos();
            }
        }
        let t1 = grow(&mut s.o, steps * h);
        self.time_mlp1.forward(temb, steps, t1);
        silu(t1);
        let te = grow(&mut s.te, steps * h);
        self.time_mlp2.forward(t1, steps, te);
        let cp = grow(&mut s.att, b * h);
        self.cond_proj.forward(&s.cond[..b * w], b, cp);
        let rows = steps * b;
        let cnd = grow(&mut s.h, rows * h);
        for k in 0..steps {
            for j in 0..b {
                let out = &mut cnd[(k * b + j) * h..][..h];
                for ((o, a), e) in out.iter_mut().zip(&cp[j * h..][..h]).zip(&s.te[k * h..][..h]) {
                    *o = a + e;
                }
            }
        }
        silu(cnd);
        // FiLM terms of every block for every (step, request): (1 + scale, shift).
        s.films.resize_with(self.head_blocks.len(), Vec::new);
        for (blk, film) in self.head_blocks.iter().zip(s.films.iter_mut()) {
            let f = grow(film, rows * 2 * h);
            blk.film.forward(cnd, rows, f);
            for r in f.chunks_exact_mut(2 * h) {
                r[..h].iter_mut().for_each(|v| *v += 1.0);
            }
        }
        // The denoising loop: only the head's MLP per step, on buffers that are already there.
        let x = grow(&mut s.act, b * chunk);
        for (j, r) in inputs.iter().enumerate() {
            x[j * chunk..][..chunk].copy_from_slice(r.noise);
        }
        let hb = grow(&mut s.x, b * h);
        let nb = grow(&mut s.qkv, b * h);
        let wide = grow(&mut s.wide, b * 2 * h);
        let eps = grow(&mut s.o, b * chunk);
        for (k, st) in self.steps.iter().enumerate() {
            self.input.forward(x, b, hb);
            for (blk, film) in self.head_blocks.iter().zip(&s.films) {
                blk.ln.forward(hb, h, nb);
                for j in 0..b {
                    let f = &film[(k * b + j) * 2 * h..][..2 * h];
                    let (scale, shift) = f.split_at(h);
                    for ((v, a), sh) in nb[j * h..][..h].iter_mut().zip(scale).zip(shift) {
                        *v = *v * a + sh;
                    }
                }
                blk.fc1.forward(nb, b, wide);
                silu(wide);
                blk.fc2.forward_add(wide, b, hb);
            }
            self.output.forward(hb, b, eps);
            for (xi, ei) in x.iter_mut().zip(eps.iter()) {
                let x0 = ((*xi - ei * st.sb) / st.sa).clamp(-1.0, 1.0);
                *xi = x0 * st.pa + ei * st.pb;
            }
        }
    }
}

impl Block {
    /// `batch` sequences of `n` tokens of width `d` in `s.x`, in place.
    fn forward(&self, batch: usize, n: usize, d: usize, s: &mut Scratch) {
        let rows = batch * n;
        let (heads, dh) = (self.heads, d / self.heads);
        let scale = 1.0 / (dh as f32).sqrt();
        let x = &mut s.x[..rows * d];
        let h = grow(&mut s.h, rows * d);
        self.ln1.forward(x, d, h);
        let qkv = grow(&mut s.qkv, rows * 3 * d);
        self.qkv.forward(h, rows, qkv);
        let o = grow(&mut s.o, rows * d);
        let att = grow(&mut s.att, n * n);
        let kt = grow(&mut s.small, dh * n);
        for bi in 0..batch {
            let seq = &qkv[bi * n * 3 * d..][..n * 3 * d];
            for hh in 0..heads {
                // Kᵀ of this head (dh × n), so that Q·Kᵀ and P·V are both the tiled kernel.
                for (j, row) in seq.chunks_exact(3 * d).enumerate() {
                    for (c, v) in row[d + hh * dh..][..dh].iter().enumerate() {
                        kt[c * n + j] = v * scale;
                    }
                }
                att.fill(0.0);
                kernels::matmul_acc(&seq[hh * dh..], 3 * d, n, dh, kt, n, n, att, n);
                for row in att.chunks_exact_mut(n) {
                    kernels::softmax(row);
                }
                let out = &mut o[bi * n * d + hh * dh..];
                for r in 0..n {
                    out[r * d..][..dh].fill(0.0);
                }
                kernels::matmul_acc(att, n, n, n, &seq[2 * d + hh * dh..], 3 * d, dh, out, d);
            }
        }
        self.proj.forward_add(o, rows, x);
        self.ln2.forward(x, d, h);
        let wide = grow(&mut s.wide, rows * 4 * d);
        self.fc1.forward(h, rows, wide);
        silu(wide);
        self.fc2.forward_add(wide, rows, x);
    }
}

use crate::kernels::{self, silu};

impl Norm {
    /// Layer norm (ε = 1e-5) of rows of width `d`.
    fn forward(&self, x: &[f32], d: usize, out: &mut [f32]) {
        for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let mean = row.iter().sum::<f32>() / d as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let inv = 1.0 / (var + 1e-5).sqrt();
            for (((o, v), g), b) in o.iter_mut().zip(row).zip(&self.g).zip(&self.b) {
                *o = (v - mean) * inv * g + b;
            }
        }
    }
}

impl Linear {
    /// `out = x Wᵀ + b` for `m` rows.
    fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let out = &mut out[..m * self.out];
        for row in out.chunks_exact_mut(self.out) {
            row.copy_from_slice(&self.b);
        }
        self.gemm(x, m, out);
    }

    /// `out += x Wᵀ + b` (a residual connection).
    fn forward_add(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let out = &mut out[..m * self.out];
        for row in out.chunks_exact_mut(self.out) {
            row.iter_mut().zip(&self.b).for_each(|(o, b)| *o += b);
        }
        self.gemm(x, m, out);
    }

    /// `out += x Wᵀ`.
    fn gemm(&self, x: &[f32], m: usize, out: &mut [f32]) {
        kernels::matmul_packed(x, self.inp, m, &self.wt, out, self.out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{seeded_init, seeded_randn, ObsBatch};
    use crate::Policy;
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;

    /// The small policy with seeded weights and an adapter whose `B` is not zero (so the fold
    /// is exercised), the candle model and the engine over the same weights.
    fn both() -> (Policy, Engine) {
        let cfg = PolicyConfig::load(std::path::Path::new("../configs/policy/small.toml")).unwrap();
        let (base, adapter, dev) = (VarMap::new(), VarMap::new(), Device::Cpu);
        let p = Policy::new(
            &cfg,
            VarBuilder::from_varmap(&base, DType::F32, &dev),
            Some(VarBuilder::from_varmap(&adapter, DType::F32, &dev)),
        )
        .unwrap();
        seeded_init(&base, 1).unwrap();
        for (k, v) in adapter.all_vars().iter().enumerate() {
            v.set(&(seeded_randn(100 + k as u64, v.dims(), &dev).unwrap() * 0.05).unwrap())
                .unwrap();
        }
        let merged = crate::runner::merge(&base, Some(&adapter), cfg.lora.scale()).unwrap();
        (p, Engine::new(&cfg, &merged).unwrap())
    }

    #[test]
    fn the_engine_acts_as_the_candle_model_does_one_robot_or_a_batch() {
        let (p, e) = both();
        let c = p.cfg.clone();
        let (t, n, dev) = (c.trunk.n_obs_steps, c.vision.image_size, Device::Cpu);
        let chunk = c.head.horizon * c.head.action_dim;
        let robots = 3;
        let mut s = Scratch::default();
        let mut want = Vec::new();
        let mut inputs_owned = Vec::new();
        for r in 0..robots as u64 {
            let obs = ObsBatch {
                images: seeded_randn(10 + r, &[1, t, 3, n, n], &dev)
                    .unwrap()
                    .affine(0.25, 0.5)
                    .unwrap(),
                state: seeded_randn(20 + r, &[1, t, c.inputs.state_dim], &dev).unwrap(),
                surface: seeded_randn(30 + r, &[1, t, c.inputs.surface_rows, c.inputs.surface_cols], &dev).unwrap(),
                task: Tensor::new(&[r as u32 % 4], &dev).unwrap(),
            };
            let noise = seeded_randn(40 + r, &[1, c.head.horizon, c.head.action_dim], &dev).unwrap();
            let a = p
                .sample(&obs, &noise)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            want.push(a);
            let px = obs.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let tokens = e.frame_tokens(&px, t, &mut s).unwrap();
            // The vision tokens themselves match candle's.
            let ct = p
                .frame_tokens(&obs.images.reshape((t, 3, n, n)).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let worst = tokens.iter().zip(&ct).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(worst < 1e-4, "vision tokens differ by {worst}");
            inputs_owned.push((
                tokens,
                obs.state.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                obs.surface.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                r as u32 % 4,
                noise.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            ));
        }
        let windows: Vec<Vec<&[f32]>> = inputs_owned
            .iter()
            .map(|(tok, ..)| tok.chunks_exact(e.frame_token_len()).collect())
            .collect();
        let inputs: Vec<ChunkInput> = inputs_owned
            .iter()
            .zip(&windows)
            .map(|((_, st, su, task, noise), w)| ChunkInput {
                tokens: w,
                state: st,
                surface: su,
                task: *task,
                noise,
            })
            .collect();
        let batched = e.chunks(&inputs, &mut s).unwrap();
        for (r, input) in inputs.iter().enumerate() {
            let alone = e.chunks(std::slice::from_ref(input), &mut s).unwrap().remove(0);
            assert_eq!(alone.len(), chunk);
            for (name, got) in [("alone", &alone), ("in the batch", &batched[r])] {
                let worst = got.iter().zip(&want[r]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(
                    worst < 1e-4,
                    "robot {r} {name}: actions differ from candle's by {worst}"
                );
            }
        }
        // Different robots got different chunks (the batch did not mix them up).
        assert!(batched[0].iter().zip(&batched[1]).any(|(a, b)| (a - b).abs() > 1e-3));
    }

    #[test]
    fn wrong_inputs_are_errors_naming_the_request_and_the_field() {
        let (_, e) = both();
        let mut s = Scratch::default();
        let tok = vec![0.0; e.frame_token_len()];
        let w: Vec<&[f32]> = vec![&tok, &tok];
        let (st, su, noise) = (vec![0.0; 12], vec![0.0; 128], vec![0.0; 32]);
        let good = ChunkInput {
            tokens: &w,
            state: &st,
            surface: &su,
            task: 0,
            noise: &noise,
        };
        assert!(e.chunks(&[good], &mut s).is_ok());
        let short = [0.0; 5];
        let bad = ChunkInput { state: &short, ..good };
        let err = e.chunks(&[good, bad], &mut s).unwrap_err().to_string();
        assert!(err.contains("request 1") && err.contains("state"), "{err}");
        let err = e
            .chunks(&[ChunkInput { task: 9, ..good }], &mut s)
            .unwrap_err()
            .to_string();
        assert!(err.contains("task 9"), "{err}");
        let err = e.frame_tokens(&[0.0; 10], 1, &mut s).unwrap_err().to_string();
        assert!(err.contains("10 pixel values"), "{err}");
    }
}
