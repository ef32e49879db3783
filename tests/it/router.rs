//! A fleet across hosts: the shipped `launch/router_fleet.toml` with each node in a network
//! namespace of its own (robot0, robot1, the APU node, the router), joined only through the
//! Zenoh router; the test's own session, an engineer's, reaches the fleet through the router
//! too. A robot is cut off for 30 s while it runs.

use crate::common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::netns::Net;
use common::*;
use nanobot_actors::bus::{Bus, BusConfig, Mode};
use nanobot_actors::keys::SigningKey;
use nanobot_messages::{ActionChunk, AdapterBytes, AdapterRequest, Blob, LogAck, PolicyStatus, Promoted};
use nanobot_policy::runner::Runner;

/// Robot r0's node loses its link for 30 s: it keeps acting on its own policy with no missed
/// tick, its spool keeps what it produces, and once the link is back the logger on the APU
/// node gets all of it: the dataset ends with every observation once, in order, through the
/// partition. Robot r1's data flows on meanwhile. A rollout announced during the partition
/// reaches r1 at once and r0 after it, and r0 acts on nothing but the base before it has the
/// whole adapter.
#[test]
fn a_robot_cut_off_from_the_router_for_30_s_keeps_acting_and_back_fills_its_data() {
    let Some(net) = Net::new(&["router", "robot0", "robot1", "apu"]) else {
        return;
    };
    let work = temp_dir("router-fleet");
    let base = tiny_base(&work);
    // The fleet key the robots trust (the test plays the promoter).
    let keys = work.join("state/nb/keys");
    let out = tool(&["keys", "init", keys.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let key = SigningKey::load(&keys.join("fleet.key")).unwrap();
    let runner = Runner::load(&base, None).unwrap();
    let id = "tiny-base+lora.partition";
    let bytes = crate::promotion::adapter(&runner, id, |_| {});
    let router = format!("tcp/{}:7447", net.addr("router"));
    let node = |name: &str| {
        let mut c = nanobot();
        c.args(["run", "--launch"])
            .arg(repo().join("launch/router_fleet.toml"))
            .args(["--node", name])
            .env("NB_ROUTER_HOST", net.addr("router"))
            .env("NB_CHECKPOINT", &base)
            .env("NB_DATA", work.join("data"))
            .env("NB_STATE", work.join("state"));
        Proc::spawn(net.inside(if name == "router" { "router" } else { name }, &c))
    };
    let mut nodes = vec![node("router")];
    nodes[0].expect_line("node starting", Duration::from_secs(30));
    for (name, actors) in [("robot0", 4), ("robot1", 4), ("apu", 4)] {
        let mut p = node(name);
        p.expect_actors(actors, Duration::from_secs(60));
        nodes.push(p);
    }

    // The engineer's session: a client of the router, from outside every robot's namespace.
    let rt = runtime();
    let bus = rt
        .block_on(Bus::open(
            &BusConfig {
                mode: Mode::Client,
                connect: vec![router.clone()],
                ..BusConfig::default()
            },
            "nb",
        ))
        .unwrap();
    let (metrics, _stats) = StatsBoard::follow(&rt, &bus);
    let acks: Arc<Mutex<HashMap<String, (Instant, LogAck)>>> = Arc::default();
    let a = acks.clone();
    let _acks = rt
        .block_on(bus.subscribe_callback::<LogAck>("nb/log/*/ack", move |r| {
            let robot = r.key.as_str().split('/').nth(2).unwrap_or("").to_string();
            a.lock().unwrap().insert(robot, (Instant::now(), r.msg));
        }))
        .unwrap();
    let rows = |robot: &str| acks.lock().unwrap().get(robot).map(|(_, a)| a.rows).unwrap_or(0);
    // What each robot reports running, and every adapter its chunks were made with.
    let running: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let acted: Arc<Mutex<HashMap<String, std::collections::BTreeSet<String>>>> = Arc::default();
    let r = running.clone();
    let _status = rt
        .block_on(bus.subscribe_callback::<PolicyStatus>("nb/*/policy", move |m| {
            r.lock().unwrap().insert(m.header.robot.clone(), m.msg.adapter_id);
        }))
        .unwrap();
    let ac = acted.clone();
    let _chunks = rt
        .block_on(bus.subscribe_callback::<ActionChunk>("nb/*/act", move |m| {
            ac.lock()
                .unwrap()
                .entry(m.header.robot.clone())
                .or_default()
                .insert(m.msg.adapter_version);
        }))
        .unwrap();
    let runs = |robot: &str| running.lock().unwrap().get(robot).cloned().unwrap_or_default();
    let q = rt
        .block_on(bus.queryable::<AdapterRequest>("nb/ckpt/adapter", 16))
        .unwrap();
    let served = bytes.clone();
    rt.spawn(async move {
        while let Some(req) = q.recv().await {
            let reply = AdapterBytes {
                adapter_id: String::new(),
                sha256: req.msg.sha256.clone(),
                data: Blob::new(served.clone()),
            };
            let _ = req.reply("", &reply).await;
        }
    });
    let announce = rt
        .block_on(bus.publisher::<Promoted>("nb/ckpt/promoted", "", nanobot_actors::bus::PubQos::Control))
        .unwrap();
    wait_until(
        "both robots' rows logged through the router",
        Duration::from_secs(60),
        || rows("r0") >= 40 && rows("r1") >= 40,
    );
    wait_until("robot0's Stats", Duration::from_secs(10), || {
        metrics.get("policy_r0", "chunks") > 0.0 || metrics.get("sim_robot_r0", "episodes") > 0.0
    });
    std::thread::sleep(Duration::from_millis(1500));
    let missed = || {
        (
            metrics.get("sim_robot_r0", "missed_actions"),
            metrics.get("policy_r0", "missed_deadlines"),
        )
    };
    let missed_before = missed();
    let ingest_before = metrics.get("ingest_r0", "observations");

    net.cut("robot0");
    let cut_at = Instant::now();
    let rows_at_cut = rows("r0");
    std::thread::sleep(Duration::from_secs(10));
    // Cut off: nothing of r0's reaches the logger (its last acknowledgement is old), while r1's
    // rows go on.
    let r1_during = rows("r1");
    let r0_during = rows("r0");
    // A rollout now, announced (signed, fresh) every half second as a promoter does.
    let manifest = crate::promotion::manifest(&key, id, &runner.meta.version, &bytes);
    let announcing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let go = announcing.clone();
    let announcer = std::thread::spawn(move || {
        while go.load(std::sync::atomic::Ordering::Relaxed) {
            // put_wait: this thread has no runtime, and a put never blocks.
            let _ = announce.put_wait(&crate::promotion::rollout(&key, 1, Some(manifest.clone())), None);
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    wait_until(
        "r1 on the new adapter during the partition",
        Duration::from_secs(15),
        || runs("r1") == id,
    );
    // The rest of the 30 s.
    std::thread::sleep(Duration::from_secs(30).saturating_sub(cut_at.elapsed()));
    assert_eq!(runs("r0"), "", "r0 cannot have it while cut off");
    assert!(rows("r1") > r1_during + 200, "r1 logs on during r0's partition");
    assert!(
        rows("r0") <= r0_during + 5 && r0_during <= rows_at_cut + 40,
        "r0 is really cut off: {rows_at_cut} rows at the cut, {r0_during} after 10 s, {} after 30 s",
        rows("r0")
    );
    net.heal("robot0");
    let cut_for = cut_at.elapsed();
    let healed = Instant::now();
    wait_until(
        "r0 on the new adapter after the partition",
        Duration::from_secs(40),
        || runs("r0") == id,
    );
    eprintln!(
        "the rollout announced during the partition: r0 runs it {:.1} s after the link came back",
        healed.elapsed().as_secs_f64()
    );
    announcing.store(false, std::sync::atomic::Ordering::Relaxed);
    announcer.join().unwrap();
    let r0_adapters = acted.lock().unwrap().get("r0").cloned().unwrap_or_default();
    assert!(
        r0_adapters.iter().all(|a| a.is_empty() || a == id),
        "r0 acted only on the base, then on the whole adapter: {r0_adapters:?}"
    );

    // Back: the spool back-fills, and robot0's Stats come through again.
    wait_until("r0's rows of the partition logged", Duration::from_secs(90), || {
        rows("r0") as f64 >= rows_at_cut as f64 + cut_for.as_secs_f64() * 20.0 * 0.9
    });
    wait_until("robot0's Stats after the partition", Duration::from_secs(30), || {
        metrics.get("ingest_r0", "observations") > ingest_before + 500.0 && metrics.get("spool_r0", "backlog") < 100.0
    });
    let missed_after = missed();
    let spool_dropped = metrics.get("spool_r0", "dropped_over_budget");
    let ingest_skipped = metrics.get("ingest_r0", "decimated") + metrics.get("ingest_r0", "stale");
    let last = acks.lock().unwrap()["r0"].1.clone();
    eprintln!(
        "partition of {:.1} s: rows {rows_at_cut} at the cut, {} now; missed (actions, deadlines) {missed_before:?} → {missed_after:?}",
        cut_for.as_secs_f64(),
        last.rows
    );
    assert_eq!(
        missed_after, missed_before,
        "robot0 acted on every tick through the partition"
    );
    assert_eq!(spool_dropped, 0.0);

    // The dataset, as durable as the last acknowledgement says: every tick once, in order,
    // across the partition (a tick may be missing only where ingest itself skipped one).
    drop(nodes);
    let (_, stored) = nanobot_dataset::read_dataset(&work.join("data/nb/r0")).unwrap();
    let seqs: Vec<u64> = stored.iter().map(|r| r.seq).collect();
    assert!(
        seqs.len() as u64 >= last.rows,
        "{} rows stored, {} acknowledged",
        seqs.len(),
        last.rows
    );
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing: no tick twice, none out of order"
    );
    let missing: u64 = seqs.windows(2).map(|w| w[1] - w[0] - 1).sum();
    let widest = seqs.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    eprintln!(
        "r0: {} rows, ticks {}..={}, {missing} missing (ingest skipped {ingest_skipped}), widest step {widest}",
        seqs.len(),
        seqs[0],
        seqs.last().unwrap()
    );
    assert!(widest <= 3, "no gap through the partition: widest step {widest}");
    assert!(
        missing as f64 <= ingest_skipped,
        "{missing} ticks missing, ingest skipped {ingest_skipped}"
    );
    let report = nanobot_dataset::verify(&work.join("data/nb/r0")).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
}

/// The same across hosts without a router: `launch/two_nodes.toml` with the robots' node and the
/// APU node in network namespaces of their own, peer to peer (the robots' node connects to the
/// APU's address). The APU's experts answer the robots' state frames across the link, and an
/// engineer's tools, from a third host, see both nodes through the APU.
#[test]
fn the_two_node_fleet_runs_peer_to_peer_across_two_hosts() {
    let Some(net) = Net::new(&["apu", "robot"]) else {
        return;
    };
    let work = temp_dir("p2p-hosts");
    let node = |name: &str| {
        let mut c = nanobot();
        c.args(["run", "--launch"])
            .arg(repo().join("launch/two_nodes.toml"))
            .args(["--node", name])
            .env("NB_APU_HOST", net.addr("apu"))
            .env("NB_DATA", work.join("data"))
            .env("NB_STATE", work.join("state"))
            .env("NB_CHECKPOINT", work.join("no-base-yet.safetensors"));
        Proc::spawn(net.inside(name, &c))
    };
    let mut apu = node("apu");
    apu.expect_actors(4, Duration::from_secs(30));
    let mut robot = node("robot");
    robot.expect_actors(8, Duration::from_secs(30));
    let ep = format!("tcp/{}:7448", net.addr("apu"));
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
    let chunks: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(chunks.len(), 3);
    assert!(chunks.iter().all(|c| c["msg"]["source"] == "Expert"));
    let out = tool(&["node", "list", "--connect", &ep]);
    let listing = text(&out.stdout);
    for (node, actor) in [
        ("apu", "expert_r1"),
        ("apu", "trainer"),
        ("robot", "sim_robot_r1"),
        ("robot", "spool_r1"),
    ] {
        assert!(
            listing.lines().any(|l| l.starts_with(node) && l.contains(actor)),
            "{node}/{actor} missing:\n{listing}"
        );
    }
    // The robots act on what comes back across the link: their episodes end in success.
    let out = tool(&[
        "topic",
        "echo",
        "nb/r0/event",
        "--json",
        "--count",
        "8",
        "--timeout",
        "30",
        "--connect",
        &ep,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("\"success\":true"), "{}", text(&out.stdout));
}
