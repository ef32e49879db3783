//! Write the seed inputs of every fuzz target into `fuzz/corpus/<target>/seed-*`: well-formed
//! inputs of each kind, and edge cases (lengths near 4 GiB, counts and stamps at `u64::MAX`, an
//! image that declares 65,535 × 65,535). `cargo run -p nanobot-fuzzing --example seeds`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use nanobot_messages::device::{DeviceFrame, Sensor};
use nanobot_messages::*;
use nanobot_policy::checkpoint::{self, Meta, NormStats, Role};
use nanobot_policy::config::PolicyConfig;
use nanobot_policy::gguf;

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn observation(jpeg: Vec<u8>, w: u32, h: u32) -> Observation {
    Observation {
        episode: 1,
        frame_index: 2,
        task: 0,
        image: Image {
            width: w,
            height: h,
            encoding: Encoding::Jpeg,
            data: Blob::new(jpeg),
        },
        state: vec![0.5, 0.5, 0.0, 0.0, 0.25, 0.75],
        surface: Grid {
            rows: 2,
            cols: 2,
            cells: vec![0.0, 1.0, 0.5, 0.25],
        },
        action: vec![0.1, -0.1],
    }
}

fn main() {
    let sim = nanobot_sim::SimRobot::new(nanobot_sim::SimConfig::default()).unwrap();
    let jpeg = sim.render_jpeg(80);
    let obs = observation(jpeg.clone(), 64, 64);
    let bomb = observation(
        nanobot_policy::preprocess::jpeg_header_declaring(65535, 65535),
        65535,
        65535,
    );

    // Envelopes, and their JSON views for topic pub.
    let messages: Vec<(&str, AnyMessage)> = vec![
        (
            "raw-state",
            AnyMessage::RawFrame(RawFrame::f32_vector("state", &[1.0, 2.5, -3.0])),
        ),
        ("observation", AnyMessage::Observation(obs.clone())),
        ("observation-bomb", AnyMessage::Observation(bomb.clone())),
        (
            "event",
            AnyMessage::Event(Event {
                episode: u64::MAX,
                event: EventKind::EpisodeEnd {
                    success: true,
                    steps: u32::MAX,
                    reward: f32::NAN,
                },
            }),
        ),
        (
            "log-ack",
            AnyMessage::LogAck(LogAck {
                last_seq: u64::MAX,
                rows: 3,
                last: Some(StreamMark {
                    seq: u64::MAX,
                    stamp_ns: u64::MAX,
                }),
                last_event: None,
            }),
        ),
        (
            "ckpt-command",
            AnyMessage::CkptCommand(CkptCommand::read("promote", "x+lora.1")),
        ),
        (
            "promoted",
            AnyMessage::Promoted(Promoted::unsigned(u64::MAX, None, None, vec!["r0".into()])),
        ),
    ];
    for (name, msg) in &messages {
        let enc = codec::encode_any("r0", u64::MAX, u64::MAX, msg).unwrap().to_vec();
        put("envelope", name, &enc);
        // Header fields at their limits: body length (bytes 4..8) and robot length (24..26).
        let mut long_body = enc.clone();
        long_body[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        put("envelope", &format!("{name}-body-4gib"), &long_body);
        let mut long_robot = enc.clone();
        long_robot[24..26].copy_from_slice(&u16::MAX.to_le_bytes());
        put("envelope", &format!("{name}-robot-64k"), &long_robot);
        put("envelope", &format!("{name}-truncated"), &enc[..enc.len() / 2]);
        let (h, m) = codec::decode_any(bytes::Bytes::from(enc)).unwrap();
        put("topic_pub_json", name, json::to_json(&h, &m).to_string().as_bytes());
    }
    put("topic_pub_json", "no-kind", br#"{"msg":{}}"#);
    put(
        "topic_pub_json",
        "huge-seq",
        br#"{"kind":"LogAck","seq":18446744073709551615,"msg":{"last_seq":18446744073709551615,"rows":0}}"#,
    );

    // Device frames: one, two in a datagram, garbage before one, a length near 4 GiB.
    let frame = |sensor, seq, payload: Vec<u8>| {
        DeviceFrame {
            sensor,
            robot: "esp32-07".into(),
            seq,
            stamp_ns: u64::MAX,
            payload: payload.into(),
        }
        .encode()
    };
    let state = frame(Sensor::State, 1, DeviceFrame::f32_payload(&[0.5; 6]).to_vec());
    let camera = frame(Sensor::Camera, u32::MAX, jpeg.clone());
    let mut two = state.clone();
    two.extend_from_slice(&camera);
    let mut garbage = b"\x00NF\xffgarbage".to_vec();
    garbage.extend_from_slice(&state);
    let mut wild = state.clone();
    wild[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
    for (name, bytes) in [
        ("state", &state),
        ("camera", &camera),
        ("two", &two),
        ("garbage-first", &garbage),
        ("length-4gib", &wild),
    ] {
        put("device_datagram", name, bytes);
        put("device_stream", name, bytes);
    }

    // /v1/act bodies.
    let one = serde_json::to_vec(&obs).unwrap();
    put("act_json", "one", &one);
    put(
        "act_json",
        "two",
        format!("[{},{}]", String::from_utf8_lossy(&one), String::from_utf8_lossy(&one)).as_bytes(),
    );
    put("act_json", "jpeg-bomb", &serde_json::to_vec(&bomb).unwrap());
    put("act_json", "empty-array", b"[]");

    // Launch files: the shipped ones, and a secured one.
    for entry in std::fs::read_dir(repo().join("launch")).unwrap() {
        let path = entry.unwrap().path();
        put(
            "launch_file",
            &path.file_name().unwrap().to_string_lossy(),
            &std::fs::read(&path).unwrap(),
        );
    }
    put(
        "launch_file",
        "secured.toml",
        b"[security]\noperators = [\"alice\"]\nengineers = [\"bob\"]\n[robots]\ncount = 2\n[[node]]\nname = \"sim\"\nlisten = [\"tls/127.0.0.1:7447\"]\n[[node.actor]]\ntype = \"sim_robot\"\nfor_each_robot = true\n",
    );

    // A tiny checkpoint, and a GGUF with a tensor of each type.
    let ckpt = tiny_checkpoint(&repo().join("configs/policy/tiny.toml"));
    put("checkpoint", "tiny.safetensors", &ckpt);
    put("checkpoint", "header-only", &ckpt[..ckpt.len().min(4096)]);
    let mut wild_header = ckpt[..ckpt.len().min(4096)].to_vec();
    wild_header[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    put("checkpoint", "header-length-max", &wild_header);
    let values: Vec<f32> = (0..64).map(|i| i as f32 / 7.0).collect();
    let g = gguf::Gguf {
        metadata: [("general.name".to_string(), gguf::Value::String("fuzz".into()))].into(),
        tensors: [
            nanobot_policy::quant::DType::F32,
            nanobot_policy::quant::DType::F16,
            nanobot_policy::quant::DType::Q8_0,
            nanobot_policy::quant::DType::Mxfp4,
        ]
        .iter()
        .enumerate()
        .map(|(i, d)| gguf::Tensor::quantized(&format!("t{i}"), &[2, 32], *d, &values).unwrap())
        .collect(),
    }
    .to_bytes()
    .unwrap();
    put("gguf", "four-types", &g);
    let mut many = g.clone();
    many[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    put("gguf", "tensor-count-max", &many);
    put("gguf", "truncated", &g[..g.len() / 2]);

    // Camera frames.
    put("jpeg", "sim-64", &jpeg);
    put(
        "jpeg",
        "declares-65535",
        &nanobot_policy::preprocess::jpeg_header_declaring(65535, 65535),
    );
    put("jpeg", "truncated", &jpeg[..jpeg.len() / 2]);
    println!("seeds written under {}", repo().join("fuzz/corpus").display());
}

fn tiny_checkpoint(config: &Path) -> Vec<u8> {
    // The tiny test policy, smaller still: a seed a fuzzer mutates quickly.
    let mut cfg = PolicyConfig::load(config).unwrap();
    cfg.vision.dim = 8;
    cfg.vision.heads = 1;
    cfg.trunk.width = 8;
    cfg.trunk.heads = 1;
    cfg.head.hidden = 16;
    let vars = VarMap::new();
    nanobot_policy::Policy::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu), None).unwrap();
    nanobot_policy::model::seeded_init(&vars, 1).unwrap();
    let meta = Meta {
        kind: Role::Base,
        version: "fuzz".into(),
        norm: NormStats::fit(&[vec![0.0; cfg.inputs.state_dim]], &[vec![0.0; cfg.head.action_dim]]),
        config: cfg,
    };
    checkpoint::to_bytes(&vars, &meta).unwrap()
}
