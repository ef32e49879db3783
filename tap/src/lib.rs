//! A tap on the fleet: the subscription the engineer tools (the MCAP recorder, the Foxglove
//! bridge, the dashboard) share. Every sample on the tapped keys is turned into the tool's own
//! item on Zenoh's receive thread and offered to one bounded queue; the tool drains the queue on
//! a thread or task of its own. Zenoh is never blocked: an arrival the full queue refuses is
//! dropped and counted, so a slow tool never stalls the session's other subscribers.
//!
//! The actors' typed and raw subscriptions (`nanobot_actors::bus`) follow the same rule through
//! their inboxes; both take a sample's bytes with [`payload_bytes`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use zenoh::bytes::ZBytes;
use zenoh::pubsub::Subscriber;
use zenoh::sample::Sample;
use zenoh::Session;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("subscribing to {key}: {reason}")]
    Subscribe { key: String, reason: String },
}

/// What a tap saw: every sample received, and those the full queue refused.
#[derive(Debug, Default)]
pub struct TapCounters {
    pub received: AtomicU64,
    pub dropped: AtomicU64,
}

impl TapCounters {
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Live subscriptions feeding one queue. Dropping the tap (or [`Tap::close`]) ends them, which
/// drops their senders: a reader of the queue then drains what is left and sees it closed.
pub struct Tap {
    subscribers: Vec<Subscriber<()>>,
    pub counters: Arc<TapCounters>,
}

impl Tap {
    /// Subscribe to every key expression in `keys`; each sample becomes `item(key, sample)` (with
    /// `key` the subscribed expression, shared) and is offered to `queue` without waiting.
    pub async fn open<T, F>(
        session: &Session,
        keys: &[String],
        queue: flume::Sender<T>,
        item: F,
    ) -> Result<Tap, TapError>
    where
        T: Send + 'static,
        F: Fn(&Arc<str>, &Sample) -> T + Clone + Send + Sync + 'static,
    {
        let counters = Arc::new(TapCounters::default());
        let mut subscribers = Vec::with_capacity(keys.len());
        for key in keys {
            let (queue, counters, item) = (queue.clone(), counters.clone(), item.clone());
            let subscribed: Arc<str> = Arc::from(key.as_str());
            let sub = session
                .declare_subscriber(key.clone())
                .callback(move |sample| {
                    counters.received.fetch_add(1, Ordering::Relaxed);
                    if queue.try_send(item(&subscribed, &sample)).is_err() {
                        counters.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .await
                .map_err(|e| TapError::Subscribe {
                    key: key.clone(),
                    reason: e.to_string(),
                })?;
            subscribers.push(sub);
        }
        Ok(Tap { subscribers, counters })
    }

    /// Undeclare every subscription, waiting for Zenoh to confirm.
    pub async fn close(self) {
        for sub in self.subscribers {
            let _ = sub.undeclare().await;
        }
    }
}

/// A sample's key as a shared string: the subscribed expression itself when the sample's key is
/// that expression (no allocation per sample for an exact key), else a copy.
pub fn sample_key(subscribed: &Arc<str>, sample: &Sample) -> Arc<str> {
    if sample.key_expr().as_str() == &**subscribed {
        subscribed.clone()
    } else {
        sample.key_expr().as_str().into()
    }
}

/// The bytes of a Zenoh payload: shared with Zenoh when contiguous, else gathered once.
pub fn payload_bytes(z: &ZBytes) -> Bytes {
    struct Whole(ZBytes);
    impl AsRef<[u8]> for Whole {
        fn as_ref(&self) -> &[u8] {
            self.0.slices().next().unwrap_or(&[])
        }
    }
    let mut slices = z.slices();
    match (slices.next(), slices.next()) {
        (None, _) => Bytes::new(),
        (Some(_), None) => Bytes::from_owner(Whole(z.clone())),
        _ => Bytes::from(z.to_bytes().into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn isolated() -> zenoh::Config {
        let mut c = zenoh::Config::default();
        c.insert_json5("scouting/multicast/enabled", "false").unwrap();
        c.insert_json5("listen/endpoints", "[]").unwrap();
        c
    }

    /// A full queue drops and counts the arrival and never blocks the publisher; what fits
    /// arrives in order with its key and bytes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_drops_and_counts_without_blocking() {
        let session = zenoh::open(isolated()).await.unwrap();
        let (tx, rx) = flume::bounded::<(Arc<str>, Bytes)>(3);
        let keys = vec!["tap/test/**".to_string()];
        let tap = Tap::open(&session, &keys, tx, |k, s| {
            (sample_key(k, s), payload_bytes(s.payload()))
        })
        .await
        .unwrap();
        for i in 0..10u8 {
            tokio::time::timeout(Duration::from_secs(5), session.put("tap/test/a", vec![i; 4]))
                .await
                .expect("a put never waits on the tap's queue")
                .unwrap();
        }
        let got: Vec<_> = rx.drain().collect();
        assert_eq!(got.len(), 3);
        assert_eq!(tap.counters.received(), 10);
        assert_eq!(tap.counters.dropped(), 7);
        assert_eq!(&*got[0].0, "tap/test/a");
        assert_eq!(&got[0].1[..], &[0u8; 4]);
        assert_eq!(&got[2].1[..], &[2u8; 4]);
        tap.close().await;
        assert!(rx.recv_async().await.is_err(), "closing the tap closes the queue");
    }
}
