//! How the engineer tools reach a fleet: endpoints from flags, a launch file, or the default.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use nanobot_actors::bus::{Bus, BusConfig, Mode};
use nanobot_actors::{launch, registry};

/// Where the fleet is.
pub const DEFAULT_ENDPOINT: &str = "tcp/127.0.0.1:7447";

#[derive(Args, Clone, Debug, Default)]
pub struct ConnectArgs {
    /// Endpoint of a node or router to connect to (repeatable). Default: $NANOBOT_CONNECT, or
    /// the nodes of --launch, or tcp/127.0.0.1:7447.
    #[arg(long = "connect", short = 'e')]
    pub connect: Vec<String>,
    /// Take the endpoints (and the fleet name) from this launch file.
    #[arg(long)]
    pub launch: Option<PathBuf>,
    /// Fleet name (key prefix).
    #[arg(long)]
    pub fleet: Option<String>,
    /// Join as a peer instead of as a client. A client reaches everything through the node
    /// or router it connects to; a peer that does not listen only sees what its direct
    /// neighbours publish.
    #[arg(long)]
    pub peer: bool,
    /// Turn multicast scouting on (off by default).
    #[arg(long)]
    pub scout: bool,
    /// A Zenoh JSON5 config file.
    #[arg(long)]
    pub zenoh_config: Option<PathBuf>,
    /// Seconds to wait for a peer to answer.
    #[arg(long, default_value_t = 3.0)]
    pub connect_timeout: f64,
}

impl ConnectArgs {
    /// The bus config and fleet name these flags ask for.
    pub fn resolve(&self) -> anyhow::Result<(BusConfig, String)> {
        let mut connect = self.connect.clone();
        let mut fleet = self.fleet.clone();
        if let Some(path) = &self.launch {
            let lf = launch::load(path, &registry::names()).map_err(anyhow::Error::msg)?;
            fleet.get_or_insert(lf.fleet.clone());
            if connect.is_empty() {
                for node in &lf.nodes {
                    connect.extend(node.bus.listen.iter().map(|e| e.replace("0.0.0.0", "127.0.0.1")));
                    connect.extend(node.bus.connect.iter().cloned());
                }
                connect.sort();
                connect.dedup();
            }
        }
        if connect.is_empty() && !self.scout && self.zenoh_config.is_none() {
            match std::env::var("NANOBOT_CONNECT") {
                Ok(v) if !v.trim().is_empty() => connect.extend(v.split(',').map(|s| s.trim().to_string())),
                _ => connect.push(DEFAULT_ENDPOINT.to_string()),
            }
        }
        let cfg = BusConfig {
            mode: if self.peer { Mode::Peer } else { Mode::Client },
            listen: Vec::new(),
            connect,
            multicast_scouting: self.scout,
            config_file: self.zenoh_config.clone(),
            // A node that is still starting gets the whole timeout to answer.
            connect_timeout_ms: Some((self.connect_timeout * 1000.0) as i64),
            ..BusConfig::default()
        };
        Ok((
            cfg,
            fleet.unwrap_or_else(|| nanobot_messages::topics::DEFAULT_FLEET.to_string()),
        ))
    }

    /// Open a session and wait until some peer or router answers; fail with a clear message.
    pub async fn open(&self) -> anyhow::Result<Bus> {
        let (cfg, fleet) = self.resolve()?;
        let unreachable = || {
            format!(
                "no Zenoh peer or router answered within {:.1}s at [{}]. Is the fleet running \
                 (`nanobot launch launch/sim.toml`)? Point at it with --connect ENDPOINT or --launch FILE.",
                self.connect_timeout,
                cfg.connect.join(", ")
            )
        };
        let bus = match Bus::open(&cfg, &fleet).await {
            Ok(bus) => bus,
            // A client fails at once when no endpoint answers.
            Err(e @ nanobot_actors::bus::BusError::Open { .. }) if cfg.mode == Mode::Client => {
                tracing::debug!(error = %e, "client could not connect");
                bail!(unreachable())
            }
            Err(e) => return Err(e).context("opening the Zenoh session"),
        };
        let deadline = Instant::now() + Duration::from_secs_f64(self.connect_timeout);
        loop {
            if connected_count(&bus).await > 0 {
                return Ok(bus);
            }
            if Instant::now() >= deadline {
                bail!(unreachable());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Open a peer session without waiting for anyone: for a tool that others connect to
    /// (`nanobot record --peer` with listen endpoints in its Zenoh config).
    pub async fn open_peer(&self) -> anyhow::Result<Bus> {
        let (cfg, fleet) = self.resolve()?;
        Bus::open(&cfg, &fleet).await.context("opening the Zenoh session")
    }
}

/// Peers plus routers this session is connected to.
pub async fn connected_count(bus: &Bus) -> usize {
    let info = bus.session().info();
    info.peers_zid().await.count() + info.routers_zid().await.count()
}
