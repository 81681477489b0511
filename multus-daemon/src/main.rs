//! `rust-multus-daemon`: rust-multus in thick mode, one per node. Answers the calls
//! `rust-multus-shim` forwards with the thin plugin's code, reading Pods (of this node) and
//! NADs from a watch cache; see `multus_core::multus::daemon`. Our own plugins
//! (`rust-macvlan`, `rust-ipvlan`, `rust-ipam`) are answered by their code in this process
//! instead of a process per network; every other plugin is exec'd as the runtime would.
//! This crate is where the meta-plugin meets our IPAM plugin: multus-core itself does not
//! depend on ipam-cni.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use cni_link::{Kind, LinkPlugin};
use ipam_cni::plugin::IpamPlugin;
use multus_core::multus::daemon::{self, Daemon, Settings};
use multus_core::multus::thick::DEFAULT_SOCKET;
use multus_core::multus::watch::WatchCache;
use tracing::info;

/// rust-multus' per-node daemon (thick mode).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// kubeconfig to reach the API server with; without it, the in-cluster service account.
    #[arg(long, env = "RUST_MULTUS_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// This node's name: the pods cached are those with this `spec.nodeName`.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The unix socket the shim calls (only this path is created or replaced).
    #[arg(long, env = "RUST_MULTUS_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// The rust-multus config (JSON, Multus' keys) the node's CNI config is laid over.
    #[arg(long, env = "RUST_MULTUS_CONFIG")]
    config: Option<PathBuf>,
    /// CNI calls running at once; more wait for a slot.
    #[arg(long, env = "RUST_MULTUS_MAX_CALLS", default_value_t = 16)]
    max_calls: usize,
    /// How long a call waits for a slot before it is refused (error 11), e.g. 60s, 500ms.
    #[arg(long, env = "RUST_MULTUS_QUEUE_TIMEOUT", default_value = "60s", value_parser = duration)]
    queue_timeout: Duration,
    /// After SIGTERM, how long calls in flight may take to finish.
    #[arg(long, env = "RUST_MULTUS_SHUTDOWN_GRACE", default_value = "25s", value_parser = duration)]
    shutdown_grace: Duration,
    /// Start `rust-macvlan` and `rust-ipvlan` as processes, as the runtime would, instead of
    /// answering them inside the daemon (the default: no process per network).
    #[arg(long, env = "RUST_MULTUS_EXEC_LINK_DELEGATES")]
    exec_link_delegates: bool,
    /// Start `rust-ipam` as a process for every IPAM call instead of answering it inside the
    /// daemon (the default). Either way it reads the same node file, token and NODE_NAME.
    #[arg(long, env = "RUST_MULTUS_EXEC_IPAM")]
    exec_ipam: bool,
    /// HTTP address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "RUST_MULTUS_METRICS_LISTEN", default_value = "127.0.0.1:9159")]
    metrics_listen: SocketAddr,
}

/// `90s`, `500ms`, `2m` or plain seconds.
fn duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = n.parse().map_err(|_| format!("{s:?} is not a duration like 60s, 500ms or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unit {unit:?} is not ms, s or m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster().context("no --kubeconfig and no in-cluster service account")?,
    };
    // A CNI call must answer; the runtime retries ADD itself.
    config.default_retry = false;
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(Duration::from_secs(15));
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// `rust-macvlan` answered inside the daemon: the binary's own code.
fn macvlan(env: &cni::Env, stdin: &[u8]) -> cni::Output {
    cni::Output::of(cni::run(&LinkPlugin(Kind::Macvlan), env, stdin))
}

/// `rust-ipvlan` answered inside the daemon.
fn ipvlan(env: &cni::Env, stdin: &[u8]) -> cni::Output {
    cni::Output::of(cni::run(&LinkPlugin(Kind::Ipvlan), env, stdin))
}

/// `rust-ipam` answered inside the daemon: the binary's own code, node file included.
fn ipam(env: &cni::Env, stdin: &[u8]) -> cni::Output {
    cni::Output::of(cni::run(&IpamPlugin::default(), env, stdin))
}

/// The plugins this daemon answers itself.
fn in_process(args: &Args) -> Vec<(&'static str, cni::exec::InProcess)> {
    let mut plugins: Vec<(&'static str, cni::exec::InProcess)> = Vec::new();
    if !args.exec_link_delegates {
        plugins.extend([("rust-macvlan", macvlan as cni::exec::InProcess), ("rust-ipvlan", ipvlan)]);
    }
    if !args.exec_ipam {
        plugins.push(("rust-ipam", ipam));
    }
    plugins
}

async fn run(args: Args) -> anyhow::Result<()> {
    cni::exec::answer_in_process(in_process(&args));
    let base_config = match &args.config {
        None => None,
        Some(p) => {
            let text = std::fs::read(p).with_context(|| format!("reading --config {}", p.display()))?;
            match serde_json::from_slice(&text)
                .with_context(|| format!("--config {}: not JSON", p.display()))?
            {
                serde_json::Value::Object(m) => Some(m),
                _ => anyhow::bail!("--config {}: not a JSON object", p.display()),
            }
        }
    };
    let client = client(args.kubeconfig.as_ref()).await?;
    let cache = WatchCache::start(client, &args.node_name);
    let settings = Settings { base_config, max_calls: args.max_calls, queue_timeout: args.queue_timeout };
    let daemon = Daemon::new(settings, Some(cache));
    let metrics = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding --metrics-listen {}", args.metrics_listen))?;
    tokio::spawn(daemon::serve_http(daemon.clone(), metrics));
    let listener = daemon::bind(&args.socket)
        .await
        .with_context(|| format!("binding the socket {}", args.socket.display()))?;
    info!(socket = %args.socket.display(), node = %args.node_name, max_calls = args.max_calls,
        metrics = %args.metrics_listen, exec_link_delegates = args.exec_link_delegates, exec_ipam = args.exec_ipam, "serving CNI calls");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        info!("shutting down");
    };
    daemon::serve(daemon, listener, &args.socket, args.shutdown_grace, shutdown).await;
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
