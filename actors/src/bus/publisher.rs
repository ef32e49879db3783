//! Typed publishers: the envelope stamped with robot and sequence, handed typed to the same
//! node's subscribers and encoded once for Zenoh only while a remote subscriber matches.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nanobot_messages::{codec, Message, TraceContext, TraceSampler};
use zenoh::key_expr::KeyExpr;
use zenoh::qos::{CongestionControl, Priority};
use zenoh::sample::Locality;

use super::*;

impl Bus {
    /// A typed publisher that stamps `robot` and a per-publisher sequence in every envelope.
    pub async fn publisher<T: Message>(&self, key: &str, robot: &str, qos: PubQos) -> Result<Publisher<T>, BusError> {
        let (cc, prio, express) = match qos {
            PubQos::Control => (CongestionControl::Drop, Priority::InteractiveHigh, true),
            PubQos::Sensor => (CongestionControl::Block, Priority::InteractiveHigh, true),
            PubQos::Data => (CongestionControl::Block, Priority::Data, false),
            PubQos::Bulk => (CongestionControl::Drop, Priority::Background, false),
        };
        let key_expr = KeyExpr::from(owned_key(key)?);
        // Zenoh carries the message to other sessions only: this session's subscribers get it
        // from the local router.
        let inner = self
            .session
            .declare_publisher(key_expr.clone())
            .congestion_control(cc)
            .priority(prio)
            .express(express)
            .allowed_destination(Locality::Remote)
            .await
            .map_err(|e| zerr(key, e))?;
        let remote = Arc::new(AtomicBool::new(false));
        let r = remote.clone();
        inner
            .matching_listener()
            .callback(move |m| r.store(m.matching(), Ordering::Release))
            .background()
            .await
            .map_err(|e| zerr(key, e))?;
        // The listener reports changes; a subscriber that matched before it was declared is
        // read here (never cleared here: the listener may already have seen a newer state).
        if inner.matching_status().await.is_ok_and(|m| m.matching()) {
            remote.store(true, Ordering::Release);
        }
        Ok(Publisher {
            inner,
            remote,
            local: LocalRoute::new(self.local.clone(), key_expr),
            key: key.to_string(),
            robot: robot.to_string(),
            seq: AtomicU64::new(0),
            sampler: self.sampler,
            _t: PhantomData,
        })
    }
}

/// A typed publisher. Subscribers on the same [`Bus`] get the message typed, without
/// encoding; Zenoh carries it to remote subscribers, encoded once, only while one matches.
pub struct Publisher<T> {
    inner: zenoh::pubsub::Publisher<'static>,
    /// A remote subscriber matches (kept by Zenoh's matching listener).
    remote: Arc<AtomicBool>,
    local: LocalRoute,
    key: String,
    robot: String,
    seq: AtomicU64,
    sampler: TraceSampler,
    _t: PhantomData<fn(T)>,
}

impl<T: Message> Publisher<T> {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Start a trace here, if the bus's sampler picks it.
    pub fn new_trace(&self) -> Option<TraceContext> {
        self.sampler.root()
    }

    /// Publish `msg` as the start of a new trace (sampled at the bus's ratio). Returns its
    /// sequence number.
    pub async fn put(&self, msg: &T) -> Result<u64, BusError> {
        self.put_traced(msg, self.new_trace().as_ref()).await
    }

    /// Publish `msg` in the trace `trace` (pass `parent.child()` to continue a trace; `None`
    /// for a message of an unsampled trace).
    pub async fn put_traced(&self, msg: &T, trace: Option<&TraceContext>) -> Result<u64, BusError> {
        self.put_wait(msg, trace)
    }

    /// Publish with an explicit sequence number and stamp (bridges that forward a device's own).
    pub async fn put_with(
        &self,
        msg: &T,
        seq: u64,
        stamp_ns: u64,
        trace: Option<&TraceContext>,
    ) -> Result<(), BusError> {
        self.publish(msg, seq, stamp_ns, trace)
    }

    /// [`Publisher::put_traced`] without an async runtime (tight loops, bridges, benchmarks).
    pub fn put_wait(&self, msg: &T, trace: Option<&TraceContext>) -> Result<u64, BusError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.publish(msg, seq, codec::now_ns(), trace)?;
        Ok(seq)
    }

    /// Hand `msg` to the local subscribers, then to Zenoh if a remote one matches. A Zenoh put
    /// resolves at once (it queues, or waits for room under blocking congestion control, as
    /// Zenoh's async put does too).
    fn publish(&self, msg: &T, seq: u64, stamp_ns: u64, trace: Option<&TraceContext>) -> Result<(), BusError> {
        use zenoh::Wait;
        let locals = self.local.current();
        let remote = self.remote.load(Ordering::Acquire);
        let wants_payload = locals.as_ref().is_some_and(|l| l.wants_payload());
        let encoded = if remote || wants_payload {
            Some(
                codec::encode(&self.robot, seq, stamp_ns, msg).map_err(|e| BusError::Codec {
                    key: self.key.clone(),
                    source: e,
                })?,
            )
        } else {
            None
        };
        if let Some(locals) = locals {
            let payload = match &encoded {
                Some(e) if wants_payload => Some(Bytes::from(e.to_vec())),
                _ => None,
            };
            locals.deliver(&Delivery {
                key: self.local.key(),
                robot: &self.robot,
                seq,
                stamp_ns,
                kind: T::KIND,
                msg,
                trace: trace.copied(),
                payload: payload.as_ref(),
            });
        }
        if let (true, Some(e)) = (remote, encoded) {
            let put = self.inner.put(encoded_zbytes(e));
            let put = match trace {
                Some(t) => put.attachment(t.to_bytes().to_vec()),
                None => put,
            };
            put.wait().map_err(|e| zerr(&self.key, e))?;
        }
        Ok(())
    }

    /// Wait until at least one subscriber, local or remote, matches this publisher (a
    /// readiness signal for tools and tests, instead of sleeping); false after `timeout`.
    pub async fn wait_matched(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.remote.load(Ordering::Acquire) || self.local.current().is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
