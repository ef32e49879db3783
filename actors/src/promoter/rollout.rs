//! The promoter's rollout: the signed manifest, changing what the fleet runs (canary first),
//! following the robots' reports and episodes, watching the canary and rolling it back.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use nanobot_messages::{AdapterManifest, EventKind, Metric, Promoted};
use nanobot_sim::Shift;

use super::ledger::{now_ms, Record, ROLLBACK};
use crate::runtime::{ActorError, Ctx};

use super::*;

/// A canary being watched.
#[derive(Default)]
pub(super) struct Canary {
    /// When every canary robot reported running it.
    pub(super) since: Option<Instant>,
    pub(super) wins: u32,
    pub(super) episodes: u32,
    pub(super) others_wins: u32,
    pub(super) others_episodes: u32,
}

/// What one robot reported.
pub(super) struct RobotView {
    pub(super) adapter_id: String,
    pub(super) generation: u64,
    pub(super) condition: Option<Shift>,
}

impl Promoter {
    pub(super) fn manifest(
        &self,
        id: &str,
        base: &str,
        sha256: &str,
        bytes: u64,
        metrics: &BTreeMap<String, f64>,
    ) -> AdapterManifest {
        let mut m = AdapterManifest {
            adapter_id: id.to_string(),
            base_version: base.to_string(),
            sha256: sha256.to_string(),
            bytes,
            metrics: metrics
                .iter()
                .map(|(k, v)| Metric {
                    name: k.clone(),
                    value: *v,
                })
                .collect(),
            signature: String::new(),
        };
        m.signature = self.key.sign(&m.signed_text());
        m
    }

    /// Change the rollout: ledger first, then the gates' reference, then the robots.
    pub(super) async fn change(
        &mut self,
        ctx: &Ctx<Self>,
        fleet: Option<AdapterManifest>,
        canary: Option<AdapterManifest>,
        canary_robots: Vec<String>,
        reason: &str,
    ) -> Result<(), ActorError> {
        let generation = self.rollout.generation + 1;
        self.record(
            ctx,
            Record::Rollout {
                t_ms: now_ms(),
                generation,
                fleet: fleet.clone(),
                canary: canary.clone(),
                canary_robots: canary_robots.clone(),
                reason: reason.to_string(),
            },
        )
        .await?;
        let fleet_changed = fleet.as_ref().map(|m| &m.sha256) != self.rollout.fleet.as_ref().map(|m| &m.sha256);
        super::ledger::revoke(
            &mut self.revoked,
            [self.rollout.fleet.as_ref(), self.rollout.canary.as_ref()],
            [fleet.as_ref(), canary.as_ref()],
            reason,
        );
        tracing::info!(
            generation,
            fleet = fleet.as_ref().map(|m| m.adapter_id.as_str()).unwrap_or("base"),
            canary = canary.as_ref().map(|m| m.adapter_id.as_str()).unwrap_or("none"),
            robots = ?canary_robots,
            "rollout: {reason}"
        );
        self.canary = canary.as_ref().map(|_| Canary::default());
        self.rollout = Promoted::unsigned(generation, fleet, canary, canary_robots);
        self.reaching = Some((generation, Instant::now()));
        self.publish().await;
        if fleet_changed {
            let current = self.rollout.fleet.clone();
            if let Err(e) = self.set_current(current.as_ref()).await {
                tracing::error!("gates keep comparing with the previous adapter: {e}");
            }
        }
        Ok(())
    }

    /// The robot a status or an event counts for: the one its key names, which a secured
    /// fleet's access control lets only that robot's own node publish on. One whose envelope
    /// claims another robot is refused and counted (`results_refused`).
    fn sender(&mut self, fleet: &str, key: &str, claimed: &str) -> Option<String> {
        match topics::robot_of(fleet, key) {
            Some(robot) if robot == claimed => Some(robot.to_string()),
            _ => {
                self.results_refused += 1;
                tracing::debug!(
                    key,
                    claimed,
                    "a result whose envelope names another robot than its key: refused"
                );
                None
            }
        }
    }

    pub(super) async fn take_statuses(&mut self, ctx: &Ctx<Self>) -> Result<(), ActorError> {
        let mut refused_by_canary = None;
        while let Some(r) = self.statuses.take() {
            let Some(robot) = self.sender(ctx.fleet(), r.key.as_str(), &r.header.robot) else {
                continue;
            };
            let s = r.msg;
            // A robot's name is what its status claims: a flood of names stops at the bound.
            if !self.robots.contains_key(&robot) && self.robots.len() >= self.cfg.max_robots {
                self.robots_refused += 1;
                continue;
            }
            let view = self.robots.entry(robot.clone()).or_insert(RobotView {
                adapter_id: String::new(),
                generation: 0,
                condition: None,
            });
            view.adapter_id = s.adapter_id.clone();
            view.generation = s.generation;
            if s.generation == self.rollout.generation && !s.last_error.is_empty() {
                if let Some(c) = &self.rollout.canary {
                    if self.rollout.canary_robots.contains(&robot) && s.adapter_id != c.adapter_id {
                        refused_by_canary = Some(format!("{robot} refused it: {}", s.last_error));
                    }
                }
            }
        }
        if let Some(why) = refused_by_canary {
            return self.roll_back_canary(ctx, &why).await;
        }
        // Everyone on the newest generation: the promotion latency.
        if let Some((generation, t0)) = self.reaching {
            let all = !self.robots.is_empty()
                && self.robots.iter().all(|(name, v)| {
                    let want = self
                        .rollout
                        .for_robot(name)
                        .map(|m| m.adapter_id.as_str())
                        .unwrap_or("");
                    v.generation >= generation && v.adapter_id == want
                });
            if all {
                self.reaching = None;
                self.last_latency_ms = t0.elapsed().as_secs_f64() * 1e3;
                tracing::info!(
                    generation,
                    robots = self.robots.len(),
                    ms = self.last_latency_ms,
                    "rollout reached every robot"
                );
                self.record(
                    ctx,
                    Record::Reached {
                        t_ms: now_ms(),
                        generation,
                        robots: self.robots.len(),
                        latency_ms: self.last_latency_ms,
                    },
                )
                .await?;
            }
        }
        if let (Some(canary), Some(m)) = (&mut self.canary, &self.rollout.canary) {
            if canary.since.is_none()
                && self.rollout.canary_robots.iter().all(|r| {
                    self.robots
                        .get(r)
                        .is_some_and(|v| v.adapter_id == m.adapter_id && v.generation >= self.rollout.generation)
                })
            {
                canary.since = Some(Instant::now());
            }
        }
        Ok(())
    }

    pub(super) fn take_events(&mut self, fleet: &str) {
        while let Some(r) = self.events.take() {
            let Some(robot) = self.sender(fleet, r.key.as_str(), &r.header.robot) else {
                continue;
            };
            match r.msg.event {
                EventKind::EpisodeStart { shift, .. } => {
                    if let (Some(v), Ok(s)) = (self.robots.get_mut(&robot), shift.parse::<Shift>()) {
                        v.condition = Some(s);
                        if !self.seen.contains(&s) {
                            self.seen.push(s);
                        }
                    }
                }
                // Only robots the promoter follows (their statuses, bounded) are remembered.
                EventKind::Intervention { active: true, .. } if self.robots.contains_key(&robot) => {
                    self.intervened.insert(robot, true);
                }
                EventKind::EpisodeEnd { success, .. } => {
                    let success = success && !self.intervened.remove(&robot).unwrap_or(false);
                    if let Some(c) = self.canary.as_mut().filter(|c| c.since.is_some()) {
                        if self.rollout.canary_robots.contains(&robot) {
                            c.episodes += 1;
                            c.wins += success as u32;
                        } else if self.robots.contains_key(&robot) {
                            c.others_episodes += 1;
                            c.others_wins += success as u32;
                        }
                    }
                }
                _ => {}
            }
        }
    }

    pub(super) async fn watch_canary(&mut self, ctx: &Ctx<Self>) -> Result<(), ActorError> {
        let (Some(c), Some(m)) = (&self.canary, &self.rollout.canary) else {
            return Ok(());
        };
        let Some(since) = c.since else { return Ok(()) };
        if since.elapsed().as_secs_f64() < self.cfg.canary_hold_s || c.episodes < self.cfg.canary_min_episodes {
            return Ok(());
        }
        let others = (c.others_episodes > 0).then(|| c.others_wins as f64 / c.others_episodes as f64);
        // Without episodes on one side there is no evidence against the canary.
        let rate = if c.episodes > 0 {
            c.wins as f64 / c.episodes as f64
        } else {
            others.unwrap_or(1.0)
        };
        let others = others.unwrap_or(rate);
        if rate < others - self.cfg.rollback_drop {
            let why = format!(
                "canary success {:.0} % ({} episodes) fell below the fleet's {:.0} %",
                100.0 * rate,
                c.episodes,
                100.0 * others
            );
            return self.roll_back_canary(ctx, &why).await;
        }
        let m = m.clone();
        let reason = format!(
            "promoted: the canary held up ({:.0} % of {} episodes, the fleet {:.0} %)",
            100.0 * rate,
            c.episodes,
            100.0 * others
        );
        self.change(ctx, Some(m), None, Vec::new(), &reason).await
    }

    pub(super) async fn roll_back_canary(&mut self, ctx: &Ctx<Self>, why: &str) -> Result<(), ActorError> {
        ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("canary rolled back: {why}");
        let fleet = self.rollout.fleet.clone();
        self.change(ctx, fleet, None, Vec::new(), &format!("{ROLLBACK}: {why}"))
            .await
    }
}
