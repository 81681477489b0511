//! Every replica's warm copy of the IPLease objects, kept by a list and then a watch from
//! the list's resourceVersion, so a replica that wins the election serves from memory
//! instead of listing every lease first (with 100,000 leases the list alone takes longer
//! than a failover may).
//!
//! The copy may trail the API server by the watch's delay. That is safe for the same
//! reason a stale view always is here (see [`super::store`]): every write is conditional.
//! A create under a name that exists is refused and read back, a replace or delete
//! carries the resourceVersion last seen and is refused if it changed. The old leader's
//! last writes happened a third of the TTL or more before a follower may take over, long
//! after their watch events arrived, unless the API server held them (frozen): then the
//! old leader usually leads on once it answers, and its next store lists instead of
//! loading from here once those writes have landed (`WritesInFlight`). The copy is only offered while the watch is running
//! from where the list left off; after an error it is offered again once the watch has
//! resumed (or, when the API server no longer has that history, once it has listed anew).
//! While it cannot be offered (a watch the API server refuses, e.g. RBAC without `watch`),
//! a new leader lists the leases itself, as without a mirror.
//!
//! On the leader the mirror also says which objects arrive ([`LeaseMirror::arrivals`]):
//! a create the old leader sent before it was deposed can land after the new leader
//! loaded (the API server held it while etcd was down), and the leader takes such an
//! object into memory (`LateLeases` in [`super::store`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use kube::ResourceExt as _;
use kube::api::{Api, DynamicObject, WatchEvent, WatchParams};
use tokio::sync::{broadcast, watch};
use tracing::{debug, info, warn};

use super::store::{Seen, decode_lease};
use crate::allocator::{Lease, LoadProblem};

/// Pause after a failed list or watch call before the next.
const RETRY: Duration = Duration::from_secs(1);
/// Arrivals a subscriber may fall behind by before it is told it lagged.
const ARRIVALS: usize = 4096;

/// One object as last seen.
#[derive(Debug, Clone)]
enum Entry {
    Lease(Lease, Option<Seen>),
    /// It exists but cannot be read as a lease: reported at load, and it blocks nothing
    /// (see `KubeStore::load`).
    Unreadable(String),
}

fn entry(obj: &DynamicObject) -> Entry {
    match decode_lease(obj) {
        Ok(l) => Entry::Lease(l, Seen::of(&obj.metadata)),
        Err(e) => Entry::Unreadable(e),
    }
}

/// A lease object that appeared: created (a watch event) or found by a list that followed
/// an interrupted watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Arrival {
    pub(super) name: String,
    pub(super) uid: String,
    pub(super) network: String,
    pub(super) address: std::net::IpAddr,
}

impl Arrival {
    fn of(name: &str, e: &Entry) -> Option<Arrival> {
        match e {
            Entry::Lease(l, Some(seen)) => Some(Arrival {
                name: name.to_string(),
                uid: seen.uid.clone(),
                network: l.network.to_string(),
                address: l.address,
            }),
            // Not adoptable: an object that cannot be read holds nothing until a load or a
            // refused write reads it.
            _ => None,
        }
    }
}

/// The leases as the mirror holds them now, for a new leader's load.
#[derive(Debug, Default)]
pub(super) struct Snapshot {
    pub(super) leases: Vec<Lease>,
    /// The preconditions of the next write to each object.
    pub(super) seen: HashMap<String, Seen>,
    pub(super) problems: Vec<LoadProblem>,
}

/// Whether the copy can be offered.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Listing: the copy is worth waiting for.
    Listing,
    /// Listed, and watching since: it follows the API server.
    Current,
    /// The last list or watch call failed, with this error; retrying.
    Failing(String),
}

/// The warm copy and the task keeping it; the task stops when the mirror is dropped.
#[derive(Debug)]
pub struct LeaseMirror {
    objects: Arc<Mutex<HashMap<String, Entry>>>,
    state: watch::Receiver<State>,
    arrivals: broadcast::Sender<Arrival>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LeaseMirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LeaseMirror {
    /// Starts listing `api` (at once, from the API server's watch cache) and watching it, on
    /// the current runtime.
    pub fn start(api: Api<DynamicObject>) -> Arc<LeaseMirror> {
        let objects = Arc::new(Mutex::new(HashMap::new()));
        let (tx, state) = watch::channel(State::Listing);
        let arrivals = broadcast::Sender::new(ARRIVALS);
        let task = tokio::spawn(follow(api, objects.clone(), tx, arrivals.clone()));
        Arc::new(LeaseMirror { objects, state, arrivals, task })
    }

    /// The lease objects that appear from now on. A receiver that falls behind by more than
    /// [`ARRIVALS`] is told it lagged; [`LeaseMirror::present`] then says what is there.
    pub(super) fn arrivals(&self) -> broadcast::Receiver<Arrival> {
        self.arrivals.subscribe()
    }

    /// Every readable lease object in the copy now, as arrivals.
    pub(super) fn present(&self) -> Vec<Arrival> {
        let objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        objects.iter().filter_map(|(name, e)| Arrival::of(name, e)).collect()
    }

    /// The copy, once it follows the API server (waiting while it lists); or why it does
    /// not follow it now.
    pub(super) async fn snapshot(&self) -> Result<Snapshot, String> {
        let mut state = self.state.clone();
        let now = match state.wait_for(|s| *s != State::Listing).await {
            Ok(s) => s.clone(),
            Err(_) => return Err("the mirror stopped".into()),
        };
        if let State::Failing(why) = now {
            return Err(why);
        }
        let objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Snapshot { leases: Vec::with_capacity(objects.len()), ..Snapshot::default() };
        for (name, e) in objects.iter() {
            match e {
                Entry::Lease(l, seen) => {
                    out.leases.push(l.clone());
                    if let Some(s) = seen {
                        out.seen.insert(name.clone(), s.clone());
                    }
                }
                Entry::Unreadable(error) => {
                    out.problems.push(LoadProblem { what: format!("IPLease {name}"), error: error.clone() })
                }
            }
        }
        Ok(out)
    }
}

/// Lists, then watches from the list's resourceVersion, forever: a watch that ends is
/// resumed where it stopped, one whose history is gone (410) lists anew.
async fn follow(
    api: Api<DynamicObject>,
    objects: Arc<Mutex<HashMap<String, Entry>>>,
    state: watch::Sender<State>,
    arrivals: broadcast::Sender<Arrival>,
) {
    let set = |v: State| {
        state.send_if_modified(|s| std::mem::replace(s, v.clone()) != v);
    };
    // Only while someone listens (a leader): a follower's mirror sends nothing.
    let arrived = |name: &str, e: &Entry| {
        if arrivals.receiver_count() > 0
            && let Some(a) = Arrival::of(name, e)
        {
            let _ = arrivals.send(a);
        }
    };
    let mut listed_before = false;
    loop {
        let started = std::time::Instant::now();
        let mut fresh = HashMap::new();
        let listed = super::for_each_cached(&api, |obj: DynamicObject| {
            fresh.insert(obj.name_any(), entry(&obj));
        })
        .await;
        let mut version = match listed {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "listing the leases for the mirror failed; retrying");
                set(State::Failing(format!("listing the leases: {e}")));
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let count = fresh.len();
        {
            let mut objects = objects.lock().unwrap_or_else(|e| e.into_inner());
            // What appeared while no watch ran arrives too (not the first list: nobody has
            // loaded before it).
            if listed_before {
                fresh
                    .iter()
                    .filter(|(name, _)| !objects.contains_key(*name))
                    .for_each(|(n, e)| arrived(n, e));
            }
            *objects = fresh;
        }
        listed_before = true;
        set(State::Current);
        info!(leases = count, secs = started.elapsed().as_secs_f64(), "lease mirror listed; watching");
        // Watch until the history is gone.
        loop {
            let params = WatchParams::default().timeout(290);
            let events = match api.watch(&params, &version).await {
                Ok(events) => events,
                Err(e) => {
                    // Not following until a watch runs again; what changed meanwhile comes
                    // with it.
                    warn!(error = %e, "watching the leases failed; retrying");
                    set(State::Failing(format!("watching the leases: {e}")));
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            set(State::Current);
            let mut events = std::pin::pin!(events);
            let mut gone = false;
            while let Some(event) = events.next().await {
                let mut objects = objects.lock().unwrap_or_else(|e| e.into_inner());
                match event {
                    Ok(WatchEvent::Added(o)) => {
                        version = o.resource_version().unwrap_or(version);
                        let (name, e) = (o.name_any(), entry(&o));
                        arrived(&name, &e);
                        objects.insert(name, e);
                    }
                    Ok(WatchEvent::Modified(o)) => {
                        version = o.resource_version().unwrap_or(version);
                        objects.insert(o.name_any(), entry(&o));
                    }
                    Ok(WatchEvent::Deleted(o)) => {
                        version = o.resource_version().unwrap_or(version);
                        objects.remove(&o.name_any());
                    }
                    Ok(WatchEvent::Bookmark(b)) => version = b.metadata.resource_version,
                    Ok(WatchEvent::Error(s)) if s.code == 410 => {
                        gone = true;
                        break;
                    }
                    Ok(WatchEvent::Error(s)) => {
                        debug!(code = s.code, message = %s.message, "the lease watch ended with an error");
                        break;
                    }
                    Err(e) => {
                        debug!(error = %e, "the lease watch broke off");
                        break;
                    }
                }
            }
            if gone {
                set(State::Listing);
                info!("the lease watch's history is gone; listing anew");
                break;
            }
        }
    }
}
