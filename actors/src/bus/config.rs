//! What a bus is opened with: the Zenoh mode, endpoints and scouting, trace sampling, and the
//! publication QoS classes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::*;

/// The role of this process in the Zenoh network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Peer,
    Client,
    Router,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Peer => "peer",
            Mode::Client => "client",
            Mode::Router => "router",
        }
    }
}

/// The share of new traces sampled when a config does not say: a 20 Hz fleet still yields a
/// trace every few seconds per robot, and an unsampled message carries no trace context.
pub const DEFAULT_TRACE_SAMPLE_RATIO: f64 = 0.01;

/// How to open the session. Peer by default, multicast scouting off unless asked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    pub mode: Mode,
    /// Endpoints to listen on, e.g. `tcp/127.0.0.1:7447` or `unixsock-stream//tmp/nb.sock`.
    pub listen: Vec<String>,
    /// Endpoints to connect to (other nodes, or a `zenohd` router).
    pub connect: Vec<String>,
    pub multicast_scouting: bool,
    /// A Zenoh JSON5 config file; the fields above are applied on top of it.
    pub config_file: Option<PathBuf>,
    /// How long opening the session keeps trying its connect endpoints (Zenoh's
    /// `connect/timeout_ms`; -1 forever). Default: Zenoh's (peers forever, clients once).
    pub connect_timeout_ms: Option<i64>,
    /// The share of new traces that are recorded and carry their W3C trace context on the wire
    /// (0 to 1). The decision is made where a trace starts; every message downstream follows it.
    pub trace_sample_ratio: f64,
    /// TLS with mutual authentication: every endpoint is `tls/`, and a peer counts only with a
    /// certificate the fleet's authority signed (a launch file's `[security]` sets it).
    pub tls: Option<crate::pki::TlsFiles>,
    /// Zenoh's `access_control` block (default deny), generated from the launch file.
    pub access_control: Option<serde_json::Value>,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            mode: Mode::default(),
            listen: Vec::new(),
            connect: Vec::new(),
            multicast_scouting: false,
            config_file: None,
            connect_timeout_ms: None,
            trace_sample_ratio: DEFAULT_TRACE_SAMPLE_RATIO,
            tls: None,
            access_control: None,
        }
    }
}

impl BusConfig {
    pub fn to_zenoh(&self) -> Result<zenoh::Config, BusError> {
        if !(0.0..=1.0).contains(&self.trace_sample_ratio) {
            return Err(BusError::Config(format!(
                "trace_sample_ratio = {} is not between 0 and 1",
                self.trace_sample_ratio
            )));
        }
        let mut cfg = match &self.config_file {
            Some(path) => {
                zenoh::Config::from_file(path).map_err(|e| BusError::Config(format!("{}: {e}", path.display())))?
            }
            None => zenoh::Config::default(),
        };
        let set = |cfg: &mut zenoh::Config, key: &str, value: String| {
            cfg.insert_json5(key, &value)
                .map_err(|e| BusError::Config(format!("{key} = {value}: {e}")))
        };
        set(&mut cfg, "mode", format!("{:?}", self.mode.as_str()))?;
        set(
            &mut cfg,
            "scouting/multicast/enabled",
            self.multicast_scouting.to_string(),
        )?;
        let list = |v: &[String]| serde_json::to_string(v).expect("strings serialize");
        if !self.listen.is_empty() {
            set(&mut cfg, "listen/endpoints", list(&self.listen))?;
        } else if self.config_file.is_none() && self.mode != Mode::Router {
            // No listener: a peer that only connects out (CLI tools, robots behind NAT).
            set(&mut cfg, "listen/endpoints", "[]".into())?;
        }
        if !self.connect.is_empty() {
            set(&mut cfg, "connect/endpoints", list(&self.connect))?;
        }
        if let Some(ms) = self.connect_timeout_ms {
            set(&mut cfg, "connect/timeout_ms", ms.to_string())?;
        }
        if let Some(tls) = &self.tls {
            if let Some(missing) = tls.missing() {
                return Err(BusError::Config(format!(
                    "TLS file {} does not exist (make it with `nanobot keys init`)",
                    missing.display()
                )));
            }
            if let Some(e) = self.listen.iter().chain(&self.connect).find(|e| !e.starts_with("tls/")) {
                return Err(BusError::Config(format!(
                    "endpoint {e} is not tls/: with TLS on, every endpoint is tls/HOST:PORT"
                )));
            }
            let path =
                |p: &std::path::Path| serde_json::to_string(&p.display().to_string()).expect("strings serialize");
            set(&mut cfg, "transport/link/tls/root_ca_certificate", path(&tls.ca))?;
            for side in ["listen", "connect"] {
                set(
                    &mut cfg,
                    &format!("transport/link/tls/{side}_certificate"),
                    path(&tls.cert),
                )?;
                set(
                    &mut cfg,
                    &format!("transport/link/tls/{side}_private_key"),
                    path(&tls.key),
                )?;
            }
            set(&mut cfg, "transport/link/tls/enable_mtls", "true".into())?;
            // Peers connect by address; the authority's signature and the common name (which
            // access control matches) are what count.
            set(&mut cfg, "transport/link/tls/verify_name_on_connect", "false".into())?;
        }
        if let Some(acl) = &self.access_control {
            set(&mut cfg, "access_control", acl.to_string())?;
        }
        Ok(cfg)
    }

    pub fn describe(&self) -> String {
        format!(
            "mode={} listen=[{}] connect=[{}] multicast_scouting={}{}{}",
            self.mode.as_str(),
            self.listen.join(", "),
            self.connect.join(", "),
            self.multicast_scouting,
            match &self.tls {
                Some(t) => format!(" tls={}", t.cert.display()),
                None => String::new(),
            },
            if self.access_control.is_some() {
                " access_control=on"
            } else {
                ""
            }
        )
    }
}

/// Publication QoS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PubQos {
    /// Control paths (actions, raw sensor streams): never block, send at once; a congested link
    /// drops (Zenoh waits `wait_before_drop`, 1 ms by default, for a free transmit batch).
    Control,
    /// Observations: sent at once with control priority like `Control`, but never dropped. The
    /// policy wants them promptly and the logger wants every one: it acknowledges rows, and a
    /// row dropped on a starved link between two acknowledged ones would be lost silently.
    Sensor,
    /// Data that must arrive (logging, checkpoints): block on congestion.
    Data,
    /// Data that its sender keeps and sends again until it is acknowledged (a robot's spool):
    /// drops on congestion rather than stall its sender, at the lowest priority, behind
    /// control and sensor traffic.
    Bulk,
}
