//! `nanobot foxglove`: the fleet's live topics for Foxglove, over its WebSocket protocol.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use nanobot_foxglove::BridgeOptions;

use crate::conn::ConnectArgs;

#[derive(Args)]
pub struct FoxgloveArgs {
    /// Key expressions to bridge (default: `{fleet}/**`).
    keyexprs: Vec<String>,
    /// Address of the WebSocket server: loopback only (Foxglove's WebSocket protocol has no
    /// authentication; reach it from another machine through an SSH tunnel).
    #[arg(long, default_value = "127.0.0.1:8765")]
    listen: String,
    /// Stop after this many seconds (default: at SIGINT or SIGTERM).
    #[arg(long)]
    duration: Option<f64>,
    #[command(flatten)]
    conn: ConnectArgs,
}

pub async fn foxglove(args: FoxgloveArgs) -> anyhow::Result<u8> {
    let (host, port) = args
        .listen
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']).to_string(), p.parse::<u16>().ok()?)))
        .with_context(|| format!("--listen {}: expected HOST:PORT", args.listen))?;
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    anyhow::ensure!(
        loopback,
        "--listen {}: the Foxglove bridge has no authentication, so it listens on loopback only; \
         from another machine, tunnel to it (ssh -L {port}:127.0.0.1:{port} HOST)",
        args.listen
    );
    let (_, fleet) = args.conn.resolve()?;
    let keys = if args.keyexprs.is_empty() {
        vec![format!("{fleet}/**")]
    } else {
        args.keyexprs.clone()
    };
    let bus = args.conn.open().await?;
    let opts = BridgeOptions {
        host: host.clone(),
        port,
        ..BridgeOptions::default()
    };
    let bridge = nanobot_foxglove::start(bus.session(), &keys, &opts).await?;
    eprintln!(
        "Foxglove bridge for {} on ws://{host}:{}: in Foxglove, Open connection → Foxglove WebSocket",
        keys.join(" "),
        bridge.port()
    );
    crate::cmd::record::interrupted(args.duration).await;
    let s = bridge.stop().await;
    eprintln!(
        "bridged {} of {} messages to clients on {} channels; {} not NanoBot messages, {} dropped",
        s.sent, s.received, s.channels, s.not_nanobot, s.dropped
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(0)
}
