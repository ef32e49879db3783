//! `nanobot node list` and `nanobot doctor`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
async fn collect_stats(
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

pub async fn doctor(conn: ConnectArgs) -> anyhow::Result<u8> {
    let (cfg, fleet) = conn.resolve()?;
    println!("config    fleet={fleet} {}", cfg.describe());
    let bus = match conn.open().await {
        Ok(b) => b,
        Err(e) => {
            println!("FAIL      {e:#}");
            return Ok(1);
        }
    };
    let info = bus.session().info();
    println!("session   zid {}", info.zid().await);
    let peers: Vec<String> = info.peers_zid().await.map(|z| z.to_string()).collect();
    let routers: Vec<String> = info.routers_zid().await.map(|z| z.to_string()).collect();
    println!(
        "ok        connected to {} Zenoh node(s) [{}] and {} router(s) [{}]",
        peers.len(),
        peers.join(", "),
        routers.len(),
        routers.join(", ")
    );

    let live = bus.live_actors(Duration::from_secs(2)).await?;
    let mut nodes: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (n, a) in &live {
        nodes.entry(n).or_default().push(a);
    }
    if live.is_empty() {
        println!(
            "WARN      no actor announced itself on {} (wrong --fleet?)",
            topics::all_actors(&fleet)
        );
    }
    for (n, actors) in &nodes {
        println!("ok        node {n}: {} actor(s): {}", actors.len(), actors.join(", "));
    }

    // Data flow: count messages per key for two seconds, and how many do not decode.
    let counts: Arc<Mutex<BTreeMap<String, (u64, u64)>>> = Arc::default();
    let c = counts.clone();
    let key = format!("{fleet}/**");
    let _sub = bus
        .session()
        .declare_subscriber(key.clone())
        .callback(move |sample| {
            let bad = codec::decode_any(payload_bytes(sample.payload())).is_err() as u64;
            let mut m = c.lock().unwrap();
            let e = m.entry(sample.key_expr().as_str().to_string()).or_default();
            e.0 += 1;
            e.1 += bad;
        })
        .await
        .map_err(|e| anyhow::anyhow!("subscribing to {key}: {e}"))?;
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let secs = start.elapsed().as_secs_f64();
    let counts = counts.lock().unwrap().clone();
    let mut problems = 0;
    // Actors publish their Stats every second whatever else happens: data means the fleet's
    // own topics (telemetry, observations, actions, logs), not only those.
    let stats_prefix = format!("{fleet}/node/");
    let data: BTreeMap<&String, &(u64, u64)> = counts.iter().filter(|(k, _)| !k.starts_with(&stats_prefix)).collect();
    if data.is_empty() {
        let stats: u64 = counts.values().map(|v| v.0).sum();
        println!(
            "FAIL      connected but no data on {key} in {secs:.1}s (only {stats} actor stats message(s) on {stats_prefix}**)"
        );
        problems += 1;
    } else {
        let total: u64 = data.values().map(|v| v.0).sum();
        println!(
            "ok        data: {} key(s), {:.0} msg/s on {key} (besides actor stats)",
            data.len(),
            total as f64 / secs
        );
    }
    for (k, (n, bad)) in &counts {
        if *bad > 0 {
            println!(
                "WARN      {k}: {bad} of {n} messages are not NanoBot envelopes (schema {})",
                codec::SCHEMA_VERSION
            );
            problems += 1;
        }
    }
    Ok(if problems == 0 && !live.is_empty() { 0 } else { 1 })
}
