//! LeRobotDataset v3.0 on disk, written crash-safe.
//!
//! A [`DatasetWriter`] takes [`Frame`]s in batches and makes each durable before it counts: a
//! small batch is appended to an Arrow IPC journal and fsynced; a large one is written straight
//! into the Parquet data file as a row group, which is fsynced with a footer snapshot beside it
//! ([`snapshot`]), so its bytes are written once. The data file
//! (`data/chunk-XXX/file-XXX.parquet`, written under a temporary name and renamed) is finished
//! when it reaches its size or age limit. A crash at any point loses no durable row: at the next
//! open, the journals and footer snapshots left behind are recovered into their Parquet files. `meta/manifest.json` records every
//! finalized file's rows, sequence range and sha256; the LeRobot metadata (`meta/info.json`,
//! `meta/stats.json`, `meta/tasks.parquet`, `meta/episodes/...`) is rebuilt from it after each
//! file. [`verify`] checks a whole dataset against its manifest.

pub mod columns;
mod error;
pub mod events;
mod fsutil;
pub mod journal;
pub mod manifest;
mod meta;
pub mod read;
pub mod snapshot;
pub mod spec;
pub mod stats;
pub mod verify;
pub mod writer;

pub use columns::{Columns, Floats};
pub use error::DatasetError;
pub use events::{read_events, EventLog, StoredEvent};
pub use fsutil::{hex, sha256_file, sha256_hex, sync_dir, tmp_path, write_atomic};
pub use manifest::{EpisodeSpan, FileEntry, Manifest};
pub use read::{read_dataset, StoredFrame};
pub use spec::{CameraSpec, DatasetSpec};
pub use verify::{verify, Problem, VerifyReport};
pub use writer::{DatasetWriter, Durability, Frame, WriterConfig};
