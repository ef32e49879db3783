//! The durable journal of the open data file: an Arrow IPC stream, fsynced after every batch.
//!
//! A crash can leave a torn last message; [`read_journal`] returns every whole batch before it.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use arrow_ipc::reader::StreamReader;
use arrow_ipc::writer::StreamWriter;
use arrow_schema::SchemaRef;

use crate::DatasetError;

pub struct Journal {
    pub path: PathBuf,
    /// The sequential number of the data file this journal becomes.
    pub file_no: u64,
    writer: StreamWriter<BufWriter<File>>,
}

impl Journal {
    /// Create a new journal (the schema header is written and synced at once).
    pub fn create(path: PathBuf, file_no: u64, schema: &SchemaRef) -> Result<Journal, DatasetError> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .map_err(DatasetError::io(&path))?;
        let writer = StreamWriter::try_new(BufWriter::new(file), schema).map_err(DatasetError::arrow(&path))?;
        let mut j = Journal { path, file_no, writer };
        j.sync()?;
        if let Some(dir) = j.path.parent() {
            crate::fsutil::sync_dir(dir)?;
        }
        Ok(j)
    }

    /// Append a batch and make it durable: when this returns Ok, the rows survive `kill -9`.
    pub fn append(&mut self, batch: &RecordBatch) -> Result<(), DatasetError> {
        self.writer.write(batch).map_err(DatasetError::arrow(&self.path))?;
        self.sync()
    }

    fn sync(&mut self) -> Result<(), DatasetError> {
        self.writer.flush().map_err(DatasetError::arrow(&self.path))?;
        let w = self.writer.get_mut();
        w.flush().map_err(DatasetError::io(&self.path))?;
        w.get_ref().sync_data().map_err(DatasetError::io(&self.path))
    }
}

/// Every whole batch of a journal. A torn tail (a crash mid-write) ends the read with a warning;
/// a journal without even its schema header holds no rows.
pub fn read_journal(path: &Path) -> Result<Vec<RecordBatch>, DatasetError> {
    let file = File::open(path).map_err(DatasetError::io(path))?;
    let reader = match StreamReader::try_new(BufReader::new(file), None) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(journal = %path.display(), error = %e, "journal without a readable header: no rows");
            return Ok(Vec::new());
        }
    };
    let mut batches = Vec::new();
    for b in reader {
        match b {
            Ok(b) => batches.push(b),
            Err(e) => {
                tracing::warn!(journal = %path.display(), error = %e, rows = batches.iter().map(|b: &RecordBatch| b.num_rows()).sum::<usize>(), "torn journal tail ignored (it was never acknowledged)");
                break;
            }
        }
    }
    Ok(batches)
}

/// Journal file name for data file number `no`.
pub fn journal_name(no: u64) -> String {
    format!("file-{no:06}.arrows")
}

/// The data file number of a journal file name.
pub fn parse_journal_name(name: &str) -> Option<u64> {
    name.strip_prefix("file-")?.strip_suffix(".arrows")?.parse().ok()
}
