//! The fuzz targets' bodies. `cargo fuzz` runs them on nightly (`fuzz/`, one thin target per
//! function); on stable, `tests/corpus.rs` runs every input kept in `fuzz/corpus/<target>/`
//! through the same function in CI, under a bound on what one input may allocate.
//!
//! Every function takes any bytes. An error is the right answer to a bad input; a panic, a
//! hang or an allocation beyond [`MAX_ALLOCATION`] is a bug. Where a decoder accepts an input,
//! the function also checks that what it decoded encodes and decodes back the same.

use std::path::Path;

use bytes::Bytes;
use nanobot_messages::{codec, device, json};
use nanobot_policy::preprocess::{self, JpegLimits};

/// The largest single allocation one input may cause (the corpus test enforces it).
pub const MAX_ALLOCATION: usize = 64 << 20;

/// A target's body: any bytes in, a panic only on a bug.
pub type Target = fn(&[u8]);

/// Every target: its name (the directory of its corpus, the `fuzz/fuzz_targets/` file) and body.
pub const TARGETS: &[(&str, Target)] = &[
    ("envelope", envelope),
    ("device_datagram", device_datagram),
    ("device_stream", device_stream),
    ("topic_pub_json", topic_pub_json),
    ("act_json", act_json),
    ("launch_file", launch_file),
    ("checkpoint", checkpoint),
    ("gguf", gguf),
    ("jpeg", jpeg),
];

/// A NanoBot envelope off the bus: decoded whole and in two pieces alike; what decodes encodes
/// again to bytes that decode to the same encoding.
pub fn envelope(data: &[u8]) {
    let whole = Bytes::copy_from_slice(data);
    let decoded = codec::decode_any(whole.clone());
    let cut = data.first().map_or(0, |b| *b as usize % (data.len() + 1));
    let pieces = codec::decode_any_pieces(&[whole.slice(..cut), whole.slice(cut..)]);
    assert_eq!(
        decoded.as_ref().map(|(h, _)| h.clone()).ok(),
        pieces.as_ref().map(|(h, _)| h.clone()).ok(),
        "whole and in pieces decode alike"
    );
    let _ = codec::peek_header_ref(data);
    let _ = nanobot_messages::decode_view::<nanobot_messages::RawFrameView>(data);
    if let Ok((h, msg)) = decoded {
        let again = codec::encode_any(&h.robot, h.seq, h.stamp_ns, &msg)
            .expect("a decoded message encodes")
            .to_vec();
        let (h2, msg2) = codec::decode_any(Bytes::from(again.clone())).expect("its encoding decodes");
        assert_eq!(
            (&h2.robot, h2.seq, h2.stamp_ns, h2.kind),
            (&h.robot, h.seq, h.stamp_ns, h.kind)
        );
        let third = codec::encode_any(&h2.robot, h2.seq, h2.stamp_ns, &msg2)
            .expect("encodes")
            .to_vec();
        assert_eq!(third, again, "decode ∘ encode is stable");
    }
}

/// A UDP datagram from a device: every frame in it decodes, or is one error, and a decoded
/// frame encodes back to bytes that decode to it.
pub fn device_datagram(data: &[u8]) {
    for frame in device::decode_datagram(&Bytes::copy_from_slice(data))
        .into_iter()
        .flatten()
    {
        let back = device::DeviceFrame::decode(&Bytes::from(frame.encode())).expect("an encoded frame decodes");
        assert_eq!(back, frame);
    }
}

/// A serial byte stream from a device, arriving in chunks: the decoder never holds more than
/// it was given and finds the same frames however the bytes are cut.
pub fn device_stream(data: &[u8]) {
    let frames = |chunk: usize| {
        let mut d = device::StreamDecoder::new();
        let mut out = Vec::new();
        for part in data.chunks(chunk.max(1)) {
            d.push(part);
            while let Some(f) = d.next_frame() {
                out.extend(f.ok());
            }
        }
        out
    };
    let whole = frames(data.len());
    let cut = data.first().map_or(1, |b| *b as usize % 64 + 1);
    let bytewise = frames(cut);
    // Cut differently, a frame may be found later; every frame found whole is found in chunks.
    for f in &whole {
        assert!(bytewise.contains(f), "{f:?} found whole but not in chunks of {cut}");
    }
}

/// The JSON `nanobot topic pub` takes: parsed, encoded, decoded back.
pub fn topic_pub_json(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Ok(m) = json::from_json(&value) else { return };
    let robot = m.robot.unwrap_or_default();
    let Ok(enc) = codec::encode_any(&robot, m.seq.unwrap_or(0), 0, &m.msg) else {
        return;
    };
    let (h, _) = codec::decode_any(Bytes::from(enc.to_vec())).expect("what topic pub encodes decodes");
    assert_eq!(h.robot, robot);
}

/// A `/v1/act` JSON body: the observations, then what the model would take from each (the
/// image within the default JPEG limits).
pub fn act_json(data: &[u8]) {
    let Ok(obs) = preprocess::observations_from_json(data) else {
        return;
    };
    for o in &obs {
        let _ = preprocess::step_of_within(o, &JpegLimits::default());
    }
}

/// A launch file, parsed and checked (the config files it names are not read).
pub fn launch_file(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = nanobot_actors::launch::parse_with_files(
        Path::new("fuzz.toml"),
        &text,
        &nanobot_actors::registry::names(),
        |_| None,
        |p| {
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                p.display().to_string(),
            ))
        },
    );
}

/// A checkpoint's bytes (safetensors with NanoBot's metadata), as an adapter fetch delivers.
pub fn checkpoint(data: &[u8]) {
    let _ = nanobot_policy::checkpoint::read_bytes(data, "fuzz");
}

/// A GGUF export: parsed, and every tensor's values read.
pub fn gguf(data: &[u8]) {
    if let Ok(g) = nanobot_policy::gguf::Gguf::from_bytes(data) {
        for t in &g.tensors {
            let _ = t.values();
        }
    }
}

/// A camera frame: decoded within the default limits.
pub fn jpeg(data: &[u8]) {
    if let Ok((w, h, rgb)) = preprocess::decode_jpeg_rgb_within(data, &JpegLimits::default()) {
        assert_eq!(rgb.len(), w as usize * h as usize * 3);
    }
}
