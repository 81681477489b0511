//! Latency of one CNI ADD as a whole process (exec, runtime start, config parse, the call,
//! the answer), `rust-ipam` against a durable embedded server on loopback, side by side with
//! the reference `host-local` (which only writes a local file), in the same run.
//!
//! Each ADD is a fresh attachment; the plugins run sequentially, as a kubelet starting pods
//! one by one would call them. Prints a markdown table of median, p99 and max.
//!
//! With `--envtest`, rust-ipam also runs against a server on the kube store with a real
//! kube-apiserver, and the same number of raw IPLease creates, one at a time as the ADDs
//! are, gives the API server's own latency in the same run.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use ipam_server::k8s::crd::IPLease;
use rust_ipam_benches::{new_histogram, raw_creates};
use rust_ipam_e2e::envtest;
use rust_ipam_e2e::{ServerOptions, ServerProcess, workspace_bin};
use serde_json::{Value, json};

/// Time CNI ADD of rust-ipam and host-local as whole processes.
#[derive(Debug, Parser)]
struct Args {
    /// ADDs per plugin.
    #[arg(long, default_value_t = 500)]
    adds: u32,
    /// The reference host-local plugin.
    #[arg(long, default_value = "/usr/lib/cni/host-local")]
    host_local: PathBuf,
    /// Also time rust-ipam on the kube store against a real kube-apiserver and etcd (found
    /// as the tests find them: $KUBEBUILDER_ASSETS, /usr/local/kubebuilder/bin, PATH), and
    /// raw IPLease creates one at a time beside it.
    #[arg(long)]
    envtest: bool,
}

struct Row {
    plugin: &'static str,
    hist: Histogram<u64>,
}

/// `adds` raw IPLease creates in `ns`, one after another: what one ADD on the kube store
/// cannot be faster than.
async fn raw(ns: &envtest::TestNamespace, adds: u32) -> anyhow::Result<Row> {
    let api = kube::Api::<IPLease>::namespaced(ns.client(envtest::SERVER_ACCOUNT).await?, &ns.name);
    let mut warm = new_histogram()?;
    raw_creates(&api, "cni-add", 0xC615_0000, "warm", |n| n <= 5, &mut warm).await;
    let mut hist = new_histogram()?;
    let errors = raw_creates(&api, "cni-add", 0xC616_0000, "raw", |n| n <= adds, &mut hist).await;
    if errors > 0 {
        bail!("{errors} raw IPLease creates failed");
    }
    Ok(Row { plugin: "raw IPLease create (in-process, no exec)", hist })
}

/// Runs one ADD of `bin` and returns how long the process took.
fn add(bin: &Path, cid: &str, conf: &Value) -> anyhow::Result<Duration> {
    let input = conf.to_string();
    let started = Instant::now();
    let mut child = Command::new(bin)
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", "/var/run/netns/bench")
        .env("CNI_IFNAME", "net1")
        .env("CNI_PATH", "/usr/lib/cni")
        .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={cid}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    let took = started.elapsed();
    if !out.status.success() {
        bail!("{} ADD failed: {}", bin.display(), String::from_utf8_lossy(&out.stdout));
    }
    Ok(took)
}

fn measure(plugin: &'static str, bin: &Path, adds: u32, conf: &Value) -> anyhow::Result<Row> {
    let mut hist = new_histogram()?;
    // A few unmeasured calls first: page cache, server connections warmed like a node's.
    for i in 0..5 {
        add(bin, &format!("warm-{plugin}-{i}"), conf)?;
    }
    for i in 0..adds {
        let took = add(bin, &format!("{plugin}-{i}"), conf)?;
        hist.record(took.as_micros().max(1) as u64)?;
    }
    Ok(Row { plugin, hist })
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.host_local.exists() {
        bail!("{} not found (apt-get install containernetworking-plugins)", args.host_local.display());
    }
    let rust_ipam = workspace_bin("rust-ipam")?;
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::start_with(&dir.path().join("data"), &ServerOptions::default()).await?;

    // One /16 each, so neither runs out.
    let rust_conf = json!({"cniVersion": "1.0.0", "name": "bench", "type": "macvlan",
        "ipam": {"type": "rust-ipam", "range": "198.18.0.0/16", "server": server.endpoint}});
    let hl_conf = json!({"cniVersion": "1.0.0", "name": "bench", "type": "macvlan",
        "ipam": {"type": "host-local", "subnet": "198.19.0.0/16", "dataDir": dir.path().join("host-local")}});
    let mut rows = vec![
        measure("host-local", &args.host_local, args.adds, &hl_conf)?,
        measure("rust-ipam", &rust_ipam, args.adds, &rust_conf)?,
    ];
    let kube = if args.envtest {
        let env = envtest::shared("cni-add --envtest").context("kube-apiserver and etcd are needed")?;
        let ns = env.namespace("cni-add").await?;
        let kubeconfig = ns.kubeconfig(envtest::SERVER_ACCOUNT).display().to_string();
        let opts = ServerOptions {
            identity: "cni-add".into(),
            args: ["--kubeconfig", &kubeconfig, "--namespace", &ns.name].map(String::from).to_vec(),
            ..ServerOptions::default()
        };
        let server = ServerProcess::start_with(&dir.path().join("kube-data"), &opts).await?;
        let conf = json!({"cniVersion": "1.0.0", "name": "bench", "type": "macvlan",
            "ipam": {"type": "rust-ipam", "range": "198.20.0.0/16", "server": server.endpoint}});
        rows.push(measure("rust-ipam, kube store", &rust_ipam, args.adds, &conf)?);
        rows.push(raw(&ns, args.adds).await?);
        Some(server)
    } else {
        None
    };
    println!("| plugin | ADDs | median ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} |",
            r.plugin,
            r.hist.len(),
            ms(r.hist.value_at_quantile(0.5)),
            ms(r.hist.value_at_quantile(0.99)),
            ms(r.hist.max())
        );
    }
    let median = |r: &Row| r.hist.value_at_quantile(0.5) as f64;
    println!("\nrust-ipam median / host-local median = {:.2}", median(&rows[1]) / median(&rows[0]));
    if kube.is_some() {
        println!(
            "rust-ipam on the kube store: median {:.2} ms over the raw create's; the embedded store's median over host-local's: {:.2} ms",
            (median(&rows[2]) - median(&rows[3])) / 1000.0,
            (median(&rows[1]) - median(&rows[0])) / 1000.0
        );
    }
    Ok(())
}
