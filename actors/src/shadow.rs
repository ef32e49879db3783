//! Shadow simulation: the `sim` crate's world driven in-process, with no bus and no clock. The
//! promoter runs candidates here before any robot does (closed-loop success on fixed seeds),
//! `nanobot eval` measures a checkpoint with it, and `nanobot demos` records the scripted
//! expert's demonstrations with it.
//!
//! A policy acts here as the `policy` actor makes a robot act: the same [`Rollout`] (history,
//! receding horizon, blending), JPEG-encoded camera frames decoded by the same processor, and a
//! chunk computed on observation `s` reaching the robot one tick later (`latency_ticks`), so its
//! first action is already past and the robot starts from the second, as on the bus. Until the
//! first chunk of an episode arrives the robot stands still, as a live one does.

use nanobot_dataset::{DatasetError, DatasetWriter, Frame};
use nanobot_policy::preprocess::{decode_jpeg_rgb, Step};
use nanobot_policy::rollout::Rollout;
use nanobot_policy::runner::{Runner, RunnerError};
use nanobot_sim::{EpisodeEnd, Shift, SimConfig, SimError, SimRobot};
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ShadowError {
    #[error("shadow sim: {0}")]
    Sim(#[from] SimError),
    #[error("shadow policy: {0}")]
    Policy(#[from] RunnerError),
    #[error("shadow camera frame: {0}")]
    Image(String),
    #[error("demonstrations: {0}")]
    Dataset(#[from] DatasetError),
}

/// How a closed-loop evaluation runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShadowConfig {
    /// The world (its `seed` and `shift` are set per run).
    pub sim: SimConfig,
    /// One world per seed; keep them apart from the seeds the demonstrations used.
    pub seeds: Vec<u64>,
    /// Episodes run in each seed's world.
    pub episodes_per_seed: u32,
    pub jpeg_quality: u8,
    /// The policy actor's schedule (`n_action_steps` defaults to the policy config's).
    pub n_action_steps: Option<usize>,
    pub lead: usize,
    pub blend: usize,
    /// Ticks between an observation and the first tick its chunk can act on.
    pub latency_ticks: u64,
    /// Show the policy a black frame instead of the camera's (does it use its eyes?).
    pub blank_camera: bool,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        ShadowConfig {
            sim: SimConfig::default(),
            seeds: vec![100, 101, 102, 103],
            episodes_per_seed: 5,
            jpeg_quality: 85,
            n_action_steps: None,
            lead: 2,
            blend: 4,
            latency_ticks: 1,
            blank_camera: false,
        }
    }
}

/// What a closed-loop evaluation measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowReport {
    pub episodes: u32,
    pub successes: u32,
    /// Mean episode length in ticks (failures count their full length).
    pub mean_steps: f64,
}

impl ShadowReport {
    pub fn success_rate(&self) -> f64 {
        if self.episodes == 0 {
            0.0
        } else {
            self.successes as f64 / self.episodes as f64
        }
    }
    fn add(&mut self, end: EpisodeEnd) {
        let n = self.episodes as f64;
        self.mean_steps = (self.mean_steps * n + end.steps as f64) / (n + 1.0);
        self.episodes += 1;
        self.successes += end.success as u32;
    }
}

impl std::fmt::Display for ShadowReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} % of {} episodes, {:.1} steps",
            100.0 * self.success_rate(),
            self.episodes,
            self.mean_steps
        )
    }
}

/// Who acts in a shadow episode.
pub enum Driver<'a> {
    /// The scripted expert (the teacher: what success is possible).
    Expert,
    Policy(&'a Runner),
}

/// Run `cfg.episodes_per_seed` episodes in each seed's world under `shift`.
pub fn evaluate(driver: &Driver, shift: Shift, cfg: &ShadowConfig) -> Result<ShadowReport, ShadowError> {
    let mut report = ShadowReport::default();
    for &seed in &cfg.seeds {
        let mut world = SimRobot::new(SimConfig {
            seed,
            shift,
            ..cfg.sim.clone()
        })?;
        let mut rollout = match driver {
            Driver::Policy(runner) => Some(Rollout::new(runner, cfg.n_action_steps, cfg.lead, cfg.blend)?),
            Driver::Expert => None,
        };
        for _ in 0..cfg.episodes_per_seed {
            let end = match (driver, rollout.as_mut()) {
                (Driver::Policy(runner), Some(r)) => policy_episode(runner, r, &mut world, cfg)?,
                _ => loop {
                    if let Some(end) = world.step(world.expert_action()) {
                        break end;
                    }
                },
            };
            report.add(end);
            world.reset();
        }
    }
    Ok(report)
}

fn policy_episode(
    runner: &Runner,
    rollout: &mut Rollout,
    world: &mut SimRobot,
    cfg: &ShadowConfig,
) -> Result<EpisodeEnd, ShadowError> {
    let episode = world.episode();
    // Chunks computed but not yet arrived: (first tick they act on, obs seq, actions).
    let mut in_flight: Option<(u64, u64, Vec<f32>)> = None;
    let mut plan: Option<(u64, Vec<f32>)> = None;
    let dim = runner.config().head.action_dim;
    let mut tick: u64 = 0;
    loop {
        if let Some((due, _, _)) = &in_flight {
            if *due <= tick {
                let (_, seq, actions) = in_flight.take().expect("checked above");
                plan = Some((seq, actions));
            }
        }
        let jpeg = world.render_jpeg(cfg.jpeg_quality);
        let (_, _, mut rgb) = decode_jpeg_rgb(&jpeg).map_err(|e| ShadowError::Image(e.to_string()))?;
        if cfg.blank_camera {
            rgb.fill(0);
        }
        let step = Step {
            rgb,
            state: world.state().to_vec(),
            surface: world.surface(),
        };
        if rollout.observe(episode, tick, 0, step) && in_flight.is_none() {
            let actions = rollout.infer(runner, tick)?;
            let chunk = rollout.adopt(tick, actions, tick);
            in_flight = Some((tick + cfg.latency_ticks, tick, chunk.actions));
        }
        let action = plan
            .as_ref()
            .and_then(|(start, a)| {
                let k = usize::try_from(tick.checked_sub(*start)?).ok()?;
                a.get(k * dim..(k + 1) * dim)
            })
            .map(|a| [a[0], a[1]])
            .unwrap_or([0.0, 0.0]);
        if let Some(end) = world.step(action) {
            rollout.reset();
            return Ok(end);
        }
        tick += 1;
    }
}

/// Record the scripted expert's demonstrations: `episodes` episodes of the world `sim` into
/// `writer` (a LeRobot dataset), as a robot logs them (JPEG camera, state, surface, the action
/// applied at each tick). Returns the rows written.
pub fn record_demonstrations(
    writer: &mut DatasetWriter,
    sim: SimConfig,
    episodes: u32,
    jpeg_quality: u8,
) -> Result<u64, ShadowError> {
    let mut world = SimRobot::new(sim)?;
    let mut seq = 0u64;
    for _ in 0..episodes {
        loop {
            let a = world.expert_action();
            writer.push(Frame {
                seq,
                // When the row was recorded, on the wall clock, as a robot's logger stamps its
                // rows: replay's data age (the trainer's `data_age_s`) is then the time since
                // the demonstrations were made, not since 1970.
                stamp_ns: nanobot_messages::codec::now_ns(),
                source_episode: world.episode(),
                task: 0,
                image: Some(world.render_jpeg(jpeg_quality).into()),
                state: world.state().to_vec(),
                action: a.to_vec(),
                surface: world.surface(),
            })?;
            seq += 1;
            if world.step(a).is_some() {
                world.reset();
                break;
            }
        }
    }
    writer.finish_file()?;
    Ok(seq)
}
