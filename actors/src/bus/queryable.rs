//! Typed queryables and queries: requests on a bounded queue, replies in the envelope with the
//! trace context carried on.

use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nanobot_messages::{codec, CodecError, Header, Message, TraceContext};

use super::*;

impl Bus {
    /// A typed queryable: requests of type `Q` arrive on a bounded queue.
    pub async fn queryable<Q: Message>(&self, key: &str, capacity: usize) -> Result<Queryable<Q>, BusError> {
        let inner = self
            .session
            .declare_queryable(key.to_string())
            .with(flume::bounded(capacity.max(1)))
            .await
            .map_err(|e| zerr(key, e))?;
        Ok(Queryable {
            inner,
            key: key.to_string(),
            stats: InboxStats::default(),
            warn: DecodeWarn::default(),
            _q: PhantomData,
        })
    }

    /// Ask every matching queryable; each reply decodes to `R` or an error naming the key.
    pub async fn get<Q: Message, R: Message>(
        &self,
        key: &str,
        robot: &str,
        request: &Q,
        timeout: Duration,
    ) -> Result<Vec<Result<Received<R>, BusError>>, BusError> {
        let enc = codec::encode(robot, 0, codec::now_ns(), request).map_err(|e| BusError::Codec {
            key: key.into(),
            source: e,
        })?;
        let mut get = self
            .session
            .get(key.to_string())
            .payload(encoded_zbytes(enc))
            // Every reply, even several on one key: any peer may answer, and the caller checks
            // which answer is genuine (Zenoh's default would keep one per key).
            .consolidation(zenoh::query::ConsolidationMode::None)
            .timeout(timeout);
        if let Some(trace) = self.new_trace() {
            get = get.attachment(trace.to_bytes().to_vec());
        }
        let replies = get.await.map_err(|e| zerr(key, e))?;
        let mut out = Vec::new();
        while let Ok(reply) = replies.recv_async().await {
            out.push(match reply.result() {
                Ok(sample) => decode_sample::<R>(sample).map_err(|e| BusError::Codec {
                    key: sample.key_expr().as_str().to_string(),
                    source: e,
                }),
                Err(err) => Err(zerr(
                    key,
                    format!("error reply: {}", err.payload().try_to_string().unwrap_or_default()),
                )),
            });
        }
        Ok(out)
    }
}

/// A typed queryable.
pub struct Queryable<Q> {
    inner: zenoh::query::Queryable<flume::Receiver<zenoh::query::Query>>,
    key: String,
    stats: InboxStats,
    warn: DecodeWarn,
    _q: PhantomData<fn(Q)>,
}

/// One request to a [`Queryable`].
pub struct Request<Q> {
    query: zenoh::query::Query,
    pub header: Header,
    pub msg: Q,
    pub trace: Option<TraceContext>,
}

impl<Q: Message> Queryable<Q> {
    /// The next well-formed request; malformed ones get an error reply and are counted.
    pub async fn recv(&self) -> Option<Request<Q>> {
        loop {
            let query = self.inner.recv_async().await.ok()?;
            self.stats.received.fetch_add(1, Ordering::Relaxed);
            let trace = query
                .attachment()
                .and_then(|a| a.try_to_string().ok())
                .and_then(|t| TraceContext::parse(&t));
            let decoded = match query.payload() {
                Some(p) => codec::decode_pieces::<Q>(&payload_pieces(p)),
                None => Err(CodecError::Truncated {
                    what: "header",
                    need: 4,
                    have: 0,
                }),
            };
            match decoded {
                Ok((header, msg)) => {
                    return Some(Request {
                        query,
                        header,
                        msg,
                        trace,
                    })
                }
                Err(e) => {
                    self.warn.warn(&self.stats, &self.key, &e);
                    let _ = query.reply_err(format!("{}: {e}", Q::KIND)).await;
                }
            }
        }
    }
    pub fn stats(&self) -> &InboxStats {
        &self.stats
    }
}

impl<Q> Request<Q> {
    /// The key expression the request was sent on.
    pub fn key(&self) -> &str {
        self.query.key_expr().as_str()
    }

    /// Answer with an error (a request that cannot be served as asked).
    pub async fn reply_err(&self, reason: &str) -> Result<(), BusError> {
        let key = self.query.key_expr().as_str().to_string();
        self.query
            .reply_err(reason.to_string())
            .await
            .map_err(|e| zerr(&key, e))
    }

    pub async fn reply<R: Message>(&self, robot: &str, msg: &R) -> Result<(), BusError> {
        let key = self.query.key_expr().as_str().to_string();
        let enc = codec::encode(robot, self.header.seq, codec::now_ns(), msg).map_err(|e| BusError::Codec {
            key: key.clone(),
            source: e,
        })?;
        let mut reply = self.query.reply(self.query.key_expr().clone(), encoded_zbytes(enc));
        if let Some(t) = &self.trace {
            reply = reply.attachment(t.child().to_bytes().to_vec());
        }
        reply.await.map_err(|e| zerr(&key, e))
    }
}
