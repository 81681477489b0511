//! One pod with M NADs through rust-multus, thin and thick, as whole CNI calls: the time of
//! ADD and DEL, and the API requests each costs (counted by the API server itself,
//! `apiserver_request_total`, around each call).
//!
//! Thin: the runtime execs `rust-multus` (kubeconfig of the node ServiceAccount). Thick:
//! the runtime execs `rust-multus-shim`, which forwards to `rust-multus-daemon` (its watch
//! cache listed and watching). Both with the same delegates: the cluster network a conflist
//! (the reference bridge + host-local), the NADs `rust-macvlan` with `rust-ipam` against a
//! `rust-ipam-server` on the embedded store, on veth masters in the host namespace; a fresh
//! pod and network namespace per call, thin and thick alternating. A real kube-apiserver
//! and etcd (tests/src/envtest.rs). Needs root, iproute2 and /usr/lib/cni.

use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use rust_ipam_benches::{max, median, min};
use rust_ipam_e2e::envtest::{self, TestNamespace};
use rust_ipam_e2e::netns::{CNI_DIR, Netns, ip};
use rust_ipam_e2e::{ServerOptions, ServerProcess, free_port, workspace_bin};
use serde_json::{Value, json};

/// One pod with M NADs: rust-multus thin vs thick.
#[derive(Debug, Parser)]
struct Args {
    /// Pods per mode.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// NADs (net1..netM) per pod.
    #[arg(long, default_value_t = 8)]
    nads: usize,
    /// Add a pod's networks one after another (`rustMultus.parallelNetworks: false`, as Multus
    /// does) instead of at once.
    #[arg(long)]
    sequential: bool,
}

const NODE: &str = "bench-node";

/// Host links made by the bench, deleted however it ends.
struct Links(Vec<String>);

impl Drop for Links {
    fn drop(&mut self) {
        for l in &self.0 {
            let _ = Command::new("ip").args(["link", "del", l]).output();
        }
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `bin` as the runtime would for `pod` in `netns`; the time the process took.
fn call(
    bin: &Path,
    command: &str,
    ns: &str,
    pod: &str,
    netns: &str,
    conf: &Value,
) -> anyhow::Result<Duration> {
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID=cid-{pod}"
    );
    let started = Instant::now();
    let mut child = Command::new(bin)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("cid-{pod}"))
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_DIR)
        .env("CNI_ARGS", args)
        .env("NODE_NAME", NODE)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    child.stdin.take().context("stdin")?.write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let took = started.elapsed();
    if !out.status.success() {
        bail!(
            "{command} of {pod} failed: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

/// Requests the API server has served so far (every verb and resource).
async fn api_requests(admin: &kube::Client) -> anyhow::Result<f64> {
    Ok(rust_ipam_benches::api_requests(admin).await?.values().sum())
}

#[derive(Default)]
struct Mode {
    add: Vec<f64>,
    del: Vec<f64>,
    add_requests: Vec<f64>,
    del_requests: Vec<f64>,
}

async fn setup_nads(ns: &TestNamespace, nads: usize, server: &str) -> anyhow::Result<()> {
    let admin = ns.admin_client().await?;
    for i in 0..nads {
        let config = json!({"cniVersion": "1.0.0", "name": format!("rail{i}"), "type": "rust-macvlan",
            "master": format!("mpbm{i}"), "mode": "bridge",
            "ipam": {"type": "rust-ipam", "range": format!("198.19.{}.0/24", 100 + i), "server": server}});
        let nad = json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": format!("rail{i}")}, "spec": {"config": config.to_string()}});
        envtest::create(&admin, Some(&ns.name), nad).await?;
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let env = envtest::shared("multus-pod").context("kube-apiserver and etcd are needed")?;
    let ns = env.namespace("multus-pod").await?;
    let admin = ns.admin_client().await?;
    let dir = tempfile::tempdir()?;
    let mut links = Links(vec!["mpbbr".into()]);
    for i in 0..args.nads {
        let m = format!("mpbm{i}");
        ip(&["link", "add", &m, "type", "veth", "peer", "name", &format!("{m}p")]);
        ip(&["link", "set", &m, "up"]);
        ip(&["link", "set", &format!("{m}p"), "up"]);
        links.0.push(m);
    }
    let server = ServerProcess::start_with(&dir.path().join("data"), &ServerOptions::default()).await?;
    setup_nads(&ns, args.nads, &server.endpoint).await?;
    std::fs::create_dir_all(dir.path().join("conf"))?;
    let cluster = json!({"cniVersion": "1.0.0", "name": "cluster-net", "plugins": [
        {"type": "bridge", "bridge": "mpbbr", "isGateway": true,
         "ipam": {"type": "host-local", "subnet": "198.18.200.0/24", "dataDir": dir.path().join("host-local")}}]});
    std::fs::write(dir.path().join("conf/10-cluster.conflist"), cluster.to_string())?;
    let bin_dir = workspace_bin("rust-macvlan")?.parent().context("bin dir")?.to_path_buf();
    workspace_bin("rust-ipam")?;
    let base = |cache: &str| {
        json!({"cniVersion": "1.0.0", "name": "multus-cni-network", "type": "rust-multus",
            "clusterNetwork": "cluster-net", "confDir": dir.path().join("conf"), "binDir": bin_dir,
            "cniDir": dir.path().join(cache), "rustMultus": {"parallelNetworks": !args.sequential}})
    };
    let mut thin = base("cache-thin");
    thin["kubeconfig"] = json!(ns.kubeconfig(envtest::NODE_ACCOUNT));
    std::fs::write(dir.path().join("daemon.json"), base("cache-thick").to_string())?;
    let socket = dir.path().join("run/daemon.sock");
    let shim_conf = json!({"cniVersion": "1.0.0", "name": "multus-cni-network", "type": "rust-multus-shim",
        "daemonSocket": socket});

    let networks: Vec<String> = (0..args.nads).map(|i| format!("rail{i}")).collect();
    for i in 0..args.rounds {
        for mode in ["thin", "thick"] {
            let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("{mode}-{i}"),
                "annotations": {"k8s.v1.cni.cncf.io/networks": networks.join(",")}},
                "spec": {"nodeName": NODE, "containers": [{"name": "pause", "image": "localhost/pause:3.10.2"}]}});
            envtest::create(&admin, Some(&ns.name), pod).await?;
        }
    }

    let metrics = free_port()?;
    let daemon = Daemon(
        Command::new(workspace_bin("rust-multus-daemon")?)
            .arg(format!("--kubeconfig={}", ns.kubeconfig(envtest::NODE_ACCOUNT).display()))
            .arg(format!("--node-name={NODE}"))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--config={}", dir.path().join("daemon.json").display()))
            .arg(format!("--metrics-listen=127.0.0.1:{metrics}"))
            .env("NODE_NAME", NODE)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("rust-multus-daemon did not bind {}", socket.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the watch cache list and settle, as on a node that has been up a while.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let multus = workspace_bin("rust-multus")?;
    let shim = workspace_bin("rust-multus-shim")?;
    // What one scrape of /metrics adds by itself (it is a request too).
    let a = api_requests(&admin).await?;
    let scrape = api_requests(&admin).await? - a;
    // Unmeasured: the first call of each pays for page cache and connections.
    let warm = Netns::new(&["mpb-warm"]);
    let (mut thin_row, mut thick_row) = (Mode::default(), Mode::default());
    for i in 0..args.rounds {
        let pods = Netns::new(&[&format!("mpb-{i}-a"), &format!("mpb-{i}-b")]);
        for (k, (mode, bin, conf)) in
            [("thin", &multus, &thin), ("thick", &shim, &shim_conf)].into_iter().enumerate()
        {
            let row = if mode == "thin" { &mut thin_row } else { &mut thick_row };
            let pod = format!("{mode}-{i}");
            let netns = pods.path(k);
            if i == 0 {
                // Warm-up on the first pod, undone before the measured ADD.
                call(bin, "ADD", &ns.name, &pod, &warm.path(0), conf)?;
                call(bin, "DEL", &ns.name, &pod, &warm.path(0), conf)?;
            }
            let before = api_requests(&admin).await?;
            let took = tokio::task::block_in_place(|| call(bin, "ADD", &ns.name, &pod, &netns, conf))?;
            let after = api_requests(&admin).await?;
            row.add.push(took.as_secs_f64() * 1000.0);
            row.add_requests.push(after - before - scrape);
            let took = tokio::task::block_in_place(|| call(bin, "DEL", &ns.name, &pod, &netns, conf))?;
            let after_del = api_requests(&admin).await?;
            row.del.push(took.as_secs_f64() * 1000.0);
            row.del_requests.push(after_del - after - scrape);
        }
    }
    let rss = std::fs::read_to_string(format!("/proc/{}/status", daemon.0.id()))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().to_string()))
        .unwrap_or_default();

    println!(
        "one pod, {} NADs (rust-macvlan + rust-ipam) + conflist cluster network (bridge + host-local), {} pods per mode\n",
        args.nads, args.rounds
    );
    println!("| mode | ADD median ms | ADD min-max ms | DEL median ms | API requests per ADD | per DEL |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (mode, r) in [("thin: rust-multus", &thin_row), ("thick: rust-multus-shim + daemon", &thick_row)] {
        println!(
            "| {mode} | {:.1} | {:.1}-{:.1} | {:.1} | {:.0} | {:.0} |",
            median(&r.add),
            min(&r.add),
            max(&r.add),
            median(&r.del),
            median(&r.add_requests),
            median(&r.del_requests)
        );
    }
    println!(
        "\nthick ADD median / thin ADD median = {:.2}; daemon RSS after the run: {rss}",
        median(&thick_row.add) / median(&thin_row.add)
    );
    drop(daemon);
    drop(links);
    Ok(())
}
