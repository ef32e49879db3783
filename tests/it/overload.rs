//! Overload: a robot's telemetry at ten times what its logger may write (the logger capped at 2
//! rows/s, the robot producing 20 observations/s), through a spool with a small disk budget.
//! Memory stays bounded on both nodes, the robot's control stays on time, and what is lost is
//! lost only where the QoS allows it (the spool's oldest messages over its budget) and counted
//! and announced; what is logged is stored once, in order.

use crate::common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nanobot_messages::Reject;

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

#[test]
fn telemetry_at_ten_times_what_the_logger_writes_stays_bounded_on_time_and_counted() {
    let dir = temp_dir("overload");
    let base = tiny_base(&dir);
    let port = free_port();
    let file = write_launch(
        "overload",
        &format!(
            r#"
[robots]
ids = ["r0"]
[[node]]
name = "robot"
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
[[node.actor]]
type = "spool"
for_each_robot = true
config = "@CONFIGS@/spool.toml"
set = {{ dir = "{root}/spool/{{robot}}", max_mb = 0.5, segment_kb = 64 }}
[[node]]
name = "log"
connect = ["tcp/127.0.0.1:{port}"]
[[node.actor]]
type = "logger"
for_each_robot = true
config = "@CONFIGS@/logger.toml"
set = {{ source = "spool", root = "{root}/data/{{robot}}", max_rows_per_s = 2.0 }}
"#,
            base = base.display(),
            root = dir.display()
        ),
    );
    let run = |node: &str| {
        let mut c = nanobot();
        c.args(["run", "--launch"]).arg(&file).args(["--node", node]);
        Proc::spawn(c)
    };
    let mut robot = run("robot");
    robot.expect_actors(4, Duration::from_secs(30));
    let mut logger = run("log");
    logger.expect_actors(1, Duration::from_secs(30));
    let rt = runtime();
    let bus = rt.block_on(client(port));
    let (metrics, _stats) = StatsBoard::follow(&rt, &bus);
    let alarms = Arc::new(Mutex::new(Vec::<Reject>::new()));
    let a = alarms.clone();
    let _rejects = rt
        .block_on(bus.subscribe_callback::<Reject>("nb/r0/rejects", move |r| a.lock().unwrap().push(r.msg)))
        .unwrap();
    let t0 = Instant::now();
    wait_until("the spool over its budget", Duration::from_secs(60), || {
        metrics.get("spool_r0", "dropped_over_budget") > 0.0
    });
    let missed = || {
        (
            metrics.get("sim_robot_r0", "missed_actions"),
            metrics.get("policy_r0", "missed_deadlines"),
        )
    };
    let (missed_before, rss_robot, rss_logger) = (missed(), rss_mb(robot.child.id()), rss_mb(logger.child.id()));
    std::thread::sleep(Duration::from_secs(15));
    let (missed_after, rss_robot_after, rss_logger_after) =
        (missed(), rss_mb(robot.child.id()), rss_mb(logger.child.id()));
    let secs = t0.elapsed().as_secs_f64();
    let produced = metrics.get("ingest_r0", "observations");
    let logged = metrics.get("logger_r0", "rows");
    let dropped = metrics.get("spool_r0", "dropped_over_budget");
    let spool_mb = metrics.get("spool_r0", "bytes") / 1048576.0;
    eprintln!(
        "{secs:.0} s: ingest {produced} observations, logged {logged}, spool dropped {dropped} (holds {spool_mb:.2} MB), \
         logger left {} to the spool; RSS robot {rss_robot:.0} → {rss_robot_after:.0} MB, logger {rss_logger:.0} → {rss_logger_after:.0} MB; \
         missed (actions, deadlines) {missed_before:?} → {missed_after:?}",
        metrics.get("logger_r0", "rate_limited")
    );
    assert!(
        produced >= 10.0 * 2.0 * (secs - 5.0),
        "the robot produced ten times the logger's rate: {produced} in {secs:.0} s"
    );
    assert!(
        logged <= 2.0 * secs + 2.0,
        "the logger kept to 2 rows/s: {logged} in {secs:.0} s"
    );
    assert!(spool_mb <= 0.5 + 0.07, "the spool kept to its budget: {spool_mb:.2} MB");
    assert_eq!(missed_after, missed_before, "control stayed on time");
    assert!(
        rss_robot_after < rss_robot + 30.0,
        "robot node memory: {rss_robot} → {rss_robot_after} MB"
    );
    assert!(
        rss_logger_after < rss_logger + 30.0,
        "logger node memory: {rss_logger} → {rss_logger_after} MB"
    );
    // The loss is counted and announced where it happened.
    let alarms = alarms.lock().unwrap().clone();
    let last = alarms
        .iter()
        .rfind(|r| r.sensor == "spool" && r.reason == "over_budget")
        .expect("the spool announced its drops");
    assert!(last.count as f64 >= dropped - 100.0 && last.count > 0, "{last:?}");
    // Nothing was dropped on the way in: ingest took every raw frame.
    assert_eq!(metrics.get("ingest_r0", "dropped"), 0.0, "ingest dropped frames");
    drop(logger);
    drop(robot);
    let root = dir.join("data/r0");
    let (_, rows) = nanobot_dataset::read_dataset(&root).unwrap();
    let stamps: Vec<u64> = rows.iter().map(|r| r.stamp_ns).collect();
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "in order, none twice");
    assert_eq!(stamps.iter().collect::<HashSet<_>>().len(), stamps.len());
    assert!(nanobot_dataset::verify(&root).unwrap().ok());
}
