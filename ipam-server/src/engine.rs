//! The engine: one thread owns the allocator and the store and commits in groups.
//!
//! Requests queue as closures. The thread takes every queued request (up to a batch limit),
//! runs them against the allocator in order, commits the changes they made in one store
//! transaction, and only then answers them. While a commit is in flight new requests queue
//! up, so the next batch grows with the load: durability costs one fsync per batch, not per
//! request. If a commit fails, the allocator is rebuilt from the store and the whole batch
//! is answered with the error, so memory never runs ahead of what is durable.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::allocator::{Allocator, Change};
use crate::metrics::Metrics;
use crate::store::{LeaseStore, StoreError};

/// Most requests answered by one commit.
const MAX_BATCH: usize = 2048;
/// Requests that may wait for the engine before callers are held back.
const QUEUE: usize = 8192;

/// Why the engine did not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The batch could not be made durable; nothing in it happened.
    #[error("lease store commit failed, nothing was changed: {0}")]
    Commit(String),
    /// The engine thread has stopped (shutdown, or the store cannot be read back).
    #[error("allocation engine is not running: {0}")]
    Stopped(String),
}

type Reply = Box<dyn FnOnce(Result<(), EngineError>) + Send>;
type Job = Box<dyn FnOnce(&mut Allocator, i64) -> Reply + Send>;

/// Handle to the engine thread; cheap to clone.
#[derive(Debug, Clone)]
pub struct Engine {
    tx: mpsc::Sender<Job>,
    store: String,
    /// Turns true when the thread has exited and closed the store.
    stopped: watch::Receiver<bool>,
}

fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Loads the store into a new allocator, reporting (and skipping) records it cannot use.
pub fn restore(store: &dyn LeaseStore) -> Result<Allocator, StoreError> {
    let loaded = store.load()?;
    for p in &loaded.problems {
        warn!(record = %p.what, error = %p.error, "skipping unreadable store record");
    }
    let (alloc, problems) = Allocator::restore(loaded.pools, loaded.leases);
    for p in &problems {
        warn!(record = %p.what, error = %p.error, "skipping store record");
    }
    Ok(alloc)
}

impl Engine {
    /// Loads the store and starts the engine thread.
    pub fn start(store: Box<dyn LeaseStore>, metrics: Arc<Metrics>) -> Result<Engine, StoreError> {
        let describe = store.describe();
        let alloc = restore(store.as_ref())?;
        info!(store = %describe, leases = alloc.lease_count(), pools = alloc.pool_count(), "state loaded");
        let (tx, rx) = mpsc::channel(QUEUE);
        let (stopped_tx, stopped) = watch::channel(false);
        let span = tracing::info_span!("engine", store = %describe);
        std::thread::Builder::new()
            .name("ipam-engine".into())
            .spawn(move || {
                span.in_scope(|| run(alloc, store, rx, &metrics));
                let _ = stopped_tx.send(true);
            })
            .map_err(|e| StoreError::new("start engine thread", e))?;
        Ok(Engine { tx, store: describe, stopped })
    }

    /// Resolves once every handle is dropped, the queued requests are answered and the store
    /// is closed (so another engine may open it).
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.stopped.clone();
        async move {
            // An error means the thread is gone, which is what we wait for.
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// Description of the store behind the engine.
    pub fn store(&self) -> &str {
        &self.store
    }

    /// Runs `f` on the allocator and answers once the changes it made are durable.
    pub async fn call<R, F>(&self, f: F) -> Result<R, EngineError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Allocator, i64) -> R + Send + 'static,
    {
        let (done, wait) = oneshot::channel();
        let job: Job = Box::new(move |alloc, now| {
            let out = f(alloc, now);
            Box::new(move |committed: Result<(), EngineError>| {
                let _ = done.send(committed.map(|()| out));
            })
        });
        self.tx.send(job).await.map_err(|_| EngineError::Stopped("engine thread exited".into()))?;
        wait.await.map_err(|_| EngineError::Stopped("engine dropped the request".into()))?
    }
}

/// The engine thread's loop; returns (dropping the store) when every sender is gone.
fn run(mut alloc: Allocator, mut store: Box<dyn LeaseStore>, mut rx: mpsc::Receiver<Job>, metrics: &Metrics) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let now = now_unix_ms();
        let mut replies: Vec<Reply> = Vec::with_capacity(batch.len());
        let mut panicked = false;
        for job in batch.drain(..) {
            // A panic here is a bug; it must cost this batch, not the whole service.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut alloc, now))) {
                Ok(reply) => replies.push(reply),
                Err(_) => panicked = true,
            }
        }
        let changes: Vec<Change> = alloc.drain_journal().collect();
        let outcome = if panicked {
            error!("a request panicked; discarding the batch and reloading state from the store");
            Err(EngineError::Commit("internal error while handling the batch".into()))
        } else if changes.is_empty() {
            Ok(())
        } else {
            let started = Instant::now();
            let committed = store.commit(&changes);
            metrics.observe_commit(started.elapsed(), replies.len(), committed.is_ok());
            committed.map_err(|e| {
                error!(error = %e, changes = changes.len(), "commit failed; reloading state from the store");
                EngineError::Commit(e.to_string())
            })
        };
        if outcome.is_err() {
            match restore(store.as_ref()) {
                Ok(a) => alloc = a,
                Err(e) => {
                    error!(error = %e, "cannot reload state after a failed batch; stopping");
                    let stop = EngineError::Stopped(format!("state could not be reloaded: {e}"));
                    replies.into_iter().for_each(|r| r(Err(stop.clone())));
                    return;
                }
            }
        }
        for r in replies {
            r(outcome.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::Loaded;
    use std::sync::Mutex;

    /// A store that records commits and can be told to fail the next one.
    #[derive(Clone, Default)]
    struct Recorder {
        commits: Arc<Mutex<Vec<Vec<Change>>>>,
        fail_next: Arc<Mutex<bool>>,
    }

    impl LeaseStore for Recorder {
        fn describe(&self) -> String {
            "recorder".into()
        }
        fn load(&self) -> Result<Loaded, StoreError> {
            let mut loaded = Loaded::default();
            for c in self.commits.lock().expect("lock").iter().flatten() {
                match c {
                    Change::PutLease(l) => loaded.leases.push((**l).clone()),
                    Change::DeleteLease { network, address } => {
                        loaded.leases.retain(|l| !(l.network == *network && l.address == *address))
                    }
                    Change::PutPool { network, range } => {
                        loaded.pools.push((network.to_string(), range.clone()))
                    }
                }
            }
            Ok(loaded)
        }
        fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
            if std::mem::take(&mut *self.fail_next.lock().expect("lock")) {
                return Err(StoreError::new("commit", "disk full"));
            }
            self.commits.lock().expect("lock").push(changes.to_vec());
            Ok(())
        }
    }

    fn reserve(
        engine: &Engine,
        ip: &'static str,
    ) -> impl Future<Output = Result<Result<(), String>, EngineError>> {
        let engine = engine.clone();
        async move {
            engine
                .call(move |a, now| {
                    a.reserve("", ip.parse().expect("ip"), "t", now).map(|_| ()).map_err(|e| e.to_string())
                })
                .await
        }
    }

    #[tokio::test]
    async fn concurrent_requests_share_commits_and_all_land() {
        let rec = Recorder::default();
        let engine = Engine::start(Box::new(rec.clone()), Metrics::new()).expect("start");
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let e = engine.clone();
            tasks.push(tokio::spawn(async move {
                let ip: std::net::IpAddr = [10, 0, (i / 250) as u8, (i % 250) as u8 + 1].into();
                e.call(move |a, now| a.reserve("", ip, "t", now).is_ok()).await
            }));
        }
        for t in tasks {
            assert!(t.await.expect("join").expect("engine"));
        }
        let commits = rec.commits.lock().expect("lock");
        let changes: usize = commits.iter().map(Vec::len).sum();
        assert_eq!(changes, 200);
        assert!(commits.len() <= 200);
    }

    #[tokio::test]
    async fn a_panicking_request_costs_its_batch_not_the_engine() {
        let rec = Recorder::default();
        let engine = Engine::start(Box::new(rec.clone()), Metrics::new()).expect("start");
        let err = engine
            .call(|a, now| {
                let _ = a.reserve("", "10.0.0.3".parse().expect("ip"), "t", now);
                panic!("bug in a request handler")
            })
            .await
            .expect_err("the panicking request fails");
        assert!(matches!(err, EngineError::Stopped(_)), "{err}");
        // Its half-done change was discarded and the engine still serves.
        reserve(&engine, "10.0.0.3").await.expect("engine").expect("10.0.0.3 is free");
    }

    #[tokio::test]
    async fn failed_commit_answers_error_and_rolls_memory_back() {
        let rec = Recorder::default();
        let engine = Engine::start(Box::new(rec.clone()), Metrics::new()).expect("start");
        reserve(&engine, "10.0.0.1").await.expect("engine").expect("reserve");
        *rec.fail_next.lock().expect("lock") = true;
        let err = reserve(&engine, "10.0.0.2").await.expect_err("commit fails");
        assert_eq!(err.to_string(), "lease store commit failed, nothing was changed: commit: disk full");
        // 10.0.0.2 was rolled back, so it can be reserved now; 10.0.0.1 is still held.
        reserve(&engine, "10.0.0.2").await.expect("engine").expect("reserve after rollback");
        let held = reserve(&engine, "10.0.0.1").await.expect("engine").expect_err("still held");
        assert!(held.contains("already held"), "{held}");
        let pools = engine.call(|a, _| a.pool_count()).await.expect("engine");
        assert_eq!(pools, 0);
    }
}
