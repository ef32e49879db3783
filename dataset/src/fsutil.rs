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

/// Remove `path`; one that is not there is not an error.
pub(crate) fn remove_if_present(path: &Path) -> Result<(), DatasetError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DatasetError::io(path)(e)),
        _ => Ok(()),
    }
}

/// A buffered writer whose full buffers go to their own thread, which writes them to `inner`
/// and hashes them (SHA-256), so that neither the write system call nor the hash runs on the
/// thread that encodes. A buffer changes hands whole (no copy); buffers come back for reuse.
pub struct ThreadedFileWriter<W: Write + Send + 'static> {
    buf: Vec<u8>,
    cap: usize,
    full: Option<std::sync::mpsc::SyncSender<Chunk>>,
    empty: std::sync::mpsc::Receiver<Vec<u8>>,
    thread: Option<std::thread::JoinHandle<io::Result<(W, String, u64)>>>,
}

/// What the writer's thread is handed: bytes to write, or a mark to run once every byte before
/// it is written.
enum Chunk {
    Bytes(Vec<u8>),
    Mark(Box<dyn FnOnce(bool) + Send>),
}

impl<W: Write + Send + 'static> ThreadedFileWriter<W> {
    /// Buffers of `cap` bytes; at most a few are in flight.
    pub fn new(mut inner: W, cap: usize) -> Self {
        let (full, rx) = std::sync::mpsc::sync_channel::<Chunk>(4);
        let (back, empty) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
        let thread = std::thread::Builder::new()
            .name("nb-file".into())
            .spawn(move || {
                let mut h = Context::new(&SHA256);
                let mut n = 0u64;
                let mut failed = None;
                for chunk in rx {
                    let mut chunk = match chunk {
                        Chunk::Bytes(b) => b,
                        // A mark runs in order, told whether every write before it succeeded.
                        Chunk::Mark(f) => {
                            f(failed.is_none());
                            continue;
                        }
                    };
                    // After a failed write, the rest is drained (the sender sees the error at
                    // its next flush or at finish).
                    if failed.is_none() {
                        match inner.write_all(&chunk) {
                            Ok(()) => {
                                h.update(&chunk);
                                n += chunk.len() as u64;
                            }
                            Err(e) => failed = Some(e),
                        }
                    }
                    chunk.clear();
                    let _ = back.try_send(chunk);
                }
                match failed {
                    Some(e) => Err(e),
                    None => inner.flush().map(|_| (inner, hex(h.finish().as_ref()), n)),
                }
            })
            .expect("spawn the file writer thread");
        ThreadedFileWriter {
            buf: Vec::with_capacity(cap),
            cap,
            full: Some(full),
            empty,
            thread: Some(thread),
        }
    }

    fn hand_over(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = self.empty.try_recv().unwrap_or_else(|_| Vec::with_capacity(self.cap));
        let full = std::mem::replace(&mut self.buf, next);
        self.send(Chunk::Bytes(full))
    }

    fn send(&self, c: Chunk) -> io::Result<()> {
        self.full
            .as_ref()
            .and_then(|tx| tx.send(c).ok())
            .ok_or_else(|| io::Error::other("the file writer thread ended"))
    }

    /// Run `f` on the writer's thread once every byte written so far has been handed to
    /// `inner` (not synced: `f` decides that), with whether all those writes succeeded.
    pub fn mark(&mut self, f: impl FnOnce(bool) + Send + 'static) -> io::Result<()> {
        self.hand_over()?;
        self.send(Chunk::Mark(Box::new(f)))
    }

    /// Write out everything, stop the thread: the inner writer, the sha256 (lower-case hex) of
    /// all bytes written and their count.
    pub fn finish(mut self) -> io::Result<(W, String, u64)> {
        self.hand_over()?;
        drop(self.full.take());
        self.thread
            .take()
            .expect("finished once")
            .join()
            .map_err(|_| io::Error::other("the file writer thread panicked"))?
    }
}

impl<W: Write + Send + 'static> Write for ThreadedFileWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > self.cap {
            self.hand_over()?;
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    /// Hands the buffer over; the bytes reach `inner` on the writer thread.
    fn flush(&mut self) -> io::Result<()> {
        self.hand_over()
    }
}

impl<W: Write + Send + 'static> Drop for ThreadedFileWriter<W> {
    fn drop(&mut self) {
        drop(self.full.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threaded_writer_writes_every_byte_in_order_and_hashes_them() {
        let mut w = ThreadedFileWriter::new(Vec::new(), 64);
        let mut want = Vec::new();
        for i in 0..1000u32 {
            let piece: Vec<u8> = (0..(i % 150)).map(|j| (i + j) as u8).collect();
            w.write_all(&piece).unwrap();
            want.extend_from_slice(&piece);
            if i % 97 == 0 {
                w.flush().unwrap();
            }
        }
        let (inner, hash, n) = w.finish().unwrap();
        assert_eq!(inner, want);
        assert_eq!((hash, n), (sha256_hex(&want), want.len() as u64));
    }

    #[test]
    fn a_failed_write_on_the_thread_reaches_the_caller() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w = ThreadedFileWriter::new(Full, 16);
        let _ = w.write_all(&[1u8; 100]);
        let err = w.finish().err().expect("the write error is reported");
        assert!(err.to_string().contains("disk full"), "{err}");
    }
}
