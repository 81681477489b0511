//! `rust-multus-daemon`: answers the CNI calls the shim forwards ([`super::thick`]) with the
//! thin plugin's own code ([`super::plugin::call`]), reading Pods and NADs from a watch
//! cache ([`super::watch::WatchCache`]) instead of the API server.
//!
//! Guarantees:
//! - At most `max_calls` calls run at once; a call waits for a slot at most `queue_timeout`
//!   and is then refused with CNI error 11 saying so (the runtime retries), so a burst of
//!   pods queues instead of exhausting the node's memory.
//! - The daemon owns one path: its socket. A stale socket file at that exact path is
//!   replaced; anything else there, or a socket another daemon still answers on, stops the
//!   start with an error. The directory is never cleaned.
//! - SIGTERM: the socket is removed first (a shim then retries until the next daemon
//!   binds it), then calls in flight finish, up to a grace period.
//! - Readiness (`/readyz`) is the caches having listed once; `/metrics` counts calls by
//!   verb and result, their latency, calls running and waiting, the cache sizes and the
//!   API calls the cache made.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cni::{CniError, Env, ErrorCode, Output};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request as HttpRequest, Response as HttpResponse, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::Semaphore;

use super::source::SharedSource;
use super::thick::{MAX_MESSAGE, Request, Response, effective_config};
use super::watch::WatchCache;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerbResult {
    verb: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Verb {
    verb: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
}

/// The daemon's metrics (`rust_multus_*`).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    calls: Family<VerbResult, Counter>,
    seconds: Family<Verb, Histogram>,
    in_flight: Gauge,
    waiting: Gauge,
    cache_objects: Family<Kind, Gauge>,
    api_calls: Family<Kind, Gauge>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("rust_multus"),
            calls: Family::default(),
            seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 16))),
            in_flight: Gauge::default(),
            waiting: Gauge::default(),
            cache_objects: Family::default(),
            api_calls: Family::default(),
        };
        let r = &mut m.registry;
        r.register("calls", "CNI calls answered, by verb and result (ok, error, busy)", m.calls.clone());
        r.register(
            "call_seconds",
            "Time to answer a CNI call, waiting for a slot included",
            m.seconds.clone(),
        );
        r.register("calls_in_flight", "CNI calls running now", m.in_flight.clone());
        r.register("calls_waiting", "CNI calls waiting for a slot", m.waiting.clone());
        r.register(
            "cache_objects",
            "Objects in the watch cache, by kind (pods, nads)",
            m.cache_objects.clone(),
        );
        r.register(
            "api_calls",
            "Calls to the API server since start, by kind (list, watch, get, patch)",
            m.api_calls.clone(),
        );
        m
    }

    fn render(&self, cache: Option<&WatchCache>) -> String {
        if let Some(c) = cache {
            let (pods, nads) = c.sizes();
            self.cache_objects.get_or_create(&Kind { kind: "pods" }).set(pods as i64);
            self.cache_objects.get_or_create(&Kind { kind: "nads" }).set(nads as i64);
            for (kind, n) in [
                ("list", &c.calls.lists),
                ("watch", &c.calls.watches),
                ("get", &c.calls.gets),
                ("patch", &c.calls.patches),
            ] {
                self.api_calls.get_or_create(&Kind { kind }).set(n.load(Ordering::Relaxed) as i64);
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// How the daemon answers calls.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The daemon's rust-multus config, under the node's CNI config
    /// ([`effective_config`]); `None`: the node's config is used alone.
    pub base_config: Option<Map<String, Value>>,
    /// Calls running at once.
    pub max_calls: usize,
    /// How long a call waits for a slot before it is refused.
    pub queue_timeout: Duration,
}

/// The daemon's state: settings, the cache, the slots, the metrics.
#[derive(Debug)]
pub struct Daemon {
    settings: Settings,
    cache: Option<Arc<WatchCache>>,
    slots: Arc<Semaphore>,
    metrics: Metrics,
}

impl Daemon {
    /// A daemon reading Pods and NADs from `cache` (`None`: from what each call's config
    /// names, as the thin plugin does; for tests and clusterless use).
    pub fn new(settings: Settings, cache: Option<Arc<WatchCache>>) -> Arc<Daemon> {
        let slots = Arc::new(Semaphore::new(settings.max_calls.max(1)));
        Arc::new(Daemon { settings, cache, slots, metrics: Metrics::new() })
    }

    /// Whether calls can be answered from the cache, and what is missing when not.
    pub fn ready(&self) -> Result<(), String> {
        match &self.cache {
            Some(c) if !c.synced() => Err(format!("not listed yet: {}", c.unsynced().join(", "))),
            _ => Ok(()),
        }
    }

    /// The Prometheus text of the metrics.
    pub fn metrics_text(&self) -> String {
        self.metrics.render(self.cache.as_deref())
    }

    /// Answers one call: waits for a slot, then runs it on a blocking thread.
    pub async fn answer(self: &Arc<Daemon>, req: Request) -> Response {
        let started = Instant::now();
        let verb = req.command().map_or("unknown", |c| c.name());
        let version = || cni::LATEST_VERSION.to_string();
        let stdin = match req.stdin() {
            Ok(s) => s,
            Err(e) => return self.count(verb, "error", started, Output::error(&e, &version())),
        };
        let stdin = effective_config(self.settings.base_config.as_ref(), &stdin);
        let asked = serde_json::from_slice::<Value>(&stdin)
            .ok()
            .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(version);
        self.metrics.waiting.inc();
        let permit =
            tokio::time::timeout(self.settings.queue_timeout, self.slots.clone().acquire_owned()).await;
        self.metrics.waiting.dec();
        let Ok(Ok(permit)) = permit else {
            let e = CniError::new(
                ErrorCode::TRY_AGAIN_LATER,
                format!(
                    "rust-multus daemon is busy: {} calls running, this one waited {:.1} s for a slot",
                    self.settings.max_calls,
                    self.settings.queue_timeout.as_secs_f64()
                ),
            );
            return self.count(verb, "busy", started, Output::error(&e, &asked));
        };
        self.metrics.in_flight.inc();
        let env = Env::from_env(|k| req.env.get(k).cloned());
        if let (Ok(env), Some(cache)) = (&env, &self.cache)
            && env.command == cni::Command::Add
            && let Ok(args) = env.cni_args()
            && !args.get("K8S_POD_NAME").is_empty()
            && let Err(e) = cache
                .refresh_pod(args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME"), args.get("K8S_POD_UID"))
                .await
        {
            // The plugin reads the pod again and reports what it finds.
            tracing::debug!(error = %e, "reading the pod of an ADD");
        }
        let source = self.cache.clone().map(|c| SharedSource(c as _));
        let out = tokio::task::spawn_blocking(move || match env {
            Ok(env) => super::plugin::call(&env, &stdin, source),
            Err(e) => Output::error(&e, &asked),
        })
        .await
        .unwrap_or_else(|e| {
            Output::error(&CniError::new(ErrorCode::IO_FAILURE, format!("the call failed: {e}")), &version())
        });
        self.metrics.in_flight.dec();
        drop(permit);
        let result = if out.success { "ok" } else { "error" };
        let container = req.env.get("CNI_CONTAINERID").map_or("", String::as_str);
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        match (&out.stdout, out.success) {
            (Some(answer), false) => tracing::warn!(verb, container, ms, %answer, "call failed"),
            _ => tracing::debug!(verb, container, ms, "call answered"),
        }
        self.count(verb, result, started, out)
    }

    fn count(&self, verb: &'static str, result: &'static str, started: Instant, out: Output) -> Response {
        self.metrics.calls.get_or_create(&VerbResult { verb, result }).inc();
        self.metrics.seconds.get_or_create(&Verb { verb }).observe(started.elapsed().as_secs_f64());
        out.into()
    }
}

/// Binds the daemon's socket at `path`, mode 0600, making its directory when missing.
/// A socket file left by a daemon that is gone is replaced; one that still answers, or a
/// file of another type, is an error and nothing is touched.
pub async fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{}: another daemon answers on this socket", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{}: exists and is not a socket; not removing it", path.display()),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Reads one request from a connection, answers it, closes.
async fn connection(daemon: Arc<Daemon>, mut conn: UnixStream) {
    let mut buf = Vec::new();
    let read = (&mut conn).take(MAX_MESSAGE + 1).read_to_end(&mut buf).await;
    let resp = match read {
        Err(e) => {
            tracing::debug!(error = %e, "reading a call");
            return;
        }
        Ok(_) if buf.len() as u64 > MAX_MESSAGE => Output::error(
            &CniError::new(ErrorCode::DECODE, format!("the call is larger than {MAX_MESSAGE} bytes")),
            &cni::LATEST_VERSION.to_string(),
        )
        .into(),
        Ok(_) => match serde_json::from_slice::<Request>(&buf) {
            Ok(req) => daemon.answer(req).await,
            Err(e) => Output::error(
                &CniError::new(ErrorCode::DECODE, format!("the shim's request is not one: {e}")),
                &cni::LATEST_VERSION.to_string(),
            )
            .into(),
        },
    };
    let body = serde_json::to_vec(&resp).unwrap_or_default();
    if let Err(e) = conn.write_all(&body).await {
        // The shim is gone (its budget ran out); the call itself is done.
        tracing::debug!(error = %e, "writing an answer");
    }
    let _ = conn.shutdown().await;
}

/// Serves calls on `listener` until `shutdown` resolves; then removes the socket at
/// `path`, and waits for the calls in flight, at most `grace`.
pub async fn serve(
    daemon: Arc<Daemon>,
    listener: UnixListener,
    path: &Path,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let mut calls = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => {
                    calls.spawn(connection(daemon.clone(), conn));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a call failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
        }
    }
    drop(listener);
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(error = %e, socket = %path.display(), "removing the socket");
    }
    let running = calls.len();
    tracing::info!(running, "stopped accepting calls; finishing those in flight");
    if tokio::time::timeout(grace, async { while calls.join_next().await.is_some() {} }).await.is_err() {
        tracing::warn!(left = calls.len(), "calls still running after the grace period; leaving them");
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> HttpResponse<Full<Bytes>> {
    let mut r = HttpResponse::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    r
}

/// The media type Prometheus' text parser expects for what prometheus-client writes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener`, forever.
pub async fn serve_http(daemon: Arc<Daemon>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let daemon = daemon.clone();
        let svc = service_fn(move |req: HttpRequest<hyper::body::Incoming>| {
            let daemon = daemon.clone();
            async move {
                let plain = "text/plain; charset=utf-8";
                Ok::<_, Infallible>(match req.uri().path() {
                    "/metrics" => text(StatusCode::OK, OPENMETRICS, daemon.metrics_text()),
                    "/healthz" => text(StatusCode::OK, plain, "ok\n".into()),
                    "/readyz" => match daemon.ready() {
                        Ok(()) => text(StatusCode::OK, plain, "ready\n".into()),
                        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, plain, format!("{e}\n")),
                    },
                    _ => {
                        text(StatusCode::NOT_FOUND, plain, "not found: /metrics, /healthz, /readyz\n".into())
                    }
                })
            }
        });
        tokio::spawn(async move {
            let _ =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;

    fn request(command: &str, stdin: &Value) -> Request {
        let env: BTreeMap<String, String> = [("CNI_COMMAND", command), ("CNI_PATH", "/nonexistent")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Request::new(env, &serde_json::to_vec(stdin).expect("json"))
    }

    /// STATUS with a readiness file that does not exist: answered by the thin plugin's
    /// code (error 50 naming the file), through the daemon's config.
    #[tokio::test]
    async fn calls_run_the_plugin_with_the_daemon_config_under_the_node_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("ready");
        let base = json!({"cniVersion": "1.1.0", "name": "m", "type": "rust-multus", "clusterNetwork": "c",
            "readinessindicatorfile": missing});
        let d = Daemon::new(
            Settings {
                base_config: base.as_object().cloned(),
                max_calls: 2,
                queue_timeout: Duration::from_secs(1),
            },
            None,
        );
        let r = d
            .answer(request(
                "STATUS",
                &json!({"cniVersion": "1.1.0", "name": "m", "type": "rust-multus-shim"}),
            ))
            .await;
        assert!(!r.success);
        let out = r.stdout.expect("error");
        assert_eq!(out["code"], 50);
        assert_eq!(
            out["msg"],
            format!(
                "readiness indicator file {} does not exist: the cluster network is not ready",
                missing.display()
            )
        );
        let text = d.metrics_text();
        assert!(text.contains("rust_multus_calls_total{verb=\"STATUS\",result=\"error\"} 1"), "{text}");
        assert_eq!(d.ready(), Ok(()));
    }

    /// Calls beyond the limit wait; one that waits past the queue timeout is refused with
    /// error 11 saying so, and a slot that frees lets the next one through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_beyond_the_limit_wait_then_are_refused() {
        let d = Daemon::new(
            Settings { base_config: None, max_calls: 1, queue_timeout: Duration::from_millis(200) },
            None,
        );
        let held = d.slots.clone().acquire_owned().await.expect("slot");
        // Its own (empty) cache directory: GC of the machine's would delete its pods.
        let cache = tempfile::tempdir().expect("tempdir");
        let conf = json!({"cniVersion": "1.1.0", "name": "m", "type": "rust-multus", "clusterNetwork": "c",
            "cniDir": cache.path()});
        let started = Instant::now();
        let r = d.answer(request("GC", &conf)).await;
        assert!(started.elapsed() >= Duration::from_millis(200));
        let out = r.stdout.expect("error");
        assert_eq!(out["code"], 11);
        assert_eq!(out["cniVersion"], "1.1.0");
        assert_eq!(
            out["msg"],
            "rust-multus daemon is busy: 1 calls running, this one waited 0.2 s for a slot"
        );
        assert!(d.metrics_text().contains("rust_multus_calls_total{verb=\"GC\",result=\"busy\"} 1"));
        let d2 = d.clone();
        let waiting = tokio::spawn(async move { d2.answer(request("GC", &conf)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(d.metrics_text().contains("rust_multus_calls_waiting 1"), "{}", d.metrics_text());
        drop(held);
        let r = waiting.await.expect("task");
        // GC of an empty cache: nothing to do, answered.
        assert_eq!(r, Response { stdout: None, success: true });
    }

    #[tokio::test]
    async fn the_socket_replaces_only_a_dead_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run/d.sock");
        let l = bind(&path).await.expect("bind");
        let e = bind(&path).await.expect_err("live");
        assert_eq!(e.to_string(), format!("{}: another daemon answers on this socket", path.display()));
        drop(l);
        let other = dir.path().join("run/keep.txt");
        std::fs::write(&other, "x").expect("write");
        let _l = bind(&path).await.expect("a dead socket is replaced");
        assert!(other.exists(), "the directory is not cleaned");
        let e = bind(&other).await.expect_err("a file");
        assert_eq!(
            e.to_string(),
            format!("{}: exists and is not a socket; not removing it", other.display())
        );
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&path).expect("socket").permissions().mode() & 0o777, 0o600);
    }
}
