//! LoRA (Hu et al. 2021) for candle: `y = W x + b + (α / r) · B A x`, with the base `W, b`
//! frozen in one `VarMap` and the adapter `A` (r × in, Kaiming-initialized) and `B`
//! (out × r, zeros) trained in another, so the adapter is saved, shipped and swapped on its
//! own and a fresh adapter leaves the base output exactly as it was.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

/// The adapter half of a [`LoraLinear`].
#[derive(Clone, Debug)]
pub struct Adapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

/// A linear layer with an optional LoRA adapter.
#[derive(Clone, Debug)]
pub struct LoraLinear {
    base: Linear,
    adapter: Option<Adapter>,
    /// The base's weight as a plain slice, for the fused training kernel (taken on first use).
    frozen: std::sync::OnceLock<crate::fused::Frozen>,
}

impl LoraLinear {
    /// `base_vb` holds `weight` (out × in) and `bias` (out); `adapter_vb`, when given, holds
    /// `lora_a` and `lora_b` under the same prefix.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        base_vb: VarBuilder,
        adapter: Option<(VarBuilder, usize, f64)>,
    ) -> Result<Self> {
        let base = candle_nn::linear(in_dim, out_dim, base_vb)?;
        let adapter = match adapter {
            Some((vb, rank, alpha)) => Some(Adapter {
                a: vb.get_with_hints((rank, in_dim), "lora_a", candle_nn::init::DEFAULT_KAIMING_NORMAL)?,
                b: vb.get_with_hints((out_dim, rank), "lora_b", Init::Const(0.0))?,
                scale: alpha / rank as f64,
            }),
            None => None,
        };
        Ok(LoraLinear {
            base,
            adapter,
            frozen: std::sync::OnceLock::new(),
        })
    }

    pub fn base(&self) -> &Linear {
        &self.base
    }
    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }
}

impl Module for LoraLinear {
    /// Leading dimensions are flattened so that every product is one 2-D GEMM (a batched
    /// matmul against a broadcast weight costs a reduction over the batch in the backward pass).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (last, lead) = match dims.split_last() {
            Some((l, lead)) if lead.len() > 1 => (*l, lead.to_vec()),
            _ => return self.forward_2d(x),
        };
        let rows: usize = lead.iter().product();
        let y = self.forward_2d(&x.reshape((rows, last))?)?;
        let mut out = lead;
        out.push(y.dim(1)?);
        y.reshape(out)
    }
}

impl LoraLinear {
    fn forward_2d(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.base.weight();
        let base_frozen = !w.track_op() && !self.base.bias().is_some_and(|b| b.track_op());
        let frozen = || -> Result<&crate::fused::Frozen> {
            if let Some(f) = self.frozen.get() {
                return Ok(f);
            }
            let f = crate::fused::Frozen::new(w, self.base.bias())?;
            Ok(self.frozen.get_or_init(|| f))
        };
        // Training the adapter on a frozen base: the whole layer is one node of the graph.
        if let Some(ad) = &self.adapter {
            if x.rank() == 2 && base_frozen && (ad.a.track_op() || ad.b.track_op()) {
                return crate::fused::lora_linear(x, frozen()?, &ad.a, &ad.b, ad.scale);
            }
        }
        // A gradient flows through a frozen layer: only its input takes one.
        let y = if x.rank() == 2 && x.track_op() && base_frozen {
            crate::fused::frozen_linear(x, frozen()?)?
        } else {
            self.base.forward(x)?
        };
        match &self.adapter {
            None => Ok(y),
            Some(ad) => {
                // The scale on the rank-r intermediate, not on the output: a pass over r columns
                // instead of `out`.
                let h = (x.matmul(&ad.a.t()?)? * ad.scale)?.matmul(&ad.b.t()?)?;
                y + h
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn layer(base: &VarMap, adapter: &VarMap) -> LoraLinear {
        let dev = Device::Cpu;
        let bvb = VarBuilder::from_varmap(base, DType::F32, &dev);
        let avb = VarBuilder::from_varmap(adapter, DType::F32, &dev);
        LoraLinear::new(8, 5, bvb.pp("l"), Some((avb.pp("l"), 4, 8.0))).unwrap()
    }

    #[test]
    fn a_fresh_adapter_gives_exactly_the_base_output() {
        let (base, adapter) = (VarMap::new(), VarMap::new());
        let l = layer(&base, &adapter);
        let x = Tensor::randn(0f32, 1.0, (3, 8), &Device::Cpu).unwrap();
        let with = l.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let without = l.base().forward(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(with, without, "B = 0: bit for bit");
    }
}
