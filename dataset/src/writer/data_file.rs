//! The data file's path: the Parquet encoder on a thread of its own, the file under its
//! temporary name with its footer snapshots, the sync thread that makes direct batches durable,
//! and the per-file summary the manifest records.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{Int64Array, RecordBatch};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::fsutil::{sync_dir, tmp_path, ThreadedFileWriter};
use crate::manifest::{EpisodeSpan, FileEntry, Manifest};
use crate::snapshot::{self, snapshot_name, SnapshotLog};
use crate::spec::{self, DatasetSpec};
use crate::stats::{add_rows, Moments};
use crate::DatasetError;

use super::*;

/// What the Parquet encoder is handed: rows already durable (journaled), or a batch to make
/// durable in the data file itself.
pub(super) enum ToParquet {
    Rows(RecordBatch),
    Durable(Batch),
}

/// A [`ParquetFile`] encoded on its own thread, so that encoding overlaps journaling. Only an
/// explicit close finishes the file; a worker dropped without one abandons its temporary file
/// (the journal and the footer snapshot rebuild it).
pub(super) struct ParquetWorker {
    pub(super) tx: std::sync::mpsc::SyncSender<Option<ToParquet>>,
    pub(super) handle: std::thread::JoinHandle<Option<Result<ClosedFile, DatasetError>>>,
}

impl ParquetWorker {
    pub(super) fn start(mut file: ParquetFile, durable: Durability) -> ParquetWorker {
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
    pub(super) fn send(&self, m: ToParquet) -> Result<(), ()> {
        self.tx.send(Some(m)).map_err(|_| ())
    }

    pub(super) fn close(self) -> Result<ClosedFile, DatasetError> {
        let _ = self.tx.send(None);
        drop(self.tx);
        self.handle
            .join()
            .expect("the Parquet thread does not panic")
            .expect("a closed worker reports")
    }

    /// Stop without finishing the file, wait for the thread, and return the error it stopped
    /// on, if it did.
    pub(super) fn abandon(self) -> Option<DatasetError> {
        drop(self.tx);
        match self.handle.join() {
            Ok(Some(Err(e))) => Some(e),
            _ => None,
        }
    }
}

/// A Parquet data file being written under its temporary name.
pub(super) struct ParquetFile {
    pub(super) no: u64,
    pub(super) rel: String,
    pub(super) tmp: PathBuf,
    pub(super) target: PathBuf,
    pub(super) schema: arrow_schema::SchemaRef,
    /// The temporary file again, for fsyncs while the writer's thread holds it.
    pub(super) data: File,
    /// Its footer snapshot log (`journal/file-NNNNNN.footer`).
    pub(super) log: PathBuf,
    pub(super) writer: ArrowWriter<ThreadedFileWriter<File>>,
    pub(super) summary: FileSummary,
    /// Started by the first batch written durable here. Declared after `writer`: dropped
    /// after it, so the marks the writer's thread still runs reach it.
    pub(super) sync: Option<DirectSync>,
}

pub(super) struct ClosedFile {
    pub(super) no: u64,
    pub(super) rel: String,
    pub(super) sha256: String,
    pub(super) bytes: u64,
    pub(super) summary: FileSummary,
}

impl ParquetFile {
    pub(super) fn create(
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

    pub(super) fn write(&mut self, b: &RecordBatch) -> Result<(), DatasetError> {
        self.writer.write(b).map_err(DatasetError::parquet(&self.tmp))?;
        self.summary.add(b);
        Ok(())
    }

    /// Write `b` and make it durable here: close the row group, and once the writer's thread
    /// has written it, fsync the file and append a footer snapshot of every row group so far
    /// (on the sync thread, which then counts the rows durable). The next batch is encoded
    /// meanwhile.
    pub(super) fn write_durable(&mut self, b: Batch, durable: &Durability) -> Result<(), DatasetError> {
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
    pub(super) fn close(self) -> Result<ClosedFile, DatasetError> {
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
pub(super) struct SyncJob {
    pub(super) len: u64,
    pub(super) footer: Vec<u8>,
    pub(super) last_seq: u64,
    pub(super) rows: u64,
}

/// The thread that fsyncs a data file's direct row groups and appends their footer snapshots,
/// in order; after a failure it makes nothing more durable.
pub(super) struct DirectSync {
    /// (whether the data file's writes before the job succeeded, the job).
    pub(super) tx: Option<std::sync::mpsc::Sender<(bool, SyncJob)>>,
    pub(super) handle: Option<std::thread::JoinHandle<Result<(), DatasetError>>>,
    /// The Arrow schema for the snapshot footers, encoded once.
    pub(super) schema_kv: parquet::file::metadata::KeyValue,
}

impl DirectSync {
    pub(super) fn start(
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
    pub(super) fn finish(mut self) -> Result<(), DatasetError> {
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
pub(super) struct FileSummary {
    pub(super) features: Vec<(&'static str, usize)>,
    pub(super) rows: u64,
    pub(super) first_seq: u64,
    pub(super) last_seq: u64,
    pub(super) first_index: u64,
    pub(super) end_index: u64,
    pub(super) episodes: Vec<EpisodeSpan>,
}

impl FileSummary {
    pub(super) fn new(spec: &DatasetSpec) -> FileSummary {
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

    pub(super) fn add(&mut self, b: &RecordBatch) {
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

    pub(super) fn into_entry(self, no: u64, path: String, sha256: String, bytes: u64) -> FileEntry {
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
pub(super) fn index_column(b: &RecordBatch) -> &Int64Array {
    b.column_by_name(spec::INDEX)
        .expect("batch has the schema")
        .as_primitive::<Int64Type>()
}

pub(super) fn first_index(b: &RecordBatch) -> u64 {
    index_column(b).values().first().map_or(u64::MAX, |i| *i as u64)
}

pub(super) fn last_index(b: &RecordBatch) -> u64 {
    index_column(b).values().last().map_or(0, |i| *i as u64)
}

/// The rows of `b` whose index passes `keep`.
pub(super) fn rows_where(b: &RecordBatch, keep: impl Fn(u64) -> bool) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let mask: arrow_array::BooleanArray = index_column(b).values().iter().map(|i| Some(keep(*i as u64))).collect();
    arrow_select::filter::filter_record_batch(b, &mask)
}
