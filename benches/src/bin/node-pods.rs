//! Time to start pods on a real node (tests/src/node.rs: kubelet 1.36, containerd,
//! `rust-multus` as the node's CNI): N pods with M macvlan NADs each, created at once,
//! from the first create to all Running, every address then checked inside each pod's
//! sandbox against its network-status (no address twice).
//!
//! Five runs in the same process per round, the pods deleted between: thin rust-multus with
//! the reference `host-local` (node-local, the floor), and with `rust-ipam` against a
//! server on the embedded store and on the kube store (a real kube-apiserver, the server
//! under the ServiceAccount and RBAC of deploy/); then thick mode (`rust-multus-shim` +
//! `rust-multus-daemon`, tests/src/node.rs' `set_thick`) with `rust-ipam` on the embedded
//! and on the kube store.
//!
//! One round on a shared 2-core machine swings by more than the rows differ, so: each
//! round starts with a different row (the order rotates, no row always runs just after
//! another's teardown), each run waits until the CPUs are idle (`--settle-idle`), and the
//! summary gives each row's median ratio to the floor of its own round over all rounds.
//!
//! Needs root and what the node tests need (README: "A real node for the tests").

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use rust_ipam_benches::{ApiRequest, ProcCpu, USER_HZ, api_requests, api_requests_since, max, median, min};
use rust_ipam_e2e::envtest::{self, TestNamespace};
use rust_ipam_e2e::node::{self, Node};
use rust_ipam_e2e::{ServerOptions, ServerProcess};
use serde_json::{Value, json};

/// Pods × NADs to Running on a real node, host-local vs rust-ipam, thin vs thick.
#[derive(Debug, Parser)]
struct Args {
    /// Pods per run.
    #[arg(long, default_value_t = 48)]
    pods: usize,
    /// NADs (net1..netM) per pod, at most the node's host links (8).
    #[arg(long, default_value_t = 8)]
    nads: usize,
    /// Rounds of the five runs.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Before each run, wait (up to 120 s) until this share of the CPU time over one second
    /// is idle, so a run does not start inside the previous one's teardown. 0 waits not.
    #[arg(long, default_value_t = 0.85)]
    settle_idle: f64,
    /// etcd and kube-apiserver on the last CPU; the node (containerd, the kubelet, the
    /// pods, the CNI plugins, rust-ipam-server) on the others, as on a worker node whose
    /// control plane runs elsewhere.
    #[arg(long)]
    pin_control_plane: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ipam {
    HostLocal,
    Embedded,
    Kube,
    /// Thick mode, rust-ipam on the embedded store.
    Thick,
    /// Thick mode, rust-ipam on the kube store.
    ThickKube,
}

impl Ipam {
    const ALL: [Ipam; 5] = [Ipam::HostLocal, Ipam::Embedded, Ipam::Kube, Ipam::Thick, Ipam::ThickKube];

    fn label(self) -> &'static str {
        match self {
            Ipam::HostLocal => "rust-multus + host-local (node-local, the floor)",
            Ipam::Embedded => "rust-multus + rust-ipam, embedded store",
            Ipam::Kube => "rust-multus + rust-ipam, kube store (real API server)",
            Ipam::Thick => "rust-multus thick (shim + daemon) + rust-ipam, embedded store",
            Ipam::ThickKube => "rust-multus thick (shim + daemon) + rust-ipam, kube store",
        }
    }

    fn thick(self) -> bool {
        matches!(self, Ipam::Thick | Ipam::ThickKube)
    }
}

/// Creates the NADs `nad0..` in `ns`, each on its own host link and range.
async fn nads(ns: &TestNamespace, count: usize, ipam: Value) -> anyhow::Result<()> {
    for i in 0..count {
        let mut ipam = ipam.clone();
        let range = format!("10.{}.0.0/16", 100 + i);
        if ipam["type"] == "host-local" {
            ipam["subnet"] = json!(range);
            ipam["dataDir"] = json!(format!("{}/nad{i}", ipam["dataDir"].as_str().unwrap_or_default()));
        } else {
            ipam["range"] = json!(range);
        }
        node::macvlan_nad(ns, &format!("nad{i}"), &node::master(i), ipam).await?;
    }
    Ok(())
}

/// Where the CPU time and the API requests of one run went, from its first pod create to
/// all Running.
struct Spent {
    /// CPU seconds on all CPUs together, busy and in all.
    busy: f64,
    total: f64,
    /// CPU seconds by what spent them, in the table's column order.
    cpu: Vec<f64>,
    /// The three processes (by name) that spent most outside the columns.
    others: Vec<(String, f64)>,
    requests: BTreeMap<ApiRequest, f64>,
}

/// Whose CPU time a column of the "where the time went" table counts, by command name as
/// /proc/PID/stat gives it (cut at 15 characters).
enum Whose {
    /// These processes' own time and that of the children they reaped.
    Tree(&'static [&'static str]),
    /// This process's own time only.
    Own(&'static str),
    /// The time of the children this process reaped (a CNI plugin's time lands in the
    /// runtime that ran and waited for it).
    Reaped(&'static str),
}

const CPU_COLUMNS: [(&str, Whose); 8] = [
    ("kube-apiserver", Whose::Tree(&["kube-apiserver"])),
    ("etcd", Whose::Tree(&["etcd"])),
    ("kubelet", Whose::Tree(&["kubelet"])),
    ("containerd", Whose::Own("containerd")),
    ("CNI plugins (run by containerd)", Whose::Reaped("containerd")),
    ("shims, runc, pause", Whose::Tree(&["containerd-shim", "pause"])),
    ("rust-ipam-server", Whose::Tree(&["rust-ipam-serve"])),
    ("rust-multus-daemon and its plugins", Whose::Tree(&["rust-multus-dae"])),
];

impl Spent {
    fn measure(
        cpu: (&ProcCpu, &ProcCpu),
        stat: ((u64, u64), (u64, u64)),
        requests: BTreeMap<ApiRequest, f64>,
    ) -> Spent {
        let by_name = cpu.1.since(cpu.0);
        let get = |name: &str| by_name.get(name).copied().unwrap_or_default();
        let columns = CPU_COLUMNS
            .iter()
            .map(|(_, whose)| match whose {
                Whose::Tree(names) => names.iter().map(|n| get(n).0 + get(n).1).sum(),
                Whose::Own(name) => get(name).0,
                Whose::Reaped(name) => get(name).1,
            })
            .collect();
        let counted = |name: &str| {
            CPU_COLUMNS.iter().any(|(_, w)| match w {
                Whose::Tree(names) => names.contains(&name),
                Whose::Own(n) | Whose::Reaped(n) => *n == name,
            })
        };
        let mut others: Vec<(String, f64)> = by_name
            .iter()
            .filter(|(name, _)| !counted(name))
            .map(|(name, (own, reaped))| (name.clone(), own + reaped))
            .collect();
        others.sort_by(|a, b| b.1.total_cmp(&a.1));
        others.truncate(3);
        let ((idle0, total0), (idle1, total1)) = stat;
        let total = (total1 - total0) as f64 / USER_HZ;
        Spent { busy: total - (idle1 - idle0) as f64 / USER_HZ, total, cpu: columns, others, requests }
    }
}

/// One run: a fresh namespace and server, the pods to Running and checked, then deleted.
async fn run(node: &Node, args: &Args, ipam: Ipam, round: usize) -> anyhow::Result<(Duration, Spent)> {
    let ns = node.envtest.namespace(&format!("bench-{round}")).await?;
    let data = tempfile::tempdir()?;
    let server = match ipam {
        Ipam::HostLocal => None,
        Ipam::Embedded | Ipam::Thick => Some(ServerProcess::start(data.path()).await?),
        Ipam::Kube | Ipam::ThickKube => {
            let opts = ServerOptions {
                wait_serving: true,
                log_level: "warn".into(),
                ..ServerOptions::kube_replica(
                    "bench",
                    &ns.kubeconfig(envtest::SERVER_ACCOUNT),
                    &ns.name,
                    data.path().join("server.log"),
                    &[],
                )
            };
            Some(ServerProcess::start_with(data.path(), &opts).await?)
        }
    };
    let conf = match &server {
        None => json!({"type": "host-local", "dataDir": data.path().join("host-local")}),
        Some(s) => json!({"type": "rust-ipam", "server": s.endpoint}),
    };
    nads(&ns, args.nads, conf).await?;
    let networks = (0..args.nads).map(|i| format!("nad{i}")).collect::<Vec<_>>().join(",");
    let admin = ns.admin_client().await?;
    tokio::task::block_in_place(|| node.set_thick(ipam.thick()))?;
    let (requests0, cpu0, stat0) = (api_requests(&admin).await?, ProcCpu::now()?, cpu_times()?);
    let (names, running) = node
        .start_pods_with(
            &admin,
            &ns.name,
            "p",
            args.pods,
            |n| Node::pod(n, Some(&networks)),
            Duration::from_secs(300),
        )
        .await
        .with_context(|| format!("{} round {round}", ipam.label()))?;
    let (cpu1, stat1) = (ProcCpu::now()?, cpu_times()?);
    let requests = api_requests_since(&api_requests(&admin).await?, &requests0);
    let spent = Spent::measure((&cpu0, &cpu1), (stat0, stat1), requests);
    let pods = node.check_pods(&admin, &ns.name, &names).await?;
    for p in &pods {
        let attached = p.status.len();
        if attached != args.nads + 1 {
            bail!("{} has {attached} networks in its network-status, not {}", p.name, args.nads + 1);
        }
    }
    node.delete_pods(&admin, &ns.name, &names, Duration::from_secs(300)).await?;
    tokio::task::block_in_place(|| node.set_thick(false))?;
    Ok((running, spent))
}

/// CPU time counters from /proc/stat's first line: (idle incl. iowait, total).
fn cpu_times() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    if fields.len() < 5 {
        bail!("/proc/stat's cpu line has {} fields: {line}", fields.len());
    }
    Ok((fields[3] + fields[4], fields.iter().sum()))
}

/// Waits until at least `share` of the CPU time over one second is idle, for at most
/// 120 s; returns how long it waited and the idle share it saw last.
async fn settle(share: f64) -> anyhow::Result<(Duration, f64)> {
    let started = std::time::Instant::now();
    loop {
        let (idle0, total0) = cpu_times()?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (idle1, total1) = cpu_times()?;
        let idle = (idle1 - idle0) as f64 / (total1 - total0).max(1) as f64;
        if idle >= share || started.elapsed() > Duration::from_secs(120) {
            return Ok((started.elapsed(), idle));
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.nads > node::MASTERS {
        bail!("--nads {} is more than the node's {} host links", args.nads, node::MASTERS);
    }
    if args.pin_control_plane {
        // Before the node starts, so that everything it starts inherits the node's CPUs.
        let Some(env) = envtest::shared("node-pods") else {
            bail!("no API server on this machine (see SKIP above)")
        };
        println!("pinned: {}\n", rust_ipam_benches::pin_control_plane(env)?);
    }
    let Some(node) = Node::shared("node-pods") else { bail!("no node on this machine (see SKIP above)") };
    println!("{} pods × {} macvlan NADs, from the first create to all Running\n", args.pods, args.nads);
    println!("| round | order | IPAM | idle at start | to all Running | vs floor |");
    println!("|---|---|---|---|---|---|");
    let mut ratios: BTreeMap<Ipam, Vec<f64>> = Default::default();
    let mut spending = Vec::new();
    for round in 0..args.rounds {
        let mut order = Ipam::ALL;
        order.rotate_left(round % Ipam::ALL.len());
        let mut took = Vec::new();
        for (i, ipam) in order.into_iter().enumerate() {
            let (waited, idle) = settle(args.settle_idle).await?;
            eprintln!(
                "round {}: {ipam:?} after {:.0} s waiting for idle CPUs",
                round + 1,
                waited.as_secs_f64()
            );
            let (running, spent) = run(node, &args, ipam, round).await?;
            took.push((i + 1, ipam, idle, running));
            spending.push((round + 1, ipam, spent));
        }
        took.sort_by_key(|t| t.1);
        let floor = took[0].3.as_secs_f64();
        for (i, ipam, idle, t) in took {
            let ratio = t.as_secs_f64() / floor;
            ratios.entry(ipam).or_default().push(ratio);
            println!(
                "| {} | {i} | {} | {:.0}% | {:.1} s | {ratio:.2}x |",
                round + 1,
                ipam.label(),
                idle * 100.0,
                t.as_secs_f64()
            );
        }
    }
    println!("\nOver {} rounds, each ratio to the floor of its own round:\n", args.rounds);
    println!("| IPAM | median | lowest | highest |");
    println!("|---|---|---|---|");
    for (ipam, r) in ratios {
        println!("| {} | {:.2}x | {:.2}x | {:.2}x |", ipam.label(), median(&r), min(&r), max(&r));
    }
    print_spending(&spending);
    Ok(())
}

/// The "where the time went" table: each run's CPU seconds by process and its API requests,
/// from the first pod create to all Running.
fn print_spending(runs: &[(usize, Ipam, Spent)]) {
    println!(
        "\nWhere the CPU time and the API requests went, from the first create to all Running (CPU seconds; the machine has {} CPUs):\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let labels: Vec<&str> = CPU_COLUMNS.iter().map(|c| c.0).collect();
    println!(
        "| round | IPAM | busy of all | {} | the rest (largest processes in it) | API requests (writes) | most requested |",
        labels.join(" | ")
    );
    println!("|---|---|---|{}---|---|---|", "---|".repeat(labels.len()));
    for (round, ipam, s) in runs {
        let named: f64 = s.cpu.iter().sum();
        let cpu: Vec<String> = s.cpu.iter().map(|c| format!("{c:.1}")).collect();
        let writes: f64 = s.requests.iter().filter(|(r, _)| r.is_write()).map(|(_, n)| n).sum();
        let mut top: Vec<(&ApiRequest, &f64)> = s.requests.iter().collect();
        top.sort_by(|a, b| b.1.total_cmp(a.1));
        let top: Vec<String> = top.iter().take(4).map(|(r, n)| format!("{r} {n:.0}")).collect();
        let others: Vec<String> = s.others.iter().map(|(n, c)| format!("{n} {c:.1}")).collect();
        println!(
            "| {round} | {} | {:.1} of {:.1} | {} | {:.1} ({}) | {:.0} ({writes:.0}) | {} |",
            ipam.label(),
            s.busy,
            s.total,
            cpu.join(" | "),
            s.busy - named,
            others.join(", "),
            s.requests.values().sum::<f64>(),
            top.join(", ")
        );
    }
}
