//! Training kernels with their own backward passes.
//!
//! A layer norm as one CPU kernel with its own backward pass. candle's fast layer norm has no
//! backward, and its differentiable form (`layer_norm_slow`) is ten element-wise ops forward and
//! about twenty backward, each a tensor allocated and walked: at this model's sizes the
//! allocations, not the arithmetic, are the cost. Here the forward is one pass per row and the
//! backward one kernel that writes the input's, the scale's and the shift's gradients together.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

/// SiLU, `x · σ(x)`: on a tensor a gradient flows through, one kernel each way (candle's
/// backward rebuilds σ from half a dozen element-wise ops); elsewhere candle's own.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        x.contiguous()?.apply_op1(Silu)
    } else {
        x.silu()
    }
}

struct Silu;

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "nb-silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "x")?;
        Ok((
            CpuStorage::F32(x.iter().map(|&v| v * sigmoid(v)).collect()),
            l.shape().clone(),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &SiluBackward)?))
    }
}

struct SiluBackward;

impl candle_core::CustomOp2 for SiluBackward {
    fn name(&self) -> &'static str {
        "nb-silu-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (slice(s1, l1, "x")?, slice(s2, l2, "grad")?);
        if x.len() != g.len() {
            return Err(candle_core::Error::Msg(format!(
                "silu backward: {} values, {} grads",
                x.len(),
                g.len()
            )));
        }
        let dx = x
            .iter()
            .zip(g)
            .map(|(&v, &gv)| {
                let s = sigmoid(v);
                gv * s * (1.0 + v * (1.0 - s))
            })
            .collect();
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `x · weightᵀ + bias` for a weight that is not trained (a LoRA adapter's base): candle's
/// matmul backward computes the gradient of both operands, and a constant weight's is a
/// product as large as the forward one, thrown away, plus the bias's reduction. This op's
/// backward gives `x` its gradient and nothing else. `x` is 2-D.
pub fn frozen_linear(x: &Tensor, frozen: &Frozen) -> Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenLinear { frozen: frozen.clone() })
}

/// A LoRA layer on a frozen base, `x · Wᵀ + bias + scale · (x · Aᵀ) · Bᵀ`, as one node of the
/// graph: its backward gives `x` (when it needs one), `A` and `B` their gradients from the
/// rank-r products alone, where the same layer as separate ops makes and zero-fills and adds
/// three output-sized gradients. `x` is 2-D.
pub fn lora_linear(x: &Tensor, frozen: &Frozen, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        LoraOp {
            frozen: frozen.clone(),
            scale,
        },
    )
}

/// A frozen linear layer's weight (out × in, row-major) and bias as plain slices, taken once.
#[derive(Clone, Debug)]
pub struct Frozen {
    weight_tensor: Tensor,
    weight: std::sync::Arc<Vec<f32>>,
    bias: Option<std::sync::Arc<Vec<f32>>>,
}

impl Frozen {
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Frozen> {
        Ok(Frozen {
            weight_tensor: weight.clone(),
            weight: std::sync::Arc::new(weight.flatten_all()?.to_vec1::<f32>()?),
            bias: bias
                .map(|b| b.flatten_all()?.to_vec1::<f32>().map(std::sync::Arc::new))
                .transpose()?,
        })
    }
}

impl Frozen {
    /// `rows` copies of the bias (zeros without one): where a GEMM accumulates the product.
    fn bias_rows(&self, rows: usize, out: usize) -> Vec<f32> {
        match &self.bias {
            Some(bias) if bias.len() == out => bias.iter().copied().cycle().take(rows * out).collect(),
            _ => vec![0f32; rows * out],
        }
    }
}

/// `dst (m×n) = [dst +] alpha · lhs (m×k) · rhs (k×n)`, each operand given by its (row, column)
/// strides, on the calling thread's rayon pool.
///
/// # Safety
/// The strides and sizes must stay within each slice.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_rm(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    (lrs, lcs): (usize, usize),
    rhs: &[f32],
    (rrs, rcs): (usize, usize),
    alpha: f32,
    accumulate: bool,
) {
    debug_assert!(dst.len() >= m * n);
    debug_assert!(m == 0 || k == 0 || (m - 1) * lrs + (k - 1) * lcs < lhs.len());
    debug_assert!(k == 0 || n == 0 || (k - 1) * rrs + (n - 1) * rcs < rhs.len());
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst.as_mut_ptr(),
        1,
        n as isize,
        accumulate,
        lhs.as_ptr(),
        lcs as isize,
        lrs as isize,
        rhs.as_ptr(),
        rcs as isize,
        rrs as isize,
        1.0,
        alpha,
        false,
        false,
        false,
        par,
    )
}

struct LoraOp {
    frozen: Frozen,
    scale: f64,
}

impl CustomOp3 for LoraOp {
    fn name(&self) -> &'static str {
        "nb-lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, a, b) = (slice(s1, l1, "x")?, slice(s2, l2, "lora_a")?, slice(s3, l3, "lora_b")?);
        let (rows, inp) = l1.shape().dims2()?;
        let (r, out) = (l2.shape().dims2()?.0, l3.shape().dims2()?.0);
        let w = &self.frozen.weight;
        if w.len() != out * inp || a.len() != r * inp || b.len() != out * r {
            return Err(candle_core::Error::Msg(format!(
                "lora layer: x {rows}×{inp}, weight {} values, A {:?}, B {:?}",
                w.len(),
                l2.dims(),
                l3.dims()
            )));
        }
        // y = bias, then y += x·Wᵀ, then y += scale·(x·Aᵀ)·Bᵀ: three GEMMs on the slices, no copy.
        let mut y = self.frozen.bias_rows(rows, out);
        let mut xa = vec![0f32; rows * r];
        // SAFETY: every matrix's extent is checked against its slice above.
        unsafe {
            gemm_rm(&mut y, rows, out, inp, x, (inp, 1), w, (1, inp), 1.0, true);
            gemm_rm(&mut xa, rows, r, inp, x, (inp, 1), a, (1, inp), 1.0, false);
            gemm_rm(&mut y, rows, out, r, &xa, (r, 1), b, (1, r), self.scale as f32, true);
        }
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The first layer after frozen inputs has no gradient to give its input.
        let needs_dx = x.track_op();
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let dyb = (dy.matmul(&b)? * self.scale)?; // (rows, r)
        let da = dyb.t()?.matmul(&x)?; // (r, in)
        let db = (dy.t()?.matmul(&x.matmul(&a.t()?)?)? * self.scale)?; // (out, r)
        let dx = if needs_dx {
            Some((dy.matmul(&self.frozen.weight_tensor)? + dyb.matmul(&a)?)?)
        } else {
            None
        };
        Ok((dx, Some(da), Some(db)))
    }
}

struct FrozenLinear {
    frozen: Frozen,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "nb-frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "x")?;
        let (rows, inp) = l.shape().dims2()?;
        let w = &self.frozen.weight;
        let out = w.len() / inp.max(1);
        if w.len() != out * inp {
            return Err(candle_core::Error::Msg(format!(
                "frozen linear: x {rows}×{inp}, weight {} values",
                w.len()
            )));
        }
        let mut y = self.frozen.bias_rows(rows, out);
        // SAFETY: the extents are checked above.
        unsafe { gemm_rm(&mut y, rows, out, inp, x, (inp, 1), w, (1, inp), 1.0, true) };
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.frozen.weight_tensor)?))
    }
}

/// `y = (x − mean) / sqrt(var + eps) · weight + bias` over the last dimension.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    let x = x.contiguous()?;
    x.apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNorm { eps })
}

struct LayerNorm {
    eps: f32,
}

/// The f32 slice of a contiguous storage.
fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("layer norm: {what} is not contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        _ => Err(candle_core::Error::Msg(format!("layer norm: {what} is not f32"))),
    }
}

/// Mean and 1/std of a row.
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let d = row.len() as f32;
    let mean = row.iter().sum::<f32>() / d;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "nb-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (slice(s1, l1, "x")?, slice(s2, l2, "weight")?, slice(s3, l3, "bias")?);
        let d = w.len();
        if d == 0 || b.len() != d || x.len() % d != 0 || l1.dims().last() != Some(&d) {
            return Err(candle_core::Error::Msg(format!(
                "layer norm: x {:?}, weight {}, bias {}",
                l1.dims(),
                d,
                b.len()
            )));
        }
        let mut y = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let (mean, rstd) = moments(xr, self.eps);
            for i in 0..d {
                yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
            }
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = weight.dim(0)?;
        let rows = x.elem_count() / d;
        // One kernel writes [dx (rows × d); dweight; dbias] as one (rows + 2) × d tensor.
        let packed = x.reshape((rows, d))?.apply_op3_no_bwd(
            &weight.contiguous()?,
            &grad.contiguous()?.reshape((rows, d))?,
            &LayerNormBackward { eps: self.eps },
        )?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = packed.narrow(0, rows, 1)?.reshape(d)?;
        let db = packed.narrow(0, rows + 1, 1)?.reshape(d)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

struct LayerNormBackward {
    eps: f32,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "nb-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, g) = (slice(s1, l1, "x")?, slice(s2, l2, "weight")?, slice(s3, l3, "grad")?);
        let d = w.len();
        if d == 0 || g.len() != x.len() || x.len() % d != 0 {
            return Err(candle_core::Error::Msg(format!(
                "layer norm backward: x {} values, weight {d}, grad {}",
                x.len(),
                g.len()
            )));
        }
        let rows = x.len() / d;
        let mut out = vec![0f32; (rows + 2) * d];
        let (dx, tail) = out.split_at_mut(rows * d);
        let (dw, db) = tail.split_at_mut(d);
        let mut xhat = vec![0f32; d];
        for ((xr, gr), dxr) in x.chunks_exact(d).zip(g.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let (mean, rstd) = moments(xr, self.eps);
            let (mut sum_g, mut sum_gx) = (0f32, 0f32);
            for i in 0..d {
                xhat[i] = (xr[i] - mean) * rstd;
                let gw = gr[i] * w[i];
                sum_g += gw;
                sum_gx += gw * xhat[i];
                dw[i] += gr[i] * xhat[i];
                db[i] += gr[i];
            }
            let (mg, mgx) = (sum_g / d as f32, sum_gx / d as f32);
            for i in 0..d {
                dxr[i] = rstd * (gr[i] * w[i] - mg - xhat[i] * mgx);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, d))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::model::seeded_randn;

    #[test]
    fn silu_matches_candles_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(seeded_randn(1, &[4, 33], &dev).unwrap() * 3.0).unwrap()).unwrap();
        let probe = seeded_randn(2, &[4, 33], &dev).unwrap();
        let run = |y: Tensor| {
            let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (flat(&y), flat(g.get(&x).unwrap()))
        };
        let (ours, theirs) = (run(silu(x.as_tensor()).unwrap()), run(x.as_tensor().silu().unwrap()));
        for (name, p, q) in [("y", &ours.0, &theirs.0), ("dx", &ours.1, &theirs.1)] {
            let worst = p.iter().zip(q.iter()).map(|(u, v)| (u - v).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5, "{name} differs by {worst}");
        }
    }

    #[test]
    fn a_fused_lora_layer_matches_its_ops_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&seeded_randn(1, &[9, 12], &dev).unwrap()).unwrap();
        let w = seeded_randn(2, &[5, 12], &dev).unwrap();
        let bias = seeded_randn(3, &[5], &dev).unwrap();
        let a = Var::from_tensor(&seeded_randn(4, &[3, 12], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&seeded_randn(5, &[5, 3], &dev).unwrap()).unwrap();
        let probe = seeded_randn(6, &[9, 5], &dev).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let run = |y: Tensor| {
            let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            [
                flat(&y),
                flat(g.get(&x).unwrap()),
                flat(g.get(&a).unwrap()),
                flat(g.get(&b).unwrap()),
            ]
        };
        let frozen = Frozen::new(&w, Some(&bias)).unwrap();
        let ours = run(lora_linear(x.as_tensor(), &frozen, a.as_tensor(), b.as_tensor(), 0.5).unwrap());
        let ops = x
            .as_tensor()
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap()
            .add(
                &(x.as_tensor().matmul(&a.as_tensor().t().unwrap()).unwrap() * 0.5)
                    .unwrap()
                    .matmul(&b.as_tensor().t().unwrap())
                    .unwrap(),
            )
            .unwrap();
        let theirs = run(ops);
        for (name, p, q) in ["y", "dx", "da", "db"]
            .iter()
            .zip(&ours)
            .zip(&theirs)
            .map(|((n, p), q)| (n, p, q))
        {
            let worst = p.iter().zip(q.iter()).map(|(u, v)| (u - v).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "{name} differs by {worst}");
        }
    }

    #[test]
    fn a_frozen_linear_matches_candles_and_gives_its_input_the_same_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&seeded_randn(1, &[7, 12], &dev).unwrap()).unwrap();
        let w = seeded_randn(2, &[5, 12], &dev).unwrap();
        let b = seeded_randn(3, &[5], &dev).unwrap();
        let probe = seeded_randn(4, &[7, 5], &dev).unwrap();
        let ours = frozen_linear(x.as_tensor(), &Frozen::new(&w, Some(&b)).unwrap()).unwrap();
        let theirs = x
            .as_tensor()
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let grad = |y: &Tensor| {
            let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&ours), flat(&theirs));
        let (gx, gy) = (grad(&ours), grad(&theirs));
        let worst = gx.iter().zip(&gy).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "dx differs by {worst}");
    }

    #[test]
    fn matches_candles_differentiable_layer_norm_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&seeded_randn(1, &[3, 5, 16], &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&(seeded_randn(2, &[16], &dev).unwrap() + 1.0).unwrap()).unwrap();
        let b = Var::from_tensor(&seeded_randn(3, &[16], &dev).unwrap()).unwrap();
        let probe = seeded_randn(4, &[3, 5, 16], &dev).unwrap();
        let run = |fused: bool| {
            let y = if fused {
                layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap()
            } else {
                candle_nn::ops::layer_norm_slow(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap()
            };
            let loss = (&y * &probe).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (
                flat(&y),
                flat(g.get(&x).unwrap()),
                flat(g.get(&w).unwrap()),
                flat(g.get(&b).unwrap()),
            )
        };
        let (a, b2) = (run(true), run(false));
        for (name, p, q) in [
            ("y", &a.0, &b2.0),
            ("dx", &a.1, &b2.1),
            ("dw", &a.2, &b2.2),
            ("db", &a.3, &b2.3),
        ] {
            let worst = p.iter().zip(q.iter()).map(|(u, v)| (u - v).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "{name} differs by {worst}");
        }
    }
}
