//! `logger`: a robot's observations → a LeRobot v3.0 dataset, crash-safe.
//!
//! Every `flush_ms` the logger takes what arrived on `{fleet}/{robot}/obs` (a lossless,
//! bounded subscription), appends it to the dataset's journal as one fsynced batch, and only
//! then acknowledges on `{fleet}/log/{robot}/ack` with the last durable sequence number: an
//! acknowledged row survives `kill -9`. Data files rotate by size and by age; each finalized file
//! is announced with SegmentFinalized on `{fleet}/log/{robot}/segment`. When the disk fails
//! (full, unwritable), the error is logged with the file, acknowledgements stop, and the frames
//! wait in memory (up to `max_pending_rows`) while the logger retries.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nanobot_dataset::{CameraSpec, DatasetSpec, DatasetWriter, FileEntry, Frame, WriterConfig};
use nanobot_messages::{codec::now_ns, topics, LogAck, Observation, SegmentFinalized};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::Deserialize;

use crate::bus::{Lossless, PubQos, Publisher};
use crate::node::{ActorContext, Presence};

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
    /// Arrivals queued between Zenoh and the logger before publishers are slowed down.
    pub queue: usize,
    /// Frames kept in memory while the disk fails; beyond this the oldest unacknowledged
    /// frames are dropped (counted).
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

pub struct LoggerActor;

pub enum LoggerMsg {
    Tick,
}

pub struct LoggerState {
    cfg: LoggerConfig,
    robot: String,
    root: PathBuf,
    writer: DatasetWriter,
    obs: Lossless<Observation>,
    ack: Publisher<LogAck>,
    segments: Publisher<SegmentFinalized>,
    presence: Presence,
    rows: u64,
    refused: u64,
    failing_since: Option<Instant>,
    last_error_log: Option<Instant>,
}

impl LoggerState {
    fn disk_error(&mut self, e: &nanobot_dataset::DatasetError) {
        self.presence.counters.errors.fetch_add(1, Ordering::Relaxed);
        if self.failing_since.is_none() {
            self.failing_since = Some(Instant::now());
        }
        if self
            .last_error_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
        {
            self.last_error_log = Some(Instant::now());
            tracing::error!(robot = %self.robot, pending = self.writer.pending_rows(), "dataset write failed, acknowledgements stopped: {e}");
        }
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

impl Actor for LoggerActor {
    type Msg = LoggerMsg;
    type State = LoggerState;
    type Arguments = ActorContext;

    async fn pre_start(
        &self,
        myself: ActorRef<LoggerMsg>,
        ctx: ActorContext,
    ) -> Result<LoggerState, ActorProcessingErr> {
        let cfg: LoggerConfig = ctx.config()?;
        let robot = ctx.robot()?.to_string();
        let fleet = ctx.fleet().to_string();
        if cfg.flush_ms == 0 || cfg.queue == 0 {
            return Err(ctx.config_error("flush_ms and queue must be positive".into()).into());
        }
        let root = PathBuf::from(cfg.root.replace("{fleet}", &fleet).replace("{robot}", &robot));
        // A dataset that cannot be opened is a configuration problem (path, permissions,
        // features that differ from the existing dataset's): say which.
        let writer = DatasetWriter::open(&root, cfg.spec(), cfg.writer_config())
            .map_err(|e| ctx.config_error(format!("dataset {}: {e}", root.display())))?;
        let (last, rows) = writer.durable();
        tracing::info!(robot, root = %root.display(), rows, last_seq = ?last, "logging");
        let bus = &ctx.bus;
        let state = LoggerState {
            obs: bus
                .subscribe_lossless(&topics::obs(&fleet, &robot), cfg.queue)
                .await
                .map_err(ctx.bus_err())?,
            ack: bus
                .publisher(&topics::log_ack(&fleet, &robot), &robot, PubQos::Data)
                .await
                .map_err(ctx.bus_err())?,
            segments: bus
                .publisher(&topics::segment(&fleet, &robot), &robot, PubQos::Data)
                .await
                .map_err(ctx.bus_err())?,
            presence: Presence::announce(&ctx).await?,
            rows,
            writer,
            robot,
            root,
            refused: 0,
            failing_since: None,
            last_error_log: None,
            cfg,
        };
        myself.send_interval(Duration::from_millis(state.cfg.flush_ms), || LoggerMsg::Tick);
        Ok(state)
    }

    async fn handle(
        &self,
        _me: ActorRef<LoggerMsg>,
        _msg: LoggerMsg,
        s: &mut LoggerState,
    ) -> Result<(), ActorProcessingErr> {
        let c = s.presence.counters.clone();
        while let Some(r) = s.obs.try_recv() {
            if s.writer.pending_rows() >= s.cfg.max_pending_rows {
                c.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let seq = r.header.seq;
            if let Err(e) = s.writer.push(frame_of(seq, r.header.stamp_ns, r.msg)) {
                s.refused += 1;
                c.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(robot = %s.robot, "observation not logged: {e}");
            }
        }
        let before = s.writer.durable().1;
        match s.writer.flush() {
            Ok(Some(last_seq)) => {
                let (_, rows) = s.writer.durable();
                if rows > before || s.failing_since.is_some() {
                    if let Some(since) = s.failing_since.take() {
                        tracing::info!(robot = %s.robot, after_s = since.elapsed().as_secs_f32(), "dataset writable again");
                    }
                    c.handled.fetch_add(rows - before, Ordering::Relaxed);
                    s.rows = rows;
                    if let Err(e) = s
                        .ack
                        .put_with(&LogAck { last_seq, rows }, last_seq, now_ns(), None)
                        .await
                    {
                        tracing::warn!(robot = %s.robot, error = %e, "ack not published");
                    }
                }
            }
            Ok(None) => {}
            Err(e) => s.disk_error(&e),
        }
        if s.failing_since.is_none() {
            match s.writer.rotate_if_due() {
                Ok(files) => publish_segments(&s.segments, &s.root, &s.robot, files).await,
                Err(e) => s.disk_error(&e),
            }
        }
        c.set("rows", s.rows as f64);
        c.set("pending", s.writer.pending_rows() as f64);
        c.set("refused", s.refused as f64);
        c.set("files", s.writer.manifest().files.len() as f64);
        c.set("queue_waits", s.obs.stats().waited.load(Ordering::Relaxed) as f64);
        Ok(())
    }

    async fn post_stop(&self, _me: ActorRef<LoggerMsg>, s: &mut LoggerState) -> Result<(), ActorProcessingErr> {
        // A clean stop finalizes the open file; a crash leaves the journal for the next start.
        while let Some(r) = s.obs.try_recv() {
            let _ = s.writer.push(frame_of(r.header.seq, r.header.stamp_ns, r.msg));
        }
        match s.writer.finish_file() {
            Ok(files) => publish_segments(&s.segments, &s.root, &s.robot, files).await,
            Err(e) => {
                tracing::error!(robot = %s.robot, "dataset not finalized at stop (its journal is recovered at the next start): {e}")
            }
        }
        Ok(())
    }
}
