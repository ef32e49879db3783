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
    let w = DatasetWriter::open(root, spec(), cfg()).unwrap();
    assert_eq!(w.durable(), (Some(14), 15));
    drop(w);
    assert_eq!(stored_seqs(root), (0..15).collect::<Vec<_>>());
    assert!(verify(root).unwrap().ok());
}

#[test]
fn a_torn_journal_tail_is_dropped_and_whole_batches_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    {
        let mut w = DatasetWriter::open(root, spec(), cfg()).unwrap();
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
    DatasetWriter::open(root, spec(), cfg()).unwrap();
    assert_eq!(stored_seqs(root), (0..9).collect::<Vec<_>>());
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
