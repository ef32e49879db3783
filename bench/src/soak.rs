//! `nanobot bench soak`: the main job for a long time, with a fault every few minutes, in turn:
//! `kill -9` of the robots' node, a partition (the router frozen with SIGSTOP for 30 s: every
//! robot cut off from the training node while it keeps acting), `kill -9` of the training node,
//! `kill -9` of the router. The fleet is the main job's (`launch/sim.toml`'s four robots on the
//! base, the shift to the icy floor, replay, the LoRA trainer, the promoter) spread over nodes:
//! a router, the robots' node (the robots, ingest, their policies and spools) and the training
//! node (loggers, replay, trainer, promoter), under `nanobot launch`, which restarts what dies.
//!
//! Every minute it samples the fleet's resident memory and open files (every node process),
//! its disk use, and the robots' autonomous success (an episode the onboard expert finished is
//! a failure). At the end it stops the fleet, runs `verify` on every dataset, and checks that
//! every row is stored once, in the order produced, and that every row a logger acknowledged
//! is there.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nanobot_messages::{Event, EventKind, LogAck, StreamMark};

use crate::learning::{child_kill, client, free_port};

#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long the fleet runs.
    #[arg(long, default_value_t = 60.0)]
    pub minutes: f64,
    /// Minutes between faults.
    #[arg(long, default_value_t = 3.0)]
    pub fault_every: f64,
    /// The base checkpoint (`nanobot train` on `nanobot demos`).
    #[arg(long, default_value = "policy.safetensors")]
    pub checkpoint: PathBuf,
    /// The demonstrations the base was trained on (replay keeps training on them).
    #[arg(long, default_value = "data/demos")]
    pub demos: PathBuf,
    /// Seconds before the robots' floor turns to ice.
    #[arg(long, default_value_t = 60.0)]
    pub shift_after_s: f64,
    /// Scratch directory (default: a new one under the temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

const FAULTS: [&str; 4] = ["kill -9 robots", "partition 30 s", "kill -9 apu", "kill -9 router"];

fn launch_file(port: u16, work: &Path, checkpoint: &Path, shift_after_s: f64) -> String {
    let router = format!("tcp/127.0.0.1:{port}");
    let client = |name: &str| format!("[[node]]\nname = \"{name}\"\nmode = \"client\"\nconnect = [\"{router}\"]\n");
    let configs = std::env::current_dir().unwrap_or_default().join("configs");
    let (c, w, base) = (configs.display(), work.display(), checkpoint.display());
    format!(
        r#"fleet = "nb"
[zenoh]
multicast_scouting = false
[restart]
max_restarts = 20
window_s = 60
backoff_ms = 200
max_backoff_ms = 5000
[robots]
count = 4
[[node]]
name = "router"
mode = "router"
listen = ["{router}"]
{robots}
[[node.actor]]
type = "sim_robot"
for_each_robot = true
config = "{c}/sim_robot.toml"
set = {{ sim = {{ seed = "1{{index}}" }}, intervene_after_steps = 60, shift_after_s = {shift_after_s}, shift_to = "icy_floor" }}
[[node.actor]]
type = "ingest"
for_each_robot = true
config = "{c}/ingest.toml"
[[node.actor]]
type = "policy"
for_each_robot = true
config = "{c}/policy_actor.toml"
set = {{ checkpoint = "{base}", trusted_key = "{w}/state/keys/fleet.pub" }}
[[node.actor]]
type = "spool"
for_each_robot = true
config = "{c}/spool.toml"
set = {{ dir = "{w}/state/spool/{{robot}}" }}
{apu}
[[node.actor]]
type = "logger"
for_each_robot = true
config = "{c}/logger.toml"
set = {{ source = "spool", root = "{w}/data/nb/{{robot}}" }}
[[node.actor]]
type = "replay"
config = "{c}/replay.toml"
set = {{ datasets = ["{w}/data/demos", "{w}/data/nb"], weights = {{ pre_intervention_steps = 60 }} }}
[[node.actor]]
type = "trainer"
config = "{c}/trainer.toml"
set = {{ base = "{base}", state_dir = "{w}/state/trainer", lr = 1e-3, candidate_every = 200, candidate_every_s = 30.0 }}
[[node.actor]]
type = "promoter"
config = "{c}/promoter.toml"
set = {{ base = "{base}", state_dir = "{w}/state/promoter", keys = "{w}/state/keys", gates = {{ shadow = {{ sim = {{ episode_steps = 60 }} }} }} }}
"#,
        robots = client("robots"),
        apu = client("apu"),
    )
}

/// Resident memory (bytes) and open files of a process.
fn proc_usage(pid: i32) -> (u64, u64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    (rss, fds)
}

fn disk_use(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

#[derive(Default)]
struct Seen {
    /// (end time s, autonomous success) of every episode.
    episodes: Vec<(f64, bool)>,
    intervening: HashMap<String, bool>,
    /// Every mark a logger acknowledged, per robot.
    acked: BTreeMap<String, HashSet<StreamMark>>,
}

pub fn run(rt: &tokio::runtime::Runtime, a: SoakArgs) -> anyhow::Result<u8> {
    let exe = std::env::current_exe()?;
    if !Path::new("configs/spool.toml").exists() {
        bail!("run from the repository root: configs/ is missing");
    }
    let checkpoint = std::fs::canonicalize(&a.checkpoint).with_context(|| a.checkpoint.display().to_string())?;
    let demos = std::fs::canonicalize(&a.demos).with_context(|| a.demos.display().to_string())?;
    let work = a
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("nb-bench-soak-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("data"))?;
    std::os::unix::fs::symlink(&demos, work.join("data/demos"))?;
    let keys = Command::new(&exe)
        .args(["keys", "init"])
        .arg(work.join("state/keys"))
        .output()?;
    if !keys.status.success() {
        bail!("keys init: {}", String::from_utf8_lossy(&keys.stderr));
    }
    let port = free_port();
    let file = work.join("soak.toml");
    std::fs::write(&file, launch_file(port, &work, &checkpoint, a.shift_after_s))?;
    println!(
        "bench soak: {} min, a fault every {} min ({}), fleet in {}",
        a.minutes,
        a.fault_every,
        FAULTS.join(", "),
        work.display()
    );
    let mut fleet = Command::new(&exe)
        .arg("launch")
        .arg(&file)
        .env("RUST_LOG", "info,zenoh=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    // The launcher's lines: each node's pid as it starts; everything goes to fleet.log too.
    let pids: Arc<Mutex<HashMap<String, i32>>> = Arc::default();
    let stderr = fleet.stderr.take().expect("piped");
    let (p, log_path) = (pids.clone(), work.join("fleet.log"));
    std::thread::spawn(move || {
        let mut log = std::fs::File::create(log_path).ok();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("[launch] node ").nth(1) {
                if let Some((name, pid)) = rest.strip_suffix(')').and_then(|r| r.split_once(" started (pid ")) {
                    if let Ok(pid) = pid.parse() {
                        p.lock().unwrap().insert(name.to_string(), pid);
                    }
                }
            }
            if let Some(f) = log.as_mut() {
                let _ = std::io::Write::write_all(f, format!("{line}\n").as_bytes());
            }
        }
    });
    let result = rt.block_on(soak(&a, port, &work, &pids));
    child_kill(&mut fleet);
    let seen = result?;
    check(&work, &seen)
}

async fn soak(
    a: &SoakArgs,
    port: u16,
    work: &Path,
    pids: &Arc<Mutex<HashMap<String, i32>>>,
) -> anyhow::Result<Arc<Mutex<Seen>>> {
    let bus = client(port, None).await?;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let t0 = Instant::now();
    let s = seen.clone();
    let _events = bus
        .subscribe_callback::<Event>("nb/*/event", move |r| {
            let mut s = s.lock().unwrap();
            let robot = r.header.robot.clone();
            match r.msg.event {
                EventKind::Intervention { active: true, .. } => {
                    s.intervening.insert(robot, true);
                }
                EventKind::EpisodeEnd { success, .. } => {
                    let helped = s.intervening.insert(robot, false).unwrap_or(false);
                    s.episodes.push((t0.elapsed().as_secs_f64(), success && !helped));
                }
                _ => {}
            }
        })
        .await?;
    let s = seen.clone();
    let _acks = bus
        .subscribe_callback::<LogAck>("nb/log/*/ack", move |r| {
            if let Some(m) = r.msg.last {
                s.lock()
                    .unwrap()
                    .acked
                    .entry(r.header.robot.clone())
                    .or_default()
                    .insert(m);
            }
        })
        .await?;
    println!(
        "{:>6} {:>9} {:>6} {:>9} {:>9} {:>10}  fault",
        "minute", "RSS MB", "fds", "disk MB", "episodes", "success"
    );
    let minutes = a.minutes.ceil() as usize;
    let mut next_fault = 0;
    let mut samples = Vec::new();
    for minute in 1..=minutes {
        let mut fault = String::new();
        let due = a.fault_every > 0.0 && (minute as f64 - 0.5) >= a.fault_every * (next_fault + 1) as f64;
        // Faults land mid-minute, so each minute's sample shows the one before it settled.
        tokio::time::sleep(Duration::from_secs(30)).await;
        if due && minute < minutes {
            let which = FAULTS[next_fault % FAULTS.len()];
            next_fault += 1;
            fault = which.to_string();
            let pid = |name: &str| pids.lock().unwrap().get(name).copied();
            match which {
                "partition 30 s" => {
                    if let Some(p) = pid("router") {
                        unsafe { libc::kill(p, libc::SIGSTOP) };
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        unsafe { libc::kill(p, libc::SIGCONT) };
                    }
                }
                kill => {
                    let node = kill.trim_start_matches("kill -9 ");
                    if let Some(p) = pid(node) {
                        unsafe { libc::kill(p, libc::SIGKILL) };
                    }
                }
            }
        }
        let elapsed = t0.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs_f64((minute as f64 * 60.0 - elapsed).max(0.0))).await;
        let (mut rss, mut fds) = (0, 0);
        for pid in pids.lock().unwrap().values() {
            let (r, f) = proc_usage(*pid);
            rss += r;
            fds += f;
        }
        let disk = disk_use(&work.join("data/nb")) + disk_use(&work.join("state"));
        let (n, ok) = {
            let s = seen.lock().unwrap();
            let from = (minute - 1) as f64 * 60.0;
            let this: Vec<bool> = s
                .episodes
                .iter()
                .filter(|(t, _)| *t >= from && *t < from + 60.0)
                .map(|(_, ok)| *ok)
                .collect();
            (this.len(), this.iter().filter(|ok| **ok).count())
        };
        let success = if n > 0 { 100.0 * ok as f64 / n as f64 } else { f64::NAN };
        println!(
            "{minute:>6} {:>9.0} {fds:>6} {:>9.1} {n:>9} {:>9.0} %  {fault}",
            rss as f64 / 1e6,
            disk as f64 / 1e6,
            success
        );
        samples.push((rss, fds, disk, success));
    }
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        println!(
            "first → last minute: RSS {:.0} → {:.0} MB, open files {} → {}, disk {:.1} → {:.1} MB, success {:.0} % → {:.0} %",
            first.0 as f64 / 1e6,
            last.0 as f64 / 1e6,
            first.1,
            last.1,
            first.2 as f64 / 1e6,
            last.2 as f64 / 1e6,
            first.3,
            last.3
        );
    }
    // Let the spools drain before the fleet stops.
    tokio::time::sleep(Duration::from_secs(10)).await;
    Ok(seen)
}

/// After the fleet stopped: every dataset verifies, every row is stored once and in order, and
/// every acknowledged row is there.
fn check(work: &Path, seen: &Arc<Mutex<Seen>>) -> anyhow::Result<u8> {
    let mut failed = false;
    let seen = seen.lock().unwrap();
    for r in 0..4 {
        let robot = format!("r{r}");
        let root = work.join("data/nb").join(&robot);
        let report = nanobot_dataset::verify(&root)?;
        let (_, rows) = nanobot_dataset::read_dataset(&root)?;
        let marks: Vec<StreamMark> = rows
            .iter()
            .map(|r| StreamMark {
                seq: r.seq,
                stamp_ns: r.stamp_ns,
            })
            .collect();
        let unique: HashSet<StreamMark> = marks.iter().copied().collect();
        let in_order = marks.windows(2).all(|w| w[0].stamp_ns < w[1].stamp_ns);
        let acked = seen.acked.get(&robot).cloned().unwrap_or_default();
        let lost = acked.iter().filter(|m| !unique.contains(m)).count();
        let dup = marks.len() - unique.len();
        let ok = report.ok() && in_order && lost == 0 && dup == 0;
        failed |= !ok;
        println!(
            "{robot}: {} rows in {} files, verify {}, {dup} stored twice, {}, {lost} of {} acknowledged rows missing",
            marks.len(),
            report.files_checked,
            if report.ok() { "clean" } else { "FAILED" },
            if in_order { "in order" } else { "OUT OF ORDER" },
            acked.len()
        );
    }
    Ok(if failed { 1 } else { 0 })
}
