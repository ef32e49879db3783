//! `expert`: the scripted expert as a controller on the bus, standing in for the policy until
//! one is trained. It answers each state frame of its robot (`{fleet}/{robot}/raw/state`,
//! latest-only) with an ActionChunk on `{fleet}/{robot}/act`, in the same trace.

use std::sync::atomic::Ordering;

use nanobot_messages::{codec::now_ns, topics, ActionChunk, ActionSource, RawFrame};
use nanobot_sim::{expert_action_from_state, ACTION_DIM, STATE_DIM};
use serde::Deserialize;
use tracing::Instrument;

use crate::bus::{HopKind, Inbox, Keep, PubQos, Publisher, Received};
use crate::runtime::{ActorError, Ctx, Input, NodeActor};

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExpertConfig {
    /// Actions per chunk.
    pub horizon: u32,
    /// The robot's control rate (the chunk's time step) and top speed, for the rollout.
    pub rate_hz: f32,
    pub max_speed: f32,
}

impl Default for ExpertConfig {
    fn default() -> Self {
        ExpertConfig {
            horizon: 16,
            rate_hz: 20.0,
            max_speed: 0.5,
        }
    }
}

pub struct Expert {
    cfg: ExpertConfig,
    robot: String,
    state: Inbox<Received<RawFrame>>,
    act: Publisher<ActionChunk>,
}

/// The expert's one event: a state frame is waiting.
#[derive(Clone, Copy, Debug)]
pub struct StateWaiting;

/// Roll the expert out on a kinematic model of the robot for `horizon` steps.
pub fn expert_chunk(state: &[f32], cfg: &ExpertConfig) -> Vec<f32> {
    let mut s = state.to_vec();
    let dt = 1.0 / cfg.rate_hz;
    let mut out = Vec::with_capacity(cfg.horizon as usize * ACTION_DIM);
    for _ in 0..cfg.horizon {
        let a = expert_action_from_state(&s, cfg.max_speed);
        s[0] = (s[0] + a[0] * cfg.max_speed * dt).clamp(0.0, 1.0);
        s[1] = (s[1] + a[1] * cfg.max_speed * dt).clamp(0.0, 1.0);
        out.extend_from_slice(&a);
    }
    out
}

impl NodeActor for Expert {
    const KIND: &'static str = "expert";
    type Config = ExpertConfig;
    type Event = StateWaiting;

    fn grants(fleet: &str, robots: &[String]) -> crate::access::Grants {
        use nanobot_messages::topics;
        crate::access::Grants::default().put(robots.iter().map(|r| topics::act(fleet, r)))
    }

    async fn start(ctx: &Ctx<Self>, cfg: ExpertConfig) -> Result<Self, ActorError> {
        if cfg.horizon == 0 || !(cfg.rate_hz > 0.0 && cfg.max_speed > 0.0) {
            return Err(ctx.config_error("horizon, rate_hz and max_speed must be positive"));
        }
        let robot = ctx.robot()?.to_string();
        let fleet = ctx.fleet();
        let state = ctx
            .subscribe(
                "state",
                &topics::raw(fleet, &robot, "state"),
                Keep::Latest,
                Some(|| StateWaiting),
            )
            .await?;
        let act = ctx
            .bus
            .publisher(&topics::act(fleet, &robot), &robot, PubQos::Control)
            .await
            .map_err(ctx.bus_err())?;
        Ok(Expert { cfg, robot, state, act })
    }

    async fn handle(&mut self, ctx: &Ctx<Self>, _input: Input<StateWaiting>) -> Result<(), ActorError> {
        let Some(frame) = self.state.take() else {
            return Ok(());
        };
        let span = tracing::debug_span!("expert", robot = %self.robot, seq = frame.header.seq,
            trace_id = %frame.trace.map(|t| t.trace_id_hex()).unwrap_or_default());
        self.answer(ctx, frame).instrument(span).await;
        Ok(())
    }
}

impl Expert {
    async fn answer(&self, ctx: &Ctx<Self>, frame: Received<RawFrame>) {
        let c = &ctx.counters;
        let start = now_ns();
        let values = match frame.msg.as_f32() {
            Some(v) if v.len() >= STATE_DIM => v,
            _ => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(robot = %self.robot, key = %frame.key, "state frame is not a {STATE_DIM}-float vector; ignored");
                return;
            }
        };
        let chunk = ActionChunk {
            obs_seq: frame.header.seq,
            dt_ns: (1e9 / self.cfg.rate_hz) as u64,
            horizon: self.cfg.horizon,
            action_dim: ACTION_DIM as u32,
            actions: expert_chunk(&values, &self.cfg),
            source: ActionSource::Expert,
            policy_version: "scripted-expert".into(),
            adapter_version: String::new(),
        };
        // The chunk continues the observation's trace if it is sampled (none is started here).
        let trace = frame.trace.map(|t| t.child());
        match self.act.put_traced(&chunk, trace.as_ref()).await {
            Ok(_) => {
                let (parent, seq) = (frame.trace.as_ref(), frame.header.seq);
                ctx.bus.hop(
                    "expert.chunk",
                    trace.as_ref(),
                    parent,
                    start,
                    &self.robot,
                    seq,
                    HopKind::Producer,
                );
                c.handled.fetch_add(1, Ordering::Relaxed)
            }
            Err(e) => {
                tracing::warn!(robot = %self.robot, error = %e, "action not published");
                c.errors.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}
