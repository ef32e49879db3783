//! End-to-end: the fleet's data becomes training. Replay and the LoRA trainer as real actors in
//! real nodes: a trainer killed with `kill -9` resumes bit-identically, and a trainer that
//! started before any data existed trains on segments logged after it started and offers a
//! candidate adapter.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nanobot_messages::Candidate;
use nanobot_policy::checkpoint::{self, Role};

/// The adapter the trainer keeps in `state` (one base: one file).
fn adapter_in(state: &Path) -> Vec<u8> {
    let files: Vec<PathBuf> = std::fs::read_dir(state)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".adapter.safetensors"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    std::fs::read(&files[0]).unwrap()
}

#[test]
fn a_trainer_killed_with_kill_9_resumes_bit_identically() {
    let dir = temp_dir("resume");
    let base = tiny_base(&dir);
    let rows = nanobot_dataset::read_dataset(&dir.join("demos/r0")).unwrap().1.len();
    let port = free_port();
    // Replay and the trainer in one node over the demonstrations; `spi` paces replay.
    let launch = |tag: &str, state: &Path, spi: f64, checkpoint_every: u64, max_steps: u64| {
        write_launch(
            tag,
            &format!(
                r#"
[[node]]
name = "learn"
listen = ["tcp/127.0.0.1:{port}"]
[[node.actor]]
type = "replay"
config = "@CONFIGS@/replay.toml"
set = {{ datasets = ["{data}"], min_rows = 1, samples_per_insert = {spi}, error_buffer = 0.0, held_out_every = 0 }}
[[node.actor]]
type = "trainer"
config = "@CONFIGS@/trainer.toml"
set = {{ base = "{base}", state_dir = "{state}", batch = 8, lr = 1e-3, warmup = 5, checkpoint_every = {checkpoint_every}, candidate_every = 0, candidate_every_s = 0.0, max_steps = {max_steps} }}
"#,
                data = dir.join("demos").display(),
                base = base.display(),
                state = state.display(),
            ),
        )
    };
    let run = |file: &Path| {
        let mut c = nanobot();
        c.args(["run", "--launch"]).arg(file).args(["--node", "learn"]);
        Proc::spawn(c)
    };
    let finish = |mut p: Proc| {
        p.expect_line("trainer reached max_steps", Duration::from_secs(120));
        p.signal(libc::SIGTERM);
        assert!(p.wait(Duration::from_secs(30)).success());
    };

    // Uninterrupted: 20 steps.
    let (a, b) = (dir.join("state-a"), dir.join("state-b"));
    finish(run(&launch("resume-a", &a, 1e6, 50, 20)));
    let uninterrupted = adapter_in(&a);

    // Interrupted: replay lets 15 batches of 8 through (124 windows), the trainer checkpoints
    // every 7 steps and is killed while it waits for more, its step 15 lost.
    let killed_file = launch("resume-b", &b, 124.0 / rows as f64, 7, 0);
    let mut killed = run(&killed_file);
    let line = killed.expect_line("trainer waiting", Duration::from_secs(120));
    assert!(line.contains("rate limit"), "{line}");
    killed.signal(libc::SIGKILL);
    killed.wait(Duration::from_secs(10));

    // Resumed from step 14 and run to 20: the same adapter, bit for bit.
    let resumed_file = launch("resume-c", &b, 1e6, 50, 20);
    let mut resumed = run(&resumed_file);
    let line = resumed.expect_line("training resumed", Duration::from_secs(60));
    assert!(line.contains("step=14"), "{line}");
    finish(resumed);
    assert!(
        adapter_in(&b) == uninterrupted,
        "the resumed adapter differs from the uninterrupted one"
    );
}

#[test]
fn the_trainer_learns_from_segments_logged_after_it_started_and_offers_a_candidate() {
    let dir = temp_dir("live");
    let base = tiny_base(&dir);
    let port = free_port();
    let data = dir.join("data");
    let file = write_launch(
        "live",
        &format!(
            r#"
[robots]
ids = ["r0"]
[[node]]
name = "fleet"
listen = ["tcp/127.0.0.1:{port}"]
[[node.actor]]
type = "sim_robot"
for_each_robot = true
config = "@CONFIGS@/sim_robot.toml"
set = {{ sim = {{ rate_hz = 50.0 }} }}
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
[[node.actor]]
type = "logger"
for_each_robot = true
config = "@CONFIGS@/logger.toml"
set = {{ root = "{data}/{{robot}}", file_max_age_s = 0.5, fps = 50.0 }}
[[node.actor]]
type = "replay"
config = "@CONFIGS@/replay.toml"
set = {{ datasets = ["{data}"], min_rows = 10, samples_per_insert = 1000.0, held_out_every = 2 }}
[[node.actor]]
type = "trainer"
config = "@CONFIGS@/trainer.toml"
set = {{ base = "{base}", state_dir = "{state}", batch = 8, candidate_every = 3, candidate_every_s = 0.0 }}
"#,
            data = data.display(),
            base = base.display(),
            state = dir.join("state").display(),
        ),
    );
    assert!(!data.exists(), "no data before the trainer starts");
    let mut fleet = Proc::launch(&file, &[]);
    fleet.expect_line("trainer ready", Duration::from_secs(30));
    let t0 = Instant::now();
    let rt = runtime();
    let bus = rt.block_on(client(port));
    let candidates = Arc::new(Mutex::new(Vec::<Candidate>::new()));
    let c = candidates.clone();
    let _sub = rt
        .block_on(bus.subscribe_callback::<Candidate>("nb/ckpt/candidate", move |r| c.lock().unwrap().push(r.msg)))
        .unwrap();
    wait_until("a candidate", Duration::from_secs(90), || {
        !candidates.lock().unwrap().is_empty()
    });
    eprintln!(
        "first candidate {:.1} s after the trainer started on an empty dataset",
        t0.elapsed().as_secs_f64()
    );
    let cand = candidates.lock().unwrap()[0].clone();
    assert_eq!(cand.base_version, "tiny-base");
    assert!(cand.step > 0 && cand.step % 3 == 0, "candidate at step {}", cand.step);
    assert_eq!(nanobot_dataset::sha256_hex(&cand.adapter.to_bytes()), cand.sha256);
    let metric = |name: &str| cand.metrics.iter().find(|m| m.name == name).map(|m| m.value).unwrap();
    assert!(metric("train_loss").is_finite());
    // What it trained on was logged after it started: seconds old.
    let age = metric("data_age_s");
    assert!(age > 0.0 && age < t0.elapsed().as_secs_f64() + 1.0, "data {age} s old");
    // The bytes are an adapter for the base.
    let path = dir.join("candidate.safetensors");
    std::fs::write(&path, cand.adapter.to_bytes()).unwrap();
    let (meta, _) = checkpoint::read(&path).unwrap();
    assert_eq!(meta.kind, Role::Adapter);
    assert_eq!(meta.version, cand.adapter_id);
    fleet.signal(libc::SIGTERM);
    assert!(fleet.wait(Duration::from_secs(30)).success());
    drop(bus);
}
