//! `nanobot demos`: the scripted expert's demonstrations recorded in the simulator, in-process
//! (`nanobot_actors::shadow`, no fleet and no bus), as LeRobot datasets: one per robot,
//! `OUT/r{i}`, world seed `i`, as `launch/sim_expert.toml` seeds its robots.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use nanobot_actors::shadow::record_demonstrations;
use nanobot_dataset::{DatasetSpec, DatasetWriter, WriterConfig};
use nanobot_sim::{Observe, Shift, SimConfig};

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
    /// What the robots observe: `state` (the target in the state vector) or `camera` (the
    /// target only in the camera frame).
    #[arg(long, default_value = "state")]
    observe: Observe,
}

pub fn demos(args: DemosArgs) -> anyhow::Result<u8> {
    let shift: Shift = args.shift.parse()?;
    record_demos(&args.out, args.robots, args.episodes, shift, args.observe, args.seed)?;
    Ok(0)
}

/// Record `episodes` expert episodes for each of `robots` robots under `out` (`out/r{i}`, world
/// seed `seed + i`); the datasets' paths.
pub fn record_demos(
    out: &Path,
    robots: u32,
    episodes: u32,
    shift: Shift,
    observe: Observe,
    seed: u64,
) -> anyhow::Result<Vec<PathBuf>> {
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
            observe,
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
        "demos: {robots} robots × {episodes} episodes under {}, observing {}: {total} rows in {:.1} s → {}",
        shift.name(),
        observe.name(),
        t0.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(dirs)
}
