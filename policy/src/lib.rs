//! The NanoBot policy crate: tensors in, tensors out, no I/O beyond files, nothing of Zenoh.
//!
//! As LeRobot splits a policy: the model (`model`: ViT, sensor and surface projectors,
//! transformer trunk, FiLM diffusion head; `lora`; `config`), its processor (`preprocess`:
//! observation → decoded step → tensors), and running it (`runner`: a checkpoint or export →
//! action chunks; `rollout`: one robot's history, plan, blending and vision-token cache).
//! `train` holds the training windows and the step shared by `nanobot train` and the online
//! trainer. Beside them: the diffusion schedules (DDPM training, DDIM sampling), checkpoints
//! with their normalization statistics, the quantization formats (MXFP4 in ggml's block
//! layout, Q8_0, F16) and GGUF v3 export.

pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod export;
pub mod fused;
pub mod gguf;
pub mod kernels;
pub mod lora;
pub mod model;
pub mod preprocess;
pub mod quant;
pub mod rng;
pub mod rollout;
pub mod runner;
pub mod schedule;
pub mod train;

pub use config::PolicyConfig;
pub use model::{ObsBatch, Policy};
