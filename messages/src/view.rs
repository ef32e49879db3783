//! Borrowed views of received messages: no `String`, no `Vec`, no reference count per message.
//! A view reads the same bytes as the owned type (the wire format does not change); strings
//! and blob bytes borrow the payload and short number lists are held inline. For handlers that
//! read a message and do not keep it: counters, forwarders, ingest. A handler that keeps the
//! message decodes the owned type instead.

use std::fmt;
use std::ops::Range;

use crate::codec::{self, CodecError};
use crate::types::{Blob, Encoding, Kind, Message, RawFrame};

/// The envelope header, borrowing the robot id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderRef<'a> {
    pub kind: Kind,
    pub robot: &'a str,
    pub seq: u64,
    pub stamp_ns: u64,
}

impl HeaderRef<'_> {
    /// The owned header (copies the robot id).
    pub fn to_header(&self) -> crate::codec::Header {
        crate::codec::Header {
            version: crate::codec::SCHEMA_VERSION,
            kind: self.kind,
            robot: self.robot.to_string(),
            seq: self.seq,
            stamp_ns: self.stamp_ns,
        }
    }
}

impl crate::codec::Header {
    /// The header, borrowing the robot id.
    pub fn as_ref(&self) -> HeaderRef<'_> {
        HeaderRef {
            kind: self.kind,
            robot: &self.robot,
            seq: self.seq,
            stamp_ns: self.stamp_ns,
        }
    }
}

/// At most [`Dims::MAX`] u32 values held inline: a frame's shape. On the wire it is a
/// `Vec<u32>` (a u64 count, then the values).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub(crate) len: u8,
    /// Zero past `len` (equality compares the whole array).
    pub(crate) values: [u32; Dims::MAX],
}

impl Dims {
    pub const MAX: usize = 8;

    /// `None` when there are more than [`Dims::MAX`] values.
    pub fn new(values: &[u32]) -> Option<Dims> {
        if values.len() > Self::MAX {
            return None;
        }
        let mut d = Dims {
            len: values.len() as u8,
            values: [0; Self::MAX],
        };
        d.values[..values.len()].copy_from_slice(values);
        Some(d)
    }

    pub fn as_slice(&self) -> &[u32] {
        &self.values[..self.len as usize]
    }
}

impl fmt::Debug for Dims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_slice().fmt(f)
    }
}

/// A borrowed view of a message type.
pub trait MessageView<'a>: Sized {
    /// The owned type whose bytes this view reads.
    type Owned: Message;
    /// The view of a body (`body`) whose blob bytes follow it (`tail`); returns how many bytes
    /// of `tail` the blobs took.
    fn decode(body: &'a [u8], tail: &'a [u8]) -> Result<(Self, usize), CodecError>;
}

/// A message type that has a borrowed view.
pub trait Viewable: Message {
    type View<'a>: MessageView<'a, Owned = Self>;
    /// Run `f` with a view of this message.
    fn with_view<R>(&self, f: impl FnOnce(Self::View<'_>) -> R) -> R;
}

/// The bytes of a blob, borrowed: one slice of a contiguous payload, or the pieces of a blob
/// that Zenoh reassembled from fragments (never gathered unless asked).
#[derive(Clone, Copy, Debug)]
pub enum BlobRef<'a> {
    Slice(&'a [u8]),
    Pieces(&'a Blob),
}

impl<'a> BlobRef<'a> {
    pub fn len(&self) -> usize {
        match self {
            BlobRef::Slice(s) => s.len(),
            BlobRef::Pieces(b) => b.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The bytes, when they lie in one piece.
    pub fn as_slice(&self) -> Option<&'a [u8]> {
        match *self {
            BlobRef::Slice(s) => Some(s),
            BlobRef::Pieces(b) => match b.pieces() {
                [one] => Some(one),
                [] => Some(&[]),
                _ => None,
            },
        }
    }
    /// The bytes in one buffer (copied only when they lie in several pieces).
    pub fn contiguous(&self) -> std::borrow::Cow<'a, [u8]> {
        match self.as_slice() {
            Some(s) => std::borrow::Cow::Borrowed(s),
            None => std::borrow::Cow::Owned(self.to_vec()),
        }
    }
    pub fn to_vec(&self) -> Vec<u8> {
        match self {
            BlobRef::Slice(s) => s.to_vec(),
            BlobRef::Pieces(b) => b.pieces().iter().flat_map(|p| p.iter().copied()).collect(),
        }
    }
}

impl PartialEq for BlobRef<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.contiguous() == other.contiguous()
    }
}

/// A borrowed view of a [`RawFrame`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawFrameView<'a> {
    pub sensor: &'a str,
    pub encoding: Encoding,
    pub shape: Dims,
    pub data: BlobRef<'a>,
}

/// `len` bytes from the start of `tail`, or the truncation error.
fn take_blob(tail: &[u8], len: u64, body_end: usize) -> Result<&[u8], CodecError> {
    match usize::try_from(len).ok().filter(|&l| l <= tail.len()) {
        Some(l) => Ok(&tail[..l]),
        None => Err(CodecError::Truncated {
            what: "blob",
            need: body_end.saturating_add(len as usize),
            have: body_end + tail.len(),
        }),
    }
}

impl<'a> MessageView<'a> for RawFrameView<'a> {
    type Owned = RawFrame;
    fn decode(body: &'a [u8], tail: &'a [u8]) -> Result<(Self, usize), CodecError> {
        let b = crate::wire::read_raw_frame(body)?;
        let data = take_blob(tail, b.data_len, body.len())?;
        Ok((
            RawFrameView {
                sensor: b.sensor,
                encoding: b.encoding,
                shape: b.shape,
                data: BlobRef::Slice(data),
            },
            data.len(),
        ))
    }
}

impl Viewable for RawFrame {
    type View<'a> = RawFrameView<'a>;
    fn with_view<R>(&self, f: impl FnOnce(RawFrameView<'_>) -> R) -> R {
        let data = match self.data.pieces() {
            [one] => BlobRef::Slice(one),
            [] => BlobRef::Slice(&[]),
            _ => BlobRef::Pieces(&self.data),
        };
        // A shape longer than a view holds cannot come from the wire (a view refuses it there);
        // an owned frame that has one is shown with its first dimensions.
        let shape = Dims::new(&self.shape[..self.shape.len().min(Dims::MAX)]).unwrap_or(Dims {
            len: 0,
            values: [0; Dims::MAX],
        });
        f(RawFrameView {
            sensor: &self.sensor,
            encoding: self.encoding,
            shape,
            data,
        })
    }
}

impl RawFrameView<'_> {
    /// The owned frame (copies the blob).
    pub fn to_owned(&self) -> RawFrame {
        RawFrame {
            sensor: self.sensor.to_string(),
            encoding: self.encoding,
            shape: self.shape.as_slice().to_vec(),
            data: match self.data {
                BlobRef::Pieces(b) => b.clone(),
                BlobRef::Slice(s) => Blob::new(s.to_vec()),
            },
        }
    }
}

/// The header of a contiguous payload, borrowed, with the byte range of the body.
pub fn peek_header_ref(bytes: &[u8]) -> Result<(HeaderRef<'_>, Range<usize>), CodecError> {
    codec::peek_header_ref(bytes)
}

/// A view of the message of kind `V::Owned` in a contiguous payload, without allocating.
pub fn decode_view<'a, V: MessageView<'a>>(bytes: &'a [u8]) -> Result<(HeaderRef<'a>, V), CodecError> {
    let (header, body) = codec::peek_header_ref(bytes)?;
    let kind = <V::Owned as Message>::KIND;
    if header.kind != kind {
        return Err(CodecError::WrongKind {
            expected: kind,
            got: header.kind,
        });
    }
    let tail = &bytes[body.end..];
    let (view, used) = V::decode(&bytes[body], tail)?;
    if used != tail.len() {
        return Err(CodecError::TrailingBytes(tail.len() - used));
    }
    Ok((header, view))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};
    use bytes::Bytes;

    fn frame(shape: Vec<u32>, n: usize) -> RawFrame {
        RawFrame {
            sensor: "camera".into(),
            encoding: Encoding::Jpeg,
            shape,
            data: Blob::new((0..n).map(|i| i as u8).collect::<Vec<u8>>()),
        }
    }

    #[test]
    fn a_view_reads_what_the_owned_decoder_reads_and_borrows_the_payload() {
        for (shape, n) in [
            (vec![8, 8, 3], 100),
            (vec![], 0),
            (vec![6], 24),
            (vec![64, 64, 3], 5000),
        ] {
            let f = frame(shape, n);
            let wire = encode("r7", 3, 9, &f).unwrap().to_vec();
            let (h, v) = decode_view::<RawFrameView>(&wire).unwrap();
            let (oh, owned) = decode::<RawFrame>(Bytes::from(wire.clone())).unwrap();
            assert_eq!(
                (h.kind, h.robot, h.seq, h.stamp_ns),
                (oh.kind, oh.robot.as_str(), oh.seq, oh.stamp_ns)
            );
            assert_eq!(v.to_owned(), owned);
            assert_eq!(v.shape.as_slice(), &owned.shape[..]);
            let range = wire.as_ptr_range();
            let data = v.data.as_slice().unwrap();
            assert!(range.contains(&v.sensor.as_ptr()) && (n == 0 || range.contains(&data.as_ptr())));
            f.with_view(|own| assert_eq!(own, v));
        }
    }

    #[test]
    fn a_view_refuses_what_the_owned_decoder_refuses_and_too_many_dimensions() {
        let wire = encode("r0", 1, 2, &frame(vec![4], 16)).unwrap().to_vec();
        assert!(matches!(
            decode_view::<RawFrameView>(&wire[..wire.len() - 1]),
            Err(CodecError::Truncated { what: "blob", .. })
        ));
        let mut longer = wire.clone();
        longer.push(0);
        assert_eq!(decode_view::<RawFrameView>(&longer), Err(CodecError::TrailingBytes(1)));
        let event = crate::Event {
            episode: 1,
            event: crate::EventKind::Reward { value: 1.0 },
        };
        let other = encode("r0", 1, 2, &event).unwrap().to_vec();
        assert!(matches!(
            decode_view::<RawFrameView>(&other),
            Err(CodecError::WrongKind { .. })
        ));
        let deep = encode("r0", 1, 2, &frame(vec![1; 9], 1)).unwrap().to_vec();
        assert!(decode::<RawFrame>(Bytes::from(deep.clone())).is_ok());
        assert!(matches!(
            decode_view::<RawFrameView>(&deep),
            Err(CodecError::Body { .. })
        ));
        // A blob in pieces is viewed in pieces, not gathered.
        let pieces = RawFrame {
            data: Blob::from_pieces(vec![Bytes::from_static(b"abc"), Bytes::from_static(b"de")]),
            ..frame(vec![5], 0)
        };
        pieces.with_view(|v| {
            assert!(matches!(v.data, BlobRef::Pieces(_)));
            assert_eq!(
                (v.data.len(), v.data.as_slice(), &v.data.contiguous()[..]),
                (5, None, &b"abcde"[..])
            );
            assert_eq!(v.to_owned(), pieces);
        });
        // Garbage never panics.
        for cut in 0..wire.len() {
            let _ = decode_view::<RawFrameView>(&wire[..cut]);
        }
    }
}
