//! Keeping addresses (issue #15) against a real kube-apiserver (`rust_ipam_e2e::envtest`),
//! through the `rust-ipam` plugin binary, with `rust-ipam-server` on the kube store as its
//! ServiceAccount under deploy/'s RBAC. There is no controller manager: the tests write the
//! StatefulSets and their pods (with the controller reference the StatefulSet controller
//! sets) and the IPAMClaims themselves, and scale or delete them by hand.
//!
//! - A StatefulSet's pod keeps its address across delete and recreate, whichever of the
//!   new sandbox's ADD and the old one's DEL comes first (on another node too); a pod of
//!   the same name that is not the set's never gets it; the address is freed by the DEL
//!   once the set is scaled below the ordinal, and by a reconcile pass once the set is
//!   deleted, never before.
//! - An IPAMClaim owns its address across a migration (the target's ADD while the source
//!   runs, then the source's DEL) and a restart (a pod of another name), gets it in
//!   `status.ips`, and lets go when it is deleted; a claim that does not exist, or exists
//!   only in another namespace, is a CNI error naming it and nothing is allocated.
//! - The embedded store keeps with `--kubeconfig` (`rust-ipam-ctl leases` shows it), frees
//!   at DEL with `--keep-statefulset-addresses=false`, and without a kubeconfig frees at DEL
//!   and refuses a claim, saying why.

use std::time::{Duration, Instant};

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use rust_ipam_e2e::envtest::{self, SERVER_ACCOUNT, TestNamespace};
use rust_ipam_e2e::fixtures::{self, status};
use rust_ipam_e2e::{CniOutput, ServerOptions, ServerProcess, run_ipam_plugin};
use rust_ipam_proto::connect;
use rust_ipam_proto::v1 as pb;
use rust_ipam_proto::v1::admin_client::AdminClient;
use serde_json::{Value, json};

/// The test API server: a namespace for the server, one for the pods, an admin client.
async fn cluster(test: &str) -> Option<(TestNamespace, String, kube::Client)> {
    let env = envtest::shared(test)?;
    let ns = env.namespace("keep").await.expect("namespace");
    let apps = env.namespace("apps").await.expect("namespace").name;
    let admin = ns.admin_client().await.expect("admin client");
    Some((ns, apps, admin))
}

async fn server(dir: &std::path::Path, ns: &TestNamespace) -> ServerProcess {
    let cfg = ns.kubeconfig(SERVER_ACCOUNT);
    let opts = ServerOptions::kube_replica(
        "solo",
        &cfg,
        &ns.name,
        dir.join("server.log"),
        &["--lease-ttl", "3s", "--renew-every", "500ms", "--reconcile-every", "0"],
    );
    let server = ServerProcess::start_with(&dir.join("data"), &opts).await.expect("server");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !status(&server.endpoint).await.is_some_and(|s| s.serving) {
        assert!(Instant::now() < deadline, "the server did not lead within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server
}

/// The plugin's network configuration: one /24 on `node`, and `args.cni` as rust-multus
/// writes it for a selection with an `ipam-claim-reference`.
fn conf(server: &str, node: &str, claim: Option<&str>) -> Value {
    let mut c = json!({"cniVersion": "1.0.0", "name": "rail", "type": "macvlan", "master": "eth1",
        "ipam": {"type": "rust-ipam", "server": server, "range": "198.18.40.0/24", "node_name": node}});
    if let Some(claim) = claim {
        c["args"] = json!({"cni": {"ipam-claim-reference": claim}});
    }
    c
}

fn pod_args(ns: &str, pod: &str, uid: &str) -> String {
    format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod};K8S_POD_UID={uid};K8S_POD_INFRA_CONTAINER_ID=x")
}

/// ADD of sandbox `cid` (pod `ns/pod` with `uid`): the address, which must be given.
fn add(cid: &str, args: &str, conf: &Value) -> String {
    let out = run_ipam_plugin("ADD", cid, args, conf);
    assert_eq!(out.code, 0, "ADD {cid}: {} {}", out.out, out.stderr);
    let a = out.out["ips"][0]["address"].as_str().expect("an address");
    a.split('/').next().expect("address").to_string()
}

fn del(cid: &str, args: &str, conf: &Value) {
    let out = run_ipam_plugin("DEL", cid, args, conf);
    assert_eq!(out.code, 0, "DEL {cid}: {} {}", out.out, out.stderr);
}

/// The IPLease objects of the server's namespace: address -> spec.
async fn lease_specs(admin: &kube::Client, ns: &str) -> std::collections::BTreeMap<String, Value> {
    fixtures::objects(admin, ns, "IPLease")
        .await
        .into_iter()
        .map(|o| (o["spec"]["address"].as_str().unwrap_or_default().to_string(), o["spec"].clone()))
        .collect()
}

/// One lease as ListLeases shows it.
async fn listed(endpoint: &str, address: &str) -> Option<pb::Lease> {
    fixtures::leases(endpoint, pb::ListLeasesRequest::default())
        .await
        .into_iter()
        .find(|l| l.address == address)
}

/// A real reconcile pass with no grace period: the addresses it freed.
async fn reconcile(endpoint: &str) -> Vec<String> {
    let ch = connect(endpoint, Duration::from_secs(5)).await.expect("connect");
    let r = AdminClient::new(ch)
        .reconcile(pb::ReconcileRequest { dry_run: false, grace_seconds: Some(0) })
        .await
        .expect("reconcile")
        .into_inner();
    r.entries
        .into_iter()
        .filter(|e| e.action == pb::ReconcileAction::Freed as i32)
        .filter_map(|e| e.lease.map(|l| l.address))
        .collect()
}

fn api(
    client: &kube::Client,
    ns: &str,
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(group, version, kind);
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk_with_plural(&gvk, plural))
}

fn sets(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    api(client, ns, "apps", "v1", "StatefulSet", "statefulsets")
}

/// Creates StatefulSet `name` with `replicas`; its UID.
async fn create_set(admin: &kube::Client, ns: &str, name: &str, replicas: u32) -> String {
    let set = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name},
        "spec": {"replicas": replicas, "serviceName": name, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "pause", "image": "registry.k8s.io/pause:3.10"}]}}}});
    let stored = envtest::create(admin, Some(ns), set).await.expect("create the StatefulSet");
    stored["metadata"]["uid"].as_str().expect("uid").to_string()
}

async fn scale(admin: &kube::Client, ns: &str, name: &str, replicas: u32) {
    let patch = Patch::Merge(json!({"spec": {"replicas": replicas}}));
    sets(admin, ns).patch(name, &PatchParams::default(), &patch).await.expect("scale");
}

/// Creates pod `name`, the StatefulSet's (`set` = (name, uid)) as its controller makes
/// them, or a bare pod; its UID.
async fn create_pod(admin: &kube::Client, ns: &str, name: &str, set: Option<(&str, &str)>) -> String {
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"containers": [{"name": "pause", "image": "registry.k8s.io/pause:3.10"}]}});
    if let Some((set, uid)) = set {
        pod["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "StatefulSet",
            "name": set, "uid": uid, "controller": true, "blockOwnerDeletion": true}]);
    }
    let stored = envtest::create(admin, Some(ns), pod).await.expect("create the pod");
    stored["metadata"]["uid"].as_str().expect("uid").to_string()
}

/// Gives the server's first lists of StatefulSets and IPAMClaims time to arrive, so the
/// test runs on them rather than on the "not listed yet" rule (which keeps everything).
async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// Waits until a dry-run pass would free `address`: the server's watch has seen the
/// change that lets its owner go.
async fn wait_would_free(endpoint: &str, address: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ch = connect(endpoint, Duration::from_secs(5)).await.expect("connect");
        let r = AdminClient::new(ch)
            .reconcile(pb::ReconcileRequest { dry_run: true, grace_seconds: Some(0) })
            .await
            .expect("dry run")
            .into_inner();
        let would = r.entries.iter().any(|e| {
            e.action == pb::ReconcileAction::WouldFree as i32
                && e.lease.as_ref().is_some_and(|l| l.address == address)
        });
        if would {
            return;
        }
        assert!(Instant::now() < deadline, "a pass would still not free {address} after 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statefulset_pod_keeps_its_address_while_the_set_wants_its_ordinal() {
    let Some((ns, apps, admin)) =
        cluster("a_statefulset_pod_keeps_its_address_while_the_set_wants_its_ordinal").await
    else {
        return;
    };
    let web = create_set(&admin, &apps, "web", 3).await;
    let db = create_set(&admin, &apps, "db", 1).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = server(dir.path(), &ns).await;
    let ep = server.endpoint.as_str();
    let (node_a, node_b) = (conf(ep, "node-a", None), conf(ep, "node-b", None));
    settle().await;

    // web-1: ADD, DEL: the address is kept for web-1 net1, as the IPLease and ListLeases say.
    let uid = create_pod(&admin, &apps, "web-1", Some(("web", &web))).await;
    let a = add("w1-a", &pod_args(&apps, "web-1", &uid), &node_a);
    let spec = &lease_specs(&admin, &ns.name).await[&a];
    assert_eq!(spec["owner"], json!({"kind": "StatefulSet", "name": "web", "uid": web}));
    assert_eq!(spec.get("kept"), None);
    del("w1-a", &pod_args(&apps, "web-1", &uid), &node_a);
    let spec = &lease_specs(&admin, &ns.name).await[&a];
    assert_eq!((spec["kept"].clone(), spec["podRef"].clone()), (json!(true), json!(format!("{apps}/web-1"))));
    let l = listed(ep, &a).await.expect("listed");
    assert_eq!((l.owner.as_str(), l.kept, l.ifname.as_str()), ("statefulset/web", true, "net1"));
    // A reconcile pass leaves it: the pod is gone, the set wants the ordinal.
    envtest::delete_pod(&admin, &apps, "web-1").await.expect("delete");
    assert_eq!(reconcile(ep).await, Vec::<String>::new());

    // The pod is recreated (a new UID): its ADD gets the address back.
    let uid = create_pod(&admin, &apps, "web-1", Some(("web", &web))).await;
    assert_eq!(add("w1-b", &pod_args(&apps, "web-1", &uid), &node_a), a);
    let spec = &lease_specs(&admin, &ns.name).await[&a];
    assert_eq!((spec["containerId"].clone(), spec["podUid"].clone()), (json!("w1-b"), json!(uid)));
    assert_eq!(spec.get("kept"), None);

    // The race: recreated again, the new sandbox's ADD (on another node) comes before the
    // old sandbox's DEL. Neither loses the address nor frees it under the new pod.
    envtest::delete_pod(&admin, &apps, "web-1").await.expect("delete");
    let old = pod_args(&apps, "web-1", &uid);
    let uid = create_pod(&admin, &apps, "web-1", Some(("web", &web))).await;
    assert_eq!(add("w1-c", &pod_args(&apps, "web-1", &uid), &node_b), a);
    del("w1-b", &old, &node_a);
    let spec = &lease_specs(&admin, &ns.name).await[&a];
    assert_eq!((spec["containerId"].clone(), spec["node"].clone()), (json!("w1-c"), json!("node-b")));
    assert_eq!(reconcile(ep).await, Vec::<String>::new(), "the live pod's lease stays");

    // web-2's address is kept; a bare pod named web-2 is not the set's and gets another.
    let uid2 = create_pod(&admin, &apps, "web-2", Some(("web", &web))).await;
    let b = add("w2-a", &pod_args(&apps, "web-2", &uid2), &node_a);
    del("w2-a", &pod_args(&apps, "web-2", &uid2), &node_a);
    envtest::delete_pod(&admin, &apps, "web-2").await.expect("delete");
    let imp = create_pod(&admin, &apps, "web-2", None).await;
    let c = add("imp", &pod_args(&apps, "web-2", &imp), &node_a);
    assert_ne!(c, b);
    assert_eq!(lease_specs(&admin, &ns.name).await[&c].get("owner"), None);
    del("imp", &pod_args(&apps, "web-2", &imp), &node_a);
    assert!(!lease_specs(&admin, &ns.name).await.contains_key(&c), "the bare pod's address is freed at DEL");
    assert_eq!(lease_specs(&admin, &ns.name).await[&b]["kept"], json!(true));
    envtest::delete_pod(&admin, &apps, "web-2").await.expect("delete");

    // Scaled to 1: web-1's DEL frees its address, and a pass frees web-2's kept one.
    scale(&admin, &apps, "web", 1).await;
    wait_would_free(ep, &b).await;
    del("w1-c", &pod_args(&apps, "web-1", &uid), &node_b);
    envtest::delete_pod(&admin, &apps, "web-1").await.expect("delete");
    let leases = lease_specs(&admin, &ns.name).await;
    assert!(!leases.contains_key(&a), "web-1 is no longer wanted: {leases:?}");
    assert_eq!(reconcile(ep).await, vec![b.clone()]);

    // db-0's address is kept until the set is deleted, then a pass frees it.
    let uid = create_pod(&admin, &apps, "db-0", Some(("db", &db))).await;
    let d = add("db-a", &pod_args(&apps, "db-0", &uid), &node_a);
    del("db-a", &pod_args(&apps, "db-0", &uid), &node_a);
    envtest::delete_pod(&admin, &apps, "db-0").await.expect("delete");
    assert_eq!(reconcile(ep).await, Vec::<String>::new());
    sets(&admin, &apps).delete("db", &Default::default()).await.expect("delete the set");
    wait_would_free(ep, &d).await;
    assert_eq!(reconcile(ep).await, vec![d.clone()]);
    let leases = lease_specs(&admin, &ns.name).await;
    assert!(leases.is_empty(), "{leases:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipamclaim_owns_its_address_across_migration_and_restart() {
    let Some((ns, apps, admin)) = cluster("an_ipamclaim_owns_its_address_across_migration_and_restart").await
    else {
        return;
    };
    let env = envtest::shared("an_ipamclaim_owns_its_address_across_migration_and_restart").expect("started");
    let elsewhere = env.namespace("elsewhere").await.expect("namespace").name;
    let claim = |name: &str| {
        json!({"apiVersion": "k8s.cni.cncf.io/v1alpha1", "kind": "IPAMClaim", "metadata": {"name": name},
            "spec": {"network": "rail", "interface": "net1"}})
    };
    envtest::create(&admin, Some(&apps), claim("vm-a.net1")).await.expect("claim");
    envtest::create(&admin, Some(&elsewhere), claim("vm-b.net1")).await.expect("claim");
    let dir = tempfile::tempdir().expect("tempdir");
    let server = server(dir.path(), &ns).await;
    let ep = server.endpoint.as_str();
    let with = |c: &str| conf(ep, "node-a", Some(c));
    let (vm_a, vm_b) = (with("vm-a.net1"), conf(ep, "node-b", Some("vm-a.net1")));
    settle().await;

    // The source pod, then the migration target (another pod, another node) while the
    // source runs: one address.
    let src = pod_args(&apps, "virt-launcher-vm-a-src", "u-src");
    let dst = pod_args(&apps, "virt-launcher-vm-a-dst", "u-dst");
    let a = add("src", &src, &vm_a);
    let spec = &lease_specs(&admin, &ns.name).await[&a];
    assert_eq!(spec["owner"], json!({"kind": "IPAMClaim", "name": "vm-a.net1"}));
    let claims = api(&admin, &apps, "k8s.cni.cncf.io", "v1alpha1", "IPAMClaim", "ipamclaims");
    let stored = claims.get("vm-a.net1").await.expect("claim");
    assert_eq!(stored.data["status"]["ips"], json!([format!("{a}/24")]));
    assert_eq!(add("dst", &dst, &vm_b), a);
    del("src", &src, &vm_a);
    let spec = &lease_specs(&admin, &ns.name).await[&a];
    assert_eq!((spec["containerId"].clone(), spec["node"].clone()), (json!("dst"), json!("node-b")));

    // The VM stops: the address is kept for the claim (no pod exists, a pass leaves it);
    // it starts again in a pod of another name and gets it.
    del("dst", &dst, &vm_b);
    assert_eq!(lease_specs(&admin, &ns.name).await[&a]["kept"], json!(true));
    assert_eq!(listed(ep, &a).await.expect("listed").owner, "ipamclaim/vm-a.net1");
    assert_eq!(reconcile(ep).await, Vec::<String>::new());
    let again = pod_args(&apps, "virt-launcher-vm-a-again", "u-again");
    assert_eq!(add("again", &again, &vm_a), a);
    del("again", &again, &vm_a);

    // A claim that does not exist, or only in another namespace: a CNI error naming it,
    // and nothing allocated.
    for (c, want) in [
        ("missing", format!("IPAMClaim {apps}/missing (ipam-claim-reference) does not exist")),
        ("vm-b.net1", format!("IPAMClaim {apps}/vm-b.net1 (ipam-claim-reference) does not exist")),
    ] {
        let CniOutput { code, out, stderr } = run_ipam_plugin("ADD", "nope", &src, &with(c));
        assert_eq!(code, 1, "{out} {stderr}");
        assert_eq!(out["msg"], json!(want), "{out}");
    }
    assert_eq!(lease_specs(&admin, &ns.name).await.len(), 1, "only the claim's address is held");

    // Stock Multus does not pass ipam-claim-reference on: with allowPersistentIPs on the
    // NAD (KubeVirt's switch) the server reads it from the pod's selection element for the
    // interface (net1: the first element), as OVN-Kubernetes does.
    let persistent = |node: &str| {
        let mut c = conf(ep, node, None);
        c["allowPersistentIPs"] = json!(true);
        c
    };
    let launcher = |name: &str, claim: Option<&str>| {
        let mut element = json!({"name": "rail"});
        if let Some(c) = claim {
            element["ipam-claim-reference"] = json!(c);
        }
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name,
            "annotations": {"k8s.v1.cni.cncf.io/networks": json!([element]).to_string()}},
            "spec": {"containers": [{"name": "compute", "image": "registry.k8s.io/pause:3.10"}]}})
    };
    envtest::create(&admin, Some(&apps), launcher("virt-launcher-vm-a-multus", Some("vm-a.net1")))
        .await
        .expect("pod");
    envtest::create(&admin, Some(&apps), launcher("virt-launcher-plain", None)).await.expect("pod");
    let via_multus = pod_args(&apps, "virt-launcher-vm-a-multus", "u-multus");
    assert_eq!(add("multus", &via_multus, &persistent("node-c")), a, "the claim's address");
    assert_eq!(lease_specs(&admin, &ns.name).await[&a]["containerId"], json!("multus"));
    del("multus", &via_multus, &persistent("node-c"));
    assert_eq!(lease_specs(&admin, &ns.name).await[&a]["kept"], json!(true));
    let plain = pod_args(&apps, "virt-launcher-plain", "u-plain");
    let other = add("plain", &plain, &persistent("node-c"));
    assert_ne!(other, a);
    assert_eq!(lease_specs(&admin, &ns.name).await[&other].get("owner"), None, "no claim, no owner");
    del("plain", &plain, &persistent("node-c"));

    // The claim is deleted: a pass frees the address.
    claims.delete("vm-a.net1", &Default::default()).await.expect("delete the claim");
    wait_would_free(ep, &a).await;
    assert_eq!(reconcile(ep).await, vec![a.clone()]);
    assert!(lease_specs(&admin, &ns.name).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_keeps_with_a_kubeconfig_and_nothing_without() {
    let Some((ns, apps, admin)) =
        cluster("the_embedded_store_keeps_with_a_kubeconfig_and_nothing_without").await
    else {
        return;
    };
    let set = create_set(&admin, &apps, "web", 2).await;
    let uid = create_pod(&admin, &apps, "web-0", Some(("web", &set))).await;
    let args = pod_args(&apps, "web-0", &uid);
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = ns.kubeconfig(SERVER_ACCOUNT).display().to_string();
    let start = |data: &str, extra: Vec<String>| {
        let opts = ServerOptions {
            args: [
                vec!["--store".to_string(), "embedded".into(), "--reconcile-every".into(), "0".into()],
                extra,
            ]
            .concat(),
            log_level: "info".into(),
            log_file: Some(dir.path().join(format!("{data}.log"))),
            ..ServerOptions::default()
        };
        let data = dir.path().join(data);
        async move { ServerProcess::start_with(&data, &opts).await.expect("server") }
    };

    // With --kubeconfig: kept, and the same address again.
    let server = start("with", vec!["--kubeconfig".into(), cfg.clone()]).await;
    let c = conf(&server.endpoint, "node-a", None);
    settle().await;
    let a = add("e1", &args, &c);
    del("e1", &args, &c);
    let l = listed(&server.endpoint, &a).await.expect("kept");
    assert_eq!((l.owner.as_str(), l.kept), ("statefulset/web", true));
    // As an operator sees it.
    let ctl = rust_ipam_e2e::workspace_bin("rust-ipam-ctl").expect("rust-ipam-ctl");
    let out =
        std::process::Command::new(ctl).args(["--server", &server.endpoint, "leases"]).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        format!(
            "{a}/24\tnetwork=\"\"\trange=198.18.40.0/24\tpod={apps}/web-0 container=e1 ifname=net1 owner=statefulset/web kept"
        ),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(add("e2", &args, &c), a);
    drop(server);

    // Turned off: freed at DEL like any pod's.
    let server =
        start("off", vec!["--kubeconfig".into(), cfg.clone(), "--keep-statefulset-addresses=false".into()])
            .await;
    let c = conf(&server.endpoint, "node-a", None);
    let a = add("e1", &args, &c);
    assert_eq!(listed(&server.endpoint, &a).await.expect("held").owner, "");
    del("e1", &args, &c);
    assert!(listed(&server.endpoint, &a).await.is_none());
    drop(server);

    // Without: freed at DEL, and a claim is refused, naming why.
    let server = start("without", vec![]).await;
    let c = conf(&server.endpoint, "node-a", None);
    let a = add("e1", &args, &c);
    del("e1", &args, &c);
    assert!(listed(&server.endpoint, &a).await.is_none());
    let CniOutput { code, out, stderr } =
        run_ipam_plugin("ADD", "e3", &args, &conf(&server.endpoint, "node-a", Some("vm-a.net1")));
    assert_eq!(code, 1, "{out} {stderr}");
    assert_eq!(
        out["msg"],
        json!(
            "ipam-claim-reference \"vm-a.net1\": this server has no Kubernetes API to read IPAMClaims (run it in a cluster or with --kubeconfig)"
        )
    );
}
