//! `nanobot doctor`: config, endpoints, who is connected, which nodes announced themselves, and
//! whether data flows ("connected but no data" when only the actors' own Stats move: exit 1).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nanobot_actors::bus::payload_bytes;
use nanobot_messages::{codec, topics};

use crate::conn::ConnectArgs;
use nanobot_actors::{access, launch, registry};

/// Whether an endpoint is reachable from this host only (loopback or a unix socket).
pub fn loopback_only(endpoint: &str) -> bool {
    let Some((proto, addr)) = endpoint.split_once('/') else {
        return false;
    };
    if proto.starts_with("unixsock") {
        return true;
    }
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Who may do what on the fleet, and every node that listens beyond loopback without TLS.
fn security_report(lf: &launch::LaunchFile) {
    for node in &lf.nodes {
        for e in node
            .bus
            .listen
            .iter()
            .filter(|e| !loopback_only(e) && !e.starts_with("tls/"))
        {
            println!(
                "WARN      node {} listens on {e} beyond loopback without TLS: anyone who reaches it can steer the \
                 fleet; add a [security] table (docs/security.md)",
                node.name
            );
        }
    }
    match &lf.security {
        Some(s) => {
            println!(
                "ok        secured: TLS with mutual authentication (certificates in {}), access control default deny",
                nanobot_actors::pki::tls_dir(&s.keys).display()
            );
            for line in access::describe(&s.rights).lines() {
                println!("access    {}", line.trim_start());
            }
        }
        None => println!("note      not secured: no [security] table, so anyone who reaches a node's port is trusted"),
    }
}

pub async fn doctor(conn: ConnectArgs) -> anyhow::Result<u8> {
    let (cfg, fleet) = conn.resolve()?;
    println!("config    fleet={fleet} {}", cfg.describe());
    if let Some(path) = &conn.launch {
        let lf = launch::load(path, &registry::names()).map_err(anyhow::Error::msg)?;
        security_report(&lf);
    }
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
