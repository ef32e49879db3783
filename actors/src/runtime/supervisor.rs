//! The node supervisor: one process hosts the actors its launch file gives it, under a ractor
//! supervisor that restarts a failed actor with backoff until the restart policy is spent.
//! SIGINT/SIGTERM stop the actors in reverse start order and let each flush.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nanobot_messages::{topics, Stats};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use thiserror::Error;

use super::actor::ActorKind;
use super::context::Placement;
use crate::bus::{Bus, BusError};
use crate::launch::NodePlan;

#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("node {node}: cannot start: {reason}")]
    Start { node: String, reason: String },
    #[error("node {node}: {reason}")]
    GaveUp { node: String, reason: String },
}

/// Start one actor of `place.spec.kind` from `kinds`, linked to `supervisor`.
async fn spawn_actor(
    kinds: &[ActorKind],
    place: Placement,
    supervisor: ActorCell,
) -> Result<ActorCell, ActorProcessingErr> {
    match kinds.iter().find(|k| k.name == place.spec.kind) {
        Some(kind) => kind.spawn(place, supervisor).await,
        None => Err(format!("unknown actor type {:?}", place.spec.kind).into()),
    }
}

pub struct NodeSupervisor;

pub struct SupervisorArgs {
    pub bus: Bus,
    pub plan: NodePlan,
    /// The actor types this build provides.
    pub kinds: &'static [ActorKind],
    /// Set when the supervisor gives up, with the reason.
    pub failure: Arc<Mutex<Option<String>>>,
}

pub enum SupervisorMsg {
    Restart(usize),
    Shutdown(RpcReplyPort<()>),
}

pub struct SupervisorState {
    args: SupervisorArgs,
    /// The node's shared services: live as long as the node.
    services: super::NodeServices,
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

    fn place(&self, i: usize) -> Placement {
        Placement {
            bus: self.args.bus.clone(),
            node: self.args.plan.name.clone(),
            spec: self.args.plan.actors[i].clone(),
            restarts: self.restarts[i],
            services: self.services.clone(),
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
            services: super::NodeServices::default(),
            children: vec![None; n],
            recent_failures: vec![VecDeque::new(); n],
            restarts: vec![0; n],
            stopping: false,
        };
        for i in 0..n {
            let place = state.place(i);
            let name = place.spec.name.clone();
            match spawn_actor(state.args.kinds, place, myself.get_cell()).await {
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
                let place = state.place(i);
                let name = place.spec.name.clone();
                match spawn_actor(state.args.kinds, place, myself.get_cell()).await {
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

/// Run one node until SIGINT/SIGTERM, or until its supervisor gives up. `kinds` are the actor
/// types this build provides (`crate::registry::ACTORS`).
pub async fn run_node(plan: NodePlan, kinds: &'static [ActorKind]) -> Result<(), NodeError> {
    // The handlers go in first: a SIGTERM that arrives while the bus opens or the actors start
    // (a launcher stopping a fleet it just started) stops the node cleanly, instead of killing
    // it by the default disposition.
    let stop_signal = |kind: tokio::signal::unix::SignalKind, name: &str| {
        tokio::signal::unix::signal(kind).map_err(|e| NodeError::Start {
            node: plan.name.clone(),
            reason: format!("{name} handler: {e}"),
        })
    };
    let mut sigterm = stop_signal(tokio::signal::unix::SignalKind::terminate(), "SIGTERM")?;
    let mut sigint = stop_signal(tokio::signal::unix::SignalKind::interrupt(), "SIGINT")?;
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
    // With OTEL_EXPORTER_OTLP_ENDPOINT set, the hops of sampled traces are exported as spans.
    let (bus, telemetry) = match nanobot_telemetry::from_env(&plan.fleet, &plan.name) {
        Ok(Some(t)) => (bus.with_spans(t.spans.clone()), Some(t)),
        Ok(None) => (bus, None),
        Err(e) => {
            return Err(NodeError::Start {
                node: plan.name.clone(),
                reason: e.to_string(),
            })
        }
    };
    // The actors' Stats (published once a second) feed the exported metrics.
    let _stats_feed = match &telemetry {
        Some(t) => {
            let board = t.stats.clone();
            let key = topics::node_actor(&plan.fleet, &plan.name, "*");
            Some(
                bus.subscribe_callback::<Stats>(&key, move |r| board.update(&r.msg))
                    .await?,
            )
        }
        None => None,
    };
    tracing::info!(node = %plan.name, fleet = %plan.fleet, zenoh = %plan.bus.describe(), actors = plan.actors.len(), "node starting");
    let failure = Arc::new(Mutex::new(None));
    let node = plan.name.clone();
    let args = SupervisorArgs {
        bus: bus.clone(),
        plan,
        kinds,
        failure: failure.clone(),
    };
    let (sup, handle) = Actor::spawn(None, NodeSupervisor, args)
        .await
        .map_err(|e| NodeError::Start {
            node: node.clone(),
            reason: e.to_string(),
        })?;
    let mut handle = handle;
    tokio::select! {
        _ = sigint.recv() => tracing::info!(node = %node, "SIGINT: stopping"),
        _ = sigterm.recv() => tracing::info!(node = %node, "SIGTERM: stopping"),
        _ = &mut handle => {}
    }
    if !handle.is_finished() {
        let _ = ractor::call_t!(sup, SupervisorMsg::Shutdown, 30_000);
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut handle).await;
    }
    bus.close().await;
    if let Some(t) = telemetry {
        // What is queued is exported before the node exits (the exporters time out on their own).
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    let failed = failure.lock().unwrap_or_else(|e| e.into_inner()).take();
    match failed {
        Some(reason) => Err(NodeError::GaveUp { node, reason }),
        None => {
            tracing::info!(node = %node, "node stopped");
            Ok(())
        }
    }
}
