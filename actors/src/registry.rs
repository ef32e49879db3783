//! The actor types this build provides, listed once: the launch-file `type` names, the error
//! message for an unknown type, and the node runtime all read this table. A new actor is one
//! module and one line here.

use crate::runtime::ActorKind;

pub const ACTORS: &[ActorKind] = &[
    ActorKind::of::<crate::sim_robot::SimRobot>(),
    ActorKind::of::<crate::expert::Expert>(),
    ActorKind::of::<crate::ingest::Ingest>(),
    ActorKind::of::<crate::logger::Logger>(),
    ActorKind::of::<crate::policy::PolicyActor>(),
    ActorKind::of::<crate::promoter::Promoter>(),
    ActorKind::of::<crate::replay::Replay>(),
    ActorKind::of::<crate::spool::Spool>(),
    ActorKind::of::<crate::stats_echo::StatsEcho>(),
    ActorKind::of::<crate::trainer::TrainerActor>(),
];

/// The launch-file names of every actor type.
pub fn names() -> Vec<&'static str> {
    ACTORS.iter().map(|k| k.name).collect()
}
