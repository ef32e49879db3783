//! [`DatasetWriter`]: frames → durable journal batches → Parquet data files.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::builder::{BinaryBuilder, StringBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{ArrayRef, FixedSizeListArray, Float32Array, Int64Array, RecordBatch, StructArray};
use arrow_schema::{DataType, Field};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::fsutil::{sync_dir, tmp_path, HashingWriter};
use crate::journal::{journal_name, parse_journal_name, read_journal, Journal};
use crate::manifest::{EpisodeSpan, FileEntry, Manifest};
use crate::spec::{self, DatasetSpec};
use crate::stats::{add_row, Moments};
use crate::DatasetError;

pub const JOURNAL_DIR: &str = "journal";

/// One observation as the dataset receives it. The writer assigns `episode_index`,
/// `frame_index`, `index` and `timestamp` itself, so the files are consistent whatever the
/// source numbered.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    pub seq: u64,
    pub stamp_ns: u64,
    /// The robot's own episode number: a change starts a new dataset episode.
    pub source_episode: u64,
    pub task: u32,
    /// Encoded image (JPEG) when the dataset has a camera.
    pub image: Option<Bytes>,
    pub state: Vec<f32>,
    pub action: Vec<f32>,
    pub surface: Vec<f32>,
}

#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// A data file is finalized when its journal holds this many bytes of Arrow data...
    pub file_max_bytes: u64,
    /// ... or when it has been open this long, so fresh data reaches replay within seconds.
    pub file_max_age: Duration,
    /// Files per `data/chunk-XXX` directory (LeRobot's `chunks_size`).
    pub chunks_size: u64,
    /// Parquet row group size.
    pub row_group_rows: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            file_max_bytes: 64 << 20,
            file_max_age: Duration::from_secs(10),
            chunks_size: 1000,
            row_group_rows: 4096,
        }
    }
}

struct Row {
    frame: Frame,
    episode_index: u64,
    frame_index: u64,
    index: u64,
}

/// Where the episode numbering stands: the last row's episode, and how many frames it has.
#[derive(Clone, Copy, Debug)]
struct EpisodeCursor {
    source_episode: u64,
    episode_index: u64,
    next_frame: u64,
}

pub struct DatasetWriter {
    root: PathBuf,
    cfg: WriterConfig,
    schema: arrow_schema::SchemaRef,
    manifest: Manifest,
    journal: Option<Journal>,
    /// Journals closed (full, old, or broken by an I/O error) and not yet in Parquet.
    sealed: Vec<(u64, PathBuf)>,
    pending: Vec<Row>,
    next_file_no: u64,
    next_index: u64,
    cursor: Option<EpisodeCursor>,
    durable_seq: Option<u64>,
    durable_rows: u64,
}

impl DatasetWriter {
    /// Open (or create) the dataset at `root`. Journals a crash left behind are recovered into
    /// Parquet first; a dataset created with other features is refused.
    pub fn open(root: &Path, spec: DatasetSpec, cfg: WriterConfig) -> Result<DatasetWriter, DatasetError> {
        spec.validate().map_err(|r| DatasetError::invalid(root, r))?;
        let jdir = root.join(JOURNAL_DIR);
        for d in [root.to_path_buf(), root.join("meta"), jdir.clone()] {
            fs::create_dir_all(&d).map_err(DatasetError::io(&d))?;
        }
        let manifest = match Manifest::load(root)? {
            Some(m) if m.spec != spec => {
                return Err(DatasetError::invalid(
                    &Manifest::path(root),
                    format!(
                        "the dataset was created with other features ({:?}); this writer has {:?}",
                        m.spec, spec
                    ),
                ))
            }
            Some(m) => m,
            None => {
                let m = Manifest::new(spec.clone(), cfg.chunks_size);
                m.save(root)?;
                m
            }
        };
        let mut w = DatasetWriter {
            root: root.to_path_buf(),
            schema: spec.schema(),
            cfg,
            next_file_no: manifest.files.last().map(|f| f.no + 1).unwrap_or(0),
            manifest,
            journal: None,
            sealed: Vec::new(),
            pending: Vec::new(),
            next_index: 0,
            cursor: None,
            durable_seq: None,
            durable_rows: 0,
        };
        w.recover()?;
        w.next_index = w.manifest.files.last().map(|f| f.end_index).unwrap_or(0);
        w.cursor = w.manifest.episodes().last().map(|(_, e)| EpisodeCursor {
            source_episode: e.source_episode,
            episode_index: e.episode_index,
            next_frame: e.to_index - e.from_index,
        });
        w.durable_seq = w.manifest.files.last().map(|f| f.last_seq);
        w.durable_rows = w.manifest.total_rows();
        w.write_meta()?;
        Ok(w)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The last sequence number that is durable, and how many rows are.
    pub fn durable(&self) -> (Option<u64>, u64) {
        (self.durable_seq, self.durable_rows)
    }

    pub fn pending_rows(&self) -> usize {
        self.pending.len()
    }

    /// Turn every journal in `journal/` into its data file (or drop it when the manifest already
    /// lists that file: the crash came after the file was finalized).
    fn recover(&mut self) -> Result<(), DatasetError> {
        let jdir = self.root.join(JOURNAL_DIR);
        let mut found: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(&jdir).map_err(DatasetError::io(&jdir))? {
            let entry = entry.map_err(DatasetError::io(&jdir))?;
            let name = entry.file_name().to_string_lossy().to_string();
            match parse_journal_name(&name) {
                Some(no) => found.push((no, entry.path())),
                None => tracing::warn!(file = %entry.path().display(), "not a journal: left alone"),
            }
        }
        found.sort();
        for (no, path) in found {
            self.next_file_no = self.next_file_no.max(no + 1);
            if self.manifest.contains(no) {
                fs::remove_file(&path).map_err(DatasetError::io(&path))?;
                continue;
            }
            tracing::info!(journal = %path.display(), "recovering journal into Parquet");
            self.finalize(no, &path)?;
        }
        Ok(())
    }

    /// Queue a frame. It becomes durable at the next [`flush`](Self::flush).
    pub fn push(&mut self, frame: Frame) -> Result<(), DatasetError> {
        let spec = &self.manifest.spec;
        let bad = |reason: String| DatasetError::Frame { seq: frame.seq, reason };
        if frame.state.len() != spec.state_names.len() {
            return Err(bad(format!(
                "{} has {} values, the dataset declares {}",
                spec::STATE,
                frame.state.len(),
                spec.state_names.len()
            )));
        }
        if frame.action.len() != spec.action_names.len() {
            return Err(bad(format!(
                "{} has {} values, the dataset declares {}",
                spec::ACTION,
                frame.action.len(),
                spec.action_names.len()
            )));
        }
        if frame.surface.len() != spec.surface_len() {
            return Err(bad(format!(
                "{} has {} cells, the dataset declares {}",
                spec::SURFACE,
                frame.surface.len(),
                spec.surface_len()
            )));
        }
        if spec.camera.is_some() != frame.image.is_some() {
            return Err(bad("image presence does not match the dataset's camera".into()));
        }
        if frame.task as usize >= spec.tasks.len() {
            return Err(bad(format!(
                "task {} is not one of the {} declared tasks",
                frame.task,
                spec.tasks.len()
            )));
        }
        let cursor = match self.cursor {
            Some(c) if c.source_episode == frame.source_episode => c,
            Some(c) => EpisodeCursor {
                source_episode: frame.source_episode,
                episode_index: c.episode_index + 1,
                next_frame: 0,
            },
            None => EpisodeCursor {
                source_episode: frame.source_episode,
                episode_index: 0,
                next_frame: 0,
            },
        };
        self.pending.push(Row {
            frame,
            episode_index: cursor.episode_index,
            frame_index: cursor.next_frame,
            index: self.next_index,
        });
        self.next_index += 1;
        self.cursor = Some(EpisodeCursor {
            next_frame: cursor.next_frame + 1,
            ..cursor
        });
        Ok(())
    }

    /// Make every queued frame durable (one journal batch, fsynced). Returns the last durable
    /// sequence number. On an I/O error the frames stay queued and the journal is sealed, so
    /// that a later flush writes them to a fresh journal.
    pub fn flush(&mut self) -> Result<Option<u64>, DatasetError> {
        if self.pending.is_empty() {
            return Ok(self.durable_seq);
        }
        let batch = self.build_batch(&self.pending)?;
        if self.journal.is_none() {
            let no = self.next_file_no;
            let path = self.root.join(JOURNAL_DIR).join(journal_name(no));
            self.journal = Some(Journal::create(path, no, &self.schema)?);
            self.next_file_no += 1;
        }
        let journal = self.journal.as_mut().expect("journal opened above");
        if let Err(e) = journal.append(&batch) {
            let j = self.journal.take().expect("journal present");
            self.sealed.push((j.file_no, j.path));
            return Err(e);
        }
        self.durable_seq = self.pending.last().map(|r| r.frame.seq);
        self.durable_rows += self.pending.len() as u64;
        self.pending.clear();
        Ok(self.durable_seq)
    }

    /// Finalize the open file when it is full or old enough, and any sealed journal.
    /// Returns the files finalized.
    pub fn rotate_if_due(&mut self) -> Result<Vec<FileEntry>, DatasetError> {
        let due = self
            .journal
            .as_ref()
            .is_some_and(|j| j.rows > 0 && (j.bytes >= self.cfg.file_max_bytes || j.opened.elapsed() >= self.cfg.file_max_age));
        if due {
            self.seal();
        }
        self.finalize_sealed()
    }

    /// Flush, then finalize the open file whatever its size (shutdown, episode end, tests).
    pub fn finish_file(&mut self) -> Result<Vec<FileEntry>, DatasetError> {
        self.flush()?;
        self.seal();
        self.finalize_sealed()
    }

    fn seal(&mut self) {
        if let Some(j) = self.journal.take() {
            self.sealed.push((j.file_no, j.path));
        }
    }

    fn finalize_sealed(&mut self) -> Result<Vec<FileEntry>, DatasetError> {
        let mut done = Vec::new();
        while let Some((no, path)) = self.sealed.first().cloned() {
            if let Some(entry) = self.finalize(no, &path)? {
                done.push(entry);
            }
            self.sealed.remove(0);
        }
        Ok(done)
    }

    /// Journal `path` → `data/chunk-XXX/file-XXX.parquet` (temporary name, fsync, rename), then
    /// the manifest and the metadata, then the journal is removed.
    fn finalize(&mut self, no: u64, path: &Path) -> Result<Option<FileEntry>, DatasetError> {
        let batches = read_journal(path)?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        if rows == 0 {
            fs::remove_file(path).map_err(DatasetError::io(path))?;
            return Ok(None);
        }
        let rel = self.manifest.data_path(no);
        let target = self.root.join(&rel);
        let dir = target.parent().expect("data path has a directory").to_path_buf();
        fs::create_dir_all(&dir).map_err(DatasetError::io(&dir))?;
        let tmp = tmp_path(&target);
        let file = File::create(&tmp).map_err(DatasetError::io(&tmp))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(self.cfg.row_group_rows))
            .build();
        let mut writer =
            ArrowWriter::try_new(HashingWriter::new(file), self.schema.clone(), Some(props)).map_err(DatasetError::parquet(&tmp))?;
        for b in &batches {
            writer.write(b).map_err(DatasetError::parquet(&tmp))?;
        }
        let hashing = writer.into_inner().map_err(DatasetError::parquet(&tmp))?;
        let (file, sha256, bytes) = hashing.finish();
        file.sync_all().map_err(DatasetError::io(&tmp))?;
        drop(file);
        fs::rename(&tmp, &target).map_err(DatasetError::io(&target))?;
        sync_dir(&dir)?;
        let entry = self.describe(no, rel, &batches, sha256, bytes);
        self.manifest.files.retain(|f| f.no != no);
        self.manifest.files.push(entry.clone());
        self.manifest.files.sort_by_key(|f| f.no);
        self.manifest.save(&self.root)?;
        self.write_meta()?;
        fs::remove_file(path).map_err(DatasetError::io(path))?;
        tracing::debug!(file = %target.display(), rows, "data file finalized");
        Ok(Some(entry))
    }

    fn describe(&self, no: u64, path: String, batches: &[RecordBatch], sha256: String, bytes: u64) -> FileEntry {
        let features = self.manifest.spec.stat_features();
        let mut episodes: Vec<EpisodeSpan> = Vec::new();
        let (mut first_seq, mut last_seq, mut first_index, mut end_index) = (u64::MAX, 0, u64::MAX, 0);
        for b in batches {
            let col = |n: &str| b.column_by_name(n).expect("journal has the schema").as_primitive::<Int64Type>().clone();
            let (seq, ep, idx, task) = (col(spec::SEQ), col(spec::EPISODE_INDEX), col(spec::INDEX), col(spec::TASK_INDEX));
            let src = col(spec::SOURCE_EPISODE);
            for r in 0..b.num_rows() {
                first_seq = first_seq.min(seq.value(r) as u64);
                last_seq = last_seq.max(seq.value(r) as u64);
                let index = idx.value(r) as u64;
                first_index = first_index.min(index);
                end_index = end_index.max(index + 1);
                let e = ep.value(r) as u64;
                if episodes.last().is_none_or(|s| s.episode_index != e) {
                    episodes.push(EpisodeSpan {
                        episode_index: e,
                        source_episode: src.value(r) as u64,
                        task_index: task.value(r) as u64,
                        from_index: index,
                        to_index: index,
                        stats: features.iter().map(|(n, w)| (n.to_string(), Moments::new(*w))).collect::<BTreeMap<_, _>>(),
                    });
                }
                let span = episodes.last_mut().expect("pushed above");
                span.to_index = index + 1;
                for (name, m) in span.stats.iter_mut() {
                    add_row(m, b, name, r);
                }
            }
        }
        FileEntry {
            no,
            path,
            rows: batches.iter().map(|b| b.num_rows() as u64).sum(),
            bytes,
            sha256,
            first_seq,
            last_seq,
            first_index,
            end_index,
            episodes,
        }
    }

    fn write_meta(&self) -> Result<(), DatasetError> {
        crate::meta::write_all(&self.root, &self.manifest)
    }

    fn build_batch(&self, rows: &[Row]) -> Result<RecordBatch, DatasetError> {
        let spec = &self.manifest.spec;
        let fps = spec.fps as f64;
        let i64s = |f: &dyn Fn(&Row) -> u64| Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| f(r) as i64))) as ArrayRef;
        let f32_list = |n: usize, f: &dyn Fn(&Row) -> &[f32]| -> ArrayRef {
            let values = Float32Array::from_iter_values(rows.iter().flat_map(|r| f(r).iter().copied()));
            let field = Arc::new(Field::new("item", DataType::Float32, true));
            Arc::new(FixedSizeListArray::new(field, n as i32, Arc::new(values), None))
        };
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(Float32Array::from_iter_values(rows.iter().map(|r| (r.frame_index as f64 / fps) as f32))),
            i64s(&|r| r.frame_index),
            i64s(&|r| r.episode_index),
            i64s(&|r| r.index),
            i64s(&|r| r.frame.task as u64),
            f32_list(spec.state_names.len(), &|r| &r.frame.state),
            f32_list(spec.action_names.len(), &|r| &r.frame.action),
        ];
        if spec.camera.is_some() {
            let mut bytes = BinaryBuilder::with_capacity(rows.len(), rows.iter().map(|r| r.frame.image.as_ref().map_or(0, |b| b.len())).sum());
            let mut paths = StringBuilder::new();
            for r in rows {
                bytes.append_option(r.frame.image.as_deref());
                paths.append_null();
            }
            let s = StructArray::new(spec::image_fields(), vec![Arc::new(bytes.finish()), Arc::new(paths.finish())], None);
            cols.push(Arc::new(s));
        }
        if spec.surface.is_some() {
            cols.push(f32_list(spec.surface_len(), &|r| &r.frame.surface));
        }
        cols.push(i64s(&|r| r.frame.seq));
        cols.push(i64s(&|r| r.frame.stamp_ns));
        cols.push(i64s(&|r| r.frame.source_episode));
        RecordBatch::try_new(self.schema.clone(), cols).map_err(DatasetError::arrow(&self.root))
    }
}
