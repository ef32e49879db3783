//! `sim_robot`: a simulated robot on the bus. Every control tick it picks the next action of
//! the newest ActionChunk, publishes its raw telemetry — camera JPEG, surface grid, the action
//! it applies and the state vector, all with the tick's sequence number and stamp — on
//! `{fleet}/{robot}/raw/{camera,surface,action,state}`, then steps the world; episode events go
//! on `{fleet}/{robot}/event`.
//! Cut off from its controller for `intervene_after_ms`, its onboard scripted expert takes over
//! (an Intervention event), so the robot keeps acting.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nanobot_messages::{codec::now_ns, topics, ActionChunk, Encoding, Event, EventKind, RawFrame, TraceContext};
use nanobot_sim::{SimConfig, SimRobot};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::Deserialize;

use crate::bus::{Latest, PubQos, Publisher};
use crate::node::{ActorContext, Presence};

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimRobotConfig {
    pub sim: SimConfig,
    pub jpeg_quality: u8,
    /// Without an action for this long, the onboard expert takes over (0: never).
    pub intervene_after_ms: u64,
    pub fault: FaultConfig,
}

/// Fault injection, for testing supervision.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Panic at this tick (counted from the actor's start).
    pub panic_at_tick: Option<u64>,
}

impl Default for SimRobotConfig {
    fn default() -> Self {
        SimRobotConfig {
            sim: SimConfig::default(),
            jpeg_quality: 85,
            intervene_after_ms: 1000,
            fault: FaultConfig::default(),
        }
    }
}

pub struct SimRobotActor;

pub enum SimRobotMsg {
    Tick,
}

pub struct SimRobotState {
    cfg: SimRobotConfig,
    robot_id: String,
    world: SimRobot,
    tick: u64,
    queue: VecDeque<[f32; 2]>,
    last_action_at: Instant,
    intervening: bool,
    act: Latest<ActionChunk>,
    camera: Publisher<RawFrame>,
    state_pub: Publisher<RawFrame>,
    surface: Publisher<RawFrame>,
    action_pub: Publisher<RawFrame>,
    events: Publisher<Event>,
    presence: Presence,
    episodes: u64,
    successes: u64,
    missed: u64,
    interventions: u64,
}

impl SimRobotState {
    async fn event(&self, event: EventKind) {
        let ev = Event {
            episode: self.world.episode(),
            event,
        };
        if let Err(e) = self.events.put(&ev).await {
            tracing::warn!(robot = %self.robot_id, error = %e, "event not published");
        }
    }

    /// Take the newest chunk, dropping the actions whose ticks already passed.
    fn take_chunk(&mut self) {
        if let Some(r) = self.act.take() {
            let chunk = &r.msg;
            let skip = self.tick.saturating_sub(chunk.obs_seq + 1) as usize;
            if chunk.action_dim as usize == 2 && chunk.actions.len() == (chunk.horizon * chunk.action_dim) as usize {
                self.queue = (skip..chunk.horizon as usize)
                    .filter_map(|i| chunk.action(i))
                    .map(|a| [a[0], a[1]])
                    .collect();
                if !self.queue.is_empty() {
                    self.last_action_at = Instant::now();
                }
            } else {
                self.presence.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(robot = %self.robot_id, dim = chunk.action_dim, len = chunk.actions.len(), "ActionChunk of the wrong shape ignored");
            }
        }
    }
}

impl Actor for SimRobotActor {
    type Msg = SimRobotMsg;
    type State = SimRobotState;
    type Arguments = ActorContext;

    async fn pre_start(
        &self,
        myself: ActorRef<SimRobotMsg>,
        ctx: ActorContext,
    ) -> Result<SimRobotState, ActorProcessingErr> {
        let cfg: SimRobotConfig = ctx.config()?;
        let robot_id = ctx.robot()?.to_string();
        let world = SimRobot::new(cfg.sim.clone()).map_err(|e| ctx.config_error(e.to_string()))?;
        let fleet = ctx.fleet().to_string();
        let bus = &ctx.bus;
        let raw = |sensor: &str| topics::raw(&fleet, &robot_id, sensor);
        let act = bus
            .subscribe_latest::<ActionChunk>(&topics::act(&fleet, &robot_id), || {})
            .await
            .map_err(ctx.bus_err())?;
        let state = SimRobotState {
            camera: bus
                .publisher(&raw("camera"), &robot_id, PubQos::Control)
                .await
                .map_err(ctx.bus_err())?,
            state_pub: bus
                .publisher(&raw("state"), &robot_id, PubQos::Control)
                .await
                .map_err(ctx.bus_err())?,
            surface: bus
                .publisher(&raw("surface"), &robot_id, PubQos::Control)
                .await
                .map_err(ctx.bus_err())?,
            action_pub: bus
                .publisher(&raw("action"), &robot_id, PubQos::Control)
                .await
                .map_err(ctx.bus_err())?,
            events: bus
                // Express like the telemetry, so an episode's start reaches ingest before its
                // first frames.
                .publisher(&topics::event(&fleet, &robot_id), &robot_id, PubQos::Control)
                .await
                .map_err(ctx.bus_err())?,
            presence: Presence::announce(&ctx).await?,
            act,
            world,
            tick: 0,
            queue: VecDeque::new(),
            last_action_at: Instant::now(),
            intervening: false,
            robot_id,
            episodes: 0,
            successes: 0,
            missed: 0,
            interventions: 0,
            cfg,
        };
        state
            .event(EventKind::EpisodeStart {
                task: 0,
                shift: state.cfg.sim.shift.name().to_string(),
            })
            .await;
        myself.send_interval(Duration::from_secs_f32(state.cfg.sim.dt()), || SimRobotMsg::Tick);
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<SimRobotMsg>,
        _msg: SimRobotMsg,
        s: &mut SimRobotState,
    ) -> Result<(), ActorProcessingErr> {
        if s.cfg.fault.panic_at_tick == Some(s.tick) {
            panic!("injected fault: sim_robot {} panics at tick {}", s.robot_id, s.tick);
        }
        let span = tracing::debug_span!("sim_tick", robot = %s.robot_id, tick = s.tick);
        let _g = span.enter();
        s.take_chunk();
        let timeout = s.cfg.intervene_after_ms;
        let cut_off = timeout > 0 && s.last_action_at.elapsed() >= Duration::from_millis(timeout);
        let action = match s.queue.pop_front() {
            Some(a) => {
                if s.intervening && !cut_off {
                    s.intervening = false;
                    s.event(EventKind::Intervention {
                        active: false,
                        reason: "actions resumed".into(),
                    })
                    .await;
                }
                a
            }
            None if cut_off => {
                if !s.intervening {
                    s.intervening = true;
                    s.interventions += 1;
                    let reason = format!("no action for {timeout} ms: onboard expert takes over");
                    tracing::warn!(robot = %s.robot_id, "{reason}");
                    s.event(EventKind::Intervention { active: true, reason }).await;
                }
                s.world.expert_action()
            }
            None => {
                s.missed += 1;
                [0.0, 0.0]
            }
        };
        // One trace per tick: the frames of the world as the action meets it, and the action
        // applied, share it, and so does the chunk that answers them.
        let trace = TraceContext::new_root();
        let (seq, stamp) = (s.tick, now_ns());
        let size = s.cfg.sim.image_size;
        let camera = RawFrame {
            sensor: "camera".into(),
            encoding: Encoding::Jpeg,
            shape: vec![size, size, 3],
            data: s.world.render_jpeg(s.cfg.jpeg_quality).into(),
        };
        let n = s.cfg.sim.surface_size;
        let mut surface = RawFrame::f32_vector("surface", &s.world.surface());
        surface.shape = vec![n, n];
        let state = RawFrame::f32_vector("state", &s.world.state());
        let applied = RawFrame::f32_vector("action", &action);
        // The state frame goes last: ingest completes an observation when it arrives.
        let results = [
            s.camera.put_with(&camera, seq, stamp, Some(&trace)).await,
            s.surface.put_with(&surface, seq, stamp, Some(&trace)).await,
            s.action_pub.put_with(&applied, seq, stamp, Some(&trace)).await,
            s.state_pub.put_with(&state, seq, stamp, Some(&trace)).await,
        ];
        for r in results {
            if let Err(e) = r {
                s.presence.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(robot = %s.robot_id, error = %e, "telemetry not published");
            }
        }
        if let Some(end) = s.world.step(action) {
            s.episodes += 1;
            s.successes += end.success as u64;
            s.event(EventKind::EpisodeEnd {
                success: end.success,
                steps: end.steps,
                reward: end.reward,
            })
            .await;
            s.world.reset();
            s.queue.clear();
            s.event(EventKind::EpisodeStart {
                task: 0,
                shift: s.cfg.sim.shift.name().to_string(),
            })
            .await;
        }
        s.tick += 1;
        let c = &s.presence.counters;
        c.handled.fetch_add(1, Ordering::Relaxed);
        c.dropped.store(s.act.stats().dropped(), Ordering::Relaxed);
        c.set("episodes", s.episodes as f64);
        c.set("successes", s.successes as f64);
        c.set("missed_actions", s.missed as f64);
        c.set("interventions", s.interventions as f64);
        c.set("episode", s.world.episode() as f64);
        Ok(())
    }
}
