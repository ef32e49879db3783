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
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::fsutil::{sync_dir, tmp_path, ThreadedFileWriter};
use crate::journal::{journal_name, parse_journal_name, read_journal, Journal};
use crate::manifest::{EpisodeSpan, FileEntry, Manifest};
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

    /// Make every queued frame durable: [`submit`](Self::submit), then wait until the journal
    /// thread has fsynced everything submitted. Returns the last durable sequence number. On an
    /// I/O error the frames stay queued and the journal is sealed, so that a later flush writes
    /// them to a fresh journal.
    pub fn flush(&mut self) -> Result<Option<u64>, DatasetError> {
        self.submit()?;
        if !self.durable.wait_for(self.submitted_rows) {
            return Err(self.take_failure());
        }
        Ok(self.durable.get().0)
    }

    /// Hand every queued frame to the journal thread as one batch and return without waiting:
    /// the thread appends it to the journal, fsyncs it, counts it in [`durable`](Self::durable)
    /// (and wakes whoever [`Durability::on_durable`] names), then passes it to the Parquet
    /// encoder. Only durable rows may be acknowledged. An error from an earlier batch is
    /// returned here, with its rows queued again.
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
                .map(ParquetWorker::start);
            self.open = Some(OpenFile::start(journal, parquet, self.durable.clone()));
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

    /// The journal thread failed: seal its file (what it made durable becomes a data file) and
    /// queue the batches it could not store again, ahead of anything newer.
    fn take_failure(&mut self) -> DatasetError {
        let err = self.seal();
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

    /// Close the open file's journal: wait for its thread to store what it was handed, and put
    /// the file among those to finalize. A journal write that failed is returned, and the
    /// batches it did not store are queued again (the rows it stored stay in this file).
    fn seal(&mut self) -> Option<DatasetError> {
        let o = self.open.take()?;
        let end = o.finish();
        self.sealed.push(Sealed {
            no: end.no,
            journal: end.path,
            parquet: end.parquet,
        });
        self.durable.clear_failure();
        let (err, mut unstored) = end.failed?;
        // Not durable: they count as submitted again when they are resubmitted.
        self.submitted_rows -= unstored.iter().map(|b| b.rows.num_rows() as u64).sum::<u64>();
        unstored.append(&mut self.retry);
        self.retry = unstored;
        Some(err)
    }

    fn finalize_sealed(&mut self) -> Result<Vec<FileEntry>, DatasetError> {
        let mut done = Vec::new();
        while !self.sealed.is_empty() {
            let (no, journal) = (self.sealed[0].no, self.sealed[0].journal.clone());
            let closed = match self.sealed[0].parquet.take() {
                Some(p) => match p.close() {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!("closing the Parquet file failed, rebuilding it from its journal: {e}");
                        None
                    }
                },
                None => None,
            };
            let entry = match closed {
                Some(c) => Some(self.commit(c, &journal)?),
                None => self.finalize(no, &journal)?,
            };
            done.extend(entry);
            self.sealed.remove(0);
        }
        Ok(done)
    }

    /// Recovery: journal `path` → its Parquet data file, then the manifest and the metadata.
    fn finalize(&mut self, no: u64, path: &Path) -> Result<Option<FileEntry>, DatasetError> {
        let batches = read_journal(path)?;
        if batches.iter().all(|b| b.num_rows() == 0) {
            fs::remove_file(path).map_err(DatasetError::io(path))?;
            return Ok(None);
        }
        let mut p = ParquetFile::create(&self.root, &self.manifest, &self.schema, &self.cfg, no)?;
        for b in &batches {
            p.write(b)?;
        }
        let closed = p.close()?;
        Ok(Some(self.commit(closed, path)?))
    }

    /// A data file is in place: record it in the manifest and the metadata, drop its journal.
    fn commit(&mut self, c: ClosedFile, journal: &Path) -> Result<FileEntry, DatasetError> {
        let entry = c.summary.into_entry(c.no, c.rel, c.sha256, c.bytes);
        self.manifest.files.retain(|f| f.no != entry.no);
        self.manifest.files.push(entry.clone());
        self.manifest.files.sort_by_key(|f| f.no);
        self.manifest.save(&self.root)?;
        self.write_meta()?;
        fs::remove_file(journal).map_err(DatasetError::io(journal))?;
        tracing::debug!(file = %entry.path, rows = entry.rows, "data file finalized");
        Ok(entry)
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
struct Batch {
    rows: RecordBatch,
    last_seq: u64,
}

/// Batches handed to a journal thread that it has not taken yet, at most: `submit` waits
/// beyond that (the disk sets the pace, and memory stays bounded).
const JOURNAL_QUEUE: usize = 4;

/// The file being written: a thread that appends each batch to its journal, fsyncs it, counts
/// it as durable, and then hands it to the file's Parquet encoder (absent when writing it
/// failed: the journal rebuilds it).
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
    /// The write that failed, and every batch from it on (none of them durable).
    failed: Option<(DatasetError, Vec<Batch>)>,
}

impl OpenFile {
    fn start(mut journal: Journal, mut parquet: Option<ParquetWorker>, durable: Durability) -> OpenFile {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(JOURNAL_QUEUE);
        let handle = std::thread::Builder::new()
            .name("nb-journal".into())
            .spawn(move || {
                let mut failed: Option<(DatasetError, Vec<Batch>)> = None;
                for b in rx {
                    if let Some((_, unstored)) = &mut failed {
                        unstored.push(b);
                        continue;
                    }
                    if let Err(e) = journal.append(&b.rows) {
                        durable.fail();
                        failed = Some((e, vec![b]));
                        continue;
                    }
                    durable.advance(b.last_seq, b.rows.num_rows() as u64);
                    if let Some(p) = parquet.take() {
                        match p.write(b.rows) {
                            Ok(()) => parquet = Some(p),
                            Err(()) => {
                                let e = p.close().err().map(|e| e.to_string()).unwrap_or_default();
                                tracing::warn!("Parquet write failed, the file will be built from its journal: {e}");
                            }
                        }
                    }
                }
                JournalEnd {
                    no: journal.file_no,
                    path: journal.path,
                    parquet,
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

#[derive(Default, Clone, Copy)]
struct DurableState {
    seq: Option<u64>,
    rows: u64,
    failed: bool,
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
            failed: false,
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

    fn fail(&self) {
        self.lock().failed = true;
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
        self.lock().failed
    }

    fn clear_failure(&self) {
        self.lock().failed = false;
    }

    /// Wait until `rows` rows are durable (true) or a journal write failed (false).
    fn wait_for(&self, rows: u64) -> bool {
        let mut s = self.lock();
        loop {
            if s.failed {
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
}

/// A [`ParquetFile`] encoded on its own thread, so that encoding overlaps journaling. Only an
/// explicit close finishes the file; a worker dropped without one abandons its temporary file
/// (the journal rebuilds it).
struct ParquetWorker {
    tx: std::sync::mpsc::SyncSender<Option<RecordBatch>>,
    handle: std::thread::JoinHandle<Option<Result<ClosedFile, DatasetError>>>,
}

impl ParquetWorker {
    fn start(mut file: ParquetFile) -> ParquetWorker {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Option<RecordBatch>>(16);
        let handle = std::thread::Builder::new()
            .name("nb-parquet".into())
            .spawn(move || {
                for msg in rx {
                    match msg {
                        Some(b) => {
                            if let Err(e) = file.write(&b) {
                                return Some(Err(e));
                            }
                        }
                        None => return Some(file.close()),
                    }
                }
                None
            })
            .expect("spawn the Parquet thread");
        ParquetWorker { tx, handle }
    }

    /// Queue a batch; an error means the worker stopped on an error (see [`close`](Self::close)).
    fn write(&self, b: RecordBatch) -> Result<(), ()> {
        self.tx.send(Some(b)).map_err(|_| ())
    }

    fn close(self) -> Result<ClosedFile, DatasetError> {
        let _ = self.tx.send(None);
        drop(self.tx);
        self.handle
            .join()
            .expect("the Parquet thread does not panic")
            .expect("a closed worker reports")
    }

    /// Stop without finishing the file, and wait for the thread.
    fn abandon(self) {
        drop(self.tx);
        let _ = self.handle.join();
    }
}

impl Drop for DatasetWriter {
    fn drop(&mut self) {
        // Without finish_file the open file stays a journal, recovered at the next open (what
        // was submitted is stored in it first).
        let workers = self.open.take().and_then(|o| o.finish().parquet).into_iter();
        for w in workers.chain(self.sealed.drain(..).filter_map(|s| s.parquet)) {
            w.abandon();
        }
    }
}

/// A Parquet data file being written under its temporary name.
struct ParquetFile {
    no: u64,
    rel: String,
    tmp: PathBuf,
    target: PathBuf,
    writer: ArrowWriter<ThreadedFileWriter<File>>,
    summary: FileSummary,
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
            writer,
            summary: FileSummary::new(&manifest.spec),
        })
    }

    fn write(&mut self, b: &RecordBatch) -> Result<(), DatasetError> {
        self.writer.write(b).map_err(DatasetError::parquet(&self.tmp))?;
        self.summary.add(b);
        Ok(())
    }

    /// Footer, fsync, rename into place, fsync the directory.
    fn close(self) -> Result<ClosedFile, DatasetError> {
        let tmp = self.tmp;
        let threaded = self.writer.into_inner().map_err(DatasetError::parquet(&tmp))?;
        let (file, sha256, bytes) = threaded.finish().map_err(DatasetError::io(&tmp))?;
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
