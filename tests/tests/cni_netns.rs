//! The reference CNI plugins (Debian's containernetworking-plugins) with
//! `"ipam": {"type": "rust-ipam"}`, in network namespaces this test creates: the address
//! the server hands out appears on the interface inside the pod's namespace.
//!
//! Needs root, iproute2, ping and /usr/lib/cni; without them it prints SKIP (and fails in CI,
//! which installs them and runs as root).

use std::path::Path;
use std::process::Command;

use rust_ipam_e2e::netns::{CNI_DIR, Netns, addresses, ip, ping, run_for_pod, skip};
use rust_ipam_e2e::{ServerOptions, ServerProcess, workspace_bin};
use serde_json::{Value, json};

fn rust_ipam_path() -> std::path::PathBuf {
    workspace_bin("rust-ipam").expect("plugin binary")
}

/// Runs a reference plugin inside the `host` namespace for a pod namespace.
fn plugin(kind: &str, command: &str, host: &str, pod: &str, cid: &str, conf: &Value) -> (i32, Value) {
    let cmd = format!("{CNI_DIR}/{kind}");
    run(Command::new("ip").args(["netns", "exec", host, &cmd]), command, pod, cid, conf)
}

/// Runs a plugin binary directly (in this namespace) for a pod namespace.
fn plugin_exec(bin: &Path, command: &str, pod: &str, cid: &str, conf: &Value) -> (i32, Value) {
    run(&mut Command::new(bin), command, pod, cid, conf)
}

fn run(cmd: &mut Command, command: &str, pod: &str, cid: &str, conf: &Value) -> (i32, Value) {
    run_for_pod(cmd, command, pod, cid, conf, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_bridge_and_macvlan_get_addresses_from_rust_ipam() {
    if skip("reference_bridge_and_macvlan_get_addresses_from_rust_ipam", &["bridge", "macvlan", "host-local"])
    {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("ipam.sock");
    // A unix socket reaches the server from every network namespace.
    let opts = ServerOptions { unix_socket: Some(sock.clone()), ..ServerOptions::default() };
    let _server = ServerProcess::start_with(&dir.path().join("data"), &opts).await.expect("server");
    let server = format!("unix://{}", sock.display());
    let ns = Netns::new(&["node", "pod1", "pod2"]);
    let (node, pod1, pod2) = (ns.name(0), ns.name(1), ns.name(2));

    let bridge = json!({"cniVersion": "1.0.0", "name": "backend", "type": "bridge", "bridge": "ripam0",
        "ipam": {"type": "rust-ipam", "range": "198.18.0.0/24", "exclude": ["198.18.0.0/28"], "server": server}});
    let (code, r1) = plugin("bridge", "ADD", node, pod1, "cid-pod1", &bridge);
    assert_eq!(code, 0, "bridge ADD: {r1}");
    let (_, r2) = plugin("bridge", "ADD", node, pod2, "cid-pod2", &bridge);
    assert_eq!(addresses(pod1, "net1"), vec!["198.18.0.16/24"]);
    assert_eq!(addresses(pod2, "net1"), vec!["198.18.0.17/24"]);
    assert_eq!(r2["ips"][0]["address"], "198.18.0.17/24");
    ping(pod1, "198.18.0.17", &[], "pod1 cannot reach pod2");

    // CHECK pod2: the bridge's MAC (in prevResult) changes as ports join, so only the last
    // ADD's result still matches it.
    let mut check2 = bridge.clone();
    check2["prevResult"] = r2.clone();
    let (code, out) = plugin("bridge", "CHECK", node, pod2, "cid-pod2", &check2);
    assert_eq!(code, 0, "CHECK: {out}");
    let mut check = bridge.clone();
    check["prevResult"] = r1.clone();

    let (code, out) = plugin("bridge", "DEL", node, pod1, "cid-pod1", &check);
    assert_eq!(code, 0, "DEL: {out}");
    assert!(addresses(pod1, "net1").is_empty(), "net1 is gone after DEL");
    let (code, _) = plugin("bridge", "DEL", node, pod1, "cid-pod1", &check);
    assert_eq!(code, 0, "a repeated DEL succeeds");
    // The lease is gone too: the next pod gets the freed address.
    let (_, r3) = plugin("bridge", "ADD", node, pod1, "cid-pod3", &bridge);
    assert_eq!(r3["ips"][0]["address"], "198.18.0.16/24");

    // macvlan on a veth master in the node namespace, another network of the same server.
    ip(&["-n", node, "link", "add", "ripam-m0", "type", "veth", "peer", "name", "ripam-m1"]);
    ip(&["-n", node, "link", "set", "ripam-m0", "up"]);
    ip(&["-n", node, "link", "set", "ripam-m1", "up"]);
    let macvlan = json!({"cniVersion": "1.0.0", "name": "rail-0", "type": "macvlan", "master": "ripam-m0",
        "mode": "bridge", "ipam": {"type": "rust-ipam", "range": "198.19.0.0/24", "network_name": "rail0",
        "server": server}});
    let ns2 = Netns::new(&["pod4"]);
    let (code, out) = plugin("macvlan", "ADD", node, ns2.name(0), "cid-pod4", &macvlan);
    assert_eq!(code, 0, "macvlan ADD: {out}");
    assert_eq!(addresses(ns2.name(0), "net1"), vec!["198.19.0.1/24"]);
    let mut check = macvlan.clone();
    check["prevResult"] = out;
    let (code, out) = plugin("macvlan", "CHECK", node, ns2.name(0), "cid-pod4", &check);
    assert_eq!(code, 0, "macvlan CHECK: {out}");
    // Release only the lease (rust-ipam's own DEL, the link stays): the reference plugin's
    // CHECK now fails because rust-ipam's CHECK does.
    let (code, out) = plugin_exec(&rust_ipam_path(), "DEL", ns2.name(0), "cid-pod4", &check);
    assert_eq!(code, 0, "rust-ipam DEL: {out}");
    let (code, out) = plugin("macvlan", "CHECK", node, ns2.name(0), "cid-pod4", &check);
    assert_ne!(code, 0, "CHECK after the lease is released must fail: {out}");
    assert!(out["msg"].as_str().unwrap_or_default().contains("holds no address"), "{out}");
    let (code, out) = plugin("macvlan", "DEL", node, ns2.name(0), "cid-pod4", &check);
    assert_eq!(code, 0, "macvlan DEL: {out}");
    assert!(addresses(ns2.name(0), "net1").is_empty());
}

/// Runs `kind` ADD for many pods on several simulated nodes at once; returns every address
/// handed out.
fn add_everywhere(
    kind: &str,
    nodes: &Netns,
    pods: &Netns,
    conf: impl Fn(usize) -> Value + Sync,
) -> Vec<String> {
    let per_node = pods.len() / nodes.len();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..pods.len())
            .map(|i| {
                let node = i / per_node;
                let (host, pod, conf) = (nodes.name(node), pods.name(i), conf(node));
                s.spawn(move || {
                    let (code, out) = plugin(kind, "ADD", host, pod, &format!("cid-{pod}"), &conf);
                    assert_eq!(code, 0, "{kind} ADD on node {node}: {out}");
                    out["ips"][0]["address"].as_str().expect("address").to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("ADD thread")).collect()
    })
}

fn duplicates(addrs: &[String]) -> Vec<String> {
    let mut seen = std::collections::BTreeMap::<&str, usize>::new();
    for a in addrs {
        *seen.entry(a).or_default() += 1;
    }
    seen.into_iter().filter(|(_, n)| *n > 1).map(|(a, _)| a.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_never_share_an_address_unlike_host_local() {
    if skip("two_nodes_never_share_an_address_unlike_host_local", &["bridge", "macvlan", "host-local"]) {
        return;
    }
    const NODES: usize = 2;
    const PODS_PER_NODE: usize = 12;
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("ipam.sock");
    let opts = ServerOptions { unix_socket: Some(sock.clone()), ..ServerOptions::default() };
    let _server = ServerProcess::start_with(&dir.path().join("data"), &opts).await.expect("server");
    let server = format!("unix://{}", sock.display());
    let node_names: Vec<String> = (0..NODES).map(|n| format!("node{n}")).collect();
    let nodes = Netns::new(&node_names.iter().map(String::as_str).collect::<Vec<_>>());

    // The same NAD on every node, with rust-ipam: one address per pod, cluster-wide.
    let pod_names: Vec<String> = (0..NODES * PODS_PER_NODE).map(|p| format!("r{p}")).collect();
    let pods = Netns::new(&pod_names.iter().map(String::as_str).collect::<Vec<_>>());
    let rust = add_everywhere("bridge", &nodes, &pods, |_| {
        json!({"cniVersion": "1.0.0", "name": "backend", "type": "bridge", "bridge": "ripam1",
            "ipam": {"type": "rust-ipam", "range": "198.18.1.0/24", "server": server}})
    });
    assert_eq!(rust.len(), NODES * PODS_PER_NODE);
    assert!(duplicates(&rust).is_empty(), "rust-ipam handed out an address twice: {:?}", duplicates(&rust));

    // The same with host-local: each node keeps its own leases, so nodes collide.
    let hl_names: Vec<String> = (0..NODES * PODS_PER_NODE).map(|p| format!("h{p}")).collect();
    let hl_pods = Netns::new(&hl_names.iter().map(String::as_str).collect::<Vec<_>>());
    let data = dir.path().to_path_buf();
    let host_local = add_everywhere("bridge", &nodes, &hl_pods, |node| {
        json!({"cniVersion": "1.0.0", "name": "backend-hl", "type": "bridge", "bridge": "ripam2",
            "ipam": {"type": "host-local", "subnet": "198.18.2.0/24",
                "dataDir": data.join(format!("host-local-node{node}"))}})
    });
    let dup = duplicates(&host_local);
    println!(
        "{NODES} nodes x {PODS_PER_NODE} pods: rust-ipam gave {} distinct addresses; host-local gave {} addresses held twice: {dup:?}",
        rust.len(),
        dup.len()
    );
    assert_eq!(dup.len(), PODS_PER_NODE, "host-local on two nodes hands out the same addresses");
}
