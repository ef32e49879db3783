//! `ingest`: raw telemetry → validated samples → aligned Observations.
//!
//! Sources: Zenoh raw topics (`{fleet}/{robot}/raw/{sensor}`, carrying either a NanoBot
//! envelope with a RawFrame or a compact device frame from zenoh-pico), a UDP socket and a
//! serial port (device frames, see `nanobot_messages::device`). Every frame is checked — CRC,
//! sizes, value ranges, monotonic timestamps, JPEG decode — and a bad one is counted per robot
//! and reason, logged at a bounded rate and published on `{fleet}/{robot}/rejects`; sequence gaps
//! are counted as loss. The robot's state stream is the reference: each new state sample is
//! joined with the latest camera, surface and action samples taken at or before it (within the
//! staleness limit) into one Observation, at most `rate_hz` times a second.
//!
//! [`IngestCore`] is that logic without I/O; `nanobot collect` runs it without a fleet.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nanobot_messages::device::{self, DeviceFrame, Sensor, StreamDecoder};
use nanobot_messages::{
    codec, topics, Encoding, Event, EventKind, Grid, Image, Observation, RawFrame, Reject, TraceContext,
};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::Deserialize;

use crate::bus::{payload_bytes, sample_trace, PubQos, Publisher};
use crate::node::{ActorContext, Presence};

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Most observations per second per robot.
    pub rate_hz: f32,
    /// A camera, surface or action sample older than this (before the state sample) is stale.
    pub staleness_ms: u64,
    pub state_dim: usize,
    /// 0 when robots do not report their commands.
    pub action_dim: usize,
    /// `[rows, cols]` of the surface grid.
    pub surface: [u32; 2],
    /// `[width, height]` of camera frames.
    pub image: [u32; 2],
    pub max_image_bytes: usize,
    /// Values beyond ±this are out of range (NaN and infinities always are).
    pub max_abs: f32,
    /// Subscribe to `{fleet}/{robot}/raw/*` (one robot with `for_each_robot`, else every robot).
    pub zenoh: bool,
    /// Listen for device frames on this UDP address.
    pub udp: Option<String>,
    /// Read device frames from this serial port.
    pub serial: Option<SerialConfig>,
    /// Warn about a robot's rejects of one reason at most this often.
    pub reject_log_interval_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    pub device: String,
    pub baud: u32,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            rate_hz: 20.0,
            staleness_ms: 200,
            state_dim: nanobot_sim::STATE_DIM,
            action_dim: nanobot_sim::ACTION_DIM,
            surface: [8, 8],
            image: [64, 64],
            max_image_bytes: 256 << 10,
            max_abs: 1e6,
            zenoh: true,
            udp: None,
            serial: None,
            reject_log_interval_ms: 1000,
        }
    }
}

impl IngestConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.rate_hz.is_nan()
            || self.rate_hz <= 0.0
            || self.state_dim == 0
            || self.image.contains(&0)
            || self.surface.contains(&0)
        {
            return Err("rate_hz, state_dim, image and surface must be positive".into());
        }
        Ok(())
    }
}

/// A decoded sensor reading.
#[derive(Clone, Debug)]
pub enum Value {
    State(Vec<f32>),
    Action(Vec<f32>),
    Surface { rows: u32, cols: u32, cells: Vec<f32> },
    Camera(Bytes),
}

#[derive(Clone, Debug)]
pub struct Sample {
    pub robot: String,
    pub sensor: Sensor,
    pub seq: u64,
    pub stamp_ns: u64,
    pub value: Value,
    pub trace: Option<TraceContext>,
}

/// A frame refused before it became a sample: who sent it (if known), why.
#[derive(Clone, Debug)]
pub struct Refused {
    pub robot: String,
    pub sensor: String,
    pub seq: u64,
    pub reason: &'static str,
    pub detail: String,
}

fn f32s(bytes: &[u8]) -> Option<Vec<f32>> {
    (bytes.len().is_multiple_of(4)).then(|| {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

/// A device frame's payload as a sample.
pub fn sample_from_device(f: DeviceFrame) -> Result<Sample, Refused> {
    let refuse = |detail: String| Refused {
        robot: f.robot.clone(),
        sensor: f.sensor.name().into(),
        seq: f.seq as u64,
        reason: "size",
        detail,
    };
    let value = match f.sensor {
        Sensor::State | Sensor::Action => {
            let v = f32s(&f.payload).ok_or_else(|| {
                refuse(format!(
                    "{} payload bytes is not a whole number of f32",
                    f.payload.len()
                ))
            })?;
            if f.sensor == Sensor::State {
                Value::State(v)
            } else {
                Value::Action(v)
            }
        }
        Sensor::Surface => {
            let p = &f.payload;
            if p.len() < 4 {
                return Err(refuse(format!("surface payload of {} bytes has no rows/cols", p.len())));
            }
            let (rows, cols) = (
                u16::from_le_bytes([p[0], p[1]]) as u32,
                u16::from_le_bytes([p[2], p[3]]) as u32,
            );
            let cells = f32s(&p[4..])
                .filter(|c| c.len() == (rows * cols) as usize)
                .ok_or_else(|| {
                    refuse(format!(
                        "surface says {rows}×{cols} but carries {} payload bytes",
                        p.len() - 4
                    ))
                })?;
            Value::Surface { rows, cols, cells }
        }
        Sensor::Camera => Value::Camera(f.payload.clone()),
    };
    Ok(Sample {
        robot: f.robot,
        sensor: f.sensor,
        seq: f.seq as u64,
        stamp_ns: f.stamp_ns,
        value,
        trace: None,
    })
}

/// A RawFrame (from an envelope) as a sample.
pub fn sample_from_raw(
    robot: &str,
    seq: u64,
    stamp_ns: u64,
    f: RawFrame,
    trace: Option<TraceContext>,
) -> Result<Sample, Refused> {
    let refuse = |reason: &'static str, detail: String| Refused {
        robot: robot.into(),
        sensor: f.sensor.clone(),
        seq,
        reason,
        detail,
    };
    let sensor =
        Sensor::from_name(&f.sensor).ok_or_else(|| refuse("sensor", format!("unknown sensor {:?}", f.sensor)))?;
    let value = match (sensor, f.encoding) {
        (Sensor::Camera, Encoding::Jpeg) => Value::Camera(f.data.to_bytes()),
        (Sensor::State | Sensor::Action | Sensor::Surface, Encoding::F32Le) => {
            let v = f
                .as_f32()
                .ok_or_else(|| refuse("size", format!("{} bytes is not a whole number of f32", f.data.len())))?;
            match sensor {
                Sensor::State => Value::State(v),
                Sensor::Action => Value::Action(v),
                _ => {
                    let (rows, cols) = match f.shape[..] {
                        [r, c] => (r, c),
                        _ => {
                            return Err(refuse(
                                "size",
                                format!("surface shape {:?} is not [rows, cols]", f.shape),
                            ))
                        }
                    };
                    Value::Surface { rows, cols, cells: v }
                }
            }
        }
        (s, e) => return Err(refuse("decode", format!("{} frames cannot be {e:?}", s.name()))),
    };
    Ok(Sample {
        robot: robot.into(),
        sensor,
        seq,
        stamp_ns,
        value,
        trace,
    })
}

/// A Zenoh raw-topic payload: a NanoBot envelope or a device frame.
pub fn sample_from_payload(key_robot: &str, payload: Bytes, trace: Option<TraceContext>) -> Result<Sample, Refused> {
    let refuse = |reason: &'static str, detail: String| Refused {
        robot: key_robot.into(),
        sensor: String::new(),
        seq: 0,
        reason,
        detail,
    };
    if payload.starts_with(&device::MAGIC) {
        let f = DeviceFrame::decode(&payload).map_err(|e| refuse(e.reason(), e.to_string()))?;
        if f.robot != key_robot {
            return Err(refuse(
                "decode",
                format!("device frame of robot {:?} on robot {key_robot:?}'s topic", f.robot),
            ));
        }
        return sample_from_device(f);
    }
    let (header, frame) = codec::decode::<RawFrame>(payload).map_err(|e| refuse("decode", e.to_string()))?;
    sample_from_raw(key_robot, header.seq, header.stamp_ns, frame, trace)
}

/// What the core produces.
#[derive(Debug)]
pub enum Output {
    Observation {
        robot: String,
        seq: u64,
        stamp_ns: u64,
        obs: Observation,
        trace: Option<TraceContext>,
    },
    Reject {
        robot: String,
        reject: Reject,
    },
}

struct Stamped {
    seq: u64,
    stamp_ns: u64,
    value: Value,
}

#[derive(Default)]
struct SensorTrack {
    last_seq: Option<u64>,
    last_stamp: Option<u64>,
    recent: VecDeque<Stamped>,
}

#[derive(Default)]
struct RobotTrack {
    sensors: HashMap<Sensor, SensorTrack>,
    episode: u64,
    task: u32,
    frame_index: u64,
    /// When the next observation is due (device clock, ns).
    next_due: Option<u64>,
}

/// Per-robot counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RobotCounts {
    pub accepted: u64,
    pub observations: u64,
    /// Frames missing from sequence gaps.
    pub lost: u64,
    /// State samples without a fresh camera/surface/action to join.
    pub stale: u64,
    /// State samples skipped to keep to `rate_hz`.
    pub decimated: u64,
    pub rejects: BTreeMap<String, u64>,
}

/// The ingest logic, without I/O.
pub struct IngestCore {
    cfg: IngestConfig,
    robots: HashMap<String, RobotTrack>,
    pub counts: BTreeMap<String, RobotCounts>,
}

const RECENT: usize = 8;

impl IngestCore {
    pub fn new(cfg: IngestConfig) -> IngestCore {
        IngestCore {
            cfg,
            robots: HashMap::new(),
            counts: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &IngestConfig {
        &self.cfg
    }

    pub fn total_rejects(&self) -> u64 {
        self.counts.values().flat_map(|c| c.rejects.values()).sum()
    }

    /// Count a refused frame and turn it into a Reject.
    pub fn refuse(&mut self, r: Refused) -> Output {
        let robot = if r.robot.is_empty() {
            "unknown".to_string()
        } else {
            r.robot
        };
        let c = self.counts.entry(robot.clone()).or_default();
        let n = c.rejects.entry(r.reason.to_string()).or_default();
        *n += 1;
        Output::Reject {
            reject: Reject {
                sensor: r.sensor,
                reason: r.reason.into(),
                detail: r.detail,
                seq: r.seq,
                count: *n,
            },
            robot,
        }
    }

    /// A device frame from UDP or serial, or the decode error its source reported.
    pub fn on_device(&mut self, r: Result<DeviceFrame, (String, device::DeviceError)>) -> Option<Output> {
        match r.map(sample_from_device) {
            Ok(Ok(sample)) => self.on_sample(sample),
            Ok(Err(refused)) => Some(self.refuse(refused)),
            Err((source, e)) => Some(self.refuse(Refused {
                robot: String::new(),
                sensor: String::new(),
                seq: 0,
                reason: e.reason(),
                detail: format!("from {source}: {e}"),
            })),
        }
    }

    /// An episode event of a robot: observations carry its episode and task.
    pub fn on_event(&mut self, robot: &str, ev: &Event) {
        let t = self.robots.entry(robot.to_string()).or_default();
        if let EventKind::EpisodeStart { task, .. } = ev.event {
            if t.episode != ev.episode || t.frame_index > 0 {
                t.frame_index = 0;
            }
            t.episode = ev.episode;
            t.task = task;
        }
    }

    fn check(&self, s: &Sample) -> Result<(), (&'static str, String)> {
        let c = &self.cfg;
        let range = |v: &[f32]| -> Result<(), (&'static str, String)> {
            match v.iter().position(|x| !x.is_finite() || x.abs() > c.max_abs) {
                Some(i) => Err(("range", format!("value {i} is {} (limit ±{})", v[i], c.max_abs))),
                None => Ok(()),
            }
        };
        match &s.value {
            Value::State(v) if v.len() != c.state_dim => {
                Err(("size", format!("state has {} values, want {}", v.len(), c.state_dim)))
            }
            Value::Action(v) if v.len() != c.action_dim => {
                Err(("size", format!("action has {} values, want {}", v.len(), c.action_dim)))
            }
            Value::State(v) | Value::Action(v) => range(v),
            Value::Surface { rows, cols, .. } if [*rows, *cols] != c.surface => Err((
                "size",
                format!("surface is {rows}×{cols}, want {}×{}", c.surface[0], c.surface[1]),
            )),
            Value::Surface { cells, .. } => range(cells),
            Value::Camera(b) if b.len() > c.max_image_bytes => Err((
                "size",
                format!("image of {} bytes exceeds {}", b.len(), c.max_image_bytes),
            )),
            Value::Camera(b) => {
                let mut d = jpeg_decoder::Decoder::new(&b[..]);
                d.decode()
                    .map_err(|e| ("image", format!("JPEG does not decode: {e}")))?;
                let info = d.info().ok_or(("image", "JPEG without a header".to_string()))?;
                if [info.width as u32, info.height as u32] != c.image {
                    return Err((
                        "image",
                        format!(
                            "image is {}×{}, want {}×{}",
                            info.width, info.height, c.image[0], c.image[1]
                        ),
                    ));
                }
                Ok(())
            }
        }
    }

    /// Validate a sample; a state sample may complete an observation.
    pub fn on_sample(&mut self, s: Sample) -> Option<Output> {
        let refused = |reason, detail| Refused {
            robot: s.robot.clone(),
            sensor: s.sensor.name().into(),
            seq: s.seq,
            reason,
            detail,
        };
        if let Err((reason, detail)) = self.check(&s) {
            return Some(self.refuse(refused(reason, detail)));
        }
        let track = self.robots.entry(s.robot.clone()).or_default();
        let st = track.sensors.entry(s.sensor).or_default();
        if let Some(last) = st.last_stamp.filter(|l| s.stamp_ns <= *l) {
            let detail = format!("timestamp {} ns is not after the previous {} ns", s.stamp_ns, last);
            return Some(self.refuse(refused("time", detail)));
        }
        let counts = self.counts.entry(s.robot.clone()).or_default();
        match st.last_seq {
            Some(last) if s.seq > last + 1 => counts.lost += s.seq - last - 1,
            Some(last) if s.seq <= last => {
                tracing::info!(robot = %s.robot, sensor = s.sensor.name(), seq = s.seq, last, "sequence restarted (device reboot?)")
            }
            _ => {}
        }
        counts.accepted += 1;
        st.last_seq = Some(s.seq);
        st.last_stamp = Some(s.stamp_ns);
        if st.recent.len() == RECENT {
            st.recent.pop_front();
        }
        st.recent.push_back(Stamped {
            seq: s.seq,
            stamp_ns: s.stamp_ns,
            value: s.value,
        });
        if s.sensor == Sensor::State {
            return self.align(&s.robot, s.trace);
        }
        None
    }

    /// Join the newest state sample with the latest-before camera, surface and action.
    fn align(&mut self, robot: &str, trace: Option<TraceContext>) -> Option<Output> {
        let cfg = &self.cfg;
        let counts = self.counts.entry(robot.to_string()).or_default();
        let t = self.robots.get_mut(robot)?;
        let state = t.sensors.get(&Sensor::State)?.recent.back()?;
        let (seq, stamp) = (state.seq, state.stamp_ns);
        // Observations keep to a grid of `rate_hz` slots; a sample up to a quarter period early
        // still takes its slot, so a robot's timing jitter loses nothing at equal rates.
        let period_ns = (1e9 / cfg.rate_hz as f64) as u64;
        if t.next_due.is_some_and(|due| stamp + period_ns / 4 < due) {
            counts.decimated += 1;
            return None;
        }
        let stale_ns = cfg.staleness_ms * 1_000_000;
        let before = |sensor: Sensor| -> Option<&Value> {
            let s = t
                .sensors
                .get(&sensor)?
                .recent
                .iter()
                .rev()
                .find(|s| s.stamp_ns <= stamp)?;
            (stamp - s.stamp_ns <= stale_ns).then_some(&s.value)
        };
        let (Some(Value::Camera(jpeg)), Some(Value::Surface { rows, cols, cells })) =
            (before(Sensor::Camera), before(Sensor::Surface))
        else {
            counts.stale += 1;
            return None;
        };
        let action = match (cfg.action_dim, before(Sensor::Action)) {
            (0, _) => Vec::new(),
            (_, Some(Value::Action(a))) => a.clone(),
            _ => {
                counts.stale += 1;
                return None;
            }
        };
        let Value::State(state_v) = &state.value else {
            return None;
        };
        let obs = Observation {
            episode: t.episode,
            frame_index: t.frame_index,
            task: t.task,
            image: Image {
                width: cfg.image[0],
                height: cfg.image[1],
                encoding: Encoding::Jpeg,
                data: nanobot_messages::Blob::new(jpeg.clone()),
            },
            state: state_v.clone(),
            surface: Grid {
                rows: *rows,
                cols: *cols,
                cells: cells.clone(),
            },
            action,
        };
        t.frame_index += 1;
        t.next_due = Some(match t.next_due {
            Some(due) if stamp < due + period_ns => due + period_ns,
            _ => stamp + period_ns,
        });
        counts.observations += 1;
        Some(Output::Observation {
            robot: robot.to_string(),
            seq,
            stamp_ns: stamp,
            obs,
            trace,
        })
    }
}

/// Decode a JPEG to RGB8 (grayscale is widened): `(width, height, pixels)`.
pub fn decode_jpeg_rgb(jpeg: &[u8]) -> Result<(u32, u32, Vec<u8>), String> {
    let mut d = jpeg_decoder::Decoder::new(jpeg);
    let px = d.decode().map_err(|e| format!("JPEG does not decode: {e}"))?;
    let info = d.info().ok_or("JPEG without a header")?;
    let rgb = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => px,
        jpeg_decoder::PixelFormat::L8 => px.iter().flat_map(|&v| [v, v, v]).collect(),
        other => return Err(format!("JPEG pixel format {other:?} is not RGB or grayscale")),
    };
    Ok((info.width as u32, info.height as u32, rgb))
}

/// Rate-limits warnings per (robot, reason).
#[derive(Default)]
pub struct RejectLog {
    last: HashMap<(String, String), Instant>,
}

impl RejectLog {
    pub fn warn(&mut self, robot: &str, r: &Reject, every: Duration) {
        let key = (robot.to_string(), r.reason.clone());
        if self.last.get(&key).is_none_or(|t| t.elapsed() >= every) {
            self.last.insert(key, Instant::now());
            tracing::warn!(robot, sensor = %r.sensor, reason = %r.reason, seq = r.seq, total = r.count, "frame rejected: {}", r.detail);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The actor.

pub struct IngestActor;

pub enum IngestMsg {
    /// A Zenoh raw-topic payload.
    Zenoh {
        key: String,
        payload: Bytes,
        trace: Option<TraceContext>,
    },
    /// A device frame (or a decode error) from UDP or serial.
    Device(Result<DeviceFrame, (String, device::DeviceError)>),
    Event {
        robot: String,
        event: Event,
    },
}

pub struct IngestState {
    core: IngestCore,
    fleet: String,
    bus: crate::bus::Bus,
    obs: HashMap<String, Publisher<Observation>>,
    rejects: HashMap<String, Publisher<Reject>>,
    log: RejectLog,
    presence: Presence,
    _subs: Vec<zenoh::pubsub::Subscriber<()>>,
    _events: Vec<crate::bus::Callback>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    exported: Instant,
}

impl Drop for IngestState {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl IngestState {
    async fn publish(&mut self, out: Output) {
        let c = self.presence.counters.clone();
        match out {
            Output::Observation {
                robot,
                seq,
                stamp_ns,
                obs,
                trace,
            } => {
                if !self.obs.contains_key(&robot) {
                    match self
                        .bus
                        .publisher(&topics::obs(&self.fleet, &robot), &robot, PubQos::Control)
                        .await
                    {
                        Ok(p) => {
                            self.obs.insert(robot.clone(), p);
                        }
                        Err(e) => {
                            tracing::warn!(robot, error = %e, "no observation publisher");
                            return;
                        }
                    }
                }
                let trace = trace.map(|t| t.child()).unwrap_or_else(TraceContext::new_root);
                match self.obs[&robot].put_with(&obs, seq, stamp_ns, Some(&trace)).await {
                    Ok(_) => c.handled.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        tracing::warn!(robot, error = %e, "observation not published");
                        c.errors.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            Output::Reject { robot, reject } => {
                c.dropped.fetch_add(1, Ordering::Relaxed);
                self.log.warn(
                    &robot,
                    &reject,
                    Duration::from_millis(self.core.cfg.reject_log_interval_ms),
                );
                if topics::validate_robot(&robot).is_err() {
                    return;
                }
                if !self.rejects.contains_key(&robot) {
                    if let Ok(p) = self
                        .bus
                        .publisher(&topics::rejects(&self.fleet, &robot), &robot, PubQos::Control)
                        .await
                    {
                        self.rejects.insert(robot.clone(), p);
                    }
                }
                if let Some(p) = self.rejects.get(&robot) {
                    let _ = p.put(&reject).await;
                }
            }
        }
    }

    fn export_counts(&self) {
        let c = &self.presence.counters;
        let mut totals = RobotCounts::default();
        for rc in self.core.counts.values() {
            totals.accepted += rc.accepted;
            totals.observations += rc.observations;
            totals.lost += rc.lost;
            totals.stale += rc.stale;
            totals.decimated += rc.decimated;
            for (k, v) in &rc.rejects {
                *totals.rejects.entry(k.clone()).or_default() += v;
            }
        }
        c.set("accepted", totals.accepted as f64);
        c.set("observations", totals.observations as f64);
        c.set("lost", totals.lost as f64);
        c.set("stale", totals.stale as f64);
        c.set("decimated", totals.decimated as f64);
        for (k, v) in totals.rejects {
            c.set(&format!("rejects.{k}"), v as f64);
        }
    }
}

/// Read device frames from a UDP socket into the actor (one or more frames per datagram).
fn spawn_udp(sock: tokio::net::UdpSocket, me: ActorRef<IngestMsg>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                break;
            };
            for r in device::decode_datagram(&Bytes::copy_from_slice(&buf[..n])) {
                let _ = me.cast(IngestMsg::Device(r.map_err(|e| (from.to_string(), e))));
            }
        }
    })
}

/// Read device frames from a serial port (raw mode at `baud`) into the actor.
pub fn open_serial(cfg: &SerialConfig) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&cfg.device)?;
    let speed = match cfg.baud {
        9600 => libc::B9600,
        19200 => libc::B19200,
        38400 => libc::B38400,
        57600 => libc::B57600,
        115200 => libc::B115200,
        230400 => libc::B230400,
        460800 => libc::B460800,
        921600 => libc::B921600,
        1000000 => libc::B1000000,
        2000000 => libc::B2000000,
        other => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("unsupported baud rate {other}"),
            ))
        }
    };
    // SAFETY: tcgetattr/tcsetattr on a file descriptor we own, with a zeroed termios they fill.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(f.as_raw_fd(), &mut t) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::cfmakeraw(&mut t);
        libc::cfsetispeed(&mut t, speed);
        libc::cfsetospeed(&mut t, speed);
        t.c_cc[libc::VMIN] = 1;
        t.c_cc[libc::VTIME] = 0;
        if libc::tcsetattr(f.as_raw_fd(), libc::TCSANOW, &t) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(f)
}

/// Frames from a byte stream (serial port), passed to `emit`; runs until the stream ends.
pub fn read_stream(
    mut r: impl std::io::Read,
    source: &str,
    mut emit: impl FnMut(Result<DeviceFrame, (String, device::DeviceError)>) -> bool,
) {
    let mut d = StreamDecoder::new();
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(source, error = %e, "serial read ended");
                break;
            }
        };
        d.push(&buf[..n]);
        while let Some(f) = d.next_frame() {
            if !emit(f.map_err(|e| (source.to_string(), e))) {
                return;
            }
        }
    }
}

impl Actor for IngestActor {
    type Msg = IngestMsg;
    type State = IngestState;
    type Arguments = ActorContext;

    async fn pre_start(
        &self,
        myself: ActorRef<IngestMsg>,
        ctx: ActorContext,
    ) -> Result<IngestState, ActorProcessingErr> {
        let cfg: IngestConfig = ctx.config()?;
        cfg.validate().map_err(|e| ctx.config_error(e))?;
        let fleet = ctx.fleet().to_string();
        let robot = ctx.spec.robot.clone();
        let robots = robot.clone().unwrap_or_else(|| "*".into());
        let mut subs = Vec::new();
        let mut events = Vec::new();
        let mut tasks = Vec::new();
        if cfg.zenoh {
            let me = myself.clone();
            let key = format!("{fleet}/{robots}/raw/*");
            let sub = ctx
                .bus
                .session()
                .declare_subscriber(key.clone())
                .callback(move |sample| {
                    let _ = me.cast(IngestMsg::Zenoh {
                        key: sample.key_expr().as_str().to_string(),
                        payload: payload_bytes(sample.payload()),
                        trace: sample_trace(&sample),
                    });
                })
                .await
                .map_err(|e| ctx.config_error(format!("subscribing {key}: {e}")))?;
            subs.push(sub);
        }
        let me = myself.clone();
        let f2 = fleet.clone();
        events.push(
            ctx.bus
                .subscribe_callback::<Event>(&format!("{fleet}/{robots}/event"), move |r| {
                    let robot = topics::robot_of(&f2, r.key.as_str()).unwrap_or_default().to_string();
                    let _ = me.cast(IngestMsg::Event { robot, event: r.msg });
                })
                .await
                .map_err(ctx.bus_err())?,
        );
        if let Some(addr) = &cfg.udp {
            let sock = tokio::net::UdpSocket::bind(addr)
                .await
                .map_err(|e| ctx.config_error(format!("udp {addr}: {e}")))?;
            tracing::info!(addr = %sock.local_addr().map(|a| a.to_string()).unwrap_or_default(), "ingest listening for device frames on UDP");
            tasks.push(spawn_udp(sock, myself.clone()));
        }
        if let Some(serial) = &cfg.serial {
            let port = open_serial(serial).map_err(|e| ctx.config_error(format!("serial {}: {e}", serial.device)))?;
            let me = myself.clone();
            let name = serial.device.clone();
            tasks.push(tokio::task::spawn_blocking(move || {
                read_stream(port, &name, |f| me.cast(IngestMsg::Device(f)).is_ok())
            }));
        }
        Ok(IngestState {
            core: IngestCore::new(cfg),
            bus: ctx.bus.clone(),
            presence: Presence::announce(&ctx).await?,
            fleet,
            obs: HashMap::new(),
            rejects: HashMap::new(),
            log: RejectLog::default(),
            _subs: subs,
            _events: events,
            tasks,
            exported: Instant::now(),
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<IngestMsg>,
        msg: IngestMsg,
        s: &mut IngestState,
    ) -> Result<(), ActorProcessingErr> {
        let out = match msg {
            IngestMsg::Zenoh { key, payload, trace } => {
                let robot = topics::robot_of(&s.fleet, &key).unwrap_or("unknown").to_string();
                match sample_from_payload(&robot, payload, trace) {
                    Ok(sample) => s.core.on_sample(sample),
                    Err(r) => {
                        let sensor = key.rsplit('/').next().unwrap_or_default().to_string();
                        Some(s.core.refuse(Refused { sensor, ..r }))
                    }
                }
            }
            IngestMsg::Device(r) => s.core.on_device(r),
            IngestMsg::Event { robot, event } => {
                s.core.on_event(&robot, &event);
                None
            }
        };
        if let Some(out) = out {
            s.publish(out).await;
        }
        if s.exported.elapsed() >= Duration::from_millis(250) {
            s.exported = Instant::now();
            s.export_counts();
        }
        Ok(())
    }
}
