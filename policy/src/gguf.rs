//! GGUF v3, the file format of ggml and llama.cpp: a header, typed metadata keys (the model
//! config rides there), tensor descriptions, then aligned tensor data.
//!
//! Layout (all little-endian): magic `GGUF`, version u32 = 3, tensor count u64, metadata count
//! u64; each metadata entry is a string key, a u32 value type and the value; each tensor is a
//! string name, u32 dimension count, u64 dimensions innermost first (ggml's `ne`), u32 ggml
//! type and u64 offset into the data section; the data section starts at the next multiple of
//! `general.alignment` (32) and every tensor starts aligned. Strings are a u64 length and UTF-8.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::quant::{DType, QuantError};

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const VERSION: u32 = 3;
pub const ALIGNMENT: usize = 32;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum GgufError {
    #[error("not a GGUF file (magic {0:02x?})")]
    Magic([u8; 4]),
    #[error("GGUF version {0} is not supported (this build reads and writes version 3)")]
    Version(u32),
    #[error("GGUF file truncated while reading {what} at byte {at}")]
    Truncated { what: String, at: usize },
    #[error("GGUF metadata {key:?}: unsupported value type {ty}")]
    ValueType { key: String, ty: u32 },
    #[error("GGUF tensor {name:?}: {reason}")]
    Tensor { name: String, reason: String },
    #[error("GGUF string at byte {0} is not UTF-8")]
    Utf8(usize),
    #[error(transparent)]
    Quant(#[from] QuantError),
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::F64(_) => 12,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I32(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
}

/// A tensor: `shape` is row-major (outermost first, as numpy and candle write it).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<u64>,
    pub dtype: DType,
    pub data: Vec<u8>,
}

impl Tensor {
    /// Quantize f32 values into a tensor of `dtype` (blocks run along the innermost dimension).
    pub fn quantized(name: &str, shape: &[u64], dtype: DType, values: &[f32]) -> Result<Tensor, GgufError> {
        let n: u64 = shape.iter().product();
        if n as usize != values.len() {
            return Err(GgufError::Tensor {
                name: name.into(),
                reason: format!("shape {shape:?} holds {n} values, got {}", values.len()),
            });
        }
        let inner = *shape.last().unwrap_or(&1) as usize;
        if dtype.block().0 > 1 && !inner.is_multiple_of(dtype.block().0) {
            return Err(GgufError::Tensor {
                name: name.into(),
                reason: format!(
                    "innermost dimension {inner} is not a multiple of the {} block size {}",
                    dtype.name(),
                    dtype.block().0
                ),
            });
        }
        Ok(Tensor {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
            data: dtype.quantize(values)?,
        })
    }

    pub fn values(&self) -> Result<Vec<f32>, GgufError> {
        Ok(self.dtype.dequantize(&self.data)?)
    }
}

/// A whole GGUF file in memory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Gguf {
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<Tensor>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            let ty = items.first().map(Value::type_id).unwrap_or(4);
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put_value(out, it);
            }
        }
    }
}

fn pad(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(ALIGNMENT) {
        out.push(0);
    }
}

impl Gguf {
    /// The file's bytes. Arrays must hold values of one type.
    pub fn to_bytes(&self) -> Result<Vec<u8>, GgufError> {
        let mut meta = self.metadata.clone();
        meta.insert("general.alignment".into(), Value::U32(ALIGNMENT as u32));
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        for (k, v) in &meta {
            if let Value::Array(items) = v {
                if items.windows(2).any(|w| w[0].type_id() != w[1].type_id()) {
                    return Err(GgufError::ValueType { key: k.clone(), ty: 9 });
                }
            }
            put_str(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for t in &self.tensors {
            let n: u64 = t.shape.iter().product();
            let want = t.dtype.bytes_for(n as usize)?;
            if want != t.data.len() {
                return Err(GgufError::Tensor {
                    name: t.name.clone(),
                    reason: format!("{} bytes of data, its shape needs {want}", t.data.len()),
                });
            }
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in t.shape.iter().rev() {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.dtype.ggml_type().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += t.data.len().div_ceil(ALIGNMENT) * ALIGNMENT;
        }
        pad(&mut out);
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            pad(&mut out);
        }
        Ok(out)
    }

    /// Parse a GGUF file; every error names what was being read.
    pub fn from_bytes(b: &[u8]) -> Result<Gguf, GgufError> {
        let mut r = Reader { b, at: 0 };
        let magic: [u8; 4] = r.take(4, "magic")?.try_into().unwrap();
        if &magic != MAGIC {
            return Err(GgufError::Magic(magic));
        }
        let version = r.u32("version")?;
        if version != VERSION {
            return Err(GgufError::Version(version));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_meta = r.u64("metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_meta {
            let key = r.string("metadata key")?;
            let ty = r.u32(&format!("type of {key}"))?;
            let v = r.value(&key, ty)?;
            metadata.insert(key, v);
        }
        let align = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(ALIGNMENT as u64)
            .max(1) as usize;
        let mut infos = Vec::new();
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let dims = r.u32(&format!("dimensions of {name}"))?;
            if dims > 8 {
                return Err(GgufError::Tensor {
                    name,
                    reason: format!("{dims} dimensions"),
                });
            }
            let mut shape = (0..dims)
                .map(|_| r.u64(&format!("shape of {name}")))
                .collect::<Result<Vec<_>, _>>()?;
            shape.reverse();
            let ty = r.u32(&format!("type of {name}"))?;
            let dtype = DType::from_ggml_type(ty).ok_or_else(|| GgufError::Tensor {
                name: name.clone(),
                reason: format!("ggml type {ty} is not supported"),
            })?;
            let offset = r.u64(&format!("offset of {name}"))? as usize;
            infos.push((name, shape, dtype, offset));
        }
        let data_start =
            r.at.div_ceil(align)
                .checked_mul(align)
                .ok_or_else(|| GgufError::Truncated {
                    what: format!("data aligned to {align} bytes"),
                    at: b.len(),
                })?;
        let mut tensors = Vec::new();
        for (name, shape, dtype, offset) in infos {
            let n = shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| GgufError::Tensor {
                    name: name.clone(),
                    reason: "shape overflows".into(),
                })?;
            let len = dtype.bytes_for(n as usize).map_err(|e| GgufError::Tensor {
                name: name.clone(),
                reason: e.to_string(),
            })?;
            let start = data_start
                .checked_add(offset)
                .filter(|s| s.checked_add(len).is_some_and(|e| e <= b.len()));
            let Some(start) = start else {
                return Err(GgufError::Truncated {
                    what: format!("data of tensor {name}"),
                    at: b.len(),
                });
            };
            tensors.push(Tensor {
                name,
                shape,
                dtype,
                data: b[start..start + len].to_vec(),
            });
        }
        Ok(Gguf { metadata, tensors })
    }

    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let Some(end) = end else {
            return Err(GgufError::Truncated {
                what: what.to_string(),
                at: self.at,
            });
        };
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.u64(what)? as usize;
        let at = self.at;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::Utf8(at))
    }
    fn value(&mut self, key: &str, ty: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U32(self.take(1, key)?[0] as u32),
            1 => Value::I32(self.take(1, key)?[0] as i8 as i32),
            2 => Value::U32(u16::from_le_bytes(self.take(2, key)?.try_into().unwrap()) as u32),
            3 => Value::I32(i16::from_le_bytes(self.take(2, key)?.try_into().unwrap()) as i32),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(self.u32(key)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(key)?)),
            7 => Value::Bool(self.take(1, key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            9 => {
                let ety = self.u32(key)?;
                let n = self.u64(key)?;
                if n as usize > self.b.len() {
                    return Err(GgufError::Truncated {
                        what: format!("array {key}"),
                        at: self.at,
                    });
                }
                Value::Array((0..n).map(|_| self.value(key, ety)).collect::<Result<_, _>>()?)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::U64(self.u64(key)?),
            12 => Value::F64(f64::from_bits(self.u64(key)?)),
            other => {
                return Err(GgufError::ValueType {
                    key: key.to_string(),
                    ty: other,
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Gguf {
        let mut g = Gguf::default();
        g.metadata
            .insert("general.architecture".into(), Value::String("nanobot-policy".into()));
        g.metadata.insert("nanobot.trunk.width".into(), Value::U32(64));
        g.metadata.insert("nanobot.lr".into(), Value::F32(1e-4));
        g.metadata.insert(
            "nanobot.cameras".into(),
            Value::Array(vec![Value::String("front".into())]),
        );
        let w: Vec<f32> = (0..64 * 2).map(|i| (i as f32 * 0.37).sin()).collect();
        for dt in [DType::F32, DType::F16, DType::Q8_0, DType::Mxfp4] {
            g.tensors
                .push(Tensor::quantized(&format!("w.{}", dt.name()), &[2, 64], dt, &w).unwrap());
        }
        g
    }

    #[test]
    fn write_then_read_round_trips() {
        let g = sample();
        let bytes = g.to_bytes().unwrap();
        assert_eq!(&bytes[..4], b"GGUF");
        let back = Gguf::from_bytes(&bytes).unwrap();
        assert_eq!(back.tensors, g.tensors);
        assert_eq!(back.metadata["nanobot.trunk.width"], Value::U32(64));
        assert_eq!(back.metadata["general.alignment"], Value::U32(32));
    }

    #[test]
    fn damaged_files_are_refused_with_what_was_being_read() {
        let bytes = sample().to_bytes().unwrap();
        for cut in [3, 10, 40, bytes.len() - 40] {
            let e = Gguf::from_bytes(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(e, GgufError::Truncated { .. } | GgufError::Magic(_)),
                "cut {cut}: {e}"
            );
        }
        let mut v = bytes.clone();
        v[4] = 2;
        assert_eq!(Gguf::from_bytes(&v).unwrap_err(), GgufError::Version(2));
        assert!(Tensor::quantized("odd", &[2, 48], DType::Mxfp4, &[0.0; 96]).is_err());
    }
}
