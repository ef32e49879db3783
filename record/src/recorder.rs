//! `McapRecorder` writes messages into an MCAP file; [`record`] feeds it from Zenoh
//! subscriptions through a bounded queue and a writer thread.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::future::Future;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use mcap::records::{MessageHeader, Metadata};
use nanobot_messages::schema;
use nanobot_messages::{codec::now_ns, decode_any, from_json, to_json, Kind};
use nanobot_tap::{payload_bytes, sample_key, Tap, TapError};

use crate::{RecordError, DERIVED_FROM, JSON_ENCODING, KIND, RAW_ENCODING};
use nanobot_messages::foxglove::{camera_image, image_schema};

/// What a recording holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordStats {
    /// Messages recorded (camera images beside them not counted).
    pub messages: u64,
    /// Payload bytes recorded.
    pub bytes: u64,
    /// Messages stored as their bytes (not NanoBot messages, or not JSON-exact).
    pub raw: u64,
    /// Foxglove images written beside camera messages.
    pub images: u64,
    /// Messages that arrived while the recorder's queue was full, and are not in the file.
    pub dropped: u64,
    /// Channels in the file.
    pub channels: usize,
}

/// Which channel a message goes to on one topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Lane {
    Json(Kind),
    Raw,
    Image(&'static str),
}

/// Writes NanoBot messages (or any payloads) into an MCAP file.
pub struct McapRecorder<W: Write + Seek> {
    writer: mcap::Writer<W>,
    path: PathBuf,
    /// Every kind's JSON Schema, as text.
    kind_schemas: HashMap<Kind, String>,
    schemas: HashMap<Lane, u16>,
    channels: HashMap<(String, Lane), u16>,
    stats: RecordStats,
}

impl McapRecorder<BufWriter<File>> {
    /// A new recording at `path` (replaced if it exists).
    pub fn create(path: &Path) -> Result<Self, RecordError> {
        let file = File::create(path).map_err(|source| RecordError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        McapRecorder::new(BufWriter::with_capacity(1 << 20, file), path)
    }
}

impl<W: Write + Seek> McapRecorder<W> {
    /// A recording written to `w`; `path` names it in errors.
    pub fn new(w: W, path: &Path) -> Result<Self, RecordError> {
        let mcap_err = |source| RecordError::Mcap {
            path: path.to_path_buf(),
            source,
        };
        let writer = mcap::WriteOptions::new()
            .compression(None)
            .profile("")
            .library(concat!("nanobot ", env!("CARGO_PKG_VERSION")))
            .create(w)
            .map_err(mcap_err)?;
        let kind_schemas = schema::json_schemas().map_err(RecordError::Schema)?;
        Ok(McapRecorder {
            writer,
            path: path.to_path_buf(),
            kind_schemas,
            schemas: HashMap::new(),
            channels: HashMap::new(),
            stats: RecordStats::default(),
        })
    }

    fn mcap_err(&self, source: mcap::McapError) -> RecordError {
        RecordError::Mcap {
            path: self.path.clone(),
            source,
        }
    }

    fn channel(&mut self, topic: &str, lane: Lane, derived_from: Option<&str>) -> Result<u16, RecordError> {
        if let Some(id) = self.channels.get(&(topic.to_string(), lane)) {
            return Ok(*id);
        }
        let schema_id = match lane {
            Lane::Raw => 0,
            _ if self.schemas.contains_key(&lane) => self.schemas[&lane],
            Lane::Json(kind) => {
                let id = self
                    .writer
                    .add_schema(kind.name(), "jsonschema", self.kind_schemas[&kind].as_bytes())
                    .map_err(|e| self.mcap_err(e))?;
                self.schemas.insert(lane, id);
                id
            }
            Lane::Image(name) => {
                let text = image_schema(name).to_string();
                let id = self
                    .writer
                    .add_schema(name, "jsonschema", text.as_bytes())
                    .map_err(|e| self.mcap_err(e))?;
                self.schemas.insert(lane, id);
                id
            }
        };
        let mut metadata = BTreeMap::new();
        let encoding = match lane {
            Lane::Json(kind) => {
                metadata.insert(KIND.to_string(), kind.name().to_string());
                JSON_ENCODING
            }
            Lane::Raw => RAW_ENCODING,
            Lane::Image(_) => JSON_ENCODING,
        };
        if let Some(from) = derived_from {
            metadata.insert(DERIVED_FROM.to_string(), from.to_string());
        }
        let id = self
            .writer
            .add_channel(schema_id, topic, encoding, &metadata)
            .map_err(|e| self.mcap_err(e))?;
        self.channels.insert((topic.to_string(), lane), id);
        self.stats.channels = self.channels.len();
        Ok(id)
    }

    fn write(
        &mut self,
        channel_id: u16,
        sequence: u64,
        log_time: u64,
        publish_time: u64,
        data: &[u8],
    ) -> Result<(), RecordError> {
        let header = MessageHeader {
            channel_id,
            // MCAP's sequence is 32 bits; the envelope's full sequence is in the JSON view.
            sequence: sequence as u32,
            log_time,
            publish_time,
        };
        self.writer
            .write_to_known_channel(&header, data)
            .map_err(|e| self.mcap_err(e))
    }

    /// Record one payload that arrived on `key` at `log_time_ns` (ns since the Unix epoch).
    pub fn record(&mut self, key: &str, payload: Bytes, log_time_ns: u64) -> Result<(), RecordError> {
        self.stats.messages += 1;
        self.stats.bytes += payload.len() as u64;
        let decoded = decode_any(payload.clone()).ok().and_then(|(header, msg)| {
            let view = to_json(&header, &msg);
            // Stored as JSON only when the JSON reads back as the same message.
            let exact = from_json(&view).is_ok_and(|back| back.msg == msg);
            exact.then_some((header, msg, view))
        });
        let Some((header, msg, view)) = decoded else {
            self.stats.raw += 1;
            let id = self.channel(key, Lane::Raw, None)?;
            return self.write(id, self.stats.messages, log_time_ns, log_time_ns, &payload);
        };
        let id = self.channel(key, Lane::Json(header.kind), None)?;
        let data = serde_json::to_vec(&view).expect("a JSON value serializes");
        self.write(id, header.seq, log_time_ns, header.stamp_ns, &data)?;
        if let Some((name, image)) = camera_image(&header, &msg) {
            let id = self.channel(&format!("{key}/image"), Lane::Image(name), Some(key))?;
            let data = serde_json::to_vec(&image).expect("a JSON value serializes");
            self.write(id, header.seq, log_time_ns, header.stamp_ns, &data)?;
            self.stats.images += 1;
        }
        Ok(())
    }

    /// Count messages lost before they reached the recorder.
    pub fn add_dropped(&mut self, n: u64) {
        self.stats.dropped += n;
    }

    /// Write the recording's summary (`nanobot.recording` metadata: keys, counts) and the MCAP
    /// footer; the file is complete only after this.
    pub fn finish(mut self, keys: &[String]) -> Result<RecordStats, RecordError> {
        let s = &self.stats;
        let metadata = BTreeMap::from([
            ("keys".to_string(), keys.join(" ")),
            ("messages".to_string(), s.messages.to_string()),
            ("raw".to_string(), s.raw.to_string()),
            ("dropped".to_string(), s.dropped.to_string()),
        ]);
        self.writer
            .write_metadata(&Metadata {
                name: "nanobot.recording".into(),
                metadata,
            })
            .map_err(|e| self.mcap_err(e))?;
        self.writer.finish().map_err(|e| self.mcap_err(e))?;
        let mut inner = self.writer.into_inner();
        inner.flush().map_err(|source| RecordError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(self.stats)
    }
}

/// Record every message on `keys` into `path` until `stop` completes. Arrivals go through a
/// bounded queue (`queue` messages) to a writer thread; what a full queue refuses is counted
/// as dropped. `started` is called once every subscription is declared.
pub async fn record(
    session: &zenoh::Session,
    keys: &[String],
    path: &Path,
    queue: usize,
    started: impl FnOnce(),
    stop: impl Future<Output = ()>,
) -> Result<RecordStats, RecordError> {
    let recorder = McapRecorder::create(path)?;
    let (tx, rx) = flume::bounded::<(Arc<str>, Bytes, u64)>(queue.max(1));
    let tap = Tap::open(session, keys, tx, |key, sample| {
        (sample_key(key, sample), payload_bytes(sample.payload()), now_ns())
    })
    .await
    .map_err(|TapError::Subscribe { key, reason }| RecordError::Zenoh { key, reason })?;
    let counters = tap.counters.clone();
    let keys_owned = keys.to_vec();
    let writer = std::thread::Builder::new()
        .name("nb-record".into())
        .spawn(move || {
            let mut recorder = recorder;
            while let Ok((key, payload, at)) = rx.recv() {
                recorder.record(&key, payload, at)?;
            }
            Ok::<_, RecordError>(recorder)
        })
        .map_err(|source| RecordError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    started();
    stop.await;
    // Closing the tap drops its senders: the writer drains the queue and ends.
    tap.close().await;
    let thread = |e: String| RecordError::Writer {
        path: path.to_path_buf(),
        reason: e,
    };
    let mut recorder = tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(|e| thread(e.to_string()))?
        .map_err(|_| thread("it panicked".into()))??;
    recorder.add_dropped(counters.dropped());
    tokio::task::spawn_blocking(move || recorder.finish(&keys_owned))
        .await
        .map_err(|e| thread(e.to_string()))?
}
