//! Delivery between the actors of one node. A publisher hands its typed message straight to the
//! subscribers declared on the same [`Bus`](super::Bus): no encoding, no decoding, no Zenoh
//! routing, one clone per subscriber. Zenoh carries the message only to remote subscribers
//! (other nodes, `nanobot topic echo`, a Python client), and only when one matches.
//!
//! Subscribers that take payloads undecoded (ingest's raw topics) get the encoded envelope,
//! made once per publication and only when such a subscriber matches.

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use bytes::Bytes;
use nanobot_messages::{Kind, TraceContext};
use zenoh::key_expr::{KeyExpr, OwnedKeyExpr};

/// One publication as the local subscribers see it.
pub(crate) struct Delivery<'a> {
    pub key: &'a KeyExpr<'static>,
    pub robot: &'a str,
    pub seq: u64,
    pub stamp_ns: u64,
    pub kind: Kind,
    /// The message itself (`&T`).
    pub msg: &'a (dyn Any + Send + Sync),
    pub trace: Option<TraceContext>,
    /// The encoded envelope, present when a subscriber that wants it matches.
    pub payload: Option<&'a Bytes>,
}

impl<'a> Delivery<'a> {
    /// The envelope header this publication would carry on the wire.
    pub fn header(&self) -> nanobot_messages::HeaderRef<'a> {
        nanobot_messages::HeaderRef {
            kind: self.kind,
            robot: self.robot,
            seq: self.seq,
            stamp_ns: self.stamp_ns,
        }
    }
}

type Deliver = Box<dyn Fn(&Delivery) + Send + Sync>;

pub(crate) struct LocalSub {
    id: u64,
    key: OwnedKeyExpr,
    /// Wants the encoded envelope rather than the typed message.
    raw: bool,
    deliver: Deliver,
}

/// The subscribers declared on one session.
#[derive(Default)]
pub(crate) struct LocalRouter {
    /// Bumped on every declaration and undeclaration, so publishers know to look again.
    generation: AtomicU64,
    next_id: AtomicU64,
    subs: RwLock<Vec<Arc<LocalSub>>>,
}

/// Undeclares a local subscriber when dropped.
pub(crate) struct LocalGuard {
    router: Weak<LocalRouter>,
    id: u64,
}

impl Drop for LocalGuard {
    fn drop(&mut self) {
        if let Some(router) = self.router.upgrade() {
            let mut subs = router.subs.write().unwrap_or_else(|e| e.into_inner());
            subs.retain(|s| s.id != self.id);
            router.generation.fetch_add(1, Ordering::Release);
        }
    }
}

impl LocalRouter {
    pub fn declare(self: &Arc<Self>, key: OwnedKeyExpr, raw: bool, deliver: Deliver) -> LocalGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut subs = self.subs.write().unwrap_or_else(|e| e.into_inner());
        subs.push(Arc::new(LocalSub { id, key, raw, deliver }));
        self.generation.fetch_add(1, Ordering::Release);
        LocalGuard {
            router: Arc::downgrade(self),
            id,
        }
    }
}

/// The local subscribers that match one publication key.
#[derive(Clone, Default)]
pub(crate) struct Matched {
    subs: Arc<[Arc<LocalSub>]>,
    any_raw: bool,
}

impl Matched {
    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }
    pub fn wants_payload(&self) -> bool {
        self.any_raw
    }
    pub fn deliver(&self, d: &Delivery) {
        for s in self.subs.iter() {
            (s.deliver)(d);
        }
    }
}

/// A publisher's cached view of the local subscribers matching its key, looked up again only
/// when a subscriber was declared or undeclared since.
pub(crate) struct LocalRoute {
    router: Arc<LocalRouter>,
    key: KeyExpr<'static>,
    cached: Mutex<(u64, Matched)>,
    /// The generation `cached` was made at, and whether it matched nothing: a publisher with
    /// no local subscriber (the common case on a robot) checks two atomics and takes no lock.
    seen: AtomicU64,
    none: AtomicBool,
}

impl LocalRoute {
    pub fn new(router: Arc<LocalRouter>, key: KeyExpr<'static>) -> Self {
        LocalRoute {
            router,
            key,
            cached: Mutex::new((u64::MAX, Matched::default())),
            seen: AtomicU64::new(u64::MAX),
            none: AtomicBool::new(false),
        }
    }

    pub fn key(&self) -> &KeyExpr<'static> {
        &self.key
    }

    /// The matching local subscribers; `None` when there are none.
    pub fn current(&self) -> Option<Matched> {
        let generation = self.router.generation.load(Ordering::Acquire);
        if self.seen.load(Ordering::Acquire) == generation && self.none.load(Ordering::Acquire) {
            return None;
        }
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if cached.0 != generation {
            let subs = self.router.subs.read().unwrap_or_else(|e| e.into_inner());
            let matched: Vec<Arc<LocalSub>> = subs.iter().filter(|s| s.key.intersects(&self.key)).cloned().collect();
            let any_raw = matched.iter().any(|s| s.raw);
            *cached = (
                generation,
                Matched {
                    subs: matched.into(),
                    any_raw,
                },
            );
            self.none.store(cached.1.is_empty(), Ordering::Release);
            self.seen.store(generation, Ordering::Release);
        }
        (!cached.1.is_empty()).then(|| cached.1.clone())
    }
}
