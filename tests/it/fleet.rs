//! End-to-end: launch files, node processes, supervision, and the engineer tools, all over
//! real Zenoh sessions on loopback.

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn sim_fleet(tag: &str, robots: usize) -> (TempPath, u16) {
    let port = free_port();
    let file = write_launch(
        tag,
        &format!(
            r#"
# Every trace recorded: the tools below check that each message carries its trace.
[zenoh]
trace_sample_ratio = 1.0
[robots]
count = {robots}
[[node]]
name = "sim"
listen = ["tcp/127.0.0.1:{port}"]
[[node.actor]]
type = "sim_robot"
for_each_robot = true
config = "@CONFIGS@/sim_robot.toml"
set = {{ sim = {{ seed = "{{index}}", rate_hz = 50.0 }} }}
[[node.actor]]
type = "expert"
for_each_robot = true
config = "@CONFIGS@/expert.toml"
set = {{ rate_hz = 50.0 }}
"#
        ),
    );
    (file, port)
}

#[test]
fn two_nodes_exchange_messages_through_the_shipped_launch_file() {
    let (apu, robot) = (free_port(), free_port());
    let dir = temp_dir("two-nodes");
    let at = |p: &str| dir.join(p).display().to_string();
    let mut fleet = Proc::launch(
        &repo().join("launch/two_nodes.toml"),
        &[
            ("NB_APU_PORT", apu.to_string()),
            ("NB_ROBOT_PORT", robot.to_string()),
            ("NB_DATA", at("data")),
            ("NB_STATE", at("state")),
            ("NB_CHECKPOINT", at("no-base-yet.safetensors")),
        ],
    );
    // apu: 2 experts, replay, trainer; robot: 2 robots, 2 ingests, 2 spools, 2 loggers.
    fleet.expect_actors(12, Duration::from_secs(20));
    let ep = format!("tcp/127.0.0.1:{robot}");
    // Actions made on the apu node for the robot on the robot node, answering its state frames.
    let out = tool(&[
        "topic",
        "echo",
        "nb/r1/act",
        "--json",
        "--count",
        "3",
        "--timeout",
        "20",
        "--connect",
        &ep,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for v in &lines {
        assert_eq!(v["kind"], "ActionChunk");
        assert_eq!(v["robot"], "r1");
        assert_eq!(v["key"], "nb/r1/act");
        assert_eq!(v["msg"]["source"], "Expert");
        assert_eq!(v["msg"]["horizon"], 16);
        assert!(v["traceparent"].as_str().unwrap().starts_with("00-"));
    }
    // The state frames that the actions answer come from the other process.
    let out = tool(&["node", "list", "--connect", &ep]);
    let listing = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for (node, actor) in [
        ("apu", "expert_r0"),
        ("apu", "expert_r1"),
        ("apu", "replay"),
        ("apu", "trainer"),
        ("robot", "sim_robot_r0"),
        ("robot", "sim_robot_r1"),
        ("robot", "logger_r1"),
    ] {
        assert!(
            listing.lines().any(|l| l.starts_with(node) && l.contains(actor)),
            "{node}/{actor} missing:\n{listing}"
        );
    }
}

#[test]
fn node_list_echo_and_pub_work_against_a_running_fleet() {
    let (file, port) = sim_fleet("list", 3);
    let mut fleet = Proc::launch(&file, &[]);
    fleet.expect_actors(6, Duration::from_secs(10));
    let ep = format!("tcp/127.0.0.1:{port}");
    let out = tool(&["node", "list", "--connect", &ep]);
    let listing = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for actor in [
        "sim_robot_r0",
        "sim_robot_r1",
        "sim_robot_r2",
        "expert_r0",
        "expert_r1",
        "expert_r2",
    ] {
        assert!(
            listing.lines().any(|l| l.starts_with("sim") && l.contains(actor)),
            "{actor} missing:\n{listing}"
        );
    }
    // echo decodes every kind on a wildcard. A robot's raw streams are control traffic, which
    // a congested link drops: four ticks' worth, so that a state frame is among them even on a
    // loaded machine.
    let out = tool(&[
        "topic",
        "echo",
        "nb/r2/raw/*",
        "--json",
        "--count",
        "16",
        "--connect",
        &ep,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let msgs: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(msgs.len(), 16);
    assert!(msgs.iter().all(|m| m["kind"] == "RawFrame" && m["robot"] == "r2"));
    let state = msgs
        .iter()
        .find(|m| m["msg"]["sensor"] == "state")
        .expect("a state frame");
    assert_eq!(state["msg"]["shape"], serde_json::json!([6]));

    // One trace follows a state frame to the action chunk that answers it.
    let out = tool(&["topic", "echo", "nb/r1/**", "--json", "--count", "60", "--connect", &ep]);
    let msgs: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let trace_id = |m: &Value| m["traceparent"].as_str().unwrap()[3..35].to_string();
    let linked = msgs
        .iter()
        .filter(|m| m["kind"] == "ActionChunk")
        .filter_map(|a| {
            msgs.iter()
                .find(|s| s["key"] == "nb/r1/raw/state" && s["seq"] == a["msg"]["obs_seq"])
                .map(|s| (trace_id(s), trace_id(a)))
        })
        .collect::<Vec<_>>();
    assert!(!linked.is_empty(), "no action chunk whose state frame was seen");
    for (state, act) in linked {
        assert_eq!(state, act, "the action continues the state frame's trace");
    }

    // pub → echo: a message typed as JSON arrives decoded.
    let mut echo = nanobot();
    echo.args([
        "topic",
        "echo",
        "nb/r9/event",
        "--json",
        "--count",
        "1",
        "--timeout",
        "20",
        "--connect",
        &ep,
    ]);
    let echo = echo.stdout(std::process::Stdio::piped()).spawn().unwrap();
    let msg = r#"{"kind":"Event","msg":{"episode":3,"event":{"Reward":{"value":1.5}}}}"#;
    let out = tool(&[
        "topic",
        "pub",
        "nb/r9/event",
        msg,
        "--count",
        "3",
        "--rate",
        "5",
        // Publish once echo's subscription is known (a readiness signal, not a sleep).
        "--wait",
        "20",
        "--connect",
        &ep,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = echo.wait_with_output().unwrap();
    let v: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(v["robot"], "r9");
    assert_eq!(v["msg"]["episode"], 3);
    assert_eq!(v["msg"]["event"]["Reward"]["value"], 1.5);

    // A malformed message is refused with its reason.
    let out = tool(&[
        "topic",
        "pub",
        "nb/r9/event",
        r#"{"kind":"Event","msg":{"episode":"x"}}"#,
        "--connect",
        &ep,
    ]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("Event"), "{}", text(&out.stderr));
}

#[test]
fn tools_fail_clearly_when_nothing_answers() {
    let ep = format!("tcp/127.0.0.1:{}", free_port());
    for args in [
        vec!["topic", "echo", "nb/**", "--count", "1"],
        vec!["node", "list"],
        vec!["topic", "hz", "nb/**", "--duration", "1"],
    ] {
        let mut a = args.clone();
        a.extend(["--connect", &ep, "--connect-timeout", "1"]);
        let out = tool(&a);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = text(&out.stderr);
        assert!(
            err.contains("no Zenoh peer or router answered") && err.contains(&ep),
            "{args:?}: {err}"
        );
    }
    let out = tool(&["doctor", "--connect", &ep, "--connect-timeout", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("FAIL"), "{}", text(&out.stdout));
}

#[test]
fn doctor_says_connected_but_no_data() {
    // A node whose only actor publishes nothing by itself: an expert with no robot telemetry.
    let port = free_port();
    let file = write_launch(
        "doctor",
        &format!(
            "[robots]\ncount = 1\n[[node]]\nname = \"quiet\"\nlisten = [\"tcp/127.0.0.1:{port}\"]\n[[node.actor]]\ntype = \"expert\"\nfor_each_robot = true\n"
        ),
    );
    let mut fleet = Proc::launch(&file, &[]);
    fleet.expect_line("actor started", Duration::from_secs(10));
    let ep = format!("tcp/127.0.0.1:{port}");
    // Stats are published on nb/node/**, but the fleet's own topics are silent.
    let out = tool(&["doctor", "--connect", &ep]);
    let report = text(&out.stdout);
    assert!(report.contains("node quiet: 1 actor(s): expert_r0"), "{report}");
    assert!(report.contains("FAIL      connected but no data on nb/**"), "{report}");
    assert_eq!(out.status.code(), Some(1), "{report}");
    // The same doctor against a fleet whose robots publish: data, and exit 0.
    let (sim, _) = sim_fleet("doctor-ok", 1);
    let mut live = Proc::launch(&sim, &[]);
    live.expect_actors(1, Duration::from_secs(30));
    let out = tool(&["doctor", "--launch", sim.to_str().unwrap()]);
    let report = text(&out.stdout);
    assert!(report.contains("ok        data:"), "{report}");
    assert_eq!(out.status.code(), Some(0), "{report}");
    let out = tool(&["topic", "echo", "nb/r0/**", "--timeout", "2", "--connect", &ep]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("connected to 1 Zenoh node(s), but no message on nb/r0/**"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn sigterm_to_launch_leaves_no_child_alive() {
    let (file, _) = sim_fleet("sigterm", 1);
    let mut fleet = Proc::launch(&file, &[]);
    let pid = pid_in(&fleet.expect_line("node sim started", Duration::from_secs(10)));
    fleet.expect_line("actor started", Duration::from_secs(10));
    assert!(alive(pid));
    fleet.signal(libc::SIGTERM);
    let status = fleet.wait(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(
        wait_gone(pid, Duration::from_secs(2)),
        "node {pid} outlived the launcher"
    );
    // The launcher's last lines may still be on their way from the output reader: wait for
    // the one that says the node stopped cleanly, instead of looking only at what came so far.
    if !fleet.seen.iter().any(|l| l.contains("node sim stopped (exit code 0)")) {
        fleet.expect_line("node sim stopped (exit code 0)", Duration::from_secs(10));
    }
}

#[test]
fn sigkill_to_launch_still_leaves_no_orphan() {
    let (file, _) = sim_fleet("sigkill-launch", 1);
    let mut fleet = Proc::launch(&file, &[]);
    let pid = pid_in(&fleet.expect_line("node sim started", Duration::from_secs(10)));
    fleet.expect_line("actor started", Duration::from_secs(10));
    fleet.signal(libc::SIGKILL);
    fleet.wait(Duration::from_secs(5));
    assert!(wait_gone(pid, Duration::from_secs(10)), "node {pid} was orphaned");
}

#[test]
fn a_node_killed_with_sigkill_is_restarted() {
    let (file, port) = sim_fleet("restart-node", 1);
    let mut fleet = Proc::launch(&file, &[]);
    let first = pid_in(&fleet.expect_line("node sim started", Duration::from_secs(10)));
    fleet.expect_line("actor started", Duration::from_secs(10));
    unsafe {
        libc::kill(first, libc::SIGKILL);
    }
    fleet.expect_line("node sim exited (signal 9); restarting", Duration::from_secs(10));
    let second = pid_in(&fleet.expect_line("node sim started", Duration::from_secs(10)));
    assert_ne!(first, second);
    fleet.expect_line("actor started", Duration::from_secs(10));
    let out = tool(&["node", "list", "--connect", &format!("tcp/127.0.0.1:{port}")]);
    assert!(
        text(&out.stdout).contains("sim_robot_r0"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn a_crashing_actor_is_restarted_until_the_policy_gives_up() {
    let port = free_port();
    let file = write_launch(
        "crash",
        &format!(
            r#"
[restart]
max_restarts = 2
window_s = 60
backoff_ms = 50
[robots]
count = 2
[[node]]
name = "n"
listen = ["tcp/127.0.0.1:{port}"]
[[node.actor]]
type = "sim_robot"
robots = ["r0"]
set = {{ sim = {{ rate_hz = 100.0 }}, fault = {{ panic_at_tick = 5 }} }}
[[node.actor]]
type = "sim_robot"
robots = ["r1"]
"#
        ),
    );
    let mut cmd = nanobot();
    cmd.args(["run", "--launch"]).arg(&file).args(["--node", "n"]);
    let mut node = Proc::spawn(cmd);
    node.expect_line("restarting", Duration::from_secs(10));
    node.expect_line("actor restarted", Duration::from_secs(10));
    node.expect_line("actor restarted", Duration::from_secs(10));
    let gave_up = node.expect_line("giving up", Duration::from_secs(10));
    assert!(gave_up.contains("actor sim_robot_r0 failed 3 times"), "{gave_up}");
    assert!(gave_up.contains("injected fault"), "{gave_up}");
    assert_eq!(node.wait(Duration::from_secs(15)).code(), Some(3));
}

#[test]
fn a_bad_launch_file_is_refused_with_file_and_line() {
    let file = write_launch(
        "bad",
        "[robots]\ncount = 2\n\n[[node]]\nname = \"a\"\n[[node.actor]]\ntype = \"sim_robo\"\n",
    );
    let shown = file.display().to_string();
    for args in [vec!["launch"], vec!["run", "--node", "a", "--launch"]] {
        let mut cmd = nanobot();
        cmd.args(&args).arg(&file);
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!("{shown}:7: unknown actor type \"sim_robo\"")),
            "{err}"
        );
    }
    // A bad actor config is named with the launch file line of the actor.
    let file = write_launch("badcfg", "[robots]\ncount = 1\n[[node]]\nname = \"a\"\n[[node.actor]]\ntype = \"sim_robot\"\nfor_each_robot = true\nset = { sim = { rate_hz = -1.0 } }\n");
    let out = nanobot()
        .args(["run", "--node", "a", "--launch"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("{}:5", file.display())) && err.contains("rate_hz"),
        "{err}"
    );
}
