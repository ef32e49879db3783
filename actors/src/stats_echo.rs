//! `stats_echo`: the fleet's health in a node's log. It follows every actor's Stats
//! (`{fleet}/node/**`) and, every `period_s`, logs one line per actor whose errors or drops grew.
//! The smallest real actor, and the template for new ones.

use std::collections::BTreeMap;
use std::time::Duration;

use nanobot_messages::Stats;
use serde::Deserialize;

use crate::bus::{Inbox, Keep, Received};
use crate::runtime::{ActorError, Ctx, Input, Metrics, NodeActor};

/// Actors followed at most.
const MAX_ACTORS: usize = 4096;

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StatsEchoConfig {
    pub period_s: f64,
}

impl Default for StatsEchoConfig {
    fn default() -> Self {
        StatsEchoConfig { period_s: 5.0 }
    }
}

pub struct StatsEcho {
    stats: Inbox<Received<Stats>>,
    /// Per actor: (errors, dropped) as last reported in the log.
    seen: BTreeMap<String, (u64, u64)>,
}

impl NodeActor for StatsEcho {
    const KIND: &'static str = "stats_echo";
    type Config = StatsEchoConfig;
    type Event = ();

    async fn start(ctx: &Ctx<Self>, cfg: StatsEchoConfig) -> Result<Self, ActorError> {
        if cfg.period_s.is_nan() || cfg.period_s <= 0.0 {
            return Err(ctx.config_error("period_s must be positive"));
        }
        let key = format!("{}/node/**", ctx.fleet());
        let stats = ctx.subscribe("stats", &key, Keep::All { queue: 1024 }, None).await?;
        ctx.every(Duration::from_secs_f64(cfg.period_s));
        Ok(StatsEcho {
            stats,
            seen: BTreeMap::new(),
        })
    }

    async fn handle(&mut self, ctx: &Ctx<Self>, _tick: Input<()>) -> Result<(), ActorError> {
        while let Some(r) = self.stats.take() {
            let s = r.msg;
            let id = format!("{}/{}", s.node, s.actor);
            // Actor names come from the network: follow at most MAX_ACTORS of them.
            if !self.seen.contains_key(&id) && self.seen.len() >= MAX_ACTORS {
                continue;
            }
            let last = self.seen.insert(id.clone(), (s.errors, s.dropped)).unwrap_or_default();
            if (s.errors, s.dropped) != last {
                tracing::warn!(actor = %id, errors = s.errors, dropped = s.dropped, restarts = s.restarts, "actor reports errors or drops");
            }
            ctx.counters.handled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    fn metrics(&self, m: &mut Metrics) {
        m.set("actors_seen", self.seen.len() as f64);
    }
}
