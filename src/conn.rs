//! How the engineer tools reach a fleet: endpoints from flags, a launch file, or the default.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use nanobot_actors::bus::{Bus, BusConfig, Mode};
use nanobot_actors::{launch, pki, registry};

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
    /// Who to be on a secured fleet: the name of a certificate the fleet's authority signed,
    /// `engineer.NAME` (watch) or `operator.NAME` (also promote and roll back). Default:
    /// $NANOBOT_IDENTITY, else the first engineer (then operator) the launch file lists.
    #[arg(long)]
    pub identity: Option<String>,
    /// The fleet key directory whose tls/ holds the certificates. Default: $NANOBOT_KEYS_DIR,
    /// else the launch file's `[security] keys`, else state/{fleet}/keys.
    #[arg(long)]
    pub keys_dir: Option<PathBuf>,
    /// The identity a command uses when none is given (`ckpt promote` acts as its operator).
    #[arg(skip)]
    pub default_identity: Option<String>,
    /// Connect first to the node that runs this actor type (`ckpt` talks to the promoter's
    /// node: access control admits an operator's command only from the operator).
    #[arg(skip)]
    pub near_actor: Option<&'static str>,
}

impl ConnectArgs {
    /// The bus config and fleet name these flags ask for.
    pub fn resolve(&self) -> anyhow::Result<(BusConfig, String)> {
        let mut connect = self.connect.clone();
        let mut fleet = self.fleet.clone();
        let mut security = None;
        if let Some(path) = &self.launch {
            let lf = launch::load(path, &registry::names()).map_err(anyhow::Error::msg)?;
            fleet.get_or_insert(lf.fleet.clone());
            if connect.is_empty() {
                let near =
                    |n: &&launch::NodePlan| !self.near_actor.is_some_and(|k| n.actors.iter().any(|a| a.kind == k));
                let mut nodes: Vec<_> = lf.nodes.iter().collect();
                // Stable: the node that runs `near_actor` first, the rest in file order.
                nodes.sort_by_key(near);
                for node in nodes {
                    for e in node
                        .bus
                        .listen
                        .iter()
                        .map(|e| e.replace("0.0.0.0", "127.0.0.1"))
                        .chain(node.bus.connect.iter().cloned())
                    {
                        if !connect.contains(&e) {
                            connect.push(e);
                        }
                    }
                }
            }
            security = lf.security;
        }
        let fleet = fleet.unwrap_or_else(|| nanobot_messages::topics::DEFAULT_FLEET.to_string());
        let tls = self.tls(security.as_ref(), &fleet)?;
        if connect.is_empty() && !self.scout && self.zenoh_config.is_none() {
            match std::env::var("NANOBOT_CONNECT") {
                Ok(v) if !v.trim().is_empty() => connect.extend(v.split(',').map(|s| s.trim().to_string())),
                _ if tls.is_some() => connect.push(DEFAULT_ENDPOINT.replace("tcp/", "tls/")),
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
            tls,
            ..BusConfig::default()
        };
        Ok((cfg, fleet))
    }

    /// The certificate to connect with: on a secured fleet (its launch file says so), or when
    /// an identity or key directory is given.
    fn tls(&self, security: Option<&launch::Security>, fleet: &str) -> anyhow::Result<Option<pki::TlsFiles>> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let identity = self
            .identity
            .clone()
            .or_else(|| env("NANOBOT_IDENTITY"))
            .or_else(|| self.default_identity.clone())
            .or_else(|| {
                security.and_then(|s| {
                    (s.engineers.first().map(|n| format!("engineer.{n}")))
                        .or_else(|| s.operators.first().map(|n| format!("operator.{n}")))
                })
            });
        let keys_dir = self
            .keys_dir
            .clone()
            .or_else(|| env("NANOBOT_KEYS_DIR").map(PathBuf::from))
            .or_else(|| security.map(|s| s.keys.clone()));
        let mut keys_dir = keys_dir;
        let mut identity = identity;
        // A launch file says whether its fleet is secured (flags still ask for TLS); without
        // one, the environment may too.
        let explicit = self.identity.is_some()
            || self.keys_dir.is_some()
            || (self.launch.is_none() && (env("NANOBOT_IDENTITY").is_some() || env("NANOBOT_KEYS_DIR").is_some()));
        if security.is_none() && self.launch.is_some() && !explicit {
            return Ok(None);
        }
        if security.is_none() && !explicit {
            // No launch file and nothing said: a secured fleet started from this directory
            // (the main job) left its certificates here; a tool uses them unless told to
            // connect somewhere without TLS.
            let given: Vec<String> = if self.connect.is_empty() {
                env("NANOBOT_CONNECT").map_or(Vec::new(), |v| v.split(',').map(|e| e.trim().to_string()).collect())
            } else {
                self.connect.clone()
            };
            let told =
                self.zenoh_config.is_some() || (!given.is_empty() && !given.iter().any(|e| e.starts_with("tls/")));
            let dir = keys_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("state/{fleet}/keys")));
            match pki::discover(&dir) {
                Some((found, _)) if !told => {
                    identity.get_or_insert(found.to_string());
                    keys_dir = Some(dir);
                }
                _ => return Ok(None),
            }
        }
        let Some(identity) = identity else {
            bail!(
                "this fleet is secured: connect as someone it lists, with --identity engineer.NAME or operator.NAME \
                 (or $NANOBOT_IDENTITY)"
            );
        };
        let id: pki::Identity = identity.parse()?;
        let dir = keys_dir.unwrap_or_else(|| PathBuf::from(format!("state/{fleet}/keys")));
        let files = pki::files(&dir, &id);
        if let Some(missing) = files.missing() {
            bail!(
                "{id}'s certificate: {} does not exist (make it with `nanobot keys init {} --{} {}`, or give --keys-dir)",
                missing.display(),
                dir.display(),
                id.role.as_str(),
                id.name
            );
        }
        Ok(Some(files))
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
