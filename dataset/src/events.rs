//! What happened around the rows: `meta/events.jsonl` beside a dataset, one JSON object per
//! line (`{"seq":…,"stamp_ns":…,"event":{…}}`), appended and fsynced by the logger as events
//! arrive (episode starts and ends, interventions, rewards, operators' preferences). Replay reads
//! it to weight rows; LeRobot ignores it. A line torn by a crash is skipped when reading.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::DatasetError;

pub const EVENTS_FILE: &str = "meta/events.jsonl";

/// One event as stored: the envelope's sequence number and stamp, and the event's JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    pub seq: u64,
    pub stamp_ns: u64,
    pub event: Value,
}

/// The append-only events file of a dataset.
pub struct EventLog {
    path: PathBuf,
    file: File,
}

impl EventLog {
    pub fn open(root: &Path) -> Result<EventLog, DatasetError> {
        let path = root.join(EVENTS_FILE);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(DatasetError::io(dir))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(DatasetError::io(&path))?;
        let mut log = EventLog { path, file };
        log.end_torn_line()?;
        Ok(log)
    }

    /// A line torn by a crash ends where it stopped, so the next event starts a line of its own.
    fn end_torn_line(&mut self) -> Result<(), DatasetError> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = File::open(&self.path).map_err(DatasetError::io(&self.path))?;
        let len = f.metadata().map_err(DatasetError::io(&self.path))?.len();
        if len == 0 {
            return Ok(());
        }
        let mut last = [0u8];
        f.seek(SeekFrom::Start(len - 1))
            .and_then(|_| f.read_exact(&mut last))
            .map_err(DatasetError::io(&self.path))?;
        if last[0] != b'\n' {
            self.file
                .write_all(b"\n")
                .and_then(|_| self.file.sync_data())
                .map_err(DatasetError::io(&self.path))?;
        }
        Ok(())
    }

    /// Append `events` and make them durable.
    pub fn append(&mut self, events: &[StoredEvent]) -> Result<(), DatasetError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut text = String::new();
        for e in events {
            let line = serde_json::json!({"seq": e.seq, "stamp_ns": e.stamp_ns, "event": e.event});
            text.push_str(&line.to_string());
            text.push('\n');
        }
        self.file
            .write_all(text.as_bytes())
            .and_then(|_| self.file.sync_data())
            .map_err(DatasetError::io(&self.path))
    }
}

/// The events of the dataset at `root` from byte `offset` of its events file on (0: all): the
/// readable ones, the offset after the last complete line (a line still being written is left
/// for the next read), and how many complete lines could not be read. A dataset without an
/// events file has none.
pub fn read_events(root: &Path, offset: u64) -> Result<(Vec<StoredEvent>, u64, usize), DatasetError> {
    use std::io::{Read, Seek, SeekFrom};
    let path = root.join(EVENTS_FILE);
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), offset, 0)),
        Err(e) => return Err(DatasetError::io(&path)(e)),
    };
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(DatasetError::io(&path))?;
    let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let (mut out, mut bad) = (Vec::new(), 0);
    for line in bytes[..complete].split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let parsed = serde_json::from_slice::<Value>(line).ok().and_then(|v| {
            Some(StoredEvent {
                seq: v.get("seq")?.as_u64()?,
                stamp_ns: v.get("stamp_ns")?.as_u64()?,
                event: v.get("event")?.clone(),
            })
        });
        match parsed {
            Some(e) => out.push(e),
            None => bad += 1,
        }
    }
    Ok((out, offset + complete as u64, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_survive_reopening_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let ev = |seq| StoredEvent {
            seq,
            stamp_ns: seq * 10,
            event: serde_json::json!({"episode": 1, "event": {"Reward": {"value": 0.5}}}),
        };
        EventLog::open(dir.path()).unwrap().append(&[ev(1), ev(2)]).unwrap();
        EventLog::open(dir.path()).unwrap().append(&[ev(3)]).unwrap();
        let (events, end, bad) = read_events(dir.path(), 0).unwrap();
        assert_eq!((events, bad), (vec![ev(1), ev(2), ev(3)], 0));
        // A line still being written (or torn by a crash) is not consumed...
        let path = dir.path().join(EVENTS_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":4,\"sta").unwrap();
        assert_eq!(read_events(dir.path(), end).unwrap(), (vec![], end, 0));
        // ...and the logger reopening after the crash ends it: it is counted as unreadable and
        // what follows is read.
        EventLog::open(dir.path()).unwrap().append(&[ev(5)]).unwrap();
        let (events, end2, bad) = read_events(dir.path(), end).unwrap();
        assert_eq!((events, bad), (vec![ev(5)], 1));
        assert_eq!(end2, std::fs::metadata(&path).unwrap().len());
        assert_eq!(read_events(&dir.path().join("none"), 0).unwrap(), (vec![], 0, 0));
    }
}
