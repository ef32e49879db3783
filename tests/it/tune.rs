//! `nanobot tune` in its quick mode, end to end: it measures on this machine with a real policy
//! and real demonstrations, prints every table, writes a file of settings by actor type, and a
//! fleet launched with `tuned = …` runs its policy with them (the policy actor reports the DDIM
//! steps it acts with).

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use nanobot_messages::Stats;

#[test]
fn tune_measures_this_machine_and_a_launch_file_runs_with_what_it_wrote() {
    let dir = temp_dir("tune");
    let base = tiny_base(&dir);
    let tuned = dir.join("tuned.toml");
    let out = nanobot()
        .arg("tune")
        .arg("--checkpoint")
        .arg(&base)
        .arg("--data")
        .arg(dir.join("demos"))
        .arg("--out")
        .arg(&tuned)
        .arg("--quick")
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    for table in [
        "cross-robot batch",
        "policy worker threads",
        "DDIM steps",
        "weight precision",
        "online trainer",
    ] {
        assert!(stdout.contains(table), "no {table:?} table:\n{stdout}");
    }
    for q in ["f32", "f16", "q8_0", "mxfp4"] {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(q)),
            "no {q} row:\n{stdout}"
        );
    }
    let written: toml::Table = toml::from_str(&std::fs::read_to_string(&tuned).unwrap()).unwrap();
    let policy = written["policy"].as_table().unwrap();
    let trainer = written["trainer"].as_table().unwrap();
    for key in ["threads", "max_batch", "ddim_steps"] {
        assert!(policy[key].as_integer().unwrap() >= 1, "{key}: {written:?}");
    }
    assert!(trainer["batch"].as_integer().unwrap() >= 1);
    assert!(trainer["lr"].as_float().unwrap() > 0.0);

    // A fleet picks the file up; the launch file's own `set` still wins over it. The tuned DDIM
    // steps are made 3 here so that the policy's report tells them from the config's 10.
    let mut text_tuned = std::fs::read_to_string(&tuned).unwrap();
    text_tuned = text_tuned
        .lines()
        .map(|l| {
            if l.starts_with("ddim_steps") {
                "ddim_steps = 3"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&tuned, text_tuned).unwrap();
    let port = free_port();
    let file = write_launch(
        "tuned-fleet",
        &format!(
            r#"
tuned = "{tuned}"
[robots]
ids = ["r0"]
[[node]]
name = "sim"
listen = ["tcp/127.0.0.1:{port}"]
[[node.actor]]
type = "sim_robot"
for_each_robot = true
config = "@CONFIGS@/sim_robot.toml"
[[node.actor]]
type = "ingest"
for_each_robot = true
config = "@CONFIGS@/ingest.toml"
[[node.actor]]
type = "policy"
for_each_robot = true
config = "@CONFIGS@/policy_actor.toml"
set = {{ checkpoint = "{base}", promotions = false }}
"#,
            tuned = tuned.display(),
            base = base.display()
        ),
    );
    let rt = runtime();
    let mut fleet = Proc::launch(&file, &[]);
    fleet.expect_actors(3, Duration::from_secs(30));
    let bus = rt.block_on(client(port));
    let stats = Arc::new(Mutex::new(Vec::<Stats>::new()));
    let s = stats.clone();
    let _s = rt
        .block_on(bus.subscribe_callback::<Stats>("nb/node/sim/policy_r0", move |r| s.lock().unwrap().push(r.msg)))
        .unwrap();
    let metric = |s: &Stats, name: &str| s.extra.iter().find(|m| m.name == name).map(|m| m.value);
    wait_until("the policy acting", Duration::from_secs(60), || {
        stats
            .lock()
            .unwrap()
            .last()
            .is_some_and(|s| metric(s, "chunks").unwrap_or(0.0) >= 5.0)
    });
    let last = stats.lock().unwrap().last().cloned().unwrap();
    assert_eq!(metric(&last, "ddim_steps"), Some(3.0), "{last:?}");
    assert!(metric(&last, "worker_batches").unwrap_or(0.0) >= 5.0, "{last:?}");
    fleet.signal(libc::SIGTERM);
    fleet.wait(Duration::from_secs(20));
}
