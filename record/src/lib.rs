//! Record a fleet's topics into MCAP and play them back, like `rosbag record` / `rosbag play`.
//!
//! A recording is an [MCAP](https://mcap.dev) file that any MCAP reader and Foxglove open:
//!
//! - every NanoBot message is stored as its JSON view (`{"kind", "robot", "seq", "stamp_ns",
//!   "msg"}`, blobs in base64) on a channel whose topic is the Zenoh key, with the kind's JSON
//!   Schema (`jsonschema`) and message encoding `json`; the log time is when the recorder got
//!   the message, the publish time the envelope's stamp;
//! - a payload that is not a NanoBot message, or whose JSON view would not read back as the same
//!   message (a NaN in a vector, say), is stored as its bytes, message encoding `raw`;
//! - camera frames are also written as `foxglove.CompressedImage` (JPEG) or `foxglove.RawImage`
//!   (RGB8) on a channel `{key}/image`, marked `nanobot.derived_from` so that playback skips it.
//!
//! Playing re-encodes each message with its recorded robot, sequence number and stamp, so the
//! bytes on the bus are the bytes that were recorded, in the recorded order, at the recorded
//! pace (scaled by `rate`).

pub mod player;
pub mod recorder;

use std::path::PathBuf;

pub use player::{play, PlayOptions, PlayStats, Recording, Remap};
pub use recorder::{record, McapRecorder, RecordStats};

/// Message encoding of channels that carry a NanoBot message's JSON view.
pub const JSON_ENCODING: &str = "json";
/// Message encoding of channels that carry payloads exactly as they travelled.
pub const RAW_ENCODING: &str = "raw";
/// Channel metadata key of a channel derived from another one (played back never).
pub const DERIVED_FROM: &str = "nanobot.derived_from";
/// Channel metadata key naming the NanoBot message kind of a JSON channel.
pub const KIND: &str = "nanobot.kind";

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a readable MCAP file: {source}")]
    Mcap {
        path: PathBuf,
        #[source]
        source: mcap::McapError,
    },
    #[error("{path}: message {index} on topic {topic}: {reason}")]
    BadMessage {
        path: PathBuf,
        topic: String,
        index: u64,
        reason: String,
    },
    #[error("{path}: the recording's writer thread failed: {reason}")]
    Writer { path: PathBuf, reason: String },
    #[error("the message types do not trace into schemas: {0}")]
    Schema(String),
    #[error("key expression {key}: {reason}")]
    Zenoh { key: String, reason: String },
    #[error("remap {0:?}: expected FROM=TO, two key prefixes")]
    BadRemap(String),
    #[error("rate {0}: must be a positive number")]
    BadRate(f64),
}
