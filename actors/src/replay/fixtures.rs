//! Datasets for the replay and trainer tests: real files, real JPEG frames.

use std::path::Path;
use std::time::Duration;

use nanobot_dataset::{DatasetSpec, DatasetWriter, Frame, WriterConfig};

pub const EP_LEN: u64 = 5;

/// A robot's dataset at `root` with rows `seqs` (episodes of `EP_LEN` by seq), one data file
/// per `per_file` rows; state[0] is the row's seq, action[0] too; the camera frames are a
/// simulated robot's as the expert drives it (every one different).
pub fn dataset(root: &Path, seqs: std::ops::Range<u64>, per_file: u64) {
    let cfg = WriterConfig {
        file_max_bytes: u64::MAX,
        file_max_age: Duration::from_secs(3600),
        chunks_size: 1000,
        ..WriterConfig::default()
    };
    let mut w = DatasetWriter::open(root, DatasetSpec::sim(20.0, 64, 8), cfg).unwrap();
    let mut sim = nanobot_sim::SimRobot::new(nanobot_sim::SimConfig::default()).unwrap();
    for seq in seqs {
        let image: bytes::Bytes = sim.render_jpeg(80).into();
        if sim.step(sim.expert_action()).is_some() {
            sim.reset();
        }
        w.push(Frame {
            seq,
            stamp_ns: 1_000 + seq,
            source_episode: seq / EP_LEN,
            task: 0,
            image: Some(image),
            state: vec![seq as f32, 0.0, 0.0, 0.0, 0.0, 0.0],
            action: vec![seq as f32, 1.0],
            surface: vec![0.5; 64],
        })
        .unwrap();
        w.flush().unwrap();
        if (seq + 1) % per_file == 0 {
            w.finish_file().unwrap();
        }
    }
    w.finish_file().unwrap();
}
