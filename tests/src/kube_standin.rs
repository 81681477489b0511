//! A stand-in for the Kubernetes API server, for tests and benchmarks on a machine that has
//! none. It speaks the REST shapes the kube client uses and enforces the rules rust-ipam
//! relies on:
//!
//! - create fails with 409 AlreadyExists when the name is taken;
//! - update (PUT) and merge patch with a `metadata.resourceVersion` fail with 409 Conflict
//!   when it is not the current one; a PUT naming another `metadata.uid` fails too;
//! - delete honours `preconditions` (uid, resourceVersion) with 409 Conflict;
//! - lists are sorted by name (by namespace then name across namespaces) and paginated with
//!   `limit` and `continue`; every page of one list comes from the snapshot its first page
//!   was taken from, and a `continue` token that is no longer kept gets 410 Expired;
//! - every write bumps one global resourceVersion; objects get a uid and creationTimestamp;
//! - an `Accept` of `as=PartialObjectMetadata` / `as=PartialObjectMetadataList` gets only
//!   the objects' metadata, as kube's `get_metadata` / `list_metadata` ask;
//! - pods need a DNS-1123 subdomain name and `spec.containers`.
//!
//! It keeps objects of any resource under `/api/v1/namespaces/NS/PLURAL` and
//! `/apis/GROUP/VERSION/namespaces/NS/PLURAL` (coordination.k8s.io Leases included), with a
//! `/status` subresource that only changes `status`, and lists a resource across every
//! namespace at `/api/v1/PLURAL` and `/apis/GROUP/VERSION/PLURAL`. Tests create and delete
//! pods with [`KubeStandin::create_pod`] and [`KubeStandin::delete_pod`], and can hold the
//! answer to a list at a point they choose with [`KubeStandin::hold_next_list`], or have
//! creates answered with a timeout and applied later ([`KubeStandin::answer_creates_late`]).
//! Served over
//! plain HTTP on loopback; a kubeconfig pointing at it comes from [`KubeStandin::kubeconfig`].

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

type Objects = BTreeMap<String, Value>;

#[derive(Debug, Default)]
struct State {
    /// Collection path (up to the plural) -> name -> object.
    collections: HashMap<String, Objects>,
    /// Kind of the objects of each collection, learned from what was created.
    kinds: HashMap<String, (String, String)>,
    resource_version: u64,
    /// What later pages of a paginated list are served from: id -> (resourceVersion, items).
    snapshots: BTreeMap<u64, (u64, Vec<Value>)>,
    next_snapshot: u64,
    /// Lists (by request path) whose answer waits for the test.
    holds: HashMap<String, PendingHold>,
    /// Creates still to answer with a timeout and apply late, and how late.
    late_creates: (usize, Duration),
}

/// Snapshots of paginated lists kept at once; older continue tokens expire (410).
const SNAPSHOTS: usize = 64;

#[derive(Debug)]
struct PendingHold {
    reached: tokio::sync::oneshot::Sender<()>,
    release: tokio::sync::oneshot::Receiver<()>,
}

/// A list answer held back by [`KubeStandin::hold_next_list`].
#[derive(Debug)]
pub struct ListHold {
    reached: Option<tokio::sync::oneshot::Receiver<()>>,
    release: tokio::sync::oneshot::Sender<()>,
}

impl ListHold {
    /// Resolves once the list was asked for and its answer computed (and held).
    pub async fn reached(&mut self) -> anyhow::Result<()> {
        match self.reached.take() {
            Some(r) => r.await.context("the stand-in dropped the hold"),
            None => Ok(()),
        }
    }

    /// Sends the held answer.
    pub fn release(self) {
        let _ = self.release.send(());
    }
}

/// Counters of what the stand-in served.
#[derive(Debug, Default)]
pub struct Served {
    pub requests: AtomicU64,
    pub writes: AtomicU64,
    pub conflicts: AtomicU64,
}

/// A running stand-in; it stops when dropped.
#[derive(Debug)]
pub struct KubeStandin {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    state: Arc<Mutex<State>>,
    /// While true every request gets 503, as from an API server that is down.
    down: Arc<AtomicBool>,
    /// Counters.
    pub served: Arc<Served>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KubeStandin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KubeStandin {
    /// Starts serving on a free loopback port, on the current tokio runtime.
    pub async fn start() -> anyhow::Result<KubeStandin> {
        KubeStandin::start_with_latency(Duration::ZERO).await
    }

    /// As [`KubeStandin::start`], answering each request after `latency` (an API server
    /// across a network and etcd's commit, for benchmarks).
    pub async fn start_with_latency(latency: Duration) -> anyhow::Result<KubeStandin> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the stand-in")?;
        let url = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(Mutex::new(State::default()));
        let down = Arc::new(AtomicBool::new(false));
        let served = Arc::new(Served::default());
        let (s, d, c) = (state.clone(), down.clone(), served.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (s, d, c) = (s.clone(), d.clone(), c.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (s, d, c) = (s.clone(), d.clone(), c.clone());
                        async move {
                            if !latency.is_zero() {
                                tokio::time::sleep(latency).await;
                            }
                            Ok::<_, Infallible>(handle(req, &s, &d, &c).await)
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    // A client that hangs up mid-request is its own business.
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                });
            }
        });
        Ok(KubeStandin { url, state, down, served, task })
    }

    /// Writes a kubeconfig for this stand-in to `path`, with `namespace` as the default.
    pub fn kubeconfig(&self, path: &Path, namespace: &str) -> anyhow::Result<()> {
        let cfg = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "standin", "user": {"token": "standin"}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin", "namespace": namespace}}],
            "current-context": "standin",
        });
        std::fs::write(path, serde_json::to_vec_pretty(&cfg)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Makes every request fail with 503 (true) or be served again (false).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Answers the next `count` creates with 504 Timeout at once and applies each one
    /// `after` later (refused then, unanswered, if its name was taken meanwhile): an API
    /// server whose request timeout fired while etcd still committed the write. A real
    /// server shows this only by chance.
    pub fn answer_creates_late(&self, count: usize, after: Duration) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).late_creates = (count, after);
    }

    /// The objects of a collection, e.g. `/apis/ipam.rust-ipam.io/v1alpha1/namespaces/ns/ipleases`.
    pub fn objects(&self, collection: &str) -> Vec<Value> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.collections.get(collection).map(|c| c.values().cloned().collect()).unwrap_or_default()
    }

    /// Creates pod `namespace/name` as the API server would (a fresh uid, its
    /// creationTimestamp) and returns its uid.
    pub fn create_pod(&self, namespace: &str, name: &str) -> anyhow::Result<String> {
        let body = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]},
        });
        let collection = format!("/api/v1/namespaces/{namespace}/pods");
        let created = self.call(Method::POST, &collection, None, Some(body))?;
        created["metadata"]["uid"].as_str().map(str::to_string).context("the created pod has no uid")
    }

    /// Deletes pod `namespace/name` at once (as with a zero grace period).
    pub fn delete_pod(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        let collection = format!("/api/v1/namespaces/{namespace}/pods");
        self.call(Method::DELETE, &collection, Some(name.to_string()), None).map(drop)
    }

    /// Holds the answer to the next GET of the list at `path` (e.g. `/api/v1/pods`): it is
    /// computed when asked for, then sent only once the hold is released, so a test can
    /// change objects between a client's list and what it does next.
    pub fn hold_next_list(&self, path: &str) -> ListHold {
        let (reached_tx, reached_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.holds.insert(path.to_string(), PendingHold { reached: reached_tx, release: release_rx });
        ListHold { reached: Some(reached_rx), release: release_tx }
    }

    /// One request served as if it came over HTTP; the object, or the failure's message.
    fn call(
        &self,
        method: Method,
        collection: &str,
        name: Option<String>,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let headers = hyper::HeaderMap::new();
        let resp = serve(&mut st, &method, &headers, collection, name, None, body, &HashMap::new());
        if !resp.status.is_success() {
            anyhow::bail!("{method} {collection}: {}", resp.body["message"]);
        }
        Ok(resp.body)
    }

    /// Stores `object` as it is (no validation, a fresh uid and resourceVersion): what
    /// `kubectl edit` of a careless operator would leave behind.
    pub fn put_raw(&self, collection: &str, mut object: Value) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.resource_version += 1;
        let rv = st.resource_version;
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object["metadata"]["uid"] = json!(format!("uid-{rv}"));
        st.collections.entry(collection.to_string()).or_default().insert(name, object);
    }
}

/// An answer before it is sent.
struct Reply {
    status: StatusCode,
    body: Value,
}

impl Reply {
    fn http(&self) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(Bytes::from(self.body.to_string())));
        *r.status_mut() = self.status;
        r.headers_mut()
            .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
        r
    }
}

fn respond(code: StatusCode, body: &Value) -> Reply {
    Reply { status: code, body: body.clone() }
}

/// A `Status` failure as the API server sends it.
fn failure(code: StatusCode, reason: &str, message: String) -> Reply {
    respond(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// Splits a resource path into (collection, name, subresource).
fn parse_path(path: &str) -> Option<(String, Option<String>, Option<String>)> {
    if cluster_wide(path).is_some() {
        return Some((path.trim_end_matches('/').to_string(), None, None));
    }
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    // api/v1/namespaces/NS/PLURAL or apis/G/V/namespaces/NS/PLURAL
    let base = match segs.first() {
        Some(&"api") => 5,
        Some(&"apis") => 6,
        _ => return None,
    };
    if segs.len() < base || segs[base - 3] != "namespaces" {
        return None;
    }
    let collection = format!("/{}", segs[..base].join("/"));
    let name = segs.get(base).map(|s| s.to_string());
    let sub = segs.get(base + 1).map(|s| s.to_string());
    if segs.len() > base + 2 {
        return None;
    }
    Some((collection, name, sub))
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("made an object above");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

async fn handle(
    req: Request<Incoming>,
    state: &Arc<Mutex<State>>,
    down: &AtomicBool,
    served: &Served,
) -> Response<Full<Bytes>> {
    served.requests.fetch_add(1, Ordering::Relaxed);
    if down.load(Ordering::SeqCst) {
        return failure(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", "the stand-in is down".into())
            .http();
    }
    let (parts, body) = req.into_parts();
    let query: HashMap<String, String> = parts
        .uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%2F", "/")))
        .collect();
    let Some((collection, name, sub)) = parse_path(parts.uri.path()) else {
        return failure(StatusCode::NOT_FOUND, "NotFound", format!("no resource at {}", parts.uri.path()))
            .http();
    };
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return failure(StatusCode::BAD_REQUEST, "BadRequest", format!("reading the body: {e}")).http();
        }
    };
    let json_body: Option<Value> = if body.is_empty() { None } else { serde_json::from_slice(&body).ok() };
    if !body.is_empty() && json_body.is_none() {
        return failure(StatusCode::BAD_REQUEST, "BadRequest", "the body is not JSON".into()).http();
    }
    if parts.method == Method::POST && name.is_none() && sub.is_none() {
        let late = {
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            match st.late_creates {
                (n, after) if n > 0 => {
                    st.late_creates.0 -= 1;
                    Some(after)
                }
                _ => None,
            }
        };
        if let Some(after) = late {
            let (state, headers) = (state.clone(), parts.headers.clone());
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                serve(&mut st, &Method::POST, &headers, &collection, None, None, json_body, &query);
            });
            let why = "Timeout: request did not complete within requested timeout".to_string();
            return failure(StatusCode::GATEWAY_TIMEOUT, "Timeout", why).http();
        }
    }
    let is_list = parts.method == Method::GET && name.is_none();
    let (resp, hold) = {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        if parts.method != Method::GET {
            served.writes.fetch_add(1, Ordering::Relaxed);
        }
        let resp = serve(&mut st, &parts.method, &parts.headers, &collection, name, sub, json_body, &query);
        let hold = if is_list { st.holds.remove(parts.uri.path()) } else { None };
        (resp, hold)
    };
    if resp.status == StatusCode::CONFLICT {
        served.conflicts.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(h) = hold {
        let _ = h.reached.send(());
        // A dropped hold releases too.
        let _ = h.release.await;
    }
    resp.http()
}

#[allow(clippy::too_many_arguments)]
fn serve(
    st: &mut State,
    method: &Method,
    headers: &hyper::HeaderMap,
    collection: &str,
    name: Option<String>,
    sub: Option<String>,
    body: Option<Value>,
    query: &HashMap<String, String>,
) -> Reply {
    let not_found =
        |n: &str| failure(StatusCode::NOT_FOUND, "NotFound", format!("{collection}/{n} not found"));
    let conflict = |n: &str, why: &str| {
        failure(
            StatusCode::CONFLICT,
            "Conflict",
            format!("Operation cannot be fulfilled on {collection}/{n}: {why}"),
        )
    };
    let status_only = sub.as_deref() == Some("status");
    if sub.is_some() && !status_only {
        return failure(StatusCode::NOT_FOUND, "NotFound", format!("no subresource {sub:?}"));
    }
    match (method, name) {
        (&Method::GET, None) => list(st, collection, query, metadata_only(headers)),
        (_, _) if cluster_wide(collection).is_some() => failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} on {collection}: only lists are served across namespaces"),
        ),
        (&Method::GET, Some(n)) => match st.collections.get(collection).and_then(|c| c.get(&n)) {
            Some(o) if metadata_only(headers) => respond(StatusCode::OK, &partial(o)),
            Some(o) => respond(StatusCode::OK, o),
            None => not_found(&n),
        },
        (&Method::POST, None) => {
            let Some(mut obj) = body else {
                return failure(StatusCode::BAD_REQUEST, "BadRequest", "create needs a body".into());
            };
            let Some(n) = obj["metadata"]["name"].as_str().filter(|n| !n.is_empty()).map(str::to_string)
            else {
                return failure(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.name: Required value".into(),
                );
            };
            if let Some(invalid) = check_pod(collection, &n, &obj) {
                return failure(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", invalid);
            }
            if st.collections.get(collection).is_some_and(|c| c.contains_key(&n)) {
                return failure(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("{collection}/{n} already exists"),
                );
            }
            st.resource_version += 1;
            let rv = st.resource_version;
            let ns = collection.split('/').rev().nth(1).unwrap_or_default().to_string();
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            obj["metadata"]["uid"] = json!(format!("uid-{rv}"));
            obj["metadata"]["namespace"] = json!(ns);
            obj["metadata"]["creationTimestamp"] = json!(now_rfc3339());
            let kind = (
                obj["apiVersion"].as_str().unwrap_or_default().to_string(),
                obj["kind"].as_str().unwrap_or_default().to_string(),
            );
            st.kinds.insert(collection.to_string(), kind);
            st.collections.entry(collection.to_string()).or_default().insert(n, obj.clone());
            respond(StatusCode::CREATED, &obj)
        }
        (&Method::PUT, Some(n)) | (&Method::PATCH, Some(n)) => {
            let Some(patch) = body else {
                return failure(StatusCode::BAD_REQUEST, "BadRequest", "update needs a body".into());
            };
            let is_patch = method == Method::PATCH;
            if is_patch {
                let ct = headers
                    .get(hyper::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if ct != "application/merge-patch+json" {
                    return failure(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UnsupportedMediaType",
                        format!("the stand-in takes merge patches only, not {ct}"),
                    );
                }
            }
            let next_rv = st.resource_version + 1;
            let Some(current) = st.collections.get_mut(collection).and_then(|c| c.get_mut(&n)) else {
                return not_found(&n);
            };
            if let Some(rv) = patch["metadata"]["resourceVersion"].as_str()
                && Some(rv) != current["metadata"]["resourceVersion"].as_str()
            {
                return conflict(
                    &n,
                    "the object has been modified; please apply your changes to the latest version and try again",
                );
            }
            if !is_patch
                && let Some(uid) = patch["metadata"]["uid"].as_str()
                && Some(uid) != current["metadata"]["uid"].as_str()
            {
                return conflict(&n, &format!("Precondition failed: UID in object meta: {uid}"));
            }
            let mut next = current.clone();
            match (status_only, is_patch) {
                (true, true) => merge(&mut next["status"], &patch["status"]),
                (true, false) => next["status"] = patch["status"].clone(),
                (false, true) => merge(&mut next, &patch),
                (false, false) => {
                    let keep = next["metadata"].clone();
                    next = patch;
                    for k in ["uid", "creationTimestamp", "namespace"] {
                        next["metadata"][k] = keep[k].clone();
                    }
                }
            }
            next["metadata"]["name"] = json!(n);
            next["metadata"]["resourceVersion"] = json!(next_rv.to_string());
            *current = next.clone();
            st.resource_version = next_rv;
            respond(StatusCode::OK, &next)
        }
        (&Method::DELETE, Some(n)) => {
            let Some(current) = st.collections.get(collection).and_then(|c| c.get(&n)) else {
                return not_found(&n);
            };
            let pre = body.as_ref().map(|b| &b["preconditions"]);
            if let Some(uid) = pre.and_then(|p| p["uid"].as_str())
                && Some(uid) != current["metadata"]["uid"].as_str()
            {
                return conflict(
                    &n,
                    &format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        current["metadata"]["uid"]
                    ),
                );
            }
            if let Some(rv) = pre.and_then(|p| p["resourceVersion"].as_str())
                && Some(rv) != current["metadata"]["resourceVersion"].as_str()
            {
                return conflict(
                    &n,
                    &format!(
                        "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                        current["metadata"]["resourceVersion"]
                    ),
                );
            }
            st.resource_version += 1;
            let gone = st.collections.get_mut(collection).and_then(|c| c.remove(&n)).unwrap_or_default();
            respond(StatusCode::OK, &gone)
        }
        (m, n) => failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{m} on {collection}/{}", n.unwrap_or_default()),
        ),
    }
}

/// For `/api/v1/PLURAL` or `/apis/GROUP/VERSION/PLURAL` (a list across namespaces): the
/// prefix and suffix of the namespaced collections it covers.
fn cluster_wide(collection: &str) -> Option<(String, String)> {
    let segs: Vec<&str> = collection.trim_matches('/').split('/').collect();
    let base = match (segs.first(), segs.len()) {
        (Some(&"api"), 3) => 2,
        (Some(&"apis"), 4) => 3,
        _ => return None,
    };
    Some((format!("/{}/namespaces/", segs[..base].join("/")), format!("/{}", segs[base])))
}

/// Whether the client asked for metadata only (kube's `get_metadata`, `list_metadata`).
fn metadata_only(headers: &hyper::HeaderMap) -> bool {
    headers
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"))
}

/// An object as a `PartialObjectMetadata`.
fn partial(o: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": o["metadata"]})
}

/// Why a pod may not be created, as the API server says it (`None`: it may).
fn check_pod(collection: &str, name: &str, obj: &Value) -> Option<String> {
    if !(collection.starts_with("/api/v1/namespaces/") && collection.ends_with("/pods")) {
        return None;
    }
    let dns_label = |l: &str| {
        !l.is_empty()
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() > 253 || !name.split('.').all(dns_label) {
        return Some(format!(
            "Pod \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
        ));
    }
    if obj["spec"]["containers"].as_array().is_none_or(|c| c.is_empty()) {
        return Some(format!("Pod \"{name}\" is invalid: spec.containers: Required value"));
    }
    None
}

/// A list, paginated: the first page reads the current objects and, when more pages
/// follow, keeps them as a snapshot that the `continue` token names.
fn list(st: &mut State, collection: &str, query: &HashMap<String, String>, metadata: bool) -> Reply {
    let limit: usize =
        query.get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
    let token = query.get("continue").filter(|t| !t.is_empty());
    let (snapshot, offset): (Option<u64>, usize) = match token {
        None => (None, 0),
        Some(t) => {
            let parsed =
                t.split_once('-').and_then(|(id, off)| Some((id.parse::<u64>().ok()?, off.parse().ok()?)));
            match parsed {
                Some((id, off)) if st.snapshots.contains_key(&id) => (Some(id), off),
                Some(_) => {
                    return failure(
                        StatusCode::GONE,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.".into(),
                    );
                }
                None => {
                    return failure(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        format!("invalid continue token {t:?}"),
                    );
                }
            }
        }
    };
    let (rv, items) = match snapshot {
        Some(id) => st.snapshots[&id].clone(),
        None => {
            let items: Vec<Value> = match cluster_wide(collection) {
                Some((prefix, suffix)) => {
                    // By namespace, then name: the order of the keys in etcd.
                    let mut all: Vec<(&str, &String, &Value)> = st
                        .collections
                        .iter()
                        .filter_map(|(c, objs)| {
                            let ns = c.strip_prefix(&prefix)?.strip_suffix(&suffix)?;
                            (!ns.contains('/')).then_some((ns, objs))
                        })
                        .flat_map(|(ns, objs)| objs.iter().map(move |(name, o)| (ns, name, o)))
                        .collect();
                    all.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
                    all.into_iter().map(|(_, _, o)| o.clone()).collect()
                }
                None => {
                    st.collections.get(collection).map(|c| c.values().cloned().collect()).unwrap_or_default()
                }
            };
            (st.resource_version, items)
        }
    };
    let end = offset.saturating_add(limit).min(items.len());
    let page: Vec<Value> = items.get(offset..end).unwrap_or_default().to_vec();
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if end < items.len() {
        let id = match snapshot {
            Some(id) => id,
            None => {
                st.next_snapshot += 1;
                let id = st.next_snapshot;
                st.snapshots.insert(id, (rv, items));
                while st.snapshots.len() > SNAPSHOTS {
                    st.snapshots.pop_first();
                }
                id
            }
        };
        meta["continue"] = json!(format!("{id}-{end}"));
    } else if let Some(id) = snapshot {
        st.snapshots.remove(&id);
    }
    let kind_of = |c: &str| st.kinds.get(c).cloned();
    let (api_version, kind) = match cluster_wide(collection) {
        Some((prefix, suffix)) => st
            .kinds
            .iter()
            .find(|(c, _)| c.starts_with(&prefix) && c.ends_with(&suffix))
            .map(|(_, k)| k.clone())
            .unwrap_or_default(),
        None => kind_of(collection).unwrap_or_default(),
    };
    if metadata {
        let items: Vec<Value> = page.iter().map(partial).collect();
        return respond(
            StatusCode::OK,
            &json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": meta, "items": items}),
        );
    }
    respond(
        StatusCode::OK,
        &json!({"apiVersion": api_version, "kind": format!("{kind}List"), "metadata": meta, "items": page}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_merge_and_dates() {
        assert_eq!(
            parse_path("/apis/ipam.rust-ipam.io/v1alpha1/namespaces/ns/ipleases/10.0.0.1/status"),
            Some((
                "/apis/ipam.rust-ipam.io/v1alpha1/namespaces/ns/ipleases".into(),
                Some("10.0.0.1".into()),
                Some("status".into())
            ))
        );
        assert_eq!(
            parse_path("/api/v1/namespaces/default/pods"),
            Some(("/api/v1/namespaces/default/pods".into(), None, None))
        );
        assert_eq!(parse_path("/version"), None);
        let mut v = json!({"a": {"b": 1, "c": 2}, "d": 3});
        merge(&mut v, &json!({"a": {"b": null, "e": 5}, "d": [1]}));
        assert_eq!(v, json!({"a": {"c": 2, "e": 5}, "d": [1]}));
        let d = now_rfc3339();
        assert!(d.len() == 20 && d.starts_with("20") && d.ends_with('Z'), "{d}");
    }

    fn get(st: &mut State, path: &str, query: &[(&str, &str)], metadata: bool) -> Reply {
        let mut headers = hyper::HeaderMap::new();
        if metadata {
            headers.insert(
                hyper::header::ACCEPT,
                hyper::header::HeaderValue::from_static(
                    "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
                ),
            );
        }
        let (collection, name, sub) = parse_path(path).expect("path");
        let query = query.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        serve(st, &Method::GET, &headers, &collection, name, sub, None, &query)
    }

    fn pod(st: &mut State, ns: &str, name: &str, containers: Value) -> Reply {
        let body = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                          "spec": {"containers": containers}});
        let collection = format!("/api/v1/namespaces/{ns}/pods");
        serve(
            st,
            &Method::POST,
            &hyper::HeaderMap::new(),
            &collection,
            None,
            None,
            Some(body),
            &HashMap::new(),
        )
    }

    fn names(r: &Reply) -> Vec<String> {
        r.body["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| {
                format!(
                    "{}/{}",
                    i["metadata"]["namespace"].as_str().unwrap_or("?"),
                    i["metadata"]["name"].as_str().unwrap_or("?")
                )
            })
            .collect()
    }

    #[test]
    fn pods_across_namespaces_paged_from_one_snapshot_and_metadata_only() {
        let mut st = State::default();
        let containers = json!([{"name": "app", "image": "pause"}]);
        for (ns, name) in [("b", "web-1"), ("a", "web-2"), ("b", "db-0"), ("a", "api")] {
            let r = pod(&mut st, ns, name, containers.clone());
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
            assert!(r.body["metadata"]["uid"].as_str().is_some_and(|u| !u.is_empty()));
        }
        let bad = pod(&mut st, "a", "Web_1", containers.clone());
        assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            bad.body["message"]
                .as_str()
                .expect("message")
                .starts_with("Pod \"Web_1\" is invalid: metadata.name")
        );
        let empty = pod(&mut st, "a", "web-3", json!([]));
        assert_eq!(empty.body["message"], "Pod \"web-3\" is invalid: spec.containers: Required value");

        // Across namespaces, by namespace then name, two per page.
        let first = get(&mut st, "/api/v1/pods", &[("limit", "2")], true);
        assert_eq!(first.status, StatusCode::OK);
        assert_eq!(names(&first), ["a/api", "a/web-2"]);
        assert_eq!(first.body["kind"], "PartialObjectMetadataList");
        assert_eq!(first.body["items"][0]["kind"], "PartialObjectMetadata");
        assert!(first.body["items"][0].get("spec").is_none(), "metadata only");
        let token = first.body["metadata"]["continue"].as_str().expect("continue").to_string();
        // A pod created meanwhile is not in the rest of this list (one snapshot)...
        pod(&mut st, "a", "zzz", containers.clone());
        let second = get(&mut st, "/api/v1/pods", &[("limit", "2"), ("continue", &token)], false);
        assert_eq!(names(&second), ["b/db-0", "b/web-1"]);
        assert_eq!(second.body["kind"], "PodList");
        assert!(second.body["metadata"].get("continue").is_none());
        // ...but in the next one; and a finished list's token is gone.
        assert_eq!(names(&get(&mut st, "/api/v1/pods", &[], false)).len(), 5);
        let expired = get(&mut st, "/api/v1/pods", &[("limit", "2"), ("continue", &token)], false);
        assert_eq!(expired.status, StatusCode::GONE);
        assert_eq!(expired.body["reason"], "Expired");
        // One pod, metadata only.
        let one = get(&mut st, "/api/v1/namespaces/b/pods/db-0", &[], true);
        assert_eq!(one.body["kind"], "PartialObjectMetadata");
        assert_eq!(one.body["metadata"]["name"], "db-0");
        // Across namespaces is read-only.
        let del = serve(
            &mut st,
            &Method::DELETE,
            &hyper::HeaderMap::new(),
            "/api/v1/pods",
            Some("x".into()),
            None,
            None,
            &HashMap::new(),
        );
        assert_eq!(del.status, StatusCode::METHOD_NOT_ALLOWED);
    }
}
