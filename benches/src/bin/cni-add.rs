//! Latency of one CNI ADD as a whole process (exec, runtime start, config parse, the call,
//! the answer), `rust-ipam` against a durable embedded server on loopback, side by side with
//! the reference `host-local` (which only writes a local file), in the same run.
//!
//! Each ADD is a fresh attachment; the plugins run sequentially, as a kubelet starting pods
//! one by one would call them. Prints a markdown table of median, p99 and max.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use hdrhistogram::Histogram;
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
}

struct Row {
    plugin: &'static str,
    hist: Histogram<u64>,
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
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
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
    let rows = [
        measure("host-local", &args.host_local, args.adds, &hl_conf)?,
        measure("rust-ipam", &rust_ipam, args.adds, &rust_conf)?,
    ];
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
    let ratio = rows[1].hist.value_at_quantile(0.5) as f64 / rows[0].hist.value_at_quantile(0.5) as f64;
    println!("\nrust-ipam median / host-local median = {ratio:.2}");
    Ok(())
}
