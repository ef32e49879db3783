//! A recording reads back as the bytes that were recorded: JSON channels re-encode exactly,
//! raw ones are kept as they were, and the camera images beside them are not played.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use nanobot_messages::{encode, ActionChunk, ActionSource, Encoding, Event, EventKind, RawFrame};
use nanobot_record::{McapRecorder, Recording, DERIVED_FROM, JSON_ENCODING, RAW_ENCODING};

fn chunk(actions: Vec<f32>) -> ActionChunk {
    ActionChunk {
        obs_seq: 7,
        dt_ns: 50_000_000,
        horizon: 2,
        action_dim: 2,
        actions,
        source: ActionSource::Policy,
        policy_version: "base".into(),
        adapter_version: String::new(),
    }
}

#[test]
fn recorded_messages_play_back_byte_for_byte_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rec.mcap");
    let camera = RawFrame {
        sensor: "camera".into(),
        encoding: Encoding::Jpeg,
        shape: vec![2, 2, 3],
        data: vec![0xff, 0xd8, 0xff, 0xe0, 1, 2, 3].into(),
    };
    let event = Event {
        episode: 3,
        event: EventKind::EpisodeEnd {
            success: true,
            steps: 21,
            reward: 1.5,
        },
    };
    let sent: Vec<(&str, Vec<u8>)> = vec![
        ("nb/r0/raw/camera", encode("r0", 1, 1_000, &camera).unwrap().to_vec()),
        (
            "nb/r0/act",
            encode("r0", 2, 2_000, &chunk(vec![0.1, -0.2, 0.3, 0.4]))
                .unwrap()
                .to_vec(),
        ),
        // NaN has no JSON form: kept as bytes.
        (
            "nb/r0/act",
            encode("r0", 3, 3_000, &chunk(vec![f32::NAN, 0.0, 0.0, 0.0]))
                .unwrap()
                .to_vec(),
        ),
        // Not a NanoBot message at all.
        ("nb/r0/raw/device", b"hello".to_vec()),
        ("nb/r0/event", encode("r0", 4, 4_000, &event).unwrap().to_vec()),
    ];
    let mut rec = McapRecorder::create(&path).unwrap();
    for (i, (key, payload)) in sent.iter().enumerate() {
        rec.record(key, Bytes::from(payload.clone()), 10_000 + i as u64 * 50)
            .unwrap();
    }
    let stats = rec.finish(&["nb/**".to_string()]).unwrap();
    assert_eq!((stats.messages, stats.raw, stats.images, stats.dropped), (5, 2, 1, 0));

    let recording = Recording::open(&path).unwrap();
    assert_eq!(
        recording.topics(),
        ["nb/r0/act", "nb/r0/event", "nb/r0/raw/camera", "nb/r0/raw/device"],
        "the derived image channel is not played"
    );
    let played: Vec<_> = recording.messages().unwrap().map(Result::unwrap).collect();
    assert_eq!(played.len(), sent.len());
    for (i, (p, (key, payload))) in played.iter().zip(&sent).enumerate() {
        assert_eq!(p.key, *key);
        assert_eq!(&p.payload, payload, "message {i} on {key} is the bytes recorded");
        assert_eq!(p.log_time_ns, 10_000 + i as u64 * 50);
    }

    // What a plain MCAP reader sees: JSON with a schema, the image beside the camera frame.
    let bytes = std::fs::read(&path).unwrap();
    let mut encodings = Vec::new();
    for m in mcap::MessageStream::new(&bytes).unwrap() {
        let m = m.unwrap();
        let schema = m.channel.schema.as_ref().map(|s| (s.name.clone(), s.encoding.clone()));
        encodings.push((m.channel.topic.clone(), m.channel.message_encoding.clone(), schema));
        if m.channel.message_encoding == JSON_ENCODING {
            let v: serde_json::Value = serde_json::from_slice(&m.data).unwrap();
            if m.channel.metadata.contains_key(DERIVED_FROM) {
                assert_eq!(v["format"], "jpeg");
            } else {
                assert!(v["kind"].is_string() && v["msg"].is_object(), "{v}");
            }
        }
    }
    let image = ("nb/r0/raw/camera/image".to_string(), JSON_ENCODING.to_string());
    assert!(encodings.iter().any(|(t, e, s)| (t.clone(), e.clone()) == image
        && s.as_ref()
            .is_some_and(|(n, enc)| n == "foxglove.CompressedImage" && enc == "jsonschema")));
    assert!(encodings
        .iter()
        .any(|(t, e, s)| t == "nb/r0/raw/device" && e == RAW_ENCODING && s.is_none()));
}

#[test]
fn a_damaged_recording_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.mcap");
    let mut rec = McapRecorder::create(&path).unwrap();
    let msg = encode("r0", 1, 1, &RawFrame::f32_vector("state", &[1.0]))
        .unwrap()
        .to_vec();
    rec.record("nb/r0/raw/state", Bytes::from(msg), 1).unwrap();
    rec.finish(&[]).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = Recording::open(&path).err().expect("a cut file is refused").to_string();
    assert!(err.contains("cut.mcap"), "{err}");
}

/// A Zenoh session on its own: no scouting, no listener.
async fn lone_session() -> zenoh::Session {
    let mut cfg = zenoh::Config::default();
    cfg.insert_json5("scouting/multicast/enabled", "false").unwrap();
    cfg.insert_json5("listen/endpoints", "[]").unwrap();
    zenoh::open(cfg).await.unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// What arrived on a subscription: (key, payload, when).
type Arrivals = Arc<Mutex<Vec<(String, Vec<u8>, Instant)>>>;

/// Keep every sample on `key` as it arrives (the subscription lives as long as the subscriber).
async fn arrivals(session: &zenoh::Session, key: &str) -> (zenoh::pubsub::Subscriber<()>, Arrivals) {
    let got = Arrivals::default();
    let g = got.clone();
    let sub = session
        .declare_subscriber(key.to_string())
        .callback(move |s| {
            let arrival = (
                s.key_expr().as_str().to_string(),
                s.payload().to_bytes().into_owned(),
                Instant::now(),
            );
            g.lock().unwrap().push(arrival);
        })
        .await
        .unwrap();
    (sub, got)
}

#[test]
fn play_keeps_the_order_remaps_keys_and_the_recorded_pace_scaled_by_its_rate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("paced.mcap");
    let mut rec = McapRecorder::create(&path).unwrap();
    // Ten messages 200 ms apart, on two keys.
    let mut sent = Vec::new();
    for i in 0..10u64 {
        let key = if i % 3 == 0 { "nb/r0/event" } else { "nb/r0/raw/state" };
        let payload = encode("r0", i, i, &RawFrame::f32_vector("state", &[i as f32]))
            .unwrap()
            .to_vec();
        rec.record(key, Bytes::from(payload.clone()), 1_000_000_000 + i * 200_000_000)
            .unwrap();
        sent.push((key.replace("nb/", "lab/"), payload));
    }
    rec.finish(&[]).unwrap();

    runtime().block_on(async {
        let session = lone_session().await;
        let (_sub, got) = arrivals(&session, "lab/**").await;
        let opts = nanobot_record::PlayOptions {
            rate: 4.0,
            remaps: vec!["nb=lab".parse().unwrap()],
            ..Default::default()
        };
        let start = Instant::now();
        let stats = nanobot_record::play(&session, Recording::open(&path).unwrap(), &opts, std::future::pending())
            .await
            .unwrap();
        assert_eq!((stats.messages, stats.loops), (10, 1));
        assert!(stats.unmatched.is_empty(), "{:?}", stats.unmatched);
        let got = got.lock().unwrap().clone();
        let keys_and_bytes: Vec<_> = got.iter().map(|(k, b, _)| (k.clone(), b.clone())).collect();
        assert_eq!(
            keys_and_bytes, sent,
            "the same messages in the same order, under the remapped keys"
        );
        // At four times the speed, message i is due 50 ms × i after the first: never earlier,
        // and the last (due at 450 ms) long before the recorded pace would bring it (1.8 s).
        let first = got[0].2;
        assert!(first >= start);
        for (i, (_, _, at)) in got.iter().enumerate() {
            let due = std::time::Duration::from_millis(50 * i as u64);
            assert!(
                at.duration_since(first) + std::time::Duration::from_millis(1) >= due,
                "message {i} early"
            );
        }
        let last = got[9].2.duration_since(first);
        assert!(
            last < std::time::Duration::from_millis(1200),
            "--rate 4 plays 1.8 s of recording in about 0.45 s, not {last:?}"
        );
        let bad = nanobot_record::PlayOptions {
            rate: 0.0,
            ..Default::default()
        };
        let err = nanobot_record::play(&session, Recording::open(&path).unwrap(), &bad, std::future::pending()).await;
        assert!(matches!(err, Err(nanobot_record::RecordError::BadRate(_))));
    });
}

#[test]
fn a_looped_recording_starts_over_until_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loop.mcap");
    let mut rec = McapRecorder::create(&path).unwrap();
    for i in 0..3u64 {
        let payload = encode("r0", i, i, &RawFrame::f32_vector("state", &[i as f32]))
            .unwrap()
            .to_vec();
        rec.record("nb/r0/raw/state", Bytes::from(payload), 1_000 + i * 1_000_000)
            .unwrap();
    }
    rec.finish(&[]).unwrap();
    runtime().block_on(async {
        let session = lone_session().await;
        let (_sub, got) = arrivals(&session, "nb/**").await;
        let opts = nanobot_record::PlayOptions {
            rate: 10.0,
            looped: true,
            ..Default::default()
        };
        // Stopped once more than two passes went out.
        let watched = got.clone();
        let stop = async move {
            while watched.lock().unwrap().len() < 7 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        };
        let stats = nanobot_record::play(&session, Recording::open(&path).unwrap(), &opts, stop)
            .await
            .unwrap();
        assert!(stats.loops >= 2, "{stats:?}");
        let seqs: Vec<u64> = got
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b, _)| nanobot_messages::peek_header(b).unwrap().0.seq)
            .collect();
        assert_eq!(&seqs[..7], &[0, 1, 2, 0, 1, 2, 0], "each pass in the recorded order");
    });
}
