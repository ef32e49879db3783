//! Durable file operations: write-to-temporary + fsync + rename + fsync of the directory.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use ring::digest::{Context, SHA256};

use crate::DatasetError;

/// fsync a directory so that a rename or a new file in it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<(), DatasetError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(DatasetError::io(dir))
}

/// Replace `path` with `bytes` atomically: a reader sees the old or the new file, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DatasetError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(DatasetError::io(dir))?;
    let tmp = tmp_path(path);
    let mut f = File::create(&tmp).map_err(DatasetError::io(&tmp))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(DatasetError::io(&tmp))?;
    fs::rename(&tmp, path).map_err(DatasetError::io(path))?;
    sync_dir(dir)
}

/// The temporary name a file is written under before it is renamed into place.
pub fn tmp_path(path: &Path) -> std::path::PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Context,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Context::new(&SHA256),
            bytes: 0,
        }
    }
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, hex(self.hasher.finish().as_ref()), self.bytes)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A writer that passes bytes on to `inner` and hashes them on another thread, so that hashing
/// (SHA-256 without SHA-NI runs at a few hundred MB/s) overlaps the Parquet encoding feeding it.
pub struct ThreadedHashingWriter<W> {
    inner: W,
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
    hasher: std::thread::JoinHandle<(String, u64)>,
}

impl<W: Write> ThreadedHashingWriter<W> {
    pub fn new(inner: W) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(64);
        let hasher = std::thread::Builder::new()
            .name("nb-sha256".into())
            .spawn(move || {
                let mut h = Context::new(&SHA256);
                let mut n = 0u64;
                for chunk in rx {
                    h.update(&chunk);
                    n += chunk.len() as u64;
                }
                (hex(h.finish().as_ref()), n)
            })
            .expect("spawn the hashing thread");
        ThreadedHashingWriter { inner, tx, hasher }
    }

    /// The inner writer, the sha256 (lower-case hex) and the byte count.
    pub fn finish(self) -> (W, String, u64) {
        let ThreadedHashingWriter { inner, tx, hasher } = self;
        drop(tx);
        let (hash, n) = hasher.join().expect("hashing thread does not panic");
        (inner, hash, n)
    }
}

impl<W: Write> Write for ThreadedHashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.tx
            .send(buf[..n].to_vec())
            .map_err(|_| io::Error::other("hashing thread ended"))?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// sha256 of a file, lower-case hex, and its length.
pub fn sha256_file(path: &Path) -> Result<(String, u64), DatasetError> {
    let mut f = File::open(path).map_err(DatasetError::io(path))?;
    let mut w = HashingWriter::new(io::sink());
    io::copy(&mut f, &mut w).map_err(DatasetError::io(path))?;
    let (_, hash, n) = w.finish();
    Ok((hash, n))
}

/// sha256 of bytes in memory, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
