//! Reading a dataset back: every row of every finalized file, in index order.

use std::fs::File;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Int64Type};
use arrow_array::{Array, RecordBatch};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::manifest::Manifest;
use crate::spec;
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
        let path = root.join(&f.path);
        for b in read_parquet(&path)? {
            rows.extend(frames_of(&path, &manifest, &b)?);
        }
    }
    Ok((manifest, rows))
}

pub fn read_parquet(path: &Path) -> Result<Vec<RecordBatch>, DatasetError> {
    let file = File::open(path).map_err(DatasetError::io(path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(DatasetError::parquet(path))?;
    reader.map(|b| b.map_err(DatasetError::arrow(path))).collect()
}

fn frames_of(path: &Path, m: &Manifest, b: &RecordBatch) -> Result<Vec<StoredFrame>, DatasetError> {
    let col = |name: &str| {
        b.column_by_name(name)
            .ok_or_else(|| DatasetError::invalid(path, format!("no column `{name}`")))
    };
    let int = |name: &str| -> Result<Vec<u64>, DatasetError> {
        let c = col(name)?;
        let a = c
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| DatasetError::invalid(path, format!("`{name}` is not int64")))?;
        Ok(a.values().iter().map(|v| *v as u64).collect())
    };
    let list = |name: &str| -> Result<Vec<Vec<f32>>, DatasetError> {
        let c = col(name)?;
        let l = c
            .as_fixed_size_list_opt()
            .ok_or_else(|| DatasetError::invalid(path, format!("`{name}` is not a fixed-size list")))?;
        Ok((0..l.len())
            .map(|i| l.value(i).as_primitive::<Float32Type>().values().to_vec())
            .collect())
    };
    let (index, episode, frame, task) = (
        int(spec::INDEX)?,
        int(spec::EPISODE_INDEX)?,
        int(spec::FRAME_INDEX)?,
        int(spec::TASK_INDEX)?,
    );
    let (seq, stamp, src) = (int(spec::SEQ)?, int(spec::STAMP_NS)?, int(spec::SOURCE_EPISODE)?);
    let ts = col(spec::TIMESTAMP)?.as_primitive::<Float32Type>().values().to_vec();
    let (state, action) = (list(spec::STATE)?, list(spec::ACTION)?);
    let surface = if m.spec.surface.is_some() {
        list(spec::SURFACE)?
    } else {
        vec![Vec::new(); b.num_rows()]
    };
    let images: Vec<Option<Vec<u8>>> = match &m.spec.camera {
        Some(cam) => {
            let s = col(&cam.key)?;
            let s = s
                .as_struct_opt()
                .ok_or_else(|| DatasetError::invalid(path, format!("`{}` is not a struct", cam.key)))?;
            let bytes = s
                .column_by_name("bytes")
                .ok_or_else(|| DatasetError::invalid(path, "image struct without `bytes`"))?;
            let bytes = bytes.as_binary::<i32>();
            (0..b.num_rows())
                .map(|i| (!bytes.is_null(i)).then(|| bytes.value(i).to_vec()))
                .collect()
        }
        None => vec![None; b.num_rows()],
    };
    Ok((0..b.num_rows())
        .map(|i| StoredFrame {
            index: index[i],
            episode_index: episode[i],
            frame_index: frame[i],
            task_index: task[i],
            timestamp: ts[i],
            seq: seq[i],
            stamp_ns: stamp[i],
            source_episode: src[i],
            state: state[i].clone(),
            action: action[i].clone(),
            surface: surface[i].clone(),
            image: images[i].clone(),
        })
        .collect())
}
