//! W3C trace context (`traceparent`), carried in the Zenoh attachment of every message so that
//! one trace follows an observation from ingest to action to log.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceContext {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

thread_local! {
    static RNG: Cell<u64> = Cell::new({
        let mut h = RandomState::new().build_hasher();
        h.write_u64(crate::codec::now_ns());
        h.finish() | 1
    });
}

/// A non-zero random u64 (splitmix64 over a per-thread random seed).
fn random_u64() -> u64 {
    RNG.with(|s| loop {
        let mut z = s.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        s.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        if z != 0 {
            return z;
        }
    })
}

/// Which new traces are recorded: a trace is sampled at its root with probability `ratio`
/// (OpenTelemetry's `TraceIdRatioBased`); everything downstream follows the root's decision, so
/// a sampled trace is whole and an unsampled one costs nothing on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceSampler {
    /// Sample when a random u64 falls below this (`u64::MAX` samples everything).
    threshold: u64,
    always: bool,
}

impl TraceSampler {
    /// Sample `ratio` of the new traces (clamped into 0..=1).
    pub fn ratio(ratio: f64) -> Self {
        let r = if ratio.is_nan() { 0.0 } else { ratio.clamp(0.0, 1.0) };
        TraceSampler {
            threshold: (r * u64::MAX as f64) as u64,
            always: r >= 1.0,
        }
    }

    /// Every trace.
    pub fn always() -> Self {
        Self::ratio(1.0)
    }

    /// A new root, if this trace is to be sampled; `None` otherwise (nothing is attached).
    pub fn root(&self) -> Option<TraceContext> {
        if self.always || random_u64() < self.threshold {
            Some(TraceContext::new_root())
        } else {
            None
        }
    }
}

impl TraceContext {
    /// A new trace.
    pub fn new_root() -> Self {
        TraceContext {
            trace_id: ((random_u64() as u128) << 64) | random_u64() as u128,
            span_id: random_u64(),
            sampled: true,
        }
    }

    /// A child span in the same trace.
    pub fn child(&self) -> Self {
        TraceContext {
            span_id: random_u64(),
            ..*self
        }
    }

    /// Parse a `traceparent` value: `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.trim().split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        (trace_id != 0 && span_id != 0).then_some(TraceContext {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The `traceparent` text as bytes, formatted without allocation.
    pub fn to_bytes(&self) -> [u8; 55] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b'-'; 55];
        out[0] = b'0';
        out[1] = b'0';
        for i in 0..32 {
            out[3 + i] = HEX[((self.trace_id >> (124 - 4 * i)) & 0xF) as usize];
        }
        for i in 0..16 {
            out[36 + i] = HEX[((self.span_id >> (60 - 4 * i)) & 0xF) as usize];
        }
        out[53] = b'0';
        out[54] = if self.sampled { b'1' } else { b'0' };
        out
    }

    /// Parse `traceparent` bytes (see [`TraceContext::parse`]), without allocating.
    pub fn parse_bytes(b: &[u8]) -> Option<Self> {
        fn hex(b: &[u8]) -> Option<u128> {
            b.iter().try_fold(0u128, |acc, &c| {
                let d = match c {
                    b'0'..=b'9' => c - b'0',
                    b'a'..=b'f' => c - b'a' + 10,
                    b'A'..=b'F' => c - b'A' + 10,
                    _ => return None,
                };
                Some(acc << 4 | d as u128)
            })
        }
        if b.len() != 55 || &b[0..3] != b"00-" || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let trace_id = hex(&b[3..35])?;
        let span_id = hex(&b[36..52])? as u64;
        let flags = hex(&b[53..55])? as u8;
        (trace_id != 0 && span_id != 0).then_some(TraceContext {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.sampled as u8
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_children_share_the_trace() {
        let root = TraceContext::new_root();
        let text = root.to_string();
        assert_eq!(text.len(), 55);
        assert_eq!(TraceContext::parse(&text), Some(root));
        assert_eq!(root.to_bytes().as_slice(), text.as_bytes());
        let unsampled = TraceContext { sampled: false, ..root };
        assert_eq!(unsampled.to_bytes().as_slice(), unsampled.to_string().as_bytes());
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        let w3c = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let p = TraceContext::parse(w3c).unwrap();
        assert_eq!(p.to_string(), w3c);
        assert_eq!(
            TraceContext::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(TraceContext::parse("garbage"), None);
        assert_eq!(TraceContext::parse_bytes(w3c.as_bytes()), Some(p));
        assert_eq!(TraceContext::parse_bytes(&w3c.as_bytes()[..54]), None);
        assert_eq!(TraceContext::parse_bytes(w3c.replace("-01", "-0x").as_bytes()), None);
    }

    #[test]
    fn the_sampler_keeps_about_its_ratio_of_new_traces() {
        assert!((0..1000).all(|_| TraceSampler::always().root().is_some()));
        assert!((0..1000).all(|_| TraceSampler::ratio(0.0).root().is_none()));
        let kept = (0..20_000)
            .filter(|_| TraceSampler::ratio(0.1).root().is_some())
            .count();
        assert!((1600..2400).contains(&kept), "{kept} of 20000 at 0.1");
        assert!(TraceSampler::ratio(f64::NAN).root().is_none());
    }
}
