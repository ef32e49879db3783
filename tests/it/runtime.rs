//! The node runtime and the README's claims about it, on real processes and real Zenoh
//! sessions: restart windows at run time, `launch --grace`, the onboard expert's takeover and
//! hand-back, the shipped launch files, `topic list/hz/bw` on live data, per-input queueing as
//! configuration, and the smallest actor.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nanobot_actors::bus::PubQos;
use nanobot_messages::{ActionChunk, ActionSource, Event, EventKind, RawFrame, Stats};

#[test]
fn failures_further_apart_than_the_window_never_exhaust_the_restart_policy() {
    let port = free_port();
    // One failure allowed per 0.2 s window; the robot fails 0.4 s after every start.
    let file = write_launch(
        "window",
        &format!(
            r#"
[restart]
max_restarts = 1
window_s = 0.2
backoff_ms = 20
[robots]
count = 1
[[node]]
name = "n"
listen = ["tcp/127.0.0.1:{port}"]
[[node.actor]]
type = "sim_robot"
for_each_robot = true
set = {{ sim = {{ rate_hz = 100.0 }}, fault = {{ panic_at_tick = 40 }} }}
"#
        ),
    );
    let mut cmd = nanobot();
    cmd.args(["run", "--launch"]).arg(&file).args(["--node", "n"]);
    let mut node = Proc::spawn(cmd);
    for _ in 0..4 {
        node.expect_line("actor restarted", Duration::from_secs(20));
    }
    assert!(
        !node.seen.iter().any(|l| l.contains("giving up")),
        "{}",
        node.seen.join("\n")
    );
    node.signal(libc::SIGTERM);
    assert!(node.wait(Duration::from_secs(20)).success());
}

#[test]
fn launch_escalates_to_sigkill_after_the_grace_period() {
    let port = free_port();
    let file = write_launch(
        "grace",
        &format!(
            r#"
[robots]
count = 1
[[node]]
name = "stuck"
listen = ["tcp/127.0.0.1:{port}"]
[[node.actor]]
type = "sim_robot"
for_each_robot = true
set = {{ fault = {{ slow_stop_ms = 60000 }} }}
"#
        ),
    );
    let mut cmd = nanobot();
    cmd.arg("launch").arg(&file).args(["--grace", "0.5"]);
    let mut fleet = Proc::spawn(cmd);
    let pid = pid_in(&fleet.expect_line("node stuck started", Duration::from_secs(20)));
    fleet.expect_line("actor started", Duration::from_secs(20));
    fleet.signal(libc::SIGTERM);
    fleet.expect_line("slow stop", Duration::from_secs(10));
    let line = fleet.expect_line("SIGKILL", Duration::from_secs(10));
    assert!(line.contains("did not stop within 0.5s"), "{line}");
    fleet.wait(Duration::from_secs(10));
    assert!(
        wait_gone(pid, Duration::from_secs(5)),
        "node {pid} survived the SIGKILL"
    );
}

#[test]
fn the_onboard_expert_takes_over_in_silence_and_hands_back_when_actions_resume() {
    let port = free_port();
    let file = write_launch(
        "takeover",
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
set = {{ intervene_after_ms = 300 }}
"#
        ),
    );
    let mut fleet = Proc::launch(&file, &[]);
    fleet.expect_actors(1, Duration::from_secs(30));
    let rt = runtime();
    let bus = rt.block_on(client(port));
    let events = Arc::new(Mutex::new(Vec::<(Instant, EventKind)>::new()));
    let e = events.clone();
    let _ev = rt
        .block_on(bus.subscribe_callback::<Event>("nb/r0/event", move |r| {
            e.lock().unwrap().push((Instant::now(), r.msg.event))
        }))
        .unwrap();
    let last_state = Arc::new(Mutex::new(0u64));
    let ls = last_state.clone();
    let _st = rt
        .block_on(bus.subscribe_callback::<RawFrame>("nb/r0/raw/state", move |r| *ls.lock().unwrap() = r.header.seq))
        .unwrap();
    let takeovers = |active: bool| {
        events
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| matches!(e, EventKind::Intervention { active: a, .. } if *a == active))
            .count()
    };
    // Nothing drives the robot: after 300 ms of silence the onboard expert takes over.
    wait_until("a takeover", Duration::from_secs(10), || takeovers(true) >= 1);
    assert_eq!(takeovers(false), 0);
    // A controller appears: chunks for the robot's newest state, every 100 ms.
    let act = rt
        .block_on(bus.publisher::<ActionChunk>("nb/r0/act", "r0", PubQos::Control))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while takeovers(false) == 0 && Instant::now() < deadline {
        let chunk = ActionChunk {
            obs_seq: *last_state.lock().unwrap(),
            dt_ns: 50_000_000,
            horizon: 16,
            action_dim: 2,
            actions: vec![0.1; 32],
            source: ActionSource::Operator,
            policy_version: "test".into(),
            adapter_version: String::new(),
        };
        rt.block_on(act.put(&chunk)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(takeovers(false), 1, "handed back once actions resumed");
    let handback = events
        .lock()
        .unwrap()
        .iter()
        .find_map(|(_, e)| match e {
            EventKind::Intervention { active: false, reason } => Some(reason.clone()),
            _ => None,
        })
        .unwrap();
    assert!(handback.contains("actions resumed"), "{handback}");
    // Silence again: a second takeover.
    wait_until("a second takeover", Duration::from_secs(10), || takeovers(true) >= 2);
}

#[test]
fn every_shipped_launch_file_parses_and_the_main_one_runs() {
    for entry in std::fs::read_dir(repo().join("launch")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let lf = nanobot_actors::launch::load(&path, &nanobot_actors::registry::names())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!lf.nodes.is_empty(), "{}", path.display());
        }
    }
    // The README's first command, in a scratch working directory (its data/ and state/ go
    // there), on a tiny base (the launch file makes a `small` one only when none exists).
    let work = temp_dir("main-job");
    let base = tiny_base(&work);
    let port = free_port();
    let mut cmd = nanobot();
    cmd.current_dir(&work)
        .arg("launch")
        .arg(repo().join("launch/sim.toml"))
        .env("NB_PORT", port.to_string())
        .env("NB_CHECKPOINT", &base);
    let mut fleet = Proc::spawn(cmd);
    // Four robots × (sim_robot, ingest, spool, logger, policy), replay, trainer, promoter.
    fleet.expect_actors(23, Duration::from_secs(60));
    let acks = nanobot()
        .args([
            "topic",
            "echo",
            "nb/log/r3/ack",
            "--count",
            "1",
            "--timeout",
            "20",
            "--connect",
        ])
        .arg(format!("tls/127.0.0.1:{port}"))
        .current_dir(&work)
        .output()
        .unwrap();
    // Secured from the first start: the tool found engineer.dev's certificate in state/.
    assert!(acks.status.success(), "{}", text(&acks.stderr));
    for made in ["the fleet CA", "node.sim", "operator.dev", "engineer.dev"] {
        assert!(
            fleet
                .seen
                .iter()
                .any(|l| l.contains("made TLS certificates") && l.contains(made)),
            "{made}"
        );
    }
    // Anyone without a certificate gets nothing: plain TCP finds no listener, and TLS without
    // a client certificate no session (a Python eclipse-zenoh client, as any tool would be).
    // The README's Python client, as written there, reads r0's observations with the
    // certificate the main job made.
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let snippet = readme
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the README has a Python snippet")
        .replace("127.0.0.1:7447", &format!("127.0.0.1:{port}"));
    let mut py = std::process::Command::new("python3")
        .args(["-c", &snippet])
        .current_dir(&work)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = py.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(20));
    let _ = py.kill();
    let out = py.wait_with_output().unwrap();
    let line = line.unwrap_or_else(|_| panic!("the README's Python client printed nothing: {}", text(&out.stderr)));
    assert!(line.starts_with("r0 kind 2 seq "), "{line}");
    let ca = work.join("state/nb/keys/tls/ca.pem");
    for endpoint in [format!("tcp/127.0.0.1:{port}"), format!("tls/127.0.0.1:{port}")] {
        let got = crate::secured::python_client(&[&endpoint, ca.to_str().unwrap()]);
        assert_eq!(got["session"], false, "{endpoint} without a certificate: {got}");
    }
    fleet.signal(libc::SIGTERM);
    assert!(fleet.wait(Duration::from_secs(30)).success());
    let out = nanobot().arg("verify").arg(work.join("data/nb")).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert_eq!(
        text(&out.stdout).lines().filter(|l| l.contains(": ok")).count(),
        4,
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn topic_list_hz_and_bw_report_live_topics() {
    let port = free_port();
    let file = write_launch(
        "topic-tools",
        &format!(
            r#"
[robots]
count = 1
[[node]]
name = "sim"
listen = ["tcp/127.0.0.1:{port}"]
[[node.actor]]
type = "sim_robot"
for_each_robot = true
config = "@CONFIGS@/sim_robot.toml"
"#
        ),
    );
    let mut fleet = Proc::launch(&file, &[]);
    fleet.expect_actors(1, Duration::from_secs(30));
    let ep = format!("tcp/127.0.0.1:{port}");
    let run = |args: &[&str]| {
        let out = nanobot().args(args).args(["--connect", &ep]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let list = run(&["topic", "list", "nb/r0/**", "--duration", "2"]);
    for key in ["nb/r0/raw/camera", "nb/r0/raw/state", "nb/r0/event"] {
        assert!(list.contains(key), "{key} listed: {list}");
    }
    assert!(list.contains("RawFrame"), "{list}");
    // The simulated robot ticks at 20 Hz.
    let hz = run(&["topic", "hz", "nb/r0/raw/state", "--duration", "3"]);
    let rate = number_after(&hz, "nb/r0/raw/state").unwrap_or_else(|| panic!("{hz}"));
    assert!((12.0..=28.0).contains(&rate), "about 20 Hz: {hz}");
    // `bw` against the test's own count of the camera's bytes over the same seconds.
    let rt = runtime();
    let bus = rt.block_on(client(port));
    let sizes = Arc::new(Mutex::new(Vec::<usize>::new()));
    let seen = sizes.clone();
    let _sub = rt
        .block_on(async {
            bus.session()
                .declare_subscriber("nb/r0/raw/camera")
                .callback(move |s| seen.lock().unwrap().push(s.payload().len()))
                .await
        })
        .unwrap();
    let bw = run(&["topic", "bw", "nb/r0/raw/camera", "--duration", "3"]);
    let sizes = sizes.lock().unwrap().clone();
    assert!(!sizes.is_empty(), "the camera published nothing");
    let mean_kb = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64 / 1e3;
    let line = bw
        .lines()
        .rev()
        .find(|l| l.contains("nb/r0/raw/camera"))
        .unwrap_or_else(|| panic!("{bw}"));
    // "KEY: R KB/s mean M KB min A KB max B KB n N"
    let nums: Vec<f64> = line
        .split_once(": ")
        .unwrap_or_else(|| panic!("{line}"))
        .1
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [rate_kbs, mean, min, max, n] = nums[..] else {
        panic!("five figures: {line}")
    };
    assert!((40.0..=80.0).contains(&n), "about 20 frames/s for 3 s: {line}");
    assert!(
        (mean - mean_kb).abs() <= 0.1 * mean_kb + 0.1,
        "mean size {mean_kb:.2} KB as counted: {line}"
    );
    assert!(min <= mean && mean <= max && min > 0.0, "{line}");
    let expected = mean_kb * 20.0;
    assert!(
        (0.7 * expected..=1.3 * expected).contains(&rate_kbs),
        "about {expected:.1} KB/s: {line}"
    );
}

/// The first number on the last line that mentions `key`.
fn number_after(out: &str, key: &str) -> Option<f64> {
    let line = out.lines().rev().find(|l| l.contains(key))?;
    line.split(key)
        .nth(1)?
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .find(|s| !s.is_empty())?
        .parse()
        .ok()
}

#[test]
fn inputs_are_configured_per_actor_and_stats_echo_reports_the_fleet() {
    let port = free_port();
    let file = write_launch(
        "inputs",
        &format!(
            r#"
[robots]
count = 1
[[node]]
name = "sim"
listen = ["tcp/127.0.0.1:{port}"]
[[node.actor]]
type = "sim_robot"
for_each_robot = true
config = "@CONFIGS@/sim_robot.toml"
set = {{ inputs = {{ act = {{ keep = "all", queue = 8 }} }} }}
[[node.actor]]
type = "stats_echo"
set = {{ period_s = 0.5 }}
"#
        ),
    );
    let mut fleet = Proc::launch(&file, &[]);
    fleet.expect_actors(2, Duration::from_secs(30));
    let rt = runtime();
    let bus = rt.block_on(client(port));
    let stats = Arc::new(Mutex::new(Vec::<Stats>::new()));
    let s = stats.clone();
    let _sub = rt
        .block_on(bus.subscribe_callback::<Stats>("nb/node/sim/*", move |r| s.lock().unwrap().push(r.msg)))
        .unwrap();
    wait_until("stats of both actors", Duration::from_secs(10), || {
        let s = stats.lock().unwrap();
        s.iter().any(|x| x.actor == "sim_robot_r0") && s.iter().any(|x| x.actor == "stats_echo")
    });
    let s = stats.lock().unwrap().clone();
    // The inbox the runtime built is the launch file's (a queue of 8), not the actor's default
    // (latest-only, reported as 0); stats_echo's input keeps its code default (a queue of 1024).
    let metric = |actor: &str, name: &str| {
        s.iter()
            .rev()
            .find(|x| x.actor == actor)
            .and_then(|x| x.extra.iter().find(|m| m.name == name).map(|m| m.value))
    };
    assert_eq!(metric("sim_robot_r0", "inputs.act.queue"), Some(8.0), "{s:?}");
    assert_eq!(metric("stats_echo", "inputs.stats.queue"), Some(1024.0), "{s:?}");
    wait_until("stats_echo saw the fleet", Duration::from_secs(10), || {
        stats
            .lock()
            .unwrap()
            .iter()
            .any(|x| x.actor == "stats_echo" && x.extra.iter().any(|m| m.name == "actors_seen" && m.value >= 2.0))
    });
    drop(fleet);
    // A bad input setting is refused with the actor and the reason.
    let bad = write_launch(
        "inputs-bad",
        "[robots]\ncount = 1\n[[node]]\nname = \"sim\"\n[[node.actor]]\ntype = \"sim_robot\"\nfor_each_robot = true\nset = { inputs = { act = { keep = \"some\" } } }\n",
    );
    let out = nanobot()
        .args(["run", "--launch"])
        .arg(&bad)
        .args(["--node", "sim"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("sim_robot_r0") && err.contains("inputs"), "{err}");
}

/// A binary upgraded in place while the fleet runs (a new file renamed over the old, as package
/// managers do; a rebuild): a node that crashes after that is still restarted, on the new binary.
#[test]
fn a_node_is_restarted_after_the_nanobot_binary_was_replaced_in_place() {
    let dir = temp_dir("upgrade");
    let exe = dir.join("nanobot");
    std::fs::copy(env!("CARGO_BIN_EXE_nanobot"), &exe).unwrap();
    let port = free_port();
    let file = one_robot_fleet("upgrade", port);
    let mut cmd = std::process::Command::new(&exe);
    cmd.env("RUST_LOG", "info,zenoh=warn")
        .arg("launch")
        .arg(&*file)
        .args(["--grace", "5"]);
    let mut fleet = Proc::spawn(cmd);
    let pid = pid_in(&fleet.expect_line("node sim started", Duration::from_secs(30)));
    fleet.expect_actors(3, Duration::from_secs(30));
    let new = dir.join("nanobot.new");
    std::fs::copy(env!("CARGO_BIN_EXE_nanobot"), &new).unwrap();
    std::fs::rename(&new, &exe).unwrap();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    fleet.expect_line("node sim exited", Duration::from_secs(10));
    let line = fleet.expect_line("node sim", Duration::from_secs(10));
    assert!(line.contains("started (pid"), "the node was not restarted: {line}");
    fleet.expect_actors(3, Duration::from_secs(30));
}
