//! Stale-lease reconcile against a real kube-apiserver (`rust_ipam_e2e::envtest`), with real
//! `rust-ipam-server` processes on the kube store running as the server's ServiceAccount: pods
//! appear, vanish and are recreated under the same name;
//! `rust-ipam-ctl reconcile --dry-run` prints what a real pass then frees, exactly; leases
//! of live pods, young leases and manual reservations stay; a pod recreated (and its lease
//! taken back) while a pass runs keeps its address; only the leader reconciles.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use rust_ipam_e2e::envtest::{self, SERVER_ACCOUNT, TestNamespace, create_pod, delete_pod};
use rust_ipam_e2e::fixtures::{self, LeaseObject, allocate_request, ipleases_path, lease_objects, status};
use rust_ipam_e2e::kube_standin::KubeStandin;
use rust_ipam_e2e::{ServerOptions, ServerProcess, workspace_bin};
use rust_ipam_proto::v1 as pb;
use rust_ipam_proto::v1::{admin_client::AdminClient, ipam_client::IpamClient};
use rust_ipam_proto::{LEADER_METADATA, connect};

/// A replica whose election runs on short timings.
fn options(
    dir: &std::path::Path,
    cfg: &std::path::Path,
    ns: &str,
    identity: &str,
    extra: &[&str],
) -> ServerOptions {
    let args = [&["--lease-ttl", "3s", "--renew-every", "500ms"][..], extra].concat();
    ServerOptions::kube_replica(identity, cfg, ns, dir.join(format!("{identity}.log")), &args)
}

/// The test API server: a namespace for the server and an admin client (which makes and
/// deletes the pods), or `None` after SKIP.
async fn cluster(test: &str) -> Option<(TestNamespace, kube::Client)> {
    let env = envtest::shared(test)?;
    let ns = env.namespace("reconcile").await.expect("namespace");
    let admin = ns.admin_client().await.expect("admin client");
    Some((ns, admin))
}

/// A namespace for the test's pods.
async fn pod_namespace(prefix: &str) -> String {
    let env = envtest::shared(prefix).expect("started");
    env.namespace(prefix).await.expect("namespace").name
}

/// A stand-in and a kubeconfig for it.
async fn standin(dir: &std::path::Path) -> (KubeStandin, std::path::PathBuf) {
    let standin = KubeStandin::start().await.expect("stand-in");
    let cfg = dir.join("kubeconfig");
    standin.kubeconfig(&cfg, "rust-ipam").expect("kubeconfig");
    (standin, cfg)
}

async fn wait_serving(endpoint: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !status(endpoint).await.is_some_and(|s| s.serving) {
        assert!(Instant::now() < deadline, "{endpoint} did not lead within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn allocate(endpoint: &str, cid: &str, pod: Option<(&str, &str, &str)>) -> String {
    let ch = connect(endpoint, Duration::from_secs(5)).await.expect("connect");
    let pod = pod.map(|(ns, name, uid)| fixtures::pod(ns, name, uid));
    let req = allocate_request(cid, pod, "node-a", "198.18.7.0/24");
    let r = IpamClient::new(ch).allocate(req).await.expect("allocate");
    r.into_inner().leases[0].address.clone()
}

/// Admin ListLeases: address -> container ID ("" for a reservation).
async fn leases(endpoint: &str) -> BTreeMap<String, String> {
    let all = fixtures::leases(endpoint, pb::ListLeasesRequest::default()).await;
    all.into_iter().map(|l| (l.address, l.container_id)).collect()
}

/// The IPLease objects in `ns`: address -> (container ID, pod UID).
async fn objects(admin: &kube::Client, ns: &TestNamespace) -> BTreeMap<String, (String, String)> {
    by_address(lease_objects(admin, &ns.name).await)
}

/// Lease objects as address -> (container ID, pod UID).
fn by_address(objects: impl IntoIterator<Item = LeaseObject>) -> BTreeMap<String, (String, String)> {
    objects.into_iter().map(|o| (o.address, (o.container_id, o.pod_uid))).collect()
}

/// Runs `rust-ipam-ctl reconcile ARGS`: exit code, stdout, stderr.
fn reconcile_cli(args: &[&str]) -> (i32, String, String) {
    reconcile_with("rust-ipam-ctl", args)
}

/// Runs `BIN reconcile ARGS` (`rust-ipam-ctl`, or `rust-ipam-server`'s spelling that
/// deployed manifests may still use): exit code, stdout, stderr.
fn reconcile_with(bin: &str, args: &[&str]) -> (i32, String, String) {
    let bin = workspace_bin(bin).expect("binary");
    let out = Command::new(bin).arg("reconcile").args(args).output().expect("run reconcile");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// The table's rows: address -> (pod, reason, action).
fn rows(table: &str) -> BTreeMap<String, (String, String, String)> {
    let mut lines = table.lines();
    assert_eq!(
        lines.next().map(|h| h.split_whitespace().collect::<Vec<_>>()),
        Some(vec!["NETWORK", "ADDRESS", "POD", "NODE", "CONTAINER", "AGE", "REASON", "ACTION"]),
        "{table}"
    );
    lines
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() == 8 && f[1].parse::<std::net::IpAddr>().is_ok())
        .map(|f| (f[1].to_string(), (f[2].to_string(), f[6].to_string(), f[7].to_string())))
        .collect()
}

fn row(pod: &str, reason: &str, action: &str) -> (String, String, String) {
    (pod.into(), reason.into(), action.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_lists_what_the_real_pass_frees_and_nothing_live_is_touched() {
    let Some((ns, admin)) =
        cluster("dry_run_lists_what_the_real_pass_frees_and_nothing_live_is_touched").await
    else {
        return;
    };
    let apps = pod_namespace("apps").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = ns.kubeconfig(SERVER_ACCOUNT);
    let server = ServerProcess::start_with(
        &dir.path().join("data"),
        &options(dir.path(), &cfg, &ns.name, "solo", &["--reconcile-every", "0"]),
    )
    .await
    .expect("server");
    let ep = server.endpoint.clone();
    wait_serving(&ep).await;

    // Pods and their leases.
    let web0 = create_pod(&admin, &apps, "web-0").await.expect("pod");
    let web1 = create_pod(&admin, &apps, "web-1").await.expect("pod");
    let db0 = create_pod(&admin, &apps, "db-0").await.expect("pod");
    let a_web0 = allocate(&ep, "cid-web-0", Some((&apps, "web-0", &web0))).await;
    let a_web1 = allocate(&ep, "cid-web-1", Some((&apps, "web-1", &web1))).await;
    let a_db0 = allocate(&ep, "cid-db-0", Some((&apps, "db-0", &db0))).await;
    // A lease taken before its pod shows up (the pod appears before the pass).
    let a_late = allocate(&ep, "cid-late", Some((&apps, "late", ""))).await;
    // Never looked at: a lease without a pod, and a manual reservation.
    let a_nopod = allocate(&ep, "cid-nopod", None).await;
    let ch = connect(&ep, Duration::from_secs(5)).await.expect("connect");
    AdminClient::new(ch)
        .reserve(pb::ReserveRequest {
            network: String::new(),
            address: "198.18.7.200".into(),
            note: "router".into(),
        })
        .await
        .expect("reserve");
    create_pod(&admin, &apps, "late").await.expect("pod appears");
    // web-1 goes away; db-0 is deleted and recreated under its name (a new UID) but has not
    // taken an address yet.
    delete_pod(&admin, &apps, "web-1").await.expect("delete");
    delete_pod(&admin, &apps, "db-0").await.expect("delete");
    let db0_new = create_pod(&admin, &apps, "db-0").await.expect("recreate");
    assert_ne!(db0, db0_new);

    // Past a 3 s grace period for those; then a young lease whose pod is gone at once.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let tmp = create_pod(&admin, &apps, "tmp").await.expect("pod");
    let a_tmp = allocate(&ep, "cid-tmp", Some((&apps, "tmp", &tmp))).await;
    delete_pod(&admin, &apps, "tmp").await.expect("delete");

    let before_objects = objects(&admin, &ns).await;
    let before_leases = leases(&ep).await;
    assert_eq!(before_objects.len(), 7);
    assert_eq!(before_leases.len(), 7);

    let (code, dry, err) = reconcile_cli(&["--server", &ep, "--dry-run", "--grace", "3s"]);
    assert_eq!(code, 0, "dry run failed: {err}\n{dry}");
    println!("{dry}");
    let dry_rows = rows(&dry);
    assert_eq!(
        dry_rows,
        BTreeMap::from([
            (a_web1.clone(), row(&format!("{apps}/web-1"), "pod-gone", "would-free")),
            (a_db0.clone(), row(&format!("{apps}/db-0"), "pod-replaced", "would-free")),
            (a_tmp.clone(), row(&format!("{apps}/tmp"), "pod-gone", "kept-young")),
        ]),
        "{dry}"
    );
    assert!(
        dry.contains(&format!("{a_db0}: pod has uid {db0_new}, the lease was taken by uid {db0}")),
        "{dry}"
    );
    assert!(
        dry.lines().last().is_some_and(|l| l.starts_with("dry run: 2 would be freed, 1 kept, 0 failed")
            && l.ends_with("nothing changed")),
        "{dry}"
    );
    // A dry run changes nothing.
    assert_eq!(objects(&admin, &ns).await, before_objects);
    assert_eq!(leases(&ep).await, before_leases);

    let (code, real, err) = reconcile_cli(&["--server", &ep, "--grace", "3s"]);
    assert_eq!(code, 0, "pass failed: {err}\n{real}");
    println!("{real}");
    let real_rows = rows(&real);
    let would: BTreeSet<_> =
        dry_rows.iter().filter(|(_, r)| r.2 == "would-free").map(|(a, _)| a.clone()).collect();
    let freed: BTreeSet<_> =
        real_rows.iter().filter(|(_, r)| r.2 == "freed").map(|(a, _)| a.clone()).collect();
    assert_eq!(freed, would, "the real pass frees exactly the dry run's set");
    assert_eq!(real_rows[&a_tmp], row(&format!("{apps}/tmp"), "pod-gone", "kept-young"));
    assert!(real.lines().last().is_some_and(|l| l.starts_with("2 freed, 1 kept, 0 failed")), "{real}");

    // The store and the server agree: the two are gone, everything else stays.
    let mut expected = before_objects.clone();
    for a in &freed {
        expected.remove(a);
    }
    assert_eq!(objects(&admin, &ns).await, expected);
    let held: BTreeSet<String> = leases(&ep).await.into_keys().collect();
    let want: BTreeSet<String> =
        [&a_web0, &a_late, &a_nopod, &a_tmp, &"198.18.7.200".to_string()].into_iter().cloned().collect();
    assert_eq!(held, want);

    // Once its pod has been gone past the grace period, the young one goes too.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (code, last, err) = reconcile_cli(&["--server", &ep, "--grace", "1s"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        rows(&last),
        BTreeMap::from([(a_tmp.clone(), row(&format!("{apps}/tmp"), "pod-gone", "freed"))]),
        "{last}"
    );
    assert!(!objects(&admin, &ns).await.contains_key(&a_tmp));

    // Bad input is refused by the CLI before anything is sent.
    let (code, _, err) = reconcile_cli(&["--server", &ep, "--grace", "1500ms"]);
    assert_eq!(code, 1);
    assert!(err.contains("--grace 1.5s is not a whole number of seconds"), "{err}");
}

/// The race Whereabouts lost: the pod list is taken (db-0 is gone), then db-0 is recreated
/// and takes its address back, then the pass goes on. It must not free that address.
/// Stand-in: it holds the pod list's answer at the point the test chooses, which a real
/// API server cannot be made to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_recreated_while_a_pass_runs_keeps_its_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (standin, cfg) = standin(dir.path()).await;
    let server = ServerProcess::start_with(
        &dir.path().join("data"),
        &options(dir.path(), &cfg, "rust-ipam", "solo", &["--reconcile-every", "0"]),
    )
    .await
    .expect("server");
    let ep = server.endpoint.clone();
    wait_serving(&ep).await;

    let u1 = standin.create_pod("ss", "db-0").expect("pod");
    let addr = allocate(&ep, "sandbox-1", Some(("ss", "db-0", &u1))).await;
    let gone = standin.create_pod("ss", "gone").expect("pod");
    let addr_gone = allocate(&ep, "sandbox-g", Some(("ss", "gone", &gone))).await;
    standin.delete_pod("ss", "db-0").expect("delete");
    standin.delete_pod("ss", "gone").expect("delete");
    // Both leases are older than a zero grace period.
    tokio::time::sleep(Duration::from_millis(20)).await;

    let mut hold = standin.hold_next_list("/api/v1/pods");
    let pass = tokio::spawn({
        let ep = ep.clone();
        async move {
            let ch = connect(&ep, Duration::from_secs(30)).await.expect("connect");
            AdminClient::new(ch)
                .reconcile(pb::ReconcileRequest { dry_run: false, grace_seconds: Some(0) })
                .await
                .map(|r| r.into_inner())
        }
    });
    tokio::time::timeout(Duration::from_secs(20), hold.reached())
        .await
        .expect("the pass lists pods")
        .expect("hold");
    // The list has been read (without db-0); now db-0 comes back and takes its address.
    let u2 = standin.create_pod("ss", "db-0").expect("recreate");
    assert_eq!(
        allocate(&ep, "sandbox-2", Some(("ss", "db-0", &u2))).await,
        addr,
        "db-0 gets its address back"
    );
    hold.release();

    let report = pass.await.expect("join").expect("reconcile");
    let entries: BTreeMap<String, (pb::ReconcileReason, pb::ReconcileAction)> = report
        .entries
        .iter()
        .map(|e| (e.lease.clone().unwrap_or_default().address, (e.reason(), e.action())))
        .collect();
    assert_eq!(
        entries,
        BTreeMap::from([
            (addr.clone(), (pb::ReconcileReason::PodReplaced, pb::ReconcileAction::KeptChanged)),
            (addr_gone.clone(), (pb::ReconcileReason::PodGone, pb::ReconcileAction::Freed)),
        ])
    );
    assert_eq!(report.freed, 1);
    // db-0's address is held by its new sandbox, in the server and in the API server.
    assert_eq!(leases(&ep).await, BTreeMap::from([(addr.clone(), "sandbox-2".to_string())]));
    assert_eq!(
        by_address(standin.objects(&ipleases_path("rust-ipam")).iter().map(LeaseObject::of)),
        BTreeMap::from([(addr, ("sandbox-2".to_string(), u2))])
    );
}

/// A follower refers Reconcile to the leader; the CLI pointed at it follows. The leader's
/// timer frees a stale lease on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_reconciles_and_the_cli_follows_the_hint() {
    let Some((ns, admin)) = cluster("only_the_leader_reconciles_and_the_cli_follows_the_hint").await else {
        return;
    };
    let jobs = pod_namespace("jobs").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = ns.kubeconfig(SERVER_ACCOUNT);
    let timer = ["--reconcile-every", "1s", "--reconcile-grace", "0"];
    let a = ServerProcess::start_with(
        &dir.path().join("a"),
        &options(dir.path(), &cfg, &ns.name, "replica-a", &timer),
    )
    .await
    .expect("replica a");
    let b = ServerProcess::start_with(
        &dir.path().join("b"),
        &options(dir.path(), &cfg, &ns.name, "replica-b", &timer),
    )
    .await
    .expect("replica b");
    let deadline = Instant::now() + Duration::from_secs(20);
    let (leader, follower) = loop {
        let st = status(&a.endpoint).await.expect("status");
        match st.leader.as_str() {
            "replica-a" => break (&a, &b),
            "replica-b" => break (&b, &a),
            _ => {}
        }
        assert!(Instant::now() < deadline, "no leader within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    wait_serving(&leader.endpoint).await;

    let ch = connect(&follower.endpoint, Duration::from_secs(5)).await.expect("connect");
    let refused = AdminClient::new(ch)
        .reconcile(pb::ReconcileRequest { dry_run: true, grace_seconds: None })
        .await
        .expect_err("a follower does not reconcile");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert_eq!(
        refused.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok()),
        Some(leader.endpoint.as_str())
    );
    let (code, out, err) = reconcile_cli(&["--server", &follower.endpoint, "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().last().is_some_and(|l| l.starts_with("dry run: 0 would be freed")), "{out}");
    // The server binary's older spelling runs the same pass, hint followed. The summaries
    // agree up to the pod count, which counts every namespace's pods (other tests of this
    // binary make theirs meanwhile).
    let (code, alias, err) =
        reconcile_with("rust-ipam-server", &["--server", &follower.endpoint, "--dry-run"]);
    let summary = |s: &str| s.lines().last().map(|l| l.split(" pod leases").next().unwrap_or(l).to_string());
    assert_eq!((code, summary(&alias)), (0, summary(&out)), "{err}");

    // The leader's timer (every second, no grace) frees a lease once its pod is gone.
    let uid = create_pod(&admin, &jobs, "batch-1").await.expect("pod");
    let addr = allocate(&leader.endpoint, "sandbox-b1", Some((&jobs, "batch-1", &uid))).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(objects(&admin, &ns).await.contains_key(&addr), "a live pod's lease survives timer passes");
    delete_pod(&admin, &jobs, "batch-1").await.expect("delete");
    let deadline = Instant::now() + Duration::from_secs(10);
    while objects(&admin, &ns).await.contains_key(&addr) {
        assert!(Instant::now() < deadline, "the leader's timer did not free {addr} within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(leases(&leader.endpoint).await.is_empty());
    let log = std::fs::read_to_string(
        dir.path().join(format!("{}.log", if std::ptr::eq(leader, &a) { "replica-a" } else { "replica-b" })),
    )
    .expect("leader log");
    assert!(
        log.lines().any(|l| l.contains("reconcile freed a stale lease")
            && l.contains(&format!("address={addr}"))
            && l.contains(&format!("pod={jobs}/batch-1"))
            && l.contains("reason=\"pod-gone\"")),
        "the freed lease is logged:\n{log}"
    );
}

/// Without the Kubernetes API (embedded store, no kubeconfig) a pass is refused, saying why;
/// with `--store embedded --kubeconfig` the embedded store's leases are reconciled against
/// the API's pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_reconciles_only_with_a_kubeconfig() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(&dir.path().join("plain")).await.expect("server");
    let (code, out, err) = reconcile_cli(&["--server", &server.endpoint, "--dry-run"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains(
            "FailedPrecondition: reconcile needs the Kubernetes API to see pods (run in a cluster or pass --kubeconfig)"
        ),
        "{err}"
    );
    drop(server);

    let Some((ns, admin)) = cluster("the_embedded_store_reconciles_only_with_a_kubeconfig").await else {
        return;
    };
    let lab = pod_namespace("lab").await;
    let cfg = ns.kubeconfig(SERVER_ACCOUNT);
    let opts = ServerOptions {
        args: ["--store", "embedded", "--kubeconfig", &cfg.display().to_string(), "--reconcile-every", "0"]
            .map(String::from)
            .to_vec(),
        ..ServerOptions::default()
    };
    let server = ServerProcess::start_with(&dir.path().join("embedded"), &opts).await.expect("server");
    let ep = server.endpoint.clone();
    let live = create_pod(&admin, &lab, "live").await.expect("pod");
    let gone = create_pod(&admin, &lab, "gone").await.expect("pod");
    let a_live = allocate(&ep, "sandbox-live", Some((&lab, "live", &live))).await;
    let a_gone = allocate(&ep, "sandbox-gone", Some((&lab, "gone", &gone))).await;
    delete_pod(&admin, &lab, "gone").await.expect("delete");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (code, out, err) = reconcile_cli(&["--server", &ep, "--grace", "1s"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        rows(&out),
        BTreeMap::from([(a_gone, row(&format!("{lab}/gone"), "pod-gone", "freed"))]),
        "{out}"
    );
    assert_eq!(leases(&ep).await, BTreeMap::from([(a_live, "sandbox-live".to_string())]));
    assert!(objects(&admin, &ns).await.is_empty(), "the embedded store wrote no lease objects");
}
