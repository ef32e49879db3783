//! The dataset writer on real files: layout, recovery after a crash, torn journals, disk full,
//! verification, and pyarrow reading what was written.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nanobot_dataset::{read_dataset, verify, DatasetSpec, DatasetWriter, Frame, WriterConfig};

fn spec() -> DatasetSpec {
    DatasetSpec::sim(20.0, 8, 2)
}

fn cfg() -> WriterConfig {
    WriterConfig {
        file_max_bytes: u64::MAX,
        file_max_age: Duration::from_secs(3600),
        chunks_size: 2,
        row_group_rows: 7,
        // Batches of 4 rows or more go straight into the data file; smaller ones through the
        // journal: the tests cover both paths and the turns between them.
        direct_rows: 4,
    }
}

/// Frame `seq` of source episode `ep`, with values that encode the seq so rows can be checked.
fn frame(seq: u64, ep: u64) -> Frame {
    let s = seq as f32;
    Frame {
        seq,
        stamp_ns: 1_000_000 + seq * 50_000_000,
        source_episode: ep,
        task: 0,
        image: Some(format!("jpeg-{seq}").into_bytes().into()),
        state: (0..6).map(|i| s + i as f32 * 0.5).collect(),
        action: vec![s * 0.1, -s],
        surface: vec![s, 1.0, 2.0, 3.0],
    }
}

/// The sequence numbers of every stored row, in index order.
fn stored_seqs(root: &Path) -> Vec<u64> {
    read_dataset(root).unwrap().1.iter().map(|r| r.seq).collect()
}

fn push_all(w: &mut DatasetWriter, seqs: impl Iterator<Item = u64>, ep_len: u64) {
    for seq in seqs {
        w.push(frame(seq, seq / ep_len)).unwrap();
    }
}

#[test]
fn rows_files_episodes_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut w = DatasetWriter::open(root, spec(), cfg()).unwrap();
    // 3 files of 10 rows; episodes of 8 rows span file boundaries.
    for f in 0..3 {
        push_all(&mut w, f * 10..f * 10 + 5, 8);
        assert_eq!(w.flush().unwrap(), Some(f * 10 + 4));
        push_all(&mut w, f * 10 + 5..f * 10 + 10, 8);
        let done = w.finish_file().unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].rows, 10);
        assert_eq!((done[0].first_seq, done[0].last_seq), (f * 10, f * 10 + 9));
    }
    // chunks_size 2: the third file opens chunk-001.
    for p in [
        "data/chunk-000/file-000.parquet",
        "data/chunk-000/file-001.parquet",
        "data/chunk-001/file-000.parquet",
        "meta/info.json",
        "meta/stats.json",
        "meta/tasks.parquet",
        "meta/episodes/chunk-000/file-000.parquet",
        "meta/manifest.json",
    ] {
        assert!(root.join(p).is_file(), "{p} missing");
    }
    let (m, rows) = read_dataset(root).unwrap();
    assert_eq!(rows.len(), 30);
    for (i, r) in rows.iter().enumerate() {
        let want = frame(i as u64, i as u64 / 8);
        assert_eq!(r.index, i as u64);
        assert_eq!(r.seq, i as u64);
        assert_eq!(r.episode_index, i as u64 / 8);
        assert_eq!(r.frame_index, i as u64 % 8);
        assert_eq!(r.timestamp, (i as u64 % 8) as f32 / 20.0);
        assert_eq!(r.state, want.state);
        assert_eq!(r.action, want.action);
        assert_eq!(r.surface, want.surface);
        assert_eq!(r.image.as_deref(), want.image.as_deref());
    }
    let eps = m.episodes();
    assert_eq!(eps.len(), 4);
    assert_eq!((eps[3].1.from_index, eps[3].1.to_index), (24, 30));
    assert_eq!(eps[1].1.stats["action"].count, 8);
    // Episode 1 is seq 8..=15, written in three batches across two files: its statistics
    // cover each of its rows once (state[0] = seq, state[5] = seq + 2.5, action[1] = -seq).
    let state = &eps[1].1.stats["observation.state"];
    assert_eq!(
        (state.count, state.min[0], state.max[0], state.mean()[0]),
        (8, 8.0, 15.0, 11.5)
    );
    assert_eq!((state.min[5], state.max[5]), (10.5, 17.5));
    let action = &eps[1].1.stats["action"];
    assert_eq!((action.min[1], action.max[1]), (-15.0, -8.0));
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("meta/info.json")).unwrap()).unwrap();
    assert_eq!(info["codebase_version"], "v3.0");
    assert_eq!(info["total_frames"], 30);
    assert_eq!(info["total_episodes"], 4);
    assert_eq!(info["fps"], 20);
    assert_eq!(info["features"]["observation.images.camera"]["dtype"], "image");
    let report = verify(root).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.rows, 30);
}

#[test]
fn a_crash_loses_no_durable_row_and_numbering_continues() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    {
        let mut w = DatasetWriter::open(root, spec(), cfg()).unwrap();
        push_all(&mut w, 0..12, 5);
        w.finish_file().unwrap();
        push_all(&mut w, 12..20, 5);
        assert_eq!(w.flush().unwrap(), Some(19));
        // Queued but never flushed: not durable, may be lost.
        push_all(&mut w, 20..23, 5);
        // The writer disappears without finalizing (as after kill -9): the journal stays.
    }
    assert!(!verify(root).unwrap().ok(), "an unrecovered journal is reported");
    let mut w = DatasetWriter::open(root, spec(), cfg()).unwrap();
    assert_eq!(w.durable(), (Some(19), 20));
    push_all(&mut w, 20..26, 5);
    w.finish_file().unwrap();
    assert_eq!(stored_seqs(root), (0..26).collect::<Vec<_>>());
    let (_, rows) = read_dataset(root).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.index).collect::<Vec<_>>(),
        (0..26).collect::<Vec<_>>()
    );
    // seq 20..=24 is source episode 4: it continues episode_index 4 at frame 0.
    assert_eq!(rows[20].episode_index, 4);
    assert_eq!(rows[20].frame_index, 0);
    assert_eq!(rows[25].episode_index, 5);
    assert!(verify(root).unwrap().ok());
}

#[test]
fn submitted_batches_become_durable_in_order_and_wake_the_listener() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    {
        let mut w = DatasetWriter::open(root, spec(), cfg()).unwrap();
        let durability = w.durability();
        let wakes = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (d, n, s) = (durability.clone(), wakes.clone(), seen.clone());
        durability.on_durable(move || {
            n.fetch_add(1, Ordering::SeqCst);
            s.lock().unwrap().push(d.get());
        });
        // Three batches go to the journal thread without waiting for any of them.
        for b in 0..3u64 {
            push_all(&mut w, b * 4..b * 4 + 4, 100);
            w.submit().unwrap();
        }
        assert_eq!(
            w.pending_rows() as u64 + w.durable().1,
            12,
            "every row is pending or durable"
        );
        assert_eq!(w.flush().unwrap(), Some(11));
        assert_eq!(w.durable(), (Some(11), 12));
        assert_eq!(w.pending_rows(), 0);
        assert_eq!(wakes.load(Ordering::SeqCst), 3, "one wake per durable batch");
        // The listener saw durability grow batch by batch, never past what was fsynced.
        assert_eq!(*seen.lock().unwrap(), vec![(Some(3), 4), (Some(7), 8), (Some(11), 12)]);
        // Submitted, not waited for, then the writer disappears without finalizing: what was
        // submitted is in the journal, and the next open recovers it.
        push_all(&mut w, 12..15, 100);
        w.submit().unwrap();
    }
    reopened_holds_rows(root, 15);
}

/// Opening `root` again (recovering what a crash left) finds rows 0..`rows` durable, stored once
/// and in order, and the dataset verifies.
fn reopened_holds_rows(root: &Path, rows: u64) {
    let w = DatasetWriter::open(root, spec(), cfg()).unwrap();
    assert_eq!(w.durable(), (rows.checked_sub(1), rows));
    drop(w);
    assert_eq!(stored_seqs(root), (0..rows).collect::<Vec<_>>());
    assert!(verify(root).unwrap().ok());
}

#[test]
fn a_torn_journal_tail_is_dropped_and_whole_batches_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Every batch through the journal.
    let journal_only = || WriterConfig {
        direct_rows: usize::MAX,
        ..cfg()
    };
    {
        let mut w = DatasetWriter::open(root, spec(), journal_only()).unwrap();
        push_all(&mut w, 0..4, 100);
        w.flush().unwrap();
        push_all(&mut w, 4..9, 100);
        w.flush().unwrap();
    }
    let journal = std::fs::read_dir(root.join("journal"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&journal).unwrap();
    bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x40, 0x01, 0, 0, 1, 2, 3]);
    std::fs::write(&journal, bytes).unwrap();
    DatasetWriter::open(root, spec(), journal_only()).unwrap();
    assert_eq!(stored_seqs(root), (0..9).collect::<Vec<_>>());
}

/// Large batches (direct_rows 4) go straight into the data file, small ones (2 rows) through
/// the journal, in turns; then the writer disappears as after kill -9.
fn crash_with_direct_and_journaled_batches(root: &Path) {
    let mut w = DatasetWriter::open(root, spec(), cfg()).unwrap();
    for (from, to) in [(0, 4), (4, 6), (6, 10), (10, 11)] {
        push_all(&mut w, from..to, 100);
        assert_eq!(w.flush().unwrap(), Some(to - 1));
    }
    std::mem::forget(w);
}

#[test]
fn rows_written_straight_into_the_data_file_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    crash_with_direct_and_journaled_batches(root);
    let log = root.join("journal/file-000000.footer");
    assert!(log.is_file(), "the direct batches left a footer snapshot");
    assert!(root.join("data/chunk-000/.file-000.parquet.tmp").is_file());
    // A torn record after the last whole one (a crash during an append that was never
    // acknowledged) is ignored.
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut f, b"NBFS\x01\x02").unwrap();
    reopened_holds_rows(root, 11);
    assert!(
        !log.exists(),
        "the snapshot goes with its journal once the file is finalized"
    );
}

#[test]
fn a_crash_while_recovery_rebuilds_the_data_file_is_recovered_again() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    crash_with_direct_and_journaled_batches(root);
    // Recovery sets the repaired rows aside, then rebuilds the data file under its temporary
    // name; a crash in the middle of that leaves a partial temporary file.
    let tmp = root.join("data/chunk-000/.file-000.parquet.tmp");
    let log = root.join("journal/file-000000.footer");
    assert_eq!(
        nanobot_dataset::snapshot::recover(&tmp, &log)
            .unwrap()
            .iter()
            .map(|b| b.num_rows())
            .sum::<usize>(),
        10
    );
    std::fs::write(&tmp, b"PAR1 half a rebuilt file").unwrap();
    reopened_holds_rows(root, 11);
    assert!(
        !nanobot_dataset::snapshot::kept_path(&tmp).exists(),
        "the kept rows go once the file is finalized"
    );
}

#[test]
fn a_torn_last_snapshot_falls_back_to_the_one_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    {
        // Direct 0..4, journaled 4..6, direct 6..10, and nothing after: rows 6..10 were the
        // last to become durable, in the last snapshot record.
        let mut w = DatasetWriter::open(root, spec(), cfg()).unwrap();
        for (from, to) in [(0, 4), (4, 6), (6, 10)] {
            push_all(&mut w, from..to, 100);
            w.flush().unwrap();
        }
        std::mem::forget(w);
    }
    // The crash came during that last record's append: it is cut short, so rows 6..10 were
    // never acknowledged. What the record before it and the journal hold is kept, in order.
    let log = root.join("journal/file-000000.footer");
    let len = std::fs::metadata(&log).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(len - 9)
        .unwrap();
    reopened_holds_rows(root, 6);
}

#[test]
fn verify_names_a_flipped_byte_and_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut w = DatasetWriter::open(root, spec(), cfg()).unwrap();
    for f in 0..3 {
        push_all(&mut w, f * 5..f * 5 + 5, 100);
        w.finish_file().unwrap();
    }
    let flipped = root.join("data/chunk-000/file-001.parquet");
    let mut bytes = std::fs::read(&flipped).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&flipped, bytes).unwrap();
    let missing = root.join("data/chunk-001/file-000.parquet");
    std::fs::remove_file(&missing).unwrap();
    let report = verify(root).unwrap();
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    assert_eq!(report.problems[0].path, flipped);
    assert!(report.problems[0].what.contains("sha256"), "{}", report.problems[0]);
    assert_eq!(report.problems[1].path, missing);
    assert!(report.problems[1].what.contains("missing"), "{}", report.problems[1]);
}

#[test]
fn disk_full_stops_acknowledgements_and_keeps_what_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut w = DatasetWriter::open(root, spec(), cfg()).unwrap();
    push_all(&mut w, 0..5, 100);
    w.finish_file().unwrap();
    // The next journal is a device that is always full.
    std::os::unix::fs::symlink("/dev/full", root.join("journal/file-000001.arrows")).unwrap();
    push_all(&mut w, 5..8, 100);
    let err = w.flush().unwrap_err().to_string();
    assert!(
        err.contains("file-000001.arrows") && err.to_lowercase().contains("space"),
        "{err}"
    );
    assert_eq!(w.durable(), (Some(4), 5), "no acknowledgement past the failure");
    assert_eq!(w.pending_rows(), 3, "the frames stay queued");
    // More arrive while the disk is full; still nothing acknowledged.
    push_all(&mut w, 8..10, 100);
    assert!(w.flush().is_err());
    assert_eq!(w.durable(), (Some(4), 5));
    // The disk heals: the waiting rows are stored exactly once and acknowledgements resume.
    std::fs::remove_file(root.join("journal/file-000001.arrows")).unwrap();
    assert_eq!(w.flush().unwrap(), Some(9));
    assert_eq!(w.durable(), (Some(9), 10));
    assert_eq!(w.pending_rows(), 0);
    w.finish_file().unwrap();
    drop(w);
    assert_eq!(stored_seqs(root), (0..10).collect::<Vec<_>>());
    let report = verify(root).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
}

#[test]
fn files_rotate_at_their_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let limit = 1500;
    let mut w = DatasetWriter::open(
        root,
        spec(),
        WriterConfig {
            file_max_bytes: limit,
            ..cfg()
        },
    )
    .unwrap();
    let mut finalized = Vec::new();
    for batch in 0..12 {
        push_all(&mut w, batch * 4..batch * 4 + 4, 1000);
        w.flush().unwrap();
        finalized.extend(w.rotate_if_due().unwrap());
    }
    finalized.extend(w.finish_file().unwrap());
    assert!(
        finalized.len() >= 3,
        "{} files for 48 rows at {limit} bytes",
        finalized.len()
    );
    assert_eq!(finalized.iter().map(|f| f.rows).sum::<u64>(), 48);
    assert_eq!(stored_seqs(root), (0..48).collect::<Vec<_>>());
    assert!(verify(root).unwrap().ok());
}

#[test]
fn verify_names_a_stray_data_file_and_an_unrecovered_journal() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut w = DatasetWriter::open(root, spec(), cfg()).unwrap();
    push_all(&mut w, 0..5, 100);
    w.finish_file().unwrap();
    // A file the manifest does not list (copied in by hand, or left by another writer).
    let stray = root.join("data/chunk-000/file-009.parquet");
    std::fs::copy(root.join("data/chunk-000/file-000.parquet"), &stray).unwrap();
    // And a journal a crash left behind.
    push_all(&mut w, 5..7, 100);
    w.flush().unwrap();
    std::mem::forget(w);
    let report = verify(root).unwrap();
    let found: Vec<(String, String)> = report
        .problems
        .iter()
        .map(|p| {
            (
                p.path.file_name().unwrap().to_string_lossy().into_owned(),
                p.what.clone(),
            )
        })
        .collect();
    assert!(
        found
            .iter()
            .any(|(f, w)| f == "file-009.parquet" && w.contains("not in the manifest")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|(f, w)| f.ends_with(".arrows") && w.contains("journal not yet recovered")),
        "{found:?}"
    );
}

#[test]
fn frames_that_do_not_fit_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = DatasetWriter::open(dir.path(), spec(), cfg()).unwrap();
    let mut f = frame(7, 0);
    f.state.pop();
    let err = w.push(f).unwrap_err().to_string();
    assert!(err.contains("seq 7") && err.contains("observation.state"), "{err}");
    let mut other = spec();
    other.fps = 30.0;
    drop(w);
    let err = DatasetWriter::open(dir.path(), other, cfg()).err().unwrap().to_string();
    assert!(err.contains("manifest.json") && err.contains("other features"), "{err}");
}

fn have_pyarrow() -> bool {
    Command::new("python3")
        .args(["-c", "import pyarrow"])
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn pyarrow_reads_every_file_and_the_layout_matches_lerobot_v3() {
    assert!(
        have_pyarrow(),
        "this test needs pyarrow: `pip install pyarrow` (.ci/run installs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut w = DatasetWriter::open(root, spec(), cfg()).unwrap();
    for f in 0..3 {
        push_all(&mut w, f * 9..f * 9 + 9, 6);
        w.finish_file().unwrap();
    }
    check_with_python(root, &(0..27).collect::<Vec<_>>());
}

/// Run the Python LeRobot-layout check on `root` and compare the sequence numbers it read.
pub fn check_with_python(root: &Path, want_seqs: &[u64]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/check_lerobot.py");
    let out = Command::new("python3").arg(script).arg(root).output().unwrap();
    assert!(
        out.status.success(),
        "check_lerobot.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let seqs: Vec<u64> = v["seqs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    assert_eq!(seqs, want_seqs);
}

#[test]
fn columns_hold_the_rows_that_were_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = DatasetWriter::open(dir.path(), spec(), cfg()).unwrap();
    push_all(&mut w, 0..25, 10);
    w.finish_file().unwrap();
    let m = nanobot_dataset::Manifest::load(dir.path()).unwrap().unwrap();
    let mut seen = 0u64;
    for f in &m.files {
        let c = nanobot_dataset::Columns::read(&dir.path().join(&f.path), &m.spec).unwrap();
        assert_eq!(c.rows as u64, f.rows);
        for i in 0..c.rows {
            let seq = c.seq[i] as u64;
            let want = frame(seq, seq / 10);
            assert_eq!(seq, seen, "rows in recording order");
            assert_eq!(c.index[i] as u64, seen);
            assert_eq!(c.episode_index[i] as u64, seq / 10);
            assert_eq!(c.frame_index[i] as u64, seq % 10);
            assert_eq!(c.source_episode[i] as u64, want.source_episode);
            assert_eq!(c.state.row(i), &want.state[..]);
            assert_eq!(c.action.row(i), &want.action[..]);
            assert_eq!(c.surface.as_ref().unwrap().row(i), &want.surface[..]);
            assert_eq!(c.image(i), want.image.as_deref());
            assert_eq!(c.frame(i).state, want.state);
            seen += 1;
        }
    }
    assert_eq!(seen, 25);
}

/// The child side of the kill -9 test: write batches of 8 rows (straight into the data file)
/// and 2 rows (through the journal) in turns, printing each acknowledgement, until killed.
fn direct_path_child(root: &Path) {
    let mut w = DatasetWriter::open(root, spec(), small_files()).unwrap();
    let mut seq = w.durable().0.map_or(0, |s| s + 1);
    for n in [8u64, 2].into_iter().cycle() {
        push_all(&mut w, seq..seq + n, 10);
        seq += n;
        let last = w.flush().unwrap().unwrap();
        println!("acked {last}");
        w.rotate_if_due().unwrap();
    }
}

/// Data files of a few batches each, so crashes fall within and between files.
fn small_files() -> WriterConfig {
    WriterConfig {
        file_max_bytes: 4000,
        ..cfg()
    }
}

#[test]
fn every_acknowledged_row_survives_kill_9_on_the_direct_path() {
    use std::io::BufRead;
    const TEST: &str = "every_acknowledged_row_survives_kill_9_on_the_direct_path";
    if let Some(root) = std::env::var_os("NB_DIRECT_PATH_CHILD") {
        direct_path_child(Path::new(&root));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut acked = None;
    for round in 0..4u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", TEST, "--nocapture", "--test-threads", "1"])
            .env("NB_DIRECT_PATH_CHILD", root)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let stdout = child.stdout.take().unwrap();
        let child = Kill(child);
        let want = 20 + round * 7;
        let mut got = 0;
        for line in std::io::BufReader::new(stdout).lines() {
            if let Some(n) = line.unwrap().strip_prefix("acked ") {
                acked = Some(n.parse::<u64>().unwrap());
                got += 1;
                if got >= want {
                    break;
                }
            }
        }
        assert!(got >= want, "the child stopped after {got} acknowledgements");
        // kill -9 (what Child::kill sends) right after an acknowledgement, with the next
        // batches in flight.
        drop(child);
        let w = DatasetWriter::open(root, spec(), small_files()).unwrap();
        let (last, rows) = w.durable();
        let acked = acked.unwrap();
        assert!(
            last.unwrap() >= acked,
            "round {round}: acknowledged {acked}, durable {last:?}"
        );
        drop(w);
        let seqs = stored_seqs(root);
        assert_eq!(
            seqs,
            (0..rows).collect::<Vec<_>>(),
            "round {round}: every row once, in order"
        );
        assert!(verify(root).unwrap().ok(), "round {round}");
    }
    let (m, _) = read_dataset(root).unwrap();
    assert!(m.files.len() > 4, "crashes within and between {} files", m.files.len());
}
