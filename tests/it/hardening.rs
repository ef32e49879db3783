//! Inputs that cannot hurt (issue 25): a decompression bomb sent to a live robot's policy is
//! refused before it is decoded, counted by reason, the node's memory stays where it was, and the
//! robot keeps acting.

use crate::common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use nanobot_actors::bus::PubQos;
use nanobot_messages::{ActionChunk, Blob, Encoding, Grid, Image, Observation, Stats};
use nanobot_policy::preprocess::jpeg_header_declaring;

/// Resident memory of a process, MB.
fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

#[test]
fn a_jpeg_bomb_on_the_bus_is_refused_counted_and_the_robot_keeps_acting() {
    let dir = temp_dir("jpeg-bomb");
    let base = tiny_base(&dir);
    let port = free_port();
    // Without a fleet key: the policy never needs one here.
    let file = write_launch(
        "jpeg-bomb",
        &policy_fleet("\"r0\"", port, &dir.join("no-key.pub"), &base, ""),
    );
    // The node in this process's child, so that its memory is the child's.
    let mut cmd = nanobot();
    cmd.args(["run", "--node", "fleet", "--launch"]).arg(&file);
    let mut node = Proc::spawn(cmd);
    node.expect_line("policy loaded", Duration::from_secs(30));
    let pid = node.child.id();

    let rt = runtime();
    let bus = rt.block_on(client(port));
    let chunks = Arc::new(Mutex::new(0u64));
    let metrics = Arc::new(Mutex::new(BTreeMap::<String, f64>::new()));
    let c = chunks.clone();
    let _a = rt
        .block_on(bus.subscribe_callback::<ActionChunk>("nb/r0/act", move |_| *c.lock().unwrap() += 1))
        .unwrap();
    let m = metrics.clone();
    let _s = rt
        .block_on(bus.subscribe_callback::<Stats>("nb/node/fleet/policy_r0", move |r| {
            *m.lock().unwrap() = r.msg.extra.iter().map(|x| (x.name.clone(), x.value)).collect();
        }))
        .unwrap();
    wait_until("r0 acting", Duration::from_secs(30), || *chunks.lock().unwrap() > 5);
    let rss_before = rss_mb(pid);

    // 100 bytes that declare 65,535 × 65,535 pixels (12 GiB of RGB), as robot r0's observation.
    let forged = rt
        .block_on(bus.publisher::<Observation>("nb/r0/obs", "r0", PubQos::Sensor))
        .unwrap();
    let bomb = Observation {
        episode: 0,
        frame_index: 0,
        task: 0,
        image: Image {
            width: 64,
            height: 64,
            encoding: Encoding::Jpeg,
            data: Blob::new(jpeg_header_declaring(65_535, 65_535)),
        },
        state: vec![0.0; 6],
        surface: Grid {
            rows: 8,
            cols: 8,
            cells: vec![0.0; 64],
        },
        action: vec![],
    };
    for _ in 0..20 {
        rt.block_on(forged.put(&bomb)).unwrap();
        std::thread::sleep(Duration::from_millis(25));
    }
    let refused = |m: &BTreeMap<String, f64>| m.get("obs_refused.width").copied().unwrap_or(0.0);
    wait_until(
        "the bombs refused in the policy's Stats",
        Duration::from_secs(15),
        || refused(&metrics.lock().unwrap()) >= 1.0,
    );
    // The robot keeps acting on its own observations.
    let after = *chunks.lock().unwrap();
    wait_until("r0 still acting", Duration::from_secs(15), || {
        *chunks.lock().unwrap() > after + 5
    });
    let rss_after = rss_mb(pid);
    assert!(
        rss_after < rss_before + 64.0,
        "the node's memory stays flat: {rss_before:.0} MB → {rss_after:.0} MB"
    );
    let m = metrics.lock().unwrap().clone();
    assert!(m.get("obs_refused").copied().unwrap_or(0.0) >= refused(&m), "{m:?}");
    node.signal(libc::SIGTERM);
    assert!(node.wait(Duration::from_secs(30)).success());
}
