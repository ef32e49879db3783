//! Export: a checkpoint's variables to GGUF (f32, f16, q8_0 or MXFP4 weights, the policy
//! config and normalization statistics as metadata keys), and back into a model.
//!
//! Linear weights whose rows are whole 32-value blocks are quantized; everything else
//! (biases, LayerNorms, embeddings, odd shapes) stays f32. Loading dequantizes into f32
//! tensors, so an MXFP4 file runs with MXFP4 weight precision.

use candle_core::Tensor;
use candle_nn::VarMap;

use crate::checkpoint::Meta;
use crate::config::PolicyConfig;
use crate::gguf::{self, Gguf, GgufError, Value};
use crate::quant::DType;

/// The architecture name in `general.architecture`.
pub const ARCHITECTURE: &str = "nanobot-policy";

fn quantizable(name: &str, dims: &[usize], dtype: DType) -> bool {
    dtype == DType::F32
        || (name.ends_with("weight")
            && dims.len() == 2
            && dims[1].is_multiple_of(dtype.block().0)
            && !name.contains("ln"))
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, Value)>) {
    match v {
        serde_json::Value::Object(m) => m.iter().for_each(|(k, x)| flatten(&format!("{prefix}.{k}"), x, out)),
        serde_json::Value::Number(n) if n.is_u64() => out.push((prefix.into(), Value::U64(n.as_u64().unwrap_or(0)))),
        serde_json::Value::Number(n) => out.push((prefix.into(), Value::F64(n.as_f64().unwrap_or(0.0)))),
        serde_json::Value::String(s) => out.push((prefix.into(), Value::String(s.clone()))),
        serde_json::Value::Bool(b) => out.push((prefix.into(), Value::Bool(*b))),
        serde_json::Value::Array(a) => {
            let items = a
                .iter()
                .filter_map(|x| x.as_str().map(|s| Value::String(s.into())))
                .collect::<Vec<_>>();
            if items.len() == a.len() {
                out.push((prefix.into(), Value::Array(items)));
            } else {
                out.push((
                    prefix.into(),
                    Value::Array(a.iter().map(|x| Value::F32(x.as_f64().unwrap_or(0.0) as f32)).collect()),
                ));
            }
        }
        serde_json::Value::Null => {}
    }
}

/// Build the GGUF of `vars` with `meta`, weights stored as `dtype`.
pub fn to_gguf(vars: &VarMap, meta: &Meta, dtype: DType) -> Result<Gguf, GgufError> {
    let mut g = Gguf::default();
    g.metadata
        .insert("general.architecture".into(), Value::String(ARCHITECTURE.into()));
    g.metadata
        .insert("general.name".into(), Value::String(meta.version.clone()));
    g.metadata
        .insert("general.file_type".into(), Value::String(dtype.name().into()));
    let mut kv = Vec::new();
    flatten(
        "nanobot.config",
        &serde_json::to_value(&meta.config).unwrap_or_default(),
        &mut kv,
    );
    flatten(
        "nanobot.norm",
        &serde_json::to_value(&meta.norm).unwrap_or_default(),
        &mut kv,
    );
    g.metadata.extend(kv);
    // The exact config too, so a reader rebuilds the model without guessing.
    g.metadata.insert(
        "nanobot.config_json".into(),
        Value::String(serde_json::to_string(&meta.config).unwrap_or_default()),
    );
    g.metadata.insert(
        "nanobot.norm_json".into(),
        Value::String(serde_json::to_string(&meta.norm).unwrap_or_default()),
    );
    let data = vars.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let t = data[name].as_tensor();
        let dims = t.dims().to_vec();
        let values = t
            .flatten_all()
            .and_then(|x| x.to_vec1::<f32>())
            .map_err(|e| GgufError::Tensor {
                name: name.clone(),
                reason: e.to_string(),
            })?;
        let dt = if quantizable(name, &dims, dtype) {
            dtype
        } else {
            DType::F32
        };
        let shape: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
        g.tensors.push(gguf::Tensor::quantized(name, &shape, dt, &values)?);
    }
    Ok(g)
}

/// The policy config a GGUF export carries.
pub fn gguf_config(g: &Gguf) -> Result<PolicyConfig, GgufError> {
    let text = g
        .metadata
        .get("nanobot.config_json")
        .and_then(Value::as_str)
        .ok_or_else(|| GgufError::Tensor {
            name: "nanobot.config_json".into(),
            reason: "metadata missing: not a NanoBot policy export".into(),
        })?;
    serde_json::from_str(text).map_err(|e| GgufError::Tensor {
        name: "nanobot.config_json".into(),
        reason: e.to_string(),
    })
}

/// Load a GGUF export into `vars` (dequantized), checking names and shapes.
pub fn load_gguf_into(g: &Gguf, vars: &VarMap) -> Result<(), GgufError> {
    let data = vars.data().lock().unwrap_or_else(|e| e.into_inner());
    for (name, var) in data.iter() {
        let t = g.tensor(name).ok_or_else(|| GgufError::Tensor {
            name: name.clone(),
            reason: "missing from the file".into(),
        })?;
        let dims: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        if dims != var.dims() {
            return Err(GgufError::Tensor {
                name: name.clone(),
                reason: format!("shape {dims:?}, the model needs {:?}", var.dims()),
            });
        }
        let values = t.values()?;
        let tensor = Tensor::from_vec(values, dims, var.device()).and_then(|x| var.set(&x));
        tensor.map_err(|e| GgufError::Tensor {
            name: name.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// Bytes the weights take as f32 and as `dtype` (what the export saves).
pub fn weight_bytes(vars: &VarMap, dtype: DType) -> (usize, usize) {
    let data = vars.data().lock().unwrap_or_else(|e| e.into_inner());
    data.iter().fold((0, 0), |(f, q), (name, v)| {
        let n = v.elem_count();
        let dt = if quantizable(name, v.dims(), dtype) {
            dtype
        } else {
            DType::F32
        };
        (f + 4 * n, q + dt.bytes_for(n).unwrap_or(4 * n))
    })
}
