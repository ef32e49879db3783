//! One data file's columns as Arrow buffers, for sampling: fixed-size float lists stay the
//! Parquet reader's buffers (a row is a slice of them, no per-row copy) and images stay the
//! encoded bytes of the binary column. The whole file is read in one batch.

use std::fs::File;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Int64Type};
use arrow_array::{Array, BinaryArray, RecordBatch};
use arrow_buffer::ScalarBuffer;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::read::StoredFrame;
use crate::spec::{self, DatasetSpec};
use crate::DatasetError;

/// A fixed-width float column: row `i` is `values[i·width .. (i+1)·width]`.
#[derive(Clone, Debug)]
pub struct Floats {
    pub width: usize,
    pub values: ScalarBuffer<f32>,
}

impl Floats {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.width..(i + 1) * self.width]
    }
}

/// The columns of one data file.
#[derive(Clone, Debug)]
pub struct Columns {
    pub rows: usize,
    pub index: ScalarBuffer<i64>,
    pub frame_index: ScalarBuffer<i64>,
    pub timestamp: ScalarBuffer<f32>,
    pub episode_index: ScalarBuffer<i64>,
    pub task_index: ScalarBuffer<i64>,
    pub seq: ScalarBuffer<i64>,
    pub stamp_ns: ScalarBuffer<i64>,
    pub source_episode: ScalarBuffer<i64>,
    pub state: Floats,
    pub action: Floats,
    pub surface: Option<Floats>,
    /// The camera's encoded (JPEG) bytes; a null is a row without an image.
    pub images: Option<BinaryArray>,
}

impl Columns {
    /// Read the data file at `path` of a dataset with `spec`.
    pub fn read(path: &Path, spec: &DatasetSpec) -> Result<Columns, DatasetError> {
        let file = File::open(path).map_err(DatasetError::io(path))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(DatasetError::parquet(path))?;
        let rows = builder.metadata().file_metadata().num_rows().max(0) as usize;
        let reader = builder
            .with_batch_size(rows.max(1))
            .build()
            .map_err(DatasetError::parquet(path))?;
        let batches = reader
            .map(|b| b.map_err(DatasetError::arrow(path)))
            .collect::<Result<Vec<_>, _>>()?;
        let batch = match batches.len() {
            1 => batches.into_iter().next().expect("one batch"),
            0 => RecordBatch::new_empty(spec.schema()),
            _ => {
                let schema = batches[0].schema();
                arrow_select::concat::concat_batches(&schema, &batches).map_err(DatasetError::arrow(path))?
            }
        };
        Self::of(path, spec, &batch)
    }

    fn of(path: &Path, spec: &DatasetSpec, b: &RecordBatch) -> Result<Columns, DatasetError> {
        let col = |name: &str| {
            b.column_by_name(name)
                .ok_or_else(|| DatasetError::invalid(path, format!("no column `{name}`")))
        };
        let int = |name: &str| -> Result<ScalarBuffer<i64>, DatasetError> {
            let a = col(name)?
                .as_primitive_opt::<Int64Type>()
                .ok_or_else(|| DatasetError::invalid(path, format!("`{name}` is not int64")))?;
            Ok(a.values().clone())
        };
        let floats = |name: &str, width: usize| -> Result<Floats, DatasetError> {
            let l = col(name)?
                .as_fixed_size_list_opt()
                .ok_or_else(|| DatasetError::invalid(path, format!("`{name}` is not a fixed-size list")))?;
            if l.value_length() as usize != width {
                return Err(DatasetError::invalid(
                    path,
                    format!(
                        "`{name}` has {} values a row, the dataset's features say {width}",
                        l.value_length()
                    ),
                ));
            }
            let values = l
                .values()
                .as_primitive_opt::<Float32Type>()
                .ok_or_else(|| DatasetError::invalid(path, format!("`{name}` is not a list of float32")))?
                .values()
                .clone();
            let start = if l.is_empty() { 0 } else { l.value_offset(0) as usize };
            let len = l.len() * width;
            if start + len > values.len() {
                return Err(DatasetError::invalid(
                    path,
                    format!("`{name}` is shorter than its rows"),
                ));
            }
            Ok(Floats {
                width,
                values: values.slice(start, len),
            })
        };
        let images = match &spec.camera {
            Some(cam) => {
                let s = col(&cam.key)?
                    .as_struct_opt()
                    .ok_or_else(|| DatasetError::invalid(path, format!("`{}` is not a struct", cam.key)))?;
                let bytes = s
                    .column_by_name("bytes")
                    .and_then(|c| c.as_binary_opt::<i32>())
                    .ok_or_else(|| DatasetError::invalid(path, format!("`{}` has no binary `bytes`", cam.key)))?;
                Some(bytes.clone())
            }
            None => None,
        };
        let timestamp = col(spec::TIMESTAMP)?
            .as_primitive_opt::<Float32Type>()
            .ok_or_else(|| DatasetError::invalid(path, format!("`{}` is not float32", spec::TIMESTAMP)))?
            .values()
            .clone();
        Ok(Columns {
            rows: b.num_rows(),
            index: int(spec::INDEX)?,
            frame_index: int(spec::FRAME_INDEX)?,
            timestamp,
            episode_index: int(spec::EPISODE_INDEX)?,
            task_index: int(spec::TASK_INDEX)?,
            seq: int(spec::SEQ)?,
            stamp_ns: int(spec::STAMP_NS)?,
            source_episode: int(spec::SOURCE_EPISODE)?,
            state: floats(spec::STATE, spec.state_names.len())?,
            action: floats(spec::ACTION, spec.action_names.len())?,
            surface: match spec.surface {
                Some(_) => Some(floats(spec::SURFACE, spec.surface_len())?),
                None => None,
            },
            images,
        })
    }

    /// Row `i` as an owned frame.
    pub fn frame(&self, i: usize) -> StoredFrame {
        let u = |b: &ScalarBuffer<i64>| b[i] as u64;
        StoredFrame {
            index: u(&self.index),
            episode_index: u(&self.episode_index),
            frame_index: u(&self.frame_index),
            task_index: u(&self.task_index),
            timestamp: self.timestamp[i],
            seq: u(&self.seq),
            stamp_ns: u(&self.stamp_ns),
            source_episode: u(&self.source_episode),
            state: self.state.row(i).to_vec(),
            action: self.action.row(i).to_vec(),
            surface: self.surface.as_ref().map_or_else(Vec::new, |s| s.row(i).to_vec()),
            image: self.image(i).map(<[u8]>::to_vec),
        }
    }

    /// Row `i`'s encoded image, if it has one.
    pub fn image(&self, i: usize) -> Option<&[u8]> {
        let a = self.images.as_ref()?;
        (!a.is_null(i)).then(|| a.value(i))
    }
}
