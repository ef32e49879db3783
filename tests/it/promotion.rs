//! End-to-end: promotion. The policy actor refuses every kind of bad adapter and keeps acting;
//! the promoter refuses bad candidates, signs and rolls out good ones (canary first, then every
//! robot), rolls back on an operator's word, and its ledger survives `kill -9`. Real nodes, real
//! Zenoh on loopback, a tiny base.

use crate::common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{Tensor, Var};
use common::*;
use nanobot_actors::keys::SigningKey;
use nanobot_messages::codec::now_ns;
use nanobot_messages::{
    ActionChunk, AdapterBytes, AdapterManifest, AdapterRequest, Blob, Candidate, CkptCommand, CkptReply, Metric,
    PolicyStatus, Promoted, Stats,
};
use nanobot_policy::checkpoint::{self, Meta, Role};
use nanobot_policy::runner::Runner;

/// Adapter bytes for `base` named `version`, after `mangle` had its way with the tensors.
pub(crate) fn adapter(base: &Runner, version: &str, mangle: impl FnOnce(&mut BTreeMap<String, Var>)) -> Vec<u8> {
    let (vars, _) = base.fresh_adapter(version).unwrap();
    {
        let mut data = vars.data().lock().unwrap();
        let mut sorted: BTreeMap<String, Var> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        mangle(&mut sorted);
        data.clear();
        data.extend(sorted);
    }
    let meta = Meta {
        kind: Role::Adapter,
        version: version.into(),
        config: base.config().clone(),
        norm: base.meta.norm.clone(),
    };
    checkpoint::to_bytes(&vars, &meta).unwrap()
}

fn sha(b: &[u8]) -> String {
    nanobot_dataset::sha256_hex(b)
}

pub(crate) fn manifest(key: &SigningKey, id: &str, base: &str, bytes: &[u8]) -> AdapterManifest {
    let mut m = AdapterManifest {
        adapter_id: id.into(),
        base_version: base.into(),
        sha256: sha(bytes),
        bytes: bytes.len() as u64,
        metrics: vec![],
        signature: String::new(),
    };
    m.signature = key.sign(&m.signed_text());
    m
}

/// A rollout as the promoter announces it: signed whole with `key`, valid for 30 s.
pub(crate) fn rollout(key: &SigningKey, generation: u64, fleet: Option<AdapterManifest>) -> Promoted {
    let mut p = Promoted::unsigned(generation, fleet, None, vec![]);
    p.expires_ms = now_ns() / 1_000_000 + 30_000;
    p.signature = key.sign(&p.signed_text());
    p
}

/// The newest PolicyStatus of each robot, and the adapter of each robot's newest chunk.
#[derive(Default)]
struct Seen {
    status: BTreeMap<String, PolicyStatus>,
    /// PolicyStatus messages received, all robots.
    status_count: u64,
    chunks: BTreeMap<String, (u64, String)>,
    /// Each actor's latest Stats metrics.
    metrics: BTreeMap<String, BTreeMap<String, f64>>,
}

fn watch(
    rt: &tokio::runtime::Runtime,
    bus: &nanobot_actors::bus::Bus,
) -> (Arc<Mutex<Seen>>, Vec<Box<dyn std::any::Any>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (s1, s2, s3) = (seen.clone(), seen.clone(), seen.clone());
    let a = rt
        .block_on(bus.subscribe_callback::<PolicyStatus>("nb/*/policy", move |r| {
            let mut s = s1.lock().unwrap();
            s.status_count += 1;
            s.status.insert(r.header.robot.clone(), r.msg);
        }))
        .unwrap();
    let b = rt
        .block_on(bus.subscribe_callback::<ActionChunk>("nb/*/act", move |r| {
            let mut s = s2.lock().unwrap();
            let e = s.chunks.entry(r.header.robot.clone()).or_default();
            e.0 += 1;
            e.1 = r.msg.adapter_version;
        }))
        .unwrap();
    let c = rt
        .block_on(bus.subscribe_callback::<Stats>("nb/node/*/*", move |r| {
            let mut m: BTreeMap<String, f64> = r.msg.extra.iter().map(|m| (m.name.clone(), m.value)).collect();
            m.insert("handled".into(), r.msg.handled as f64);
            s3.lock().unwrap().metrics.insert(r.msg.actor.clone(), m);
        }))
        .unwrap();
    (seen, vec![Box::new(a), Box::new(b), Box::new(c)])
}

/// An actor's latest reported metric (0 before it reported one).
fn metric(seen: &Arc<Mutex<Seen>>, actor: &str, name: &str) -> f64 {
    seen.lock()
        .unwrap()
        .metrics
        .get(actor)
        .and_then(|m| m.get(name))
        .copied()
        .unwrap_or(0.0)
}

fn chunks(seen: &Arc<Mutex<Seen>>, robot: &str) -> u64 {
    seen.lock().unwrap().chunks.get(robot).map(|c| c.0).unwrap_or(0)
}

fn status(seen: &Arc<Mutex<Seen>>, robot: &str) -> Option<PolicyStatus> {
    seen.lock().unwrap().status.get(robot).cloned()
}

#[test]
fn every_kind_of_bad_adapter_is_refused_and_the_robot_keeps_acting() {
    let dir = temp_dir("refuse");
    let base_path = tiny_base(&dir);
    let base = Runner::load(&base_path, None).unwrap();
    let key = SigningKey::generate(&dir.join("keys")).unwrap();
    let stranger = SigningKey::generate(&dir.join("other-keys")).unwrap();
    let port = free_port();
    let file = write_launch(
        "refuse",
        &policy_fleet("\"r0\"", port, &dir.join("keys/fleet.pub"), &base_path, ""),
    );
    let mut fleet = Proc::launch(&file, &[]);
    fleet.expect_line("policy loaded", Duration::from_secs(30));

    let rt = runtime();
    let bus = rt.block_on(client(port));
    let (seen, _subs) = watch(&rt, &bus);
    // The test plays the promoter: it serves bytes by sha256 (whatever it was told to serve).
    let served: Arc<Mutex<BTreeMap<String, Vec<u8>>>> = Arc::default();
    let q = rt
        .block_on(bus.queryable::<AdapterRequest>("nb/ckpt/adapter", 16))
        .unwrap();
    let s = served.clone();
    rt.spawn(async move {
        while let Some(req) = q.recv().await {
            let bytes = s.lock().unwrap().get(&req.msg.sha256).cloned();
            match bytes {
                Some(b) => {
                    let reply = AdapterBytes {
                        adapter_id: String::new(),
                        sha256: req.msg.sha256.clone(),
                        data: Blob::new(b),
                    };
                    req.reply("", &reply).await.unwrap();
                }
                None => req.reply_err("unknown").await.unwrap(),
            }
        }
    });
    let announce = rt
        .block_on(bus.publisher::<Promoted>("nb/ckpt/promoted", "", nanobot_actors::bus::PubQos::Control))
        .unwrap();
    wait_until("r0 acting and reporting", Duration::from_secs(30), || {
        chunks(&seen, "r0") > 5 && status(&seen, "r0").is_some()
    });

    let good = adapter(&base, "tiny-base+lora.7", |_| {});
    let nan = adapter(&base, "tiny-base+lora.nan", |vars| {
        let v = vars.values_mut().next().unwrap();
        let t = (v.as_tensor().ones_like().unwrap() * f64::NAN).unwrap();
        *v = Var::from_tensor(&t).unwrap();
    });
    let misshapen = adapter(&base, "tiny-base+lora.shape", |vars| {
        let v = vars.values_mut().next().unwrap();
        let n = v.as_tensor().elem_count();
        *v = Var::from_tensor(&Tensor::zeros(n + 1, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap())
            .unwrap();
    });
    let cut = adapter(&base, "tiny-base+lora.a", |_| {});
    let swapped = adapter(&base, "tiny-base+lora.b", |_| {});
    assert_eq!(cut.len(), swapped.len());
    let mut forged = manifest(&key, "tiny-base+lora.7", "tiny-base", &good);
    forged.signature = stranger.sign(&forged.signed_text());
    {
        let mut s = served.lock().unwrap();
        s.insert(sha(&good), good.clone());
        s.insert(sha(&cut), cut[..cut.len() / 2].to_vec()); // cut short in transit
        s.insert(sha(&nan), nan.clone());
        s.insert(sha(&misshapen), misshapen.clone());
    }
    // Bytes of the same length as the manifest says, but not the ones it signed.
    let mut lying = manifest(&key, "tiny-base+lora.b", "tiny-base", &swapped);
    lying.sha256 = "ab".repeat(32);
    lying.signature = key.sign(&lying.signed_text());
    served.lock().unwrap().insert(lying.sha256.clone(), swapped.clone());
    let cases: Vec<(AdapterManifest, &str)> = vec![
        (forged, "signature"),
        (manifest(&key, "tiny-base+lora.7", "other-base", &good), "made for base"),
        (manifest(&key, "tiny-base+lora.a", "tiny-base", &cut), "bytes arrived"),
        (lying, "sha256 of the bytes"),
        (manifest(&key, "tiny-base+lora.nan", "tiny-base", &nan), "NaN"),
        (manifest(&key, "tiny-base+lora.shape", "tiny-base", &misshapen), "shape"),
    ];
    let n_cases = cases.len() as u64;
    let mut generation = 0;
    let mut last = None;
    for (i, (m, why)) in cases.into_iter().enumerate() {
        generation += 1;
        let before = chunks(&seen, "r0");
        let p = rollout(&key, generation, Some(m));
        rt.block_on(announce.put(&p)).unwrap();
        last = Some(p);
        wait_until(&format!("refusal {} ({why})", i + 1), Duration::from_secs(20), || {
            status(&seen, "r0").is_some_and(|s| s.refused == i as u64 + 1)
        });
        let s = status(&seen, "r0").unwrap();
        assert!(
            s.last_error.contains(why),
            "refusal {}: {:?} should say {why:?}",
            i + 1,
            s.last_error
        );
        assert_eq!(s.adapter_id, "", "still the base");
        wait_until("the robot keeps acting", Duration::from_secs(10), || {
            chunks(&seen, "r0") > before + 3
        });
        assert_eq!(seen.lock().unwrap().chunks["r0"].1, "", "chunks still from the base");
    }
    // The promoter announces its rollout again every second: a refused one is not retried.
    rt.block_on(announce.put(last.as_ref().unwrap())).unwrap();
    // Two more of the robot's statuses (it reports every 2 s) say whether it retried.
    let reports = seen.lock().unwrap().status_count;
    wait_until(
        "the robot's status after the re-announcement",
        Duration::from_secs(10),
        || seen.lock().unwrap().status_count >= reports + 2,
    );
    assert_eq!(
        status(&seen, "r0").unwrap().refused,
        n_cases,
        "a re-announced refusal is not retried"
    );
    // Forged rollouts of the good adapter: refused whole, counted, the robot keeps acting on
    // the base, and the generation it follows does not move (so a genuine one still counts).
    let good_m = manifest(&key, "tiny-base+lora.7", "tiny-base", &good);
    let unsigned = Promoted::unsigned(generation + 1, Some(good_m.clone()), None, vec![]);
    let mut max = unsigned.clone();
    max.generation = u64::MAX;
    let by_stranger = rollout(&stranger, generation + 1, Some(good_m.clone()));
    let replayed = rollout(&key, generation - 1, Some(good_m.clone()));
    let far = rollout(&key, generation + 2_000_000, Some(good_m.clone()));
    let mut expired = Promoted::unsigned(generation + 1, Some(good_m.clone()), None, vec![]);
    expired.expires_ms = now_ns() / 1_000_000 - 60_000;
    expired.signature = key.sign(&expired.signed_text());
    let mut revoked = Promoted::unsigned(generation + 1, Some(good_m.clone()), None, vec![]);
    revoked.revoked = vec!["tiny-base+lora.7".into()];
    revoked.expires_ms = now_ns() / 1_000_000 + 30_000;
    revoked.signature = key.sign(&revoked.signed_text());
    let forgeries = [
        (unsigned, "not signed by the fleet key"),
        (max, "not signed by the fleet key"),
        (by_stranger, "not signed by the fleet key"),
        (replayed, "a replay"),
        (far, "ahead of"),
        (expired, "expired"),
        (revoked, "revokes"),
    ];
    let n_forgeries = forgeries.len() as u64;
    for (i, (p, why)) in forgeries.into_iter().enumerate() {
        let before = chunks(&seen, "r0");
        let refused = n_cases + i as u64 + 1;
        rt.block_on(announce.put(&p)).unwrap();
        wait_until(
            &format!("forged rollout {} ({why})", i + 1),
            Duration::from_secs(20),
            || status(&seen, "r0").is_some_and(|s| s.refused == refused),
        );
        let s = status(&seen, "r0").unwrap();
        assert!(
            s.last_error.contains(why),
            "forgery {}: {:?} should say {why:?}",
            i + 1,
            s.last_error
        );
        assert_eq!(
            (s.adapter_id.as_str(), s.generation),
            ("", generation),
            "forgery {}",
            i + 1
        );
        wait_until("the robot keeps acting", Duration::from_secs(10), || {
            chunks(&seen, "r0") > before + 3
        });
    }
    wait_until("the refusals in the policy's Stats", Duration::from_secs(10), || {
        metric(&seen, "policy_r0", "rollouts_refused") as u64 == n_forgeries
    });
    // A rogue peer answers every adapter fetch at once with other bytes of the right length:
    // the robot checks each reply and takes the genuine one.
    let rogue = rt
        .block_on(bus.queryable::<AdapterRequest>("nb/ckpt/adapter", 16))
        .unwrap();
    let impostor = swapped.clone();
    rt.spawn(async move {
        while let Some(req) = rogue.recv().await {
            let reply = AdapterBytes {
                adapter_id: String::new(),
                sha256: req.msg.sha256.clone(),
                data: Blob::new(impostor.clone()),
            };
            let _ = req.reply("", &reply).await;
        }
    });
    assert_eq!(
        good.len(),
        swapped.len(),
        "the impostor's bytes have the manifest's length"
    );
    let n_cases = n_cases + n_forgeries;
    // A good one is swapped in between two observations: chunks never stop, and the robot
    // misses no tick (its count of ticks without a planned action, and the policy's count of
    // chunks that came after the last one ran out, stay where they were).
    generation += 1;
    let before = chunks(&seen, "r0");
    let missed = || {
        (
            metric(&seen, "sim_robot_r0", "missed_actions"),
            metric(&seen, "policy_r0", "missed_deadlines"),
        )
    };
    let swaps_before = metric(&seen, "policy_r0", "adapters_swapped");
    let missed_before = missed();
    rt.block_on(announce.put(&rollout(
        &key,
        generation,
        Some(manifest(&key, "tiny-base+lora.7", "tiny-base", &good)),
    )))
    .unwrap();
    wait_until("the good adapter acting", Duration::from_secs(20), || {
        seen.lock()
            .unwrap()
            .chunks
            .get("r0")
            .is_some_and(|c| c.1 == "tiny-base+lora.7")
    });
    assert!(chunks(&seen, "r0") > before);
    // The Stats published after the swap (once a second) cover it.
    wait_until("the swap in the policy's Stats", Duration::from_secs(10), || {
        metric(&seen, "policy_r0", "adapters_swapped") > swaps_before
    });
    let ticks = metric(&seen, "sim_robot_r0", "handled");
    wait_until("the robot's Stats after the swap", Duration::from_secs(10), || {
        metric(&seen, "sim_robot_r0", "handled") > ticks
    });
    assert_eq!(
        missed(),
        missed_before,
        "(missed actions, missed deadlines) across the swap"
    );
    let s = status(&seen, "r0").unwrap();
    assert_eq!(
        (s.adapter_id.as_str(), s.refused, s.last_error.as_str()),
        ("tiny-base+lora.7", n_cases, "")
    );
    // Back to the base alone.
    rt.block_on(announce.put(&rollout(&key, generation + 1, None))).unwrap();
    wait_until("back on the base", Duration::from_secs(20), || {
        seen.lock().unwrap().chunks.get("r0").is_some_and(|c| c.1.is_empty())
    });
    fleet.signal(libc::SIGTERM);
    assert!(fleet.wait(Duration::from_secs(30)).success());
}

pub(crate) fn candidate(base: &Runner, id: &str, bytes: Vec<u8>, claimed_sha: Option<String>) -> Candidate {
    Candidate {
        adapter_id: id.into(),
        base_version: base.meta.version.clone(),
        step: 1,
        sha256: claimed_sha.unwrap_or_else(|| sha(&bytes)),
        metrics: vec![
            Metric {
                name: "held_out_loss".into(),
                value: 0.5,
            },
            Metric {
                name: "held_out_loss_base".into(),
                value: 1.0,
            },
        ],
        adapter: Blob::new(bytes),
    }
}

/// Every robot still runs `adapter`.
fn list_unchanged(seen: &Arc<Mutex<Seen>>, adapter: &str) -> bool {
    ["r0", "r1"]
        .iter()
        .all(|r| status(seen, r).is_some_and(|s| s.adapter_id == adapter))
}

fn ckpt(port: u16, args: &[&str]) -> String {
    let out = nanobot()
        .arg("ckpt")
        .args(args)
        .args(["--connect", &format!("tcp/127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "ckpt {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn the_promoter_gates_signs_rolls_out_rolls_back_and_its_ledger_survives_kill_9() {
    let dir = temp_dir("promote");
    let base_path = tiny_base(&dir);
    let base = Runner::load(&base_path, None).unwrap();
    let port = free_port();
    let keys = dir.join("keys");
    let state = dir.join("promoter");
    // Two people with keys: alice, whom the promoter trusts, and eve, whom it does not.
    for name in ["alice", "eve"] {
        let out = nanobot()
            .args(["keys", "init", keys.to_str().unwrap(), "--operator", name])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let operator_key = |name: &str| keys.join(format!("operators/{name}.key"));
    let promoter = format!(
        r#"
[[node.actor]]
type = "promoter"
config = "@CONFIGS@/promoter.toml"
set = {{ base = "{base}", state_dir = "{state}", keys = "{keys}", generate_key = true, operators = {{ alice = "{keys}/operators/alice.pub" }}, canary_hold_s = 0.5, canary_min_episodes = 0, gates = {{ held_out_tolerance = 10.0, margin = -1.0, max_drop = 1.0, shadow = {{ seeds = [1000], episodes_per_seed = 1, sim = {{ episode_steps = 30 }} }} }} }}
"#,
        base = base_path.display(),
        state = state.display(),
        keys = keys.display(),
    );
    let file = write_launch(
        "promote",
        &policy_fleet("\"r0\", \"r1\"", port, &keys.join("fleet.pub"), &base_path, &promoter),
    );
    let node = || {
        let mut cmd = nanobot();
        cmd.args(["run", "--node", "fleet", "--launch"]).arg(&file);
        Proc::spawn(cmd)
    };
    let mut fleet = node();
    fleet.expect_line("rollout read back", Duration::from_secs(30));
    let rt = runtime();
    let bus = rt.block_on(client(port));
    let (seen, _subs) = watch(&rt, &bus);
    let candidates = rt
        .block_on(bus.publisher::<Candidate>("nb/ckpt/candidate", "", nanobot_actors::bus::PubQos::Data))
        .unwrap();
    wait_until("both robots reporting", Duration::from_secs(30), || {
        status(&seen, "r0").is_some() && status(&seen, "r1").is_some()
    });
    // Readiness, not a sleep: the promoter's own Stats count both robots.
    wait_until("the promoter hears both robots", Duration::from_secs(30), || {
        metric(&seen, "promoter", "robots") >= 2.0
    });
    // A status on r0's key whose envelope claims another robot counts for nobody: a robot's
    // results are what its own key carries (which access control gives only its node).
    let ghost = rt
        .block_on(bus.publisher::<PolicyStatus>("nb/r0/policy", "ghost", nanobot_actors::bus::PubQos::Data))
        .unwrap();
    let ghost_status = PolicyStatus {
        base_version: "tiny-base".into(),
        adapter_id: "tiny-base+lora.ghost".into(),
        generation: 0,
        refused: 0,
        last_error: String::new(),
    };
    // Sent until counted: a new client publisher's first puts may go out before the node's
    // subscriptions reach it.
    wait_until(
        "the promoter refuses the ghost's status",
        Duration::from_secs(10),
        || {
            rt.block_on(ghost.put(&ghost_status)).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            metric(&seen, "promoter", "results_refused") >= 1.0
        },
    );
    assert_eq!(metric(&seen, "promoter", "robots"), 2.0, "the ghost is not followed");

    // Bad candidates: refused, and the fleet keeps acting on the base.
    let good1 = adapter(&base, "tiny-base+lora.1", |_| {});
    let nan = adapter(&base, "tiny-base+lora.nan", |vars| {
        let v = vars.values_mut().last().unwrap();
        *v = Var::from_tensor(&(v.as_tensor().ones_like().unwrap() * f64::INFINITY).unwrap()).unwrap();
    });
    let mut other_base = candidate(&base, "other+lora.1", good1.clone(), None);
    other_base.base_version = "other".into();
    for (c, why) in [
        (
            candidate(&base, "tiny-base+lora.sha", good1.clone(), Some("0".repeat(64))),
            "sha256",
        ),
        (candidate(&base, "tiny-base+lora.nan", nan, None), "NaN"),
        (other_base, "trained on base"),
    ] {
        let before = chunks(&seen, "r1");
        rt.block_on(candidates.put(&c)).unwrap();
        let line = fleet.expect_line("candidate judged", Duration::from_secs(30));
        assert!(line.contains("accepted=false") && line.contains(why), "{why}: {line}");
        wait_until("the fleet keeps acting", Duration::from_secs(10), || {
            chunks(&seen, "r1") > before + 3
        });
    }
    // A good one: canary r0 first, then r1.
    rt.block_on(candidates.put(&candidate(&base, "tiny-base+lora.1", good1, None)))
        .unwrap();
    let line = fleet.expect_line("rollout: canary", Duration::from_secs(60));
    assert!(line.contains("r0") && !line.contains("r1"), "{line}");
    fleet.expect_line("rollout: promoted: the canary held up", Duration::from_secs(30));
    wait_until("every robot on lora.1", Duration::from_secs(20), || {
        ["r0", "r1"]
            .iter()
            .all(|r| status(&seen, r).is_some_and(|s| s.adapter_id == "tiny-base+lora.1"))
    });
    fleet.expect_line("rollout reached every robot", Duration::from_secs(10));
    // A second, then an operator's rollback to the first.
    let good2 = adapter(&base, "tiny-base+lora.2", |_| {});
    rt.block_on(candidates.put(&candidate(&base, "tiny-base+lora.2", good2, None)))
        .unwrap();
    wait_until("every robot on lora.2", Duration::from_secs(60), || {
        ["r0", "r1"]
            .iter()
            .all(|r| status(&seen, r).is_some_and(|s| s.adapter_id == "tiny-base+lora.2"))
    });
    // Changing the rollout takes a trusted operator's signature.
    let refused = |args: &[&str]| {
        let out = nanobot()
            .arg("ckpt")
            .args(args)
            .args(["--connect", &format!("tcp/127.0.0.1:{port}")])
            .output()
            .unwrap();
        assert!(!out.status.success(), "ckpt {args:?} was carried out");
        text(&out.stderr)
    };
    // eve as herself (not trusted), then eve's key claiming to be alice.
    for (name, why) in [("eve", "not one this promoter trusts"), ("alice", "does not verify")] {
        let eve = operator_key("eve");
        let err = refused(&["rollback", "--operator", name, "--key", eve.to_str().unwrap()]);
        assert!(err.contains(why), "as {name}: {err}");
    }
    let ask = |cmd: &CkptCommand| {
        let replies = rt
            .block_on(bus.get::<CkptCommand, CkptReply>(
                &format!("nb/ckpt/control/{}", cmd.op),
                "",
                cmd,
                Duration::from_secs(10),
            ))
            .unwrap();
        replies.into_iter().next().expect("the promoter answers").unwrap().msg
    };
    let r = ask(&CkptCommand::read("rollback", ""));
    assert!(!r.ok && r.json.contains("must be signed"), "{r:?}");
    // A signed command is carried out once: the same bytes again are a replay.
    let alice = SigningKey::load(&operator_key("alice")).unwrap();
    let mut once = CkptCommand::read("promote", "no-such-candidate");
    once.operator = "alice".into();
    once.issued_ms = now_ns() / 1_000_000;
    once.signature = alice.sign(&once.signed_text("nb"));
    let r = ask(&once);
    assert!(!r.ok && r.json.contains("no candidate"), "{r:?}");
    let r = ask(&once);
    assert!(!r.ok && r.json.contains("a replay"), "{r:?}");
    let mut stale = once.clone();
    stale.issued_ms -= 3_600_000;
    stale.signature = alice.sign(&stale.signed_text("nb"));
    let r = ask(&stale);
    assert!(!r.ok && r.json.contains("sign it again"), "{r:?}");
    assert!(
        list_unchanged(&seen, "tiny-base+lora.2"),
        "nothing refused changed what the robots run"
    );
    let out = ckpt(
        port,
        &[
            "rollback",
            "--operator",
            "alice",
            "--key",
            operator_key("alice").to_str().unwrap(),
        ],
    );
    assert!(out.contains("tiny-base+lora.1"), "{out}");
    wait_until("every robot back on lora.1", Duration::from_secs(20), || {
        ["r0", "r1"]
            .iter()
            .all(|r| status(&seen, r).is_some_and(|s| s.adapter_id == "tiny-base+lora.1"))
    });
    let list = ckpt(port, &["list"]);
    assert_eq!(list.matches("refused").count(), 3, "{list}");
    assert!(list.contains("fleet tiny-base+lora.1"), "{list}");
    let generation = status(&seen, "r0").unwrap().generation;

    // kill -9: the rollout comes back from the ledger, and the robots with it.
    fleet.signal(libc::SIGKILL);
    fleet.wait(Duration::from_secs(10));
    let ledger = std::fs::read_to_string(state.join("ledger.jsonl")).unwrap();
    assert!(ledger.ends_with('\n') && ledger.lines().count() >= 10, "{ledger}");
    seen.lock().unwrap().status.clear();
    let mut fleet = node();
    let line = fleet.expect_line("rollout read back", Duration::from_secs(30));
    assert!(
        line.contains(&format!("generation={generation}"))
            && line.contains("tiny-base+lora.1")
            && line.contains(r#"revoked=["tiny-base+lora.2"]"#),
        "{line}"
    );
    wait_until("the restarted robots on lora.1", Duration::from_secs(30), || {
        ["r0", "r1"]
            .iter()
            .all(|r| status(&seen, r).is_some_and(|s| s.adapter_id == "tiny-base+lora.1"))
    });
    let show = ckpt(port, &["show", "tiny-base+lora.2"]);
    assert!(show.contains("\"accepted\": true"), "{show}");
    // The ledger names who rolled the fleet back.
    assert!(ledger.contains("rollback by operator alice"), "{ledger}");
    fleet.signal(libc::SIGTERM);
    assert!(fleet.wait(Duration::from_secs(30)).success());
}
