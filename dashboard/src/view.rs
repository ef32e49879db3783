//! What the dashboard knows about the fleet, built from the messages it sees: one `FleetView`
//! that every arrival updates and every page reads as JSON.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use nanobot_messages::{codec::now_ns, topics, AnyMessage, Encoding, EventKind, Header};
use serde::Serialize;
use serde_json::{json, Value};

/// Points kept per plotted series.
pub const HISTORY: usize = 240;
/// The window topic rates are measured over, seconds.
pub const RATE_WINDOW_S: f64 = 5.0;

#[derive(Debug, Default, Serialize)]
pub struct ActorView {
    pub alive: bool,
    /// The actor's latest Stats, as its JSON view (`handled`, `errors`, `dropped`, `extra`, ...).
    pub stats: Value,
}

#[derive(Debug, Serialize)]
pub struct TopicView {
    pub kind: String,
    pub count: u64,
    pub bytes: u64,
    /// Messages per second over the last [`RATE_WINDOW_S`].
    pub rate_hz: f64,
    #[serde(skip)]
    arrivals: VecDeque<Instant>,
}

/// One finished episode, with the policy that drove it.
#[derive(Clone, Debug, Serialize)]
pub struct EpisodePoint {
    pub t_ms: u64,
    pub success: bool,
    pub steps: u32,
    /// `policy_version+adapter_version` of the last chunk the robot got before the episode ended.
    pub version: String,
}

#[derive(Debug, Default, Serialize)]
pub struct RobotView {
    pub observations: u64,
    /// Sequence number of the latest camera frame (`/api/camera/{robot}` serves it).
    pub camera_seq: Option<u64>,
    pub state: Vec<f32>,
    /// The first action of each chunk: (time ms, action).
    pub actions: VecDeque<(u64, Vec<f32>)>,
    pub source: String,
    pub version: String,
    pub episodes: VecDeque<EpisodePoint>,
    pub successes: u64,
    pub interventions: u64,
    /// Frames ingest refused, by reason.
    pub rejects: BTreeMap<String, u64>,
    #[serde(skip)]
    pub camera: Option<Bytes>,
}

/// Time series of one actor metric (the trainer's loss, replay's rows, ...).
pub type Series = VecDeque<(u64, f64)>;

#[derive(Debug, Default, Serialize)]
pub struct FleetView {
    pub fleet: String,
    pub nodes: BTreeMap<String, BTreeMap<String, ActorView>>,
    pub topics: BTreeMap<String, TopicView>,
    pub robots: BTreeMap<String, RobotView>,
    /// `node/actor` → metric name → series, for the learning actors' metrics.
    pub learning: BTreeMap<String, BTreeMap<String, Series>>,
    /// The promoter's answer to `ckpt list` (rollout and candidates), if one answers.
    pub ledger: Value,
    /// Messages that did not decode.
    pub undecodable: u64,
    /// Arrivals the dashboard's queue refused.
    pub dropped: u64,
    pub updated_ms: u64,
}

/// Actors whose metrics are plotted over time.
const LEARNING_ACTORS: [&str; 3] = ["trainer", "replay", "promoter"];

fn ms() -> u64 {
    now_ns() / 1_000_000
}

fn push<T>(q: &mut VecDeque<T>, v: T) {
    if q.len() == HISTORY {
        q.pop_front();
    }
    q.push_back(v);
}

impl FleetView {
    pub fn new(fleet: &str) -> Self {
        FleetView {
            fleet: fleet.to_string(),
            ledger: Value::Null,
            ..Default::default()
        }
    }

    /// `{fleet}/node/{node}/{actor}` → (node, actor).
    fn node_actor<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str)> {
        let rest = key.strip_prefix(&self.fleet)?.strip_prefix("/node/")?;
        rest.split_once('/')
    }

    /// A liveliness token appeared (`alive`) or went away.
    pub fn liveliness(&mut self, key: &str, alive: bool) {
        if let Some((node, actor)) = self.node_actor(key) {
            let (node, actor) = (node.to_string(), actor.to_string());
            self.nodes.entry(node).or_default().entry(actor).or_default().alive = alive;
        }
    }

    /// A message arrived on `key` (`msg` is `None` when it did not decode).
    pub fn message(&mut self, key: &str, bytes: usize, decoded: Option<(Header, AnyMessage)>) {
        let now = Instant::now();
        let t = ms();
        self.updated_ms = t;
        let kind = decoded.as_ref().map_or("(not NanoBot)", |(h, _)| h.kind.name());
        let topic = self.topics.entry(key.to_string()).or_insert_with(|| TopicView {
            kind: kind.to_string(),
            count: 0,
            bytes: 0,
            rate_hz: 0.0,
            arrivals: VecDeque::new(),
        });
        topic.kind = kind.to_string();
        topic.count += 1;
        topic.bytes += bytes as u64;
        topic.arrivals.push_back(now);
        while topic.arrivals.len() > 10_000 {
            topic.arrivals.pop_front();
        }
        let Some((header, msg)) = decoded else {
            self.undecodable += 1;
            return;
        };
        if let (AnyMessage::Stats(s), Some((node, actor))) = (&msg, self.node_actor(key)) {
            let (node, actor) = (node.to_string(), actor.to_string());
            if LEARNING_ACTORS.iter().any(|a| actor.starts_with(a)) {
                let series = self.learning.entry(format!("{node}/{actor}")).or_default();
                for m in &s.extra {
                    push(series.entry(m.name.clone()).or_default(), (t, m.value));
                }
            }
            let view = self.nodes.entry(node).or_default().entry(actor).or_default();
            view.alive = true;
            view.stats = serde_json::to_value(s).unwrap_or(Value::Null);
            return;
        }
        let Some(robot) = topics::robot_of(&self.fleet, key).map(str::to_string) else {
            return;
        };
        let r = self.robots.entry(robot).or_default();
        match msg {
            AnyMessage::Observation(o) => {
                r.observations += 1;
                r.state = o.state;
                if o.image.encoding == Encoding::Jpeg && !o.image.data.is_empty() {
                    r.camera = Some(o.image.data.to_bytes());
                    r.camera_seq = Some(header.seq);
                }
            }
            AnyMessage::RawFrame(f) if f.encoding == Encoding::Jpeg && r.observations == 0 => {
                // A robot without ingest: its raw camera is the picture.
                r.camera = Some(f.data.to_bytes());
                r.camera_seq = Some(header.seq);
            }
            AnyMessage::ActionChunk(c) => {
                if let Some(a) = c.action(0) {
                    push(&mut r.actions, (t, a.to_vec()));
                }
                r.source = format!("{:?}", c.source);
                r.version = if c.adapter_version.is_empty() {
                    c.policy_version
                } else {
                    format!("{}+{}", c.policy_version, c.adapter_version)
                };
            }
            AnyMessage::Event(e) => match e.event {
                EventKind::EpisodeEnd { success, steps, .. } => {
                    r.successes += success as u64;
                    let version = r.version.clone();
                    push(
                        &mut r.episodes,
                        EpisodePoint {
                            t_ms: t,
                            success,
                            steps,
                            version,
                        },
                    );
                }
                EventKind::Intervention { active: true, .. } => r.interventions += 1,
                _ => {}
            },
            AnyMessage::Reject(j) => {
                // Ingest counts per robot and reason: its count is the truth, a lost message or not.
                let seen = r.rejects.entry(j.reason).or_default();
                *seen = if j.count > 0 { j.count.max(*seen) } else { *seen + 1 };
            }
            _ => {}
        }
    }

    /// The view as JSON, with every topic's rate brought up to date.
    pub fn snapshot(&mut self) -> Value {
        let now = Instant::now();
        for t in self.topics.values_mut() {
            while t
                .arrivals
                .front()
                .is_some_and(|a| now.duration_since(*a).as_secs_f64() > RATE_WINDOW_S)
            {
                t.arrivals.pop_front();
            }
            t.rate_hz = t.arrivals.len() as f64 / RATE_WINDOW_S;
        }
        let mut v = serde_json::to_value(&*self).unwrap_or_else(|e| json!({"error": e.to_string()}));
        v["now_ms"] = json!(ms());
        v
    }

    pub fn camera(&self, robot: &str) -> Option<Bytes> {
        self.robots.get(robot)?.camera.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanobot_messages::{ActionChunk, ActionSource, Blob, Event, Grid, Image, Kind, Observation, Reject, Stats};

    fn header(kind: Kind, seq: u64) -> Header {
        Header {
            version: 1,
            kind,
            robot: "r0".into(),
            seq,
            stamp_ns: 1,
        }
    }

    #[test]
    fn messages_build_the_fleets_view() {
        let mut v = FleetView::new("nb");
        v.liveliness("nb/node/sim/ingest_r0", true);
        let obs = Observation {
            episode: 0,
            frame_index: 0,
            task: 0,
            image: Image {
                width: 1,
                height: 1,
                encoding: Encoding::Jpeg,
                data: Blob::new(vec![0xff, 0xd8]),
            },
            state: vec![0.5; 6],
            surface: Grid::default(),
            action: vec![],
        };
        v.message(
            "nb/r0/obs",
            100,
            Some((header(Kind::Observation, 3), AnyMessage::Observation(obs))),
        );
        let chunk = ActionChunk {
            obs_seq: 3,
            dt_ns: 1,
            horizon: 1,
            action_dim: 2,
            actions: vec![0.1, 0.2],
            source: ActionSource::Policy,
            policy_version: "base".into(),
            adapter_version: "a1".into(),
        };
        v.message(
            "nb/r0/act",
            10,
            Some((header(Kind::ActionChunk, 4), AnyMessage::ActionChunk(chunk))),
        );
        let end = Event {
            episode: 0,
            event: EventKind::EpisodeEnd {
                success: true,
                steps: 20,
                reward: 1.0,
            },
        };
        v.message(
            "nb/r0/event",
            10,
            Some((header(Kind::Event, 5), AnyMessage::Event(end))),
        );
        let reject = Reject {
            sensor: "camera".into(),
            reason: "crc".into(),
            detail: String::new(),
            seq: 0,
            count: 4,
        };
        v.message(
            "nb/r0/rejects",
            10,
            Some((header(Kind::Reject, 6), AnyMessage::Reject(reject))),
        );
        let stats = Stats {
            node: "sim".into(),
            actor: "trainer".into(),
            extra: vec![nanobot_messages::Metric {
                name: "loss".into(),
                value: 0.25,
            }],
            ..Stats::default()
        };
        v.message(
            "nb/node/sim/trainer",
            10,
            Some((header(Kind::Stats, 7), AnyMessage::Stats(stats))),
        );
        v.message("nb/r0/raw/x", 5, None);

        let s = v.snapshot();
        let r0 = &s["robots"]["r0"];
        assert_eq!(r0["camera_seq"], 3);
        assert_eq!(r0["version"], "base+a1");
        assert_eq!(
            r0["episodes"][0]["version"], "base+a1",
            "the episode names the policy that drove it"
        );
        assert_eq!(r0["episodes"][0]["success"], true);
        assert_eq!(r0["rejects"]["crc"], 4);
        assert_eq!(r0["actions"][0][1], json!([0.1f32, 0.2f32]));
        assert_eq!(s["nodes"]["sim"]["ingest_r0"]["alive"], true);
        assert_eq!(s["nodes"]["sim"]["trainer"]["stats"]["actor"], "trainer");
        assert_eq!(s["learning"]["sim/trainer"]["loss"][0][1], 0.25);
        assert_eq!(s["topics"]["nb/r0/obs"]["kind"], "Observation");
        assert!(s["topics"]["nb/r0/obs"]["rate_hz"].as_f64().unwrap() > 0.0);
        assert_eq!(
            (s["undecodable"].as_u64(), s["topics"]["nb/r0/raw/x"]["kind"].as_str()),
            (Some(1), Some("(not NanoBot)"))
        );
        assert_eq!(v.camera("r0").as_deref(), Some(&[0xff, 0xd8][..]));
        v.liveliness("nb/node/sim/ingest_r0", false);
        assert_eq!(v.snapshot()["nodes"]["sim"]["ingest_r0"]["alive"], false);
    }
}
