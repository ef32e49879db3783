//! The ingest logic without I/O: frames → checked sensor samples → aligned Observations.
//! The actor and `nanobot collect` both run it.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use nanobot_messages::device::{self, DeviceFrame, Sensor};
use nanobot_messages::{
    topics, Encoding, Event, EventKind, Grid, Image, Observation, RawFrame, RawFrameView, Reject, TraceContext,
    Viewable,
};
use serde::Deserialize;

/// The robot name rejects are counted under when the frame names no usable robot (a name
/// robots may not take: `topics::validate_robot` reserves it).
pub const UNATTRIBUTED: &str = topics::UNATTRIBUTED;

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
    /// Robots one ingest tracks at most: a robot name is whatever a frame claims, so a frame
    /// naming one more is refused (reason `robots`, counted under `unknown`) rather than let a
    /// flood of names grow its tables without bound.
    pub max_robots: usize,
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
            max_robots: 256,
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
pub enum Reading {
    State(Vec<f32>),
    Action(Vec<f32>),
    Surface { rows: u32, cols: u32, cells: Vec<f32> },
    Camera(Bytes),
}

/// One sensor's reading with its robot, sequence number and capture time.
#[derive(Clone, Debug)]
pub struct SensorSample {
    pub robot: String,
    pub sensor: Sensor,
    pub seq: u64,
    pub stamp_ns: u64,
    pub value: Reading,
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
pub fn sample_from_device(f: DeviceFrame) -> Result<SensorSample, Refused> {
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
                Reading::State(v)
            } else {
                Reading::Action(v)
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
            Reading::Surface { rows, cols, cells }
        }
        Sensor::Camera => Reading::Camera(f.payload.clone()),
    };
    Ok(SensorSample {
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
) -> Result<SensorSample, Refused> {
    f.with_view(|v| sample_from_view(robot, seq, stamp_ns, v, |_| f.data.to_bytes(), trace))
}

/// A RawFrame, read through its borrowed view, as a sample. `keep` turns the camera bytes into
/// a buffer the sample keeps (shared with the payload, not copied, where it can be).
pub fn sample_from_view(
    robot: &str,
    seq: u64,
    stamp_ns: u64,
    f: RawFrameView<'_>,
    keep: impl FnOnce(&[u8]) -> Bytes,
    trace: Option<TraceContext>,
) -> Result<SensorSample, Refused> {
    let refuse = |reason: &'static str, detail: String| Refused {
        robot: robot.into(),
        sensor: f.sensor.to_string(),
        seq,
        reason,
        detail,
    };
    let sensor =
        Sensor::from_name(f.sensor).ok_or_else(|| refuse("sensor", format!("unknown sensor {:?}", f.sensor)))?;
    let value = match (sensor, f.encoding) {
        (Sensor::Camera, Encoding::Jpeg) => Reading::Camera(keep(&f.data.contiguous())),
        (Sensor::State | Sensor::Action | Sensor::Surface, Encoding::F32Le) => {
            if !f.data.len().is_multiple_of(4) {
                return Err(refuse(
                    "size",
                    format!("{} bytes is not a whole number of f32", f.data.len()),
                ));
            }
            let v: Vec<f32> = f
                .data
                .contiguous()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            match sensor {
                Sensor::State => Reading::State(v),
                Sensor::Action => Reading::Action(v),
                _ => {
                    let (rows, cols) = match *f.shape.as_slice() {
                        [r, c] => (r, c),
                        _ => {
                            return Err(refuse(
                                "size",
                                format!("surface shape {:?} is not [rows, cols]", f.shape.as_slice()),
                            ))
                        }
                    };
                    let cells = (rows as u64) * (cols as u64);
                    if v.len() as u64 != cells {
                        return Err(refuse(
                            "size",
                            format!("surface says {rows}×{cols} but carries {} cells", v.len()),
                        ));
                    }
                    Reading::Surface { rows, cols, cells: v }
                }
            }
        }
        (s, e) => return Err(refuse("decode", format!("{} frames cannot be {e:?}", s.name()))),
    };
    Ok(SensorSample {
        robot: robot.into(),
        sensor,
        seq,
        stamp_ns,
        value,
        trace,
    })
}

/// A Zenoh raw-topic payload: a NanoBot envelope or a device frame.
pub fn sample_from_payload(
    key_robot: &str,
    payload: Bytes,
    trace: Option<TraceContext>,
) -> Result<SensorSample, Refused> {
    let refuse = |reason: &'static str, detail: String| Refused {
        robot: key_robot.into(),
        sensor: String::new(),
        seq: 0,
        reason,
        detail,
    };
    if let Err(e) = topics::validate_robot(key_robot) {
        return Err(refuse("decode", format!("topic names no usable robot: {e}")));
    }
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
    let (header, frame) =
        nanobot_messages::decode_view::<RawFrameView>(&payload).map_err(|e| refuse("decode", e.to_string()))?;
    sample_from_view(
        key_robot,
        header.seq,
        header.stamp_ns,
        frame,
        // A view of a contiguous payload borrows it: the camera bytes are shared, not copied.
        |camera| {
            if payload.as_ptr_range().contains(&camera.as_ptr()) {
                payload.slice_ref(camera)
            } else {
                Bytes::copy_from_slice(camera)
            }
        },
        trace,
    )
}

/// What the core produces.
#[derive(Debug)]
pub enum Produced {
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
    value: Reading,
}

#[derive(Default)]
struct SensorTrack {
    /// The last accepted frame's sequence number.
    last_seq: Option<u64>,
    /// Sequence numbers of frames rejected since the last accepted one (at most
    /// `MAX_REJECTED_SEQS`).
    rejected_since: Vec<u64>,
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
    /// Frames missing from sequence gaps (never received; rejects are counted apart).
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
/// Rejected sequence numbers remembered between two accepted frames of a sensor.
const MAX_REJECTED_SEQS: usize = 1024;

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

    /// Count a refused frame and turn it into a Reject.
    pub fn refuse(&mut self, r: Refused) -> Produced {
        let robot = if topics::validate_robot(&r.robot).is_ok() && self.admits(&r.robot) {
            r.robot
        } else {
            UNATTRIBUTED.to_string()
        };
        let c = self.counts.entry(robot.clone()).or_default();
        let n = c.rejects.entry(r.reason.to_string()).or_default();
        *n += 1;
        Produced::Reject {
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
    pub fn on_device(&mut self, r: Result<DeviceFrame, (String, device::DeviceError)>) -> Option<Produced> {
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

    fn check(&self, s: &SensorSample) -> Result<(), (&'static str, String)> {
        let c = &self.cfg;
        let range = |v: &[f32]| -> Result<(), (&'static str, String)> {
            match v.iter().position(|x| !x.is_finite() || x.abs() > c.max_abs) {
                Some(i) => Err(("range", format!("value {i} is {} (limit ±{})", v[i], c.max_abs))),
                None => Ok(()),
            }
        };
        match &s.value {
            Reading::State(v) if v.len() != c.state_dim => {
                Err(("size", format!("state has {} values, want {}", v.len(), c.state_dim)))
            }
            Reading::Action(v) if v.len() != c.action_dim => {
                Err(("size", format!("action has {} values, want {}", v.len(), c.action_dim)))
            }
            Reading::State(v) | Reading::Action(v) => range(v),
            Reading::Surface { rows, cols, .. } if [*rows, *cols] != c.surface => Err((
                "size",
                format!("surface is {rows}×{cols}, want {}×{}", c.surface[0], c.surface[1]),
            )),
            Reading::Surface { cells, .. } => range(cells),
            Reading::Camera(b) if b.len() > c.max_image_bytes => Err((
                "size",
                format!("image of {} bytes exceeds {}", b.len(), c.max_image_bytes),
            )),
            Reading::Camera(b) => {
                // The header alone says the size; the pixels are decoded where they are used
                // (the policy's preprocessing), not here for every frame.
                let mut d = jpeg_decoder::Decoder::new(&b[..]);
                d.read_info()
                    .map_err(|e| ("image", format!("JPEG header does not decode: {e}")))?;
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

    /// Whether `robot` is tracked, or may be: fewer than `max_robots` are.
    fn admits(&self, robot: &str) -> bool {
        self.robots.contains_key(robot) || self.robots.len() < self.cfg.max_robots
    }

    /// Validate a sample; a state sample may complete an observation.
    pub fn on_sample(&mut self, s: SensorSample) -> Option<Produced> {
        if !self.admits(&s.robot) {
            let detail = format!(
                "robot {:?}: this ingest tracks {} robots already (max_robots)",
                s.robot, self.cfg.max_robots
            );
            return Some(self.refuse(Refused {
                robot: String::new(),
                sensor: s.sensor.name().into(),
                seq: s.seq,
                reason: "robots",
                detail,
            }));
        }
        let refused = |reason, detail| Refused {
            robot: s.robot.clone(),
            sensor: s.sensor.name().into(),
            seq: s.seq,
            reason,
            detail,
        };
        let checked = self.check(&s);
        let track = self.robots.entry(s.robot.clone()).or_default();
        let st = track.sensors.entry(s.sensor).or_default();
        let refusal = if let Err((reason, detail)) = checked {
            Some((reason, detail))
        } else if let Some(last) = st.last_stamp.filter(|l| s.stamp_ns <= *l) {
            Some((
                "time",
                format!("timestamp {} ns is not after the previous {} ns", s.stamp_ns, last),
            ))
        } else if st.last_seq == Some(s.seq) {
            // A reboot starts the sequence again from a small number; the same number again is
            // a repeated frame, which would be a duplicate row.
            Some(("seq", format!("sequence number {} repeats the previous frame's", s.seq)))
        } else {
            None
        };
        if let Some((reason, detail)) = refusal {
            // It arrived: when the next good frame comes, it is not counted as lost.
            if st.rejected_since.len() < MAX_REJECTED_SEQS {
                st.rejected_since.push(s.seq);
            }
            return Some(self.refuse(refused(reason, detail)));
        }
        let counts = self.counts.entry(s.robot.clone()).or_default();
        // Loss is what the transport lost: the gap since the last accepted frame, less the
        // frames in it that arrived and were rejected (counted as rejects, not also as lost).
        match st.last_seq {
            Some(last) if s.seq > last => {
                let arrived = st
                    .rejected_since
                    .iter()
                    .filter(|r| (last + 1..s.seq).contains(r))
                    .count() as u64;
                counts.lost += (s.seq - last - 1).saturating_sub(arrived);
            }
            Some(last) => {
                tracing::info!(robot = %s.robot, sensor = s.sensor.name(), seq = s.seq, last, "sequence restarted (device reboot?)")
            }
            None => {}
        }
        st.rejected_since.clear();
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
    fn align(&mut self, robot: &str, trace: Option<TraceContext>) -> Option<Produced> {
        let cfg = &self.cfg;
        let counts = self.counts.entry(robot.to_string()).or_default();
        let t = self.robots.get_mut(robot)?;
        let state = t.sensors.get(&Sensor::State)?.recent.back()?;
        let (seq, stamp) = (state.seq, state.stamp_ns);
        // Observations keep to a grid of `rate_hz` slots; a sample up to a quarter period early
        // still takes its slot, so a robot's timing jitter loses nothing at equal rates.
        let period_ns = (1e9 / cfg.rate_hz as f64) as u64;
        if t.next_due.is_some_and(|due| stamp.saturating_add(period_ns / 4) < due) {
            counts.decimated += 1;
            return None;
        }
        let stale_ns = cfg.staleness_ms.saturating_mul(1_000_000);
        let before = |sensor: Sensor| -> Option<&Reading> {
            let s = t
                .sensors
                .get(&sensor)?
                .recent
                .iter()
                .rev()
                .find(|s| s.stamp_ns <= stamp)?;
            (stamp - s.stamp_ns <= stale_ns).then_some(&s.value)
        };
        let (Some(Reading::Camera(jpeg)), Some(Reading::Surface { rows, cols, cells })) =
            (before(Sensor::Camera), before(Sensor::Surface))
        else {
            counts.stale += 1;
            return None;
        };
        let action = match (cfg.action_dim, before(Sensor::Action)) {
            (0, _) => Vec::new(),
            (_, Some(Reading::Action(a))) => a.clone(),
            _ => {
                counts.stale += 1;
                return None;
            }
        };
        let Reading::State(state_v) = &state.value else {
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
            Some(due) if stamp < due.saturating_add(period_ns) => due.saturating_add(period_ns),
            _ => stamp.saturating_add(period_ns),
        });
        counts.observations += 1;
        Some(Produced::Observation {
            robot: robot.to_string(),
            seq,
            stamp_ns: stamp,
            obs,
            trace,
        })
    }
}
