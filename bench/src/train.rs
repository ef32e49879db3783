//! `nanobot bench train`: training samples/s of a policy (the `small` config by default) at a
//! batch size, for full fine-tuning and for LoRA on trunk and head, on candle's default thread
//! pool and in a one-thread pool; and the adapter's bytes beside the base's. PyTorch is not run
//! here: its figures for the same architecture are printed as a reference with their source
//! (DESIGN.md), apart from this run's table.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use nanobot_policy::model::seeded_init;
use nanobot_policy::rng::Normal;
use nanobot_policy::train::{LrSchedule, Row, TrainConfig, Trainer, Windows};
use nanobot_policy::{Policy, PolicyConfig};

/// Synthetic episodes with the config's sizes (random pixels, smooth states and actions).
fn windows(cfg: &PolicyConfig, rows: usize) -> anyhow::Result<Windows> {
    let mut rng = Normal::new(7);
    let n = cfg.vision.image_size;
    let cells = cfg.inputs.surface_rows * cfg.inputs.surface_cols;
    let data = (0..rows)
        .map(|i| Row {
            episode: (0, (i / 50) as u64),
            task: 0,
            rgb: (0..n * n * 3).map(|_| (rng.unit() * 255.0) as u8).collect(),
            state: (0..cfg.inputs.state_dim).map(|_| rng.next()).collect(),
            action: (0..cfg.head.action_dim).map(|_| rng.next().tanh()).collect(),
            surface: vec![0.25; cells],
        })
        .collect();
    Ok(Windows::new(data)?)
}

fn bytes(vars: &VarMap) -> usize {
    vars.all_vars().iter().map(|v| v.elem_count() * 4).sum()
}

/// Samples/s of `steps` timed steps (after 2 untimed) training `trained` of `policy`.
fn time(
    policy: &Policy,
    trained: Vec<(String, candle_core::Var)>,
    data: &Windows,
    cfg: &PolicyConfig,
    batch: usize,
    steps: usize,
    shards: usize,
) -> anyhow::Result<(f64, f32)> {
    let norm = data.fit_norm();
    let mut t = Trainer::new(
        trained,
        TrainConfig {
            batch,
            lr: 1e-3,
            warmup: 1,
            weight_decay: 0.0,
            seed: 1,
            grad_clip: Some(1.0),
            schedule: LrSchedule::Constant,
            shards,
        },
    )?;
    let step = |t: &mut Trainer| -> anyhow::Result<f32> {
        let idx = t.draw(batch, data.len());
        let b = data.batch_padded(&idx, cfg, &norm)?;
        Ok(t.step_on(policy, &b, cfg)?)
    };
    for _ in 0..2 {
        step(&mut t)?;
    }
    let t0 = Instant::now();
    let mut loss = 0.0;
    for _ in 0..steps {
        loss = step(&mut t)?;
    }
    Ok(((batch * steps) as f64 / t0.elapsed().as_secs_f64(), loss))
}

pub fn run(config: &Path, batch: usize, steps: usize) -> anyhow::Result<u8> {
    let cfg = PolicyConfig::load(config)?;
    let data = windows(&cfg, 512)?;
    let dev = Device::Cpu;
    let base = VarMap::new();
    let full = Policy::new(&cfg, VarBuilder::from_varmap(&base, DType::F32, &dev), None)?;
    seeded_init(&base, 1)?;
    // LoRA as the trainer actor runs it: the base's tensors are constants, not variables, so
    // backpropagation never computes the gradients of weights nobody updates (PEFT's
    // `requires_grad = False`).
    let frozen: std::collections::HashMap<String, candle_core::Tensor> = base
        .data()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let adapter = VarMap::new();
    let lora = Policy::new(
        &cfg,
        VarBuilder::from_tensors(frozen, DType::F32, &dev),
        Some(VarBuilder::from_varmap(&adapter, DType::F32, &dev)),
    )?;
    seeded_init(&adapter, 2)?;
    println!(
        "nanobot bench train: {} ({} parameters), batch {batch}, {steps} timed steps per row; LoRA rank {} on {:?}: adapter {:.2} MB = {:.1} % of the base's {:.2} MB",
        config.display(),
        bytes(&base) / 4,
        cfg.lora.rank,
        cfg.lora.targets,
        bytes(&adapter) as f64 / 1e6,
        100.0 * bytes(&adapter) as f64 / bytes(&base) as f64,
        bytes(&base) as f64 / 1e6,
    );
    println!("{:<40} {:>12}", "setting", "samples/s");
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    // (label, pool the step runs in, shards)
    let settings: [(&str, Option<&rayon::ThreadPool>, usize); 3] = [
        ("2 cores: 2 shards, one thread each", None, 2),
        ("2 cores: candle's own threads", None, 1),
        ("1 core: one-thread pool", Some(&one), 1),
    ];
    for (label, pool, shards) in settings {
        let run_one = |policy: &Policy, vars: &VarMap| -> anyhow::Result<(f64, f32)> {
            let named = Trainer::named(vars);
            match pool {
                Some(p) => p.install(|| time(policy, named, &data, &cfg, batch, steps, shards)),
                None => time(policy, named, &data, &cfg, batch, steps, shards),
            }
        };
        let (s, _) = run_one(&lora, &adapter)?;
        println!("{:<40} {:>12.0}", format!("LoRA r{}, {label}", cfg.lora.rank), s);
        let (s, _) = run_one(&full, &base)?;
        println!("{:<40} {:>12.0}", format!("full, {label}"), s);
    }
    println!(
        "reference, NOT measured in this run: PyTorch 2.10 + PEFT, same architecture, LoRA r8 on 2 threads \
         261 samples/s on a 2-vCPU AMD EPYC (2026-12-03); 403 (1 thread) / 605 (2) and full 323 / 489 on \
         another host (2026-11-27); see DESIGN.md"
    );
    Ok(0)
}
