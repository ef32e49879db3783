//! The Zenoh bus: a session from config, typed publishers, subscribers and queryables over the
//! NanoBot envelope, liveliness tokens, and the W3C trace context in the attachment.
//!
//! Between the actors of one node a message is handed over typed, without encoding
//! ([`local`]); Zenoh carries it to the subscribers of other nodes and tools, and only when one
//! matches. Big payloads are not copied on the way through: the envelope's header and body go
//! in one small buffer, each blob is handed to Zenoh as its own slice, and on receipt a
//! contiguous payload is shared with the decoded message (`bytes::Bytes::from_owner`).
//!
//! The trace context travels only with sampled traces ([`BusConfig::trace_sample_ratio`]).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nanobot_messages::{codec, CodecError, Header, HeaderRef, Message, TraceContext, TraceSampler, Viewable};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use zenoh::bytes::ZBytes;
use zenoh::key_expr::{KeyExpr, OwnedKeyExpr};
use zenoh::qos::{CongestionControl, Priority};
use zenoh::sample::{Locality, Sample};
use zenoh::Session;

pub use nanobot_telemetry::{Hop, HopKind, SpanSink};

pub mod inbox;
mod local;

use local::{Delivery, LocalGuard, LocalRoute, LocalRouter};

pub use inbox::{Feeder, Inbox, InboxStats, Keep};

#[derive(Debug, Error)]
pub enum BusError {
    #[error("zenoh config: {0}")]
    Config(String),
    #[error("cannot open the zenoh session ({endpoints}): {reason}")]
    Open { endpoints: String, reason: String },
    #[error("zenoh on {key}: {reason}")]
    Zenoh { key: String, reason: String },
    #[error("message on {key}: {source}")]
    Codec { key: String, source: CodecError },
}

/// The role of this process in the Zenoh network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Peer,
    Client,
    Router,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Peer => "peer",
            Mode::Client => "client",
            Mode::Router => "router",
        }
    }
}

/// The share of new traces sampled when a config does not say: a 20 Hz fleet still yields a
/// trace every few seconds per robot, and an unsampled message carries no trace context.
pub const DEFAULT_TRACE_SAMPLE_RATIO: f64 = 0.01;

/// How to open the session. Peer by default, multicast scouting off unless asked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    pub mode: Mode,
    /// Endpoints to listen on, e.g. `tcp/127.0.0.1:7447` or `unixsock-stream//tmp/nb.sock`.
    pub listen: Vec<String>,
    /// Endpoints to connect to (other nodes, or a `zenohd` router).
    pub connect: Vec<String>,
    pub multicast_scouting: bool,
    /// A Zenoh JSON5 config file; the fields above are applied on top of it.
    pub config_file: Option<PathBuf>,
    /// How long opening the session keeps trying its connect endpoints (Zenoh's
    /// `connect/timeout_ms`; -1 forever). Default: Zenoh's (peers forever, clients once).
    pub connect_timeout_ms: Option<i64>,
    /// The share of new traces that are recorded and carry their W3C trace context on the wire
    /// (0 to 1). The decision is made where a trace starts; every message downstream follows it.
    pub trace_sample_ratio: f64,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            mode: Mode::default(),
            listen: Vec::new(),
            connect: Vec::new(),
            multicast_scouting: false,
            config_file: None,
            connect_timeout_ms: None,
            trace_sample_ratio: DEFAULT_TRACE_SAMPLE_RATIO,
        }
    }
}

impl BusConfig {
    pub fn to_zenoh(&self) -> Result<zenoh::Config, BusError> {
        if !(0.0..=1.0).contains(&self.trace_sample_ratio) {
            return Err(BusError::Config(format!(
                "trace_sample_ratio = {} is not between 0 and 1",
                self.trace_sample_ratio
            )));
        }
        let mut cfg = match &self.config_file {
            Some(path) => {
                zenoh::Config::from_file(path).map_err(|e| BusError::Config(format!("{}: {e}", path.display())))?
            }
            None => zenoh::Config::default(),
        };
        let set = |cfg: &mut zenoh::Config, key: &str, value: String| {
            cfg.insert_json5(key, &value)
                .map_err(|e| BusError::Config(format!("{key} = {value}: {e}")))
        };
        set(&mut cfg, "mode", format!("{:?}", self.mode.as_str()))?;
        set(
            &mut cfg,
            "scouting/multicast/enabled",
            self.multicast_scouting.to_string(),
        )?;
        let list = |v: &[String]| serde_json::to_string(v).expect("strings serialize");
        if !self.listen.is_empty() {
            set(&mut cfg, "listen/endpoints", list(&self.listen))?;
        } else if self.config_file.is_none() && self.mode != Mode::Router {
            // No listener: a peer that only connects out (CLI tools, robots behind NAT).
            set(&mut cfg, "listen/endpoints", "[]".into())?;
        }
        if !self.connect.is_empty() {
            set(&mut cfg, "connect/endpoints", list(&self.connect))?;
        }
        if let Some(ms) = self.connect_timeout_ms {
            set(&mut cfg, "connect/timeout_ms", ms.to_string())?;
        }
        Ok(cfg)
    }

    pub fn describe(&self) -> String {
        format!(
            "mode={} listen=[{}] connect=[{}] multicast_scouting={}",
            self.mode.as_str(),
            self.listen.join(", "),
            self.connect.join(", "),
            self.multicast_scouting
        )
    }
}

/// Publication QoS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PubQos {
    /// Control paths (actions, raw sensor streams): never block, send at once; a congested link
    /// drops (Zenoh waits `wait_before_drop`, 1 ms by default, for a free transmit batch).
    Control,
    /// Observations: sent at once with control priority like `Control`, but never dropped. The
    /// policy wants them promptly and the logger wants every one: it acknowledges rows, and a
    /// row dropped on a starved link between two acknowledged ones would be lost silently.
    Sensor,
    /// Data that must arrive (logging, checkpoints): block on congestion.
    Data,
}

/// A session on the fleet's Zenoh network.
#[derive(Clone)]
pub struct Bus {
    session: Session,
    fleet: Arc<str>,
    local: Arc<LocalRouter>,
    sampler: TraceSampler,
    /// Where sampled hops are reported as OpenTelemetry spans (off unless the node exports).
    spans: SpanSink,
}

/// A message received from the bus.
#[derive(Clone, Debug)]
pub struct Received<T> {
    pub key: zenoh::key_expr::KeyExpr<'static>,
    pub header: Header,
    pub msg: T,
    pub trace: Option<TraceContext>,
}

/// Rate-limits the warning for undecodable messages of one subscription (once a second).
#[derive(Debug, Default)]
struct DecodeWarn {
    last: Mutex<Option<Instant>>,
}

impl DecodeWarn {
    fn warn(&self, stats: &InboxStats, key: &str, err: &CodecError) {
        let n = stats.decode_errors.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *last = Some(Instant::now());
            tracing::warn!(key, error = %err, total = n, "undecodable message dropped");
        }
    }

    /// A publication of this session whose type is not the subscriber's `T`.
    fn wrong_kind<T: Message>(&self, stats: &InboxStats, d: &Delivery) {
        let err = CodecError::WrongKind {
            expected: T::KIND,
            got: d.kind,
        };
        self.warn(stats, d.key.as_str(), &err)
    }
}

/// A message received as a borrowed view ([`Bus::subscribe_view`]): valid for the duration of
/// the handler's call.
#[derive(Debug)]
pub struct Viewed<'a, V> {
    pub key: &'a str,
    pub header: HeaderRef<'a>,
    pub msg: V,
    pub trace: Option<TraceContext>,
}

/// A sample as it came off the wire, not yet decoded (sources that take more than one
/// format, like ingest's raw topics).
#[derive(Clone, Debug)]
pub struct RawSample {
    pub key: String,
    pub payload: Bytes,
    pub trace: Option<TraceContext>,
}

/// The pieces of a Zenoh payload, each shared with Zenoh (no copy).
pub fn payload_pieces(z: &ZBytes) -> Vec<Bytes> {
    struct Piece(ZBytes, usize);
    impl AsRef<[u8]> for Piece {
        fn as_ref(&self) -> &[u8] {
            self.0.slices().nth(self.1).unwrap_or(&[])
        }
    }
    (0..z.slices().count())
        .map(|i| Bytes::from_owner(Piece(z.clone(), i)))
        .collect()
}

/// The bytes of a Zenoh payload: shared with Zenoh when contiguous, else gathered once.
pub fn payload_bytes(z: &ZBytes) -> Bytes {
    struct Whole(ZBytes);
    impl AsRef<[u8]> for Whole {
        fn as_ref(&self) -> &[u8] {
            self.0.slices().next().unwrap_or(&[])
        }
    }
    let mut slices = z.slices();
    match (slices.next(), slices.next()) {
        (None, _) => Bytes::new(),
        (Some(_), None) => Bytes::from_owner(Whole(z.clone())),
        _ => Bytes::from(z.to_bytes().into_owned()),
    }
}

/// The trace context of a sample, if its attachment holds a `traceparent`.
pub fn sample_trace(sample: &Sample) -> Option<TraceContext> {
    zbytes_trace(sample.attachment()?)
}

fn zbytes_trace(att: &ZBytes) -> Option<TraceContext> {
    TraceContext::parse_bytes(&att.to_bytes())
}

fn decode_sample<T: Message>(sample: &Sample) -> Result<Received<T>, CodecError> {
    let z = sample.payload();
    let (header, msg) = if z.slices().count() == 1 {
        codec::decode::<T>(payload_bytes(z))?
    } else {
        codec::decode_pieces::<T>(&payload_pieces(z))?
    };
    Ok(Received {
        key: sample.key_expr().clone(),
        header,
        msg,
        trace: sample_trace(sample),
    })
}

fn encoded_zbytes(e: codec::Encoded) -> ZBytes {
    if e.blobs.is_empty() {
        return ZBytes::from(e.head);
    }
    let mut w = ZBytes::writer();
    w.append(ZBytes::from(e.head));
    for b in e.blobs {
        if !b.is_empty() {
            w.append(ZBytes::from(b));
        }
    }
    w.finish()
}

/// A subscription on Zenoh (remote publishers) and on this session's local router; dropping it
/// undeclares both.
pub struct Subscription {
    _zenoh: zenoh::pubsub::Subscriber<()>,
    _local: LocalGuard,
}

/// A loopback TCP port nobody listens on right now, never handed out before by this process:
/// for tests and benchmarks that start sessions side by side. The kernel may give a port it
/// just released to the next `bind(0)`, so two calls in a row (or two tests at once) could
/// otherwise get the same one before either listens.
pub fn free_loopback_port() -> std::io::Result<u16> {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
}

fn owned_key(key: &str) -> Result<OwnedKeyExpr, BusError> {
    OwnedKeyExpr::autocanonize(key.to_string()).map_err(|e| zerr(key, e))
}

fn zerr(key: &str, e: impl std::fmt::Display) -> BusError {
    BusError::Zenoh {
        key: key.to_string(),
        reason: e.to_string(),
    }
}

impl Bus {
    pub async fn open(cfg: &BusConfig, fleet: &str) -> Result<Bus, BusError> {
        let zcfg = cfg.to_zenoh()?;
        let session = zenoh::open(zcfg).await.map_err(|e| BusError::Open {
            endpoints: cfg.describe(),
            reason: e.to_string(),
        })?;
        Ok(Bus {
            session,
            fleet: fleet.into(),
            local: Arc::default(),
            sampler: TraceSampler::ratio(cfg.trace_sample_ratio),
            spans: SpanSink::off(),
        })
    }

    /// This bus, reporting the hops of sampled traces to `spans`.
    pub fn with_spans(mut self, spans: SpanSink) -> Bus {
        self.spans = spans;
        self
    }

    /// Whether this node exports spans (hops reported to [`Bus::hop`] go somewhere).
    pub fn exports_spans(&self) -> bool {
        self.spans.is_on()
    }

    /// Report one hop of a sampled trace: `trace` is the context this hop published with (or
    /// made), `parent` the one it received; `end` is now. Nothing happens for an unsampled
    /// message or when the node exports no spans.
    #[allow(clippy::too_many_arguments)]
    pub fn hop(
        &self,
        name: &'static str,
        trace: Option<&TraceContext>,
        parent: Option<&TraceContext>,
        start_ns: u64,
        robot: &str,
        seq: u64,
        kind: HopKind,
    ) {
        if let (true, Some(trace)) = (self.spans.is_on(), trace) {
            self.spans.record(Hop {
                name,
                trace: *trace,
                parent: parent.map(|p| p.span_id),
                start_ns,
                end_ns: codec::now_ns(),
                robot: robot.to_string(),
                seq,
                kind,
            });
        }
    }

    /// Start a trace here, if the sampler picks it (see [`BusConfig::trace_sample_ratio`]).
    pub fn new_trace(&self) -> Option<TraceContext> {
        self.sampler.root()
    }

    pub fn session(&self) -> &Session {
        &self.session
    }
    pub fn fleet(&self) -> &str {
        &self.fleet
    }

    /// A typed publisher that stamps `robot` and a per-publisher sequence in every envelope.
    pub async fn publisher<T: Message>(&self, key: &str, robot: &str, qos: PubQos) -> Result<Publisher<T>, BusError> {
        let (cc, prio, express) = match qos {
            PubQos::Control => (CongestionControl::Drop, Priority::InteractiveHigh, true),
            PubQos::Sensor => (CongestionControl::Block, Priority::InteractiveHigh, true),
            PubQos::Data => (CongestionControl::Block, Priority::Data, false),
        };
        let key_expr = KeyExpr::from(owned_key(key)?);
        // Zenoh carries the message to other sessions only: this session's subscribers get it
        // from the local router.
        let inner = self
            .session
            .declare_publisher(key_expr.clone())
            .congestion_control(cc)
            .priority(prio)
            .express(express)
            .allowed_destination(Locality::Remote)
            .await
            .map_err(|e| zerr(key, e))?;
        let remote = Arc::new(AtomicBool::new(false));
        let r = remote.clone();
        inner
            .matching_listener()
            .callback(move |m| r.store(m.matching(), Ordering::Release))
            .background()
            .await
            .map_err(|e| zerr(key, e))?;
        // The listener reports changes; a subscriber that matched before it was declared is
        // read here (never cleared here: the listener may already have seen a newer state).
        if inner.matching_status().await.is_ok_and(|m| m.matching()) {
            remote.store(true, Ordering::Release);
        }
        Ok(Publisher {
            inner,
            remote,
            local: LocalRoute::new(self.local.clone(), key_expr),
            key: key.to_string(),
            robot: robot.to_string(),
            seq: AtomicU64::new(0),
            sampler: self.sampler,
            _t: PhantomData,
        })
    }

    /// Declare a subscription that decodes every sample as `T`, counts arrivals and decode
    /// errors in `stats`, and hands good messages to `on_msg` on Zenoh's receive thread.
    async fn subscribe_decoded<T: Message>(
        &self,
        key: &str,
        stats: Arc<InboxStats>,
        on_msg: impl Fn(Received<T>) + Send + Sync + 'static,
    ) -> Result<Subscription, BusError> {
        let owned = owned_key(key)?;
        let warn = Arc::new(DecodeWarn::default());
        let on_msg = Arc::new(on_msg);
        // From this session's publishers: the typed message, cloned.
        let (s, w, f) = (stats.clone(), warn.clone(), on_msg.clone());
        let local = self.local.declare(
            owned.clone(),
            false,
            Box::new(move |d: &Delivery| match d.msg.downcast_ref::<T>() {
                Some(m) => f(Received {
                    key: d.key.clone(),
                    header: d.header().to_header(),
                    msg: m.clone(),
                    trace: d.trace,
                }),
                None => {
                    s.received.fetch_add(1, Ordering::Relaxed);
                    w.wrong_kind::<T>(&s, d)
                }
            }),
        );
        // From other sessions: decoded off the wire.
        let zenoh = self
            .session
            .declare_subscriber(owned)
            .allowed_origin(Locality::Remote)
            .callback(move |sample| match decode_sample::<T>(&sample) {
                Ok(r) => on_msg(r),
                Err(e) => {
                    stats.received.fetch_add(1, Ordering::Relaxed);
                    warn.warn(&stats, sample.key_expr().as_str(), &e)
                }
            })
            .await
            .map_err(|e| zerr(key, e))?;
        Ok(Subscription {
            _zenoh: zenoh,
            _local: local,
        })
    }

    /// A typed subscription into an [`Inbox`] that keeps the latest message or a bounded queue
    /// (`keep`). Zenoh's receive thread never waits on it: what does not fit is counted.
    /// `wake` runs when a message arrives into an empty inbox (to poke an actor's mailbox once).
    pub async fn subscribe<T: Message>(
        &self,
        key: &str,
        keep: Keep,
        wake: impl Fn() + Send + Sync + 'static,
    ) -> Result<Inbox<Received<T>>, BusError> {
        let (feeder, inbox) = inbox::inbox(keep, wake);
        let stats = feeder.stats().clone();
        let sub = self
            .subscribe_decoded::<T>(key, stats, move |r| {
                feeder.push(r);
            })
            .await?;
        Ok(inbox.with_guard(sub))
    }

    /// Like [`Bus::subscribe`], but the payloads are left undecoded.
    pub async fn subscribe_raw(
        &self,
        key: &str,
        keep: Keep,
        wake: impl Fn() + Send + Sync + 'static,
    ) -> Result<Inbox<RawSample>, BusError> {
        let owned = owned_key(key)?;
        let (feeder, inbox) = inbox::inbox(keep, wake);
        let feeder = Arc::new(feeder);
        let f = feeder.clone();
        let local = self.local.declare(
            owned.clone(),
            true,
            Box::new(move |d: &Delivery| {
                if let Some(payload) = d.payload {
                    f.push(RawSample {
                        key: d.key.as_str().to_string(),
                        payload: payload.clone(),
                        trace: d.trace,
                    });
                }
            }),
        );
        let zenoh = self
            .session
            .declare_subscriber(owned)
            .allowed_origin(Locality::Remote)
            .callback(move |sample| {
                feeder.push(RawSample {
                    key: sample.key_expr().as_str().to_string(),
                    payload: payload_bytes(sample.payload()),
                    trace: sample_trace(&sample),
                });
            })
            .await
            .map_err(|e| zerr(key, e))?;
        Ok(inbox.with_guard(Subscription {
            _zenoh: zenoh,
            _local: local,
        }))
    }

    /// Typed subscription that runs `f` on Zenoh's receive thread for each message: the
    /// cheapest path, for handlers that only count, copy or forward. Keep `f` short.
    pub async fn subscribe_callback<T: Message>(
        &self,
        key: &str,
        f: impl Fn(Received<T>) + Send + Sync + 'static,
    ) -> Result<Callback, BusError> {
        let stats = Arc::new(InboxStats::default());
        let s = stats.clone();
        let subscriber = self
            .subscribe_decoded::<T>(key, stats.clone(), move |r| {
                s.received.fetch_add(1, Ordering::Relaxed);
                f(r)
            })
            .await?;
        Ok(Callback {
            _subscriber: subscriber,
            stats,
        })
    }

    /// Like [`Bus::subscribe_callback`], but `f` gets a borrowed view of each message (no
    /// allocation per message): for handlers that read a message and do not keep it.
    pub async fn subscribe_view<T: Viewable>(
        &self,
        key: &str,
        f: impl for<'a, 'b> Fn(Viewed<'a, T::View<'b>>) + Send + Sync + 'static,
    ) -> Result<Callback, BusError> {
        let owned = owned_key(key)?;
        let stats = Arc::new(InboxStats::default());
        let warn = Arc::new(DecodeWarn::default());
        let f = Arc::new(f);
        let (s, w, g) = (stats.clone(), warn.clone(), f.clone());
        let local = self.local.declare(
            owned.clone(),
            false,
            Box::new(move |d: &Delivery| {
                s.received.fetch_add(1, Ordering::Relaxed);
                match d.msg.downcast_ref::<T>() {
                    Some(m) => m.with_view(|v| {
                        g(Viewed {
                            key: d.key.as_str(),
                            header: d.header(),
                            msg: v,
                            trace: d.trace,
                        })
                    }),
                    None => w.wrong_kind::<T>(&s, d),
                }
            }),
        );
        let s = stats.clone();
        let zenoh = self
            .session
            .declare_subscriber(owned)
            .allowed_origin(Locality::Remote)
            .callback(move |sample| {
                s.received.fetch_add(1, Ordering::Relaxed);
                let z = sample.payload();
                let mut slices = z.slices();
                let key = sample.key_expr().as_str();
                match (slices.next(), slices.next()) {
                    (one, None) => match nanobot_messages::decode_view::<T::View<'_>>(one.unwrap_or(&[])) {
                        Ok((header, msg)) => f(Viewed {
                            key,
                            header,
                            msg,
                            trace: sample_trace(&sample),
                        }),
                        Err(e) => warn.warn(&s, key, &e),
                    },
                    // Reassembled from fragments (a big message): the blob stays in its pieces,
                    // shared with Zenoh; only the envelope's few fields are owned.
                    _ => match codec::decode_pieces::<T>(&payload_pieces(z)) {
                        Ok((h, m)) => m.with_view(|msg| {
                            f(Viewed {
                                key,
                                header: h.as_ref(),
                                msg,
                                trace: sample_trace(&sample),
                            })
                        }),
                        Err(e) => warn.warn(&s, key, &e),
                    },
                };
            })
            .await
            .map_err(|e| zerr(key, e))?;
        Ok(Callback {
            _subscriber: Subscription {
                _zenoh: zenoh,
                _local: local,
            },
            stats,
        })
    }

    /// A typed queryable: requests of type `Q` arrive on a bounded queue.
    pub async fn queryable<Q: Message>(&self, key: &str, capacity: usize) -> Result<Queryable<Q>, BusError> {
        let inner = self
            .session
            .declare_queryable(key.to_string())
            .with(flume::bounded(capacity.max(1)))
            .await
            .map_err(|e| zerr(key, e))?;
        Ok(Queryable {
            inner,
            key: key.to_string(),
            stats: InboxStats::default(),
            warn: DecodeWarn::default(),
            _q: PhantomData,
        })
    }

    /// Ask every matching queryable; each reply decodes to `R` or an error naming the key.
    pub async fn get<Q: Message, R: Message>(
        &self,
        key: &str,
        robot: &str,
        request: &Q,
        timeout: Duration,
    ) -> Result<Vec<Result<Received<R>, BusError>>, BusError> {
        let enc = codec::encode(robot, 0, codec::now_ns(), request).map_err(|e| BusError::Codec {
            key: key.into(),
            source: e,
        })?;
        let mut get = self
            .session
            .get(key.to_string())
            .payload(encoded_zbytes(enc))
            .timeout(timeout);
        if let Some(trace) = self.new_trace() {
            get = get.attachment(trace.to_bytes().to_vec());
        }
        let replies = get.await.map_err(|e| zerr(key, e))?;
        let mut out = Vec::new();
        while let Ok(reply) = replies.recv_async().await {
            out.push(match reply.result() {
                Ok(sample) => decode_sample::<R>(sample).map_err(|e| BusError::Codec {
                    key: sample.key_expr().as_str().to_string(),
                    source: e,
                }),
                Err(err) => Err(zerr(
                    key,
                    format!("error reply: {}", err.payload().try_to_string().unwrap_or_default()),
                )),
            });
        }
        Ok(out)
    }

    /// Announce an actor: its liveliness token on `{fleet}/node/{node}/{actor}`.
    pub async fn liveliness_token(
        &self,
        node: &str,
        actor: &str,
    ) -> Result<zenoh::liveliness::LivelinessToken, BusError> {
        let key = nanobot_messages::topics::node_actor(&self.fleet, node, actor);
        self.session
            .liveliness()
            .declare_token(key.clone())
            .await
            .map_err(|e| zerr(&key, e))
    }

    /// Every live actor of the fleet: `(node, actor)` pairs.
    pub async fn live_actors(&self, timeout: Duration) -> Result<Vec<(String, String)>, BusError> {
        let key = nanobot_messages::topics::all_actors(&self.fleet);
        let replies = self
            .session
            .liveliness()
            .get(key.clone())
            .timeout(timeout)
            .await
            .map_err(|e| zerr(&key, e))?;
        let prefix = format!("{}/node/", self.fleet);
        let mut seen: HashMap<String, ()> = HashMap::new();
        let mut out = Vec::new();
        while let Ok(reply) = replies.recv_async().await {
            if let Ok(sample) = reply.result() {
                let k = sample.key_expr().as_str();
                if seen.insert(k.to_string(), ()).is_none() {
                    if let Some((node, actor)) = k.strip_prefix(&prefix).and_then(|r| r.split_once('/')) {
                        out.push((node.to_string(), actor.to_string()));
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    pub async fn close(self) {
        let _ = self.session.close().await;
    }
}

/// A typed publisher. Subscribers on the same [`Bus`] get the message typed, without
/// encoding; Zenoh carries it to remote subscribers, encoded once, only while one matches.
pub struct Publisher<T> {
    inner: zenoh::pubsub::Publisher<'static>,
    /// A remote subscriber matches (kept by Zenoh's matching listener).
    remote: Arc<AtomicBool>,
    local: LocalRoute,
    key: String,
    robot: String,
    seq: AtomicU64,
    sampler: TraceSampler,
    _t: PhantomData<fn(T)>,
}

impl<T: Message> Publisher<T> {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Start a trace here, if the bus's sampler picks it.
    pub fn new_trace(&self) -> Option<TraceContext> {
        self.sampler.root()
    }

    /// Publish `msg` as the start of a new trace (sampled at the bus's ratio). Returns its
    /// sequence number.
    pub async fn put(&self, msg: &T) -> Result<u64, BusError> {
        self.put_traced(msg, self.new_trace().as_ref()).await
    }

    /// Publish `msg` in the trace `trace` (pass `parent.child()` to continue a trace; `None`
    /// for a message of an unsampled trace).
    pub async fn put_traced(&self, msg: &T, trace: Option<&TraceContext>) -> Result<u64, BusError> {
        self.put_wait(msg, trace)
    }

    /// Publish with an explicit sequence number and stamp (bridges that forward a device's own).
    pub async fn put_with(
        &self,
        msg: &T,
        seq: u64,
        stamp_ns: u64,
        trace: Option<&TraceContext>,
    ) -> Result<(), BusError> {
        self.publish(msg, seq, stamp_ns, trace)
    }

    /// [`Publisher::put_traced`] without an async runtime (tight loops, bridges, benchmarks).
    pub fn put_wait(&self, msg: &T, trace: Option<&TraceContext>) -> Result<u64, BusError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.publish(msg, seq, codec::now_ns(), trace)?;
        Ok(seq)
    }

    /// Hand `msg` to the local subscribers, then to Zenoh if a remote one matches. A Zenoh put
    /// resolves at once (it queues, or waits for room under blocking congestion control, as
    /// Zenoh's async put does too).
    fn publish(&self, msg: &T, seq: u64, stamp_ns: u64, trace: Option<&TraceContext>) -> Result<(), BusError> {
        use zenoh::Wait;
        let locals = self.local.current();
        let remote = self.remote.load(Ordering::Acquire);
        let wants_payload = locals.as_ref().is_some_and(|l| l.wants_payload());
        let encoded = if remote || wants_payload {
            Some(
                codec::encode(&self.robot, seq, stamp_ns, msg).map_err(|e| BusError::Codec {
                    key: self.key.clone(),
                    source: e,
                })?,
            )
        } else {
            None
        };
        if let Some(locals) = locals {
            let payload = match &encoded {
                Some(e) if wants_payload => Some(Bytes::from(e.to_vec())),
                _ => None,
            };
            locals.deliver(&Delivery {
                key: self.local.key(),
                robot: &self.robot,
                seq,
                stamp_ns,
                kind: T::KIND,
                msg,
                trace: trace.copied(),
                payload: payload.as_ref(),
            });
        }
        if let (true, Some(e)) = (remote, encoded) {
            let put = self.inner.put(encoded_zbytes(e));
            let put = match trace {
                Some(t) => put.attachment(t.to_bytes().to_vec()),
                None => put,
            };
            put.wait().map_err(|e| zerr(&self.key, e))?;
        }
        Ok(())
    }

    /// Wait until at least one subscriber, local or remote, matches this publisher (a
    /// readiness signal for tools and tests, instead of sleeping); false after `timeout`.
    pub async fn wait_matched(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.remote.load(Ordering::Acquire) || self.local.current().is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A callback subscription; dropping it undeclares.
pub struct Callback {
    _subscriber: Subscription,
    stats: Arc<InboxStats>,
}

impl Callback {
    pub fn stats(&self) -> &InboxStats {
        &self.stats
    }
}

/// A typed queryable.
pub struct Queryable<Q> {
    inner: zenoh::query::Queryable<flume::Receiver<zenoh::query::Query>>,
    key: String,
    stats: InboxStats,
    warn: DecodeWarn,
    _q: PhantomData<fn(Q)>,
}

/// One request to a [`Queryable`].
pub struct Request<Q> {
    query: zenoh::query::Query,
    pub header: Header,
    pub msg: Q,
    pub trace: Option<TraceContext>,
}

impl<Q: Message> Queryable<Q> {
    /// The next well-formed request; malformed ones get an error reply and are counted.
    pub async fn recv(&self) -> Option<Request<Q>> {
        loop {
            let query = self.inner.recv_async().await.ok()?;
            self.stats.received.fetch_add(1, Ordering::Relaxed);
            let trace = query
                .attachment()
                .and_then(|a| a.try_to_string().ok())
                .and_then(|t| TraceContext::parse(&t));
            let decoded = match query.payload() {
                Some(p) => codec::decode_pieces::<Q>(&payload_pieces(p)),
                None => Err(CodecError::Truncated {
                    what: "header",
                    need: 4,
                    have: 0,
                }),
            };
            match decoded {
                Ok((header, msg)) => {
                    return Some(Request {
                        query,
                        header,
                        msg,
                        trace,
                    })
                }
                Err(e) => {
                    self.warn.warn(&self.stats, &self.key, &e);
                    let _ = query.reply_err(format!("{}: {e}", Q::KIND)).await;
                }
            }
        }
    }
    pub fn stats(&self) -> &InboxStats {
        &self.stats
    }
}

impl<Q> Request<Q> {
    /// Answer with an error (a request that cannot be served as asked).
    pub async fn reply_err(&self, reason: &str) -> Result<(), BusError> {
        let key = self.query.key_expr().as_str().to_string();
        self.query
            .reply_err(reason.to_string())
            .await
            .map_err(|e| zerr(&key, e))
    }

    pub async fn reply<R: Message>(&self, robot: &str, msg: &R) -> Result<(), BusError> {
        let key = self.query.key_expr().as_str().to_string();
        let enc = codec::encode(robot, self.header.seq, codec::now_ns(), msg).map_err(|e| BusError::Codec {
            key: key.clone(),
            source: e,
        })?;
        let mut reply = self.query.reply(self.query.key_expr().clone(), encoded_zbytes(enc));
        if let Some(t) = &self.trace {
            reply = reply.attachment(t.child().to_bytes().to_vec());
        }
        reply.await.map_err(|e| zerr(&key, e))
    }
}
