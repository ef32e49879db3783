//! `nanobot node list`: every live actor of a running fleet, from liveliness tokens, with its
//! latest Stats.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use nanobot_actors::bus::payload_bytes;
use nanobot_messages::{codec, topics, Stats};

use crate::conn::{connected_count, ConnectArgs};

#[derive(Subcommand)]
pub enum NodeCmd {
    /// Every live actor, from liveliness tokens, with its latest stats.
    List {
        /// Seconds to collect stats for.
        #[arg(long, default_value_t = 1.5)]
        wait: f64,
        #[command(flatten)]
        conn: ConnectArgs,
    },
}

/// Latest Stats per (node, actor), collected for `wait`.
pub(crate) async fn collect_stats(
    bus: &nanobot_actors::bus::Bus,
    wait: Duration,
) -> anyhow::Result<BTreeMap<(String, String), Stats>> {
    let found: Arc<Mutex<BTreeMap<(String, String), Stats>>> = Arc::default();
    let f = found.clone();
    let key = topics::all_actors(bus.fleet());
    let _sub = bus
        .session()
        .declare_subscriber(key.clone())
        .callback(move |sample| {
            if let Ok((_, s)) = codec::decode::<Stats>(payload_bytes(sample.payload())) {
                f.lock().unwrap().insert((s.node.clone(), s.actor.clone()), s);
            }
        })
        .await
        .map_err(|e| anyhow::anyhow!("subscribing to {key}: {e}"))?;
    tokio::time::sleep(wait).await;
    let map = found.lock().unwrap().clone();
    Ok(map)
}

pub async fn node_cmd(cmd: NodeCmd) -> anyhow::Result<u8> {
    match cmd {
        NodeCmd::List { wait, conn } => {
            let bus = conn.open().await?;
            let stats = collect_stats(&bus, Duration::from_secs_f64(wait));
            let live = bus.live_actors(Duration::from_secs(2));
            let (stats, live) = tokio::join!(stats, live);
            let (stats, live) = (stats?, live?);
            if live.is_empty() {
                bail!(
                    "connected to {} Zenoh node(s), but no actor announced itself on {}",
                    connected_count(&bus).await,
                    topics::all_actors(bus.fleet())
                );
            }
            println!(
                "{:<12} {:<24} {:>10} {:>7} {:>8} {:>8} {:>9}",
                "NODE", "ACTOR", "HANDLED", "ERRORS", "DROPPED", "RESTARTS", "UPTIME s"
            );
            for (node, actor) in &live {
                match stats.get(&(node.clone(), actor.clone())) {
                    Some(s) => println!(
                        "{node:<12} {actor:<24} {:>10} {:>7} {:>8} {:>8} {:>9.1}",
                        s.handled,
                        s.errors,
                        s.dropped,
                        s.restarts,
                        s.uptime_ms as f64 / 1e3
                    ),
                    None => println!("{node:<12} {actor:<24} {:>10}", "-"),
                }
            }
            Ok(0)
        }
    }
}
