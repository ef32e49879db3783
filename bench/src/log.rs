//! `nanobot bench log`: the logger's Parquet throughput beside pyarrow writing the same rows in
//! the same run, ingest decode+validate frames/s on one core, and the logger's peak memory while
//! it logs a large volume.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::{reset_peak_rss, rss_mb};
use bytes::Bytes;
use nanobot_actors::ingest::{sample_from_device, IngestConfig, IngestCore};
use nanobot_dataset::{CameraSpec, DatasetSpec, DatasetWriter, Frame, WriterConfig};
use nanobot_messages::device::{decode_datagram, DeviceFrame, Sensor};

const STATE: usize = 96;
const IMAGE: usize = 4096;
/// Distinct images, more than a Parquet dictionary page holds, as with real camera frames.
const BLOBS: usize = 1024;
/// Rows per batch made durable (one fsync each): what the logger's 50 ms `flush_ms` gathers at
/// about 20k rows/s. A row stream from memory would otherwise arrive all at once.
const BATCH: u64 = 1024;

fn spec() -> DatasetSpec {
    DatasetSpec {
        fps: 20.0,
        robot_type: "bench".into(),
        tasks: vec!["bench".into()],
        state_names: (0..STATE).map(|i| format!("s{i}")).collect(),
        action_names: vec!["a0".into(), "a1".into()],
        camera: Some(CameraSpec {
            key: "observation.images.camera".into(),
            height: 64,
            width: 64,
        }),
        surface: Some([8, 8]),
    }
}

/// Incompressible 4 KiB blobs, like JPEG bytes.
fn blobs() -> Vec<Bytes> {
    let mut x = 0x2545F4914F6CDD1Du64;
    (0..BLOBS)
        .map(|_| {
            (0..IMAGE)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect::<Vec<u8>>()
                .into()
        })
        .collect()
}

fn frame(i: u64, blobs: &[Bytes]) -> Frame {
    let f = i as f32;
    Frame {
        seq: i,
        stamp_ns: i * 50_000_000,
        source_episode: i / 1000,
        task: 0,
        image: Some(blobs[i as usize % blobs.len()].clone()),
        state: (0..STATE).map(|j| f + j as f32 * 0.001).collect(),
        action: vec![f * 0.5, -f],
        surface: (0..64).map(|j| j as f32 / 63.0).collect(),
    }
}

fn row_bytes() -> usize {
    IMAGE + STATE * 4 + 2 * 4 + 64 * 4 + 6 * 8 + 4
}

/// Write `rows` rows, finalizing a file every `per_file`: (seconds, Parquet bytes, files).
/// `direct_rows`: the writer's threshold; `usize::MAX` sends every batch through the journal
/// (the path of a fleet's small flushes).
fn write_rows(
    dir: &Path,
    rows: u64,
    per_file: u64,
    blobs: &[Bytes],
    direct_rows: usize,
) -> anyhow::Result<(f64, u64, usize)> {
    let cfg = WriterConfig {
        file_max_bytes: u64::MAX,
        file_max_age: Duration::from_secs(86400),
        direct_rows,
        ..WriterConfig::default()
    };
    let mut w = DatasetWriter::open(dir, spec(), cfg)?;
    // Each row is made inside the timed loop, as the baseline makes its arrays inside its own.
    let t0 = Instant::now();
    for i in 0..rows {
        w.push(frame(i, blobs))?;
        if (i + 1) % BATCH == 0 {
            // As the logger does: hand the batch to the journal thread and go on; it is durable
            // (and acknowledged) when its fsync returns. `finish_file` waits for all of it.
            w.submit()?;
        }
        if (i + 1) % per_file == 0 {
            w.finish_file()?;
        }
    }
    w.finish_file()?;
    let secs = t0.elapsed().as_secs_f64();
    let m = w.manifest();
    Ok((secs, m.files.iter().map(|f| f.bytes).sum(), m.files.len()))
}

fn pyarrow(rows: u64, per_file: u64, blobs_file: &Path, out: &Path) -> anyhow::Result<serde_json::Value> {
    let script = include_str!("../python/log.py");
    let o = Command::new(crate::python::interpreter())
        .arg("-c")
        .arg(script)
        .args([rows.to_string(), per_file.to_string()])
        .arg(blobs_file)
        .arg(out)
        .output()
        .context("python3")?;
    anyhow::ensure!(
        o.status.success(),
        "pyarrow baseline failed (pip install pyarrow numpy): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(serde_json::from_slice(&o.stdout)?)
}

fn ingest_bench(ticks: usize) -> (f64, f64) {
    let jpeg = nanobot_sim::SimRobot::new(nanobot_sim::SimConfig::default())
        .expect("default sim")
        .render_jpeg(85);
    let cfg = IngestConfig {
        state_dim: STATE,
        ..IngestConfig::default()
    };
    let datagrams: Vec<Bytes> = (0..ticks as u32)
        .flat_map(|i| {
            let frame = |sensor, payload: Bytes| {
                Bytes::from(
                    DeviceFrame {
                        sensor,
                        robot: "bench".into(),
                        seq: i,
                        stamp_ns: 1 + i as u64 * 50_000_000,
                        payload,
                    }
                    .encode(),
                )
            };
            [
                frame(Sensor::Camera, jpeg.clone().into()),
                frame(Sensor::Surface, DeviceFrame::surface_payload(8, 8, &[0.5; 64])),
                frame(Sensor::Action, DeviceFrame::f32_payload(&[0.1, 0.2])),
                frame(Sensor::State, DeviceFrame::f32_payload(&[0.25; STATE])),
            ]
        })
        .collect();
    let mut core = IngestCore::new(cfg);
    let t0 = Instant::now();
    let mut obs = 0;
    for d in &datagrams {
        for f in decode_datagram(d) {
            let s = sample_from_device(f.expect("bench frames are valid")).expect("bench frames are valid");
            obs += core.on_sample(s).is_some() as usize;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(obs, ticks, "every tick aligns into an observation");
    (datagrams.len() as f64 / secs, ticks as f64 / secs)
}

pub fn run(rows: u64, per_file: u64, memory_gb: f64, dir: Option<&Path>) -> anyhow::Result<u8> {
    let base = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::temp_dir().join(format!("nanobot-bench-log-{}", std::process::id())),
    };
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base)?;
    let blobs = blobs();
    let blobs_file = base.join("blobs.bin");
    std::fs::write(
        &blobs_file,
        blobs.iter().flat_map(|b| b.iter().copied()).collect::<Vec<u8>>(),
    )?;
    let mb = rows as f64 * row_bytes() as f64 / 1e6;
    println!(
        "bench log: {rows} rows of a {STATE}-float state, a {IMAGE}-byte image, a 64-cell surface ({:.0} MB of row data), snappy, {per_file} rows per file, a batch made durable (fsync) every {BATCH} rows",
        mb
    );
    // Alternate the two writers so that neither gets the quieter half of the run.
    let (mut nb, mut nbj, mut py) = (Vec::new(), Vec::new(), Vec::new());
    let mut sizes = (0u64, 0u64);
    for round in 0..2 {
        let d = base.join(format!("nanobot-{round}"));
        let (secs, bytes, _) = write_rows(&d, rows, per_file, &blobs, BATCH as usize)?;
        nb.push(secs);
        sizes.0 = bytes;
        std::fs::remove_dir_all(&d)?;
        let d = base.join(format!("nanobot-journal-{round}"));
        nbj.push(write_rows(&d, rows, per_file, &blobs, usize::MAX)?.0);
        std::fs::remove_dir_all(&d)?;
        let d = base.join(format!("pyarrow-{round}"));
        let p = pyarrow(rows, per_file, &blobs_file, &d)?;
        py.push(p["secs"].as_f64().unwrap_or(f64::NAN));
        sizes.1 = p["bytes"].as_u64().unwrap_or(0);
        std::fs::remove_dir_all(&d)?;
    }
    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let (nb_s, nbj_s, py_s) = (best(&nb), best(&nbj), best(&py));
    println!("  {:<34} {:>12} {:>10} {:>12}", "", "rows/s", "MB/s", "file MB");
    println!(
        "  {:<34} {:>12.0} {:>10.1} {:>12.1}",
        "nanobot logger, into the data file",
        rows as f64 / nb_s,
        mb / nb_s,
        sizes.0 as f64 / 1e6
    );
    println!(
        "  {:<34} {:>12.0} {:>10.1}",
        "nanobot logger, through the journal",
        rows as f64 / nbj_s,
        mb / nbj_s,
    );
    println!(
        "  {:<34} {:>12.0} {:>10.1} {:>12.1}",
        "pyarrow ParquetWriter (baseline)",
        rows as f64 / py_s,
        mb / py_s,
        sizes.1 as f64 / 1e6
    );
    println!(
        "  ratio nanobot / pyarrow: {:.2}x into the data file, {:.2}x through the journal (best of 2 runs each)",
        py_s / nb_s,
        py_s / nbj_s
    );

    let (fps, tps) = ingest_bench(5000);
    println!(
        "ingest decode+validate on one core: {fps:.0} frames/s ({tps:.0} ticks/s of camera JPEG decode + surface + action + {STATE}-float state, aligned)"
    );

    if memory_gb > 0.0 {
        let mem_rows = (memory_gb * 1e9 / row_bytes() as f64) as u64;
        let d = base.join("memory");
        reset_peak_rss();
        let before = rss_mb("VmRSS:");
        let (secs, bytes, files) = write_rows(&d, mem_rows, 16384, &blobs, BATCH as usize)?;
        println!(
            "logging {:.2} GB ({mem_rows} rows, {files} files, {:.0} MB Parquet) in {secs:.1} s: peak RSS {:.0} MB (RSS before {:.0} MB)",
            mem_rows as f64 * row_bytes() as f64 / 1e9,
            bytes as f64 / 1e6,
            rss_mb("VmHWM:"),
            before
        );
        std::fs::remove_dir_all(&d)?;
    }
    let _ = std::fs::remove_dir_all(&base);
    Ok(0)
}
