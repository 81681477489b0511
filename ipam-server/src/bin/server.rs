//! `rust-ipam-server`: the allocation server.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use ipam_server::authz::{Authz, AuthzConfig};
use ipam_server::cli::parse_duration;
use ipam_server::engine::Engine;
use ipam_server::metrics::Metrics;
use ipam_server::pools::Pools;
use ipam_server::pools::selector::Labels;
use ipam_server::reconcile::ReconcileMetrics;
use ipam_server::server::{self, Bound, Listen, Listeners};
use ipam_server::store::embedded::EmbeddedStore;
use ipam_server::tls::{Alpn, ServerTls, TlsFiles};
use tracing::{Instrument as _, info};

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
    /// Listeners that serve the Admin service (ip:port or unix:/path; repeat or comma
    /// list). When given, `--listen` listeners serve no Admin. A unix socket is made
    /// readable by its owner only.
    #[arg(long = "admin-listen", env = "RUST_IPAM_ADMIN_LISTEN", value_delimiter = ',')]
    admin_listen: Vec<Listen>,
    /// PEM certificate chain for TLS on every TCP listener (with --tls-key).
    #[arg(long, env = "RUST_IPAM_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "RUST_IPAM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle that client certificates must chain to: mutual TLS, a client without
    /// such a certificate cannot connect.
    #[arg(long, env = "RUST_IPAM_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// PEM CA bundle that client certificates on the --admin-listen TCP listeners must
    /// chain to, instead of --tls-client-ca: Admin gets its own CA, so a node's certificate
    /// (which the main listeners accept) cannot call it.
    #[arg(long, env = "RUST_IPAM_ADMIN_TLS_CLIENT_CA", requires = "tls_cert")]
    admin_tls_client_ca: Option<PathBuf>,
    /// Enforce who may do what: a node allocates, releases, checks and GCs only its own
    /// node's attachments; Admin needs an --admin identity. Callers identify with a
    /// ServiceAccount token (`authorization: Bearer`, checked by TokenReview) or a client
    /// certificate naming their node (CN or DNS name, `system:node:NAME` or `NAME`).
    #[arg(long, env = "RUST_IPAM_AUTHORIZE")]
    authorize: bool,
    /// ServiceAccounts (`namespace/name`) whose pod-bound tokens speak for the node their pod
    /// runs on (the node DaemonSet's). Repeat or comma list.
    #[arg(long = "node-service-account", env = "RUST_IPAM_NODE_SERVICE_ACCOUNTS", value_delimiter = ',',
          value_parser = parse_account)]
    node_service_accounts: Vec<String>,
    /// Identities allowed the Admin service: `system:serviceaccount:NS:NAME`, or a client
    /// certificate's CN or DNS name. Repeat or comma list.
    #[arg(long = "admin", env = "RUST_IPAM_ADMINS", value_delimiter = ',')]
    admins: Vec<String>,
    /// The audience node tokens must be issued for (the projected token's `audience`).
    #[arg(long, env = "RUST_IPAM_TOKEN_AUDIENCE", default_value = "rust-ipam")]
    token_audience: String,
    /// How long a token's TokenReview answer is used before asking again; past it, while
    /// the API server cannot be reached, until the token expires.
    #[arg(long, env = "RUST_IPAM_TOKEN_CACHE", default_value = "1m", value_parser = parse_duration)]
    token_cache: std::time::Duration,
    /// How often the TLS files are checked for changes (new connections use new files).
    #[arg(long, env = "RUST_IPAM_TLS_RELOAD_EVERY", default_value = "10s", value_parser = parse_duration)]
    tls_reload_every: std::time::Duration,
    /// Directory of the embedded lease database. Default: /var/lib/rust-ipam as root,
    /// else $XDG_DATA_HOME/rust-ipam or ~/.local/share/rust-ipam.
    #[arg(long, env = "RUST_IPAM_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Where to serve Prometheus `/metrics` and the `/healthz`, `/readyz` probes over HTTP
    /// (`ip:port`); `off` to serve none.
    #[arg(long, env = "RUST_IPAM_METRICS_LISTEN", default_value = "127.0.0.1:9156")]
    metrics_listen: MetricsListen,
    /// PEM certificate chain for the metrics listener: with it (and --metrics-tls-key),
    /// `/metrics` and the probes are served over HTTPS only (reloaded like --tls-cert).
    #[arg(long, env = "RUST_IPAM_METRICS_TLS_CERT", requires = "metrics_tls_key")]
    metrics_tls_cert: Option<PathBuf>,
    /// PEM private key of --metrics-tls-cert.
    #[arg(long, env = "RUST_IPAM_METRICS_TLS_KEY", requires = "metrics_tls_cert")]
    metrics_tls_key: Option<PathBuf>,
    /// Name of this replica in Status answers and the leader Lease. Default: the pod name
    /// ($POD_NAME), else the host name and the first listen address.
    #[arg(long, env = "RUST_IPAM_IDENTITY")]
    identity: Option<String>,
    /// Where leases live: `embedded` (a file in --data-dir), `kube` (custom resources, with
    /// leader election), or `auto`: kube when --kubeconfig is given or the server runs in a
    /// cluster, else embedded.
    #[arg(long, env = "RUST_IPAM_STORE", default_value = "auto", global = true)]
    store: StoreKind,
    /// Kubeconfig file for the kube store (with `--store embedded`: only for reconcile to
    /// read pods and pool selectors to read Node and Namespace labels). Default: the
    /// in-cluster service account.
    #[arg(long, env = "RUST_IPAM_KUBECONFIG", global = true)]
    kubeconfig: Option<PathBuf>,
    /// Namespace of the lease objects and the leader Lease. Default: $POD_NAMESPACE, else
    /// the service account's namespace, else `rust-ipam`.
    #[arg(long, env = "RUST_IPAM_NAMESPACE", global = true)]
    namespace: Option<String>,
    /// Name of the coordination.k8s.io Lease the replicas elect a leader on.
    #[arg(long, env = "RUST_IPAM_LEASE_NAME", default_value = "rust-ipam-leader")]
    lease_name: String,
    /// How long the leader Lease holds without renewal (`2s`, `2500ms`). It bounds the gap
    /// after a leader dies: a follower takes over once it has run out. The leader stops
    /// writing two thirds of it after a renewal that did not come back.
    #[arg(long, env = "RUST_IPAM_LEASE_TTL", default_value = "2s", value_parser = parse_duration)]
    lease_ttl: std::time::Duration,
    /// How often the leader renews (and a follower tries to take over); at most a third of
    /// the TTL.
    #[arg(long, env = "RUST_IPAM_RENEW_EVERY", default_value = "500ms", value_parser = parse_duration)]
    renew_every: std::time::Duration,
    /// Directory of IPPool objects (YAML, as `kubectl apply` takes them) for the embedded
    /// store: read at start, on SIGHUP and when a file changes. With the kube store pools
    /// are IPPool objects in the API server instead.
    #[arg(long, env = "RUST_IPAM_POOLS_DIR")]
    pools_dir: Option<PathBuf>,
    /// How often the leader writes pool usage into each RangePool's and IPPool's status
    /// (only what changed).
    #[arg(long, env = "RUST_IPAM_POOL_STATUS_EVERY", default_value = "10s", value_parser = parse_duration)]
    pool_status_every: std::time::Duration,
    /// The gRPC endpoint followers name to clients when this replica leads. Default:
    /// http://$POD_IP:PORT of the first TCP listener, else that listener's address.
    #[arg(long, env = "RUST_IPAM_ADVERTISE")]
    advertise: Option<String>,
    /// How often the leader frees stale leases (leases of pods that are gone or replaced):
    /// `5m`, `30s`; `0` for never. Needs the Kubernetes API (kube store, or --kubeconfig
    /// with the embedded store).
    #[arg(long, value_name = "DURATION", env = "RUST_IPAM_RECONCILE_EVERY", default_value = "5m",
          value_parser = parse_duration)]
    reconcile_every: std::time::Duration,
    /// Leases younger than this are never freed by reconcile (a pod may not be listed yet,
    /// or a runtime may be slow to tear down).
    #[arg(long, value_name = "DURATION", env = "RUST_IPAM_RECONCILE_GRACE", default_value = "10m",
          value_parser = parse_duration)]
    reconcile_grace: std::time::Duration,
    /// How long a Node must be missing from the API server before reconcile gives its
    /// per-node blocks back (once no address in them is held).
    #[arg(long, value_name = "DURATION", env = "RUST_IPAM_NODE_BLOCK_GRACE", default_value = "10m",
          value_parser = parse_duration)]
    node_block_grace: std::time::Duration,
    /// Keep a StatefulSet pod's address for its next sandbox while the set wants the
    /// ordinal (`false`: free it at DEL like any pod's). Needs the Kubernetes API (kube
    /// store, or --kubeconfig with the embedded store).
    #[arg(long, value_name = "BOOL", env = "RUST_IPAM_KEEP_STATEFULSET_ADDRESSES", default_value_t = true,
          action = clap::ArgAction::Set)]
    keep_statefulset_addresses: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

// No doc comments on the variants: clap would print them as a second description of
// `--store` in `--help`, which the flag's own doc already gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    Auto,
    Embedded,
    Kube,
}

/// `--node-service-account`: `namespace/name`.
fn parse_account(s: &str) -> Result<String, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok(s.to_string()),
        _ => Err(format!("{s:?} is not namespace/name")),
    }
}

/// `--metrics-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetricsListen {
    Off,
    At(std::net::SocketAddr),
}

impl std::str::FromStr for MetricsListen {
    type Err = String;

    fn from_str(s: &str) -> Result<MetricsListen, String> {
        if s == "off" {
            return Ok(MetricsListen::Off);
        }
        s.parse().map(MetricsListen::At).map_err(|_| format!("{s:?} is neither ip:port nor off"))
    }
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Turn Whereabouts' IPPool and OverlappingRangeIPReservation objects into leases of the
    /// store the server uses (the same --store/--kubeconfig/--namespace). The embedded store
    /// needs the server stopped; the kube store does not (the API server refuses any
    /// address already held). Running it twice changes nothing.
    ImportWhereabouts {
        /// YAML or JSON files of the objects (`kubectl get ippools,overlappingrangeipreservations
        /// -A -o yaml`: lists or single objects).
        #[arg(required_unless_present = "from_namespace")]
        files: Vec<PathBuf>,
        /// Read the objects from the API server, in this namespace (Whereabouts' default is
        /// kube-system). Needs the kube store.
        #[arg(long)]
        from_namespace: Option<String>,
        /// Print what would change and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The same as `rust-ipam-ctl reconcile` without TLS, kept for manifests that run it:
    /// one stale-lease reconcile pass on the leader, printed as a table. Exit status 0 when
    /// the pass ran, 2 when some leases could not be checked or freed, 1 on error.
    Reconcile {
        /// Server endpoint (http://host:port, https://host:port or unix:///path); repeat to
        /// try several. A replica that is not the leader sends the call to the leader.
        #[arg(
            long = "server",
            env = "RUST_IPAM_SERVER",
            value_delimiter = ',',
            default_value = "http://127.0.0.1:50051"
        )]
        servers: Vec<String>,
        /// Print what would be freed and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep leases younger than this (whole seconds: `10m`, `90s`). Default: the
        /// server's --reconcile-grace.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        grace: Option<std::time::Duration>,
        /// Give up after this long.
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// Write the CustomResourceDefinitions (one YAML file per CRD) into a directory, or
    /// print them as one multi-document YAML stream.
    Crds {
        /// Directory to write `ipleases.yaml`, `rangepools.yaml` and `ippools.yaml` into.
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

/// Imports into the store `args` select; the exit status is 2 when some entries could not
/// be imported.
fn import_whereabouts(
    args: &Args,
    files: &[PathBuf],
    from_namespace: Option<&str>,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    use ipam_server::k8s::store::{Fence, KubeStore};
    let mut docs = files
        .iter()
        .map(|f| std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !use_kube(args) {
        if from_namespace.is_some() {
            anyhow::bail!("--from-namespace reads the API server: give --kubeconfig, or run in a cluster");
        }
        let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
        let mut store =
            EmbeddedStore::open(&data_dir).context("opening the embedded store (is the server running?)")?;
        return import_into(&mut store, &docs, dry_run);
    }
    // The kube store blocks on this runtime from this (non-runtime) thread.
    let rt =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    let client = rt.block_on(kube_client(args.kubeconfig.as_deref()))?;
    if let Some(ns) = from_namespace {
        let list = rt
            .block_on(ipam_server::k8s::whereabouts::list_objects(client.clone(), ns))
            .with_context(|| format!("listing Whereabouts objects in namespace {ns}"))?;
        docs.push(list);
    }
    // Not a leader: the import writes only by create-only and precondition writes, which
    // the API server refuses when they would hold an address twice.
    let fence = Fence::new();
    fence.open_until(std::time::Instant::now() + std::time::Duration::from_secs(24 * 3600));
    let namespace = args.namespace.clone().unwrap_or_else(default_namespace);
    let mut store = KubeStore::new(client, &namespace, rt.handle().clone(), fence);
    import_into(&mut store, &docs, dry_run)
}

fn import_into(
    store: &mut dyn ipam_server::store::LeaseStore,
    docs: &[String],
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    use ipam_server::import::{Action, import, table};
    use ipam_server::store::CommitError;
    let mut alloc = ipam_server::engine::restore(&*store).context("loading leases")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let rows = import(docs, &mut alloc, now)?;
    print!("{}", table(&rows));
    let changes: Vec<_> = alloc.drain_journal().collect();
    let count = |f: fn(&Action) -> bool| rows.iter().filter(|r| f(&r.action)).count();
    let (created, existing) = (count(|a| *a == Action::Create), count(|a| *a == Action::Exists));
    let mut refused = rows.len() - created - existing;
    if dry_run {
        println!(
            "dry run: {created} would be created, {existing} exist, {refused} not importable; nothing changed"
        );
        return Ok(if refused > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS });
    }
    let mut written = created;
    match store.commit(&changes) {
        Ok(()) => {}
        // Someone took these addresses since the store was read (a running leader).
        Err(CommitError::Refused(refusals)) => {
            for r in &refusals {
                let holder = r.truth.as_ref().map_or_else(|| "nobody".to_string(), |l| l.who());
                println!(
                    "conflict: {} in network {:?} is held by {holder}: {}",
                    r.address, r.network, r.reason
                );
            }
            written -= refusals.len().min(written);
            refused += refusals.len();
        }
        Err(e) => return Err(e).context("committing the imported leases"),
    }
    println!("{written} created, {existing} already present, {refused} not importable");
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

/// `15s`, `1500ms`, `2m`, or `0`.
fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The pod name; else the host name and the first listen address, so replicas on one
/// host never share an identity.
fn default_identity(listeners: &Listeners) -> String {
    env_nonempty("POD_NAME").unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "rust-ipam-server".into());
        match listeners.main.first() {
            Some(l) => format!("{host}-{}", l.endpoint().rsplit('/').next().unwrap_or_default()),
            None => host,
        }
    })
}

const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

fn default_namespace() -> String {
    env_nonempty("POD_NAMESPACE")
        .or_else(|| std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE).ok().map(|n| n.trim().to_string()))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "rust-ipam".into())
}

/// What followers tell clients: the first TCP listener, reachable at the pod's IP.
fn default_advertise(listeners: &Listeners) -> String {
    let Some(tcp) = listeners.main.iter().find_map(|b| match b {
        Bound::Tcp(l) => l.local_addr().ok(),
        Bound::Unix(..) => None,
    }) else {
        return String::new();
    };
    let scheme = if listeners.tls.is_some() { "https" } else { "http" };
    match env_nonempty("POD_IP") {
        Some(ip) if ip.contains(':') => format!("{scheme}://[{ip}]:{}", tcp.port()),
        Some(ip) => format!("{scheme}://{ip}:{}", tcp.port()),
        None => format!("{scheme}://{tcp}"),
    }
}

/// A client from `kubeconfig`, else from the in-cluster service account.
async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster().context("reading the in-cluster service account")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// The reconciler, reading pods through `client` when there is one.
fn reconciler(
    args: &Args,
    client: Option<kube::Client>,
    labels: Option<&Labels>,
    metrics: ReconcileMetrics,
) -> std::sync::Arc<ipam_server::reconcile::Reconciler> {
    use ipam_server::k8s::keep::KubeKeeper;
    use ipam_server::k8s::pods::KubePods;
    use ipam_server::keep::Keeper;
    use ipam_server::reconcile::blocks::NodeBlocks;
    use ipam_server::reconcile::{PodSource, Reconciler};
    let keeper = client.clone().map(|c| {
        let k = KubeKeeper::new(c, args.keep_statefulset_addresses);
        k.spawn();
        std::sync::Arc::new(k) as std::sync::Arc<dyn Keeper>
    });
    let pods = client.map(|c| std::sync::Arc::new(KubePods::new(c)) as std::sync::Arc<dyn PodSource>);
    info!(every = ?args.reconcile_every, grace = ?args.reconcile_grace, pods = pods.is_some(),
          node_block_grace = ?args.node_block_grace, "stale-lease reconcile");
    info!(
        statefulsets = keeper.is_some() && args.keep_statefulset_addresses,
        ipamclaims = keeper.is_some(),
        "keeping addresses for their owners"
    );
    let blocks = labels.map(|l| NodeBlocks::new(l.clone(), args.node_block_grace));
    Reconciler::keeping(pods, keeper, args.reconcile_every, args.reconcile_grace, metrics, blocks)
}

/// Follows the Nodes' and Namespaces' labels (pool selectors, deleted nodes' blocks).
fn follow_labels(client: &kube::Client) -> (Labels, tokio::task::JoinHandle<()>) {
    let labels = Labels::followed();
    let task = tokio::spawn(
        ipam_server::k8s::labels::follow(client.clone(), labels.clone())
            .instrument(tracing::info_span!("labels")),
    );
    (labels, task)
}

/// Runs with the kube store: elects a leader, serves while leading, follows otherwise.
async fn run_kube(
    args: &Args,
    identity: String,
    listeners: Listeners,
    metrics: (std::sync::Arc<Metrics>, Option<tokio::net::TcpListener>),
    reconcile_metrics: ReconcileMetrics,
) -> anyhow::Result<()> {
    use ipam_server::k8s::leader::{self, Election};
    use ipam_server::role::{Peer, Role, Serving};
    let client = kube_client(args.kubeconfig.as_deref()).await?;
    let (labels, follow_labels) = follow_labels(&client);
    let reconciler = reconciler(args, Some(client.clone()), Some(&labels), reconcile_metrics);
    let election = Election {
        namespace: args.namespace.clone().unwrap_or_else(default_namespace),
        lease_name: args.lease_name.clone(),
        me: Peer {
            identity: identity.clone(),
            endpoint: args.advertise.clone().unwrap_or_else(|| default_advertise(&listeners)),
        },
        ttl: args.lease_ttl,
        renew_every: args.renew_every,
        status_every: args.pool_status_every,
    };
    election.check().map_err(anyhow::Error::msg)?;
    info!(%identity, namespace = %election.namespace, lease = %election.lease_name,
          advertise = %election.me.endpoint, "rust-ipam-server electing a leader");
    let (role_tx, role_rx) = tokio::sync::watch::channel(Role::Starting);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let pools = Pools::new().with_labels(labels);
    let follow_pools = tokio::spawn(
        ipam_server::k8s::ippools::follow(kube::Api::all(client.clone()), pools.clone())
            .instrument(tracing::info_span!("ippools")),
    );
    let elect =
        tokio::spawn(leader::run(client, election, metrics.0.clone(), pools.clone(), role_tx, stop_rx));
    let served = server::serve(
        Serving::new(role_rx),
        identity,
        listeners,
        metrics,
        reconciler,
        pools,
        shutdown_signal(),
    )
    .await;
    follow_pools.abort();
    follow_labels.abort();
    let _ = stop_tx.send(true);
    if let Some(engine) = elect.await.context("the election task panicked")? {
        server::drain(engine).await?;
    }
    served
}

/// Whether the kube store is selected: `--store kube`, or `auto` with a kubeconfig or in a
/// cluster.
fn use_kube(args: &Args) -> bool {
    match args.store {
        StoreKind::Kube => true,
        StoreKind::Embedded => false,
        StoreKind::Auto => args.kubeconfig.is_some() || env_nonempty("KUBERNETES_SERVICE_HOST").is_some(),
    }
}

/// Binds the gRPC listeners and loads TLS, failing before anything serves if either fails.
async fn bind_listeners(args: &Args) -> anyhow::Result<Listeners> {
    // The server's certificate with a client CA (or none); reloaded when the files change.
    let load = |client_ca: Option<&PathBuf>| -> anyhow::Result<_> {
        let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else { return Ok(None) };
        let files = TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: client_ca.cloned() };
        let tls = ServerTls::new(files)?;
        tokio::spawn(tls.clone().watch(args.tls_reload_every));
        Ok(Some(tls))
    };
    let admin_tls = match &args.admin_tls_client_ca {
        Some(ca) => load(Some(ca))?,
        None => None,
    };
    // The metrics listener's own certificate (or the gRPC one given again): HTTP/1.1, no
    // client certificates (Prometheus and the kubelet's HTTPS probes present none).
    let metrics_tls = match (&args.metrics_tls_cert, &args.metrics_tls_key) {
        (Some(cert), Some(key)) => {
            let files = TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: None };
            let tls = ServerTls::for_protocol(files, Alpn::Http1).context("metrics TLS")?;
            tokio::spawn(tls.clone().watch(args.tls_reload_every));
            Some(tls)
        }
        _ => None,
    };
    let mut listeners =
        Listeners { tls: load(args.tls_client_ca.as_ref())?, admin_tls, metrics_tls, ..Listeners::default() };
    for l in &args.listen {
        listeners.main.push(Bound::bind(l).await?);
    }
    for l in &args.admin_listen {
        let bound = Bound::bind(l).await?;
        if let Bound::Unix(_, path) = &bound {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("restricting {}", path.display()))?;
        }
        listeners.admin.push(bound);
    }
    Ok(listeners)
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
    // Before anything is bound or asked of the API server.
    if let (true, Some(dir)) = (use_kube(&args), &args.pools_dir) {
        anyhow::bail!(
            "--pools-dir {} is for the embedded store: with the kube store, pools are IPPool objects",
            dir.display()
        );
    }
    let mut registry = Metrics::builder();
    let reconcile_metrics = ReconcileMetrics::register(registry.sub_registry("reconcile"));
    let authz = if args.authorize {
        // Tokens are reviewed by the API server the store uses, or the --kubeconfig one.
        let client = match use_kube(&args) || args.kubeconfig.is_some() {
            true => Some(kube_client(args.kubeconfig.as_deref()).await?),
            false => None,
        };
        let config = AuthzConfig {
            enabled: true,
            node_accounts: args.node_service_accounts.clone(),
            admins: args.admins.clone(),
            audience: args.token_audience.clone(),
            cache_for: args.token_cache,
        };
        info!(node_accounts = ?config.node_accounts, admins = ?config.admins, tokens = client.is_some(),
              "authorization on");
        Some(std::sync::Arc::new(Authz::new(config, client, registry.sub_registry("authz"))))
    } else {
        None
    };
    let metrics = registry.build();
    let metrics_listener = match args.metrics_listen {
        MetricsListen::Off => None,
        MetricsListen::At(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding metrics on {addr}"))?,
        ),
    };
    let mut listeners = bind_listeners(&args).await?;
    listeners.authz = authz;
    let identity = args.identity.clone().unwrap_or_else(|| default_identity(&listeners));
    if use_kube(&args) {
        return run_kube(&args, identity, listeners, (metrics, metrics_listener), reconcile_metrics).await;
    }
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let store = EmbeddedStore::open(&data_dir).context("opening the embedded store")?;
    let engine = Engine::start(Box::new(store), metrics.clone()).await.context("loading leases")?;
    // With the embedded store, --kubeconfig only lets reconcile see pods.
    let client = match &args.kubeconfig {
        Some(path) => Some(kube_client(Some(path)).await?),
        None => None,
    };
    let follow = client.as_ref().map(follow_labels);
    let reconciler = reconciler(&args, client, follow.as_ref().map(|(l, _)| l), reconcile_metrics);
    let mut pools = if args.pools_dir.is_some() { Pools::new() } else { Pools::empty() };
    if let Some((labels, _)) = &follow {
        pools = pools.with_labels(labels.clone());
    }
    let watch_pools = args.pools_dir.clone().map(|dir| {
        info!(dir = %dir.display(), every = ?ipam_server::pools::dir::POLL, "reading pools (again on SIGHUP and on change)");
        // Before serving, so an early ADD does not find the pools missing.
        pools.replace(ipam_server::pools::dir::load(&dir));
        tokio::spawn(
            ipam_server::pools::dir::watch(dir, pools.clone()).instrument(tracing::info_span!("pools-dir")),
        )
    });
    info!(%identity, store = engine.store(), "rust-ipam-server ready");
    let served = server::serve_single(
        engine,
        identity,
        listeners,
        (metrics, metrics_listener),
        reconciler,
        pools,
        shutdown_signal(),
    )
    .await;
    if let Some(w) = watch_pools {
        w.abort();
    }
    if let Some((_, task)) = follow {
        task.abort();
    }
    served
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
        Some(Command::ImportWhereabouts { files, from_namespace, dry_run }) => {
            return import_whereabouts(&args, files, from_namespace.as_deref(), *dry_run);
        }
        Some(Command::Crds { out }) => return write_crds(out.as_deref()),
        Some(Command::Reconcile { servers, dry_run, grace, timeout }) => {
            let mut replicas = rust_ipam_proto::Replicas::new(servers, None, *timeout)
                .map_err(|e| anyhow::anyhow!("--server: {e}"))?;
            return tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?
                .block_on(ipam_server::cli::reconcile(
                    &mut replicas,
                    &rust_ipam_proto::Bearer::default(),
                    *dry_run,
                    *grace,
                ));
        }
        None => {}
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run(args))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn store_flags_are_taken_after_a_subcommand_too() {
        let args = Args::try_parse_from([
            "rust-ipam-server",
            "import-whereabouts",
            "--from-namespace",
            "kube-system",
            "--kubeconfig",
            "K",
            "--store=kube",
            "--namespace",
            "ns",
            "--data-dir",
            "D",
        ])
        .expect("parse");
        assert_eq!(args.kubeconfig, Some(PathBuf::from("K")));
        assert_eq!(args.store, StoreKind::Kube);
        assert_eq!(args.namespace.as_deref(), Some("ns"));
        assert_eq!(args.data_dir, Some(PathBuf::from("D")));
        let before =
            Args::try_parse_from(["rust-ipam-server", "--store", "embedded", "crds"]).expect("parse");
        assert_eq!(before.store, StoreKind::Embedded);
    }

    #[test]
    fn metrics_listen_is_an_address_or_off() {
        let parse = |v: &str| Args::try_parse_from(["rust-ipam-server", "--metrics-listen", v]);
        assert_eq!(parse("off").expect("off").metrics_listen, MetricsListen::Off);
        assert_eq!(
            parse("[::1]:9090").expect("addr").metrics_listen,
            MetricsListen::At("[::1]:9090".parse().expect("addr"))
        );
        let err = parse("localhost:9090").expect_err("bad value").to_string();
        assert!(
            err.contains("invalid value 'localhost:9090' for '--metrics-listen <METRICS_LISTEN>': \"localhost:9090\" is neither ip:port nor off"),
            "{err}"
        );
    }
}
