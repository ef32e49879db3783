//! `nanobot train`: offline pretraining of the policy's base from a LeRobot-format dataset
//! (for example scripted-expert demonstrations logged from the simulated fleet): AdamW with
//! linear warmup, DDPM loss on windows of `n_obs_steps` observations and `horizon` actions,
//! normalization statistics fitted on the data and stored in every checkpoint. The windows and
//! the step are the policy crate's (`nanobot_policy::train`), shared with the online trainer;
//! this command only reads the datasets. With `--adapter-of BASE` it fine-tunes a LoRA adapter
//! on that base instead (the base frozen, its config and normalization kept), as the online
//! trainer does, from datasets already logged.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use clap::Args;
use nanobot_dataset::{read_dataset, StoredFrame};
use nanobot_policy::checkpoint::{self, Meta, Role};
use nanobot_policy::model::seeded_init;
use nanobot_policy::preprocess::decode_jpeg_rgb;
use nanobot_policy::train::{LrSchedule, Row, TrainConfig, Trainer, Windows};
use nanobot_policy::{Policy, PolicyConfig};

#[derive(Args)]
pub struct TrainArgs {
    /// A LeRobot dataset written by the logger or `nanobot collect` (repeatable).
    #[arg(long, required = true)]
    dataset: Vec<PathBuf>,
    /// Policy config (configs/policy/*.toml); with --adapter-of, the base's own.
    #[arg(long, required_unless_present = "adapter_of")]
    config: Option<PathBuf>,
    /// Train a LoRA adapter on this base checkpoint (frozen) instead of a base: `--out` is then
    /// the adapter, for `nanobot eval --adapter`, `serve --adapter` or a promoter.
    #[arg(long, conflicts_with = "config")]
    adapter_of: Option<PathBuf>,
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
    /// Train each batch as this many shards at once, one core each (data parallelism; the
    /// result differs from one shard's only by rounding).
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Name stamped on the checkpoint (and on the actions it produces).
    #[arg(long)]
    version: Option<String>,
}

/// The rows of dataset number `d` at `dir`, decoded, in episode order.
pub fn rows_of(d: usize, dir: &Path, cfg: &PolicyConfig) -> anyhow::Result<Vec<Row>> {
    let (_, frames) = read_dataset(dir).with_context(|| format!("dataset {}", dir.display()))?;
    frames.into_iter().map(|f| row(d, dir, f, cfg)).collect()
}

/// The rows of all datasets, decoded once, in episode order.
fn load(datasets: &[PathBuf], cfg: &PolicyConfig) -> anyhow::Result<Windows> {
    let mut rows = Vec::new();
    for (d, dir) in datasets.iter().enumerate() {
        rows.extend(rows_of(d, dir, cfg)?);
    }
    if rows.is_empty() {
        bail!("no rows in {:?}", datasets);
    }
    Ok(Windows::new(rows)?)
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
    let row = Row {
        episode: (d, f.episode_index),
        task: f.task_index as u32,
        rgb,
        state: f.state,
        action: f.action,
        surface: f.surface,
    };
    row.check(cfg).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
    Ok(row)
}

pub fn train(a: TrainArgs) -> anyhow::Result<u8> {
    if let Some(base) = a.adapter_of.clone() {
        return train_adapter(a, &base);
    }
    let cfg = PolicyConfig::load(
        a.config
            .as_deref()
            .expect("clap requires --config without --adapter-of"),
    )?;
    let t0 = Instant::now();
    let data = load(&a.dataset, &cfg)?;
    let norm = data.fit_norm();
    eprintln!(
        "train: {} rows from {} dataset(s) decoded in {:.1} s",
        data.len(),
        a.dataset.len(),
        t0.elapsed().as_secs_f64()
    );
    let dev = Device::Cpu;
    let vars = VarMap::new();
    let policy = Policy::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &dev), None)?;
    seeded_init(&vars, a.seed)?;
    let mut trainer = Trainer::new(
        Trainer::named(&vars),
        TrainConfig {
            batch: a.batch,
            lr: a.lr,
            warmup: a.warmup,
            weight_decay: a.weight_decay,
            seed: a.seed,
            grad_clip: None,
            schedule: LrSchedule::Constant,
            shards: a.shards,
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
        kind: Role::Base,
        version,
        config: cfg.clone(),
        norm: norm.clone(),
    };
    let mut recent = Vec::new();
    let t0 = Instant::now();
    for step in 1..=a.steps {
        recent.push(trainer.step(&policy, &data, &cfg, &norm)?);
        if step % 50 == 0 || step == a.steps {
            let mean = recent.iter().sum::<f32>() / recent.len() as f32;
            eprintln!(
                "train: step {step}/{} loss {mean:.4} lr {:.2e} ({:.0} ms/step)",
                a.steps,
                trainer.learning_rate(),
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

/// `--adapter-of BASE`: a LoRA adapter trained on the datasets, the base frozen.
fn train_adapter(a: TrainArgs, base: &Path) -> anyhow::Result<u8> {
    let (base_meta, tensors) = checkpoint::read(base)?;
    if base_meta.kind != Role::Base {
        bail!("{}: holds an adapter; --adapter-of takes a base", base.display());
    }
    let cfg = base_meta.config.clone();
    let t0 = Instant::now();
    let data = load(&a.dataset, &cfg)?;
    eprintln!(
        "train: {} rows from {} dataset(s) decoded in {:.1} s; a LoRA adapter on {} (rank {}, targets {:?})",
        data.len(),
        a.dataset.len(),
        t0.elapsed().as_secs_f64(),
        base_meta.version,
        cfg.lora.rank,
        cfg.lora.targets
    );
    let dev = Device::Cpu;
    let adapter = VarMap::new();
    let policy = Policy::new(
        &cfg,
        VarBuilder::from_tensors(tensors, DType::F32, &dev),
        Some(VarBuilder::from_varmap(&adapter, DType::F32, &dev)),
    )
    .with_context(|| base.display().to_string())?;
    seeded_init(&adapter, a.seed)?;
    let mut trainer = Trainer::new(
        Trainer::named(&adapter),
        TrainConfig {
            batch: a.batch,
            lr: a.lr,
            warmup: a.warmup,
            weight_decay: a.weight_decay,
            seed: a.seed,
            grad_clip: None,
            schedule: LrSchedule::Constant,
            shards: a.shards,
        },
    )?;
    let meta = Meta {
        kind: Role::Adapter,
        version: a
            .version
            .clone()
            .unwrap_or_else(|| format!("{}+lora.s{}", base_meta.version, a.steps)),
        config: cfg.clone(),
        norm: base_meta.norm.clone(),
    };
    let mut recent = Vec::new();
    let t0 = Instant::now();
    for step in 1..=a.steps {
        recent.push(trainer.step(&policy, &data, &cfg, &base_meta.norm)?);
        if step % 50 == 0 || step == a.steps {
            let mean = recent.iter().sum::<f32>() / recent.len() as f32;
            eprintln!(
                "train: step {step}/{} loss {mean:.4} ({:.0} ms/step)",
                a.steps,
                t0.elapsed().as_secs_f64() * 1e3 / step as f64
            );
            recent.clear();
        }
    }
    checkpoint::save(&a.out, &adapter, &meta)?;
    println!("{}", a.out.display());
    Ok(0)
}
