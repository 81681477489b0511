//! Pods on a real node (tests/src/node.rs) in thick mode: the node's CNI config is
//! `rust-multus-shim`, and `rust-multus-daemon` (the node ServiceAccount, deploy/'s RBAC
//! with the thick overlay's list/watch) answers from its watch cache. The kubelet runs the
//! pods through containerd and the shim; every address is checked inside each sandbox
//! against the network-status the daemon wrote and the server's leases; deleting the pods
//! frees every lease, the cluster network's host-local ones included.

use std::time::Duration;

use rust_ipam_e2e::ServerProcess;
use rust_ipam_e2e::envtest;
use rust_ipam_e2e::fixtures::leases;
use rust_ipam_e2e::node::{self, Node};
use rust_ipam_proto::v1 as pb;
use serde_json::json;

/// host-local's lease files of the node's cluster network.
fn cluster_leases(node: &Node) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(node.dir.join("host-local/cluster-net"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
        .collect();
    out.sort();
    out
}

/// Four pods with eight rail NADs each (rust-macvlan + rust-ipam) through shim and daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_rail_pods_through_the_thick_daemon() {
    let Some(node) = Node::shared_thick("eight_rail_pods_through_the_thick_daemon") else { return };
    let ns = node.envtest.namespace("thick-rails").await.expect("namespace");
    let data = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(data.path()).await.expect("server");
    let admin = ns.admin_client().await.expect("admin client");
    for r in 0..node::MASTERS {
        let config = json!({"cniVersion": "1.0.0", "name": format!("rail{r}"), "type": "rust-macvlan",
            "master": node::master(r), "mode": "bridge",
            "ipam": {"type": "rust-ipam", "range": format!("10.{}.0.0/24", 90 + r), "server": server.endpoint}});
        let nad = json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": format!("rail{r}")}, "spec": {"config": config.to_string()}});
        envtest::create(&admin, Some(&ns.name), nad).await.expect("NAD");
    }
    let networks: Vec<String> = (0..node::MASTERS).map(|r| format!("rail{r}")).collect();
    let adds_before =
        node.daemon_metric("rust_multus_calls_total{verb=\"ADD\",result=\"ok\"}").expect("metrics");
    let cluster_before = cluster_leases(node);

    let run = node
        .run_pods(&admin, &ns.name, "gpu", 4, Some(&networks.join(",")), Duration::from_secs(120))
        .await
        .expect("pods run and check out");
    println!("4 eight-rail pods Running through the thick daemon in {:?}", run.running);

    let adds = node.daemon_metric("rust_multus_calls_total{verb=\"ADD\",result=\"ok\"}").expect("metrics");
    assert_eq!(adds - adds_before, 4.0, "the daemon answered the four ADDs");
    let mut want = Vec::new();
    for p in &run.pods {
        assert_eq!(p.status.len(), 9, "{}: {:?}", p.name, p.status);
        for r in 0..node::MASTERS {
            let entry = &p.status[r + 1];
            assert_eq!(entry["name"], format!("{}/rail{r}", ns.name));
            assert_eq!(entry["interface"], format!("net{}", r + 1));
            let ip = p.ips_of(&format!("{}/rail{r}", ns.name));
            assert_eq!(ip.len(), 1, "{:?}", p.status);
            let ip = ip[0].split('/').next().unwrap_or_default().to_string();
            assert!(ip.starts_with(&format!("10.{}.0.", 90 + r)), "{ip} not of rail{r}");
            want.push((ip, p.sandbox.id.clone(), node::NODE_NAME.to_string()));
        }
    }
    let mut held: Vec<(String, String, String)> = leases(&server.endpoint, pb::ListLeasesRequest::default())
        .await
        .into_iter()
        .map(|l| (l.address, l.container_id, l.node))
        .collect();
    held.sort();
    want.sort();
    assert_eq!(held, want, "the server holds each pod's eight addresses, on this node");
    let eth0s: Vec<String> = run.pods.iter().flat_map(|p| p.ips_of("cluster-net")).collect();
    assert_eq!(eth0s.len(), 4);

    let names: Vec<String> = run.pods.iter().map(|p| p.name.clone()).collect();
    node.delete_pods(&admin, &ns.name, &names, Duration::from_secs(120)).await.expect("pods deleted");
    // The kubelet deletes the pod object once the sandbox is stopped (its DEL done).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !leases(&server.endpoint, pb::ListLeasesRequest::default()).await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "rust-ipam leases left after the pods are gone");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let left: Vec<String> =
        cluster_leases(node).into_iter().filter(|a| !cluster_before.contains(a)).collect();
    assert!(left.is_empty(), "host-local leases of the deleted pods left: {left:?}");
    let dels = node.daemon_metric("rust_multus_calls_total{verb=\"DEL\",result=\"ok\"}").expect("metrics");
    assert!(dels >= 4.0, "the DELs went through the daemon: {dels}");
}
