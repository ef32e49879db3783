//! [`DatasetWriter`]: frames → durable batches (journaled, or straight into the data file with a
//! footer snapshot) → Parquet data files.

use std::fs::{self};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::builder::{BinaryBuilder, StringBuilder};
use arrow_array::{ArrayRef, FixedSizeListArray, Float32Array, Int64Array, RecordBatch, StructArray};
use arrow_schema::{DataType, Field};
use bytes::Bytes;

use crate::fsutil::{remove_if_present, tmp_path};
use crate::journal::{journal_name, parse_journal_name, read_journal, Journal};
use crate::manifest::{FileEntry, Manifest};
use crate::snapshot::{self, parse_snapshot_name, snapshot_name};
use crate::spec::{self, DatasetSpec};
use crate::DatasetError;

mod data_file;
mod durability;
mod open_file;

use data_file::*;
pub use durability::Durability;
use open_file::*;

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
    /// A submitted batch of at least this many rows goes straight into the data file as a row
    /// group, made durable there (the file fsynced, a footer snapshot appended beside it), so its
    /// bytes are written once. Smaller batches (a fleet's 50 ms flushes) go through the journal.
    pub direct_rows: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            file_max_bytes: 64 << 20,
            file_max_age: Duration::from_secs(10),
            chunks_size: 1000,
            row_group_rows: 4096,
            direct_rows: 1024,
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
    open: Option<OpenFile>,
    /// Files closed (full, old, or broken by an I/O error) and not yet finalized.
    sealed: Vec<Sealed>,
    pending: Vec<Row>,
    /// Batches a failed journal write gave back, in order: they go first into the next journal.
    retry: Vec<Batch>,
    next_file_no: u64,
    next_index: u64,
    cursor: Option<EpisodeCursor>,
    /// What the journal thread has made durable.
    durable: Durability,
    /// Rows handed to a journal thread, in all (durable once `durable` counts as many).
    submitted_rows: u64,
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
            open: None,
            sealed: Vec::new(),
            pending: Vec::new(),
            retry: Vec::new(),
            next_index: 0,
            cursor: None,
            durable: Durability::default(),
            submitted_rows: 0,
        };
        w.recover()?;
        w.next_index = w.manifest.files.last().map(|f| f.end_index).unwrap_or(0);
        w.cursor = w.manifest.episodes().last().map(|(_, e)| EpisodeCursor {
            source_episode: e.source_episode,
            episode_index: e.episode_index,
            next_frame: e.to_index - e.from_index,
        });
        let rows = w.manifest.total_rows();
        w.durable.reset(w.manifest.files.last().map(|f| f.last_seq), rows);
        w.submitted_rows = rows;
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
        self.durable.get()
    }

    /// A handle that reads what is durable from any thread, and can be told whom to wake when
    /// more becomes durable: acknowledgements can go out the moment a batch is fsynced, while
    /// the writer's thread is already building the next one.
    pub fn durability(&self) -> Durability {
        self.durable.clone()
    }

    /// Rows queued or submitted that are not durable yet.
    pub fn pending_rows(&self) -> usize {
        let in_flight = self.submitted_rows.saturating_sub(self.durable.get().1);
        self.pending.len() + self.retry.iter().map(|b| b.rows.num_rows()).sum::<usize>() + in_flight as usize
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
                // A footer snapshot goes with its journal; one whose file was finalized is done.
                None => match parse_snapshot_name(&name) {
                    Some(no) if self.manifest.contains(no) => self.remove_snapshot(no)?,
                    Some(_) => {}
                    None => tracing::warn!(file = %entry.path().display(), "not a journal: left alone"),
                },
            }
        }
        found.sort();
        for (no, path) in found {
            self.next_file_no = self.next_file_no.max(no + 1);
            if self.manifest.contains(no) {
                self.remove_snapshot(no)?;
                fs::remove_file(&path).map_err(DatasetError::io(&path))?;
                continue;
            }
            tracing::info!(journal = %path.display(), "recovering journal and footer snapshot into Parquet");
            self.finalize(no, &path, None)?;
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

    /// Make every queued frame durable: [`submit`](Self::submit), then wait until everything
    /// submitted is fsynced. Returns the last durable sequence number. On an
    /// I/O error the frames stay queued and the journal is sealed, so that a later flush writes
    /// them to a fresh journal.
    pub fn flush(&mut self) -> Result<Option<u64>, DatasetError> {
        self.submit()?;
        if !self.durable.wait_for(self.submitted_rows) {
            return Err(self.take_failure());
        }
        Ok(self.durable.get().0)
    }

    /// Hand every queued frame to the open file's threads as one batch and return without
    /// waiting. A batch under `direct_rows` is appended to the journal and fsynced, then passed
    /// to the Parquet encoder; a larger one is encoded straight into the data file as a row
    /// group, which is fsynced with a footer snapshot. Either way it then counts in
    /// [`durable`](Self::durable) (and wakes whoever [`Durability::on_durable`] names), in
    /// submission order. Only durable rows may be acknowledged. An error from an earlier batch
    /// is returned here, with the rows that are not durable queued again.
    pub fn submit(&mut self) -> Result<(), DatasetError> {
        if self.durable.failed() {
            return Err(self.take_failure());
        }
        if self.pending.is_empty() && self.retry.is_empty() {
            return Ok(());
        }
        if self.open.is_none() {
            let no = self.next_file_no;
            let path = self.root.join(JOURNAL_DIR).join(journal_name(no));
            let journal = Journal::create(path, no, &self.schema)?;
            self.next_file_no += 1;
            let parquet = ParquetFile::create(&self.root, &self.manifest, &self.schema, &self.cfg, no)
                .map_err(|e| tracing::warn!("Parquet file not started, it will be built from its journal: {e}"))
                .ok()
                .map(|f| ParquetWorker::start(f, self.durable.clone()));
            self.open = Some(OpenFile::start(
                journal,
                parquet,
                self.durable.clone(),
                self.cfg.direct_rows,
            ));
        }
        let mut batches = std::mem::take(&mut self.retry);
        if !self.pending.is_empty() {
            let rows = self.build_batch(&self.pending)?;
            let last_seq = self.pending.last().map(|r| r.frame.seq).expect("rows are pending");
            self.pending.clear();
            batches.push(Batch { rows, last_seq });
        }
        let open = self.open.as_mut().expect("file opened above");
        for b in batches {
            open.rows += b.rows.num_rows() as u64;
            open.bytes += b.rows.get_array_memory_size() as u64;
            self.submitted_rows += b.rows.num_rows() as u64;
            open.send(b);
        }
        Ok(())
    }

    /// A write failed: seal its file (what was made durable becomes a data file) and queue the
    /// batches that are not durable again, ahead of anything newer.
    fn take_failure(&mut self) -> DatasetError {
        let err = self.seal();
        self.durable.clear_failure();
        err.unwrap_or_else(|| DatasetError::Invalid {
            path: self.root.join(JOURNAL_DIR),
            reason: "the journal thread stopped without saying why".into(),
        })
    }

    /// Finalize the open file when it is full or old enough, and any sealed journal.
    /// Returns the files finalized.
    pub fn rotate_if_due(&mut self) -> Result<Vec<FileEntry>, DatasetError> {
        let due = self.open.as_ref().is_some_and(|o| {
            o.rows > 0 && (o.bytes >= self.cfg.file_max_bytes || o.opened.elapsed() >= self.cfg.file_max_age)
        });
        if due {
            if let Some(e) = self.seal() {
                return Err(e);
            }
        }
        self.finalize_sealed()
    }

    /// Flush, then finalize the open file whatever its size (shutdown, episode end, tests).
    pub fn finish_file(&mut self) -> Result<Vec<FileEntry>, DatasetError> {
        self.flush()?;
        if let Some(e) = self.seal() {
            return Err(e);
        }
        self.finalize_sealed()
    }

    /// Close the open file's journal: wait for its thread to store what it was handed and for
    /// every row written straight into the data file to be durable, and put the file among
    /// those to finalize. A failed write is returned, and the batches that are not durable are
    /// queued again; the file is then rebuilt from its journal and footer snapshot, holding only
    /// rows that were durable.
    fn seal(&mut self) -> Option<DatasetError> {
        let o = self.open.take()?;
        let end = o.finish();
        if self.durable.wait_for(end.total) && end.failed.is_none() {
            self.sealed.push(Sealed {
                no: end.no,
                journal: end.path,
                parquet: end.parquet,
                drop_from: None,
            });
            return None;
        }
        // Stop the encoder (and its sync thread) before anything else is written.
        let encoder_err = end.parquet.and_then(ParquetWorker::abandon);
        let reason = self.durable.clear_failure();
        let durable_rows = self.durable.get().1;
        let (err, unstored) = end.failed.unwrap_or_else(|| {
            let err = encoder_err.unwrap_or_else(|| DatasetError::Invalid {
                path: self.root.join(self.manifest.data_path(end.no)),
                reason: reason.unwrap_or_else(|| "writing the data file failed".into()),
            });
            (err, Vec::new())
        });
        let mut back: Vec<Batch> = end
            .direct
            .into_iter()
            .filter(|(total, _)| *total > durable_rows)
            .map(|(_, b)| b)
            .collect();
        back.extend(unstored);
        // Not durable: they count as submitted again when they are resubmitted.
        self.submitted_rows -= back.iter().map(|b| b.rows.num_rows() as u64).sum::<u64>();
        let drop_from = back.first().map(|b| first_index(&b.rows));
        self.sealed.push(Sealed {
            no: end.no,
            journal: end.path,
            parquet: None,
            drop_from,
        });
        back.append(&mut self.retry);
        self.retry = back;
        Some(err)
    }

    fn finalize_sealed(&mut self) -> Result<Vec<FileEntry>, DatasetError> {
        let mut done = Vec::new();
        while !self.sealed.is_empty() {
            let (no, journal, drop_from) = (
                self.sealed[0].no,
                self.sealed[0].journal.clone(),
                self.sealed[0].drop_from,
            );
            let closed = match self.sealed[0].parquet.take() {
                Some(p) => {
                    match p.close() {
                        Ok(c) => Some(c),
                        Err(e) => {
                            tracing::warn!("closing the Parquet file failed, rebuilding it from its journal and footer snapshot: {e}");
                            None
                        }
                    }
                }
                None => None,
            };
            let entry = match closed {
                Some(c) => Some(self.commit(c, &journal)?),
                None => self.finalize(no, &journal, drop_from)?,
            };
            done.extend(entry);
            self.sealed.remove(0);
        }
        Ok(done)
    }

    /// Recovery: the rows of data file `no` that were durable → its Parquet file, then the
    /// manifest and the metadata. They are the row groups its footer snapshot describes (rows
    /// written straight into the temporary data file), then the journal's rows after them;
    /// rows from index `drop_from` on are left out (they were handed back to be written again).
    fn finalize(&mut self, no: u64, journal: &Path, drop_from: Option<u64>) -> Result<Option<FileEntry>, DatasetError> {
        let tmp = tmp_path(&self.root.join(self.manifest.data_path(no)));
        let log = self.root.join(JOURNAL_DIR).join(snapshot_name(no));
        let mut batches = snapshot::recover(&tmp, &log)?;
        let after = batches.iter().filter(|b| b.num_rows() > 0).map(last_index).max();
        for b in read_journal(journal)? {
            batches.push(match after {
                Some(after) => rows_where(&b, |index| index > after).map_err(DatasetError::arrow(journal))?,
                None => b,
            });
        }
        if let Some(cap) = drop_from {
            for b in batches.iter_mut() {
                *b = rows_where(b, |index| index < cap).map_err(DatasetError::arrow(journal))?;
            }
        }
        if batches.iter().all(|b| b.num_rows() == 0) {
            snapshot::remove(&tmp, &log)?;
            remove_if_present(&tmp)?;
            remove_if_present(journal)?;
            return Ok(None);
        }
        let mut p = ParquetFile::create(&self.root, &self.manifest, &self.schema, &self.cfg, no)?;
        for b in batches.iter().filter(|b| b.num_rows() > 0) {
            p.write(b)?;
        }
        let closed = p.close()?;
        Ok(Some(self.commit(closed, journal)?))
    }

    /// A data file is in place: record it in the manifest and the metadata, drop its journal
    /// and its footer snapshot.
    fn commit(&mut self, c: ClosedFile, journal: &Path) -> Result<FileEntry, DatasetError> {
        let no = c.no;
        let entry = c.summary.into_entry(c.no, c.rel, c.sha256, c.bytes);
        self.manifest.files.retain(|f| f.no != entry.no);
        self.manifest.files.push(entry.clone());
        self.manifest.files.sort_by_key(|f| f.no);
        self.manifest.save(&self.root)?;
        self.write_meta()?;
        self.remove_snapshot(no)?;
        fs::remove_file(journal).map_err(DatasetError::io(journal))?;
        tracing::debug!(file = %entry.path, rows = entry.rows, "data file finalized");
        Ok(entry)
    }

    /// Data file `no` is finalized: its footer snapshot and any rows recovery kept from it go.
    fn remove_snapshot(&self, no: u64) -> Result<(), DatasetError> {
        let tmp = tmp_path(&self.root.join(self.manifest.data_path(no)));
        snapshot::remove(&tmp, &self.root.join(JOURNAL_DIR).join(snapshot_name(no)))
    }

    fn write_meta(&self) -> Result<(), DatasetError> {
        crate::meta::write_all(&self.root, &self.manifest)
    }

    fn build_batch(&self, rows: &[Row]) -> Result<RecordBatch, DatasetError> {
        let spec = &self.manifest.spec;
        let fps = spec.fps as f64;
        let i64s = |f: &dyn Fn(&Row) -> u64| {
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| f(r) as i64))) as ArrayRef
        };
        let f32_list = |n: usize, f: &dyn Fn(&Row) -> &[f32]| -> ArrayRef {
            let values = Float32Array::from_iter_values(rows.iter().flat_map(|r| f(r).iter().copied()));
            let field = Arc::new(Field::new("item", DataType::Float32, true));
            Arc::new(FixedSizeListArray::new(field, n as i32, Arc::new(values), None))
        };
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(Float32Array::from_iter_values(
                rows.iter().map(|r| (r.frame_index as f64 / fps) as f32),
            )),
            i64s(&|r| r.frame_index),
            i64s(&|r| r.episode_index),
            i64s(&|r| r.index),
            i64s(&|r| r.frame.task as u64),
            f32_list(spec.state_names.len(), &|r| &r.frame.state),
            f32_list(spec.action_names.len(), &|r| &r.frame.action),
        ];
        if spec.camera.is_some() {
            let mut bytes = BinaryBuilder::with_capacity(
                rows.len(),
                rows.iter().map(|r| r.frame.image.as_ref().map_or(0, |b| b.len())).sum(),
            );
            let mut paths = StringBuilder::new();
            for r in rows {
                bytes.append_option(r.frame.image.as_deref());
                paths.append_null();
            }
            let s = StructArray::new(
                spec::image_fields(),
                vec![Arc::new(bytes.finish()), Arc::new(paths.finish())],
                None,
            );
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

struct Sealed {
    no: u64,
    journal: PathBuf,
    parquet: Option<ParquetWorker>,
    /// Rebuild the file without the rows from this index on (handed back after a failure).
    drop_from: Option<u64>,
}

impl Drop for DatasetWriter {
    fn drop(&mut self) {
        // Without finish_file the open file stays a journal, recovered at the next open (what
        // was submitted is stored in it first).
        let workers = self.open.take().and_then(|o| o.finish().parquet).into_iter();
        for w in workers.chain(self.sealed.drain(..).filter_map(|s| s.parquet)) {
            let _ = w.abandon();
        }
    }
}
