//! Training kernels with their own backward passes.
//!
//! A layer norm as one CPU kernel with its own backward pass. candle's fast layer norm has no
//! backward, and its differentiable form (`layer_norm_slow`) is ten element-wise ops forward and
//! about twenty backward, each a tensor allocated and walked: at this model's sizes the
//! allocations, not the arithmetic, are the cost. Here the forward is one pass per row and the
//! backward one kernel that writes the input's, the scale's and the shift's gradients together.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Device, Layout, Result, Shape, Tensor};

/// `x · weightᵀ + bias` for a weight that is not trained (a LoRA adapter's base): candle's
/// matmul backward computes the gradient of both operands, and a constant weight's is a
/// product as large as the forward one, thrown away, plus the bias's reduction. This op's
/// backward gives `x` its gradient and nothing else. `x` is 2-D.
pub fn frozen_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    x.apply_op1(FrozenLinear {
        weight: weight.clone(),
        bias: bias.cloned(),
    })
}

struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "nb-frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = Tensor::from_slice(slice(s, l, "x")?, l.dims(), &Device::Cpu)?;
        let y = x.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight)?))
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
    fn a_frozen_linear_matches_candles_and_gives_its_input_the_same_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&seeded_randn(1, &[7, 12], &dev).unwrap()).unwrap();
        let w = seeded_randn(2, &[5, 12], &dev).unwrap();
        let b = seeded_randn(3, &[5], &dev).unwrap();
        let probe = seeded_randn(4, &[7, 5], &dev).unwrap();
        let ours = frozen_linear(x.as_tensor(), &w, Some(&b)).unwrap();
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
