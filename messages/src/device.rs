//! The compact device frame: what a microcontroller (an ESP32 with zenoh-pico, or a board on a
//! UDP or serial link) sends. A fixed 36-byte little-endian header, the payload, then a CRC-32:
//!
//! ```c
//! /* NanoBot device frame, version 1. All fields little-endian, no padding. */
//! #include <stdint.h>
//! #define NB_FRAME_MAGIC   "NF"
//! #define NB_FRAME_VERSION 1
//! enum nb_sensor {
//!     NB_SENSOR_STATE   = 1,  /* payload: float32[n], the robot's state vector          */
//!     NB_SENSOR_CAMERA  = 2,  /* payload: one JPEG image                                */
//!     NB_SENSOR_SURFACE = 3,  /* payload: uint16 rows, uint16 cols, float32[rows * cols] */
//!     NB_SENSOR_ACTION  = 4,  /* payload: float32[n], the command the robot applied     */
//! };
//! typedef struct __attribute__((packed)) {
//!     char     magic[2];   /* 'N', 'F'                                 */
//!     uint8_t  version;    /* NB_FRAME_VERSION                         */
//!     uint8_t  sensor;     /* enum nb_sensor                           */
//!     char     robot[16];  /* robot id, NUL-padded ([A-Za-z0-9._-])    */
//!     uint32_t seq;        /* per-sensor sequence number, +1 per frame */
//!     uint64_t stamp_ns;   /* capture time, ns (device clock)          */
//!     uint32_t len;        /* payload bytes that follow                */
//! } nb_frame_header_t;     /* 36 bytes, then uint8_t payload[len], then
//!                             uint32_t crc32 (IEEE 802.3, as zlib's crc32())
//!                             over the header and the payload          */
//! ```

use bytes::Bytes;
use thiserror::Error;

pub const MAGIC: [u8; 2] = *b"NF";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 36;
pub const ROBOT_LEN: usize = 16;
pub const CRC_LEN: usize = 4;
/// Largest payload a frame may declare; a larger length is garbage, not a frame.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// The sensor a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Sensor {
    State = 1,
    Camera = 2,
    Surface = 3,
    Action = 4,
}

impl Sensor {
    pub fn from_u8(b: u8) -> Option<Sensor> {
        match b {
            1 => Some(Sensor::State),
            2 => Some(Sensor::Camera),
            3 => Some(Sensor::Surface),
            4 => Some(Sensor::Action),
            _ => None,
        }
    }
    /// The name used in topic keys (`{fleet}/{robot}/raw/{name}`) and RawFrame's `sensor`.
    pub fn name(self) -> &'static str {
        match self {
            Sensor::State => "state",
            Sensor::Camera => "camera",
            Sensor::Surface => "surface",
            Sensor::Action => "action",
        }
    }
    pub fn from_name(name: &str) -> Option<Sensor> {
        [Sensor::State, Sensor::Camera, Sensor::Surface, Sensor::Action]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct DeviceFrame {
    pub sensor: Sensor,
    pub robot: String,
    pub seq: u32,
    pub stamp_ns: u64,
    pub payload: Bytes,
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("not a device frame: magic {0:02x?}, want \"NF\"")]
    BadMagic([u8; 2]),
    #[error("device frame version {0}, this build reads {VERSION}")]
    BadVersion(u8),
    #[error("unknown sensor id {0}")]
    UnknownSensor(u8),
    #[error("robot id {0:?} is not a valid name")]
    BadRobot(String),
    #[error("payload length {0} exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("truncated: {have} bytes, the frame needs {need}")]
    Truncated { need: usize, have: usize },
    #[error("CRC mismatch: frame says {want:08x}, bytes give {got:08x}")]
    Crc { want: u32, got: u32 },
    #[error("{0} bytes after the frame")]
    Trailing(usize),
    #[error("{0} bytes of garbage skipped before the next frame")]
    Garbage(usize),
}

impl DeviceError {
    /// The one-word reason ingest counts it under.
    pub fn reason(&self) -> &'static str {
        match self {
            DeviceError::Crc { .. } => "crc",
            DeviceError::TooLarge(_) | DeviceError::Truncated { .. } | DeviceError::Trailing(_) => "size",
            DeviceError::UnknownSensor(_) => "sensor",
            _ => "decode",
        }
    }
}

impl DeviceFrame {
    /// The frame's bytes, CRC included.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len() + CRC_LEN);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.sensor as u8);
        let mut robot = [0u8; ROBOT_LEN];
        let n = self.robot.len().min(ROBOT_LEN);
        robot[..n].copy_from_slice(&self.robot.as_bytes()[..n]);
        out.extend_from_slice(&robot);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.stamp_ns.to_le_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.payload);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decode one frame that fills `buf` exactly.
    pub fn decode(buf: &Bytes) -> Result<DeviceFrame, DeviceError> {
        let (frame, used) = decode_prefix(buf)?;
        if used != buf.len() {
            return Err(DeviceError::Trailing(buf.len() - used));
        }
        Ok(frame)
    }

    /// A state or action payload: little-endian f32 values.
    pub fn f32_payload(values: &[f32]) -> Bytes {
        values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into()
    }

    /// A surface payload: rows, cols, cells.
    pub fn surface_payload(rows: u16, cols: u16, cells: &[f32]) -> Bytes {
        let mut out = Vec::with_capacity(4 + cells.len() * 4);
        out.extend_from_slice(&rows.to_le_bytes());
        out.extend_from_slice(&cols.to_le_bytes());
        out.extend(cells.iter().flat_map(|v| v.to_le_bytes()));
        out.into()
    }
}

/// Read the header at the start of `buf`: `(sensor byte, payload length)` after checking magic,
/// version and length bound.
fn header(buf: &[u8]) -> Result<(u8, usize), DeviceError> {
    if buf.len() >= 2 && buf[0..2] != MAGIC {
        return Err(DeviceError::BadMagic([buf[0], buf[1]]));
    }
    if buf.len() < HEADER_LEN {
        return Err(DeviceError::Truncated {
            need: HEADER_LEN,
            have: buf.len(),
        });
    }
    if buf[0..2] != MAGIC {
        return Err(DeviceError::BadMagic([buf[0], buf[1]]));
    }
    if buf[2] != VERSION {
        return Err(DeviceError::BadVersion(buf[2]));
    }
    let len = u32::from_le_bytes(buf[32..36].try_into().expect("4 bytes")) as usize;
    if len > MAX_PAYLOAD {
        return Err(DeviceError::TooLarge(len));
    }
    Ok((buf[3], len))
}

/// Decode the frame at the start of `buf`; returns it and the bytes it used.
pub fn decode_prefix(buf: &Bytes) -> Result<(DeviceFrame, usize), DeviceError> {
    let (sensor, len) = header(buf)?;
    let total = HEADER_LEN + len + CRC_LEN;
    if buf.len() < total {
        return Err(DeviceError::Truncated {
            need: total,
            have: buf.len(),
        });
    }
    let want = u32::from_le_bytes(buf[total - 4..total].try_into().expect("4 bytes"));
    let got = crc32fast::hash(&buf[..total - 4]);
    if want != got {
        return Err(DeviceError::Crc { want, got });
    }
    let sensor = Sensor::from_u8(sensor).ok_or(DeviceError::UnknownSensor(sensor))?;
    let raw_robot = &buf[4..4 + ROBOT_LEN];
    let end = raw_robot.iter().position(|b| *b == 0).unwrap_or(ROBOT_LEN);
    // NUL-padded: once a NUL comes, only NULs may follow (`esp\0zz` is not `esp`).
    if raw_robot[end..].iter().any(|b| *b != 0) {
        return Err(DeviceError::BadRobot(String::from_utf8_lossy(raw_robot).into_owned()));
    }
    let robot = std::str::from_utf8(&raw_robot[..end])
        .ok()
        .filter(|r| crate::topics::validate_robot(r).is_ok())
        .ok_or_else(|| DeviceError::BadRobot(String::from_utf8_lossy(&raw_robot[..end]).into_owned()))?
        .to_string();
    Ok((
        DeviceFrame {
            sensor,
            robot,
            seq: u32::from_le_bytes(buf[20..24].try_into().expect("4 bytes")),
            stamp_ns: u64::from_le_bytes(buf[24..32].try_into().expect("8 bytes")),
            payload: buf.slice(HEADER_LEN..HEADER_LEN + len),
        },
        total,
    ))
}

/// Frames out of a byte stream (a serial port): finds each frame's magic, waits for whole
/// frames, and resynchronizes after garbage or a bad CRC by skipping a byte at a time. A
/// corrupted length cannot stall the stream: while a long frame is awaited, a whole valid frame
/// found further on wins and the bytes before it are reported as garbage.
#[derive(Default)]
pub struct StreamDecoder {
    buf: Vec<u8>,
    skipped: usize,
    /// The bytes being skipped belong to a frame already reported as bad.
    after_error: bool,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    fn skip(&mut self, n: usize) {
        self.buf.drain(..n);
        if !self.after_error {
            self.skipped += n;
        }
    }

    /// The next frame or error; `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Result<DeviceFrame, DeviceError>> {
        let start = find_magic(&self.buf, 0).unwrap_or(self.buf.len().saturating_sub(1));
        if start > 0 {
            self.skip(start);
        }
        if self.buf.len() < HEADER_LEN {
            return None;
        }
        if self.skipped > 0 {
            return Some(Err(DeviceError::Garbage(std::mem::take(&mut self.skipped))));
        }
        let bytes = Bytes::copy_from_slice(&self.buf[..self.buf.len().min(HEADER_LEN + MAX_PAYLOAD + CRC_LEN)]);
        match decode_prefix(&bytes) {
            Ok((frame, used)) => {
                self.buf.drain(..used);
                self.after_error = false;
                Some(Ok(frame))
            }
            Err(DeviceError::Truncated { .. }) => {
                // A whole frame further on means this "frame" was garbage with a wild length.
                let mut at = 1;
                while let Some(p) = find_magic(&self.buf, at) {
                    if decode_prefix(&Bytes::copy_from_slice(&self.buf[p..])).is_ok() {
                        self.buf.drain(..p);
                        self.after_error = false;
                        return Some(Err(DeviceError::Garbage(p)));
                    }
                    at = p + 1;
                }
                None
            }
            Err(e) => {
                // Not a good frame here: report it once, skip its magic and look again.
                self.buf.drain(..1);
                self.after_error = true;
                Some(Err(e))
            }
        }
    }
}

/// Every frame of one datagram (UDP sends one or more whole frames per datagram). After a bad
/// frame the rest of the datagram is searched for the next magic, so good frames behind it count.
pub fn decode_datagram(buf: &Bytes) -> Vec<Result<DeviceFrame, DeviceError>> {
    let mut out = Vec::new();
    let mut at = 0;
    // One error per run of bad bytes: resyncing through garbage finds "NF" by chance, and
    // each false start is not another bad frame.
    let mut in_garbage = false;
    while at < buf.len() {
        match decode_prefix(&buf.slice(at..)) {
            Ok((frame, used)) => {
                out.push(Ok(frame));
                at += used;
                in_garbage = false;
            }
            Err(e @ (DeviceError::UnknownSensor(_) | DeviceError::BadRobot(_))) => {
                // An intact frame (its CRC holds) with content we refuse: one error, and the
                // next frame starts right after it.
                out.push(Err(e));
                in_garbage = false;
                match header(&buf.slice(at..)) {
                    Ok((_, len)) => at += HEADER_LEN + len + CRC_LEN,
                    Err(_) => break,
                }
            }
            Err(e) => {
                let truncated = matches!(e, DeviceError::Truncated { .. });
                if !in_garbage {
                    out.push(Err(e));
                }
                in_garbage = true;
                match find_magic(buf, at + 1) {
                    Some(next) if !truncated => at = next,
                    _ => break,
                }
            }
        }
    }
    out
}

fn find_magic(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?.windows(2).position(|w| w == MAGIC).map(|p| p + from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_of_garbage_is_one_error_and_frames_around_it_decode() {
        // Random bytes with the magic sprinkled through them: many false starts, one error.
        let mut rng = 0x1234_5678_u64;
        let mut garbage: Vec<u8> = (0..65_000)
            .map(|_| {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (rng >> 56) as u8
            })
            .collect();
        for i in (100..64_000).step_by(9_000) {
            garbage[i..i + 2].copy_from_slice(&MAGIC);
        }
        let out = decode_datagram(&Bytes::from(garbage.clone()));
        assert_eq!(out.iter().filter(|r| r.is_err()).count(), 1, "{out:?}");
        let mut mixed = frame(1).encode();
        mixed.extend_from_slice(&garbage[..500]);
        mixed.extend_from_slice(&frame(2).encode());
        let out = decode_datagram(&Bytes::from(mixed));
        let seqs: Vec<u32> = out.iter().filter_map(|r| r.as_ref().ok()).map(|f| f.seq).collect();
        assert_eq!(seqs, [1, 2]);
        assert_eq!(out.len(), 3, "two frames and one error between them");
        // Intact frames with a robot id we refuse are each an error, not one run of garbage.
        let mut bad = frame(3);
        bad.robot = "..".into();
        let three_bad = [bad.encode(), bad.encode(), bad.encode(), frame(4).encode()].concat();
        let out = decode_datagram(&Bytes::from(three_bad));
        assert_eq!(
            out.iter()
                .filter(|r| matches!(r, Err(DeviceError::BadRobot(_))))
                .count(),
            3
        );
        assert_eq!(out.last().unwrap().as_ref().unwrap().seq, 4);
    }

    #[test]
    fn robot_ids_that_are_not_safe_names_are_refused() {
        for id in [".", "..", ".x", "unknown"] {
            let mut f = frame(1);
            f.robot = id.into();
            assert!(
                matches!(
                    DeviceFrame::decode(&Bytes::from(f.encode())),
                    Err(DeviceError::BadRobot(_))
                ),
                "{id:?}"
            );
        }
        // Bytes after the padding NUL: not "esp".
        let mut bytes = frame(1).encode();
        bytes[4..4 + ROBOT_LEN].copy_from_slice(b"esp\0zz\0\0\0\0\0\0\0\0\0\0");
        let crc = crc32fast::hash(&bytes[..bytes.len() - CRC_LEN]);
        let n = bytes.len();
        bytes[n - CRC_LEN..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            DeviceFrame::decode(&Bytes::from(bytes)),
            Err(DeviceError::BadRobot(_))
        ));
    }

    fn frame(seq: u32) -> DeviceFrame {
        DeviceFrame {
            sensor: Sensor::State,
            robot: "esp32-07".into(),
            seq,
            stamp_ns: 1_700_000_000_000_000_000 + seq as u64,
            payload: DeviceFrame::f32_payload(&[1.0, -2.5, seq as f32]),
        }
    }

    #[test]
    fn round_trip_and_layout() {
        let f = frame(3);
        let bytes = f.encode();
        assert_eq!(bytes.len(), HEADER_LEN + 12 + CRC_LEN);
        assert_eq!(&bytes[0..4], b"NF\x01\x01");
        assert_eq!(&bytes[4..12], b"esp32-07");
        assert_eq!(DeviceFrame::decode(&Bytes::from(bytes)).unwrap(), f);
    }

    #[test]
    fn corruption_is_named() {
        let mut b = frame(1).encode();
        b[40] ^= 0x10;
        assert!(matches!(
            DeviceFrame::decode(&Bytes::from(b.clone())),
            Err(DeviceError::Crc { .. })
        ));
        let ok = frame(1).encode();
        assert!(matches!(
            DeviceFrame::decode(&Bytes::copy_from_slice(&ok[..30])),
            Err(DeviceError::Truncated { need: 36, have: 30 })
        ));
        let mut huge = ok.clone();
        huge[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            DeviceFrame::decode(&Bytes::from(huge)),
            Err(DeviceError::TooLarge(u32::MAX as usize))
        );
    }

    #[test]
    fn stream_resyncs_after_garbage_and_bad_frames() {
        let mut s = StreamDecoder::new();
        let mut bad = frame(2).encode();
        let n = bad.len();
        bad[n - 1] ^= 0xff;
        let mut stream = b"xxNFgarbage".to_vec();
        stream.extend(frame(1).encode());
        stream.extend(bad);
        stream.extend(frame(3).encode());
        // Fed in odd-sized pieces, as a UART delivers them.
        let mut got = Vec::new();
        for piece in stream.chunks(7) {
            s.push(piece);
            while let Some(r) = s.next_frame() {
                got.push(r.map(|f| f.seq));
            }
        }
        let frames: Vec<u32> = got.iter().filter_map(|r| r.clone().ok()).collect();
        assert_eq!(frames, vec![1, 3]);
        assert!(got.iter().any(|r| matches!(r, Err(DeviceError::Crc { .. }))), "{got:?}");
        assert!(got.iter().any(|r| matches!(r, Err(DeviceError::Garbage(_)))), "{got:?}");
        assert_eq!(
            got.len(),
            5,
            "garbage, a bad header, a frame, a CRC error, a frame: {got:?}"
        );
    }

    #[test]
    fn a_wild_length_does_not_stall_the_stream() {
        let mut s = StreamDecoder::new();
        let mut wild = frame(1).encode();
        wild[32..36].copy_from_slice(&100_000u32.to_le_bytes());
        s.push(&wild);
        assert_eq!(s.next_frame(), None, "waits for the long frame");
        s.push(&frame(2).encode());
        assert!(matches!(s.next_frame(), Some(Err(DeviceError::Garbage(_)))));
        assert_eq!(s.next_frame().unwrap().unwrap().seq, 2);
    }
}
