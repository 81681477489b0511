//! Prometheus metrics and the small HTTP endpoint that serves them with health probes.
//!
//! Counters and histograms are updated as requests and commits happen; pool and lease
//! gauges are read from the allocator when scraped, so they are never stale.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{Instrument as _, debug, info_span, warn};

use crate::allocator::PoolUsage;
use crate::role::Serving;

// Labels are static strings: counting a request allocates nothing.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcCode {
    rpc: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Rpc {
    rpc: &'static str,
}

/// Methods served, as `package.Service/Method`; anything else counts as `other`.
const RPCS: &[&str] = &[
    "rustipam.v1.Ipam/Allocate",
    "rustipam.v1.Ipam/Release",
    "rustipam.v1.Ipam/Check",
    "rustipam.v1.Ipam/Gc",
    "rustipam.v1.Ipam/Status",
    "rustipam.v1.Admin/ListPools",
    "rustipam.v1.Admin/ListLeases",
    "rustipam.v1.Admin/GetLease",
    "rustipam.v1.Admin/Reserve",
    "rustipam.v1.Admin/ReleaseAddress",
    "rustipam.v1.Admin/Reconcile",
    "grpc.health.v1.Health/Check",
    "grpc.health.v1.Health/Watch",
    "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

fn rpc_label(path: &str) -> &'static str {
    let path = path.trim_start_matches('/');
    RPCS.iter().find(|r| **r == path).copied().unwrap_or("other")
}

fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Pool {
    network: String,
    range: String,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RpcCode, Counter>,
    request_seconds: Family<Rpc, Histogram>,
    commit_seconds: Histogram,
    batch_size: Histogram,
    commit_failures: Counter,
    leases: Gauge,
    serving: Gauge,
    leader: Gauge,
    // Sizes are floats: an IPv6 range holds more than i64 can count.
    pool_size: Family<Pool, FloatGauge>,
    pool_used: Family<Pool, FloatGauge>,
    pool_excluded: Family<Pool, FloatGauge>,
    pool_free: Family<Pool, FloatGauge>,
    reconcile: crate::reconcile::ReconcileMetrics,
}

fn latency() -> Histogram {
    // 50 us to about 1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Metrics {
    /// A registry with every metric at zero.
    pub fn new() -> Arc<Metrics> {
        let mut m = Metrics {
            registry: Registry::with_prefix("rustipam"),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency),
            commit_seconds: latency(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            commit_failures: Counter::default(),
            leases: Gauge::default(),
            serving: Gauge::default(),
            leader: Gauge::default(),
            pool_size: Family::default(),
            pool_used: Family::default(),
            pool_excluded: Family::default(),
            pool_free: Family::default(),
            reconcile: Default::default(),
        };
        let registry = &mut m.registry;
        registry.register("requests", "gRPC requests by method and status code", m.requests.clone());
        registry.register("request_seconds", "gRPC request latency by method", m.request_seconds.clone());
        registry.register(
            "store_commit_seconds",
            "Latency of one durable store commit",
            m.commit_seconds.clone(),
        );
        registry.register("store_batch_requests", "Requests answered by one commit", m.batch_size.clone());
        registry.register("store_commit_failures", "Store commits that failed", m.commit_failures.clone());
        registry.register("leases", "Addresses held, all networks", m.leases.clone());
        registry.register("serving", "1 when this replica allocates", m.serving.clone());
        registry.register("leader", "1 while this replica holds the leader lease", m.leader.clone());
        registry.register("pool_size", "Addresses a pool may hand out", m.pool_size.clone());
        registry.register(
            "pool_used",
            "Addresses of a pool held by anyone in its network",
            m.pool_used.clone(),
        );
        registry.register(
            "pool_excluded",
            "Excluded addresses of a pool, gateway included",
            m.pool_excluded.clone(),
        );
        registry.register("pool_free", "Addresses a pool can still hand out", m.pool_free.clone());
        m.reconcile = crate::reconcile::ReconcileMetrics::register(registry);
        Arc::new(m)
    }

    /// Counts one gRPC request (`rpc` from [`rpc_label`]) and its latency.
    fn observe_rpc(&self, rpc: &'static str, started: Instant, code: tonic::Code) {
        self.requests.get_or_create(&RpcCode { rpc, code: code_label(code) }).inc();
        self.request_seconds.get_or_create(&Rpc { rpc }).observe(started.elapsed().as_secs_f64());
    }

    /// Records one store commit of `batch` requests.
    pub fn observe_commit(&self, took: Duration, batch: usize, ok: bool) {
        self.commit_seconds.observe(took.as_secs_f64());
        self.batch_size.observe(batch as f64);
        if !ok {
            self.commit_failures.inc();
        }
    }

    /// The stale-lease reconcile's metrics.
    pub fn reconcile(&self) -> &crate::reconcile::ReconcileMetrics {
        &self.reconcile
    }

    /// Records whether this replica holds the leader lease.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// The text exposition, with the gauges set from the allocator's current state.
    pub fn render(&self, pools: &[PoolUsage], leases: usize, serving: bool) -> String {
        self.leases.set(leases as i64);
        self.serving.set(i64::from(serving));
        for f in [&self.pool_size, &self.pool_used, &self.pool_excluded, &self.pool_free] {
            f.clear();
        }
        for p in pools {
            let l = Pool { network: p.network.to_string(), range: p.range.range.clone() };
            self.pool_size.get_or_create(&l).set(p.size as f64);
            self.pool_used.get_or_create(&l).set(p.used as f64);
            self.pool_excluded.get_or_create(&l).set(p.excluded as f64);
            self.pool_free.get_or_create(&l).set(p.free as f64);
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    serving: Serving,
    metrics: Arc<Metrics>,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        // A follower has no pools to show, but its RPC counters and leader state are real.
        "/metrics" => match serving.engine() {
            Ok(engine) => match engine.call(|a, _| (a.pools(None), a.lease_count())).await {
                Ok((pools, leases)) => text(StatusCode::OK, metrics.render(&pools, leases, true)),
                Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
            },
            Err(_) => text(StatusCode::OK, metrics.render(&[], 0, false)),
        },
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        // Ready only on the leader whose engine answers: state loaded and the store usable,
        // so a Service sends traffic to the leader alone.
        "/readyz" => match serving.engine() {
            Ok(engine) => match engine.call(|_, _| ()).await {
                Ok(()) => text(StatusCode::OK, "ready\n".into()),
                Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
            },
            Err(s) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", s.message())),
        },
        _ => text(StatusCode::NOT_FOUND, "not found: /metrics, /healthz, /readyz\n".into()),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` resolves.
pub async fn serve_http(
    listener: TcpListener,
    serving: Serving,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    // Open connections hold engine handles; they must end with the listener.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let accept = async {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "metrics listener accept failed");
                    continue;
                }
            };
            let (serving, metrics) = (serving.clone(), metrics.clone());
            let svc = service_fn(move |req| {
                let (serving, metrics) = (serving.clone(), metrics.clone());
                async move { Ok::<_, Infallible>(handle(req, serving, metrics).await) }
            });
            let mut stop = stop_rx.clone();
            tokio::spawn(
                async move {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        r = conn => if let Err(e) = r {
                            debug!(error = %e, "metrics connection ended");
                        },
                        _ = stop.wait_for(|s| *s) => {}
                    }
                }
                .instrument(info_span!("metrics_conn", %peer)),
            );
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown => {}
    }
    let _ = stop_tx.send(true);
    // Let the connection tasks see the signal and drop their handles.
    drop(stop_rx);
    stop_tx.closed().await;
    debug!(?addr, "metrics listener stopped");
}

/// A tower layer that counts every gRPC request by path and status code. The code comes from
/// the `grpc-status` header: tonic sends errors as trailers-only responses, so a response
/// without it (and HTTP 200) is a success.
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics { inner, metrics: self.0.clone() }
    }
}

/// The service of [`RpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, RB> tower::Service<hyper::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<hyper::Request<B>, Response = hyper::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: hyper::Request<B>) -> Self::Future {
        let rpc = rpc_label(req.uri().path());
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            if let Ok(resp) = &r {
                let code = match resp.headers().get("grpc-status") {
                    Some(v) => v
                        .to_str()
                        .ok()
                        .and_then(|v| v.parse::<i32>().ok())
                        .map_or(tonic::Code::Unknown, tonic::Code::from),
                    None if resp.status() == StatusCode::OK => tonic::Code::Ok,
                    None => tonic::Code::Unknown,
                };
                metrics.observe_rpc(rpc, started, code);
            }
            r
        })
    }
}
