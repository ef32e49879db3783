//! OpenTelemetry export for a NanoBot node.
//!
//! A sampled message carries a W3C trace context in its Zenoh attachment (see
//! `nanobot_messages::trace`); each actor that handles it and publishes what follows continues
//! the trace with a child span id. With `OTEL_EXPORTER_OTLP_ENDPOINT` set, every node also
//! reports those hops as OpenTelemetry spans (OTLP over HTTP, protobuf): span id the one it
//! published with, parent the one it received, so one trace follows an observation from the
//! robot's tick through ingest and the policy to the action and the logger, across processes.
//!
//! The actors' counters (their `Stats`) go out as OTLP metrics too ([`metrics`]).
//!
//! Spans go through a bounded queue (what a full queue refuses is counted) to a thread of their
//! own that batches them (up to [`BATCH`] or every [`INTERVAL`]) and exports them with the
//! `opentelemetry-otlp` exporter. Nothing is recorded for unsampled messages.

mod http_client;
pub mod metrics;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nanobot_messages::TraceContext;
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use opentelemetry_sdk::Resource;

pub use http_client::BlockingHttp;
pub use metrics::{MetricsExporter, StatsBoard};

/// Spans per export, at most.
pub const BATCH: usize = 512;
/// How often the queue is exported when it does not fill a batch.
pub const INTERVAL: Duration = Duration::from_millis(500);
/// Spans that may wait for the exporter.
pub const QUEUE: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
}

/// One hop of a message, as a span.
#[derive(Clone, Debug)]
pub struct Hop {
    /// What happened: `robot.tick`, `ingest.observation`, `policy.chunk`, ...
    pub name: &'static str,
    /// This hop's trace and span id (what it published with).
    pub trace: TraceContext,
    /// The span id of the message it handled, if any (none for a root).
    pub parent: Option<u64>,
    pub start_ns: u64,
    pub end_ns: u64,
    pub robot: String,
    /// The message sequence number the hop handled or made.
    pub seq: u64,
    /// A producer sends what it made; a consumer handles what it got.
    pub kind: HopKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HopKind {
    Producer,
    Consumer,
    Internal,
}

/// Where a node's actors report hops; cheap to clone. A sink that is not connected to an
/// exporter drops everything at no cost.
#[derive(Clone, Debug, Default)]
pub struct SpanSink {
    tx: Option<flume::Sender<Hop>>,
    dropped: Arc<AtomicU64>,
}

impl SpanSink {
    /// A sink that records nothing.
    pub fn off() -> Self {
        SpanSink::default()
    }

    pub fn is_on(&self) -> bool {
        self.tx.is_some()
    }

    /// Report a hop (never blocks: a full queue drops it and counts it).
    pub fn record(&self, hop: Hop) {
        if let Some(tx) = &self.tx {
            if tx.try_send(hop).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Hops the full queue refused.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The span export thread; dropping it exports what is queued and stops it.
struct Exporter {
    thread: Option<std::thread::JoinHandle<()>>,
    stop: flume::Sender<()>,
}

impl Exporter {
    fn finish(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Where each signal goes, as OpenTelemetry's environment says: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
/// and `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` are full URLs for their own signal, and
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is a base that gets `/v1/traces` and `/v1/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoints {
    pub traces: Option<String>,
    pub metrics: Option<String>,
}

impl Endpoints {
    /// From a base and the signal-specific URLs (empty strings count as unset).
    pub fn new(base: Option<&str>, traces: Option<&str>, metrics: Option<&str>) -> Endpoints {
        let set = |v: Option<&str>| v.map(str::trim).filter(|v| !v.is_empty()).map(str::to_string);
        let from_base = |signal| set(base).map(|b| format!("{}/v1/{signal}", b.trim_end_matches('/')));
        Endpoints {
            traces: set(traces).or_else(|| from_base("traces")),
            metrics: set(metrics).or_else(|| from_base("metrics")),
        }
    }

    /// The environment's endpoints (none with `OTEL_SDK_DISABLED=true`).
    pub fn from_env() -> Endpoints {
        if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
            return Endpoints::default();
        }
        let var = |k: &str| std::env::var(k).ok();
        Endpoints::new(
            var("OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(),
            var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").as_deref(),
            var("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT").as_deref(),
        )
    }
}

/// What a node exports: spans of its hops and its actors' counters (each where its endpoint is
/// set).
pub struct Telemetry {
    /// Where the node's actors report hops (off without a traces endpoint).
    pub spans: SpanSink,
    /// Where the node's actors' latest Stats go, for the metrics.
    pub stats: StatsBoard,
    traces: Option<Exporter>,
    metrics: Option<MetricsExporter>,
}

impl Telemetry {
    /// Export what is queued, then stop; spans the full queue refused are reported here.
    pub fn shutdown(self) {
        if self.spans.dropped() > 0 {
            tracing::warn!(dropped = self.spans.dropped(), "spans refused by the full export queue");
        }
        drop(self.traces);
        if let Some(m) = self.metrics {
            m.shutdown();
        }
    }
}

/// Start exporting if the environment names an OTLP endpoint: traces and metrics of node
/// `node`, which becomes `service.instance.id`; `OTEL_SERVICE_NAME` names the service
/// (default `nanobot`).
pub fn from_env(fleet: &str, node: &str) -> Result<Option<Telemetry>, TelemetryError> {
    let endpoints = Endpoints::from_env();
    if endpoints == Endpoints::default() {
        return Ok(None);
    }
    start(&endpoints, fleet, node).map(Some)
}

/// Export to `endpoints` (OTLP/HTTP URLs like `http://127.0.0.1:4318/v1/traces`).
pub fn start(endpoints: &Endpoints, fleet: &str, node: &str) -> Result<Telemetry, TelemetryError> {
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "nanobot".into());
    let resource = Resource::builder()
        .with_service_name(service)
        .with_attributes([
            KeyValue::new("service.instance.id", node.to_string()),
            KeyValue::new("nanobot.fleet", fleet.to_string()),
            KeyValue::new("nanobot.node", node.to_string()),
        ])
        .build();
    let (stats, metrics) = match &endpoints.metrics {
        Some(url) => {
            let (board, exporter) = metrics::start(url, resource.clone())?;
            (board, Some(exporter))
        }
        None => (StatsBoard::default(), None),
    };
    let (spans, traces) = match &endpoints.traces {
        Some(url) => {
            let (sink, exporter) = start_traces(url, &resource)?;
            (sink, Some(exporter))
        }
        None => (SpanSink::off(), None),
    };
    tracing::info!(traces = ?endpoints.traces, metrics = ?endpoints.metrics, "exporting over OTLP");
    Ok(Telemetry {
        spans,
        stats,
        traces,
        metrics,
    })
}

fn start_traces(url: &str, resource: &Resource) -> Result<(SpanSink, Exporter), TelemetryError> {
    let err = |reason: String| TelemetryError::Exporter {
        endpoint: url.to_string(),
        reason,
    };
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(BlockingHttp)
        .with_endpoint(url.to_string())
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| err(e.to_string()))?;
    exporter.set_resource(resource);
    let (tx, rx) = flume::bounded::<Hop>(QUEUE);
    let (stop_tx, stop_rx) = flume::bounded::<()>(1);
    let scope = InstrumentationScope::builder("nanobot")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let thread = std::thread::Builder::new()
        .name("nb-otlp".into())
        .spawn(move || export_loop(exporter, scope, rx, stop_rx))
        .map_err(|e| err(format!("no export thread: {e}")))?;
    let sink = SpanSink {
        tx: Some(tx),
        dropped: Arc::default(),
    };
    Ok((
        sink,
        Exporter {
            thread: Some(thread),
            stop: stop_tx,
        },
    ))
}

fn export_loop(
    exporter: opentelemetry_otlp::SpanExporter,
    scope: InstrumentationScope,
    rx: flume::Receiver<Hop>,
    stop: flume::Receiver<()>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut failures = 0u64;
    let mut export = |batch: &mut Vec<SpanData>| {
        if batch.is_empty() {
            return;
        }
        let spans = std::mem::take(batch);
        let n = spans.len();
        if let Err(e) = futures_executor::block_on(exporter.export(spans)) {
            failures += 1;
            // Once, then every hundredth: a collector that is down must not flood the log.
            if failures % 100 == 1 {
                tracing::warn!(spans = n, error = %e, failures, "OTLP export failed");
            }
        }
    };
    let mut deadline = std::time::Instant::now() + INTERVAL;
    loop {
        let stopping = stop.try_recv().is_ok() || stop.is_disconnected();
        match rx.recv_deadline(deadline) {
            Ok(hop) => batch.push(span_data(hop, &scope)),
            Err(flume::RecvTimeoutError::Timeout) => {}
            Err(flume::RecvTimeoutError::Disconnected) => {
                export(&mut batch);
                return;
            }
        }
        if stopping {
            batch.extend(rx.drain().map(|h| span_data(h, &scope)));
            export(&mut batch);
            return;
        }
        if batch.len() >= BATCH || std::time::Instant::now() >= deadline {
            export(&mut batch);
            deadline = std::time::Instant::now() + INTERVAL;
        }
    }
}

fn time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

/// A hop as the SDK's span record.
pub fn span_data(hop: Hop, scope: &InstrumentationScope) -> SpanData {
    let flags = if hop.trace.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(hop.trace.trace_id.to_be_bytes()),
            SpanId::from_bytes(hop.trace.span_id.to_be_bytes()),
            flags,
            false,
            TraceState::default(),
        ),
        parent_span_id: hop
            .parent
            .map(|p| SpanId::from_bytes(p.to_be_bytes()))
            .unwrap_or(SpanId::INVALID),
        // The parent of a hop is another actor's, often in another process.
        parent_span_is_remote: hop.parent.is_some(),
        span_kind: match hop.kind {
            HopKind::Producer => SpanKind::Producer,
            HopKind::Consumer => SpanKind::Consumer,
            HopKind::Internal => SpanKind::Internal,
        },
        name: hop.name.into(),
        start_time: time(hop.start_ns),
        end_time: time(hop.end_ns.max(hop.start_ns)),
        attributes: vec![
            KeyValue::new("nanobot.robot", hop.robot),
            KeyValue::new("nanobot.seq", hop.seq as i64),
        ],
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: scope.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hop_becomes_a_span_with_its_own_ids_and_its_parents() {
        let root = TraceContext::new_root();
        let child = root.child();
        let hop = Hop {
            name: "ingest.observation",
            trace: child,
            parent: Some(root.span_id),
            start_ns: 2_000,
            end_ns: 1_000,
            robot: "r0".into(),
            seq: 7,
            kind: HopKind::Producer,
        };
        let s = span_data(hop, &InstrumentationScope::builder("t").build());
        assert_eq!(
            s.span_context.trace_id(),
            TraceId::from_bytes(root.trace_id.to_be_bytes())
        );
        assert_eq!(
            s.span_context.span_id(),
            SpanId::from_bytes(child.span_id.to_be_bytes())
        );
        assert_eq!(s.parent_span_id, SpanId::from_bytes(root.span_id.to_be_bytes()));
        assert!(s.parent_span_is_remote && s.span_context.is_sampled());
        assert_eq!(s.span_kind, SpanKind::Producer);
        // An end before the start (clocks of two hops) is clamped, never negative.
        assert_eq!(s.end_time, s.start_time);
        assert!(s.attributes.contains(&KeyValue::new("nanobot.seq", 7i64)));
        let tick = Hop {
            name: "robot.tick",
            trace: root,
            parent: None,
            start_ns: 0,
            end_ns: 5,
            robot: "r0".into(),
            seq: 7,
            kind: HopKind::Producer,
        };
        let root_span = span_data(tick, &InstrumentationScope::builder("t").build());
        assert_eq!(root_span.parent_span_id, SpanId::INVALID);
        assert!(!root_span.parent_span_is_remote);
    }

    #[test]
    fn each_signal_goes_to_its_own_url_or_under_the_base() {
        let both = Endpoints::new(Some("http://h:4318/"), None, None);
        assert_eq!(both.traces.as_deref(), Some("http://h:4318/v1/traces"));
        assert_eq!(both.metrics.as_deref(), Some("http://h:4318/v1/metrics"));
        // A signal's own URL is used as it is, and only for that signal.
        let traces_only = Endpoints::new(None, Some("http://t:1/v1/traces"), Some(" "));
        assert_eq!(traces_only.traces.as_deref(), Some("http://t:1/v1/traces"));
        assert_eq!(traces_only.metrics, None);
        let mixed = Endpoints::new(Some("http://h:4318"), None, Some("http://m:2/x"));
        assert_eq!(mixed.traces.as_deref(), Some("http://h:4318/v1/traces"));
        assert_eq!(mixed.metrics.as_deref(), Some("http://m:2/x"));
        assert_eq!(Endpoints::new(Some(""), None, None), Endpoints::default());
    }

    #[test]
    fn a_sink_without_an_exporter_records_nothing_and_a_full_queue_counts_its_drops() {
        let off = SpanSink::off();
        assert!(!off.is_on());
        let (tx, rx) = flume::bounded(1);
        let sink = SpanSink {
            tx: Some(tx),
            dropped: Arc::default(),
        };
        let hop = Hop {
            name: "robot.tick",
            trace: TraceContext::new_root(),
            parent: None,
            start_ns: 0,
            end_ns: 0,
            robot: "r0".into(),
            seq: 0,
            kind: HopKind::Internal,
        };
        sink.record(hop.clone());
        sink.record(hop);
        assert_eq!((rx.len(), sink.dropped()), (1, 1));
    }
}
