//! `nanobot launch`: every node of a launch file as a child process (`nanobot run`), their
//! logs prefixed with the node name, crashed nodes restarted per the file's restart policy.
//!
//! The children stay in the launcher's process group, so a terminal's Ctrl-C reaches all of
//! them at once. On SIGINT/SIGTERM/SIGHUP the launcher sends SIGTERM to every node, waits for
//! the grace period, then SIGKILLs what is left. If the launcher itself is killed (even with
//! SIGKILL), each node gets SIGTERM from the kernel (`PR_SET_PDEATHSIG`), so no orphan stays.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use nanobot_actors::launch::{self, RestartPolicy};
use nanobot_actors::registry;

static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    STOP_SIGNAL.store(sig, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

struct NodeProc {
    name: String,
    child: Option<Child>,
    failures: VecDeque<Instant>,
    restart_at: Option<Instant>,
    gave_up: bool,
    done: bool,
    /// The dashboard (`--dashboard`): restarted like a node, but the fleet's end is its end.
    dashboard: Option<String>,
}

fn say(msg: &str) {
    let mut out = std::io::stderr().lock();
    let _ = writeln!(out, "[launch] {msg}");
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (_, Some(s)) => format!("signal {s}"),
        _ => "unknown status".into(),
    }
}

/// The nanobot executable's path, resolved once at start: a binary upgraded in place while the
/// fleet runs (a package update, a rebuild) leaves `/proc/self/exe` pointing at a deleted file,
/// and a node restarted after that must still start (it then runs the new binary).
fn executable() -> anyhow::Result<&'static Path> {
    static EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(p) = EXE.get() {
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating the nanobot executable")?;
    Ok(EXE.get_or_init(|| exe))
}

fn spawn_node(file: &Path, p: &NodeProc) -> anyhow::Result<Child> {
    let name = &p.name;
    let exe = executable()?;
    let parent = std::process::id() as libc::pid_t;
    let mut cmd = Command::new(exe);
    match &p.dashboard {
        Some(listen) => cmd.args(["dashboard", "--listen", listen, "--launch"]).arg(file),
        None => cmd.args(["run", "--launch"]).arg(file).args(["--node", name]),
    };
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher may have died between fork and prctl.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("starting node {name}"))?;
    let prefix = format!("[{name}] ");
    if let Some(out) = child.stdout.take() {
        let p = prefix.clone();
        std::thread::spawn(move || pipe_lines(out, &p, false));
    }
    if let Some(err) = child.stderr.take() {
        std::thread::spawn(move || pipe_lines(err, &prefix, true));
    }
    say(&format!("node {name} started (pid {})", child.id()));
    Ok(child)
}

fn pipe_lines(r: impl std::io::Read, prefix: &str, to_stderr: bool) {
    for line in BufReader::new(r).lines() {
        let Ok(line) = line else { break };
        if to_stderr {
            let _ = writeln!(std::io::stderr().lock(), "{prefix}{line}");
        } else {
            let _ = writeln!(std::io::stdout().lock(), "{prefix}{line}");
        }
    }
}

fn signal_child(child: &Child, sig: libc::c_int) {
    // SAFETY: plain kill(2) on a pid we own and have not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// Decide what to do after node `p` exited with `status`.
fn on_exit(p: &mut NodeProc, status: ExitStatus, policy: &RestartPolicy) {
    let code = status.code();
    if code == Some(0) {
        say(&format!("node {} finished", p.name));
        p.done = true;
        return;
    }
    if code == Some(2) {
        say(&format!(
            "node {} refused its launch file or config ({}); not restarting",
            p.name,
            describe(status)
        ));
        p.gave_up = true;
        return;
    }
    let now = Instant::now();
    let window = Duration::from_secs_f64(policy.window_s);
    while p.failures.front().is_some_and(|t| now.duration_since(*t) > window) {
        p.failures.pop_front();
    }
    p.failures.push_back(now);
    let n = p.failures.len() as u32;
    if n > policy.max_restarts {
        say(&format!(
            "node {} exited ({}) {n} times within {}s; giving up (max_restarts = {})",
            p.name,
            describe(status),
            policy.window_s,
            policy.max_restarts
        ));
        p.gave_up = true;
        return;
    }
    let backoff = policy.backoff(n - 1);
    say(&format!(
        "node {} exited ({}); restarting in {} ms ({n}/{})",
        p.name,
        describe(status),
        backoff.as_millis(),
        policy.max_restarts
    ));
    p.restart_at = Some(now + backoff);
}

pub fn launch(file: &Path, only: &[String], grace_s: f64, dashboard: Option<&str>) -> anyhow::Result<u8> {
    // Resolved before anything can replace the binary.
    executable()?;
    let lf = match launch::load(file, &registry::names()) {
        Ok(lf) => lf,
        Err(e) => {
            eprintln!("nanobot: error: {e}");
            return Ok(2);
        }
    };
    for name in only {
        if lf.node(name).is_none() {
            eprintln!("nanobot: error: {}: no node named {name:?}", file.display());
            return Ok(2);
        }
    }
    crate::cmd::keys::prepare_security(&lf, only)?;
    if let Some(base) = &lf.base {
        make_base(base)?;
    }
    install_signal_handlers();
    let mut procs: Vec<NodeProc> = lf
        .nodes
        .iter()
        .filter(|n| only.is_empty() || only.contains(&n.name))
        .map(|n| NodeProc {
            name: n.name.clone(),
            child: None,
            failures: VecDeque::new(),
            restart_at: Some(Instant::now()),
            gave_up: false,
            done: false,
            dashboard: None,
        })
        .collect();
    if let Some(listen) = dashboard {
        procs.push(NodeProc {
            name: "dashboard".into(),
            child: None,
            failures: VecDeque::new(),
            // After the nodes, which it connects to.
            restart_at: Some(Instant::now() + Duration::from_millis(500)),
            gave_up: false,
            done: false,
            dashboard: Some(listen.to_string()),
        });
    }
    say(&format!(
        "fleet {:?} from {}: {} node(s), {} robot(s)",
        lf.fleet,
        file.display(),
        procs.len(),
        lf.robots.len()
    ));

    while STOP_SIGNAL.load(Ordering::SeqCst) == 0 {
        for p in procs.iter_mut() {
            if let Some(child) = p.child.as_mut() {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        p.child = None;
                        on_exit(p, status, &lf.restart);
                    }
                    Ok(None) => {}
                    Err(e) => say(&format!("node {}: cannot wait: {e}", p.name)),
                }
            }
            if p.child.is_none() && p.restart_at.is_some_and(|t| Instant::now() >= t) {
                p.restart_at = None;
                match spawn_node(file, p) {
                    Ok(c) => p.child = Some(c),
                    Err(e) => {
                        say(&format!("{e:#}"));
                        p.gave_up = true;
                    }
                }
            }
        }
        if procs
            .iter()
            .filter(|p| p.dashboard.is_none())
            .all(|p| p.done || p.gave_up)
        {
            for p in procs.iter_mut().filter(|p| p.dashboard.is_some()) {
                if let Some(mut c) = p.child.take() {
                    signal_child(&c, libc::SIGTERM);
                    let _ = c.wait();
                }
            }
            let failed = procs.iter().filter(|p| p.gave_up && p.dashboard.is_none()).count();
            say(&format!("all nodes ended ({failed} gave up)"));
            return Ok(if failed > 0 { 1 } else { 0 });
        }
        std::thread::sleep(Duration::from_millis(25));
    }

    let sig = STOP_SIGNAL.load(Ordering::SeqCst);
    say(&format!(
        "signal {sig}: stopping {} node(s)",
        procs.iter().filter(|p| p.child.is_some()).count()
    ));
    for p in &procs {
        if let Some(c) = &p.child {
            signal_child(c, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs_f64(grace_s);
    loop {
        let mut running = 0;
        for p in procs.iter_mut() {
            if let Some(c) = p.child.as_mut() {
                match c.try_wait() {
                    Ok(Some(status)) => {
                        say(&format!("node {} stopped ({})", p.name, describe(status)));
                        p.child = None;
                    }
                    _ => running += 1,
                }
            }
        }
        if running == 0 {
            break;
        }
        if Instant::now() >= deadline {
            for p in procs.iter_mut() {
                if let Some(mut c) = p.child.take() {
                    say(&format!("node {} did not stop within {grace_s}s: SIGKILL", p.name));
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(0)
}

/// The launch file's base checkpoint, made if it does not exist: the expert's demonstrations
/// recorded in the simulator (unless they are there), then `nanobot train` on them.
fn make_base(b: &nanobot_actors::launch::BaseSetup) -> anyhow::Result<()> {
    let checkpoint = Path::new(&b.checkpoint);
    if checkpoint.exists() {
        return Ok(());
    }
    say(&format!(
        "no base policy at {}: making one from the scripted expert's demonstrations ({} robots × {} episodes observing {}, {}, {} steps)",
        checkpoint.display(),
        b.robots,
        b.episodes,
        b.observe.name(),
        b.config,
        b.steps
    ));
    let demos = Path::new(&b.demos);
    let datasets: Vec<std::path::PathBuf> = if demos.join("r0").exists() {
        (0..b.robots).map(|i| demos.join(format!("r{i}"))).collect()
    } else {
        super::demos::record_demos(demos, b.robots, b.episodes, nanobot_sim::Shift::None, b.observe, 0)?
    };
    let mut args: Vec<String> = vec!["train".into()];
    for d in &datasets {
        args.push("--dataset".into());
        args.push(d.display().to_string());
    }
    for (k, v) in [
        ("--config", b.config.clone()),
        ("--steps", b.steps.to_string()),
        ("--shards", b.shards.to_string()),
        ("--out", b.checkpoint.clone()),
    ] {
        args.push(k.into());
        args.push(v);
    }
    #[derive(clap::Parser)]
    struct Train {
        #[command(flatten)]
        args: super::train::TrainArgs,
    }
    let train = <Train as clap::Parser>::try_parse_from(&args)?;
    super::train::train(train.args)?;
    say(&format!("base policy ready: {}", checkpoint.display()));
    Ok(())
}
