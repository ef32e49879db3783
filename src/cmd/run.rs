//! `nanobot run --launch FILE --node N`: one node of a launch file in this process.

use nanobot_actors::{launch, registry, runtime};

/// Exit codes of `nanobot run`: 2 for a bad launch file or actor config (restarting will not
/// help), 3 when an actor exhausted its restart policy, 1 for anything else.
pub fn run_node(file: &std::path::Path, name: &str) -> anyhow::Result<u8> {
    let lf = match launch::load(file, &registry::names()) {
        Ok(lf) => lf,
        Err(e) => {
            eprintln!("nanobot: error: {e}");
            return Ok(2);
        }
    };
    let Some(plan) = lf.node(name).cloned() else {
        let known: Vec<_> = lf.nodes.iter().map(|n| n.name.as_str()).collect();
        eprintln!(
            "nanobot: error: {}: no node named {name:?} (nodes: {})",
            file.display(),
            known.join(", ")
        );
        return Ok(2);
    };
    if let Err(e) = crate::cmd::keys::prepare_security(&lf, &[name.to_string()]) {
        eprintln!("nanobot: error: {e:#}");
        return Ok(2);
    }
    let rt = crate::runtime()?;
    match rt.block_on(runtime::run_node(plan, registry::ACTORS)) {
        Ok(()) => Ok(0),
        Err(e @ runtime::NodeError::Start { .. }) => {
            eprintln!("nanobot: error: {e}");
            Ok(2)
        }
        Err(e @ runtime::NodeError::GaveUp { .. }) => {
            eprintln!("nanobot: error: {e}");
            Ok(3)
        }
        Err(e) => Err(e.into()),
    }
}
