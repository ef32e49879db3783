//! Footer snapshots: how rows written straight into a data file, without the journal, are made
//! durable before the file is finished.
//!
//! A Parquet file is readable only once its footer is written, at the end. A batch that goes
//! straight into the open data file is closed as a row group, the data file is fsynced, and a
//! record is appended (and fsynced) to the file's snapshot log (`journal/file-NNNNNN.footer`):
//! the data file's length at that point and a footer describing every row group before it.
//! After a crash, [`repair`] cuts the temporary data file to the last whole record's length and
//! appends its footer, which makes it a readable Parquet file of every durable row group.
//!
//! A record: `NBFS`, length (u64 LE), footer length (u32 LE), footer, SHA-256 of the three
//! before it. A torn or garbled record ends the log: the one before it is the last durable.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{encode_arrow_schema, ARROW_SCHEMA_META_KEY};
use parquet::file::metadata::{FileMetaData, KeyValue, ParquetMetaData, ParquetMetaDataWriter, RowGroupMetaData};

use crate::fsutil::remove_if_present;
use crate::DatasetError;

const MAGIC: &[u8; 4] = b"NBFS";

/// The snapshot log beside journal `file-NNNNNN.arrows`.
pub fn snapshot_name(no: u64) -> String {
    format!("file-{no:06}.footer")
}

/// The data file number of a snapshot log's name.
pub fn parse_snapshot_name(name: &str) -> Option<u64> {
    name.strip_prefix("file-")?.strip_suffix(".footer")?.parse().ok()
}

/// The Arrow schema as Parquet key-value metadata (what `ArrowWriter` stores), so that the
/// repaired file reads back with the writer's exact types. Encode it once per data file.
pub fn arrow_schema_kv(schema: &SchemaRef) -> KeyValue {
    KeyValue::new(ARROW_SCHEMA_META_KEY.to_string(), encode_arrow_schema(schema))
}

/// The footer (metadata, its length, `PAR1`) of a file that holds `row_groups`, with the Arrow
/// schema `kv` from [`arrow_schema_kv`].
pub fn footer(kv: &KeyValue, row_groups: &[RowGroupMetaData]) -> Result<Vec<u8>, parquet::errors::ParquetError> {
    let Some(first) = row_groups.first() else {
        return Ok(Vec::new());
    };
    let rows = row_groups.iter().map(|r| r.num_rows()).sum();
    let meta = FileMetaData::new(
        1,
        rows,
        Some("nanobot footer snapshot".into()),
        Some(vec![kv.clone()]),
        first.schema_descr_ptr(),
        None,
    );
    let md = ParquetMetaData::new(meta, row_groups.to_vec());
    let mut out = Vec::new();
    ParquetMetaDataWriter::new(&mut out, &md).finish()?;
    Ok(out)
}

/// An open snapshot log, appended to.
pub struct SnapshotLog {
    path: PathBuf,
    file: File,
}

impl SnapshotLog {
    pub fn create(path: PathBuf) -> Result<SnapshotLog, DatasetError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(DatasetError::io(&path))?;
        if let Some(dir) = path.parent() {
            crate::fsutil::sync_dir(dir)?;
        }
        Ok(SnapshotLog { path, file })
    }

    /// Append a record and fsync it: the data file's first `len` bytes (already fsynced) and
    /// `footer` are a readable Parquet file.
    pub fn append(&mut self, len: u64, footer: &[u8]) -> Result<(), DatasetError> {
        let mut rec = Vec::with_capacity(footer.len() + 48);
        rec.extend_from_slice(MAGIC);
        rec.extend_from_slice(&len.to_le_bytes());
        rec.extend_from_slice(&(footer.len() as u32).to_le_bytes());
        rec.extend_from_slice(footer);
        let digest = ring::digest::digest(&ring::digest::SHA256, &rec);
        rec.extend_from_slice(digest.as_ref());
        self.file
            .write_all(&rec)
            .and_then(|_| self.file.sync_data())
            .map_err(DatasetError::io(&self.path))
    }
}

/// The last whole record of a snapshot log: (data length, footer).
pub fn last_record(path: &Path) -> Result<Option<(u64, Vec<u8>)>, DatasetError> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => f.read_to_end(&mut bytes).map_err(DatasetError::io(path))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DatasetError::io(path)(e)),
    };
    let mut at = 0;
    let mut last = None;
    while bytes.len() >= at + 16 && &bytes[at..at + 4] == MAGIC {
        let len = u64::from_le_bytes(bytes[at + 4..at + 12].try_into().expect("8 bytes"));
        let flen = u32::from_le_bytes(bytes[at + 12..at + 16].try_into().expect("4 bytes")) as usize;
        let end = at + 16 + flen;
        if bytes.len() < end + 32
            || ring::digest::digest(&ring::digest::SHA256, &bytes[at..end]).as_ref() != &bytes[end..end + 32]
        {
            break;
        }
        last = Some((len, bytes[at + 16..end].to_vec()));
        at = end + 32;
    }
    if at < bytes.len() {
        tracing::warn!(log = %path.display(), "torn footer snapshot ignored (it was never acknowledged)");
    }
    Ok(last)
}

/// The rows a crash left in temporary data file `data` with snapshot log `log`: the file is
/// made readable as of the log's last whole record (cut to its length, its footer appended) and
/// set aside as [`kept_path`], so that rebuilding the data file under its temporary name can
/// itself be interrupted and recovered again. No record, or no data file: no rows.
pub fn recover(data: &Path, log: &Path) -> Result<Vec<RecordBatch>, DatasetError> {
    let kept = kept_path(data);
    if !kept.exists() {
        if !repair(data, log)? {
            return Ok(Vec::new());
        }
        std::fs::rename(data, &kept).map_err(DatasetError::io(&kept))?;
        if let Some(dir) = kept.parent() {
            crate::fsutil::sync_dir(dir)?;
        }
    }
    let file = File::open(&kept).map_err(DatasetError::io(&kept))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(DatasetError::parquet(&kept))?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(DatasetError::arrow(&kept))
}

/// Where [`recover`] keeps the repaired rows of temporary data file `data` until the data file
/// is finalized (`.file-NNN.parquet.tmp` → `.file-NNN.parquet.snap`).
pub fn kept_path(data: &Path) -> PathBuf {
    data.with_extension("snap")
}

/// Remove snapshot log `log` and the rows [`recover`] kept for `data` (the data file is
/// finalized).
pub fn remove(data: &Path, log: &Path) -> Result<(), DatasetError> {
    remove_if_present(log)?;
    remove_if_present(&kept_path(data))
}

/// Cut `data` to the length of the log's last whole record and append its footer; false when
/// there is no record or no data file.
fn repair(data: &Path, log: &Path) -> Result<bool, DatasetError> {
    let Some((len, footer)) = last_record(log)? else {
        return Ok(false);
    };
    let mut f = match OpenOptions::new().read(true).write(true).open(data) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(file = %data.display(), "footer snapshot without its data file: ignored");
            return Ok(false);
        }
        Err(e) => return Err(DatasetError::io(data)(e)),
    };
    let size = f.metadata().map_err(DatasetError::io(data))?.len();
    if size < len {
        return Err(DatasetError::Invalid {
            path: data.to_path_buf(),
            reason: format!("{size} bytes, but its footer snapshot says {len} were fsynced"),
        });
    }
    f.set_len(len)
        .and_then(|_| f.seek(SeekFrom::End(0)))
        .and_then(|_| f.write_all(&footer))
        .and_then(|_| f.sync_all())
        .map_err(DatasetError::io(data))?;
    Ok(true)
}
