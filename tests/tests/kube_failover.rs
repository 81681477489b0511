//! Two `rust-ipam-server` replicas on the kube store, electing a leader through a real
//! kube-apiserver (`rust_ipam_e2e::envtest`), each as the server's ServiceAccount with
//! deploy/'s RBAC: the follower refers clients to the leader, and when the leader is killed in
//! the middle of a stream of allocations the follower takes over; afterwards every
//! acknowledged lease exists and no address is held twice.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rust_ipam_e2e::envtest::{self, SERVER_ACCOUNT, TestNamespace};
use rust_ipam_e2e::fixtures::{allocate_request, lease_objects, leases, objects, pod, status};
use rust_ipam_e2e::{ServerOptions, ServerProcess, run_ipam_plugin};
use rust_ipam_proto::v1 as pb;
use rust_ipam_proto::v1::ipam_client::IpamClient;
use rust_ipam_proto::{LEADER_METADATA, connect};
use serde_json::json;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const CLIENTS: usize = 16;

fn request(cid: &str) -> pb::AllocateRequest {
    allocate_request(cid, Some(pod("ha", cid, "")), "node-a", "198.18.0.0/16")
}

/// Allocates through whichever replica leads: follows the leader hint, else tries the
/// other endpoint, until `deadline`. The address and the endpoint that answered.
async fn allocate(endpoints: &[String], cid: &str, deadline: Instant) -> Option<(String, String)> {
    let mut target = endpoints[0].clone();
    let mut turn = 0;
    while Instant::now() < deadline {
        if let Ok(ch) = connect(&target, Duration::from_millis(300)).await {
            match IpamClient::new(ch).allocate(request(cid)).await {
                Ok(r) => return Some((r.into_inner().leases[0].address.clone(), target)),
                Err(s) => {
                    if let Some(hint) = s.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok()) {
                        target = hint.to_string();
                        continue;
                    }
                }
            }
        }
        turn += 1;
        target = endpoints[turn % endpoints.len()].clone();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// One acknowledged allocation: when, for whom, what, and which replica answered.
type Ack = (Instant, String, String, String);

fn options(ns: &TestNamespace, identity: &str, log: std::path::PathBuf) -> ServerOptions {
    let timings = ["--lease-ttl", "3s", "--renew-every", "500ms", "--pool-status-every", "300ms"];
    ServerOptions::kube_replica(identity, &ns.kubeconfig(SERVER_ACCOUNT), &ns.name, log, &timings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_follower_takes_over_and_nothing_acknowledged_is_lost() {
    let Some(env) = envtest::shared("the_follower_takes_over_and_nothing_acknowledged_is_lost") else {
        return;
    };
    let ns = env.namespace("failover").await.expect("namespace");
    let admin = ns.admin_client().await.expect("admin client");
    let dir = tempfile::tempdir().expect("tempdir");
    let a = ServerProcess::start_with(
        &dir.path().join("a"),
        &options(&ns, "replica-a", dir.path().join("a.log")),
    )
    .await
    .expect("replica a");
    let b = ServerProcess::start_with(
        &dir.path().join("b"),
        &options(&ns, "replica-b", dir.path().join("b.log")),
    )
    .await
    .expect("replica b");
    let mut replicas = [Some(a), Some(b)];

    // One of them leads within a few renewals.
    let deadline = Instant::now() + Duration::from_secs(20);
    let leader = loop {
        let mut leading = None;
        for (i, r) in replicas.iter().enumerate() {
            let r = r.as_ref().expect("running");
            if status(&r.endpoint).await.is_some_and(|s| s.serving) {
                leading = Some(i);
            }
        }
        if let Some(i) = leading {
            break i;
        }
        assert!(Instant::now() < deadline, "no replica became leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let follower = 1 - leader;
    let leader_ep = replicas[leader].as_ref().expect("leader").endpoint.clone();
    let follower_ep = replicas[follower].as_ref().expect("follower").endpoint.clone();

    // The follower refers clients to the leader and says it does not serve. It learns who
    // leads at its next look at the Lease, which may come after the leader serves.
    let deadline = Instant::now() + Duration::from_secs(5);
    let st = loop {
        let st = status(&follower_ep).await.expect("follower status");
        if !st.leader.is_empty() || Instant::now() > deadline {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!st.serving);
    assert_eq!(st.leader, if leader == 0 { "replica-a" } else { "replica-b" });
    let ch = connect(&follower_ep, Duration::from_secs(2)).await.expect("connect");
    let refused = IpamClient::new(ch).allocate(request("probe")).await.expect_err("follower refuses");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert_eq!(
        refused.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok()),
        Some(leader_ep.as_str())
    );

    // Only the leader is ready, so a Service routes to it alone.
    let (lead, foll) =
        (replicas[leader].as_ref().expect("leader"), replicas[follower].as_ref().expect("follower"));
    assert_eq!(lead.http_get("/readyz").await.expect("leader readyz"), (200, "ready\n".into()));
    let (code, body) = foll.http_get("/readyz").await.expect("follower readyz");
    assert_eq!(code, 503, "follower readyz: {body}");
    assert!(body.contains("not the leader"), "follower readyz names why: {body}");
    for (ep, want) in [(&leader_ep, ServingStatus::Serving), (&follower_ep, ServingStatus::NotServing)] {
        let ch = connect(ep, Duration::from_secs(2)).await.expect("connect");
        let got = HealthClient::new(ch)
            .check(HealthCheckRequest { service: String::new() })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(got.status, want as i32, "grpc.health.v1 of {ep}");
    }

    // The CNI plugin pointed at the follower alone follows the hint to the leader.
    let conf = json!({"cniVersion": "1.0.0", "name": "ha", "type": "rust-ipam",
        "ipam": {"type": "rust-ipam", "range": "198.18.0.0/16", "server": follower_ep, "timeout_ms": 5000}});
    let out = run_ipam_plugin("ADD", "cni-probe", "K8S_POD_NAMESPACE=ha;K8S_POD_NAME=cni-probe", &conf);
    assert_eq!(out.code, 0, "plugin via follower: {} {}", out.out, out.stderr);
    assert_eq!(out.out["ips"][0]["address"], "198.18.0.1/16");

    // A stream of allocations; the leader is killed in the middle of it.
    let endpoints = vec![follower_ep.clone(), leader_ep.clone()];
    let acked: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (endpoints, acked, stop) = (endpoints.clone(), acked.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut unanswered = 0;
            for i in 0.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let cid = format!("c{c}-{i}");
                match allocate(&endpoints, &cid, Instant::now() + Duration::from_secs(30)).await {
                    Some((addr, by)) => acked.lock().expect("lock").push((Instant::now(), cid, addr, by)),
                    None => unanswered += 1,
                }
            }
            unanswered
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_kill = acked.lock().expect("lock").len();
    assert!(before_kill > 0, "no allocation went through the leader");
    let killed_at = Instant::now();
    replicas[leader].as_mut().expect("leader").kill_hard().expect("kill -9 the leader");
    // Until the survivor has served for two seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let after: Vec<Instant> =
            // Answers of the survivor: the old leader's last answers may still arrive after
            // the kill was sent.
            acked.lock().expect("lock").iter().filter(|a| a.3 == follower_ep).map(|a| a.0).filter(|t| *t > killed_at).collect();
        if after.first().is_some_and(|first| first.elapsed() > Duration::from_secs(2)) {
            break;
        }
        assert!(Instant::now() < deadline, "the follower did not take over within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut unanswered = 0;
    for c in clients {
        unanswered += c.await.expect("client");
    }
    assert_eq!(unanswered, 0, "every allocation is answered within 30 s through the failover");
    let acked = Arc::try_unwrap(acked).expect("clients done").into_inner().expect("lock");
    let first_after =
        acked.iter().filter(|a| a.3 == follower_ep).map(|a| a.0).min().expect("the survivor answered");
    let last_before =
        acked.iter().filter(|a| a.3 == leader_ep).map(|a| a.0).max().expect("the old leader answered");
    let gap = first_after - last_before;
    let survivor = status(&follower_ep).await.expect("survivor status");
    assert!(survivor.serving, "the former follower leads now");
    // It took over from its warm copy of the leases (the watch), not by listing them all.
    let log = std::fs::read_to_string(dir.path().join(["a.log", "b.log"][follower])).expect("survivor log");
    assert!(
        log.lines().any(|l| l.contains("leases from the mirror") && l.contains("leases=")),
        "the new leader did not load from its mirror:\n{log}"
    );

    // What the API server holds: every acknowledged lease, each address once.
    let mut held = BTreeMap::new();
    let mut addresses = HashSet::new();
    for o in lease_objects(&admin, &ns.name).await {
        assert!(addresses.insert(o.address.clone()), "{} stored twice", o.address);
        held.insert(o.container_id, o.address);
    }
    for (_, cid, addr, _) in &acked {
        assert_eq!(held.get(cid), Some(addr), "acknowledged lease of {cid} is not in the store");
    }
    // The new leader keeps the pool's usage in the RangePool status.
    let deadline = Instant::now() + Duration::from_secs(10);
    let used = loop {
        let pools = objects(&admin, &ns.name, "RangePool").await;
        let used = pools
            .iter()
            .find(|p| p["spec"]["range"] == "198.18.0.0/16")
            .and_then(|p| p["status"]["used"].as_str().map(str::to_string));
        if used == Some(held.len().to_string()) || Instant::now() > deadline {
            break used;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(used, Some(held.len().to_string()), "RangePool status.used");
    println!(
        "failover: {} allocations acknowledged ({before_kill} before the kill), {} leases stored; \
         gap between the last answer of the old leader and the first of the new: {gap:?} \
         (lease TTL 3 s, renew every 500 ms)",
        acked.len(),
        held.len()
    );
}

/// Relay (a stand-in for a partition: see `rust_ipam_e2e::relay`): the leader's connection
/// to the real API server goes silent while the follower's works. With the shipped
/// defaults the leader must stop serving (Status, /readyz) before the follower can take
/// over, so there is never a moment with two serving replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_api_stops_serving_before_another_takes_over() {
    let test = "a_leader_cut_off_from_the_api_stops_serving_before_another_takes_over";
    let Some(env) = envtest::shared(test) else { return };
    let ns = env.namespace("partition").await.expect("namespace");
    let api: std::net::SocketAddr = env.url.trim_start_matches("https://").parse().expect("API address");
    let relay = rust_ipam_e2e::relay::Relay::start(api).await.expect("relay");
    let via = ns.kubeconfig_via(SERVER_ACCOUNT, &format!("https://{}", relay.addr)).expect("kubeconfig");
    let dir = tempfile::tempdir().expect("tempdir");
    // The shipped election defaults.
    let opts = |identity: &str, kubeconfig: &std::path::Path, wait_serving: bool| ServerOptions {
        wait_serving,
        ..ServerOptions::kube_replica(
            identity,
            kubeconfig,
            &ns.name,
            dir.path().join(format!("{identity}.log")),
            &[],
        )
    };
    let cut =
        ServerProcess::start_with(&dir.path().join("cut"), &opts("cut", &via, true)).await.expect("leader");
    let other = ServerProcess::start_with(
        &dir.path().join("other"),
        &opts("other", &ns.kubeconfig(SERVER_ACCOUNT), false),
    )
    .await
    .expect("follower");
    assert!(status(&cut.endpoint).await.is_some_and(|s| s.serving), "the first replica leads");
    relay.freeze();
    let frozen = Instant::now();
    let (mut cut_stopped, mut other_started) = (None, None);
    while other_started.is_none() {
        assert!(
            frozen.elapsed() < Duration::from_secs(20),
            "the other replica did not take over within 20 s"
        );
        if cut_stopped.is_none() && status(&cut.endpoint).await.is_some_and(|s| !s.serving) {
            cut_stopped = Some(frozen.elapsed());
        }
        if status(&other.endpoint).await.is_some_and(|s| s.serving) {
            other_started = Some(frozen.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (stopped, started) =
        (cut_stopped.expect("the cut-off leader stopped serving"), other_started.expect("took over"));
    println!(
        "partition: the cut-off leader stopped serving {stopped:?} after the cut, the other replica served {started:?} after it"
    );
    assert!(stopped < started, "the cut-off leader served until {stopped:?}, the other from {started:?}");
    let (code, body) = cut.http_get("/readyz").await.expect("readyz");
    assert_eq!(code, 503, "the cut-off replica is not ready: {body}");
}

/// A create the previous leader sent before it was deposed can land after the new leader
/// loaded: the API server held it while etcd was down (kube_faults' etcd restart meets this
/// now and then). Here the test's admin client writes that late object for a pod the leader
/// has already given an address, at another address. The leader takes it into memory (its
/// ListLeases shows it, the metric counts it, its own creates are not counted), and the
/// pod's release frees both objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_object_that_lands_after_the_leader_loaded_is_held_and_freed_with_its_pod() {
    let test = "a_lease_object_that_lands_after_the_leader_loaded_is_held_and_freed_with_its_pod";
    let Some(env) = envtest::shared(test) else { return };
    let ns = env.namespace("latelease").await.expect("namespace");
    let admin = ns.admin_client().await.expect("admin client");
    let dir = tempfile::tempdir().expect("tempdir");
    let leader = ServerProcess::start_with(
        &dir.path().join("a"),
        &options(&ns, "replica-a", dir.path().join("a.log")),
    )
    .await
    .expect("replica");
    let ch = connect(&leader.endpoint, Duration::from_secs(2)).await.expect("connect");
    let mut ipam = IpamClient::new(ch);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut own = Vec::new();
    for cid in ["own-0", "own-1", "late-pod"] {
        own.push(allocate(std::slice::from_ref(&leader.endpoint), cid, deadline).await.expect("allocated").0);
    }
    assert_eq!(own, ["198.18.0.1", "198.18.0.2", "198.18.0.3"]);

    // What the previous leader had allocated for late-pod before its ADD was retried here.
    let late = json!({"network": "", "address": "198.18.0.9", "range": "198.18.0.0/16", "prefixLen": 16,
        "containerId": "late-pod", "ifname": "net1", "podRef": "ha/late-pod", "node": "node-a", "createdUnixMs": 1});
    envtest::create(&admin, Some(&ns.name), rust_ipam_e2e::fixtures::iplease("198.18.0.9", late))
        .await
        .expect("the late create");
    let filter = pb::ListLeasesRequest { container_id: "late-pod".into(), ..Default::default() };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held: Vec<String> =
            leases(&leader.endpoint, filter.clone()).await.into_iter().map(|l| l.address).collect();
        if held == ["198.18.0.3", "198.18.0.9"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the leader holds {held:?} for late-pod 10 s after the late create"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, metrics) = leader.http_get("/metrics").await.expect("metrics");
    assert!(
        metrics.lines().any(|l| l == "rustipam_late_leases_adopted_total 1"),
        "one late object counted, the leader's own creates not: {}",
        metrics.lines().filter(|l| l.contains("late_leases")).collect::<Vec<_>>().join("\n")
    );
    // The address is held: the next pod gets 198.18.0.4, and .9 is skipped when reached.
    for (i, want) in ["198.18.0.4", "198.18.0.5", "198.18.0.6", "198.18.0.7", "198.18.0.8", "198.18.0.10"]
        .iter()
        .enumerate()
    {
        let got = allocate(std::slice::from_ref(&leader.endpoint), &format!("next-{i}"), deadline).await;
        assert_eq!(got.expect("allocated").0, *want);
    }

    let release = pb::ReleaseRequest {
        attachment: Some(pb::Attachment {
            container_id: "late-pod".into(),
            ifname: "net1".into(),
            ..Default::default()
        }),
        network: String::new(),
    };
    let released = ipam.release(release).await.expect("release").into_inner().released;
    let mut freed: Vec<String> = released.into_iter().map(|l| l.address).collect();
    freed.sort();
    assert_eq!(freed, ["198.18.0.3", "198.18.0.9"]);
    let left: Vec<String> = lease_objects(&admin, &ns.name)
        .await
        .into_iter()
        .filter(|o| o.container_id == "late-pod")
        .map(|o| o.address)
        .collect();
    assert!(left.is_empty(), "the API server still holds {left:?} for late-pod after its release");
}
