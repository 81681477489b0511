//! A real node (tests/src/node.rs) through what happens to nodes: the kubelet restarted,
//! containerd restarted, the whole node stopped and started again, the rust-ipam server
//! away while pods start. After each, the leases the server holds are exactly the
//! attachments alive (one per pod and network, of its live sandbox), no address is held
//! twice and no pod network namespace is left without a sandbox.
//!
//! The tests share one node and restart parts of it, so they run one at a time.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rust_ipam_e2e::envtest;
use rust_ipam_e2e::fixtures::leases;
use rust_ipam_e2e::node::{self, Node, PodCheck};
use rust_ipam_e2e::{ServerOptions, ServerProcess};
use rust_ipam_proto::v1 as pb;
use serde_json::json;
use tokio::sync::Mutex;

/// One test at a time on the node.
static NODE_TURN: Mutex<()> = Mutex::const_new(());

/// The leases `server` holds as (sandbox, address), sorted.
async fn held(server: &str) -> Vec<(String, String)> {
    let mut held: Vec<(String, String)> = leases(server, pb::ListLeasesRequest::default())
        .await
        .into_iter()
        .map(|l| (l.container_id, l.address))
        .collect();
    held.sort();
    held
}

/// What the pods' live sandboxes hold on network `network`, sorted.
fn alive(pods: &[PodCheck], network: &str) -> Vec<(String, String)> {
    let mut alive: Vec<(String, String)> = pods
        .iter()
        .flat_map(|p| p.ips_of(network).into_iter().map(|ip| (p.sandbox.id.clone(), ip)))
        .collect();
    alive.sort();
    alive
}

/// Checks every pod of `names` from inside until each has a live sandbox not in
/// `old_sandboxes`, or fails after `within`.
async fn checked_again(
    node: &Node,
    client: &kube::Client,
    ns: &str,
    names: &[String],
    old_sandboxes: &BTreeSet<String>,
    within: Duration,
) -> Vec<PodCheck> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    for name in names {
        loop {
            match node.check_pod(client, ns, name).await {
                Ok(c) if !old_sandboxes.contains(&c.sandbox.id) => {
                    out.push(c);
                    break;
                }
                r => {
                    assert!(
                        Instant::now() < deadline,
                        "{name} has no new live sandbox after {within:?}: {r:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    out
}

/// Waits until the server holds exactly what the pods' live sandboxes hold on `network`
/// (DELs of old sandboxes may still be on their way), then asserts there is no stray pod
/// network namespace.
async fn leases_match(node: &Node, server: &str, pods: &[PodCheck], network: &str) {
    let want = alive(pods, network);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = held(server).await;
        if got == want {
            break;
        }
        assert!(Instant::now() < deadline, "the server holds {got:?}, the live sandboxes {want:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stray = node.stray_netns().expect("netns");
    assert!(stray.is_empty(), "pod network namespaces without a sandbox: {stray:?}");
}

/// Deletes a test's pods while its server still runs, and checks that their DELs freed
/// every lease: the next test on the node (whose runtime GC reaches every network of
/// every pod there) finds nothing of this one.
async fn finish(node: &Node, client: &kube::Client, ns: &str, names: &[String], server: &str) {
    node.delete_pods(client, ns, names, Duration::from_secs(60)).await.expect("pods deleted");
    leases_match(node, server, &[], "").await;
}

/// Pods keep running, their sandboxes and leases unchanged, across a kubelet restart and a
/// containerd restart (SIGKILL each): nothing is added, released or leaked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_and_containerd_restarts_change_nothing() {
    let Some(node) = Node::shared("kubelet_and_containerd_restarts_change_nothing") else { return };
    let _turn = NODE_TURN.lock().await;
    let ns = node.envtest.namespace("restarts").await.expect("namespace");
    let data = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(data.path()).await.expect("server");
    node::macvlan_nad(&ns, "backend", &node::master(2), node::rust_ipam("10.58.0.0/24", &server.endpoint))
        .await
        .expect("NAD");
    let admin = ns.admin_client().await.expect("admin client");
    let network = format!("{}/backend", ns.name);
    let run = node
        .run_pods(&admin, &ns.name, "app", 4, Some("backend"), Duration::from_secs(60))
        .await
        .expect("pods");
    leases_match(node, &server.endpoint, &run.pods, &network).await;
    let before: Vec<(String, String)> = alive(&run.pods, &network);

    for (what, restart) in [("kubelet", 0), ("containerd", 1)] {
        if restart == 0 {
            node.restart_kubelet().await.expect("kubelet restarted");
        } else {
            node.restart_containerd().await.expect("containerd restarted");
        }
        let names: Vec<String> = run.pods.iter().map(|p| p.name.clone()).collect();
        node.wait_running(&admin, &ns.name, &names, Duration::from_secs(30)).await.expect("still running");
        let mut again = Vec::new();
        for p in &run.pods {
            let c = node.check_pod(&admin, &ns.name, &p.name).await.expect("pod checks out");
            assert_eq!(c.sandbox, p.sandbox, "{} got a new sandbox after the {what} restart", p.name);
            again.push(c);
        }
        assert_eq!(alive(&again, &network), before, "addresses after the {what} restart");
        leases_match(node, &server.endpoint, &again, &network).await;
    }
    let names: Vec<String> = run.pods.iter().map(|p| p.name.clone()).collect();
    finish(node, &admin, &ns.name, &names, &server.endpoint).await;
}

/// The whole node stopped (kubelet, containerd and every container killed, /run's state
/// gone) and started again: the kubelet recreates every sandbox, the runtime's DEL of each
/// dead sandbox (with no network namespace left) frees its lease, and the server ends up
/// holding exactly the new sandboxes' addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stopped_and_started_recreates_sandboxes_and_frees_the_old() {
    let Some(node) = Node::shared("node_stopped_and_started_recreates_sandboxes_and_frees_the_old") else {
        return;
    };
    let _turn = NODE_TURN.lock().await;
    let ns = node.envtest.namespace("reboot").await.expect("namespace");
    let data = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(data.path()).await.expect("server");
    node::macvlan_nad(&ns, "backend", &node::master(3), node::rust_ipam("10.59.0.0/24", &server.endpoint))
        .await
        .expect("NAD");
    let admin = ns.admin_client().await.expect("admin client");
    let network = format!("{}/backend", ns.name);
    let run = node
        .run_pods(&admin, &ns.name, "app", 3, Some("backend"), Duration::from_secs(60))
        .await
        .expect("pods");
    leases_match(node, &server.endpoint, &run.pods, &network).await;

    node.power_off(false).expect("node off");
    node.power_on().await.expect("node back");
    let old: BTreeSet<String> = run.pods.iter().map(|p| p.sandbox.id.clone()).collect();
    let names: Vec<String> = run.pods.iter().map(|p| p.name.clone()).collect();
    let again = checked_again(node, &admin, &ns.name, &names, &old, Duration::from_secs(90)).await;
    leases_match(node, &server.endpoint, &again, &network).await;
    finish(node, &admin, &ns.name, &names, &server.endpoint).await;
}

/// With the rust-ipam server away, new pods wait (the plugin fails, the runtime tears the
/// half-built sandbox down, the kubelet tries again) and leave nothing behind; once the
/// server is back where the NAD points, they start, each with one lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_wait_for_an_absent_server_and_start_when_it_returns() {
    let Some(node) = Node::shared("pods_wait_for_an_absent_server_and_start_when_it_returns") else { return };
    let _turn = NODE_TURN.lock().await;
    let ns = node.envtest.namespace("away").await.expect("namespace");
    let data = tempfile::tempdir().expect("tempdir");
    let opts = ServerOptions {
        addr: Some(format!("127.0.0.1:{}", rust_ipam_e2e::free_port().expect("port"))),
        ..ServerOptions::default()
    };
    let mut server = ServerProcess::start_with(data.path(), &opts).await.expect("server");
    node::macvlan_nad(&ns, "backend", &node::master(4), node::rust_ipam("10.60.0.0/24", &server.endpoint))
        .await
        .expect("NAD");
    server.kill_hard().expect("server stopped");

    let admin = ns.admin_client().await.expect("admin client");
    let names: Vec<String> = (0..2).map(|i| format!("late-{i}")).collect();
    for n in &names {
        envtest::create(&admin, Some(&ns.name), Node::pod(n, Some("backend"))).await.expect("pod");
    }
    // The plugin gives up after its budget (10 s); the runtime reports the failed sandbox.
    let created = Instant::now();
    let deadline = created + Duration::from_secs(60);
    loop {
        let events = envtest::list(&admin, Some(&ns.name), "v1", "Event").await.expect("events");
        let failed = events.iter().find(|e| e["reason"] == "FailedCreatePodSandBox");
        if let Some(e) = failed {
            let message = e["message"].as_str().unwrap_or_default();
            assert!(message.contains("no rust-ipam server answered"), "the event names the cause: {message}");
            println!("first failed sandbox reported {:?} after the pods were created", created.elapsed());
            break;
        }
        assert!(Instant::now() < deadline, "no FailedCreatePodSandBox event: {events:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let err = node.wait_running(&admin, &ns.name, &names, Duration::ZERO).await.expect_err("no pod can run");
    assert!(err.to_string().contains("2 of 2 pods not Running"), "{err:#}");
    // Sandboxes being tried have their network namespaces now: what failed attempts left
    // is looked for once the pods run (leases_match).

    let server = ServerProcess::start_with(data.path(), &opts).await.expect("server back");
    let back = Instant::now();
    node.wait_running(&admin, &ns.name, &names, Duration::from_secs(90)).await.expect("pods start");
    println!("pods Running {:?} after the server came back", back.elapsed());
    let mut pods = Vec::new();
    for n in &names {
        pods.push(node.check_pod(&admin, &ns.name, n).await.expect("pod checks out"));
    }
    leases_match(node, &server.endpoint, &pods, &format!("{}/backend", ns.name)).await;
    finish(node, &admin, &ns.name, &names, &server.endpoint).await;
}

/// A node whose runtime lost its own store (reinstalled, disk replaced) comes back knowing
/// none of its old sandboxes, so no DEL comes for them. A pod still in the API server gets
/// a new sandbox and keeps its address (same pod and interface: the lease moves to the new
/// sandbox); a pod deleted while the node was down leaves its lease behind, and the
/// runtime's CNI GC through rust-multus frees it and keeps the live one.
///
/// Debian 12's containerd 1.6 predates CNI GC (CNI 1.1), so the test sends the GC a
/// runtime that has it sends: the node's network config at version 1.1.0 with every
/// running sandbox in `cni.dev/valid-attachments`, to the node's rust-multus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_gc_frees_what_a_forgotten_sandbox_held() {
    let Some(node) = Node::shared("runtime_gc_frees_what_a_forgotten_sandbox_held") else { return };
    let _turn = NODE_TURN.lock().await;
    let ns = node.envtest.namespace("forgot").await.expect("namespace");
    let data = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(data.path()).await.expect("server");
    node::macvlan_nad(&ns, "backend", &node::master(5), node::rust_ipam("10.61.0.0/24", &server.endpoint))
        .await
        .expect("NAD");
    let admin = ns.admin_client().await.expect("admin client");
    let network = format!("{}/backend", ns.name);
    let run = node
        .run_pods(&admin, &ns.name, "app", 2, Some("backend"), Duration::from_secs(60))
        .await
        .expect("pods");
    let (kept, gone) = (&run.pods[0], &run.pods[1]);

    node.power_off(true).expect("node off");
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(admin.clone(), &ns.name);
    pods.delete(&gone.name, &kube::api::DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
        .await
        .expect("force delete");
    node.power_on().await.expect("node back");
    let old: BTreeSet<String> = run.pods.iter().map(|p| p.sandbox.id.clone()).collect();
    let again = checked_again(
        node,
        &admin,
        &ns.name,
        std::slice::from_ref(&kept.name),
        &old,
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(
        again[0].ips_of(&network),
        kept.ips_of(&network),
        "the pod keeps its address in a new sandbox"
    );
    let mut want = alive(&again, &network);
    want.extend(alive(std::slice::from_ref(gone), &network));
    want.sort();
    assert_eq!(held(&server.endpoint).await, want, "the live pod's lease moved; the deleted pod's is left");

    let conf: serde_json::Value = serde_json::from_slice(
        &std::fs::read(node.conf_dir.join("00-rust-multus.conf")).expect("node config"),
    )
    .expect("node config JSON");
    let mut gc = conf.clone();
    gc["cniVersion"] = json!("1.1.0");
    let live = node.live_sandboxes().expect("sandboxes");
    gc["cni.dev/valid-attachments"] =
        live.iter().map(|s| json!({"containerID": s.id, "ifname": "eth0"})).collect::<Vec<_>>().into();
    let bin_dir = node.bin_dir.display().to_string();
    let out = rust_ipam_e2e::run_cni(
        &mut std::process::Command::new(node.bin_dir.join("rust-multus")),
        &[
            ("CNI_COMMAND", "GC"),
            ("CNI_PATH", &bin_dir),
            ("NODE_NAME", node::NODE_NAME),
            ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        ],
        &gc.to_string(),
    );
    assert_eq!(out.code, 0, "GC: {:?} {}", out.out, out.stderr);
    leases_match(node, &server.endpoint, &again, &network).await;
    finish(node, &admin, &ns.name, std::slice::from_ref(&kept.name), &server.endpoint).await;
}
