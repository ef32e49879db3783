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
//!
//! With `source = "spool"` the logger takes the robot's observations and events from the
//! robot's spool (`{fleet}/log/{robot}/spool`, see [`crate::spool`]) instead of live: each one
//! counts only when it follows the last one the logger holds ([`follows`]), so a message sent
//! again after a restart or a partition is stored once, and one that comes after a gap waits
//! until the spool sends what is missing. Its acknowledgements name the last durable row and
//! event ([`StreamMark`]) and go out every half second even when nothing changed, so that a
//! spool learns at once what a restarted logger lacks.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nanobot_dataset::{
    CameraSpec, DatasetSpec, DatasetWriter, Durability, EventLog, FileEntry, Frame, StoredEvent, WriterConfig,
};
use nanobot_messages::{
    codec::now_ns, topics, Event, LogAck, Observation, SegmentFinalized, SpoolStream, Spooled, StreamMark, TraceContext,
};
use serde::Deserialize;

use crate::bus::{HopKind, Inbox, Keep, PubQos, Publisher, Received};
use crate::runtime::{ActorError, Ctx, Input, Metrics, NodeActor, Worker};

/// Where the logger takes a robot's observations and events from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogSource {
    /// `{fleet}/{robot}/obs` and `{fleet}/{robot}/event` as they are published: what the
    /// logger misses while it is down is not logged.
    #[default]
    Live,
    /// The robot's spool (a `spool` actor on the robot's node): what the logger misses is sent
    /// again until it is acknowledged.
    Spool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggerConfig {
    /// Dataset directory; `{fleet}` and `{robot}` expand.
    pub root: String,
    pub source: LogSource,
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
    /// Rows written per second at most (0: as fast as the disk takes them), to bound the disk
    /// bandwidth logging takes (a robot's SD card). What comes faster waits in the robot's
    /// spool (`source = "spool"`), or fills the input queue and is dropped and counted (live).
    pub max_rows_per_s: f64,
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
            source: LogSource::Live,
            flush_ms: 50,
            file_max_mb: 64.0,
            file_max_age_s: 5.0,
            chunks_size: 1000,
            queue: 4096,
            max_pending_rows: 100_000,
            max_rows_per_s: 0.0,
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

/// Whether a spooled message (`mark`, after `prev`) is the next one for a logger that holds
/// everything up to `last` of its stream: it names `last` as its predecessor; or it has no
/// predecessor (the spool's oldest, after a loss it counted) and is newer than `last`; or the
/// logger holds nothing and it is the spool's oldest.
pub fn follows(last: Option<StreamMark>, prev: Option<StreamMark>, mark: StreamMark) -> bool {
    match (last, prev) {
        (Some(l), Some(p)) => p == l,
        (Some(l), None) => mark.stamp_ns > l.stamp_ns,
        (None, p) => p.is_none(),
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
    /// Rows the writer took, and the last of them.
    taken: u64,
    last_taken: Option<StreamMark>,
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
    events: Option<Inbox<Received<Event>>>,
    events_logged: u64,
    obs: Option<Inbox<Received<Observation>>>,
    spool: Option<Inbox<Received<Spooled>>>,
    /// The last row and event taken (in memory), and the last durable ones.
    last_obs: Option<StreamMark>,
    last_event: Option<StreamMark>,
    durable_obs: Option<StreamMark>,
    durable_event: Option<StreamMark>,
    /// Rows handed to the writer so far, and per submitted batch: the row count once it is
    /// durable, and its last row.
    taken_rows: u64,
    batches: std::collections::VecDeque<(u64, StreamMark)>,
    last_ack: Option<Instant>,
    /// Spooled messages that did not follow the last one held (sent again, or after a gap).
    spool_skipped: u64,
    spool_undecodable: u64,
    /// Rows that may be written now under `max_rows_per_s` (a bucket holding one second's).
    allowance: f64,
    refilled: Instant,
    /// Spooled rows left for the spool to send again, over `max_rows_per_s`.
    rate_limited: u64,
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

/// The longest time between two acknowledgements.
const HEARTBEAT_MS: u64 = 500;

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
        if self.cfg.max_rows_per_s > 0.0 {
            let now = Instant::now();
            let per_s = self.cfg.max_rows_per_s;
            self.allowance =
                (self.allowance + per_s * now.duration_since(self.refilled).as_secs_f64()).min(per_s.max(1.0));
            self.refilled = now;
        }
        let (frames, events) = match self.spool.is_some() {
            true => self.take_spooled(),
            false => (self.take_arrivals(ctx.bus.exports_spans()), self.take_events()),
        };
        let last_event = events.last().map(|e| StreamMark {
            seq: e.seq,
            stamp_ns: e.stamp_ns,
        });
        let check_rotation = self.failing_since.is_none();
        let done = self
            .writer
            .call(move |d| {
                let events = d.events.append(&events);
                let w = &mut d.data;
                let (mut taken, mut last_taken, mut refused) = (0, None, Vec::new());
                for f in frames {
                    let mark = StreamMark {
                        seq: f.seq,
                        stamp_ns: f.stamp_ns,
                    };
                    match w.push(f) {
                        Ok(()) => {
                            taken += 1;
                            last_taken = Some(mark);
                        }
                        Err(e) => refused.push(e.to_string()),
                    }
                }
                let submit = w.submit();
                let rotated = if check_rotation && submit.is_ok() {
                    w.rotate_if_due()
                } else {
                    Ok(Vec::new())
                };
                Flushed {
                    events,
                    refused,
                    taken,
                    last_taken,
                    submit,
                    rotated,
                    pending: w.pending_rows(),
                    files: w.manifest().files.len(),
                }
            })
            .await
            .ok_or_else(|| ctx.failed("writer thread ended"))?;
        match &done.events {
            Ok(()) if last_event.is_some() => self.durable_event = last_event,
            Ok(()) => {}
            Err(e) => {
                // The spool sends them again from the last durable one.
                self.last_event = self.durable_event;
                self.disk_error(ctx, e);
            }
        }
        if let Some(mark) = done.last_taken {
            self.taken_rows += done.taken;
            self.batches.push_back((self.taken_rows, mark));
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
    /// Every half second the acknowledgement goes out even when nothing changed: the logger's
    /// heartbeat, from which a robot's spool learns what this logger holds.
    async fn acknowledge(&mut self, ctx: &Ctx<Self>) {
        let (last_seq, rows) = self.durability.get();
        while self.batches.front().is_some_and(|(n, _)| *n <= rows) {
            self.durable_obs = self.batches.pop_front().map(|(_, m)| m);
        }
        let heartbeat = self
            .last_ack
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(HEARTBEAT_MS));
        if rows <= self.rows && !heartbeat {
            return;
        }
        if rows > self.rows {
            if let Some(since) = self.failing_since.take() {
                tracing::info!(robot = %self.robot, after_s = since.elapsed().as_secs_f32(), "dataset writable again");
            }
            ctx.counters.handled.fetch_add(rows - self.rows, Ordering::Relaxed);
            self.pending = self.pending.saturating_sub((rows - self.rows) as usize);
            self.rows = rows;
        }
        self.last_ack = Some(Instant::now());
        let last_seq = last_seq.unwrap_or(0);
        let ack = LogAck {
            last_seq,
            rows,
            last: self.durable_obs,
            last_event: self.durable_event,
        };
        if let Err(e) = self.ack.put_with(&ack, last_seq, now_ns(), None).await {
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
        let Some(obs) = &self.obs else {
            return frames;
        };
        let limited = self.cfg.max_rows_per_s > 0.0;
        // Over the rate, arrivals stay queued (and a full queue drops and counts them).
        while let Some(r) = (!limited || self.allowance >= 1.0).then(|| obs.take()).flatten() {
            if limited {
                self.allowance -= 1.0;
            }
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
            self.last_obs = Some(StreamMark {
                seq: r.header.seq,
                stamp_ns: r.header.stamp_ns,
            });
            frames.push(frame_of(r.header.seq, r.header.stamp_ns, r.msg));
        }
        frames
    }

    /// What the spool sent, in its order: each row and event that follows the last one held,
    /// within the pending budget (what is not taken now is sent again).
    fn take_spooled(&mut self) -> (Vec<Frame>, Vec<StoredEvent>) {
        let (mut frames, mut events) = (Vec::new(), Vec::new());
        let Some(spool) = &self.spool else {
            return (frames, events);
        };
        while let Some(r) = spool.take() {
            let bytes = r.msg.message.to_bytes();
            let Some(mark) = crate::spool::log::mark_of(&bytes) else {
                self.spool_undecodable += 1;
                continue;
            };
            let last = match r.msg.stream {
                SpoolStream::Observations => self.last_obs,
                SpoolStream::Events => self.last_event,
            };
            if !follows(last, r.msg.prev, mark) {
                self.spool_skipped += 1;
                continue;
            }
            match r.msg.stream {
                SpoolStream::Observations => {
                    if self.pending + frames.len() >= self.cfg.max_pending_rows {
                        continue;
                    }
                    if self.cfg.max_rows_per_s > 0.0 {
                        if self.allowance < 1.0 {
                            self.rate_limited += 1;
                            continue;
                        }
                        self.allowance -= 1.0;
                    }
                    match nanobot_messages::decode::<Observation>(bytes) {
                        Ok((h, obs)) => {
                            self.last_obs = Some(mark);
                            frames.push(frame_of(h.seq, h.stamp_ns, obs));
                        }
                        Err(e) => {
                            self.spool_undecodable += 1;
                            tracing::warn!(robot = %self.robot, seq = mark.seq, "spooled observation not readable: {e}");
                        }
                    }
                }
                SpoolStream::Events => match nanobot_messages::decode::<Event>(bytes) {
                    Ok((h, ev)) => match serde_json::to_value(&ev) {
                        Ok(event) => {
                            self.last_event = Some(mark);
                            events.push(StoredEvent {
                                seq: h.seq,
                                stamp_ns: h.stamp_ns,
                                event,
                            });
                        }
                        Err(e) => tracing::warn!(robot = %self.robot, "event not logged: {e}"),
                    },
                    Err(e) => {
                        self.spool_undecodable += 1;
                        tracing::warn!(robot = %self.robot, seq = mark.seq, "spooled event not readable: {e}");
                    }
                },
            }
        }
        self.events_logged += events.len() as u64;
        (frames, events)
    }

    /// The events that arrived, as stored lines (`seq` is the envelope's: the robot's tick, the
    /// same numbering as its rows' `seq`).
    fn take_events(&mut self) -> Vec<StoredEvent> {
        let mut out = Vec::new();
        let Some(inbox) = &self.events else {
            return out;
        };
        while let Some(r) = inbox.take() {
            match serde_json::to_value(&r.msg) {
                Ok(event) => {
                    self.last_event = Some(StreamMark {
                        seq: r.header.seq,
                        stamp_ns: r.header.stamp_ns,
                    });
                    out.push(StoredEvent {
                        seq: r.header.seq,
                        stamp_ns: r.header.stamp_ns,
                        event,
                    })
                }
                Err(e) => tracing::warn!(robot = %self.robot, "event not logged: {e}"),
            }
        }
        self.events_logged += out.len() as u64;
        out
    }
}

/// The last row of the dataset and the last event of its events file, as they are on disk.
fn last_marks(d: &Disk) -> Result<(Option<StreamMark>, Option<StreamMark>), String> {
    let w = &d.data;
    let row = match w.manifest().files.last() {
        Some(f) if f.rows > 0 => {
            let path = w.root().join(&f.path);
            let c = nanobot_dataset::Columns::read(&path, &w.manifest().spec).map_err(|e| e.to_string())?;
            c.rows.checked_sub(1).map(|i| {
                let r = c.frame(i);
                StreamMark {
                    seq: r.seq,
                    stamp_ns: r.stamp_ns,
                }
            })
        }
        _ => None,
    };
    let (events, _, _) = nanobot_dataset::read_events(w.root(), 0).map_err(|e| e.to_string())?;
    let event = events.last().map(|e| StreamMark {
        seq: e.seq,
        stamp_ns: e.stamp_ns,
    });
    Ok((row, event))
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
        let (durability, files, marks) = writer
            .call(|d| (d.data.durability(), d.data.manifest().files.len(), last_marks(d)))
            .await
            .ok_or_else(|| ctx.failed("writer thread ended"))?;
        let (last_obs, last_event) = marks.map_err(|e| ctx.config_error(format!("dataset {}: {e}", root.display())))?;
        let (last, rows) = durability.get();
        let wake = ctx.sender();
        durability.on_durable(move || {
            wake.send(());
        });
        tracing::info!(robot, root = %root.display(), rows, last_seq = ?last, "logging");
        let keep = Keep::All { queue: cfg.queue };
        let live = cfg.source == LogSource::Live;
        let state = Logger {
            obs: match live {
                true => Some(ctx.subscribe("obs", &topics::obs(fleet, &robot), keep, None).await?),
                false => None,
            },
            events: match live {
                true => Some(
                    ctx.subscribe("events", &topics::event(fleet, &robot), keep, None)
                        .await?,
                ),
                false => None,
            },
            spool: match live {
                true => None,
                false => Some(
                    ctx.subscribe("spool", &topics::spool(fleet, &robot), keep, None)
                        .await?,
                ),
            },
            last_obs,
            last_event,
            durable_obs: last_obs,
            durable_event: last_event,
            taken_rows: rows,
            batches: std::collections::VecDeque::new(),
            last_ack: None,
            spool_skipped: 0,
            spool_undecodable: 0,
            allowance: 0.0,
            refilled: Instant::now(),
            rate_limited: 0,
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
        if self.spool.is_some() {
            m.set("spool_skipped", self.spool_skipped as f64);
            m.set("spool_undecodable", self.spool_undecodable as f64);
            m.set("rate_limited", self.rate_limited as f64);
        }
    }

    async fn stop(&mut self, _ctx: &Ctx<Self>) {
        // A clean stop finalizes the open file; a crash leaves the journal for the next start.
        // (No acknowledgement follows, so no trace is followed further.)
        let (frames, events) = match self.spool.is_some() {
            true => self.take_spooled(),
            false => (self.take_arrivals(false), self.take_events()),
        };
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
