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

/// The forgetting guard measures on worlds of its own. An adapter fine-tuned on the icy floor
/// (condition B) with a few demonstrations leaked from the promoter's shadow worlds holds
/// condition A on those worlds but forgets it elsewhere: the shipped gates, judging under B,
/// refuse it on the retention worlds; measured on the shadow worlds (no retention worlds of its
/// own) or with the guard switched off, it passes.
#[test]
fn the_forgetting_guard_refuses_an_adapter_that_forgets_a_on_worlds_the_shadow_never_used() {
    let (tiny, _) = shared_tiny_policy();
    let dir = temp_dir("forgets");
    let run = |args: &[&str]| {
        let out = nanobot().args(args).output().unwrap();
        assert!(out.status.success(), "nanobot {args:?}: {}", text(&out.stderr));
    };
    let at = |p: &str| dir.join(p).display().to_string();
    run(&[
        "demos",
        "--out",
        &at("icy"),
        "--robots",
        "2",
        "--episodes",
        "30",
        "--shift",
        "icy_floor",
        "--seed",
        "20",
    ]);
    // The leak: the promoter's own shadow worlds (1000, 1001) under condition A.
    run(&[
        "demos",
        "--out",
        &at("leak"),
        "--robots",
        "2",
        "--episodes",
        "10",
        "--seed",
        "1000",
    ]);
    let adapter_path = dir.join("mixed.safetensors");
    run(&[
        "train",
        "--adapter-of",
        tiny.to_str().unwrap(),
        "--dataset",
        &at("icy/r0"),
        "--dataset",
        &at("icy/r1"),
        "--dataset",
        &at("leak/r0"),
        "--dataset",
        &at("leak/r1"),
        "--steps",
        "400",
        "--lr",
        "3e-3",
        "--warmup",
        "20",
        "--version",
        "tiny-demos+lora.mixed",
        "--out",
        adapter_path.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&adapter_path).unwrap();
    let base = Runner::load(&tiny, None).unwrap();
    let c = candidate(&base, "tiny-demos+lora.mixed", bytes, None);
    let judge = |cfg: GateConfig| {
        let mut gates = Gates::open(&tiny, cfg).unwrap();
        let metrics: BTreeMap<String, f64> = c.metrics.iter().map(|m| (m.name.clone(), m.value)).collect();
        let bytes = c.adapter.to_bytes();
        gates.judge(
            &Submission {
                id: &c.adapter_id,
                base_version: &c.base_version,
                sha256: &c.sha256,
                bytes: &bytes,
                metrics: &metrics,
            },
            Shift::IcyFloor,
        )
    };
    // The shipped gates, with shadow episodes as long as the main job's robots get before help.
    let mut shipped = shipped_gates();
    shipped.shadow.sim.episode_steps = 60;
    assert!(
        shipped
            .retention_seeds
            .iter()
            .all(|s| !shipped.shadow.seeds.contains(s)),
        "{shipped:?}"
    );
    let v = judge(shipped.clone());
    eprintln!("shipped: {} {:?}", v.reason, v.metrics);
    assert!(!v.accepted && v.reason.contains("forgets none"), "{}", v.reason);
    assert!(
        v.metrics["shadow_success.icy_floor"] >= v.metrics["current_success.icy_floor"] + 0.5,
        "{:?}",
        v.metrics
    );
    // Measured on the shadow worlds it leaked, A looks kept.
    let mut on_shadow = shipped.clone();
    on_shadow.retention_seeds = Vec::new();
    let v = judge(on_shadow);
    eprintln!("retention on the shadow worlds: {} {:?}", v.reason, v.metrics);
    assert!(v.accepted, "{}", v.reason);
    let mut off = shipped;
    off.max_drop = 1.0;
    assert!(judge(off).accepted, "guard off");
}

/// A copy of the checkpoint at `src` with one layer of its diffusion head dented by a rank-1
/// term, `weight += c · u vᵀ` (unit `u`, `v`), saved at `out` as base `version`; and the LoRA
/// adapter for it that takes the dent out exactly (`B A · α/r = −c · u vᵀ`): a candidate that
/// is genuinely better than the dented base, as a trained adapter would be.
pub(crate) fn dented_base_and_repair(src: &std::path::Path, out: &std::path::Path, c: f64, version: &str) -> Vec<u8> {
    use candle_core::{Device, Tensor};
    use nanobot_policy::checkpoint;
    let original = Runner::load(src, None).unwrap();
    // The head's output layer: the LoRA-adapted head layer with the fewest outputs.
    let (fresh, _) = original.fresh_adapter("probe").unwrap();
    let layer = {
        let data = fresh.data().lock().unwrap();
        let mut heads: Vec<(usize, String)> = data
            .iter()
            .filter(|(k, _)| k.ends_with(".lora_b") && k.contains("head"))
            .map(|(k, v)| (v.as_tensor().dims()[0], k.trim_end_matches(".lora_b").to_string()))
            .collect();
        heads.sort();
        heads.first().expect("the head has adapted layers").1.clone()
    };
    let (mut meta, tensors) = checkpoint::read(src).unwrap();
    let w = &tensors[&format!("{layer}.weight")];
    let (rows, cols) = w.dims2().unwrap();
    let unit = |n: usize, phase: f64| {
        let v: Vec<f32> = (0..n).map(|i| ((i as f64 + 1.0) * 1.7 + phase).sin() as f32).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / norm).collect::<Vec<f32>>()
    };
    let (u, v) = (unit(rows, 0.3), unit(cols, 1.1));
    let outer = Tensor::from_vec(u.clone(), (rows, 1), &Device::Cpu)
        .unwrap()
        .matmul(&Tensor::from_vec(v.clone(), (1, cols), &Device::Cpu).unwrap())
        .unwrap();
    let dented = (w + (outer * c).unwrap()).unwrap();
    let vars = candle_nn::VarMap::new();
    {
        let mut data = vars.data().lock().unwrap();
        for (k, t) in &tensors {
            let t = if *k == format!("{layer}.weight") { &dented } else { t };
            data.insert(k.clone(), Var::from_tensor(t).unwrap());
        }
    }
    meta.version = version.to_string();
    checkpoint::save(out, &vars, &meta).unwrap();
    let dented_runner = Runner::load(out, None).unwrap();
    let scale = dented_runner.config().lora.scale();
    adapter(&dented_runner, &format!("{version}+lora.repair"), |vars| {
        let a = &vars[&format!("{layer}.lora_a")];
        let (rank, _) = a.as_tensor().dims2().unwrap();
        let mut a_rows = vec![0f32; rank * cols];
        a_rows[..cols].copy_from_slice(&v);
        let mut b_cols = vec![0f32; rows * rank];
        for (i, x) in u.iter().enumerate() {
            b_cols[i * rank] = -(c / scale) as f32 * x;
        }
        let a_new = Tensor::from_vec(a_rows, (rank, cols), &Device::Cpu).unwrap();
        let b_new = Tensor::from_vec(b_cols, (rows, rank), &Device::Cpu).unwrap();
        vars.insert(format!("{layer}.lora_a"), Var::from_tensor(&a_new).unwrap());
        vars.insert(format!("{layer}.lora_b"), Var::from_tensor(&b_new).unwrap());
    })
}

/// A candidate that passes the shipped gates (it takes a dent out of the fleet's base, so it is
/// genuinely better in shadow) but fails on the canary robot, for a reason the shadow
/// simulation cannot see (the canary's onboard expert takes over after 10 ticks, so hardly any
/// of its episodes is its own, while the other robot has all the time it needs): the promoter
/// rolls it back by itself, and the other robot never runs it.
#[test]
fn a_candidate_that_passes_the_gates_but_fails_on_the_canary_is_rolled_back_and_no_other_robot_runs_it() {
    let (tiny, _) = shared_tiny_policy();
    let dir = temp_dir("canary");
    let base_path = dir.join("dented.safetensors");
    let repair = dented_base_and_repair(&tiny, &base_path, 4.0, "tiny-dented");
    let base = Runner::load(&base_path, None).unwrap();
    let id = "tiny-dented+lora.repair";
    let port = free_port();
    let keys = dir.join("keys");
    let file = write_launch(
        "canary",
        &format!(
            r#"
[robots]
ids = ["r0", "r1"]
[[node]]
name = "fleet"
listen = ["tcp/127.0.0.1:{port}"]
[[node.actor]]
type = "sim_robot"
robots = ["r0"]
config = "@CONFIGS@/sim_robot.toml"
set = {{ intervene_after_ms = 0, intervene_after_steps = 10, sim = {{ episode_steps = 60, seed = 10 }} }}
[[node.actor]]
type = "sim_robot"
robots = ["r1"]
config = "@CONFIGS@/sim_robot.toml"
set = {{ intervene_after_ms = 0, sim = {{ episode_steps = 200, seed = 11 }} }}
[[node.actor]]
type = "ingest"
for_each_robot = true
config = "@CONFIGS@/ingest.toml"
[[node.actor]]
type = "policy"
for_each_robot = true
config = "@CONFIGS@/policy_actor.toml"
set = {{ checkpoint = "{base}", trusted_key = "{keys}/fleet.pub" }}
[[node.actor]]
type = "promoter"
config = "@CONFIGS@/promoter.toml"
set = {{ base = "{base}", state_dir = "{state}", keys = "{keys}", generate_key = true, gates = {{ shadow = {{ sim = {{ episode_steps = 60 }} }} }} }}
"#,
            base = base_path.display(),
            state = dir.join("promoter").display(),
            keys = keys.display(),
        ),
    );
    let mut cmd = nanobot();
    cmd.args(["run", "--node", "fleet", "--launch"]).arg(&file);
    let mut fleet = Proc::spawn(cmd);
    fleet.expect_line("rollout read back", Duration::from_secs(30));
    let rt = runtime();
    let bus = rt.block_on(client(port));
    // Every adapter each robot ever reported running, and acted with.
    let ran = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<
        String,
        std::collections::BTreeSet<String>,
    >::new()));
    let latest = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<String, String>::new()));
    let (r, l) = (ran.clone(), latest.clone());
    let _status = rt
        .block_on(bus.subscribe_callback::<PolicyStatus>("nb/*/policy", move |m| {
            l.lock()
                .unwrap()
                .insert(m.header.robot.clone(), m.msg.adapter_id.clone());
            r.lock()
                .unwrap()
                .entry(m.header.robot.clone())
                .or_default()
                .insert(m.msg.adapter_id);
        }))
        .unwrap();
    let r = ran.clone();
    let _chunks = rt
        .block_on(
            bus.subscribe_callback::<nanobot_messages::ActionChunk>("nb/*/act", move |m| {
                r.lock()
                    .unwrap()
                    .entry(m.header.robot.clone())
                    .or_default()
                    .insert(m.msg.adapter_version);
            }),
        )
        .unwrap();
    let candidates = rt
        .block_on(bus.publisher::<Candidate>("nb/ckpt/candidate", "", nanobot_actors::bus::PubQos::Data))
        .unwrap();
    wait_until("both robots reporting", Duration::from_secs(30), || {
        ran.lock().unwrap().len() == 2
    });
    assert!(rt.block_on(candidates.wait_matched(Duration::from_secs(10))));
    rt.block_on(candidates.put(&candidate(&base, id, repair, None)))
        .unwrap();
    let judged = fleet.expect_line("candidate judged", Duration::from_secs(120));
    eprintln!("{judged}");
    assert!(
        judged.contains("accepted=true"),
        "the shipped gates pass the repair: {judged}"
    );
    let canary = fleet.expect_line("rollout: canary", Duration::from_secs(30));
    assert!(canary.contains("r0") && !canary.contains("r1"), "{canary}");
    wait_until("the canary running the candidate", Duration::from_secs(30), || {
        ran.lock().unwrap().get("r0").is_some_and(|s| s.contains(id))
    });
    let rolled = fleet.expect_line("canary rolled back", Duration::from_secs(120));
    eprintln!("{rolled}");
    // Back on the base: r0 reports it again, and r1 never ran the candidate at all.
    wait_until("the canary back on the base", Duration::from_secs(30), || {
        latest.lock().unwrap().get("r0").is_some_and(|a| a.is_empty())
    });
    let ledger = std::fs::read_to_string(dir.join("promoter/ledger.jsonl")).unwrap();
    assert!(ledger.contains("canary success"), "{ledger}");
    std::thread::sleep(Duration::from_secs(2));
    let r1 = ran.lock().unwrap().get("r1").cloned().unwrap_or_default();
    assert!(!r1.contains(id), "r1 ran the candidate: {r1:?}");
    assert_eq!(r1, [String::new()].into_iter().collect(), "r1 only ever ran the base");
}
