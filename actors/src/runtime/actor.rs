//! The actor trait, and the one ractor `Actor` that hosts any implementation of it.
//!
//! An actor is its own state: a struct built by `start` from its typed config, changed by
//! `handle` for each input (an event its sources sent, or a tick), asked for its `metrics` once
//! a second, and given a `stop` to flush. Everything else — parsing the config, announcing the
//! actor on the bus (liveliness token), publishing its Stats, restarts — is done once, here and
//! in the supervisor, for every actor.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nanobot_messages::{topics, Metric, Stats};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef};
use serde::de::DeserializeOwned;

use super::context::{ActorError, Ctx, Placement};
use crate::access::Grants;
use crate::bus::{PubQos, Publisher};

/// What an actor is handed.
#[derive(Debug)]
pub enum Input<E> {
    /// An event one of the actor's sources sent (`Ctx::sender`, an input's wake-up).
    Event(E),
    /// The period set with `Ctx::every` elapsed.
    Tick,
}

/// Named values an actor reports in its Stats (beside handled / errors / dropped).
#[derive(Default)]
pub struct Metrics(pub(crate) Vec<Metric>);

impl Metrics {
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<f64>) {
        self.0.push(Metric {
            name: name.into(),
            value: value.into(),
        });
    }
}

/// A NanoBot actor (in the spirit of copper-rs's tasks and dora's node event loop).
pub trait NodeActor: Sized + Send + Sync + 'static {
    /// Its `type` in launch files.
    const KIND: &'static str;
    /// Its config: the launch file's config file with its `set` overrides, checked against
    /// this type (an `inputs` table, if any, is the runtime's: see `Ctx::subscribe`).
    type Config: DeserializeOwned + Send + 'static;
    /// What its sources send it.
    type Event: Send + 'static;

    /// Open its inputs and outputs and build its state.
    fn start(ctx: &Ctx<Self>, cfg: Self::Config) -> impl Future<Output = Result<Self, ActorError>> + Send;

    /// One input. An error is a failure of the actor: the supervisor restarts it. Problems
    /// with one message are counted (`ctx.counters`) and logged instead.
    fn handle(
        &mut self,
        ctx: &Ctx<Self>,
        input: Input<Self::Event>,
    ) -> impl Future<Output = Result<(), ActorError>> + Send;

    /// Its own figures for the once-a-second Stats.
    fn metrics(&self, _m: &mut Metrics) {}

    /// A clean stop (node shutdown): flush what must survive.
    fn stop(&mut self, _ctx: &Ctx<Self>) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// What it sends on the bus beyond its Stats and liveliness (the runtime's), for the access
    /// control a secured fleet generates from its launch file: `robots` are the robots this
    /// instance serves (its own, or every robot of the fleet for a fleet-wide instance). An
    /// actor that declares nothing may only subscribe.
    fn grants(_fleet: &str, _robots: &[String]) -> Grants {
        Grants::default()
    }
}

/// The ractor actor that hosts a [`NodeActor`].
pub struct Hosted<A>(std::marker::PhantomData<fn() -> A>);

/// The messages of a hosted actor's mailbox.
pub enum RuntimeMsg<E> {
    Input(Input<E>),
    PublishStats,
}

pub struct HostedState<A: NodeActor> {
    actor: A,
    ctx: Ctx<A>,
    stats: Publisher<Stats>,
    _token: zenoh::liveliness::LivelinessToken,
    started: Instant,
}

impl<A: NodeActor> HostedState<A> {
    async fn publish_stats(&self) {
        let c = &self.ctx.counters;
        let mut m = Metrics::default();
        let mut input_drops = 0;
        for (name, s) in self.ctx.inputs() {
            let dropped = s.dropped();
            input_drops += dropped;
            m.set(
                format!("inputs.{name}.received"),
                s.received.load(Ordering::Relaxed) as f64,
            );
            m.set(format!("inputs.{name}.dropped"), dropped as f64);
            m.set(format!("inputs.{name}.queue"), s.queue.load(Ordering::Relaxed) as f64);
        }
        self.actor.metrics(&mut m);
        let stats = Stats {
            node: self.ctx.node.clone(),
            actor: self.ctx.name().to_string(),
            restarts: self.ctx.restarts,
            handled: c.handled.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed) + input_drops,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            extra: m.0,
        };
        if let Err(e) = self.stats.put(&stats).await {
            tracing::debug!(error = %e, "stats not published");
        }
    }
}

impl<A: NodeActor> Actor for Hosted<A> {
    type Msg = RuntimeMsg<A::Event>;
    type State = HostedState<A>;
    type Arguments = Placement;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        place: Placement,
    ) -> Result<HostedState<A>, ActorProcessingErr> {
        let (ctx, cfg) = Ctx::<A>::new(place, myself.clone())?;
        let actor = A::start(&ctx, cfg).await?;
        // Announced once started: a tool that sees the token can rely on the actor's inputs.
        let token = ctx
            .bus
            .liveliness_token(&ctx.node, ctx.name())
            .await
            .map_err(ctx.bus_err())?;
        let key = topics::node_actor(ctx.fleet(), &ctx.node, ctx.name());
        let robot = ctx.spec.robot.clone().unwrap_or_default();
        let stats = ctx
            .bus
            .publisher::<Stats>(&key, &robot, PubQos::Control)
            .await
            .map_err(ctx.bus_err())?;
        myself.send_interval(Duration::from_secs(1), || RuntimeMsg::PublishStats);
        Ok(HostedState {
            actor,
            ctx,
            stats,
            _token: token,
            started: Instant::now(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        s: &mut HostedState<A>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RuntimeMsg::Input(input) => s.actor.handle(&s.ctx, input).await?,
            RuntimeMsg::PublishStats => s.publish_stats().await,
        }
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, s: &mut HostedState<A>) -> Result<(), ActorProcessingErr> {
        s.actor.stop(&s.ctx).await;
        Ok(())
    }
}

type SpawnFuture = Pin<Box<dyn Future<Output = Result<ActorCell, ActorProcessingErr>> + Send>>;

/// One actor type a build provides: its launch-file name and how to start it.
#[derive(Clone, Copy)]
pub struct ActorKind {
    pub name: &'static str,
    spawn: fn(Placement, ActorCell) -> SpawnFuture,
    /// [`NodeActor::grants`].
    pub grants: fn(&str, &[String]) -> Grants,
}

impl ActorKind {
    /// The entry for `A` (one line of the registry).
    pub const fn of<A: NodeActor>() -> ActorKind {
        ActorKind {
            name: A::KIND,
            spawn: spawn_hosted::<A>,
            grants: A::grants,
        }
    }

    /// Start one instance, linked to `supervisor`.
    pub async fn spawn(&self, place: Placement, supervisor: ActorCell) -> Result<ActorCell, ActorProcessingErr> {
        (self.spawn)(place, supervisor).await
    }
}

fn spawn_hosted<A: NodeActor>(place: Placement, sup: ActorCell) -> SpawnFuture {
    Box::pin(async move {
        let (r, _) = Actor::spawn_linked(None, Hosted::<A>(std::marker::PhantomData), place, sup).await?;
        Ok(r.get_cell())
    })
}
