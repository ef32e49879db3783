//! End-to-end: `nanobot record` a running fleet into MCAP, read it with the `mcap` Python
//! package, and `nanobot play` it into a fleet that has no robots: its logger writes the rows
//! the live logger wrote.

use crate::common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use nanobot_messages::Stats;

/// Each actor's latest Stats metrics on a node, kept current by a subscription on `port`.
type Metrics = Arc<Mutex<BTreeMap<String, BTreeMap<String, f64>>>>;

fn watch_metrics(rt: &tokio::runtime::Runtime, port: u16) -> (Metrics, Box<dyn std::any::Any>) {
    let bus = rt.block_on(client(port));
    let seen: Metrics = Arc::default();
    let s = seen.clone();
    let sub = rt
        .block_on(bus.subscribe_callback::<Stats>("nb/node/*/*", move |r| {
            let m = r.msg.extra.iter().map(|m| (m.name.clone(), m.value)).collect();
            s.lock().unwrap().insert(r.msg.actor.clone(), m);
        }))
        .unwrap();
    (seen, Box::new((bus, sub)))
}

fn metric(seen: &Metrics, actor: &str, name: &str) -> Option<f64> {
    seen.lock().unwrap().get(actor)?.get(name).copied()
}

#[test]
fn a_recording_played_into_a_fleet_without_robots_logs_the_same_rows() {
    let (rec_port, port, replay_port) = (free_port(), free_port(), free_port());
    let dir = temp_dir("record");
    let (live_root, replay_root) = (dir.join("live"), dir.join("replay"));
    let mcap = dir.join("run.mcap");

    // The recorder listens, and the fleet's node connects to it: Zenoh's open returns after the
    // peers exchanged declarations, so the recording holds the fleet's first message too.
    let zenoh_cfg = dir.join("recorder.json5");
    std::fs::write(
        &zenoh_cfg,
        format!(r#"{{ listen: {{ endpoints: ["tcp/127.0.0.1:{rec_port}"] }} }}"#),
    )
    .unwrap();
    let mut recorder = {
        let mut c = nanobot();
        c.args(["record", "nb/r0/obs", "nb/r0/event", "nb/r0/raw/camera", "-o"])
            .arg(&mcap)
            .args(["--peer", "--zenoh-config"])
            .arg(&zenoh_cfg);
        Proc::spawn(c)
    };
    recorder.expect_line("recording nb/r0/obs", Duration::from_secs(20));

    let logger = |root: &std::path::Path| {
        format!(
            r#"[[node.actor]]
type = "logger"
for_each_robot = true
config = "@CONFIGS@/logger.toml"
set = {{ root = "{}/{{robot}}", flush_ms = 20, fps = 50.0 }}
"#,
            root.display()
        )
    };
    let live = write_launch(
        "record-live",
        &format!(
            r#"
[robots]
ids = ["r0"]
[[node]]
name = "sim"
listen = ["tcp/127.0.0.1:{port}"]
connect = ["tcp/127.0.0.1:{rec_port}"]
[[node.actor]]
type = "sim_robot"
for_each_robot = true
config = "@CONFIGS@/sim_robot.toml"
set = {{ episodes = 2, sim = {{ rate_hz = 50.0 }} }}
[[node.actor]]
type = "expert"
for_each_robot = true
config = "@CONFIGS@/expert.toml"
set = {{ rate_hz = 50.0 }}
[[node.actor]]
type = "ingest"
for_each_robot = true
config = "@CONFIGS@/ingest.toml"
set = {{ rate_hz = 50.0 }}
{}"#,
            logger(&live_root)
        ),
    );
    let rt = runtime();
    let mut fleet = Proc::launch(&live, &[]);
    fleet.expect_line("ran its episodes", Duration::from_secs(60));
    let (live_stats, _watch) = watch_metrics(&rt, port);
    // Readiness, not a sleep: the logger has written every observation ingest made (its Stats,
    // once a second); then everything stops cleanly.
    wait_until("the logger caught up with ingest", Duration::from_secs(20), || {
        let obs = metric(&live_stats, "ingest_r0", "observations");
        obs.is_some_and(|n| n > 0.0) && metric(&live_stats, "logger_r0", "rows") == obs
    });
    let live_rows = metric(&live_stats, "logger_r0", "rows").unwrap();
    fleet.signal(libc::SIGTERM);
    assert!(fleet.wait(Duration::from_secs(30)).success());
    recorder.signal(libc::SIGINT);
    assert!(recorder.wait(Duration::from_secs(20)).success());
    let summary = recorder.expect_line("recorded ", Duration::from_secs(5));
    assert!(summary.contains(" 0 dropped"), "{summary}");

    let replay = write_launch(
        "record-replay",
        &format!(
            "[robots]\nids = [\"r0\"]\n[[node]]\nname = \"log\"\nlisten = [\"tcp/127.0.0.1:{replay_port}\"]\n{}",
            logger(&replay_root)
        ),
    );
    let mut fleet = Proc::launch(&replay, &[]);
    fleet.expect_actors(1, Duration::from_secs(30));
    let (replay_stats, _watch) = watch_metrics(&rt, replay_port);
    // Nothing subscribes to the camera here: playback waits for it only `--wait` seconds.
    let out = tool(&[
        "play",
        mcap.to_str().unwrap(),
        "--rate",
        "2",
        "--wait",
        "3",
        "-e",
        &format!("tcp/127.0.0.1:{replay_port}"),
    ]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("no subscriber when playback started: nb/r0/raw/camera"),
        "{err}"
    );
    wait_until(
        "the replay's logger wrote the live run's rows",
        Duration::from_secs(20),
        || metric(&replay_stats, "logger_r0", "rows") == Some(live_rows),
    );
    fleet.signal(libc::SIGTERM);
    assert!(fleet.wait(Duration::from_secs(30)).success());

    let check = std::process::Command::new("python3")
        .arg(repo().join("record/tests/check_recording.py"))
        .arg(&mcap)
        .arg(live_root.join("r0"))
        .arg(replay_root.join("r0"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "check_recording.py (needs the mcap and pyarrow packages; .ci/run installs them):\n{}{}",
        text(&check.stdout),
        text(&check.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    let obs = v["topics"]["nb/r0/obs"].as_u64().unwrap();
    // Two episodes of the expert: a few dozen observations, every one logged twice alike.
    assert!(obs >= 20, "{v}");
    assert_eq!(v["rows"].as_u64(), Some(obs), "{v}");
    assert!(v["topics"]["nb/r0/event"].as_u64().unwrap() >= 3, "{v}");
    // Every camera frame and every observation has its picture beside it, for Foxglove.
    let camera = v["topics"]["nb/r0/raw/camera"].as_u64().unwrap();
    assert_eq!(v["images"].as_u64(), Some(camera + obs), "{v}");
    assert_eq!(v["topics"]["nb/r0/obs/image"].as_u64(), Some(obs), "{v}");
    let played: u64 = err
        .split("played ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    let recorded: u64 = ["nb/r0/obs", "nb/r0/event", "nb/r0/raw/camera"]
        .iter()
        .map(|t| v["topics"][*t].as_u64().unwrap())
        .sum();
    assert_eq!(played, recorded, "{err}\n{v}");
}
