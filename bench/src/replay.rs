//! `nanobot bench replay`: training windows per second out of replay (the store the replay actor
//! runs: draw, gather from the Arrow columns, decode JPEG, pack one blob; then the trainer's
//! conversion to tensors), cold (every frame decoded) and with the decoded-frame cache warm,
//! and through a Zenoh query in one process, beside what the trainer consumes in the same run
//! (LoRA steps of the `small` policy on those batches). Target: replay is never what the trainer
//! waits for (≥ 3× the trainer's samples/s).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use nanobot_actors::bus::{Bus, BusConfig};
use nanobot_actors::replay::{Store, StoreConfig};
use nanobot_actors::trainer::TrainCore;
use nanobot_dataset::{DatasetSpec, DatasetWriter, Frame, WriterConfig};
use nanobot_messages::{ReplayBatch, ReplayRequest};
use nanobot_policy::checkpoint::{self, Meta, NormStats, Role};
use nanobot_policy::model::seeded_init;
use nanobot_policy::train::{LrSchedule, TrainBatch, TrainConfig};
use nanobot_policy::{Policy, PolicyConfig};
use nanobot_sampling::Strategy;
use nanobot_sim::{SimConfig, SimRobot};

/// A fleet's worth of expert episodes: `robots` datasets of `rows` rows each under `dir`.
fn fleet_data(dir: &Path, robots: usize, rows: u64) -> anyhow::Result<()> {
    for r in 0..robots {
        let mut w = DatasetWriter::open(
            &dir.join(format!("r{r}")),
            DatasetSpec::sim(20.0, 64, 8),
            WriterConfig {
                file_max_age: Duration::from_secs(3600),
                ..WriterConfig::default()
            },
        )?;
        let mut sim = SimRobot::new(SimConfig {
            seed: r as u64,
            ..SimConfig::default()
        })?;
        for seq in 0..rows {
            let a = sim.expert_action();
            w.push(Frame {
                seq,
                stamp_ns: seq * 50_000_000,
                source_episode: sim.episode(),
                task: 0,
                image: Some(sim.render_jpeg(90).into()),
                state: sim.state().to_vec(),
                action: a.to_vec(),
                surface: sim.surface(),
            })?;
            if sim.step(a).is_some() {
                sim.reset();
            }
            if (seq + 1) % 1000 == 0 {
                w.finish_file()?;
            }
        }
        w.finish_file()?;
    }
    Ok(())
}

fn store(dir: &Path, cache_mb: f64) -> anyhow::Result<(Store, f64)> {
    let mut s = Store::new(StoreConfig {
        strategy: Strategy::Uniform,
        samples_per_insert: 1e12,
        min_rows: 1,
        held_out_every: 0,
        cache_mb,
        ..StoreConfig::default()
    });
    let t0 = Instant::now();
    for r in s.index_datasets(dir) {
        r.map_err(|e| anyhow::anyhow!(e))?;
    }
    Ok((s, t0.elapsed().as_secs_f64()))
}

fn request(batch: u32, seed: u64, cfg: &PolicyConfig) -> ReplayRequest {
    ReplayRequest {
        batch_size: batch,
        n_obs_steps: cfg.trunk.n_obs_steps as u32,
        horizon: cfg.head.horizon as u32,
        seed,
        held_out: false,
    }
}

/// Windows/s of `batches` draws (seeds `seeds`), each turned into the trainer's tensors.
fn windows_per_s(
    s: &mut Store,
    seeds: std::ops::Range<u64>,
    batch: u32,
    cfg: &PolicyConfig,
    norm: &NormStats,
) -> anyhow::Result<f64> {
    let n = seeds.end - seeds.start;
    let t0 = Instant::now();
    for seed in seeds {
        let b = s
            .sample(&request(batch, seed, cfg), 0)
            .map_err(|e| anyhow::anyhow!(e))?;
        TrainBatch::from_replay(&b, cfg, norm)?;
    }
    Ok((n * batch as u64) as f64 / t0.elapsed().as_secs_f64())
}

/// A random `cfg` base with `norm`, saved in `dir` (what the trainer loads).
fn base(dir: &Path, cfg: &PolicyConfig, norm: NormStats) -> anyhow::Result<PathBuf> {
    let vars = VarMap::new();
    Policy::new(cfg, VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu), None)?;
    seeded_init(&vars, 1)?;
    let path = dir.join("base.safetensors");
    let meta = Meta {
        kind: Role::Base,
        version: "bench".into(),
        config: cfg.clone(),
        norm,
    };
    checkpoint::save(&path, &vars, &meta)?;
    Ok(path)
}

pub fn run(config: &Path, rows: u64, batch: u32, batches: u64, dir: Option<&Path>) -> anyhow::Result<u8> {
    let cfg = PolicyConfig::load(config)?;
    let scratch = dir
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("nanobot-bench-replay-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let data = scratch.join("data");
    let robots = 4;
    let t0 = Instant::now();
    fleet_data(&data, robots, rows / robots as u64)?;
    let made = t0.elapsed().as_secs_f64();
    let (states, actions): (Vec<Vec<f32>>, Vec<Vec<f32>>) = nanobot_dataset::read_dataset(&data.join("r0"))?
        .1
        .into_iter()
        .map(|f| (f.state, f.action))
        .unzip();
    let norm = NormStats::fit(&states, &actions);

    let (mut cold, indexed) = store(&data, 0.0)?;
    let total = cold.stats().rows;
    println!(
        "nanobot bench replay: {total} rows of {robots} simulated robots (64×64 JPEG, written in {made:.1} s), indexed in {:.2} s ({:.0} rows/s, sha256 checked); {} windows a batch, n_obs_steps {}, horizon {}",
        indexed,
        total as f64 / indexed,
        batch,
        cfg.trunk.n_obs_steps,
        cfg.head.horizon
    );
    println!("{:<58} {:>12}", "setting", "windows/s");
    let cold_rate = windows_per_s(&mut cold, 0..batches, batch, &cfg, &norm)?;
    println!("{:<58} {:>12.0}", "cold: every frame decoded (no cache)", cold_rate);

    let (mut warm, _) = store(&data, 1024.0)?;
    // One pass over every row's frames fills the cache; then the timed draws.
    let mut seed = 1_000_000;
    while warm.stats().cache_misses < total && seed < 1_000_000 + 10 * total / batch as u64 {
        warm.sample(&request(batch, seed, &cfg), 0)
            .map_err(|e| anyhow::anyhow!(e))?;
        seed += 1;
    }
    let warm_rate = windows_per_s(&mut warm, 0..batches, batch, &cfg, &norm)?;
    let st = warm.stats();
    println!(
        "{:<58} {:>12.0}",
        format!(
            "warm: decoded frames cached ({:.0} MB, hit rate {:.2})",
            st.cache_bytes as f64 / 1048576.0,
            st.cache_hits as f64 / (st.cache_hits + st.cache_misses).max(1) as f64
        ),
        warm_rate
    );

    // Through Zenoh in one process: a queryable over the warm store, asked by `get`.
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let zenoh_rate = rt.block_on(async {
        let bus = Bus::open(
            &BusConfig {
                multicast_scouting: false,
                ..BusConfig::default()
            },
            "bench",
        )
        .await?;
        let q = bus.queryable::<ReplayRequest>("bench/replay/sample", 4).await?;
        let server = tokio::task::spawn_blocking(move || -> anyhow::Result<Store> {
            let handle = tokio::runtime::Handle::current();
            while let Some(req) = handle.block_on(q.recv()) {
                let b = warm.sample(&req.msg, 0).map_err(|e| anyhow::anyhow!(e))?;
                handle.block_on(req.reply("", &b))?;
                if req.msg.seed == u64::MAX {
                    break;
                }
            }
            Ok(warm)
        });
        let t0 = Instant::now();
        for seed in (0..batches).chain([u64::MAX]) {
            let replies = bus
                .get::<ReplayRequest, ReplayBatch>(
                    "bench/replay/sample",
                    "",
                    &request(batch, seed, &cfg),
                    Duration::from_secs(10),
                )
                .await?;
            let b = replies
                .into_iter()
                .next()
                .ok_or_else(|| anyhow::anyhow!("no reply"))??;
            TrainBatch::from_replay(&b.msg, &cfg, &norm)?;
        }
        let rate = ((batches + 1) * batch as u64) as f64 / t0.elapsed().as_secs_f64();
        server.await??;
        bus.close().await;
        anyhow::Ok(rate)
    })?;
    println!(
        "{:<58} {:>12.0}",
        "warm, through a Zenoh query in one process", zenoh_rate
    );

    // What the trainer consumes: LoRA steps on these batches, as the trainer actor runs them.
    let base = base(&scratch, &cfg, norm)?;
    let mut core = TrainCore::open(
        &base,
        &scratch.join("state"),
        TrainConfig {
            batch: batch as usize,
            lr: 1e-3,
            warmup: 1,
            weight_decay: 0.0,
            seed: 1,
            grad_clip: Some(1.0),
            schedule: LrSchedule::Constant,
            shards: 2,
        },
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let (mut s, _) = store(&data, 1024.0)?;
    let steps = 12u64;
    let pre: Vec<ReplayBatch> = (0..steps + 2)
        .map(|seed| s.sample(&request(batch, seed, &cfg), 0).map_err(|e| anyhow::anyhow!(e)))
        .collect::<anyhow::Result<_>>()?;
    for b in &pre[..2] {
        core.step(b).map_err(|e| anyhow::anyhow!(e))?;
    }
    let t0 = Instant::now();
    for b in &pre[2..] {
        core.step(b).map_err(|e| anyhow::anyhow!(e))?;
    }
    let trainer = (steps * batch as u64) as f64 / t0.elapsed().as_secs_f64();
    println!(
        "{:<58} {:>12.0}",
        format!("the trainer: LoRA r{}, 2 shards", cfg.lora.rank),
        trainer
    );
    println!(
        "replay / trainer: cold {:.1}×, warm {:.1}×, through Zenoh {:.1}× (target ≥ 3×)",
        cold_rate / trainer,
        warm_rate / trainer,
        zenoh_rate / trainer
    );
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(0)
}
