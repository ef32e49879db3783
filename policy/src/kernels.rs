//! CPU kernels of the inference engine, for the shapes this policy has: a few to a few hundred
//! rows against weights of 32 to 768 columns. General GEMM libraries pack both operands for
//! every call, which at these sizes costs more than the product; here the weights are stored
//! transposed once (`k × n`, row-major) and a register-tiled kernel streams them: 4 rows × 16
//! columns of accumulators, one broadcast and two loads per two FMAs per row. With AVX2 and FMA
//! (detected at run time) the tile is in vector registers; elsewhere a portable loop computes
//! the same sums.
//!
//! The element-wise kernels (SiLU, softmax) use an `exp` with a relative error under 5e-7
//! written so that the compiler vectorizes it.

/// Whether this CPU has AVX2 and FMA (checked once; the standard library caches it).
#[inline]
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[i·ldo + j] += Σ_kk x[i·ldx + kk] · wt[kk·ldw + j]` for `i < m`, `j < n`, `kk < k`.
///
/// # Panics
/// When a slice is shorter than its extent.
#[allow(clippy::too_many_arguments)]
pub fn matmul_acc(
    x: &[f32],
    ldx: usize,
    m: usize,
    k: usize,
    wt: &[f32],
    ldw: usize,
    n: usize,
    out: &mut [f32],
    ldo: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(
        (m - 1) * ldx + k <= x.len() && (k - 1) * ldw + n <= wt.len() && (m - 1) * ldo + n <= out.len(),
        "matmul: a slice is shorter than {m}×{k} · {k}×{n}"
    );
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA; every access is within the extents checked above.
        unsafe { avx::matmul_acc(x, ldx, m, k, wt, ldw, n, out, ldo) };
        return;
    }
    for i in 0..m {
        let o = &mut out[i * ldo..][..n];
        for kk in 0..k {
            let a = x[i * ldx + kk];
            o.iter_mut().zip(&wt[kk * ldw..][..n]).for_each(|(o, w)| *o += a * w);
        }
    }
}

/// A weight matrix `Wᵀ` (`k × n`) stored as column panels of 16 (then one of 8, then the
/// fewer-than-8 tail), each `k × width` contiguous: the kernel streams a panel front to back,
/// which is what the prefetcher and the TLB like when the weights come from L3.
#[derive(Clone, Debug)]
pub struct Packed {
    data: Vec<f32>,
    k: usize,
    n: usize,
}

impl Packed {
    /// Pack `wt` (`k × n`, row-major).
    pub fn new(wt: &[f32], k: usize, n: usize) -> Packed {
        assert_eq!(wt.len(), k * n, "pack: {k}×{n} weights");
        let mut data = Vec::with_capacity(k * n);
        for (j, w) in panels(n) {
            for kk in 0..k {
                data.extend_from_slice(&wt[kk * n + j..][..w]);
            }
        }
        Packed { data, k, n }
    }
}

/// The column panels of `n`: `(first column, width)`.
fn panels(n: usize) -> impl Iterator<Item = (usize, usize)> {
    let sixteens = n / 16;
    let eight = (n % 16) / 8;
    let tail = n % 8;
    (0..sixteens)
        .map(|p| (p * 16, 16))
        .chain((0..eight).map(move |_| (sixteens * 16, 8)))
        .chain((tail > 0).then_some((n - tail, tail)))
}

/// `out[i·ldo + j] += Σ_kk x[i·ldx + kk] · Wᵀ[kk][j]` with `Wᵀ` packed.
pub fn matmul_packed(x: &[f32], ldx: usize, m: usize, w: &Packed, out: &mut [f32], ldo: usize) {
    let (k, n) = (w.k, w.n);
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(
        (m - 1) * ldx + k <= x.len() && (m - 1) * ldo + n <= out.len(),
        "matmul: a slice is shorter than {m}×{k} · {k}×{n}"
    );
    let mut at = 0;
    for (j, width) in panels(n) {
        let panel = &w.data[at..at + k * width];
        at += k * width;
        let o = &mut out[j..];
        if width >= 8 {
            matmul_acc(x, ldx, m, k, panel, width, width, o, ldo);
        } else {
            for i in 0..m {
                for kk in 0..k {
                    let a = x[i * ldx + kk];
                    o[i * ldo..][..width]
                        .iter_mut()
                        .zip(&panel[kk * width..][..width])
                        .for_each(|(o, w)| *o += a * w);
                }
            }
        }
    }
}

/// `e^x`, vectorizable: `2^n · p(r)` with `x = n·ln2 + r`, `|r| ≤ ln2/2`, a degree-6 polynomial.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    // Round to nearest with the 1.5·2²³ trick (no branch, no call).
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p =
        1.0 + r * (1.0 + r * (0.5 + r * (0.166_666_67 + r * (0.041_666_41 + r * (0.008_333_452 + r * 0.001_393_99)))));
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// SiLU in place: `x · σ(x)`.
pub fn silu(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        unsafe { avx::silu(v) };
        return;
    }
    silu_portable(v);
}

#[inline(always)]
fn silu_portable(v: &mut [f32]) {
    v.iter_mut().for_each(|x| *x /= 1.0 + exp(-*x));
}

/// Softmax of one row in place.
pub fn softmax(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        unsafe { avx::softmax(v) };
        return;
    }
    softmax_portable(v);
}

#[inline(always)]
fn softmax_portable(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    v.iter_mut().for_each(|a| *a = exp(*a - max));
    let inv = 1.0 / v.iter().sum::<f32>();
    v.iter_mut().for_each(|a| *a *= inv);
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu(v: &mut [f32]) {
        super::silu_portable(v)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax(v: &mut [f32]) {
        super::softmax_portable(v)
    }

    /// An `MR × 8·NV` tile of `out += x · wt` over the whole `k`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const MR: usize, const NV: usize>(
        x: *const f32,
        ldx: usize,
        k: usize,
        wt: *const f32,
        ldw: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, a) in row.iter_mut().enumerate() {
                *a = _mm256_loadu_ps(out.add(r * ldo + v * 8));
            }
        }
        for kk in 0..k {
            let mut w = [_mm256_setzero_ps(); NV];
            for (v, wv) in w.iter_mut().enumerate() {
                *wv = _mm256_loadu_ps(wt.add(kk * ldw + v * 8));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let xb = _mm256_set1_ps(*x.add(r * ldx + kk));
                for (a, wv) in row.iter_mut().zip(&w) {
                    *a = _mm256_fmadd_ps(xb, *wv, *a);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, a) in row.iter().enumerate() {
                _mm256_storeu_ps(out.add(r * ldo + v * 8), *a);
            }
        }
    }

    /// Rows in blocks of 4 (then 3, 2, 1) for one column block of `8·NV`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows<const NV: usize>(
        x: *const f32,
        ldx: usize,
        m: usize,
        k: usize,
        wt: *const f32,
        ldw: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let mut i = 0;
        while i + 4 <= m {
            tile::<4, NV>(x.add(i * ldx), ldx, k, wt, ldw, out.add(i * ldo), ldo);
            i += 4;
        }
        let (x, out) = (x.add(i * ldx), out.add(i * ldo));
        match m - i {
            3 => tile::<3, NV>(x, ldx, k, wt, ldw, out, ldo),
            2 => tile::<2, NV>(x, ldx, k, wt, ldw, out, ldo),
            1 => tile::<1, NV>(x, ldx, k, wt, ldw, out, ldo),
            _ => {}
        }
    }

    /// # Safety
    /// AVX2 and FMA; the extents are within the slices (checked by the caller).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul_acc(
        x: &[f32],
        ldx: usize,
        m: usize,
        k: usize,
        wt: &[f32],
        ldw: usize,
        n: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        let (xp, wp, op) = (x.as_ptr(), wt.as_ptr(), out.as_mut_ptr());
        let mut j = 0;
        while j + 16 <= n {
            rows::<2>(xp, ldx, m, k, wp.add(j), ldw, op.add(j), ldo);
            j += 16;
        }
        if j + 8 <= n {
            rows::<1>(xp, ldx, m, k, wp.add(j), ldw, op.add(j), ldo);
            j += 8;
        }
        // Fewer than 8 columns left: plain arithmetic.
        for jj in j..n {
            for i in 0..m {
                let mut s = 0.0;
                for kk in 0..k {
                    s += x[i * ldx + kk] * wt[kk * ldw + jj];
                }
                out[i * ldo + jj] += s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_5e7_relative_over_the_range_used() {
        let mut worst = 0.0f64;
        for i in -8000..=8000 {
            let x = i as f32 * 0.01;
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64 - want) / want).abs());
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp(-200.0), exp(-87.3), "clamped below, never NaN");
    }

    #[test]
    fn packed_weights_give_the_same_products() {
        for n in [1, 8, 16, 24, 31, 40, 512] {
            let (m, k) = (5, 9);
            let x: Vec<f32> = (0..m * k).map(|v| (v % 7) as f32 - 3.0).collect();
            let wt: Vec<f32> = (0..k * n).map(|v| ((v * 5) % 11) as f32 * 0.1).collect();
            let (mut a, mut b) = (vec![1.0; m * n], vec![1.0; m * n]);
            matmul_acc(&x, k, m, k, &wt, n, n, &mut a, n);
            matmul_packed(&x, k, m, &Packed::new(&wt, k, n), &mut b, n);
            let worst = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max);
            assert!(worst < 1e-5, "n {n}: packed and plain differ by {worst}");
        }
    }

    #[test]
    fn matmul_matches_plain_sums_for_every_tile_shape() {
        // Rows 1..=9 (every row remainder), columns 1..=40 (16-blocks, an 8-block, scalar
        // remainder), strided operands.
        for m in 1..=9 {
            for n in [1, 7, 8, 15, 16, 24, 33, 40] {
                let k = 13;
                let (ldx, ldw, ldo) = (k + 3, n + 5, n + 2);
                let x: Vec<f32> = (0..m * ldx).map(|v| ((v * 37 % 17) as f32 - 8.0) / 7.0).collect();
                let wt: Vec<f32> = (0..k * ldw).map(|v| ((v * 11 % 23) as f32 - 11.0) / 9.0).collect();
                let mut out: Vec<f32> = (0..m * ldo).map(|v| v as f32 * 0.5).collect();
                let before = out.clone();
                matmul_acc(&x, ldx, m, k, &wt, ldw, n, &mut out, ldo);
                for i in 0..m {
                    for j in 0..ldo {
                        let want = if j < n {
                            before[i * ldo + j] + (0..k).map(|kk| x[i * ldx + kk] * wt[kk * ldw + j]).sum::<f32>()
                        } else {
                            before[i * ldo + j]
                        };
                        let got = out[i * ldo + j];
                        assert!((got - want).abs() < 1e-4, "m {m} n {n} at ({i}, {j}): {got} vs {want}");
                    }
                }
            }
        }
    }
}
