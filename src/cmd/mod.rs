//! The `nanobot` commands, one module each.

pub mod bench;
pub mod ckpt;
pub mod collect;
pub mod dashboard;
pub mod export;
pub mod fleet;
pub mod foxglove;
pub mod launcher;
pub mod record;
pub mod run;
pub mod schema;
pub mod serve;
pub mod shadow;
pub mod topic;
pub mod train;
pub mod tune;
