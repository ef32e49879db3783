//! `logger`: a robot's observations → a LeRobot v3.0 dataset, crash-safe.
//!
//! Every `flush_ms` the logger takes what arrived on `{fleet}/{robot}/obs` (a lossless,
//! bounded subscription) and submits it to the dataset's journal thread as one batch (a batch
//! of `direct_rows`, 1024, or more, as after a backlog, goes straight into the data file as a
//! row group instead, fsynced with a footer snapshot). When that batch is durable, the writer
//! wakes the logger, which acknowledges on `{fleet}/log/{robot}/ack` with the last durable
//! sequence number: an acknowledged row survives `kill -9`, and the next batch is built while
//! the disk syncs the last one. Data files rotate by size and by age; each finalized file
//! is announced with SegmentFinalized on `{fleet}/log/{robot}/segment`. When the disk fails
//! (full, unwritable), the error is logged with the file, acknowledgements stop, and the frames
//! wait in memory (up to `max_pending_rows`; newer arrivals beyond it are dropped and counted
//! as `dropped_over_budget`) while the logger retries. The robot's events (`{fleet}/{robot}/event`:
//! episodes, interventions, rewards, preferences) go to the dataset's `meta/events.jsonl` at
//! the same flush, for replay to weight rows by. The writer runs on a thread of its own
//! (`nb-log-{robot}`): fsyncs, recovery and finalizing never hold up the async runtime.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nanobot_dataset::{
    CameraSpec, DatasetSpec, DatasetWriter, Durability, EventLog, FileEntry, Frame, StoredEvent, WriterConfig,
};
use nanobot_messages::{codec::now_ns, topics, Event, LogAck, Observation, SegmentFinalized, TraceContext};
use serde::Deserialize;

use crate::bus::{HopKind, Inbox, Keep, PubQos, Publisher, Received};
use crate::runtime::{ActorError, Ctx, Input, Metrics, NodeActor, Worker};

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggerConfig {
    /// Dataset directory; `{fleet}` and `{robot}` expand.
    pub root: String,
    /// How often arrivals are made durable and acknowledged.
    pub flush_ms: u64,
    pub file_max_mb: f64,
    pub file_max_age_s: f64,
    pub chunks_size: u64,
    /// Arrivals queued between Zenoh and the logger (the default of `inputs.obs`); arrivals that
    /// find it full are dropped and counted (`inputs.obs.dropped`), never waited for.
    pub queue: usize,
    /// Frames kept in memory while the disk fails; beyond this, new arrivals are dropped
    /// (counted as `dropped_over_budget`) and the older frames already waiting are kept.
    pub max_pending_rows: usize,
    pub fps: f32,
    pub robot_type: String,
    pub tasks: Vec<String>,
    pub state_names: Vec<String>,
    pub action_names: Vec<String>,
    /// `[width, height]`; `[0, 0]` for no camera.
    pub image: [u32; 2],
    pub camera_key: String,
    /// `[rows, cols]`; `[0, 0]` for no surface.
    pub surface: [u32; 2],
}

impl Default for LoggerConfig {
    fn default() -> Self {
        let sim = DatasetSpec::sim(20.0, 64, 8);
        LoggerConfig {
            root: "data/{fleet}/{robot}".into(),
            flush_ms: 50,
            file_max_mb: 64.0,
            file_max_age_s: 5.0,
            chunks_size: 1000,
            queue: 4096,
            max_pending_rows: 100_000,
            fps: sim.fps,
            robot_type: sim.robot_type,
            tasks: sim.tasks,
            state_names: sim.state_names,
            action_names: sim.action_names,
            image: [64, 64],
            camera_key: "observation.images.camera".into(),
            surface: [8, 8],
        }
    }
}

impl LoggerConfig {
    pub fn spec(&self) -> DatasetSpec {
        DatasetSpec {
            fps: self.fps,
            robot_type: self.robot_type.clone(),
            tasks: self.tasks.clone(),
            state_names: self.state_names.clone(),
            action_names: self.action_names.clone(),
            camera: (self.image != [0, 0]).then(|| CameraSpec {
                key: self.camera_key.clone(),
                width: self.image[0],
                height: self.image[1],
            }),
            surface: (self.surface != [0, 0]).then_some(self.surface),
        }
    }

    pub fn writer_config(&self) -> WriterConfig {
        WriterConfig {
            file_max_bytes: (self.file_max_mb * 1048576.0) as u64,
            file_max_age: Duration::from_secs_f64(self.file_max_age_s),
            chunks_size: self.chunks_size,
            ..WriterConfig::default()
        }
    }
}

/// An observation as a dataset row.
pub fn frame_of(seq: u64, stamp_ns: u64, obs: Observation) -> Frame {
    Frame {
        seq,
        stamp_ns,
        source_episode: obs.episode,
        task: obs.task,
        image: (!obs.image.data.is_empty()).then(|| obs.image.data.to_bytes()),
        state: obs.state,
        action: obs.action,
        surface: obs.surface.cells,
    }
}

/// What the writer thread owns: the dataset, and the events file beside it.
struct Disk {
    data: DatasetWriter,
    events: EventLog,
}

/// What one flush on the writer thread did.
struct Flushed {
    events: Result<(), nanobot_dataset::DatasetError>,
    refused: Vec<String>,
    submit: Result<(), nanobot_dataset::DatasetError>,
    rotated: Result<Vec<FileEntry>, nanobot_dataset::DatasetError>,
    pending: usize,
    files: usize,
}

pub struct Logger {
    cfg: LoggerConfig,
    robot: String,
    root: PathBuf,
    writer: Worker<Disk>,
    /// What the writer's journal thread has made durable (it wakes this actor as it grows).
    durability: Durability,
    events: Inbox<Received<Event>>,
    events_logged: u64,
    obs: Inbox<Received<Observation>>,
    ack: Publisher<LogAck>,
    segments: Publisher<SegmentFinalized>,
    rows: u64,
    /// Rows the writer holds that are not durable yet (as of the last flush).
    pending: usize,
    files: usize,
    refused: u64,
    over_budget: u64,
    failing_since: Option<Instant>,
    last_error_log: Option<Instant>,
    /// Sampled observations not durable yet, followed while the node exports spans: (their
    /// trace, seq, when they arrived). Each becomes a `logger.write` span when the flush that
    /// holds it is acknowledged.
    traced: std::collections::VecDeque<(TraceContext, u64, u64)>,
}

/// Sampled observations the logger follows until they are durable, at most (older ones are
/// forgotten: a trace then lacks its logger span, nothing else).
const TRACED_MAX: usize = 1024;

impl Logger {
    fn disk_error(&mut self, ctx: &Ctx<Self>, e: &nanobot_dataset::DatasetError) {
        ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
        if self.failing_since.is_none() {
            self.failing_since = Some(Instant::now());
        }
        if self
            .last_error_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
        {
            self.last_error_log = Some(Instant::now());
            tracing::error!(robot = %self.robot, pending = self.pending, "dataset write failed, acknowledgements stopped: {e}");
        }
    }

    /// Hand what arrived to the writer thread: the rows go to the journal as one batch, the
    /// events to `meta/events.jsonl`; finalize the data file if it is due.
    async fn submit(&mut self, ctx: &Ctx<Self>) -> Result<(), ActorError> {
        let frames = self.take_arrivals(ctx.bus.exports_spans());
        let events = self.take_events();
        let check_rotation = self.failing_since.is_none();
        let done = self
            .writer
            .call(move |d| {
                let events = d.events.append(&events);
                let w = &mut d.data;
                let refused = frames
                    .into_iter()
                    .filter_map(|f| w.push(f).err().map(|e| e.to_string()))
                    .collect();
                let submit = w.submit();
                let rotated = if check_rotation && submit.is_ok() {
                    w.rotate_if_due()
                } else {
                    Ok(Vec::new())
                };
                Flushed {
                    events,
                    refused,
                    submit,
                    rotated,
                    pending: w.pending_rows(),
                    files: w.manifest().files.len(),
                }
            })
            .await
            .ok_or_else(|| ctx.failed("writer thread ended"))?;
        if let Err(e) = &done.events {
            self.disk_error(ctx, e);
        }
        for e in &done.refused {
            self.refused += 1;
            ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(robot = %self.robot, "observation not logged: {e}");
        }
        self.pending = done.pending;
        self.files = done.files;
        if let Err(e) = &done.submit {
            self.disk_error(ctx, e);
        }
        match done.rotated {
            Ok(files) => publish_segments(&self.segments, &self.root, &self.robot, files).await,
            Err(e) => self.disk_error(ctx, &e),
        }
        Ok(())
    }

    /// Acknowledge every row that became durable since the last acknowledgement.
    async fn acknowledge(&mut self, ctx: &Ctx<Self>) {
        let (Some(last_seq), rows) = self.durability.get() else {
            return;
        };
        if rows <= self.rows {
            return;
        }
        if let Some(since) = self.failing_since.take() {
            tracing::info!(robot = %self.robot, after_s = since.elapsed().as_secs_f32(), "dataset writable again");
        }
        ctx.counters.handled.fetch_add(rows - self.rows, Ordering::Relaxed);
        self.pending = self.pending.saturating_sub((rows - self.rows) as usize);
        self.rows = rows;
        if let Err(e) = self
            .ack
            .put_with(&LogAck { last_seq, rows }, last_seq, now_ns(), None)
            .await
        {
            tracing::warn!(robot = %self.robot, error = %e, "ack not published");
        }
        // The sampled rows this acknowledgement covers end their traces here.
        while self.traced.front().is_some_and(|(_, seq, _)| *seq <= last_seq) {
            let (t, seq, at) = self.traced.pop_front().expect("a front entry");
            let kind = HopKind::Consumer;
            ctx.bus
                .hop("logger.write", Some(&t.child()), Some(&t), at, &self.robot, seq, kind);
        }
    }

    /// The arrivals waiting in the inbox, as rows, within the pending budget: while the disk
    /// fails, the rows already waiting are kept (they are older, and the dataset stays a
    /// contiguous run of sequence numbers) and new arrivals beyond `max_pending_rows` are
    /// dropped and counted.
    fn take_arrivals(&mut self, follow_traces: bool) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(r) = self.obs.take() {
            if self.pending + frames.len() >= self.cfg.max_pending_rows {
                self.over_budget += 1;
                continue;
            }
            if let Some(t) = r.trace.filter(|_| follow_traces) {
                if self.traced.len() == TRACED_MAX {
                    self.traced.pop_front();
                }
                self.traced.push_back((t, r.header.seq, now_ns()));
            }
            frames.push(frame_of(r.header.seq, r.header.stamp_ns, r.msg));
        }
        frames
    }

    /// The events that arrived, as stored lines (`seq` is the envelope's: the robot's tick, the
    /// same numbering as its rows' `seq`).
    fn take_events(&mut self) -> Vec<StoredEvent> {
        let mut out = Vec::new();
        while let Some(r) = self.events.take() {
            match serde_json::to_value(&r.msg) {
                Ok(event) => out.push(StoredEvent {
                    seq: r.header.seq,
                    stamp_ns: r.header.stamp_ns,
                    event,
                }),
                Err(e) => tracing::warn!(robot = %self.robot, "event not logged: {e}"),
            }
        }
        self.events_logged += out.len() as u64;
        out
    }
}

/// Announce finalized files on `{fleet}/log/{robot}/segment`.
async fn publish_segments(
    segments: &Publisher<SegmentFinalized>,
    root: &std::path::Path,
    robot: &str,
    files: Vec<FileEntry>,
) {
    for f in files {
        let msg = SegmentFinalized {
            path: root.join(&f.path).to_string_lossy().into_owned(),
            rows: f.rows,
            first_seq: f.first_seq,
            last_seq: f.last_seq,
            bytes: f.bytes,
            sha256: f.sha256,
        };
        if let Err(e) = segments.put(&msg).await {
            tracing::warn!(robot, error = %e, "SegmentFinalized not published");
        }
    }
}

impl NodeActor for Logger {
    const KIND: &'static str = "logger";
    type Config = LoggerConfig;
    type Event = ();

    fn grants(fleet: &str, robots: &[String]) -> crate::access::Grants {
        use nanobot_messages::topics;
        crate::access::Grants::default().put(
            robots
                .iter()
                .flat_map(|r| [topics::log_ack(fleet, r), topics::segment(fleet, r)]),
        )
    }

    async fn start(ctx: &Ctx<Self>, cfg: LoggerConfig) -> Result<Self, ActorError> {
        let robot = ctx.robot()?.to_string();
        let fleet = ctx.fleet();
        if cfg.flush_ms == 0 || cfg.queue == 0 {
            return Err(ctx.config_error("flush_ms and queue must be positive"));
        }
        let root = ctx.path(&cfg.root);
        // A dataset that cannot be opened is a configuration problem (path, permissions,
        // features that differ from the existing dataset's): say which.
        let (spec, wcfg, at) = (cfg.spec(), cfg.writer_config(), root.clone());
        let writer = Worker::spawn(format!("nb-log-{robot}"), move || {
            let data = DatasetWriter::open(&at, spec, wcfg).map_err(|e| e.to_string())?;
            let events = EventLog::open(&at).map_err(|e| e.to_string())?;
            Ok(Disk { data, events })
        })
        .await
        .map_err(|e| ctx.config_error(format!("dataset {}: {e}", root.display())))?;
        let (durability, files) = writer
            .call(|d| (d.data.durability(), d.data.manifest().files.len()))
            .await
            .ok_or_else(|| ctx.failed("writer thread ended"))?;
        let (last, rows) = durability.get();
        let wake = ctx.sender();
        durability.on_durable(move || {
            wake.send(());
        });
        tracing::info!(robot, root = %root.display(), rows, last_seq = ?last, "logging");
        let state = Logger {
            obs: ctx
                .subscribe("obs", &topics::obs(fleet, &robot), Keep::All { queue: cfg.queue }, None)
                .await?,
            events: ctx
                .subscribe(
                    "events",
                    &topics::event(fleet, &robot),
                    Keep::All { queue: cfg.queue },
                    None,
                )
                .await?,
            events_logged: 0,
            ack: ctx
                .publisher(&topics::log_ack(fleet, &robot), &robot, PubQos::Data)
                .await?,
            segments: ctx
                .publisher(&topics::segment(fleet, &robot), &robot, PubQos::Data)
                .await?,
            rows,
            files,
            writer,
            durability,
            robot,
            root,
            pending: 0,
            refused: 0,
            over_budget: 0,
            failing_since: None,
            last_error_log: None,
            traced: std::collections::VecDeque::new(),
            cfg,
        };
        ctx.every(Duration::from_millis(state.cfg.flush_ms));
        Ok(state)
    }

    async fn handle(&mut self, ctx: &Ctx<Self>, input: Input<()>) -> Result<(), ActorError> {
        if let Input::Tick = input {
            self.submit(ctx).await?;
        }
        // A tick, or the journal thread saying that a batch is durable.
        self.acknowledge(ctx).await;
        Ok(())
    }

    fn metrics(&self, m: &mut Metrics) {
        m.set("rows", self.rows as f64);
        m.set("pending", self.pending as f64);
        m.set("refused", self.refused as f64);
        m.set("dropped_over_budget", self.over_budget as f64);
        m.set("files", self.files as f64);
        m.set("events", self.events_logged as f64);
    }

    async fn stop(&mut self, _ctx: &Ctx<Self>) {
        // A clean stop finalizes the open file; a crash leaves the journal for the next start.
        // (No acknowledgement follows, so no trace is followed further.)
        let frames = self.take_arrivals(false);
        let events = self.take_events();
        let done = self
            .writer
            .call(move |d| {
                if let Err(e) = d.events.append(&events) {
                    tracing::error!("events not logged at stop: {e}");
                }
                let w = &mut d.data;
                for f in frames {
                    let _ = w.push(f);
                }
                w.finish_file()
            })
            .await;
        match done {
            Some(Ok(files)) => publish_segments(&self.segments, &self.root, &self.robot, files).await,
            Some(Err(e)) => {
                tracing::error!(robot = %self.robot, "dataset not finalized at stop (its journal is recovered at the next start): {e}")
            }
            None => tracing::error!(robot = %self.robot, "dataset writer thread ended before the stop"),
        }
    }
}
