//! Weight quantization formats, in ggml's block layouts so that GGUF tools read them.
//!
//! - **MXFP4** (OCP Microscaling v1.0): blocks of 32 values sharing one E8M0 scale (a power
//!   of two), each value an E2M1 4-bit float (±{0, 0.5, 1, 1.5, 2, 3, 4, 6}). ggml type 39,
//!   17 bytes a block: the scale byte `e`, then 16 bytes whose low nibbles hold values 0–15
//!   and high nibbles values 16–31. A nibble `q` means `KVALUES[q] · 2^(e − 128)` (ggml keeps
//!   the E2M1 values doubled, hence the extra halving). The shared exponent is
//!   `floor(log2(max |x|)) − 2`, so the block's largest value lands in [4, 8) before rounding
//!   to the nearest code (6 at most).
//! - **Q8_0**: blocks of 32 values with an f16 scale `d = max |x| / 127` and 32 i8 codes
//!   (ggml type 8, 34 bytes a block).
//! - **F16**: IEEE half precision (ggml type 1).

use half::f16;
use thiserror::Error;

/// Values per block of MXFP4 and Q8_0.
pub const BLOCK: usize = 32;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum QuantError {
    #[error("{format}: {len} values is not a multiple of the block size {BLOCK}")]
    NotBlocked { format: &'static str, len: usize },
    #[error("{format}: {bytes} bytes is not a whole number of {block_bytes}-byte blocks")]
    BadLength {
        format: &'static str,
        bytes: usize,
        block_bytes: usize,
    },
    #[error("{format}: {len} values do not fit in memory")]
    TooLarge { format: &'static str, len: usize },
    #[error("{format}: value {index} is not finite ({value})")]
    NotFinite {
        format: &'static str,
        index: usize,
        value: f32,
    },
}

/// A tensor storage type, with its ggml type id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    Q8_0,
    Mxfp4,
}

impl DType {
    pub fn ggml_type(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q8_0 => 8,
            DType::Mxfp4 => 39,
        }
    }
    pub fn from_ggml_type(t: u32) -> Option<DType> {
        [DType::F32, DType::F16, DType::Q8_0, DType::Mxfp4]
            .into_iter()
            .find(|d| d.ggml_type() == t)
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Q8_0 => "q8_0",
            DType::Mxfp4 => "mxfp4",
        }
    }
    /// (values, bytes) of one block.
    pub fn block(self) -> (usize, usize) {
        match self {
            DType::F32 => (1, 4),
            DType::F16 => (1, 2),
            DType::Q8_0 => (BLOCK, 34),
            DType::Mxfp4 => (BLOCK, 17),
        }
    }
    /// Bytes that `n` values take, or an error if `n` is not whole blocks.
    pub fn bytes_for(self, n: usize) -> Result<usize, QuantError> {
        let (vals, bytes) = self.block();
        if !n.is_multiple_of(vals) {
            return Err(QuantError::NotBlocked {
                format: self.name(),
                len: n,
            });
        }
        (n / vals).checked_mul(bytes).ok_or(QuantError::TooLarge {
            format: self.name(),
            len: n,
        })
    }

    pub fn quantize(self, x: &[f32]) -> Result<Vec<u8>, QuantError> {
        if let Some((index, &value)) = x.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(QuantError::NotFinite {
                format: self.name(),
                index,
                value,
            });
        }
        match self {
            DType::F32 => Ok(x.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::F16 => Ok(x.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect()),
            DType::Q8_0 => quantize_q8_0(x),
            DType::Mxfp4 => quantize_mxfp4(x),
        }
    }

    pub fn dequantize(self, bytes: &[u8]) -> Result<Vec<f32>, QuantError> {
        let (vals, block_bytes) = self.block();
        if !bytes.len().is_multiple_of(block_bytes) {
            return Err(QuantError::BadLength {
                format: self.name(),
                bytes: bytes.len(),
                block_bytes,
            });
        }
        let mut out = Vec::with_capacity(bytes.len() / block_bytes * vals);
        for b in bytes.chunks_exact(block_bytes) {
            match self {
                DType::F32 => out.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                DType::F16 => out.push(f16::from_le_bytes([b[0], b[1]]).to_f32()),
                DType::Q8_0 => {
                    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    out.extend(b[2..].iter().map(|&q| q as i8 as f32 * d));
                }
                DType::Mxfp4 => {
                    let d = e8m0_half(b[0]);
                    let (lo, hi): (Vec<f32>, Vec<f32>) = b[1..]
                        .iter()
                        .map(|&q| {
                            (
                                MXFP4_KVALUES[(q & 0xF) as usize] as f32 * d,
                                MXFP4_KVALUES[(q >> 4) as usize] as f32 * d,
                            )
                        })
                        .unzip();
                    out.extend(lo);
                    out.extend(hi);
                }
            }
        }
        Ok(out)
    }
}

/// E2M1 values, doubled, indexed by nibble (ggml's `kvalues_mxfp4`).
pub const MXFP4_KVALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// `2^(e − 127) / 2`: the E8M0 scale halved, as ggml applies it to the doubled values.
pub fn e8m0_half(e: u8) -> f32 {
    let bits: u32 = if e < 2 {
        0x0020_0000 << e
    } else {
        ((e - 1) as u32) << 23
    };
    f32::from_bits(bits)
}

/// The shared exponent byte of a block whose largest magnitude is `amax`.
fn mxfp4_exponent(amax: f32) -> u8 {
    if amax > 0.0 {
        (amax.log2().floor() as i32 - 2 + 127).clamp(0, 254) as u8
    } else {
        0
    }
}

fn quantize_mxfp4(x: &[f32]) -> Result<Vec<u8>, QuantError> {
    if !x.len().is_multiple_of(BLOCK) {
        return Err(QuantError::NotBlocked {
            format: "mxfp4",
            len: x.len(),
        });
    }
    let mut out = Vec::with_capacity(x.len() / BLOCK * 17);
    for block in x.chunks_exact(BLOCK) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let e = mxfp4_exponent(amax);
        let d = e8m0_half(e);
        // Nearest code; ties go to the lower nibble index, as ggml's reference does.
        let best = |v: f32| -> u8 {
            let mut best = (0u8, f32::INFINITY);
            for (i, &k) in MXFP4_KVALUES.iter().enumerate() {
                let err = (d * k as f32 - v).abs();
                if err < best.1 {
                    best = (i as u8, err);
                }
            }
            best.0
        };
        out.push(e);
        for j in 0..BLOCK / 2 {
            out.push(best(block[j]) | best(block[j + BLOCK / 2]) << 4);
        }
    }
    Ok(out)
}

fn quantize_q8_0(x: &[f32]) -> Result<Vec<u8>, QuantError> {
    if !x.len().is_multiple_of(BLOCK) {
        return Err(QuantError::NotBlocked {
            format: "q8_0",
            len: x.len(),
        });
    }
    let mut out = Vec::with_capacity(x.len() / BLOCK * 34);
    for block in x.chunks_exact(BLOCK) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    Ok(out)
}

/// The bound on MXFP4's round-trip error in a block whose largest magnitude is `amax`: the
/// element scale is `X = 2^(floor(log2 amax) − 2)`; values inside the grid (|x| ≤ 6X) are off
/// by at most half a grid step (X), and the block maximum, which can reach 8X, is clipped to
/// 6X (off by at most 2X).
pub fn mxfp4_error_bound(amax: f32) -> f32 {
    if amax > 0.0 {
        2f32.powi(amax.log2().floor() as i32 - 1)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn mxfp4_represents_its_grid_exactly() {
        // 0.5 · the E2M1 grid · 2^k round-trips bit for bit.
        let grid = [0.0f32, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        let x: Vec<f32> = (0..32)
            .map(|i| grid[i % 8] * if i % 16 >= 8 { -1.0 } else { 1.0 } * 0.25)
            .collect();
        let q = DType::Mxfp4.quantize(&x).unwrap();
        assert_eq!(q.len(), 17);
        assert_eq!(DType::Mxfp4.dequantize(&q).unwrap(), x);
    }

    #[test]
    fn sizes_and_errors() {
        assert_eq!(DType::Mxfp4.bytes_for(64).unwrap(), 34);
        // A count from a file that no memory holds is an error, not an overflow.
        assert!(matches!(
            DType::F32.bytes_for(usize::MAX),
            Err(QuantError::TooLarge { .. })
        ));
        assert_eq!(DType::Q8_0.bytes_for(64).unwrap(), 68);
        assert!(DType::Mxfp4.quantize(&[1.0; 31]).is_err());
        assert!(matches!(
            DType::Q8_0.quantize(&[f32::NAN; 32]),
            Err(QuantError::NotFinite { index: 0, .. })
        ));
        assert!(DType::Mxfp4.dequantize(&[0; 16]).is_err());
        assert_eq!(DType::from_ggml_type(39), Some(DType::Mxfp4));
        assert_eq!(e8m0_half(127), 0.5);
        assert_eq!(e8m0_half(0), 2f64.powi(-128) as f32);
    }

    proptest! {
        #[test]
        fn mxfp4_error_stays_within_the_format_bound(x in prop::collection::vec(-1e3f32..1e3, 32 * 4), scale in -20i32..20) {
            let x: Vec<f32> = x.iter().map(|v| v * 2f32.powi(scale)).collect();
            let back = DType::Mxfp4.dequantize(&DType::Mxfp4.quantize(&x).unwrap()).unwrap();
            for (bx, bb) in x.chunks(32).zip(back.chunks(32)) {
                let amax = bx.iter().fold(0f32, |m, v| m.max(v.abs()));
                let bound = mxfp4_error_bound(amax);
                for (a, b) in bx.iter().zip(bb) {
                    prop_assert!((a - b).abs() <= bound * (1.0 + 1e-6), "{} -> {} (bound {})", a, b, bound);
                }
            }
        }

        #[test]
        fn q8_0_and_f16_errors_are_small(x in prop::collection::vec(-10f32..10.0, 64)) {
            let q8 = DType::Q8_0.dequantize(&DType::Q8_0.quantize(&x).unwrap()).unwrap();
            let h = DType::F16.dequantize(&DType::F16.quantize(&x).unwrap()).unwrap();
            for i in 0..64 {
                let amax = x[i / 32 * 32..i / 32 * 32 + 32].iter().fold(0f32, |m, v| m.max(v.abs()));
                prop_assert!((x[i] - q8[i]).abs() <= amax / 127.0 * 0.6 + 1e-6);
                prop_assert!((x[i] - h[i]).abs() <= x[i].abs() * 1e-3 + 1e-4);
            }
        }
    }
}
