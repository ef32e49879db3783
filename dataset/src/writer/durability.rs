//! [`Durability`]: what the writer may acknowledge, shared with the threads that make rows
//! durable.

use std::sync::Arc;

/// What is durable (the last sequence number and the row count), shared between a
/// [`DatasetWriter`] and the thread that fsyncs its journal.
#[derive(Clone, Default)]
pub struct Durability(Arc<DurableShared>);

#[derive(Default)]
pub(super) struct DurableShared {
    pub(super) state: std::sync::Mutex<DurableState>,
    pub(super) changed: std::sync::Condvar,
    pub(super) wake: std::sync::Mutex<Option<Box<dyn Fn() + Send>>>,
}

#[derive(Default)]
pub(super) struct DurableState {
    pub(super) seq: Option<u64>,
    pub(super) rows: u64,
    /// The first failure since the last was handled.
    pub(super) failed: Option<String>,
}

impl Durability {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, DurableState> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last durable sequence number, and how many rows are durable.
    pub fn get(&self) -> (Option<u64>, u64) {
        let s = self.lock();
        (s.seq, s.rows)
    }

    /// Call `wake` (from the journal thread) each time more rows become durable, and when a
    /// journal write fails.
    pub fn on_durable(&self, wake: impl Fn() + Send + 'static) {
        *self.0.wake.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(wake));
    }

    pub(super) fn reset(&self, seq: Option<u64>, rows: u64) {
        *self.lock() = DurableState {
            seq,
            rows,
            failed: None,
        };
    }

    pub(super) fn advance(&self, seq: u64, rows: u64) {
        {
            let mut s = self.lock();
            s.seq = Some(seq);
            s.rows += rows;
        }
        self.notify();
    }

    pub(super) fn fail(&self, why: String) {
        self.lock().failed.get_or_insert(why);
        self.notify();
    }

    /// Wake the listener, then the writer's waiters (so a listener has been told of every
    /// batch a returned `flush` covers).
    pub(super) fn notify(&self) {
        if let Some(wake) = &*self.0.wake.lock().unwrap_or_else(|e| e.into_inner()) {
            wake();
        }
        self.0.changed.notify_all();
    }

    pub(super) fn failed(&self) -> bool {
        self.lock().failed.is_some()
    }

    /// Forget the failure (it is being handled), and say what it was.
    pub(super) fn clear_failure(&self) -> Option<String> {
        self.lock().failed.take()
    }

    /// Wait until `rows` rows are durable (true) or a journal write failed (false).
    pub(super) fn wait_for(&self, rows: u64) -> bool {
        let mut s = self.lock();
        loop {
            if s.failed.is_some() {
                return false;
            }
            if s.rows >= rows {
                return true;
            }
            s = self.0.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}
