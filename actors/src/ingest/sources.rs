//! Where device frames come from besides Zenoh: a UDP socket (one or more whole frames per
//! datagram) and a serial port (a byte stream). Each source pushes into a bounded inbox and
//! never waits for the consumer; each can be stopped, and is, when its owner drops it.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use nanobot_messages::device::{self, DeviceFrame, StreamDecoder};

use super::core::SerialConfig;

/// A device frame, or the decode error its source met (with the source's name).
pub type DeviceResult = Result<DeviceFrame, (String, device::DeviceError)>;

/// Datagram counts of a UDP source: per datagram, apart from the per-frame counts ingest keeps.
#[derive(Debug, Default)]
pub struct DatagramCounts {
    pub datagrams: AtomicU64,
    /// Datagrams with no bytes.
    pub empty: AtomicU64,
    /// Datagrams with at least one undecodable run of bytes.
    pub with_errors: AtomicU64,
}

/// Read datagrams from `sock` until the task is aborted; each decoded frame (or error) goes to
/// `emit`.
pub fn spawn_udp(
    sock: tokio::net::UdpSocket,
    counts: Arc<DatagramCounts>,
    emit: impl Fn(DeviceResult) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                break;
            };
            counts.datagrams.fetch_add(1, Ordering::Relaxed);
            if n == 0 {
                counts.empty.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let frames = device::decode_datagram(&Bytes::copy_from_slice(&buf[..n]));
            if frames.iter().any(|r| r.is_err()) {
                counts.with_errors.fetch_add(1, Ordering::Relaxed);
            }
            for r in frames {
                emit(r.map_err(|e| (from.to_string(), e)));
            }
        }
    })
}

/// Open a serial port in raw mode at `baud`.
pub fn open_serial(cfg: &SerialConfig) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&cfg.device)?;
    let speed = match cfg.baud {
        9600 => libc::B9600,
        19200 => libc::B19200,
        38400 => libc::B38400,
        57600 => libc::B57600,
        115200 => libc::B115200,
        230400 => libc::B230400,
        460800 => libc::B460800,
        921600 => libc::B921600,
        1000000 => libc::B1000000,
        2000000 => libc::B2000000,
        other => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("unsupported baud rate {other}"),
            ))
        }
    };
    // SAFETY: tcgetattr/tcsetattr on a file descriptor we own, with a zeroed termios they fill.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(f.as_raw_fd(), &mut t) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::cfmakeraw(&mut t);
        libc::cfsetispeed(&mut t, speed);
        libc::cfsetospeed(&mut t, speed);
        t.c_cc[libc::VMIN] = 1;
        t.c_cc[libc::VTIME] = 0;
        if libc::tcsetattr(f.as_raw_fd(), libc::TCSANOW, &t) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(f)
}

/// A thread reading device frames from a serial port (or any readable fd). Dropping it (or
/// `stop`) stops the thread and waits for it: after an actor restart, no second reader is left
/// on the same tty.
pub struct SerialReader {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SerialReader {
    /// Read `port` on a new thread, decoding frames into `emit` until the stream ends, `emit`
    /// returns false, or the reader is stopped.
    pub fn spawn(
        port: std::fs::File,
        source: String,
        emit: impl FnMut(DeviceResult) -> bool + Send + 'static,
    ) -> std::io::Result<SerialReader> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("nb-serial-{}", source.rsplit('/').next().unwrap_or("port")))
            .spawn(move || read_stream(port, &source, &flag, emit))?;
        Ok(SerialReader {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for SerialReader {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How often a blocked reader looks at its stop flag.
const POLL_MS: i32 = 100;

/// Frames from a byte stream, passed to `emit`; runs until the stream ends, `emit` returns
/// false, or `stop` is set.
pub fn read_stream(
    mut r: impl std::io::Read + AsRawFd,
    source: &str,
    stop: &AtomicBool,
    mut emit: impl FnMut(DeviceResult) -> bool,
) {
    let mut d = StreamDecoder::new();
    let mut buf = vec![0u8; 8192];
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd for a descriptor `r` owns, for the length we pass.
        let ready = unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::warn!(source, error = %e, "serial poll failed");
            break;
        }
        if ready == 0 {
            continue;
        }
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!(source, error = %e, "serial read ended");
                break;
            }
        };
        d.push(&buf[..n]);
        while let Some(f) = d.next_frame() {
            if !emit(f.map_err(|e| (source.to_string(), e))) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_serial_reader_stops_while_its_port_is_silent() {
        // A pipe that never gets a byte stands for an idle tty: the reader must still stop.
        let mut fds = [0; 2];
        // SAFETY: pipe fills two descriptors we then own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        use std::os::fd::FromRawFd;
        // SAFETY: fds[0] is the read end, owned from here on.
        let read_end = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        // SAFETY: fds[1] is the write end, owned from here on.
        let write_end = unsafe { std::fs::File::from_raw_fd(fds[1]) };
        let mut reader = SerialReader::spawn(read_end, "pipe".into(), |_| true).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!reader.is_finished(), "an idle port keeps its reader waiting");
        // Returns (the join ends) although no byte ever comes: the reader sees its stop flag.
        reader.stop();
        assert!(reader.is_finished());
        drop(write_end);
    }
}
