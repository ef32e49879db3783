//! `nanobot dashboard`: the fleet in a browser (see the `nanobot-dashboard` crate).

use std::net::SocketAddr;

use anyhow::Context;
use clap::Args;
use nanobot_dashboard::DashboardOptions;

use crate::conn::ConnectArgs;

#[derive(Args)]
pub struct DashboardArgs {
    /// Address to serve on. Beyond loopback a token is required.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Bearer token every request must carry (`Authorization: Bearer T`; the page asks for it
    /// once and keeps it in an HttpOnly cookie). Default: $NANOBOT_DASHBOARD_TOKEN.
    #[arg(long)]
    token: Option<String>,
    /// Stop after this many seconds (default: at SIGINT or SIGTERM).
    #[arg(long)]
    duration: Option<f64>,
    #[command(flatten)]
    conn: ConnectArgs,
}

pub async fn dashboard(args: DashboardArgs) -> anyhow::Result<u8> {
    let token = args
        .token
        .or_else(|| std::env::var("NANOBOT_DASHBOARD_TOKEN").ok())
        .filter(|t| !t.is_empty());
    let opts = DashboardOptions {
        listen: args.listen,
        token,
        ..DashboardOptions::default()
    };
    if !opts.listen.ip().is_loopback() && opts.token.is_none() {
        // Refused before connecting anywhere.
        return Err(nanobot_dashboard::DashboardError::NeedsToken(opts.listen).into());
    }
    let mut conn = args.conn;
    // The ledger comes from the promoter, which a secured fleet answers only on its own node.
    conn.near_actor = Some("promoter");
    let bus = conn.open().await?;
    let d = nanobot_dashboard::start(bus.session(), bus.fleet(), &opts)
        .await
        .context("starting the dashboard")?;
    let with_token = if opts.token.is_some() { "/?token=…" } else { "/" };
    eprintln!("dashboard of fleet {} on http://{}{with_token}", bus.fleet(), d.addr());
    crate::cmd::record::interrupted(args.duration).await;
    d.stop();
    Ok(0)
}
