//! The promoter's ledger: every candidate, every decision and every change of the rollout, one
//! JSON line each, appended and fsynced before anyone acts on it. It is the promoter's memory:
//! after a restart, or `kill -9`, the rollout and its history are read back from it. A line cut
//! short by a crash (no newline) is cut off at reopen; any other unreadable line is counted and
//! skipped, never fatal.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use nanobot_messages::{AdapterManifest, Promoted};
use serde::{Deserialize, Serialize};

/// How the reason of a rollout that rolls back starts.
pub const ROLLBACK: &str = "rollback";

/// One ledger line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A candidate arrived.
    Candidate {
        t_ms: u64,
        id: String,
        sha256: String,
        base_version: String,
        step: u64,
        bytes: u64,
        metrics: BTreeMap<String, f64>,
    },
    /// What the gates (or an operator) made of it.
    Decision {
        t_ms: u64,
        id: String,
        accepted: bool,
        reason: String,
        metrics: BTreeMap<String, f64>,
    },
    /// The rollout changed: what every robot, and the canary robots, run now.
    Rollout {
        t_ms: u64,
        generation: u64,
        fleet: Option<AdapterManifest>,
        canary: Option<AdapterManifest>,
        canary_robots: Vec<String>,
        reason: String,
    },
    /// Every robot the promoter knows reported running a generation's adapters.
    Reached {
        t_ms: u64,
        generation: u64,
        robots: usize,
        latency_ms: f64,
    },
}

impl Record {
    pub fn id(&self) -> Option<&str> {
        match self {
            Record::Candidate { id, .. } | Record::Decision { id, .. } => Some(id),
            Record::Rollout { fleet, canary, .. } => canary.as_ref().or(fleet.as_ref()).map(|m| m.adapter_id.as_str()),
            Record::Reached { .. } => None,
        }
    }
}

/// Adapters named in the newest rollout only, announced as revoked so that no robot runs them
/// again; older ones fall off (a robot refuses a revoked adapter only while it is listed).
pub const MAX_REVOKED: usize = 64;

/// One rollout's change to the revoked list: a rollback revokes what it takes off the robots
/// (`old`, the fleet and canary adapters before it); promoting an adapter again lifts it.
pub fn revoke(
    revoked: &mut Vec<String>,
    old: [Option<&AdapterManifest>; 2],
    new: [Option<&AdapterManifest>; 2],
    reason: &str,
) {
    let in_new = |id: &str| new.iter().any(|n| n.is_some_and(|n| n.adapter_id == id));
    if reason.starts_with(ROLLBACK) {
        for m in old.into_iter().flatten() {
            if !in_new(&m.adapter_id) && !revoked.contains(&m.adapter_id) {
                revoked.push(m.adapter_id.clone());
            }
        }
        let excess = revoked.len().saturating_sub(MAX_REVOKED);
        revoked.drain(..excess);
    }
    revoked.retain(|id| !in_new(id));
}

pub struct Ledger {
    path: PathBuf,
    file: File,
    records: Vec<Record>,
    /// Lines that could not be read back (besides a torn last line).
    pub unreadable: usize,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", path.display())
}

impl Ledger {
    /// Open (or create) the ledger at `path` and read back what it holds.
    pub fn open(path: &Path) -> Result<Ledger, String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        }
        let text = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(path, e)),
        };
        // A torn last line (the crash came mid-write) is cut off.
        let complete = text.iter().rposition(|&b| b == b'\n').map(|i| i + 1).unwrap_or(0);
        let torn = complete < text.len();
        let mut records = Vec::new();
        let mut unreadable = 0;
        for (n, line) in text[..complete].split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<Record>(line) {
                Ok(r) => records.push(r),
                Err(e) => {
                    unreadable += 1;
                    tracing::warn!("{}:{}: ledger line skipped: {e}", path.display(), n + 1);
                }
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| io_err(path, e))?;
        if torn {
            tracing::warn!(
                "{}: a torn last line ({} bytes) cut off",
                path.display(),
                text.len() - complete
            );
            file.set_len(complete as u64).map_err(|e| io_err(path, e))?;
            file.sync_all().map_err(|e| io_err(path, e))?;
        }
        if let Some(dir) = path.parent() {
            let _ = nanobot_dataset::sync_dir(dir);
        }
        Ok(Ledger {
            path: path.to_path_buf(),
            file,
            records,
            unreadable,
        })
    }

    /// Append `r` and fsync it: when this returns, the record survives a crash.
    pub fn append(&mut self, r: Record) -> Result<(), String> {
        let mut line = serde_json::to_vec(&r).map_err(|e| io_err(&self.path, e))?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|_| self.file.sync_data())
            .map_err(|e| io_err(&self.path, e))?;
        self.records.push(r);
        Ok(())
    }

    pub fn records(&self) -> &[Record] {
        &self.records
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The newest rollout.
    pub fn rollout(&self) -> Option<Promoted> {
        self.records.iter().rev().find_map(|r| match r {
            Record::Rollout {
                generation,
                fleet,
                canary,
                canary_robots,
                ..
            } => Some(Promoted::unsigned(
                *generation,
                fleet.clone(),
                canary.clone(),
                canary_robots.clone(),
            )),
            _ => None,
        })
    }

    /// The adapters the rollouts so far revoked, oldest first, as the promoter announced them
    /// before a restart: replayed from the ledger with the same rule ([`revoke`]).
    pub fn revoked(&self) -> Vec<String> {
        let mut revoked = Vec::new();
        let mut current: [Option<&AdapterManifest>; 2] = [None, None];
        for r in &self.records {
            if let Record::Rollout {
                fleet, canary, reason, ..
            } = r
            {
                let new = [fleet.as_ref(), canary.as_ref()];
                revoke(&mut revoked, current, new, reason);
                current = new;
            }
        }
        revoked
    }

    /// What the fleet ran before its current adapter (a rollback's target): `Some(None)` is
    /// the base alone; `None` when there is nothing to go back to. A rollback undoes the
    /// promotion it rolled back, so two rollbacks go back two steps.
    pub fn previous_fleet(&self) -> Option<Option<AdapterManifest>> {
        let mut stack: Vec<Option<&AdapterManifest>> = vec![None];
        for r in &self.records {
            if let Record::Rollout { fleet, reason, .. } = r {
                let id = fleet.as_ref().map(|m| &m.adapter_id);
                if reason.starts_with(ROLLBACK) {
                    while stack.len() > 1 && stack.last().map(|f| f.map(|m| &m.adapter_id)) != Some(id) {
                        stack.pop();
                    }
                } else if stack.last().map(|f| f.map(|m| &m.adapter_id)) != Some(id) {
                    stack.push(fleet.as_ref());
                }
            }
        }
        (stack.len() >= 2).then(|| stack[stack.len() - 2].cloned())
    }

    /// Every record about adapter `id`.
    pub fn about(&self, id: &str) -> Vec<&Record> {
        self.records.iter().filter(|r| r.id() == Some(id)).collect()
    }

    /// One line per candidate: `(id, step, decision)`, oldest first.
    pub fn summary(&self) -> Vec<serde_json::Value> {
        let mut out: Vec<serde_json::Value> = Vec::new();
        for r in &self.records {
            match r {
                Record::Candidate {
                    id,
                    step,
                    sha256,
                    metrics,
                    ..
                } => out.push(serde_json::json!({
                    "id": id, "step": step, "sha256": sha256, "metrics": metrics, "decision": "pending",
                })),
                Record::Decision {
                    id, accepted, reason, ..
                } => {
                    if let Some(v) = out.iter_mut().rev().find(|v| v["id"] == id.as_str()) {
                        v["decision"] = serde_json::json!(if *accepted { "accepted" } else { "refused" });
                        v["reason"] = serde_json::json!(reason);
                    }
                }
                _ => {}
            }
        }
        out
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(id: &str) -> AdapterManifest {
        AdapterManifest {
            adapter_id: id.into(),
            base_version: "b".into(),
            sha256: "00".repeat(32),
            bytes: 1,
            metrics: vec![],
            signature: String::new(),
        }
    }

    fn rollout(generation: u64, fleet: Option<&str>) -> Record {
        change(generation, fleet, "promoted")
    }

    fn change(generation: u64, fleet: Option<&str>, reason: &str) -> Record {
        Record::Rollout {
            t_ms: 0,
            generation,
            fleet: fleet.map(manifest),
            canary: None,
            canary_robots: vec![],
            reason: reason.into(),
        }
    }

    #[test]
    fn a_torn_line_is_cut_off_and_the_rest_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        {
            let mut l = Ledger::open(&path).unwrap();
            l.append(rollout(1, Some("a"))).unwrap();
            l.append(rollout(2, Some("b"))).unwrap();
        }
        // A crash mid-append, and a line somebody mangled.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"not json\n{\"kind\":\"rollout\",\"t_ms\":0,\"gen")
            .unwrap();
        drop(f);
        let mut l = Ledger::open(&path).unwrap();
        assert_eq!(l.records().len(), 2);
        assert_eq!(l.unreadable, 1);
        assert_eq!(l.rollout().unwrap().generation, 2);
        l.append(rollout(3, None)).unwrap();
        let l = Ledger::open(&path).unwrap();
        assert_eq!(l.records().len(), 3, "appends after the cut are whole lines");
        assert_eq!(l.rollout().unwrap().generation, 3);
    }

    #[test]
    fn a_rollback_goes_to_the_fleet_adapter_before_the_current_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(&dir.path().join("l.jsonl")).unwrap();
        assert_eq!(l.previous_fleet(), None, "nothing promoted: nothing to roll back");
        l.append(rollout(1, Some("a"))).unwrap();
        assert_eq!(l.previous_fleet(), Some(None), "back to the base");
        l.append(rollout(2, Some("b"))).unwrap();
        l.append(rollout(3, Some("b"))).unwrap();
        assert_eq!(l.previous_fleet().unwrap().unwrap().adapter_id, "a");
        l.append(change(4, Some("a"), "rollback by an operator")).unwrap();
        assert_eq!(
            l.previous_fleet(),
            Some(None),
            "a second rollback goes to the base, not to b"
        );
        l.append(change(5, None, "rollback by an operator")).unwrap();
        assert_eq!(l.previous_fleet(), None);
    }

    #[test]
    fn what_a_rollback_revoked_is_read_back_after_a_restart_until_promoted_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.jsonl");
        {
            let mut l = Ledger::open(&path).unwrap();
            l.append(rollout(1, Some("a"))).unwrap();
            l.append(rollout(2, Some("b"))).unwrap();
            assert!(l.revoked().is_empty(), "promotions revoke nothing");
            l.append(change(3, Some("a"), "rollback by operator alice")).unwrap();
        }
        // As a restarted promoter reads it.
        let mut l = Ledger::open(&path).unwrap();
        assert_eq!(l.revoked(), ["b"]);
        l.append(change(4, None, "rollback by operator alice")).unwrap();
        assert_eq!(l.revoked(), ["b", "a"]);
        l.append(rollout(5, Some("b"))).unwrap();
        assert_eq!(l.revoked(), ["a"], "promoting b again lifts its revocation");
    }
}
