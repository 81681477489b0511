//! `rust-ipam-server`: the allocation server.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use ipam_server::engine::Engine;
use ipam_server::metrics::Metrics;
use ipam_server::server::{self, Bound, Listen};
use ipam_server::store::embedded::EmbeddedStore;
use tracing::info;

/// Cluster-wide IPAM for Kubernetes secondary networks: a gRPC allocation server.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Where to serve gRPC: `ip:port` or `unix:/path`. Repeat for several listeners.
    #[arg(
        long = "listen",
        env = "RUST_IPAM_LISTEN",
        value_delimiter = ',',
        default_value = "127.0.0.1:50051"
    )]
    listen: Vec<Listen>,
    /// Directory of the embedded lease database. Default: /var/lib/rust-ipam as root,
    /// else $XDG_DATA_HOME/rust-ipam or ~/.local/share/rust-ipam.
    #[arg(long, env = "RUST_IPAM_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Where to serve Prometheus `/metrics` and the `/healthz`, `/readyz` probes over HTTP
    /// (`ip:port`); `off` to serve none.
    #[arg(long, env = "RUST_IPAM_METRICS_LISTEN", default_value = "127.0.0.1:9156")]
    metrics_listen: String,
    /// Name of this replica in Status answers. Default: the pod name ($POD_NAME), else the
    /// host name.
    #[arg(long, env = "RUST_IPAM_IDENTITY")]
    identity: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Turn Whereabouts' IPPool and OverlappingRangeIPReservation objects (`kubectl get
    /// ippools,overlappingrangeipreservations -A -o yaml`) into leases of the embedded store.
    /// Run it with the server stopped. Running it twice changes nothing.
    ImportWhereabouts {
        /// YAML or JSON files of the objects (lists or single objects).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print what would change and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write the CustomResourceDefinitions (one YAML file per CRD) into a directory, or
    /// print them as one multi-document YAML stream.
    Crds {
        /// Directory to write `ipleases.yaml` and `rangepools.yaml` into.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn write_crds(out: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    for (file, yaml) in ipam_server::k8s::crd::crd_yaml() {
        match out {
            Some(dir) => {
                let path = dir.join(file);
                std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", path.display());
            }
            None => print!("---\n{yaml}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Imports; the exit status is 2 when some entries could not be imported.
fn import_whereabouts(
    data_dir: &std::path::Path,
    files: &[PathBuf],
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    use ipam_server::import::{Action, import, table};
    use ipam_server::store::LeaseStore as _;
    let docs = files
        .iter()
        .map(|f| std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut store =
        EmbeddedStore::open(data_dir).context("opening the embedded store (is the server running?)")?;
    let mut alloc = ipam_server::engine::restore(&store).context("loading leases")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let rows = import(&docs, &mut alloc, now).map_err(anyhow::Error::msg)?;
    print!("{}", table(&rows));
    let changes: Vec<_> = alloc.drain_journal().collect();
    let count = |f: fn(&Action) -> bool| rows.iter().filter(|r| f(&r.action)).count();
    let (created, existing) = (count(|a| *a == Action::Create), count(|a| *a == Action::Exists));
    let refused = rows.len() - created - existing;
    if dry_run {
        println!(
            "dry run: {created} would be created, {existing} exist, {refused} not importable; nothing changed"
        );
    } else {
        store.commit(&changes).context("committing the imported leases")?;
        println!("{created} created, {existing} already present, {refused} not importable");
    }
    Ok(if refused > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

fn default_data_dir() -> PathBuf {
    use std::os::unix::fs::MetadataExt as _;
    let is_root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if is_root {
        return PathBuf::from("/var/lib/rust-ipam");
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("rust-ipam");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/rust-ipam"),
        None => PathBuf::from("rust-ipam-data"),
    }
}

fn default_identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_else(|| "rust-ipam-server".into())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        // Without signal handlers the process still stops on the default action.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let store = EmbeddedStore::open(&data_dir).context("opening the embedded store")?;
    let metrics = Metrics::new();
    let engine = Engine::start(Box::new(store), metrics.clone()).await.context("loading leases")?;
    let metrics_listener = match args.metrics_listen.as_str() {
        "off" => None,
        addr => {
            let addr: std::net::SocketAddr = addr
                .parse()
                .map_err(|_| anyhow::anyhow!("--metrics-listen {addr:?} is neither ip:port nor off"))?;
            Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding metrics on {addr}"))?,
            )
        }
    };
    let mut listeners = Vec::new();
    for l in &args.listen {
        listeners.push(Bound::bind(l).await?);
    }
    let identity = args.identity.unwrap_or_else(default_identity);
    info!(%identity, store = engine.store(), "rust-ipam-server ready");
    server::serve_single(engine, identity, listeners, (metrics, metrics_listener), shutdown_signal()).await
}

fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    match &args.command {
        Some(Command::ImportWhereabouts { files, dry_run }) => {
            let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
            return import_whereabouts(&data_dir, files, *dry_run);
        }
        Some(Command::Crds { out }) => return write_crds(out.as_deref()),
        None => {}
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run(args))?;
    Ok(ExitCode::SUCCESS)
}
