//! The open data file's path for batches: a thread that journals each small batch (fsynced,
//! counted durable, then handed to the Parquet encoder) and sends each large one straight to
//! the data file, in order.

use std::path::PathBuf;

use arrow_array::RecordBatch;

use crate::journal::Journal;
use crate::DatasetError;

use super::*;

/// One submitted batch: its rows, and the sequence number of the last.
#[derive(Clone)]
pub(super) struct Batch {
    pub(super) rows: RecordBatch,
    pub(super) last_seq: u64,
}

/// Batches handed to a journal thread that it has not taken yet, at most: `submit` waits
/// beyond that (the disk sets the pace, and memory stays bounded).
pub(super) const JOURNAL_QUEUE: usize = 4;

/// The file being written: a thread that takes each batch in order. A small batch is appended
/// to the journal, fsynced, counted durable, and then handed to the file's Parquet encoder. A
/// batch of `direct_rows` or more goes to the encoder only, which makes it durable in the data
/// file itself (see [`ParquetFile::write_durable`]). Before the next small batch is journaled,
/// the direct ones before it must be durable, so rows become durable in order.
pub(super) struct OpenFile {
    pub(super) tx: std::sync::mpsc::SyncSender<Batch>,
    pub(super) handle: std::thread::JoinHandle<JournalEnd>,
    pub(super) rows: u64,
    /// Arrow bytes submitted (the rotation size).
    pub(super) bytes: u64,
    pub(super) opened: std::time::Instant,
}

/// What a journal thread leaves when it ends.
pub(super) struct JournalEnd {
    pub(super) no: u64,
    pub(super) path: PathBuf,
    pub(super) parquet: Option<ParquetWorker>,
    /// The durable row count once everything it took is durable.
    pub(super) total: u64,
    /// The batches it sent straight to the data file since the last journaled one, each with
    /// the durable row count once it is durable.
    pub(super) direct: Vec<(u64, Batch)>,
    /// The write that failed, and every batch from it on (none of them durable).
    pub(super) failed: Option<(DatasetError, Vec<Batch>)>,
}

impl OpenFile {
    pub(super) fn start(
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
    pub(super) fn send(&self, b: Batch) {
        // The thread ends only when `tx` is dropped: a send cannot fail while `self` lives.
        let _ = self.tx.send(b);
    }

    /// Let the thread store what it holds, and take what it leaves.
    pub(super) fn finish(self) -> JournalEnd {
        drop(self.tx);
        self.handle.join().expect("the journal thread does not panic")
    }
}
