//! LeRobot v3.0 metadata, rebuilt from the manifest: `meta/info.json`, `meta/stats.json`,
//! `meta/tasks.parquet` and `meta/episodes/chunk-000/file-000.parquet`. Each is replaced
//! atomically, so a reader never sees half a file.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{Float64Builder, Int64Builder, ListBuilder, StringBuilder};
use arrow_array::{Array, ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde_json::{json, Value};

use crate::fsutil::{sync_dir, tmp_path, write_atomic};
use crate::manifest::Manifest;
use crate::stats::Moments;
use crate::DatasetError;

pub const CODEBASE_VERSION: &str = "v3.0";
pub const INFO_PATH: &str = "meta/info.json";
pub const STATS_PATH: &str = "meta/stats.json";
pub const TASKS_PATH: &str = "meta/tasks.parquet";
pub const EPISODES_PATH: &str = "meta/episodes/chunk-000/file-000.parquet";
pub const DATA_PATH_TEMPLATE: &str = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet";

pub fn write_all(root: &Path, m: &Manifest) -> Result<(), DatasetError> {
    let episodes = m.episodes();
    write_atomic(
        &root.join(INFO_PATH),
        &serde_json::to_vec_pretty(&info_json(m, episodes.len())).expect("json"),
    )?;
    let mut totals: BTreeMap<String, Moments> = BTreeMap::new();
    for (_, e) in &episodes {
        for (k, s) in &e.stats {
            totals
                .entry(k.clone())
                .or_insert_with(|| Moments::new(s.sum.len()))
                .merge(s);
        }
    }
    let stats: serde_json::Map<String, Value> = totals.iter().map(|(k, s)| (k.clone(), s.to_json())).collect();
    write_atomic(
        &root.join(STATS_PATH),
        &serde_json::to_vec_pretty(&stats).expect("json"),
    )?;
    write_parquet(&root.join(TASKS_PATH), tasks_batch(m)?)?;
    write_parquet(&root.join(EPISODES_PATH), episodes_batch(m, &episodes)?)
}

pub fn info_json(m: &Manifest, total_episodes: usize) -> Value {
    let spec = &m.spec;
    let fps = if spec.fps.fract() == 0.0 {
        json!(spec.fps as u64)
    } else {
        json!(spec.fps)
    };
    json!({
        "codebase_version": CODEBASE_VERSION,
        "robot_type": spec.robot_type,
        "total_episodes": total_episodes,
        "total_frames": m.total_rows(),
        "total_tasks": spec.tasks.len(),
        "chunks_size": m.chunks_size,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 500,
        "fps": fps,
        "splits": {"train": format!("0:{total_episodes}")},
        "data_path": DATA_PATH_TEMPLATE,
        "video_path": null,
        "features": spec.features_json(),
    })
}

fn tasks_batch(m: &Manifest) -> Result<RecordBatch, DatasetError> {
    // pandas reads `task` back as the DataFrame's index, as LeRobot expects.
    let pandas = json!({
        "index_columns": ["task"],
        "column_indexes": [{"name": null, "field_name": null, "pandas_type": "unicode", "numpy_type": "object", "metadata": {"encoding": "UTF-8"}}],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64", "metadata": null},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": null}
        ],
        "creator": {"library": "nanobot", "version": env!("CARGO_PKG_VERSION")},
        "pandas_version": "2.2.3"
    });
    let schema = Schema::new(vec![
        Field::new("task_index", DataType::Int64, false),
        Field::new("task", DataType::Utf8, false),
    ])
    .with_metadata(HashMap::from([("pandas".to_string(), pandas.to_string())]));
    let n = m.spec.tasks.len() as i64;
    RecordBatch::try_new(
        Arc::new(schema),
        vec![
            Arc::new(Int64Array::from_iter_values(0..n)),
            Arc::new(StringArray::from_iter_values(&m.spec.tasks)),
        ],
    )
    .map_err(DatasetError::arrow(Path::new(TASKS_PATH)))
}

fn episodes_batch(m: &Manifest, episodes: &[(u64, crate::EpisodeSpan)]) -> Result<RecordBatch, DatasetError> {
    let mut fields = Vec::new();
    let mut cols: Vec<ArrayRef> = Vec::new();
    let mut int_col = |name: &str, f: &dyn Fn(u64, &crate::EpisodeSpan) -> u64| {
        fields.push(Field::new(name, DataType::Int64, false));
        cols.push(Arc::new(Int64Array::from_iter_values(
            episodes.iter().map(|(no, e)| f(*no, e) as i64),
        )));
    };
    let cs = m.chunks_size.max(1);
    int_col("episode_index", &|_, e| e.episode_index);
    int_col("length", &|_, e| e.to_index - e.from_index);
    int_col("data/chunk_index", &|no, _| no / cs);
    int_col("data/file_index", &|no, _| no % cs);
    int_col("dataset_from_index", &|_, e| e.from_index);
    int_col("dataset_to_index", &|_, e| e.to_index);
    int_col("meta/episodes/chunk_index", &|_, _| 0);
    int_col("meta/episodes/file_index", &|_, _| 0);
    let mut tasks = ListBuilder::new(StringBuilder::new());
    for (_, e) in episodes {
        tasks.values().append_value(
            m.spec
                .tasks
                .get(e.task_index as usize)
                .map(String::as_str)
                .unwrap_or(""),
        );
        tasks.append(true);
    }
    let tasks = tasks.finish();
    fields.insert(1, Field::new("tasks", tasks.data_type().clone(), true));
    cols.insert(1, Arc::new(tasks));
    for (feature, _) in m.spec.stat_features() {
        let stat = |pick: &dyn Fn(&Moments) -> Vec<f64>| {
            let mut b = ListBuilder::new(Float64Builder::new());
            for (_, e) in episodes {
                if let Some(s) = e.stats.get(feature) {
                    b.values().append_slice(&pick(s));
                }
                b.append(true);
            }
            b.finish()
        };
        for (name, arr) in [
            ("min", stat(&|s| s.min.clone())),
            ("max", stat(&|s| s.max.clone())),
            ("mean", stat(&Moments::mean)),
            ("std", stat(&Moments::std)),
        ] {
            fields.push(Field::new(
                format!("stats/{feature}/{name}"),
                arr.data_type().clone(),
                true,
            ));
            cols.push(Arc::new(arr));
        }
        let mut count = ListBuilder::new(Int64Builder::new());
        for (_, e) in episodes {
            count
                .values()
                .append_value(e.stats.get(feature).map_or(0, |s| s.count as i64));
            count.append(true);
        }
        let count = count.finish();
        fields.push(Field::new(
            format!("stats/{feature}/count"),
            count.data_type().clone(),
            true,
        ));
        cols.push(Arc::new(count));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(DatasetError::arrow(Path::new(EPISODES_PATH)))
}

/// A small Parquet file written whole under a temporary name, then renamed into place.
fn write_parquet(path: &Path, batch: RecordBatch) -> Result<(), DatasetError> {
    let dir = path.parent().expect("meta path has a directory");
    std::fs::create_dir_all(dir).map_err(DatasetError::io(dir))?;
    let tmp = tmp_path(path);
    let file = File::create(&tmp).map_err(DatasetError::io(&tmp))?;
    let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
    let mut w = ArrowWriter::try_new(file, batch.schema(), Some(props)).map_err(DatasetError::parquet(&tmp))?;
    w.write(&batch).map_err(DatasetError::parquet(&tmp))?;
    let file = w.into_inner().map_err(DatasetError::parquet(&tmp))?;
    file.sync_all().map_err(DatasetError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(DatasetError::io(path))?;
    sync_dir(dir)
}
