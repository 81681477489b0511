//! Wiring: listeners, the gRPC services, reflection and health, the per-request metrics,
//! and the HTTP endpoint of `/metrics` and the probes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rust_ipam_proto::v1::{admin_server::AdminServer, ipam_server::IpamServer};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::TcpIncoming;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::authz::Authz;
use crate::engine::Engine;
use crate::grpc::{AdminService, IpamService};
use crate::metrics::Metrics;
use crate::pools::Pools;
use crate::reconcile::Reconciler;
use crate::role::{Role, Serving};
use crate::tls::{HANDSHAKE_TIMEOUT, ServerTls};

/// How long shutdown waits for the engine to finish its last batch.
const ENGINE_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Where to listen: `host:port` or `unix:/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Listen, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(format!("listen address {s:?} has an empty unix socket path"));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(Listen::Tcp).map_err(|_| {
            format!("listen address {s:?} is neither ip:port (e.g. 127.0.0.1:50051) nor unix:/path")
        })
    }
}

/// A bound listener, ready to serve.
#[derive(Debug)]
pub enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Bound {
    /// Binds `listen`. A stale unix socket file left by an earlier run is replaced.
    pub async fn bind(listen: &Listen) -> anyhow::Result<Bound> {
        match listen {
            Listen::Tcp(addr) => {
                Ok(Bound::Tcp(TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?))
            }
            Listen::Unix(path) => {
                remove_stale_socket(path)?;
                let l = UnixListener::bind(path)
                    .with_context(|| format!("binding unix socket {}", path.display()))?;
                Ok(Bound::Unix(l, path.clone()))
            }
        }
    }

    /// The address clients use without TLS, e.g. `http://127.0.0.1:50051` or
    /// `unix:///run/x.sock`.
    pub fn endpoint(&self) -> String {
        match self {
            Bound::Tcp(l) => {
                l.local_addr().map_or_else(|e| format!("tcp(?): {e}"), |a| format!("http://{a}"))
            }
            Bound::Unix(_, p) => format!("unix://{}", p.display()),
        }
    }
}

/// The gRPC listeners and what each serves.
#[derive(Debug, Default)]
pub struct Listeners {
    /// Ipam, health and reflection; Admin too unless `admin` listeners are given.
    pub main: Vec<Bound>,
    /// Everything, Admin included. When any is given, `main` serves no Admin.
    pub admin: Vec<Bound>,
    /// TLS (mutual when it has a client CA) on every TCP listener.
    pub tls: Option<Arc<ServerTls>>,
    /// TLS on the `admin` TCP listeners instead of `tls`: the same certificate with the
    /// admins' client CA, so the certificates the main listeners accept (the nodes') cannot
    /// reach Admin.
    pub admin_tls: Option<Arc<ServerTls>>,
    /// TLS on the metrics listener (`/metrics`, `/healthz`, `/readyz` over HTTPS, HTTP/1.1);
    /// `None`: plain HTTP.
    pub metrics_tls: Option<Arc<ServerTls>>,
    /// Who may do what (`--authorize`); `None`: every caller a listener admits may do
    /// everything.
    pub authz: Option<Arc<Authz>>,
}

impl From<Vec<Bound>> for Listeners {
    /// Plaintext listeners that serve everything.
    fn from(main: Vec<Bound>) -> Listeners {
        Listeners { main, ..Listeners::default() }
    }
}

impl Listeners {
    /// The address clients use for `bound`: `https://` on a TCP listener with TLS.
    pub fn endpoint(&self, bound: &Bound) -> String {
        let plain = bound.endpoint();
        match (bound, &self.tls) {
            (Bound::Tcp(_), Some(_)) => plain.replacen("http://", "https://", 1),
            _ => plain,
        }
    }
}

fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))
        }
        Ok(_) => anyhow::bail!("{} exists and is not a socket; refusing to replace it", path.display()),
        Err(_) => Ok(()),
    }
}

/// Serves the Ipam and Admin services, health and reflection on the listeners (Admin only on
/// the admin listeners when there are any) until `shutdown` resolves. Health
/// (grpc.health.v1 and `/readyz`) follows the role: serving only while this replica leads
/// with its state loaded. `reconciler` answers Reconcile and runs its timer while this
/// replica leads.
pub async fn serve(
    serving: Serving,
    identity: String,
    listeners: Listeners,
    metrics: (Arc<Metrics>, Option<TcpListener>),
    reconciler: Arc<Reconciler>,
    pools: Pools,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (metrics, metrics_listener) = metrics;
    let (health, health_svc) = tonic_health::server::health_reporter();
    let health_task = tokio::spawn({
        let mut serving = serving.clone();
        async move {
            loop {
                if serving.engine().is_ok() {
                    health.set_serving::<IpamServer<IpamService>>().await;
                    health.set_serving::<AdminServer<AdminService>>().await;
                    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
                } else {
                    health.set_not_serving::<IpamServer<IpamService>>().await;
                    health.set_not_serving::<AdminServer<AdminService>>().await;
                    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
                }
                if !serving.changed().await {
                    return;
                }
            }
        }
        .instrument(info_span!("health"))
    });
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(rust_ipam_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().context("building reflection v1")?;
    let reflection_v1alpha = reflection().build_v1alpha().context("building reflection v1alpha")?;
    let authz = listeners.authz.clone().unwrap_or_else(Authz::off);
    let mut ipam_service =
        IpamService::new(serving.clone(), identity, authz.clone()).with_pools(pools.clone());
    if let Some(keeper) = reconciler.keeper() {
        ipam_service = ipam_service.with_keeper(keeper);
    }
    let ipam = IpamServer::new(ipam_service);
    let admin =
        AdminServer::new(AdminService::new(serving.clone(), authz).with_reconciler(reconciler.clone()));
    let reconcile_timer = reconciler.spawn_timer(serving.clone());
    let without_admin = tonic::transport::Server::builder()
        .layer(RpcMetricsLayer(metrics.clone()))
        .add_service(health_svc)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ipam);
    let with_admin = without_admin.clone().add_service(admin);
    let separate_admin = !listeners.admin.is_empty();
    if let Some(tls) = &listeners.tls {
        info!(mutual = tls.mutual(), "TLS on the TCP listeners");
    }
    if listeners.admin_tls.is_some() {
        info!("the admin TCP listeners take client certificates of their own CA");
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let metrics_tls = listeners.metrics_tls.clone();
    let metrics_task = metrics_listener.map(|l| {
        let scheme = if metrics_tls.is_some() { "https" } else { "http" };
        let endpoint = l.local_addr().map_or_else(|e| e.to_string(), |a| format!("{scheme}://{a}/metrics"));
        info!(%endpoint, "serving metrics and probes");
        let mut stop = stop_rx.clone();
        tokio::spawn(
            serve_http(l, metrics_tls, serving.clone(), metrics.clone(), pools.clone(), async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .instrument(info_span!("metrics", %endpoint)),
        )
    });
    let main_tls = listeners.tls.clone();
    let admin_tls = listeners.admin_tls.clone().or_else(|| main_tls.clone());
    let all = listeners
        .main
        .into_iter()
        .map(|b| (b, !separate_admin, main_tls.clone()))
        .chain(listeners.admin.into_iter().map(|b| (b, true, admin_tls.clone())));
    for (bound, admin, tls) in all {
        let endpoint = Listeners { tls: tls.clone(), ..Listeners::default() }.endpoint(&bound);
        let router = if admin { with_admin.clone() } else { without_admin.clone() };
        let mut stop = stop_rx.clone();
        let signal = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let span = info_span!("listener", %endpoint);
        info!(%endpoint, admin, "serving");
        match bound {
            Bound::Tcp(l) => {
                if separate_admin
                    && admin
                    && tls.is_none()
                    && l.local_addr().is_ok_and(|a| !a.ip().is_loopback())
                {
                    warn!(%endpoint, "the admin listener is reachable from the network without TLS");
                }
                match &tls {
                    Some(tls) => {
                        let incoming = tls.incoming(l);
                        tasks.spawn(
                            async move { router.serve_with_incoming_shutdown(incoming, signal).await }
                                .instrument(span),
                        );
                    }
                    None => {
                        let incoming = TcpIncoming::from(l).with_nodelay(Some(true));
                        tasks.spawn(
                            async move { router.serve_with_incoming_shutdown(incoming, signal).await }
                                .instrument(span),
                        );
                    }
                }
            }
            Bound::Unix(l, path) => {
                tasks.spawn(
                    async move {
                        let r = router.serve_with_incoming_shutdown(UnixListenerStream::new(l), signal).await;
                        let _ = std::fs::remove_file(&path);
                        r
                    }
                    .instrument(span),
                );
            }
        }
    }
    tokio::select! {
        () = shutdown => info!("shutting down"),
        Some(r) = tasks.join_next() => {
            r.context("listener task panicked")?.context("listener failed")?;
        }
    }
    let _ = stop_tx.send(true);
    while let Some(r) = tasks.join_next().await {
        r.context("listener task panicked")?.context("listener failed")?;
    }
    if let Some(t) = metrics_task {
        t.await.context("metrics task panicked")?;
    }
    health_task.abort();
    // A pass in flight holds an engine handle, which must go for the engine to drain.
    if let Some(t) = reconcile_timer {
        t.abort();
        let _ = t.await;
    }
    Ok(())
}

/// The media type of what [`Metrics::render`] writes: OpenMetrics text, ending `# EOF`.
/// Prometheus picks its parser by it (and refuses a scrape without one).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    typed(status, "text/plain; charset=utf-8", body)
}

fn typed(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    r
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    serving: Serving,
    metrics: Arc<Metrics>,
    pools: Pools,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        // A follower has no pools to show, but its RPC counters and leader state are real.
        "/metrics" => match serving.engine() {
            Ok(engine) => match engine
                .call(move |a, now| {
                    (a.pools(None), crate::pools::stats(a, &pools.snapshot(), now), a.lease_count())
                })
                .await
            {
                Ok((ranges, ippools, leases)) => {
                    typed(StatusCode::OK, OPENMETRICS, metrics.render(&ranges, &ippools, leases, true))
                }
                Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
            },
            Err(_) => typed(StatusCode::OK, OPENMETRICS, metrics.render(&[], &[], 0, false)),
        },
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        // Ready only on the leader whose engine answers: state loaded and the store usable,
        // so a Service sends traffic to the leader alone.
        "/readyz" => match serving.engine() {
            Ok(engine) => match engine.call(|_, _| ()).await {
                Ok(()) => text(StatusCode::OK, "ready\n".into()),
                Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
            },
            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "not found: /metrics, /healthz, /readyz\n".into()),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` resolves,
/// over TLS when `tls` is given (each handshake runs in the connection's own task, so a
/// slow client delays no one else).
async fn serve_http(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    serving: Serving,
    metrics: Arc<Metrics>,
    pools: Pools,
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
            let (serving, metrics, pools) = (serving.clone(), metrics.clone(), pools.clone());
            let svc = service_fn(move |req| {
                let (serving, metrics, pools) = (serving.clone(), metrics.clone(), pools.clone());
                async move { Ok::<_, Infallible>(handle(req, serving, metrics, pools).await) }
            });
            let mut stop = stop_rx.clone();
            let acceptor = tls.as_ref().map(|t| t.acceptor());
            tokio::spawn(
                async move {
                    let http1 = hyper::server::conn::http1::Builder::new();
                    let conn = async {
                        match acceptor {
                            None => http1.serve_connection(TokioIo::new(stream), svc).await,
                            Some(acceptor) => {
                                let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                                match tls {
                                    Ok(Ok(stream)) => http1.serve_connection(TokioIo::new(stream), svc).await,
                                    Ok(Err(e)) => {
                                        warn!(error = %e, "metrics TLS handshake failed");
                                        Ok(())
                                    }
                                    Err(_) => {
                                        warn!("metrics TLS handshake did not finish within {HANDSHAKE_TIMEOUT:?}");
                                        Ok(())
                                    }
                                }
                            }
                        }
                    };
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

/// A tower layer that counts every gRPC request by path and status code. The code comes from
/// the `grpc-status` header: tonic sends errors as trailers-only responses, so a response
/// without it (and HTTP 200) is a success.
#[derive(Debug, Clone)]
struct RpcMetricsLayer(Arc<Metrics>);

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics { inner, metrics: self.0.clone() }
    }
}

/// The service of [`RpcMetricsLayer`].
#[derive(Debug, Clone)]
struct RpcMetrics<S> {
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
                metrics.observe_rpc(rpc, code_label(code), started.elapsed());
            }
            r
        })
    }
}

/// Serves with `engine` as the one replica, always leading (the embedded store has no
/// election), until `shutdown` resolves; then lets the engine answer what it holds and
/// close the store.
pub async fn serve_single(
    engine: Engine,
    identity: String,
    listeners: Listeners,
    metrics: (Arc<Metrics>, Option<TcpListener>),
    reconciler: Arc<Reconciler>,
    pools: Pools,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (serving, role) = Serving::fixed(engine.clone());
    // The one replica leads for as long as it runs.
    metrics.0.set_leader(true);
    let served = serve(serving, identity, listeners, metrics, reconciler, pools, shutdown).await;
    // The role holds an engine handle however many views of it are still alive.
    let _ = role.send(Role::Stopping);
    drain(engine).await?;
    served
}

/// Waits for `engine` to answer what it holds and close its store, once every other handle
/// is gone.
pub async fn drain(engine: Engine) -> anyhow::Result<()> {
    let stopped = engine.stopped();
    drop(engine);
    if tokio::time::timeout(ENGINE_DRAIN, stopped).await.is_err() {
        anyhow::bail!("the engine did not stop within {ENGINE_DRAIN:?}; a handle is still held elsewhere");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_addresses() {
        assert_eq!("127.0.0.1:50051".parse(), Ok(Listen::Tcp("127.0.0.1:50051".parse().expect("addr"))));
        assert_eq!("[::1]:7".parse(), Ok(Listen::Tcp("[::1]:7".parse().expect("addr"))));
        assert_eq!("unix:/run/x.sock".parse(), Ok(Listen::Unix("/run/x.sock".into())));
        assert_eq!("unix:///run/x.sock".parse(), Ok(Listen::Unix("/run/x.sock".into())));
        assert_eq!(
            "localhost".parse::<Listen>(),
            Err("listen address \"localhost\" is neither ip:port (e.g. 127.0.0.1:50051) nor unix:/path"
                .into())
        );
        assert_eq!(
            "unix:".parse::<Listen>(),
            Err("listen address \"unix:\" has an empty unix socket path".into())
        );
    }
}
