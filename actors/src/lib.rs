//! NanoBot actors and their runtime: the Zenoh bus wrapper, launch files, the node runtime, and
//! one module per actor. Actors talk only through the bus, so any of them can run on the
//! robot, on a training node, or all in one process.
//!
//! Adding an actor: one module implementing [`runtime::NodeActor`] and one line in
//! [`registry::ACTORS`].

pub mod access;
pub mod bus;
pub mod launch;
pub mod pki;
pub mod registry;
pub mod runtime;
pub mod shadow;

pub mod expert;
pub mod ingest;
pub mod keys;
pub mod logger;
pub mod policy;
pub mod promoter;
pub mod replay;
pub mod sim_robot;
pub mod spool;
pub mod stats_echo;
pub mod trainer;
