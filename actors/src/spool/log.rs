//! A spool's disk: one stream of a robot's messages in segment files, appended and fsynced,
//! read back to send again, deleted once the logger has acknowledged every entry in them.
//!
//! A directory holds `{first_index:020}.seg` files. Each starts with a header (`NBSPOOL1`, then
//! the [`StreamMark`] of the entry before its first, if any: a tag byte and two u64 LE) and
//! holds records `[u32 LE length][u32 LE crc32 of the payload][payload]`, each payload one
//! whole envelope as it was published. A record torn by a crash (short, or with the wrong
//! crc) ends its segment: it is cut off when the spool opens again.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use nanobot_messages::StreamMark;

const MAGIC: &[u8; 8] = b"NBSPOOL1";
const HEADER: u64 = 8 + 1 + 16;
const RECORD_HEAD: u64 = 8;
/// A record longer than this is not a record (a torn or damaged length).
const MAX_RECORD: u32 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("spool file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

struct Segment {
    first: u64,
    path: PathBuf,
    bytes: u64,
}

/// Where one entry lies.
#[derive(Clone, Copy, Debug)]
struct Entry {
    mark: StreamMark,
    segment_first: u64,
    offset: u64,
    len: u32,
}

/// One stream's spool on disk, with an index of its entries in memory (their marks and places,
/// not their bytes).
pub struct SpoolLog {
    dir: PathBuf,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    entries: VecDeque<Entry>,
    /// The index of `entries[0]`; indices count every entry this spool ever kept.
    first: u64,
    /// The entry before `entries[0]`, when one is known (the oldest segment's header).
    before_first: Option<StreamMark>,
    /// The open (newest) segment's file, for appending.
    active: Option<File>,
    bytes: u64,
}

/// What reading the spool back found wrong (and cut off).
#[derive(Debug, Default, PartialEq)]
pub struct Recovered {
    pub entries: u64,
    pub torn_bytes: u64,
}

impl SpoolLog {
    /// Open (or create) the spool in `dir`, reading every segment's records; a torn tail is cut.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<(SpoolLog, Recovered), SpoolError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io(dir))? {
            let path = e.map_err(io(dir))?.path();
            let first = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(first) = first {
                names.push((first, path));
            }
        }
        names.sort();
        let mut log = SpoolLog {
            dir: dir.to_path_buf(),
            segment_bytes: segment_bytes.max(HEADER + RECORD_HEAD + 1),
            segments: VecDeque::new(),
            entries: VecDeque::new(),
            first: names.first().map(|n| n.0).unwrap_or(0),
            before_first: None,
            active: None,
            bytes: 0,
        };
        let mut recovered = Recovered::default();
        let n = names.len();
        for (i, (first, path)) in names.into_iter().enumerate() {
            let next = log.first + log.entries.len() as u64;
            if first != next && !log.entries.is_empty() {
                return Err(SpoolError::Invalid {
                    path,
                    reason: format!("starts at entry {first}, the segment before it ends at {next}"),
                });
            }
            if log.entries.is_empty() {
                log.first = first;
            }
            let (prev, bytes) = log.read_segment(first, &path, &mut recovered)?;
            if i == 0 {
                log.before_first = prev;
            }
            log.bytes += bytes;
            log.segments.push_back(Segment { first, path, bytes });
            if i + 1 == n {
                let f = OpenOptions::new().append(true).open(&log.segments[i].path);
                log.active = Some(f.map_err(io(&log.segments[i].path))?);
            }
        }
        recovered.entries = log.entries.len() as u64;
        Ok((log, recovered))
    }

    /// Read one segment's records into the index, cutting a torn tail; its header's mark and
    /// its length.
    fn read_segment(
        &mut self,
        first: u64,
        path: &Path,
        recovered: &mut Recovered,
    ) -> Result<(Option<StreamMark>, u64), SpoolError> {
        let mut data = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut data))
            .map_err(io(path))?;
        if data.len() < HEADER as usize || &data[..8] != MAGIC {
            return Err(SpoolError::Invalid {
                path: path.to_path_buf(),
                reason: "not a spool segment (no NBSPOOL1 header)".into(),
            });
        }
        let prev = read_mark(&data[8..HEADER as usize]);
        let mut at = HEADER as usize;
        while at + RECORD_HEAD as usize <= data.len() {
            let len = u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"));
            let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().expect("4 bytes"));
            let start = at + RECORD_HEAD as usize;
            let Some(payload) = start.checked_add(len as usize).and_then(|end| data.get(start..end)) else {
                break;
            };
            if len > MAX_RECORD || crc32fast::hash(payload) != crc {
                break;
            }
            let Some(mark) = mark_of(payload) else {
                break;
            };
            self.entries.push_back(Entry {
                mark,
                segment_first: first,
                offset: start as u64,
                len,
            });
            at = start + len as usize;
        }
        if at < data.len() {
            recovered.torn_bytes += (data.len() - at) as u64;
            let f = OpenOptions::new().write(true).open(path).map_err(io(path))?;
            f.set_len(at as u64).and_then(|_| f.sync_all()).map_err(io(path))?;
        }
        Ok((prev, at as u64))
    }

    /// The index of the oldest entry kept.
    pub fn first(&self) -> u64 {
        self.first
    }

    /// The index the next entry will get.
    pub fn next(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Entry `index`'s mark.
    pub fn mark(&self, index: u64) -> Option<StreamMark> {
        let i = index.checked_sub(self.first)?;
        self.entries.get(i as usize).map(|e| e.mark)
    }

    /// The mark of the entry before `index`: what a logger that has everything up to it holds.
    /// None for the oldest entry when nothing before it can still come.
    pub fn prev(&self, index: u64) -> Option<StreamMark> {
        if index == self.first {
            self.before_first
        } else {
            self.mark(index.checked_sub(1)?)
        }
    }

    /// The index of the entry with `mark`, searching from `from` on.
    pub fn find(&self, mark: StreamMark, from: u64) -> Option<u64> {
        let skip = from.saturating_sub(self.first) as usize;
        self.entries
            .iter()
            .skip(skip)
            .position(|e| e.mark == mark)
            .map(|i| self.first + (skip + i) as u64)
    }

    /// Append `payloads` (whole envelopes; one that has no readable header is refused and
    /// returned in the error count) and fsync once. Returns the index of each appended one.
    pub fn append(&mut self, payloads: &[Bytes]) -> Result<(Vec<u64>, usize), SpoolError> {
        let mut indices = Vec::with_capacity(payloads.len());
        let mut unreadable = 0;
        let mut dirty = false;
        for p in payloads {
            let Some(mark) = mark_of(p) else {
                unreadable += 1;
                continue;
            };
            let need = RECORD_HEAD + p.len() as u64;
            let full = self
                .segments
                .back()
                .is_none_or(|s| s.bytes + need > self.segment_bytes && s.bytes > HEADER);
            if full {
                if dirty {
                    self.sync_active()?;
                }
                self.start_segment()?;
            }
            let seg = self.segments.back_mut().expect("a segment was started");
            let file = self.active.as_mut().expect("the newest segment is open");
            let mut record = Vec::with_capacity(need as usize);
            record.extend_from_slice(&(p.len() as u32).to_le_bytes());
            record.extend_from_slice(&crc32fast::hash(p).to_le_bytes());
            record.extend_from_slice(p);
            file.write_all(&record).map_err(io(&seg.path))?;
            let index = self.first + self.entries.len() as u64;
            self.entries.push_back(Entry {
                mark,
                segment_first: seg.first,
                offset: seg.bytes + RECORD_HEAD,
                len: p.len() as u32,
            });
            seg.bytes += need;
            self.bytes += need;
            indices.push(index);
            dirty = true;
        }
        if dirty {
            self.sync_active()?;
        }
        Ok((indices, unreadable))
    }

    fn sync_active(&mut self) -> Result<(), SpoolError> {
        if let (Some(f), Some(s)) = (&self.active, self.segments.back()) {
            f.sync_data().map_err(io(&s.path))?;
        }
        Ok(())
    }

    /// Start a new segment at the next index; its header names the entry before it.
    fn start_segment(&mut self) -> Result<(), SpoolError> {
        let first = self.next();
        let prev = self.prev(first);
        let path = self.dir.join(format!("{first:020}.seg"));
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        let mut head = MAGIC.to_vec();
        head.extend_from_slice(&write_mark(prev));
        f.write_all(&head).and_then(|_| f.sync_all()).map_err(io(&path))?;
        nanobot_dataset::sync_dir(&self.dir).map_err(|e| SpoolError::Invalid {
            path: self.dir.clone(),
            reason: e.to_string(),
        })?;
        let f = OpenOptions::new().append(true).open(&path).map_err(io(&path))?;
        if self.segments.is_empty() {
            self.first = first;
            self.before_first = prev;
        }
        self.segments.push_back(Segment {
            first,
            path,
            bytes: HEADER,
        });
        self.bytes += HEADER;
        self.active = Some(f);
        Ok(())
    }

    /// Read entries `[from, to)` back (each one whole envelope).
    pub fn read(&self, from: u64, to: u64) -> Result<Vec<(u64, Bytes)>, SpoolError> {
        let mut out = Vec::new();
        let mut open: Option<(u64, File)> = None;
        for index in from.max(self.first)..to.min(self.next()) {
            let e = self.entries[(index - self.first) as usize];
            if open.as_ref().is_none_or(|(first, _)| *first != e.segment_first) {
                let seg = self
                    .segments
                    .iter()
                    .find(|s| s.first == e.segment_first)
                    .expect("every entry's segment is kept");
                open = Some((e.segment_first, File::open(&seg.path).map_err(io(&seg.path))?));
            }
            let (first, file) = open.as_ref().expect("opened above");
            let mut buf = vec![0u8; e.len as usize];
            file.read_exact_at(&mut buf, e.offset)
                .map_err(|source| SpoolError::Io {
                    path: self.dir.join(format!("{first:020}.seg")),
                    source,
                })?;
            out.push((index, Bytes::from(buf)));
        }
        Ok(out)
    }

    /// Delete the segments whose every entry is before `acked` (the newest, being written, is
    /// kept). Returns how many entries went.
    pub fn trim(&mut self, acked: u64) -> Result<u64, SpoolError> {
        let mut gone = 0;
        while self.segments.len() > 1 {
            let next_first = self.segments[1].first;
            if next_first > acked {
                break;
            }
            gone += self.drop_oldest_segment()?;
        }
        Ok(gone)
    }

    /// Delete the oldest segment that is not being written, acknowledged or not (the disk
    /// budget is spent): the entry after it is then sent with no predecessor. Returns how many
    /// entries went (0: only the newest segment is left).
    pub fn drop_oldest(&mut self) -> Result<u64, SpoolError> {
        if self.segments.len() < 2 {
            return Ok(0);
        }
        let gone = self.drop_oldest_segment()?;
        // Nothing before the new oldest entry can come any more: say so in its segment's header,
        // so that it holds after a restart too.
        let seg = &self.segments[0];
        let f = OpenOptions::new().write(true).open(&seg.path).map_err(io(&seg.path))?;
        f.write_all_at(&write_mark(None), 8)
            .and_then(|_| f.sync_data())
            .map_err(io(&seg.path))?;
        self.before_first = None;
        Ok(gone)
    }

    fn drop_oldest_segment(&mut self) -> Result<u64, SpoolError> {
        let seg = self.segments.pop_front().expect("a segment to drop");
        let end = self.segments.front().map(|s| s.first).unwrap_or(self.next());
        let gone = end - seg.first;
        let last = self.mark(end.saturating_sub(1)).filter(|_| gone > 0);
        self.entries.drain(..gone as usize);
        self.first = end;
        self.before_first = last;
        self.bytes -= seg.bytes;
        std::fs::remove_file(&seg.path).map_err(io(&seg.path))?;
        Ok(gone)
    }

    /// Start the next append in a new segment (so that what is written now can be trimmed
    /// apart from what comes next).
    pub fn rotate(&mut self) -> Result<(), SpoolError> {
        if self.segments.back().is_some_and(|s| s.bytes > HEADER) {
            self.start_segment()?;
        }
        Ok(())
    }
}

/// The mark of an envelope: its header's sequence number and stamp.
pub fn mark_of(payload: &[u8]) -> Option<StreamMark> {
    let (h, _) = nanobot_messages::codec::peek_header_ref(payload).ok()?;
    Some(StreamMark {
        seq: h.seq,
        stamp_ns: h.stamp_ns,
    })
}

fn write_mark(m: Option<StreamMark>) -> [u8; 17] {
    let mut out = [0u8; 17];
    if let Some(m) = m {
        out[0] = 1;
        out[1..9].copy_from_slice(&m.seq.to_le_bytes());
        out[9..17].copy_from_slice(&m.stamp_ns.to_le_bytes());
    }
    out
}

fn read_mark(b: &[u8]) -> Option<StreamMark> {
    (b[0] == 1).then(|| StreamMark {
        seq: u64::from_le_bytes(b[1..9].try_into().expect("8 bytes")),
        stamp_ns: u64::from_le_bytes(b[9..17].try_into().expect("8 bytes")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanobot_messages::{Event, EventKind};

    fn envelope(seq: u64) -> Bytes {
        let ev = Event {
            episode: seq,
            event: EventKind::Reward { value: seq as f32 },
        };
        Bytes::from(nanobot_messages::encode("r0", seq, 1000 + seq, &ev).unwrap().to_vec())
    }

    fn mark(seq: u64) -> StreamMark {
        StreamMark {
            seq,
            stamp_ns: 1000 + seq,
        }
    }

    #[test]
    fn entries_survive_a_reopen_in_order_with_their_predecessors() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, r) = SpoolLog::open(dir.path(), 150).unwrap();
        assert_eq!(r, Recovered::default());
        let payloads: Vec<Bytes> = (0..10).map(envelope).collect();
        let (idx, bad) = log.append(&payloads).unwrap();
        assert_eq!((idx, bad), ((0..10).collect::<Vec<_>>(), 0));
        assert!(log.segments.len() > 2, "150-byte segments rotate");
        drop(log);
        let (log, r) = SpoolLog::open(dir.path(), 150).unwrap();
        assert_eq!(r.entries, 10);
        assert_eq!((log.first(), log.next()), (0, 10));
        assert_eq!(log.prev(0), None);
        assert_eq!(log.prev(5), Some(mark(4)));
        let back = log.read(3, 7).unwrap();
        assert_eq!(back.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![3, 4, 5, 6]);
        assert_eq!(back[0].1, payloads[3]);
        assert_eq!(log.find(mark(8), 0), Some(8));
        assert_eq!(log.find(mark(8), 9), None);
    }

    #[test]
    fn a_torn_record_is_cut_and_appends_go_on_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = SpoolLog::open(dir.path(), 1 << 20).unwrap();
        log.append(&[envelope(0), envelope(1)]).unwrap();
        let seg = log.segments[0].path.clone();
        drop(log);
        // A crash in the middle of the third record's write.
        let third = envelope(2);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&(third.len() as u32).to_le_bytes()).unwrap();
        f.write_all(&crc32fast::hash(&third).to_le_bytes()).unwrap();
        f.write_all(&third[..third.len() / 2]).unwrap();
        drop(f);
        let (mut log, r) = SpoolLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(r.entries, 2);
        assert_eq!(r.torn_bytes, 8 + third.len() as u64 / 2);
        log.append(&[envelope(3)]).unwrap();
        drop(log);
        let (log, r) = SpoolLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((r.entries, r.torn_bytes), (3, 0));
        assert_eq!(log.prev(2), Some(mark(1)));
        assert_eq!(log.mark(2), Some(mark(3)));
    }

    #[test]
    fn trimming_keeps_what_is_not_acknowledged_and_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = SpoolLog::open(dir.path(), 150).unwrap();
        log.append(&(0..12).map(envelope).collect::<Vec<_>>()).unwrap();
        let bytes = log.bytes();
        let gone = log.trim(7).unwrap();
        assert!(gone > 0 && gone <= 7, "{gone}");
        assert_eq!(log.first(), gone);
        assert!(log.bytes() < bytes);
        assert_eq!(
            log.prev(gone),
            Some(mark(gone - 1)),
            "the oldest still names its predecessor"
        );
        drop(log);
        let (log, _) = SpoolLog::open(dir.path(), 150).unwrap();
        assert_eq!((log.first(), log.next()), (gone, 12));
        assert_eq!(log.prev(gone), Some(mark(gone - 1)));
    }

    #[test]
    fn dropping_over_budget_leaves_the_oldest_without_a_predecessor_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = SpoolLog::open(dir.path(), 150).unwrap();
        log.append(&(0..12).map(envelope).collect::<Vec<_>>()).unwrap();
        let n = log.drop_oldest().unwrap();
        assert!(n > 0);
        assert_eq!(log.prev(n), None);
        drop(log);
        let (mut log, _) = SpoolLog::open(dir.path(), 150).unwrap();
        assert_eq!(log.first(), n);
        assert_eq!(log.prev(n), None, "the loss is remembered on disk");
        while log.drop_oldest().unwrap() > 0 {}
        assert_eq!(log.segments.len(), 1, "the segment being written is never dropped");
    }

    #[test]
    fn an_unreadable_payload_is_refused_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = SpoolLog::open(dir.path(), 1 << 20).unwrap();
        let (idx, bad) = log
            .append(&[envelope(0), Bytes::from_static(b"not an envelope"), envelope(1)])
            .unwrap();
        assert_eq!((idx, bad), (vec![0, 1], 1));
    }
}
