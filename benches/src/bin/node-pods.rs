//! Time to start pods on a real node (tests/src/node.rs: kubelet 1.36, containerd,
//! `rust-multus` as the node's CNI): N pods with M macvlan NADs each, created at once,
//! from the first create to all Running, every address then checked inside each pod's
//! sandbox against its network-status (no address twice).
//!
//! Five runs in the same process, one after the other per round, the pods deleted between:
//! thin rust-multus with the reference `host-local` (node-local, the floor), and with
//! `rust-ipam` against a server on the embedded store and on the kube store (a real
//! kube-apiserver, the server under the ServiceAccount and RBAC of deploy/); then thick
//! mode (`rust-multus-shim` + `rust-multus-daemon`, tests/src/node.rs' `set_thick`) with
//! `rust-ipam` on the embedded and on the kube store. Prints a markdown table with each
//! time and its ratio to the floor of the same round.
//!
//! Needs root and what the node tests need (README: "A real node for the tests").

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
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
}

#[derive(Debug, Clone, Copy, PartialEq)]
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.nads > node::MASTERS {
        bail!("--nads {} is more than the node's {} host links", args.nads, node::MASTERS);
    }
    let Some(node) = Node::shared("node-pods") else { bail!("no node on this machine (see SKIP above)") };
    println!("{} pods × {} macvlan NADs, from the first create to all Running\n", args.pods, args.nads);
    println!("| round | IPAM | to all Running | vs floor |");
    println!("|---|---|---|---|");
    for round in 0..args.rounds {
        let mut floor = None;
        for ipam in [Ipam::HostLocal, Ipam::Embedded, Ipam::Kube, Ipam::Thick, Ipam::ThickKube] {
            let took = run(node, &args, ipam, round).await?;
            let floor = *floor.get_or_insert(took);
            println!(
                "| {} | {} | {:.1} s | {:.2}x |",
                round + 1,
                ipam.label(),
                took.as_secs_f64(),
                took.as_secs_f64() / floor.as_secs_f64()
            );
        }
    }
    Ok(())
}
