//! A stand-in for the Kubernetes API server, for tests and benchmarks on a machine that has
//! none. It speaks the REST shapes the kube client uses and enforces the rules rust-ipam
//! relies on:
//!
//! - create fails with 409 AlreadyExists when the name is taken;
//! - update (PUT) and merge patch with a `metadata.resourceVersion` fail with 409 Conflict
//!   when it is not the current one; a PUT naming another `metadata.uid` fails too;
//! - delete honours `preconditions` (uid, resourceVersion) with 409 Conflict;
//! - lists are sorted by name and paginated with `limit` and `continue`;
//! - every write bumps one global resourceVersion; objects get a uid and creationTimestamp.
//!
//! It keeps objects of any resource under `/api/v1/namespaces/NS/PLURAL` and
//! `/apis/GROUP/VERSION/namespaces/NS/PLURAL` (coordination.k8s.io Leases included), with a
//! `/status` subresource that only changes `status`. Served over plain HTTP on loopback; a
//! kubeconfig pointing at it comes from [`KubeStandin::kubeconfig`].

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::ops::Bound;
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

    /// The objects of a collection, e.g. `/apis/ipam.rust-ipam.io/v1alpha1/namespaces/ns/ipleases`.
    pub fn objects(&self, collection: &str) -> Vec<Value> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.collections.get(collection).map(|c| c.values().cloned().collect()).unwrap_or_default()
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

fn respond(code: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}

/// A `Status` failure as the API server sends it.
fn failure(code: StatusCode, reason: &str, message: String) -> Response<Full<Bytes>> {
    respond(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// Splits a resource path into (collection, name, subresource).
fn parse_path(path: &str) -> Option<(String, Option<String>, Option<String>)> {
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
    state: &Mutex<State>,
    down: &AtomicBool,
    served: &Served,
) -> Response<Full<Bytes>> {
    served.requests.fetch_add(1, Ordering::Relaxed);
    if down.load(Ordering::SeqCst) {
        return failure(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", "the stand-in is down".into());
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
        return failure(StatusCode::NOT_FOUND, "NotFound", format!("no resource at {}", parts.uri.path()));
    };
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return failure(StatusCode::BAD_REQUEST, "BadRequest", format!("reading the body: {e}")),
    };
    let json_body: Option<Value> = if body.is_empty() { None } else { serde_json::from_slice(&body).ok() };
    if !body.is_empty() && json_body.is_none() {
        return failure(StatusCode::BAD_REQUEST, "BadRequest", "the body is not JSON".into());
    }
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    if parts.method != Method::GET {
        served.writes.fetch_add(1, Ordering::Relaxed);
    }
    let resp = serve(&mut st, &parts.method, &parts.headers, &collection, name, sub, json_body, &query);
    if resp.status() == StatusCode::CONFLICT {
        served.conflicts.fetch_add(1, Ordering::Relaxed);
    }
    resp
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
) -> Response<Full<Bytes>> {
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
        (&Method::GET, None) => {
            let limit: usize =
                query.get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
            let after = query.get("continue").cloned().unwrap_or_default();
            let empty = Objects::new();
            let objects = st.collections.get(collection).unwrap_or(&empty);
            let rest = |from: &str| -> Box<dyn Iterator<Item = (&String, &Value)> + '_> {
                if from.is_empty() {
                    Box::new(objects.iter())
                } else {
                    Box::new(objects.range::<str, _>((Bound::Excluded(from), Bound::Unbounded)))
                }
            };
            let items: Vec<Value> = rest(&after).take(limit).map(|(_, v)| v.clone()).collect();
            let last =
                items.last().and_then(|i| i["metadata"]["name"].as_str()).unwrap_or_default().to_string();
            let more = items.len() == limit && rest(&last).next().is_some();
            let (api_version, kind) = st.kinds.get(collection).cloned().unwrap_or_default();
            let mut meta = json!({"resourceVersion": st.resource_version.to_string()});
            if more {
                meta["continue"] = json!(last);
            }
            respond(
                StatusCode::OK,
                &json!({"apiVersion": api_version, "kind": format!("{kind}List"), "metadata": meta, "items": items}),
            )
        }
        (&Method::GET, Some(n)) => match st.collections.get(collection).and_then(|c| c.get(&n)) {
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
}
