//! A state owned by a thread of its own, called from async code: fsyncs, Parquet reads, JPEG
//! decoding and training steps run there and never on the async runtime. Calls run in order,
//! one at a time; the caller awaits the answer without blocking.

/// A call to run on the worker thread.
type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

pub struct Worker<S> {
    tx: Option<std::sync::mpsc::Sender<Job<S>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<S: 'static> Worker<S> {
    /// Build the state with `open` on a new thread called `name`; the open error, if any, is
    /// returned here.
    pub async fn spawn(
        name: String,
        open: impl FnOnce() -> Result<S, String> + Send + 'static,
    ) -> Result<Worker<S>, String> {
        let (tx, rx) = std::sync::mpsc::channel::<Job<S>>();
        let (opened_tx, opened_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let mut state = match open() {
                    Ok(s) => {
                        let _ = opened_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = rx.recv() {
                    job(&mut state);
                }
            })
            .map_err(|e| format!("thread {name}: {e}"))?;
        opened_rx.await.map_err(|_| format!("thread {name} ended"))??;
        Ok(Worker {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Run `f` on the worker thread and wait for its answer; `None` if the thread has ended.
    pub async fn call<R: Send + 'static>(&self, f: impl FnOnce(&mut S) -> R + Send + 'static) -> Option<R> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .as_ref()?
            .send(Box::new(move |s| {
                let _ = tx.send(f(s));
            }))
            .ok()?;
        rx.await.ok()
    }
}

impl<S> Drop for Worker<S> {
    fn drop(&mut self) {
        // Close the channel; the thread ends after the calls already queued.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Lower the calling thread's scheduling priority by `nice` (Linux: the nice value is per
/// thread, and threads it starts inherit it): background work such as training and shadow
/// simulation then takes only the CPU that the robots' control loops leave. Best effort.
pub fn lower_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    if nice > 0 {
        // SAFETY: gettid and setpriority only read and set this thread's scheduling attribute.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            let now = libc::getpriority(libc::PRIO_PROCESS, tid);
            if libc::setpriority(libc::PRIO_PROCESS, tid, (now + nice).min(19)) != 0 {
                tracing::debug!("could not lower the thread's priority");
            }
        }
    }
}

/// A task an actor started (a socket reader, a queryable's server): stopped when the actor
/// drops it.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_run_in_order_on_the_workers_thread_and_open_errors_surface() {
        let w = Worker::spawn("nb-test-worker".into(), || Ok(Vec::<u32>::new()))
            .await
            .unwrap();
        for i in 0..3 {
            w.call(move |v| v.push(i)).await.unwrap();
        }
        let (seen, name) = w
            .call(|v| (v.clone(), std::thread::current().name().map(str::to_string)))
            .await
            .unwrap();
        assert_eq!(seen, vec![0, 1, 2]);
        assert_eq!(name.as_deref(), Some("nb-test-worker"));
        let err = Worker::<()>::spawn("nb-test-bad".into(), || Err("no disk".into())).await;
        assert_eq!(err.err().as_deref(), Some("no disk"));
    }
}
