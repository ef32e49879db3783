//! Simulated robots standing in for hardware: a planar reaching task with a point-mass end
//! effector, a rendered 64×64 camera, a contact/roughness surface grid, a scripted expert, and
//! named distribution shifts. Deterministic from a seed.
//!
//! State vector (`STATE_DIM` = 6): `[x, y, vx, vy, target_x, target_y]`, arena `[0, 1]²`. What a
//! robot reports of it depends on [`Observe`]: with `observe = "camera"` the target is not in
//! the state (those two entries are 0) and is seen only in the camera frame, among distractors.
//! Action (`ACTION_DIM` = 2): a velocity command in `[-1, 1]²`, scaled by `max_speed` and by the
//! actuator gain.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub mod rng;
pub use rng::SplitMix64;

pub const STATE_DIM: usize = 6;
pub const ACTION_DIM: usize = 2;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SimError {
    #[error("unknown distribution shift {0:?} (known: none, actuator_gain, camera_offset, brightness, target_region, actuator_bias, actuator_rotation, edge_targets, icy_floor, warm_light)")]
    UnknownShift(String),
    #[error("invalid sim config: {0}")]
    Config(String),
}

/// A named distribution shift, applied on top of the nominal world.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Shift {
    #[default]
    None,
    /// Actuators deliver 55 % of the commanded velocity.
    ActuatorGain,
    /// The camera is knocked on its mount: the scene moves by (10, −7) pixels, 0.16 and 0.11 of
    /// the arena.
    CameraOffset,
    /// Glare: every colour channel +0.6 (clipped), washing the colours out.
    Brightness,
    /// Targets appear in the upper-left region instead of anywhere.
    TargetRegion,
    /// A miscalibrated drive: every command gets (+0.6, +0.4) added, so a robot that stops
    /// commanding near the target drifts off it.
    ActuatorBias,
    /// An icy floor: the surface sensor reads ice everywhere (0.5 in every cell), the camera sees
    /// a pale blue floor, and the wheels slip: commands move the robot 70° counter-clockwise of
    /// where they point (as `actuator_rotation`, but the robot can sense the condition it is in).
    IcyFloor,
    /// Targets appear along the arena's edges, outside the region the nominal world (and so the
    /// demonstrations) puts them in.
    EdgeTargets,
    /// The drive is mounted turned by 70°: commands move the robot 70° counter-clockwise of
    /// where they point.
    ActuatorRotation,
    /// Warm, dim lighting: the camera sees every colour through an orange filter (red at 90 %,
    /// green at 30 %, blue at 15 %), so the green target reads dark olive.
    WarmLight,
}

/// What the robot's own sensors report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Observe {
    /// The state vector carries the target: the task can be solved without the camera.
    #[default]
    State,
    /// The state vector carries only pose and velocity (its target entries are 0); the target
    /// is seen only in the camera frame, with two distractor discs of other colours (blue and
    /// yellow). The camera shows the floor and what lies on it, not the robot: the robot knows
    /// its own pose from its sensors, and reads the target's place against it.
    Camera,
}

impl Observe {
    pub fn name(self) -> &'static str {
        match self {
            Observe::State => "state",
            Observe::Camera => "camera",
        }
    }
}

impl FromStr for Observe {
    type Err = SimError;
    fn from_str(s: &str) -> Result<Self, SimError> {
        match s {
            "state" => Ok(Observe::State),
            "camera" => Ok(Observe::Camera),
            _ => Err(SimError::Config(format!("observe {s:?}: state or camera"))),
        }
    }
}

impl Shift {
    pub const ALL: [Shift; 10] = [
        Shift::None,
        Shift::ActuatorGain,
        Shift::CameraOffset,
        Shift::Brightness,
        Shift::TargetRegion,
        Shift::ActuatorBias,
        Shift::ActuatorRotation,
        Shift::EdgeTargets,
        Shift::IcyFloor,
        Shift::WarmLight,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Shift::None => "none",
            Shift::ActuatorGain => "actuator_gain",
            Shift::CameraOffset => "camera_offset",
            Shift::Brightness => "brightness",
            Shift::TargetRegion => "target_region",
            Shift::ActuatorBias => "actuator_bias",
            Shift::ActuatorRotation => "actuator_rotation",
            Shift::EdgeTargets => "edge_targets",
            Shift::IcyFloor => "icy_floor",
            Shift::WarmLight => "warm_light",
        }
    }
    /// What the drive adds to every command.
    fn bias(self) -> [f32; 2] {
        if self == Shift::ActuatorBias {
            [0.6, 0.4]
        } else {
            [0.0, 0.0]
        }
    }
    /// The drive's rotation, radians counter-clockwise.
    fn rotation(self) -> f32 {
        if matches!(self, Shift::ActuatorRotation | Shift::IcyFloor) {
            70f32.to_radians()
        } else {
            0.0
        }
    }
    /// The command the drive turns `a` (clamped to `[-1, 1]²`) into.
    fn drive(self, a: [f32; 2]) -> [f32; 2] {
        let a = a.map(|v| if v.is_finite() { v.clamp(-1.0, 1.0) } else { 0.0 });
        let (sin, cos) = self.rotation().sin_cos();
        let b = self.bias();
        [cos * a[0] - sin * a[1] + b[0], sin * a[0] + cos * a[1] + b[1]]
    }
    /// The command that makes the drive deliver `want` (as near as `[-1, 1]²` allows): what an
    /// expert who knows the shift sends.
    fn undrive(self, want: [f32; 2]) -> [f32; 2] {
        let b = self.bias();
        let w = [want[0] - b[0], want[1] - b[1]];
        let (sin, cos) = self.rotation().sin_cos();
        [cos * w[0] + sin * w[1], -sin * w[0] + cos * w[1]].map(|v| v.clamp(-1.0, 1.0))
    }
    fn gain(self) -> f32 {
        if self == Shift::ActuatorGain {
            0.55
        } else {
            1.0
        }
    }
    fn camera_offset(self) -> (i32, i32) {
        if self == Shift::CameraOffset {
            (10, -7)
        } else {
            (0, 0)
        }
    }
    fn brightness(self) -> f32 {
        if self == Shift::Brightness {
            0.6
        } else {
            0.0
        }
    }
    /// What the lighting multiplies each colour channel by.
    fn tint(self) -> [f32; 3] {
        if self == Shift::WarmLight {
            [0.9, 0.3, 0.15]
        } else {
            [1.0; 3]
        }
    }
    /// Whether this shift changes only what the camera sees.
    pub fn is_visual(self) -> bool {
        matches!(self, Shift::CameraOffset | Shift::Brightness | Shift::WarmLight)
    }
    /// `[x_min, x_max, y_min, y_max]` of target positions.
    fn target_region(self) -> [f32; 4] {
        if self == Shift::TargetRegion {
            [0.1, 0.4, 0.6, 0.9]
        } else {
            [0.15, 0.85, 0.15, 0.85]
        }
    }
}

impl FromStr for Shift {
    type Err = SimError;
    fn from_str(s: &str) -> Result<Self, SimError> {
        Shift::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| SimError::UnknownShift(s.to_string()))
    }
}

/// World parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Control ticks per second (the simulation step is `1 / rate_hz`).
    pub rate_hz: f32,
    /// Ticks before an episode times out as a failure.
    pub episode_steps: u32,
    /// Distance to the target that counts as reached.
    pub success_radius: f32,
    /// Arena units per second at full command.
    pub max_speed: f32,
    /// Camera width and height in pixels.
    pub image_size: u32,
    /// Surface grid rows and columns.
    pub surface_size: u32,
    pub shift: Shift,
    pub seed: u64,
    /// What the robot's sensors report: `state` (the target in the state vector) or `camera`
    /// (the target only in the camera frame).
    pub observe: Observe,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            rate_hz: 20.0,
            episode_steps: 200,
            success_radius: 0.05,
            max_speed: 0.5,
            image_size: 64,
            surface_size: 8,
            shift: Shift::None,
            seed: 0,
            observe: Observe::State,
        }
    }
}

impl SimConfig {
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |m: &str| Err(SimError::Config(m.to_string()));
        if !(self.rate_hz > 0.0 && self.rate_hz <= 10_000.0) {
            return bad("rate_hz must be in (0, 10000]");
        }
        if self.episode_steps == 0 {
            return bad("episode_steps must be positive");
        }
        if !(8..=512).contains(&self.image_size) {
            return bad("image_size must be in 8..=512");
        }
        if !(1..=64).contains(&self.surface_size) {
            return bad("surface_size must be in 1..=64");
        }
        if !(self.success_radius > 0.0 && self.max_speed > 0.0) {
            return bad("success_radius and max_speed must be positive");
        }
        Ok(())
    }
    pub fn dt(&self) -> f32 {
        1.0 / self.rate_hz
    }
}

/// How an episode ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpisodeEnd {
    pub success: bool,
    pub steps: u32,
    pub reward: f32,
}

/// One simulated robot.
#[derive(Clone, Debug)]
pub struct SimRobot {
    cfg: SimConfig,
    rng: SplitMix64,
    /// Roughness of each surface cell in `[0, 1]`; rough cells slow the robot down.
    roughness: Vec<f32>,
    pos: [f32; 2],
    vel: [f32; 2],
    target: [f32; 2],
    /// Discs of other colours the camera sees (with `observe = "camera"`): not the target.
    distractors: [[f32; 2]; 2],
    step: u32,
    episode: u64,
    episode_reward: f32,
}

impl SimRobot {
    pub fn new(cfg: SimConfig) -> Result<Self, SimError> {
        cfg.validate()?;
        let mut rng = SplitMix64::new(cfg.seed);
        let n = (cfg.surface_size * cfg.surface_size) as usize;
        let roughness = (0..n)
            .map(|_| {
                if rng.next_f32() < 0.2 {
                    0.5 + 0.5 * rng.next_f32()
                } else {
                    0.0
                }
            })
            .collect();
        let mut robot = SimRobot {
            cfg,
            rng,
            roughness,
            pos: [0.5, 0.5],
            vel: [0.0; 2],
            target: [0.5, 0.5],
            distractors: [[-1.0; 2]; 2],
            step: 0,
            episode: 0,
            episode_reward: 0.0,
        };
        robot.place();
        Ok(robot)
    }

    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }
    pub fn episode(&self) -> u64 {
        self.episode
    }
    pub fn step_in_episode(&self) -> u32 {
        self.step
    }
    pub fn position(&self) -> [f32; 2] {
        self.pos
    }
    pub fn target(&self) -> [f32; 2] {
        self.target
    }
    pub fn set_shift(&mut self, shift: Shift) {
        self.cfg.shift = shift;
    }

    fn place(&mut self) {
        let [x0, x1, y0, y1] = self.cfg.shift.target_region();
        self.target = [
            x0 + (x1 - x0) * self.rng.next_f32(),
            y0 + (y1 - y0) * self.rng.next_f32(),
        ];
        if self.cfg.shift == Shift::EdgeTargets {
            // Within 0.07 of one of the four edges, anywhere along it.
            let along = 0.05 + 0.9 * self.rng.next_f32();
            let across = 0.03 + 0.04 * self.rng.next_f32();
            self.target = match (self.rng.next_f32() * 4.0) as u32 {
                0 => [across, along],
                1 => [1.0 - across, along],
                2 => [along, across],
                _ => [along, 1.0 - across],
            };
        }
        loop {
            self.pos = [0.1 + 0.8 * self.rng.next_f32(), 0.1 + 0.8 * self.rng.next_f32()];
            if dist(self.pos, self.target) > 4.0 * self.cfg.success_radius {
                break;
            }
        }
        if self.cfg.observe == Observe::Camera {
            // Distractors away from the target (state-only worlds draw nothing more, so their
            // episodes are what they always were).
            for i in 0..self.distractors.len() {
                self.distractors[i] = loop {
                    let p = [0.1 + 0.8 * self.rng.next_f32(), 0.1 + 0.8 * self.rng.next_f32()];
                    if dist(p, self.target) > 3.0 * self.cfg.success_radius {
                        break p;
                    }
                };
            }
        }
        self.vel = [0.0; 2];
        self.step = 0;
        self.episode_reward = 0.0;
    }

    /// Start the next episode.
    pub fn reset(&mut self) {
        self.episode += 1;
        self.place();
    }

    fn roughness_at(&self, p: [f32; 2]) -> f32 {
        if self.cfg.shift == Shift::IcyFloor {
            return 0.0;
        }
        let n = self.cfg.surface_size as usize;
        let cx = ((p[0] * n as f32) as usize).min(n - 1);
        let cy = ((p[1] * n as f32) as usize).min(n - 1);
        self.roughness[cy * n + cx]
    }

    /// Apply one action for one tick. Returns how the episode ended, if it did.
    pub fn step(&mut self, action: [f32; 2]) -> Option<EpisodeEnd> {
        let dt = self.cfg.dt();
        let slow = 1.0 - 0.6 * self.roughness_at(self.pos);
        let command = self.cfg.shift.drive(action);
        for (i, &a) in command.iter().enumerate() {
            self.vel[i] = a * self.cfg.max_speed * self.cfg.shift.gain() * slow;
            self.pos[i] = (self.pos[i] + self.vel[i] * dt).clamp(0.0, 1.0);
        }
        self.step += 1;
        let d = dist(self.pos, self.target);
        let success = d < self.cfg.success_radius;
        let reward = if success { 1.0 } else { -d * dt };
        self.episode_reward += reward;
        (success || self.step >= self.cfg.episode_steps).then_some(EpisodeEnd {
            success,
            steps: self.step,
            reward: self.episode_reward,
        })
    }

    /// What the robot's sensors report: `[x, y, vx, vy, target_x, target_y]`, with the target
    /// entries 0 when it observes through the camera.
    pub fn state(&self) -> [f32; STATE_DIM] {
        let mut s = self.true_state();
        if self.cfg.observe == Observe::Camera {
            s[4] = 0.0;
            s[5] = 0.0;
        }
        s
    }

    /// `[x, y, vx, vy, target_x, target_y]`, target included: what the scripted expert knows.
    pub fn true_state(&self) -> [f32; STATE_DIM] {
        [
            self.pos[0],
            self.pos[1],
            self.vel[0],
            self.vel[1],
            self.target[0],
            self.target[1],
        ]
    }

    /// The surface grid, row-major: roughness, with 1.0 in the cell the robot touches.
    pub fn surface(&self) -> Vec<f32> {
        let n = self.cfg.surface_size as usize;
        let mut grid = if self.cfg.shift == Shift::IcyFloor {
            vec![0.5; n * n]
        } else {
            self.roughness.clone()
        };
        let cx = ((self.pos[0] * n as f32) as usize).min(n - 1);
        let cy = ((self.pos[1] * n as f32) as usize).min(n - 1);
        grid[cy * n + cx] = 1.0;
        grid
    }

    /// The camera image, packed RGB8, `image_size²` pixels.
    pub fn render_rgb(&self) -> Vec<u8> {
        let s = self.cfg.image_size as i32;
        let n = self.cfg.surface_size as i32;
        let (ox, oy) = self.cfg.shift.camera_offset();
        let bright = self.cfg.shift.brightness();
        let to_px = |p: [f32; 2]| ((p[0] * s as f32) as i32 + ox, (p[1] * s as f32) as i32 + oy);
        let (tx, ty) = to_px(self.target);
        let (rx, ry) = to_px(self.pos);
        let tr = ((self.cfg.success_radius * s as f32) as i32).max(2);
        let rr = (s / 20).max(2);
        let distractors: Vec<((i32, i32), [f32; 3])> = if self.cfg.observe == Observe::Camera {
            let colours = [[0.15, 0.3, 0.9], [0.9, 0.8, 0.1]];
            self.distractors.iter().map(|&d| to_px(d)).zip(colours).collect()
        } else {
            Vec::new()
        };
        let tint = self.cfg.shift.tint();
        let mut img = Vec::with_capacity((s * s * 3) as usize);
        for py in 0..s {
            for px in 0..s {
                // World cell under this pixel (the camera offset moves the scene).
                let (wx, wy) = (px - ox, py - oy);
                let mut c = if (0..s).contains(&wx) && (0..s).contains(&wy) {
                    let cell = ((wy * n / s) * n + wx * n / s) as usize;
                    let r = self.roughness[cell];
                    let base = 0.55 + 0.1 * (wy as f32 / s as f32);
                    if self.cfg.shift == Shift::IcyFloor {
                        [base + 0.1, base + 0.2, base + 0.35]
                    } else {
                        [base - 0.25 * r, base - 0.2 * r, base - 0.3 * r]
                    }
                } else {
                    [0.05, 0.05, 0.05]
                };
                for &((dx, dy), colour) in &distractors {
                    if (px - dx).pow(2) + (py - dy).pow(2) <= tr * tr {
                        c = colour;
                    }
                }
                if (px - tx).pow(2) + (py - ty).pow(2) <= tr * tr {
                    c = [0.1, 0.8, 0.2];
                }
                // The camera looks at the floor and what lies on it; a robot that observes
                // through it knows where it is from its own odometry, and its marker is not
                // drawn (so the target's place must be read against the robot's sensed pose).
                if self.cfg.observe == Observe::State && (px - rx).pow(2) + (py - ry).pow(2) <= rr * rr {
                    c = [0.9, 0.1, 0.1];
                }
                for (v, t) in c.into_iter().zip(tint) {
                    img.push(((v * t + bright).clamp(0.0, 1.0) * 255.0) as u8);
                }
            }
        }
        img
    }

    /// The camera image as JPEG, what an ESP32-CAM would send.
    pub fn render_jpeg(&self, quality: u8) -> Vec<u8> {
        let s = self.cfg.image_size as u16;
        let rgb = self.render_rgb();
        let mut out = Vec::with_capacity(4096);
        jpeg_encoder::Encoder::new(&mut out, quality)
            .encode(&rgb, s, s, jpeg_encoder::ColorType::Rgb)
            .expect("image_size is validated and the buffer matches it");
        out
    }

    /// The scripted expert's action now: head for the target, slowing down near it. The expert
    /// knows the world, so under a drive shift (bias, rotation) it sends the command that makes
    /// the drive do what it wants: the teacher still knows the answer.
    pub fn expert_action(&self) -> [f32; 2] {
        self.cfg
            .shift
            .undrive(expert_action_from_state(&self.true_state(), self.cfg.max_speed))
    }

    /// The scripted expert's next `horizon` actions, rolled out on a copy of the world.
    pub fn expert_chunk(&self, horizon: usize) -> Vec<[f32; 2]> {
        let mut world = self.clone();
        (0..horizon)
            .map(|_| {
                let a = world.expert_action();
                world.step(a);
                a
            })
            .collect()
    }
}

/// The expert policy from a state vector alone (so that a remote controller can run it).
pub fn expert_action_from_state(state: &[f32], max_speed: f32) -> [f32; 2] {
    if state.len() < STATE_DIM {
        return [0.0; 2];
    }
    let (dx, dy) = (state[4] - state[0], state[5] - state[1]);
    // Reach the target in about a quarter second of travel, never faster than full command.
    let k = 4.0 / max_speed;
    let (ax, ay) = (k * dx, k * dy);
    let norm = (ax * ax + ay * ay).sqrt();
    if norm > 1.0 {
        [ax / norm, ay / norm]
    } else {
        [ax, ay]
    }
}

fn dist(a: [f32; 2], b: [f32; 2]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_expert(cfg: SimConfig, episodes: u32) -> (u32, u32) {
        let mut robot = SimRobot::new(cfg).unwrap();
        let (mut wins, mut total) = (0, 0);
        while total < episodes {
            if let Some(end) = robot.step(robot.expert_action()) {
                wins += end.success as u32;
                total += 1;
                robot.reset();
            }
        }
        (wins, total)
    }

    #[test]
    fn same_seed_same_world() {
        let cfg = SimConfig {
            seed: 42,
            ..SimConfig::default()
        };
        let (mut a, mut b) = (SimRobot::new(cfg.clone()).unwrap(), SimRobot::new(cfg).unwrap());
        for i in 0..300 {
            let act = [((i % 7) as f32 - 3.0) / 3.0, 0.3];
            assert_eq!(a.step(act), b.step(act));
            assert_eq!(a.state(), b.state());
        }
        assert_eq!(a.render_jpeg(80), b.render_jpeg(80));
        let other = SimRobot::new(SimConfig {
            seed: 43,
            ..SimConfig::default()
        })
        .unwrap();
        assert_ne!(
            other.target(),
            SimRobot::new(SimConfig {
                seed: 42,
                ..SimConfig::default()
            })
            .unwrap()
            .target()
        );
    }

    #[test]
    fn the_expert_succeeds_and_doing_nothing_fails() {
        let (wins, total) = run_expert(
            SimConfig {
                seed: 1,
                ..SimConfig::default()
            },
            20,
        );
        assert!(wins >= 19, "expert won {wins} of {total}");
        let mut robot = SimRobot::new(SimConfig {
            seed: 1,
            ..SimConfig::default()
        })
        .unwrap();
        let end = loop {
            if let Some(end) = robot.step([0.0, 0.0]) {
                break end;
            }
        };
        assert!(!end.success);
        assert_eq!(end.steps, 200);
    }

    #[test]
    fn shifts_change_what_they_name() {
        let base = SimConfig {
            seed: 5,
            ..SimConfig::default()
        };
        let nominal = SimRobot::new(base.clone()).unwrap();
        let shifted = |s: Shift| {
            SimRobot::new(SimConfig {
                shift: s,
                ..base.clone()
            })
            .unwrap()
        };
        assert_ne!(shifted(Shift::CameraOffset).render_rgb(), nominal.render_rgb());
        let bright: u64 = shifted(Shift::Brightness).render_rgb().iter().map(|&v| v as u64).sum();
        let dim: u64 = nominal.render_rgb().iter().map(|&v| v as u64).sum();
        assert!(bright > dim);
        let (mut g, mut n) = (shifted(Shift::ActuatorGain), nominal.clone());
        g.step([1.0, 0.0]);
        n.step([1.0, 0.0]);
        assert!(g.state()[2].abs() < n.state()[2].abs());
        let t = shifted(Shift::TargetRegion).target();
        assert!(t[0] <= 0.4 && t[1] >= 0.6, "{t:?}");
        assert_eq!("camera_offset".parse::<Shift>().unwrap(), Shift::CameraOffset);
        assert!("sideways".parse::<Shift>().is_err());
    }

    #[test]
    fn a_robot_that_observes_through_the_camera_sees_its_target_only_there() {
        let cfg = |observe| SimConfig {
            seed: 7,
            observe,
            ..SimConfig::default()
        };
        let (state, camera) = (
            SimRobot::new(cfg(Observe::State)).unwrap(),
            SimRobot::new(cfg(Observe::Camera)).unwrap(),
        );
        // Same world, same target; only what the sensors report differs.
        assert_eq!(state.target(), camera.target());
        assert_eq!(&state.state()[4..], &state.target());
        assert_eq!(&camera.state()[..4], &state.state()[..4]);
        assert_eq!(&camera.state()[4..], &[0.0, 0.0]);
        assert_eq!(camera.true_state(), state.state());
        // The target's green disc is in the frame, and so are the distractors (blue, yellow),
        // but not the robot's red marker.
        let count = |img: &[u8], want: [u8; 3]| {
            img.chunks_exact(3)
                .filter(|p| p.iter().zip(want).all(|(&a, b)| a.abs_diff(b) < 30))
                .count()
        };
        let (s_img, c_img) = (state.render_rgb(), camera.render_rgb());
        let (green, red, blue, yellow) = ([25, 204, 51], [229, 25, 25], [38, 76, 229], [229, 204, 25]);
        assert!(count(&c_img, green) >= 9, "the target shows");
        assert!(
            count(&c_img, blue) >= 9 && count(&c_img, yellow) >= 9,
            "the distractors show"
        );
        assert_eq!(count(&c_img, red), 0, "the robot is not drawn");
        assert!(count(&s_img, red) >= 9 && count(&s_img, blue) == 0);
        // The scripted expert still knows where the target is.
        let (wins, total) = run_expert(cfg(Observe::Camera), 20);
        assert!(wins >= 19, "expert won {wins} of {total} observing through the camera");
        assert_eq!("camera".parse::<Observe>().unwrap(), Observe::Camera);
        assert!("lidar".parse::<Observe>().is_err());
    }

    #[test]
    fn visual_shifts_change_the_frame_and_nothing_else() {
        let world = |shift| {
            let mut r = SimRobot::new(SimConfig {
                seed: 3,
                shift,
                observe: Observe::Camera,
                ..SimConfig::default()
            })
            .unwrap();
            r.step([0.5, -0.2]);
            r
        };
        let nominal = world(Shift::None);
        for shift in [Shift::CameraOffset, Shift::Brightness, Shift::WarmLight] {
            assert!(shift.is_visual());
            let w = world(shift);
            assert_eq!(w.state(), nominal.state(), "{}", shift.name());
            assert_eq!(w.surface(), nominal.surface(), "{}", shift.name());
            assert_ne!(w.render_rgb(), nominal.render_rgb(), "{}", shift.name());
        }
        assert!(!Shift::IcyFloor.is_visual());
        // Warm light: green and blue dimmed far more than red.
        let mean = |img: &[u8], c: usize| img.chunks_exact(3).map(|p| p[c] as f64).sum::<f64>();
        let (warm, plain) = (world(Shift::WarmLight).render_rgb(), nominal.render_rgb());
        assert!(mean(&warm, 1) < 0.4 * mean(&plain, 1) && mean(&warm, 0) > 0.8 * mean(&plain, 0));
    }

    #[test]
    fn camera_and_surface_have_their_sizes() {
        let robot = SimRobot::new(SimConfig::default()).unwrap();
        assert_eq!(robot.render_rgb().len(), 64 * 64 * 3);
        let jpeg = robot.render_jpeg(85);
        assert_eq!(&jpeg[..2], &[0xFF, 0xD8]);
        assert_eq!(robot.surface().len(), 64);
        assert!(robot.surface().contains(&1.0));
        assert_eq!(robot.expert_chunk(16).len(), 16);
        assert!(SimRobot::new(SimConfig {
            rate_hz: 0.0,
            ..SimConfig::default()
        })
        .is_err());
    }
}
