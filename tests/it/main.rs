//! The integration tests: real processes, real Zenoh sessions on loopback (multicast scouting
//! off, a fresh port each), real files. One test binary for all of them, so that the build links
//! the dependency tree once instead of once per file; `cargo test --test it fleet` runs one
//! module's tests.

mod common;

mod closed_loop;
mod crash;
mod dashboard;
mod fleet;
mod foxglove;
mod gates;
mod hardening;
mod learning;
mod logging;
mod overload;
mod policy_cli;
mod promotion;
mod python_interop;
mod record;
mod router;
mod runtime;
mod schema_python;
mod secured;
mod telemetry;
mod tune;
mod vision;
