//! End-to-end: the fleet gets better on its own. The tiny policy trained on the expert's
//! demonstrations drives two robots whose floor is icy (condition B) from the start; the onboard
//! expert finishes the episodes the policy cannot; replay, the LoRA trainer and the promoter run
//! beside them. The promoter promotes an adapter only when its shadow success under B beats the
//! base's by 30 points and condition A keeps within 20; the test then measures both adapters
//! itself, on worlds neither the robots nor the promoter used.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

#[test]
fn success_under_a_shift_climbs_after_online_adaptation_and_a_holds() {
    let dir = temp_dir("adapt");
    let (base, demos) = tiny_policy(&dir);
    let port = free_port();
    let data = dir.join("data");
    let state = dir.join("state");
    let file = write_launch(
        "adapt",
        &format!(
            r#"
[robots]
ids = ["r0", "r1"]
[[node]]
name = "fleet"
listen = ["tcp/127.0.0.1:{port}"]
[[node.actor]]
type = "sim_robot"
for_each_robot = true
config = "@CONFIGS@/sim_robot.toml"
set = {{ sim = {{ seed = "1{{index}}", rate_hz = 40.0, shift = "icy_floor" }}, intervene_after_steps = 60 }}
[[node.actor]]
type = "ingest"
for_each_robot = true
config = "@CONFIGS@/ingest.toml"
set = {{ rate_hz = 40.0 }}
[[node.actor]]
type = "logger"
for_each_robot = true
config = "@CONFIGS@/logger.toml"
set = {{ root = "{data}/{{robot}}", fps = 40.0, file_max_age_s = 2.0 }}
[[node.actor]]
type = "policy"
for_each_robot = true
config = "@CONFIGS@/policy_actor.toml"
set = {{ checkpoint = "{base}", rate_hz = 40.0, trusted_key = "{state}/keys/fleet.pub" }}
[[node.actor]]
type = "replay"
config = "@CONFIGS@/replay.toml"
set = {{ datasets = ["{demos}", "{data}"], min_rows = 100, weights = {{ pre_intervention_steps = 40 }} }}
[[node.actor]]
type = "trainer"
config = "@CONFIGS@/trainer.toml"
set = {{ base = "{base}", state_dir = "{state}/trainer", shards = 1, lr = 1e-3, candidate_every = 150, candidate_every_s = 20.0 }}
[[node.actor]]
type = "promoter"
config = "@CONFIGS@/promoter.toml"
set = {{ base = "{base}", state_dir = "{state}/promoter", keys = "{state}/keys", generate_key = true, canary_robots = 0, gates = {{ margin = 0.3, max_drop = 0.2, held_out_tolerance = 1.0, shadow = {{ seeds = [1000, 1001], episodes_per_seed = 5, sim = {{ episode_steps = 60 }} }} }} }}
"#,
            base = base.display(),
            demos = demos.display(),
            data = data.display(),
            state = state.display(),
        ),
    );
    let mut fleet = Proc::launch(&file, &[]);
    let line = fleet.expect_line("rollout: promoted", Duration::from_secs(300));
    eprintln!("{line}");
    fleet.expect_line("rollout reached every robot", Duration::from_secs(30));
    fleet.signal(libc::SIGTERM);
    assert!(fleet.wait(Duration::from_secs(30)).success());

    // The promoted adapter, from the promoter's ledger and store.
    let ledger = std::fs::read_to_string(state.join("promoter/ledger.jsonl")).unwrap();
    let manifest = ledger
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "rollout" && v["fleet"].is_object())
        .last()
        .expect("a rollout with an adapter")["fleet"]
        .clone();
    let adapter: PathBuf = state.join(format!(
        "promoter/adapters/{}.safetensors",
        manifest["sha256"].as_str().unwrap()
    ));
    // Measured here on worlds 100 and 101, episodes as long as the robots get before help.
    let before_b = eval_success(&base, None, "icy_floor", Some(60));
    let after_b = eval_success(&base, Some(&adapter), "icy_floor", Some(60));
    let before_a = eval_success(&base, None, "none", Some(60));
    let after_a = eval_success(&base, Some(&adapter), "none", Some(60));
    eprintln!("icy_floor {before_b} % → {after_b} %; none {before_a} % → {after_a} %");
    assert!(after_b >= before_b + 25.0, "B: {before_b} % → {after_b} %");
    assert!(after_a >= before_a - 25.0, "A: {before_a} % → {after_a} %");
}
