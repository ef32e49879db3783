//! The NanoBot policy crate: tensors in, tensors out, no I/O beyond files.
//!
//! This first part holds the pieces that need no tensor library: the diffusion noise
//! schedules (DDPM training, DDIM sampling), the quantization formats (MXFP4 per the OCP
//! Microscaling spec in ggml's block layout, Q8_0, F16), and the GGUF v3 writer and reader
//! that export uses. The candle model (ViT, projectors, trunk, diffusion head, LoRA) builds
//! on them.

pub mod checkpoint;
pub mod config;
pub mod export;
pub mod gguf;
pub mod lora;
pub mod model;
pub mod quant;
pub mod rng;
pub mod runner;
pub mod schedule;

pub use config::PolicyConfig;
pub use model::{ObsBatch, Policy};
