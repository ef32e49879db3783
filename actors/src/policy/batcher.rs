//! The node's policy worker: one per node (a [`crate::runtime::NodeServices`] service), shared
//! by the policy actors of every robot the node serves. An actor hands it its robot's rollout
//! (history, vision-token cache, plan) when a chunk is due and awaits it back with the chunk;
//! the worker takes every request waiting when it is free, groups them by policy (robots on the
//! same weights, [`Runner::weights_key`]: canary robots run another adapter), and computes each
//! group as one batch
//! (`nanobot_policy::rollout::infer_batch`). A request never waits for others to arrive: under
//! light load a batch is one robot; under load the batch grows to what queued while the last
//! one computed, so the weights stream through the cache once for many robots.
//!
//! The queue holds at most one request per robot in practice (an actor waits for its answer);
//! it is bounded all the same, and a request it cannot take is refused and counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nanobot_policy::rollout::{infer_batch, Rollout};
use nanobot_policy::runner::Runner;

/// One robot's chunk request.
struct Job {
    runner: Arc<Runner>,
    rollout: Rollout,
    seed: u64,
    reply: tokio::sync::oneshot::Sender<Answer>,
}

/// The rollout back, the chunk (or why not), and how many robots shared the batch.
pub struct Answer {
    pub rollout: Rollout,
    pub chunk: Result<Vec<f32>, String>,
    pub batch: usize,
}

/// What the worker has done, for the actors' Stats.
#[derive(Debug, Default)]
pub struct BatchStats {
    pub batches: AtomicU64,
    pub chunks: AtomicU64,
    pub largest: AtomicU64,
    pub refused: AtomicU64,
}

pub struct Batcher {
    tx: flume::Sender<Job>,
    pub stats: Arc<BatchStats>,
}

impl Batcher {
    /// `threads` worker threads (each computes one batch at a time), batches of at most
    /// `max_batch` robots, at most `queue` requests waiting.
    pub fn start(threads: usize, max_batch: usize, queue: usize) -> Result<Batcher, String> {
        Batcher::start_held(threads, max_batch, queue, None)
    }

    /// [`Batcher::start`] with workers that wait for `hold` before serving (tests queue
    /// requests up first).
    fn start_held(
        threads: usize,
        max_batch: usize,
        queue: usize,
        hold: Option<flume::Receiver<()>>,
    ) -> Result<Batcher, String> {
        let (tx, rx) = flume::bounded::<Job>(queue.max(1));
        let stats = Arc::new(BatchStats::default());
        let max_batch = max_batch.max(1);
        for i in 0..threads.max(1) {
            let (rx, stats, hold) = (rx.clone(), stats.clone(), hold.clone());
            std::thread::Builder::new()
                .name(format!("nb-policy-{i}"))
                .spawn(move || {
                    if let Some(h) = hold {
                        let _ = h.recv();
                    }
                    serve(rx, &stats, max_batch)
                })
                .map_err(|e| format!("policy worker thread: {e}"))?;
        }
        Ok(Batcher { tx, stats })
    }

    /// The chunk for `rollout`'s newest observation, computed with the other robots' waiting
    /// requests. Refused at once (the rollout given back) when the queue is full; `None` for the
    /// rollout when the worker lost it (its thread died).
    pub async fn infer(
        &self,
        runner: Arc<Runner>,
        rollout: Rollout,
        seed: u64,
    ) -> Result<Answer, (Option<Rollout>, String)> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = Job {
            runner,
            rollout,
            seed,
            reply,
        };
        if let Err(e) = self.tx.try_send(job) {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            let (job, why) = match e {
                flume::TrySendError::Full(j) => (j, "the node's policy worker queue is full"),
                flume::TrySendError::Disconnected(j) => (j, "the node's policy worker has stopped"),
            };
            return Err((Some(job.rollout), why.to_string()));
        }
        // The worker always answers; a lost answer means its thread died with the rollout.
        rx.await
            .map_err(|_| (None, "the node's policy worker dropped the request".to_string()))
    }
}

/// A worker thread: wait for a request, take every other one waiting, compute by policy.
fn serve(rx: flume::Receiver<Job>, stats: &BatchStats, max_batch: usize) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < max_batch {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        while !jobs.is_empty() {
            let runner = jobs[0].runner.clone();
            let key = runner.weights_key();
            let (mut group, rest): (Vec<Job>, Vec<Job>) = jobs
                .into_iter()
                .partition(|j| Arc::ptr_eq(&j.runner, &runner) || j.runner.weights_key() == key);
            jobs = rest;
            let n = group.len();
            let mut items: Vec<(&mut Rollout, u64)> = group.iter_mut().map(|j| (&mut j.rollout, j.seed)).collect();
            let chunks = infer_batch(&runner, &mut items);
            drop(items);
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats.chunks.fetch_add(n as u64, Ordering::Relaxed);
            stats.largest.fetch_max(n as u64, Ordering::Relaxed);
            for (job, chunk) in group.into_iter().zip(chunks) {
                let _ = job.reply.send(Answer {
                    rollout: job.rollout,
                    chunk: chunk.map_err(|e| e.to_string()),
                    batch: n,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};
    use nanobot_policy::checkpoint::{Meta, NormStats, Role};
    use nanobot_policy::model::seeded_init;
    use nanobot_policy::preprocess::Step;
    use nanobot_policy::{Policy, PolicyConfig};

    fn runner(dir: &std::path::Path) -> Runner {
        runner_named(dir, "t")
    }

    fn runner_named(dir: &std::path::Path, version: &str) -> Runner {
        let cfg = PolicyConfig::load(std::path::Path::new("../configs/policy/tiny.toml")).unwrap();
        let vars = VarMap::new();
        Policy::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu), None).unwrap();
        seeded_init(&vars, 3).unwrap();
        let meta = Meta {
            kind: Role::Base,
            version: version.into(),
            norm: NormStats::fit(
                &[vec![-1.0; cfg.inputs.state_dim], vec![1.0; cfg.inputs.state_dim]],
                &[vec![-1.0; cfg.head.action_dim], vec![1.0; cfg.head.action_dim]],
            ),
            config: cfg,
        };
        let path = dir.join(format!("{version}.safetensors"));
        nanobot_policy::checkpoint::save(&path, &vars, &meta).unwrap();
        Runner::load(&path, None).unwrap()
    }

    fn step(r: &Runner, k: usize) -> Step {
        let c = r.config();
        let n = c.vision.image_size;
        Step {
            rgb: (0..n * n * 3).map(|i| ((i * 7 + k * 41) % 251) as u8).collect(),
            state: vec![0.1 * k as f32; c.inputs.state_dim],
            surface: vec![0.0; c.inputs.surface_rows * c.inputs.surface_cols],
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn robots_waiting_together_are_one_batch_and_get_their_own_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let r = Arc::new(runner(dir.path()));
        // Half the robots load the same checkpoint on their own: the same weights all the same.
        let r2 = Arc::new(runner(dir.path()));
        let robots = 6;
        // What each robot's chunk is when computed alone.
        let mut alone = Vec::new();
        let mut rollouts = Vec::new();
        for k in 0..robots {
            let mut ro = Rollout::new(&r, None, 0, 0).unwrap();
            ro.observe(1, 5, 0, step(&r, k));
            let mut solo = Rollout::new(&r, None, 0, 0).unwrap();
            solo.observe(1, 5, 0, step(&r, k));
            alone.push(solo.infer(&r, 5).unwrap());
            rollouts.push(ro);
        }
        let (release, hold) = flume::bounded(1);
        let b = Arc::new(Batcher::start_held(1, 32, 64, Some(hold)).unwrap());
        let tasks: Vec<_> = rollouts
            .into_iter()
            .enumerate()
            .map(|(k, ro)| {
                let b = b.clone();
                let r = if k % 2 == 0 { r.clone() } else { r2.clone() };
                tokio::spawn(async move { b.infer(r, ro, 5).await })
            })
            .collect();
        while b.tx.len() < robots {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        release.send(()).unwrap();
        let mut batches = Vec::new();
        for (k, t) in tasks.into_iter().enumerate() {
            let a = t.await.unwrap().map_err(|(_, e)| e).unwrap();
            let chunk = a.chunk.unwrap();
            let worst = chunk
                .iter()
                .zip(&alone[k])
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(
                worst < 1e-4,
                "robot {k}: the batched chunk differs from its own by {worst}"
            );
            batches.push(a.batch);
        }
        assert_eq!(batches, vec![robots; robots], "the six waiting robots were one batch");
        assert_eq!(b.stats.chunks.load(Ordering::Relaxed), robots as u64);
        assert_eq!(b.stats.batches.load(Ordering::Relaxed), 1);
        // A second policy (other weights) is never batched with the first.
        let other = Arc::new(runner_named(dir.path(), "other"));
        let mut ro = Rollout::new(&other, None, 0, 0).unwrap();
        ro.observe(1, 5, 0, step(&other, 0));
        let a = b.infer(other, ro, 5).await.map_err(|(_, e)| e).unwrap();
        assert_eq!(a.batch, 1);
    }
}
