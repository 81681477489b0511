//! `grpc-load`: drives gRPC Allocate against a rust-ipam server at several concurrency
//! levels and prints a markdown table of throughput and latency.
//!
//! By default it starts the real `rust-ipam-server` binary found next to its own executable,
//! on a free 127.0.0.1 port with a fresh temporary data directory (so every Allocate is a
//! durable redb commit), and kills it at the end. It only ever talks to a loopback address
//! or a unix socket.
//!
//! `--preload N --list-while` measures what listing costs allocation: the started server
//! begins with N leases written straight into its embedded store, and each level runs
//! twice, alone and then beside one more client that pages through ListLeases without a
//! pause.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use ipam_server::allocator::{Attachment, Change, FieldPrefix, Lease, PodRef, RangeInput, RangeSpec, Str};
use ipam_server::k8s::crd::IPLease;
use ipam_server::store::LeaseStore as _;
use ipam_server::store::embedded::EmbeddedStore;
use rust_ipam_benches::{IFNAME, ProcCpu, lease_spec, new_histogram, raw_creates};
use rust_ipam_e2e::envtest::{self, SERVER_ACCOUNT, TestNamespace};
use rust_ipam_e2e::kube_standin::KubeStandin;
use rust_ipam_e2e::{ServerOptions, ServerProcess, fixtures};
use rust_ipam_proto::v1 as pb;
use rust_ipam_proto::v1::admin_client::AdminClient;
use rust_ipam_proto::v1::ipam_client::IpamClient;
use tonic::transport::Channel;
use tracing::{Instrument as _, info, info_span, warn};

/// Load a rust-ipam server with concurrent gRPC Allocate calls and print a latency table.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Server to load instead of starting one: `http://127.0.0.1:PORT` (any loopback
    /// address) or `unix:///path`. Nothing else is accepted.
    #[arg(long, env = "GRPC_LOAD_SERVER")]
    server: Option<String>,
    /// Server binary to start. Default: `rust-ipam-server` in this executable's directory.
    #[arg(long, conflicts_with = "server")]
    server_bin: Option<PathBuf>,
    /// RUST_LOG of the started server. Its default `info` logs every allocation, as a
    /// deployed server does.
    #[arg(long, default_value = "info", conflicts_with = "server")]
    server_log: String,
    /// Concurrency levels, run one after another; each client has its own HTTP/2 connection.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    /// Length of each level.
    #[arg(long, default_value_t = 5)]
    duration_secs: u64,
    /// Also stop a level after this many calls in all (the duration still bounds it).
    #[arg(long)]
    requests: Option<u64>,
    /// Release each address right after allocating it; one op is then allocate + release.
    #[arg(long)]
    release_after: bool,
    /// Range to allocate from; a /8 is not exhausted by any run of reasonable length.
    #[arg(long, default_value = "10.0.0.0/8")]
    range: String,
    /// Network the leases are taken in. With `--server`, every attachment lease of this
    /// network is released at the end (GC with no valid attachments) unless `--keep-leases`.
    #[arg(long, default_value = "grpc-load")]
    network: String,
    /// With `--server`, leave the leases this run took in place.
    #[arg(long, requires = "server")]
    keep_leases: bool,
    /// Start the server on the kube store against an in-process Kubernetes API stand-in
    /// that answers each request after this many milliseconds (0: at once), instead of on
    /// the embedded store.
    #[arg(long, conflicts_with = "server")]
    kube_standin_ms: Option<u64>,
    /// Start the server on the kube store against a real kube-apiserver and etcd (found as
    /// the tests find them: $KUBEBUILDER_ASSETS, /usr/local/kubebuilder/bin, PATH), and
    /// measure raw IPLease creates at each level too: half the duration before ours and
    /// half after, both sides warmed up first, with the CPU each op costs by process.
    #[arg(long, conflicts_with_all = ["server", "kube_standin_ms"])]
    envtest: bool,
    /// Instead of load levels: write this many IPLeases straight to the API server (64 at
    /// a time); start a follower and wait until its mirror has listed them; stop the leader
    /// with SIGTERM and time the follower's takeover (win the election, load from the
    /// mirror, answer Status as serving); then start a server alone (no warm copy: it
    /// lists) and time its start to serving. Prints both with the servers' memory.
    #[arg(long, requires = "envtest", value_name = "LEASES")]
    leader_start: Option<u32>,
    /// With `--envtest`: etcd and kube-apiserver on the last CPU, the server and the
    /// clients on the others, as where the control plane has cores of its own.
    #[arg(long, requires = "envtest")]
    pin_control_plane: bool,
    /// Before starting the server (on the embedded store), write this many attachment
    /// leases of `--network` into its store, lowest addresses of `--range` first.
    #[arg(long, value_name = "LEASES", conflicts_with_all = ["server", "kube_standin_ms", "envtest"])]
    preload: Option<u32>,
    /// Run each level twice: alone, then while one more client pages through ListLeases
    /// (all networks, no filter) from the first page to the last, over and over.
    #[arg(long, conflicts_with = "envtest")]
    list_while: bool,
    /// ListLeases page size of `--list-while`.
    #[arg(long, default_value_t = 1000)]
    list_page: u32,
    /// Connect timeout and per-call deadline.
    #[arg(long, default_value_t = 10)]
    timeout_secs: u64,
}

/// How long a started server may take to answer Status.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// The node every lease of a run is allocated from (and GC frees on cleanup).
const NODE: &str = "grpc-load";

/// Accepts only endpoints that stay on this host.
fn check_local_endpoint(endpoint: &str) -> anyhow::Result<()> {
    if let Some(path) = endpoint.strip_prefix("unix://") {
        if path.is_empty() {
            bail!("--server {endpoint:?} has an empty unix socket path");
        }
        return Ok(());
    }
    let uri: tonic::transport::Uri =
        endpoint.parse().with_context(|| format!("--server {endpoint:?} is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        bail!("--server {endpoint:?} must start with http:// or unix://");
    }
    let host = uri.host().unwrap_or_default();
    let ip: IpAddr = host.trim_start_matches('[').trim_end_matches(']').parse().map_err(|_| {
        anyhow::anyhow!(
            "--server {endpoint:?}: host {host:?} is not an IP address; give a loopback address \
             such as 127.0.0.1 (this tool sends traffic nowhere else)"
        )
    })?;
    if !ip.is_loopback() {
        bail!("--server {endpoint:?}: {ip} is not a loopback address; this tool only loads local servers");
    }
    if uri.port_u16().is_none() {
        bail!("--server {endpoint:?} has no port");
    }
    Ok(())
}

/// A server this tool started, with its data directory and API stand-in; killed when
/// dropped (the process goes before its directory: field order).
struct SpawnedServer {
    process: ServerProcess,
    /// How it was started (to start another on the same store).
    opts: ServerOptions,
    _standin: Option<KubeStandin>,
    /// With `--envtest`: the namespace the server's leases are in.
    namespace: Option<TestNamespace>,
    _dir: tempfile::TempDir,
}

async fn spawn_server(args: &Args) -> anyhow::Result<SpawnedServer> {
    let dir = tempfile::Builder::new().prefix("grpc-load-").tempdir().context("creating a temp dir")?;
    let mut opts = ServerOptions {
        bin: args.server_bin.clone(),
        log_level: args.server_log.clone(),
        log_file: Some(dir.path().join("server.log")),
        identity: "grpc-load".into(),
        startup_timeout: STARTUP_TIMEOUT,
        ..ServerOptions::default()
    };
    let standin = match args.kube_standin_ms {
        Some(ms) => {
            let standin = KubeStandin::start_with_latency(Duration::from_millis(ms)).await?;
            let cfg = dir.path().join("kubeconfig");
            standin.kubeconfig(&cfg, "grpc-load")?;
            opts.args = vec!["--kubeconfig".into(), cfg.display().to_string()];
            info!(url = %standin.url, latency_ms = ms, "started the Kubernetes API stand-in");
            Some(standin)
        }
        None => None,
    };
    let namespace = if args.envtest {
        let env = envtest::shared("grpc-load --envtest").context("kube-apiserver and etcd are needed")?;
        if args.pin_control_plane {
            info!(cpus = %rust_ipam_benches::pin_control_plane(env)?, "pinned");
        }
        let ns = env.namespace("grpc-load").await?;
        opts.args =
            ["--kubeconfig", &ns.kubeconfig(SERVER_ACCOUNT).display().to_string(), "--namespace", &ns.name]
                .map(String::from)
                .to_vec();
        info!(url = %env.url, namespace = %ns.name, "started kube-apiserver");
        Some(ns)
    } else {
        None
    };
    if let Some(count) = args.preload {
        let t = Instant::now();
        preload(&dir.path().join("data"), &args.network, &args.range, count)?;
        info!(count, secs = t.elapsed().as_secs_f64(), "preloaded the store");
        // Loading a million leases takes the server seconds, not the default 20 s bound.
        opts.startup_timeout = Duration::from_secs(600);
    }
    let t = Instant::now();
    let process = ServerProcess::start_with(&dir.path().join("data"), &opts).await?;
    info!(endpoint = %process.endpoint, data_dir = %dir.path().display(), secs = t.elapsed().as_secs_f64(),
        "started server");
    Ok(SpawnedServer { process, opts, _standin: standin, namespace, _dir: dir })
}

/// Leases written to the embedded store per commit by [`preload`].
const PRELOAD_CHUNK: u32 = 100_000;

/// Writes `count` attachment leases (one pod each, as a full cluster holds them) of
/// `network` into a new embedded store in `data_dir`: the records a server would have
/// written, without a million gRPC round trips first.
fn preload(data_dir: &Path, network: &str, range: &str, count: u32) -> anyhow::Result<()> {
    let input = RangeInput { range: range.to_string(), ..Default::default() };
    let spec =
        RangeSpec::parse(&input, FieldPrefix("")).map_err(|e| anyhow::anyhow!("--range {range}: {e}"))?;
    if u128::from(count) >= spec.size() {
        bail!("--range {range} ({} addresses) cannot hold {count} leases and allocate more", spec.size());
    }
    let mut store = EmbeddedStore::open(data_dir)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let (network, range_str) = (Str::from(network), Str::from(spec.display()));
    let mut changes = vec![Change::PutPool { network: network.clone(), range: input.clone() }];
    for n in 0..count {
        let id = format!("preload-{n}");
        let holder = Attachment {
            container_id: id.clone(),
            ifname: IFNAME.into(),
            pod: PodRef { namespace: "grpc-load".into(), name: id, uid: String::new() },
            node: NODE.into(),
            ..Default::default()
        };
        changes.push(Change::PutLease(Arc::new(Lease {
            address: spec.addr(u128::from(n)),
            network: network.clone(),
            range: range_str.clone(),
            prefix_len: spec.prefix_len(),
            gateway: spec.gateway(),
            holder: Arc::new(holder),
            created_unix_ms: now,
            note: String::new(),
        })));
        if changes.len() as u32 == PRELOAD_CHUNK || n + 1 == count {
            store.commit(&changes).map_err(|e| anyhow::anyhow!("preloading the store: {e}"))?;
            changes.clear();
        }
    }
    Ok(())
}

/// What every client of one level shares.
#[derive(Debug)]
struct Plan {
    /// Prefix that makes container IDs unique across runs and levels.
    id_prefix: String,
    network: String,
    range: String,
    release_after: bool,
    deadline: Instant,
    max_requests: Option<u64>,
    /// Calls started so far, for `max_requests`.
    started: AtomicU64,
}

/// What one client measured.
#[derive(Debug)]
struct Tally {
    /// Latency of each successful op, in microseconds.
    hist: Histogram<u64>,
    errors: u64,
    first_error: Option<tonic::Status>,
}

/// One op: Allocate, and Release too with `--release-after`.
async fn op(ipam: &mut IpamClient<Channel>, plan: &Plan, container_id: &str) -> Result<(), tonic::Status> {
    let pod = fixtures::pod("grpc-load", container_id, "");
    let mut req = fixtures::allocate_request(container_id, Some(pod), NODE, &plan.range);
    req.network = plan.network.clone();
    let attachment = req.attachment.clone();
    let got = ipam.allocate(req).await?.into_inner();
    if got.leases.len() != 1 {
        return Err(tonic::Status::internal(format!(
            "Allocate answered {} leases for one range",
            got.leases.len()
        )));
    }
    if plan.release_after {
        ipam.release(pb::ReleaseRequest { attachment, network: plan.network.clone() }).await?;
    }
    Ok(())
}

async fn client(mut ipam: IpamClient<Channel>, plan: Arc<Plan>, id: usize) -> anyhow::Result<Tally> {
    let mut tally = Tally { hist: new_histogram()?, errors: 0, first_error: None };
    for seq in 0u64.. {
        if Instant::now() >= plan.deadline {
            break;
        }
        if plan.max_requests.is_some_and(|max| plan.started.fetch_add(1, Ordering::Relaxed) >= max) {
            break;
        }
        let container_id = format!("{}-{id}-{seq}", plan.id_prefix);
        let t = Instant::now();
        match op(&mut ipam, &plan, &container_id).await {
            Ok(()) => {
                let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                tally.hist.saturating_record(us.max(1));
            }
            Err(status) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(status);
            }
        }
    }
    Ok(tally)
}

/// What the `--list-while` client measured in one level.
#[derive(Debug)]
struct Listed {
    leases: u64,
    /// Latency of each page, in microseconds.
    pages: Histogram<u64>,
    /// Times it read from the first page to the last.
    passes: u64,
    errors: u64,
    elapsed: Duration,
}

/// Pages through every lease until `deadline`, starting over after the last page.
async fn list_until(
    mut admin: AdminClient<Channel>,
    deadline: Instant,
    page_size: u32,
) -> anyhow::Result<Listed> {
    let started = Instant::now();
    let mut listed =
        Listed { leases: 0, pages: new_histogram()?, passes: 0, errors: 0, elapsed: Duration::ZERO };
    let mut req = pb::ListLeasesRequest { page_size, ..Default::default() };
    while Instant::now() < deadline {
        let t = Instant::now();
        match admin.list_leases(req.clone()).await {
            Ok(page) => {
                let page = page.into_inner();
                listed
                    .pages
                    .saturating_record(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX).max(1));
                listed.leases += page.leases.len() as u64;
                if page.next_page_token.is_empty() {
                    listed.passes += 1;
                }
                req.page_token = page.next_page_token;
            }
            Err(status) => {
                if listed.errors == 0 {
                    warn!(code = ?status.code(), message = status.message(), "ListLeases failed");
                }
                listed.errors += 1;
            }
        }
    }
    listed.elapsed = started.elapsed();
    Ok(listed)
}

/// One row of the table.
#[derive(Debug)]
struct Row {
    /// With `--list-while`: what the lister did meanwhile (`None`: the level ran alone).
    listed: Option<Listed>,
    /// With `--envtest`: raw IPLease creates at the same concurrency beside ours.
    raw: Option<VsRaw>,
    clients: usize,
    requests: u64,
    ops_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    errors: u64,
}

/// Raw IPLease creates at a level's concurrency, and the CPU each of those and each of our
/// ops cost.
#[derive(Debug)]
struct VsRaw {
    raw: Box<Row>,
    /// API requests (every verb and resource) per op of ours.
    requests_per_op: f64,
    /// API writes on rust-ipam's resources per op of ours.
    writes_per_op: f64,
    /// CPU milliseconds per raw create, and per op of ours.
    raw_cpu: Cpu,
    ours_cpu: Cpu,
}

/// CPU time by who spent it: kube-apiserver and etcd together, our server, and this
/// process (the raw kube clients or the gRPC load clients).
#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    api: f64,
    server: f64,
    load: f64,
}

impl Cpu {
    /// CPU seconds spent between two snapshots.
    fn between(after: &ProcCpu, before: &ProcCpu) -> Cpu {
        let spent = after.since(before);
        let of = |names: &[&str]| -> f64 {
            names.iter().filter_map(|n| spent.get(*n)).map(|(own, reaped)| own + reaped).sum()
        };
        // Command names as /proc gives them: cut at 15 characters.
        Cpu {
            api: of(&["kube-apiserver", "etcd"]),
            server: of(&["rust-ipam-serve"]),
            load: of(&["grpc-load"]),
        }
    }

    fn plus(self, o: Cpu) -> Cpu {
        Cpu { api: self.api + o.api, server: self.server + o.server, load: self.load + o.load }
    }

    /// Milliseconds per one of `count`.
    fn ms_each(self, count: f64) -> Cpu {
        let each = |s: f64| s * 1000.0 / count.max(1.0);
        Cpu { api: each(self.api), server: each(self.server), load: each(self.load) }
    }
}

async fn run_level(
    endpoint: &str,
    args: &Args,
    level: usize,
    clients: usize,
    duration: Duration,
    run_id: &str,
    list: bool,
) -> anyhow::Result<Row> {
    let timeout = Duration::from_secs(args.timeout_secs);
    // Connect every client before the clock starts: connection setup is not what we measure.
    let mut channels = Vec::with_capacity(clients);
    for i in 0..clients {
        let ch = rust_ipam_proto::connect(endpoint, timeout)
            .await
            .with_context(|| format!("connecting client {i} to {endpoint}"))?;
        channels.push(IpamClient::new(ch));
    }
    let admin = match list {
        true => Some(AdminClient::new(
            rust_ipam_proto::connect(endpoint, timeout).await.context("connecting the lister")?,
        )),
        false => None,
    };
    let started = Instant::now();
    let plan = Arc::new(Plan {
        id_prefix: format!("load-{run_id}-{level}-{}", if list { "list" } else { "alone" }),
        network: args.network.clone(),
        range: args.range.clone(),
        release_after: args.release_after,
        deadline: started + duration,
        max_requests: args.requests,
        started: AtomicU64::new(0),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (i, ipam) in channels.into_iter().enumerate() {
        let span = info_span!("client", clients, id = i);
        tasks.spawn(client(ipam, plan.clone(), i).instrument(span));
    }
    let lister = admin.map(|admin| {
        tokio::spawn(list_until(admin, plan.deadline, args.list_page).instrument(info_span!("lister")))
    });
    let mut hist = new_histogram()?;
    let mut errors = 0;
    let mut first_error = None;
    while let Some(t) = tasks.join_next().await {
        let t = t.context("client task panicked")??;
        hist.add(&t.hist).context("merging latency histograms")?;
        errors += t.errors;
        first_error = first_error.or(t.first_error);
    }
    if let Some(e) = first_error {
        warn!(clients, errors, code = ?e.code(), message = e.message(), "calls failed; first error shown");
    }
    let mut row = row(clients, &hist, errors, started.elapsed());
    if let Some(lister) = lister {
        row.listed = Some(lister.await.context("lister panicked")??);
    }
    Ok(row)
}

fn row(clients: usize, hist: &Histogram<u64>, errors: u64, elapsed: Duration) -> Row {
    let elapsed = elapsed.as_secs_f64();
    let ms = |us: u64| us as f64 / 1000.0;
    let ok = hist.len();
    Row {
        listed: None,
        raw: None,
        clients,
        requests: ok + errors,
        ops_per_sec: ok as f64 / elapsed,
        p50_ms: ms(hist.value_at_quantile(0.50)),
        p99_ms: ms(hist.value_at_quantile(0.99)),
        max_ms: ms(hist.max()),
        errors,
    }
}

/// One stretch of raw IPLease creates: what they saw, how long they ran, and the CPU
/// seconds spent meanwhile.
struct RawStretch {
    hist: Histogram<u64>,
    errors: u64,
    elapsed: Duration,
    cpu: Cpu,
}

/// The API server's limit at `clients`: each client creates IPLeases over its own kube
/// client (keep-alive connections) as fast as it is answered, for `duration`. `slice`
/// tells a level's stretches apart (their names and addresses do not meet).
async fn raw_level(
    ns: &TestNamespace,
    level: usize,
    slice: usize,
    clients: usize,
    duration: Duration,
    run_id: &str,
) -> anyhow::Result<RawStretch> {
    let mut apis = Vec::with_capacity(clients);
    for _ in 0..clients {
        let client = ns.client(SERVER_ACCOUNT).await?;
        apis.push(kube::Api::<IPLease>::namespaced(client, &ns.name));
    }
    let cpu_before = ProcCpu::now()?;
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, api) in apis.into_iter().enumerate() {
        // A /16 per client, stretch and level, apart from what the server allocates in
        // --range (at most RAW_CLIENTS clients a level).
        let base =
            0xC612_0000u32.wrapping_add((((level * 2 + slice) * RAW_CLIENTS + i) as u32 & 0x3fff) << 16);
        let prefix = format!("raw-{run_id}-{level}-{slice}-{i}");
        tasks.spawn(async move {
            let mut hist = new_histogram()?;
            let errors =
                raw_creates(&api, NODE, base, &prefix, |_| Instant::now() < deadline, &mut hist).await;
            anyhow::Ok((hist, errors))
        });
    }
    let mut hist = new_histogram()?;
    let mut errors = 0;
    while let Some(t) = tasks.join_next().await {
        let (h, e) = t.context("raw client panicked")??;
        hist.add(&h).context("merging latency histograms")?;
        errors += e;
    }
    let elapsed = started.elapsed();
    Ok(RawStretch { hist, errors, elapsed, cpu: Cpu::between(&ProcCpu::now()?, &cpu_before) })
}

/// Seconds raw creates and ours run, unmeasured, before the first level with `--envtest`.
const WARM_UP_SECS: u64 = 2;

/// The most clients a level may have with `--envtest` (each raw client takes a /16 of
/// 198.18.0.0/15 and up, per stretch).
const RAW_CLIENTS: usize = 256;

/// `--leader-start`: `count` leases straight into the store, then a new leader's start.
async fn leader_start(spawned: &mut SpawnedServer, args: &Args, count: u32) -> anyhow::Result<()> {
    let ns = spawned.namespace.as_ref().context("--leader-start needs --envtest")?;
    let range: ipnetwork::Ipv4Network =
        args.range.parse().with_context(|| format!("--range {}", args.range))?;
    if u64::from(count) + 2 > u64::from(range.size()) {
        bail!("--range {} cannot hold {count} leases", args.range);
    }
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(1));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let api = kube::Api::<IPLease>::namespaced(ns.client(SERVER_ACCOUNT).await?, &ns.name);
        let (next, network, range_text) = (next.clone(), args.network.clone(), args.range.clone());
        let base = u32::from(range.network());
        tasks.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n > u64::from(count) {
                    return anyhow::Ok(());
                }
                let address = IpAddr::V4((base + n as u32).into());
                let spec = lease_spec(
                    NODE,
                    &network,
                    &address.to_string(),
                    &range_text,
                    range.prefix(),
                    &format!("preload-{n}"),
                );
                let obj = IPLease::new(&ipam_server::k8s::crd::lease_name(&network, address), spec);
                api.create(&kube::api::PostParams::default(), &obj)
                    .await
                    .with_context(|| format!("creating {address}"))?;
            }
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.context("a writer panicked")??;
    }
    let wrote = started.elapsed();
    info!(count, secs = wrote.as_secs_f64(), "wrote the IPLeases");

    // A follower beside the leader: its mirror lists and watches the leases. Then a
    // handover (SIGTERM releases the Lease): the clock runs from the signal to the
    // follower's first `serving` Status.
    let follower_dir = tempfile::Builder::new().prefix("grpc-load-").tempdir()?;
    let follower_log = follower_dir.path().join("follower.log");
    let follower_opts = ServerOptions {
        identity: "grpc-load-follower".into(),
        log_level: "info".into(),
        log_file: Some(follower_log.clone()),
        wait_serving: false,
        ..spawned.opts.clone()
    };
    let mut follower = ServerProcess::start_with(&follower_dir.path().join("data"), &follower_opts).await?;
    let t = Instant::now();
    while !std::fs::read_to_string(&follower_log)?.contains("lease mirror listed") {
        if t.elapsed() > Duration::from_secs(600) {
            bail!("the follower's mirror did not list the leases within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mirror_listed = t.elapsed();
    let follower_rss = rss(follower.pid())?;
    let t = Instant::now();
    let status = spawned.process.terminate().context("stopping the first server")?;
    info!(%status, "the first leader stopped");
    let ch = rust_ipam_proto::connect(&follower.endpoint, Duration::from_secs(5)).await?;
    let mut ipam = IpamClient::new(ch);
    let taken_over = loop {
        if ipam.status(pb::StatusRequest {}).await.is_ok_and(|s| s.get_ref().serving) {
            break t.elapsed();
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("the follower did not take over within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let warm_used = ipam.status(pb::StatusRequest {}).await?.into_inner().leases;
    // SIGTERM: it releases the Lease, so the next server wins the election at once and its
    // clock is its own start.
    follower.terminate().context("stopping the follower")?;
    // The API server's own floors: a paged list from etcd, and one list from its watch
    // cache (what a server uses), objects decoded and dropped.
    let api = kube::Api::<IPLease>::namespaced(ns.client(SERVER_ACCOUNT).await?, &ns.name);
    let t = Instant::now();
    let mut listed = 0usize;
    ipam_server::k8s::for_each_page(
        2000,
        |lp| {
            let api = &api;
            async move { api.list(&lp).await }
        },
        |_| listed += 1,
    )
    .await
    .context("listing the IPLeases")?;
    let paged_floor = t.elapsed();
    info!(listed, secs = paged_floor.as_secs_f64(), "listed the IPLeases from etcd, paged");
    let t = Instant::now();
    let mut listed = 0usize;
    ipam_server::k8s::for_each_cached(&api, |_: IPLease| listed += 1)
        .await
        .context("listing the IPLeases")?;
    let cached_floor = t.elapsed();
    info!(listed, secs = cached_floor.as_secs_f64(), "listed the IPLeases from the watch cache");
    let dir = tempfile::Builder::new().prefix("grpc-load-").tempdir()?;
    let opts = ServerOptions { startup_timeout: Duration::from_secs(600), ..spawned.opts.clone() };
    let t = Instant::now();
    let second = ServerProcess::start_with(&dir.path().join("data"), &opts).await?;
    let to_serve = t.elapsed();
    let cold_rss = rss(second.pid())?;
    let ch = rust_ipam_proto::connect(&second.endpoint, Duration::from_secs(5)).await?;
    let used = IpamClient::new(ch).status(pb::StatusRequest {}).await?.into_inner().leases;
    println!(
        "| IPLeases in the API server | written at | list alone: paged from etcd (2000 a page) | list alone: at once from the watch cache | follower's mirror listed | handover: SIGTERM to the follower serving | leases loaded | follower memory (peak) | new leader alone: start to serving | leases loaded | its memory (peak) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {count} | {:.0}/s | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {warm_used} | {follower_rss} | {:.2} s | {used} | {cold_rss} |",
        f64::from(count) / wrote.as_secs_f64(),
        paged_floor.as_secs_f64(),
        cached_floor.as_secs_f64(),
        mirror_listed.as_secs_f64(),
        taken_over.as_secs_f64(),
        to_serve.as_secs_f64(),
    );
    Ok(())
}

/// The resident memory of process `pid` now and at its peak, as /proc shows them
/// (`123456 kB (234567 kB)`).
fn rss(pid: u32) -> anyhow::Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_default();
        line.trim_start_matches(name).trim().to_string()
    };
    Ok(format!("{} ({})", field("VmRSS:"), field("VmHWM:")))
}

/// The requests the API server has served in all and the writes (create, update, patch,
/// delete) on rust-ipam's resources among them, from its own `apiserver_request_total`.
async fn api_counts(admin: &kube::Client) -> anyhow::Result<(f64, f64)> {
    let counts = rust_ipam_benches::api_requests(admin).await?;
    let writes =
        counts.iter().filter(|(r, _)| r.is_write() && r.group == "ipam.rust-ipam.io").map(|(_, n)| n);
    Ok((counts.values().sum(), writes.sum()))
}

fn print_table(rows: &[Row]) {
    if rows.iter().any(|r| r.listed.is_some()) {
        println!(
            "| clients | lister | requests | ops/s | p50 ms | p99 ms | max ms | errors | leases listed/s | list page p50 ms | list page p99 ms | list page max ms |"
        );
        println!(
            "|--------:|:------|---------:|------:|-------:|-------:|-------:|-------:|------:|------:|------:|------:|"
        );
        for r in rows {
            let list = match &r.listed {
                Some(l) => {
                    let ms = |q: f64| l.pages.value_at_quantile(q) as f64 / 1000.0;
                    format!(
                        "{:.0} | {:.2} | {:.2} | {:.2}",
                        l.leases as f64 / l.elapsed.as_secs_f64(),
                        ms(0.5),
                        ms(0.99),
                        l.pages.max() as f64 / 1000.0
                    )
                }
                None => "- | - | - | -".into(),
            };
            println!(
                "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {list} |",
                r.clients,
                if r.listed.is_some() { "yes" } else { "no" },
                r.requests,
                r.ops_per_sec,
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.errors + r.listed.as_ref().map_or(0, |l| l.errors),
            );
        }
        return;
    }
    if rows.iter().any(|r| r.raw.is_some()) {
        println!(
            "| clients | raw creates/s | raw p99 ms | ops/s | p50 ms | p99 ms | max ms | errors | ops/s vs raw | p99 vs raw | API requests/op | API writes/op | CPU ms/raw create: API, clients | CPU ms/op: API, server, clients |"
        );
        println!(
            "|--------:|--------------:|-----------:|------:|-------:|-------:|-------:|-------:|-------------:|-----------:|------:|--------------:|------:|------:|"
        );
        for r in rows {
            let Some(VsRaw { raw, requests_per_op, writes_per_op, raw_cpu, ours_cpu }) = &r.raw else {
                continue;
            };
            println!(
                "| {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2}, {:.2} | {:.2}, {:.2}, {:.2} |",
                r.clients,
                raw.ops_per_sec,
                raw.p99_ms,
                r.ops_per_sec,
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.errors + raw.errors,
                r.ops_per_sec / raw.ops_per_sec,
                r.p99_ms / raw.p99_ms,
                requests_per_op,
                writes_per_op,
                raw_cpu.api,
                raw_cpu.load,
                ours_cpu.api,
                ours_cpu.server,
                ours_cpu.load
            );
        }
        return;
    }
    println!("| clients | requests | ops/s | p50 ms | p99 ms | max ms | errors |");
    println!("|--------:|---------:|------:|-------:|-------:|-------:|-------:|");
    for r in rows {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} |",
            r.clients, r.requests, r.ops_per_sec, r.p50_ms, r.p99_ms, r.max_ms, r.errors
        );
    }
}

/// Releases what this run left in `--network` on a server it did not start.
async fn clean_up(endpoint: &str, network: &str, timeout: Duration) -> anyhow::Result<()> {
    let ch = rust_ipam_proto::connect(endpoint, timeout).await.context("connecting for cleanup")?;
    let released = IpamClient::new(ch)
        .gc(pb::GcRequest { network: network.to_string(), valid_attachments: Vec::new(), node: NODE.into() })
        .await
        .context("releasing the run's leases (GC)")?
        .into_inner()
        .released
        .len();
    info!(network, released, "released the leases of this run");
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.clients.is_empty() || args.clients.contains(&0) {
        bail!("--clients {:?} must list positive counts, e.g. 1,16,64", args.clients);
    }
    if args.duration_secs == 0 {
        bail!("--duration-secs must be at least 1");
    }
    if args.envtest && args.clients.iter().any(|&c| c > RAW_CLIENTS) {
        bail!("--clients {:?}: at most {RAW_CLIENTS} with --envtest", args.clients);
    }
    let timeout = Duration::from_secs(args.timeout_secs);
    let mut spawned = None;
    let endpoint = match &args.server {
        Some(url) => {
            check_local_endpoint(url)?;
            url.clone()
        }
        None => spawned.insert(spawn_server(&args).await?).process.endpoint.clone(),
    };
    if let (Some(count), Some(s)) = (args.leader_start, spawned.as_mut()) {
        return leader_start(s, &args, count).await;
    }
    let run_id = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis()).to_string();
    info!(%endpoint, range = %args.range, network = %args.network, release_after = args.release_after,
        duration_secs = args.duration_secs, "load run");

    let mut rows = Vec::new();
    let levels = async {
        let namespace = spawned.as_ref().and_then(|s| s.namespace.as_ref());
        let admin = match namespace {
            Some(ns) => Some(ns.admin_client().await?),
            None => None,
        };
        let duration = Duration::from_secs(args.duration_secs);
        if let (Some(ns), Some(&clients)) = (namespace, args.clients.first()) {
            // A fresh API server answers its first creates of a resource slowly, and a
            // fresh server creates its range's RangePool first: neither is what a level
            // measures, so both sides warm up unmeasured (as one more level's names).
            let (warm_up, level) = (Duration::from_secs(WARM_UP_SECS), args.clients.len());
            raw_level(ns, level, 0, clients, warm_up, &run_id).await?;
            run_level(&endpoint, &args, level, clients, warm_up, &run_id, false).await?;
        }
        for (level, &clients) in args.clients.iter().enumerate() {
            if args.list_while {
                for list in [false, true] {
                    let row = run_level(&endpoint, &args, level, clients, duration, &run_id, list).await?;
                    if let Some(l) = &row.listed {
                        info!(clients, leases_listed = l.leases, passes = l.passes, "lister done");
                    }
                    info!(
                        clients,
                        list,
                        ops_per_sec = row.ops_per_sec as u64,
                        p99_ms = row.p99_ms,
                        "level done"
                    );
                    rows.push(row);
                }
                continue;
            }
            let (Some(ns), Some(admin)) = (namespace, &admin) else {
                let row = run_level(&endpoint, &args, level, clients, duration, &run_id, false).await?;
                info!(clients, ops_per_sec = row.ops_per_sec as u64, p99_ms = row.p99_ms, "level done");
                rows.push(row);
                continue;
            };
            // Raw creates for half the duration before ours and half after: the API server
            // gets slower as its store grows, and this way both sides see it at the same
            // size on average (ours always second was measured at 15% more API CPU per
            // create than raw; ours first, at less).
            let half = Duration::from_secs_f64(args.duration_secs as f64 / 2.0);
            let mut raw = raw_level(ns, level, 0, clients, half, &run_id).await?;
            let counts_before = api_counts(admin).await?;
            let cpu_before = ProcCpu::now()?;
            let mut row = run_level(&endpoint, &args, level, clients, duration, &run_id, false).await?;
            let cpu = Cpu::between(&ProcCpu::now()?, &cpu_before);
            let counts = api_counts(admin).await?;
            let after = raw_level(ns, level, 1, clients, half, &run_id).await?;
            raw.hist.add(&after.hist).context("merging latency histograms")?;
            let raw_row =
                self::row(clients, &raw.hist, raw.errors + after.errors, raw.elapsed + after.elapsed);
            // Less the one request that read the counters before.
            let (requests, writes) = (counts.0 - counts_before.0 - 1.0, counts.1 - counts_before.1);
            let ops = (row.requests - row.errors).max(1) as f64;
            let creates = (raw_row.requests - raw_row.errors).max(1) as f64;
            info!(clients, raw_per_sec = raw_row.ops_per_sec as u64, "raw creates");
            row.raw = Some(VsRaw {
                raw: Box::new(raw_row),
                requests_per_op: requests / ops,
                writes_per_op: writes / ops,
                raw_cpu: raw.cpu.plus(after.cpu).ms_each(creates),
                ours_cpu: cpu.ms_each(ops),
            });
            info!(clients, ops_per_sec = row.ops_per_sec as u64, p99_ms = row.p99_ms, "level done");
            rows.push(row);
        }
        anyhow::Ok(())
    };
    // On Ctrl-C, still print what was measured and stop the server this tool started.
    let mut outcome = tokio::select! {
        r = levels => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if !rows.is_empty() {
        print_table(&rows);
    }

    match spawned {
        Some(mut s) => {
            // Killing it is fine: every answered Allocate is already durable, and the data
            // directory is discarded.
            if let Err(e) = s.process.kill_hard() {
                warn!(error = %format!("{e:#}"), "could not kill the server");
            }
        }
        None if !args.keep_leases && !args.release_after => {
            let cleaned = clean_up(&endpoint, &args.network, timeout).await;
            // A failed level's error matters more than the cleanup's.
            match (&outcome, cleaned) {
                (Ok(()), Err(e)) => outcome = Err(e),
                (Err(_), Err(e)) => warn!(error = %format!("{e:#}"), "cleanup failed too"),
                (_, Ok(())) => {}
            }
        }
        None => {}
    }
    outcome
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(endpoint: &str) -> String {
        check_local_endpoint(endpoint).expect_err(endpoint).to_string()
    }

    #[test]
    fn accepts_only_local_endpoints() {
        for ok in ["http://127.0.0.1:50051", "http://127.0.0.2:1", "http://[::1]:50051", "unix:///run/x.sock"]
        {
            check_local_endpoint(ok).expect(ok);
        }
        assert_eq!(
            err("http://10.1.2.3:50051"),
            "--server \"http://10.1.2.3:50051\": 10.1.2.3 is not a loopback address; this tool only \
             loads local servers"
        );
        assert_eq!(
            err("http://localhost:50051"),
            "--server \"http://localhost:50051\": host \"localhost\" is not an IP address; give a \
             loopback address such as 127.0.0.1 (this tool sends traffic nowhere else)"
        );
        assert_eq!(
            err("https://127.0.0.1:50051"),
            "--server \"https://127.0.0.1:50051\" must start with http:// or unix://"
        );
        assert_eq!(err("127.0.0.1:50051"), "--server \"127.0.0.1:50051\" must start with http:// or unix://");
        assert_eq!(err("http://127.0.0.1"), "--server \"http://127.0.0.1\" has no port");
        assert_eq!(err("unix://"), "--server \"unix://\" has an empty unix socket path");
    }
}
