//! The envelope codec: a fixed little-endian header, a bincode 2 body, then blob bytes.
//! The layout is documented at the crate root and in the README.

use bincode::config::{Configuration, Fixint, LittleEndian};
use bytes::Bytes;
use thiserror::Error;

use crate::types::*;

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u8 = 1;
pub const MAGIC: [u8; 2] = *b"NB";
/// Blobs that add up to at most this many bytes are copied behind the body at encoding: one
/// buffer is cheaper than several slices for small payloads. Larger ones stay shared.
pub const INLINE_BLOB_BYTES: usize = 2048;
/// Bytes of the header before the robot id.
pub const FIXED_HEADER_LEN: usize = 26;

pub(crate) fn config() -> Configuration<LittleEndian, Fixint> {
    bincode::config::standard()
        .with_fixed_int_encoding()
        .with_little_endian()
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CodecError {
    #[error("not a NanoBot envelope: magic is {0:02x?}, expected \"NB\"")]
    BadMagic([u8; 2]),
    #[error("unknown schema version {0} (this build reads version {SCHEMA_VERSION})")]
    UnknownVersion(u8),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("wrong message kind: expected {expected}, got {got}")]
    WrongKind { expected: Kind, got: Kind },
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    #[error("robot id is not UTF-8")]
    BadRobotId,
    #[error("robot id is {0} bytes, at most 65535")]
    RobotIdTooLong(usize),
    #[error("{kind} body does not decode: {reason}")]
    Body { kind: Kind, reason: String },
    #[error("{kind} body does not encode: {reason}")]
    Encode { kind: Kind, reason: String },
}

/// The envelope header of every message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    pub kind: Kind,
    pub robot: String,
    pub seq: u64,
    pub stamp_ns: u64,
}

/// An encoded message: header and body (and small blobs) in one buffer, large blob bytes
/// untouched beside it.
#[derive(Clone, Debug)]
pub struct Encoded {
    pub head: Vec<u8>,
    pub blobs: Vec<Bytes>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.head.len() + self.blobs.iter().map(Bytes::len).sum::<usize>()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The whole message in one contiguous buffer (copies the blobs).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        v.extend_from_slice(&self.head);
        for b in &self.blobs {
            v.extend_from_slice(b);
        }
        v
    }
}

/// Encode `msg` with its envelope header.
pub fn encode<T: Message>(robot: &str, seq: u64, stamp_ns: u64, msg: &T) -> Result<Encoded, CodecError> {
    let robot_len = u16::try_from(robot.len()).map_err(|_| CodecError::RobotIdTooLong(robot.len()))?;
    if let Some(frame) = (msg as &dyn std::any::Any).downcast_ref::<RawFrame>() {
        return encode_raw_frame(robot_len, robot, seq, stamp_ns, frame);
    }
    encode_serde(robot_len, robot, seq, stamp_ns, msg)
}

/// Every other message: the body through serde, its blobs visited.
pub(crate) fn encode_serde<T: Message>(
    robot_len: u16,
    robot: &str,
    seq: u64,
    stamp_ns: u64,
    msg: &T,
) -> Result<Encoded, CodecError> {
    let mut blob_bytes = 0;
    msg.visit_blobs(&mut |b| blob_bytes += b.len());
    let inline = blob_bytes <= INLINE_BLOB_BYTES;
    let mut head = Vec::with_capacity(FIXED_HEADER_LEN + robot.len() + 64 + if inline { blob_bytes } else { 0 });
    write_header(&mut head, T::KIND, seq, stamp_ns, robot_len, robot);
    let body_start = head.len();
    bincode::serde::encode_into_std_write(msg, &mut head, config()).map_err(|e| CodecError::Encode {
        kind: T::KIND,
        reason: e.to_string(),
    })?;
    patch_body_len(&mut head, body_start, T::KIND)?;
    let mut blobs = Vec::new();
    msg.visit_blobs(&mut |b| place_blob(b, inline, &mut head, &mut blobs));
    Ok(Encoded { head, blobs })
}

/// The bus's most frequent message in one pass: the buffer sized exactly, the body written by
/// hand ([`crate::wire`]), a small blob copied in after it.
fn encode_raw_frame(
    robot_len: u16,
    robot: &str,
    seq: u64,
    stamp_ns: u64,
    frame: &RawFrame,
) -> Result<Encoded, CodecError> {
    let data = frame.data.len();
    let inline = data <= INLINE_BLOB_BYTES;
    let body_len = crate::wire::raw_frame_body_len(frame);
    let mut head = Vec::with_capacity(FIXED_HEADER_LEN + robot.len() + body_len + if inline { data } else { 0 });
    write_header(&mut head, Kind::RawFrame, seq, stamp_ns, robot_len, robot);
    let body_start = head.len();
    crate::wire::write_raw_frame(frame, &mut head);
    patch_body_len(&mut head, body_start, Kind::RawFrame)?;
    let mut blobs = Vec::new();
    place_blob(&frame.data, inline, &mut head, &mut blobs);
    Ok(Encoded { head, blobs })
}

/// A blob's bytes after the body: copied into `head` when the message's blobs are small
/// (`inline`), else its pieces shared as they are.
fn place_blob(b: &Blob, inline: bool, head: &mut Vec<u8>, blobs: &mut Vec<Bytes>) {
    if inline {
        b.pieces().iter().for_each(|p| head.extend_from_slice(p));
    } else {
        blobs.extend(b.pieces().iter().cloned());
    }
}

/// The envelope's fixed header and robot id, the body length left 0 to be patched.
fn write_header(head: &mut Vec<u8>, kind: Kind, seq: u64, stamp_ns: u64, robot_len: u16, robot: &str) {
    head.extend_from_slice(&MAGIC);
    head.push(SCHEMA_VERSION);
    head.push(kind as u8);
    head.extend_from_slice(&0u32.to_le_bytes()); // body length, patched by the caller
    head.extend_from_slice(&seq.to_le_bytes());
    head.extend_from_slice(&stamp_ns.to_le_bytes());
    head.extend_from_slice(&robot_len.to_le_bytes());
    head.extend_from_slice(robot.as_bytes());
}

/// Write the length of the body that starts at `body_start` into the header.
fn patch_body_len(head: &mut [u8], body_start: usize, kind: Kind) -> Result<(), CodecError> {
    let body_len = u32::try_from(head.len() - body_start).map_err(|_| CodecError::Encode {
        kind,
        reason: "body over 4 GiB".into(),
    })?;
    head[4..8].copy_from_slice(&body_len.to_le_bytes());
    Ok(())
}

/// Read the header; returns it with the byte range of the body.
pub fn peek_header(bytes: &[u8]) -> Result<(Header, std::ops::Range<usize>), CodecError> {
    let (h, body) = peek_header_ref(bytes)?;
    Ok((h.to_header(), body))
}

/// Read the header, borrowing the robot id; returns it with the byte range of the body.
pub fn peek_header_ref(bytes: &[u8]) -> Result<(crate::view::HeaderRef<'_>, std::ops::Range<usize>), CodecError> {
    let need = |n: usize, what: &'static str| {
        if bytes.len() < n {
            Err(CodecError::Truncated {
                what,
                need: n,
                have: bytes.len(),
            })
        } else {
            Ok(())
        }
    };
    need(4, "header")?;
    if bytes[0..2] != MAGIC {
        return Err(CodecError::BadMagic([bytes[0], bytes[1]]));
    }
    if bytes[2] != SCHEMA_VERSION {
        return Err(CodecError::UnknownVersion(bytes[2]));
    }
    let kind = Kind::from_u8(bytes[3]).ok_or(CodecError::UnknownKind(bytes[3]))?;
    need(FIXED_HEADER_LEN, "header")?;
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
    let body_len = u32_at(4) as usize;
    let seq = u64_at(8);
    let stamp_ns = u64_at(16);
    let robot_len = u16::from_le_bytes([bytes[24], bytes[25]]) as usize;
    let body_start = FIXED_HEADER_LEN + robot_len;
    need(body_start, "robot id")?;
    let robot = crate::wire::utf8(&bytes[FIXED_HEADER_LEN..body_start]).map_err(|_| CodecError::BadRobotId)?;
    need(body_start + body_len, "body")?;
    let header = crate::view::HeaderRef {
        kind,
        robot,
        seq,
        stamp_ns,
    };
    Ok((header, body_start..body_start + body_len))
}

/// A payload in one or more pieces, as Zenoh delivers fragmented or composed payloads.
/// A blob that lies within one piece shares its memory; one that spans pieces is gathered.
struct PieceReader<'a> {
    parts: &'a [Bytes],
    total: usize,
}

impl PieceReader<'_> {
    /// The bytes of `r` as sub-slices of the pieces it spans (no copy).
    fn range(&self, r: std::ops::Range<usize>) -> Vec<Bytes> {
        let mut out = Vec::with_capacity(1);
        let mut start = 0;
        for p in self.parts {
            let end = start + p.len();
            let (a, b) = (r.start.max(start), r.end.min(end));
            if a < b {
                out.push(p.slice(a - start..b - start));
            }
            start = end;
        }
        out
    }

    /// The bytes of `r` as a blob: one shared slice when a single piece holds them.
    fn blob(&self, r: std::ops::Range<usize>) -> Blob {
        if let [one] = self.parts {
            return Blob::new(one.slice(r));
        }
        Blob::from_pieces(self.range(r))
    }

    /// The bytes of `r` in one buffer (copied only when they span pieces).
    fn contiguous(&self, r: std::ops::Range<usize>) -> Bytes {
        let mut pieces = self.range(r);
        if pieces.len() <= 1 {
            return pieces.pop().unwrap_or_default();
        }
        let mut out = Vec::with_capacity(pieces.iter().map(Bytes::len).sum());
        pieces.iter().for_each(|p| out.extend_from_slice(p));
        Bytes::from(out)
    }
}

/// Decode a message of kind `T`. Blob fields share `bytes`' memory (no copy).
pub fn decode<T: Message>(bytes: Bytes) -> Result<(Header, T), CodecError> {
    decode_pieces(std::slice::from_ref(&bytes))
}

/// Decode a message of kind `T` from a payload in pieces (see [`decode`]).
pub fn decode_pieces<T: Message>(parts: &[Bytes]) -> Result<(Header, T), CodecError> {
    with_head(parts, |head, header, body, pieces| {
        if header.kind != T::KIND {
            return Err(CodecError::WrongKind {
                expected: T::KIND,
                got: header.kind,
            });
        }
        let msg = decode_body::<T>(head, body, pieces)?;
        Ok((header, msg))
    })
}

/// Run `f` with the contiguous bytes that hold the header and body (the first piece when it
/// holds them, else the pieces gathered), the header, the body range and the pieces.
fn with_head<R>(
    parts: &[Bytes],
    f: impl FnOnce(&[u8], Header, std::ops::Range<usize>, &PieceReader) -> Result<R, CodecError>,
) -> Result<R, CodecError> {
    let total = parts.iter().map(Bytes::len).sum();
    let empty = Bytes::new();
    let first = parts.first().unwrap_or(&empty);
    match peek_header(first) {
        Ok((header, body)) => f(first, header, body, &PieceReader { parts, total }),
        Err(CodecError::Truncated { .. }) if parts.len() > 1 => {
            let all = PieceReader { parts, total }.contiguous(0..total);
            let (header, body) = peek_header(&all)?;
            let one = [all.clone()];
            f(&all, header, body, &PieceReader { parts: &one, total })
        }
        Err(e) => Err(e),
    }
}

/// bincode with a byte limit near the body's size, so that a garbled length prefix cannot
/// make the decoder allocate more than a small multiple of the bytes actually received.
fn decode_bounded<T: Message>(body: &[u8]) -> Result<(T, usize), bincode::error::DecodeError> {
    macro_rules! with_limit {
        ($($n:literal),*) => {
            $(if body.len() <= $n {
                return bincode::serde::decode_from_slice(body, config().with_limit::<$n>());
            })*
        };
    }
    with_limit!(4096, 65536, 1048576, 16777216, 268435456);
    bincode::serde::decode_from_slice(body, config())
}

/// A bincode error on a body of `len` bytes, as the codec names it.
pub(crate) fn body_error(kind: Kind, e: bincode::error::DecodeError, len: usize) -> CodecError {
    match e {
        bincode::error::DecodeError::UnexpectedEnd { additional } => CodecError::Truncated {
            what: "body",
            need: len + additional,
            have: len,
        },
        other => CodecError::Body {
            kind,
            reason: other.to_string(),
        },
    }
}

fn decode_body<T: Message>(head: &[u8], body: std::ops::Range<usize>, pieces: &PieceReader) -> Result<T, CodecError> {
    let (mut msg, used): (T, usize) =
        decode_bounded::<T>(&head[body.clone()]).map_err(|e| body_error(T::KIND, e, body.len()))?;
    if used != body.len() {
        return Err(CodecError::Body {
            kind: T::KIND,
            reason: format!("{} unread bytes inside the body", body.len() - used),
        });
    }
    let mut at = body.end;
    let mut short = None;
    msg.visit_blobs_mut(&mut |blob| {
        if short.is_some() {
            return;
        }
        let len = blob.pending_len().unwrap_or(0);
        match usize::try_from(len)
            .ok()
            .and_then(|l| at.checked_add(l))
            .filter(|&e| e <= pieces.total)
        {
            Some(end) => {
                blob.attach(pieces.blob(at..end));
                at = end;
            }
            None => short = Some(at.saturating_add(len as usize)),
        }
    });
    if let Some(need) = short {
        return Err(CodecError::Truncated {
            what: "blob",
            need,
            have: pieces.total,
        });
    }
    if at != pieces.total {
        return Err(CodecError::TrailingBytes(pieces.total - at));
    }
    Ok(msg)
}

/// Decode whatever message `bytes` holds.
pub fn decode_any(bytes: Bytes) -> Result<(Header, AnyMessage), CodecError> {
    decode_any_pieces(std::slice::from_ref(&bytes))
}

/// Decode whatever message a payload in pieces holds.
pub fn decode_any_pieces(parts: &[Bytes]) -> Result<(Header, AnyMessage), CodecError> {
    struct DecodeAs<'a> {
        head: &'a [u8],
        body: std::ops::Range<usize>,
        pieces: &'a PieceReader<'a>,
    }
    impl KindVisitor for DecodeAs<'_> {
        type Out = Result<AnyMessage, CodecError>;
        fn visit<T: Message>(self) -> Self::Out {
            decode_body::<T>(self.head, self.body, self.pieces).map(Into::into)
        }
    }
    with_head(parts, |head, header, body, pieces| {
        let msg = header.kind.visit(DecodeAs { head, body, pieces })?;
        Ok((header, msg))
    })
}

/// Encode any message (the CLI's `topic pub`).
pub fn encode_any(robot: &str, seq: u64, stamp_ns: u64, msg: &AnyMessage) -> Result<Encoded, CodecError> {
    struct EncodeWith<'a> {
        robot: &'a str,
        seq: u64,
        stamp_ns: u64,
    }
    impl MessageVisitor for EncodeWith<'_> {
        type Out = Result<Encoded, CodecError>;
        fn visit<T: Message>(self, m: &T) -> Self::Out {
            encode(self.robot, self.seq, self.stamp_ns, m)
        }
    }
    msg.visit(EncodeWith { robot, seq, stamp_ns })
}

/// Nanoseconds since the Unix epoch, now: what an envelope is stamped with.
pub use crate::clock::now_ns;

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk() -> ActionChunk {
        ActionChunk {
            obs_seq: 7,
            dt_ns: 50_000_000,
            horizon: 2,
            action_dim: 2,
            actions: vec![0.5, -0.5, 1.0, 0.0],
            source: ActionSource::Expert,
            policy_version: "expert".into(),
            adapter_version: String::new(),
        }
    }

    #[test]
    fn header_layout_is_the_documented_one() {
        let e = encode("r0", 0x0102, 0x0304, &chunk()).unwrap();
        let h = &e.head;
        assert_eq!(&h[0..2], b"NB");
        assert_eq!(h[2], 1);
        assert_eq!(h[3], Kind::ActionChunk as u8);
        assert_eq!(u64::from_le_bytes(h[8..16].try_into().unwrap()), 0x0102);
        assert_eq!(u64::from_le_bytes(h[16..24].try_into().unwrap()), 0x0304);
        assert_eq!(u16::from_le_bytes([h[24], h[25]]), 2);
        assert_eq!(&h[26..28], b"r0");
        let body_len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
        assert_eq!(h.len(), 28 + body_len);
        // Fixed-width body: obs_seq is the first u64 after the robot id.
        assert_eq!(u64::from_le_bytes(h[28..36].try_into().unwrap()), 7);
    }

    #[test]
    fn blobs_follow_the_body_and_are_not_copied_on_decode() {
        let frame = RawFrame {
            sensor: "cam".into(),
            encoding: Encoding::Jpeg,
            shape: vec![64, 64, 3],
            data: Blob::new(vec![9u8; 1000]),
        };
        let big = RawFrame {
            data: Blob::new(vec![9u8; 5000]),
            ..frame.clone()
        };
        assert_eq!(
            encode("r1", 1, 2, &big).unwrap().blobs.len(),
            1,
            "a large blob stays shared"
        );
        let e = encode("r1", 1, 2, &frame).unwrap();
        assert_eq!(e.blobs.len(), 0, "a small blob is inlined");
        let wire = Bytes::from(e.to_vec());
        let (h, back): (Header, RawFrame) = decode(wire.clone()).unwrap();
        assert_eq!(h.robot, "r1");
        assert_eq!(back, frame);
        let start = wire.len() - 1000;
        assert_eq!(back.data.pieces()[0].as_ptr(), wire[start..].as_ptr());
    }

    #[test]
    fn wrong_kind_unknown_kind_and_version_are_named() {
        let wire = Bytes::from(encode("r0", 1, 2, &chunk()).unwrap().to_vec());
        assert_eq!(
            decode::<Event>(wire.clone()).unwrap_err(),
            CodecError::WrongKind {
                expected: Kind::Event,
                got: Kind::ActionChunk
            }
        );
        let mut v = wire.to_vec();
        v[2] = 9;
        assert_eq!(
            decode_any(Bytes::from(v.clone())).unwrap_err(),
            CodecError::UnknownVersion(9)
        );
        v[2] = 1;
        v[3] = 200;
        assert_eq!(decode_any(Bytes::from(v)).unwrap_err(), CodecError::UnknownKind(200));
        assert!(matches!(
            decode_any(Bytes::from_static(b"xx12")),
            Err(CodecError::BadMagic(_))
        ));
    }
}
