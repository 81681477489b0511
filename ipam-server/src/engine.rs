//! The engine: one thread owns the allocator and the store and commits in groups.
//!
//! Requests queue as jobs. The thread takes every queued job (up to a batch limit), runs
//! them against the allocator in order, commits the changes they made together, and only
//! then answers them. While a commit is in flight new requests queue up, so the next batch
//! grows with the load: durability costs one round (one fsync, one set of API calls) per
//! batch, not per request.
//!
//! A store whose writes are independent round trips (the API server) is pipelined
//! instead: the thread hands each batch's writes to the store and goes on with the next
//! batch without waiting, so writes flow continuously rather than in waves that each wait
//! for their slowest member. Answers still leave in the order the requests ran, each once
//! every write made up to and including its own run is durable: the same guarantee as a
//! group commit, without the wait for writes that came later.
//!
//! When the store refuses some writes (another server got there first), memory takes the
//! store's word for those addresses and the jobs that made them run again, so they choose
//! again; the others are answered. When a commit fails outright, the allocator is rebuilt
//! from the store and the batch is answered with the error, so memory never runs ahead of
//! what is durable. A store that says this server may no longer write stops the engine.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::allocator::{Allocator, Change};
use crate::metrics::Metrics;
use crate::store::{CommitError, LeaseStore, StoreError, WriteOutcome, WriteReport};

/// Most requests answered by one commit.
const MAX_BATCH: usize = 2048;
/// Requests that may wait for the engine before callers are held back.
const QUEUE: usize = 8192;
/// How often a job whose writes the store refused runs again before it is answered with
/// the conflict.
const MAX_ATTEMPTS: usize = 4;

/// Why the engine did not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The batch could not be made durable; nothing in it happened.
    #[error("lease store commit failed, nothing was changed: {0}")]
    Commit(String),
    /// The store kept refusing this request's writes (other servers writing the same
    /// addresses); its other writes may stand, and a retry is safe.
    #[error("lease store refused the change {MAX_ATTEMPTS} times: {0}")]
    Conflict(String),
    /// This server is not (or no longer) allowed to write.
    #[error("not the leader: {0}")]
    NotLeader(String),
    /// The engine thread has stopped (shutdown, or the store cannot be read back).
    #[error("allocation engine is not running: {0}")]
    Stopped(String),
}

/// A queued request: it can run more than once (after a refused write) and is answered once.
trait Job: Send {
    fn run(&mut self, alloc: &mut Allocator, now_unix_ms: i64);
    fn answer(self: Box<Self>, outcome: Result<(), EngineError>);
}

struct CallJob<F, R> {
    f: F,
    out: Option<R>,
    done: oneshot::Sender<Result<R, EngineError>>,
}

impl<F, R> Job for CallJob<F, R>
where
    F: FnMut(&mut Allocator, i64) -> R + Send,
    R: Send,
{
    fn run(&mut self, alloc: &mut Allocator, now_unix_ms: i64) {
        self.out = Some((self.f)(alloc, now_unix_ms));
    }

    fn answer(self: Box<Self>, outcome: Result<(), EngineError>) {
        let CallJob { out, done, .. } = *self;
        let out = outcome.and_then(|()| out.ok_or_else(|| EngineError::Commit("request did not run".into())));
        // The caller may have given up waiting; nobody is left to tell.
        let _ = done.send(out);
    }
}

/// Handle to the engine thread; cheap to clone.
#[derive(Debug, Clone)]
pub struct Engine {
    tx: mpsc::Sender<Box<dyn Job>>,
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
    /// Starts the engine thread, which loads the store first; resolves once it has.
    /// Loading runs on that thread because a store may block on the async runtime.
    pub async fn start(mut store: Box<dyn LeaseStore>, metrics: Arc<Metrics>) -> Result<Engine, StoreError> {
        let describe = store.describe();
        let (tx, rx) = mpsc::channel(QUEUE);
        let (stopped_tx, stopped) = watch::channel(false);
        let (loaded_tx, loaded) = oneshot::channel();
        let span = tracing::info_span!("engine", store = %describe);
        std::thread::Builder::new()
            .name("ipam-engine".into())
            .spawn(move || {
                span.in_scope(|| match restore(store.as_ref()) {
                    Ok(alloc) => {
                        info!(leases = alloc.lease_count(), pools = alloc.pool_count(), "state loaded");
                        let _ = loaded_tx.send(Ok(()));
                        if store.pipelined().is_some() {
                            run_pipelined(alloc, store, rx, &metrics);
                        } else {
                            run(alloc, store, rx, &metrics);
                        }
                    }
                    Err(e) => {
                        let _ = loaded_tx.send(Err(e));
                    }
                });
                let _ = stopped_tx.send(true);
            })
            .map_err(|e| StoreError::new("start engine thread", e))?;
        loaded.await.map_err(|_| StoreError::new("load", "the engine thread exited while loading"))??;
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

    /// Whether the engine thread has exited.
    pub fn is_stopped(&self) -> bool {
        *self.stopped.borrow()
    }

    /// Description of the store behind the engine.
    pub fn store(&self) -> &str {
        &self.store
    }

    /// Runs `f` on the allocator and answers once the changes it made are durable. `f` may
    /// run more than once: again after the store refused one of its writes.
    pub async fn call<R, F>(&self, f: F) -> Result<R, EngineError>
    where
        R: Send + 'static,
        F: FnMut(&mut Allocator, i64) -> R + Send + 'static,
    {
        let (done, wait) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(CallJob { f, out: None, done });
        self.tx.send(job).await.map_err(|_| EngineError::Stopped("engine thread exited".into()))?;
        wait.await.map_err(|_| EngineError::Stopped("engine dropped the request".into()))?
    }
}

/// Adds whatever else is queued to `jobs`, up to a batch.
fn fill_batch(rx: &mut mpsc::Receiver<Box<dyn Job>>, jobs: &mut Vec<Box<dyn Job>>) {
    while jobs.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(job) => jobs.push(job),
            Err(_) => break,
        }
    }
}

/// Runs each job, recording which journal entries it made. Returns false if one panicked.
fn run_jobs(
    alloc: &mut Allocator,
    jobs: &mut [Box<dyn Job>],
    spans: &mut Vec<(usize, usize)>,
    now: i64,
) -> bool {
    spans.clear();
    let mut ok = true;
    for job in jobs.iter_mut() {
        let start = alloc.journal_len();
        // A panic here is a bug; it must cost this batch, not the whole service.
        ok &= std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run(alloc, now))).is_ok();
        spans.push((start, alloc.journal_len()));
    }
    ok
}

/// The engine thread's loop; returns (dropping the store) when every sender is gone, the
/// store fences this server off, or state cannot be reloaded.
fn run(
    mut alloc: Allocator,
    mut store: Box<dyn LeaseStore>,
    mut rx: mpsc::Receiver<Box<dyn Job>>,
    metrics: &Metrics,
) {
    let mut jobs: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_BATCH);
    let mut spans: Vec<(usize, usize)> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        jobs.push(first);
        fill_batch(&mut rx, &mut jobs);
        let now = now_unix_ms();
        let mut attempt = 1;
        let mut ran_ok = run_jobs(&mut alloc, &mut jobs, &mut spans, now);
        let outcome = loop {
            let changes: Vec<Change> = alloc.drain_journal().collect();
            if !ran_ok {
                error!("a request panicked; discarding the batch and reloading state from the store");
                break Err(EngineError::Commit("internal error while handling the batch".into()));
            }
            if changes.is_empty() {
                break Ok(());
            }
            let started = Instant::now();
            let committed = store.commit(&changes);
            metrics.observe_commit(started.elapsed(), jobs.len(), committed.is_ok());
            let refusals = match committed {
                Ok(()) => break Ok(()),
                Err(CommitError::Failed(e)) => {
                    error!(error = %e, changes = changes.len(), "commit failed; reloading state from the store");
                    break Err(EngineError::Commit(e.to_string()));
                }
                Err(CommitError::Fenced(why)) => {
                    error!(reason = %why, "the store no longer takes this server's writes; stopping the engine");
                    let e = EngineError::NotLeader(why);
                    jobs.drain(..).for_each(|j| j.answer(Err(e.clone())));
                    return;
                }
                Err(CommitError::Refused(refusals)) => refusals,
            };
            // Memory takes the store's word for each refused address; the jobs that wrote
            // there run again, the others stand and are answered.
            let mut again = vec![false; jobs.len()];
            let mut reasons = vec![String::new(); jobs.len()];
            for r in refusals {
                warn!(network = %r.network, address = %r.address, reason = %r.reason, "store refused a write; choosing again");
                if let Some(j) = spans.iter().position(|&(s, e)| (s..e).contains(&r.index)) {
                    again[j] = true;
                    reasons[j] = format!("{} in network \"{}\": {}", r.address, r.network, r.reason);
                }
                alloc.sync_from_store(&r.network, r.address, r.truth);
            }
            let mut retry = Vec::new();
            for (job, (again, reason)) in jobs.drain(..).zip(again.into_iter().zip(reasons)) {
                match (again, attempt < MAX_ATTEMPTS) {
                    (false, _) => job.answer(Ok(())),
                    (true, true) => retry.push(job),
                    (true, false) => job.answer(Err(EngineError::Conflict(reason))),
                }
            }
            jobs = retry;
            attempt += 1;
            ran_ok = run_jobs(&mut alloc, &mut jobs, &mut spans, now);
        };
        if outcome.is_err() {
            match restore(store.as_ref()) {
                Ok(a) => alloc = a,
                Err(e) => {
                    error!(error = %e, "cannot reload state after a failed batch; stopping");
                    let stop = EngineError::Stopped(format!("state could not be reloaded: {e}"));
                    jobs.drain(..).for_each(|j| j.answer(Err(stop.clone())));
                    return;
                }
            }
        }
        for job in jobs.drain(..) {
            job.answer(outcome.clone());
        }
    }
}

/// A job of the pipelined loop, waiting for its writes.
struct Pending {
    job: Box<dyn Job>,
    /// Writes of its latest run not yet reported.
    outstanding: usize,
    attempt: usize,
    /// Why a write of its latest run was refused (it runs again once all are reported).
    refused: Option<String>,
    /// A write of its latest run has an unknown outcome: it is answered with the error.
    unknown: bool,
    /// When its latest run was, in the order of all runs.
    ran: u64,
    /// Its latest run wrote something. One that wrote nothing may have answered from what
    /// earlier runs wrote (a retried allocation finding its lease): when one of those
    /// writes is refused or fails, its answer is not durable and it runs again or fails.
    wrote: bool,
    /// The outcome once known: `None` while it waits.
    outcome: Option<Result<(), EngineError>>,
}

/// What the pipelined loop waits for.
enum Event {
    Job(Box<dyn Job>),
    Write(usize, WriteOutcome),
    /// Every request sender is gone.
    Closed,
}

/// Waits for a request or a write's report, whichever comes first; only for reports while
/// `jobs_too` is false.
fn next_event(
    rx: &mut mpsc::Receiver<Box<dyn Job>>,
    reports: &mut mpsc::UnboundedReceiver<(usize, WriteOutcome)>,
    jobs_too: bool,
) -> Event {
    use futures::FutureExt as _;
    futures::executor::block_on(async {
        let report = async {
            match reports.recv().await {
                Some((id, o)) => Event::Write(id, o),
                // The loop holds a sender itself: cannot happen.
                None => Event::Closed,
            }
        };
        if !jobs_too {
            return report.await;
        }
        let job = async {
            match rx.recv().await {
                Some(j) => Event::Job(j),
                None => Event::Closed,
            }
        };
        futures::select_biased! {
            e = report.fuse() => e,
            e = job.fuse() => e,
        }
    })
}

/// The engine loop for a [`crate::store::PipelinedStore`]. Jobs run in arrival order and
/// are answered in that order (see the module doc). A refused write makes its job run
/// again once all of that run's writes are reported, and with it every later run that
/// wrote nothing (its answer may rest on the refused write); a write whose outcome is
/// unknown stops intake until everything in flight has been reported, then memory is
/// reloaded from the store and every job not known to be durable is answered with the
/// error.
fn run_pipelined(
    mut alloc: Allocator,
    mut store: Box<dyn LeaseStore>,
    mut rx: mpsc::Receiver<Box<dyn Job>>,
    metrics: &Metrics,
) {
    let (report_tx, mut reports) = mpsc::unbounded_channel();
    let report: WriteReport = Arc::new(move |id, o| {
        let _ = report_tx.send((id, o));
    });
    // Jobs by sequence number, oldest first; `base` is the number of the front one.
    let mut pending: std::collections::VecDeque<Pending> = std::collections::VecDeque::new();
    let mut base = 0usize;
    // Write id -> (job sequence number, when it was handed over).
    let mut writes: std::collections::HashMap<usize, (usize, Instant)> = std::collections::HashMap::new();
    let mut next_write = 0usize;
    // Set when a write's outcome is unknown: the error the unsettled jobs get.
    let mut failed: Option<String> = None;
    // The earliest run with a write of unknown outcome (or a panic) since the last reload.
    let mut failed_run = u64::MAX;
    // Runs so far: the stamp of the next one.
    let mut next_run = 0u64;
    let mut closed = false;
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_BATCH);
    let mut spans: Vec<(usize, usize)> = Vec::with_capacity(MAX_BATCH);
    let mut rerun: Vec<usize> = Vec::new();
    loop {
        if closed && pending.is_empty() {
            return;
        }
        let intake = failed.is_none() && !closed;
        match next_event(&mut rx, &mut reports, intake) {
            Event::Closed => closed = true,
            Event::Write(id, outcome) => {
                let Some((seq, started)) = writes.remove(&id) else { continue };
                let p = &mut pending[seq - base];
                p.outstanding -= 1;
                let ok = matches!(outcome, WriteOutcome::Done);
                metrics.observe_commit(started.elapsed(), 1, ok);
                match outcome {
                    WriteOutcome::Done => {}
                    WriteOutcome::Refused(r) => {
                        warn!(network = %r.network, address = %r.address, reason = %r.reason, "store refused a write; choosing again");
                        p.refused = Some(format!("{} in network \"{}\": {}", r.address, r.network, r.reason));
                        alloc.sync_from_store(&r.network, r.address, r.truth);
                        let after = p.ran;
                        for (i, q) in pending.iter_mut().enumerate() {
                            let again = base + i;
                            if q.ran > after && !q.wrote && !rerun.contains(&again) {
                                q.outcome = None;
                                rerun.push(again);
                            }
                        }
                    }
                    WriteOutcome::Failed(e) => {
                        error!(error = %e, "a write's outcome is unknown; reloading state once the writes in flight are reported");
                        p.unknown = true;
                        failed_run = failed_run.min(p.ran);
                        failed.get_or_insert_with(|| e.to_string());
                    }
                }
                let p = &mut pending[seq - base];
                // Settled with the error at the reload.
                if p.outstanding == 0 && p.outcome.is_none() && !p.unknown {
                    match p.refused.take() {
                        None => p.outcome = Some(Ok(())),
                        Some(_) if failed.is_some() => {}
                        Some(why) if p.attempt >= MAX_ATTEMPTS => {
                            p.outcome = Some(Err(EngineError::Conflict(why)))
                        }
                        Some(_) => {
                            p.attempt += 1;
                            rerun.push(seq);
                        }
                    }
                }
            }
            Event::Job(first) => {
                batch.push(first);
                fill_batch(&mut rx, &mut batch);
            }
        }
        // Jobs to run now: refused ones again, then new ones; each gets its writes.
        let now = now_unix_ms();
        let mut runs: Vec<(usize, Vec<Change>)> = Vec::new();
        for seq in rerun.drain(..) {
            let p = &mut pending[seq - base];
            let mut one = [std::mem::replace(&mut p.job, Box::new(Placeholder))];
            let ok = run_jobs(&mut alloc, &mut one, &mut spans, now);
            let [job] = one;
            p.job = job;
            let changes: Vec<Change> = alloc.drain_journal().collect();
            (p.ran, p.wrote) = (next_run, !changes.is_empty());
            if !ok {
                panicked(&mut failed, &mut failed_run, next_run);
            }
            next_run += 1;
            runs.push((seq, changes));
        }
        if !batch.is_empty() {
            let ok = run_jobs(&mut alloc, &mut batch, &mut spans, now);
            let mut changes: Vec<Change> = alloc.drain_journal().collect();
            if !ok {
                panicked(&mut failed, &mut failed_run, next_run);
            }
            // Split the journal by job, last first so indices stay valid.
            let mut per_job: Vec<Vec<Change>> = Vec::with_capacity(batch.len());
            for &(start, _) in spans.iter().rev() {
                per_job.push(changes.split_off(start.min(changes.len())));
            }
            per_job.reverse();
            for (job, changes) in batch.drain(..).zip(per_job) {
                let seq = base + pending.len();
                pending.push_back(Pending {
                    job,
                    outstanding: 0,
                    attempt: 1,
                    refused: None,
                    unknown: false,
                    ran: next_run,
                    wrote: !changes.is_empty(),
                    outcome: None,
                });
                next_run += 1;
                runs.push((seq, changes));
            }
        }
        if !runs.is_empty() {
            let mut handed: Vec<(usize, Change)> = Vec::new();
            for (seq, changes) in runs {
                let p = &mut pending[seq - base];
                if failed.is_some() {
                    // Its run was on state that is about to be replaced: nothing is written.
                    continue;
                }
                p.outstanding = changes.len();
                if changes.is_empty() {
                    p.outcome = Some(Ok(()));
                }
                for c in changes {
                    writes.insert(next_write, (seq, Instant::now()));
                    handed.push((next_write, c));
                    next_write += 1;
                }
            }
            if !handed.is_empty() {
                let pipe = store.pipelined().expect("run_pipelined is only used for pipelined stores");
                if let Err(why) = pipe.submit(handed, report.clone()) {
                    error!(reason = %why, "the store no longer takes this server's writes; stopping the engine");
                    let e = EngineError::NotLeader(why);
                    pending.drain(..).for_each(|p| p.job.answer(Err(e.clone())));
                    return;
                }
            }
        }
        // After a write of unknown outcome: once nothing is in flight, reload and settle.
        if let Some(why) = failed.clone()
            && writes.is_empty()
        {
            let e = EngineError::Commit(why);
            for p in pending.iter_mut().filter(|p| p.outcome.is_none() || (p.ran > failed_run && !p.wrote)) {
                p.outcome = Some(Err(e.clone()));
            }
            failed_run = u64::MAX;
            match restore(store.as_ref()) {
                Ok(a) => alloc = a,
                Err(err) => {
                    error!(error = %err, "cannot reload state after a failed write; stopping");
                    let stop = EngineError::Stopped(format!("state could not be reloaded: {err}"));
                    pending.drain(..).for_each(|p| p.job.answer(p.outcome.unwrap_or(Err(stop.clone()))));
                    return;
                }
            }
            failed = None;
        }
        // Answer from the front, in the order the jobs ran.
        while pending.front().is_some_and(|p| p.outcome.is_some()) {
            let p = pending.pop_front().expect("front exists");
            base += 1;
            p.job.answer(p.outcome.expect("checked"));
        }
    }
}

/// A request panicked in the pipelined loop: memory may be half-changed, so nothing of it
/// is written and state is reloaded once the writes in flight are reported.
fn panicked(failed: &mut Option<String>, failed_run: &mut u64, run: u64) {
    error!("a request panicked; reloading state from the store once the writes in flight are reported");
    *failed_run = (*failed_run).min(run);
    failed.get_or_insert_with(|| "internal error while handling the batch".into());
}

/// Stands in for a job while it runs again (the slot must hold something).
struct Placeholder;

impl Job for Placeholder {
    fn run(&mut self, _: &mut Allocator, _: i64) {}
    fn answer(self: Box<Self>, _: Result<(), EngineError>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::allocator::{AllocateRequest, Attachment, FieldPrefix, Lease, RangeInput, RangeSpec};
    use crate::store::{Loaded, Refusal};
    use std::sync::Mutex;

    /// A store that records commits and can be told to fail the next one, or to refuse
    /// writes to addresses another server holds (as a shared store would).
    #[derive(Clone, Default)]
    struct Recorder {
        commits: Arc<Mutex<Vec<Vec<Change>>>>,
        fail_next: Arc<Mutex<bool>>,
        others: Arc<Mutex<Vec<Lease>>>,
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
        fn commit(&mut self, changes: &[Change]) -> Result<(), CommitError> {
            if std::mem::take(&mut *self.fail_next.lock().expect("lock")) {
                return Err(StoreError::new("commit", "disk full").into());
            }
            let others = self.others.lock().expect("lock");
            let mut applied = Vec::new();
            let mut refused = Vec::new();
            for (index, c) in changes.iter().enumerate() {
                match c {
                    Change::PutLease(l) if let Some(o) = others.iter().find(|o| o.address == l.address) => {
                        refused.push(Refusal {
                            index,
                            network: l.network.clone(),
                            address: l.address,
                            truth: Some(o.clone()),
                            reason: "already exists".into(),
                        })
                    }
                    _ => applied.push(c.clone()),
                }
            }
            self.commits.lock().expect("lock").push(applied);
            if refused.is_empty() { Ok(()) } else { Err(CommitError::Refused(refused)) }
        }
    }

    /// An allocation from 10.0.0.0/28 for container `cid`'s net1.
    fn request_28(cid: &str) -> AllocateRequest {
        let range = RangeSpec::parse(
            &RangeInput { range: "10.0.0.0/28".into(), ..Default::default() },
            FieldPrefix(""),
        )
        .expect("range");
        AllocateRequest {
            attachment: Arc::new(Attachment {
                container_id: cid.into(),
                ifname: "net1".into(),
                ..Default::default()
            }),
            network: "".into(),
            ranges: vec![range],
            requested: vec![],
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
        let engine = Engine::start(Box::new(rec.clone()), Metrics::new()).await.expect("start");
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
        let engine = Engine::start(Box::new(rec.clone()), Metrics::new()).await.expect("start");
        let err = engine
            .call(|a, now| {
                let _ = a.reserve("", "10.0.0.3".parse().expect("ip"), "t", now);
                panic!("bug in a request handler")
            })
            .await
            .expect_err("the panicking request fails");
        assert_eq!(
            err.to_string(),
            "lease store commit failed, nothing was changed: internal error while handling the batch"
        );
        // Its half-done change was discarded and the engine still serves.
        reserve(&engine, "10.0.0.3").await.expect("engine").expect("10.0.0.3 is free");
    }

    #[tokio::test]
    async fn failed_commit_answers_error_and_rolls_memory_back() {
        let rec = Recorder::default();
        let engine = Engine::start(Box::new(rec.clone()), Metrics::new()).await.expect("start");
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

    #[tokio::test]
    async fn refused_writes_choose_again_and_the_rest_stand() {
        let rec = Recorder::default();
        let engine = Engine::start(Box::new(rec.clone()), Metrics::new()).await.expect("start");
        let allocate = |cid: &'static str| {
            let engine = engine.clone();
            let req = request_28(cid);
            async move { engine.call(move |a, now| a.allocate(&req, now).map(|l| l[0].address)).await }
        };
        // Another server already wrote 10.0.0.1 and 10.0.0.2 to the shared store.
        for (i, cid) in [(1, "other-1"), (2, "other-2")] {
            rec.others.lock().expect("lock").push(Lease {
                address: [10, 0, 0, i].into(),
                network: "".into(),
                range: "10.0.0.0/29".into(),
                prefix_len: 29,
                gateway: None,
                holder: Arc::new(Attachment {
                    container_id: cid.into(),
                    ifname: "net1".into(),
                    ..Default::default()
                }),
                created_unix_ms: 0,
                note: String::new(),
            });
        }
        let got = allocate("mine").await.expect("engine").expect("allocate");
        assert_eq!(got.to_string(), "10.0.0.3", "refused twice, then the next free address");
        // Memory learned who holds the refused addresses.
        let holder =
            engine.call(|a, _| a.get("", [10, 0, 0, 1].into()).map(|l| l.holder.container_id.clone())).await;
        assert_eq!(holder.expect("engine").expect("held"), "other-1");
        // Only what persisted was recorded: the pool, then the one lease that stood.
        let commits = rec.commits.lock().expect("lock").concat();
        let leases: Vec<_> = commits
            .iter()
            .filter_map(|c| if let Change::PutLease(l) = c { Some(l.address.to_string()) } else { None })
            .collect();
        assert_eq!(leases, vec!["10.0.0.3"]);

        // A store that refuses every choice: answered with the conflict after MAX_ATTEMPTS.
        for i in 4..=7 {
            let mut l = rec.others.lock().expect("lock")[0].clone();
            l.address = [10, 0, 0, i].into();
            rec.others.lock().expect("lock").push(l);
        }
        let err = allocate("late").await.expect_err("refused every time");
        assert!(matches!(err, EngineError::Conflict(_)), "{err}");
        assert_eq!(
            err.to_string(),
            "lease store refused the change 4 times: 10.0.0.7 in network \"\": already exists"
        );
    }

    /// A pipelined store whose writes wait until the test settles them, in any order, with
    /// any outcome; settled writes are what `load` reads back.
    #[derive(Clone, Default)]
    struct Held {
        inflight: Arc<Mutex<Vec<(usize, Change, WriteReport)>>>,
        durable: Arc<Mutex<Vec<Change>>>,
    }

    impl Held {
        /// Waits until `n` writes are in flight.
        async fn in_flight(&self, n: usize) {
            while self.inflight.lock().expect("lock").len() < n {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }

        /// Settles the in-flight write to `ip` (`pool`: the pool's) with `outcome` (`None`:
        /// it applied).
        fn settle(&self, ip: &str, outcome: Option<WriteOutcome>) {
            let mut inflight = self.inflight.lock().expect("lock");
            let at = inflight
                .iter()
                .position(|(_, c, _)| match c {
                    Change::PutLease(l) => l.address.to_string() == ip,
                    Change::PutPool { .. } => ip == "pool",
                    Change::DeleteLease { .. } => false,
                })
                .expect("a write to that address is in flight");
            let (id, change, report) = inflight.remove(at);
            drop(inflight);
            let outcome = outcome.unwrap_or_else(|| {
                self.durable.lock().expect("lock").push(change);
                WriteOutcome::Done
            });
            report(id, outcome);
        }
    }

    impl LeaseStore for Held {
        fn describe(&self) -> String {
            "held".into()
        }
        fn load(&self) -> Result<Loaded, StoreError> {
            let mut loaded = Loaded::default();
            for c in self.durable.lock().expect("lock").iter() {
                if let Change::PutLease(l) = c {
                    loaded.leases.push((**l).clone());
                }
            }
            Ok(loaded)
        }
        fn commit(&mut self, _: &[Change]) -> Result<(), CommitError> {
            unreachable!("a pipelined store is never committed to in batches")
        }
        fn pipelined(&mut self) -> Option<&mut dyn crate::store::PipelinedStore> {
            Some(self)
        }
    }

    impl crate::store::PipelinedStore for Held {
        fn submit(&mut self, writes: Vec<(usize, Change)>, report: WriteReport) -> Result<(), String> {
            let mut inflight = self.inflight.lock().expect("lock");
            inflight.extend(writes.into_iter().map(|(id, c)| (id, c, report.clone())));
            Ok(())
        }
    }

    /// Reserves `ip` in the background; the answer arrives on the returned receiver.
    fn reserve_bg(
        engine: &Engine,
        ip: &'static str,
    ) -> tokio::sync::oneshot::Receiver<Result<Result<(), String>, EngineError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let engine = engine.clone();
        tokio::spawn(async move {
            let _ = tx.send(reserve(&engine, ip).await);
        });
        rx
    }

    #[tokio::test]
    async fn pipelined_writes_overlap_and_answers_leave_in_run_order() {
        let held = Held::default();
        let engine = Engine::start(Box::new(held.clone()), Metrics::new()).await.expect("start");
        let mut first = reserve_bg(&engine, "10.0.0.1");
        held.in_flight(1).await;
        // The next requests run and write while the first write is still out.
        let mut second = reserve_bg(&engine, "10.0.0.2");
        held.in_flight(2).await;
        let mut third = reserve_bg(&engine, "10.0.0.3");
        held.in_flight(3).await;
        // The third is durable first, but the first two are not: nobody is answered.
        held.settle("10.0.0.3", None);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(first.try_recv().is_err() && second.try_recv().is_err() && third.try_recv().is_err());
        held.settle("10.0.0.1", None);
        first.await.expect("answer").expect("engine").expect("reserved");
        assert!(second.try_recv().is_err(), "the second waits for its own write");
        held.settle("10.0.0.2", None);
        second.await.expect("answer").expect("engine").expect("reserved");
        third.await.expect("answer").expect("engine").expect("reserved");
    }

    #[tokio::test]
    async fn a_pipelined_refusal_reruns_only_its_job() {
        let held = Held::default();
        let engine = Engine::start(Box::new(held.clone()), Metrics::new()).await.expect("start");
        let allocate = |cid: &'static str| {
            let engine = engine.clone();
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let req = request_28(cid);
                let got =
                    engine.call(move |a, now| a.allocate(&req, now).map(|l| l[0].address.to_string())).await;
                let _ = tx.send(got);
            });
            rx
        };
        let a = allocate("a");
        held.in_flight(2).await; // the pool and .1
        let b = allocate("b");
        held.in_flight(3).await; // .2
        let other = Lease {
            address: "10.0.0.1".parse().expect("ip"),
            network: "".into(),
            range: "10.0.0.0/28".into(),
            prefix_len: 28,
            gateway: None,
            holder: Arc::new(Attachment { container_id: "elsewhere".into(), ..Default::default() }),
            created_unix_ms: 0,
            note: String::new(),
        };
        // Another server holds .1: a's write is refused; a chooses again (.3, as .2 is b's).
        let refusal = Refusal {
            index: 0,
            network: "".into(),
            address: other.address,
            truth: Some(other),
            reason: "another holder's object exists".into(),
        };
        held.settle("10.0.0.1", Some(WriteOutcome::Refused(refusal)));
        // a runs again once all of its run's writes are reported.
        held.settle("pool", None);
        held.in_flight(2).await; // .2 and a's new .3
        held.settle("10.0.0.3", None);
        held.settle("10.0.0.2", None);
        assert_eq!(a.await.expect("answer").expect("engine").expect("allocated"), "10.0.0.3");
        assert_eq!(b.await.expect("answer").expect("engine").expect("allocated"), "10.0.0.2");
    }

    /// Allocates for container `cid` in the background: the answered address, and a
    /// receiver that gets a message each time the request runs.
    fn allocate_bg(
        engine: &Engine,
        cid: &'static str,
    ) -> (tokio::sync::oneshot::Receiver<Result<String, String>>, mpsc::UnboundedReceiver<()>) {
        let engine = engine.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (ran_tx, ran) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let req = request_28(cid);
            let got = engine
                .call(move |a, now| {
                    let _ = ran_tx.send(());
                    a.allocate(&req, now).map(|l| l[0].address.to_string())
                })
                .await;
            let _ = tx.send(got.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())));
        });
        (rx, ran)
    }

    /// A plugin that gave up on a slow answer asks again for the same container; the retry
    /// finds the first request's lease in memory and writes nothing. When the first write
    /// is then refused (the API server had not stored it after all) the first request
    /// chooses again, and the retry must not answer with the address that was never stored
    /// (seen across an etcd restart: a pod told one address while the store held another).
    #[tokio::test]
    async fn a_retry_that_wrote_nothing_runs_again_when_the_write_it_found_is_refused() {
        let held = Held::default();
        let engine = Engine::start(Box::new(held.clone()), Metrics::new()).await.expect("start");
        let (first, _) = allocate_bg(&engine, "x");
        held.in_flight(2).await; // the pool and .1
        let (retry, mut retry_ran) = allocate_bg(&engine, "x");
        // The retry ran (it wrote nothing) and waits behind the first.
        retry_ran.recv().await.expect("the retry ran");
        let refusal = Refusal {
            index: 0,
            network: "".into(),
            address: "10.0.0.1".parse().expect("ip"),
            truth: None,
            reason: "write failed: the API server timed out".into(),
        };
        held.settle("10.0.0.1", Some(WriteOutcome::Refused(refusal)));
        held.settle("pool", None);
        // One of the two chose again; that write is the only lease written.
        held.in_flight(1).await;
        let again = match &held.inflight.lock().expect("lock")[0].1 {
            Change::PutLease(l) => l.address.to_string(),
            other => panic!("expected a lease write, got {other:?}"),
        };
        held.settle(&again, None);
        assert_eq!(first.await.expect("answer"), Ok(again.clone()));
        assert_eq!(retry.await.expect("answer"), Ok(again.clone()), "the retry answers what is stored");
        assert!(retry_ran.try_recv().is_ok(), "the retry ran again");
        let stored = held.load().expect("load").leases;
        assert_eq!(stored.iter().map(|l| l.address.to_string()).collect::<Vec<_>>(), vec![again]);
    }

    /// As above, but the first write's outcome is unknown: the retry that wrote nothing is
    /// answered with the error too, not with the address whose write may not have applied.
    #[tokio::test]
    async fn a_retry_that_wrote_nothing_fails_when_the_write_it_found_is_unknown() {
        let held = Held::default();
        let engine = Engine::start(Box::new(held.clone()), Metrics::new()).await.expect("start");
        let (first, _) = allocate_bg(&engine, "x");
        held.in_flight(2).await;
        let (retry, mut retry_ran) = allocate_bg(&engine, "x");
        retry_ran.recv().await.expect("the retry ran");
        held.settle("pool", None);
        let lost = WriteOutcome::Failed(StoreError::new("create lease", "etcd unavailable"));
        held.settle("10.0.0.1", Some(lost));
        let want =
            Err("lease store commit failed, nothing was changed: create lease: etcd unavailable".to_string());
        assert_eq!(first.await.expect("answer"), want);
        assert_eq!(retry.await.expect("answer"), want);
        // Asked again, it gets a lease that is stored.
        let (third, _) = allocate_bg(&engine, "x");
        held.in_flight(2).await; // the pool (the test store does not read pools back) and .1
        held.settle("pool", None);
        held.settle("10.0.0.1", None);
        assert_eq!(third.await.expect("answer"), Ok("10.0.0.1".to_string()));
    }

    #[tokio::test]
    async fn a_pipelined_write_of_unknown_outcome_reloads_after_the_rest_settle() {
        let held = Held::default();
        let engine = Engine::start(Box::new(held.clone()), Metrics::new()).await.expect("start");
        let first = reserve_bg(&engine, "10.0.0.1");
        held.in_flight(1).await;
        let second = reserve_bg(&engine, "10.0.0.2");
        held.in_flight(2).await;
        held.settle(
            "10.0.0.1",
            Some(WriteOutcome::Failed(StoreError::new("create lease", "connection reset"))),
        );
        // Nothing new is taken while .2 is still out; once it applies, memory is reloaded.
        held.settle("10.0.0.2", None);
        let err = first.await.expect("answer").expect_err("unknown outcome");
        assert_eq!(
            err.to_string(),
            "lease store commit failed, nothing was changed: create lease: connection reset"
        );
        second.await.expect("answer").expect("engine").expect("its write applied");
        // Memory is what the store holds: .2 held, .1 free.
        let held_now = engine.call(|a, _| a.lease_count()).await.expect("engine");
        assert_eq!(held_now, 1);
    }
}
