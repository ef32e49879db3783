//! `nanobot eval`: a checkpoint's closed-loop success in shadow simulation (in-process, as a
//! robot runs the policy), per condition, beside the scripted expert's on the same worlds.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use nanobot_actors::shadow::{evaluate, Driver, ShadowConfig};
use nanobot_policy::runner::Runner;
use nanobot_sim::{Observe, Shift, SimConfig};

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
    /// What the robots observe: `state` or `camera` (as the checkpoint was trained).
    #[arg(long, default_value = "state")]
    observe: Observe,
    /// Blank the camera (every frame black): shows whether the policy uses it.
    #[arg(long)]
    blank_camera: bool,
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
        blank_camera: args.blank_camera,
        sim: SimConfig {
            episode_steps: args.episode_steps,
            observe: args.observe,
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
