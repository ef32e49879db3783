//! `nanobot bench fleet`: many simulated robots driven by the trained policy on one node — per
//! fleet size, each robot a `sim_robot` (world, camera JPEGs at its control rate), an `ingest`
//! and a `policy` actor, all in one `nanobot launch` process — with the node's policy worker
//! batching the robots' chunks, beside the same fleet computing one robot at a time
//! (`max_batch = 1`) in the same run. Reported per size: the worker's observation-to-chunk time
//! p50/p99 (decode, queue, inference), observation-to-action p99 as a subscriber sees it (the
//! observation's and the chunk's arrival on the bus), missed deadlines (the robot's plan ran out
//! before the next chunk came, or it had no action at a tick), the mean batch, and the fleet
//! process's CPU.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nanobot_messages::{ActionChunk, Observation, Stats};

use crate::learning::{child_kill, client, free_port, sim_fleet};
use crate::quantile;

#[derive(clap::Args)]
pub struct FleetArgs {
    /// The policy the robots run (`nanobot train` on `nanobot demos`).
    #[arg(long, default_value = "policy.safetensors")]
    pub checkpoint: PathBuf,
    /// Fleet sizes.
    #[arg(long, value_delimiter = ',', default_values_t = vec![4, 8, 16, 32])]
    pub robots: Vec<usize>,
    /// Seconds measured per fleet size and setting (after the warm-up).
    #[arg(long, default_value_t = 20.0)]
    pub secs: f64,
    /// Seconds of warm-up before measuring.
    #[arg(long, default_value_t = 6.0)]
    pub warmup_s: f64,
    /// Only the batched setting (skip the one-robot-at-a-time baseline).
    #[arg(long)]
    pub no_baseline: bool,
    /// Scratch directory (default: a new one under the temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// One fleet size under one setting.
struct Row {
    chunks: u64,
    worker_p50: f64,
    worker_p99: f64,
    obs_to_action_p99: f64,
    missed: u64,
    batch: f64,
    cpu: f64,
    secs: f64,
}

pub fn run(rt: &tokio::runtime::Runtime, a: FleetArgs) -> anyhow::Result<u8> {
    let checkpoint = std::fs::canonicalize(&a.checkpoint).with_context(|| {
        format!(
            "{}: a trained policy is needed (nanobot demos, then nanobot train --data data/demos --out {0})",
            a.checkpoint.display()
        )
    })?;
    let dir = a
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("nb-bench-fleet-{}", std::process::id())));
    std::fs::create_dir_all(&dir)?;
    let exe = std::env::current_exe()?;
    println!(
        "nanobot bench fleet: {} — sim_robot + ingest + policy per robot at 20 Hz on one node, {:.0} s measured after {:.0} s warm-up",
        checkpoint.display(),
        a.secs,
        a.warmup_s
    );
    println!(
        "{:<7} {:<10} {:>7} {:>8} {:>8} {:>9} {:>9} {:>7} {:>7} {:>8}",
        "robots", "worker", "chunk/s", "p50 ms", "p99 ms", "o→a p99", "missed", "batch", "CPU %", "needed/s"
    );
    let mut all_met = true;
    for &n in &a.robots {
        let settings: &[(&str, usize)] = if a.no_baseline {
            &[("batched", 32)]
        } else {
            &[("1 robot", 1), ("batched", 32)]
        };
        for &(label, max_batch) in settings {
            let r = rt.block_on(measure(&exe, &checkpoint, &dir, n, max_batch, a.warmup_s, a.secs))?;
            // A chunk every n_action_steps − lead − 1 = 5 ticks keeps every robot acting.
            let needed = n as f64 * 20.0 / 5.0;
            println!(
                "{n:<7} {label:<10} {:>7.1} {:>8.2} {:>8.2} {:>9.2} {:>9} {:>7.2} {:>7.0} {:>8.0}",
                r.chunks as f64 / r.secs,
                r.worker_p50,
                r.worker_p99,
                r.obs_to_action_p99,
                r.missed,
                r.batch,
                r.cpu,
                needed
            );
            if label == "batched" && r.missed > 0 {
                all_met = false;
            }
        }
    }
    println!(
        "(chunk/s: chunks published; p50/p99: the policy worker's observation-to-chunk time; o→a: observation to action chunk as a subscriber sees them; missed: deadlines the robots' plans ran out before, summed; CPU: the fleet's processes, % of one core, {} cores here)",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(if all_met { 0 } else { 1 })
}

async fn measure(
    exe: &std::path::Path,
    checkpoint: &std::path::Path,
    dir: &std::path::Path,
    robots: usize,
    max_batch: usize,
    warmup_s: f64,
    secs: f64,
) -> anyhow::Result<Row> {
    let port = free_port();
    let text = sim_fleet(
        port,
        robots,
        &format!(
            "checkpoint = \"{}\", promotions = false, max_batch = {max_batch}",
            checkpoint.display()
        ),
    )?;
    let file = dir.join(format!("fleet{robots}-{max_batch}.toml"));
    std::fs::write(&file, text)?;
    let mut child = Command::new(exe)
        .arg("launch")
        .arg(&file)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(
            dir.join(format!("fleet{robots}-{max_batch}.log")),
        )?)
        .spawn()?;
    let pid = child.id();
    let result = async {
        let bus = client(port, None).await?;
        let seen: Arc<Mutex<HashMap<(String, u64), Instant>>> = Arc::default();
        let lat: Arc<Mutex<Vec<f64>>> = Arc::default();
        let stats: Arc<Mutex<BTreeMap<String, Stats>>> = Arc::default();
        let s = seen.clone();
        let _obs = bus
            .subscribe_callback::<Observation>("nb/*/obs", move |r| {
                let mut m = s.lock().unwrap();
                if m.len() > 100_000 {
                    m.clear();
                }
                m.insert((r.header.robot.clone(), r.header.seq), Instant::now());
            })
            .await?;
        let (s, l) = (seen.clone(), lat.clone());
        let _act = bus
            .subscribe_callback::<ActionChunk>("nb/*/act", move |r| {
                let now = Instant::now();
                if let Some(t) = s.lock().unwrap().get(&(r.header.robot.clone(), r.msg.obs_seq)) {
                    l.lock().unwrap().push((now - *t).as_secs_f64() * 1e3);
                }
            })
            .await?;
        let st = stats.clone();
        let _stats = bus
            .subscribe_callback::<Stats>("nb/node/**", move |r| {
                st.lock().unwrap().insert(r.msg.actor.clone(), r.msg);
            })
            .await?;
        // Every robot's policy acting before the clock starts.
        let t0 = Instant::now();
        loop {
            let acting = stats
                .lock()
                .unwrap()
                .values()
                .filter(|s| s.actor.starts_with("policy") && metric(s, "chunks") > 0.0)
                .count();
            if acting >= robots {
                break;
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!(
                    "only {acting} of {robots} policies acted within 120 s (see {})",
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs_f64(warmup_s)).await;
        let before = stats.lock().unwrap().clone();
        let cpu0 = crate::cpu_seconds(pid);
        lat.lock().unwrap().clear();
        let t1 = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        // Stats come once a second: wait for a fresh set.
        let cpu1 = crate::cpu_seconds(pid);
        let wall = t1.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let after = stats.lock().unwrap().clone();
        let lat = lat.lock().unwrap().clone();
        let sum = |m: &BTreeMap<String, Stats>, prefix: &str, name: &str| -> f64 {
            m.values()
                .filter(|s| s.actor.starts_with(prefix))
                .map(|s| metric(s, name))
                .sum()
        };
        let delta = |prefix: &str, name: &str| sum(&after, prefix, name) - sum(&before, prefix, name);
        let policies: Vec<&Stats> = after.values().filter(|s| s.actor.starts_with("policy")).collect();
        let p50s: Vec<f64> = policies.iter().map(|s| metric(s, "inference_p50_ms")).collect();
        let p99 = policies
            .iter()
            .map(|s| metric(s, "inference_p99_ms"))
            .fold(0.0, f64::max);
        let batch = policies.iter().map(|s| metric(s, "batch_mean")).sum::<f64>() / policies.len().max(1) as f64;
        Ok(Row {
            chunks: delta("policy", "chunks") as u64,
            worker_p50: quantile(&p50s, 0.5),
            worker_p99: p99,
            obs_to_action_p99: quantile(&lat, 0.99),
            missed: (delta("policy", "missed_deadlines") + delta("sim_robot", "missed_actions")) as u64,
            batch,
            cpu: (cpu1 - cpu0) / wall * 100.0,
            secs: wall,
        })
    }
    .await;
    child_kill(&mut child);
    result
}

fn metric(s: &Stats, name: &str) -> f64 {
    s.extra.iter().find(|m| m.name == name).map(|m| m.value).unwrap_or(0.0)
}
