//! `nanobot demos` and `nanobot eval`: the simulator in-process (`nanobot_actors::shadow`), no
//! fleet and no bus. `demos` records the scripted expert's demonstrations as LeRobot datasets
//! (one per robot, `OUT/r{i}`, world seed `i`, as `launch/sim.toml` seeds its robots); `eval`
//! measures a checkpoint's closed-loop success on seeds of its own, beside the expert's on the
//! same worlds.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use nanobot_actors::shadow::{evaluate, record_demonstrations, Driver, ShadowConfig};
use nanobot_dataset::{DatasetSpec, DatasetWriter, WriterConfig};
use nanobot_policy::runner::Runner;
use nanobot_sim::{Shift, SimConfig};

#[derive(Args)]
pub struct DemosArgs {
    /// Where the datasets go: one per robot, `OUT/r0`, `OUT/r1`, ...
    #[arg(long, default_value = "data/demos")]
    out: PathBuf,
    #[arg(long, default_value_t = 4)]
    robots: u32,
    /// Episodes per robot.
    #[arg(long, default_value_t = 150)]
    episodes: u32,
    /// The condition the demonstrations are recorded under.
    #[arg(long, default_value = "none")]
    shift: String,
    /// World seeds are this plus the robot's index.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn demos(args: DemosArgs) -> anyhow::Result<u8> {
    let shift: Shift = args.shift.parse()?;
    record_demos(&args.out, args.robots, args.episodes, shift, args.seed)?;
    Ok(0)
}

/// Record `episodes` expert episodes for each of `robots` robots under `out` (`out/r{i}`, world
/// seed `seed + i`); the datasets' paths.
pub fn record_demos(out: &Path, robots: u32, episodes: u32, shift: Shift, seed: u64) -> anyhow::Result<Vec<PathBuf>> {
    let t0 = Instant::now();
    let mut total = 0;
    let mut dirs = Vec::new();
    for i in 0..robots {
        let dir = out.join(format!("r{i}"));
        if dir.exists() {
            anyhow::bail!(
                "{} exists: demonstrations are written to a new directory",
                dir.display()
            );
        }
        let sim = SimConfig {
            seed: seed + i as u64,
            shift,
            ..SimConfig::default()
        };
        let spec = DatasetSpec::sim(sim.rate_hz, sim.image_size, sim.surface_size);
        let mut w =
            DatasetWriter::open(&dir, spec, WriterConfig::default()).with_context(|| dir.display().to_string())?;
        let rows = record_demonstrations(&mut w, sim, episodes, 85)?;
        eprintln!("demos: {} {episodes} episodes, {rows} rows", dir.display());
        total += rows;
        dirs.push(dir);
    }
    println!(
        "demos: {robots} robots × {episodes} episodes under {}: {total} rows in {:.1} s → {}",
        shift.name(),
        t0.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(dirs)
}

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long, default_value = "policy.safetensors")]
    checkpoint: PathBuf,
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// World seeds (comma-separated); keep them apart from the demonstrations' (0..robots).
    #[arg(long, value_delimiter = ',', default_value = "100,101,102,103")]
    seeds: Vec<u64>,
    #[arg(long, default_value_t = 25)]
    episodes: u32,
    /// Conditions (comma-separated shift names, or `all`).
    #[arg(long, value_delimiter = ',', default_value = "none")]
    shift: Vec<String>,
    /// Blend and lead of the receding horizon (the policy actor's).
    #[arg(long, default_value_t = 4)]
    blend: usize,
    #[arg(long, default_value_t = 2)]
    lead: usize,
    #[arg(long)]
    n_action_steps: Option<usize>,
    /// Ticks before an episode counts as failed (a live robot's `intervene_after_steps`).
    #[arg(long, default_value_t = 200)]
    episode_steps: u32,
}

pub fn eval(args: EvalArgs) -> anyhow::Result<u8> {
    let runner = Runner::load(&args.checkpoint, args.adapter.as_deref())
        .with_context(|| args.checkpoint.display().to_string())?;
    let shifts: Vec<Shift> = if args.shift.iter().any(|s| s == "all") {
        Shift::ALL.to_vec()
    } else {
        args.shift.iter().map(|s| s.parse()).collect::<Result<_, _>>()?
    };
    let cfg = ShadowConfig {
        seeds: args.seeds.clone(),
        episodes_per_seed: args.episodes,
        blend: args.blend,
        lead: args.lead,
        n_action_steps: args.n_action_steps,
        sim: SimConfig {
            episode_steps: args.episode_steps,
            ..SimConfig::default()
        },
        ..ShadowConfig::default()
    };
    println!(
        "eval: {} (adapter {}), seeds {:?} × {} episodes",
        args.checkpoint.display(),
        if runner.adapter_version().is_empty() {
            "none".into()
        } else {
            runner.adapter_version()
        },
        args.seeds,
        args.episodes
    );
    println!("{:<16} {:>28} {:>28} {:>7}", "condition", "policy", "expert", "length");
    for shift in shifts {
        let t0 = Instant::now();
        let p = evaluate(&Driver::Policy(&runner), shift, &cfg)?;
        let secs = t0.elapsed().as_secs_f64();
        let e = evaluate(&Driver::Expert, shift, &cfg)?;
        println!(
            "{:<16} {:>28} {:>28} {:>6.2}×   ({secs:.1} s)",
            shift.name(),
            p.to_string(),
            e.to_string(),
            p.mean_steps / e.mean_steps.max(1e-9)
        );
    }
    Ok(0)
}
