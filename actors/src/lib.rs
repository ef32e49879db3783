//! NanoBot actors and their runtime: the Zenoh bus wrapper, launch files, the node supervisor,
//! and one module per actor. Actors talk only through the bus, so any of them can run on the
//! robot, on a training node, or all in one process.

pub mod bus;
pub mod expert;
pub mod ingest;
pub mod launch;
pub mod logger;
pub mod node;
pub mod policy;
pub mod sim_robot;

/// The actor types this build provides (the `type` of a launch file's `[[node.actor]]`).
pub const ACTOR_KINDS: &[&str] = &["sim_robot", "expert", "ingest", "logger", "policy"];
