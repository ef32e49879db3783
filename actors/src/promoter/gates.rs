//! The gates a candidate adapter passes before any robot runs it, in order (the first that
//! fails refuses it, and says why):
//!
//! 1. its bytes are what it claims (sha256) and it was trained on the base the fleet runs;
//! 2. it loads on that base: the adapter's config, every tensor present with its shape, all
//!    finite;
//! 3. held-out loss: its held-out loss relative to the base's, measured on the same windows,
//!    no worse than the current adapter's by more than `held_out_tolerance`;
//! 4. shadow success: closed-loop success in the simulator under the condition the fleet
//!    reports, on fixed seeds, above the current adapter's by `margin`;
//! 5. retention (the forgetting guard): under each earlier condition, success may not drop
//!    below the current adapter's by more than `max_drop`, measured on worlds of its own
//!    (`retention_seeds`), kept apart from the shadow worlds: a candidate that learned the
//!    shadow worlds cannot pass the guard on them.
//!
//! The current adapter's shadow figures are kept per condition until it changes. Everything here
//! runs on the promoter's own thread.

use std::collections::BTreeMap;
use std::path::Path;

use nanobot_policy::runner::Runner;
use nanobot_sim::Shift;

use crate::shadow::{evaluate, Driver, ShadowConfig, ShadowReport};

/// The gates' settings.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GateConfig {
    /// How much worse (relative to the base's loss on the same windows) a candidate's held-out
    /// loss may be than the current adapter's.
    pub held_out_tolerance: f64,
    /// Shadow success under the fleet's condition must beat the current adapter's by this.
    pub margin: f64,
    /// Conditions the fleet has seen before, whose success a candidate must keep.
    pub retention: Vec<Shift>,
    /// Also keep every condition the promoter has seen the fleet under since it started (a
    /// fleet taken through a sequence of conditions keeps each earlier one).
    pub retain_seen: bool,
    /// How far success under a retention condition may drop.
    pub max_drop: f64,
    /// The worlds the forgetting guard measures on (the shadow settings otherwise); none: the
    /// shadow worlds.
    pub retention_seeds: Vec<u64>,
    pub shadow: ShadowConfig,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            held_out_tolerance: 0.05,
            margin: 0.05,
            retention: vec![Shift::None],
            retain_seen: true,
            max_drop: 0.05,
            retention_seeds: vec![2000, 2001],
            shadow: ShadowConfig {
                seeds: vec![1000, 1001],
                episodes_per_seed: 5,
                ..ShadowConfig::default()
            },
        }
    }
}

/// What the gates made of a candidate.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub accepted: bool,
    pub reason: String,
    /// The figures measured: `held_out_ratio`, `shadow_success.{condition}` (and the current
    /// adapter's as `current_success.{condition}`), `retention_success.{condition}` (and
    /// `current_retention_success.{condition}`) on the retention worlds.
    pub metrics: BTreeMap<String, f64>,
}

/// A candidate as the gates see it.
pub struct Submission<'a> {
    pub id: &'a str,
    pub base_version: &'a str,
    pub sha256: &'a str,
    pub bytes: &'a [u8],
    /// The trainer's figures (`held_out_loss`, `held_out_loss_base`, ...).
    pub metrics: &'a BTreeMap<String, f64>,
}

/// A candidate's held-out loss relative to the base's on the same windows (the trainer's
/// `held_out_loss` / `held_out_loss_base`).
pub fn held_out_ratio(metrics: &BTreeMap<String, f64>) -> Result<f64, String> {
    let (Some(loss), Some(base_loss)) = (metrics.get("held_out_loss"), metrics.get("held_out_loss_base")) else {
        return Err("no held_out_loss / held_out_loss_base in its metrics".into());
    };
    if !(loss.is_finite() && base_loss.is_finite() && *base_loss > 0.0) {
        return Err(format!("held-out losses {loss} / {base_loss} are not usable"));
    }
    Ok(loss / base_loss)
}

/// Which worlds a figure was measured on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Worlds {
    Shadow,
    Retention,
}

pub struct Gates {
    cfg: GateConfig,
    base: Runner,
    /// The adapter the fleet runs: `(id, runner, held-out ratio)`; `None` is the base alone.
    current: Option<(String, Runner, f64)>,
    /// Figures of the current adapter, by world set and condition.
    current_shadow: BTreeMap<(Worlds, &'static str), ShadowReport>,
}

impl Gates {
    pub fn open(base: &Path, cfg: GateConfig) -> Result<Gates, String> {
        let base = Runner::load(base, None).map_err(|e| e.to_string())?;
        Ok(Gates {
            cfg,
            base,
            current: None,
            current_shadow: BTreeMap::new(),
        })
    }

    pub fn base_version(&self) -> &str {
        &self.base.meta.version
    }

    /// Make `bytes` (adapter `id`, with its held-out ratio) the adapter the candidates are
    /// compared with; `None` is the base alone.
    pub fn set_current(&mut self, current: Option<(&str, &[u8], f64)>) -> Result<(), String> {
        self.current = match current {
            None => None,
            Some((id, bytes, ratio)) => Some((
                id.to_string(),
                self.base.with_adapter_bytes(bytes, id).map_err(|e| e.to_string())?,
                ratio,
            )),
        };
        self.current_shadow.clear();
        Ok(())
    }

    pub fn current_id(&self) -> Option<&str> {
        self.current.as_ref().map(|(id, _, _)| id.as_str())
    }

    /// Check an adapter's bytes against its claims and load it on the base (gates 1 and 2).
    pub fn load(&self, s: &Submission) -> Result<Runner, String> {
        let sha = nanobot_dataset::sha256_hex(s.bytes);
        if sha != s.sha256 {
            return Err(format!(
                "sha256 of its {} bytes is {sha}, it claims {}",
                s.bytes.len(),
                s.sha256
            ));
        }
        if s.base_version != self.base_version() {
            return Err(format!(
                "trained on base {:?}, the fleet runs {:?}",
                s.base_version,
                self.base_version()
            ));
        }
        self.base.with_adapter_bytes(s.bytes, s.id).map_err(|e| e.to_string())
    }

    /// The shadow settings on `worlds`.
    fn settings(&self, worlds: Worlds) -> ShadowConfig {
        let mut cfg = self.cfg.shadow.clone();
        if worlds == Worlds::Retention && !self.cfg.retention_seeds.is_empty() {
            cfg.seeds = self.cfg.retention_seeds.clone();
        }
        cfg
    }

    fn current_report(&mut self, condition: Shift, worlds: Worlds) -> Result<ShadowReport, String> {
        if let Some(r) = self.current_shadow.get(&(worlds, condition.name())) {
            return Ok(r.clone());
        }
        let runner = self.current.as_ref().map(|(_, r, _)| r).unwrap_or(&self.base);
        let r = evaluate(&Driver::Policy(runner), condition, &self.settings(worlds)).map_err(|e| e.to_string())?;
        self.current_shadow.insert((worlds, condition.name()), r.clone());
        Ok(r)
    }

    /// Run every gate on a candidate under the fleet's `condition`.
    pub fn judge(&mut self, s: &Submission, condition: Shift) -> Verdict {
        self.judge_retaining(s, condition, &[])
    }

    /// [`judge`](Self::judge), keeping `seen` (the conditions the fleet has been under) as
    /// well as the configured retention conditions when `retain_seen` is set.
    pub fn judge_retaining(&mut self, s: &Submission, condition: Shift, seen: &[Shift]) -> Verdict {
        let mut metrics = BTreeMap::new();
        let refuse = |reason: String, metrics| Verdict {
            accepted: false,
            reason,
            metrics,
        };
        let runner = match self.load(s) {
            Ok(r) => r,
            Err(e) => return refuse(e, metrics),
        };
        // 3. Held-out loss, relative to the base's on the same windows.
        let ratio = match held_out_ratio(s.metrics) {
            Ok(r) => r,
            Err(e) => return refuse(e, metrics),
        };
        let current_ratio = self.current.as_ref().map(|(_, _, r)| *r).unwrap_or(1.0);
        metrics.insert("held_out_ratio".into(), ratio);
        metrics.insert("current_held_out_ratio".into(), current_ratio);
        if ratio > current_ratio + self.cfg.held_out_tolerance {
            return refuse(
                format!(
                    "held-out loss {ratio:.3}× the base's, the current adapter's is {current_ratio:.3}× (tolerance {})",
                    self.cfg.held_out_tolerance
                ),
                metrics,
            );
        }
        // 4. Shadow success under the fleet's condition.
        let shadow = |runner: &Runner, c: Shift| {
            evaluate(&Driver::Policy(runner), c, &self.cfg.shadow).map_err(|e| e.to_string())
        };
        let mine = match shadow(&runner, condition) {
            Ok(r) => r,
            Err(e) => return refuse(e, metrics),
        };
        let theirs = match self.current_report(condition, Worlds::Shadow) {
            Ok(r) => r,
            Err(e) => return refuse(e, metrics),
        };
        metrics.insert(format!("shadow_success.{}", condition.name()), mine.success_rate());
        metrics.insert(format!("shadow_steps.{}", condition.name()), mine.mean_steps);
        metrics.insert(format!("current_success.{}", condition.name()), theirs.success_rate());
        if mine.success_rate() < theirs.success_rate() + self.cfg.margin {
            return refuse(
                format!(
                    "shadow success under {} {:.0} % is not {:.0} points above the current adapter's {:.0} %",
                    condition.name(),
                    100.0 * mine.success_rate(),
                    100.0 * self.cfg.margin,
                    100.0 * theirs.success_rate()
                ),
                metrics,
            );
        }
        // 5. Retention of earlier conditions, on the retention worlds.
        let retention = self.settings(Worlds::Retention);
        let mut keep = self.cfg.retention.clone();
        if self.cfg.retain_seen {
            keep.extend(seen.iter().filter(|c| !self.cfg.retention.contains(c)));
        }
        for c in keep {
            if c == condition {
                continue;
            }
            let (mine, theirs) = match (
                evaluate(&Driver::Policy(&runner), c, &retention).map_err(|e| e.to_string()),
                self.current_report(c, Worlds::Retention),
            ) {
                (Ok(m), Ok(t)) => (m, t),
                (Err(e), _) | (_, Err(e)) => return refuse(e, metrics),
            };
            metrics.insert(format!("retention_success.{}", c.name()), mine.success_rate());
            metrics.insert(format!("current_retention_success.{}", c.name()), theirs.success_rate());
            if mine.success_rate() < theirs.success_rate() - self.cfg.max_drop {
                return refuse(
                    format!(
                        "forgets {}: success {:.0} % on the retention worlds, the current adapter's {:.0} % (may drop {:.0} points)",
                        c.name(),
                        100.0 * mine.success_rate(),
                        100.0 * theirs.success_rate(),
                        100.0 * self.cfg.max_drop
                    ),
                    metrics,
                );
            }
        }
        Verdict {
            accepted: true,
            reason: format!(
                "passed: held-out {ratio:.3}× base, {} success {:.0} % vs {:.0} %",
                condition.name(),
                100.0 * mine.success_rate(),
                100.0 * theirs.success_rate()
            ),
            metrics,
        }
    }
}
