//! End-to-end: telemetry ingest and crash-safe logging with real processes, real Zenoh
//! sessions, real UDP and a real pseudo-terminal, and pyarrow reading the files.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::net::UdpSocket;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use nanobot_messages::device::{DeviceFrame, Sensor};
use nanobot_messages::{Event, LogAck, Observation, Reject};

/// The four device frames of one robot tick: camera, surface, action, then state.
fn tick_frames(robot: &str, i: u32, jpeg: &[u8]) -> Vec<Vec<u8>> {
    let stamp_ns = 1_000_000_000 + i as u64 * 50_000_000;
    let frame = |sensor, payload| {
        DeviceFrame {
            sensor,
            robot: robot.into(),
            seq: i,
            stamp_ns,
            payload,
        }
        .encode()
    };
    let x = i as f32 * 0.01;
    vec![
        frame(Sensor::Camera, jpeg.to_vec().into()),
        frame(Sensor::Surface, DeviceFrame::surface_payload(8, 8, &[0.25; 64])),
        frame(Sensor::Action, DeviceFrame::f32_payload(&[0.5, -x])),
        frame(Sensor::State, DeviceFrame::f32_payload(&[x, 0.5, 0.0, 0.0, 0.9, 0.9])),
    ]
}

fn sim_jpeg() -> Vec<u8> {
    nanobot_sim::SimRobot::new(nanobot_sim::SimConfig::default())
        .unwrap()
        .render_jpeg(85)
}

/// `nanobot collect` listening on a fresh UDP port, writing under `out`: (process, port).
fn collect_udp(out: &Path) -> (Proc, u16) {
    let udp = free_udp();
    let mut c = nanobot();
    c.args(["collect", "--udp", &format!("127.0.0.1:{udp}"), "--out"])
        .arg(out);
    let mut p = Proc::spawn(c);
    p.expect_line("listening on udp", Duration::from_secs(20));
    (p, udp)
}

fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn check_with_python(root: &Path) -> Vec<u64> {
    let script = repo().join("dataset/tests/check_lerobot.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check_lerobot.py (needs pyarrow: `pip install pyarrow`, .ci/run installs it) failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["seqs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect()
}

#[test]
fn every_acknowledged_row_survives_ten_kill_9s_of_the_logger() {
    let port = free_port();
    let data = temp_dir("kill9-data");
    let file = write_launch(
        "kill9",
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
[[node]]
name = "log"
connect = ["tcp/127.0.0.1:{port}"]
[[node.actor]]
type = "logger"
for_each_robot = true
config = "@CONFIGS@/logger.toml"
set = {{ root = "{root}/{{robot}}", flush_ms = 20, file_max_age_s = 0.3, fps = 50.0 }}
"#,
            root = data.display()
        ),
    );
    let run = |node: &str| {
        let mut c = nanobot();
        c.args(["run", "--launch"]).arg(&file).args(["--node", node]);
        Proc::spawn(c)
    };
    let mut robot = run("robot");
    robot.expect_actors(3, Duration::from_secs(30));
    let rt = runtime();
    let bus = rt.block_on(client(port));
    let acks = Arc::new(Mutex::new(Vec::<u64>::new()));
    let a = acks.clone();
    // (An empty dataset's heartbeat acknowledges nothing: rows 0.)
    let _sub = rt
        .block_on(bus.subscribe_callback::<LogAck>("nb/log/r0/ack", move |r| {
            if r.msg.rows > 0 {
                a.lock().unwrap().push(r.msg.last_seq)
            }
        }))
        .unwrap();
    // Every observation ingest published, to check what each run of the logger acknowledged.
    let published = Arc::new(Mutex::new(std::collections::BTreeSet::<u64>::new()));
    let p = published.clone();
    let _obs = rt
        .block_on(bus.subscribe_callback::<Observation>("nb/r0/obs", move |r| {
            p.lock().unwrap().insert(r.header.seq);
        }))
        .unwrap();
    let n_acks = || acks.lock().unwrap().len();
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut killed_with_open_journal = 0;
    // The acks of each run of the logger: [start, end) in `acks`.
    let mut runs = Vec::new();
    for round in 0..10 {
        let before = n_acks();
        let mut logger = run("log");
        wait_until(&format!("acks in round {round}"), Duration::from_secs(30), || {
            n_acks() >= before + 3
        });
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis((rng >> 33) % 400));
        logger.signal(libc::SIGKILL);
        logger.wait(Duration::from_secs(10));
        runs.push(before..n_acks());
        let journals = std::fs::read_dir(data.join("r0/journal"))
            .map(|d| d.count())
            .unwrap_or(0);
        killed_with_open_journal += (journals > 0) as usize;
    }
    eprintln!("{killed_with_open_journal} of 10 kills left a journal to recover");
    assert!(
        killed_with_open_journal >= 3,
        "the kills should land while a file is open"
    );
    // A last run recovers the journal and stops cleanly.
    let before = n_acks();
    let mut logger = run("log");
    wait_until("acks after the last restart", Duration::from_secs(30), || {
        n_acks() >= before + 3
    });
    logger.signal(libc::SIGTERM);
    assert!(logger.wait(Duration::from_secs(20)).success());
    runs.push(before..n_acks());
    drop(robot);

    let root = data.join("r0");
    let (_, rows) = nanobot_dataset::read_dataset(&root).unwrap();
    let mut count: HashMap<u64, usize> = HashMap::new();
    for r in &rows {
        *count.entry(r.seq).or_default() += 1;
    }
    let dup: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dup.is_empty(), "sequence numbers stored twice: {dup:?}");
    let acked = acks.lock().unwrap().clone();
    let missing: Vec<_> = acked.iter().filter(|s| !count.contains_key(s)).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    // An ack covers every row the logger had received up to its seq, not only that seq: within
    // one run, every observation published between its first and last ack is stored.
    let published = published.lock().unwrap().clone();
    let mut covered = 0;
    for r in &runs {
        // A run's first acknowledgement restates what its start recovered (rows made durable
        // by the run before, perhaps after that run's last acknowledgement): the observations
        // published between the two runs were never received. What the run itself received
        // is covered from its second on.
        let acks_of_run = &acked[r.start + 1..r.end];
        assert!(acks_of_run.len() >= 2, "each run acknowledged rows: {acks_of_run:?}");
        let (first, last) = (acks_of_run[0], *acks_of_run.last().unwrap());
        let lost: Vec<u64> = published
            .range(first + 1..=last)
            .filter(|s| !count.contains_key(s))
            .copied()
            .collect();
        assert!(lost.is_empty(), "acknowledged by {last} but not stored: {lost:?}");
        covered += published.range(first + 1..=last).count();
    }
    assert!(covered >= 100, "the acks covered {covered} published rows");
    let report = nanobot_dataset::verify(&root).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    eprintln!(
        "{} rows in {} files, {} acknowledgements, all present once",
        rows.len(),
        report.files_checked,
        acked.len()
    );
    let mut seqs = check_with_python(&root);
    seqs.sort();
    assert_eq!(
        seqs,
        rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        "pyarrow reads exactly the stored rows"
    );
}

/// Store-and-forward: with a spool on the robot's node, the logger killed eight times (and left
/// down for up to a second each time) still ends with every observation and every event the
/// robot produced, each exactly once, in the order produced.
#[test]
fn with_a_spool_nothing_is_lost_or_stored_twice_across_eight_kill_9s_of_the_logger() {
    let port = free_port();
    let data = temp_dir("spool-kill9");
    let file = write_launch(
        "spool-kill9",
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
type = "spool"
for_each_robot = true
config = "@CONFIGS@/spool.toml"
set = {{ dir = "{root}/spool/{{robot}}", segment_kb = 256, resend_after_ms = 300 }}
[[node]]
name = "log"
connect = ["tcp/127.0.0.1:{port}"]
[[node.actor]]
type = "logger"
for_each_robot = true
config = "@CONFIGS@/logger.toml"
set = {{ root = "{root}/data/{{robot}}", source = "spool", flush_ms = 20, file_max_age_s = 0.3, fps = 50.0 }}
"#,
            root = data.display()
        ),
    );
    let run = |node: &str| {
        let mut c = nanobot();
        c.args(["run", "--launch"]).arg(&file).args(["--node", node]);
        Proc::spawn(c)
    };
    let mut robot = run("robot");
    robot.expect_actors(4, Duration::from_secs(30));
    let rt = runtime();
    let bus = rt.block_on(client(port));
    let acks = Arc::new(Mutex::new(Vec::<LogAck>::new()));
    let a = acks.clone();
    let _sub = rt
        .block_on(bus.subscribe_callback::<LogAck>("nb/log/r0/ack", move |r| a.lock().unwrap().push(r.msg)))
        .unwrap();
    // What the robot produced, as (seq, stamp), in order.
    let produced = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
    let p = produced.clone();
    let _obs = rt
        .block_on(bus.subscribe_callback::<Observation>("nb/r0/obs", move |r| {
            p.lock().unwrap().push((r.header.seq, r.header.stamp_ns))
        }))
        .unwrap();
    let events = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
    let e = events.clone();
    let _ev = rt
        .block_on(bus.subscribe_callback::<Event>("nb/r0/event", move |r| {
            e.lock().unwrap().push((r.header.seq, r.header.stamp_ns))
        }))
        .unwrap();
    let n_acks = || acks.lock().unwrap().len();
    let mut rng = 0x2545f4914f6cdd1du64;
    let mut next = || {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        rng >> 33
    };
    for round in 0..8 {
        let before = n_acks();
        let mut logger = run("log");
        wait_until(&format!("acks in round {round}"), Duration::from_secs(30), || {
            n_acks() >= before + 3
        });
        std::thread::sleep(Duration::from_millis(next() % 600));
        logger.signal(libc::SIGKILL);
        logger.wait(Duration::from_secs(10));
        // Down for a while: the robot goes on producing.
        std::thread::sleep(Duration::from_millis(200 + next() % 800));
    }
    // A last run: it must catch up with everything produced before it started, and more.
    let until = *produced.lock().unwrap().last().expect("observations were produced");
    let until_event = *events.lock().unwrap().last().expect("events were produced");
    let mut logger = run("log");
    wait_until("the logger to catch up with the spool", Duration::from_secs(60), || {
        acks.lock().unwrap().last().is_some_and(|a| {
            a.last.is_some_and(|m| m.stamp_ns > until.1) && a.last_event.is_some_and(|m| m.stamp_ns >= until_event.1)
        })
    });
    logger.signal(libc::SIGTERM);
    assert!(logger.wait(Duration::from_secs(20)).success());
    drop(robot);

    let last = acks.lock().unwrap().last().cloned().unwrap();
    let (acked, acked_event) = (last.last.unwrap(), last.last_event.unwrap());
    let root = data.join("data/r0");
    let (_, rows) = nanobot_dataset::read_dataset(&root).unwrap();
    let stored: Vec<(u64, u64)> = rows.iter().map(|r| (r.seq, r.stamp_ns)).collect();
    let produced = produced.lock().unwrap().clone();
    let upto = produced.iter().position(|p| *p == (acked.seq, acked.stamp_ns)).unwrap() + 1;
    let mut count: HashMap<(u64, u64), usize> = HashMap::new();
    for r in &stored {
        *count.entry(*r).or_default() += 1;
    }
    let dup = count.values().filter(|n| **n > 1).count();
    let lost = produced[..upto].iter().filter(|p| !count.contains_key(p)).count();
    eprintln!(
        "observations: {upto} produced up to the last acknowledgement, {} logged, {lost} lost, {dup} stored twice",
        stored.len()
    );
    assert_eq!((lost, dup), (0, 0));
    // The test's subscription started after the robot: its first observation is somewhere in.
    let from = stored.iter().position(|s| *s == produced[0]).unwrap();
    assert_eq!(
        stored[from..from + upto],
        produced[..upto],
        "every observation once, in the order produced"
    );

    let (logged, _, bad) = nanobot_dataset::read_events(&root, 0).unwrap();
    assert_eq!(bad, 0);
    let logged: Vec<(u64, u64)> = logged.iter().map(|e| (e.seq, e.stamp_ns)).collect();
    let events = events.lock().unwrap().clone();
    let upto = events
        .iter()
        .position(|p| *p == (acked_event.seq, acked_event.stamp_ns))
        .unwrap()
        + 1;
    eprintln!(
        "events: {upto} produced up to the last acknowledgement, {} logged",
        logged.len()
    );
    assert!(upto >= 10, "{upto} events");
    let from = logged.iter().position(|s| *s == events[0]).unwrap();
    assert_eq!(
        logged[from..from + upto],
        events[..upto],
        "every event once, in the order produced"
    );
    let report = nanobot_dataset::verify(&root).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
}

#[test]
fn ingest_rejects_bad_frames_and_keeps_every_good_one() {
    let (port, udp) = (free_port(), free_udp());
    let file = write_launch(
        "ingest-udp",
        &format!(
            r#"
[[node]]
name = "edge"
listen = ["tcp/127.0.0.1:{port}"]
[[node.actor]]
type = "ingest"
config = "@CONFIGS@/ingest.toml"
set = {{ zenoh = false, udp = "127.0.0.1:{udp}" }}
"#
        ),
    );
    let mut c = nanobot();
    c.args(["run", "--launch"]).arg(&file).args(["--node", "edge"]);
    let mut node = Proc::spawn(c);
    node.expect_actors(1, Duration::from_secs(30));
    let rt = runtime();
    let bus = rt.block_on(client(port));
    let obs = Arc::new(Mutex::new(Vec::<(u64, Observation)>::new()));
    let rejects = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let o = obs.clone();
    let _s1 = rt
        .block_on(
            bus.subscribe_callback::<Observation>("nb/esp1/obs", move |r| {
                o.lock().unwrap().push((r.header.seq, r.msg))
            }),
        )
        .unwrap();
    let rj = rejects.clone();
    let _s2 = rt
        .block_on(bus.subscribe_callback::<Reject>("nb/*/rejects", move |r| {
            let who = if r.key.as_str() == "nb/probe/rejects" {
                "probe:"
            } else {
                ""
            };
            *rj.lock().unwrap().entry(format!("{who}{}", r.msg.reason)).or_default() += 1;
        }))
        .unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Readiness: probe with a frame of robot "probe" that ingest refuses (a 1-value state)
    // until its reject reaches us: the subscriptions above are then known to the node.
    let probe = DeviceFrame {
        sensor: Sensor::State,
        robot: "probe".into(),
        seq: 0,
        stamp_ns: 1,
        payload: DeviceFrame::f32_payload(&[1.0]),
    }
    .encode();
    wait_until("a probe's reject", Duration::from_secs(20), || {
        sock.send_to(&probe, ("127.0.0.1", udp)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        rejects.lock().unwrap().contains_key("probe:size")
    });
    let send = |b: &[u8]| {
        sock.send_to(b, ("127.0.0.1", udp)).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    };
    let jpeg = sim_jpeg();
    for i in 0..30u32 {
        let frames = tick_frames("esp1", i, &jpeg);
        match i % 6 {
            1 => send(b"\x00\x01 not a frame at all"),
            2 => send(&frames[3][..20]),
            3 => {
                let mut bad = frames[3].clone();
                bad[40] ^= 0x55;
                send(&bad);
            }
            4 => {
                // Same seq, NaN in the state: out of range.
                let mut nan = tick_frames("esp1", i, &jpeg).remove(3);
                nan.truncate(nan.len() - 4);
                nan[36..40].copy_from_slice(&f32::NAN.to_le_bytes());
                let crc = crc32(&nan);
                nan.extend_from_slice(&crc.to_le_bytes());
                send(&nan);
            }
            5 => send(
                &DeviceFrame {
                    sensor: Sensor::Camera,
                    robot: "esp1".into(),
                    seq: 9999,
                    stamp_ns: 1,
                    payload: b"\xff\xd8 broken".to_vec().into(),
                }
                .encode(),
            ),
            _ => {}
        }
        for f in &frames {
            send(f);
        }
    }
    wait_until("30 observations", Duration::from_secs(10), || {
        obs.lock().unwrap().len() >= 30
    });
    wait_until("25 rejects", Duration::from_secs(10), || {
        rejects
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| !k.starts_with("probe:"))
            .map(|(_, n)| n)
            .sum::<u64>()
            >= 25
    });
    let got = obs.lock().unwrap();
    assert_eq!(
        got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (0..30).collect::<Vec<_>>()
    );
    for (seq, o) in got.iter() {
        assert_eq!(o.frame_index, *seq);
        assert_eq!(o.action, vec![0.5, -(*seq as f32) * 0.01]);
        assert_eq!(o.state[0], *seq as f32 * 0.01);
        assert_eq!(o.image.data.to_bytes().as_ref(), &jpeg[..]);
        assert_eq!(o.surface.cells.len(), 64);
    }
    let mut r = rejects.lock().unwrap().clone();
    r.retain(|k, _| !k.starts_with("probe:"));
    for (reason, n) in [("decode", 5), ("size", 5), ("crc", 5), ("range", 5), ("image", 5)] {
        assert_eq!(r.get(reason), Some(&n), "rejects by reason: {r:?}");
    }
    // Datagrams are counted apart from frames: an empty one is counted, not ignored.
    sock.send_to(b"", ("127.0.0.1", udp)).unwrap();
    let stats = Arc::new(Mutex::new(Vec::<nanobot_messages::Stats>::new()));
    let st = stats.clone();
    let _s3 = rt
        .block_on(
            bus.subscribe_callback::<nanobot_messages::Stats>("nb/node/edge/ingest", move |r| {
                st.lock().unwrap().push(r.msg)
            }),
        )
        .unwrap();
    let metric = |name: &str| {
        stats
            .lock()
            .unwrap()
            .last()
            .and_then(|s| s.extra.iter().find(|m| m.name == name).map(|m| m.value))
    };
    wait_until("the empty datagram counted", Duration::from_secs(10), || {
        metric("udp.empty") == Some(1.0)
    });
    // 5 garbage datagrams, 5 truncated, 5 with a bad CRC: each one datagram with errors.
    assert_eq!(metric("udp.with_errors"), Some(15.0));
    // Rejects are not transport losses: every frame arrived, so none is lost.
    assert_eq!(metric("lost"), Some(0.0));
}

fn crc32(b: &[u8]) -> u32 {
    // Bitwise CRC-32 (IEEE), written out as an ESP32 firmware would, to check the documented format.
    let mut crc = 0xffff_ffffu32;
    for &byte in b {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn collect_writes_datasets_from_udp_and_verify_names_damage() {
    let out = temp_dir("collect");
    let (mut p, udp) = collect_udp(&out);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let jpeg = sim_jpeg();
    for i in 0..20u32 {
        if i == 7 {
            sock.send_to(b"garbage", ("127.0.0.1", udp)).unwrap();
        }
        // Two robots interleaved; all four frames of a tick in one datagram.
        for robot in ["esp2", "esp3"] {
            sock.send_to(&tick_frames(robot, i, &jpeg).concat(), ("127.0.0.1", udp))
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    p.expect_line("collect: 40 observations", Duration::from_secs(20));
    p.signal(libc::SIGINT);
    assert!(p.wait(Duration::from_secs(20)).success(), "{}", p.seen.join("\n"));
    let summary = p.all_lines(Duration::from_secs(10));
    assert!(summary.contains("esp2: 20 rows"), "{summary}");
    assert!(summary.contains("\"decode\": 1"), "{summary}");
    for robot in ["esp2", "esp3"] {
        assert_eq!(check_with_python(&out.join(robot)), (0..20).collect::<Vec<_>>());
    }
    let verify = |dir: &Path| nanobot().arg("verify").arg(dir).output().unwrap();
    let ok = verify(&out);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stdout));
    let data = out.join("esp2/data/chunk-000/file-000.parquet");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[100] ^= 0x04;
    std::fs::write(&data, bytes).unwrap();
    let bad = verify(&out);
    let text = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1));
    assert!(text.contains(&format!("{}: sha256", data.display())), "{text}");
    std::fs::remove_file(&data).unwrap();
    let gone = verify(&out.join("esp2"));
    let text = String::from_utf8_lossy(&gone.stdout);
    assert_eq!(gone.status.code(), Some(1));
    assert!(text.contains(&format!("{}: missing", data.display())), "{text}");
}

#[test]
fn collect_refuses_robot_ids_that_are_not_safe_directory_names() {
    let base = temp_dir("collect-ids");
    let out = base.join("out");
    let (mut p, udp) = collect_udp(&out);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let jpeg = sim_jpeg();
    for i in 0..5u32 {
        for robot in ["..", ".", ".hidden", "unknown", "ok1"] {
            sock.send_to(&tick_frames(robot, i, &jpeg).concat(), ("127.0.0.1", udp))
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    p.expect_line("collect: 5 observations", Duration::from_secs(20));
    p.signal(libc::SIGINT);
    assert!(p.wait(Duration::from_secs(20)).success());
    // Only the good robot has a dataset; nothing was written beside or into --out itself.
    let mut made: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    made.sort();
    assert_eq!(made, ["ok1"]);
    let beside: Vec<String> = std::fs::read_dir(&base)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(beside, ["out"], "nothing written into the parent of --out");
    let summary = p.all_lines(Duration::from_secs(10));
    // 4 bad ids × 5 ticks × 4 frames, counted under the reserved name.
    assert!(
        summary.contains("collect: unknown:") && summary.contains("\"decode\": 80"),
        "{summary}"
    );
    let ok = nanobot().arg("verify").arg(&out).output().unwrap();
    assert!(ok.status.success(), "{}", text(&ok.stdout));
}

#[test]
fn collect_reads_device_frames_from_a_serial_port() {
    // A real pseudo-terminal: the collector configures the slave side as a serial port.
    let (mut master, slave) = openpty();
    let out = temp_dir("serial");
    let mut c = nanobot();
    c.args(["collect", "--serial", &slave, "--baud", "921600", "--out"])
        .arg(&out);
    let mut p = Proc::spawn(c);
    // Printed once the port is open and in raw mode: bytes written now arrive as they are.
    p.expect_line("reading", Duration::from_secs(20));
    let jpeg = sim_jpeg();
    let mut stream = Vec::new();
    for i in 0..10u32 {
        stream.extend(tick_frames("uart1", i, &jpeg).concat());
        if i == 4 {
            stream.extend_from_slice(b"\r\nboot: noise on the line\r\n");
        }
    }
    use std::io::Write;
    for piece in stream.chunks(61) {
        master.write_all(piece).unwrap();
    }
    master.flush().unwrap();
    p.expect_line("collect: 10 observations", Duration::from_secs(20));
    p.signal(libc::SIGTERM);
    assert!(p.wait(Duration::from_secs(20)).success());
    assert_eq!(check_with_python(&out.join("uart1")), (0..10).collect::<Vec<_>>());
}

fn openpty() -> (std::fs::File, String) {
    use std::os::fd::FromRawFd;
    let (mut m, mut s) = (0, 0);
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: openpty fills the two descriptors and the name buffer it is given.
    let rc = unsafe { libc::openpty(&mut m, &mut s, name.as_mut_ptr(), std::ptr::null(), std::ptr::null()) };
    assert_eq!(rc, 0, "openpty failed");
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    // Keep the slave open in this process too, so the line stays up; leak it for the test's life.
    std::mem::forget(unsafe { std::fs::File::from_raw_fd(s) });
    (unsafe { std::fs::File::from_raw_fd(m) }, path)
}
