//! Checkpoints as safetensors files whose metadata carries a format version, what the file is
//! (a base model or an adapter), the full policy config and the normalization statistics. A
//! file is loaded only into the model it was made for: a different version, kind, config or
//! set of tensor shapes is refused with what differs. Files are written under a temporary
//! name and renamed, so a crash never leaves half a checkpoint.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::PolicyConfig;

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("checkpoint {file}: {reason}")]
    Refused { file: String, reason: String },
    #[error("checkpoint {file}: {source}")]
    Io { file: String, source: std::io::Error },
    #[error("checkpoint {file}: {reason}")]
    Format { file: String, reason: String },
}

/// What the checkpoint holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Base,
    Adapter,
}

/// Min-max statistics that map states and actions to [-1, 1] and back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NormStats {
    pub state_min: Vec<f32>,
    pub state_max: Vec<f32>,
    pub action_min: Vec<f32>,
    pub action_max: Vec<f32>,
}

fn to_unit(x: f32, lo: f32, hi: f32) -> f32 {
    let span = (hi - lo).max(1e-6);
    (x - lo) / span * 2.0 - 1.0
}

fn from_unit(u: f32, lo: f32, hi: f32) -> f32 {
    (u.clamp(-1.0, 1.0) + 1.0) / 2.0 * (hi - lo) + lo
}

impl NormStats {
    /// Statistics of observed states and actions (rows of `state_dim` / `action_dim` values).
    pub fn fit(states: &[Vec<f32>], actions: &[Vec<f32>]) -> NormStats {
        let minmax = |rows: &[Vec<f32>]| {
            let d = rows.first().map(Vec::len).unwrap_or(0);
            let mut lo = vec![f32::INFINITY; d];
            let mut hi = vec![f32::NEG_INFINITY; d];
            for r in rows {
                for (i, &v) in r.iter().enumerate().take(d) {
                    lo[i] = lo[i].min(v);
                    hi[i] = hi[i].max(v);
                }
            }
            (lo, hi)
        };
        let (state_min, state_max) = minmax(states);
        let (action_min, action_max) = minmax(actions);
        NormStats {
            state_min,
            state_max,
            action_min,
            action_max,
        }
    }
    pub fn normalize_state(&self, s: &[f32]) -> Vec<f32> {
        s.iter()
            .enumerate()
            .map(|(i, &v)| {
                to_unit(
                    v,
                    self.state_min[i % self.state_min.len()],
                    self.state_max[i % self.state_max.len()],
                )
            })
            .collect()
    }
    pub fn normalize_action(&self, a: &[f32]) -> Vec<f32> {
        let d = self.action_min.len();
        a.iter()
            .enumerate()
            .map(|(i, &v)| to_unit(v, self.action_min[i % d], self.action_max[i % d]))
            .collect()
    }
    /// Back to robot units, clipped to the range seen in training.
    pub fn denormalize_action(&self, a: &[f32]) -> Vec<f32> {
        let d = self.action_min.len();
        a.iter()
            .enumerate()
            .map(|(i, &v)| from_unit(v, self.action_min[i % d], self.action_max[i % d]))
            .collect()
    }
}

/// The metadata every checkpoint carries.
#[derive(Clone, Debug, PartialEq)]
pub struct Meta {
    pub kind: Role,
    /// A name for this base or adapter (stamped on the actions it produces).
    pub version: String,
    pub config: PolicyConfig,
    pub norm: NormStats,
}

const K_FORMAT: &str = "nanobot.format_version";
const K_KIND: &str = "nanobot.kind";
const K_VERSION: &str = "nanobot.version";
const K_CONFIG: &str = "nanobot.config";
const K_NORM: &str = "nanobot.norm";

/// Write every variable of `vars` with `meta`.
pub fn save(path: &Path, vars: &VarMap, meta: &Meta) -> Result<(), CheckpointError> {
    let file = path.display().to_string();
    let bytes = to_bytes(vars, meta).map_err(|reason| CheckpointError::Format {
        file: file.clone(),
        reason,
    })?;
    let tmp = path.with_extension("safetensors.tmp");
    let io = |source| CheckpointError::Io {
        file: file.clone(),
        source,
    };
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// A checkpoint's bytes (safetensors with `meta`): what `save` writes, and what a trainer
/// ships as a candidate adapter.
pub fn to_bytes(vars: &VarMap, meta: &Meta) -> Result<Vec<u8>, String> {
    let fmt = |reason: String| reason;
    let mut md = HashMap::new();
    md.insert(K_FORMAT.to_string(), FORMAT_VERSION.to_string());
    md.insert(
        K_KIND.to_string(),
        serde_json::to_string(&meta.kind)
            .map_err(|e| fmt(e.to_string()))?
            .trim_matches('"')
            .to_string(),
    );
    md.insert(K_VERSION.to_string(), meta.version.clone());
    md.insert(
        K_CONFIG.to_string(),
        serde_json::to_string(&meta.config).map_err(|e| fmt(e.to_string()))?,
    );
    md.insert(
        K_NORM.to_string(),
        serde_json::to_string(&meta.norm).map_err(|e| fmt(e.to_string()))?,
    );
    let data = vars.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut tensors: Vec<(String, Tensor)> = data.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(md))
        .map_err(|e| fmt(e.to_string()))?;
    canonical_header(&mut bytes)?;
    Ok(bytes)
}

/// Rewrite a safetensors header with its keys sorted: `safetensors::serialize` writes the
/// metadata map in a hash map's order, so the same weights would give different bytes (and a
/// different sha256) from one call to the next. The header keeps its length.
fn canonical_header(bytes: &mut [u8]) -> Result<(), String> {
    let len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize)
        .ok_or("safetensors without a header")?;
    let header = bytes.get(8..8 + len).ok_or("safetensors header overruns the file")?;
    let value: serde_json::Value = serde_json::from_slice(header).map_err(|e| format!("safetensors header: {e}"))?;
    // serde_json's map is ordered by key (no `preserve_order`).
    let sorted = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
    if sorted.len() > len {
        return Err("canonical header longer than the original".into());
    }
    let out = &mut bytes[8..8 + len];
    out[..sorted.len()].copy_from_slice(&sorted);
    out[sorted.len()..].fill(b' ');
    Ok(())
}

/// Read a checkpoint's metadata and tensors.
pub fn read(path: &Path) -> Result<(Meta, HashMap<String, Tensor>), CheckpointError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
        file: file.clone(),
        source,
    })?;
    read_bytes(&bytes, &file)
}

/// Read a checkpoint's metadata and tensors from its bytes; `file` names them in errors (a
/// path, or the adapter id a promotion shipped).
pub fn read_bytes(bytes: &[u8], file: &str) -> Result<(Meta, HashMap<String, Tensor>), CheckpointError> {
    let refuse = |reason: String| CheckpointError::Refused {
        file: file.to_string(),
        reason,
    };
    let (_, header) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| refuse(format!("not a safetensors file: {e}")))?;
    let md = header.metadata().clone().unwrap_or_default();
    let get = |k: &str| {
        md.get(k)
            .ok_or_else(|| refuse(format!("metadata {k} is missing: not a NanoBot checkpoint")))
    };
    let format = get(K_FORMAT)?;
    if format != &FORMAT_VERSION.to_string() {
        return Err(refuse(format!(
            "format version {format}, this build reads {FORMAT_VERSION}"
        )));
    }
    let kind: Role =
        serde_json::from_str(&format!("\"{}\"", get(K_KIND)?)).map_err(|e| refuse(format!("{K_KIND}: {e}")))?;
    let config: PolicyConfig = serde_json::from_str(get(K_CONFIG)?).map_err(|e| refuse(format!("{K_CONFIG}: {e}")))?;
    let norm: NormStats = serde_json::from_str(get(K_NORM)?).map_err(|e| refuse(format!("{K_NORM}: {e}")))?;
    let version = get(K_VERSION)?.clone();
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| refuse(e.to_string()))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
            .map_err(|e| refuse(format!("tensor {name}: {e}")))?;
        tensors.insert(name, t);
    }
    Ok((
        Meta {
            kind,
            version,
            config,
            norm,
        },
        tensors,
    ))
}

/// Load a checkpoint into `vars`, which must hold exactly its tensors with the same shapes,
/// for the same config and kind. Returns its metadata.
pub fn load_into(path: &Path, vars: &VarMap, config: &PolicyConfig, kind: Role) -> Result<Meta, CheckpointError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
        file: file.clone(),
        source,
    })?;
    load_bytes_into(&bytes, &file, vars, config, kind)
}

/// [`load_into`] from a checkpoint's bytes; `file` names them in errors. Every tensor must be
/// finite: a NaN or an infinity is refused, naming the tensor.
pub fn load_bytes_into(
    bytes: &[u8],
    file: &str,
    vars: &VarMap,
    config: &PolicyConfig,
    kind: Role,
) -> Result<Meta, CheckpointError> {
    let refuse = |reason: String| CheckpointError::Refused {
        file: file.to_string(),
        reason,
    };
    let (meta, tensors) = read_bytes(bytes, file)?;
    if meta.kind != kind {
        return Err(refuse(format!("holds a {:?}, expected a {kind:?}", meta.kind)));
    }
    if &meta.config != config {
        return Err(refuse(format!(
            "was made for another policy config: {}",
            config_diff(&meta.config, config)
        )));
    }
    let data = vars.data().lock().unwrap_or_else(|e| e.into_inner());
    for (name, var) in data.iter() {
        let t = tensors
            .get(name)
            .ok_or_else(|| refuse(format!("tensor {name} is missing")))?;
        if t.shape() != var.shape() {
            return Err(refuse(format!(
                "tensor {name} has shape {:?}, the model needs {:?}",
                t.dims(),
                var.dims()
            )));
        }
        let finite = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| refuse(format!("tensor {name}: {e}")))?
            .iter()
            .all(|v| v.is_finite());
        if !finite {
            return Err(refuse(format!("tensor {name} holds a NaN or an infinity")));
        }
    }
    if let Some(extra) = tensors.keys().find(|k| !data.contains_key(*k)) {
        return Err(refuse(format!("tensor {extra} is not part of this model")));
    }
    for (name, var) in data.iter() {
        var.set(&tensors[name].to_dtype(var.dtype()).map_err(|e| refuse(e.to_string()))?)
            .map_err(|e| refuse(format!("tensor {name}: {e}")))?;
    }
    Ok(meta)
}

/// The first top-level section where two configs differ, for error messages.
fn config_diff(a: &PolicyConfig, b: &PolicyConfig) -> String {
    let (a, b) = (
        serde_json::to_value(a).unwrap_or_default(),
        serde_json::to_value(b).unwrap_or_default(),
    );
    for section in ["vision", "trunk", "inputs", "head", "lora"] {
        if a[section] != b[section] {
            return format!("[{section}] is {} in the file, {} here", a[section], b[section]);
        }
    }
    "configs differ".into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::VarBuilder;

    fn cfg() -> PolicyConfig {
        PolicyConfig::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/policy/tiny.toml")).unwrap()
    }

    fn model(vars: &VarMap) {
        let vb = VarBuilder::from_varmap(vars, DType::F32, &Device::Cpu);
        candle_nn::linear(6, 4, vb.pp("a")).unwrap();
        candle_nn::linear(4, 2, vb.pp("b")).unwrap();
    }

    fn meta() -> Meta {
        Meta {
            kind: Role::Base,
            version: "base-test".into(),
            config: cfg(),
            norm: NormStats::fit(&[vec![0.0; 6], vec![1.0; 6]], &[vec![-1.0, -2.0], vec![1.0, 2.0]]),
        }
    }

    /// A scratch directory of the test's own, removed when it is dropped (a failing test's
    /// unwinding too).
    fn scratch() -> tempfile::TempDir {
        tempfile::Builder::new().prefix("nanobot-ckpt-").tempdir().unwrap()
    }

    #[test]
    fn save_then_load_round_trips_bit_for_bit() {
        let (a, b) = (VarMap::new(), VarMap::new());
        model(&a);
        model(&b);
        let dir = scratch();
        let path = dir.path().join("rt.safetensors");
        save(&path, &a, &meta()).unwrap();
        let got = load_into(&path, &b, &cfg(), Role::Base).unwrap();
        assert_eq!(got, meta());
        let (da, db) = (a.data().lock().unwrap(), b.data().lock().unwrap());
        for (k, v) in da.iter() {
            let (x, y) = (
                v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                db[k].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(
                x.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
                y.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
                "{k}"
            );
        }
    }

    #[test]
    fn mismatched_files_are_refused_with_what_differs() {
        let a = VarMap::new();
        model(&a);
        let dir = scratch();
        let path = dir.path().join("mm.safetensors");
        save(&path, &a, &meta()).unwrap();
        // Another config.
        let mut other = cfg();
        other.head.horizon = 8;
        let e = load_into(&path, &a, &other, Role::Base).unwrap_err().to_string();
        assert!(e.contains("[head]") && e.contains("mm.safetensors"), "{e}");
        // Another kind.
        let e = load_into(&path, &a, &cfg(), Role::Adapter).unwrap_err().to_string();
        assert!(e.contains("Adapter"), "{e}");
        // Other shapes.
        let c = VarMap::new();
        let vb = VarBuilder::from_varmap(&c, DType::F32, &Device::Cpu);
        candle_nn::linear(6, 5, vb.pp("a")).unwrap();
        candle_nn::linear(5, 2, vb.pp("b")).unwrap();
        let e = load_into(&path, &c, &cfg(), Role::Base).unwrap_err().to_string();
        assert!(e.contains("shape"), "{e}");
        // Not a checkpoint at all, and a truncated one.
        std::fs::write(dir.path().join("junk.safetensors"), b"junk").unwrap();
        assert!(load_into(&dir.path().join("junk.safetensors"), &a, &cfg(), Role::Base).is_err());
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(dir.path().join("cut.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
        assert!(load_into(&dir.path().join("cut.safetensors"), &a, &cfg(), Role::Base).is_err());
    }

    #[test]
    fn norm_stats_map_to_the_unit_range_and_back() {
        let n = meta().norm;
        assert_eq!(n.normalize_action(&[-1.0, 2.0]), vec![-1.0, 1.0]);
        assert_eq!(n.denormalize_action(&[0.0, 0.0]), vec![0.0, 0.0]);
        assert_eq!(
            n.denormalize_action(&[5.0, -5.0]),
            vec![1.0, -2.0],
            "clipped to the trained range"
        );
    }
}
