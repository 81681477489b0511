//! The lease store on the Kubernetes API: one [`IPLease`] per held address.
//!
//! Invariant 1 is the API server's to enforce: a lease is created under the name of its
//! network and address, so a second holder's create fails with AlreadyExists; an update
//! carries the resourceVersion it read and a delete carries the uid and resourceVersion as
//! preconditions, so a write based on stale knowledge fails with Conflict. A server that
//! lost leadership and writes late is refused the same way.
//!
//! Writes are independent round trips, so the store takes them pipelined
//! ([`PipelinedStore`]): each write starts as soon as the engine hands it over, without
//! waiting for the rest of its batch or for earlier batches, except that writes to one
//! object go out one after another in the order given (a chain per object). The API has
//! no multi-object transactions, so a refused write is reported on its own with what the
//! API server holds instead, and the engine chooses again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::FutureExt as _;
use futures::future::Shared;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams, Preconditions};
use kube::core::ApiResource;
use kube::{Client, Resource as _, ResourceExt as _};
use serde::Deserialize as _;
use tracing::{debug, info, warn};

use super::crd::{IPLease, IPLeaseSpec, RangePool, RangePoolSpec, lease_name, pool_name};
use super::mirror::{Arrival, LeaseMirror};
use crate::allocator::{Allocator, Attachment, Change, Lease, LoadProblem};
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::store::{
    CommitError, LeaseStore, Loaded, PipelinedStore, Refusal, StoreError, WriteOutcome, WriteReport,
};

/// Objects per list page when listing from etcd: an IPLease is under 1 KiB, so a page
/// stays a few MiB while 100,000 leases need 50 round trips instead of 200. A new leader
/// with no mirror lists the leases at once from the API server's watch cache instead
/// ([`super::for_each_cached`]); see [`KubeStore::load`].
const PAGE: u32 = 2000;
/// Objects written at once.
const IN_FLIGHT: usize = 64;
/// First pause before a lease write whose outcome is unknown is sent again; it doubles up
/// to [`UNSETTLED_RETRY_MAX`].
const UNSETTLED_RETRY: std::time::Duration = std::time::Duration::from_millis(50);
const UNSETTLED_RETRY_MAX: std::time::Duration = std::time::Duration::from_millis(800);
/// How long a lease write whose outcome is unknown is tried again, at most: an API server
/// restart takes a few seconds; longer, the engine reloads (reading etcd) instead.
const UNSETTLED_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// Says whether this server may still write: the leader's lease, as far as it knows, has
/// not run out. Writes stop before the lease can expire, so a new leader never races them.
#[derive(Debug, Clone, Default)]
pub struct Fence(Arc<Mutex<Option<Instant>>>);

impl Fence {
    /// A fence that is closed until [`Fence::open_until`] is called.
    pub fn new() -> Fence {
        Fence::default()
    }

    /// Allows writes until `deadline`.
    pub fn open_until(&self, deadline: Instant) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(deadline);
    }

    /// Forbids writes from now on.
    pub fn close(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// How long writes stay allowed (zero when they are not).
    pub fn remaining(&self) -> std::time::Duration {
        match *self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => std::time::Duration::ZERO,
        }
    }

    /// Ok while writes are allowed; else why not.
    pub fn check(&self) -> Result<(), String> {
        match *self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(d) if Instant::now() < d => Ok(()),
            Some(_) => Err("the leader lease was not renewed in time".into()),
            None => Err("this server does not hold the leader lease".into()),
        }
    }
}

/// The lease writes a replica has in flight, across the stores it makes, and whether one
/// ended with its outcome unknown. When its engine stops (fenced off while the API server
/// was frozen) and it leads again, the new store must not load before the old one's writes
/// have landed or failed: a create held in a frozen API server lands when it resumes, and a
/// load taken before that misses it, so a retried ADD would get a second address while the
/// first stays stored. A write whose outcome is unknown (etcd restarted under it) may have
/// landed where the mirror and the watch cache do not show it yet, for the same result: the
/// next load after one reads etcd itself.
#[derive(Debug, Clone)]
pub struct WritesInFlight {
    count: Arc<tokio::sync::watch::Sender<usize>>,
    unknown: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for WritesInFlight {
    fn default() -> WritesInFlight {
        WritesInFlight { count: Arc::new(tokio::sync::watch::channel(0).0), unknown: Arc::default() }
    }
}

impl WritesInFlight {
    /// Counts one write until the returned guard is dropped.
    fn start(&self) -> WriteGuard {
        self.count.send_modify(|n| *n += 1);
        WriteGuard(self.clone())
    }

    /// Waits until no write is in flight. True if the next load must read etcd itself: it
    /// had to wait, or a write ended with its outcome unknown since the last such load.
    async fn settled(&self) -> bool {
        let unknown = self.unknown.load(std::sync::atomic::Ordering::SeqCst);
        let mut rx = self.count.subscribe();
        if *rx.borrow_and_update() == 0 {
            if unknown {
                info!("a write's outcome was unknown: loading from etcd, not from a copy that may trail it");
            }
            return unknown;
        }
        let n = *rx.borrow();
        info!(writes = n, "waiting for this replica's earlier writes before loading");
        // The sender lives in `self`, so the wait ends only when the count is zero.
        let _ = rx.wait_for(|n| *n == 0).await;
        true
    }

    /// A load read etcd after every write so far had settled.
    fn loaded_from_etcd(&self) {
        self.unknown.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// One write in flight.
struct WriteGuard(WritesInFlight);

impl WriteGuard {
    /// The write ended with its outcome unknown.
    fn unknown(&self) {
        self.0.unknown.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        self.0.count.send_modify(|n| *n -= 1);
    }
}

/// Identity of one object as last seen: the preconditions of the next write to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Seen {
    pub(super) uid: String,
    resource_version: String,
}

impl Seen {
    pub(super) fn of(meta: &kube::api::ObjectMeta) -> Option<Seen> {
        Some(Seen { uid: meta.uid.clone()?, resource_version: meta.resource_version.clone()? })
    }
}

/// Leases and pools as custom resources in one namespace.
#[derive(Debug)]
pub struct KubeStore {
    inner: Arc<Inner>,
    /// The last write submitted to each object with writes in flight: the next one to it
    /// waits for it (and learns whether it applied).
    tails: Arc<Mutex<HashMap<String, Tail>>>,
    next_tail: u64,
    /// Bounds the writes in flight (and so the connections to the API server).
    permits: Arc<tokio::sync::Semaphore>,
    /// Objects per list page; `None`: the leases are listed from the watch cache.
    page: Option<u32>,
    /// The replica's warm copy of the leases: loaded from instead of listing.
    mirror: Option<Arc<LeaseMirror>>,
    /// The replica's writes in flight, this store's and earlier ones'.
    in_flight: WritesInFlight,
}

/// Completion of the last write submitted to an object: `true` if it applied.
#[derive(Debug, Clone)]
struct Tail {
    id: u64,
    applied: Shared<tokio::sync::oneshot::Receiver<bool>>,
}

/// What the writes share.
#[derive(Debug)]
struct Inner {
    rt: tokio::runtime::Handle,
    namespace: String,
    leases: Api<IPLease>,
    pools: Api<RangePool>,
    /// The same leases, read without trusting their contents (a hand-edited object must
    /// not break a whole list).
    raw_leases: Api<DynamicObject>,
    raw_pools: Api<DynamicObject>,
    /// The lease objects this server knows, by name.
    seen: Mutex<HashMap<String, Seen>>,
    fence: Fence,
}

type Outcome = WriteOutcome;

/// What the API server holds under a lease name, as far as it can be read.
enum Truth {
    Free,
    Held(Lease, Option<Seen>),
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Whether a failed call may still have been applied, now or later: no answer (a broken
/// connection, a timeout, an answer that could not be read), or an answer saying the
/// API server or etcd could not decide (5xx, 429 Too Many Requests).
fn unanswered(e: &kube::Error) -> bool {
    api_code(e).is_none_or(|c| c >= 500 || c == 429)
}

impl KubeStore {
    /// A store in `namespace`; its calls run on `rt` (the engine thread blocks on them).
    pub fn new(client: Client, namespace: &str, rt: tokio::runtime::Handle, fence: Fence) -> KubeStore {
        let lease_res = ApiResource::erase::<IPLease>(&());
        let pool_res = ApiResource::erase::<RangePool>(&());
        let inner = Inner {
            rt,
            namespace: namespace.to_string(),
            leases: Api::namespaced(client.clone(), namespace),
            pools: Api::namespaced(client.clone(), namespace),
            raw_leases: Api::namespaced_with(client.clone(), namespace, &lease_res),
            raw_pools: Api::namespaced_with(client, namespace, &pool_res),
            seen: Mutex::new(HashMap::new()),
            fence,
        };
        KubeStore {
            inner: Arc::new(inner),
            tails: Arc::default(),
            next_tail: 0,
            permits: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
            page: None,
            mirror: None,
            in_flight: WritesInFlight::default(),
        }
    }
}

impl KubeStore {
    /// Loads the leases page by page from etcd, `objects` a page, instead of at once from the
    /// API server's watch cache.
    pub fn with_page_size(mut self, objects: u32) -> KubeStore {
        self.page = Some(objects.max(1));
        self
    }

    /// Loads the leases from `mirror` (once it follows the API server) instead of listing
    /// them.
    pub fn with_mirror(mut self, mirror: Arc<LeaseMirror>) -> KubeStore {
        self.mirror = Some(mirror);
        self
    }

    /// Counts this store's writes in `writes`, shared with the replica's earlier and later
    /// stores; a load waits until none is in flight.
    pub fn with_writes_in_flight(mut self, writes: WritesInFlight) -> KubeStore {
        self.in_flight = writes;
        self
    }

    /// Starts the warm copy of the lease objects in `namespace` that a store of this
    /// replica loads from when it leads; on the current runtime.
    pub fn start_mirror(client: Client, namespace: &str) -> Arc<LeaseMirror> {
        let res = ApiResource::erase::<IPLease>(&());
        LeaseMirror::start(Api::namespaced_with(client, namespace, &res))
    }

    /// The lease objects that appear from now on, for [`LateLeases::adopt`] once this
    /// store's engine has loaded: taken before the load, so none that lands meanwhile is
    /// missed. `None` without a mirror.
    pub fn late_leases(&self) -> Option<LateLeases> {
        let mirror = self.mirror.clone()?;
        Some(LateLeases {
            inner: self.inner.clone(),
            tails: self.tails.clone(),
            arrivals: mirror.arrivals(),
            mirror,
        })
    }
}

/// Lease objects that land after the leader loaded: a create the previous leader sent
/// before it was deposed, held by the API server (etcd was down) and applied later. The
/// fence cannot stop it (it was sent in time) and the create's precondition is only that
/// the name is free. Without this the new leader holds the address free in memory; the
/// pod that asked (and was told another address by the new leader after a retry) holds a
/// second address that its DEL does not free, until the reconcile pass after the pod is
/// gone; another pod given the address is refused and choosing again costs a round trip.
///
/// So the leader takes such an object into memory as the API server holds it, unless
/// memory has the address already (its next write there is refused and reads the truth).
/// The decision runs as an engine job, so no write of this replica to the object is in
/// flight or starts meanwhile, and reads the object back first: an arrival can also be an
/// object this replica wrote itself (its answer had not come yet) or deleted since.
#[derive(Debug)]
pub struct LateLeases {
    inner: Arc<Inner>,
    tails: Arc<Mutex<HashMap<String, Tail>>>,
    mirror: Arc<LeaseMirror>,
    arrivals: tokio::sync::broadcast::Receiver<Arrival>,
}

/// What the leader made of one arrival.
#[derive(Debug, PartialEq, Eq)]
enum Adoption {
    /// Taken into memory.
    Adopted,
    /// This replica knows it, writes it, or holds its address: nothing to do.
    Known,
    /// It is gone again.
    Gone,
    /// It does not read as a lease: it holds nothing (as at a load).
    Unreadable(String),
    /// Reading it back failed: tried again after [`UNREAD_RETRY`].
    Unread(String),
}

/// Pause before an arrival that could not be read back is tried again.
const UNREAD_RETRY: std::time::Duration = std::time::Duration::from_secs(1);
/// How long the engine waits to read an arrival back.
const READ_BACK: std::time::Duration = std::time::Duration::from_secs(2);

impl LateLeases {
    /// Takes the objects that arrive into `engine`'s memory (see [`LateLeases`]), until the
    /// engine stops. Counted in `metrics`.
    pub async fn adopt(mut self, engine: Engine, metrics: Arc<Metrics>) {
        use tokio::sync::broadcast::error::RecvError;
        let stopped = engine.stopped();
        let mut stopped = std::pin::pin!(stopped);
        let mut retry: Vec<Arrival> = Vec::new();
        loop {
            let candidates = tokio::select! {
                () = &mut stopped => return,
                () = tokio::time::sleep(UNREAD_RETRY), if !retry.is_empty() => std::mem::take(&mut retry),
                arrived = self.arrivals.recv() => match arrived {
                    Ok(a) => vec![a],
                    Err(RecvError::Lagged(n)) => {
                        warn!(missed = n, "fell behind the lease arrivals; comparing every object with memory");
                        self.mirror.present()
                    }
                    Err(RecvError::Closed) => return,
                },
            };
            for a in candidates {
                // Most arrivals are this replica's own creates, in flight or answered: the
                // engine never sees those (a write's object is known before its entry in
                // `tails` goes).
                let writing = self.tails.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&a.name);
                if writing || self.inner.seen().get(&a.name).is_some_and(|s| s.uid == a.uid) {
                    continue;
                }
                let (inner, tails, arrival) = (self.inner.clone(), self.tails.clone(), a.clone());
                let job = move |alloc: &mut Allocator, _: i64| adopt_one(&inner, &tails, alloc, &arrival);
                match engine.call(job).await {
                    Ok(Adoption::Adopted) => metrics.count_late_lease(),
                    Ok(Adoption::Unread(why)) => {
                        warn!(lease = %a.name, %why, "could not read an arrived lease object back; trying again");
                        retry.push(a);
                    }
                    Ok(Adoption::Unreadable(why)) => {
                        warn!(lease = %a.name, %why, "an arrived lease object does not read as a lease; it holds nothing")
                    }
                    Ok(Adoption::Known | Adoption::Gone) => {}
                    Err(_) => return,
                }
            }
        }
    }
}

/// One arrival, decided on the engine thread (see [`LateLeases`]).
fn adopt_one(
    inner: &Inner,
    tails: &Mutex<HashMap<String, Tail>>,
    alloc: &mut Allocator,
    a: &Arrival,
) -> Adoption {
    let in_flight = tails.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&a.name);
    if in_flight || alloc.get(&a.network, a.address).is_ok() {
        return Adoption::Known;
    }
    // The engine waits for this read: an API server that does not answer must not hold it.
    let read =
        inner.rt.block_on(async { tokio::time::timeout(READ_BACK, inner.raw_leases.get_opt(&a.name)).await });
    let obj = match read {
        Ok(Ok(Some(obj))) => obj,
        Ok(Ok(None)) => return Adoption::Gone,
        Ok(Err(e)) => return Adoption::Unread(e.to_string()),
        Err(_) => return Adoption::Unread(format!("no answer within {READ_BACK:?}")),
    };
    let Some(seen) = Seen::of(&obj.metadata) else {
        return Adoption::Unreadable("it has no uid or resourceVersion".into());
    };
    if inner.seen().get(&a.name).is_some_and(|s| s.uid == seen.uid) {
        return Adoption::Known;
    }
    let lease = match decode_lease(&obj) {
        Ok(l) => l,
        Err(why) => return Adoption::Unreadable(why),
    };
    warn!(
        lease = %a.name,
        holder = %lease.who(),
        "a lease object landed after this replica loaded (a create the previous leader sent); holding it"
    );
    alloc.sync_from_store(&a.network, a.address, Some(lease));
    inner.seen().insert(a.name.clone(), seen);
    Adoption::Adopted
}

impl Inner {
    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<String, Seen>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads one lease object. A name that exists but cannot be read as a lease is still
    /// held: it blocks the address (a placeholder reservation says why) so it is never
    /// given out twice.
    async fn truth(&self, network: &str, address: IpAddr) -> Result<Truth, StoreError> {
        let name = lease_name(network, address);
        let obj = self.raw_leases.get_opt(&name).await.map_err(|e| StoreError::new("read lease", e))?;
        let Some(obj) = obj else { return Ok(Truth::Free) };
        let seen = Seen::of(&obj.metadata);
        match decode_lease(&obj) {
            Ok(l) => Ok(Truth::Held(l, seen)),
            Err(why) => Ok(Truth::Held(unreadable(network, address, &name, &why), seen)),
        }
    }

    /// Turns a refused or uncertain write into a refusal carrying the API server's truth.
    async fn refuse(&self, index: usize, network: &str, address: IpAddr, reason: String) -> Outcome {
        match self.truth(network, address).await {
            Ok(t) => {
                let name = lease_name(network, address);
                let truth = match t {
                    Truth::Free => {
                        self.seen().remove(&name);
                        None
                    }
                    Truth::Held(l, seen) => {
                        if let Some(s) = seen {
                            self.seen().insert(name, s);
                        }
                        Some(l)
                    }
                };
                Outcome::Refused(Refusal { index, network: network.into(), address, truth, reason })
            }
            Err(e) => Outcome::Failed(e),
        }
    }

    /// Creates a lease's object, or replaces it if this server read it. A call that may or
    /// may not have applied (no answer, or the API server or etcd could not say: 5xx, 429)
    /// is read back; while the object is missing or cannot be read, the create is sent
    /// again, for as long as this server may write and at most [`UNSETTLED_FOR`]. Giving
    /// up at once would have the engine reload, from an API server that may be down, or
    /// choose another address for the pod while the first create may still land, holding
    /// an address nobody was told. A second create of the same lease is harmless: the
    /// first to land wins, the other is refused and read back as ours.
    async fn put_lease(&self, index: usize, l: &Lease) -> Outcome {
        let name = lease_name(&l.network, l.address);
        let mut pause = UNSETTLED_RETRY;
        let give_up = Instant::now() + UNSETTLED_FOR;
        // Whether an attempt may have applied. Later answers do not settle it: a restarted
        // API server refuses everything (403) until its authorizer has synced.
        let mut unsure = false;
        loop {
            let mut obj = IPLease::new(&name, IPLeaseSpec::from(l));
            let known = self.seen().get(&name).cloned();
            let result = match &known {
                // An update (the pod moved to a new sandbox): only over what we read.
                Some(s) => {
                    obj.meta_mut().resource_version = Some(s.resource_version.clone());
                    obj.meta_mut().uid = Some(s.uid.clone());
                    self.leases.replace(&name, &PostParams::default(), &obj).await
                }
                None => self.leases.create(&PostParams::default(), &obj).await,
            };
            let e = match result {
                Ok(created) => {
                    if let Some(s) = Seen::of(created.meta()) {
                        self.seen().insert(name, s);
                    }
                    return Outcome::Done;
                }
                Err(e) => e,
            };
            let reason = match api_code(&e) {
                Some(409) if known.is_none() => "another holder's object exists".to_string(),
                Some(409) => "the object changed since it was read".to_string(),
                Some(404) => "the object was deleted meanwhile".to_string(),
                _ => format!("write failed: {e}"),
            };
            let outcome = match self.refuse(index, &l.network, l.address, reason).await {
                // Our own earlier write (an answer lost in transit) already holds it.
                Outcome::Refused(r) if r.truth.as_ref() == Some(l) => return Outcome::Done,
                o => o,
            };
            unsure |= unanswered(&e);
            let unsettled = unsure
                && match &outcome {
                    Outcome::Failed(_) => true,
                    // Missing now, but a create may still land; an update of an object
                    // that is gone is refused for good.
                    Outcome::Refused(r) => r.truth.is_none() && known.is_none(),
                    Outcome::Done => false,
                };
            if !unsettled || self.fence.check().is_err() || Instant::now() > give_up {
                return outcome;
            }
            debug!(lease = %name, error = %e, "a lease write's outcome is unknown; writing it again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(UNSETTLED_RETRY_MAX);
        }
    }

    async fn write(&self, index: usize, change: &Change) -> Outcome {
        match change {
            Change::PutPool { network, range } => {
                let name = pool_name(network, range);
                let obj = RangePool::new(&name, RangePoolSpec::new(network, range));
                match self.pools.create(&PostParams::default(), &obj).await {
                    // The name hashes the whole configuration, so an existing one is this one.
                    Ok(_) => Outcome::Done,
                    Err(e) if api_code(&e) == Some(409) => Outcome::Done,
                    Err(e) => Outcome::Failed(StoreError::new("create pool", format!("{name}: {e}"))),
                }
            }
            Change::PutLease(l) => self.put_lease(index, l).await,
            Change::DeleteLease { network, address } => {
                let name = lease_name(network, *address);
                let Some(known) = self.seen().get(&name).cloned() else {
                    // Never delete an object unread: it may be another holder's.
                    return self.refuse(index, network, *address, "not read before deleting".into()).await;
                };
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: Some(known.uid),
                        resource_version: Some(known.resource_version),
                    }),
                    ..DeleteParams::default()
                };
                match self.leases.delete(&name, &dp).await {
                    Ok(_) => {
                        self.seen().remove(&name);
                        Outcome::Done
                    }
                    Err(e) if api_code(&e) == Some(404) => {
                        self.seen().remove(&name);
                        Outcome::Done
                    }
                    Err(e) => {
                        let reason = match api_code(&e) {
                            Some(409) => "the object changed since it was read".to_string(),
                            _ => format!("delete failed: {e}"),
                        };
                        self.refuse(index, network, *address, reason).await
                    }
                }
            }
        }
    }
}

/// The network and address a change is about, if it is about a lease.
fn lease_key(c: &Change) -> Option<(&str, IpAddr)> {
    match c {
        Change::PutLease(l) => Some((&l.network, l.address)),
        Change::DeleteLease { network, address } => Some((network, *address)),
        Change::PutPool { .. } => None,
    }
}

/// The object's name: a lease or pool object without one is not one we wrote.
fn object_name(c: &Change) -> String {
    match c {
        Change::PutLease(l) => lease_name(&l.network, l.address),
        Change::DeleteLease { network, address } => lease_name(network, *address),
        Change::PutPool { network, range } => format!("pool/{}", pool_name(network, range)),
    }
}

/// Hands every object of `api` to `each`, `page` objects a page, so only one page is held
/// at a time (a leader loading 100,000 leases holds its decoded leases, not the JSON).
async fn list_each(
    api: &Api<DynamicObject>,
    page: u32,
    what: &'static str,
    mut each: impl FnMut(DynamicObject),
) -> Result<(), StoreError> {
    super::for_each_page(page, |lp| async move { api.list(&lp).await }, &mut each)
        .await
        .map(|_| ())
        .map_err(|e| StoreError::new(what, e))
}

/// The lease an IPLease object read back from the API server holds, or why it holds none
/// (public for the fuzz target `kube_objects`, which feeds it what an API server could return).
pub fn decode_lease(obj: &DynamicObject) -> Result<Lease, String> {
    let spec = obj.data.get("spec").ok_or("has no spec")?;
    let spec = IPLeaseSpec::deserialize(spec).map_err(|e| format!("spec: {e}"))?;
    spec.to_lease(&obj.name_any()).map_err(|e| e.to_string())
}

/// A placeholder that keeps an address held by an object that cannot be read.
fn unreadable(network: &str, address: IpAddr, name: &str, why: &str) -> Lease {
    Lease {
        address,
        network: network.into(),
        range: "".into(),
        prefix_len: if address.is_ipv4() { 32 } else { 128 },
        gateway: None,
        holder: Arc::new(Attachment::default()),
        created_unix_ms: 0,
        note: format!("unreadable IPLease {name}: {why}"),
    }
}

impl LeaseStore for KubeStore {
    fn describe(&self) -> String {
        format!("kube:{}", self.inner.namespace)
    }

    fn load(&self) -> Result<Loaded, StoreError> {
        let this = &*self.inner;
        this.rt.block_on(async {
            // Earlier writes that just landed, or whose outcome is unknown, may not have
            // reached the mirror or the watch cache yet.
            let from_etcd = self.in_flight.settled().await;
            let mut out = Loaded::default();
            list_each(&this.raw_pools, PAGE, "list range pools", |obj| {
                let name = obj.name_any();
                let spec = obj.data.get("spec").cloned().unwrap_or_default();
                match serde_json::from_value::<RangePoolSpec>(spec) {
                    Ok(s) => out.pools.push((s.network.clone(), s.input())),
                    Err(e) => out
                        .problems
                        .push(LoadProblem { what: format!("RangePool {name}"), error: e.to_string() }),
                }
            })
            .await?;
            if let Some(mirror) = self.mirror.as_ref().filter(|_| !from_etcd) {
                let started = Instant::now();
                match mirror.snapshot().await {
                    Ok(snapshot) => {
                        info!(
                            leases = snapshot.leases.len(),
                            secs = started.elapsed().as_secs_f64(),
                            "leases from the mirror"
                        );
                        out.leases = snapshot.leases;
                        out.problems.extend(snapshot.problems);
                        *this.seen() = snapshot.seen;
                        return Ok(out);
                    }
                    Err(why) => {
                        warn!(%why, "the lease mirror does not follow the API server; listing instead")
                    }
                }
            }
            let mut seen = HashMap::new();
            let started = Instant::now();
            let each = |obj: DynamicObject| {
                let name = obj.name_any();
                match decode_lease(&obj) {
                    Ok(l) => {
                        if let Some(s) = Seen::of(&obj.metadata) {
                            seen.insert(name, s);
                        }
                        out.leases.push(l);
                    }
                    // Its address is unknown or untrusted, so it is skipped: it can still
                    // not be held twice, because a create under its proper name would
                    // show the truth, and a misnamed one holds nothing.
                    Err(e) => out.problems.push(LoadProblem { what: format!("IPLease {name}"), error: e }),
                }
            };
            // From the watch cache, which may trail etcd by milliseconds: safe, as a
            // mirror's copy is (every write is conditional), and the previous leader's last
            // writes are a third of the TTL old by the time another replica leads. Except
            // this replica's own writes that just landed or may have: then from etcd.
            match self.page.or(from_etcd.then_some(PAGE)) {
                Some(page) => list_each(&this.raw_leases, page, "list leases", each).await?,
                None => {
                    super::for_each_cached(&this.raw_leases, each)
                        .await
                        .map_err(|e| StoreError::new("list leases", e))?;
                }
            }
            info!(
                leases = out.leases.len(),
                secs = started.elapsed().as_secs_f64(),
                from_etcd,
                "leases listed"
            );
            if from_etcd {
                self.in_flight.loaded_from_etcd();
            }
            *this.seen() = seen;
            Ok(out)
        })
    }

    fn pipelined(&mut self) -> Option<&mut dyn PipelinedStore> {
        Some(self)
    }

    /// The pipelined writes, waited for: what a caller that wants a whole batch gets.
    fn commit(&mut self, changes: &[Change]) -> Result<(), CommitError> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let report: WriteReport = Arc::new(move |id, o| {
            let _ = tx.send((id, o));
        });
        self.submit(changes.iter().cloned().enumerate().collect(), report).map_err(CommitError::Fenced)?;
        let mut refused = Vec::new();
        let mut failed = None;
        for _ in 0..changes.len() {
            match futures::executor::block_on(rx.recv()) {
                Some((_, Outcome::Done)) => {}
                Some((_, Outcome::Refused(r))) => refused.push(r),
                Some((_, Outcome::Failed(e))) => {
                    warn!(error = %e, "a lease write failed and its outcome could not be read back");
                    failed.get_or_insert(e);
                }
                // The runtime dropped the writes (shutting down): their outcome is unknown.
                None => {
                    failed.get_or_insert(StoreError::new("commit", "the writes were dropped unfinished"));
                    break;
                }
            }
        }
        if let Some(e) = failed {
            return Err(CommitError::Failed(e));
        }
        debug!(changes = changes.len(), refused = refused.len(), "committed to the API server");
        if refused.is_empty() { Ok(()) } else { Err(CommitError::Refused(refused)) }
    }
}

impl PipelinedStore for KubeStore {
    fn submit(&mut self, writes: Vec<(usize, Change)>, report: WriteReport) -> Result<(), String> {
        self.inner.fence.check()?;
        for (id, change) in writes {
            let name = object_name(&change);
            let (applied_tx, applied_rx) = tokio::sync::oneshot::channel();
            self.next_tail += 1;
            let tail = Tail { id: self.next_tail, applied: applied_rx.shared() };
            let before = self.tails.lock().unwrap_or_else(|e| e.into_inner()).insert(name.clone(), tail);
            let (inner, tails, permits, report) =
                (self.inner.clone(), self.tails.clone(), self.permits.clone(), report.clone());
            let me = self.next_tail;
            let counted = self.in_flight.start();
            self.inner.rt.spawn(async move {
                // The previous write to this object first; a dropped one counts as failed.
                let before_applied = match before {
                    Some(t) => t.applied.await.unwrap_or(false),
                    None => true,
                };
                let outcome = {
                    // Held only while writing: a write waiting for its object holds none.
                    let _permit = permits.acquire_owned().await;
                    match (before_applied, lease_key(&change)) {
                        // It waited for its object (or a permit) past the fence: another
                        // replica may lead now, and a write sent late could undo its work.
                        _ if let Err(why) = inner.fence.check() => {
                            Outcome::Failed(StoreError::new("write", format!("{name}: not sent: {why}")))
                        }
                        (true, _) => inner.write(id, &change).await,
                        (false, Some((network, address))) => {
                            inner.refuse(id, network, address, "an earlier write to it failed".into()).await
                        }
                        // A pool's create that follows a failed one: try it, 409 is success.
                        (false, None) => inner.write(id, &change).await,
                    }
                };
                let _ = applied_tx.send(matches!(outcome, Outcome::Done));
                {
                    let mut tails = tails.lock().unwrap_or_else(|e| e.into_inner());
                    if tails.get(&name).is_some_and(|t| t.id == me) {
                        tails.remove(&name);
                    }
                }
                // Settled before it is reported: a reload the report leads to finds it done.
                if matches!(outcome, Outcome::Failed(_)) {
                    counted.unknown();
                }
                drop(counted);
                report(id, outcome);
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::WritesInFlight;
    use std::time::Duration;

    #[tokio::test]
    async fn a_load_waits_for_every_write_in_flight_across_stores() {
        let writes = WritesInFlight::default();
        assert!(!writes.settled().await, "nothing in flight: no wait");
        let (old_store, new_store) = (writes.clone(), writes.clone());
        let a = old_store.start();
        let b = old_store.start();
        let waiting = tokio::spawn(async move { new_store.settled().await });
        drop(a);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "one write is still in flight");
        drop(b);
        assert!(waiting.await.expect("join"), "it waited");
        assert!(!writes.settled().await);
    }

    #[tokio::test]
    async fn after_a_write_of_unknown_outcome_loads_read_etcd_until_one_has() {
        let writes = WritesInFlight::default();
        let w = writes.start();
        w.unknown();
        drop(w);
        assert!(writes.settled().await, "the write may have landed where a copy does not show it");
        assert!(writes.settled().await, "still so: no load has read etcd since");
        writes.loaded_from_etcd();
        assert!(!writes.settled().await);
    }
}
