//! `nanobot bench loop`: the README's main job, measured. It runs `launch/sim.toml` (the
//! fleet on the base policy; the shift to condition B after `--before-s`; replay, the LoRA
//! trainer and the promoter learning from what the robots do) in a scratch directory, watches the
//! robots' episodes and the rollout from a client session, and prints, beside the scripted
//! expert's success under the same conditions (in shadow simulation):
//!
//! - success under A before the shift, under B before adaptation and at the end;
//! - minutes from the shift until a minute of B episodes succeeds ≥ 80 %;
//! - interventions per hour (robot-hours) before and after adaptation;
//! - retention: the final adapter's shadow success under A beside the base's;
//! - adapter bytes beside base bytes;
//! - promotion latency (decision → every robot reports running it), with this fleet's robots and
//!   with `--latency-robots` more robots in a second, short run.
//!
//! An episode the onboard expert had to finish counts as a failure of the policy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nanobot_actors::bus::{Bus, BusConfig, Mode, PubQos};
use nanobot_actors::shadow::{evaluate, Driver, ShadowConfig};
use nanobot_messages::{Blob, Candidate, Event, EventKind, Metric, PolicyStatus, Promoted};
use nanobot_policy::runner::Runner;
use nanobot_sim::Shift;

#[derive(clap::Args)]
pub struct LoopArgs {
    /// The base checkpoint (`nanobot train` on `nanobot demos`; the main job makes it at its
    /// first start).
    #[arg(long, default_value = "policy-camera.safetensors")]
    pub checkpoint: PathBuf,
    /// The demonstrations the base was trained on (replay keeps training on them).
    #[arg(long, default_value = "data/demos-camera")]
    pub demos: PathBuf,
    /// What the robots observe (`camera`: the target only in the frame; `state`: in the state).
    #[arg(long, default_value = "camera")]
    pub observe: nanobot_sim::Observe,
    #[arg(long, default_value = "icy_floor")]
    pub shift: String,
    /// Seconds under condition A before the shift.
    #[arg(long, default_value_t = 60.0)]
    pub before_s: f64,
    /// Seconds under condition B.
    #[arg(long, default_value_t = 600.0)]
    pub after_s: f64,
    /// Robots in the promotion-latency run (0: skip it).
    #[arg(long, default_value_t = 16)]
    pub latency_robots: usize,
    /// Scratch directory (default: a new one under the temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Conditions in turn (`none,icy_floor,brightness,none`), each for `--phase-s`: the
    /// continual-learning run (replaces `--shift`, `--before-s` and `--after-s`).
    #[arg(long, value_delimiter = ',')]
    pub sequence: Vec<String>,
    /// Seconds of each phase of `--sequence`.
    #[arg(long, default_value_t = 300.0)]
    pub phase_s: f64,
}

/// One finished episode, as the fleet reported it.
#[derive(Clone, Copy)]
pub(crate) struct Episode {
    pub t: f64,
    pub success: bool,
    pub intervened: bool,
}

#[derive(Default)]
pub(crate) struct Watch {
    pub episodes: Vec<Episode>,
    intervening: BTreeMap<String, bool>,
    pub interventions: Vec<f64>,
    adapters: BTreeMap<String, String>,
    /// (t, generation, fleet adapter)
    pub rollouts: Vec<(f64, u64, String)>,
}

pub(crate) fn child_kill(c: &mut Child) {
    unsafe {
        libc::kill(c.id() as i32, libc::SIGTERM);
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = c.kill();
    let _ = c.wait();
}

pub(crate) fn free_port() -> u16 {
    nanobot_actors::bus::free_loopback_port().unwrap_or(7471)
}

/// A client session on the fleet's node at `port`, retried for a minute while it starts. A
/// secured fleet started in `work` (the main job) made its certificates there: the session
/// connects over TLS as the first person it finds (engineer.dev).
pub(crate) async fn client(port: u16, work: Option<&Path>) -> anyhow::Result<Bus> {
    let t0 = Instant::now();
    loop {
        let tls = work.and_then(|w| nanobot_actors::pki::discover(&w.join("state/nb/keys")));
        let cfg = BusConfig {
            mode: Mode::Client,
            connect: vec![format!(
                "{}/127.0.0.1:{port}",
                if tls.is_some() { "tls" } else { "tcp" }
            )],
            tls: tls.map(|(_, files)| files),
            ..BusConfig::default()
        };
        // Until a secured fleet has written its certificates, a plain client finds no plain
        // listener: it fails like one too early, and tries again.
        match Bus::open(&cfg, "nb").await.map_err(anyhow::Error::from) {
            Ok(b) => return Ok(b),
            Err(_) if t0.elapsed() < Duration::from_secs(60) => tokio::time::sleep(Duration::from_millis(500)).await,
            Err(e) => return Err(e),
        }
    }
}

/// Autonomous success of the episodes that ended in `[from, to)`, and how many there were.
pub(crate) fn rate(eps: &[Episode], from: f64, to: f64) -> (f64, usize) {
    let w: Vec<&Episode> = eps.iter().filter(|e| e.t >= from && e.t < to).collect();
    let wins = w.iter().filter(|e| e.success && !e.intervened).count();
    (
        if w.is_empty() {
            f64::NAN
        } else {
            wins as f64 / w.len() as f64
        },
        w.len(),
    )
}

/// A share as a whole percentage, "-" when there was nothing to count.
pub(crate) fn pct(v: f64) -> String {
    if v.is_nan() {
        "-".to_string()
    } else {
        format!("{:.0} %", 100.0 * v)
    }
}

/// Minutes from `from` until a one-minute window (sliding by 10 s, within `to`) of at least 4
/// episodes succeeds ≥ 80 %.
pub(crate) fn minutes_to_80(eps: &[Episode], from: f64, to: f64) -> Option<f64> {
    (0..)
        .map(|k| from + 10.0 * k as f64)
        .take_while(|t| t + 60.0 <= to)
        .find(|t| {
            let (r, n) = rate(eps, *t, t + 60.0);
            n >= 4 && r >= 0.8
        })
        .map(|t| (t + 60.0 - from) / 60.0)
}

/// Interventions per robot-hour among `robots` robots in `[from, to)`.
pub(crate) fn per_robot_hour(interventions: &[f64], robots: f64, from: f64, to: f64) -> f64 {
    let n = interventions.iter().filter(|t| **t >= from && **t < to).count();
    n as f64 / (robots * (to - from).max(1e-9) / 3600.0)
}

/// Shadow settings for a bench's closed-loop figures: `seeds` × `episodes`, each episode as long
/// as a live robot gets before its expert takes over (launch/sim.toml's 60 ticks).
pub(crate) fn shadow_settings(observe: nanobot_sim::Observe, seeds: Vec<u64>, episodes: u32) -> ShadowConfig {
    ShadowConfig {
        seeds,
        episodes_per_seed: episodes,
        sim: nanobot_sim::SimConfig {
            episode_steps: 60,
            observe,
            ..Default::default()
        },
        ..ShadowConfig::default()
    }
}

/// The main job (launch/sim.toml) run by a bench in a scratch directory of its own, on the
/// given base and demonstrations.
pub(crate) struct MainJob {
    pub exe: PathBuf,
    pub launch: PathBuf,
    pub checkpoint: PathBuf,
    pub work: PathBuf,
    pub port: u16,
    observe: nanobot_sim::Observe,
}

impl MainJob {
    /// Checks the files, makes `--dir` (or a new directory named for `tag`) with the
    /// demonstrations linked where the launch file looks for them.
    pub fn prepare(a: &LoopArgs, tag: &str) -> anyhow::Result<MainJob> {
        let launch = std::env::current_dir()?.join("launch/sim.toml");
        if !launch.exists() {
            bail!("run from the repository root: {} is missing", launch.display());
        }
        let checkpoint = std::fs::canonicalize(&a.checkpoint).with_context(|| a.checkpoint.display().to_string())?;
        let demos = std::fs::canonicalize(&a.demos).with_context(|| a.demos.display().to_string())?;
        let work = a
            .dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("nb-bench-{tag}-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(work.join("data"))?;
        std::os::unix::fs::symlink(&demos, work.join(format!("data/demos-{}", a.observe.name())))?;
        Ok(MainJob {
            exe: std::env::current_exe()?,
            launch,
            checkpoint,
            work,
            port: free_port(),
            observe: a.observe,
        })
    }

    /// `nanobot launch launch/sim.toml` with `env` beside the base, port and observation mode;
    /// its log goes to `fleet.log` in the scratch directory.
    pub fn spawn(&self, env: &[(&str, String)]) -> anyhow::Result<Child> {
        let mut cmd = Command::new(&self.exe);
        cmd.current_dir(&self.work)
            .arg("launch")
            .arg(&self.launch)
            .env("NB_CHECKPOINT", &self.checkpoint)
            .env("NB_PORT", self.port.to_string())
            .env("NB_OBSERVE", self.observe.name())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.work.join("fleet.log"))?);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Ok(cmd.spawn()?)
    }
}

pub fn run(rt: &tokio::runtime::Runtime, a: LoopArgs) -> anyhow::Result<u8> {
    if !a.sequence.is_empty() {
        return crate::sequence::run(rt, a);
    }
    let shift: Shift = a.shift.parse()?;
    let job = MainJob::prepare(&a, "loop")?;
    println!(
        "bench loop: launch/sim.toml in {}, base {}, shift to {} after {} s, {} s after it",
        job.work.display(),
        job.checkpoint.display(),
        shift.name(),
        a.before_s,
        a.after_s
    );
    let mut fleet = job.spawn(&[
        ("NB_SHIFT", shift.name().to_string()),
        ("NB_SHIFT_AFTER_S", format!("{:.1}", a.before_s)),
    ])?;
    let (exe, checkpoint, work, port) = (job.exe.clone(), job.checkpoint.clone(), job.work.clone(), job.port);
    let t_shift = a.before_s;
    let label = |t: f64| if t < t_shift { "A" } else { "B" }.to_string();
    let result = rt.block_on(watch_loop(port, &work, a.before_s + a.after_s, &label));
    child_kill(&mut fleet);
    let w = result?;
    let eps = &w.episodes;
    let end = a.before_s + a.after_s;
    let (a_before, n_a) = rate(eps, 10.0, t_shift);
    let first_adapter = w
        .rollouts
        .iter()
        .find(|r| r.0 > t_shift && !r.2.is_empty())
        .map(|r| r.0);
    let b_until = first_adapter.unwrap_or(end).min(t_shift + 120.0);
    let (b_before, n_bb) = rate(eps, t_shift, b_until);
    let (b_after, n_ba) = rate(eps, end - 120.0, end);
    let recovered = minutes_to_80(eps, t_shift, end);
    let per_hour = |from: f64, to: f64| per_robot_hour(&w.interventions, 4.0, from, to);
    // Retention, and what the expert does, in shadow simulation.
    let final_fleet = w.rollouts.last().map(|r| r.2.clone()).unwrap_or_default();
    let base = Runner::load(&checkpoint, None)?;
    let cfg = shadow_settings(a.observe, vec![100, 101, 102, 103], 10);
    let adapter_file = find_adapter(&work, &final_fleet);
    let adapted = match &adapter_file {
        Some(p) => Some(base.with_adapter_bytes(&std::fs::read(p)?, &final_fleet)?),
        None => None,
    };
    let shadow = |r: &Runner, s: Shift| evaluate(&Driver::Policy(r), s, &cfg);
    let base_a = shadow(&base, Shift::None)?;
    let base_b = shadow(&base, shift)?;
    let expert_b = evaluate(&Driver::Expert, shift, &cfg)?;
    let (ad_a, ad_b) = match &adapted {
        Some(r) => (Some(shadow(r, Shift::None)?), Some(shadow(r, shift)?)),
        None => (None, None),
    };
    println!();
    println!("live fleet (4 robots; an episode the expert finished is a failure):");
    println!(
        "  success under A before the shift        {:>6} ({n_a} episodes)",
        pct(a_before)
    );
    println!(
        "  success under B before adaptation       {:>6} ({n_bb} episodes)",
        pct(b_before)
    );
    println!(
        "  success under B, last 2 minutes         {:>6} ({n_ba} episodes)",
        pct(b_after)
    );
    println!(
        "  minutes from the shift to ≥ 80 % (1-min window): {}",
        recovered
            .map(|m| format!("{m:.1}"))
            .unwrap_or_else(|| format!("not within {:.0}", a.after_s / 60.0))
    );
    println!(
        "  interventions per robot-hour: before adaptation {:.0}, last 2 minutes {:.0}",
        per_hour(t_shift, b_until),
        per_hour(end - 120.0, end)
    );
    println!("shadow simulation (seeds 100–103 × 10 episodes of at most 60 ticks):");
    println!(
        "  {:<28} {:>24} {:>24}",
        "",
        "A (none)",
        format!("B ({})", shift.name())
    );
    println!("  {:<28} {:>24} {:>24}", "base", base_a.to_string(), base_b.to_string());
    if let (Some(x), Some(y)) = (&ad_a, &ad_b) {
        println!("  {:<28} {:>24} {:>24}", final_fleet, x.to_string(), y.to_string());
    } else {
        println!("  (no adapter was promoted)");
    }
    println!("  {:<28} {:>24} {:>24}", "scripted expert", "", expert_b.to_string());
    let base_bytes = std::fs::metadata(&checkpoint)?.len();
    if let Some(p) = &adapter_file {
        let n = std::fs::metadata(p)?.len();
        println!(
            "adapter {} bytes, base {} bytes ({:.1} %)",
            n,
            base_bytes,
            100.0 * n as f64 / base_bytes as f64
        );
    }
    let latencies = ledger_latencies(&work.join("state/nb/promoter/ledger.jsonl"));
    println!("promotion latency, 4 robots (decision → every robot on it): {latencies:?} ms");
    if a.latency_robots > 0 {
        let l = rt.block_on(latency_run(&exe, &checkpoint, &work.join("latency"), a.latency_robots))?;
        println!("promotion latency, {} robots: {l:?} ms", a.latency_robots);
    }
    Ok(0)
}

pub(crate) fn find_adapter(work: &Path, id: &str) -> Option<PathBuf> {
    if id.is_empty() {
        return None;
    }
    let ledger = std::fs::read_to_string(work.join("state/nb/promoter/ledger.jsonl")).ok()?;
    let sha = ledger.lines().rev().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        (v["kind"] == "candidate" && v["id"] == id).then(|| v["sha256"].as_str().map(String::from))?
    })?;
    Some(work.join(format!("state/nb/promoter/adapters/{sha}.safetensors")))
}

fn ledger_latencies(path: &Path) -> Vec<f64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "reached")
        .filter_map(|v| v["latency_ms"].as_f64())
        .map(|ms| (ms * 10.0).round() / 10.0)
        .collect()
}

/// Follow the fleet on `port` for `end` seconds from its first episode event, printing each
/// minute's autonomous success under the condition `label(t)` names.
pub(crate) async fn watch_loop(
    port: u16,
    work: &Path,
    end: f64,
    label: &dyn Fn(f64) -> String,
) -> anyhow::Result<Watch> {
    let bus = client(port, Some(work)).await?;
    let w = Arc::new(Mutex::new(Watch::default()));
    let start = Arc::new(Mutex::new(None::<Instant>));
    let (w1, s1) = (w.clone(), start.clone());
    let _events = bus
        .subscribe_callback::<Event>("nb/*/event", move |r| {
            let t = s1
                .lock()
                .unwrap()
                .get_or_insert_with(Instant::now)
                .elapsed()
                .as_secs_f64();
            let mut w = w1.lock().unwrap();
            let robot = r.header.robot.clone();
            match r.msg.event {
                EventKind::Intervention { active: true, .. } => {
                    w.intervening.insert(robot, true);
                    w.interventions.push(t);
                }
                EventKind::EpisodeEnd { success, .. } => {
                    let intervened = w.intervening.insert(robot, false).unwrap_or(false);
                    w.episodes.push(Episode { t, success, intervened });
                }
                _ => {}
            }
        })
        .await?;
    let (w2, s2) = (w.clone(), start.clone());
    let _rollouts = bus
        .subscribe_callback::<Promoted>("nb/ckpt/promoted", move |r| {
            let t = s2.lock().unwrap().map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0);
            let mut w = w2.lock().unwrap();
            if w.rollouts.last().map(|x| x.1) != Some(r.msg.generation) {
                let fleet = r.msg.fleet.map(|m| m.adapter_id).unwrap_or_default();
                w.rollouts.push((t, r.msg.generation, fleet));
            }
        })
        .await?;
    let w3 = w.clone();
    let _status = bus
        .subscribe_callback::<PolicyStatus>("nb/*/policy", move |r| {
            w3.lock()
                .unwrap()
                .adapters
                .insert(r.header.robot.clone(), r.msg.adapter_id);
        })
        .await?;
    // The clock starts with the first episode event (the robots are up).
    let wait0 = Instant::now();
    while start.lock().unwrap().is_none() {
        if wait0.elapsed() > Duration::from_secs(1200) {
            bail!("no episode from the fleet (see {})", work.join("fleet.log").display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s0 = start.lock().unwrap().expect("set above");
    // The clock starts at the robots' first EpisodeStart, as they start: their shifts count
    // from then.
    let mut next = 60.0;
    while s0.elapsed().as_secs_f64() < end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t = s0.elapsed().as_secs_f64();
        if t >= next {
            next += 60.0;
            let w = w.lock().unwrap();
            let (r, n) = rate(&w.episodes, t - 60.0, t);
            let ints = w.interventions.iter().filter(|x| **x >= t - 60.0).count();
            let fleet = w.rollouts.last().map(|r| r.2.as_str()).unwrap_or("");
            println!(
                "  t {:>4.0} s  {}  last minute: {:>4} success of {n:>3} episodes, {ints:>3} interventions; fleet on {}",
                t,
                label(t - 1.0),
                if r.is_nan() { "-".into() } else { format!("{:.0}%", 100.0 * r) },
                if fleet.is_empty() { "the base" } else { fleet }
            );
        }
    }
    let w = std::mem::take(&mut *w.lock().unwrap());
    Ok(w)
}

/// A launch file's text for one node listening on `port` with `robots` simulated robots (worlds
/// 10, 11, …; no onboard expert), each with ingest and a policy actor whose config gets
/// `policy_set` (TOML key = value pairs).
pub(crate) fn sim_fleet(port: u16, robots: usize, policy_set: &str) -> anyhow::Result<String> {
    let configs = std::env::current_dir()?.join("configs");
    Ok(format!(
        r#"fleet = "nb"
[zenoh]
multicast_scouting = false
[robots]
count = {robots}
[[node]]
name = "fleet"
listen = ["tcp/127.0.0.1:{port}"]
[[node.actor]]
type = "sim_robot"
for_each_robot = true
config = "{c}/sim_robot.toml"
set = {{ intervene_after_ms = 0, sim = {{ seed = "1{{index}}" }} }}
[[node.actor]]
type = "ingest"
for_each_robot = true
config = "{c}/ingest.toml"
[[node.actor]]
type = "policy"
for_each_robot = true
config = "{c}/policy_actor.toml"
set = {{ {policy_set} }}
"#,
        c = configs.display(),
    ))
}

/// A short run with `robots` robots (sim_robot, ingest, policy each) and a promoter whose gates
/// let anything that loads through: the time from each decision to every robot running it.
async fn latency_run(exe: &Path, base: &Path, dir: &Path, robots: usize) -> anyhow::Result<Vec<f64>> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let port = free_port();
    let configs = std::env::current_dir()?.join("configs");
    let text = format!(
        r#"{fleet}[[node.actor]]
type = "promoter"
config = "{c}/promoter.toml"
set = {{ base = "{base}", state_dir = "{d}/promoter", keys = "{d}/keys", generate_key = true, canary_robots = 0, gates = {{ held_out_tolerance = 10.0, margin = -1.0, retention = [], shadow = {{ seeds = [1000], episodes_per_seed = 1, sim = {{ episode_steps = 10 }} }} }} }}
"#,
        fleet = sim_fleet(
            port,
            robots,
            &format!(
                "checkpoint = \"{}\", trusted_key = \"{}/keys/fleet.pub\"",
                base.display(),
                dir.display()
            )
        )?,
        c = configs.display(),
        base = base.display(),
        d = dir.display(),
    );
    let file = dir.join("latency.toml");
    std::fs::write(&file, text)?;
    let mut fleet = Command::new(exe)
        .args(["launch"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("fleet.log"))?)
        .spawn()?;
    let result = async {
        let t0 = Instant::now();
        let bus = client(port, None).await?;
        let seen = Arc::new(Mutex::new(BTreeMap::<String, String>::new()));
        let s = seen.clone();
        let _status = bus
            .subscribe_callback::<PolicyStatus>("nb/*/policy", move |r| {
                s.lock().unwrap().insert(r.header.robot.clone(), r.msg.adapter_id);
            })
            .await?;
        while seen.lock().unwrap().len() < robots {
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("only {} of {robots} robots reported", seen.lock().unwrap().len());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let runner = Runner::load(base, None)?;
        let publisher = bus
            .publisher::<Candidate>("nb/ckpt/candidate", "", PubQos::Data)
            .await?;
        for k in 1..=3 {
            let id = format!("{}+lora.latency{k}", runner.meta.version);
            let (_, bytes) = runner.fresh_adapter(&id)?;
            let c = Candidate {
                adapter_id: id.clone(),
                base_version: runner.meta.version.clone(),
                step: k,
                sha256: nanobot_dataset::sha256_hex(&bytes),
                metrics: vec![
                    Metric {
                        name: "held_out_loss".into(),
                        value: 1.0,
                    },
                    Metric {
                        name: "held_out_loss_base".into(),
                        value: 1.0,
                    },
                ],
                adapter: Blob::new(bytes),
            };
            publisher.put(&c).await?;
            let t1 = Instant::now();
            while !seen.lock().unwrap().values().all(|a| *a == id) {
                if t1.elapsed() > Duration::from_secs(60) {
                    bail!("adapter {id} did not reach every robot");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Ok(ledger_latencies(&dir.join("promoter/ledger.jsonl")))
    }
    .await;
    child_kill(&mut fleet);
    result
}
