//! Pods on a real node (tests/src/node.rs): the kubelet runs them through containerd and
//! `rust-multus`, each NAD's interface gets its address from `rust-ipam` against a
//! `rust-ipam-server`, and every address is checked inside the pod's sandbox, against the
//! network-status rust-multus wrote and the server's leases.

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use ipnetwork::IpNetwork;
use rust_ipam_e2e::ServerProcess;
use rust_ipam_e2e::fixtures::leases;
use rust_ipam_e2e::node::{self, CLUSTER_SUBNET, Node, PodCheck};
use rust_ipam_proto::v1 as pb;

/// Pings `to` from inside `from`'s sandbox.
fn ping(from: &PodCheck, to: &str) -> bool {
    Command::new("nsenter")
        .arg(format!("--net={}", from.sandbox.netns))
        .args(["ping", "-c", "1", "-W", "2", to])
        .output()
        .expect("nsenter ping")
        .status
        .success()
}

fn only(ips: Vec<String>, what: &str) -> String {
    assert_eq!(ips.len(), 1, "{what}: {ips:?}");
    ips[0].split('/').next().unwrap_or_default().to_string()
}

/// The seeds' pod: eth0 from the cluster network, net1 on the backend NAD (macvlan with
/// rust-ipam); two of them reach each other over net1; the server holds exactly their
/// leases, each naming the pod, its sandbox and the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_pod_gets_cluster_eth0_and_backend_net1() {
    let Some(node) = Node::shared("seeds_pod_gets_cluster_eth0_and_backend_net1") else { return };
    let ns = node.envtest.namespace("seeds").await.expect("namespace");
    let data = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(data.path()).await.expect("server");
    node::macvlan_nad(&ns, "backend", &node::master(0), node::rust_ipam("10.56.0.0/16", &server.endpoint))
        .await
        .expect("NAD");

    let admin = ns.admin_client().await.expect("admin client");
    let run = node
        .run_pods(&admin, &ns.name, "seed", 2, Some("backend"), Duration::from_secs(60))
        .await
        .expect("pods run and check out");
    println!("2 seeds' pods Running in {:?}", run.running);

    let backend = format!("{}/backend", ns.name);
    for p in &run.pods {
        let names: Vec<&str> = p.status.iter().filter_map(|e| e["name"].as_str()).collect();
        assert_eq!(names, ["cluster-net", backend.as_str()], "{}: {:?}", p.name, p.status);
        assert_eq!(p.status[0]["interface"], "eth0", "{:?}", p.status);
        assert_eq!(p.status[0]["default"], true, "{:?}", p.status);
        assert_eq!(p.status[1]["interface"], "net1", "{:?}", p.status);
        let eth0: IpAddr = only(p.ips_of("cluster-net"), "eth0").parse().expect("eth0 address");
        assert!(
            CLUSTER_SUBNET.parse::<IpNetwork>().expect("subnet").contains(eth0),
            "{eth0} not in {CLUSTER_SUBNET}"
        );
        let net1: IpAddr = only(p.ips_of(&backend), "net1").parse().expect("net1 address");
        assert!(
            "10.56.0.0/16".parse::<IpNetwork>().expect("range").contains(net1),
            "{net1} not in the backend range"
        );
    }
    let (a, b) = (&run.pods[0], &run.pods[1]);
    let b_net1 = only(b.ips_of(&backend), "net1");
    assert!(ping(a, &b_net1), "{} cannot reach {} on net1 ({b_net1})", a.name, b.name);

    let mut held: Vec<(String, String, String, String)> =
        leases(&server.endpoint, pb::ListLeasesRequest::default())
            .await
            .into_iter()
            .map(|l| {
                let pod = l.pod.unwrap_or_default();
                (l.address, format!("{}/{}", pod.namespace, pod.name), l.container_id, l.node)
            })
            .collect();
    held.sort();
    let mut want: Vec<(String, String, String, String)> = run
        .pods
        .iter()
        .map(|p| {
            (
                only(p.ips_of(&backend), "net1"),
                format!("{}/{}", ns.name, p.name),
                p.sandbox.id.clone(),
                node::NODE_NAME.into(),
            )
        })
        .collect();
    want.sort();
    assert_eq!(held, want, "the server's leases are the pods' net1 addresses");
}

/// The GPU node's layout: one NAD per rail, each on its own host link with its own range;
/// an 8-rail pod gets net1..net8, each address from its rail's range, and reaches the
/// other pod on every rail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_rail_pods_get_one_address_per_rail() {
    let Some(node) = Node::shared("eight_rail_pods_get_one_address_per_rail") else { return };
    let ns = node.envtest.namespace("rails").await.expect("namespace");
    let data = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(data.path()).await.expect("server");
    let range = |r: usize| format!("10.{}.0.0/24", 80 + r);
    for r in 0..node::MASTERS {
        node::macvlan_nad(
            &ns,
            &format!("rail{r}"),
            &node::master(r),
            node::rust_ipam(&range(r), &server.endpoint),
        )
        .await
        .expect("NAD");
    }
    let networks: Vec<String> = (0..node::MASTERS).map(|r| format!("rail{r}")).collect();

    let admin = ns.admin_client().await.expect("admin client");
    let run = node
        .run_pods(&admin, &ns.name, "gpu", 2, Some(&networks.join(",")), Duration::from_secs(60))
        .await
        .expect("pods run and check out");
    println!("2 eight-rail pods Running in {:?}", run.running);

    for p in &run.pods {
        for r in 0..node::MASTERS {
            let entry = &p.status[r + 1];
            assert_eq!(entry["name"], format!("{}/rail{r}", ns.name), "{:?}", p.status);
            assert_eq!(entry["interface"], format!("net{}", r + 1), "{:?}", p.status);
            let ip: IpAddr =
                only(p.ips_of(&format!("{}/rail{r}", ns.name)), "rail").parse().expect("address");
            assert!(
                range(r).parse::<IpNetwork>().expect("range").contains(ip),
                "rail{r}: {ip} not in {}",
                range(r)
            );
        }
    }
    let (a, b) = (&run.pods[0], &run.pods[1]);
    for r in 0..node::MASTERS {
        let to = only(b.ips_of(&format!("{}/rail{r}", ns.name)), "rail");
        assert!(ping(a, &to), "{} cannot reach {} on rail{r} ({to})", a.name, b.name);
    }
    let held = leases(&server.endpoint, pb::ListLeasesRequest::default()).await;
    assert_eq!(held.len(), 2 * node::MASTERS, "one lease per pod and rail: {held:?}");
}

/// A deleted pod's sandbox is torn down by the runtime's DEL through rust-multus: its lease
/// is gone within seconds. The pod created again under the same name runs in a fresh
/// sandbox, with a lease of that sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_pod_frees_its_lease_and_comes_back_fresh() {
    let Some(node) = Node::shared("deleted_pod_frees_its_lease_and_comes_back_fresh") else { return };
    let ns = node.envtest.namespace("churn").await.expect("namespace");
    let data = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(data.path()).await.expect("server");
    node::macvlan_nad(&ns, "backend", &node::master(1), node::rust_ipam("10.57.0.0/24", &server.endpoint))
        .await
        .expect("NAD");
    let admin = ns.admin_client().await.expect("admin client");
    let first = node
        .run_pods(&admin, &ns.name, "web", 1, Some("backend"), Duration::from_secs(60))
        .await
        .expect("pod runs");
    let before = &first.pods[0];
    let held = leases(&server.endpoint, pb::ListLeasesRequest::default()).await;
    assert_eq!(held.iter().map(|l| &l.container_id).collect::<Vec<_>>(), [&before.sandbox.id], "{held:?}");

    let names = vec![before.name.clone()];
    node.delete_pods(&admin, &ns.name, &names, Duration::from_secs(30)).await.expect("pod deleted");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let held = leases(&server.endpoint, pb::ListLeasesRequest::default()).await;
        if held.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the deleted pod's lease is still held: {held:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !std::path::Path::new(&before.sandbox.netns).exists(),
        "the deleted pod's network namespace {} is still there",
        before.sandbox.netns
    );

    let again = node
        .run_pods(&admin, &ns.name, "web", 1, Some("backend"), Duration::from_secs(60))
        .await
        .expect("pod runs again");
    let after = &again.pods[0];
    assert_ne!(after.uid, before.uid, "a new pod object");
    assert_ne!(after.sandbox.id, before.sandbox.id, "a fresh sandbox");
    let held = leases(&server.endpoint, pb::ListLeasesRequest::default()).await;
    let want = only(after.ips_of(&format!("{}/backend", ns.name)), "net1");
    assert_eq!(
        held.iter().map(|l| (l.container_id.clone(), l.address.clone())).collect::<Vec<_>>(),
        [(after.sandbox.id.clone(), want)],
        "exactly the new sandbox's lease"
    );
}
