//! What an actor is given: where it runs (bus, node, its launch-file entry), its counters, and
//! the means to open inputs whose queueing is configuration, send itself events, and tick.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nanobot_messages::Message;
use ractor::ActorRef;
use serde::Deserialize as _;
use thiserror::Error;

use super::actor::{Input, NodeActor, RuntimeMsg};
use crate::bus::{inbox, Bus, BusError, Feeder, Inbox, InboxStats, Keep, PubQos, Publisher, RawSample, Received};
use crate::launch::ActorSpec;

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
    #[error("actor {actor}: {reason}")]
    Failed { actor: String, reason: String },
}

/// Where one actor instance runs: the node's bus, the node, its launch-file entry, and how
/// often it was restarted.
#[derive(Clone)]
pub struct Placement {
    pub bus: Bus,
    pub node: String,
    pub spec: ActorSpec,
    pub restarts: u32,
    /// What the node's actors share.
    pub services: super::NodeServices,
}

/// The counters every actor's Stats carry.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages (or ticks) handled successfully.
    pub handled: AtomicU64,
    /// Messages that could not be handled (bad input, a failed publish, ...).
    pub errors: AtomicU64,
    /// Messages dropped by the actor itself (its inputs' drops are added by the runtime).
    pub dropped: AtomicU64,
}

/// Sends events to an actor from its sources (callbacks, reader threads).
pub struct EventSender<E> {
    me: ActorRef<RuntimeMsg<E>>,
}

impl<E> Clone for EventSender<E> {
    fn clone(&self) -> Self {
        EventSender { me: self.me.clone() }
    }
}

impl<E: Send + 'static> EventSender<E> {
    /// False once the actor has stopped.
    pub fn send(&self, e: E) -> bool {
        self.me.cast(RuntimeMsg::Input(Input::Event(e))).is_ok()
    }
}

/// An actor's context.
pub struct Ctx<A: NodeActor> {
    pub bus: Bus,
    pub node: String,
    pub spec: ActorSpec,
    pub restarts: u32,
    /// What the node's actors share.
    pub services: super::NodeServices,
    pub counters: Counters,
    input_cfg: BTreeMap<String, Keep>,
    inputs: Mutex<Vec<(String, Arc<InboxStats>)>>,
    me: ActorRef<RuntimeMsg<A::Event>>,
}

impl<A: NodeActor> Ctx<A> {
    /// The context and the actor's typed config (the `inputs` table taken out for the runtime).
    pub(crate) fn new(place: Placement, me: ActorRef<RuntimeMsg<A::Event>>) -> Result<(Ctx<A>, A::Config), ActorError> {
        let mut table = place.spec.config.clone();
        let inputs = table.remove("inputs");
        let mut ctx = Ctx {
            bus: place.bus,
            node: place.node,
            spec: place.spec,
            restarts: place.restarts,
            services: place.services,
            counters: Counters::default(),
            input_cfg: BTreeMap::new(),
            inputs: Mutex::new(Vec::new()),
            me,
        };
        if let Some(inputs) = inputs {
            ctx.input_cfg = BTreeMap::<String, Keep>::deserialize(inputs).map_err(|e| {
                ctx.config_error(format!(
                    "inputs: {e} (each input: {{ keep = \"latest\" }} or {{ keep = \"all\", queue = N }})"
                ))
            })?;
        }
        let cfg = A::Config::deserialize(toml::Value::Table(table)).map_err(|e| ctx.config_error(e.to_string()))?;
        Ok((ctx, cfg))
    }

    pub fn fleet(&self) -> &str {
        self.bus.fleet()
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn config_error(&self, reason: impl Into<String>) -> ActorError {
        ActorError::Config {
            actor: self.spec.name.clone(),
            origin: self.spec.origin.clone(),
            reason: reason.into(),
        }
    }

    pub fn failed(&self, reason: impl Into<String>) -> ActorError {
        ActorError::Failed {
            actor: self.spec.name.clone(),
            reason: reason.into(),
        }
    }

    /// A path from this actor's config, with the instance's placeholders expanded: `{fleet}`,
    /// `{node}` and, for an instance that serves one robot, `{robot}` (for example a logger's
    /// `root = "data/{fleet}/{robot}"`). The one expansion every actor's paths go through.
    pub fn path(&self, template: &str) -> PathBuf {
        let mut s = template.replace("{fleet}", self.fleet()).replace("{node}", &self.node);
        if let Some(robot) = &self.spec.robot {
            s = s.replace("{robot}", robot);
        }
        PathBuf::from(s)
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

    /// A typed publisher on `key`, stamping `robot` in every envelope.
    pub async fn publisher<T: Message>(&self, key: &str, robot: &str, qos: PubQos) -> Result<Publisher<T>, ActorError> {
        self.bus.publisher(key, robot, qos).await.map_err(self.bus_err())
    }

    /// Send events to this actor from a source.
    pub fn sender(&self) -> EventSender<A::Event> {
        EventSender { me: self.me.clone() }
    }

    /// Hand the actor `Input::Tick` every `period`.
    pub fn every(&self, period: Duration) {
        self.me.send_interval(period, || RuntimeMsg::Input(Input::Tick));
    }

    /// What input `name` keeps: the config's `inputs.NAME`, else `default`.
    pub fn keep(&self, name: &str, default: Keep) -> Keep {
        self.input_cfg.get(name).copied().unwrap_or(default)
    }

    fn waker(&self, wake: Option<fn() -> A::Event>) -> impl Fn() + Send + Sync + 'static {
        let sender = self.sender();
        move || {
            if let Some(ev) = wake {
                sender.send(ev());
            }
        }
    }

    fn register(&self, name: &str, stats: Arc<InboxStats>) {
        self.inputs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.to_string(), stats));
    }

    pub(crate) fn inputs(&self) -> Vec<(String, Arc<InboxStats>)> {
        self.inputs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Input `name`: a typed subscription to `key`, keeping what the config says (else
    /// `default`). With `wake`, the actor gets that event when a message arrives into an empty
    /// inbox; without, it takes messages when it likes (on a tick). Its counts go into Stats.
    pub async fn subscribe<T: Message>(
        &self,
        name: &str,
        key: &str,
        default: Keep,
        wake: Option<fn() -> A::Event>,
    ) -> Result<Inbox<Received<T>>, ActorError> {
        let keep = self.keep(name, default);
        let inbox = self
            .bus
            .subscribe::<T>(key, keep, self.waker(wake))
            .await
            .map_err(self.bus_err())?;
        self.register(name, inbox.stats().clone());
        tracing::debug!(actor = %self.name(), input = name, key, keep = %keep.describe(), "input open");
        Ok(inbox)
    }

    /// Like [`Ctx::subscribe`], payloads left undecoded.
    pub async fn subscribe_raw(
        &self,
        name: &str,
        key: &str,
        default: Keep,
        wake: Option<fn() -> A::Event>,
    ) -> Result<Inbox<RawSample>, ActorError> {
        let keep = self.keep(name, default);
        let inbox = self
            .bus
            .subscribe_raw(key, keep, self.waker(wake))
            .await
            .map_err(self.bus_err())?;
        self.register(name, inbox.stats().clone());
        Ok(inbox)
    }

    /// Input `name` fed by a source of the actor's own (a socket, a serial port): a bounded
    /// inbox the source pushes into without blocking.
    pub fn input<T: Send + 'static>(
        &self,
        name: &str,
        default: Keep,
        wake: Option<fn() -> A::Event>,
    ) -> (Feeder<T>, Inbox<T>) {
        let (feeder, inbox) = inbox::inbox(self.keep(name, default), self.waker(wake));
        self.register(name, inbox.stats().clone());
        (feeder, inbox)
    }
}
