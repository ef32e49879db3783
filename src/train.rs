//! `nanobot train`: offline pretraining of the policy's base from a LeRobot-format dataset
//! (for example scripted-expert demonstrations logged from the simulated fleet): AdamW with
//! linear warmup, DDPM loss on windows of `n_obs_steps` observations and `horizon` actions,
//! normalization statistics fitted on the data and stored in every checkpoint.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::Args;
use nanobot_actors::ingest::decode_jpeg_rgb;
use nanobot_dataset::{read_dataset, StoredFrame};
use nanobot_policy::checkpoint::{self, Kind, Meta, NormStats};
use nanobot_policy::model::{seeded_init, seeded_randn};
use nanobot_policy::rng::Normal;
use nanobot_policy::runner::rgb_to_chw;
use nanobot_policy::{ObsBatch, Policy, PolicyConfig};

#[derive(Args)]
pub struct TrainArgs {
    /// A LeRobot dataset written by the logger or `nanobot collect` (repeatable).
    #[arg(long, required = true)]
    dataset: Vec<PathBuf>,
    /// Policy config (configs/policy/*.toml).
    #[arg(long)]
    config: PathBuf,
    #[arg(long)]
    steps: usize,
    /// Where the base checkpoint goes.
    #[arg(long, default_value = "policy.safetensors")]
    out: PathBuf,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    #[arg(long, default_value_t = 1e-4)]
    weight_decay: f64,
    /// Also write the checkpoint every this many steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    checkpoint_every: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Name stamped on the checkpoint (and on the actions it produces).
    #[arg(long)]
    version: Option<String>,
}

/// The rows of all datasets, decoded once. Every row starts a training window (a window
/// near an episode's end repeats its last action).
struct Data {
    rows: Vec<Row>,
}

struct Row {
    episode: (usize, u64),
    task: u32,
    rgb: Vec<u8>,
    state: Vec<f32>,
    action: Vec<f32>,
    surface: Vec<f32>,
}

fn load(datasets: &[PathBuf], cfg: &PolicyConfig) -> anyhow::Result<Data> {
    let mut rows = Vec::new();
    for (d, dir) in datasets.iter().enumerate() {
        let (_, frames) = read_dataset(dir).with_context(|| format!("dataset {}", dir.display()))?;
        for f in frames {
            rows.push(row(d, dir, f, cfg)?);
        }
    }
    if rows.is_empty() {
        bail!("no rows in {:?}", datasets);
    }
    Ok(Data { rows })
}

fn row(d: usize, dir: &Path, f: StoredFrame, cfg: &PolicyConfig) -> anyhow::Result<Row> {
    let at = || format!("{} row {} (seq {})", dir.display(), f.index, f.seq);
    let jpeg = f
        .image
        .as_deref()
        .with_context(|| format!("{}: no camera image", at()))?;
    let (w, h, rgb) = decode_jpeg_rgb(jpeg).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
    let n = cfg.vision.image_size as u32;
    if (w, h) != (n, n) {
        bail!("{}: image is {w}×{h}, the policy takes {n}×{n}", at());
    }
    if f.state.len() != cfg.inputs.state_dim || f.action.len() != cfg.head.action_dim {
        bail!(
            "{}: state/action have {}/{} values, the policy config says {}/{}",
            at(),
            f.state.len(),
            f.action.len(),
            cfg.inputs.state_dim,
            cfg.head.action_dim
        );
    }
    if f.surface.len() != cfg.inputs.surface_rows * cfg.inputs.surface_cols {
        bail!("{}: surface has {} cells", at(), f.surface.len());
    }
    Ok(Row {
        episode: (d, f.episode_index),
        task: f.task_index as u32,
        rgb,
        state: f.state,
        action: f.action,
        surface: f.surface,
    })
}

impl Data {
    /// Row `i + k` if it is in the same episode, else the nearest one that is.
    fn at(&self, i: usize, k: isize) -> &Row {
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

    fn batch(&self, idx: &[usize], cfg: &PolicyConfig, norm: &NormStats) -> anyhow::Result<(ObsBatch, Tensor)> {
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

pub fn train(a: TrainArgs) -> anyhow::Result<u8> {
    let cfg = PolicyConfig::load(&a.config)?;
    let t0 = Instant::now();
    let data = load(&a.dataset, &cfg)?;
    let norm = NormStats::fit(
        &data.rows.iter().map(|r| r.state.clone()).collect::<Vec<_>>(),
        &data.rows.iter().map(|r| r.action.clone()).collect::<Vec<_>>(),
    );
    eprintln!(
        "train: {} rows from {} dataset(s) decoded in {:.1} s",
        data.rows.len(),
        a.dataset.len(),
        t0.elapsed().as_secs_f64()
    );
    let dev = Device::Cpu;
    let vars = VarMap::new();
    let policy = Policy::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &dev), None)?;
    seeded_init(&vars, a.seed)?;
    let mut opt = AdamW::new(
        vars.all_vars(),
        ParamsAdamW {
            lr: a.lr,
            weight_decay: a.weight_decay,
            ..Default::default()
        },
    )?;
    let version = a.version.clone().unwrap_or_else(|| {
        format!(
            "{}-s{}",
            a.out
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            a.steps
        )
    });
    let meta = Meta {
        kind: Kind::Base,
        version,
        config: cfg.clone(),
        norm: norm.clone(),
    };
    let mut rng = Normal::new(a.seed ^ 0x7a11);
    let (mut recent, mut first) = (Vec::new(), None);
    let t0 = Instant::now();
    for step in 1..=a.steps {
        opt.set_learning_rate(a.lr * (step as f64 / a.warmup.max(1) as f64).min(1.0));
        let idx: Vec<usize> = (0..a.batch)
            .map(|_| rng.below(data.rows.len() as u32) as usize)
            .collect();
        let (obs, actions) = data.batch(&idx, &cfg, &norm)?;
        let eps = seeded_randn(a.seed.wrapping_add(step as u64 * 7919), actions.dims(), &dev)?;
        let t: Vec<u32> = (0..a.batch).map(|_| rng.below(cfg.head.train_steps as u32)).collect();
        let loss = policy.loss(&obs, &actions, &eps, &t)?;
        let l = loss.to_scalar::<f32>()?;
        if !l.is_finite() {
            bail!("step {step}: the loss is {l}; lower --lr");
        }
        opt.backward_step(&loss)?;
        recent.push(l);
        if step % 50 == 0 || step == a.steps {
            let mean = recent.iter().sum::<f32>() / recent.len() as f32;
            first.get_or_insert(mean);
            eprintln!(
                "train: step {step}/{} loss {mean:.4} lr {:.2e} ({:.0} ms/step)",
                a.steps,
                opt.learning_rate(),
                t0.elapsed().as_secs_f64() * 1e3 / step as f64
            );
            recent.clear();
        }
        if a.checkpoint_every > 0 && step % a.checkpoint_every == 0 {
            checkpoint::save(&a.out, &vars, &meta)?;
        }
    }
    checkpoint::save(&a.out, &vars, &meta)?;
    println!("{}", a.out.display());
    Ok(0)
}
