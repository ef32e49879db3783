//! Inboxes: the one bounded queue between a network source (a Zenoh subscription, a UDP
//! socket, a serial port) and the actor that consumes it.
//!
//! The source side pushes without ever blocking — it runs on Zenoh's receive thread or a
//! socket task, which must not wait for a slow consumer — and what does not fit is counted.
//! An inbox keeps either the latest message only (control paths: a stale observation is
//! replaced, never queued) or up to `queue` messages in order (data paths: an arrival that finds
//! the queue full is dropped and counted). Which one is configuration: every actor input can be
//! set in the actor's config (`inputs.NAME = { keep = "latest" }` or `{ keep = "all", queue = N }`),
//! as dora's `queue_size` is.
//!
//! The consumer is woken once when the inbox goes from empty to non-empty (so an actor's mailbox
//! holds at most one wake-up per input, however fast the source), and drains it with `take`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

/// What an inbox keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "keep", rename_all = "lowercase", deny_unknown_fields)]
pub enum Keep {
    /// The newest message only; a message not taken in time is replaced (counted).
    Latest,
    /// Every message, in order, up to `queue`; arrivals beyond it are dropped (counted).
    All { queue: usize },
}

impl Keep {
    pub fn describe(&self) -> String {
        match self {
            Keep::Latest => "latest".into(),
            Keep::All { queue } => format!("all (queue {queue})"),
        }
    }
}

/// Counters of one inbox.
#[derive(Debug, Default)]
pub struct InboxStats {
    /// Messages offered by the source.
    pub received: AtomicU64,
    /// Latest-only: messages replaced before they were taken.
    pub replaced: AtomicU64,
    /// Queue: arrivals dropped because the queue was full.
    pub overflowed: AtomicU64,
    /// Messages the source could not decode (counted by the source).
    pub decode_errors: AtomicU64,
    /// The bound the inbox was built with: its queue size, or 0 for latest-only (what the
    /// runtime reports as `inputs.NAME.queue`, so an engineer sees what a config override did).
    pub queue: AtomicU64,
}

impl InboxStats {
    /// Messages that never reached the consumer.
    pub fn dropped(&self) -> u64 {
        self.replaced.load(Ordering::Relaxed)
            + self.overflowed.load(Ordering::Relaxed)
            + self.decode_errors.load(Ordering::Relaxed)
    }
}

type Wake = Box<dyn Fn() + Send + Sync>;

struct Shared<T> {
    queue: Mutex<VecDeque<T>>,
    keep: Keep,
    stats: Arc<InboxStats>,
    wake: Wake,
    notify: tokio::sync::Notify,
}

/// The source side of an inbox: cheap to clone, never blocks.
pub struct Feeder<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Feeder<T> {
    fn clone(&self) -> Self {
        Feeder {
            shared: self.shared.clone(),
        }
    }
}

/// The consumer side of an inbox. Dropping it drops the source guard it holds (a Zenoh
/// subscription is undeclared, a reader task stopped).
pub struct Inbox<T> {
    shared: Arc<Shared<T>>,
    _guard: Option<Box<dyn Send + Sync>>,
}

/// A new inbox; `wake` runs (on the source's thread) when a message arrives into an empty inbox.
pub fn inbox<T>(keep: Keep, wake: impl Fn() + Send + Sync + 'static) -> (Feeder<T>, Inbox<T>) {
    let cap = match keep {
        Keep::Latest => 1,
        Keep::All { queue } => queue.max(1),
    };
    let shared = Arc::new(Shared {
        queue: Mutex::new(VecDeque::with_capacity(cap.min(1024))),
        keep,
        stats: Arc::new(InboxStats {
            queue: AtomicU64::new(match keep {
                Keep::Latest => 0,
                Keep::All { queue } => queue.max(1) as u64,
            }),
            ..InboxStats::default()
        }),
        wake: Box::new(wake),
        notify: tokio::sync::Notify::new(),
    });
    (Feeder { shared: shared.clone() }, Inbox { shared, _guard: None })
}

impl<T> Feeder<T> {
    /// Offer a message. Returns false when it was dropped (the queue was full).
    pub fn push(&self, msg: T) -> bool {
        let s = &*self.shared;
        s.stats.received.fetch_add(1, Ordering::Relaxed);
        let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
        let was_empty = q.is_empty();
        match s.keep {
            Keep::Latest => {
                if q.pop_front().is_some() {
                    s.stats.replaced.fetch_add(1, Ordering::Relaxed);
                }
                q.push_back(msg);
            }
            Keep::All { queue } => {
                if q.len() >= queue.max(1) {
                    s.stats.overflowed.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                q.push_back(msg);
            }
        }
        drop(q);
        s.notify.notify_one();
        if was_empty {
            (s.wake)();
        }
        true
    }

    pub fn stats(&self) -> &Arc<InboxStats> {
        &self.shared.stats
    }
}

impl<T> Inbox<T> {
    /// Keep `guard` alive as long as the inbox (the subscription or task that feeds it).
    pub fn with_guard(mut self, guard: impl Send + Sync + 'static) -> Self {
        self._guard = Some(Box::new(guard));
        self
    }

    /// The oldest message waiting (the only one, for a latest-only inbox).
    pub fn take(&self) -> Option<T> {
        self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
    }

    /// Apply `f` to the message waiting next without taking it.
    pub fn peek<R>(&self, f: impl FnOnce(&T) -> R) -> Option<R> {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .front()
            .map(f)
    }

    /// Wait for the next message.
    pub async fn recv(&self) -> T {
        loop {
            let notified = self.shared.notify.notified();
            if let Some(m) = self.take() {
                return m;
            }
            notified.await;
        }
    }

    pub fn stats(&self) -> &Arc<InboxStats> {
        &self.shared.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn latest_replaces_and_counts() {
        let wakes = Arc::new(AtomicUsize::new(0));
        let w = wakes.clone();
        let (tx, rx) = inbox::<u32>(Keep::Latest, move || {
            w.fetch_add(1, Ordering::Relaxed);
        });
        for i in 0..5 {
            assert!(tx.push(i));
        }
        assert_eq!(rx.take(), Some(4));
        assert_eq!(rx.take(), None);
        assert_eq!(rx.stats().replaced.load(Ordering::Relaxed), 4);
        // One wake-up for the burst: the inbox went from empty to non-empty once.
        assert_eq!(wakes.load(Ordering::Relaxed), 1);
        tx.push(9);
        assert_eq!(wakes.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_full_queue_drops_arrivals_and_counts_them_without_blocking() {
        let (tx, rx) = inbox::<u32>(Keep::All { queue: 3 }, || {});
        let pushed: Vec<bool> = (0..5).map(|i| tx.push(i)).collect();
        assert_eq!(pushed, [true, true, true, false, false]);
        assert_eq!(rx.stats().overflowed.load(Ordering::Relaxed), 2);
        assert_eq!(rx.stats().dropped(), 2);
        let got: Vec<u32> = std::iter::from_fn(|| rx.take()).collect();
        assert_eq!(got, [0, 1, 2], "the oldest are kept, in order");
    }

    #[test]
    fn keep_parses_from_toml() {
        #[derive(Deserialize)]
        struct C {
            a: Keep,
            b: Keep,
        }
        let c: C = toml::from_str("a = { keep = \"latest\" }\nb = { keep = \"all\", queue = 7 }").unwrap();
        assert_eq!((c.a, c.b), (Keep::Latest, Keep::All { queue: 7 }));
        assert!(toml::from_str::<C>("a = { keep = \"some\" }\nb = { keep = \"latest\" }").is_err());
    }
}
