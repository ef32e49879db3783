//! Play a recording back onto the bus: each message re-encoded with its recorded robot,
//! sequence number and stamp, in the recorded order, at the recorded pace.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nanobot_messages::{encode_any, from_json};
use tokio::time::Instant;
use zenoh::qos::{CongestionControl, Priority};

use crate::{RecordError, DERIVED_FROM, JSON_ENCODING, RAW_ENCODING};

/// `FROM=TO`: keys equal to `FROM` or under `FROM/` are played under `TO` instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remap {
    pub from: String,
    pub to: String,
}

impl std::str::FromStr for Remap {
    type Err = RecordError;
    fn from_str(s: &str) -> Result<Remap, RecordError> {
        match s.split_once('=') {
            Some((from, to)) if !from.is_empty() && !to.is_empty() && !to.contains('=') => Ok(Remap {
                from: from.trim_end_matches('/').to_string(),
                to: to.trim_end_matches('/').to_string(),
            }),
            _ => Err(RecordError::BadRemap(s.to_string())),
        }
    }
}

impl Remap {
    /// `key` under the first remap that matches it.
    pub fn apply<'k>(remaps: &[Remap], key: &'k str) -> Cow<'k, str> {
        for r in remaps {
            if key == r.from {
                return Cow::Owned(r.to.clone());
            }
            if let Some(rest) = key.strip_prefix(&r.from).and_then(|k| k.strip_prefix('/')) {
                return Cow::Owned(format!("{}/{rest}", r.to));
            }
        }
        Cow::Borrowed(key)
    }
}

#[derive(Clone, Debug)]
pub struct PlayOptions {
    /// Playback speed: 2.0 plays twice as fast as recorded.
    pub rate: f64,
    /// Start over at the end, until stopped.
    pub looped: bool,
    pub remaps: Vec<Remap>,
    /// Wait up to this long for every played key to have a subscriber before starting.
    pub wait_matched: Duration,
}

impl Default for PlayOptions {
    fn default() -> Self {
        PlayOptions {
            rate: 1.0,
            looped: false,
            remaps: Vec::new(),
            wait_matched: Duration::from_secs(2),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlayStats {
    /// Messages published.
    pub messages: u64,
    /// Passes through the recording that completed.
    pub loops: u64,
    /// Keys that had no subscriber when playback started.
    pub unmatched: Vec<String>,
}

/// One message ready to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct Played {
    /// The recorded key (before remapping).
    pub key: String,
    pub log_time_ns: u64,
    /// The payload as it travelled.
    pub payload: Vec<u8>,
}

/// An MCAP recording, mapped into memory.
pub struct Recording {
    path: PathBuf,
    map: memmap2::Mmap,
    /// The topics playback publishes (derived channels left out), sorted: from the summary,
    /// read once at open.
    topics: Vec<String>,
}

impl Recording {
    pub fn open(path: &Path) -> Result<Recording, RecordError> {
        let io = |source| RecordError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // Safety: the recording is read-only here; a writer truncating it under us is the
        // same hazard as with any memory-mapped reader (a SIGBUS), as with safetensors.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let summary = mcap::Summary::read(&map)
            .map_err(|source| RecordError::Mcap {
                path: path.to_path_buf(),
                source,
            })?
            .ok_or_else(|| RecordError::BadMessage {
                path: path.to_path_buf(),
                topic: String::new(),
                index: 0,
                reason: "the file has no summary (was the recording finished?)".into(),
            })?;
        let mut topics: Vec<String> = summary
            .channels
            .values()
            .filter(|c| !c.metadata.contains_key(DERIVED_FROM))
            .map(|c| c.topic.clone())
            .collect();
        topics.sort();
        topics.dedup();
        drop(summary);
        Ok(Recording {
            path: path.to_path_buf(),
            map,
            topics,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The topics that playback publishes (derived channels left out), sorted.
    pub fn topics(&self) -> &[String] {
        &self.topics
    }

    fn mcap_err(&self, source: mcap::McapError) -> RecordError {
        RecordError::Mcap {
            path: self.path.clone(),
            source,
        }
    }

    fn bad(&self, topic: &str, index: u64, reason: String) -> RecordError {
        RecordError::BadMessage {
            path: self.path.clone(),
            topic: topic.to_string(),
            index,
            reason,
        }
    }

    /// Every played message in file order, re-encoded; derived channels are skipped.
    pub fn messages(&self) -> Result<impl Iterator<Item = Result<Played, RecordError>> + '_, RecordError> {
        let stream = mcap::MessageStream::new(&self.map).map_err(|e| self.mcap_err(e))?;
        Ok(stream.enumerate().filter_map(move |(index, m)| {
            let m = match m {
                Ok(m) => m,
                Err(e) => return Some(Err(self.mcap_err(e))),
            };
            if m.channel.metadata.contains_key(DERIVED_FROM) {
                return None;
            }
            let topic = &m.channel.topic;
            let payload = match m.channel.message_encoding.as_str() {
                RAW_ENCODING => Ok(m.data.into_owned()),
                JSON_ENCODING => self
                    .reencode(&m.data, m.publish_time)
                    .map_err(|r| self.bad(topic, index as u64, r)),
                other => Err(self.bad(
                    topic,
                    index as u64,
                    format!("message encoding {other:?} is not one NanoBot plays"),
                )),
            };
            Some(payload.map(|payload| Played {
                key: topic.clone(),
                log_time_ns: m.log_time,
                payload,
            }))
        }))
    }

    /// A JSON view back into the envelope it was recorded from.
    fn reencode(&self, data: &[u8], publish_time: u64) -> Result<Vec<u8>, String> {
        let value: serde_json::Value = serde_json::from_slice(data).map_err(|e| format!("not JSON: {e}"))?;
        let m = from_json(&value)?;
        let robot = m.robot.ok_or("field \"robot\" is missing")?;
        let seq = m.seq.ok_or("field \"seq\" is missing")?;
        let stamp = value.get("stamp_ns").and_then(|v| v.as_u64()).unwrap_or(publish_time);
        encode_any(&robot, seq, stamp, &m.msg)
            .map(|e| e.to_vec())
            .map_err(|e| e.to_string())
    }
}

/// Publish `recording` onto `session` until it ends (or, looped, until `stop` completes).
/// Messages go out reliably (publishers block rather than drop), in file order, each at its
/// recorded offset from the first divided by `rate`. A reader thread decodes ahead through a
/// bounded queue.
pub async fn play(
    session: &zenoh::Session,
    recording: Recording,
    opts: &PlayOptions,
    stop: impl Future<Output = ()>,
) -> Result<PlayStats, RecordError> {
    if !(opts.rate.is_finite() && opts.rate > 0.0) {
        return Err(RecordError::BadRate(opts.rate));
    }
    let mut stats = PlayStats::default();
    let mut publishers = BTreeMap::new();
    for topic in recording.topics() {
        let key = Remap::apply(&opts.remaps, topic).into_owned();
        let publisher = session
            .declare_publisher(key.clone())
            .congestion_control(CongestionControl::Block)
            .priority(Priority::Data)
            .await
            .map_err(|e| RecordError::Zenoh {
                key: key.clone(),
                reason: e.to_string(),
            })?;
        publishers.insert(topic.clone(), (key, publisher));
    }
    // Like `rosbag play --wait-for-subscribers`: the first messages are not lost to
    // subscriptions still being declared.
    let deadline = Instant::now() + opts.wait_matched;
    loop {
        let mut unmatched = Vec::new();
        for (key, p) in publishers.values() {
            if !p.matching_status().await.is_ok_and(|m| m.matching()) {
                unmatched.push(key.clone());
            }
        }
        if unmatched.is_empty() || Instant::now() >= deadline {
            stats.unmatched = unmatched;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recording = std::sync::Arc::new(recording);
    tokio::pin!(stop);
    loop {
        let (tx, rx) = flume::bounded::<Result<Played, RecordError>>(256);
        let reader = recording.clone();
        std::thread::Builder::new()
            .name("nb-play".into())
            .spawn(move || match reader.messages() {
                Ok(messages) => {
                    for m in messages {
                        if tx.send(m).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            })
            .map_err(|source| RecordError::Io {
                path: recording.path().to_path_buf(),
                source,
            })?;
        let mut first: Option<(u64, Instant)> = None;
        loop {
            let next = tokio::select! {
                m = rx.recv_async() => m,
                _ = &mut stop => return Ok(stats),
            };
            let Ok(played) = next else { break };
            let played = played?;
            let (t0, start) = *first.get_or_insert((played.log_time_ns, Instant::now()));
            let offset = played.log_time_ns.saturating_sub(t0) as f64 / opts.rate;
            let at = start + Duration::from_nanos(offset as u64);
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = &mut stop => return Ok(stats),
            }
            let (key, publisher) = publishers
                .get(&played.key)
                .expect("every played topic has a publisher (from the summary)");
            publisher.put(played.payload).await.map_err(|e| RecordError::Zenoh {
                key: key.clone(),
                reason: e.to_string(),
            })?;
            stats.messages += 1;
        }
        stats.loops += 1;
        if !opts.looped {
            return Ok(stats);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaps_replace_a_key_prefix_on_segment_boundaries() {
        let r: Vec<Remap> = vec!["nb=lab".parse().unwrap(), "x/y/=z".parse().unwrap()];
        assert_eq!(Remap::apply(&r, "nb/r0/obs"), "lab/r0/obs");
        assert_eq!(Remap::apply(&r, "nb"), "lab");
        assert_eq!(Remap::apply(&r, "nbx/r0"), "nbx/r0");
        assert_eq!(Remap::apply(&r, "x/y/q"), "z/q");
        for bad in ["nb", "=x", "x=", "a=b=c"] {
            assert!(matches!(bad.parse::<Remap>(), Err(RecordError::BadRemap(_))), "{bad}");
        }
    }
}
