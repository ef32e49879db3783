//! Rejected frames: warned about at a bounded rate per robot and reason, and published on
//! `{fleet}/{robot}/rejects` for engineers.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nanobot_messages::{topics, Reject};

use crate::bus::{Bus, PubQos, Publisher};

/// Rate-limits warnings per (robot, reason).
#[derive(Default)]
pub struct RejectLog {
    last: HashMap<(String, String), Instant>,
}

impl RejectLog {
    pub fn warn(&mut self, robot: &str, r: &Reject, every: Duration) {
        let key = (robot.to_string(), r.reason.clone());
        if self.last.get(&key).is_none_or(|t| t.elapsed() >= every) {
            self.last.insert(key, Instant::now());
            tracing::warn!(robot, sensor = %r.sensor, reason = %r.reason, seq = r.seq, total = r.count, "frame rejected: {}", r.detail);
        }
    }
}

/// The rejects publishers of every robot seen, and the rate-limited log.
pub struct RejectsOut {
    bus: Bus,
    publishers: HashMap<String, Publisher<Reject>>,
    log: RejectLog,
    every: Duration,
}

impl RejectsOut {
    pub fn new(bus: Bus, every: Duration) -> RejectsOut {
        RejectsOut {
            bus,
            publishers: HashMap::new(),
            log: RejectLog::default(),
            every,
        }
    }

    /// Log (rate-limited) and publish one reject of `robot`.
    pub async fn publish(&mut self, robot: &str, reject: &Reject) {
        self.log.warn(robot, reject, self.every);
        if topics::validate_name("robot", robot).is_err() {
            return;
        }
        if !self.publishers.contains_key(robot) {
            let key = topics::rejects(self.bus.fleet(), robot);
            if let Ok(p) = self.bus.publisher(&key, robot, PubQos::Control).await {
                self.publishers.insert(robot.to_string(), p);
            }
        }
        if let Some(p) = self.publishers.get(robot) {
            let _ = p.put(reject).await;
        }
    }
}
