//! End-to-end: two node processes export their spans and metrics over OTLP to a real receiver
//! (Python, `opentelemetry-proto`): one trace follows a tick from the robot through ingest, the
//! controller on the other node, the applied action and the logger, its parent links intact,
//! and the actors' counters arrive as metrics.

use crate::common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// What the receiver wrote so far of one type (`span`, `metric`), one JSON object each.
fn received(path: &std::path::Path, kind: &str) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == kind)
        .collect()
}

fn spans(path: &std::path::Path) -> Vec<Value> {
    received(path, "span")
}

/// The latest value of a counter for one actor of one node.
fn counter(metrics: &[Value], name: &str, node: &str, actor: &str) -> Option<f64> {
    metrics
        .iter()
        .filter(|m| {
            m["name"] == name && m["resource"]["nanobot.node"] == node && m["attributes"]["nanobot.actor"] == actor
        })
        .filter_map(|m| m["value"].as_f64())
        .next_back()
}

const HOPS: [&str; 5] = [
    "robot.tick",
    "ingest.observation",
    "expert.chunk",
    "robot.act",
    "logger.write",
];

/// The first trace that holds every hop, by name.
fn whole_trace(spans: &[Value]) -> Option<HashMap<String, Value>> {
    let mut traces: HashMap<&str, HashMap<String, Value>> = HashMap::new();
    for s in spans {
        traces
            .entry(s["trace_id"].as_str().unwrap())
            .or_default()
            .insert(s["name"].as_str().unwrap().to_string(), s.clone());
    }
    traces.into_values().find(|t| HOPS.iter().all(|h| t.contains_key(*h)))
}

#[test]
fn one_trace_follows_a_tick_across_two_processes_to_an_otlp_receiver() {
    let (otlp_port, port) = (free_port(), free_port());
    let dir = temp_dir("otlp");
    let out = dir.join("spans.jsonl");
    let mut receiver = Command::new("python3")
        .arg(repo().join("telemetry/tests/otlp_receiver.py"))
        .arg(otlp_port.to_string())
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(receiver.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(
        first.trim(),
        "listening",
        "otlp_receiver.py (needs opentelemetry-proto; .ci/run installs it)"
    );

    let file = write_launch(
        "otlp",
        &format!(
            r#"
[zenoh]
trace_sample_ratio = 1.0
[robots]
ids = ["r0"]
[[node]]
name = "robot"
listen = ["tcp/127.0.0.1:{port}"]
[[node.actor]]
type = "sim_robot"
for_each_robot = true
config = "@CONFIGS@/sim_robot.toml"
set = {{ sim = {{ rate_hz = 50.0 }} }}
[[node.actor]]
type = "ingest"
for_each_robot = true
config = "@CONFIGS@/ingest.toml"
set = {{ rate_hz = 50.0 }}
[[node.actor]]
type = "logger"
for_each_robot = true
config = "@CONFIGS@/logger.toml"
set = {{ root = "{root}/{{robot}}", flush_ms = 20, fps = 50.0 }}
[[node]]
name = "brain"
connect = ["tcp/127.0.0.1:{port}"]
[[node.actor]]
type = "expert"
for_each_robot = true
config = "@CONFIGS@/expert.toml"
set = {{ rate_hz = 50.0 }}
"#,
            root = dir.join("data").display()
        ),
    );
    let mut fleet = Proc::launch(
        &file,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{otlp_port}")),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500".to_string()),
        ],
    );
    fleet.expect_actors(4, Duration::from_secs(30));
    let mut trace = None;
    wait_until("a whole trace at the receiver", Duration::from_secs(60), || {
        trace = whole_trace(&spans(&out));
        trace.is_some()
    });
    wait_until("the actors' counters as metrics", Duration::from_secs(30), || {
        let m = received(&out, "metric");
        counter(&m, "nanobot.actor.handled", "robot", "ingest_r0").is_some_and(|v| v > 0.0)
            && counter(&m, "nanobot.actor.handled", "brain", "expert_r0").is_some_and(|v| v > 0.0)
    });
    fleet.signal(libc::SIGTERM);
    assert!(fleet.wait(Duration::from_secs(30)).success());
    let _ = receiver.kill();
    let _ = receiver.wait();

    let t = trace.unwrap();
    let id = |name: &str| t[name]["span_id"].as_str().unwrap().to_string();
    let parent = |name: &str| t[name]["parent_span_id"].as_str().unwrap().to_string();
    let node = |name: &str| t[name]["resource"]["nanobot.node"].as_str().unwrap().to_string();
    // The root, and each hop's parent the hop it handled.
    assert_eq!(parent("robot.tick"), "", "{t:?}");
    assert_eq!(parent("ingest.observation"), id("robot.tick"), "{t:?}");
    assert_eq!(parent("expert.chunk"), id("robot.tick"), "{t:?}");
    assert_eq!(parent("robot.act"), id("expert.chunk"), "{t:?}");
    assert_eq!(parent("logger.write"), id("ingest.observation"), "{t:?}");
    // Across processes: the controller's span comes from the other node.
    assert_eq!(node("expert.chunk"), "brain", "{t:?}");
    for h in ["robot.tick", "ingest.observation", "robot.act", "logger.write"] {
        assert_eq!(node(h), "robot", "{h}: {t:?}");
    }
    for (name, s) in &t {
        assert_eq!(s["resource"]["service.name"], "nanobot", "{name}");
        assert_eq!(s["attributes"]["nanobot.robot"], "r0", "{name}");
        assert!(s["end"].as_u64() >= s["start"].as_u64(), "{name}: {s}");
    }
    let metrics = received(&out, "metric");
    let kinds: Vec<_> = metrics
        .iter()
        .filter(|m| m["name"] == "nanobot.actor.handled")
        .map(|m| &m["kind"])
        .collect();
    assert!(kinds.iter().all(|k| *k == "sum"), "handled is a counter: {kinds:?}");
    // An actor's own metrics come as gauges named by their attribute.
    assert!(
        metrics
            .iter()
            .any(|m| m["name"] == "nanobot.actor.metric" && m["attributes"]["nanobot.actor"] == "logger_r0"),
        "the logger's metrics (rows, files, ...)"
    );
    // The action answers the tick's frame: the same sequence number all along the chain.
    let seq = &t["robot.tick"]["attributes"]["nanobot.seq"];
    for h in ["ingest.observation", "expert.chunk", "robot.act", "logger.write"] {
        assert_eq!(&t[h]["attributes"]["nanobot.seq"], seq, "{h}: {t:?}");
    }
}
