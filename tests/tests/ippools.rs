//! IPPools end to end through the `rust-ipam` plugin binary: NADs naming a pool
//! (`"pool": "rail0"`) against a server on the embedded store with `--pools-dir`, and
//! against the real kube-apiserver (`rust_ipam_e2e::envtest`) with the server as its
//! ServiceAccount under deploy/'s RBAC. What is asserted is what the plugin printed, what
//! the API server holds and the error text: two NADs naming one pool never share an
//! address, the pool's gateway, routes and DNS are in the result, an unknown or invalid
//! pool is a CNI error naming it, a released address waits out the pool's cooldown (and is
//! handed out anyway, logged, when nothing else is free), the leader writes usage and
//! validity into the IPPool's status, and the schema refuses what it can. Per-node blocks
//! (`perNodePrefix`, `gatewayIndex`): two rails on simulated nodes (the plugin's
//! `node_name`), each node its own block and gateway on every rail, kept across a restart,
//! a full block and a full pool named with their counts.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ipam_server::k8s::crd::{
    IPPool, IPPoolSpec, PoolDns, PoolRange, PoolRoute, PoolSelector, SelectorRequirement, StaticAllocation,
};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use rust_ipam_e2e::envtest::{self, SERVER_ACCOUNT};
use rust_ipam_e2e::fixtures::lease_objects;
use rust_ipam_e2e::{CniOutput, ServerOptions, ServerProcess, run_ipam_plugin, workspace_bin};
use rust_ipam_proto::v1 as pb;
use rust_ipam_proto::v1::admin_client::AdminClient;
use serde_json::{Value, json};

/// A NAD named `nad` whose ipam section is `ipam` (plus type and server).
fn nad(nad: &str, server: &str, mut ipam: Value) -> Value {
    ipam["type"] = json!("rust-ipam");
    ipam["server"] = json!(server);
    json!({"cniVersion": "1.0.0", "name": nad, "type": "macvlan", "master": "eth1", "ipam": ipam})
}

fn pod(name: &str) -> String {
    format!("K8S_POD_NAMESPACE=ml;K8S_POD_NAME={name};K8S_POD_UID=uid-{name}")
}

/// ADD for container `cid` (pod of the same name); the result, which must be a success.
fn add(cid: &str, conf: &Value) -> Value {
    let out = run_ipam_plugin("ADD", cid, &pod(cid), conf);
    assert_eq!(out.code, 0, "ADD {cid}: {} {}", out.out, out.stderr);
    out.out
}

/// The first address of an ADD's result, without prefix.
fn first_ip(result: &Value) -> String {
    let a = result["ips"][0]["address"].as_str().expect("an address");
    a.split('/').next().expect("address").to_string()
}

fn del(cid: &str, conf: &Value) {
    let out = run_ipam_plugin("DEL", cid, &pod(cid), conf);
    assert_eq!(out.code, 0, "DEL {cid}: {} {}", out.out, out.stderr);
}

/// An ADD that must fail: (CNI error code, message).
fn refused(cid: &str, conf: &Value) -> (u64, String) {
    let CniOutput { code, out, stderr } = run_ipam_plugin("ADD", cid, &pod(cid), conf);
    assert_eq!(code, 1, "ADD {cid} should fail: {out} {stderr}");
    (out["code"].as_u64().expect("code"), out["msg"].as_str().expect("msg").to_string())
}

const POOLS: &str = "\
apiVersion: ipam.rust-ipam.io/v1alpha1
kind: IPPool
metadata:
  name: rail0
spec:
  ranges:
  - range: 198.18.10.0/28
    gateway: 198.18.10.1
    exclude: [198.18.10.2/31]
  - range: fd00:10::/125
  routes:
  - dst: 198.19.0.0/16
    gw: 198.18.10.1
  dns:
    nameservers: [198.18.10.53]
    search: [rail.example]
---
apiVersion: ipam.rust-ipam.io/v1alpha1
kind: IPPool
metadata:
  name: bad
spec:
  ranges:
  - range: 198.18.12.0/24
    range_start: 198.18.11.200
---
apiVersion: ipam.rust-ipam.io/v1alpha1
kind: IPPool
metadata:
  name: cool
spec:
  ranges:
  - range: 198.18.13.0/29
  cooldown: 2s
---
apiVersion: ipam.rust-ipam.io/v1alpha1
kind: IPPool
metadata:
  name: tight
spec:
  ranges:
  - range: 198.18.14.0/30
  cooldown: 60m
";

/// The value of metric `name` with labels `labels` in a Prometheus text exposition.
fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_from_a_directory_through_the_plugin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pools = dir.path().join("pools");
    std::fs::create_dir(&pools).expect("pools dir");
    std::fs::write(pools.join("pools.yaml"), POOLS).expect("write pools");
    let log = dir.path().join("server.log");
    let opts = ServerOptions {
        args: vec!["--pools-dir".into(), pools.display().to_string()],
        log_level: "info".into(),
        log_file: Some(log.clone()),
        ..ServerOptions::default()
    };
    let server = ServerProcess::start_with(&dir.path().join("data"), &opts).await.expect("server");
    let ep = server.endpoint.as_str();
    let (a, b) = (nad("rail0-a", ep, json!({"pool": "rail0"})), nad("rail0-b", ep, json!({"pool": "rail0"})));

    // Two NADs naming one pool share its addresses: never the same one twice.
    let first = add("c1", &a);
    assert_eq!(
        first,
        json!({"cniVersion": "1.0.0",
            "ips": [{"address": "198.18.10.4/28", "gateway": "198.18.10.1"}, {"address": "fd00:10::1/125"}],
            "routes": [{"dst": "198.19.0.0/16", "gw": "198.18.10.1"}],
            "dns": {"nameservers": ["198.18.10.53"], "search": ["rail.example"]}})
    );
    let got: Vec<String> =
        [("c2", &b), ("c3", &a), ("c4", &b)].iter().map(|(cid, conf)| first_ip(&add(cid, conf))).collect();
    assert_eq!(got, ["198.18.10.5", "198.18.10.6", "198.18.10.7"]);
    // The same attachment through the other NAD: the same address (one network).
    assert_eq!(first_ip(&add("c1", &b)), "198.18.10.4");

    // An unknown pool, an invalid one, and a NAD that names a pool and ranges.
    assert_eq!(
        refused("c9", &nad("x", ep, json!({"pool": "nope"}))),
        (100, r#"pool "nope" does not exist (no IPPool of that name)"#.into())
    );
    assert_eq!(
        refused("c9", &nad("x", ep, json!({"pool": "bad"}))),
        (
            100,
            r#"pool "bad" is invalid: spec.ranges[0].range_start "198.18.11.200" is outside range 198.18.12.0/24"#
                .into()
        )
    );
    assert_eq!(
        refused("c9", &nad("x", ep, json!({"pool": "rail0", "range": "198.18.10.0/28"}))),
        (
            7,
            r#"ipam sets both "pool" ("rail0") and "range": the pool gives the ranges, gateway and network; remove one"#
                .into()
        )
    );

    // Cooldown: a released address waits 2 s; then it is the lowest free one again.
    let cool = nad("cool", ep, json!({"pool": "cool"}));
    assert_eq!(first_ip(&add("k1", &cool)), "198.18.13.1");
    del("k1", &cool);
    let released = Instant::now();
    assert_eq!(first_ip(&add("k2", &cool)), "198.18.13.2", "198.18.13.1 is cooling");
    let (_, text) = server.http_get("/metrics").await.expect("metrics");
    assert_eq!(metric(&text, r#"rustipam_ippool_cooldown_holds{pool="cool"}"#), Some(1.0), "{text}");
    tokio::time::sleep(Duration::from_millis(2200).saturating_sub(released.elapsed())).await;
    assert_eq!(first_ip(&add("k3", &cool)), "198.18.13.1", "its cooldown has passed");

    // A pool with nothing else free hands out a cooling address, and the log says so.
    let tight = nad("tight", ep, json!({"pool": "tight"}));
    assert_eq!(first_ip(&add("t1", &tight)), "198.18.14.1");
    assert_eq!(first_ip(&add("t2", &tight)), "198.18.14.2");
    del("t1", &tight);
    assert_eq!(first_ip(&add("t3", &tight)), "198.18.14.1");
    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(
        logged
            .lines()
            .any(|l| l.contains("before its cooldown has passed") && l.contains("address=198.18.14.1")),
        "{logged}"
    );

    // Per-pool metrics: 4 attachments of rail0 hold two addresses each; 3 are excluded.
    let (_, text) = server.http_get("/metrics").await.expect("metrics");
    let m = |name: &str| metric(&text, name);
    assert_eq!(m(r#"rustipam_ippool_size{pool="rail0"}"#), Some(20.0), "{text}");
    assert_eq!(m(r#"rustipam_ippool_used{pool="rail0"}"#), Some(8.0));
    assert_eq!(m(r#"rustipam_ippool_free{pool="rail0"}"#), Some(9.0));
    assert_eq!(m(r#"rustipam_ippool_valid{pool="rail0"}"#), Some(1.0));
    assert_eq!(m(r#"rustipam_ippool_valid{pool="bad"}"#), Some(0.0));
    assert_eq!(m(r#"rustipam_ippool_used{pool="bad"}"#), None);

    // After a restart the cooldown is known from the first release: 198.18.13.1 (k3's)
    // cools though nothing has been allocated from the pool since the start.
    let mut server = server;
    server.terminate().expect("stop");
    let server = ServerProcess::start_with(&dir.path().join("data"), &opts).await.expect("restart");
    let ep = server.endpoint.as_str();
    let cool = nad("cool", ep, json!({"pool": "cool"}));
    del("k3", &cool);
    assert_eq!(first_ip(&add("k4", &cool)), "198.18.13.3", "198.18.13.1 cools, 198.18.13.2 is k2's");

    // A pool written while the server runs is used without a restart.
    let late = nad("late", ep, json!({"pool": "late"}));
    std::fs::write(pools.join("late.yaml"), POOLS.split("---").next().expect("doc").replace("rail0", "late"))
        .expect("write");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = run_ipam_plugin("ADD", "l1", &pod("l1"), &late);
        if out.code == 0 {
            assert_eq!(first_ip(&out.out), "198.18.10.4", "its own network: rail0's addresses are not seen");
            break;
        }
        assert!(Instant::now() < deadline, "pool late not read within 10 s: {}", out.out);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A change the poll cannot see (same size, same modification time) is read on SIGHUP.
    let file = pools.join("late.yaml");
    let mtime = std::fs::metadata(&file).and_then(|m| m.modified()).expect("mtime");
    let text = std::fs::read_to_string(&file).expect("read").replace("name: late", "name: hupp");
    std::fs::write(&file, text).expect("write");
    std::fs::File::options().write(true).open(&file).and_then(|f| f.set_modified(mtime)).expect("set mtime");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let hupp = nad("hupp", ep, json!({"pool": "hupp"}));
    assert_eq!(refused("h1", &hupp), (100, r#"pool "hupp" does not exist (no IPPool of that name)"#.into()));
    let hup =
        std::process::Command::new("kill").args(["-HUP", &server.pid().to_string()]).status().expect("kill");
    assert!(hup.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while run_ipam_plugin("ADD", "h1", &pod("h1"), &hupp).code != 0 {
        assert!(Instant::now() < deadline, "SIGHUP did not reload the pools directory");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(refused("l2", &late), (100, r#"pool "late" does not exist (no IPPool of that name)"#.into()));
}

/// Two rails, one IPPool each: a /29 block per node, its gateway at index 1.
const RAILS: &str = "\
apiVersion: ipam.rust-ipam.io/v1alpha1
kind: IPPool
metadata:
  name: rail0
spec:
  ranges:
  - range: 198.18.40.0/27
  perNodePrefix: 29
  gatewayIndex: 1
---
apiVersion: ipam.rust-ipam.io/v1alpha1
kind: IPPool
metadata:
  name: rail1
spec:
  ranges:
  - range: 198.18.41.0/27
  perNodePrefix: 29
  gatewayIndex: 1
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_node_blocks_through_the_plugin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pools = dir.path().join("pools");
    std::fs::create_dir(&pools).expect("pools dir");
    std::fs::write(pools.join("rails.yaml"), RAILS).expect("write pools");
    let opts = ServerOptions {
        args: vec!["--pools-dir".into(), pools.display().to_string()],
        ..ServerOptions::default()
    };
    let data = dir.path().join("data");
    let mut server = ServerProcess::start_with(&data, &opts).await.expect("server");
    // A pod's interface on each rail, on a simulated node (the plugin's node_name).
    let on = |ep: &str, rail: &str, node: &str| nad(rail, ep, json!({"pool": rail, "node_name": node}));
    let pod_on = |ep: &str, cid: &str, node: &str| -> Vec<Value> {
        ["rail0", "rail1"].iter().map(|rail| add(&format!("{cid}-{rail}"), &on(ep, rail, node))).collect()
    };
    let ep = server.endpoint.clone();
    let p1 = pod_on(&ep, "p1", "n1");
    assert_eq!(p1[0]["ips"], json!([{"address": "198.18.40.2/29", "gateway": "198.18.40.1"}]));
    assert_eq!(p1[1]["ips"], json!([{"address": "198.18.41.2/29", "gateway": "198.18.41.1"}]));
    let p2 = pod_on(&ep, "p2", "n2");
    assert_eq!(p2[0]["ips"], json!([{"address": "198.18.40.10/29", "gateway": "198.18.40.9"}]));
    assert_eq!(p2[1]["ips"], json!([{"address": "198.18.41.10/29", "gateway": "198.18.41.9"}]));
    let p3 = pod_on(&ep, "p3", "n1");
    assert_eq!(p3.iter().map(first_ip).collect::<Vec<_>>(), ["198.18.40.3", "198.18.41.3"]);

    // The blocks are recorded with the leases: a restart keeps them.
    server.terminate().expect("stop");
    let server = ServerProcess::start_with(&data, &opts).await.expect("restart");
    let ep = server.endpoint.clone();
    let p4 = pod_on(&ep, "p4", "n2");
    assert_eq!(p4.iter().map(first_ip).collect::<Vec<_>>(), ["198.18.40.11", "198.18.41.11"]);

    // A node's block full: its own error, with the node's and the pool's counts.
    for i in 4..7 {
        add(&format!("q{i}"), &on(&ep, "rail0", "n1"));
    }
    assert_eq!(
        refused("q7", &on(&ep, "rail0", "n1")),
        (
            100,
            r#"block 198.18.40.0/29 of node "n1" in network "rail0" is exhausted: size 6, held 5, excluded 1 (the whole pool: size 30, held 7)"#
                .into()
        )
    );
    // Four blocks: two more nodes fit, a fifth does not.
    add("r3", &on(&ep, "rail0", "n3"));
    add("r4", &on(&ep, "rail0", "n4"));
    let no_block = (
        100,
        r#"no free /29 block for node "n5" in 198.18.40.0/27 (network "rail0"): all 4 blocks are other nodes'"#
            .into(),
    );
    assert_eq!(refused("r5", &on(&ep, "rail0", "n5")), no_block);
    let (_, text) = server.http_get("/metrics").await.expect("metrics");
    assert_eq!(metric(&text, r#"rustipam_ippool_blocks{pool="rail0"}"#), Some(4.0), "{text}");
    assert_eq!(metric(&text, r#"rustipam_ippool_blocks{pool="rail1"}"#), Some(2.0), "{text}");
    // rail1: four blocks of five addresses for pods, four held.
    assert_eq!(metric(&text, r#"rustipam_ippool_free{pool="rail1"}"#), Some(16.0), "{text}");
    // A pod recreated on another node (same name, new sandbox) moves to that node's block;
    // its address in the old node's block is given back.
    let moved = |cid: &str, node: &str| {
        let out = run_ipam_plugin("ADD", cid, &pod("mover"), &on(&ep, "rail1", node));
        assert_eq!(out.code, 0, "{} {}", out.out, out.stderr);
        first_ip(&out.out)
    };
    assert_eq!(moved("mover-1", "n1"), "198.18.41.4");
    assert_eq!(moved("mover-2", "n3"), "198.18.41.18");
    assert_eq!(first_ip(&add("after-move", &on(&ep, "rail1", "n1"))), "198.18.41.4", "n1's .4 is free again");
    // n2 releases both of its rail0 addresses: its block stays n2's (only reconcile gives
    // a deleted Node's block back), and n2's next pod gets the block's first address again.
    for cid in ["p2-rail0", "p4-rail0"] {
        del(cid, &on(&ep, "rail0", "n2"));
    }
    assert_eq!(refused("r5", &on(&ep, "rail0", "n5")), no_block);
    assert_eq!(first_ip(&add("p5-rail0", &on(&ep, "rail0", "n2"))), "198.18.40.10");
}

fn range(r: &str) -> PoolRange {
    PoolRange { range: r.into(), ..PoolRange::default() }
}

fn spec(ranges: Vec<PoolRange>) -> IPPoolSpec {
    IPPoolSpec { ranges, ..IPPoolSpec::default() }
}

/// Waits (10 s at most) until an ADD of container `cid` on `conf`, naming pool `pool`,
/// succeeds: the server has seen the pool made while it runs.
async fn wait_for_pool(pool: &str, cid: &str, conf: &Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while run_ipam_plugin("ADD", cid, &pod(cid), conf).code != 0 {
        assert!(Instant::now() < deadline, "pool {pool} not seen within 10 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the status of IPPool `name` satisfies `ok`; the last status seen.
async fn wait_status(api: &Api<IPPool>, name: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let obj = api.get(name).await.expect("get IPPool");
        let status = serde_json::to_value(&obj.status).expect("json");
        if ok(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "status of {name} is still {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// IPPools are cluster-scoped, and every server writes the status of every pool it sees:
/// two tests' servers on the one API server would overwrite each other's pool status. The
/// tests that run a server on the API server take turns.
static ONE_SERVER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_from_the_api_server_through_the_plugin() {
    const TEST: &str = "pools_from_the_api_server_through_the_plugin";
    let Some(env) = envtest::shared(TEST) else { return };
    let _turn = ONE_SERVER.lock().await;
    let ns = env.namespace("pools").await.expect("namespace");
    let admin = ns.admin_client().await.expect("admin client");
    let pools: Api<IPPool> = Api::all(admin.clone());
    // IPPools are cluster-scoped: names of this test's namespace, so runs never meet.
    let name = |p: &str| format!("{}-{p}", ns.name);
    let (rail, bad, cool, late) = (name("rail"), name("bad"), name("cool"), name("late"));

    // What the schema refuses, the API server refuses, naming the field.
    let mut wrong = spec(vec![range("198.18.20.0/28")]);
    wrong.cooldown = "30 seconds".into();
    let e = pools.create(&PostParams::default(), &IPPool::new(&name("x"), wrong)).await.expect_err("pattern");
    assert!(e.to_string().contains("spec.cooldown"), "{e}");
    let e = pools
        .create(&PostParams::default(), &IPPool::new(&name("y"), spec(vec![])))
        .await
        .expect_err("empty");
    assert!(e.to_string().contains("spec.ranges"), "{e}");
    // The rules across fields (CEL), each naming the fields.
    let mut both = spec(vec![range("198.18.20.0/24")]);
    both.per_node_prefix = Some(28);
    both.per_node_block_size = Some(8);
    let e =
        pools.create(&PostParams::default(), &IPPool::new(&name("z"), both)).await.expect_err("both cuts");
    assert!(
        e.to_string().contains("spec.perNodePrefix and spec.perNodeBlockSize are not taken together"),
        "{e}"
    );
    let mut loose_rail = spec(vec![range("198.18.20.0/24")]);
    loose_rail.rail_group = "g".into();
    let e = pools
        .create(&PostParams::default(), &IPPool::new(&name("z"), loose_rail))
        .await
        .expect_err("railGroup");
    assert!(
        e.to_string().contains("spec.railGroup needs spec.perNodePrefix or spec.perNodeBlockSize"),
        "{e}"
    );

    // Pools made before the server starts, and one after.
    let mut rail_spec = spec(vec![PoolRange { gateway: "198.18.20.1".into(), ..range("198.18.20.0/28") }]);
    rail_spec.routes = vec![PoolRoute { dst: "198.19.0.0/16".into(), gw: String::new() }];
    rail_spec.dns = Some(PoolDns { nameservers: vec!["198.18.20.53".into()], ..PoolDns::default() });
    pools.create(&PostParams::default(), &IPPool::new(&rail, rail_spec)).await.expect("create rail");
    let bad_spec =
        spec(vec![PoolRange { exclude: vec!["198.18.99.0/28".into()], ..range("198.18.21.0/28") }]);
    pools.create(&PostParams::default(), &IPPool::new(&bad, bad_spec)).await.expect("create bad");

    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = ns.kubeconfig(SERVER_ACCOUNT);
    let opts = ServerOptions::kube_replica(
        "solo",
        &cfg,
        &ns.name,
        dir.path().join("solo.log"),
        &[
            "--lease-ttl",
            "3s",
            "--renew-every",
            "500ms",
            "--pool-status-every",
            "200ms",
            "--reconcile-every",
            "0",
        ],
    );
    let server =
        ServerProcess::start_with(&dir.path().join("data"), &ServerOptions { wait_serving: true, ..opts })
            .await
            .expect("server");
    let ep = server.endpoint.as_str();

    let mut cool_spec = spec(vec![range("198.18.22.0/29")]);
    cool_spec.cooldown = "2s".into();
    pools.create(&PostParams::default(), &IPPool::new(&cool, cool_spec)).await.expect("create cool");

    // Two NADs naming the pool: distinct addresses, each an IPLease in the pool's network.
    let (a, b) = (nad("rail-a", ep, json!({"pool": rail})), nad("rail-b", ep, json!({"pool": rail})));
    let first = add("r1", &a);
    assert_eq!(
        first,
        json!({"cniVersion": "1.0.0", "ips": [{"address": "198.18.20.2/28", "gateway": "198.18.20.1"}],
            "routes": [{"dst": "198.19.0.0/16"}], "dns": {"nameservers": ["198.18.20.53"]}})
    );
    let got: Vec<String> =
        [("r2", &b), ("r3", &a), ("r4", &b)].iter().map(|(cid, conf)| first_ip(&add(cid, conf))).collect();
    assert_eq!(got, ["198.18.20.3", "198.18.20.4", "198.18.20.5"]);
    let server_client = ns.client(SERVER_ACCOUNT).await.expect("client");
    let mut stored: Vec<(String, String)> = lease_objects(&server_client, &ns.name)
        .await
        .into_iter()
        .map(|l| (l.address, l.container_id))
        .collect();
    stored.sort();
    assert_eq!(
        stored,
        [("198.18.20.2", "r1"), ("198.18.20.3", "r2"), ("198.18.20.4", "r3"), ("198.18.20.5", "r4")]
            .map(|(a, c)| (a.to_string(), c.to_string()))
    );
    let lease_list =
        envtest::list(&admin, Some(&ns.name), "ipam.rust-ipam.io/v1alpha1", "IPLease").await.expect("list");
    assert!(lease_list.iter().all(|l| l["spec"]["network"] == json!(rail)), "{lease_list:?}");

    // Unknown and invalid pools.
    assert_eq!(
        refused("r9", &nad("x", ep, json!({"pool": name("nope")}))),
        (100, format!("pool {:?} does not exist (no IPPool of that name)", name("nope")))
    );
    let msg = format!(
        "pool {bad:?} is invalid: spec.ranges[0].exclude[0] \"198.18.99.0/28\" is outside range 198.18.21.0/28"
    );
    assert_eq!(refused("r9", &nad("x", ep, json!({"pool": bad}))), (100, msg.clone()));

    // Cooldown across release and allocate, on a pool made while the server runs.
    let c = nad("cool", ep, json!({"pool": cool}));
    wait_for_pool(&cool, "k1", &c).await;
    assert_eq!(first_ip(&add("k1", &c)), "198.18.22.1");
    del("k1", &c);
    let released = Instant::now();
    assert_eq!(first_ip(&add("k2", &c)), "198.18.22.2", "198.18.22.1 is cooling");
    // k2 holds one address, the other cools (a status written between the DEL and the ADD
    // shows none used).
    wait_status(&pools, &cool, |s| s["cooldownHolds"] == "1" && s["used"] == "1").await;
    tokio::time::sleep(Duration::from_millis(2200).saturating_sub(released.elapsed())).await;
    assert_eq!(first_ip(&add("k3", &c)), "198.18.22.1", "its cooldown has passed");

    // Status on the objects: usage, and why a pool is not used.
    let status = wait_status(&pools, &rail, |s| s["used"] == "4").await;
    assert_eq!(
        status,
        json!({"ranges": "198.18.20.0/28", "size": "14", "used": "4", "excluded": "1", "free": "9",
            "cooldownHolds": "0", "conditions": [{"type": "Valid", "status": "True", "reason": "Valid", "message": ""}]})
    );
    let status = wait_status(&pools, &bad, |s| !s["conditions"].is_null()).await;
    assert_eq!(
        status["conditions"],
        json!([{"type": "Valid", "status": "False", "reason": "Invalid", "message": msg}])
    );

    // Per-node blocks on the kube store: each node its own /29, the gateway at index 1.
    let blocks = name("blocks");
    let block_spec = IPPoolSpec {
        ranges: vec![range("198.18.24.0/27")],
        per_node_prefix: Some(29),
        gateway_index: Some(1),
        ..IPPoolSpec::default()
    };
    pools.create(&PostParams::default(), &IPPool::new(&blocks, block_spec)).await.expect("create blocks");
    let on = |node: &str| nad("blocks", ep, json!({"pool": blocks, "node_name": node}));
    wait_for_pool(&blocks, "b1", &on("n1")).await;
    let got =
        [("b1", "n1"), ("b2", "n2"), ("b3", "n1")].map(|(cid, node)| add(cid, &on(node))["ips"][0].clone());
    assert_eq!(
        got,
        [
            json!({"address": "198.18.24.2/29", "gateway": "198.18.24.1"}),
            json!({"address": "198.18.24.10/29", "gateway": "198.18.24.9"}),
            json!({"address": "198.18.24.3/29", "gateway": "198.18.24.1"}),
        ]
    );
    let leases =
        envtest::list(&admin, Some(&ns.name), "ipam.rust-ipam.io/v1alpha1", "IPLease").await.expect("list");
    let mut by_node: Vec<(String, String)> = leases
        .iter()
        .filter(|l| l["spec"]["network"] == json!(blocks))
        .map(|l| {
            (
                l["spec"]["address"].as_str().unwrap_or_default().into(),
                l["spec"]["node"].as_str().unwrap_or_default().into(),
            )
        })
        .collect();
    by_node.sort();
    assert_eq!(
        by_node,
        [("198.18.24.10", "n2"), ("198.18.24.2", "n1"), ("198.18.24.3", "n1")]
            .map(|(a, n)| (a.to_string(), n.to_string()))
    );
    // The blocks in the pool's status.
    let status = wait_status(&pools, &blocks, |s| s["used"] == "3").await;
    assert_eq!(
        status["blocks"],
        json!([
            {"node": "n1", "block": "198.18.24.0/29", "used": "2", "free": "3", "size": "5", "cooldownHolds": "0"},
            {"node": "n2", "block": "198.18.24.8/29", "used": "1", "free": "4", "size": "5", "cooldownHolds": "0"}
        ])
    );
    // n1's block full: its own error, with the node's and the pool's counts.
    for cid in ["b4", "b5", "b6"] {
        add(cid, &on("n1"));
    }
    assert_eq!(
        refused("b7", &on("n1")),
        (
            100,
            format!(
                "block 198.18.24.0/29 of node \"n1\" in network \"{blocks}\" is exhausted: size 6, held 5, excluded 1 (the whole pool: size 30, held 6)"
            )
        )
    );

    // perNodeBlockSize (nv-ipam's IPPool): runs of 4 addresses from .1, with the range's
    // prefix length and gateway; three runs in a /28 (.13 and .14 are in none).
    let runs = name("runs");
    let runs_spec = IPPoolSpec {
        ranges: vec![PoolRange { gateway: "198.18.25.1".into(), ..range("198.18.25.0/28") }],
        per_node_block_size: Some(4),
        ..IPPoolSpec::default()
    };
    pools.create(&PostParams::default(), &IPPool::new(&runs, runs_spec)).await.expect("create runs");
    let on_run = |node: &str| nad("runs", ep, json!({"pool": runs, "node_name": node}));
    wait_for_pool(&runs, "r1", &on_run("n1")).await;
    let got = [("r1", "n1"), ("r2", "n2"), ("r3", "n3"), ("r4", "n1")]
        .map(|(cid, node)| add(cid, &on_run(node))["ips"][0].clone());
    assert_eq!(
        got,
        [
            json!({"address": "198.18.25.2/28", "gateway": "198.18.25.1"}),
            json!({"address": "198.18.25.5/28", "gateway": "198.18.25.1"}),
            json!({"address": "198.18.25.9/28", "gateway": "198.18.25.1"}),
            json!({"address": "198.18.25.3/28", "gateway": "198.18.25.1"}),
        ]
    );
    assert_eq!(
        refused("r5", &on_run("n4")),
        (
            100,
            format!(
                "no free 4-address block for node \"n4\" in 198.18.25.0/28 (network \"{runs}\"): all 3 blocks are other nodes'"
            )
        )
    );
    // staticAllocations: n1's /30 by hand, with its own gateway; n2 skips it.
    let fixed = name("fixed");
    let fixed_spec = IPPoolSpec {
        ranges: vec![range("198.18.26.0/28")],
        per_node_prefix: Some(30),
        gateway_index: Some(1),
        static_allocations: vec![StaticAllocation {
            node_name: "n1".into(),
            prefix: "198.18.26.0/30".into(),
            gateway: "198.18.26.2".into(),
        }],
        ..IPPoolSpec::default()
    };
    pools.create(&PostParams::default(), &IPPool::new(&fixed, fixed_spec)).await.expect("create fixed");
    let on_fixed = |node: &str| nad("fixed", ep, json!({"pool": fixed, "node_name": node}));
    wait_for_pool(&fixed, "f2", &on_fixed("n2")).await;
    assert_eq!(
        [("f2", "n2"), ("f1", "n1")].map(|(cid, node)| add(cid, &on_fixed(node))["ips"][0].clone()),
        [
            json!({"address": "198.18.26.6/30", "gateway": "198.18.26.5"}),
            json!({"address": "198.18.26.1/30", "gateway": "198.18.26.2"}),
        ]
    );

    let status = wait_status(&pools, &runs, |s| s["used"] == "4").await;
    assert_eq!(
        status["blocks"],
        json!([
            {"node": "n1", "block": "198.18.25.1-198.18.25.4", "used": "2", "free": "1", "size": "3", "cooldownHolds": "0"},
            {"node": "n2", "block": "198.18.25.5-198.18.25.8", "used": "1", "free": "3", "size": "4", "cooldownHolds": "0"},
            {"node": "n3", "block": "198.18.25.9-198.18.25.12", "used": "1", "free": "3", "size": "4", "cooldownHolds": "0"}
        ])
    );

    // Deleting a pool makes it unknown.
    pools
        .create(&PostParams::default(), &IPPool::new(&late, spec(vec![range("198.18.23.0/29")])))
        .await
        .expect("late");
    pools.delete(&late, &Default::default()).await.expect("delete");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = run_ipam_plugin("ADD", "z1", &pod("z1"), &nad("late", ep, json!({"pool": late})));
        if out.code == 1
            && out.out["msg"] == json!(format!("pool {late:?} does not exist (no IPPool of that name)"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "pool {late} still used: {}", out.out);
        // It may have been seen and taken before the delete arrived: give it back.
        if out.code == 0 {
            del("z1", &nad("late", ep, json!({"pool": late})));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `--pools-dir` is the embedded store's: with the kube store the server refuses to start,
/// naming the flag, before it binds a port or reads the kubeconfig.
#[test]
fn a_pools_dir_is_refused_with_the_kube_store() {
    let bin = workspace_bin("rust-ipam-server").expect("server binary");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(bin)
        .args(["--store", "kube", "--kubeconfig", "/nonexistent/kubeconfig", "--pools-dir"])
        .arg(dir.path())
        .output()
        .expect("run the server");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "--pools-dir {} is for the embedded store: with the kube store, pools are IPPool objects",
        dir.path().display()
    );
    assert!(err.contains(&want), "{err}");
}

/// ADD of pod `pod`'s sandbox (container ID = the pod's name) in namespace `ns` on NAD
/// `conf`: (exit code, the result or error).
fn add_in(ns: &str, pod: &str, conf: &Value) -> CniOutput {
    let args = format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod};K8S_POD_UID=uid-{pod}");
    run_ipam_plugin("ADD", pod, &args, conf)
}

/// One node's pod on every rail of `rails` (in that order): its addresses by rail, each
/// with its gateway.
fn pod_on_rails(ns: &str, pod: &str, rails: &[(usize, Value)]) -> BTreeMap<usize, (String, String)> {
    rails
        .iter()
        .map(|(i, conf)| {
            let out = add_in(ns, pod, conf);
            assert_eq!(out.code, 0, "ADD {pod} on rail{i}: {} {}", out.out, out.stderr);
            let ip = &out.out["ips"][0];
            let text = |v: &Value| v.as_str().expect("a string").to_string();
            (*i, (text(&ip["address"]), text(&ip["gateway"])))
        })
        .collect()
}

/// Node `name` with `labels`, made as a kubelet registers one.
async fn make_node(admin: &kube::Client, name: &str, labels: &[(&str, &str)]) {
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..ObjectMeta::default()
        },
        ..Node::default()
    };
    Api::<Node>::all(admin.clone()).create(&PostParams::default(), &node).await.expect("create node");
}

/// One real reconcile pass through the Admin API: (reason, action) of each entry.
async fn reconcile(ep: &str) -> Vec<(i32, i32, String)> {
    let ch = rust_ipam_proto::connect(ep, Duration::from_secs(5)).await.expect("connect");
    let r = AdminClient::new(ch)
        .reconcile(pb::ReconcileRequest { dry_run: false, grace_seconds: None })
        .await
        .expect("reconcile")
        .into_inner();
    // Only the blocks' entries: the pods of this test are never made, so their leases are
    // stale too (and younger than the grace period).
    r.entries
        .iter()
        .filter(|e| e.reason == pb::ReconcileReason::NodeGone as i32)
        .map(|e| (e.reason, e.action, e.lease.clone().unwrap_or_default().node))
        .collect()
}

/// deploy/examples/rails.yaml on the real API server, on simulated nodes through the plugin
/// (the plugin's `node_name`): each node's /28 and gateway on every rail, the same host
/// index on every rail (in any order of ADDs, and the fallback when an address is taken),
/// the blocks recorded as IPLeases and kept across a restart while the node holds nothing,
/// and given back by reconcile once the Node is deleted; a pool's nodeSelector and
/// namespaceSelector, with the errors naming the pool and the selector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_eight_rail_example_selectors_and_node_blocks_on_the_api_server() {
    const TEST: &str = "the_eight_rail_example_selectors_and_node_blocks_on_the_api_server";
    let Some(env) = envtest::shared(TEST) else { return };
    let _turn = ONE_SERVER.lock().await;
    let ns = env.namespace("rails").await.expect("namespace");
    let other = env.namespace("other").await.expect("namespace");
    let admin = ns.admin_client().await.expect("admin client");
    let pools: Api<IPPool> = Api::all(admin.clone());
    // IPPools, Nodes and rail groups are cluster-wide: named after this test's namespace.
    let name = |p: &str| format!("{}-{p}", ns.name);
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/rails.yaml"))
            .expect("deploy/examples/rails.yaml");
    let mut rails = 0;
    for doc in serde_yaml::Deserializer::from_str(&example) {
        let mut pool: IPPool = serde::Deserialize::deserialize(doc).expect("an IPPool");
        assert_eq!(pool.spec.rail_group, "spectrum-x");
        pool.metadata.name = Some(name(&format!("rail{rails}")));
        pool.spec.rail_group = name("spectrum-x");
        pools.create(&PostParams::default(), &pool).await.expect("create rail");
        rails += 1;
    }
    assert_eq!(rails, 8);
    // The other example pool, which the API server (and its CEL rules) must take too.
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/ippool.yaml"))
            .expect("deploy/examples/ippool.yaml");
    let mut pool: IPPool = serde_yaml::from_str(&example).expect("an IPPool");
    pool.metadata.name = Some(name("example"));
    pools.create(&PostParams::default(), &pool).await.expect("create the example pool");
    let mut gated = spec(vec![range("198.18.200.0/28")]);
    gated.node_selector = Some(PoolSelector {
        match_labels: [("example.com/gpu".to_string(), "true".to_string())].into(),
        ..PoolSelector::default()
    });
    gated.namespace_selector = Some(PoolSelector {
        match_expressions: vec![SelectorRequirement {
            key: "kubernetes.io/metadata.name".into(),
            operator: "In".into(),
            values: vec![ns.name.clone()],
        }],
        ..PoolSelector::default()
    });
    pools.create(&PostParams::default(), &IPPool::new(&name("gated"), gated)).await.expect("create gated");
    let (node_a, node_b, node_c, node_d) = (name("a"), name("b"), name("c"), name("d"));
    make_node(&admin, &node_a, &[("example.com/gpu", "true")]).await;
    make_node(&admin, &node_b, &[]).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = ns.kubeconfig(SERVER_ACCOUNT);
    let opts = ServerOptions {
        wait_serving: true,
        ..ServerOptions::kube_replica(
            "solo",
            &cfg,
            &ns.name,
            dir.path().join("solo.log"),
            &["--reconcile-every", "0", "--node-block-grace", "1s", "--pool-status-every", "200ms"],
        )
    };
    let data = dir.path().join("data");
    let mut server = ServerProcess::start_with(&data, &opts).await.expect("server");
    let ep = server.endpoint.clone();
    let rail_nads = |ep: &str, node: &str, order: &[usize]| -> Vec<(usize, Value)> {
        order
            .iter()
            .map(|i| {
                (
                    *i,
                    nad(
                        &format!("rail{i}"),
                        ep,
                        json!({"pool": name(&format!("rail{i}")), "node_name": node}),
                    ),
                )
            })
            .collect()
    };
    let up: Vec<usize> = (0..8).collect();
    let down: Vec<usize> = (0..8).rev().collect();
    // Each rail i is 198.18.(16 i).0/20; a node's block is a /28 of it, its gateway at .1.
    let on_block = |got: &BTreeMap<usize, (String, String)>, block: u32, host: u32| {
        for (i, (addr, gw)) in got {
            let base = 16 * *i as u32;
            let (third, fourth) = (base + block * 16 / 256, block * 16 % 256);
            assert_eq!(addr, &format!("198.18.{third}.{}/28", fourth + host), "rail{i}: {got:?}");
            assert_eq!(gw, &format!("198.18.{third}.{}", fourth + 1), "rail{i}: {got:?}");
        }
    };
    // Node a's first pod: a's block (the first) on every rail, host index 2 everywhere.
    on_block(&pod_on_rails(&ns.name, "a1", &rail_nads(&ep, &node_a, &up)), 0, 2);
    // The next pod, rails in the other order: index 3 everywhere (2 is a1's).
    on_block(&pod_on_rails(&ns.name, "a2", &rail_nads(&ep, &node_a, &down)), 0, 3);
    // Node b: the second block of every rail.
    on_block(&pod_on_rails(&ns.name, "b1", &rail_nads(&ep, &node_b, &up)), 1, 2);
    // a3 takes index 4 on rail0; then rail3's .4 is reserved by hand: rail3 falls back to
    // the lowest free address, the other rails stay aligned, and the fallback is counted.
    let a3_rail0 = pod_on_rails(&ns.name, "a3", &rail_nads(&ep, &node_a, &[0]));
    on_block(&a3_rail0, 0, 4);
    let ch = rust_ipam_proto::connect(&ep, Duration::from_secs(5)).await.expect("connect");
    AdminClient::new(ch)
        .reserve(pb::ReserveRequest {
            network: name("rail3"),
            address: "198.18.48.4".into(),
            note: "router".into(),
        })
        .await
        .expect("reserve");
    let a3 = pod_on_rails(&ns.name, "a3", &rail_nads(&ep, &node_a, &up[1..]));
    let mut aligned = a3.clone();
    let rail3 = aligned.remove(&3).expect("rail3");
    on_block(&aligned, 0, 4);
    assert_eq!(rail3, ("198.18.48.5/28".to_string(), "198.18.48.1".to_string()));
    let (_, text) = server.http_get("/metrics").await.expect("metrics");
    let unaligned =
        |pool: &str| metric(&text, &format!("rustipam_ippool_rail_unaligned{{pool=\"{}\"}}", name(pool)));
    assert_eq!((unaligned("rail3"), unaligned("rail0")), (Some(1.0), None), "{text}");
    // Per node: a's /28 of rail0 holds a1, a2 and a3, and has 10 of its 13 left.
    let of_node = |m: &str, node: &str| {
        metric(&text, &format!("rustipam_ippool_node_{m}{{pool=\"{}\",node=\"{node}\"}}", name("rail0")))
    };
    assert_eq!(
        ["used", "free", "size", "cooldown_holds"].map(|m| of_node(m, &node_a)),
        [Some(3.0), Some(10.0), Some(13.0), Some(0.0)],
        "{text}"
    );
    // The same in the pool's status, once the leader has written it (wait_status fails
    // with the last status seen).
    let blocks = json!([
        {"node": node_a, "block": "198.18.0.0/28", "used": "3", "free": "10", "size": "13", "cooldownHolds": "0"},
        {"node": node_b, "block": "198.18.0.16/28", "used": "1", "free": "12", "size": "13", "cooldownHolds": "0"}
    ]);
    wait_status(&pools, &name("rail0"), |s| s["blocks"] == blocks).await;

    // The blocks are IPLeases of their own network, naming the node.
    let server_client = ns.client(SERVER_ACCOUNT).await.expect("client");
    let markers = envtest::list(&server_client, Some(&ns.name), "ipam.rust-ipam.io/v1alpha1", "IPLease")
        .await
        .expect("list");
    let mut blocks: Vec<(String, String, String)> = markers
        .iter()
        .filter(|l| l["spec"]["network"].as_str().is_some_and(|n| n.ends_with("/node-blocks")))
        .map(|l| {
            let s = &l["spec"];
            let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (text(&s["network"]), text(&s["address"]), text(&s["node"]))
        })
        .filter(|(n, _, _)| n == &format!("{}/node-blocks", name("rail0")))
        .collect();
    blocks.sort();
    let rail0_blocks = format!("{}/node-blocks", name("rail0"));
    assert_eq!(
        blocks,
        [
            (rail0_blocks.clone(), "198.18.0.0".to_string(), node_a.clone()),
            (rail0_blocks, "198.18.0.16".into(), node_b.clone())
        ]
    );

    // b1 goes: node b holds nothing, yet keeps its blocks, across a restart too.
    let b_args = format!("K8S_POD_NAMESPACE={};K8S_POD_NAME=b1;K8S_POD_UID=uid-b1", ns.name);
    for (i, conf) in rail_nads(&ep, &node_b, &up) {
        let out = run_ipam_plugin("DEL", "b1", &b_args, &conf);
        assert_eq!(out.code, 0, "DEL b1 on rail{i}: {} {}", out.out, out.stderr);
    }
    server.terminate().expect("stop");
    let server = ServerProcess::start_with(&data, &opts).await.expect("restart");
    let ep = server.endpoint.clone();
    make_node(&admin, &node_c, &[]).await;
    on_block(&pod_on_rails(&ns.name, "c1", &rail_nads(&ep, &node_c, &up)), 2, 2);

    // Node b is deleted: the first pass starts its grace period, one after it gives its
    // eight blocks back, and the next new node takes them.
    Api::<Node>::all(admin.clone()).delete(&node_b, &Default::default()).await.expect("delete node");
    let deadline = Instant::now() + Duration::from_secs(10);
    let node_gone = pb::ReconcileReason::NodeGone as i32;
    let young = pb::ReconcileAction::KeptYoung as i32;
    loop {
        // The server sees the deletion through its watch of the Nodes.
        let entries = reconcile(&ep).await;
        if entries.len() == 8 {
            assert!(entries.iter().all(|e| *e == (node_gone, young, node_b.clone())), "{entries:?}");
            break;
        }
        let log = std::fs::read_to_string(dir.path().join("solo.log")).unwrap_or_default();
        assert!(Instant::now() < deadline, "node b's blocks never judged: {entries:?}\n{log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let freed = pb::ReconcileAction::Freed as i32;
    assert_eq!(reconcile(&ep).await, vec![(node_gone, freed, node_b.clone()); 8]);
    assert!(reconcile(&ep).await.is_empty());
    make_node(&admin, &node_d, &[]).await;
    on_block(&pod_on_rails(&ns.name, "d1", &rail_nads(&ep, &node_d, &up)), 1, 2);

    // The gated pool: node a in this namespace only.
    let gate = |node: &str| nad("gated", &ep, json!({"pool": name("gated"), "node_name": node}));
    let ok = add_in(&ns.name, "g1", &gate(&node_a));
    assert_eq!((ok.code, first_ip(&ok.out)), (0, "198.18.200.1".into()), "{}", ok.stderr);
    let error =
        |out: CniOutput| (out.code, out.out["code"].as_u64(), out.out["msg"].as_str().map(String::from));
    assert_eq!(
        error(add_in(&ns.name, "g2", &gate(&node_c))),
        (
            1,
            Some(100),
            Some(format!(
                "pool {:?} does not admit node {node_c:?}: its nodeSelector example.com/gpu=true does not select it (labels: none)",
                name("gated")
            ))
        )
    );
    assert_eq!(
        error(add_in(&other.name, "g3", &gate(&node_a))),
        (
            1,
            Some(100),
            Some(format!(
                "pool {:?} does not admit namespace {:?}: its namespaceSelector kubernetes.io/metadata.name in ({}) does not select it (labels: kubernetes.io/metadata.name={})",
                name("gated"),
                other.name,
                ns.name,
                other.name
            ))
        )
    );
    assert_eq!(
        error(add_in(&ns.name, "g4", &gate(&name("nowhere")))),
        (
            1,
            Some(100),
            Some(format!(
                "pool {:?} has a nodeSelector (example.com/gpu=true), and there is no node {:?}",
                name("gated"),
                name("nowhere")
            ))
        )
    );
    // Nothing was held for the refused ADDs.
    let gated_leases = envtest::list(&server_client, Some(&ns.name), "ipam.rust-ipam.io/v1alpha1", "IPLease")
        .await
        .expect("list")
        .into_iter()
        .filter(|l| l["spec"]["network"] == json!(name("gated")))
        .count();
    assert_eq!(gated_leases, 1);
}
