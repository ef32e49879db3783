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
    pieces: BlobPieces,
    /// Length announced by a decoded body whose bytes have not been attached yet.
    pending: Option<u64>,
}

#[derive(Clone)]
enum BlobPieces {
    One(Bytes),
    Many(Vec<Bytes>),
}

impl Default for BlobPieces {
    fn default() -> Self {
        BlobPieces::One(Bytes::new())
    }
}

impl Blob {
    pub fn new(bytes: impl Into<Bytes>) -> Self {
        Blob {
            pieces: BlobPieces::One(bytes.into()),
            pending: None,
        }
    }
    /// A blob made of several pieces, in order (empty pieces are dropped).
    pub fn from_pieces(mut pieces: Vec<Bytes>) -> Self {
        pieces.retain(|p| !p.is_empty());
        let pieces = match pieces.len() {
            0 => BlobPieces::One(Bytes::new()),
            1 => BlobPieces::One(pieces.pop().unwrap_or_default()),
            _ => BlobPieces::Many(pieces),
        };
        Blob { pieces, pending: None }
    }
    /// The pieces, in order; one for a contiguous blob.
    pub fn pieces(&self) -> &[Bytes] {
        match &self.pieces {
            BlobPieces::One(b) => std::slice::from_ref(b),
            BlobPieces::Many(v) => v,
        }
    }
    /// The bytes in one buffer: shared when contiguous, gathered (copied) otherwise.
    pub fn to_bytes(&self) -> Bytes {
        match &self.pieces {
            BlobPieces::One(b) => b.clone(),
            BlobPieces::Many(v) => {
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
            // A newtype named "Blob" around its length: the same bytes as a bare u64 in
            // bincode, and a type a schema reader can name (`nanobot schema`).
            s.serialize_newtype_struct("Blob", &(self.len() as u64))
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
            let len = blob_len(d)?;
            Ok(Blob {
                pieces: BlobPieces::default(),
                pending: Some(len),
            })
        }
    }
}

/// A blob's length as a binary body carries it (its bytes follow the body).
pub(crate) fn blob_len<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct Len;
    impl<'de> serde::de::Visitor<'de> for Len {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a blob length")
        }
        fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
            u64::deserialize(d)
        }
    }
    d.deserialize_newtype_struct("Blob", Len)
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Deserialize a sequence without trusting its length prefix for the allocation: bincode hands
/// serde the claimed count as a size hint, and serde's `Vec` would reserve up to 1 MiB for it
/// before a single element is read. Here at most 4 KiB is reserved up front; the vector grows
/// only as elements actually decode, so a garbled prefix costs a small multiple of the bytes
/// received.
fn bounded_seq<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Seq<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Seq<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a sequence")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let cap = seq.size_hint().unwrap_or(0).min(4096 / std::mem::size_of::<T>().max(1));
            let mut v = Vec::with_capacity(cap);
            while let Some(x) = seq.next_element()? {
                v.push(x);
            }
            Ok(v)
        }
    }
    d.deserialize_seq(Seq(std::marker::PhantomData))
}

/// A type that travels in the envelope: one row of the message table below.
pub trait Message: Serialize + DeserializeOwned + Clone + Send + Sync + Into<AnyMessage> + 'static {
    const KIND: Kind;
    /// Visit the blobs of this message in field order (their bytes follow the body on the wire).
    fn visit_blobs(&self, _f: &mut dyn FnMut(&Blob)) {}
    fn visit_blobs_mut(&mut self, _f: &mut dyn FnMut(&mut Blob)) {}
}

/// Something done for one message type, chosen by its kind at run time.
pub trait KindVisitor {
    type Out;
    fn visit<T: Message>(self) -> Self::Out;
}

/// Something done with a message of any kind.
pub trait MessageVisitor {
    type Out;
    fn visit<T: Message>(self, msg: &T) -> Self::Out;
}

/// The message table: every kind's code, its type, and its blob fields (in field order) —
/// listed once. `Kind`, its names, `AnyMessage`, the `Message` impls and the dispatch of the
/// codec, the JSON view and `nanobot schema` all come from it.
macro_rules! message_table {
    ($( $code:literal => $name:ident $([ $($blob:ident).+ ])? ),* $(,)?) => {
        /// The message kind byte of the envelope.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[repr(u8)]
        pub enum Kind {
            $($name = $code),*
        }

        impl Kind {
            pub const ALL: &'static [Kind] = &[$(Kind::$name),*];

            pub fn from_u8(b: u8) -> Option<Kind> {
                match b {
                    $($code => Some(Kind::$name),)*
                    _ => None,
                }
            }

            pub fn name(self) -> &'static str {
                match self {
                    $(Kind::$name => stringify!($name),)*
                }
            }

            pub fn from_name(name: &str) -> Option<Kind> {
                Kind::ALL.iter().copied().find(|k| k.name() == name)
            }

            /// Run `v` for this kind's message type.
            pub fn visit<V: KindVisitor>(self, v: V) -> V::Out {
                match self {
                    $(Kind::$name => v.visit::<$name>(),)*
                }
            }
        }

        /// Any message, for tools that do not know the kind in advance (the CLI, bridges).
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "kind", content = "msg")]
        pub enum AnyMessage {
            $($name($name),)*
        }

        impl AnyMessage {
            pub fn kind(&self) -> Kind {
                match self {
                    $(AnyMessage::$name(_) => Kind::$name,)*
                }
            }

            /// Run `v` on the message inside.
            pub fn visit<V: MessageVisitor>(&self, v: V) -> V::Out {
                match self {
                    $(AnyMessage::$name(m) => v.visit(m),)*
                }
            }
        }

        $(
            impl From<$name> for AnyMessage {
                fn from(m: $name) -> AnyMessage {
                    AnyMessage::$name(m)
                }
            }

            impl Message for $name {
                const KIND: Kind = Kind::$name;
                $(
                    fn visit_blobs(&self, f: &mut dyn FnMut(&Blob)) {
                        f(&self.$($blob).+)
                    }
                    fn visit_blobs_mut(&mut self, f: &mut dyn FnMut(&mut Blob)) {
                        f(&mut self.$($blob).+)
                    }
                )?
            }
        )*
    };
}

message_table! {
    1 => RawFrame [data],
    2 => Observation [image.data],
    3 => ActionChunk,
    4 => Event,
    5 => SegmentFinalized,
    6 => ReplayRequest,
    7 => ReplayBatch [data],
    8 => Candidate [adapter],
    9 => Promoted,
    10 => Stats,
    11 => Reject,
    12 => LogAck,
    13 => AdapterRequest,
    14 => AdapterBytes [data],
    15 => PolicyStatus,
    16 => CkptCommand,
    17 => CkptReply,
    18 => Spooled [message],
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
    #[serde(deserialize_with = "bounded_seq")]
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
    #[serde(deserialize_with = "bounded_seq")]
    pub cells: Vec<f32>,
}

/// An aligned observation: `{fleet}/{robot}/obs` (ingest → policy, logger).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    pub episode: u64,
    pub frame_index: u64,
    pub task: u32,
    pub image: Image,
    #[serde(deserialize_with = "bounded_seq")]
    pub state: Vec<f32>,
    pub surface: Grid,
    /// The action the robot commanded at this observation (what a dataset records as
    /// `action`); empty when the robot does not report its commands.
    #[serde(deserialize_with = "bounded_seq")]
    pub action: Vec<f32>,
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
    /// Sequence number of the observation this chunk answers. Action `k` is for tick
    /// `obs_seq + k` (as a dataset pairs a row's action with its observation): a robot that
    /// gets the chunk at a later tick skips the actions whose ticks have passed.
    pub obs_seq: u64,
    /// Time step between consecutive actions, ns.
    pub dt_ns: u64,
    pub horizon: u32,
    pub action_dim: u32,
    /// `horizon × action_dim` values, row-major.
    #[serde(deserialize_with = "bounded_seq")]
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

/// What happened: `{fleet}/{robot}/event` (robot, operators → logger, replay).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum EventKind {
    EpisodeStart {
        task: u32,
        shift: String,
    },
    EpisodeEnd {
        success: bool,
        steps: u32,
        reward: f32,
    },
    Intervention {
        active: bool,
        reason: String,
    },
    Reward {
        value: f32,
    },
    /// An operator's verdict on an episode: positive is a thumbs-up, negative a thumbs-down
    /// (`nanobot topic pub nb/r0/event '{"episode":3,"event":{"Preference":{"score":1}}}'`).
    Preference {
        score: i8,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub episode: u64,
    pub event: EventKind,
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

/// A request for training windows: the query on `{fleet}/replay/sample`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplayRequest {
    pub batch_size: u32,
    pub n_obs_steps: u32,
    pub horizon: u32,
    /// The draw's seed: the same request over the same rows gives the same windows.
    pub seed: u64,
    /// Draw from the held-out episodes (never served for training) instead.
    pub held_out: bool,
}

/// Element type of a [`TensorView`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DType {
    U8,
    U32,
    F32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::U32 | DType::F32 => 4,
        }
    }
}

/// A tensor inside a [`ReplayBatch`]'s blob: little-endian, row-major, at `offset`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorView {
    pub name: String,
    pub dtype: DType,
    #[serde(deserialize_with = "bounded_seq")]
    pub shape: Vec<u32>,
    pub offset: u64,
}

impl TensorView {
    pub fn bytes(&self) -> usize {
        self.shape.iter().map(|d| *d as usize).product::<usize>() * self.dtype.size()
    }
}

/// The reply to a [`ReplayRequest`]: `windows` training windows, every tensor in one blob
/// (`image` u8 (B, T, 3, H, W), `state` f32 (B, T, S), `surface` f32 (B, T, R, C), `task` u32
/// (B), `action` f32 (B, horizon, A), `action_mask` f32 (B, horizon), `obs_pad` u8 (B, T),
/// `weight` f32 (B)); states and actions as logged, not normalized. No windows, and `wait`
/// says why, when the rate limiter holds the trainer back or there are no rows yet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplayBatch {
    pub windows: u32,
    pub wait: String,
    #[serde(deserialize_with = "bounded_seq")]
    pub tensors: Vec<TensorView>,
    /// Rows replay holds for training (held-out rows not counted).
    pub rows: u64,
    /// Mean age of the sampled rows at the reply (now − when they were recorded), seconds.
    pub mean_age_s: f32,
    /// When the newest sampled row was recorded, ns since the Unix epoch.
    pub newest_stamp_ns: u64,
    /// Share of the windows that start on an expert-driven row.
    pub intervention_share: f32,
    pub data: Blob,
}

impl ReplayBatch {
    /// Every tensor with its bytes, checked against the blob (gathered once: a blob that came
    /// over the network in fragments is made contiguous here, not once per tensor).
    pub fn tensors(&self) -> Vec<(&TensorView, Option<Bytes>)> {
        let data = self.data.to_bytes();
        self.tensors
            .iter()
            .map(|t| {
                let start = t.offset as usize;
                let bytes = start
                    .checked_add(t.bytes())
                    .filter(|end| *end <= data.len())
                    .map(|end| data.slice(start..end));
                (t, bytes)
            })
            .collect()
    }

    /// The bytes of tensor `name`, checked against the blob.
    pub fn tensor(&self, name: &str) -> Option<(&TensorView, Bytes)> {
        let (t, bytes) = self.tensors().into_iter().find(|(t, _)| t.name == name)?;
        Some((t, bytes?))
    }
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
    /// Lower-case hex sha256 of `adapter`.
    pub sha256: String,
    #[serde(deserialize_with = "bounded_seq")]
    pub metrics: Vec<Metric>,
    /// The adapter's safetensors bytes.
    pub adapter: Blob,
}

/// A promoted adapter: what a robot needs to fetch, check and load it. The promoter signs
/// [`AdapterManifest::signed_text`] with the fleet's ed25519 key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterManifest {
    pub adapter_id: String,
    /// The base checkpoint version the adapter was trained on.
    pub base_version: String,
    /// Lower-case hex sha256 of the adapter's safetensors bytes.
    pub sha256: String,
    pub bytes: u64,
    /// The gates' figures (held-out loss, shadow success per condition, ...).
    #[serde(deserialize_with = "bounded_seq")]
    pub metrics: Vec<Metric>,
    /// Lower-case hex ed25519 signature of `signed_text()`.
    pub signature: String,
}

impl AdapterManifest {
    /// What the signature covers: the id, the base, the bytes' hash and length.
    pub fn signed_text(&self) -> String {
        format!(
            "nanobot-adapter/1\n{}\n{}\n{}\n{}",
            self.adapter_id, self.base_version, self.sha256, self.bytes
        )
    }
}

/// The fleet's rollout: `{fleet}/ckpt/promoted` (promoter → policy actors), published on every
/// change and again every second (so a robot that starts late learns it). Robots named in
/// `canary_robots` run `canary`, every other robot runs `fleet`; `None` is the base alone.
/// The whole rollout is signed with the fleet key (`signature`, over [`Promoted::signed_text`]),
/// so that nobody but the promoter can send robots back to the base, re-send a revoked
/// adapter, or jump the generation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Promoted {
    /// Grows with every change of the rollout.
    pub generation: u64,
    pub fleet: Option<AdapterManifest>,
    pub canary: Option<AdapterManifest>,
    #[serde(deserialize_with = "bounded_seq")]
    pub canary_robots: Vec<String>,
    /// Adapter ids rolled back: a robot refuses a rollout that asks it to run one of them.
    #[serde(deserialize_with = "bounded_seq")]
    pub revoked: Vec<String>,
    /// Wall-clock ms after which a robot refuses this rollout (the promoter re-announces it,
    /// with a new expiry, every second): an old signed rollout cannot be replayed later.
    pub expires_ms: u64,
    /// Lower-case hex ed25519 signature of `signed_text()`.
    pub signature: String,
}

impl Promoted {
    /// A rollout not yet signed (no revocations, no expiry).
    pub fn unsigned(
        generation: u64,
        fleet: Option<AdapterManifest>,
        canary: Option<AdapterManifest>,
        canary_robots: Vec<String>,
    ) -> Promoted {
        Promoted {
            generation,
            fleet,
            canary,
            canary_robots,
            revoked: Vec::new(),
            expires_ms: 0,
            signature: String::new(),
        }
    }

    /// What the signature covers: every field but the signature (each manifest by its own
    /// signed text and signature, names one a line, counted).
    pub fn signed_text(&self) -> String {
        let manifest = |m: &Option<AdapterManifest>| match m {
            Some(m) => format!("{}\n{}", m.signed_text(), m.signature),
            None => "-".into(),
        };
        let list = |v: &[String]| format!("{}\n{}", v.len(), v.join("\n"));
        format!(
            "nanobot-rollout/1\n{}\nfleet\n{}\ncanary\n{}\ncanary_robots {}\nrevoked {}\nexpires {}",
            self.generation,
            manifest(&self.fleet),
            manifest(&self.canary),
            list(&self.canary_robots),
            list(&self.revoked),
            self.expires_ms
        )
    }

    /// The adapter `robot` should run (`None`: the base alone).
    pub fn for_robot(&self, robot: &str) -> Option<&AdapterManifest> {
        if self.canary.is_some() && self.canary_robots.iter().any(|r| r == robot) {
            self.canary.as_ref()
        } else {
            self.fleet.as_ref()
        }
    }
}

/// A request for a promoted adapter's bytes: the query on `{fleet}/ckpt/adapter`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterRequest {
    pub sha256: String,
}

/// A promoted adapter's safetensors bytes (the reply to [`AdapterRequest`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterBytes {
    pub adapter_id: String,
    pub sha256: String,
    pub data: Blob,
}

/// What a robot's policy runs: `{fleet}/{robot}/policy` (policy actor → promoter, engineers),
/// published when it swaps adapters or refuses one, and every few seconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub base_version: String,
    /// The adapter acting now (empty: the base alone).
    pub adapter_id: String,
    /// The rollout generation this answers.
    pub generation: u64,
    /// Adapters refused so far (bad signature, hash, bytes, base, shapes, NaN).
    pub refused: u64,
    /// Why the last one was refused (empty if none was).
    pub last_error: String,
}

/// An engineer's command to the promoter: the query on `{fleet}/ckpt/control/{op}`. `op` is `list`,
/// `show` (`id`), `promote` (`id`: skip the canary) or `rollback`. The last two change what the
/// fleet runs: they count only signed by an operator the promoter trusts (`signature` over
/// [`CkptCommand::signed_text`], made within a minute of `issued_ms`, never twice).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CkptCommand {
    pub op: String,
    pub id: String,
    /// The operator's name (empty for a command that changes nothing).
    pub operator: String,
    /// Wall-clock ms when the operator signed it.
    pub issued_ms: u64,
    /// Lower-case hex ed25519 signature of `signed_text(fleet)` by the operator's key.
    pub signature: String,
}

impl CkptCommand {
    /// A command that changes nothing (`list`, `show`): no operator, no signature.
    pub fn read(op: &str, id: &str) -> CkptCommand {
        CkptCommand {
            op: op.into(),
            id: id.into(),
            operator: String::new(),
            issued_ms: 0,
            signature: String::new(),
        }
    }

    /// Whether it changes what the fleet runs (and so must be signed).
    pub fn changes_state(&self) -> bool {
        crate::topics::CKPT_CHANGES.contains(&self.op.as_str())
    }

    /// What the operator's signature covers: the fleet, the command, who and when.
    pub fn signed_text(&self, fleet: &str) -> String {
        format!(
            "nanobot-ckpt/1\n{fleet}\n{}\n{}\n{}\n{}",
            self.op, self.id, self.operator, self.issued_ms
        )
    }
}

/// The promoter's answer to a [`CkptCommand`]: JSON for the CLI to print.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CkptReply {
    pub ok: bool,
    pub json: String,
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
    #[serde(deserialize_with = "bounded_seq")]
    pub extra: Vec<Metric>,
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

/// The logger's acknowledgement: `{fleet}/log/{robot}/ack`. Every observation up to `last_seq`
/// that reached the logger is durable (it survives `kill -9`). Published when rows become
/// durable and, as the logger's heartbeat, every half second: a robot's spool trims what
/// `last` and `last_event` name and sends again what follows them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogAck {
    pub last_seq: u64,
    /// Durable rows in the robot's dataset.
    pub rows: u64,
    /// The last durable row (none while the dataset is empty).
    #[serde(default)]
    pub last: Option<StreamMark>,
    /// The last durable event in the dataset's `meta/events.jsonl`.
    #[serde(default)]
    pub last_event: Option<StreamMark>,
}

/// One message of a robot's stream, named by its envelope's sequence number (the robot's tick)
/// and stamp: a tick number alone repeats when a robot restarts, the pair does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StreamMark {
    pub seq: u64,
    pub stamp_ns: u64,
}

/// Which of a robot's streams a spooled message belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SpoolStream {
    /// Observations (`{fleet}/{robot}/obs`): the dataset's rows.
    Observations,
    /// Events (`{fleet}/{robot}/event`): the dataset's `meta/events.jsonl`.
    Events,
}

/// A message a robot's spool kept on the robot's node and sends on to the logger:
/// `{fleet}/log/{robot}/spool`, in the order it was produced. `prev` names the message before
/// it in its stream, so the logger takes each one exactly once and in order (after a logger
/// restart or a partition, the spool sends again from the last acknowledged one); none when
/// nothing before it can still come (the spool's first message, or the first after messages
/// were dropped over the spool's disk budget).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spooled {
    pub stream: SpoolStream,
    pub prev: Option<StreamMark>,
    /// The message as it was published: a whole envelope (an Observation or an Event).
    pub message: Blob,
}
