//! A Foxglove bridge: the fleet's live topics on Foxglove's WebSocket protocol
//! (subprotocol `foxglove.sdk.v1`, the `foxglove` crate's server), so that Foxglove shows them.
//!
//! Every NanoBot message on the bridged key expressions is sent as its JSON view on a channel
//! named by its key, with its kind's JSON Schema (so every field is plottable: `msg.state[0]`,
//! `msg.actions[1]`), and camera frames and observations also as `foxglove.CompressedImage`
//! (or `RawImage`) on `{key}/image`. A channel is advertised when its first message arrives; a
//! message is decoded and encoded only while some client subscribes to its channel. Arrivals go
//! through a bounded queue to a thread of their own (JSON and base64 are CPU work): what a full
//! queue refuses is counted, and so are payloads that are not NanoBot messages.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use foxglove::{ChannelBuilder, Context, PartialMetadata, RawChannel, Schema, WebSocketServer, WebSocketServerHandle};
use nanobot_messages::foxglove::{camera_image, image_schema};
use nanobot_messages::{codec, decode_any, schema, to_json, Kind};
use nanobot_tap::{payload_bytes, sample_key, Tap, TapCounters, TapError};

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("Foxglove WebSocket server on {addr}: {reason}")]
    Server { addr: String, reason: String },
    #[error("key expression {key}: {reason}")]
    Zenoh { key: String, reason: String },
    #[error("the message types do not trace into schemas: {0}")]
    Schema(String),
}

/// What the bridge has done so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BridgeStats {
    /// Messages received from the bus.
    pub received: u64,
    /// Messages sent to at least one client (images not counted).
    pub sent: u64,
    /// Payloads that were not NanoBot messages.
    pub not_nanobot: u64,
    /// Arrivals refused by the full queue.
    pub dropped: u64,
    /// Channels advertised.
    pub channels: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    not_nanobot: AtomicU64,
    channels: AtomicU64,
}

/// A running bridge: its server, its subscriptions and its forwarding thread.
pub struct Bridge {
    server: WebSocketServerHandle,
    tap: Option<Tap>,
    counters: Arc<Counters>,
    /// The tap's own counters (received, dropped), kept after it closes.
    tapped: Arc<TapCounters>,
    forwarder: Option<std::thread::JoinHandle<()>>,
}

impl Bridge {
    /// The port the WebSocket server listens on.
    pub fn port(&self) -> u16 {
        self.server.port()
    }

    pub fn stats(&self) -> BridgeStats {
        let c = &self.counters;
        BridgeStats {
            received: self.tapped.received(),
            sent: c.sent.load(Ordering::Relaxed),
            not_nanobot: c.not_nanobot.load(Ordering::Relaxed),
            dropped: self.tapped.dropped(),
            channels: c.channels.load(Ordering::Relaxed),
        }
    }

    /// Undeclare the subscriptions, let the forwarder drain, and stop the server.
    pub async fn stop(mut self) -> BridgeStats {
        if let Some(tap) = self.tap.take() {
            tap.close().await;
        }
        if let Some(f) = self.forwarder.take() {
            let _ = tokio::task::spawn_blocking(move || f.join()).await;
        }
        let stats = self.stats();
        self.server.stop().wait().await;
        stats
    }
}

/// Which channel of a key a message goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Lane {
    Message(Kind),
    Image(&'static str),
}

/// The forwarding thread's state: the channels advertised so far.
struct Forwarder {
    ctx: Arc<Context>,
    kind_schemas: HashMap<Kind, String>,
    channels: HashMap<(Arc<str>, Lane), Arc<RawChannel>>,
    /// Per key, the image channel beside it (`None`: its messages carry no picture), known
    /// once its first message was decoded.
    images: HashMap<Arc<str>, Option<Arc<RawChannel>>>,
    counters: Arc<Counters>,
}

impl Forwarder {
    fn channel(&mut self, key: &Arc<str>, lane: Lane) -> Option<Arc<RawChannel>> {
        if let Some(c) = self.channels.get(&(key.clone(), lane)) {
            return Some(c.clone());
        }
        let (topic, schema) = match lane {
            Lane::Message(kind) => (
                key.to_string(),
                Schema::new(kind.name(), "jsonschema", self.kind_schemas[&kind].clone().into_bytes()),
            ),
            Lane::Image(name) => (
                format!("{key}/image"),
                Schema::new(name, "jsonschema", image_schema(name).to_string().into_bytes()),
            ),
        };
        let built = ChannelBuilder::new(&topic)
            .context(&self.ctx)
            .message_encoding("json")
            .schema(schema)
            .build_raw();
        match built {
            Ok(c) => {
                self.counters.channels.fetch_add(1, Ordering::Relaxed);
                self.channels.insert((key.clone(), lane), c.clone());
                Some(c)
            }
            Err(e) => {
                tracing::warn!(topic, error = %e, "no Foxglove channel");
                None
            }
        }
    }

    fn forward(&mut self, key: Arc<str>, payload: Bytes) {
        // The header names the channel; the body is decoded only for a subscribed client (or
        // to learn, once per key, whether its messages carry a picture).
        let Ok((header, _)) = codec::peek_header_ref(&payload) else {
            return self.not_nanobot(&key);
        };
        let (kind, stamp_ns) = (header.kind, header.stamp_ns);
        let channel = self.channel(&key, Lane::Message(kind));
        let image = self.images.get(&key).cloned();
        let wanted = |c: &Option<Arc<RawChannel>>| c.as_ref().is_some_and(|c| c.has_sinks());
        if !wanted(&channel) && image.as_ref().is_some_and(|i| !wanted(i)) {
            return;
        }
        let Ok((header, msg)) = decode_any(payload) else {
            return self.not_nanobot(&key);
        };
        let meta = PartialMetadata::with_log_time(stamp_ns);
        if let Some(c) = channel.filter(|c| c.has_sinks()) {
            let json = serde_json::to_vec(&to_json(&header, &msg)).expect("a JSON value serializes");
            c.log_with_meta(&json, meta);
            self.counters.sent.fetch_add(1, Ordering::Relaxed);
        }
        let picture = camera_image(&header, &msg);
        let image = match image {
            Some(known) => known,
            None => {
                let c = picture
                    .as_ref()
                    .and_then(|(name, _)| self.channel(&key, Lane::Image(name)));
                self.images.insert(key.clone(), c.clone());
                c
            }
        };
        if let (Some(c), Some((_, picture))) = (image.filter(|c| c.has_sinks()), picture) {
            c.log_with_meta(&serde_json::to_vec(&picture).expect("a JSON value serializes"), meta);
        }
    }

    fn not_nanobot(&self, key: &str) {
        if self.counters.not_nanobot.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(key, "not a NanoBot message: not bridged (counted)");
        }
    }
}

/// Options of [`start`].
#[derive(Clone, Debug)]
pub struct BridgeOptions {
    /// Address to listen on (loopback by default: the bridge has no authentication).
    pub host: String,
    /// Port to listen on (0: any free one; Foxglove's default is 8765).
    pub port: u16,
    /// Messages that may wait for the forwarding thread.
    pub queue: usize,
}

impl Default for BridgeOptions {
    fn default() -> Self {
        BridgeOptions {
            host: "127.0.0.1".into(),
            port: 8765,
            queue: 4096,
        }
    }
}

/// Start the WebSocket server and bridge every message on `keys` to it.
pub async fn start(session: &zenoh::Session, keys: &[String], opts: &BridgeOptions) -> Result<Bridge, BridgeError> {
    let kind_schemas = schema::json_schemas().map_err(BridgeError::Schema)?;
    let ctx = Context::new();
    let server = WebSocketServer::new()
        .name("nanobot")
        .bind(opts.host.clone(), opts.port)
        .context(&ctx)
        .start()
        .await
        .map_err(|e| BridgeError::Server {
            addr: format!("{}:{}", opts.host, opts.port),
            reason: e.to_string(),
        })?;
    let counters = Arc::new(Counters::default());
    let (tx, rx) = flume::bounded::<(Arc<str>, Bytes)>(opts.queue.max(1));
    let tap = Tap::open(session, keys, tx, |key, sample| {
        (sample_key(key, sample), payload_bytes(sample.payload()))
    })
    .await
    .map_err(|TapError::Subscribe { key, reason }| BridgeError::Zenoh { key, reason })?;
    let mut forwarder = Forwarder {
        ctx,
        kind_schemas,
        channels: HashMap::new(),
        images: HashMap::new(),
        counters: counters.clone(),
    };
    let forwarder = std::thread::Builder::new()
        .name("nb-foxglove".into())
        .spawn(move || {
            while let Ok((key, payload)) = rx.recv() {
                forwarder.forward(key, payload);
            }
        })
        .map_err(|e| BridgeError::Server {
            addr: format!("{}:{}", opts.host, opts.port),
            reason: format!("no forwarding thread: {e}"),
        })?;
    Ok(Bridge {
        server,
        tapped: tap.counters.clone(),
        tap: Some(tap),
        counters,
        forwarder: Some(forwarder),
    })
}
