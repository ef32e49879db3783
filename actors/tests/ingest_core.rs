//! The ingest logic without I/O: the staleness join, rate decimation, rejects by reason, loss
//! counted apart from rejects, and no panic on any value a device can send.

use nanobot_actors::ingest::{sample_from_raw, IngestConfig, IngestCore, Produced, RobotCounts};
use nanobot_messages::{Encoding, Observation, RawFrame};

const MS: u64 = 1_000_000;

fn jpeg(seed: u64) -> Vec<u8> {
    let cfg = nanobot_sim::SimConfig {
        seed,
        ..Default::default()
    };
    nanobot_sim::SimRobot::new(cfg).unwrap().render_jpeg(85)
}

fn camera(data: Vec<u8>) -> RawFrame {
    RawFrame {
        sensor: "camera".into(),
        encoding: Encoding::Jpeg,
        shape: vec![64, 64, 3],
        data: data.into(),
    }
}

fn surface(cells: usize) -> RawFrame {
    let mut f = RawFrame::f32_vector("surface", &vec![0.25; cells]);
    f.shape = vec![8, 8];
    f
}

fn state(x: f32) -> RawFrame {
    RawFrame::f32_vector("state", &[x, 0.5, 0.0, 0.0, 0.7, 0.7])
}

fn action() -> RawFrame {
    RawFrame::f32_vector("action", &[0.1, -0.1])
}

struct Feed {
    core: IngestCore,
    out: Vec<Produced>,
}

impl Feed {
    fn new(cfg: IngestConfig) -> Feed {
        Feed {
            core: IngestCore::new(cfg),
            out: Vec::new(),
        }
    }

    fn send(&mut self, f: RawFrame, seq: u64, stamp: u64) {
        let out = match sample_from_raw("r0", seq, stamp, f, None) {
            Ok(s) => self.core.on_sample(s),
            Err(r) => Some(self.core.refuse(r)),
        };
        self.out.extend(out);
    }

    /// Camera, surface and action at `stamp`, then the state `dt` later.
    fn tick(&mut self, seq: u64, stamp: u64, dt: u64, img: &[u8]) {
        self.send(camera(img.to_vec()), seq, stamp);
        self.send(surface(64), seq, stamp);
        self.send(action(), seq, stamp);
        self.send(state(seq as f32 / 100.0), seq, stamp + dt);
    }

    fn observations(&self) -> Vec<&Observation> {
        self.out
            .iter()
            .filter_map(|o| match o {
                Produced::Observation { obs, .. } => Some(obs),
                _ => None,
            })
            .collect()
    }

    fn reasons(&self) -> Vec<String> {
        self.out
            .iter()
            .filter_map(|o| match o {
                Produced::Reject { reject, .. } => Some(reject.reason.clone()),
                _ => None,
            })
            .collect()
    }

    fn counts(&self) -> RobotCounts {
        self.core.counts.get("r0").cloned().unwrap_or_default()
    }
}

#[test]
fn the_state_joins_the_latest_sample_taken_before_it_within_staleness() {
    let (a, b) = (jpeg(1), jpeg(2));
    assert_ne!(a, b);
    let mut f = Feed::new(IngestConfig::default());
    f.send(camera(a.clone()), 0, 0);
    f.send(surface(64), 0, 0);
    f.send(action(), 0, 0);
    // A newer camera frame taken after the state: not the one the state joins.
    f.send(camera(b.clone()), 1, 30 * MS);
    f.send(state(0.1), 0, 10 * MS);
    let obs = f.observations();
    assert_eq!(obs.len(), 1);
    assert_eq!(
        obs[0].image.data.to_bytes().as_ref(),
        &a[..],
        "latest at or before the state"
    );
    assert_eq!(obs[0].state[0], 0.1);
    assert_eq!(obs[0].action, vec![0.1, -0.1]);
    // 250 ms later nothing new came but a state: the camera is stale (limit 200 ms).
    f.send(state(0.2), 1, 260 * MS);
    assert_eq!(f.observations().len(), 1);
    assert_eq!(f.counts().stale, 1);
}

#[test]
fn observations_keep_to_rate_hz() {
    let img = jpeg(1);
    let cfg = IngestConfig {
        rate_hz: 10.0,
        ..IngestConfig::default()
    };
    let mut f = Feed::new(cfg);
    // 20 ticks at 20 Hz: every other one is decimated at 10 Hz.
    for i in 0..20 {
        f.tick(i, i * 50 * MS, MS, &img);
    }
    assert_eq!(f.observations().len(), 10);
    assert_eq!(f.counts().decimated, 10);
    let frames: Vec<u64> = f.observations().iter().map(|o| o.frame_index).collect();
    assert_eq!(frames, (0..10).collect::<Vec<_>>());
}

#[test]
fn time_sensor_size_and_repeat_rejects_are_counted_by_reason() {
    let img = jpeg(1);
    let mut f = Feed::new(IngestConfig::default());
    f.tick(0, 0, MS, &img);
    // The state's clock goes back.
    f.send(state(0.3), 1, 0);
    // A sensor ingest does not know.
    f.send(RawFrame::f32_vector("lidar", &[1.0]), 1, 5 * MS);
    // A surface whose cells do not fill its shape (8×8 claimed, 10 carried).
    f.send(surface(10), 1, 5 * MS);
    // The same sequence number again with a newer timestamp: a repeated frame, not a new row.
    f.send(state(0.4), 0, 20 * MS);
    assert_eq!(f.reasons(), ["time", "sensor", "size", "seq"]);
    let c = f.counts();
    assert_eq!(c.rejects.values().sum::<u64>(), 4);
    assert_eq!(c.observations, 1);
}

#[test]
fn a_rejected_frame_is_not_also_counted_as_lost() {
    let img = jpeg(1);
    let mut f = Feed::new(IngestConfig::default());
    f.send(state(0.1), 1, 10 * MS);
    // seq 2 carries a NaN: rejected (range), but it arrived.
    f.send(
        RawFrame::f32_vector("state", &[f32::NAN, 0.0, 0.0, 0.0, 0.0, 0.0]),
        2,
        20 * MS,
    );
    f.send(state(0.3), 3, 30 * MS);
    // seqs 4 and 5 never arrive: lost.
    f.send(state(0.6), 6, 60 * MS);
    let c = f.counts();
    assert_eq!(c.rejects.get("range"), Some(&1));
    assert_eq!(c.lost, 2, "{c:?}");
    // A reboot: the sequence starts again from a small number and is accepted.
    f.tick(0, 100 * MS, MS, &img);
    assert_eq!(f.counts().lost, 2);
    assert_eq!(f.observations().len(), 1);
}

#[test]
fn sequence_numbers_and_timestamps_near_the_top_of_u64_never_panic() {
    let img = jpeg(1);
    let mut f = Feed::new(IngestConfig::default());
    for (seq, stamp) in [
        (u64::MAX - 1, u64::MAX - 10),
        (u64::MAX, u64::MAX - 1),
        (u64::MAX, u64::MAX),
    ] {
        f.tick(seq, stamp.saturating_sub(MS), MS.min(stamp), &img);
    }
    f.send(state(0.9), 0, u64::MAX);
    f.send(state(0.9), u64::MAX, 5);
    // Whatever was accepted or refused, every frame was answered without a panic.
    let c = f.counts();
    assert!(c.accepted + c.rejects.values().sum::<u64>() >= 10, "{c:?}");
}

#[test]
fn the_jpeg_check_reads_the_header_and_refuses_the_wrong_size() {
    // A 64×64 camera is expected; a 32×32 JPEG is refused by its header.
    let cfg = IngestConfig {
        image: [32, 32],
        ..IngestConfig::default()
    };
    let mut f = Feed::new(cfg);
    f.send(camera(jpeg(1)), 0, 0);
    f.send(camera(b"\xFF\xD8 not a jpeg".to_vec()), 1, MS);
    assert_eq!(f.reasons(), ["image", "image"]);
}

#[test]
fn a_flood_of_robot_names_leaves_the_tables_at_their_bound_and_the_known_robots_acting() {
    let img = jpeg(1);
    let mut f = Feed::new(IngestConfig {
        max_robots: 8,
        ..IngestConfig::default()
    });
    f.tick(0, 0, MS, &img);
    // 10,000 frames, each claiming a robot of its own.
    for i in 0..10_000u64 {
        let s = sample_from_raw(&format!("fake-{i}"), 0, MS, state(0.1), None).unwrap();
        let out = f.core.on_sample(s);
        f.out.extend(out);
    }
    // Eight robots tracked (r0 and seven fakes); every later name refused as `robots` under
    // `unknown`, in one table entry.
    assert_eq!(f.core.counts.len(), 9, "{:?}", f.core.counts.keys().collect::<Vec<_>>());
    assert_eq!(f.core.counts["unknown"].rejects["robots"], 10_000 - 7);
    assert_eq!(f.reasons().iter().filter(|r| *r == "robots").count(), 10_000 - 7);
    // A reject naming a new robot is counted under `unknown` too.
    let r = f.core.refuse(nanobot_actors::ingest::Refused {
        robot: "fake-99999".into(),
        sensor: "state".into(),
        seq: 0,
        reason: "size",
        detail: String::new(),
    });
    assert!(
        matches!(r, Produced::Reject { ref robot, .. } if robot == "unknown"),
        "{r:?}"
    );
    assert_eq!(f.core.counts.len(), 9);
    // The robot it knew goes on.
    f.tick(1, 50 * MS, MS, &img);
    assert_eq!(f.counts().observations, 2);
}
