//! Leader election among replicas on a coordination.k8s.io Lease ([`LeaseLock`]), and what
//! leading means here: load the store, serve, keep pool usage in
//! status, and stop writing before the lease can run out.
//!
//! The Lease alone is not what keeps addresses unique (two replicas can briefly both
//! believe they lead, e.g. across a long pause); the preconditions of every lease write are
//! (see [`super::store`]). The Lease decides who serves, and [`Fence`] makes a replica that
//! could not renew in time stop writing on its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::Notify;
use tokio::sync::watch;
use tracing::{Instrument as _, error, info, info_span, warn};

use super::crd::{IPPool, IPPoolStatus, NodeBlock, PoolCondition, RangePool, RangePoolStatus, pool_name};
use super::lease_lock::{Attempt, LeaseLock, LockError};
use super::store::{Fence, KubeStore, LateLeases, WritesInFlight};
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::pools::{PoolStats, Pools};
use crate::role::{Peer, Role};

/// How the election runs.
#[derive(Debug, Clone)]
pub struct Election {
    pub namespace: String,
    /// Name of the Lease object.
    pub lease_name: String,
    /// This replica, as the Lease will name it.
    pub me: Peer,
    /// How long a Lease holds without renewal.
    pub ttl: Duration,
    /// How often the holder renews (and a follower retries).
    pub renew_every: Duration,
    /// How often the leader writes pool usage into RangePool status.
    pub status_every: Duration,
}

impl Election {
    /// Checks the timings: a leader must get several renewals in before its lease runs out.
    pub fn check(&self) -> Result<(), String> {
        if self.ttl < Duration::from_secs(2) {
            return Err(format!("--lease-ttl {:?} is shorter than 2s", self.ttl));
        }
        if self.renew_every.is_zero() || self.renew_every * 3 > self.ttl {
            return Err(format!(
                "--renew-every {:?} must be more than zero and at most a third of --lease-ttl {:?}",
                self.renew_every, self.ttl
            ));
        }
        Ok(())
    }

    /// The time after a renewal attempt started until which this replica may write: two
    /// thirds of the TTL, leaving the rest as margin for clock rate differences and a
    /// write in flight, before another replica may take the lease.
    fn write_window(&self) -> Duration {
        self.ttl * 2 / 3
    }
}

/// Leading: the engine (once loaded) and the fence its store writes under.
struct Leading {
    fence: Fence,
    loading: Option<tokio::task::JoinHandle<Result<Engine, crate::store::StoreError>>>,
    engine: Option<Engine>,
    status: Option<tokio::task::JoinHandle<()>>,
    /// The lease objects arriving since the loading store was made, and then the task
    /// taking those that landed late into the engine's memory.
    late: Option<LateLeases>,
    adopter: Option<AbortOnDrop>,
}

impl Leading {
    /// Stops writing at once and lets go of the engine; its queued requests are answered
    /// with an error by the fenced store.
    fn end(mut self, role: &watch::Sender<Role>, next: Role) -> Option<Engine> {
        self.fence.close();
        if let Some(l) = self.loading.take() {
            l.abort();
        }
        if let Some(s) = self.status.take() {
            s.abort();
        }
        // It holds an engine handle: the engine drains only once every handle is dropped.
        self.adopter = None;
        let _ = role.send(next);
        self.engine.take()
    }
}

/// Runs the election until `stop` turns true, publishing this replica's role. On stop a
/// leader steps down (releasing the Lease so another replica takes over at once) and its
/// engine is returned to be drained.
pub async fn run(
    client: Client,
    election: Election,
    metrics: Arc<Metrics>,
    pools: Pools,
    role: watch::Sender<Role>,
    mut stop: watch::Receiver<bool>,
) -> Option<Engine> {
    let lock = LeaseLock::new(
        client.clone(),
        &election.namespace,
        &election.lease_name,
        &election.me.holder(),
        election.ttl,
    );
    // A follower tries again the moment the Lease is released (a leader stopping cleanly),
    // not at its next poll.
    let released = Arc::new(Notify::new());
    let watcher = tokio::spawn({
        let (lock, released) = (lock.clone(), released.clone());
        async move { lock.watch_releases(|| released.notify_one()).await }
            .instrument(info_span!("lease-watch"))
    });
    let _watcher = AbortOnDrop(watcher);
    // Followers keep the leases warm, so a takeover serves without listing them all.
    let mirror = KubeStore::start_mirror(client.clone(), &election.namespace);
    let writes = WritesInFlight::default();
    let mut leading: Option<Leading> = None;
    // When the current holder's renewal runs out, as last read by a follower.
    let mut expiry: Option<Instant> = None;
    loop {
        let attempt = Instant::now();
        // An API server that stops answering (frozen, partitioned) must not hold this loop:
        // a leader gives up when its write window closes and steps down (stops being
        // ready), a third of the TTL before another replica can take over.
        let limit = match &leading {
            Some(l) => l.fence.remaining(),
            None => election.write_window(),
        };
        let tried = tokio::time::timeout(limit, lock.try_acquire_or_renew()).await;
        match tried.unwrap_or_else(|_| Err(LockError::TimedOut(limit))) {
            Ok(Attempt::Leading) => {
                let l = leading.get_or_insert_with(|| {
                    info!(identity = %election.me.identity, "acquired the leader lease; loading state");
                    metrics.set_leader(true);
                    let _ = role.send(Role::Starting);
                    Leading {
                        fence: Fence::new(),
                        loading: None,
                        engine: None,
                        status: None,
                        late: None,
                        adopter: None,
                    }
                });
                l.fence.open_until(attempt + election.write_window());
                // (Re)load when there is no engine, or the one there stopped (fenced after
                // a late renewal, or its state could not be reloaded).
                if l.loading.is_none() && l.engine.as_ref().is_none_or(Engine::is_stopped) {
                    let store = KubeStore::new(
                        client.clone(),
                        &election.namespace,
                        tokio::runtime::Handle::current(),
                        l.fence.clone(),
                    )
                    .with_mirror(mirror.clone())
                    .with_writes_in_flight(writes.clone());
                    l.late = store.late_leases();
                    let m = metrics.clone();
                    l.loading = Some(tokio::spawn(
                        async move { Engine::start(Box::new(store), m).await }.instrument(info_span!("load")),
                    ));
                }
            }
            Ok(Attempt::Following(holder, expires_in)) => {
                // Try again the moment the holder's renewal runs out, if that comes before
                // the next poll: after a crash that is what bounds the takeover.
                if let Some(left) = expires_in {
                    expiry = Some(Instant::now() + left + EXPIRY_SLACK);
                }
                let leader = (!holder.is_empty()).then(|| Peer::from_holder(&holder));
                if let Some(l) = leading.take() {
                    warn!(leader = %holder, "another replica holds the leader lease; stepping down");
                    metrics.set_leader(false);
                    drop(l.end(&role, Role::Follower(leader)));
                } else if !matches!(&*role.borrow(), Role::Follower(f) if *f == leader) {
                    info!(leader = %holder, "following");
                    let _ = role.send(Role::Follower(leader));
                }
            }
            Err(e) => {
                warn!(error = %e, "leader election call failed");
                // Writes stop on their own when the fence runs out; so does serving.
                if let Some(l) = &leading
                    && l.fence.check().is_err()
                    && let Some(l) = leading.take()
                {
                    error!("could not renew the leader lease in time; stepping down");
                    metrics.set_leader(false);
                    drop(l.end(&role, Role::Follower(None)));
                }
            }
        }
        // Until the next renewal; a load that finishes meanwhile starts serving at once (a
        // new leader's first answer should not wait for a tick).
        let poll = attempt + election.renew_every;
        let next = tokio::time::Instant::from_std(expiry.take().map_or(poll, |e| e.min(poll)));
        loop {
            let following = leading.is_none();
            let loading = leading.as_mut().and_then(|l| l.loading.as_mut());
            let wake = tokio::select! {
                () = tokio::time::sleep_until(next) => Wake::Renew,
                () = released.notified(), if following => Wake::Renew,
                res = async {
                    match loading {
                        Some(task) => task.await,
                        None => std::future::pending().await,
                    }
                } => Wake::Loaded(res),
                _ = stop.wait_for(|s| *s) => Wake::Stop,
            };
            match wake {
                Wake::Renew => break,
                Wake::Stop => return step_down(leading, &lock, &role, &metrics).await,
                Wake::Loaded(res) => {
                    let Some(l) = leading.as_mut() else { continue };
                    l.loading = None;
                    match res {
                        Ok(Ok(engine)) => {
                            info!(store = engine.store(), "state loaded; serving as leader");
                            l.status = Some(tokio::spawn(
                                pool_status(client.clone(), election.clone(), engine.clone(), pools.clone())
                                    .instrument(info_span!("pool-status")),
                            ));
                            l.adopter = l.late.take().map(|late| {
                                AbortOnDrop(tokio::spawn(
                                    late.adopt(engine.clone(), metrics.clone())
                                        .instrument(info_span!("late-leases")),
                                ))
                            });
                            l.engine = Some(engine.clone());
                            let _ = role.send(Role::Leader(engine));
                        }
                        Ok(Err(e)) => error!(error = %e, "loading state failed; retrying"),
                        Err(e) => error!(error = %e, "the loading task failed; retrying"),
                    }
                }
            }
        }
    }
}

/// Past a holder's expiry before trying to take over: the Lease's times are written with
/// the holder's clock, and a try a moment early only finds it held again.
const EXPIRY_SLACK: Duration = Duration::from_millis(20);

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What ends a wait of the election loop.
enum Wake {
    /// Time to renew (or, for a follower, to try to take over).
    Renew,
    /// The new leader's state finished loading.
    Loaded(Result<Result<Engine, crate::store::StoreError>, tokio::task::JoinError>),
    /// Shutdown.
    Stop,
}

/// On shutdown: a leader stops writing, releases the Lease so another replica takes over
/// at once, and hands back its engine to be drained.
async fn step_down(
    leading: Option<Leading>,
    lock: &LeaseLock,
    role: &watch::Sender<Role>,
    metrics: &Metrics,
) -> Option<Engine> {
    let engine = leading.and_then(|l| l.end(role, Role::Stopping));
    if engine.is_some() {
        metrics.set_leader(false);
        match lock.step_down().await {
            Ok(()) => info!("released the leader lease"),
            Err(e) => warn!(error = %e, "could not release the leader lease; it will expire"),
        }
    }
    engine
}

/// The status of an IPPool as `stats` describes it.
pub fn ippool_status(stats: &PoolStats) -> IPPoolStatus {
    let t = &stats.totals;
    let condition = match &stats.error {
        None => PoolCondition {
            type_: "Valid".into(),
            status: "True".into(),
            reason: "Valid".into(),
            message: String::new(),
        },
        Some(e) => PoolCondition {
            type_: "Valid".into(),
            status: "False".into(),
            reason: "Invalid".into(),
            message: e.clone(),
        },
    };
    IPPoolStatus {
        ranges: stats.ranges.clone(),
        size: t.size.to_string(),
        used: t.used.to_string(),
        excluded: t.excluded.to_string(),
        free: t.free.to_string(),
        cooldown_holds: stats.cooldown_holds.to_string(),
        conditions: vec![condition],
        blocks: stats
            .blocks
            .iter()
            .map(|b| NodeBlock {
                node: b.node.clone(),
                block: b.block.clone(),
                used: b.used.to_string(),
                free: b.free.to_string(),
                size: b.size.to_string(),
                cooldown_holds: b.cooldown_holds.to_string(),
            })
            .collect(),
    }
}

/// Keeps each RangePool's and IPPool's status at its usage (and an IPPool's validity),
/// writing only what changed. It runs beside allocation and never holds it up.
async fn pool_status(client: Client, election: Election, engine: Engine, ippools: Pools) {
    let api: Api<RangePool> = Api::namespaced(client.clone(), &election.namespace);
    let ippool_api: Api<IPPool> = Api::all(client);
    let mut written: HashMap<String, RangePoolStatus> = HashMap::new();
    let mut written_ip: HashMap<String, IPPoolStatus> = HashMap::new();
    let mut set_seen = ippools.snapshot();
    loop {
        let set = ippools.snapshot();
        if !Arc::ptr_eq(&set, &set_seen) {
            // A pool deleted and made again has no status, whatever was written before.
            written_ip.clear();
            set_seen = set.clone();
        }
        let Ok((pools, stats)) =
            engine.call(move |a, now| (a.pools(None), crate::pools::stats(a, &set, now))).await
        else {
            return;
        };
        for s in &stats {
            let status = ippool_status(s);
            if written_ip.get(&s.name) == Some(&status) {
                continue;
            }
            let patch = Patch::Merge(serde_json::json!({ "status": status }));
            match ippool_api.patch_status(&s.name, &PatchParams::default(), &patch).await {
                Ok(_) => {
                    written_ip.insert(s.name.clone(), status);
                }
                // A pool of the pools directory has no object; nor has one just deleted.
                Err(e) => warn!(pool = %s.name, error = %e, "could not update IPPool status"),
            }
        }
        for p in pools {
            let name = pool_name(&p.network, &p.range);
            let status = RangePoolStatus {
                size: p.size.to_string(),
                used: p.used.to_string(),
                free: p.free.to_string(),
                excluded: p.excluded.to_string(),
            };
            if written.get(&name) == Some(&status) {
                continue;
            }
            let patch = Patch::Merge(serde_json::json!({ "status": status }));
            match api.patch_status(&name, &PatchParams::default(), &patch).await {
                Ok(_) => {
                    written.insert(name, status);
                }
                Err(e) => warn!(pool = %name, error = %e, "could not update pool status"),
            }
        }
        tokio::time::sleep(election.status_every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_leave_room_for_renewals() {
        let e = Election {
            namespace: "ns".into(),
            lease_name: "rust-ipam".into(),
            me: Peer { identity: "a".into(), endpoint: String::new() },
            ttl: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            status_every: Duration::from_secs(10),
        };
        assert_eq!(e.check(), Ok(()));
        assert_eq!(e.write_window(), Duration::from_secs(10));
        let slow = Election { renew_every: Duration::from_secs(6), ..e.clone() };
        assert_eq!(
            slow.check(),
            Err("--renew-every 6s must be more than zero and at most a third of --lease-ttl 15s".into())
        );
        let short = Election { ttl: Duration::from_secs(1), ..e };
        assert_eq!(short.check(), Err("--lease-ttl 1s is shorter than 2s".into()));
    }
}
