//! [`DatasetWriter`]: frames → durable batches (journaled, or straight into the data file with a
//! footer snapshot) → Parquet data files.

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
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::fsutil::{remove_if_present, sync_dir, tmp_path, ThreadedFileWriter};
use crate::journal::{journal_name, parse_journal_name, read_journal, Journal};
use crate::manifest::{EpisodeSpan, FileEntry, Manifest};
use crate::snapshot::{self, parse_snapshot_name, snapshot_name, SnapshotLog};
use crate::spec::{self, DatasetSpec};
use crate::stats::{add_rows, Moments};
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

/// One submitted batch: its rows, and the sequence number of the last.
#[derive(Clone)]
struct Batch {
    rows: RecordBatch,
    last_seq: u64,
}

/// Batches handed to a journal thread that it has not taken yet, at most: `submit` waits
/// beyond that (the disk sets the pace, and memory stays bounded).
const JOURNAL_QUEUE: usize = 4;

/// The file being written: a thread that takes each batch in order. A small batch is appended
/// to the journal, fsynced, counted durable, and then handed to the file's Parquet encoder. A
/// batch of `direct_rows` or more goes to the encoder only, which makes it durable in the data
/// file itself (see [`ParquetFile::write_durable`]). Before the next small batch is journaled,
/// the direct ones before it must be durable, so rows become durable in order.
struct OpenFile {
    tx: std::sync::mpsc::SyncSender<Batch>,
    handle: std::thread::JoinHandle<JournalEnd>,
    rows: u64,
    /// Arrow bytes submitted (the rotation size).
    bytes: u64,
    opened: std::time::Instant,
}

/// What a journal thread leaves when it ends.
struct JournalEnd {
    no: u64,
    path: PathBuf,
    parquet: Option<ParquetWorker>,
    /// The durable row count once everything it took is durable.
    total: u64,
    /// The batches it sent straight to the data file since the last journaled one, each with
    /// the durable row count once it is durable.
    direct: Vec<(u64, Batch)>,
    /// The write that failed, and every batch from it on (none of them durable).
    failed: Option<(DatasetError, Vec<Batch>)>,
}

impl OpenFile {
    fn start(
        mut journal: Journal,
        mut parquet: Option<ParquetWorker>,
        durable: Durability,
        direct_rows: usize,
    ) -> OpenFile {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(JOURNAL_QUEUE);
        let handle = std::thread::Builder::new()
            .name("nb-journal".into())
            .spawn(move || {
                let mut failed: Option<(DatasetError, Vec<Batch>)> = None;
                let mut total = durable.get().1;
                let mut direct: Vec<(u64, Batch)> = Vec::new();
                for b in rx {
                    if let Some((_, unstored)) = &mut failed {
                        unstored.push(b);
                        continue;
                    }
                    let n = b.rows.num_rows() as u64;
                    if let Some(p) = parquet.as_ref().filter(|_| b.rows.num_rows() >= direct_rows) {
                        direct.push((total + n, b.clone()));
                        total += n;
                        if p.send(ToParquet::Durable(b)).is_err() {
                            durable.fail("the Parquet encoder of its data file stopped".into());
                            failed = Some((
                                DatasetError::Invalid {
                                    path: journal.path.clone(),
                                    reason: "the Parquet encoder of its data file stopped".into(),
                                },
                                Vec::new(),
                            ));
                        }
                        continue;
                    }
                    if let Some((t, _)) = direct.last() {
                        if !durable.wait_for(*t) {
                            failed = Some((
                                DatasetError::Invalid {
                                    path: journal.path.clone(),
                                    reason: "rows written straight into its data file did not become durable".into(),
                                },
                                vec![b],
                            ));
                            continue;
                        }
                        direct.clear();
                    }
                    if let Err(e) = journal.append(&b.rows) {
                        durable.fail(e.to_string());
                        failed = Some((e, vec![b]));
                        continue;
                    }
                    total += n;
                    durable.advance(b.last_seq, n);
                    if let Some(p) = parquet.take() {
                        match p.send(ToParquet::Rows(b.rows)) {
                            Ok(()) => parquet = Some(p),
                            Err(()) => {
                                let e = p.abandon().map(|e| e.to_string()).unwrap_or_default();
                                tracing::warn!("Parquet write failed, the file will be built from its journal: {e}");
                            }
                        }
                    }
                }
                JournalEnd {
                    no: journal.file_no,
                    path: journal.path,
                    parquet,
                    total,
                    direct,
                    failed,
                }
            })
            .expect("spawn the journal thread");
        OpenFile {
            tx,
            handle,
            rows: 0,
            bytes: 0,
            opened: std::time::Instant::now(),
        }
    }

    /// Queue a batch (waits while the thread is [`JOURNAL_QUEUE`] batches behind).
    fn send(&self, b: Batch) {
        // The thread ends only when `tx` is dropped: a send cannot fail while `self` lives.
        let _ = self.tx.send(b);
    }

    /// Let the thread store what it holds, and take what it leaves.
    fn finish(self) -> JournalEnd {
        drop(self.tx);
        self.handle.join().expect("the journal thread does not panic")
    }
}

/// What is durable (the last sequence number and the row count), shared between a
/// [`DatasetWriter`] and the thread that fsyncs its journal.
#[derive(Clone, Default)]
pub struct Durability(Arc<DurableShared>);

#[derive(Default)]
struct DurableShared {
    state: std::sync::Mutex<DurableState>,
    changed: std::sync::Condvar,
    wake: std::sync::Mutex<Option<Box<dyn Fn() + Send>>>,
}

#[derive(Default)]
struct DurableState {
    seq: Option<u64>,
    rows: u64,
    /// The first failure since the last was handled.
    failed: Option<String>,
}

impl Durability {
    fn lock(&self) -> std::sync::MutexGuard<'_, DurableState> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last durable sequence number, and how many rows are durable.
    pub fn get(&self) -> (Option<u64>, u64) {
        let s = self.lock();
        (s.seq, s.rows)
    }

    /// Call `wake` (from the journal thread) each time more rows become durable, and when a
    /// journal write fails.
    pub fn on_durable(&self, wake: impl Fn() + Send + 'static) {
        *self.0.wake.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(wake));
    }

    fn reset(&self, seq: Option<u64>, rows: u64) {
        *self.lock() = DurableState {
            seq,
            rows,
            failed: None,
        };
    }

    fn advance(&self, seq: u64, rows: u64) {
        {
            let mut s = self.lock();
            s.seq = Some(seq);
            s.rows += rows;
        }
        self.notify();
    }

    fn fail(&self, why: String) {
        self.lock().failed.get_or_insert(why);
        self.notify();
    }

    /// Wake the listener, then the writer's waiters (so a listener has been told of every
    /// batch a returned `flush` covers).
    fn notify(&self) {
        if let Some(wake) = &*self.0.wake.lock().unwrap_or_else(|e| e.into_inner()) {
            wake();
        }
        self.0.changed.notify_all();
    }

    fn failed(&self) -> bool {
        self.lock().failed.is_some()
    }

    /// Forget the failure (it is being handled), and say what it was.
    fn clear_failure(&self) -> Option<String> {
        self.lock().failed.take()
    }

    /// Wait until `rows` rows are durable (true) or a journal write failed (false).
    fn wait_for(&self, rows: u64) -> bool {
        let mut s = self.lock();
        loop {
            if s.failed.is_some() {
                return false;
            }
            if s.rows >= rows {
                return true;
            }
            s = self.0.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct Sealed {
    no: u64,
    journal: PathBuf,
    parquet: Option<ParquetWorker>,
    /// Rebuild the file without the rows from this index on (handed back after a failure).
    drop_from: Option<u64>,
}

/// What the Parquet encoder is handed: rows already durable (journaled), or a batch to make
/// durable in the data file itself.
enum ToParquet {
    Rows(RecordBatch),
    Durable(Batch),
}

/// A [`ParquetFile`] encoded on its own thread, so that encoding overlaps journaling. Only an
/// explicit close finishes the file; a worker dropped without one abandons its temporary file
/// (the journal and the footer snapshot rebuild it).
struct ParquetWorker {
    tx: std::sync::mpsc::SyncSender<Option<ToParquet>>,
    handle: std::thread::JoinHandle<Option<Result<ClosedFile, DatasetError>>>,
}

impl ParquetWorker {
    fn start(mut file: ParquetFile, durable: Durability) -> ParquetWorker {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Option<ToParquet>>(16);
        let handle = std::thread::Builder::new()
            .name("nb-parquet".into())
            .spawn(move || {
                for msg in rx {
                    let done = match msg {
                        Some(ToParquet::Rows(b)) => file.write(&b),
                        Some(ToParquet::Durable(b)) => file.write_durable(b, &durable),
                        None => return Some(file.close()),
                    };
                    if let Err(e) = done {
                        // Rows sent to be made durable here never will be: say so.
                        durable.fail(e.to_string());
                        return Some(Err(e));
                    }
                }
                None
            })
            .expect("spawn the Parquet thread");
        ParquetWorker { tx, handle }
    }

    /// Queue a message; an error means the worker stopped on an error.
    fn send(&self, m: ToParquet) -> Result<(), ()> {
        self.tx.send(Some(m)).map_err(|_| ())
    }

    fn close(self) -> Result<ClosedFile, DatasetError> {
        let _ = self.tx.send(None);
        drop(self.tx);
        self.handle
            .join()
            .expect("the Parquet thread does not panic")
            .expect("a closed worker reports")
    }

    /// Stop without finishing the file, wait for the thread, and return the error it stopped
    /// on, if it did.
    fn abandon(self) -> Option<DatasetError> {
        drop(self.tx);
        match self.handle.join() {
            Ok(Some(Err(e))) => Some(e),
            _ => None,
        }
    }
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

/// A Parquet data file being written under its temporary name.
struct ParquetFile {
    no: u64,
    rel: String,
    tmp: PathBuf,
    target: PathBuf,
    schema: arrow_schema::SchemaRef,
    /// The temporary file again, for fsyncs while the writer's thread holds it.
    data: File,
    /// Its footer snapshot log (`journal/file-NNNNNN.footer`).
    log: PathBuf,
    writer: ArrowWriter<ThreadedFileWriter<File>>,
    summary: FileSummary,
    /// Started by the first batch written durable here. Declared after `writer`: dropped
    /// after it, so the marks the writer's thread still runs reach it.
    sync: Option<DirectSync>,
}

struct ClosedFile {
    no: u64,
    rel: String,
    sha256: String,
    bytes: u64,
    summary: FileSummary,
}

impl ParquetFile {
    fn create(
        root: &Path,
        manifest: &Manifest,
        schema: &arrow_schema::SchemaRef,
        cfg: &WriterConfig,
        no: u64,
    ) -> Result<ParquetFile, DatasetError> {
        let rel = manifest.data_path(no);
        let target = root.join(&rel);
        let dir = target.parent().expect("data path has a directory");
        fs::create_dir_all(dir).map_err(DatasetError::io(dir))?;
        let tmp = tmp_path(&target);
        let file = File::create(&tmp).map_err(DatasetError::io(&tmp))?;
        let data = file.try_clone().map_err(DatasetError::io(&tmp))?;
        // No dictionaries: measured floats seldom repeat, the index, sequence numbers and stamps
        // never do, and the few small integer columns that repeat (episode, frame and task
        // indices) compress under snappy as well without one. Building a dictionary per column
        // only to drop it cost a quarter of the encoder's time (`nanobot bench log`).
        let mut props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_dictionary_enabled(false)
            .set_max_row_group_row_count(Some(cfg.row_group_rows));
        if let Some(cam) = &manifest.spec.camera {
            // Encoded images (JPEG) do not compress and their min/max mean nothing: neither
            // snappy nor statistics for them.
            let bytes = ColumnPath::new(vec![cam.key.clone(), "bytes".into()]);
            props = props
                .set_column_statistics_enabled(bytes.clone(), EnabledStatistics::None)
                .set_column_compression(bytes, Compression::UNCOMPRESSED);
        }
        let writer = ArrowWriter::try_new(
            ThreadedFileWriter::new(file, 1 << 20),
            schema.clone(),
            Some(props.build()),
        )
        .map_err(DatasetError::parquet(&tmp))?;
        Ok(ParquetFile {
            no,
            rel,
            tmp,
            target,
            schema: schema.clone(),
            data,
            log: root.join(JOURNAL_DIR).join(snapshot_name(no)),
            writer,
            summary: FileSummary::new(&manifest.spec),
            sync: None,
        })
    }

    fn write(&mut self, b: &RecordBatch) -> Result<(), DatasetError> {
        self.writer.write(b).map_err(DatasetError::parquet(&self.tmp))?;
        self.summary.add(b);
        Ok(())
    }

    /// Write `b` and make it durable here: close the row group, and once the writer's thread
    /// has written it, fsync the file and append a footer snapshot of every row group so far
    /// (on the sync thread, which then counts the rows durable). The next batch is encoded
    /// meanwhile.
    fn write_durable(&mut self, b: Batch, durable: &Durability) -> Result<(), DatasetError> {
        self.write(&b.rows)?;
        self.writer.flush().map_err(DatasetError::parquet(&self.tmp))?;
        self.writer.sync().map_err(DatasetError::io(&self.tmp))?;
        if self.sync.is_none() {
            let data = self.data.try_clone().map_err(DatasetError::io(&self.tmp))?;
            self.sync = Some(DirectSync::start(
                data,
                self.tmp.clone(),
                self.log.clone(),
                durable.clone(),
                snapshot::arrow_schema_kv(&self.schema),
            ));
        }
        let sync = self.sync.as_ref().expect("started above");
        let footer = snapshot::footer(&sync.schema_kv, self.writer.flushed_row_groups())
            .map_err(DatasetError::parquet(&self.tmp))?;
        let job = SyncJob {
            len: self.writer.bytes_written() as u64,
            footer,
            last_seq: b.last_seq,
            rows: b.rows.num_rows() as u64,
        };
        let tx = sync.tx.clone().expect("open until finished");
        self.writer
            .inner_mut()
            .mark(move |written| {
                let _ = tx.send((written, job));
            })
            .map_err(DatasetError::io(&self.tmp))
    }

    /// Footer, fsync, rename into place, fsync the directory.
    fn close(self) -> Result<ClosedFile, DatasetError> {
        let tmp = self.tmp;
        let threaded = self.writer.into_inner().map_err(DatasetError::parquet(&tmp))?;
        let (file, sha256, bytes) = threaded.finish().map_err(DatasetError::io(&tmp))?;
        // Every row written durable here is acknowledged before the file is finished.
        if let Some(sync) = self.sync {
            sync.finish()?;
        }
        file.sync_all().map_err(DatasetError::io(&tmp))?;
        drop(file);
        fs::rename(&tmp, &self.target).map_err(DatasetError::io(&self.target))?;
        sync_dir(self.target.parent().expect("data path has a directory"))?;
        Ok(ClosedFile {
            no: self.no,
            rel: self.rel,
            sha256,
            bytes,
            summary: self.summary,
        })
    }
}

/// What the sync thread makes durable: the data file's first `len` bytes, described by
/// `footer`, and the `rows` rows up to `last_seq` in them.
struct SyncJob {
    len: u64,
    footer: Vec<u8>,
    last_seq: u64,
    rows: u64,
}

/// The thread that fsyncs a data file's direct row groups and appends their footer snapshots,
/// in order; after a failure it makes nothing more durable.
struct DirectSync {
    /// (whether the data file's writes before the job succeeded, the job).
    tx: Option<std::sync::mpsc::Sender<(bool, SyncJob)>>,
    handle: Option<std::thread::JoinHandle<Result<(), DatasetError>>>,
    /// The Arrow schema for the snapshot footers, encoded once.
    schema_kv: parquet::file::metadata::KeyValue,
}

impl DirectSync {
    fn start(
        data: File,
        data_path: PathBuf,
        log_path: PathBuf,
        durable: Durability,
        schema_kv: parquet::file::metadata::KeyValue,
    ) -> DirectSync {
        let (tx, rx) = std::sync::mpsc::channel::<(bool, SyncJob)>();
        let handle = std::thread::Builder::new()
            .name("nb-sync".into())
            .spawn(move || {
                let mut log: Option<SnapshotLog> = None;
                for (written, job) in rx {
                    let synced = if written {
                        data.sync_data().map_err(DatasetError::io(&data_path))
                    } else {
                        Err(DatasetError::Invalid {
                            path: data_path.clone(),
                            reason: "a write to the data file failed".into(),
                        })
                    };
                    let logged = synced.and_then(|()| {
                        let l = match &mut log {
                            Some(l) => l,
                            None => log.insert(SnapshotLog::create(log_path.clone())?),
                        };
                        l.append(job.len, &job.footer)
                    });
                    if let Err(e) = logged {
                        durable.fail(e.to_string());
                        return Err(e);
                    }
                    durable.advance(job.last_seq, job.rows);
                }
                Ok(())
            })
            .expect("spawn the sync thread");
        DirectSync {
            tx: Some(tx),
            handle: Some(handle),
            schema_kv,
        }
    }

    /// Make everything queued durable (or fail), and end the thread.
    fn finish(mut self) -> Result<(), DatasetError> {
        drop(self.tx.take());
        self.handle
            .take()
            .expect("finished once")
            .join()
            .expect("the sync thread does not panic")
    }
}

impl Drop for DirectSync {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// What the manifest says of a file, gathered batch by batch: sequence and index ranges, and
/// each episode's span and statistics.
struct FileSummary {
    features: Vec<(&'static str, usize)>,
    rows: u64,
    first_seq: u64,
    last_seq: u64,
    first_index: u64,
    end_index: u64,
    episodes: Vec<EpisodeSpan>,
}

impl FileSummary {
    fn new(spec: &DatasetSpec) -> FileSummary {
        FileSummary {
            features: spec.stat_features(),
            rows: 0,
            first_seq: u64::MAX,
            last_seq: 0,
            first_index: u64::MAX,
            end_index: 0,
            episodes: Vec::new(),
        }
    }

    fn add(&mut self, b: &RecordBatch) {
        let col = |n: &str| {
            b.column_by_name(n)
                .expect("batch has the schema")
                .as_primitive::<Int64Type>()
                .clone()
        };
        let (seq, ep, idx, task) = (
            col(spec::SEQ),
            col(spec::EPISODE_INDEX),
            col(spec::INDEX),
            col(spec::TASK_INDEX),
        );
        let src = col(spec::SOURCE_EPISODE);
        let n = b.num_rows();
        let mut r = 0;
        // Run by run of one episode: its span, then its statistics over the run's rows.
        while r < n {
            let e = ep.value(r) as u64;
            let end = (r..n).find(|&i| ep.value(i) as u64 != e).unwrap_or(n);
            for i in r..end {
                self.first_seq = self.first_seq.min(seq.value(i) as u64);
                self.last_seq = self.last_seq.max(seq.value(i) as u64);
                let index = idx.value(i) as u64;
                self.first_index = self.first_index.min(index);
                self.end_index = self.end_index.max(index + 1);
            }
            if self.episodes.last().is_none_or(|s| s.episode_index != e) {
                let index = idx.value(r) as u64;
                self.episodes.push(EpisodeSpan {
                    episode_index: e,
                    source_episode: src.value(r) as u64,
                    task_index: task.value(r) as u64,
                    from_index: index,
                    to_index: index,
                    stats: self
                        .features
                        .iter()
                        .map(|(n, w)| (n.to_string(), Moments::new(*w)))
                        .collect::<BTreeMap<_, _>>(),
                });
            }
            let span = self.episodes.last_mut().expect("pushed above");
            span.to_index = idx.value(end - 1) as u64 + 1;
            for (name, m) in span.stats.iter_mut() {
                add_rows(m, b, name, r..end);
            }
            r = end;
        }
        self.rows += b.num_rows() as u64;
    }

    fn into_entry(self, no: u64, path: String, sha256: String, bytes: u64) -> FileEntry {
        FileEntry {
            no,
            path,
            rows: self.rows,
            bytes,
            sha256,
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            first_index: self.first_index,
            end_index: self.end_index,
            episodes: self.episodes,
        }
    }
}

/// The `index` column of a batch.
fn index_column(b: &RecordBatch) -> &Int64Array {
    b.column_by_name(spec::INDEX)
        .expect("batch has the schema")
        .as_primitive::<Int64Type>()
}

fn first_index(b: &RecordBatch) -> u64 {
    index_column(b).values().first().map_or(u64::MAX, |i| *i as u64)
}

fn last_index(b: &RecordBatch) -> u64 {
    index_column(b).values().last().map_or(0, |i| *i as u64)
}

/// The rows of `b` whose index passes `keep`.
fn rows_where(b: &RecordBatch, keep: impl Fn(u64) -> bool) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let mask: arrow_array::BooleanArray = index_column(b).values().iter().map(|i| Some(keep(*i as u64))).collect();
    arrow_select::filter::filter_record_batch(b, &mask)
}
