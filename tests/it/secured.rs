//! A secured fleet (`[security]` in its launch file): TLS with mutual authentication on every
//! endpoint, and Zenoh access control generated from the launch file. Each party tries what it
//! may and may not do with its own certificate, against real nodes on loopback; every refusal
//! is paired with the same party (or the same kind of party) succeeding where it is allowed.

use crate::common;
use crate::promotion::{adapter, candidate};

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use nanobot_actors::bus::{Bus, BusConfig, Mode, PubQos};
use nanobot_actors::pki;
use nanobot_messages::{
    codec, AnyMessage, Blob, Candidate, CkptCommand, CkptReply, Event, EventKind, Promoted, SpoolStream, Spooled,
};
use nanobot_policy::runner::Runner;
use serde_json::Value;

/// What a party saw on `nb/**`: (key, decoded event episode or promoted generation).
type Seen = Arc<Mutex<Vec<(String, Option<u64>)>>>;

fn open_as(rt: &tokio::runtime::Runtime, keys: &std::path::Path, who: &str, port: u16) -> Bus {
    let id: pki::Identity = who.parse().unwrap();
    let cfg = BusConfig {
        mode: Mode::Client,
        connect: vec![format!("tls/127.0.0.1:{port}")],
        tls: Some(pki::files(keys, &id)),
        ..BusConfig::default()
    };
    rt.block_on(Bus::open(&cfg, "nb"))
        .unwrap_or_else(|e| panic!("{who} opens a session: {e}"))
}

fn watch(rt: &tokio::runtime::Runtime, bus: &Bus) -> (Seen, zenoh::pubsub::Subscriber<()>) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let session = bus.session().clone();
    let sub = rt
        .block_on(async move {
            session
                .declare_subscriber("nb/**")
                .callback(move |sample| {
                    let bytes = nanobot_actors::bus::payload_bytes(sample.payload());
                    let tag = match codec::decode_any(bytes) {
                        Ok((_, AnyMessage::Event(e))) => Some(e.episode),
                        Ok((_, AnyMessage::Promoted(p))) => Some(p.generation),
                        Ok((h, AnyMessage::Spooled(_))) => Some(h.seq),
                        _ => None,
                    };
                    s.lock().unwrap().push((sample.key_expr().as_str().to_string(), tag));
                })
                .await
        })
        .unwrap();
    (seen, sub)
}

fn saw(seen: &Seen, key: &str, tag: u64) -> bool {
    seen.lock().unwrap().iter().any(|(k, t)| k == key && *t == Some(tag))
}

/// `tests/python/secured_client.py`'s verdict: session, messages seen, control replies.
pub(crate) fn python_client(args: &[&str]) -> Value {
    let out = Command::new("python3")
        .arg(repo().join("tests/python/secured_client.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python client (needs eclipse-zenoh, .ci/run installs it): {}",
        text(&out.stderr)
    );
    serde_json::from_str(text(&out.stdout).trim()).unwrap()
}

#[test]
fn a_secured_fleet_admits_each_party_to_what_its_launch_file_grants_and_nobody_else() {
    let dir = temp_dir("secured");
    let base_path = tiny_base(&dir);
    let base = Runner::load(&base_path, None).unwrap();
    let keys = dir.join("keys");
    let state = dir.join("promoter");
    // alice: an operator's signing pair and certificate; eve: a certificate from the same
    // authority, for a name the launch file does not list.
    for who in ["alice", "eve"] {
        let out = nanobot()
            .args(["keys", "init", keys.to_str().unwrap(), "--operator", who])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains(&format!("certificate operator.{who}")),
            "{}",
            text(&out.stdout)
        );
    }
    let (p_robots, p_learn, p_apu) = (free_port(), free_port(), free_port());
    let file = write_launch(
        "secured",
        &format!(
            r#"
[security]
keys = "{keys}"
generate = true
operators = ["alice"]
engineers = ["bob"]
[robots]
ids = ["r0", "r1"]
[[node]]
name = "robots"
listen = ["tls/127.0.0.1:{p_robots}"]
[[node.actor]]
type = "sim_robot"
robots = ["r0"]
for_each_robot = true
config = "@CONFIGS@/sim_robot.toml"
[[node.actor]]
type = "ingest"
robots = ["r0"]
for_each_robot = true
config = "@CONFIGS@/ingest.toml"
[[node.actor]]
type = "spool"
robots = ["r0"]
for_each_robot = true
config = "@CONFIGS@/spool.toml"
set = {{ dir = "{spool}/{{robot}}" }}
[[node]]
name = "learn"
listen = ["tls/127.0.0.1:{p_learn}"]
connect = ["tls/127.0.0.1:{p_robots}"]
[[node.actor]]
type = "promoter"
config = "@CONFIGS@/promoter.toml"
set = {{ base = "{base}", state_dir = "{state}", keys = "{keys}", generate_key = true, operators = {{ alice = "{keys}/operators/alice.pub" }}, gates = {{ held_out_tolerance = -10.0 }} }}
# The training node: not started here; this test holds its certificate.
[[node]]
name = "apu"
listen = ["tls/127.0.0.1:{p_apu}"]
[[node.actor]]
type = "trainer"
config = "@CONFIGS@/trainer.toml"
"#,
            keys = keys.display(),
            base = base_path.display(),
            state = state.display(),
            spool = dir.join("spool").display(),
        ),
    );
    let mut cmd = nanobot();
    cmd.arg("launch")
        .arg(&*file)
        .args(["--node", "robots", "--node", "learn", "--grace", "5"]);
    let mut fleet = Proc::spawn(cmd);
    let made = fleet.expect_line("made TLS certificates", Duration::from_secs(30));
    for id in ["node.robots", "node.learn", "node.apu", "engineer.bob"] {
        assert!(made.contains(id), "{made}");
    }
    assert!(!made.contains("operator.alice"), "alice's certificate is kept: {made}");
    fleet.expect_line("rollout read back", Duration::from_secs(60));
    let rt = runtime();

    // doctor prints who may do what: each node only its own actors' keys, engineers no change.
    let out = nanobot().args(["doctor", "--launch"]).arg(&*file).output().unwrap();
    let doctor = text(&out.stdout);
    for line in [
        "access    node.robots: nb/log/r0/spool nb/node/robots/** nb/r0/event nb/r0/obs nb/r0/raw/** nb/r0/rejects | - |",
        "access    node.apu: nb/ckpt/candidate nb/node/apu/** | nb/replay/sample |",
        "access    engineer.bob: - | ** (not nb/ckpt/control/promote nb/ckpt/control/rollback) | -",
        "access    operator.alice: - | ** | -",
    ] {
        assert!(doctor.contains(line), "doctor lacks {line:?}:\n{doctor}");
    }
    assert!(
        doctor.contains("ok        secured: TLS with mutual authentication") && !doctor.contains("WARN"),
        "{doctor}"
    );

    // bob, an engineer connected to the promoter's node, watches everything: the robots'
    // node's telemetry reaches him through it.
    let bob = open_as(&rt, &keys, "engineer.bob", p_learn);
    let (seen, _sub) = watch(&rt, &bob);
    wait_until("bob sees r0's observations", Duration::from_secs(30), || {
        seen.lock().unwrap().iter().any(|(k, _)| k == "nb/r0/obs")
    });

    // With the robots' node's certificate: another robot's telemetry, a rollout, a candidate
    // and a control query are refused; its own robot's telemetry passes (sent last, on the
    // same session, so everything before it has arrived when it does).
    let robots = open_as(&rt, &keys, "node.robots", p_learn);
    let event = Event {
        episode: 424_242,
        event: EventKind::EpisodeStart {
            task: 0,
            shift: "none".into(),
        },
    };
    let put_event = |bus: &Bus, robot: &str| {
        let p = rt
            .block_on(bus.publisher::<Event>(&format!("nb/{robot}/event"), robot, PubQos::Data))
            .unwrap();
        rt.block_on(p.put(&event)).unwrap();
    };
    let forged_rollout = Promoted::unsigned(424_242, None, None, Vec::new());
    let p = rt
        .block_on(robots.publisher::<Promoted>("nb/ckpt/promoted", "", PubQos::Data))
        .unwrap();
    rt.block_on(p.put(&forged_rollout)).unwrap();
    let bytes = adapter(&base, "tiny-base+lora.forged", |_| {});
    let p = rt
        .block_on(robots.publisher::<Candidate>("nb/ckpt/candidate", "", PubQos::Data))
        .unwrap();
    rt.block_on(p.put(&candidate(&base, "tiny-base+lora.forged", bytes, None)))
        .unwrap();
    let replies = rt
        .block_on(robots.get::<CkptCommand, CkptReply>(
            "nb/ckpt/control/list",
            "",
            &CkptCommand::read("list", ""),
            Duration::from_secs(2),
        ))
        .unwrap();
    assert!(
        replies.is_empty(),
        "the robots' node asked the promoter: {} replies",
        replies.len()
    );
    // A robot's spooled telemetry counts only from the node that runs its spool.
    let put_spooled = |bus: &Bus, robot: &str| {
        let p = rt
            .block_on(bus.publisher::<Spooled>(&format!("nb/log/{robot}/spool"), robot, PubQos::Data))
            .unwrap();
        let inner = codec::encode(robot, 424_242, 1, &event).unwrap().to_vec();
        let forged = Spooled {
            stream: SpoolStream::Events,
            prev: None,
            message: Blob::new(inner),
        };
        rt.block_on(p.put_with(&forged, 424_242, 1, None)).unwrap();
    };
    put_spooled(&robots, "r1");
    // r1's episode under a condition no robot runs: it would add a condition the promoter's
    // forgetting guard keeps (`retain_seen`), were it taken.
    let forged_condition = Event {
        episode: 424_243,
        event: EventKind::EpisodeStart {
            task: 0,
            shift: "warm_light".into(),
        },
    };
    let p = rt
        .block_on(robots.publisher::<Event>("nb/r1/event", "r1", PubQos::Data))
        .unwrap();
    rt.block_on(p.put(&forged_condition)).unwrap();
    put_event(&robots, "r1");
    put_spooled(&robots, "r0");
    put_event(&robots, "r0");
    wait_until(
        "bob sees the robots' node's own robot's event",
        Duration::from_secs(10),
        || saw(&seen, "nb/r0/event", 424_242),
    );
    assert!(
        !saw(&seen, "nb/r1/event", 424_242) && !saw(&seen, "nb/r1/event", 424_243),
        "the robots' node published r1's telemetry (or a condition for it)"
    );
    assert!(saw(&seen, "nb/log/r0/spool", 424_242), "its own robot's spool passes");
    assert!(
        !saw(&seen, "nb/log/r1/spool", 424_242),
        "the robots' node published r1's spooled telemetry"
    );
    assert!(
        !saw(&seen, "nb/ckpt/promoted", 424_242),
        "the robots' node published a rollout"
    );

    // The training node's certificate may publish a candidate: the promoter judges it (its
    // gates refuse it here), and never heard of the robots' node's.
    let apu = open_as(&rt, &keys, "node.apu", p_learn);
    let bytes = adapter(&base, "tiny-base+lora.genuine", |_| {});
    let p = rt
        .block_on(apu.publisher::<Candidate>("nb/ckpt/candidate", "", PubQos::Data))
        .unwrap();
    assert!(
        rt.block_on(p.wait_matched(Duration::from_secs(10))),
        "the promoter's subscription reaches the training node"
    );
    rt.block_on(p.put(&candidate(&base, "tiny-base+lora.genuine", bytes, None)))
        .unwrap();
    let judged = fleet.expect_line("candidate judged", Duration::from_secs(60));
    assert!(
        judged.contains("genuine") && judged.contains("accepted=false"),
        "{judged}"
    );
    let ckpt = |args: &[&str]| {
        nanobot()
            .arg("ckpt")
            .args(args)
            .arg("--launch")
            .arg(&*file)
            .args(["--key", keys.join("operators/alice.key").to_str().unwrap()])
            .output()
            .unwrap()
    };
    // bob lists (the CLI takes the launch file's first engineer and the promoter's node).
    let out = nanobot()
        .args(["ckpt", "list", "--launch"])
        .arg(&*file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list = text(&out.stdout);
    assert!(list.contains("genuine") && !list.contains("forged"), "{list}");
    // bob may not promote, even with alice's signing key; eve may do nothing.
    for who in ["engineer.bob", "operator.eve"] {
        for cmd in [&["promote", "tiny-base+lora.genuine"][..], &["rollback"][..]] {
            let out = ckpt(&[cmd, &["--operator", "alice", "--identity", who]].concat());
            assert!(!out.status.success(), "{who}: {cmd:?} carried out");
            assert!(
                text(&out.stderr).contains("no promoter answered"),
                "{who}: {}",
                text(&out.stderr)
            );
        }
    }
    let ledger = || std::fs::read_to_string(state.join("ledger.jsonl")).unwrap_or_default();
    assert!(!ledger().contains("promoted by operator"), "{}", ledger());
    // alice, as herself: carried out, and the ledger names her.
    let out = ckpt(&["promote", "tiny-base+lora.genuine", "--operator", "alice"]);
    assert!(out.status.success(), "alice: {}", text(&out.stderr));
    assert!(ledger().contains("promoted by operator alice"), "{}", ledger());
    let out = ckpt(&["rollback", "--operator", "alice"]);
    assert!(out.status.success(), "alice: {}", text(&out.stderr));
    assert!(ledger().contains("rollback by operator alice"), "{}", ledger());

    // eve's certificate is the fleet authority's, but nothing lets her in: no data, no reply.
    let eve = open_as(&rt, &keys, "operator.eve", p_learn);
    let (eve_seen, _eve_sub) = watch(&rt, &eve);
    let before = seen.lock().unwrap().len();
    wait_until("bob keeps seeing the fleet", Duration::from_secs(10), || {
        seen.lock().unwrap().len() > before + 20
    });
    assert!(
        eve_seen.lock().unwrap().is_empty(),
        "eve saw {:?}",
        eve_seen.lock().unwrap().first()
    );

    // Python clients: with no certificate over TLS, or over plain TCP, no session at all;
    // with bob's certificate, data and the promoter's reply.
    let ca = pki::tls_dir(&keys).join("ca.pem");
    let ca = ca.to_str().unwrap();
    for endpoint in [format!("tls/127.0.0.1:{p_learn}"), format!("tcp/127.0.0.1:{p_learn}")] {
        let got = python_client(&[&endpoint, ca]);
        assert_eq!(got["session"], false, "{endpoint} without a certificate: {got}");
    }
    let bob_files = pki::files(&keys, &"engineer.bob".parse().unwrap());
    let got = python_client(&[
        &format!("tls/127.0.0.1:{p_learn}"),
        ca,
        bob_files.cert.to_str().unwrap(),
        bob_files.key.to_str().unwrap(),
    ]);
    assert!(
        got["messages"].as_u64().unwrap() > 0 && got["replies"] == 1,
        "bob from Python: {got}"
    );

    fleet.signal(libc::SIGTERM);
    assert!(fleet.wait(Duration::from_secs(30)).success());
}

#[test]
fn serve_beyond_loopback_takes_a_token_and_tls_and_answers_https_only() {
    let dir = temp_dir("serve-tls");
    let base = tiny_base(&dir);
    let keys = dir.join("keys");
    let out = nanobot()
        .args(["keys", "init", keys.to_str().unwrap(), "--node", "serve"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let files = pki::files(&keys, &"node.serve".parse().unwrap());
    let serve = |listen: &str, extra: &[&str]| {
        let mut cmd = nanobot();
        cmd.args(["serve", "--checkpoint"])
            .arg(&base)
            .args(["--listen", listen])
            .args(extra)
            .env_remove("NANOBOT_SERVE_TOKEN");
        cmd
    };
    // Beyond loopback: a token alone is refused, as is TLS alone.
    let (cert, key) = (files.cert.to_str().unwrap(), files.key.to_str().unwrap());
    for extra in [vec!["--token", "s3cret"], vec!["--tls-cert", cert, "--tls-key", key]] {
        let out = serve("0.0.0.0:0", &extra).output().unwrap();
        assert!(!out.status.success(), "{extra:?} served beyond loopback");
        assert!(text(&out.stderr).contains("--tls-cert"), "{}", text(&out.stderr));
    }
    // With both: HTTPS that a client trusting the fleet's authority reads, the token still
    // wanted, and nothing for plain HTTP.
    let port = free_port();
    let mut server = Proc::spawn(serve(
        &format!("0.0.0.0:{port}"),
        &["--token", "s3cret", "--tls-cert", cert, "--tls-key", key],
    ));
    server.expect_line("https://", Duration::from_secs(30));
    let ca = pki::tls_dir(&keys).join("ca.pem");
    let script = r#"
import json, ssl, sys, time, urllib.request, urllib.error
port, ca = sys.argv[1], sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
ctx.check_hostname = False
def get(path, token=None, context=ctx, scheme="https"):
    req = urllib.request.Request(f"{scheme}://127.0.0.1:{port}{path}")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, context=context, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception as e:
        return type(e).__name__
got = {
    "healthz": get("/healthz"),
    "model_no_token": get("/v1/model"),
    "model": get("/v1/model", "s3cret"),
    "plain_http": get("/healthz", scheme="http", context=None),
    "untrusted": get("/healthz", context=ssl.create_default_context()),
}
# The server counts a failed handshake when it sees it fail: poll its counter (5 s at most).
for _ in range(50):
    req = urllib.request.Request(f"https://127.0.0.1:{port}/metrics", headers={"Authorization": "Bearer s3cret"})
    metrics = urllib.request.urlopen(req, context=ctx, timeout=10).read().decode()
    got["refused"] = next(float(l.split()[1]) for l in metrics.splitlines() if l.startswith("nanobot_tls_handshakes_refused_total "))
    if got["refused"] >= 2:
        break
    time.sleep(0.1)
print(json.dumps(got))
"#;
    let out = Command::new("python3")
        .args(["-c", script, &port.to_string(), ca.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(
        (&got["healthz"], &got["model_no_token"], &got["model"]),
        (&200.into(), &401.into(), &200.into()),
        "{got}"
    );
    assert!(!got["plain_http"].is_number(), "plain HTTP answered: {got}");
    assert!(
        !got["untrusted"].is_number(),
        "a client that does not trust the fleet's authority connected: {got}"
    );
    assert!(
        got["refused"].as_f64().is_some_and(|n| n >= 2.0),
        "plain HTTP and the untrusting client are counted: {got}"
    );
    server.signal(libc::SIGTERM);
    server.wait(Duration::from_secs(10));
}

#[test]
fn doctor_warns_about_a_plain_listener_beyond_loopback() {
    let port = free_port();
    let file = write_launch(
        "doctor-plain",
        &format!(
            "[robots]\ncount = 1\n[[node]]\nname = \"open\"\nlisten = [\"tcp/0.0.0.0:{port}\"]\n[[node.actor]]\ntype = \"sim_robot\"\nfor_each_robot = true\n\
             [[node]]\nname = \"local\"\nlisten = [\"tcp/127.0.0.1:{}\"]\n[[node.actor]]\ntype = \"stats_echo\"\n",
            free_port()
        ),
    );
    let out = nanobot()
        .args(["doctor", "--connect-timeout", "0.5", "--launch"])
        .arg(&*file)
        .output()
        .unwrap();
    let doctor = text(&out.stdout);
    assert!(
        doctor.contains(&format!(
            "WARN      node open listens on tcp/0.0.0.0:{port} beyond loopback without TLS"
        )),
        "{doctor}"
    );
    assert_eq!(
        doctor.matches("beyond loopback without TLS").count(),
        1,
        "the loopback node is fine: {doctor}"
    );
    assert!(doctor.contains("not secured"), "{doctor}");
}
