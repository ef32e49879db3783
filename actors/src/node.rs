//! The node runtime: one process hosts the actors its launch file gives it, under a ractor
//! supervisor that restarts a failed actor with backoff until the restart policy is spent.
//! SIGINT/SIGTERM stop the actors in reverse start order and let each flush.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nanobot_messages::{topics, Metric, Stats};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::bus::{Bus, BusError, PubQos};
use crate::launch::{ActorSpec, NodePlan};

#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("node {node}: cannot start: {reason}")]
    Start { node: String, reason: String },
    #[error("node {node}: {reason}")]
    GaveUp { node: String, reason: String },
}

/// Errors an actor reports while starting or handling a message.
#[derive(Debug, Error)]
pub enum ActorError {
    #[error("actor {actor} ({origin}): config: {reason}")]
    Config {
        actor: String,
        origin: String,
        reason: String,
    },
    #[error("actor {actor}: {source}")]
    Bus { actor: String, source: BusError },
}

/// What every actor gets: the bus, its spec from the launch file, and how often it restarted.
#[derive(Clone)]
pub struct ActorContext {
    pub bus: Bus,
    pub node: String,
    pub spec: ActorSpec,
    pub restarts: u32,
}

impl ActorContext {
    pub fn fleet(&self) -> &str {
        self.bus.fleet()
    }
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The actor's config (file + overrides), checked against its type.
    pub fn config<C: DeserializeOwned>(&self) -> Result<C, ActorError> {
        C::deserialize(toml::Value::Table(self.spec.config.clone())).map_err(|e| self.config_error(e.to_string()))
    }

    pub fn config_error(&self, reason: String) -> ActorError {
        ActorError::Config {
            actor: self.spec.name.clone(),
            origin: self.spec.origin.clone(),
            reason,
        }
    }

    /// The robot this instance serves (launch files give it with `for_each_robot`).
    pub fn robot(&self) -> Result<&str, ActorError> {
        self.spec.robot.as_deref().ok_or_else(|| {
            self.config_error(format!(
                "a {} actor serves one robot: set for_each_robot = true or robots = [\"…\"]",
                self.spec.kind
            ))
        })
    }

    pub fn bus_err(&self) -> impl Fn(BusError) -> ActorError + '_ {
        move |source| ActorError::Bus {
            actor: self.spec.name.clone(),
            source,
        }
    }
}

/// Counters an actor keeps and publishes once a second beside its liveliness token.
#[derive(Default)]
pub struct Counters {
    pub handled: AtomicU64,
    pub errors: AtomicU64,
    pub dropped: AtomicU64,
    extra: Mutex<BTreeMap<String, f64>>,
}

impl Counters {
    pub fn set(&self, name: &str, value: f64) {
        self.extra
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), value);
    }
}

/// An actor's presence on the bus: its liveliness token and its stats publication.
/// Dropping it (when the actor stops) withdraws both.
pub struct Presence {
    _token: zenoh::liveliness::LivelinessToken,
    stats_task: tokio::task::JoinHandle<()>,
    pub counters: Arc<Counters>,
}

impl Presence {
    pub async fn announce(ctx: &ActorContext) -> Result<Presence, ActorError> {
        let token = ctx
            .bus
            .liveliness_token(&ctx.node, ctx.name())
            .await
            .map_err(ctx.bus_err())?;
        let key = topics::node_actor(ctx.fleet(), &ctx.node, ctx.name());
        let robot = ctx.spec.robot.clone().unwrap_or_default();
        let publisher = ctx
            .bus
            .publisher::<Stats>(&key, &robot, PubQos::Control)
            .await
            .map_err(ctx.bus_err())?;
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let (node, actor, restarts) = (ctx.node.clone(), ctx.name().to_string(), ctx.restarts);
        let started = Instant::now();
        let stats_task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let extra = c
                    .extra
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .map(|(k, v)| Metric {
                        name: k.clone(),
                        value: *v,
                    })
                    .collect();
                let stats = Stats {
                    node: node.clone(),
                    actor: actor.clone(),
                    restarts,
                    handled: c.handled.load(Ordering::Relaxed),
                    errors: c.errors.load(Ordering::Relaxed),
                    dropped: c.dropped.load(Ordering::Relaxed),
                    uptime_ms: started.elapsed().as_millis() as u64,
                    extra,
                };
                if let Err(e) = publisher.put(&stats).await {
                    tracing::debug!(error = %e, "stats not published");
                }
            }
        });
        Ok(Presence {
            _token: token,
            stats_task,
            counters,
        })
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.stats_task.abort();
    }
}

/// Start one actor of `ctx.spec.kind`, linked to `supervisor`.
pub async fn spawn_actor(ctx: ActorContext, supervisor: ActorCell) -> Result<ActorCell, ActorProcessingErr> {
    async fn linked<A: Actor<Arguments = ActorContext>>(
        a: A,
        ctx: ActorContext,
        sup: ActorCell,
    ) -> Result<ActorCell, ActorProcessingErr> {
        let (r, _) = Actor::spawn_linked(None, a, ctx, sup).await?;
        Ok(r.get_cell())
    }
    match ctx.spec.kind.as_str() {
        "sim_robot" => linked(crate::sim_robot::SimRobotActor, ctx, supervisor).await,
        "expert" => linked(crate::expert::ExpertActor, ctx, supervisor).await,
        "ingest" => linked(crate::ingest::IngestActor, ctx, supervisor).await,
        "logger" => linked(crate::logger::LoggerActor, ctx, supervisor).await,
        "policy" => linked(crate::policy::PolicyActor, ctx, supervisor).await,
        other => Err(format!("unknown actor type {other:?}").into()),
    }
}

pub struct NodeSupervisor;

pub struct SupervisorArgs {
    pub bus: Bus,
    pub plan: NodePlan,
    /// Set when the supervisor gives up, with the reason.
    pub failure: Arc<Mutex<Option<String>>>,
}

pub enum SupervisorMsg {
    Restart(usize),
    Shutdown(RpcReplyPort<()>),
}

pub struct SupervisorState {
    args: SupervisorArgs,
    children: Vec<Option<ActorCell>>,
    recent_failures: Vec<VecDeque<Instant>>,
    restarts: Vec<u32>,
    stopping: bool,
}

impl SupervisorState {
    fn index_of(&self, cell: &ActorCell) -> Option<usize> {
        self.children
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.get_id() == cell.get_id()))
    }

    fn ctx(&self, i: usize) -> ActorContext {
        ActorContext {
            bus: self.args.bus.clone(),
            node: self.args.plan.name.clone(),
            spec: self.args.plan.actors[i].clone(),
            restarts: self.restarts[i],
        }
    }

    async fn stop_children(&mut self) {
        self.stopping = true;
        for child in self.children.iter_mut().rev() {
            if let Some(c) = child.take() {
                if c.stop_and_wait(Some("node shutdown".into()), Some(Duration::from_secs(10)))
                    .await
                    .is_err()
                {
                    c.kill();
                }
            }
        }
    }

    /// Record a failure of child `i`; schedule its restart or give up.
    async fn failed(&mut self, myself: &ActorRef<SupervisorMsg>, i: usize, reason: String) {
        self.children[i] = None;
        let policy = self.args.plan.restart.clone();
        let name = self.args.plan.actors[i].name.clone();
        let window = Duration::from_secs_f64(policy.window_s);
        let q = &mut self.recent_failures[i];
        let now = Instant::now();
        while q.front().is_some_and(|t| now.duration_since(*t) > window) {
            q.pop_front();
        }
        q.push_back(now);
        let n = q.len() as u32;
        if n > policy.max_restarts {
            let msg = format!(
                "actor {name} failed {n} times within {}s (max_restarts = {}); giving up. Last failure: {reason}",
                policy.window_s, policy.max_restarts
            );
            tracing::error!("{msg}");
            *self.args.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg.clone());
            self.stop_children().await;
            myself.stop(Some(msg));
            return;
        }
        let backoff = policy.backoff(n - 1);
        tracing::warn!(actor = %name, failures = n, backoff_ms = backoff.as_millis() as u64, %reason, "actor failed; restarting");
        myself.send_after(backoff, move || SupervisorMsg::Restart(i));
    }
}

impl Actor for NodeSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let n = args.plan.actors.len();
        let mut state = SupervisorState {
            args,
            children: vec![None; n],
            recent_failures: vec![VecDeque::new(); n],
            restarts: vec![0; n],
            stopping: false,
        };
        for i in 0..n {
            let ctx = state.ctx(i);
            let name = ctx.spec.name.clone();
            match spawn_actor(ctx, myself.get_cell()).await {
                Ok(cell) => {
                    tracing::info!(node = %state.args.plan.name, actor = %name, "actor started");
                    state.children[i] = Some(cell);
                }
                Err(e) => {
                    state.stop_children().await;
                    return Err(format!("actor {name}: {e}").into());
                }
            }
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Restart(i) if !state.stopping => {
                state.restarts[i] += 1;
                let ctx = state.ctx(i);
                let name = ctx.spec.name.clone();
                match spawn_actor(ctx, myself.get_cell()).await {
                    Ok(cell) => {
                        tracing::info!(actor = %name, restarts = state.restarts[i], "actor restarted");
                        state.children[i] = Some(cell);
                    }
                    Err(e) => state.failed(&myself, i, format!("restart failed: {e}")).await,
                }
            }
            SupervisorMsg::Restart(_) => {}
            SupervisorMsg::Shutdown(reply) => {
                state.stop_children().await;
                let _ = reply.send(());
                myself.stop(None);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        if state.stopping {
            return Ok(());
        }
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some(i) = state.index_of(&cell) {
                    state.failed(&myself, i, err.to_string()).await;
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if let Some(i) = state.index_of(&cell) {
                    let name = &state.args.plan.actors[i].name;
                    tracing::info!(actor = %name, reason = ?reason, "actor stopped");
                    state.children[i] = None;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Run one node until SIGINT/SIGTERM, or until its supervisor gives up.
pub async fn run_node(plan: NodePlan) -> Result<(), NodeError> {
    let bus = match Bus::open(&plan.bus, &plan.fleet).await {
        Ok(b) => b,
        Err(e @ BusError::Config(_)) => {
            return Err(NodeError::Start {
                node: plan.name.clone(),
                reason: e.to_string(),
            })
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(node = %plan.name, fleet = %plan.fleet, zenoh = %plan.bus.describe(), actors = plan.actors.len(), "node starting");
    let failure = Arc::new(Mutex::new(None));
    let node = plan.name.clone();
    let args = SupervisorArgs {
        bus: bus.clone(),
        plan,
        failure: failure.clone(),
    };
    let (sup, handle) = Actor::spawn(None, NodeSupervisor, args)
        .await
        .map_err(|e| NodeError::Start {
            node: node.clone(),
            reason: e.to_string(),
        })?;
    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|e| NodeError::Start {
            node: node.clone(),
            reason: format!("SIGTERM handler: {e}"),
        })?;
    let mut handle = handle;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!(node = %node, "SIGINT: stopping"),
        _ = sigterm.recv() => tracing::info!(node = %node, "SIGTERM: stopping"),
        _ = &mut handle => {}
    }
    if !handle.is_finished() {
        let _ = ractor::call_t!(sup, SupervisorMsg::Shutdown, 30_000);
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut handle).await;
    }
    bus.close().await;
    let failed = failure.lock().unwrap_or_else(|e| e.into_inner()).take();
    match failed {
        Some(reason) => Err(NodeError::GaveUp { node, reason }),
        None => {
            tracing::info!(node = %node, "node stopped");
            Ok(())
        }
    }
}
