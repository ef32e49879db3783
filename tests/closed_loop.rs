//! The README's demonstrations-to-policy path, end to end and checked by what matters: the
//! expert's demonstrations recorded in the simulator (`nanobot demos`), the tiny policy trained on
//! them (`nanobot train`), then closed-loop success in the simulator on seeds the demonstrations
//! never used (`nanobot eval`), and open-loop agreement with the expert on frames it trained on,
//! through the runner and through `nanobot serve` (normalization in and out).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use nanobot_messages::{ActionChunk, Blob, Encoding, Grid, Image, Observation};
use nanobot_policy::preprocess::step_of;
use nanobot_policy::runner::Runner;

fn post_json(port: u16, body: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "POST /v1/act HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    assert!(raw.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&raw));
    raw[split + 4..].to_vec()
}

/// Cosine similarity and mean absolute difference of paired 2-D actions.
fn agreement(pairs: &[([f32; 2], [f32; 2])]) -> (f32, f32) {
    let (mut cos, mut n, mut abs) = (0.0, 0, 0.0);
    for (a, b) in pairs {
        abs += ((a[0] - b[0]).abs() + (a[1] - b[1]).abs()) / 2.0;
        let (na, nb) = ((a[0] * a[0] + a[1] * a[1]).sqrt(), (b[0] * b[0] + b[1] * b[1]).sqrt());
        if na > 0.2 && nb > 0.2 {
            cos += (a[0] * b[0] + a[1] * b[1]) / (na * nb);
            n += 1;
        }
    }
    (cos / n.max(1) as f32, abs / pairs.len().max(1) as f32)
}

#[test]
fn the_tiny_policy_trained_on_demonstrations_succeeds_in_closed_loop_and_agrees_with_the_expert() {
    let dir = temp_dir("closed-loop");
    let (ckpt, demos) = tiny_policy(&dir);
    // Closed loop on worlds the demonstrations (seeds 0, 1) never saw, beside the expert.
    let policy = eval_success(&ckpt, None, "none", None);
    assert!(
        policy >= 70.0,
        "the tiny policy succeeds in {policy} % of unseen episodes"
    );

    // Open loop: frames it trained on, the expert's action for each, the policy's first action
    // (for the observation's own tick), through the runner and through `serve`.
    let (_, frames) = nanobot_dataset::read_dataset(&demos.join("r0")).unwrap();
    let runner = Runner::load(&ckpt, None).unwrap();
    let mut server = {
        let port = free_port();
        let mut c = nanobot();
        c.arg("serve")
            .arg("--checkpoint")
            .arg(&ckpt)
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        let mut p = Proc::spawn(c);
        p.expect_line("serving the policy", Duration::from_secs(30));
        (p, port)
    };
    let observation = |f: &nanobot_dataset::StoredFrame| Observation {
        episode: f.episode_index,
        frame_index: f.frame_index,
        task: 0,
        image: Image {
            width: 64,
            height: 64,
            encoding: Encoding::Jpeg,
            data: Blob::new(f.image.clone().unwrap()),
        },
        state: f.state.clone(),
        surface: Grid {
            rows: 8,
            cols: 8,
            cells: f.surface.clone(),
        },
        action: vec![],
    };
    let (mut direct, mut served) = (Vec::new(), Vec::new());
    for f in frames.iter().step_by(7).take(40) {
        let expert = [f.action[0], f.action[1]];
        let obs = observation(f);
        let a = runner.act(&[step_of(&obs).unwrap()], 0, 7).unwrap();
        direct.push(([a[0], a[1]], expert));
        let chunk: ActionChunk =
            serde_json::from_slice(&post_json(server.1, &serde_json::to_vec(&obs).unwrap())).unwrap();
        served.push(([chunk.actions[0], chunk.actions[1]], expert));
    }
    let (cos, abs) = agreement(&direct);
    let (scos, sabs) = agreement(&served);
    eprintln!(
        "open-loop agreement with the expert: runner cos {cos:.3} |Δ| {abs:.3}; serve cos {scos:.3} |Δ| {sabs:.3}"
    );
    assert!(cos > 0.9 && abs < 0.25, "runner: cos {cos}, mean |Δ| {abs}");
    assert!(scos > 0.9 && sabs < 0.25, "serve: cos {scos}, mean |Δ| {sabs}");
    server.0.signal(libc::SIGTERM);
    server.0.wait(Duration::from_secs(10));
}
