//! `nanobot schema --json` is enough to decode every message kind from another language: a
//! Python script with `struct` alone and the printed schema decodes one message of every kind
//! (every Event variant too) into exactly NanoBot's own JSON view.

use crate::common;

use std::process::Command;

use common::*;
use nanobot_messages::*;
use serde_json::Value;

fn samples() -> Vec<AnyMessage> {
    let image = Image {
        width: 2,
        height: 1,
        encoding: Encoding::Rgb8,
        data: Blob::new(vec![1u8, 2, 3, 4, 5, 6]),
    };
    let mut v: Vec<AnyMessage> = vec![
        RawFrame::f32_vector("state", &[0.5, -1.25]).into(),
        Observation {
            episode: 3,
            frame_index: 9,
            task: 1,
            image,
            state: vec![0.25, 0.5],
            surface: Grid {
                rows: 1,
                cols: 2,
                cells: vec![1.0, 2.0],
            },
            action: vec![-0.5],
        }
        .into(),
        ActionChunk {
            obs_seq: 41,
            dt_ns: 50_000_000,
            horizon: 2,
            action_dim: 1,
            actions: vec![0.125, -0.125],
            source: ActionSource::Operator,
            policy_version: "base-1".into(),
            adapter_version: "lora-2".into(),
        }
        .into(),
        SegmentFinalized {
            path: "data/x.parquet".into(),
            rows: 10,
            first_seq: 1,
            last_seq: 10,
            bytes: 4096,
            sha256: "ab".repeat(32),
        }
        .into(),
        ReplayRequest {
            batch_size: 8,
            n_obs_steps: 2,
            horizon: 16,
            seed: 5,
            held_out: true,
        }
        .into(),
        ReplayBatch {
            windows: 1,
            wait: String::new(),
            tensors: vec![
                TensorView {
                    name: "action".into(),
                    dtype: DType::F32,
                    shape: vec![2],
                    offset: 0,
                },
                TensorView {
                    name: "obs_pad".into(),
                    dtype: DType::U8,
                    shape: vec![1],
                    offset: 8,
                },
            ],
            rows: 12,
            mean_age_s: 1.5,
            newest_stamp_ns: 77,
            intervention_share: 0.25,
            data: Blob::new([1.5f32.to_le_bytes(), 2.5f32.to_le_bytes()].concat()),
        }
        .into(),
        Candidate {
            adapter_id: "c1".into(),
            base_version: "base-1".into(),
            step: 100,
            sha256: "ef".repeat(32),
            metrics: vec![Metric {
                name: "loss".into(),
                value: 0.25,
            }],
            adapter: Blob::new(b"safetensors bytes".to_vec()),
        }
        .into(),
        Promoted {
            generation: 3,
            fleet: None,
            canary: Some(AdapterManifest {
                adapter_id: "c1".into(),
                base_version: "base-1".into(),
                sha256: "cd".repeat(32),
                bytes: 33,
                metrics: vec![Metric {
                    name: "shadow_success".into(),
                    value: 0.9,
                }],
                signature: "ab".repeat(64),
            }),
            canary_robots: vec!["r0".into(), "r3".into()],
            revoked: vec!["a0".into()],
            expires_ms: 1_700_000_000_000,
            signature: "ef".repeat(64),
        }
        .into(),
        AdapterRequest {
            sha256: "cd".repeat(32),
        }
        .into(),
        AdapterBytes {
            adapter_id: "c1".into(),
            sha256: "cd".repeat(32),
            data: Blob::new(vec![9u8; 33]),
        }
        .into(),
        PolicyStatus {
            base_version: "base-1".into(),
            adapter_id: "c1".into(),
            generation: 3,
            refused: 1,
            last_error: "bad signature".into(),
        }
        .into(),
        CkptCommand {
            op: "promote".into(),
            id: "c1".into(),
            operator: "alice".into(),
            issued_ms: 1_700_000_000_000,
            signature: "12".repeat(64),
        }
        .into(),
        CkptReply {
            ok: true,
            json: "{}".into(),
        }
        .into(),
        Stats {
            node: "sim".into(),
            actor: "logger_r0".into(),
            restarts: 1,
            handled: 2,
            errors: 3,
            dropped: 4,
            uptime_ms: 5,
            extra: vec![Metric {
                name: "rows".into(),
                value: 6.0,
            }],
        }
        .into(),
        Reject {
            sensor: "camera".into(),
            reason: "image".into(),
            detail: "image is 32×32, want 64×64".into(),
            seq: 7,
            count: 1,
        }
        .into(),
        LogAck {
            last_seq: 99,
            rows: 100,
            last: Some(StreamMark {
                seq: 99,
                stamp_ns: 1_700_000_000_000_000_000,
            }),
            last_event: None,
        }
        .into(),
        Spooled {
            stream: SpoolStream::Events,
            prev: Some(StreamMark {
                seq: 98,
                stamp_ns: 1_699_999_999_000_000_000,
            }),
            message: Blob::new(vec![7u8; 12]),
        }
        .into(),
    ];
    for event in [
        EventKind::EpisodeStart {
            task: 2,
            shift: "brightness".into(),
        },
        EventKind::EpisodeEnd {
            success: true,
            steps: 21,
            reward: 1.0,
        },
        EventKind::Intervention {
            active: false,
            reason: "actions resumed".into(),
        },
        EventKind::Reward { value: -0.5 },
        EventKind::Preference { score: -1 },
    ] {
        v.push(Event { episode: 4, event }.into());
    }
    v
}

#[test]
fn python_decodes_every_kind_from_the_printed_schema_alone() {
    let dir = temp_dir("schema");
    let out = nanobot().args(["schema", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let schema = dir.join("schema.json");
    std::fs::write(&schema, &out.stdout).unwrap();
    let msgs = samples();
    let mut kinds: Vec<Kind> = msgs.iter().map(AnyMessage::kind).collect();
    kinds.dedup();
    assert_eq!(kinds.len(), Kind::ALL.len(), "a sample of every kind");
    let mut files = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        let e = encode_any("robot-7", i as u64, 1_700_000_000_000_000_000, m).unwrap();
        let mut bytes = e.head.to_vec();
        e.blobs.iter().for_each(|b| bytes.extend_from_slice(b));
        let f = dir.join(format!("{i}.bin"));
        std::fs::write(&f, bytes).unwrap();
        files.push(f);
    }
    let out = Command::new("python3")
        .arg(repo().join("tests/python/decode_with_schema.py"))
        .arg(&schema)
        .args(&files)
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let decoded: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(decoded.len(), msgs.len());
    for (m, d) in msgs.iter().zip(&decoded) {
        assert_eq!(&serde_json::to_value(m).unwrap(), d, "{:?}", m.kind());
    }
}
