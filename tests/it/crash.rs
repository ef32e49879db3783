//! The crash matrix: a learning fleet with one node process per actor kind (so that `kill -9`
//! of a node is a crash of that kind), joined through a router and run by `nanobot launch`,
//! has each node killed in turn while it works. The launcher restarts each; the robots keep
//! acting; the trainer resumes from its checkpoint, the promoter from its ledger with the same
//! rollout; and no row any logger acknowledged is lost or stored twice.

use crate::common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nanobot_messages::{LogAck, Promoted, StreamMark};

const NODES: [&str; 8] = [
    "spool", "logger", "ingest", "policy", "trainer", "promoter", "replay", "robot",
];

#[test]
fn kill_9_of_each_actor_kind_in_a_learning_fleet_loses_nothing_acknowledged() {
    let (tiny, _) = shared_tiny_policy();
    let dir = temp_dir("crash-matrix");
    let keys = dir.join("keys");
    let out = tool(&["keys", "init", keys.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let port = free_port();
    let router = format!("tcp/127.0.0.1:{port}");
    let node = |name: &str, actor: &str| {
        format!("[[node]]\nname = \"{name}\"\nmode = \"client\"\nconnect = [\"{router}\"]\n{actor}\n")
    };
    let file = write_launch(
        "crash-matrix",
        &[
            format!(
                "[restart]\nmax_restarts = 10\nwindow_s = 60\nbackoff_ms = 100\nmax_backoff_ms = 500\n[robots]\nids = [\"r0\", \"r1\"]\n[[node]]\nname = \"router\"\nmode = \"router\"\nlisten = [\"{router}\"]\n"
            ),
            node(
                "robot",
                r#"[[node.actor]]
type = "sim_robot"
for_each_robot = true
config = "@CONFIGS@/sim_robot.toml"
set = { sim = { seed = "1{index}", episode_steps = 60 } }"#,
            ),
            node("ingest", "[[node.actor]]\ntype = \"ingest\"\nfor_each_robot = true\nconfig = \"@CONFIGS@/ingest.toml\""),
            node(
                "spool",
                &format!(
                    "[[node.actor]]\ntype = \"spool\"\nfor_each_robot = true\nconfig = \"@CONFIGS@/spool.toml\"\nset = {{ dir = \"{}/spool/{{robot}}\", resend_after_ms = 300 }}",
                    dir.display()
                ),
            ),
            node(
                "policy",
                &format!(
                    "[[node.actor]]\ntype = \"policy\"\nfor_each_robot = true\nconfig = \"@CONFIGS@/policy_actor.toml\"\nset = {{ checkpoint = \"{}\", trusted_key = \"{}/fleet.pub\" }}",
                    tiny.display(),
                    keys.display()
                ),
            ),
            node(
                "logger",
                &format!(
                    "[[node.actor]]\ntype = \"logger\"\nfor_each_robot = true\nconfig = \"@CONFIGS@/logger.toml\"\nset = {{ source = \"spool\", root = \"{}/data/{{robot}}\", flush_ms = 20, file_max_age_s = 1.0 }}",
                    dir.display()
                ),
            ),
            node(
                "replay",
                &format!(
                    "[[node.actor]]\ntype = \"replay\"\nconfig = \"@CONFIGS@/replay.toml\"\nset = {{ datasets = [\"{}/data\"], min_rows = 100 }}",
                    dir.display()
                ),
            ),
            node(
                "trainer",
                &format!(
                    "[[node.actor]]\ntype = \"trainer\"\nconfig = \"@CONFIGS@/trainer.toml\"\nset = {{ base = \"{}\", state_dir = \"{}/trainer\", batch = 8, shards = 1, checkpoint_every = 5, candidate_every = 20, candidate_every_s = 5.0, held_out_windows = 8 }}",
                    tiny.display(),
                    dir.display()
                ),
            ),
            // Gates wide open: this test is about crashes, not judgement (tests/it/gates.rs is).
            node(
                "promoter",
                &format!(
                    "[[node.actor]]\ntype = \"promoter\"\nconfig = \"@CONFIGS@/promoter.toml\"\nset = {{ base = \"{}\", state_dir = \"{}/promoter\", keys = \"{}\", canary_hold_s = 2.0, canary_min_episodes = 0, gates = {{ held_out_tolerance = 100.0, margin = -1.0, max_drop = 1.0, shadow = {{ seeds = [1000], episodes_per_seed = 1, sim = {{ episode_steps = 20 }} }} }} }}",
                    tiny.display(),
                    dir.display(),
                    keys.display()
                ),
            ),
        ]
        .join("\n"),
    );
    let mut fleet = Proc::launch(&file, &[]);
    let mut pids: HashMap<String, i32> = HashMap::new();
    let note_pid = |line: &str, pids: &mut HashMap<String, i32>| {
        if let Some(rest) = line.split("[launch] node ").nth(1) {
            if let Some(name) = rest.strip_suffix(')').and_then(|r| r.split(" started (pid ").next()) {
                pids.insert(name.to_string(), pid_in(line));
            }
        }
    };
    // 9 nodes: router + 8; 2+2+2+2+2 per-robot actors, replay, trainer, promoter.
    for _ in 0..9 {
        let line = fleet.expect_line("started (pid", Duration::from_secs(30));
        note_pid(&line, &mut pids);
    }
    let rt = runtime();
    let bus = rt.block_on(client(port));
    let (metrics, _stats) = StatsBoard::follow(&rt, &bus);
    // Every mark any logger acknowledged as durable.
    let acked: Arc<Mutex<BTreeMap<String, HashSet<StreamMark>>>> = Arc::default();
    let a = acked.clone();
    let _acks = rt
        .block_on(bus.subscribe_callback::<LogAck>("nb/log/*/ack", move |r| {
            if let Some(m) = r.msg.last {
                a.lock().unwrap().entry(r.header.robot.clone()).or_default().insert(m);
            }
        }))
        .unwrap();
    let rollout = Arc::new(Mutex::new(0u64));
    let g = rollout.clone();
    let _promoted = rt
        .block_on(bus.subscribe_callback::<Promoted>("nb/ckpt/promoted", move |r| {
            *g.lock().unwrap() = r.msg.generation;
        }))
        .unwrap();
    wait_until("the trainer training and rows logged", Duration::from_secs(120), || {
        metrics.get("trainer", "step") >= 10.0 && metrics.get("logger_r0", "rows") >= 100.0
    });
    let episodes = |m: &StatsBoard| m.get("sim_robot_r0", "episodes") + m.get("sim_robot_r1", "episodes");
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut outcomes = Vec::new();
    for name in NODES {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(300 + (rng >> 33) % 1500));
        let (step, generation) = (metrics.get("trainer", "step"), *rollout.lock().unwrap());
        let pid = pids[name];
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let t0 = Instant::now();
        let line = fleet.expect_line(&format!("node {name} started (pid"), Duration::from_secs(30));
        note_pid(&line, &mut pids);
        let restarted = t0.elapsed().as_secs_f64();
        let detail = match name {
            "trainer" => {
                let l = fleet.expect_line("training resumed", Duration::from_secs(30));
                let resumed: f64 = l
                    .split("step=")
                    .nth(1)
                    .unwrap()
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                // Its Stats are up to a second old: it was at `step` or later, and checkpoints
                // every 5 steps.
                assert!(
                    resumed > 0.0 && resumed + 5.0 >= step,
                    "resumed at {resumed}, was at {step} or later"
                );
                format!("killed at step {step}, resumed from its checkpoint at step {resumed}")
            }
            "promoter" => {
                // What it announced last is what its ledger gives back (or a later change it
                // recorded just before the kill, not yet announced).
                let l = fleet.expect_line("rollout read back", Duration::from_secs(30));
                let read: u64 = l
                    .split("generation=")
                    .nth(1)
                    .unwrap()
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(
                    read == generation || read == generation + 1,
                    "announced generation {generation}, read back {read}: {l}"
                );
                format!("announced generation {generation}, read back generation {read} from its ledger")
            }
            _ => String::new(),
        };
        // Working again: episodes end (a restarted robot counts from 0 again) and rows are logged.
        let (before, rows) = (episodes(&metrics), metrics.get("logger_r0", "rows"));
        let robot_restarted = name == "robot";
        let mut low = f64::MAX;
        wait_until(
            &format!("the fleet working after {name}'s kill"),
            Duration::from_secs(60),
            || {
                let e = episodes(&metrics);
                low = low.min(e);
                let ended = if robot_restarted {
                    low < before && e > low
                } else {
                    e > before
                };
                ended && metrics.get("logger_r0", "rows") != rows
            },
        );
        outcomes.push(format!(
            "{name}: restarted {restarted:.1} s after the kill, working again after {:.1} s{}{detail}",
            t0.elapsed().as_secs_f64(),
            if detail.is_empty() { "" } else { "; " }
        ));
    }
    // Caught up: each spool's backlog acknowledged.
    wait_until("the spools drained", Duration::from_secs(60), || {
        ["spool_r0", "spool_r1"]
            .iter()
            .all(|s| metrics.get(s, "backlog") < 50.0)
    });
    std::thread::sleep(Duration::from_secs(1));
    fleet.signal(libc::SIGTERM);
    assert!(fleet.wait(Duration::from_secs(60)).success());
    for o in &outcomes {
        eprintln!("{o}");
    }

    for robot in ["r0", "r1"] {
        let root = dir.join("data").join(robot);
        let (_, rows) = nanobot_dataset::read_dataset(&root).unwrap();
        let marks: Vec<StreamMark> = rows
            .iter()
            .map(|r| StreamMark {
                seq: r.seq,
                stamp_ns: r.stamp_ns,
            })
            .collect();
        let unique: HashSet<StreamMark> = marks.iter().copied().collect();
        assert_eq!(unique.len(), marks.len(), "{robot}: a row stored twice");
        assert!(
            marks.windows(2).all(|w| w[0].stamp_ns < w[1].stamp_ns),
            "{robot}: rows out of the order produced"
        );
        let acked = acked.lock().unwrap().get(robot).cloned().unwrap_or_default();
        let lost: Vec<_> = acked.iter().filter(|m| !unique.contains(m)).collect();
        assert!(lost.is_empty(), "{robot}: acknowledged but not stored: {lost:?}");
        assert!(acked.len() > 50, "{robot}: {} acknowledgements", acked.len());
        let report = nanobot_dataset::verify(&root).unwrap();
        assert!(report.ok(), "{robot}: {:?}", report.problems);
        eprintln!(
            "{robot}: {} rows, {} acknowledged marks all stored once, in order",
            marks.len(),
            acked.len()
        );
    }
}
