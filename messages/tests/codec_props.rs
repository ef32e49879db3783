//! Property tests of the wire codec: every message round-trips, and damaged bytes are refused
//! with the right error, never a panic.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::Bytes;
use nanobot_messages::*;
use proptest::prelude::*;

/// Counts the bytes this thread holds, and their peak, so a test can measure what one decode
/// allocates (tests run on several threads; each counts its own).
struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's layout goes to the system allocator as it is.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let _ = LIVE.try_with(|c| {
                let v = c.get() + l.size();
                c.set(v);
                let _ = PEAK.try_with(|pk| pk.set(pk.get().max(v)));
            });
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { System.dealloc(p, l) };
        let _ = LIVE.try_with(|c| c.set(c.get().saturating_sub(l.size())));
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The most bytes `f` held at once beyond what this thread held before.
fn peak_alloc<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    (r, PEAK.with(Cell::get) - base)
}

/// What a decode of `n` input bytes may allocate: a small multiple of the input.
fn alloc_bound(n: usize) -> usize {
    4096 + 8 * n
}

fn any_chunk() -> impl Strategy<Value = ActionChunk> {
    (any::<u64>(), 1u32..17, 1u32..8, "[a-z0-9.]{0,12}", prop::bool::ANY).prop_flat_map(
        |(obs_seq, horizon, dim, version, expert)| {
            prop::collection::vec(-10.0f32..10.0, (horizon * dim) as usize).prop_map(move |actions| ActionChunk {
                obs_seq,
                dt_ns: 50_000_000,
                horizon,
                action_dim: dim,
                actions,
                source: if expert {
                    ActionSource::Expert
                } else {
                    ActionSource::Policy
                },
                policy_version: version.clone(),
                adapter_version: format!("{version}-lora"),
            })
        },
    )
}

fn any_frame() -> impl Strategy<Value = RawFrame> {
    (
        "[a-z]{1,8}",
        prop::collection::vec(any::<u8>(), 0..4096),
        prop::collection::vec(1u32..100, 0..4),
    )
        .prop_map(|(sensor, data, shape)| RawFrame {
            sensor,
            encoding: Encoding::Jpeg,
            shape,
            data: Blob::new(data),
        })
}

fn any_observation() -> impl Strategy<Value = Observation> {
    (
        any::<u64>(),
        prop::collection::vec(any::<u8>(), 0..2048),
        prop::collection::vec(-1e3f32..1e3, 0..32),
    )
        .prop_map(|(episode, jpeg, state)| Observation {
            episode,
            frame_index: episode / 2,
            task: 1,
            image: Image {
                width: 64,
                height: 64,
                encoding: Encoding::Jpeg,
                data: Blob::new(jpeg),
            },
            surface: Grid {
                rows: 2,
                cols: 2,
                cells: vec![0.0, 1.0, 0.5, 0.25],
            },
            state,
            action: vec![0.5, -0.5],
        })
}

fn any_event() -> impl Strategy<Value = Event> {
    (
        any::<u64>(),
        0u8..4,
        any::<f32>().prop_filter("finite", |v| v.is_finite()),
        "[ -~]{0,20}",
    )
        .prop_map(|(episode, which, value, reason)| Event {
            episode,
            event: match which {
                0 => EventKind::EpisodeStart { task: 2, shift: reason },
                1 => EventKind::EpisodeEnd {
                    success: value > 0.0,
                    steps: 10,
                    reward: value,
                },
                2 => EventKind::Intervention { active: true, reason },
                _ => EventKind::Reward { value },
            },
        })
}

fn wire<T: Message>(robot: &str, seq: u64, m: &T) -> Bytes {
    Bytes::from(encode(robot, seq, 123, m).unwrap().to_vec())
}

proptest! {
    #[test]
    fn action_chunks_round_trip(m in any_chunk(), robot in "[a-z0-9_-]{1,16}", seq in any::<u64>()) {
        let (h, back): (Header, ActionChunk) = decode(wire(&robot, seq, &m)).unwrap();
        prop_assert_eq!(h.robot, robot);
        prop_assert_eq!(h.seq, seq);
        prop_assert_eq!(h.kind, Kind::ActionChunk);
        prop_assert_eq!(back, m);
    }

    #[test]
    fn frames_observations_events_round_trip(f in any_frame(), o in any_observation(), e in any_event()) {
        prop_assert_eq!(decode::<RawFrame>(wire("r", 1, &f)).unwrap().1, f.clone());
        prop_assert_eq!(decode::<Observation>(wire("r", 2, &o)).unwrap().1, o);
        prop_assert_eq!(decode::<Event>(wire("r", 3, &e)).unwrap().1, e.clone());
        let (_, any) = decode_any(wire("r", 1, &f)).unwrap();
        prop_assert_eq!(any, AnyMessage::RawFrame(f));
    }

    #[test]
    fn every_truncation_is_refused(f in any_frame(), cut in any::<prop::sample::Index>()) {
        let bytes = wire("robot-7", 9, &f);
        let at = cut.index(bytes.len());
        let err = decode::<RawFrame>(bytes.slice(..at)).unwrap_err();
        prop_assert!(matches!(err, CodecError::Truncated { .. }), "cut at {} of {}: {:?}", at, bytes.len(), err);
    }

    #[test]
    fn trailing_bytes_are_refused(m in any_chunk(), extra in prop::collection::vec(any::<u8>(), 1..64)) {
        let mut v = wire("r0", 1, &m).to_vec();
        v.extend_from_slice(&extra);
        prop_assert_eq!(decode::<ActionChunk>(Bytes::from(v)).unwrap_err(), CodecError::TrailingBytes(extra.len()));
    }

    #[test]
    fn garbled_bytes_never_panic(m in any_observation(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut v = wire("r0", 1, &m).to_vec();
        for (i, b) in flips {
            let at = i.index(v.len());
            v[at] ^= b | 1;
        }
        // Either an error or a (different) valid message; never a panic or a huge allocation.
        let n = v.len();
        let input = Bytes::from(v);
        let (_, peak) = peak_alloc(|| decode_any(input));
        prop_assert!(peak <= alloc_bound(n), "decoding {} bytes allocated {} bytes", n, peak);
    }

    #[test]
    fn random_bytes_never_panic(v in prop::collection::vec(any::<u8>(), 0..512)) {
        let n = v.len();
        let input = Bytes::from(v);
        let (_, peak) = peak_alloc(|| decode_any(input));
        prop_assert!(peak <= alloc_bound(n), "decoding {} bytes allocated {} bytes", n, peak);
    }
}

#[test]
fn wrong_version_is_refused_with_its_number() {
    let mut v = wire("r0", 1, &any_event_fixed()).to_vec();
    v[2] = 2;
    assert_eq!(decode_any(Bytes::from(v)).unwrap_err(), CodecError::UnknownVersion(2));
}

#[test]
fn huge_announced_lengths_are_refused_without_allocating() {
    let f = RawFrame {
        sensor: "cam".into(),
        encoding: Encoding::Jpeg,
        shape: vec![],
        data: Blob::new(vec![1u8; 10]),
    };
    let mut v = wire("r0", 1, &f).to_vec();
    // The blob's length is the last u64 of the body: claim u64::MAX bytes.
    let body_end = v.len() - 10;
    v[body_end - 8..body_end].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        decode::<RawFrame>(Bytes::from(v)),
        Err(CodecError::Truncated { what: "blob", .. })
    ));
    // The sensor string's length prefix: claim 2^40 bytes.
    let mut v = wire("r0", 1, &f).to_vec();
    let body_start = 26 + 2;
    v[body_start..body_start + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let n = v.len();
    let input = Bytes::from(v);
    let (r, peak) = peak_alloc(|| decode::<RawFrame>(input));
    assert!(r.is_err());
    assert!(
        peak <= alloc_bound(n),
        "a 2^40-byte claim made the decoder allocate {peak} bytes"
    );
    // The measurement itself can fail: a decode that allocates as claimed is caught.
    let (_, big) = peak_alloc(|| Vec::<u8>::with_capacity(1 << 20));
    assert!(big > alloc_bound(n));
}

fn any_event_fixed() -> Event {
    Event {
        episode: 1,
        event: EventKind::Reward { value: 1.0 },
    }
}

proptest! {
    /// However a payload is cut into pieces, it decodes to the same message.
    #[test]
    fn pieces_decode_like_one_buffer(f in any_frame(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..5)) {
        let whole = wire("r0", 5, &f);
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(whole.len() + 1)).collect();
        at.sort();
        let mut parts = Vec::new();
        let mut prev = 0;
        for c in at.into_iter().chain([whole.len()]) {
            parts.push(whole.slice(prev..c));
            prev = c;
        }
        let (h, back) = decode_pieces::<RawFrame>(&parts).unwrap();
        prop_assert_eq!(h.seq, 5);
        prop_assert_eq!(back, f);
        prop_assert!(decode_pieces::<RawFrame>(&parts[..parts.len().saturating_sub(1)]).is_err() || parts.last().unwrap().is_empty());
    }
}

#[test]
fn a_blob_in_its_own_piece_is_not_copied() {
    let f = RawFrame {
        sensor: "cam".into(),
        encoding: Encoding::Jpeg,
        shape: vec![],
        data: Blob::new(vec![7u8; 5000]),
    };
    let e = encode("r0", 1, 2, &f).unwrap();
    let parts = [Bytes::from(e.head.clone()), e.blobs[0].clone()];
    let (_, back) = decode_pieces::<RawFrame>(&parts).unwrap();
    assert_eq!(back.data.pieces()[0].as_ptr(), parts[1].as_ptr());
    // A blob cut across pieces stays in pieces, and forwarding it copies nothing.
    let half = e.blobs[0].len() / 2;
    let parts = [
        Bytes::from(e.head.clone()),
        e.blobs[0].slice(..half),
        e.blobs[0].slice(half..),
    ];
    let (_, back) = decode_pieces::<RawFrame>(&parts).unwrap();
    assert_eq!(back.data.pieces().len(), 2);
    assert_eq!(back, f);
    assert_eq!(back.data.to_bytes(), e.blobs[0]);
    let again = encode("r0", 2, 3, &back).unwrap();
    assert_eq!(again.blobs.len(), 2);
    assert_eq!(again.blobs[1].as_ptr(), parts[2].as_ptr());
}
