//! The node's actors' counters as OpenTelemetry metrics: the latest `Stats` each actor
//! published (the same numbers `nanobot node list` shows) are read by observable instruments
//! and exported by the SDK's periodic reader.
//!
//! | metric | kind | attributes |
//! | --- | --- | --- |
//! | `nanobot.actor.handled`, `.errors`, `.dropped`, `.restarts` | counter | `nanobot.actor` |
//! | `nanobot.actor.uptime` (s) | gauge | `nanobot.actor` |
//! | `nanobot.actor.metric` | gauge | `nanobot.actor`, `nanobot.metric` (the actor's own: `loss`, `rows`, ...) |

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nanobot_messages::Stats;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::Resource;

use crate::{BlockingHttp, TelemetryError};

/// How often metrics are exported unless `OTEL_METRIC_EXPORT_INTERVAL` (ms) says otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// The latest `Stats` of each actor of the node; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct StatsBoard {
    latest: Arc<Mutex<BTreeMap<String, Stats>>>,
}

impl StatsBoard {
    pub fn update(&self, stats: &Stats) {
        let mut m = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(stats.actor.clone(), stats.clone());
    }

    fn each(&self, mut f: impl FnMut(&Stats)) {
        self.latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .for_each(&mut f)
    }
}

/// The SDK's meter provider with its periodic reader; shut it down to export a last time.
pub struct MetricsExporter {
    provider: SdkMeterProvider,
}

impl MetricsExporter {
    pub fn shutdown(self) {
        let _ = self.provider.shutdown();
    }
}

/// Export `board`'s numbers to `url` (a full `…/v1/metrics` URL).
pub fn start(url: &str, resource: Resource) -> Result<(StatsBoard, MetricsExporter), TelemetryError> {
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_http_client(BlockingHttp)
        .with_endpoint(url.to_string())
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| TelemetryError::Exporter {
            endpoint: url.to_string(),
            reason: e.to_string(),
        })?;
    let interval = std::env::var("OTEL_METRIC_EXPORT_INTERVAL")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_INTERVAL);
    let reader = PeriodicReader::builder(exporter).with_interval(interval).build();
    let provider = SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(resource)
        .build();
    let meter = provider.meter("nanobot");
    let board = StatsBoard::default();
    let actor = |s: &Stats| KeyValue::new("nanobot.actor", s.actor.clone());
    type Read = fn(&Stats) -> u64;
    let counters: [(&'static str, Read); 4] = [
        ("nanobot.actor.handled", |s| s.handled),
        ("nanobot.actor.errors", |s| s.errors),
        ("nanobot.actor.dropped", |s| s.dropped),
        ("nanobot.actor.restarts", |s| s.restarts as u64),
    ];
    for (name, read) in counters {
        let b = board.clone();
        // The instrument lives as long as the provider holds its callback.
        let _ = meter
            .u64_observable_counter(name)
            .with_callback(move |o| b.each(|s| o.observe(read(s), &[actor(s)])))
            .build();
    }
    let b = board.clone();
    let _ = meter
        .f64_observable_gauge("nanobot.actor.uptime")
        .with_unit("s")
        .with_callback(move |o| b.each(|s| o.observe(s.uptime_ms as f64 / 1e3, &[actor(s)])))
        .build();
    let b = board.clone();
    let _ = meter
        .f64_observable_gauge("nanobot.actor.metric")
        .with_callback(move |o| {
            b.each(|s| {
                for m in &s.extra {
                    o.observe(m.value, &[actor(s), KeyValue::new("nanobot.metric", m.name.clone())]);
                }
            })
        })
        .build();
    Ok((board, MetricsExporter { provider }))
}
