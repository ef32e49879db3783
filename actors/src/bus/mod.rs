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
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nanobot_messages::{codec, CodecError, Header, HeaderRef, Message, TraceContext, TraceSampler, Viewable};
use thiserror::Error;
use zenoh::bytes::ZBytes;
use zenoh::key_expr::OwnedKeyExpr;
use zenoh::sample::{Locality, Sample};
use zenoh::Session;

pub use nanobot_telemetry::{Hop, HopKind, SpanSink};

pub mod inbox;
mod local;

use local::{Delivery, LocalGuard, LocalRoute, LocalRouter};

pub use inbox::{Feeder, Inbox, InboxStats, Keep};

mod config;
mod publisher;
mod queryable;

pub use config::{BusConfig, Mode, PubQos, DEFAULT_TRACE_SAMPLE_RATIO};
pub use publisher::Publisher;
pub use queryable::{Queryable, Request};

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
pub use nanobot_tap::payload_bytes;

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
