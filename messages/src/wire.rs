//! Hand-written body codecs for the bus's most frequent small message, [`RawFrame`]: the same
//! bytes bincode's serde path writes and reads (fixed-width little-endian integers, a `u64`
//! before every string and sequence, a `u32` enum variant index; tests hold both paths equal
//! on every frame and on garbage), without serde's visitor calls. For a 64 B frame the whole
//! view decode (header included) went from 93–101 ns to 62–88 ns over four runs of
//! `nanobot bench bus` each; the whole encode did not gain (46–47 ns before, 43–73 after), most
//! of it being the allocation. Then the envelope written in one pass into a buffer sized exactly
//! (`codec::encode`), and short strings checked as ASCII inline ([`utf8`]): encode 35–42 ns and
//! view decode 48–56 ns over three runs. The bus adds these to Zenoh's own ~800 ns of CPU per
//! message between two processes.

use crate::codec::CodecError;
use crate::types::{Encoding, Kind, RawFrame};
use crate::view::Dims;

impl Encoding {
    /// The variant index bincode writes (declaration order).
    pub(crate) fn index(self) -> u32 {
        match self {
            Encoding::Jpeg => 0,
            Encoding::Rgb8 => 1,
            Encoding::F32Le => 2,
            Encoding::Bytes => 3,
        }
    }

    pub(crate) fn from_index(i: u32) -> Option<Encoding> {
        Some(match i {
            0 => Encoding::Jpeg,
            1 => Encoding::Rgb8,
            2 => Encoding::F32Le,
            3 => Encoding::Bytes,
            _ => return None,
        })
    }
}

/// The bytes of `f`'s body ([`write_raw_frame`]).
pub(crate) fn raw_frame_body_len(f: &RawFrame) -> usize {
    8 + f.sensor.len() + 4 + 8 + 4 * f.shape.len() + 8
}

/// Append `f`'s body (its blob as the `u64` length that stands in its place).
pub(crate) fn write_raw_frame(f: &RawFrame, out: &mut Vec<u8>) {
    out.reserve(raw_frame_body_len(f));
    out.extend_from_slice(&(f.sensor.len() as u64).to_le_bytes());
    out.extend_from_slice(f.sensor.as_bytes());
    out.extend_from_slice(&f.encoding.index().to_le_bytes());
    out.extend_from_slice(&(f.shape.len() as u64).to_le_bytes());
    for d in &f.shape {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(&(f.data.len() as u64).to_le_bytes());
}

/// A [`RawFrame`] body, its strings borrowed.
pub(crate) struct RawFrameBody<'a> {
    pub sensor: &'a str,
    pub encoding: Encoding,
    pub shape: Dims,
    pub data_len: u64,
}

/// Read a whole [`RawFrame`] body; the errors are the serde path's (truncation names the bytes
/// the body lacks; anything else is a body error naming the field).
pub(crate) fn read_raw_frame(body: &[u8]) -> Result<RawFrameBody<'_>, CodecError> {
    let mut r = Reader { body, at: 0 };
    let sensor_len = r.u64()?;
    let sensor = utf8(r.take(sensor_len)?).map_err(|e| bad(format!("sensor is not UTF-8: {e}")))?;
    let encoding = r.u32()?;
    let encoding =
        Encoding::from_index(encoding).ok_or_else(|| bad(format!("encoding: unknown variant index {encoding}")))?;
    let dims = r.u64()?;
    let mut values = [0u32; Dims::MAX];
    let held = dims.min(Dims::MAX as u64) as usize;
    for v in &mut values[..held] {
        *v = r.u32()?;
    }
    if dims > Dims::MAX as u64 {
        // Like serde's path, which reads element by element: the first one too many is read
        // (a short body is truncated), then refused.
        r.u32()?;
        return Err(bad(format!("shape: more than {} dimensions", Dims::MAX)));
    }
    let shape = Dims {
        len: held as u8,
        values,
    };
    let data_len = r.u64()?;
    if r.at != body.len() {
        return Err(bad(format!("{} unread bytes inside the body", body.len() - r.at)));
    }
    Ok(RawFrameBody {
        sensor,
        encoding,
        shape,
        data_len,
    })
}

/// `bytes` as a string. Ids and sensor names are short ASCII: checked inline, without the
/// call into the general UTF-8 validator (~9 ns a string on the bus's receive thread).
#[inline]
pub(crate) fn utf8(bytes: &[u8]) -> Result<&str, std::str::Utf8Error> {
    if bytes.is_ascii() {
        // SAFETY: ASCII bytes are valid UTF-8.
        Ok(unsafe { std::str::from_utf8_unchecked(bytes) })
    } else {
        std::str::from_utf8(bytes)
    }
}

fn bad(reason: String) -> CodecError {
    CodecError::Body {
        kind: Kind::RawFrame,
        reason,
    }
}

struct Reader<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], CodecError> {
        let left = self.body.len() - self.at;
        match usize::try_from(n).ok().filter(|&n| n <= left) {
            Some(n) => {
                let s = &self.body[self.at..self.at + n];
                self.at += n;
                Ok(s)
            }
            None => Err(CodecError::Truncated {
                what: "body",
                need: self
                    .body
                    .len()
                    .saturating_add(usize::try_from(n).unwrap_or(usize::MAX) - left),
                have: self.body.len(),
            }),
        }
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{body_error, config};
    use crate::types::Blob;
    use proptest::prelude::*;
    use serde::Deserialize;

    /// The serde path the hand-written codec replaces: what a frame's body held before.
    #[derive(Deserialize)]
    struct SerdeBody<'a> {
        #[serde(borrow)]
        sensor: &'a str,
        encoding: Encoding,
        shape: SerdeDims,
        data: SerdeBlobLen,
    }

    /// A shape as the view's serde path read it: at most `Dims::MAX` values, the one too many
    /// read before it is refused.
    struct SerdeDims(Dims);

    impl<'de> Deserialize<'de> for SerdeDims {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visit;
            impl<'de> serde::de::Visitor<'de> for Visit {
                type Value = SerdeDims;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    write!(f, "at most {} dimensions", Dims::MAX)
                }
                fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<SerdeDims, A::Error> {
                    let mut values = Vec::new();
                    while let Some(v) = seq.next_element::<u32>()? {
                        if values.len() == Dims::MAX {
                            return Err(serde::de::Error::custom("more than 8 dimensions"));
                        }
                        values.push(v);
                    }
                    Ok(SerdeDims(Dims::new(&values).expect("at most Dims::MAX")))
                }
            }
            d.deserialize_seq(Visit)
        }
    }

    struct SerdeBlobLen(u64);

    impl<'de> Deserialize<'de> for SerdeBlobLen {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            crate::types::blob_len(d).map(SerdeBlobLen)
        }
    }

    fn serde_read(body: &[u8]) -> Result<(&str, Encoding, Dims, u64), CodecError> {
        let (b, used): (SerdeBody, usize) = bincode::serde::borrow_decode_from_slice(body, config())
            .map_err(|e| body_error(Kind::RawFrame, e, body.len()))?;
        if used != body.len() {
            return Err(bad(format!("{} unread bytes inside the body", body.len() - used)));
        }
        Ok((b.sensor, b.encoding, b.shape.0, b.data.0))
    }

    fn hand_read(body: &[u8]) -> Result<(&str, Encoding, Dims, u64), CodecError> {
        read_raw_frame(body).map(|b| (b.sensor, b.encoding, b.shape, b.data_len))
    }

    /// The same outcome: equal values, or the same error (truncation to the byte; a body error
    /// by kind, its wording aside).
    fn same(body: &[u8]) {
        match (hand_read(body), serde_read(body)) {
            (Ok(a), Ok(b)) => assert_eq!(a, b),
            (Err(CodecError::Body { kind: a, .. }), Err(CodecError::Body { kind: b, .. })) => assert_eq!(a, b),
            (a, b) => assert_eq!(a, b, "body {body:02x?}"),
        }
    }

    fn encoding() -> impl Strategy<Value = Encoding> {
        (0u32..4).prop_map(|i| Encoding::from_index(i).unwrap())
    }

    proptest! {
        #[test]
        fn frames_encode_to_serdes_bytes_and_read_back_alike(
            sensor in "\\PC{0,12}",
            encoding in encoding(),
            shape in proptest::collection::vec(any::<u32>(), 0..11),
            data in proptest::collection::vec(any::<u8>(), 0..40),
            cut in any::<prop::sample::Index>(),
            flip in any::<(prop::sample::Index, u8)>(),
        ) {
            let frame = RawFrame { sensor, encoding, shape, data: Blob::new(data) };
            let mut hand = Vec::new();
            write_raw_frame(&frame, &mut hand);
            let serde = bincode::serde::encode_to_vec(&frame, config()).unwrap();
            prop_assert_eq!(&hand, &serde);
            same(&hand);
            // Every cut, and a byte changed, read alike too.
            same(&hand[..cut.index(hand.len() + 1)]);
            let mut changed = hand.clone();
            let at = flip.0.index(changed.len());
            changed[at] ^= flip.1.max(1);
            same(&changed);
        }

        #[test]
        fn garbage_reads_alike(body in proptest::collection::vec(any::<u8>(), 0..80)) {
            same(&body);
        }
    }

    proptest! {
        /// The one-pass envelope of a frame is the generic (serde) path's, byte for byte: small
        /// blobs copied in, large ones left in their pieces.
        #[test]
        fn a_frames_envelope_is_the_generic_paths(
            robot in "[a-z0-9]{0,8}",
            sensor in "\\PC{0,12}",
            encoding in encoding(),
            shape in proptest::collection::vec(any::<u32>(), 0..11),
            sizes in proptest::collection::vec(prop_oneof![0usize..100, 1000usize..3000], 0..4),
            seq in any::<u64>(),
            stamp in any::<u64>(),
        ) {
            let pieces: Vec<bytes::Bytes> =
                sizes.iter().enumerate().map(|(i, &n)| vec![i as u8; n].into()).collect();
            let frame = RawFrame { sensor, encoding, shape, data: Blob::from_pieces(pieces) };
            let fast = crate::codec::encode(&robot, seq, stamp, &frame).unwrap();
            let generic = crate::codec::encode_serde(robot.len() as u16, &robot, seq, stamp, &frame).unwrap();
            prop_assert_eq!(&fast.head, &generic.head);
            prop_assert_eq!(&fast.blobs, &generic.blobs);
        }
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let frame = RawFrame {
            sensor: "cam".into(),
            encoding: Encoding::Jpeg,
            shape: vec![1; 9],
            data: Blob::new(vec![0; 4]),
        };
        let mut body = Vec::new();
        write_raw_frame(&frame, &mut body);
        let err = read_raw_frame(&body).err().unwrap().to_string();
        assert!(err.contains("more than 8 dimensions"), "{err}");
        let mut bad_encoding = Vec::new();
        write_raw_frame(
            &RawFrame {
                shape: vec![2],
                ..frame
            },
            &mut bad_encoding,
        );
        bad_encoding[8 + 3] = 9;
        let err = read_raw_frame(&bad_encoding).err().unwrap().to_string();
        assert!(err.contains("encoding: unknown variant index 9"), "{err}");
    }
}
