//! Every message type of DESIGN.md's topic table.

use std::fmt;

use base64::Engine as _;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A large byte field (a camera frame, an adapter) carried outside the bincode body.
///
/// In the binary codec a blob contributes only its length (u64) to the body; its bytes follow
/// the body, so the bus can pass them to Zenoh and back without a copy. A received blob may
/// be in several pieces (Zenoh reassembles big payloads from fragments): forwarding it keeps
/// them as they are, and [`Blob::to_bytes`] gathers them only when contiguous bytes are asked
/// for. In JSON a blob is base64.
#[derive(Clone, Default)]
pub struct Blob {
    pieces: Pieces,
    /// Length announced by a decoded body whose bytes have not been attached yet.
    pending: Option<u64>,
}

#[derive(Clone)]
enum Pieces {
    One(Bytes),
    Many(Vec<Bytes>),
}

impl Default for Pieces {
    fn default() -> Self {
        Pieces::One(Bytes::new())
    }
}

impl Blob {
    pub fn new(bytes: impl Into<Bytes>) -> Self {
        Blob {
            pieces: Pieces::One(bytes.into()),
            pending: None,
        }
    }
    /// A blob made of several pieces, in order (empty pieces are dropped).
    pub fn from_pieces(mut pieces: Vec<Bytes>) -> Self {
        pieces.retain(|p| !p.is_empty());
        let pieces = match pieces.len() {
            0 => Pieces::One(Bytes::new()),
            1 => Pieces::One(pieces.pop().unwrap_or_default()),
            _ => Pieces::Many(pieces),
        };
        Blob { pieces, pending: None }
    }
    /// The pieces, in order; one for a contiguous blob.
    pub fn pieces(&self) -> &[Bytes] {
        match &self.pieces {
            Pieces::One(b) => std::slice::from_ref(b),
            Pieces::Many(v) => v,
        }
    }
    pub fn is_contiguous(&self) -> bool {
        matches!(self.pieces, Pieces::One(_))
    }
    /// The bytes in one buffer: shared when contiguous, gathered (copied) otherwise.
    pub fn to_bytes(&self) -> Bytes {
        match &self.pieces {
            Pieces::One(b) => b.clone(),
            Pieces::Many(v) => {
                let mut out = Vec::with_capacity(self.len());
                v.iter().for_each(|p| out.extend_from_slice(p));
                Bytes::from(out)
            }
        }
    }
    pub fn len(&self) -> usize {
        self.pieces().iter().map(Bytes::len).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub(crate) fn pending_len(&self) -> Option<u64> {
        self.pending
    }
    pub(crate) fn attach(&mut self, blob: Blob) {
        *self = blob;
    }
}

impl PartialEq for Blob {
    /// Equal content, however it is cut into pieces.
    fn eq(&self, other: &Blob) -> bool {
        if self.len() != other.len() {
            return false;
        }
        let a = self.pieces().iter().flat_map(|p| p.iter());
        let b = other.pieces().iter().flat_map(|p| p.iter());
        a.eq(b)
    }
}

impl Eq for Blob {}

impl From<Vec<u8>> for Blob {
    fn from(v: Vec<u8>) -> Self {
        Blob::new(v)
    }
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blob({} bytes in {} piece(s))", self.len(), self.pieces().len())
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(self.to_bytes()))
        } else {
            s.serialize_u64(self.len() as u64)
        }
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let text = String::deserialize(d)?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map_err(|e| serde::de::Error::custom(format!("blob is not base64: {e}")))?;
            Ok(Blob::new(bytes))
        } else {
            let len = u64::deserialize(d)?;
            Ok(Blob {
                pieces: Pieces::default(),
                pending: Some(len),
            })
        }
    }
}

/// The message kind byte of the envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum Kind {
    RawFrame = 1,
    Observation = 2,
    ActionChunk = 3,
    Event = 4,
    SegmentFinalized = 5,
    ReplayRequest = 6,
    ReplayBatch = 7,
    Candidate = 8,
    Promoted = 9,
    Stats = 10,
    Reject = 11,
    LogAck = 12,
}

impl Kind {
    pub const ALL: [Kind; 12] = [
        Kind::RawFrame,
        Kind::Observation,
        Kind::ActionChunk,
        Kind::Event,
        Kind::SegmentFinalized,
        Kind::ReplayRequest,
        Kind::ReplayBatch,
        Kind::Candidate,
        Kind::Promoted,
        Kind::Stats,
        Kind::Reject,
        Kind::LogAck,
    ];

    pub fn from_u8(b: u8) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| *k as u8 == b)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::RawFrame => "RawFrame",
            Kind::Observation => "Observation",
            Kind::ActionChunk => "ActionChunk",
            Kind::Event => "Event",
            Kind::SegmentFinalized => "SegmentFinalized",
            Kind::ReplayRequest => "ReplayRequest",
            Kind::ReplayBatch => "ReplayBatch",
            Kind::Candidate => "Candidate",
            Kind::Promoted => "Promoted",
            Kind::Stats => "Stats",
            Kind::Reject => "Reject",
            Kind::LogAck => "LogAck",
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| k.name() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A type that travels in the envelope.
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {
    const KIND: Kind;
    /// Visit the blobs of this message in field order (their bytes follow the body on the wire).
    fn visit_blobs(&self, _f: &mut dyn FnMut(&Blob)) {}
    fn visit_blobs_mut(&mut self, _f: &mut dyn FnMut(&mut Blob)) {}
}

/// How the bytes of a frame or image are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encoding {
    /// JPEG (what an ESP32-CAM sends).
    Jpeg,
    /// Packed RGB8, row-major.
    Rgb8,
    /// Little-endian f32 values, row-major.
    F32Le,
    /// Opaque device bytes.
    Bytes,
}

/// Raw telemetry from a robot, a bridge or a zenoh-pico board: `{fleet}/{robot}/raw/{sensor}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RawFrame {
    pub sensor: String,
    pub encoding: Encoding,
    /// Shape of the decoded value (`[h, w, 3]` for an image, `[n]` for a vector).
    pub shape: Vec<u32>,
    pub data: Blob,
}

impl RawFrame {
    /// A vector sensor reading as little-endian f32.
    pub fn f32_vector(sensor: &str, values: &[f32]) -> RawFrame {
        let mut data = Vec::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        RawFrame {
            sensor: sensor.to_string(),
            encoding: Encoding::F32Le,
            shape: vec![values.len() as u32],
            data: Blob::new(data),
        }
    }

    /// The values of an `F32Le` frame; `None` for another encoding or a ragged length.
    pub fn as_f32(&self) -> Option<Vec<f32>> {
        if self.encoding != Encoding::F32Le || !self.data.len().is_multiple_of(4) {
            return None;
        }
        Some(
            self.data
                .to_bytes()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }
}

impl Message for RawFrame {
    const KIND: Kind = Kind::RawFrame;
    fn visit_blobs(&self, f: &mut dyn FnMut(&Blob)) {
        f(&self.data)
    }
    fn visit_blobs_mut(&mut self, f: &mut dyn FnMut(&mut Blob)) {
        f(&mut self.data)
    }
}

/// An image with its size and encoding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub encoding: Encoding,
    pub data: Blob,
}

/// A contact or height grid, row-major.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct Grid {
    pub rows: u32,
    pub cols: u32,
    pub cells: Vec<f32>,
}

/// An aligned observation: `{fleet}/{robot}/obs` (ingest → policy, logger).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    pub episode: u64,
    pub frame_index: u64,
    pub task: u32,
    pub image: Image,
    pub state: Vec<f32>,
    pub surface: Grid,
    /// The action the robot commanded at this observation (what a dataset records as
    /// `action`); empty when the robot does not report its commands.
    pub action: Vec<f32>,
}

impl Message for Observation {
    const KIND: Kind = Kind::Observation;
    fn visit_blobs(&self, f: &mut dyn FnMut(&Blob)) {
        f(&self.image.data)
    }
    fn visit_blobs_mut(&mut self, f: &mut dyn FnMut(&mut Blob)) {
        f(&mut self.image.data)
    }
}

/// Who produced an action chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionSource {
    Policy,
    Expert,
    Operator,
}

/// A chunk of continuous actions: `{fleet}/{robot}/act` (policy → robot).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActionChunk {
    /// Sequence number of the observation this chunk answers.
    pub obs_seq: u64,
    /// Time step between consecutive actions, ns.
    pub dt_ns: u64,
    pub horizon: u32,
    pub action_dim: u32,
    /// `horizon × action_dim` values, row-major.
    pub actions: Vec<f32>,
    pub source: ActionSource,
    pub policy_version: String,
    pub adapter_version: String,
}

impl ActionChunk {
    pub fn action(&self, i: usize) -> Option<&[f32]> {
        let d = self.action_dim as usize;
        self.actions.get(i * d..(i + 1) * d)
    }
}

impl Message for ActionChunk {
    const KIND: Kind = Kind::ActionChunk;
}

/// What happened: `{fleet}/{robot}/event` (robot, operators → logger, replay).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum EventKind {
    EpisodeStart { task: u32, shift: String },
    EpisodeEnd { success: bool, steps: u32, reward: f32 },
    Intervention { active: bool, reason: String },
    Reward { value: f32 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub episode: u64,
    pub event: EventKind,
}

impl Message for Event {
    const KIND: Kind = Kind::Event;
}

/// A finalized Parquet file: `{fleet}/log/{robot}/segment` (logger → replay).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SegmentFinalized {
    pub path: String,
    pub rows: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub bytes: u64,
    /// Lower-case hex sha256 of the file.
    pub sha256: String,
}

impl Message for SegmentFinalized {
    const KIND: Kind = Kind::SegmentFinalized;
}

/// A request for training windows: the query on `{fleet}/replay/sample`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplayRequest {
    pub batch_size: u32,
    pub n_obs_steps: u32,
    pub horizon: u32,
    /// Fraction of the batch drawn from the freshest segments.
    pub fresh_fraction: f32,
    pub seed: u64,
}

impl Message for ReplayRequest {
    const KIND: Kind = Kind::ReplayRequest;
}

/// A named f32 tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<u32>,
    pub data: Vec<f32>,
}

/// The reply to a [`ReplayRequest`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplayBatch {
    pub windows: u32,
    pub tensors: Vec<Tensor>,
}

impl Message for ReplayBatch {
    const KIND: Kind = Kind::ReplayBatch;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub name: String,
    pub value: f64,
}

/// A candidate adapter: `{fleet}/ckpt/candidate` (trainer → promoter).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub adapter_id: String,
    pub base_version: String,
    pub step: u64,
    pub metrics: Vec<Metric>,
    /// The adapter's safetensors bytes.
    pub adapter: Blob,
}

impl Message for Candidate {
    const KIND: Kind = Kind::Candidate;
    fn visit_blobs(&self, f: &mut dyn FnMut(&Blob)) {
        f(&self.adapter)
    }
    fn visit_blobs_mut(&mut self, f: &mut dyn FnMut(&mut Blob)) {
        f(&mut self.adapter)
    }
}

/// A promoted adapter: `{fleet}/ckpt/promoted` (promoter → policy actors).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Promoted {
    pub adapter_id: String,
    pub base_version: String,
    pub sha256: String,
    pub signature: String,
    /// Robots that take it first; empty means the whole fleet.
    pub canary: Vec<String>,
    pub adapter: Blob,
}

impl Message for Promoted {
    const KIND: Kind = Kind::Promoted;
    fn visit_blobs(&self, f: &mut dyn FnMut(&Blob)) {
        f(&self.adapter)
    }
    fn visit_blobs_mut(&mut self, f: &mut dyn FnMut(&mut Blob)) {
        f(&mut self.adapter)
    }
}

/// An actor's counters: published on `{fleet}/node/{node}/{actor}` beside its liveliness token.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct Stats {
    pub node: String,
    pub actor: String,
    pub restarts: u32,
    pub handled: u64,
    pub errors: u64,
    pub dropped: u64,
    pub uptime_ms: u64,
    pub extra: Vec<Metric>,
}

impl Message for Stats {
    const KIND: Kind = Kind::Stats;
}

/// A telemetry frame that ingest refused: `{fleet}/{robot}/rejects` (ingest → engineers).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reject {
    /// The sensor the frame claimed to be (empty when even that was unreadable).
    pub sensor: String,
    /// One word: `decode`, `crc`, `size`, `range`, `time`, `image`, `sensor`.
    pub reason: String,
    /// What exactly was wrong, for a human.
    pub detail: String,
    /// The frame's own sequence number, when it could be read.
    pub seq: u64,
    /// Frames of this robot rejected for this reason so far.
    pub count: u64,
}

impl Message for Reject {
    const KIND: Kind = Kind::Reject;
}

/// The logger's acknowledgement: `{fleet}/log/{robot}/ack`. Every observation up to `last_seq`
/// that reached the logger is durable (it survives `kill -9`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogAck {
    pub last_seq: u64,
    /// Durable rows in the robot's dataset.
    pub rows: u64,
}

impl Message for LogAck {
    const KIND: Kind = Kind::LogAck;
}

/// Any message, for tools that do not know the kind in advance (the CLI, bridges).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "msg")]
pub enum AnyMessage {
    RawFrame(RawFrame),
    Observation(Observation),
    ActionChunk(ActionChunk),
    Event(Event),
    SegmentFinalized(SegmentFinalized),
    ReplayRequest(ReplayRequest),
    ReplayBatch(ReplayBatch),
    Candidate(Candidate),
    Promoted(Promoted),
    Stats(Stats),
    Reject(Reject),
    LogAck(LogAck),
}

impl AnyMessage {
    pub fn kind(&self) -> Kind {
        match self {
            AnyMessage::RawFrame(_) => Kind::RawFrame,
            AnyMessage::Observation(_) => Kind::Observation,
            AnyMessage::ActionChunk(_) => Kind::ActionChunk,
            AnyMessage::Event(_) => Kind::Event,
            AnyMessage::SegmentFinalized(_) => Kind::SegmentFinalized,
            AnyMessage::ReplayRequest(_) => Kind::ReplayRequest,
            AnyMessage::ReplayBatch(_) => Kind::ReplayBatch,
            AnyMessage::Candidate(_) => Kind::Candidate,
            AnyMessage::Promoted(_) => Kind::Promoted,
            AnyMessage::Stats(_) => Kind::Stats,
            AnyMessage::Reject(_) => Kind::Reject,
            AnyMessage::LogAck(_) => Kind::LogAck,
        }
    }
}
