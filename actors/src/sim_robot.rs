//! `sim_robot`: a simulated robot on the bus. Every control tick it picks the next action of
//! the newest ActionChunk, publishes its raw telemetry — camera JPEG, surface grid, the action
//! it applies and the state vector, all with the tick's sequence number and stamp — on
//! `{fleet}/{robot}/raw/{camera,surface,action,state}`, then steps the world; episode events go
//! on `{fleet}/{robot}/event`.
//! Cut off from its controller for `intervene_after_ms`, its onboard scripted expert takes over
//! (an Intervention event), so the robot keeps acting; and an episode still short of the target
//! after `intervene_after_steps` ticks is finished by the expert (an Intervention too: what a
//! human operator does for a failing robot, and what replay weights up). An episode the expert
//! finished does not count as the controller's success (`policy_successes`).
//! `shift_after_s` switches the world to the `shift_to` condition while the robot runs.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nanobot_messages::{codec::now_ns, topics, ActionChunk, Encoding, Event, EventKind, RawFrame};
use nanobot_sim::{Shift, SimConfig, SimRobot as World};
use serde::Deserialize;
use tracing::Instrument;

use crate::bus::{HopKind, Inbox, Keep, PubQos, Publisher, Received};
use crate::runtime::{ActorError, Ctx, Input, Metrics, NodeActor};

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimRobotConfig {
    pub sim: SimConfig,
    pub jpeg_quality: u8,
    /// Without an action for this long, the onboard expert takes over (0: never).
    pub intervene_after_ms: u64,
    /// An episode not done after this many ticks is finished by the onboard expert (0: never).
    pub intervene_after_steps: u32,
    /// Seconds after the start at which the world switches to `shift_to`.
    pub shift_after_s: Option<f64>,
    pub shift_to: Shift,
    /// Conditions in turn, each from a time on: `"icy_floor@60,brightness@300,none@540"`
    /// (shift names, seconds after the start, in order), after `shift_after_s` → `shift_to`.
    pub sequence: String,
    /// Run this many episodes, then publish nothing more (0: run until stopped). A fixed
    /// amount of data, for recordings, evaluations and tests.
    pub episodes: u64,
    pub fault: FaultConfig,
}

/// Fault injection, for testing supervision.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Panic at this tick (counted from the actor's start).
    pub panic_at_tick: Option<u64>,
    /// Take this long to stop (a node that does not stop in time, for `launch --grace`).
    pub slow_stop_ms: Option<u64>,
}

impl Default for SimRobotConfig {
    fn default() -> Self {
        SimRobotConfig {
            sim: SimConfig::default(),
            jpeg_quality: 85,
            intervene_after_ms: 1000,
            intervene_after_steps: 0,
            shift_after_s: None,
            shift_to: Shift::None,
            sequence: String::new(),
            episodes: 0,
            fault: FaultConfig::default(),
        }
    }
}

pub struct SimRobot {
    cfg: SimRobotConfig,
    robot_id: String,
    world: World,
    tick: u64,
    queue: VecDeque<[f32; 2]>,
    last_action_at: Instant,
    started: Instant,
    intervening: bool,
    /// The expert finishes this episode (it was failing).
    rescuing: bool,
    /// Its conditions in turn (`shift_after_s` → `shift_to`, then `sequence`), and how many
    /// have begun.
    phases: Vec<(f64, Shift)>,
    phases_begun: usize,
    act: Inbox<Received<ActionChunk>>,
    camera: Publisher<RawFrame>,
    state_pub: Publisher<RawFrame>,
    surface: Publisher<RawFrame>,
    action_pub: Publisher<RawFrame>,
    events: Publisher<Event>,
    episodes: u64,
    successes: u64,
    policy_successes: u64,
    /// Ticks without an action after the episode's first one (a chunk came late).
    missed: u64,
    /// Ticks at an episode's start before its first chunk came (a robot cannot act on an
    /// observation before it has made it).
    first_waits: u64,
    /// An action was applied in this episode.
    acted: bool,
    interventions: u64,
    bad_chunks: u64,
}

/// The actions of `chunk` for the ticks from `tick` on, if its shape is the robot's: `dim`
/// values per action, `horizon · dim` in all (checked: the sizes come from the network).
pub fn chunk_actions(chunk: &ActionChunk, tick: u64, dim: usize) -> Option<Vec<[f32; 2]>> {
    let want = (chunk.horizon as usize).checked_mul(chunk.action_dim as usize)?;
    if chunk.action_dim as usize != dim || dim != 2 || chunk.actions.len() != want {
        return None;
    }
    // Action k is for tick obs_seq + k: the ones whose ticks have passed are skipped.
    let skip = tick.saturating_sub(chunk.obs_seq);
    Some(
        chunk
            .actions
            .chunks_exact(2)
            .skip(usize::try_from(skip).unwrap_or(usize::MAX))
            .map(|a| [a[0], a[1]])
            .collect(),
    )
}

impl SimRobot {
    async fn event(&self, event: EventKind) {
        let ev = Event {
            episode: self.world.episode(),
            event,
        };
        // Stamped with the tick, the numbering of the robot's telemetry (and of its logged rows'
        // `seq`), so that an intervention's rows can be found.
        if let Err(e) = self.events.put_with(&ev, self.tick, now_ns(), None).await {
            tracing::warn!(robot = %self.robot_id, error = %e, "event not published");
        }
    }

    /// Take the newest chunk, dropping the actions whose ticks already passed.
    fn take_chunk(&mut self, ctx: &Ctx<Self>) {
        if let Some(r) = self.act.take() {
            // The action closes the trace the tick started: robot → (ingest) → controller → robot.
            let seq = r.msg.obs_seq;
            let applied = r.trace.map(|t| t.child());
            ctx.bus.hop(
                "robot.act",
                applied.as_ref(),
                r.trace.as_ref(),
                now_ns(),
                &self.robot_id,
                seq,
                HopKind::Consumer,
            );
            match chunk_actions(&r.msg, self.tick, 2) {
                Some(actions) => {
                    self.queue = actions.into();
                    if !self.queue.is_empty() {
                        self.last_action_at = Instant::now();
                    }
                }
                None => {
                    self.bad_chunks += 1;
                    ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(robot = %self.robot_id, dim = r.msg.action_dim, horizon = r.msg.horizon, len = r.msg.actions.len(), "ActionChunk of the wrong shape ignored");
                }
            }
        }
    }

    /// The robot ran the episodes it was asked for.
    fn finished(&self) -> bool {
        self.cfg.episodes > 0 && self.episodes >= self.cfg.episodes
    }

    async fn tick(&mut self, ctx: &Ctx<Self>) {
        if self.finished() {
            return;
        }
        while let Some(&(at, shift)) = self.phases.get(self.phases_begun) {
            if self.started.elapsed().as_secs_f64() < at {
                break;
            }
            self.phases_begun += 1;
            self.cfg.sim.shift = shift;
            self.world.set_shift(shift);
            tracing::info!(robot = %self.robot_id, shift = shift.name(), phase = self.phases_begun, "the world shifts (from the next episode's start on, and the drive now)");
        }
        let limit = self.cfg.intervene_after_steps;
        if limit > 0 && !self.rescuing && self.world.step_in_episode() >= limit {
            self.rescuing = true;
            self.interventions += 1;
            self.event(EventKind::Intervention {
                active: true,
                reason: format!("episode not done after {limit} ticks: onboard expert finishes it"),
            })
            .await;
        }
        self.take_chunk(ctx);
        let timeout = self.cfg.intervene_after_ms;
        let cut_off = timeout > 0 && self.last_action_at.elapsed() >= Duration::from_millis(timeout);
        let queued = self.queue.pop_front();
        let action = match queued {
            _ if self.rescuing => self.world.expert_action(),
            Some(a) => {
                if self.intervening && !cut_off {
                    self.intervening = false;
                    self.event(EventKind::Intervention {
                        active: false,
                        reason: "actions resumed".into(),
                    })
                    .await;
                }
                self.acted = true;
                a
            }
            None if cut_off => {
                if !self.intervening {
                    self.intervening = true;
                    self.interventions += 1;
                    let reason = format!("no action for {timeout} ms: onboard expert takes over");
                    tracing::warn!(robot = %self.robot_id, "{reason}");
                    self.event(EventKind::Intervention { active: true, reason }).await;
                }
                self.world.expert_action()
            }
            None => {
                if self.acted {
                    self.missed += 1;
                } else {
                    self.first_waits += 1;
                }
                [0.0, 0.0]
            }
        };
        // One trace per tick: the frames of the world as the action meets it, and the action
        // applied, share it, and so does the chunk that answers them.
        let trace = ctx.bus.new_trace();
        let (seq, stamp) = (self.tick, now_ns());
        let size = self.cfg.sim.image_size;
        let camera = RawFrame {
            sensor: "camera".into(),
            encoding: Encoding::Jpeg,
            shape: vec![size, size, 3],
            data: self.world.render_jpeg(self.cfg.jpeg_quality).into(),
        };
        let n = self.cfg.sim.surface_size;
        let mut surface = RawFrame::f32_vector("surface", &self.world.surface());
        surface.shape = vec![n, n];
        let state = RawFrame::f32_vector("state", &self.world.state());
        let applied = RawFrame::f32_vector("action", &action);
        // The state frame goes last: ingest completes an observation when it arrives.
        let results = [
            self.camera.put_with(&camera, seq, stamp, trace.as_ref()).await,
            self.surface.put_with(&surface, seq, stamp, trace.as_ref()).await,
            self.action_pub.put_with(&applied, seq, stamp, trace.as_ref()).await,
            self.state_pub.put_with(&state, seq, stamp, trace.as_ref()).await,
        ];
        for r in results {
            if let Err(e) = r {
                ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(robot = %self.robot_id, error = %e, "telemetry not published");
            }
        }
        ctx.bus.hop(
            "robot.tick",
            trace.as_ref(),
            None,
            stamp,
            &self.robot_id,
            seq,
            HopKind::Producer,
        );
        if let Some(end) = self.world.step(action) {
            self.episodes += 1;
            self.successes += end.success as u64;
            self.policy_successes += (end.success && !self.rescuing && !self.intervening) as u64;
            self.event(EventKind::EpisodeEnd {
                success: end.success,
                steps: end.steps,
                reward: end.reward,
            })
            .await;
            if self.rescuing {
                self.rescuing = false;
                self.event(EventKind::Intervention {
                    active: false,
                    reason: "episode over".into(),
                })
                .await;
            }
            if self.finished() {
                tracing::info!(robot = %self.robot_id, episodes = self.episodes, "ran its episodes: publishes nothing more");
                self.tick += 1;
                return;
            }
            self.world.reset();
            self.queue.clear();
            self.acted = false;
            self.event(EventKind::EpisodeStart {
                task: 0,
                shift: self.cfg.sim.shift.name().to_string(),
            })
            .await;
        }
        self.tick += 1;
        ctx.counters.handled.fetch_add(1, Ordering::Relaxed);
    }
}

impl NodeActor for SimRobot {
    const KIND: &'static str = "sim_robot";
    type Config = SimRobotConfig;
    type Event = ();

    fn grants(fleet: &str, robots: &[String]) -> crate::access::Grants {
        use nanobot_messages::topics;
        crate::access::Grants::default().put(
            robots
                .iter()
                .flat_map(|r| [topics::raw(fleet, r, "**"), topics::event(fleet, r)]),
        )
    }

    async fn start(ctx: &Ctx<Self>, cfg: SimRobotConfig) -> Result<Self, ActorError> {
        let robot_id = ctx.robot()?.to_string();
        let world = World::new(cfg.sim.clone()).map_err(|e| ctx.config_error(e.to_string()))?;
        let phases = phases(&cfg).map_err(|e| ctx.config_error(format!("sequence: {e}")))?;
        let fleet = ctx.fleet();
        let raw = |sensor: &str| topics::raw(fleet, &robot_id, sensor);
        let act = ctx
            .subscribe("act", &topics::act(fleet, &robot_id), Keep::Latest, None)
            .await?;
        let state = SimRobot {
            camera: ctx.publisher(&raw("camera"), &robot_id, PubQos::Control).await?,
            state_pub: ctx.publisher(&raw("state"), &robot_id, PubQos::Control).await?,
            surface: ctx.publisher(&raw("surface"), &robot_id, PubQos::Control).await?,
            action_pub: ctx.publisher(&raw("action"), &robot_id, PubQos::Control).await?,
            // Express like the telemetry, so an episode's start reaches ingest before its
            // first frames.
            events: ctx
                .publisher(&topics::event(fleet, &robot_id), &robot_id, PubQos::Sensor)
                .await?,
            act,
            world,
            tick: 0,
            queue: VecDeque::new(),
            last_action_at: Instant::now(),
            started: Instant::now(),
            intervening: false,
            rescuing: false,
            phases,
            phases_begun: 0,
            robot_id,
            episodes: 0,
            successes: 0,
            policy_successes: 0,
            missed: 0,
            first_waits: 0,
            acted: false,
            interventions: 0,
            bad_chunks: 0,
            cfg,
        };
        state
            .event(EventKind::EpisodeStart {
                task: 0,
                shift: state.cfg.sim.shift.name().to_string(),
            })
            .await;
        ctx.every(Duration::from_secs_f32(state.cfg.sim.dt()));
        Ok(state)
    }

    async fn handle(&mut self, ctx: &Ctx<Self>, _tick: Input<()>) -> Result<(), ActorError> {
        if self.cfg.fault.panic_at_tick == Some(self.tick) {
            panic!(
                "injected fault: sim_robot {} panics at tick {}",
                self.robot_id, self.tick
            );
        }
        let span = tracing::debug_span!("sim_tick", robot = %self.robot_id, tick = self.tick);
        self.tick(ctx).instrument(span).await;
        Ok(())
    }

    async fn stop(&mut self, _ctx: &Ctx<Self>) {
        if let Some(ms) = self.cfg.fault.slow_stop_ms {
            tracing::warn!(robot = %self.robot_id, ms, "injected fault: slow stop");
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    fn metrics(&self, m: &mut Metrics) {
        m.set("episodes", self.episodes as f64);
        m.set("successes", self.successes as f64);
        m.set("policy_successes", self.policy_successes as f64);
        m.set("missed_actions", self.missed as f64);
        m.set("first_action_waits", self.first_waits as f64);
        m.set("interventions", self.interventions as f64);
        m.set("episode", self.world.episode() as f64);
        m.set("bad_chunks", self.bad_chunks as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanobot_messages::ActionSource;

    fn chunk(horizon: u32, action_dim: u32, actions: Vec<f32>) -> ActionChunk {
        ActionChunk {
            obs_seq: 10,
            dt_ns: 50_000_000,
            horizon,
            action_dim,
            actions,
            source: ActionSource::Policy,
            policy_version: String::new(),
            adapter_version: String::new(),
        }
    }

    #[test]
    fn a_chunks_first_action_is_for_the_tick_of_its_observation() {
        let c = chunk(3, 2, vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
        assert_eq!(
            chunk_actions(&c, 10, 2).unwrap(),
            vec![[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
        );
        // One tick late (the usual case: inference takes a tick): the first action is past.
        assert_eq!(chunk_actions(&c, 11, 2).unwrap(), vec![[2.0, 2.0], [3.0, 3.0]]);
        assert_eq!(chunk_actions(&c, 12, 2).unwrap(), vec![[3.0, 3.0]]);
        assert!(chunk_actions(&c, 20, 2).unwrap().is_empty());
    }

    #[test]
    fn chunk_sizes_from_the_network_cannot_overflow_the_shape_check() {
        // horizon · action_dim wraps to 0 in u32 arithmetic: an empty chunk must not pass.
        let wrapped = chunk(1 << 31, 2, vec![]);
        assert!(chunk_actions(&wrapped, 0, 2).is_none());
        let huge = chunk(u32::MAX, u32::MAX, vec![0.0; 4]);
        assert!(chunk_actions(&huge, 0, 2).is_none());
        let mut far = chunk(2, 2, vec![0.0; 4]);
        far.obs_seq = u64::MAX;
        assert_eq!(chunk_actions(&far, 5, 2).unwrap().len(), 2);
    }
}

/// A robot's conditions in turn: `shift_after_s` → `shift_to`, then its `sequence`.
fn phases(cfg: &SimRobotConfig) -> Result<Vec<(f64, Shift)>, String> {
    let first = cfg.shift_after_s.map(|at| format!("{}@{at}", cfg.shift_to.name()));
    parse_sequence(&[first.unwrap_or_default(), cfg.sequence.clone()].join(","))
}

/// `"icy_floor@60,brightness@300"` → `[(60.0, IcyFloor), (300.0, Brightness)]`; times must rise.
pub fn parse_sequence(text: &str) -> Result<Vec<(f64, Shift)>, String> {
    let mut out: Vec<(f64, Shift)> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, at) = part
            .split_once('@')
            .ok_or_else(|| format!("{part:?} is not SHIFT@SECONDS"))?;
        let shift: Shift = name.trim().parse().map_err(|e: nanobot_sim::SimError| e.to_string())?;
        let at: f64 = at
            .trim()
            .parse()
            .map_err(|_| format!("{part:?}: {at:?} is not a number of seconds"))?;
        if !at.is_finite() || at < 0.0 || out.last().is_some_and(|&(prev, _)| at <= prev) {
            return Err(format!("{part:?}: times must be non-negative and rise"));
        }
        out.push((at, shift));
    }
    Ok(out)
}

#[cfg(test)]
mod sequence_tests {
    use super::*;

    #[test]
    fn a_sequence_parses_and_bad_ones_name_the_part() {
        assert_eq!(
            parse_sequence("icy_floor@60, brightness@300,none@540").unwrap(),
            vec![
                (60.0, Shift::IcyFloor),
                (300.0, Shift::Brightness),
                (540.0, Shift::None)
            ]
        );
        assert!(parse_sequence("").unwrap().is_empty());
        assert!(parse_sequence("icy@60").unwrap_err().contains("icy"));
        assert!(parse_sequence("none@60,brightness@30")
            .unwrap_err()
            .contains("brightness@30"));
        assert!(parse_sequence("none").unwrap_err().contains("SHIFT@SECONDS"));
        // `shift_after_s` → `shift_to` is the first phase.
        let cfg = SimRobotConfig {
            shift_after_s: Some(60.0),
            shift_to: Shift::IcyFloor,
            sequence: "brightness@300".into(),
            ..SimRobotConfig::default()
        };
        assert_eq!(
            phases(&cfg).unwrap(),
            vec![(60.0, Shift::IcyFloor), (300.0, Shift::Brightness)]
        );
        assert!(phases(&SimRobotConfig::default()).unwrap().is_empty());
    }
}
