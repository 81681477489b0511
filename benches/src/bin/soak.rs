//! A soak: CNI ADD and DEL through the real `rust-ipam` plugin at a steady rate for a set
//! time, from several simulated nodes (each its own `node_name` and pods), against two
//! `rust-ipam-server` replicas on the kube store with a real kube-apiserver (envtest, as the
//! tests find it), the leader killed with `kill -9` on a timer and started again as a new
//! pod would be. Every sample period it prints each replica's resident memory and open file
//! descriptors and the calls so far; at the end it checks that the API server holds exactly
//! the leases of the pods alive (after the DELs a runtime would repeat) and that no address
//! was told to two pods, and prints the figures as a markdown table.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use rust_ipam_e2e::envtest::{self, SERVER_ACCOUNT};
use rust_ipam_e2e::fixtures::{lease_objects, status};
use rust_ipam_e2e::{ServerOptions, ServerProcess, run_ipam_plugin};
use serde_json::json;

/// Churn ADD/DEL for a while with leader kills; memory and fds over time.
#[derive(Debug, Parser)]
struct Args {
    /// How long to churn (`30m`, `90s`).
    #[arg(long, default_value = "30m", value_parser = parse)]
    duration: Duration,
    /// Simulated nodes, one client each.
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// CNI calls per second, all nodes together.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Pods each node keeps at most; past it, a node deletes before it adds.
    #[arg(long, default_value_t = 50)]
    pods: usize,
    /// Kill the leader this often (`0s`: never).
    #[arg(long, default_value = "5m", value_parser = parse)]
    kill_every: Duration,
    /// Print a sample this often.
    #[arg(long, default_value = "1m", value_parser = parse)]
    sample_every: Duration,
}

fn parse(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("{s:?}: a number and s, m or h"))?;
    match unit {
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: a number and s, m or h")),
    }
}

/// Resident memory (KiB) and open file descriptors of process `pid`.
fn usage(pid: u32) -> (u64, usize) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            })?
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    (rss, fds)
}

#[derive(Debug, Default)]
struct Tally {
    adds: AtomicU64,
    dels: AtomicU64,
    failed: AtomicU64,
    unclean: AtomicU64,
}

/// One simulated node: ADDs new pods and DELs old ones at its share of the rate; keeps
/// what it was told it holds and the DELs that failed (to repeat).
/// What the node loops share.
#[derive(Debug, Clone, Default)]
struct Shared {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    /// Container → address, for every pod told it holds one.
    held: Arc<Mutex<BTreeMap<String, String>>>,
    /// Containers whose ADD or DEL failed: a runtime DELs them again.
    to_delete: Arc<Mutex<Vec<String>>>,
    /// The replicas' endpoints now (a restarted replica comes back on a new port, as a new
    /// pod has a new address; the node config would list the Service).
    servers: Arc<Mutex<Vec<String>>>,
}

/// The plugin's network config for `node`, listing the replicas as they are now.
fn conf(node: usize, sh: &Shared) -> serde_json::Value {
    let servers = sh.servers.lock().unwrap_or_else(|e| e.into_inner()).clone();
    json!({"cniVersion": "1.0.0", "name": "soak", "type": "rust-ipam",
        "ipam": {"type": "rust-ipam", "range": "198.18.0.0/16", "server": servers, "node_name": format!("soak-node-{node}")}})
}

fn node_loop(node: usize, period: Duration, max_pods: usize, sh: Shared) {
    let Shared { stop, tally, held, to_delete, .. } = sh.clone();
    let mut mine: std::collections::VecDeque<String> = Default::default();
    let mut next = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        next += period;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let args = |cid: &str| format!("K8S_POD_NAMESPACE=soak;K8S_POD_NAME={cid}");
        // Once the node has half its pods, every other call deletes the oldest: the count
        // stays between half and all of `max_pods`.
        if mine.len() >= max_pods || (mine.len() > max_pods / 2 && n % 2 == 1) {
            let cid = mine.pop_front().expect("a pod");
            let out = run_ipam_plugin("DEL", &cid, &args(&cid), &conf(node, &sh));
            tally.dels.fetch_add(1, Ordering::Relaxed);
            held.lock().unwrap_or_else(|e| e.into_inner()).remove(&cid);
            if out.code != 0 {
                tally.failed.fetch_add(1, Ordering::Relaxed);
                if out.out["code"].as_u64().is_none() {
                    tally.unclean.fetch_add(1, Ordering::Relaxed);
                }
                to_delete.lock().unwrap_or_else(|e| e.into_inner()).push(cid);
            }
        } else {
            let cid = format!("soak-{node}-{n}");
            let out = run_ipam_plugin("ADD", &cid, &args(&cid), &conf(node, &sh));
            tally.adds.fetch_add(1, Ordering::Relaxed);
            match (out.code, out.out["ips"][0]["address"].as_str()) {
                (0, Some(a)) => {
                    let a = a.split('/').next().unwrap_or(a).to_string();
                    held.lock().unwrap_or_else(|e| e.into_inner()).insert(cid.clone(), a);
                    mine.push_back(cid);
                }
                _ => {
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                    if out.out["code"].as_u64().is_none() {
                        tally.unclean.fetch_add(1, Ordering::Relaxed);
                    }
                    // As a runtime does after a failed ADD.
                    to_delete.lock().unwrap_or_else(|e| e.into_inner()).push(cid);
                }
            }
        }
        n += 1;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let Some(env) = envtest::shared("soak") else { bail!("no kube-apiserver and etcd (see SKIP above)") };
    let ns = env.namespace("soak").await?;
    let dir = tempfile::tempdir()?;
    let start = |name: String| {
        let (ns, dir) = (ns.clone(), dir.path().to_path_buf());
        async move {
            let log = dir.join(format!("{name}.log"));
            let opts = ServerOptions::kube_replica(&name, &ns.kubeconfig(SERVER_ACCOUNT), &ns.name, log, &[]);
            ServerProcess::start_with(&dir.join(&name), &opts).await
        }
    };
    let mut replicas = vec![start("replica-0".into()).await?, start("replica-1".into()).await?];
    let sh = Shared::default();
    *sh.servers.lock().unwrap_or_else(|e| e.into_inner()) =
        replicas.iter().map(|r| r.endpoint.clone()).collect();
    let period = Duration::from_secs_f64(args.nodes as f64 / args.rate);
    let threads: Vec<_> = (0..args.nodes)
        .map(|node| {
            let (sh, max) = (sh.clone(), args.pods);
            std::thread::spawn(move || node_loop(node, period, max, sh))
        })
        .collect();
    let (tally, held, to_delete) = (sh.tally.clone(), sh.held.clone(), sh.to_delete.clone());
    println!("| t | replica | RSS MiB | fds | ADDs | DELs | failed |");
    println!("|---|---|---|---|---|---|---|");
    let began = Instant::now();
    let mut next_kill = if args.kill_every.is_zero() { None } else { Some(began + args.kill_every) };
    let mut next_sample = began;
    let mut kills = 0;
    let mut generation = 2;
    while began.elapsed() < args.duration {
        if Instant::now() >= next_sample {
            for r in &replicas {
                let (rss, fds) = usage(r.pid());
                let leader =
                    if status(&r.endpoint).await.is_some_and(|s| s.serving) { " (leader)" } else { "" };
                println!(
                    "| {:.0} s | {}{leader} | {:.1} | {fds} | {} | {} | {} |",
                    began.elapsed().as_secs_f64(),
                    r.endpoint,
                    rss as f64 / 1024.0,
                    tally.adds.load(Ordering::Relaxed),
                    tally.dels.load(Ordering::Relaxed),
                    tally.failed.load(Ordering::Relaxed)
                );
            }
            next_sample += args.sample_every;
        }
        if next_kill.is_some_and(|k| Instant::now() >= k) {
            let mut leader = None;
            for (i, r) in replicas.iter().enumerate() {
                if status(&r.endpoint).await.is_some_and(|s| s.serving) {
                    leader = Some(i);
                }
            }
            if let Some(i) = leader {
                replicas[i].kill_hard()?;
                replicas.remove(i);
                replicas.push(start(format!("replica-{generation}")).await?);
                generation += 1;
                kills += 1;
                *sh.servers.lock().unwrap_or_else(|e| e.into_inner()) =
                    replicas.iter().map(|r| r.endpoint.clone()).collect();
            }
            next_kill = Some(Instant::now() + args.kill_every);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sh.stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().map_err(|_| anyhow::anyhow!("a client panicked"))?;
    }

    // The DELs a runtime repeats until they succeed.
    let pending = std::mem::take(&mut *to_delete.lock().unwrap_or_else(|e| e.into_inner()));
    for cid in &pending {
        let node: usize = cid.split('-').nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
        let out = run_ipam_plugin(
            "DEL",
            cid,
            &format!("K8S_POD_NAMESPACE=soak;K8S_POD_NAME={cid}"),
            &conf(node, &sh),
        );
        if out.code != 0 {
            bail!("DEL {cid} after the soak: {}", out.out);
        }
    }
    let held = held.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut by_address: BTreeMap<&str, &str> = BTreeMap::new();
    for (cid, a) in &held {
        if let Some(other) = by_address.insert(a, cid) {
            bail!("{a} was told to {other} and to {cid}");
        }
    }
    let admin = ns.admin_client().await?;
    let stored: BTreeMap<String, String> =
        lease_objects(&admin, &ns.name).await.into_iter().map(|o| (o.container_id, o.address)).collect();
    if stored != held {
        let extra: Vec<_> = stored.iter().filter(|(c, _)| !held.contains_key(*c)).collect();
        let lost: Vec<_> = held.iter().filter(|(c, _)| !stored.contains_key(*c)).collect();
        bail!(
            "the API server's leases differ from the pods alive: {} leaked {extra:?}, {} lost {lost:?}",
            extra.len(),
            lost.len()
        );
    }
    println!(
        "\n{:?}, {} nodes, {:.0} calls/s asked: {} ADDs, {} DELs, {} failed ({} not a clean CNI error), {} DELs repeated after, {kills} leader kills; the API server holds exactly the {} leases of the pods alive, no address twice",
        args.duration,
        args.nodes,
        args.rate,
        tally.adds.load(Ordering::Relaxed),
        tally.dels.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
        tally.unclean.load(Ordering::Relaxed),
        pending.len(),
        held.len()
    );
    Ok(())
}
