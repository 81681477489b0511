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

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use rust_ipam_benches::{max, median, min};
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

/// One run: a fresh namespace and server, the pods to Running and checked, then deleted.
async fn run(node: &Node, args: &Args, ipam: Ipam, round: usize) -> anyhow::Result<Duration> {
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
    let networks: Vec<String> = (0..args.nads).map(|i| format!("nad{i}")).collect();
    let admin = ns.admin_client().await?;
    tokio::task::block_in_place(|| node.set_thick(ipam.thick()))?;
    let out = node
        .run_pods(&admin, &ns.name, "p", args.pods, Some(&networks.join(",")), Duration::from_secs(300))
        .await
        .with_context(|| format!("{} round {round}", ipam.label()))?;
    for p in &out.pods {
        let attached = p.status.len();
        if attached != args.nads + 1 {
            bail!("{} has {attached} networks in its network-status, not {}", p.name, args.nads + 1);
        }
    }
    let names: Vec<String> = out.pods.iter().map(|p| p.name.clone()).collect();
    node.delete_pods(&admin, &ns.name, &names, Duration::from_secs(300)).await?;
    tokio::task::block_in_place(|| node.set_thick(false))?;
    Ok(out.running)
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
    let mut ratios: std::collections::BTreeMap<Ipam, Vec<f64>> = Default::default();
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
            took.push((i + 1, ipam, idle, run(node, &args, ipam, round).await?));
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
    Ok(())
}
