//! `spool`: store-and-forward on the robot's node. Every observation (`{fleet}/{robot}/obs`)
//! and event (`{fleet}/{robot}/event`) the robot produces is appended to a durable spool on
//! the robot's own disk (fsynced, within a disk budget) and sent on to the logger
//! (`{fleet}/log/{robot}/spool`), each with the mark of the one before it in its stream. The
//! logger takes a message only when it follows the last it holds, and acknowledges
//! (`{fleet}/log/{robot}/ack`) what is durable; the spool then deletes what is acknowledged.
//! When the logger restarts or a partition heals, its next acknowledgement (one every half
//! second at least) shows what it lacks, and the spool sends again from there, in order:
//! nothing is lost and nothing is stored twice.
//!
//! The spool is an actor of its own: the robot's control loop never waits for it. At most
//! `window` messages per stream are in flight before an acknowledgement; sends drop on a
//! congested link rather than stall (they are sent again). Past `max_mb` on disk the spool
//! either drops its oldest messages (`on_full = "drop_oldest"`: counted, and announced on
//! `{fleet}/{robot}/rejects`) or keeps them and refuses new ones (`"stop"`: counted, an alarm
//! in its Stats and on the rejects topic).

pub mod log;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nanobot_messages::{topics, Blob, LogAck, Reject, SpoolStream, Spooled, StreamMark};
use serde::Deserialize;

use self::log::{SpoolError, SpoolLog};
use crate::bus::{Inbox, Keep, PubQos, Publisher, RawSample, Received};
use crate::runtime::{ActorError, Ctx, Input, Metrics, NodeActor, Worker};

/// What the spool does when its disk budget is spent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Delete the oldest messages (acknowledged or not) to make room: counted, announced.
    #[default]
    DropOldest,
    /// Keep every message spooled and refuse new ones until the logger acknowledges: counted,
    /// and an alarm until there is room again.
    Stop,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// The spool's directory on the robot's node; `{fleet}` and `{robot}` expand.
    pub dir: String,
    /// Disk budget for both streams together.
    pub max_mb: f64,
    pub on_full: OnFull,
    /// Segment file size: acknowledged messages are deleted a segment at a time.
    pub segment_kb: u64,
    /// Messages per stream sent and not yet acknowledged, at most.
    pub window: u64,
    /// Messages sent this long ago and still not acknowledged are sent again, from the first
    /// one the logger lacks, when the logger is heard from.
    pub resend_after_ms: u64,
    /// Arrivals queued between Zenoh and the spool (inputs `obs` and `events`); a full queue
    /// drops and counts.
    pub queue: usize,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: "state/{fleet}/spool/{robot}".into(),
            max_mb: 256.0,
            on_full: OnFull::DropOldest,
            segment_kb: 1024,
            window: 512,
            resend_after_ms: 1000,
            queue: 4096,
        }
    }
}

/// Something arrived on one of the spool's inputs.
#[derive(Clone, Copy, Debug)]
pub struct Arrived;

/// One stream's spool and how far the logger has it.
struct Stream {
    kind: SpoolStream,
    log: SpoolLog,
    /// The first index the logger has not acknowledged.
    acked: u64,
    /// The next index to send.
    sent: u64,
    /// When `acked` last moved (or the stream was last sent again from it).
    progress: Instant,
    resends: u64,
    /// The logger's last acknowledgement said it holds nothing of this stream: the oldest
    /// message kept goes to it with no predecessor.
    logger_empty: bool,
}

impl Stream {
    fn new(kind: SpoolStream, log: SpoolLog) -> Stream {
        let first = log.first();
        Stream {
            kind,
            log,
            acked: first,
            sent: first,
            progress: Instant::now(),
            resends: 0,
            logger_empty: false,
        }
    }

    /// The logger holds everything up to `mark` (and is alive): trim what it holds, and send
    /// again from there if what was sent after it has gone unacknowledged for `resend_after`.
    fn on_ack(&mut self, mark: Option<StreamMark>, resend_after: Duration) -> Result<(), SpoolError> {
        self.logger_empty = mark.is_none();
        if let Some(i) = mark.and_then(|m| self.log.find(m, self.acked.saturating_sub(1))) {
            if i + 1 > self.acked {
                self.acked = i + 1;
                self.progress = Instant::now();
                self.log.trim(self.acked)?;
                // Everything acknowledged: close the segment, so that it can go at the next trim.
                if self.acked == self.log.next() && self.log.bytes() > 64 << 10 {
                    self.log.rotate()?;
                }
            }
        }
        self.acked = self.acked.max(self.log.first());
        if self.sent > self.acked && self.progress.elapsed() >= resend_after {
            self.sent = self.acked;
            self.progress = Instant::now();
            self.resends += 1;
        }
        self.sent = self.sent.max(self.acked);
        Ok(())
    }

    /// Delete the oldest segment to make room: how many of its messages were not acknowledged
    /// (none: nothing but the segment being written is left).
    fn drop_oldest(&mut self) -> Result<Option<u64>, SpoolError> {
        let first = self.log.first();
        let n = self.log.drop_oldest()?;
        if n == 0 {
            return Ok(None);
        }
        let unacked = (first + n).saturating_sub(self.acked.max(first));
        self.acked = self.acked.max(self.log.first());
        self.sent = self.sent.max(self.acked);
        Ok(Some(unacked))
    }

    /// The messages to send now: from `sent` on, within `window` of `acked`.
    fn due(&mut self, window: u64, fresh: &[(u64, Bytes)]) -> Result<Vec<Spooled>, SpoolError> {
        let to = self.log.next().min(self.acked + window);
        if self.sent >= to {
            return Ok(Vec::new());
        }
        if self.sent == self.acked {
            self.progress = Instant::now();
        }
        // What was just appended is at hand; anything older is read back from the disk.
        let cached = fresh.first().map(|(i, _)| *i).filter(|i| *i <= self.sent);
        let payloads = match cached {
            Some(first) => fresh[(self.sent - first) as usize..]
                .iter()
                .take_while(|(i, _)| *i < to)
                .cloned()
                .collect(),
            None => self.log.read(self.sent, to)?,
        };
        let out = payloads
            .into_iter()
            .map(|(i, bytes)| Spooled {
                stream: self.kind,
                prev: if i == self.log.first() && self.logger_empty {
                    None
                } else {
                    self.log.prev(i)
                },
                message: Blob::new(bytes),
            })
            .collect::<Vec<_>>();
        self.sent += out.len() as u64;
        Ok(out)
    }
}

/// The spool's disk and cursors, owned by its thread.
struct Disk {
    obs: Stream,
    events: Stream,
    budget: u64,
    on_full: OnFull,
    window: u64,
    resend_after: Duration,
}

/// What one turn of the spool's thread did.
#[derive(Default)]
struct Turn {
    send: Vec<Spooled>,
    kept: u64,
    unreadable: u64,
    /// Unacknowledged messages deleted over the budget.
    dropped: u64,
    /// Arrivals refused over the budget (`on_full = "stop"`).
    refused: u64,
    full: bool,
    errors: Vec<String>,
    bytes: u64,
    backlog: u64,
    resends: u64,
}

impl Disk {
    fn turn(&mut self, obs: Vec<Bytes>, events: Vec<Bytes>, acks: Vec<LogAck>) -> Turn {
        let mut t = Turn::default();
        for a in &acks {
            if let Err(e) = self.obs.on_ack(a.last, self.resend_after) {
                t.errors.push(e.to_string());
            }
            if let Err(e) = self.events.on_ack(a.last_event, self.resend_after) {
                t.errors.push(e.to_string());
            }
        }
        let mut fresh = [Vec::new(), Vec::new()];
        for (k, arrivals) in [obs, events].into_iter().enumerate() {
            if arrivals.is_empty() {
                continue;
            }
            let incoming: u64 = arrivals.iter().map(|b| b.len() as u64 + 8).sum();
            if self.on_full == OnFull::Stop && self.bytes() + incoming > self.budget {
                t.refused += arrivals.len() as u64;
                t.full = true;
                continue;
            }
            let s = if k == 0 { &mut self.obs } else { &mut self.events };
            match s.log.append(&arrivals) {
                Ok((indices, unreadable)) => {
                    t.kept += indices.len() as u64;
                    t.unreadable += unreadable as u64;
                    let good = arrivals.into_iter().filter(|b| log::mark_of(b).is_some());
                    fresh[k] = indices.into_iter().zip(good).collect();
                }
                Err(e) => t.errors.push(e.to_string()),
            }
        }
        if self.on_full == OnFull::DropOldest {
            // Observations go first: events are few and small, and say what the rows meant.
            while self.bytes() > self.budget {
                let dropped = match self.obs.drop_oldest() {
                    Ok(None) => self.events.drop_oldest(),
                    r => r,
                };
                match dropped {
                    Ok(Some(n)) => {
                        t.dropped += n;
                        t.full = true;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        t.errors.push(e.to_string());
                        break;
                    }
                }
            }
        }
        for (k, s) in [&mut self.obs, &mut self.events].into_iter().enumerate() {
            match s.due(self.window, &fresh[k]) {
                Ok(msgs) => t.send.extend(msgs),
                Err(e) => t.errors.push(e.to_string()),
            }
            t.backlog += s.log.next() - s.acked;
            t.resends += s.resends;
        }
        t.bytes = self.bytes();
        t
    }

    fn bytes(&self) -> u64 {
        self.obs.log.bytes() + self.events.log.bytes()
    }
}

pub struct Spool {
    robot: String,
    worker: Worker<Disk>,
    obs: Inbox<RawSample>,
    events: Inbox<RawSample>,
    acks: Inbox<Received<LogAck>>,
    out: Publisher<Spooled>,
    rejects: Publisher<Reject>,
    kept: u64,
    sent: u64,
    dropped: u64,
    refused: u64,
    unreadable: u64,
    bytes: u64,
    backlog: u64,
    resends: u64,
    full: bool,
    budget_mb: f64,
    on_full: OnFull,
    last_error_log: Option<Instant>,
}

impl Spool {
    async fn alarm(&mut self, reason: &str, detail: String, count: u64) {
        tracing::warn!(robot = %self.robot, reason, "spool: {detail}");
        let r = Reject {
            sensor: "spool".into(),
            reason: reason.into(),
            detail,
            seq: 0,
            count,
        };
        if let Err(e) = self.rejects.put(&r).await {
            tracing::debug!(robot = %self.robot, error = %e, "spool alarm not published");
        }
    }
}

fn take_payloads(inbox: &Inbox<RawSample>) -> Vec<Bytes> {
    let mut out = Vec::new();
    while let Some(r) = inbox.take() {
        out.push(r.payload);
    }
    out
}

impl NodeActor for Spool {
    const KIND: &'static str = "spool";
    type Config = SpoolConfig;
    type Event = Arrived;

    fn grants(fleet: &str, robots: &[String]) -> crate::access::Grants {
        crate::access::Grants::default().put(
            robots
                .iter()
                .flat_map(|r| [topics::spool(fleet, r), topics::rejects(fleet, r)]),
        )
    }

    async fn start(ctx: &Ctx<Self>, cfg: SpoolConfig) -> Result<Self, ActorError> {
        let robot = ctx.robot()?.to_string();
        let fleet = ctx.fleet();
        if cfg.max_mb <= 0.0 || cfg.window == 0 || cfg.queue == 0 || cfg.segment_kb == 0 {
            return Err(ctx.config_error("max_mb, window, queue and segment_kb must be positive"));
        }
        let dir = ctx.path(&cfg.dir);
        let (at, seg) = (dir.clone(), cfg.segment_kb << 10);
        let (budget, on_full, window) = ((cfg.max_mb * 1048576.0) as u64, cfg.on_full, cfg.window);
        let resend_after = Duration::from_millis(cfg.resend_after_ms);
        let worker = Worker::spawn(format!("nb-spool-{robot}"), move || {
            let open = |name: &str| SpoolLog::open(&at.join(name), seg).map_err(|e| e.to_string());
            let (obs, ro) = open("obs")?;
            let (events, re) = open("events")?;
            if ro.torn_bytes + re.torn_bytes > 0 {
                tracing::warn!(dir = %at.display(), bytes = ro.torn_bytes + re.torn_bytes, "spool: a record torn by a crash was cut off");
            }
            Ok(Disk {
                obs: Stream::new(SpoolStream::Observations, obs),
                events: Stream::new(SpoolStream::Events, events),
                budget,
                on_full,
                window,
                resend_after,
            })
        })
        .await
        .map_err(|e| ctx.config_error(format!("spool {}: {e}", dir.display())))?;
        let kept = worker
            .call(|d| (d.obs.log.len() + d.events.log.len()) as u64)
            .await
            .unwrap_or(0);
        tracing::info!(robot, dir = %dir.display(), kept, "spooling");
        let keep = Keep::All { queue: cfg.queue };
        let wake: Option<fn() -> Arrived> = Some(|| Arrived);
        let state = Spool {
            obs: ctx
                .subscribe_raw("obs", &topics::obs(fleet, &robot), keep, wake)
                .await?,
            events: ctx
                .subscribe_raw("events", &topics::event(fleet, &robot), keep, wake)
                .await?,
            acks: ctx
                .subscribe("acks", &topics::log_ack(fleet, &robot), Keep::All { queue: 256 }, wake)
                .await?,
            out: ctx
                .publisher(&topics::spool(fleet, &robot), &robot, PubQos::Bulk)
                .await?,
            rejects: ctx
                .publisher(&topics::rejects(fleet, &robot), &robot, PubQos::Control)
                .await?,
            robot,
            worker,
            kept: 0,
            sent: 0,
            dropped: 0,
            refused: 0,
            unreadable: 0,
            bytes: 0,
            backlog: kept,
            resends: 0,
            full: false,
            budget_mb: cfg.max_mb,
            on_full: cfg.on_full,
            last_error_log: None,
        };
        ctx.every(Duration::from_millis(100));
        Ok(state)
    }

    async fn handle(&mut self, ctx: &Ctx<Self>, _input: Input<Arrived>) -> Result<(), ActorError> {
        let obs = take_payloads(&self.obs);
        let events = take_payloads(&self.events);
        let mut acks = Vec::new();
        while let Some(a) = self.acks.take() {
            acks.push(a.msg);
        }
        let t = self
            .worker
            .call(move |d| d.turn(obs, events, acks))
            .await
            .ok_or_else(|| ctx.failed("spool thread ended"))?;
        let c = &ctx.counters;
        c.handled.fetch_add(t.kept, Ordering::Relaxed);
        if !t.errors.is_empty() {
            c.errors.fetch_add(t.errors.len() as u64, Ordering::Relaxed);
            if self
                .last_error_log
                .is_none_or(|at| at.elapsed() >= Duration::from_secs(5))
            {
                self.last_error_log = Some(Instant::now());
                tracing::error!(robot = %self.robot, "spool disk: {}", t.errors.join("; "));
            }
        }
        self.kept += t.kept;
        self.unreadable += t.unreadable;
        (self.bytes, self.backlog, self.resends) = (t.bytes, t.backlog, t.resends);
        for m in &t.send {
            let Some(mark) = log::mark_of(&m.message.to_bytes()) else {
                continue;
            };
            match self.out.put_with(m, mark.seq, mark.stamp_ns, None).await {
                Ok(()) => self.sent += 1,
                Err(e) => {
                    tracing::debug!(robot = %self.robot, error = %e, "spooled message not sent (sent again later)")
                }
            }
        }
        if t.dropped > 0 {
            self.dropped += t.dropped;
            c.dropped.fetch_add(t.dropped, Ordering::Relaxed);
            let detail = format!(
                "disk budget of {} MB spent: {} oldest unacknowledged messages deleted ({} so far)",
                self.budget_mb, t.dropped, self.dropped
            );
            self.alarm("over_budget", detail, self.dropped).await;
        }
        if t.refused > 0 {
            let first = self.refused == 0 || !self.full;
            self.refused += t.refused;
            c.dropped.fetch_add(t.refused, Ordering::Relaxed);
            if first {
                let detail = format!(
                    "disk budget of {} MB spent and on_full = \"stop\": new messages refused until the logger acknowledges ({} so far)",
                    self.budget_mb, self.refused
                );
                self.alarm("full", detail, self.refused).await;
            }
        }
        if self.full && !t.full && self.on_full == OnFull::Stop {
            tracing::info!(robot = %self.robot, "spool: room again, messages are kept again");
        }
        self.full = t.full;
        Ok(())
    }

    fn metrics(&self, m: &mut Metrics) {
        m.set("kept", self.kept as f64);
        m.set("sent", self.sent as f64);
        m.set("backlog", self.backlog as f64);
        m.set("bytes", self.bytes as f64);
        m.set("resends", self.resends as f64);
        m.set("dropped_over_budget", self.dropped as f64);
        m.set("refused_full", self.refused as f64);
        m.set("unreadable", self.unreadable as f64);
        m.set(
            "alarm",
            if self.full && self.on_full == OnFull::Stop {
                1.0
            } else {
                0.0
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logger::follows;
    use nanobot_messages::{Event, EventKind};

    fn envelope(seq: u64, stamp_ns: u64) -> Bytes {
        let ev = Event {
            episode: 0,
            event: EventKind::Reward { value: 0.0 },
        };
        Bytes::from(nanobot_messages::encode("r0", seq, stamp_ns, &ev).unwrap().to_vec())
    }

    fn disk(dir: &std::path::Path, budget: u64, on_full: OnFull, window: u64) -> Disk {
        let open = |n: &str| SpoolLog::open(&dir.join(n), 400).unwrap().0;
        Disk {
            obs: Stream::new(SpoolStream::Observations, open("obs")),
            events: Stream::new(SpoolStream::Events, open("events")),
            budget,
            on_full,
            window,
            resend_after: Duration::ZERO,
        }
    }

    /// A logger as the spool sees it: what follows is taken, taken rows become durable at a
    /// flush, a crash forgets what is not durable.
    #[derive(Default)]
    struct Logger {
        last: Option<StreamMark>,
        pending: Vec<StreamMark>,
        durable: Vec<StreamMark>,
    }

    impl Logger {
        fn receive(&mut self, m: &Spooled) {
            let mark = log::mark_of(&m.message.to_bytes()).unwrap();
            if follows(self.last, m.prev, mark) {
                self.last = Some(mark);
                self.pending.push(mark);
            }
        }
        fn flush(&mut self) -> LogAck {
            self.durable.append(&mut self.pending);
            LogAck {
                last_seq: 0,
                rows: self.durable.len() as u64,
                last: self.durable.last().copied(),
                last_event: None,
            }
        }
        fn crash(&mut self) {
            self.pending.clear();
            self.last = self.durable.last().copied();
        }
    }

    struct Rng(u64);
    impl Rng {
        fn chance(&mut self, p: f64) -> bool {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 11) as f64 / (1u64 << 53) as f64) < p
        }
    }

    /// Robot ticks restart at 0 (a robot restart) halfway: a tick number alone repeats.
    fn produced(n: u64) -> Vec<StreamMark> {
        (0..n)
            .map(|i| StreamMark {
                seq: if i < n / 2 { i } else { i - n / 2 },
                stamp_ns: 1_000 + i,
            })
            .collect()
    }

    #[test]
    fn every_message_reaches_a_lossy_crashing_logger_exactly_once_and_in_order() {
        for seed in 1..6u64 {
            let dir = tempfile::tempdir().unwrap();
            let mut spool = disk(dir.path(), u64::MAX, OnFull::DropOldest, 16);
            let mut logger = Logger::default();
            let mut rng = Rng(seed);
            let marks = produced(400);
            let mut next = 0;
            let mut acks = Vec::new();
            for step in 0..20_000 {
                let batch: Vec<Bytes> = marks[next..(next + 3).min(marks.len())]
                    .iter()
                    .map(|m| envelope(m.seq, m.stamp_ns))
                    .collect();
                next += batch.len();
                // A partition: nothing gets through for a while, either way.
                let cut = (step / 50) % 4 == 1;
                let t = spool.turn(batch, Vec::new(), std::mem::take(&mut acks));
                assert!(t.errors.is_empty(), "{:?}", t.errors);
                for m in &t.send {
                    if !cut && !rng.chance(0.2) {
                        logger.receive(m);
                    }
                }
                if rng.chance(0.03) {
                    logger.crash();
                }
                if rng.chance(0.5) {
                    let ack = logger.flush();
                    if !cut && !rng.chance(0.2) {
                        acks.push(ack);
                    }
                }
                if next == marks.len() && logger.durable.len() == marks.len() {
                    break;
                }
            }
            assert_eq!(logger.durable, marks, "seed {seed}: every message once, in order");
            // Once everything is acknowledged, the spool keeps little.
            let t = spool.turn(Vec::new(), Vec::new(), vec![logger.flush()]);
            assert_eq!(t.backlog, 0, "seed {seed}");
            assert!(spool.obs.log.len() < 100, "seed {seed}: {} kept", spool.obs.log.len());
        }
    }

    #[test]
    fn a_logger_that_starts_late_or_empty_gets_everything_from_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = disk(dir.path(), u64::MAX, OnFull::DropOldest, 1000);
        let marks = produced(50);
        let all: Vec<Bytes> = marks.iter().map(|m| envelope(m.seq, m.stamp_ns)).collect();
        // Sent while no logger listens.
        let t = spool.turn(all[..30].to_vec(), Vec::new(), Vec::new());
        assert_eq!(t.send.len(), 30);
        let mut logger = Logger::default();
        // The live ones that come next do not follow what the logger holds (nothing).
        let t = spool.turn(all[30..].to_vec(), Vec::new(), Vec::new());
        t.send.iter().for_each(|m| logger.receive(m));
        assert!(logger.pending.is_empty());
        // Its first heartbeat says it holds nothing: the spool starts again from its oldest.
        let t = spool.turn(Vec::new(), Vec::new(), vec![logger.flush()]);
        t.send.iter().for_each(|m| logger.receive(m));
        logger.flush();
        assert_eq!(logger.durable, marks);
    }

    #[test]
    fn over_budget_the_oldest_go_and_are_counted_or_new_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let marks = produced(200);
        let all: Vec<Bytes> = marks.iter().map(|m| envelope(m.seq, m.stamp_ns)).collect();
        let mut spool = disk(dir.path(), 2000, OnFull::DropOldest, 8);
        let mut dropped = 0;
        for b in all.chunks(10) {
            let t = spool.turn(b.to_vec(), Vec::new(), Vec::new());
            dropped += t.dropped;
            assert!(t.bytes <= 2000 + 400, "{} bytes", t.bytes);
        }
        assert!(dropped > 100, "{dropped}");
        assert_eq!(
            dropped + spool.obs.log.len() as u64,
            200,
            "every message kept or counted"
        );
        // A logger that comes now takes the oldest kept (it has no predecessor) and what follows.
        let mut logger = Logger::default();
        for _ in 0..100 {
            let t = spool.turn(Vec::new(), Vec::new(), vec![logger.flush()]);
            t.send.iter().for_each(|m| logger.receive(m));
        }
        logger.flush();
        assert_eq!(logger.durable, marks[dropped as usize..].to_vec());

        let dir = tempfile::tempdir().unwrap();
        let mut spool = disk(dir.path(), 2000, OnFull::Stop, 8);
        let (mut refused, mut full) = (0, false);
        for b in all.chunks(10) {
            let t = spool.turn(b.to_vec(), Vec::new(), Vec::new());
            refused += t.refused;
            full |= t.full;
            assert_eq!(t.dropped, 0);
        }
        assert!(full && refused > 100, "{refused}");
        assert_eq!(refused + spool.obs.log.len() as u64, 200);
        assert_eq!(spool.obs.log.first(), 0, "the oldest are kept");
    }
}
