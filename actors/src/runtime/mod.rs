//! The node runtime: the actor trait ([`NodeActor`]) and the one ractor actor that hosts any
//! implementation of it (config, liveliness, Stats once a second), the context an actor gets
//! ([`Ctx`]: bus, inputs whose queueing is configuration, ticks, events), and the supervisor
//! that starts a node's actors and restarts them per the launch file's policy.
//!
//! The runtime names no actor: the actor types a build provides come from `crate::registry`.

mod actor;
mod context;
mod services;
mod supervisor;
mod worker;

pub use actor::{ActorKind, Input, Metrics, NodeActor};
pub use context::{ActorError, Counters, Ctx, EventSender, Placement};
pub use services::NodeServices;
pub use supervisor::{run_node, NodeError};
pub use worker::{lower_priority, AbortOnDrop, Worker};
