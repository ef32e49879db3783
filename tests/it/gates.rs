//! The promoter's gates with the settings the fleet ships (`configs/promoter.toml`), on a
//! trained policy: a candidate worse on held-out loss and one worse in shadow simulation are
//! refused by a live fleet's promoter while the robots keep running the base; and the same
//! candidates, judged with that one gate switched off, get past it (so each refusal is that
//! gate's doing).

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use candle_core::Var;
use common::*;
use nanobot_actors::promoter::gates::{GateConfig, Gates, Submission};
use nanobot_messages::{Candidate, Metric, PolicyStatus};
use nanobot_policy::runner::Runner;
use nanobot_sim::Shift;

use crate::promotion::{adapter, candidate};

/// The `[gates]` table of the shipped promoter config.
fn shipped_gates() -> GateConfig {
    let text = std::fs::read_to_string(repo().join("configs/promoter.toml")).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    table["gates"].clone().try_into().unwrap()
}

/// An adapter that acts exactly as the base (LoRA's B starts at zero), whose trainer reports a
/// held-out loss `ratio` times the base's.
fn with_held_out(c: Candidate, ratio: f64) -> Candidate {
    Candidate {
        metrics: vec![
            Metric {
                name: "held_out_loss".into(),
                value: ratio,
            },
            Metric {
                name: "held_out_loss_base".into(),
                value: 1.0,
            },
        ],
        ..c
    }
}

/// Every LoRA factor set to `value`: the adapter pushes every target layer off.
fn damaged(base: &Runner, id: &str) -> Vec<u8> {
    adapter(base, id, |vars| {
        for v in vars.values_mut() {
            *v = Var::from_tensor(&(v.as_tensor().ones_like().unwrap() * 0.2).unwrap()).unwrap();
        }
    })
}

fn judge_with(base: &std::path::Path, cfg: GateConfig, c: &Candidate) -> (bool, String) {
    let mut gates = Gates::open(base, cfg).unwrap();
    let metrics: BTreeMap<String, f64> = c.metrics.iter().map(|m| (m.name.clone(), m.value)).collect();
    let bytes = c.adapter.to_bytes();
    let v = gates.judge(
        &Submission {
            id: &c.adapter_id,
            base_version: &c.base_version,
            sha256: &c.sha256,
            bytes: &bytes,
            metrics: &metrics,
        },
        Shift::None,
    );
    (v.accepted, v.reason)
}

#[test]
fn the_shipped_gates_refuse_a_worse_held_out_loss_and_a_worse_shadow_success() {
    let (base_path, _) = shared_tiny_policy();
    let base = Runner::load(&base_path, None).unwrap();
    let gates = shipped_gates();
    assert!(
        gates.held_out_tolerance < 0.2 && gates.margin > 0.0 && gates.max_drop < 0.2,
        "{gates:?}"
    );
    let worse_held_out = with_held_out(
        candidate(
            &base,
            "tiny-demos+lora.heldout",
            adapter(&base, "tiny-demos+lora.heldout", |_| {}),
            None,
        ),
        1.3,
    );
    let worse_shadow = with_held_out(
        candidate(
            &base,
            "tiny-demos+lora.shadow",
            damaged(&base, "tiny-demos+lora.shadow"),
            None,
        ),
        0.9,
    );

    // A live fleet with the shipped promoter config.
    let dir = temp_dir("gates");
    let port = free_port();
    let keys = dir.join("keys");
    let promoter = format!(
        r#"
[[node.actor]]
type = "promoter"
config = "@CONFIGS@/promoter.toml"
set = {{ base = "{base}", state_dir = "{state}", keys = "{keys}", generate_key = true }}
"#,
        base = base_path.display(),
        state = dir.join("promoter").display(),
        keys = keys.display(),
    );
    let file = write_launch(
        "gates",
        &policy_fleet("\"r0\", \"r1\"", port, &keys.join("fleet.pub"), &base_path, &promoter),
    );
    let mut cmd = nanobot();
    cmd.args(["run", "--node", "fleet", "--launch"]).arg(&file);
    let mut fleet = Proc::spawn(cmd);
    fleet.expect_line("rollout read back", Duration::from_secs(30));
    let rt = runtime();
    let bus = rt.block_on(client(port));
    let statuses = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<String, PolicyStatus>::new()));
    let s = statuses.clone();
    let _status = rt
        .block_on(bus.subscribe_callback::<PolicyStatus>("nb/*/policy", move |r| {
            s.lock().unwrap().insert(r.header.robot.clone(), r.msg);
        }))
        .unwrap();
    let candidates = rt
        .block_on(bus.publisher::<Candidate>("nb/ckpt/candidate", "", nanobot_actors::bus::PubQos::Data))
        .unwrap();
    wait_until("both robots reporting", Duration::from_secs(30), || {
        statuses.lock().unwrap().len() == 2
    });
    assert!(rt.block_on(candidates.wait_matched(Duration::from_secs(10))));
    for (c, why) in [
        (&worse_held_out, "held-out loss 1.300× the base's"),
        (&worse_shadow, "shadow success under none"),
    ] {
        rt.block_on(candidates.put(c)).unwrap();
        let line = fleet.expect_line("candidate judged", Duration::from_secs(120));
        eprintln!("{line}");
        assert!(
            line.contains("accepted=false") && line.contains(why),
            "want {why:?}: {line}"
        );
    }
    // Nothing refused reached a robot: both still act on the base alone.
    std::thread::sleep(Duration::from_secs(2));
    for (robot, st) in statuses.lock().unwrap().iter() {
        assert_eq!(st.adapter_id, "", "{robot} runs {}", st.adapter_id);
    }
    drop(fleet);

    // Each refusal is its gate's: switched off, the same candidate gets past it (and is
    // stopped, if at all, by a later gate).
    let mut off = gates.clone();
    off.held_out_tolerance = 10.0;
    let (_, reason) = judge_with(&base_path, off, &worse_held_out);
    assert!(!reason.contains("held-out"), "held-out gate off: {reason}");
    let mut off = gates.clone();
    off.margin = -1.0;
    let (accepted, reason) = judge_with(&base_path, off, &worse_shadow);
    assert!(
        accepted,
        "shadow gate off, the damaged adapter passes (its condition is the fleet's): {reason}"
    );
}
