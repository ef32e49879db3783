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

#[derive(Debug, Default, Serialize)]
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
    /// The robot reached its goal itself: no intervention during the episode.
    pub success: bool,
    /// The goal was reached, but only after an intervention (the expert's, an operator's): no
    /// success of the policy's, counted apart.
    pub rescued: bool,
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
    /// Episodes the robot finished itself (rescued ones are `rescued`).
    pub successes: u64,
    pub rescued: u64,
    pub interventions: u64,
    /// When each recent intervention began (ms).
    pub intervention_ms: VecDeque<u64>,
    /// An intervention happened during the current episode.
    #[serde(skip)]
    intervened: bool,
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
    /// Topics, robots, actors or reject reasons not shown because the view holds as many as
    /// it keeps (key names come from the network: a flood of them stops at the bounds).
    pub over_bound: u64,
    pub updated_ms: u64,
}

/// What the view keeps at most.
pub const MAX_TOPICS: usize = 4096;
pub const MAX_ROBOTS: usize = 1024;
pub const MAX_ACTORS: usize = 4096;
pub const MAX_REJECT_REASONS: usize = 32;

/// `map[key]`, made when there is room for one more entry.
fn room<'m, V: Default>(map: &'m mut BTreeMap<String, V>, key: &str, max: usize) -> Option<&'m mut V> {
    if !map.contains_key(key) && map.len() >= max {
        return None;
    }
    Some(map.entry(key.to_string()).or_default())
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
            match self.actor(&node, &actor) {
                Some(v) => v.alive = alive,
                None => self.over_bound += 1,
            }
        }
    }

    /// The view of `node/actor`, made when the view holds fewer than `MAX_ACTORS`.
    fn actor(&mut self, node: &str, actor: &str) -> Option<&mut ActorView> {
        let known = self.nodes.get(node).is_some_and(|n| n.contains_key(actor));
        if !known && self.nodes.values().map(BTreeMap::len).sum::<usize>() >= MAX_ACTORS {
            return None;
        }
        Some(
            self.nodes
                .entry(node.to_string())
                .or_default()
                .entry(actor.to_string())
                .or_default(),
        )
    }

    /// A message arrived on `key` (`msg` is `None` when it did not decode).
    pub fn message(&mut self, key: &str, bytes: usize, decoded: Option<(Header, AnyMessage)>) {
        let now = Instant::now();
        let t = ms();
        self.updated_ms = t;
        let kind = decoded.as_ref().map_or("(not NanoBot)", |(h, _)| h.kind.name());
        match room(&mut self.topics, key, MAX_TOPICS) {
            Some(topic) => {
                topic.kind = kind.to_string();
                topic.count += 1;
                topic.bytes += bytes as u64;
                topic.arrivals.push_back(now);
                while topic.arrivals.len() > 10_000 {
                    topic.arrivals.pop_front();
                }
            }
            None => self.over_bound += 1,
        }
        let Some((header, msg)) = decoded else {
            self.undecodable += 1;
            return;
        };
        if let (AnyMessage::Stats(s), Some((node, actor))) = (&msg, self.node_actor(key)) {
            let (node, actor) = (node.to_string(), actor.to_string());
            let Some(view) = self.actor(&node, &actor) else {
                self.over_bound += 1;
                return;
            };
            view.alive = true;
            view.stats = serde_json::to_value(s).unwrap_or(Value::Null);
            if LEARNING_ACTORS.iter().any(|a| actor.starts_with(a)) {
                let series = self.learning.entry(format!("{node}/{actor}")).or_default();
                for m in &s.extra {
                    push(series.entry(m.name.clone()).or_default(), (t, m.value));
                }
            }
            return;
        }
        let Some(robot) = topics::robot_of(&self.fleet, key).map(str::to_string) else {
            return;
        };
        let Some(r) = room(&mut self.robots, &robot, MAX_ROBOTS) else {
            self.over_bound += 1;
            return;
        };
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
                // An adapter's version already names its base (`base+lora.N`): say it once.
                r.version = if c.adapter_version.is_empty() {
                    c.policy_version
                } else if c.adapter_version.starts_with(&format!("{}+", c.policy_version)) {
                    c.adapter_version
                } else {
                    format!("{}+{}", c.policy_version, c.adapter_version)
                };
            }
            AnyMessage::Event(e) => match e.event {
                EventKind::EpisodeStart { .. } => r.intervened = false,
                EventKind::EpisodeEnd { success, steps, .. } => {
                    // "Success" is the robot's own: an episode someone had to rescue is not.
                    let rescued = success && r.intervened;
                    let success = success && !r.intervened;
                    r.intervened = false;
                    r.successes += success as u64;
                    r.rescued += rescued as u64;
                    let version = r.version.clone();
                    push(
                        &mut r.episodes,
                        EpisodePoint {
                            t_ms: t,
                            success,
                            rescued,
                            steps,
                            version,
                        },
                    );
                }
                EventKind::Intervention { active: true, .. } => {
                    r.interventions += 1;
                    r.intervened = true;
                    push(&mut r.intervention_ms, t);
                }
                _ => {}
            },
            AnyMessage::Reject(j) => {
                // Ingest counts per robot and reason: its count is the truth, a lost message or not.
                match room(&mut r.rejects, &j.reason, MAX_REJECT_REASONS) {
                    Some(seen) => *seen = if j.count > 0 { j.count.max(*seen) } else { *seen + 1 },
                    None => self.over_bound += 1,
                }
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
            Some((header(Kind::ActionChunk, 4), AnyMessage::ActionChunk(chunk.clone()))),
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
        // An adapter whose version already names its base is named once.
        let named = ActionChunk {
            obs_seq: 5,
            adapter_version: "base+lora.1800".into(),
            ..chunk
        };
        v.message(
            "nb/r0/act",
            10,
            Some((header(Kind::ActionChunk, 6), AnyMessage::ActionChunk(named))),
        );
        assert_eq!(v.snapshot()["robots"]["r0"]["version"], "base+lora.1800");
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

    #[test]
    fn a_flood_of_names_leaves_every_table_at_its_bound() {
        let mut v = FleetView::new("nb");
        for i in 0..10_000 {
            let stats = Stats {
                node: "n".into(),
                actor: format!("a{i}"),
                ..Default::default()
            };
            v.liveliness(&format!("nb/node/x{i}/a"), true);
            v.message(
                &format!("nb/node/n/a{i}"),
                10,
                Some((header(Kind::Stats, 0), AnyMessage::Stats(stats))),
            );
            let reject = Reject {
                sensor: "s".into(),
                reason: format!("why{i}"),
                detail: String::new(),
                seq: 0,
                count: 1,
            };
            v.message(
                &format!("nb/fake{i}/rejects"),
                10,
                Some((header(Kind::Reject, 0), AnyMessage::Reject(reject.clone()))),
            );
            v.message(
                "nb/r0/rejects",
                10,
                Some((header(Kind::Reject, 0), AnyMessage::Reject(reject))),
            );
        }
        assert_eq!(v.topics.len(), MAX_TOPICS);
        assert_eq!(v.robots.len(), MAX_ROBOTS);
        assert_eq!(v.nodes.values().map(BTreeMap::len).sum::<usize>(), MAX_ACTORS);
        assert_eq!(v.robots["r0"].rejects.len(), MAX_REJECT_REASONS);
        assert!(v.over_bound > 10_000, "{}", v.over_bound);
    }

    #[test]
    fn an_episode_someone_rescued_is_no_success() {
        let mut v = FleetView::new("nb");
        let mut send = |seq: u64, event: EventKind| {
            let e = Event { episode: 0, event };
            v.message(
                "nb/r0/event",
                10,
                Some((header(Kind::Event, seq), AnyMessage::Event(e))),
            );
        };
        let start = || EventKind::EpisodeStart {
            task: 0,
            shift: "none".into(),
        };
        let end = || EventKind::EpisodeEnd {
            success: true,
            steps: 60,
            reward: 1.0,
        };
        send(1, start());
        send(
            2,
            EventKind::Intervention {
                active: true,
                reason: "no action".into(),
            },
        );
        send(3, end());
        send(4, start());
        send(5, end());
        let r = &v.robots["r0"];
        assert_eq!((r.successes, r.rescued, r.interventions), (1, 1, 1));
        let flags: Vec<(bool, bool)> = r.episodes.iter().map(|e| (e.success, e.rescued)).collect();
        assert_eq!(flags, [(false, true), (true, false)]);
    }
}
