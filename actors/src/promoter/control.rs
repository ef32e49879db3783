//! The promoter's control plane: `nanobot ckpt list | show ID | promote ID | rollback`, asked on
//! `{fleet}/ckpt/control/{op}`.

use std::collections::BTreeMap;

use nanobot_messages::CkptCommand;

use super::gates::Submission;
use super::ledger::{now_ms, Record, ROLLBACK};
use crate::runtime::Ctx;

use super::*;

impl Promoter {
    /// Who sent a state-changing command: an operator this promoter trusts, whose signature
    /// over the command verifies, made within `COMMAND_WINDOW_MS` of now and not seen before.
    fn operator_of(&mut self, fleet: &str, cmd: &CkptCommand) -> Result<String, String> {
        let name = &cmd.operator;
        if name.is_empty() || cmd.signature.is_empty() {
            return Err(format!(
                "{} changes what the fleet runs: it must be signed by an operator (nanobot ckpt {} --operator NAME)",
                cmd.op, cmd.op
            ));
        }
        let Some(key) = self.operators.get(name) else {
            return Err(format!(
                "operator {name:?} is not one this promoter trusts (its `operators`)"
            ));
        };
        key.verify(&cmd.signed_text(fleet), &cmd.signature)
            .map_err(|e| format!("operator {name:?}: the command's signature does not verify ({e})"))?;
        let now = now_ms();
        if now.abs_diff(cmd.issued_ms) > COMMAND_WINDOW_MS {
            return Err(format!(
                "operator {name:?}: the command was signed {} s from now; sign it again (or check the clocks)",
                now.abs_diff(cmd.issued_ms) / 1000
            ));
        }
        self.commands_seen
            .retain(|(t, _)| now.abs_diff(*t) <= COMMAND_WINDOW_MS);
        if self.commands_seen.iter().any(|(_, s)| *s == cmd.signature) {
            return Err(format!(
                "operator {name:?}: this signed command was carried out already (a replay)"
            ));
        }
        self.commands_seen.push_back((cmd.issued_ms, cmd.signature.clone()));
        Ok(name.clone())
    }

    pub(super) async fn command(&mut self, ctx: &Ctx<Self>, cmd: &CkptCommand) -> Result<String, String> {
        let by = if cmd.changes_state() {
            self.operator_of(ctx.fleet(), cmd)?
        } else {
            String::new()
        };
        let rollout = serde_json::json!({
            "generation": self.rollout.generation,
            "fleet": self.rollout.fleet.as_ref().map(|m| &m.adapter_id),
            "canary": self.rollout.canary.as_ref().map(|m| &m.adapter_id),
            "canary_robots": self.rollout.canary_robots,
            "robots": self.robots.iter().map(|(k, v)| (k.clone(), serde_json::json!({
                "adapter": v.adapter_id, "generation": v.generation,
                "condition": v.condition.map(|c| c.name()),
            }))).collect::<BTreeMap<_, _>>(),
            "promotion_ms": self.last_latency_ms,
        });
        match cmd.op.as_str() {
            "list" => {
                let candidates = self.ledger.call(|l| l.summary()).await.ok_or("ledger thread ended")?;
                Ok(serde_json::json!({ "rollout": rollout, "candidates": candidates }).to_string())
            }
            "show" => {
                let id = cmd.id.clone();
                let records = self
                    .ledger
                    .call(move |l| l.about(&id).into_iter().cloned().collect::<Vec<_>>())
                    .await
                    .ok_or("ledger thread ended")?;
                if records.is_empty() {
                    return Err(format!("no candidate {:?} in the ledger", cmd.id));
                }
                Ok(serde_json::json!({ "id": cmd.id, "records": records }).to_string())
            }
            "promote" => {
                let id = cmd.id.clone();
                let found = self
                    .ledger
                    .call(move |l| {
                        l.records().iter().rev().find_map(|r| match r {
                            Record::Candidate {
                                id: i,
                                sha256,
                                base_version,
                                bytes,
                                metrics,
                                ..
                            } if *i == id => Some((sha256.clone(), base_version.clone(), *bytes, metrics.clone())),
                            _ => None,
                        })
                    })
                    .await
                    .ok_or("ledger thread ended")?;
                let Some((sha, base, len, metrics)) = found else {
                    return Err(format!("no candidate {:?} in the ledger", cmd.id));
                };
                let path = adapter_path(&self.state_dir, &sha);
                let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                let (id, b, s) = (cmd.id.clone(), base.clone(), sha.clone());
                let m2 = metrics.clone();
                self.gates()
                    .await?
                    .call(move |g| {
                        g.load(&Submission {
                            id: &id,
                            base_version: &b,
                            sha256: &s,
                            bytes: &bytes,
                            metrics: &m2,
                        })
                        .map(|_| ())
                    })
                    .await
                    .ok_or("gates thread ended")??;
                let mut gate_metrics = metrics;
                if let Ok(ratio) = gates::held_out_ratio(&gate_metrics) {
                    gate_metrics.insert("held_out_ratio".into(), ratio);
                }
                self.record(
                    ctx,
                    Record::Decision {
                        t_ms: now_ms(),
                        id: cmd.id.clone(),
                        accepted: true,
                        reason: format!("promoted by operator {by}"),
                        metrics: BTreeMap::new(),
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
                let m = self.manifest(&cmd.id, &base, &sha, len, &gate_metrics);
                self.change(ctx, Some(m), None, Vec::new(), &format!("promoted by operator {by}"))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(serde_json::json!({ "promoted": cmd.id, "generation": self.rollout.generation }).to_string())
            }
            "rollback" => {
                let target = self
                    .ledger
                    .call(|l| l.previous_fleet())
                    .await
                    .ok_or("ledger thread ended")?;
                let Some(target) = target else {
                    return Err("nothing to roll back: the fleet runs the base and always has".into());
                };
                let to = target
                    .as_ref()
                    .map(|m| m.adapter_id.clone())
                    .unwrap_or_else(|| "base".into());
                self.change(ctx, target, None, Vec::new(), &format!("{ROLLBACK} by operator {by}"))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(serde_json::json!({ "rolled_back_to": to, "generation": self.rollout.generation }).to_string())
            }
            other => Err(format!("unknown op {other:?}: list, show, promote or rollback")),
        }
    }
}
