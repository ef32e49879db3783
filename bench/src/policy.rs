//! `nanobot bench policy`: action-chunk latency (p50/p99) with the configured DDIM steps,
//! where the time goes (encoder once per chunk, denoiser per step), parameters and memory,
//! f32 beside the same policy loaded from its MXFP4 export, on candle's default thread pool
//! and inside a one-thread pool.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;

use crate::{peak_rss_mb, quantile};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use nanobot_policy::checkpoint::{Meta, NormStats, Role};
use nanobot_policy::export::{load_gguf_into, to_gguf, weight_bytes};
use nanobot_policy::gguf::Gguf;
use nanobot_policy::model::{seeded_init, seeded_randn};
use nanobot_policy::quant::DType as Q;
use nanobot_policy::rollout::{infer_batch, Rollout};
use nanobot_policy::runner::{Runner, Step};
use nanobot_policy::{ObsBatch, Policy, PolicyConfig};

fn build(cfg: &PolicyConfig) -> anyhow::Result<(Policy, VarMap)> {
    let vars = VarMap::new();
    let p = Policy::new(cfg, VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu), None)?;
    seeded_init(&vars, 1)?;
    Ok((p, vars))
}

fn obs(cfg: &PolicyConfig) -> anyhow::Result<ObsBatch> {
    let (t, s, dev) = (cfg.trunk.n_obs_steps, cfg.vision.image_size, Device::Cpu);
    Ok(ObsBatch {
        images: seeded_randn(2, &[1, t, 3, s, s], &dev)?.affine(0.25, 0.5)?,
        state: seeded_randn(3, &[1, t, cfg.inputs.state_dim], &dev)?,
        surface: seeded_randn(4, &[1, t, cfg.inputs.surface_rows, cfg.inputs.surface_cols], &dev)?,
        task: Tensor::new(&[0u32], &dev)?,
    })
}

struct Timing {
    total: Vec<f64>,
    encode: Vec<f64>,
    step: Vec<f64>,
}

fn time_chunks(p: &Policy, o: &ObsBatch, noise: &Tensor, runs: usize) -> anyhow::Result<(Timing, Vec<f32>)> {
    let mut t = Timing {
        total: vec![],
        encode: vec![],
        step: vec![],
    };
    let mut last = Vec::new();
    let steps = p.sampler.timesteps.len() as f64;
    for i in 0..runs + 5 {
        let t0 = Instant::now();
        let cond = p.encode(o)?;
        let t1 = Instant::now();
        let a = p.sample_from(&cond, noise)?;
        last = a.flatten_all()?.to_vec1::<f32>()?;
        let t2 = Instant::now();
        if i >= 5 {
            t.total.push((t2 - t0).as_secs_f64() * 1e3);
            t.encode.push((t1 - t0).as_secs_f64() * 1e3);
            t.step.push((t2 - t1).as_secs_f64() * 1e3 / steps);
        }
    }
    Ok((t, last))
}

pub fn run(config: &Path, runs: usize) -> anyhow::Result<u8> {
    let cfg = PolicyConfig::load(config)?;
    let (p, vars) = build(&cfg)?;
    let params: usize = vars.all_vars().iter().map(|v| v.elem_count()).sum();
    let (f32_bytes, mx_bytes) = weight_bytes(&vars, Q::Mxfp4);
    let o = obs(&cfg)?;
    let noise = seeded_randn(5, &[1, cfg.head.horizon, cfg.head.action_dim], &Device::Cpu)?;

    let meta = Meta {
        kind: Role::Base,
        version: "bench".into(),
        config: cfg.clone(),
        // A spread of one in every dimension: de-normalizing keeps the actions' differences.
        norm: NormStats::fit(
            &[vec![-1.0; cfg.inputs.state_dim], vec![1.0; cfg.inputs.state_dim]],
            &[vec![-1.0; cfg.head.action_dim], vec![1.0; cfg.head.action_dim]],
        ),
    };
    let gguf = Gguf::from_bytes(&to_gguf(&vars, &meta, Q::Mxfp4)?.to_bytes()?)?;
    let (q, qvars) = build(&cfg)?;
    load_gguf_into(&gguf, &qvars).context("loading the MXFP4 export")?;

    println!(
        "nanobot bench policy: {} ({} DDIM steps, horizon {}), {runs} chunks per row, batch 1",
        config.display(),
        cfg.head.ddim_steps,
        cfg.head.horizon
    );
    println!(
        "parameters {params} ({:.2} MB f32, {:.2} MB as MXFP4 weights), peak RSS {:.0} MB",
        f32_bytes as f64 / 1e6,
        mx_bytes as f64 / 1e6,
        peak_rss_mb()
    );
    println!(
        "{:<26} {:>9} {:>9} {:>11} {:>13}",
        "setting", "p50 ms", "p99 ms", "encoder ms", "per step ms"
    );
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let mut outputs = Vec::new();
    for (label, policy) in [("f32", &p), ("mxfp4 (dequantized)", &q)] {
        for threads in ["default pool", "1-thread pool"] {
            let (t, a) = if threads == "1-thread pool" {
                one.install(|| time_chunks(policy, &o, &noise, runs))?
            } else {
                time_chunks(policy, &o, &noise, runs)?
            };
            println!(
                "{:<26} {:>9.2} {:>9.2} {:>11.2} {:>13.3}",
                format!("{label}, {threads}"),
                quantile(&t.total, 0.5),
                quantile(&t.total, 0.99),
                quantile(&t.encode, 0.5),
                quantile(&t.step, 0.5)
            );
            outputs.push(a);
        }
    }
    // Streaming, as a robot is driven: one new observation per chunk, the previous frame's
    // vision tokens kept. Before: candle's model op by op. Now: the engine through the path the
    // policy actor takes (the checkpoint loaded by the Runner, a Rollout).
    let dir = std::env::temp_dir().join(format!("nb-bench-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ckpt = dir.join("bench.safetensors");
    nanobot_policy::checkpoint::save(&ckpt, &vars, &meta)?;
    let runner = Runner::load(&ckpt, None)?;
    let _ = std::fs::remove_dir_all(&dir);
    let n = cfg.vision.image_size;
    let step_at = |robot: usize, i: usize| Step {
        rgb: (0..n * n * 3)
            .map(|k| ((k * 7 + i * 13 + robot * 31) % 251) as u8)
            .collect(),
        state: vec![0.1 * (robot % 5) as f32; cfg.inputs.state_dim],
        surface: vec![0.0; cfg.inputs.surface_rows * cfg.inputs.surface_cols],
    };
    let candle_streaming = one.install(|| -> anyhow::Result<Vec<f64>> {
        let mut prev: Option<Tensor> = None;
        let mut total = Vec::new();
        for i in 0..runs + 5 {
            let t0 = Instant::now();
            let obs = runner.batch(&[step_at(0, i)], 0)?;
            let frame = obs.images.narrow(1, 0, 1)?.reshape((1, 3, n, n))?;
            let tok = runner.policy().frame_tokens(&frame)?;
            let img = Tensor::stack(&[prev.as_ref().unwrap_or(&tok), &tok], 1)?;
            let cond = runner.policy().encode_tokens(&img, &obs)?;
            runner
                .policy()
                .sample_from(&cond, &noise)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            prev = Some(tok);
            if i >= 5 {
                total.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(total)
    })?;
    let streaming = |robots: usize| -> anyhow::Result<Vec<f64>> {
        let mut rollouts = (0..robots)
            .map(|_| Rollout::new(&runner, None, 0, 0))
            .collect::<Result<Vec<_>, _>>()?;
        let mut total = Vec::new();
        one.install(|| -> anyhow::Result<()> {
            for i in 0..runs + 5 {
                let t0 = Instant::now();
                for (r, ro) in rollouts.iter_mut().enumerate() {
                    ro.observe(r as u64, i as u64, 0, step_at(r, i));
                }
                let mut items: Vec<(&mut Rollout, u64)> = rollouts.iter_mut().map(|r| (r, i as u64)).collect();
                for a in infer_batch(&runner, &mut items) {
                    a?;
                }
                if i >= 5 {
                    total.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            Ok(())
        })?;
        Ok(total)
    };
    let engine_streaming = streaming(1)?;
    for (label, t) in [
        ("candle, streaming", &candle_streaming),
        ("engine, streaming", &engine_streaming),
    ] {
        println!(
            "{:<26} {:>9.2} {:>9.2}   (1 thread, one new frame per chunk{})",
            label,
            quantile(t, 0.5),
            quantile(t, 0.99),
            if label.starts_with("engine") {
                ": runner + rollout, the policy actor's path"
            } else {
                ""
            }
        );
    }
    // Not measured here: a reference with its source, never a column that reads as this run's.
    println!(
        "reference, NOT measured in this run: PyTorch 2.10, same architecture, p50 16.9 ms on a 2-vCPU AMD EPYC \
         (2026-12-03) and 5.74 ms on 1 thread of another host (2026-11-27); see DESIGN.md"
    );
    println!(
        "engine speed-up over candle, streaming p50: {:.2}×",
        quantile(&candle_streaming, 0.5) / quantile(&engine_streaming, 0.5)
    );
    // Many robots, one model: every robot's chunk in one batch.
    println!(
        "{:<8} {:>14} {:>14} {:>16} {:>18}",
        "robots", "batch p50 ms", "batch p99 ms", "per chunk ms", "chunks/s 1 core"
    );
    for robots in [1usize, 4, 8, 16, 32] {
        let t = streaming(robots)?;
        let p50 = quantile(&t, 0.5);
        println!(
            "{robots:<8} {p50:>14.2} {:>14.2} {:>16.3} {:>18.0}",
            quantile(&t, 0.99),
            p50 / robots as f64,
            robots as f64 * 1e3 / p50
        );
    }
    // The engine acts as the model does: the same chunk within 1e-3.
    let history = [step_at(0, 1), step_at(0, 2)];
    let a = runner.act(&history, 1, 9)?;
    let b = runner.act_reference(&history, 1, 9)?;
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    println!("largest |engine − candle| action difference, same seed: {worst:.2e} (bound 1e-3)");
    let diff = outputs[0]
        .iter()
        .zip(&outputs[2])
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / outputs[0].len() as f32;
    println!("mean |f32 − mxfp4| action difference (normalized units, untrained seeded weights): {diff:.4}");
    Ok(0)
}
