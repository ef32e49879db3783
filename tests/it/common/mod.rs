//! Helpers for end-to-end tests: real `nanobot` processes on loopback, unique ports, no
//! multicast scouting, so tests run in parallel.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

pub fn nanobot() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nanobot"));
    c.env("RUST_LOG", "info,zenoh=warn").env_remove("NANOBOT_CONNECT");
    c
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A TCP port nobody listens on right now, never handed out before in this test process.
pub fn free_port() -> u16 {
    nanobot_actors::bus::free_loopback_port().expect("a free loopback port")
}

/// A path inside a fresh directory under the system temp dir. Dropping it removes the
/// directory, unless the test is failing (then it stays, for a look at what the fleet wrote).
pub struct TempPath {
    path: PathBuf,
    root: PathBuf,
}

impl TempPath {
    /// The path, with the directory kept until this test process exits (for a fixture that
    /// many tests share).
    pub fn until_exit(mut self) -> PathBuf {
        static DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
        extern "C" fn remove_all() {
            if let Ok(dirs) = DIRS.lock() {
                for d in dirs.iter() {
                    let _ = std::fs::remove_dir_all(d);
                }
            }
        }
        let mut dirs = DIRS.lock().unwrap();
        if dirs.is_empty() {
            // SAFETY: registers a plain function with no arguments; it runs once, at exit.
            unsafe { libc::atexit(remove_all) };
        }
        // The directory is the exit hook's now, not this guard's.
        dirs.push(std::mem::take(&mut self.root));
        std::mem::take(&mut self.path)
    }
}

impl std::ops::Deref for TempPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for TempPath {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<std::ffi::OsStr> for TempPath {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.path.as_os_str()
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.root.as_os_str().is_empty() {
            return; // handed to the exit hook
        }
        if std::thread::panicking() {
            eprintln!("kept for a look: {}", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// A fresh directory under the system temp dir, removed when the returned guard drops.
pub fn temp_dir(tag: &str) -> TempPath {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "nanobot-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempPath {
        path: d.clone(),
        root: d,
    }
}

/// A launch file written into its own temp dir (relative config paths resolve to the repo's
/// configs); dropping it removes the directory.
pub fn write_launch(tag: &str, text: &str) -> TempPath {
    let mut launch = temp_dir(tag);
    launch.path = launch.root.join(format!("{tag}.toml"));
    std::fs::write(
        &launch.path,
        text.replace("@CONFIGS@", &repo().join("configs").display().to_string()),
    )
    .unwrap();
    launch
}

/// A launch file for one node listening on `port` with one simulated robot `r0` driven by the
/// scripted expert at 20 Hz, its telemetry through ingest: a small live fleet for the tools.
pub fn one_robot_fleet(tag: &str, port: u16) -> TempPath {
    one_robot_fleet_with(tag, port, "")
}

/// [`one_robot_fleet`] with `robot_set` (a launch file's `set = ...` line, or "") for its
/// simulated robot.
pub fn one_robot_fleet_with(tag: &str, port: u16, robot_set: &str) -> TempPath {
    write_launch(
        tag,
        &format!(
            r#"
[robots]
ids = ["r0"]
[[node]]
name = "sim"
listen = ["tcp/127.0.0.1:{port}"]
[[node.actor]]
type = "sim_robot"
for_each_robot = true
config = "@CONFIGS@/sim_robot.toml"
{robot_set}
[[node.actor]]
type = "expert"
for_each_robot = true
config = "@CONFIGS@/expert.toml"
[[node.actor]]
type = "ingest"
for_each_robot = true
config = "@CONFIGS@/ingest.toml"
"#
        ),
    )
}

/// A running `nanobot launch` (or `nanobot run`); stderr lines arrive on `lines`.
pub struct Proc {
    pub child: Child,
    pub lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nanobot starts");
        let (tx, rx) = channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    pub fn launch(file: &Path, envs: &[(&str, String)]) -> Proc {
        let mut cmd = nanobot();
        cmd.arg("launch").arg(file).args(["--grace", "5"]);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Proc::spawn(cmd)
    }

    /// Wait for a stderr line containing `needle`; returns it.
    pub fn expect_line(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {needle:?} within {within:?}; saw:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Every line seen so far and every line still to come until the output closes (after the
    /// process exited), waiting at most `within` for them.
    pub fn all_lines(&mut self, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => self.seen.push(line),
                Err(_) => return self.seen.join("\n"),
            }
        }
    }

    /// Wait until `n` actors reported that they started.
    pub fn expect_actors(&mut self, n: usize, within: Duration) {
        for _ in 0..n {
            self.expect_line("actor started", within);
        }
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Wait for exit; panics after `within`.
    pub fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                panic!("process did not exit within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(8);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The pid in a launcher line like `[launch] node sim started (pid 1234)`.
pub fn pid_in(line: &str) -> i32 {
    line.rsplit("pid ")
        .next()
        .unwrap()
        .trim_end_matches(')')
        .parse()
        .unwrap()
}

/// Whether a process with this pid exists (a zombie counts as gone).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

pub fn wait_gone(pid: i32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    !alive(pid)
}

/// Run a tool to completion.
pub fn tool(args: &[&str]) -> Output {
    nanobot().args(args).output().expect("nanobot runs")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A tokio runtime for a test's own Zenoh session.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A Zenoh client of the node listening on `port` (sees the whole fleet through it). A node
/// whose process has started may not listen yet: it tries again for up to 30 s.
pub async fn client(port: u16) -> nanobot_actors::bus::Bus {
    use nanobot_actors::bus::{Bus, BusConfig, Mode};
    let cfg = BusConfig {
        mode: Mode::Client,
        connect: vec![format!("tcp/127.0.0.1:{port}")],
        ..BusConfig::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Bus::open(&cfg, "nb").await {
            Ok(bus) => return bus,
            Err(e) if Instant::now() < deadline => {
                eprintln!("client of port {port}: {e}; trying again");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("no node listens on port {port} after 30 s: {e}"),
        }
    }
}

pub fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two short episodes of the scripted expert reaching its target.
pub fn demo_dataset(root: &Path) {
    let mut w = nanobot_dataset::DatasetWriter::open(
        root,
        nanobot_dataset::DatasetSpec::sim(20.0, 64, 8),
        nanobot_dataset::WriterConfig::default(),
    )
    .unwrap();
    let mut sim = nanobot_sim::SimRobot::new(nanobot_sim::SimConfig {
        episode_steps: 40,
        ..nanobot_sim::SimConfig::default()
    })
    .unwrap();
    let mut seq = 0;
    for _ in 0..2 {
        loop {
            let a = sim.expert_action();
            let frame = nanobot_dataset::Frame {
                seq,
                stamp_ns: seq * 50_000_000,
                source_episode: sim.episode(),
                task: 0,
                image: Some(sim.render_jpeg(90).into()),
                state: sim.state().to_vec(),
                action: a.to_vec(),
                surface: sim.surface(),
            };
            w.push(frame).unwrap();
            seq += 1;
            if sim.step(a).is_some() {
                sim.reset();
                break;
            }
        }
    }
    w.finish_file().unwrap();
}

/// A tiny base (`version` "tiny-base") trained for one step on two demonstration episodes at
/// `dir/demos`.
pub fn tiny_base(dir: &Path) -> PathBuf {
    let data = dir.join("demos/r0");
    demo_dataset(&data);
    let base = dir.join("base.safetensors");
    let config = repo().join("configs/policy/tiny.toml");
    let out = nanobot()
        .args(["train", "--dataset"])
        .arg(&data)
        .arg("--config")
        .arg(&config)
        .args(["--steps", "1", "--version", "tiny-base", "--out"])
        .arg(&base)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    base
}

/// The README's path in small: `nanobot demos` (2 robots × 40 expert episodes, worlds 0 and 1)
/// and the tiny policy trained on them for 2000 steps. Returns (checkpoint, demos directory).
pub fn tiny_policy(dir: &Path) -> (PathBuf, PathBuf) {
    demos_and_policy(dir, "tiny", "40", "state")
}

/// `nanobot demos` (2 robots × `episodes` expert episodes, worlds 0 and 1, observing `observe`)
/// into `dir/demos`, and `configs/policy/{config}.toml` trained on them for 2000 steps into
/// `dir/{config}.safetensors` (version `{config}-demos`). Returns (checkpoint, demos directory).
pub fn demos_and_policy(dir: &Path, config: &str, episodes: &str, observe: &str) -> (PathBuf, PathBuf) {
    let demos = dir.join("demos");
    let ckpt = dir.join(format!("{config}.safetensors"));
    let config_file = repo().join(format!("configs/policy/{config}.toml"));
    let run = |args: &[&str]| {
        let out = nanobot().args(args).output().unwrap();
        assert!(out.status.success(), "nanobot {args:?}:\n{}", text(&out.stderr));
    };
    let d = demos.to_str().unwrap();
    run(&[
        "demos",
        "--out",
        d,
        "--robots",
        "2",
        "--episodes",
        episodes,
        "--observe",
        observe,
    ]);
    run(&[
        "train",
        "--dataset",
        demos.join("r0").to_str().unwrap(),
        "--dataset",
        demos.join("r1").to_str().unwrap(),
        "--config",
        config_file.to_str().unwrap(),
        "--steps",
        "2000",
        "--lr",
        "3e-3",
        "--warmup",
        "50",
        "--version",
        &format!("{config}-demos"),
        "--out",
        ckpt.to_str().unwrap(),
    ]);
    (ckpt, demos)
}

/// One [`tiny_policy`] for every test of this binary that drives robots with a trained policy
/// (trained once, by whichever test comes first; the others wait for it).
pub fn shared_tiny_policy() -> (PathBuf, PathBuf) {
    static POLICY: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
    POLICY
        .get_or_init(|| tiny_policy(&temp_dir("tiny-policy").until_exit()))
        .clone()
}

/// `nanobot eval` of a checkpoint (and adapter) under `shift` on worlds 100 and 101, 10 episodes
/// each: success in percent.
pub fn eval_success(ckpt: &Path, adapter: Option<&Path>, shift: &str, episode_steps: Option<u32>) -> f64 {
    eval_success_on(ckpt, adapter, shift, episode_steps, "100,101", 10)
}

/// [`eval_success`] on other worlds (`seeds`, comma-separated) and episode counts.
pub fn eval_success_on(
    ckpt: &Path,
    adapter: Option<&Path>,
    shift: &str,
    episode_steps: Option<u32>,
    seeds: &str,
    episodes: u32,
) -> f64 {
    let mut cmd = nanobot();
    cmd.arg("eval").arg("--checkpoint").arg(ckpt);
    if let Some(a) = adapter {
        cmd.arg("--adapter").arg(a);
    }
    if let Some(n) = episode_steps {
        cmd.args(["--episode-steps", &n.to_string()]);
    }
    let out = cmd
        .args(["--seeds", seeds, "--episodes", &episodes.to_string(), "--shift", shift])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with(shift))
        .unwrap_or_else(|| panic!("no row for {shift}: {stdout}"));
    eprintln!(
        "eval {}: {line}",
        adapter.map(|a| a.display().to_string()).unwrap_or_default()
    );
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A minimal HTTP/1.1 exchange: (status, content type, body).
pub fn http(port: u16, method: &str, path: &str, ctype: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    http_with(port, method, path, &[("Content-Type", ctype)], body)
}

pub fn http_with(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, ctype, raw[split + 4..].to_vec())
}

/// A launch file: `robots`, one node listening on `port`, each robot's sim_robot, ingest and
/// policy (trusting `key`, on `base`), and `extra` actors.
pub fn policy_fleet(robots: &str, port: u16, key: &Path, base: &Path, extra: &str) -> String {
    format!(
        r#"
[robots]
ids = [{robots}]
[[node]]
name = "fleet"
listen = ["tcp/127.0.0.1:{port}"]
[[node.actor]]
type = "sim_robot"
for_each_robot = true
config = "@CONFIGS@/sim_robot.toml"
set = {{ intervene_after_ms = 0, sim = {{ episode_steps = 60 }} }}
[[node.actor]]
type = "ingest"
for_each_robot = true
config = "@CONFIGS@/ingest.toml"
[[node.actor]]
type = "policy"
for_each_robot = true
config = "@CONFIGS@/policy_actor.toml"
set = {{ checkpoint = "{base}", trusted_key = "{key}" }}
{extra}
"#,
        base = base.display(),
        key = key.display(),
    )
}
pub mod netns;

/// Each actor's newest Stats, as a test's session hears them on `nb/node/*/*`: its metrics, and
/// `handled`, `errors`, `dropped` and `restarts` beside them.
#[derive(Clone, Default)]
pub struct StatsBoard(
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, std::collections::HashMap<String, f64>>>>,
);

impl StatsBoard {
    /// Follow the fleet's Stats on `bus`; keep the returned subscription alive.
    pub fn follow(
        rt: &tokio::runtime::Runtime,
        bus: &nanobot_actors::bus::Bus,
    ) -> (StatsBoard, nanobot_actors::bus::Callback) {
        let board = StatsBoard::default();
        let b = board.0.clone();
        let sub = rt
            .block_on(
                bus.subscribe_callback::<nanobot_messages::Stats>("nb/node/*/*", move |r| {
                    let s = r.msg;
                    let mut values: std::collections::HashMap<String, f64> =
                        s.extra.iter().map(|x| (x.name.clone(), x.value)).collect();
                    for (k, v) in [("handled", s.handled), ("errors", s.errors), ("dropped", s.dropped)] {
                        values.insert(k.into(), v as f64);
                    }
                    values.insert("restarts".into(), s.restarts as f64);
                    b.lock().unwrap().insert(s.actor, values);
                }),
            )
            .unwrap();
        (board, sub)
    }

    /// An actor's newest value of `name` (0 before it reported one).
    pub fn get(&self, actor: &str, name: &str) -> f64 {
        self.0
            .lock()
            .unwrap()
            .get(actor)
            .and_then(|a| a.get(name))
            .copied()
            .unwrap_or(0.0)
    }
}
