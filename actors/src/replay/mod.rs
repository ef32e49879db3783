//! `replay`: the fleet's logged rows, served as training windows.
//!
//! At start it indexes the datasets under `datasets` (for example `data/{fleet}`, one dataset
//! per robot); then every `SegmentFinalized` on `{fleet}/log/*/segment` as it arrives (no
//! rescan, no restart). Each file's sha256 is checked against what its manifest or announcement
//! says; a file that fails, or cannot be read, is moved to its dataset's `quarantine/`, reported
//! on `{fleet}/replay/quarantine` (a `Reject`) and in Stats, and sampling goes on without it.
//! Rows are weighted by the robot's events, which the logger keeps beside each dataset
//! (`meta/events.jsonl`): Sirius-style intervention weights, episode rewards, operators'
//! preferences (`replay` crate). Windows (`n_obs_steps` observations and a `horizon` of actions,
//! padded and masked at episode edges) answer `ReplayRequest`s on the queryable
//! `{fleet}/replay/sample`, paced by a samples-per-insert rate limiter; one episode in
//! `held_out_every` is never trained on and answers held-out requests. The store runs on a
//! thread of its own (`nb-replay`): Parquet reads, hashing and JPEG decoding never run on the
//! async runtime. A batch is one blob, which the bus passes to Zenoh as its own bytes rather
//! than copying it into the encoded message.

#[cfg(test)]
pub(crate) mod fixtures;
mod frames;
pub mod store;

use std::sync::atomic::Ordering;

use nanobot_messages::{codec::now_ns, topics, Reject, ReplayRequest, SegmentFinalized};
use serde::Deserialize;

use crate::bus::{Inbox, Keep, PubQos, Publisher, Received, Request};
use crate::runtime::{AbortOnDrop, ActorError, Ctx, Input, Metrics, NodeActor, Worker};
pub use store::{Added, Store, StoreConfig, StoreStats};

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplayConfig {
    /// Directories indexed at start: a dataset, or a directory of them; `{fleet}` expands.
    pub datasets: Vec<String>,
    /// Requests waiting to be answered (the default of `inputs.requests`).
    pub queue: usize,
    #[serde(flatten)]
    pub store: StoreConfig,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            datasets: vec!["data/{fleet}".into()],
            queue: 16,
            store: StoreConfig::default(),
        }
    }
}

pub enum ReplayEvent {
    Segment,
    Request,
}

pub struct Replay {
    store: Worker<Store>,
    stats: StoreStats,
    segments: Inbox<Received<SegmentFinalized>>,
    requests: Inbox<Request<ReplayRequest>>,
    quarantine: Publisher<Reject>,
    _server: AbortOnDrop,
}

impl Replay {
    /// Report what indexing did: rows counted, bad files published.
    async fn report(&mut self, ctx: &Ctx<Self>, results: Vec<Result<Added, String>>) {
        for r in results {
            match r {
                Ok(Added::Rows(n)) => {
                    ctx.counters.handled.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(rows = n, "segment indexed");
                }
                Ok(Added::Known) => {}
                Ok(Added::Refused(why)) => {
                    ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("segment announcement refused: {why}");
                }
                Ok(Added::Quarantined { path, reason, to }) => {
                    ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
                    let moved = to
                        .as_ref()
                        .map_or("could not be moved".into(), |t| format!("moved to {}", t.display()));
                    tracing::error!(file = %path.display(), "data file quarantined ({moved}): {reason}");
                    let msg = Reject {
                        sensor: path.display().to_string(),
                        reason: "quarantined".into(),
                        detail: format!("{reason}; {moved}"),
                        seq: 0,
                        count: self.stats.quarantined + 1,
                    };
                    if let Err(e) = self.quarantine.put_with(&msg, 0, now_ns(), None).await {
                        tracing::warn!(error = %e, "quarantine report not published");
                    }
                }
                Err(e) => {
                    ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!("not indexed: {e}");
                }
            }
        }
    }
}

impl NodeActor for Replay {
    const KIND: &'static str = "replay";
    type Config = ReplayConfig;
    type Event = ReplayEvent;

    fn grants(fleet: &str, _robots: &[String]) -> crate::access::Grants {
        use nanobot_messages::topics;
        crate::access::Grants::default().reply([topics::replay_sample(fleet)])
    }

    async fn start(ctx: &Ctx<Self>, cfg: ReplayConfig) -> Result<Self, ActorError> {
        if cfg.queue == 0 || cfg.store.samples_per_insert.is_nan() || cfg.store.samples_per_insert < 0.0 {
            return Err(ctx.config_error("queue must be positive and samples_per_insert at least 0"));
        }
        let fleet = ctx.fleet().to_string();
        let store_cfg = cfg.store.clone();
        let store = Worker::spawn("nb-replay".into(), move || Ok(Store::new(store_cfg)))
            .await
            .map_err(|e| ctx.failed(e))?;
        let segments = ctx
            .subscribe(
                "segments",
                &format!("{fleet}/log/*/segment"),
                Keep::All { queue: 1024 },
                Some(|| ReplayEvent::Segment),
            )
            .await?;
        let (feeder, requests) = ctx.input(
            "requests",
            Keep::All { queue: cfg.queue },
            Some(|| ReplayEvent::Request),
        );
        let queryable = ctx
            .bus
            .queryable::<ReplayRequest>(&topics::replay_sample(&fleet), cfg.queue)
            .await
            .map_err(ctx.bus_err())?;
        let server = tokio::spawn(async move {
            while let Some(req) = queryable.recv().await {
                // A request that finds the queue full is dropped (counted): its asker times out.
                feeder.push(req);
            }
        });
        let mut me = Replay {
            store,
            stats: StoreStats::default(),
            segments,
            requests,
            quarantine: ctx
                .publisher(&format!("{fleet}/replay/quarantine"), "", PubQos::Data)
                .await?,
            _server: AbortOnDrop(server),
        };
        for dir in &cfg.datasets {
            let dir = ctx.path(dir);
            let (results, stats) = me
                .store
                .call(move |s| (s.index_datasets(&dir), s.stats()))
                .await
                .ok_or_else(|| ctx.failed("replay store thread ended"))?;
            me.stats = stats;
            me.report(ctx, results).await;
        }
        tracing::info!(
            rows = me.stats.rows,
            held_out = me.stats.held_out_rows,
            segments = me.stats.segments,
            "replay indexed"
        );
        Ok(me)
    }

    async fn handle(&mut self, ctx: &Ctx<Self>, input: Input<ReplayEvent>) -> Result<(), ActorError> {
        let ended = || ctx.failed("replay store thread ended");
        while let Some(r) = self.segments.take() {
            let seg = r.msg;
            let (result, stats) = self
                .store
                .call(move |s| (s.add_announced(std::path::Path::new(&seg.path), &seg.sha256), s.stats()))
                .await
                .ok_or_else(ended)?;
            self.stats = stats;
            self.report(ctx, vec![result]).await;
        }
        if matches!(input, Input::Event(ReplayEvent::Request)) {
            while let Some(req) = self.requests.take() {
                let ask = req.msg.clone();
                let (batch, stats) = self
                    .store
                    .call(move |s| (s.sample(&ask, now_ns()), s.stats()))
                    .await
                    .ok_or_else(ended)?;
                self.stats = stats;
                let sent = match batch {
                    Ok(b) => req.reply("", &b).await,
                    Err(e) => {
                        ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
                        req.reply_err(&e).await
                    }
                };
                if let Err(e) = sent {
                    tracing::warn!(error = %e, "replay reply not sent");
                }
            }
        }
        Ok(())
    }

    fn metrics(&self, m: &mut Metrics) {
        let s = &self.stats;
        m.set("rows", s.rows as f64);
        m.set("held_out_rows", s.held_out_rows as f64);
        m.set("segments", s.segments as f64);
        m.set("quarantined", s.quarantined as f64);
        m.set("refused_announcements", s.refused_announcements as f64);
        m.set("intervention_rows", s.intervention_rows as f64);
        m.set("events", s.events as f64);
        m.set("bad_event_lines", s.bad_event_lines as f64);
        m.set("windows_served", s.windows_served as f64);
        m.set("waits", s.waits as f64);
        m.set("samples_per_insert", s.ratio);
        m.set("decode_errors", s.decode_errors as f64);
        m.set("cache_mb", s.cache_bytes as f64 / 1048576.0);
        let looked = (s.cache_hits + s.cache_misses).max(1) as f64;
        m.set("cache_hit_rate", s.cache_hits as f64 / looked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_parses_and_a_misspelt_field_is_refused() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/replay.toml")).unwrap();
        let cfg: ReplayConfig = toml::from_str(&text).unwrap();
        assert_eq!(cfg.store.held_out_every, 10);
        let bad = toml::from_str::<ReplayConfig>("samples_per_insrt = 4.0")
            .unwrap_err()
            .to_string();
        assert!(bad.contains("samples_per_insrt"), "{bad}");
    }
}
