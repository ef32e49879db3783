//! Reading a dataset back: every row of every finalized file, in index order (through each
//! file's [`Columns`]).

use std::path::Path;

use crate::columns::Columns;
use crate::manifest::Manifest;
use crate::DatasetError;

/// A row as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredFrame {
    pub index: u64,
    pub episode_index: u64,
    pub frame_index: u64,
    pub task_index: u64,
    pub timestamp: f32,
    pub seq: u64,
    pub stamp_ns: u64,
    pub source_episode: u64,
    pub state: Vec<f32>,
    pub action: Vec<f32>,
    pub surface: Vec<f32>,
    pub image: Option<Vec<u8>>,
}

/// The manifest and every row of the dataset at `root`.
pub fn read_dataset(root: &Path) -> Result<(Manifest, Vec<StoredFrame>), DatasetError> {
    let manifest = Manifest::load(root)?
        .ok_or_else(|| DatasetError::invalid(&Manifest::path(root), "no manifest: not a NanoBot dataset"))?;
    let mut rows = Vec::new();
    for f in &manifest.files {
        let c = Columns::read(&root.join(&f.path), &manifest.spec)?;
        rows.extend((0..c.rows).map(|i| c.frame(i)));
    }
    Ok((manifest, rows))
}
