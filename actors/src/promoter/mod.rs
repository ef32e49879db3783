//! `promoter`: decides which adapter the fleet runs. Every candidate on `{fleet}/ckpt/candidate`
//! goes through the gates (`gates.rs`: hash and base, loads and is finite, held-out loss,
//! closed-loop success in shadow simulation under the condition the fleet reports, retention of
//! earlier conditions); one that passes is stored, signed with the fleet key and rolled out on
//! `{fleet}/ckpt/promoted`: first to a canary (`canary_robots` of the robots, by name), then to
//! every robot once the canary has held up for `canary_hold_s` and `canary_min_episodes`
//! episodes, or rolled back automatically when the canary's success falls more than
//! `rollback_drop` below the other robots' (or a canary robot refuses the adapter). Robots fetch
//! the bytes from the queryable `{fleet}/ckpt/adapter` by sha256 and report what they run on
//! `{fleet}/{robot}/policy`; the time from the decision to the last robot's report is the
//! promotion latency.
//!
//! `rollout.rs` changes what the fleet runs and watches the canary; `control.rs` answers the
//! operators. Every candidate, decision and rollout change is appended to the ledger (`ledger.rs`,
//! `{state_dir}/ledger.jsonl`, fsynced first) and the rollout is read back from it at start, so
//! a restart or `kill -9` loses nothing. Engineers ask it on `{fleet}/ckpt/control/{op}`
//! (`nanobot ckpt list | show ID | promote ID | rollback`).

mod control;
pub mod gates;
pub mod ledger;
mod rollout;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nanobot_messages::{
    topics, AdapterBytes, AdapterManifest, AdapterRequest, Blob, Candidate, CkptCommand, CkptReply, Event, Metric,
    PolicyStatus, Promoted,
};
use nanobot_sim::Shift;
use serde::Deserialize;

use crate::bus::{Inbox, Keep, PubQos, Publisher, Received, Request};
use crate::keys::{SigningKey, TrustedKey};
use crate::runtime::{AbortOnDrop, ActorError, Ctx, Input, Metrics, NodeActor, Worker};
use gates::{GateConfig, Gates, Submission, Verdict};
use ledger::{now_ms, Ledger, Record};
use rollout::{Canary, RobotView};

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromoterConfig {
    /// The base checkpoint the fleet runs (candidates must be trained on it).
    pub base: PathBuf,
    /// The ledger and the adapters' bytes; `{fleet}` expands.
    pub state_dir: String,
    /// The fleet key's directory (`nanobot keys init DIR`); `{fleet}` expands.
    pub keys: String,
    /// Make a key in `keys` if it has none (development fleets).
    pub generate_key: bool,
    /// The condition candidates are judged under: `fleet` (what the robots' episodes report,
    /// by majority) or a shift name.
    pub condition: String,
    pub gates: GateConfig,
    /// Robots (the first, by name) that take a promoted adapter first.
    pub canary_robots: usize,
    pub canary_hold_s: f64,
    pub canary_min_episodes: u32,
    /// Roll back when the canary's success is this far below the other robots'.
    pub rollback_drop: f64,
    /// The rollout is published again this often.
    pub announce_s: f64,
    /// The operators whose signed `ckpt promote` and `rollback` count: name → the path of
    /// their public key (`nanobot keys init --operator NAME` makes the pair; `{fleet}`
    /// expands). Anyone may ask `list` and `show`.
    pub operators: BTreeMap<String, String>,
    /// A development fleet's operator: its key is made in `keys/operators/` if it has none, and
    /// trusted (launch/sim.toml's `dev`, so that the README's `ckpt rollback` works as is).
    pub generate_operator: Option<String>,
    /// How long a robot accepts an announced rollout (it is announced again every
    /// `announce_s`): bounds how late a recorded rollout could be replayed. Allow for the
    /// clock difference between the promoter's node and the robots'.
    pub rollout_ttl_s: f64,
    /// Robots followed at most: a status from one more robot name is ignored and counted
    /// (`robots_refused`), so a flood of claimed names cannot grow the promoter's tables.
    pub max_robots: usize,
}

impl Default for PromoterConfig {
    fn default() -> Self {
        PromoterConfig {
            base: PathBuf::from("policy.safetensors"),
            state_dir: "state/{fleet}/promoter".into(),
            keys: "state/{fleet}/keys".into(),
            generate_key: false,
            condition: "fleet".into(),
            gates: GateConfig::default(),
            canary_robots: 1,
            canary_hold_s: 20.0,
            canary_min_episodes: 4,
            rollback_drop: 0.25,
            announce_s: 1.0,
            operators: BTreeMap::new(),
            generate_operator: None,
            rollout_ttl_s: 30.0,
            max_robots: 1024,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub enum PromoterEvent {
    Candidate,
    Status,
    Episode,
    Control,
}

pub struct Promoter {
    cfg: PromoterConfig,
    state_dir: PathBuf,
    key: SigningKey,
    ledger: Worker<Ledger>,
    gates: Option<Worker<Gates>>,
    candidates: Inbox<Received<Candidate>>,
    statuses: Inbox<Received<PolicyStatus>>,
    events: Inbox<Received<Event>>,
    control: Inbox<Request<CkptCommand>>,
    announce: Publisher<Promoted>,
    rollout: Promoted,
    robots: BTreeMap<String, RobotView>,
    /// Every condition a followed robot has started an episode under, in the order first seen.
    seen: Vec<Shift>,
    /// Robots whose current episode the onboard expert took over (it is no policy success).
    intervened: BTreeMap<String, bool>,
    canary: Option<Canary>,
    /// The generation not yet on every robot, and when it was decided.
    reaching: Option<(u64, Instant)>,
    /// An accepted candidate waiting for its canary (no robot heard from yet).
    waiting: Option<AdapterManifest>,
    last_latency_ms: f64,
    accepted: u64,
    refused: u64,
    /// Statuses ignored because `max_robots` robots are followed already.
    robots_refused: u64,
    /// Statuses and events whose envelope names another robot than their key.
    results_refused: u64,
    /// Adapter ids rolled back (the newest `ledger::MAX_REVOKED`), announced with every
    /// rollout, and read back from the ledger after a restart.
    revoked: Vec<String>,
    /// The operators trusted to change the rollout, by name.
    operators: BTreeMap<String, TrustedKey>,
    /// Signatures of the state-changing commands accepted within the last `COMMAND_WINDOW_MS`
    /// (with when they were issued): the same signed command is not carried out twice.
    commands_seen: std::collections::VecDeque<(u64, String)>,
    _servers: [AbortOnDrop; 2],
}

/// How far a signed command's `issued_ms` may be from the promoter's clock (either way).
const COMMAND_WINDOW_MS: u64 = 60_000;

fn adapter_path(dir: &Path, sha256: &str) -> PathBuf {
    dir.join("adapters").join(format!("{sha256}.safetensors"))
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn metrics_map(m: &[Metric]) -> BTreeMap<String, f64> {
    m.iter().map(|m| (m.name.clone(), m.value)).collect()
}

impl NodeActor for Promoter {
    const KIND: &'static str = "promoter";
    type Config = PromoterConfig;
    type Event = PromoterEvent;

    fn grants(fleet: &str, _robots: &[String]) -> crate::access::Grants {
        use nanobot_messages::topics;
        crate::access::Grants::default()
            .put([topics::ckpt_promoted(fleet)])
            .reply([topics::ckpt_adapter(fleet), topics::ckpt_control_all(fleet)])
    }

    async fn start(ctx: &Ctx<Self>, cfg: PromoterConfig) -> Result<Self, ActorError> {
        if !(cfg.announce_s > 0.0 && cfg.canary_hold_s >= 0.0 && cfg.rollout_ttl_s > cfg.announce_s) {
            return Err(ctx.config_error(
                "announce_s must be positive, canary_hold_s at least 0 and rollout_ttl_s above announce_s",
            ));
        }
        if cfg.condition != "fleet" {
            cfg.condition
                .parse::<Shift>()
                .map_err(|e| ctx.config_error(format!("condition: {e} (or \"fleet\")")))?;
        }
        let fleet = ctx.fleet().to_string();
        let state_dir = ctx.path(&cfg.state_dir);
        let keys = ctx.path(&cfg.keys);
        let key = if cfg.generate_key {
            SigningKey::load_or_generate(&keys)
        } else {
            SigningKey::load(&crate::keys::key_paths(&keys).0)
        }
        .map_err(|e| {
            ctx.config_error(format!(
                "fleet key: {e} (make one with `nanobot keys init {}`)",
                keys.display()
            ))
        })?;
        let mut operators = BTreeMap::new();
        for (name, path) in &cfg.operators {
            crate::keys::validate_operator(name).map_err(|e| ctx.config_error(format!("operators: {e}")))?;
            let k =
                TrustedKey::load(&ctx.path(path)).map_err(|e| ctx.config_error(format!("operators.{name}: {e}")))?;
            operators.insert(name.clone(), k);
        }
        if let Some(name) = &cfg.generate_operator {
            let k = SigningKey::load_or_generate_operator(&keys, name)
                .map_err(|e| ctx.config_error(format!("generate_operator: {e}")))?;
            let public = TrustedKey::from_hex(&k.public_hex()).ok_or_else(|| ctx.failed("operator key"))?;
            operators.insert(name.clone(), public);
        }
        let ledger_path = state_dir.join("ledger.jsonl");
        let ledger = Worker::spawn("nb-ledger".into(), move || Ledger::open(&ledger_path))
            .await
            .map_err(|e| ctx.failed(e))?;
        let (rollout, revoked) = ledger
            .call(|l| (l.rollout(), l.revoked()))
            .await
            .ok_or_else(|| ctx.failed("ledger thread ended"))?;
        let rollout = rollout.unwrap_or(Promoted::unsigned(0, None, None, Vec::new()));
        tracing::info!(
            generation = rollout.generation,
            fleet = rollout.fleet.as_ref().map(|m| m.adapter_id.as_str()).unwrap_or("base"),
            canary = rollout.canary.as_ref().map(|m| m.adapter_id.as_str()).unwrap_or("none"),
            key = %&key.public_hex()[..16],
            revoked = ?revoked,
            "promoter: rollout read back from the ledger"
        );
        let candidates = ctx
            .subscribe(
                "candidates",
                &topics::ckpt_candidate(&fleet),
                Keep::All { queue: 8 },
                Some(|| PromoterEvent::Candidate),
            )
            .await?;
        let statuses = ctx
            .subscribe(
                "statuses",
                &format!("{fleet}/*/policy"),
                Keep::All { queue: 1024 },
                Some(|| PromoterEvent::Status),
            )
            .await?;
        let events = ctx
            .subscribe(
                "events",
                &format!("{fleet}/*/event"),
                Keep::All { queue: 4096 },
                Some(|| PromoterEvent::Episode),
            )
            .await?;
        // The adapters' bytes, served from disk by a task of their own.
        let adapters = ctx
            .bus
            .queryable::<AdapterRequest>(&topics::ckpt_adapter(&fleet), 64)
            .await
            .map_err(ctx.bus_err())?;
        let dir = state_dir.clone();
        let bytes_server = tokio::spawn(async move {
            while let Some(req) = adapters.recv().await {
                let sha = req.msg.sha256.clone();
                if !is_sha256(&sha) {
                    let _ = req
                        .reply_err(&format!("sha256 {sha:?} is not 64 lower-case hex digits"))
                        .await;
                    continue;
                }
                let path = adapter_path(&dir, &sha);
                match tokio::task::spawn_blocking(move || std::fs::read(&path)).await {
                    Ok(Ok(data)) => {
                        let reply = AdapterBytes {
                            adapter_id: String::new(),
                            sha256: sha,
                            data: Blob::new(data),
                        };
                        if let Err(e) = req.reply("", &reply).await {
                            tracing::warn!(error = %e, "adapter bytes not sent");
                        }
                    }
                    _ => {
                        let _ = req.reply_err(&format!("no adapter with sha256 {sha}")).await;
                    }
                }
            }
        });
        let (feeder, control) = ctx.input("control", Keep::All { queue: 16 }, Some(|| PromoterEvent::Control));
        let queryable = ctx
            .bus
            .queryable::<CkptCommand>(&topics::ckpt_control_all(&fleet), 16)
            .await
            .map_err(ctx.bus_err())?;
        let control_server = tokio::spawn(async move {
            while let Some(req) = queryable.recv().await {
                feeder.push(req);
            }
        });
        let announce = ctx
            .publisher(&topics::ckpt_promoted(&fleet), "", PubQos::Sensor)
            .await?;
        ctx.every(Duration::from_secs_f64(cfg.announce_s));
        let me = Promoter {
            canary: rollout.canary.as_ref().map(|_| Canary::default()),
            cfg,
            state_dir,
            key,
            ledger,
            gates: None,
            candidates,
            statuses,
            events,
            control,
            announce,
            rollout,
            robots: BTreeMap::new(),
            seen: Vec::new(),
            intervened: BTreeMap::new(),
            reaching: None,
            waiting: None,
            last_latency_ms: 0.0,
            accepted: 0,
            refused: 0,
            robots_refused: 0,
            results_refused: 0,
            revoked,
            operators,
            commands_seen: Default::default(),
            _servers: [AbortOnDrop(bytes_server), AbortOnDrop(control_server)],
        };
        me.publish().await;
        Ok(me)
    }

    async fn handle(&mut self, ctx: &Ctx<Self>, input: Input<PromoterEvent>) -> Result<(), ActorError> {
        self.take_statuses(ctx).await?;
        self.take_events(ctx.fleet());
        while let Some(req) = self.control.take() {
            // A command counts only on its own key: access control decides who may send on
            // which (a wildcard or another command's key is refused, never carried out).
            let expected = topics::ckpt_control(ctx.fleet(), &req.msg.op);
            let outcome = if req.key() == expected {
                self.command(ctx, &req.msg).await
            } else {
                Err(format!(
                    "a {:?} command is sent on {expected}, not on {}",
                    req.msg.op,
                    req.key()
                ))
            };
            let reply = match outcome {
                Ok(json) => CkptReply { ok: true, json },
                Err(e) => CkptReply {
                    ok: false,
                    json: serde_json::json!({ "error": e }).to_string(),
                },
            };
            if let Err(e) = req.reply("", &reply).await {
                tracing::warn!(error = %e, "ckpt reply not sent");
            }
        }
        if let Some(r) = self.candidates.take() {
            self.judge(ctx, r.msg).await?;
            if self.candidates.peek(|_| ()).is_some() {
                ctx.sender().send(PromoterEvent::Candidate);
            }
        }
        if matches!(input, Input::Tick) {
            if self.waiting.is_some() && !self.robots.is_empty() {
                self.start_canary(ctx).await?;
            }
            self.watch_canary(ctx).await?;
            self.publish().await;
        }
        Ok(())
    }

    fn metrics(&self, m: &mut Metrics) {
        m.set("generation", self.rollout.generation as f64);
        m.set("accepted", self.accepted as f64);
        m.set("refused", self.refused as f64);
        m.set("canary", self.rollout.canary.is_some() as u8 as f64);
        m.set("robots", self.robots.len() as f64);
        m.set("robots_refused", self.robots_refused as f64);
        m.set("results_refused", self.results_refused as f64);
        m.set("promotion_ms", self.last_latency_ms);
    }
}

impl Promoter {
    /// Announce the rollout, signed whole with the fleet key, valid for `rollout_ttl_s`.
    async fn publish(&self) {
        let mut signed = self.rollout.clone();
        signed.revoked = self.revoked.clone();
        signed.expires_ms = now_ms() + (self.cfg.rollout_ttl_s * 1000.0) as u64;
        signed.signature = self.key.sign(&signed.signed_text());
        if let Err(e) = self.announce.put(&signed).await {
            tracing::warn!(error = %e, "rollout not published");
        }
    }

    async fn record(&self, ctx: &Ctx<Self>, r: Record) -> Result<(), ActorError> {
        self.ledger
            .call(move |l| l.append(r))
            .await
            .ok_or_else(|| ctx.failed("ledger thread ended"))?
            .map_err(|e| ctx.failed(format!("ledger: {e}")))
    }

    /// The condition candidates are judged under.
    fn condition(&self) -> Shift {
        if self.cfg.condition != "fleet" {
            return self.cfg.condition.parse().unwrap_or_default();
        }
        let mut votes: BTreeMap<&'static str, (usize, Shift)> = BTreeMap::new();
        for c in self.robots.values().filter_map(|r| r.condition) {
            votes.entry(c.name()).or_insert((0, c)).0 += 1;
        }
        votes
            .into_values()
            .max_by_key(|(n, _)| *n)
            .map(|(_, c)| c)
            .unwrap_or_default()
    }

    async fn gates(&mut self) -> Result<&Worker<Gates>, String> {
        if self.gates.is_none() {
            let (base, cfg) = (self.cfg.base.clone(), self.cfg.gates.clone());
            let gates = Worker::spawn("nb-gates".into(), move || {
                // Shadow simulation is background work: the robots' control loops come first.
                crate::runtime::lower_priority(10);
                Gates::open(&base, cfg)
            })
            .await
            .map_err(|e| format!("base {}: {e}", self.cfg.base.display()))?;
            self.gates = Some(gates);
            // The gates compare with what the fleet runs now.
            let current = self.rollout.fleet.clone();
            self.set_current(current.as_ref()).await?;
        }
        Ok(self.gates.as_ref().expect("opened above"))
    }

    async fn set_current(&self, m: Option<&AdapterManifest>) -> Result<(), String> {
        let Some(gates) = &self.gates else { return Ok(()) };
        let current = m.map(|m| {
            let ratio = m
                .metrics
                .iter()
                .find(|x| x.name == "held_out_ratio")
                .map(|x| x.value)
                .unwrap_or(1.0);
            (m.adapter_id.clone(), adapter_path(&self.state_dir, &m.sha256), ratio)
        });
        gates
            .call(move |g| match current {
                None => g.set_current(None),
                Some((id, path, ratio)) => {
                    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                    g.set_current(Some((&id, &bytes, ratio)))
                }
            })
            .await
            .ok_or("gates thread ended")?
    }

    async fn judge(&mut self, ctx: &Ctx<Self>, c: Candidate) -> Result<(), ActorError> {
        let bytes = c.adapter.to_bytes();
        let metrics = metrics_map(&c.metrics);
        self.record(
            ctx,
            Record::Candidate {
                t_ms: now_ms(),
                id: c.adapter_id.clone(),
                sha256: c.sha256.clone(),
                base_version: c.base_version.clone(),
                step: c.step,
                bytes: bytes.len() as u64,
                metrics: metrics.clone(),
            },
        )
        .await?;
        let condition = self.condition();
        let seen = self.seen.clone();
        let t0 = Instant::now();
        let dir = self.state_dir.clone();
        let verdict = match self.gates().await {
            Err(e) => Verdict {
                accepted: false,
                reason: e,
                metrics: BTreeMap::new(),
            },
            Ok(gates) => {
                let (id, base, sha) = (c.adapter_id.clone(), c.base_version.clone(), c.sha256.clone());
                gates
                    .call(move |g| {
                        let s = Submission {
                            id: &id,
                            base_version: &base,
                            sha256: &sha,
                            bytes: &bytes,
                            metrics: &metrics,
                        };
                        let v = g.judge_retaining(&s, condition, &seen);
                        // Its bytes are kept whenever they are what it claims (an operator may
                        // promote a refused candidate by hand).
                        if is_sha256(&sha) && nanobot_dataset::sha256_hex(&bytes) == sha {
                            if let Err(e) = nanobot_dataset::write_atomic(&adapter_path(&dir, &sha), &bytes) {
                                return Verdict {
                                    accepted: false,
                                    reason: format!("could not store it: {e}"),
                                    metrics: v.metrics,
                                };
                            }
                        }
                        v
                    })
                    .await
                    .ok_or_else(|| ctx.failed("gates thread ended"))?
            }
        };
        tracing::info!(
            id = %c.adapter_id,
            accepted = verdict.accepted,
            condition = condition.name(),
            ms = t0.elapsed().as_millis() as u64,
            "candidate judged: {}",
            verdict.reason
        );
        self.record(
            ctx,
            Record::Decision {
                t_ms: now_ms(),
                id: c.adapter_id.clone(),
                accepted: verdict.accepted,
                reason: verdict.reason.clone(),
                metrics: verdict.metrics.clone(),
            },
        )
        .await?;
        if !verdict.accepted {
            self.refused += 1;
            ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.accepted += 1;
        ctx.counters.handled.fetch_add(1, Ordering::Relaxed);
        let manifest = self.manifest(
            &c.adapter_id,
            &c.base_version,
            &c.sha256,
            c.adapter.len() as u64,
            &verdict.metrics,
        );
        if self.cfg.canary_robots == 0 {
            return self
                .change(
                    ctx,
                    Some(manifest),
                    None,
                    Vec::new(),
                    "promoted: passed the gates (canary_robots = 0)",
                )
                .await;
        }
        self.waiting = Some(manifest);
        self.start_canary(ctx).await
    }

    /// Give the accepted candidate to the canary robots (the first `canary_robots` of those
    /// heard from; the others keep what they run). Until a robot has been heard from, it waits:
    /// a promoter that just started knows no robot yet, and "no robot known" is never "no robot
    /// to keep safe". Even a canary that is every robot heard from goes through the hold, and
    /// robots not heard from yet keep the fleet's adapter until it holds up.
    async fn start_canary(&mut self, ctx: &Ctx<Self>) -> Result<(), ActorError> {
        let robots: Vec<String> = self.robots.keys().take(self.cfg.canary_robots).cloned().collect();
        if robots.is_empty() {
            if let Some(m) = &self.waiting {
                tracing::info!(id = %m.adapter_id, "accepted: its canary starts when a robot reports");
            }
            return Ok(());
        }
        let Some(manifest) = self.waiting.take() else {
            return Ok(());
        };
        let fleet = self.rollout.fleet.clone();
        self.change(ctx, fleet, Some(manifest), robots, "canary: passed the gates")
            .await
    }
}
