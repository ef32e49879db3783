//! `meta/manifest.json`: the dataset's features and every finalized data file, with its rows,
//! sequence and index ranges, sha256 and per-episode statistics. It is the source of truth the
//! LeRobot metadata is rebuilt from, and what `nanobot verify` checks files against.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;
use crate::spec::DatasetSpec;
use crate::stats::Moments;
use crate::DatasetError;

pub const MANIFEST_PATH: &str = "meta/manifest.json";
pub const MANIFEST_FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub chunks_size: u64,
    pub spec: DatasetSpec,
    pub files: Vec<FileEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Sequential number of the file in the dataset (chunk = no / chunks_size).
    pub no: u64,
    /// Path relative to the dataset root.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Global `index` range, `[first_index, end_index)`.
    pub first_index: u64,
    pub end_index: u64,
    pub episodes: Vec<EpisodeSpan>,
}

/// The rows of one episode inside one file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpisodeSpan {
    pub episode_index: u64,
    /// The episode number the robot gave it (its events), which the dataset renumbers.
    pub source_episode: u64,
    pub task_index: u64,
    pub from_index: u64,
    pub to_index: u64,
    pub stats: BTreeMap<String, Moments>,
}

impl Manifest {
    pub fn new(spec: DatasetSpec, chunks_size: u64) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            chunks_size,
            spec,
            files: Vec::new(),
        }
    }

    pub fn path(root: &Path) -> PathBuf {
        root.join(MANIFEST_PATH)
    }

    /// The manifest of the dataset at `root`, or `None` when there is none yet.
    pub fn load(root: &Path) -> Result<Option<Manifest>, DatasetError> {
        let path = Manifest::path(root);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DatasetError::Io { path, source: e }),
        };
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| DatasetError::invalid(&path, format!("line {} column {}: {e}", e.line(), e.column())))?;
        if m.format != MANIFEST_FORMAT {
            return Err(DatasetError::invalid(
                &path,
                format!("manifest format {} (this build reads {MANIFEST_FORMAT})", m.format),
            ));
        }
        Ok(Some(m))
    }

    pub fn save(&self, root: &Path) -> Result<(), DatasetError> {
        let text = serde_json::to_vec_pretty(self).expect("manifest serializes");
        write_atomic(&Manifest::path(root), &text)
    }

    pub fn total_rows(&self) -> u64 {
        self.files.iter().map(|f| f.rows).sum()
    }

    pub fn contains(&self, no: u64) -> bool {
        self.files.iter().any(|f| f.no == no)
    }

    /// Relative path of data file number `no`.
    pub fn data_path(&self, no: u64) -> String {
        data_path(no, self.chunks_size)
    }

    /// Episodes in index order, their spans merged across files:
    /// `(first span's file no, merged span)`.
    pub fn episodes(&self) -> Vec<(u64, EpisodeSpan)> {
        let mut out: Vec<(u64, EpisodeSpan)> = Vec::new();
        for f in &self.files {
            for span in &f.episodes {
                match out.last_mut() {
                    Some((_, last)) if last.episode_index == span.episode_index => {
                        last.to_index = span.to_index;
                        for (k, m) in &span.stats {
                            match last.stats.get_mut(k) {
                                Some(acc) => acc.merge(m),
                                None => {
                                    last.stats.insert(k.clone(), m.clone());
                                }
                            }
                        }
                    }
                    _ => out.push((f.no, span.clone())),
                }
            }
        }
        out
    }
}

pub fn data_path(no: u64, chunks_size: u64) -> String {
    let (chunk, file) = (no / chunks_size.max(1), no % chunks_size.max(1));
    format!("data/chunk-{chunk:03}/file-{file:03}.parquet")
}
