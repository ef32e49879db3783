//! `nanobot tune`: the settings that suit the machine it runs on, measured there with the
//! fleet's own policy and data — the policy worker's threads, the largest cross-robot batch
//! that stays within half a control tick, DDIM steps against how far the actions move, weight
//! precision against latency and action error, and the online trainer's batch size and learning
//! rate on a short run. Prints each measurement as a table and writes the chosen values, by
//! actor type, to a file launch files overlay with `tuned = "…"`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use clap::Args;
use nanobot_policy::export::weight_bytes;
use nanobot_policy::preprocess::Step;
use nanobot_policy::quant::DType as Q;
use nanobot_policy::runner::{Request, Runner};
use nanobot_policy::train::{Row, TrainConfig, Trainer, Windows};
use nanobot_policy::Policy;

use nanobot_bench::quantile;

#[derive(Args)]
pub struct TuneArgs {
    /// The fleet's base policy.
    #[arg(long, default_value = "policy.safetensors")]
    pub checkpoint: PathBuf,
    /// Datasets (or a directory of them) to take observations and training windows from.
    #[arg(long, default_value = "data/demos")]
    pub data: PathBuf,
    /// Where the chosen settings go.
    #[arg(long, default_value = "configs/tuned.toml")]
    pub out: PathBuf,
    /// The robots' control rate: a batch must fit in half a tick.
    #[arg(long, default_value_t = 20.0)]
    pub rate_hz: f64,
    /// How far (mean |Δaction|, the actions' units) fewer DDIM steps or a coarser precision may
    /// move the actions.
    #[arg(long, default_value_t = 0.01)]
    pub action_tolerance: f32,
    /// Seconds of training per (batch, learning rate) setting.
    #[arg(long, default_value_t = 15.0)]
    pub train_s: f64,
    /// A quick pass (fewer settings and repetitions): a smoke test of the tuner itself.
    #[arg(long)]
    pub quick: bool,
}

/// One observation history with its task, from the data.
struct Obs {
    history: Vec<Step>,
    task: u32,
}

fn datasets(dir: &std::path::Path) -> anyhow::Result<Vec<PathBuf>> {
    let found = super::verify::dataset_roots(dir)
        .with_context(|| format!("{}: no datasets (nanobot demos makes some)", dir.display()))?;
    if found.is_empty() {
        bail!(
            "{}: no dataset here (no meta/manifest.json, nor in a subdirectory)",
            dir.display()
        );
    }
    Ok(found)
}

/// Whether an episode is held out (never trained on here): one in five, by number.
fn held_out(row: &Row) -> bool {
    row.episode.1 % 5 == 4
}

fn time_ms(mut f: impl FnMut() -> anyhow::Result<()>, reps: usize) -> anyhow::Result<Vec<f64>> {
    f()?; // warm the buffers
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(t)
}

/// Chunks for `obs` (one batch), each robot's noise from its index.
fn chunks(r: &Runner, obs: &[&Obs]) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut tokens = Vec::new();
    let mut reqs: Vec<Request> = Vec::new();
    for (k, o) in obs.iter().enumerate() {
        let window = r.window(&o.history)?;
        tokens.push(r.frame_tokens(&window)?);
        reqs.push(r.request_window(&window, o.task, 1000 + k as u64)?);
    }
    let windows: Vec<Vec<&[f32]>> = tokens.iter().map(|f| f.iter().map(Vec::as_slice).collect()).collect();
    let inputs: Vec<_> = reqs.iter().zip(&windows).map(|(q, w)| q.input(w)).collect();
    Ok(r.chunks(&inputs)?)
}

fn mean_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let (mut s, mut n) = (0.0, 0usize);
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.iter().zip(y) {
            s += (p - q).abs();
            n += 1;
        }
    }
    s / n.max(1) as f32
}

pub fn tune(a: TuneArgs) -> anyhow::Result<u8> {
    let runner = Runner::load(&a.checkpoint, None).with_context(|| a.checkpoint.display().to_string())?;
    let cfg = runner.config().clone();
    let reps = if a.quick { 3 } else { 30 };
    // The data: every row decoded once; held-out episodes give the observations.
    let mut rows: Vec<Row> = Vec::new();
    for (d, dir) in datasets(&a.data)?.iter().enumerate() {
        rows.extend(super::train::rows_of(d, dir, &cfg)?);
    }
    let (held, train): (Vec<Row>, Vec<Row>) = rows.into_iter().partition(held_out);
    let (held, train) = if held.is_empty() || train.is_empty() {
        // Too little data to hold episodes out (a smoke test): measure on what there is.
        let all: Vec<Row> = held.into_iter().chain(train).collect();
        (all.clone(), all)
    } else {
        (held, train)
    };
    let t = cfg.trunk.n_obs_steps;
    let n_obs = if a.quick { 4 } else { 32 };
    let stride = (held.len() / n_obs).max(1);
    let obs: Vec<Obs> = (t..held.len())
        .step_by(stride)
        .filter(|&i| held[i - t + 1..=i].iter().all(|r| r.episode == held[i].episode))
        .take(n_obs)
        .map(|i| Obs {
            history: held[i + 1 - t..=i]
                .iter()
                .map(|r| Step {
                    rgb: r.rgb.clone(),
                    state: r.state.clone(),
                    surface: r.surface.clone(),
                })
                .collect(),
            task: held[i].task,
        })
        .collect();
    if obs.is_empty() {
        bail!("{}: no observation history of {t} steps in the data", a.data.display());
    }
    let all: Vec<&Obs> = obs.iter().collect();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "nanobot tune: {} ({} parameters), {} observations from {}, {cores} cores",
        a.checkpoint.display(),
        runner.base.all_vars().iter().map(|v| v.elem_count()).sum::<usize>(),
        obs.len(),
        a.data.display()
    );

    // 1. Cross-robot batch size: the largest batch within half a control tick.
    let budget_ms = 500.0 / a.rate_hz;
    println!(
        "\ncross-robot batch (the node's policy worker), budget {budget_ms:.0} ms = half a tick at {} Hz",
        a.rate_hz
    );
    println!(
        "{:>6} {:>12} {:>12} {:>14}",
        "robots", "batch p50", "batch p99", "per chunk ms"
    );
    let sizes: &[usize] = if a.quick { &[1, 4] } else { &[1, 2, 4, 8, 16, 32, 64] };
    let mut max_batch = 1;
    for &b in sizes {
        let batch: Vec<&Obs> = (0..b).map(|k| all[k % all.len()]).collect();
        let ms = time_ms(|| chunks(&runner, &batch).map(|_| ()), reps)?;
        let (p50, p99) = (quantile(&ms, 0.5), quantile(&ms, 0.99));
        println!("{b:>6} {p50:>12.2} {p99:>12.2} {:>14.3}", p50 / b as f64);
        if p99 <= budget_ms {
            max_batch = b;
        }
    }

    // 2. Worker threads: batches computed at once.
    println!("\npolicy worker threads (each computing batches of {max_batch})");
    println!("{:>7} {:>10} {:>12}", "threads", "chunks/s", "batch p50");
    let mut best = (1usize, 0.0f64);
    let mut one_rate = 0.0;
    for threads in 1..=cores.min(4) {
        let batch: Vec<&Obs> = (0..max_batch).map(|k| all[k % all.len()]).collect();
        let per = reps.max(4);
        let t0 = Instant::now();
        let times: Vec<Vec<f64>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|_| s.spawn(|| time_ms(|| chunks(&runner, &batch).map(|_| ()), per)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().map_err(|_| anyhow::anyhow!("a timing thread panicked"))?)
                .collect::<anyhow::Result<_>>()
        })?;
        let secs = t0.elapsed().as_secs_f64();
        let rate = (threads * (per + 1) * max_batch) as f64 / secs;
        let all_ms: Vec<f64> = times.concat();
        println!("{threads:>7} {rate:>10.0} {:>12.2}", quantile(&all_ms, 0.5));
        if threads == 1 {
            one_rate = rate;
        }
        // Another thread must earn its core (the robots and the trainer need them too).
        if rate > best.1 && (threads == 1 || rate >= 1.3 * one_rate) {
            best = (threads, rate);
        }
    }
    let threads = best.0;

    // 3. DDIM steps against the actions: the reference is every training step.
    let reference = runner.with_sampling_steps(cfg.head.train_steps)?;
    let want = chunks(&reference, &all)?;
    println!(
        "\nDDIM steps (actions against {} steps, mean |Δ| in the actions' units)",
        cfg.head.train_steps
    );
    println!("{:>6} {:>10} {:>12}", "steps", "chunk ms", "mean |Δa|");
    let mut steps_list: Vec<usize> = if a.quick {
        vec![2, 5]
    } else {
        vec![2, 4, 5, 6, 8, 10, 15, 20]
    };
    steps_list.push(cfg.head.ddim_steps);
    steps_list.sort();
    steps_list.dedup();
    steps_list.retain(|&s| s <= cfg.head.train_steps);
    let mut measured = Vec::new();
    for &s in &steps_list {
        let r = runner.with_sampling_steps(s)?;
        let one = [all[0]];
        let ms = time_ms(|| chunks(&r, &one).map(|_| ()), reps)?;
        let err = mean_abs_diff(&chunks(&r, &all)?, &want);
        println!(
            "{s:>6} {:>10.2} {err:>12.4}{}",
            quantile(&ms, 0.5),
            if s == cfg.head.ddim_steps {
                "   (the config's)"
            } else {
                ""
            }
        );
        measured.push((s, err));
    }
    let at_config = measured
        .iter()
        .find(|(s, _)| *s == cfg.head.ddim_steps)
        .map(|m| m.1)
        .unwrap_or(f32::MAX);
    let allowed = a.action_tolerance.max(at_config);
    let ddim_steps = measured
        .iter()
        .find(|(_, e)| *e <= allowed)
        .map(|m| m.0)
        .unwrap_or(cfg.head.ddim_steps);
    let acting = runner.with_sampling_steps(ddim_steps)?;

    // 4. Weight precision: what a GGUF export at each one acts like.
    let exact = chunks(&acting, &all)?;
    println!("\nweight precision (GGUF export, {ddim_steps} DDIM steps; the engine computes in f32 from the rounded weights)");
    println!(
        "{:>7} {:>11} {:>10} {:>12}",
        "weights", "weight MB", "chunk ms", "mean |Δa|"
    );
    let mut precision = "f32";
    for q in [Q::F32, Q::F16, Q::Q8_0, Q::Mxfp4] {
        let r = acting.quantized(q)?;
        let one = [all[0]];
        let ms = time_ms(|| chunks(&r, &one).map(|_| ()), reps)?;
        let err = mean_abs_diff(&chunks(&r, &all)?, &exact);
        let mb = weight_bytes(&runner.base, q).1 as f64 / 1e6;
        println!("{:>7} {mb:>11.2} {:>10.2} {err:>12.4}", q.name(), quantile(&ms, 0.5));
        if err <= a.action_tolerance {
            precision = q.name();
        }
    }

    // 5. The online trainer: batch and learning rate, a LoRA adapter on the base for the same
    // wall-clock time each, judged by the held-out loss relative to the base's.
    let (batches, lrs, secs): (&[usize], &[f64], f64) = if a.quick {
        (&[4, 8], &[1e-3, 3e-3], a.train_s.min(1.5))
    } else {
        (&[16, 32, 64], &[3e-4, 1e-3, 3e-3], a.train_s)
    };
    let norm = runner.meta.norm.clone();
    let train_w = Windows::new(train)?;
    let held_w = Windows::new(held)?;
    let n_eval = held_w.len().min(if a.quick { 8 } else { 64 });
    let eval_idx: Vec<usize> = (0..n_eval).map(|k| k * held_w.len() / n_eval).collect();
    let eval_batch = held_w.batch_padded(&eval_idx, &cfg, &norm)?;
    let base_loss = Trainer::eval(runner.policy(), &eval_batch, &cfg, 7)?;
    println!(
        "\nonline trainer (LoRA on the base, {secs:.0} s each; held-out loss relative to the base's {base_loss:.4})"
    );
    println!(
        "{:>6} {:>8} {:>7} {:>10} {:>10}",
        "batch", "lr", "steps", "samples/s", "held-out"
    );
    let mut chosen = (batches[0], lrs[0], f32::MAX);
    for &batch in batches {
        for &lr in lrs {
            let adapter = VarMap::new();
            let policy = Policy::new(
                &cfg,
                VarBuilder::from_varmap(&runner.base, DType::F32, &Device::Cpu),
                Some(VarBuilder::from_varmap(&adapter, DType::F32, &Device::Cpu)),
            )?;
            let mut trainer = Trainer::new(
                Trainer::named(&adapter),
                TrainConfig {
                    batch,
                    lr,
                    warmup: 10,
                    weight_decay: 0.0,
                    seed: 0,
                    grad_clip: Some(1.0),
                    schedule: nanobot_policy::train::LrSchedule::Constant,
                    shards: cores.min(2),
                },
            )?;
            let t0 = Instant::now();
            let mut steps = 0;
            while t0.elapsed().as_secs_f64() < secs || steps == 0 {
                trainer.step(&policy, &train_w, &cfg, &norm)?;
                steps += 1;
            }
            let rate = (steps * batch) as f64 / t0.elapsed().as_secs_f64();
            let ratio = Trainer::eval(&policy, &eval_batch, &cfg, 7)? / base_loss.max(1e-9);
            println!("{batch:>6} {lr:>8.0e} {steps:>7} {rate:>10.1} {ratio:>10.3}");
            if ratio < chosen.2 {
                chosen = (batch, lr, ratio);
            }
        }
    }

    let mut text = String::new();
    writeln!(
        text,
        "# Written by `nanobot tune` on {} for {} ({} cores): measured on this machine.",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "this machine".into()),
        a.checkpoint.display(),
        cores
    )?;
    writeln!(
        text,
        "# Launch files overlay it with `tuned = \"…\"` (tables by actor type; `set` still wins)."
    )?;
    writeln!(
        text,
        "# Weights: {precision} keeps the actions within {} of f32 (nanobot export --format gguf --quant {precision}).",
        a.action_tolerance
    )?;
    writeln!(text, "\n[policy]")?;
    writeln!(text, "threads = {threads}")?;
    writeln!(text, "max_batch = {max_batch}")?;
    writeln!(text, "ddim_steps = {ddim_steps}")?;
    writeln!(text, "\n[trainer]")?;
    writeln!(text, "batch = {}", chosen.0)?;
    writeln!(text, "lr = {:e}", chosen.1)?;
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    }
    std::fs::write(&a.out, &text).with_context(|| a.out.display().to_string())?;
    println!(
        "\nchosen: policy threads {threads}, max_batch {max_batch}, ddim_steps {ddim_steps}; trainer batch {}, lr {:e}; weights {precision}\nwritten to {}",
        chosen.0,
        chosen.1,
        a.out.display()
    );
    Ok(0)
}
