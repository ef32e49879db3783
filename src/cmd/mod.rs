//! The `nanobot` commands, one module each.

pub mod ckpt;
pub mod collect;
pub mod dashboard;
pub mod demos;
pub mod doctor;
pub mod eval;
pub mod export;
pub mod foxglove;
pub mod keys;
pub mod launcher;
pub mod node;
pub mod record;
pub mod run;
pub mod schema;
pub mod serve;
pub mod topic;
pub mod train;
pub mod tune;
pub mod verify;
