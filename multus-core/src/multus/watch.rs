//! The thick daemon's Pods and NADs: a list and then a watch of every
//! NetworkAttachmentDefinition and of the pods of this node (`spec.nodeName`), kept in
//! memory as what an ADD reads of them (a pod's UID, annotations and ResourceClaims, as the
//! thin plugin decodes them), so an ADD reads them without a call to the API server. Pods
//! are watched whole, not as metadata: a pod's DRA claims are in its spec and status.
//!
//! The copy trails the API server by the watch's delay, and a pod is usually created a
//! moment before its sandbox, so a lookup that misses asks the API server (a GET) and keeps
//! the answer; a pod whose UID is not the one the runtime gives is read again the same way
//! ([`WatchCache::refresh_pod`]). NADs are asked for only until the first list is in;
//! after it, a NAD the copy lacks is missing (the cluster network is looked for as a NAD
//! first on every ADD, so asking would cost a call each time); a NAD created a moment
//! before its pod is then refused until the watch brings it, and the runtime's retry of
//! the ADD finds it. Writes (the network-status annotation) go to the API server as in
//! thin mode.
//!
//! Each cache lists anew when its watch's history is gone (410), resumes the watch where it
//! stopped otherwise, and retries a failed call after [`RETRY`]. [`WatchCache::synced`] says
//! whether both have listed once (the daemon's readiness).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, ApiResource, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams, WatchEvent, WatchParams,
};
use serde_json::json;
use tokio::runtime::Handle;

use super::source::{
    NadInfo, ObjectSource, PodInfo, SourceError, kube_err, nad_info, nad_resource, pod_info,
};

/// Pause after a failed list or watch call before the next.
pub const RETRY: Duration = Duration::from_secs(1);
/// Objects per page of a list call.
const PAGE: u32 = 500;

/// (namespace, name).
type Key = (String, String);

/// One kind of object as last seen, and whether it has been listed.
#[derive(Debug)]
struct Store<V> {
    objects: HashMap<Key, V>,
    synced: bool,
}

impl<V> Default for Store<V> {
    fn default() -> Store<V> {
        Store { objects: HashMap::new(), synced: false }
    }
}

/// Counts of the API calls the cache made, by kind: what a call on the ADD path costs.
#[derive(Debug, Default)]
pub struct ApiCalls {
    /// List calls (pages) of pods and NADs.
    pub lists: AtomicU64,
    /// Watch calls started.
    pub watches: AtomicU64,
    /// GETs of a pod or NAD the cache did not have (or had with another UID).
    pub gets: AtomicU64,
    /// Patches of a pod's annotation.
    pub patches: AtomicU64,
}

/// The watched copy of this node's pods and of every NAD, usable as an [`ObjectSource`]
/// from any thread that is not a runtime worker (its misses and writes block on `handle`).
pub struct WatchCache {
    client: kube::Client,
    handle: Handle,
    pods: Arc<Mutex<Store<PodInfo>>>,
    nads: Arc<Mutex<Store<Result<NadInfo, String>>>>,
    /// The API calls made so far.
    pub calls: Arc<ApiCalls>,
}

impl std::fmt::Debug for WatchCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (pods, nads) = self.sizes();
        f.debug_struct("WatchCache").field("pods", &pods).field("nads", &nads).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn key_of(meta: &ObjectMeta) -> Key {
    (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

/// A pod as the cache keeps it: what the thin plugin reads of a pod from the API.
fn pod_of(obj: &DynamicObject) -> PodInfo {
    pod_info(&serde_json::to_value(obj).unwrap_or_default())
}

/// Pods as untyped objects: decoded once, by [`pod_info`], as the thin plugin does.
fn pod_resource() -> ApiResource {
    ApiResource::erase::<Pod>(&())
}

fn nad_of(obj: &DynamicObject) -> Result<NadInfo, String> {
    let (ns, name) = key_of(&obj.metadata);
    // The whole object: the resource name is an annotation, the config in `data`.
    let whole = serde_json::to_value(obj).unwrap_or_default();
    nad_info(&whole, &format!("NetworkAttachmentDefinition {ns}/{name}")).map_err(|e| e.to_string())
}

impl WatchCache {
    /// Starts listing and watching on the current runtime: every NAD, and the pods whose
    /// `spec.nodeName` is `node`.
    pub fn start(client: kube::Client, node: &str) -> Arc<WatchCache> {
        let cache = Arc::new(WatchCache {
            client: client.clone(),
            handle: Handle::current(),
            pods: Arc::default(),
            nads: Arc::default(),
            calls: Arc::default(),
        });
        let pods: Api<DynamicObject> = Api::all_with(client.clone(), &pod_resource());
        let selector = format!("spec.nodeName={node}");
        let calls = cache.calls.clone();
        tokio::spawn(follow(
            "pods",
            cache.pods.clone(),
            calls.clone(),
            move |lp: ListParams, wp: Option<(WatchParams, String)>| {
                let pods = pods.clone();
                let selector = selector.clone();
                async move {
                    match wp {
                        None => {
                            let l = pods.list(&lp.fields(&selector)).await?;
                            let next = l.metadata.continue_.clone().filter(|c| !c.is_empty());
                            let rv = l.metadata.resource_version.clone().unwrap_or_default();
                            let items: Vec<(Key, PodInfo)> =
                                l.items.iter().map(|p| (key_of(&p.metadata), pod_of(p))).collect();
                            Ok(Step::Page(items, next, rv))
                        }
                        Some((wp, rv)) => {
                            let s = pods.watch(&wp.fields(&selector), &rv).await?;
                            Ok(Step::Watch(s.map(|e| e.map(|e| event(e, pod_of))).boxed()))
                        }
                    }
                }
            },
        ));
        let nads: Api<DynamicObject> = Api::all_with(client, &nad_resource());
        tokio::spawn(follow(
            "network-attachment-definitions",
            cache.nads.clone(),
            calls,
            move |lp: ListParams, wp: Option<(WatchParams, String)>| {
                let nads = nads.clone();
                async move {
                    match wp {
                        None => {
                            let l = nads.list(&lp).await?;
                            let next = l.metadata.continue_.clone().filter(|c| !c.is_empty());
                            let rv = l.metadata.resource_version.clone().unwrap_or_default();
                            let items = l.items.iter().map(|o| (key_of(&o.metadata), nad_of(o))).collect();
                            Ok(Step::Page(items, next, rv))
                        }
                        Some((wp, rv)) => {
                            let s = nads.watch(&wp, &rv).await?;
                            Ok(Step::Watch(s.map(|e| e.map(|e| event(e, nad_of))).boxed()))
                        }
                    }
                }
            },
        ));
        cache
    }

    /// Whether both kinds have been listed at least once.
    pub fn synced(&self) -> bool {
        lock(&self.pods).synced && lock(&self.nads).synced
    }

    /// What has not been listed yet, for the readiness answer.
    pub fn unsynced(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !lock(&self.pods).synced {
            out.push("pods");
        }
        if !lock(&self.nads).synced {
            out.push("network-attachment-definitions");
        }
        out
    }

    /// Pods and NADs held now.
    pub fn sizes(&self) -> (usize, usize) {
        (lock(&self.pods).objects.len(), lock(&self.nads).objects.len())
    }

    /// Makes sure the copy holds pod `namespace/name` with `uid` (any UID when empty),
    /// reading it from the API server when it does not: the pod of an ADD may be newer
    /// than what the watch has delivered.
    pub async fn refresh_pod(&self, namespace: &str, name: &str, uid: &str) -> Result<(), SourceError> {
        let key = (namespace.to_string(), name.to_string());
        if lock(&self.pods).objects.get(&key).is_some_and(|p| uid.is_empty() || p.uid == uid) {
            return Ok(());
        }
        self.get_pod(namespace, name).await.map(|_| ())
    }

    async fn get_pod(&self, namespace: &str, name: &str) -> Result<Option<PodInfo>, SourceError> {
        self.calls.gets.fetch_add(1, Ordering::Relaxed);
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, &pod_resource());
        let got = api.get_opt(name).await.map_err(|e| kube_err(e, &format!("pod {namespace}/{name}")))?;
        let info = got.as_ref().map(pod_of);
        if let Some(info) = &info {
            lock(&self.pods).objects.insert((namespace.to_string(), name.to_string()), info.clone());
        }
        Ok(info)
    }

    async fn get_nad(&self, namespace: &str, name: &str) -> Result<Option<NadInfo>, SourceError> {
        self.calls.gets.fetch_add(1, Ordering::Relaxed);
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, &nad_resource());
        let what = format!("NetworkAttachmentDefinition {namespace}/{name}");
        let got = api.get_opt(name).await.map_err(|e| kube_err(e, &what))?;
        let Some(obj) = got else { return Ok(None) };
        let info = nad_of(&obj);
        lock(&self.nads).objects.insert((namespace.to_string(), name.to_string()), info.clone());
        info.map(Some).map_err(SourceError::Invalid)
    }
}

impl ObjectSource for WatchCache {
    fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodInfo>, SourceError> {
        let key = (namespace.to_string(), name.to_string());
        if let Some(p) = lock(&self.pods).objects.get(&key) {
            return Ok(Some(p.clone()));
        }
        self.handle.block_on(self.get_pod(namespace, name))
    }

    fn nad(&self, namespace: &str, name: &str) -> Result<Option<NadInfo>, SourceError> {
        let key = (namespace.to_string(), name.to_string());
        {
            let nads = lock(&self.nads);
            if let Some(n) = nads.objects.get(&key) {
                return n.clone().map(Some).map_err(SourceError::Invalid);
            }
            // Listed: missing means missing (a cluster network named by file is looked
            // for as a NAD first, and must cost no API call).
            if nads.synced {
                return Ok(None);
            }
        }
        self.handle.block_on(self.get_nad(namespace, name))
    }

    fn annotate_pod(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), SourceError> {
        self.calls.patches.fetch_add(1, Ordering::Relaxed);
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        // A JSON merge patch: null removes the key.
        let patch = json!({"metadata": {"annotations": {key: value}}});
        self.handle
            .block_on(api.patch_metadata(name, &PatchParams::default(), &Patch::Merge(&patch)))
            .map_err(|e| kube_err(e, &format!("annotating pod {namespace}/{name}")))?;
        Ok(())
    }

    /// Written after the answer, not before: an event is what a pod's describe shows, not
    /// part of its network, and the ADD need not wait for nine API writes. A failure is
    /// logged.
    fn pod_events(&self, events: &[super::source::PodEvent<'_>]) -> Result<(), SourceError> {
        let owned: Vec<(String, String, String, String, String, String)> = events
            .iter()
            .map(|e| {
                let s = |v: &str| v.to_string();
                (s(e.namespace), s(e.name), s(e.uid), s(e.kind), s(e.reason), e.message.clone())
            })
            .collect();
        let client = self.client.clone();
        self.handle.spawn(async move {
            let events: Vec<super::source::PodEvent<'_>> = owned
                .iter()
                .map(|(namespace, name, uid, kind, reason, message)| super::source::PodEvent {
                    namespace,
                    name,
                    uid,
                    kind,
                    reason,
                    message: message.clone(),
                })
                .collect();
            if let Err(e) = super::source::create_events(&client, &events).await {
                tracing::warn!(error = %e, "writing pod events failed");
            }
        });
        Ok(())
    }

    fn resource_claim(&self, namespace: &str, name: &str) -> Result<Option<serde_json::Value>, SourceError> {
        self.handle.block_on(super::source::get_resource_claim(&self.client, namespace, name))
    }

    fn resource_slices(&self, driver: &str) -> Result<Vec<serde_json::Value>, SourceError> {
        self.handle.block_on(super::source::list_resource_slices(&self.client, driver))
    }
}

/// One answer of the API server to a list (a page) or a watch call.
enum Step<V> {
    /// Objects, the continue token, the list's resourceVersion.
    Page(Vec<(Key, V)>, Option<String>, String),
    Watch(BoxStream<'static, kube::Result<Event<V>>>),
}

/// A watch event, decoded.
enum Event<V> {
    Upsert(Key, V, Option<String>),
    Delete(Key, Option<String>),
    Bookmark(String),
    /// The history is gone (410): list anew.
    Gone,
    /// The API server ended the watch with another error.
    Ended(String),
}

fn event<K: kube::Resource, V>(e: WatchEvent<K>, decode: impl Fn(&K) -> V) -> Event<V> {
    match e {
        WatchEvent::Added(o) | WatchEvent::Modified(o) => {
            let meta = o.meta();
            Event::Upsert(key_of(meta), decode(&o), meta.resource_version.clone())
        }
        WatchEvent::Deleted(o) => Event::Delete(key_of(o.meta()), o.meta().resource_version.clone()),
        WatchEvent::Bookmark(b) => Event::Bookmark(b.metadata.resource_version),
        WatchEvent::Error(s) if s.code == 410 => Event::Gone,
        WatchEvent::Error(s) => Event::Ended(format!("{} {}", s.code, s.message)),
    }
}

/// Lists (paged), then watches from the list's resourceVersion, forever: a watch that ends
/// is resumed where it stopped, one whose history is gone lists anew. `call` makes a list
/// call (`None`) or a watch call from a resourceVersion.
async fn follow<V, F, Fut>(what: &'static str, store: Arc<Mutex<Store<V>>>, calls: Arc<ApiCalls>, call: F)
where
    F: Fn(ListParams, Option<(WatchParams, String)>) -> Fut,
    Fut: Future<Output = kube::Result<Step<V>>>,
{
    loop {
        let mut fresh = HashMap::new();
        let mut token: Option<String> = None;
        let version = loop {
            let mut lp = ListParams::default().limit(PAGE);
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            calls.lists.fetch_add(1, Ordering::Relaxed);
            match call(lp, None).await {
                Ok(Step::Page(items, next, rv)) => {
                    fresh.extend(items);
                    match next {
                        Some(t) => token = Some(t),
                        None => break Some(rv),
                    }
                }
                Ok(Step::Watch(_)) => break None,
                Err(e) => {
                    tracing::warn!(kind = what, error = %e, "listing failed; retrying");
                    break None;
                }
            }
        };
        let Some(mut version) = version else {
            tokio::time::sleep(RETRY).await;
            continue;
        };
        {
            let mut s = lock(&store);
            tracing::info!(kind = what, objects = fresh.len(), "listed; watching");
            s.objects = fresh;
            s.synced = true;
        }
        loop {
            calls.watches.fetch_add(1, Ordering::Relaxed);
            let wp = WatchParams::default().timeout(290).disable_bookmarks();
            let mut events = match call(ListParams::default(), Some((wp, version.clone()))).await {
                Ok(Step::Watch(s)) => s,
                Ok(Step::Page(..)) => break,
                Err(e) => {
                    tracing::warn!(kind = what, error = %e, "watching failed; retrying");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            let mut gone = false;
            while let Some(e) = events.next().await {
                let mut s = lock(&store);
                match e {
                    Ok(Event::Upsert(k, v, rv)) => {
                        version = rv.unwrap_or(version);
                        s.objects.insert(k, v);
                    }
                    Ok(Event::Delete(k, rv)) => {
                        version = rv.unwrap_or(version);
                        s.objects.remove(&k);
                    }
                    Ok(Event::Bookmark(rv)) => version = rv,
                    Ok(Event::Gone) => {
                        gone = true;
                        break;
                    }
                    Ok(Event::Ended(m)) => {
                        tracing::debug!(kind = what, error = %m, "the watch ended");
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(kind = what, error = %e, "the watch broke off");
                        break;
                    }
                }
            }
            if gone {
                tracing::info!(kind = what, "the watch's history is gone; listing anew");
                break;
            }
        }
    }
}
