//! Launch files: which node runs which actors, for which robots, with which configs.
//!
//! ```toml
//! fleet = "nb"
//! [zenoh]                     # defaults for every node
//! multicast_scouting = false
//! [restart]                   # for actors inside a node, and for nodes under `nanobot launch`
//! max_restarts = 5
//! window_s = 60
//! [robots]
//! count = 4                   # r0 … r3 (or: ids = ["arm-a", "arm-b"])
//! [[node]]
//! name = "sim"
//! listen = ["tcp/127.0.0.1:${NB_PORT:-7447}"]
//! [[node.actor]]
//! type = "sim_robot"
//! for_each_robot = true       # one instance per robot; {robot} and {index} expand
//! config = "../configs/sim_robot.toml"
//! set = { seed = "{index}" }  # overrides on top of the config file
//! ```
//!
//! `${VAR}` and `${VAR:-default}` expand from the environment before parsing. Every error names
//! the file and the line.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use nanobot_messages::topics;
use serde::Deserialize;
use thiserror::Error;
use toml::{Spanned, Table, Value};

use crate::bus::{BusConfig, Mode};

#[derive(Debug, Error, Clone, PartialEq)]
#[error("{file}:{line}: {message}")]
pub struct LaunchError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// When and how often to restart what crashed.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestartPolicy {
    /// Restarts allowed within `window_s` before giving up.
    pub max_restarts: u32,
    pub window_s: f64,
    /// First backoff; doubles after each restart up to `max_backoff_ms`.
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 5,
            window_s: 60.0,
            backoff_ms: 200,
            max_backoff_ms: 5000,
        }
    }
}

impl RestartPolicy {
    /// The backoff before restart number `n` (0-based) within the window.
    pub fn backoff(&self, n: u32) -> std::time::Duration {
        let ms = self
            .backoff_ms
            .saturating_mul(1u64 << n.min(20))
            .min(self.max_backoff_ms.max(self.backoff_ms));
        std::time::Duration::from_millis(ms)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDecl {
    #[serde(default)]
    fleet: Option<Spanned<String>>,
    #[serde(default)]
    zenoh: ZenohDecl,
    #[serde(default)]
    restart: Option<Spanned<RestartPolicy>>,
    #[serde(default)]
    robots: Option<Spanned<RobotsDecl>>,
    #[serde(default)]
    base: Option<BaseSetup>,
    /// `nanobot tune`'s output for this machine (relative to the launch file): its tables, named
    /// by actor type, overlay those actors' config files (before `set`). A missing file tunes
    /// nothing.
    #[serde(default)]
    tuned: Option<Spanned<String>>,
    #[serde(default)]
    security: Option<Spanned<SecurityDecl>>,
    #[serde(default)]
    node: Vec<Spanned<NodeDecl>>,
}

/// `[security]`: TLS with mutual authentication on every endpoint, and Zenoh access control
/// generated from this file (default deny; see [`crate::access`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecurityDecl {
    #[serde(default = "Security::default_keys")]
    keys: String,
    #[serde(default)]
    generate: bool,
    #[serde(default)]
    operators: Vec<String>,
    #[serde(default)]
    engineers: Vec<String>,
}

/// A secured fleet: where its certificates are and who, beyond its nodes, may join.
#[derive(Clone, Debug, PartialEq)]
pub struct Security {
    /// The fleet key directory (relative to the working directory, `{fleet}` expanded): its
    /// `tls/` holds the fleet's authority and every party's certificate (`nanobot keys init`).
    pub keys: PathBuf,
    /// Make the authority and every missing certificate (nodes and the people listed) when the
    /// fleet starts: for development fleets, whose keys stay on this machine.
    pub generate: bool,
    /// People who may change the rollout (`operator.NAME` certificates).
    pub operators: Vec<String>,
    /// People who may watch (`engineer.NAME` certificates).
    pub engineers: Vec<String>,
    /// What each party may do.
    pub rights: Vec<crate::access::Rights>,
}

impl Security {
    fn default_keys() -> String {
        "state/{fleet}/keys".into()
    }

    /// Every party that needs a certificate: the nodes, then the people.
    pub fn identities(&self) -> Vec<crate::pki::Identity> {
        self.rights.iter().map(|r| r.identity.clone()).collect()
    }
}

/// How the fleet's base policy is made when its checkpoint does not exist yet: `nanobot launch`
/// records the scripted expert's demonstrations in the simulator and trains the base on them
/// (progress shown) before it starts any node. Paths are relative to the working directory.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseSetup {
    pub checkpoint: String,
    /// Where the demonstrations go (one dataset per robot; kept if they exist).
    pub demos: String,
    #[serde(default = "BaseSetup::default_robots")]
    pub robots: u32,
    /// Episodes per robot.
    #[serde(default = "BaseSetup::default_episodes")]
    pub episodes: u32,
    /// The policy config (`configs/policy/*.toml`).
    pub config: String,
    pub steps: usize,
    /// Batch shards trained at once, one core each.
    #[serde(default = "BaseSetup::default_shards")]
    pub shards: usize,
    /// What the demonstrations' robots observe: `state` or `camera` (the robots' `sim.observe`).
    #[serde(default)]
    pub observe: nanobot_sim::Observe,
}

impl BaseSetup {
    fn default_robots() -> u32 {
        4
    }
    fn default_episodes() -> u32 {
        120
    }
    fn default_shards() -> usize {
        1
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ZenohDecl {
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default)]
    multicast_scouting: bool,
    #[serde(default)]
    config_file: Option<String>,
    /// The share of new traces recorded (0 to 1).
    #[serde(default = "default_trace_sample_ratio")]
    trace_sample_ratio: f64,
}

fn default_trace_sample_ratio() -> f64 {
    crate::bus::DEFAULT_TRACE_SAMPLE_RATIO
}

impl Default for ZenohDecl {
    fn default() -> Self {
        ZenohDecl {
            mode: None,
            multicast_scouting: false,
            config_file: None,
            trace_sample_ratio: default_trace_sample_ratio(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RobotsDecl {
    #[serde(default)]
    count: Option<usize>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    ids: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeDecl {
    name: Spanned<String>,
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default)]
    listen: Vec<String>,
    #[serde(default)]
    connect: Vec<String>,
    #[serde(default)]
    actor: Vec<Spanned<ActorDecl>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActorDecl {
    #[serde(rename = "type")]
    kind: Spanned<String>,
    #[serde(default)]
    name: Option<Spanned<String>>,
    #[serde(default)]
    for_each_robot: bool,
    /// Restrict `for_each_robot` to these robots, or give a single actor its robot.
    #[serde(default)]
    robots: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    config: Option<Spanned<String>>,
    #[serde(default)]
    set: Table,
}

/// A parsed, checked launch file.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchFile {
    pub path: PathBuf,
    pub fleet: String,
    pub robots: Vec<String>,
    pub restart: RestartPolicy,
    pub nodes: Vec<NodePlan>,
    /// How to make the base checkpoint if it is missing.
    pub base: Option<BaseSetup>,
    /// TLS and access control (`[security]`), if the fleet is secured.
    pub security: Option<Security>,
}

/// What one node process runs.
#[derive(Clone, Debug, PartialEq)]
pub struct NodePlan {
    pub name: String,
    pub fleet: String,
    pub bus: BusConfig,
    pub restart: RestartPolicy,
    pub actors: Vec<ActorSpec>,
}

/// One actor instance.
#[derive(Clone, Debug, PartialEq)]
pub struct ActorSpec {
    pub kind: String,
    pub name: String,
    pub robot: Option<String>,
    /// The config file merged with the launch file's overrides.
    pub config: Table,
    /// Where it was declared: `file:line`.
    pub origin: String,
}

impl LaunchFile {
    pub fn node(&self, name: &str) -> Option<&NodePlan> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Expand `${VAR}` and `${VAR:-default}` from `env`, keeping line numbers.
pub fn expand_env(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<String, (usize, String)> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut consumed = 0;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err((
                line_of(text, consumed + start),
                "unclosed ${ in variable reference".into(),
            ));
        };
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err((
                line_of(text, consumed + start),
                format!("bad variable name {name:?} in ${{{inner}}}"),
            ));
        }
        match env(name).filter(|v| !v.is_empty()).or(default.map(str::to_string)) {
            Some(v) => out.push_str(&v),
            None => {
                return Err((
                    line_of(text, consumed + start),
                    format!("environment variable {name} is not set and has no default (write ${{{name}:-value}})"),
                ))
            }
        }
        let used = start + 2 + end + 1;
        consumed += used;
        rest = &rest[used..];
    }
    out.push_str(rest);
    Ok(out)
}

fn template(s: &str, vars: &BTreeMap<&str, String>) -> String {
    let mut out = s.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out
}

fn template_value(v: &Value, vars: &BTreeMap<&str, String>) -> Value {
    match v {
        // A value made of "{index}" and digits becomes an integer, so `seed = "{index}"` (or
        // "1{index}": 10, 11, ...) is a number.
        Value::String(s) if s.contains("{index}") && s.replace("{index}", "").bytes().all(|b| b.is_ascii_digit()) => {
            Value::Integer(template(s, vars).parse().unwrap_or(0))
        }
        Value::String(s) => Value::String(template(s, vars)),
        Value::Array(a) => Value::Array(a.iter().map(|x| template_value(x, vars)).collect()),
        Value::Table(t) => Value::Table(t.iter().map(|(k, x)| (k.clone(), template_value(x, vars))).collect()),
        other => other.clone(),
    }
}

/// Merge `over` into `base`, table by table.
pub fn merge(base: &mut Table, over: &Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Read and check a launch file. `known_actors` are the actor types this build provides.
pub fn load(path: &Path, known_actors: &[&str]) -> Result<LaunchFile, LaunchError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| LaunchError {
        file: file.clone(),
        line: 0,
        message: format!("cannot read: {e}"),
    })?;
    parse(path, &text, known_actors, |k| std::env::var(k).ok())
}

/// Parse launch file text (`path` names it in errors and anchors relative config paths).
pub fn parse(
    path: &Path,
    raw: &str,
    known_actors: &[&str],
    env: impl Fn(&str) -> Option<String>,
) -> Result<LaunchFile, LaunchError> {
    parse_with_files(path, raw, known_actors, env, |p| std::fs::read_to_string(p))
}

/// [`parse`], reading the config and tuned files it names with `read` (the fuzz target reads
/// none: a launch file that names `/dev/zero` is the operator's own doing, not an input's).
pub fn parse_with_files(
    path: &Path,
    raw: &str,
    known_actors: &[&str],
    env: impl Fn(&str) -> Option<String>,
    read: impl Fn(&Path) -> std::io::Result<String>,
) -> Result<LaunchFile, LaunchError> {
    let file = path.display().to_string();
    let err = |line: usize, message: String| LaunchError {
        file: file.clone(),
        line,
        message,
    };
    let text = expand_env(raw, env).map_err(|(line, m)| err(line, m))?;
    let at = |span: std::ops::Range<usize>| line_of(&text, span.start);
    let decl: FileDecl = toml::from_str(&text).map_err(|e| {
        let line = e.span().map(|s| line_of(&text, s.start)).unwrap_or(0);
        err(line, e.message().to_string())
    })?;
    let base_dir = path.parent().unwrap_or(Path::new("."));

    let fleet = match &decl.fleet {
        Some(f) => {
            topics::validate_name("fleet", f.get_ref()).map_err(|e| err(at(f.span()), e.to_string()))?;
            f.get_ref().clone()
        }
        None => topics::DEFAULT_FLEET.to_string(),
    };
    let restart = match &decl.restart {
        Some(r) => {
            let p = r.get_ref();
            if !(p.window_s > 0.0 && p.window_s.is_finite()) {
                return Err(err(
                    at(r.span()),
                    "[restart]: window_s must be a positive number of seconds".into(),
                ));
            }
            p.clone()
        }
        None => RestartPolicy::default(),
    };

    let robots: Vec<String> = match &decl.robots {
        None => Vec::new(),
        Some(sp) => {
            let line = at(sp.span());
            let rd = sp.get_ref();
            let ids = match (&rd.ids, rd.count) {
                (Some(_), Some(_)) => return Err(err(line, "[robots]: give either `count` or `ids`, not both".into())),
                (Some(ids), None) => ids.clone(),
                (None, Some(n)) => {
                    let prefix = rd.prefix.clone().unwrap_or_else(|| "r".into());
                    (0..n).map(|i| format!("{prefix}{i}")).collect()
                }
                (None, None) => return Err(err(line, "[robots]: give `count` or `ids`".into())),
            };
            let mut seen = HashSet::new();
            for id in &ids {
                topics::validate_robot(id).map_err(|e| err(line, format!("[robots]: {e}")))?;
                if !seen.insert(id) {
                    return Err(err(line, format!("[robots]: robot {id:?} is listed twice")));
                }
            }
            ids
        }
    };

    if decl.node.is_empty() {
        return Err(err(0, "no [[node]]: a launch file needs at least one node".into()));
    }
    if !(0.0..=1.0).contains(&decl.zenoh.trace_sample_ratio) {
        return Err(err(
            0,
            format!(
                "[zenoh] trace_sample_ratio = {} is not between 0 and 1",
                decl.zenoh.trace_sample_ratio
            ),
        ));
    }
    let tuned: Table = match &decl.tuned {
        None => Table::new(),
        Some(t) => {
            let tpath = base_dir.join(t.get_ref());
            match read(&tpath) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Table::new(),
                Err(e) => return Err(err(at(t.span()), format!("tuned file {}: {e}", tpath.display()))),
                Ok(ttext) => toml::from_str::<Table>(&ttext).map_err(|e| {
                    let l = e.span().map(|s| line_of(&ttext, s.start)).unwrap_or(0);
                    err(
                        at(t.span()),
                        format!("tuned file {}:{l}: {}", tpath.display(), e.message()),
                    )
                })?,
            }
        }
    };
    let mut nodes = Vec::new();
    let mut node_names = HashSet::new();
    for node_sp in &decl.node {
        let node = node_sp.get_ref();
        let name = node.name.get_ref().clone();
        let nline = at(node.name.span());
        topics::validate_name("node", &name).map_err(|e| err(nline, e.to_string()))?;
        if !node_names.insert(name.clone()) {
            return Err(err(nline, format!("node {name:?} is declared twice")));
        }
        let mode = node.mode.or(decl.zenoh.mode).unwrap_or_default();
        let bus = BusConfig {
            mode,
            // A node that is a client of a router waits for it, as peers wait for each other.
            connect_timeout_ms: (mode == Mode::Client).then_some(-1),
            listen: node.listen.clone(),
            connect: node.connect.clone(),
            multicast_scouting: decl.zenoh.multicast_scouting,
            config_file: decl.zenoh.config_file.as_ref().map(|p| base_dir.join(p)),
            trace_sample_ratio: decl.zenoh.trace_sample_ratio,
            tls: None,
            access_control: None,
        };
        let mut actors: Vec<ActorSpec> = Vec::new();
        for actor_sp in &node.actor {
            let a = actor_sp.get_ref();
            let aline = at(actor_sp.span());
            let kind = a.kind.get_ref();
            if !known_actors.contains(&kind.as_str()) {
                return Err(err(
                    at(a.kind.span()),
                    format!("unknown actor type {kind:?} (known: {})", known_actors.join(", ")),
                ));
            }
            let mut config = match &a.config {
                None => Table::new(),
                Some(cp) => {
                    let cpath = base_dir.join(cp.get_ref());
                    let cline = at(cp.span());
                    let ctext =
                        read(&cpath).map_err(|e| err(cline, format!("config file {}: {e}", cpath.display())))?;
                    toml::from_str::<Table>(&ctext).map_err(|e| {
                        let l = e.span().map(|s| line_of(&ctext, s.start)).unwrap_or(0);
                        err(cline, format!("config file {}:{l}: {}", cpath.display(), e.message()))
                    })?
                }
            };
            if let Some(Value::Table(t)) = tuned.get(kind.as_str()) {
                merge(&mut config, t);
            }
            let instances: Vec<Option<(usize, String)>> = {
                let listed = match &a.robots {
                    None => None,
                    Some(rs) => {
                        for r in rs.get_ref() {
                            if !robots.contains(r) {
                                return Err(err(
                                    at(rs.span()),
                                    format!("robot {r:?} is not in [robots] ({})", robots.join(", ")),
                                ));
                            }
                        }
                        Some(rs.get_ref().clone())
                    }
                };
                let chosen = listed.unwrap_or_else(|| robots.clone());
                let index = |r: &String| robots.iter().position(|x| x == r).unwrap_or(0);
                if a.for_each_robot {
                    if chosen.is_empty() {
                        return Err(err(aline, "for_each_robot = true, but [robots] lists no robot".into()));
                    }
                    chosen.iter().map(|r| Some((index(r), r.clone()))).collect()
                } else if let (Some(_), [one]) = (&a.robots, chosen.as_slice()) {
                    vec![Some((index(one), one.clone()))]
                } else {
                    vec![None]
                }
            };
            for inst in instances {
                let mut vars = BTreeMap::new();
                vars.insert("fleet", fleet.clone());
                vars.insert("node", name.clone());
                vars.insert("type", kind.clone());
                let (index, robot) = match &inst {
                    Some((i, r)) => (*i, Some(r.clone())),
                    None => (0, None),
                };
                vars.insert("index", index.to_string());
                vars.insert("robot", robot.clone().unwrap_or_default());
                let default_name = if robot.is_some() { "{type}_{robot}" } else { "{type}" };
                let actor_name = template(
                    a.name.as_ref().map(|n| n.get_ref().as_str()).unwrap_or(default_name),
                    &vars,
                );
                topics::validate_name("actor", &actor_name).map_err(|e| err(aline, e.to_string()))?;
                if actors.iter().any(|x| x.name == actor_name) {
                    return Err(err(
                        aline,
                        format!("actor name {actor_name:?} is used twice in node {name:?} (name it with {{robot}})"),
                    ));
                }
                let mut cfg = config.clone();
                if let Value::Table(over) = template_value(&Value::Table(a.set.clone()), &vars) {
                    merge(&mut cfg, &over);
                }
                actors.push(ActorSpec {
                    kind: kind.clone(),
                    name: actor_name,
                    robot,
                    config: cfg,
                    origin: format!("{file}:{aline}"),
                });
            }
        }
        // A router routes for the others and may run no actor of its own.
        if actors.is_empty() && mode != Mode::Router {
            return Err(err(
                nline,
                format!("node {name:?} has no [[node.actor]] (only a node with mode = \"router\" may have none)"),
            ));
        }
        nodes.push(NodePlan {
            name,
            fleet: fleet.clone(),
            bus,
            restart: restart.clone(),
            actors,
        });
    }
    // A logger that takes a robot's data from its spool needs that spool somewhere.
    use crate::runtime::NodeActor;
    let all = || nodes.iter().flat_map(|n| &n.actors);
    for a in all().filter(|a| a.kind == crate::logger::Logger::KIND) {
        let spooled = a.config.get("source").and_then(Value::as_str) == Some("spool");
        if spooled && !all().any(|s| s.kind == crate::spool::Spool::KIND && s.robot == a.robot) {
            let line = a.origin.rsplit(':').next().and_then(|l| l.parse().ok()).unwrap_or(0);
            return Err(err(
                line,
                format!(
                    "actor {}: source = \"spool\", but no spool actor runs for robot {:?} (add one of type \"spool\" with for_each_robot = true on the robot's node)",
                    a.name,
                    a.robot.as_deref().unwrap_or("")
                ),
            ));
        }
    }
    let mut lf = LaunchFile {
        path: path.to_path_buf(),
        fleet,
        robots,
        restart,
        nodes,
        base: decl.base,
        security: None,
    };
    if let Some(sp) = &decl.security {
        let line = at(sp.span());
        let sd = sp.get_ref();
        for (role, names) in [
            (crate::pki::Role::Operator, &sd.operators),
            (crate::pki::Role::Engineer, &sd.engineers),
        ] {
            for name in names {
                crate::pki::Identity::new(role, name).map_err(|e| err(line, format!("[security]: {e}")))?;
            }
        }
        // Every endpoint is TLS: a plain one would admit anyone who reaches it.
        for (node_sp, node) in decl.node.iter().zip(&mut lf.nodes) {
            let nline = at(node_sp.get_ref().name.span());
            if let Some(e) = node
                .bus
                .listen
                .iter()
                .chain(&node.bus.connect)
                .find(|e| !e.starts_with("tls/"))
            {
                return Err(err(
                    nline,
                    format!(
                        "node {:?}: endpoint {e} is not tls/, and [security] needs TLS on every endpoint (write tls/HOST:PORT)",
                        node.name
                    ),
                ));
            }
        }
        let mut vars = BTreeMap::new();
        vars.insert("fleet", lf.fleet.clone());
        let keys = PathBuf::from(template(&sd.keys, &vars));
        let rights = crate::access::rights(&lf, &sd.operators, &sd.engineers);
        let acl = crate::access::access_control(&rights);
        for node in &mut lf.nodes {
            let id = crate::pki::Identity::node(&node.name).map_err(|e| err(line, e.to_string()))?;
            node.bus.tls = Some(crate::pki::files(&keys, &id));
            node.bus.access_control = Some(acl.clone());
        }
        lf.security = Some(Security {
            keys,
            generate: sd.generate,
            operators: sd.operators.clone(),
            engineers: sd.engineers.clone(),
            rights,
        });
    }
    Ok(lf)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["sim_robot", "expert", "spool", "logger"];

    fn parse_str(text: &str) -> Result<LaunchFile, LaunchError> {
        parse(Path::new("test.toml"), text, KNOWN, |k| {
            (k == "PORT").then(|| "9000".to_string())
        })
    }

    #[test]
    fn robots_expand_with_templates_and_overrides() {
        let lf = parse_str(
            r#"
fleet = "lab"
[robots]
count = 3
[[node]]
name = "sim"
listen = ["tcp/127.0.0.1:${PORT}", "tcp/127.0.0.1:${OTHER:-7}"]
[[node.actor]]
type = "sim_robot"
for_each_robot = true
set = { seed = "{index}", label = "{fleet}-{robot}" }
[[node.actor]]
type = "expert"
"#,
        )
        .unwrap();
        let node = lf.node("sim").unwrap();
        assert_eq!(node.bus.listen, vec!["tcp/127.0.0.1:9000", "tcp/127.0.0.1:7"]);
        let names: Vec<_> = node.actors.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["sim_robot_r0", "sim_robot_r1", "sim_robot_r2", "expert"]);
        assert_eq!(node.actors[2].config["seed"], Value::Integer(2));
        assert_eq!(node.actors[1].config["label"], Value::String("lab-r1".into()));
        assert_eq!(node.actors[0].origin, "test.toml:8");
    }

    #[test]
    fn a_tuned_file_overlays_configs_by_actor_type_and_set_wins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("robot.toml"), "seed = 1\nrate = 5\n").unwrap();
        let text = "tuned = \"tuned.toml\"\n[[node]]\nname = \"a\"\n[[node.actor]]\ntype = \"sim_robot\"\nconfig = \"robot.toml\"\nset = { seed = 3 }\n[[node.actor]]\ntype = \"expert\"\n";
        let launch = dir.path().join("l.toml");
        let parse_here = || parse(&launch, text, KNOWN, |_| None);
        // No tuned file yet: nothing is tuned.
        let lf = parse_here().unwrap();
        assert_eq!(lf.nodes[0].actors[0].config["rate"], Value::Integer(5));
        std::fs::write(
            dir.path().join("tuned.toml"),
            "[sim_robot]\nrate = 9\nseed = 7\n[expert]\ngain = 2\n",
        )
        .unwrap();
        let lf = parse_here().unwrap();
        let (robot, expert) = (&lf.nodes[0].actors[0].config, &lf.nodes[0].actors[1].config);
        assert_eq!(
            robot["rate"],
            Value::Integer(9),
            "the tuned value over the config file's"
        );
        assert_eq!(
            robot["seed"],
            Value::Integer(3),
            "the launch file's set over the tuned value"
        );
        assert_eq!(expert["gain"], Value::Integer(2));
        std::fs::write(dir.path().join("tuned.toml"), "[sim_robot\n").unwrap();
        let e = parse_here().unwrap_err();
        assert!(e.message.contains("tuned.toml") && e.line == 1, "{e}");
    }

    #[test]
    fn errors_name_file_and_line() {
        let e = parse_str("[robots]\ncount = 2\n[[node]]\nname = \"a\"\n[[node.actor]]\ntype = \"sim_robo\"\n")
            .unwrap_err();
        assert_eq!(e.line, 6, "{e}");
        assert!(
            e.to_string()
                .starts_with("test.toml:6: unknown actor type \"sim_robo\""),
            "{e}"
        );
        let e = parse_str("[[node]]\nname = \"a\"\nlisten = [\"${NOPE}\"]\n").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.message.contains("NOPE"));
        let e = parse_str("[[node]]\nname = \"a\"\nbogus = 1\n").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("bogus"), "{e}");
        let e = parse_str("[[node]]\nname = \"a\"\n[[node.actor]]\ntype = \"expert\"\n[[node]]\nname = \"a\"\n[[node.actor]]\ntype = \"expert\"\n").unwrap_err();
        assert_eq!((e.line, e.message.as_str()), (6, "node \"a\" is declared twice"));
        let e = parse_str("[robots]\nids = [\"log\"]\n[[node]]\nname = \"a\"\n").unwrap_err();
        assert!(e.message.contains("reserved"), "{e}");
        let e = parse_str("[restart]\nwindow_s = -1.0\n[[node]]\nname = \"a\"\n").unwrap_err();
        assert_eq!(e.line, 1, "{e}");
        assert!(e.message.contains("window_s"), "{e}");
        let e = parse_str("x = [1,\n").unwrap_err();
        assert!(e.line >= 1 && !e.message.is_empty());
    }

    #[test]
    fn a_logger_fed_by_a_spool_needs_that_robots_spool() {
        let text = |spools: &str| {
            format!(
                "[robots]\nids = [\"a\", \"b\"]\n[[node]]\nname = \"n\"\n[[node.actor]]\ntype = \"spool\"\n{spools}\n[[node.actor]]\ntype = \"logger\"\nfor_each_robot = true\nset = {{ source = \"spool\" }}\n"
            )
        };
        let e = parse_str(&text("robots = [\"a\"]")).unwrap_err();
        assert_eq!(e.line, 8, "{e}");
        assert!(
            e.message.contains("logger_b") && e.message.contains("robot \"b\""),
            "{e}"
        );
        assert!(parse_str(&text("for_each_robot = true")).is_ok());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RestartPolicy {
            backoff_ms: 100,
            max_backoff_ms: 350,
            ..RestartPolicy::default()
        };
        assert_eq!(p.backoff(0).as_millis(), 100);
        assert_eq!(p.backoff(1).as_millis(), 200);
        assert_eq!(p.backoff(2).as_millis(), 350);
        assert_eq!(p.backoff(40).as_millis(), 350);
    }
}
