//! `rust-multus` end to end, with Pods and NADs in a directory of YAML files
//! (`rustMultus.objectsDir`): the cluster network from Debian's bridge + host-local as
//! `eth0`, backend networks from the NADs (macvlan on veth masters, `rust-ipam` against a
//! real server), in network namespaces this test creates.
//!
//! Needs root, iproute2, ping and /usr/lib/cni; without them the netns tests print SKIP
//! (and fail in CI). The annotation-error test needs none of that.

use std::path::{Path, PathBuf};
use std::process::Command;

use rust_ipam_e2e::envtest;
use rust_ipam_e2e::netns::{CNI_DIR, Netns, addresses, ip, ping, skip};
use rust_ipam_e2e::{ServerOptions, ServerProcess, fixtures, run_cni, workspace_bin};
use rust_ipam_proto::v1 as pb;
use serde_json::{Value, json};

/// The backend delegate's plugin type: this project's macvlan delegate.
const BACKEND_TYPE: &str = "rust-macvlan";
/// Kubernetes namespace of the test pods.
const POD_NS: &str = "team";
const PLUGINS: &[&str] = &["bridge", "host-local"];

fn multus_bin() -> PathBuf {
    workspace_bin("rust-multus").expect("rust-multus binary")
}

/// The directory of the workspace's binaries (rust-ipam) and Debian's plugins.
fn cni_path() -> String {
    let ipam = workspace_bin("rust-ipam").expect("rust-ipam binary");
    // The backend delegate, built beside rust-ipam.
    workspace_bin(BACKEND_TYPE).expect("backend delegate binary");
    format!("{}:{CNI_DIR}", ipam.parent().expect("bin dir").display())
}

/// One node: a tempdir with the objects directory, confDir, cniDir, host-local's data, and
/// the node's network namespace with the backend masters.
struct Node {
    dir: tempfile::TempDir,
    ns: Netns,
    server: String,
}

impl Node {
    /// `tag` names the node's namespace (tests run at once in one process).
    fn new(tag: &str, masters: &[&str]) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        for d in ["objects", "conf", "cache", "host-local"] {
            std::fs::create_dir(dir.path().join(d)).expect("mkdir");
        }
        let ns = Netns::new(&[&format!("mnode-{tag}")]);
        for m in masters {
            let peer = format!("{m}p");
            ip(&["-n", ns.name(0), "link", "add", m, "type", "veth", "peer", "name", &peer]);
            ip(&["-n", ns.name(0), "link", "set", m, "up"]);
            ip(&["-n", ns.name(0), "link", "set", &peer, "up"]);
        }
        let cluster = json!({"cniVersion": "1.0.0", "name": "cluster-net", "type": "bridge", "bridge": "rmcbr0",
            "isGateway": true, "isDefaultGateway": true, "ipam": {"type": "host-local", "subnet": "198.18.100.0/24",
            "dataDir": dir.path().join("host-local")}});
        std::fs::write(dir.path().join("conf/10-cluster.conf"), cluster.to_string()).expect("conf");
        Node { dir, ns, server: String::new() }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// The meta-plugin's configuration.
    fn conf(&self) -> Value {
        json!({"cniVersion": "1.0.0", "name": "multus-cni-network", "type": "rust-multus",
            "clusterNetwork": "cluster-net", "confDir": self.path("conf"), "cniDir": self.path("cache"),
            "binDir": CNI_DIR, "rustMultus": {"objectsDir": self.path("objects")}})
    }

    /// A NAD (YAML) whose delegate is the backend type on `master` with rust-ipam.
    fn nad(&self, name: &str, master: &str, range: &str, network: &str) {
        self.nad_with(name, master, range, network, json!({}));
    }

    /// As [`Node::nad`], with `capabilities` in the config.
    fn nad_with(&self, name: &str, master: &str, range: &str, network: &str, caps: Value) {
        let config = json!({"capabilities": caps, "cniVersion": "1.0.0", "name": name, "type": BACKEND_TYPE, "master": master,
            "mode": "bridge", "ipam": {"type": "rust-ipam", "range": range, "network_name": network,
            "server": self.server}});
        let yaml = format!(
            "apiVersion: k8s.cni.cncf.io/v1\nkind: NetworkAttachmentDefinition\nmetadata:\n  name: {name}\n  namespace: {POD_NS}\nspec:\n  config: '{config}'\n"
        );
        std::fs::write(self.path(&format!("objects/nad-{name}.yaml")), yaml).expect("NAD");
    }

    /// A pod (JSON is YAML too) with the networks annotation.
    fn pod(&self, name: &str, networks: &str) {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": POD_NS,
            "uid": format!("uid-{name}"), "annotations": {"k8s.v1.cni.cncf.io/networks": networks}}});
        std::fs::write(self.path(&format!("objects/pod-{name}.json")), pod.to_string()).expect("pod");
    }

    fn pod_annotations(&self, name: &str) -> Value {
        let text = std::fs::read_to_string(self.path(&format!("objects/pod-{name}.json"))).expect("pod file");
        let v: Value = serde_json::from_str(&text).expect("pod JSON");
        v["metadata"]["annotations"].clone()
    }

    /// Runs rust-multus in the node's namespace for pod `pod` in network namespace `netns`.
    fn multus(&self, command: &str, netns: &str, pod: &str, conf: &Value) -> (i32, Value, String) {
        let cid = format!("cid-{pod}");
        let (path, args) = (
            cni_path(),
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={POD_NS};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={cid}"
            ),
        );
        let env = [
            ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", &cid),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", &path),
            ("CNI_ARGS", &args),
        ];
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns.name(0)]).arg(multus_bin());
        let out = run_cni(&mut cmd, &env, &conf.to_string());
        (out.code, out.out, out.stderr)
    }
}

fn mac(ns: &str, dev: &str) -> String {
    let v: Value = serde_json::from_str(&ip(&["-n", ns, "-j", "link", "show", "dev", dev])).expect("ip -j");
    v[0]["address"].as_str().expect("address").to_string()
}

fn link_exists(ns: &str, dev: &str) -> bool {
    Command::new("ip").args(["-n", ns, "link", "show", "dev", dev]).output().is_ok_and(|o| o.status.success())
}

/// Every lease the server holds, as (network, address, container, ifname, pod).
async fn leases(endpoint: &str) -> Vec<(String, String, String, String, String)> {
    let all = fixtures::leases(endpoint, pb::ListLeasesRequest::default()).await;
    all.into_iter()
        .map(|l| {
            let pod = l.pod.map(|p| format!("{}/{}", p.namespace, p.name)).unwrap_or_default();
            (l.network, l.address, l.container_id, l.ifname, pod)
        })
        .collect()
}

/// host-local's lease files (one per held address) under the node's data dir.
fn host_local_leases(node: &Node) -> Vec<String> {
    let dir = node.path("host-local/cluster-net");
    let mut out: Vec<String> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
        .collect();
    out.sort();
    out
}

/// Files under the node's cniDir, relative (the delegate cache and libcni's results).
fn cache_files(node: &Node) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).expect("under base").display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(&node.path("cache"), &node.path("cache"), &mut out);
    out.sort();
    out
}

async fn start_server(node: &mut Node) -> ServerProcess {
    let sock = node.path("ipam.sock");
    let opts = ServerOptions { unix_socket: Some(sock.clone()), ..ServerOptions::default() };
    let server = ServerProcess::start_with(&node.path("data"), &opts).await.expect("server");
    node.server = format!("unix://{}", sock.display());
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_get_eth0_and_a_backend_net1_and_reach_each_other() {
    if skip("two_pods_get_eth0_and_a_backend_net1_and_reach_each_other", PLUGINS) {
        return;
    }
    let mut node = Node::new("two", &["backend0"]);
    let server = start_server(&mut node).await;
    node.nad("backend", "backend0", "198.18.8.0/24", "backend");
    node.pod("pod1", "backend");
    node.pod("pod2", "backend");
    let pods = Netns::new(&["mpod1", "mpod2"]);
    let conf = node.conf();

    let (code, r1, err) = node.multus("ADD", &pods.path(0), "pod1", &conf);
    assert_eq!(code, 0, "ADD pod1: {r1} {err}");
    let (code, r2, err) = node.multus("ADD", &pods.path(1), "pod2", &conf);
    assert_eq!(code, 0, "ADD pod2: {r2} {err}");

    // The runtime gets the cluster network's result, in the multus conf's version.
    assert_eq!(r1["cniVersion"], "1.0.0");
    assert_eq!(r1["ips"][0]["address"], "198.18.100.2/24");
    assert_eq!(r2["ips"][0]["address"], "198.18.100.3/24");
    assert_eq!(addresses(pods.name(0), "eth0"), vec!["198.18.100.2/24"]);
    assert_eq!(addresses(pods.name(1), "eth0"), vec!["198.18.100.3/24"]);
    // net1 from the backend NAD, addressed by the server: unique in the cluster.
    assert_eq!(addresses(pods.name(0), "net1"), vec!["198.18.8.1/24"]);
    assert_eq!(addresses(pods.name(1), "net1"), vec!["198.18.8.2/24"]);
    let mut held = leases(&server.endpoint).await;
    held.sort();
    assert_eq!(
        held,
        vec![
            ("backend".into(), "198.18.8.1".into(), "cid-pod1".into(), "net1".into(), "team/pod1".into()),
            ("backend".into(), "198.18.8.2".into(), "cid-pod2".into(), "net1".into(), "team/pod2".into()),
        ]
    );

    ping(pods.name(0), "198.18.8.2", &["-I", "net1"], "pod1 cannot reach pod2 over net1");

    // network-status written into the pod's file, and kept in the cache.
    let status = json!([
        {"name": "cluster-net", "interface": "eth0", "ips": ["198.18.100.2"], "mac": mac(pods.name(0), "eth0"),
         "default": true, "dns": {}},
        {"name": "team/backend", "interface": "net1", "ips": ["198.18.8.1"], "mac": mac(pods.name(0), "net1"),
         "dns": {}},
    ]);
    let written = node.pod_annotations("pod1")["k8s.v1.cni.cncf.io/network-status"]
        .as_str()
        .expect("status")
        .to_string();
    assert_eq!(serde_json::from_str::<Value>(&written).expect("JSON"), status);
    let kept = std::fs::read_to_string(node.path("cache/network-status/cid-pod1")).expect("kept status");
    assert_eq!(kept, written);
    let cached: Value =
        serde_json::from_str(&std::fs::read_to_string(node.path("cache/cid-pod1")).expect("cache"))
            .expect("JSON");
    assert_eq!(cached[0]["Name"], "cluster-net");
    assert_eq!(cached[1]["Name"], "team/backend");
    assert_eq!(
        cached[1]["Conf"],
        json!({"cniVersion": "1.0.0", "name": "backend", "type": BACKEND_TYPE,
        "ipam": {"type": "rust-ipam"}})
    );

    let (code, out, err) = node.multus("CHECK", &pods.path(1), "pod2", &conf);
    assert_eq!(code, 0, "CHECK pod2: {out} {err}");

    for (i, pod) in ["pod1", "pod2"].iter().enumerate() {
        let (code, out, err) = node.multus("DEL", &pods.path(i), pod, &conf);
        assert_eq!(code, 0, "DEL {pod}: {out} {err}");
        assert!(!link_exists(pods.name(i), "net1") && !link_exists(pods.name(i), "eth0"), "{pod} links stay");
        assert!(node.pod_annotations(pod).get("k8s.v1.cni.cncf.io/network-status").is_none());
    }
    assert_eq!(leases(&server.endpoint).await, vec![]);
    assert_eq!(host_local_leases(&node), Vec::<String>::new());
    assert_eq!(cache_files(&node), Vec::<String>::new());
    let (code, out, _) = node.multus("DEL", &pods.path(0), "pod1", &conf);
    assert_eq!(code, 0, "a repeated DEL succeeds: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_rails_with_requested_names_and_a_static_ip() {
    if skip("four_rails_with_requested_names_and_a_static_ip", PLUGINS) {
        return;
    }
    let mut node = Node::new("rails", &["rail0", "rail1", "rail2", "rail3"]);
    let server = start_server(&mut node).await;
    for r in 0..4 {
        // rail-1 declares the `ips` capability: its static IP comes as runtimeConfig too.
        let caps = if r == 1 { json!({"ips": true}) } else { json!({}) };
        let (name, master) = (format!("rail-{r}"), format!("rail{r}"));
        node.nad_with(&name, &master, &format!("198.18.{}.0/24", 10 + r), &master, caps);
    }
    // The 8-rail GPU layout, cut to four: one subnet per rail, names asked for two of them.
    let networks = r#"[{"name":"rail-0","interface":"gpu0"},{"name":"rail-1","interface":"gpu1","ips":["198.18.11.42/24"]},{"name":"rail-2"},{"namespace":"team","name":"rail-3"}]"#;
    node.pod("trainer", networks);
    let pods = Netns::new(&["mtrainer"]);
    let pod = pods.name(0);
    let conf = node.conf();
    let (code, r, err) = node.multus("ADD", &pods.path(0), "trainer", &conf);
    assert_eq!(code, 0, "ADD: {r} {err}");

    let want = [
        ("eth0", "198.18.100.2/24"),
        ("gpu0", "198.18.10.1/24"),
        ("gpu1", "198.18.11.42/24"),
        ("net3", "198.18.12.1/24"),
        ("net4", "198.18.13.1/24"),
    ];
    for (dev, addr) in want {
        assert_eq!(addresses(pod, dev), vec![addr], "{dev}");
    }
    let status = json!([
        {"name": "cluster-net", "interface": "eth0", "ips": ["198.18.100.2"], "mac": mac(pod, "eth0"), "default": true, "dns": {}},
        {"name": "team/rail-0", "interface": "gpu0", "ips": ["198.18.10.1"], "mac": mac(pod, "gpu0"), "dns": {}},
        {"name": "team/rail-1", "interface": "gpu1", "ips": ["198.18.11.42"], "mac": mac(pod, "gpu1"), "dns": {}},
        {"name": "team/rail-2", "interface": "net3", "ips": ["198.18.12.1"], "mac": mac(pod, "net3"), "dns": {}},
        {"name": "team/rail-3", "interface": "net4", "ips": ["198.18.13.1"], "mac": mac(pod, "net4"), "dns": {}},
    ]);
    let written = node.pod_annotations("trainer")["k8s.v1.cni.cncf.io/network-status"]
        .as_str()
        .expect("status")
        .to_string();
    assert_eq!(serde_json::from_str::<Value>(&written).expect("JSON"), status);
    // The annotation written by the user is untouched.
    assert_eq!(node.pod_annotations("trainer")["k8s.v1.cni.cncf.io/networks"], networks);
    let mut held: Vec<(String, String, String)> =
        leases(&server.endpoint).await.into_iter().map(|l| (l.0, l.1, l.3)).collect();
    held.sort();
    assert_eq!(
        held,
        vec![
            ("rail0".into(), "198.18.10.1".into(), "gpu0".into()),
            ("rail1".into(), "198.18.11.42".into(), "gpu1".into()),
            ("rail2".into(), "198.18.12.1".into(), "net3".into()),
            ("rail3".into(), "198.18.13.1".into(), "net4".into()),
        ]
    );
    // The static request is in the cache as Multus records it.
    let cached: Value =
        serde_json::from_str(&std::fs::read_to_string(node.path("cache/cid-trainer")).expect("cache"))
            .expect("JSON");
    assert_eq!(cached[2]["ifnameRequest"], "gpu1");
    assert_eq!(cached[2]["ipRequest"], json!(["198.18.11.42/24"]));
    assert!(cached[3].get("ifnameRequest").is_none());

    let (code, out, err) = node.multus("CHECK", &pods.path(0), "trainer", &conf);
    assert_eq!(code, 0, "CHECK: {out} {err}");
    let (code, out, err) = node.multus("DEL", &pods.path(0), "trainer", &conf);
    assert_eq!(code, 0, "DEL: {out} {err}");
    assert_eq!(leases(&server.endpoint).await, vec![]);
    for (dev, _) in want {
        assert!(!link_exists(pod, dev), "{dev} stays after DEL");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_delegate_undoes_the_networks_before_it() {
    if skip("a_failing_delegate_undoes_the_networks_before_it", PLUGINS) {
        return;
    }
    let mut node = Node::new("fail", &["rail0", "rail1", "rail2"]);
    let server = start_server(&mut node).await;
    for r in 0..3 {
        node.nad(
            &format!("rail-{r}"),
            &format!("rail{r}"),
            &format!("198.18.{}.0/24", 20 + r),
            &format!("rail{r}"),
        );
    }
    // The third network asks for an address outside its range: rust-ipam refuses it after
    // eth0, net1 and net2 are made and two leases are held.
    node.pod("broken", r#"[{"name":"rail-0"},{"name":"rail-1"},{"name":"rail-2","ips":["10.99.0.1/24"]}]"#);
    let pods = Netns::new(&["mbroken"]);
    let pod = pods.name(0);
    let (code, out, err) = node.multus("ADD", &pods.path(0), "broken", &node.conf());
    assert_eq!(code, 1, "ADD must fail: {out} {err}");
    let msg = out["msg"].as_str().expect("CNI error JSON");
    assert!(
        msg.starts_with(r#"error adding container to network "team/rail-2" (net3): "#),
        "the error names the network: {out}"
    );
    assert!(out["code"].as_u64().is_some_and(|c| c > 0), "{out}");
    for dev in ["eth0", "net1", "net2", "net3"] {
        assert!(!link_exists(pod, dev), "{dev} stays after the failed ADD");
    }
    assert_eq!(leases(&server.endpoint).await, vec![], "leases of net1 and net2 are released");
    assert_eq!(host_local_leases(&node), Vec::<String>::new(), "eth0's host-local lease is released");
    assert_eq!(cache_files(&node), Vec::<String>::new(), "nothing is cached for a failed ADD");
    assert!(node.pod_annotations("broken").get("k8s.v1.cni.cncf.io/network-status").is_none());
}

/// A selection's `ipam-claim-reference` reaches the server through the delegate's
/// `args.cni` and rust-ipam: this server (no Kubernetes API) refuses it naming the claim,
/// and the ADD is undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipam_claim_reference_reaches_the_server() {
    if skip("an_ipam_claim_reference_reaches_the_server", PLUGINS) {
        return;
    }
    let mut node = Node::new("claim", &["claim0"]);
    let server = start_server(&mut node).await;
    node.nad("backend", "claim0", "198.18.31.0/24", "backend");
    node.pod("vm", r#"[{"name":"backend","ipam-claim-reference":"vm-a.net1"}]"#);
    let pods = Netns::new(&["mvm"]);
    let (code, out, err) = node.multus("ADD", &pods.path(0), "vm", &node.conf());
    assert_eq!(code, 1, "ADD must fail: {out} {err}");
    let msg = out["msg"].as_str().expect("CNI error JSON");
    assert!(
        msg.starts_with(r#"error adding container to network "team/backend" (net1): "#)
            && msg.contains(
                r#"ipam-claim-reference "vm-a.net1": this server has no Kubernetes API to read IPAMClaims"#
            ),
        "{out}"
    );
    assert!(!link_exists(pods.name(0), "net1") && !link_exists(pods.name(0), "eth0"));
    assert_eq!(leases(&server.endpoint).await, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn del_without_the_api_cleans_up_from_the_cache() {
    if skip("del_without_the_api_cleans_up_from_the_cache", PLUGINS) {
        return;
    }
    let mut node = Node::new("del", &["backend0"]);
    let server = start_server(&mut node).await;
    node.nad("backend", "backend0", "198.18.30.0/24", "backend");
    node.pod("lonely", "backend, backend@extra");
    let pods = Netns::new(&["mlonely"]);
    let pod = pods.name(0);
    let conf = node.conf();
    let (code, out, err) = node.multus("ADD", &pods.path(0), "lonely", &conf);
    assert_eq!(code, 0, "ADD: {out} {err}");
    // Added at once (rustMultus.parallelNetworks): the first two addresses, in either order.
    let mut got = [addresses(pod, "net1"), addresses(pod, "extra")].concat();
    got.sort();
    assert_eq!(got, vec!["198.18.30.1/24", "198.18.30.2/24"]);
    assert_eq!(leases(&server.endpoint).await.len(), 2);

    // The API goes away (the objects directory with it).
    std::fs::rename(node.path("objects"), node.path("objects-gone")).expect("remove the objects dir");
    let (code, out, err) = node.multus("DEL", &pods.path(0), "lonely", &conf);
    assert_eq!(code, 0, "DEL from the cache: {out} {err}");
    for dev in ["eth0", "net1", "extra"] {
        assert!(!link_exists(pod, dev), "{dev} stays after DEL");
    }
    assert_eq!(leases(&server.endpoint).await, vec![]);
    assert_eq!(host_local_leases(&node), Vec::<String>::new());
    assert_eq!(cache_files(&node), Vec::<String>::new());

    // Again, with neither cache nor API: the pod is gone, success with a warning.
    let (code, out, err) = node.multus("DEL", &pods.path(0), "lonely", &conf);
    assert_eq!(code, 0, "DEL with nothing left: {out}");
    assert!(
        err.contains("no delegate cache in") && err.contains("assuming the pod is gone"),
        "warning: {err}"
    );
}

/// Runs rust-multus ADD here (no namespaces are touched: it fails before any delegate).
fn add_refused(objects: &Path, conf: &Value, pod: &str) -> Value {
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={POD_NS};K8S_POD_NAME={pod}");
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "cid-x"),
        ("CNI_NETNS", "/nonexistent/netns"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/nonexistent"),
        ("CNI_ARGS", &args),
    ];
    let out = run_cni(&mut Command::new(multus_bin()), &env, &conf.to_string());
    assert_eq!(out.code, 1, "must fail: {}", out.out);
    assert!(out.out.is_object(), "a CNI error JSON: {}", out.out);
    let _ = objects;
    out.out
}

#[test]
fn bad_requests_reach_the_runtime_as_cni_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let objects = dir.path().join("objects");
    let confdir = dir.path().join("conf");
    std::fs::create_dir_all(&objects).expect("mkdir");
    std::fs::create_dir_all(&confdir).expect("mkdir");
    std::fs::write(confdir.join("c.conf"), r#"{"cniVersion":"1.0.0","name":"cluster-net","type":"bridge"}"#)
        .expect("conf");
    let nad = |ns: &str, name: &str| {
        let text = format!(
            "apiVersion: k8s.cni.cncf.io/v1\nkind: NetworkAttachmentDefinition\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  config: '{{\"cniVersion\":\"1.0.0\",\"type\":\"macvlan\"}}'\n"
        );
        std::fs::write(objects.join(format!("{ns}-{name}.yaml")), text).expect("nad");
    };
    nad(POD_NS, "a");
    nad(POD_NS, "b");
    nad("other", "c");
    nad("shared", "d");
    let conf = json!({"cniVersion": "0.3.1", "name": "m", "clusterNetwork": "cluster-net", "confDir": confdir,
        "cniDir": dir.path().join("cache"), "namespaceIsolation": true, "globalNamespaces": "shared",
        "rustMultus": {"objectsDir": objects}});
    let cases = [
        (
            "nope",
            "NetworkAttachmentDefinition team/nope not found (networks are looked up in the pod's namespace unless one is given)",
        ),
        (
            "Bad_Name",
            "k8s.v1.cni.cncf.io/networks: entry \"Bad_Name\": \"Bad_Name\" may hold only letters, digits, '-' and '.' (expected [namespace/]name[@interface])",
        ),
        (
            "a@averyveryverylongname",
            "k8s.v1.cni.cncf.io/networks: network 1 (\"a\"): interface \"averyveryverylongname\" is not a valid interface name (1 to 15 characters, no '/', ':' or spaces)",
        ),
        (
            "a@net2,b",
            "k8s.v1.cni.cncf.io/networks: network 2 (\"b\"): interface \"net2\" is used by two networks",
        ),
        (
            r#"[{"name":"a","default-route":["198.18.0.1"]},{"name":"b","default-route":["198.18.1.1"]}]"#,
            "k8s.v1.cni.cncf.io/networks: network 2 (\"b\"): only one network may set default-route (no ECMP default routes)",
        ),
        (
            r#"[{"name":"a","default-route":["198.18.0.1","198.18.0.2"]}]"#,
            "k8s.v1.cni.cncf.io/networks: more than one IPv4 default-route (team/a via 198.18.0.1, team/a via 198.18.0.2); ECMP default routes are not supported",
        ),
        (
            "other/c",
            "namespace isolation: pod in namespace \"team\" may not use networks of namespace \"other\" (allowed: its own and globalNamespaces [\"shared\"])",
        ),
        (
            "a@eth0",
            "interface \"eth0\" is used by two networks: cluster-net and team/a (name one of them with @ifname or \"interface\")",
        ),
    ];
    for (i, (networks, msg)) in cases.iter().enumerate() {
        let pod = format!("p{i}");
        let obj = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": POD_NS,
            "annotations": {"k8s.v1.cni.cncf.io/networks": networks}}});
        std::fs::write(objects.join(format!("pod-{pod}.json")), obj.to_string()).expect("pod");
        let out = add_refused(&objects, &conf, &pod);
        assert_eq!(out, json!({"cniVersion": "0.3.1", "code": 7, "msg": msg}), "annotation {networks}");
    }
    // A network from a global namespace passes isolation and fails only at its delegate.
    let obj = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ok", "namespace": POD_NS,
        "annotations": {"k8s.v1.cni.cncf.io/networks": "shared/d"}}});
    std::fs::write(objects.join("pod-ok.json"), obj.to_string()).expect("pod");
    let out = add_refused(&objects, &conf, "ok");
    assert_eq!(
        out["msg"],
        "error adding container to network \"cluster-net\" (eth0): plugin \"bridge\" not found in CNI_PATH [/opt/cni/bin, /nonexistent]"
    );
    // A pod the API does not know.
    let out = add_refused(&objects, &conf, "ghost");
    assert_eq!(out, json!({"cniVersion": "0.3.1", "code": 11, "msg": "pod team/ghost not found"}));
}

fn default_routes(ns: &str) -> Vec<String> {
    ip(&["-n", ns, "-4", "route", "show", "default"]).lines().map(|l| l.trim().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_route_moves_to_the_requested_network_and_gc_removes_stale_pods() {
    if skip("default_route_moves_to_the_requested_network_and_gc_removes_stale_pods", PLUGINS) {
        return;
    }
    let mut node = Node::new("route", &["backend0"]);
    let server = start_server(&mut node).await;
    node.nad("backend", "backend0", "198.18.40.0/24", "backend");
    node.pod("router", r#"[{"name":"backend","default-route":["198.18.40.254"]}]"#);
    node.pod("plain", "backend");
    let pods = Netns::new(&["mrouter", "mplain"]);
    let conf = node.conf();
    let (code, out, err) = node.multus("ADD", &pods.path(1), "plain", &conf);
    assert_eq!(code, 0, "ADD plain: {out} {err}");
    assert_eq!(default_routes(pods.name(1)), vec!["default via 198.18.100.1 dev eth0"]);
    assert_eq!(out["routes"], json!([{"dst": "0.0.0.0/0", "gw": "198.18.100.1"}]));

    let (code, out, err) = node.multus("ADD", &pods.path(0), "router", &conf);
    assert_eq!(code, 0, "ADD router: {out} {err}");
    // Multus' rule: the requested gateway is the pod's only IPv4 default route.
    assert_eq!(default_routes(pods.name(0)), vec!["default via 198.18.40.254 dev net1"]);
    assert_eq!(out["routes"], Value::Null, "eth0's result lost its default route (no routes left): {out}");
    let cached: Value = serde_json::from_str(
        &std::fs::read_to_string(node.path("cache/results/backend-cid-router-net1")).expect("libcni cache"),
    )
    .expect("JSON");
    assert_eq!(cached["result"]["routes"], json!([{"dst": "0.0.0.0/0", "gw": "198.18.40.254"}]));
    let (code, out, err) = node.multus("CHECK", &pods.path(0), "router", &conf);
    assert_eq!(code, 0, "CHECK after the route moved: {out} {err}");

    // GC (CNI 1.1.0): the runtime still lists the router only; the plain pod's networks go.
    let mut gc = conf.clone();
    gc["cniVersion"] = json!("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "cid-router", "ifname": "eth0"}]);
    let (code, out, err) = node.multus("GC", "", "gc", &gc);
    assert_eq!(code, 0, "GC: {out} {err}");
    assert!(
        !link_exists(pods.name(1), "eth0") && !link_exists(pods.name(1), "net1"),
        "plain pod's links stay"
    );
    assert!(link_exists(pods.name(0), "net1"), "the router keeps its networks");
    let held: Vec<String> = leases(&server.endpoint).await.into_iter().map(|l| l.2).collect();
    assert_eq!(held, vec!["cid-router"]);
    assert_eq!(
        cache_files(&node),
        vec![
            "cid-router",
            "network-status/cid-router",
            "results/backend-cid-router-net1",
            "results/cluster-net-cid-router-eth0"
        ]
    );
    gc["cni.dev/valid-attachments"] = json!([]);
    let (code, out, err) = node.multus("GC", "", "gc", &gc);
    assert_eq!(code, 0, "GC of everything: {out} {err}");
    assert_eq!(leases(&server.endpoint).await, vec![]);
    assert_eq!(cache_files(&node), Vec::<String>::new());
    assert_eq!(host_local_leases(&node), Vec::<String>::new());
}

/// Runs rust-multus with `command` and no pod, here.
fn plain(command: &str, conf: &Value) -> (i32, Value) {
    let env = [("CNI_COMMAND", command), ("CNI_PATH", "/nonexistent")];
    let out = run_cni(&mut Command::new(multus_bin()), &env, &conf.to_string());
    (out.code, out.out)
}

#[test]
fn status_needs_the_readiness_file_and_version_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("conf")).expect("mkdir");
    std::fs::write(
        dir.path().join("conf/c.conf"),
        r#"{"cniVersion":"1.0.0","name":"cluster-net","type":"bridge"}"#,
    )
    .expect("conf");
    let ready = dir.path().join("ready");
    let conf = json!({"cniVersion": "1.1.0", "name": "m", "clusterNetwork": "cluster-net",
        "confDir": dir.path().join("conf"), "readinessindicatorfile": ready});
    let (code, out) = plain("STATUS", &conf);
    assert_eq!(code, 1);
    assert_eq!(
        out,
        json!({"cniVersion": "1.1.0", "code": 50, "msg": format!(
            "readiness indicator file {} does not exist: the cluster network is not ready", ready.display())})
    );
    std::fs::write(&ready, "").expect("ready");
    assert_eq!(plain("STATUS", &conf), (0, Value::Null));
    // A 1.1.0 cluster network is asked too: its plugin is missing here.
    std::fs::write(
        dir.path().join("conf/c.conf"),
        r#"{"cniVersion":"1.1.0","name":"cluster-net","type":"bridge"}"#,
    )
    .expect("conf");
    let (code, out) = plain("STATUS", &conf);
    assert_eq!(
        (code, out["msg"].as_str()),
        (
            1,
            Some(
                "network \"cluster-net\": plugin \"bridge\" not found in CNI_PATH [/opt/cni/bin, /nonexistent]"
            )
        )
    );
    let mut old = conf.clone();
    old["cniVersion"] = json!("1.0.0");
    assert_eq!(
        plain("STATUS", &old).1["msg"],
        "STATUS needs cniVersion 1.1.0 or later, the config has 1.0.0"
    );
    assert_eq!(
        plain("VERSION", &json!({"cniVersion": "0.4.0"})),
        (
            0,
            json!({"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
        )
    );
}

/// A delegate for the kube-source tests: logs each call, keeps its config as
/// `<COMMAND>-<IFNAME>.json` beside itself, and answers ADD with an address derived from
/// the interface (eth0 -> 10.0.0.5, net1 -> 10.1.0.5).
const FAKE_NET: &str = r#"#!/bin/sh
cat >"$(dirname "$0")/$CNI_COMMAND-$CNI_IFNAME.json"
echo "$CNI_COMMAND $CNI_IFNAME $CNI_ARGS" >> "$(dirname "$0")/calls.log"
n=$(echo "$CNI_IFNAME" | tr -dc 0-9)
[ "$CNI_COMMAND" = ADD ] && printf '{"cniVersion":"1.0.0","interfaces":[{"name":"%s","mac":"02:00:00:00:00:0%s","sandbox":"%s"}],"ips":[{"address":"10.%s.0.5/24","interface":0}]}' "$CNI_IFNAME" "$n" "$CNI_NETNS" "$n"
exit 0
"#;

/// Runs rust-multus for pod `namespace`/web off the async runtime (the stand-in serves on it).
async fn multus_blocking(
    command: &'static str,
    namespace: &str,
    bin_dir: PathBuf,
    netns: PathBuf,
    conf: Value,
) -> (i32, Value, String) {
    let cni_args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=cid-web"
    );
    tokio::task::spawn_blocking(move || {
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "cid-web"),
            ("CNI_NETNS", netns.to_str().expect("utf-8 path")),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", bin_dir.to_str().expect("utf-8 path")),
            ("CNI_ARGS", &cni_args),
        ];
        let out = run_cni(&mut Command::new(multus_bin()), &env, &conf.to_string());
        (out.code, out.out, out.stderr)
    })
    .await
    .expect("join")
}

/// The kube-source tests' delegates dir (holding [`FAKE_NET`]) and rust-multus config.
fn kube_source_conf(dir: &Path, kubeconfig: &Path) -> (PathBuf, Value) {
    use std::os::unix::fs::PermissionsExt as _;
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    std::fs::write(bin.join("fake-net"), FAKE_NET).expect("plugin");
    std::fs::set_permissions(bin.join("fake-net"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let conf = json!({"cniVersion": "0.4.0", "name": "m", "clusterNetwork": "cluster", "kubeconfig": kubeconfig,
        "binDir": bin, "cniDir": dir.join("cache")});
    (bin, conf)
}

fn fake_nad(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"config": r#"{"cniVersion":"1.0.0","type":"fake-net"}"#}})
}

/// The delegates' calls so far: `COMMAND IFNAME CNI_ARGS`.
fn delegate_calls(bin: &Path) -> Vec<String> {
    std::fs::read_to_string(bin.join("calls.log")).expect("calls").lines().map(str::to_string).collect()
}

/// The CNI_ARGS rust-multus gives its delegates for pod `ns`/web.
fn multus_args(ns: &str, uid: &str) -> String {
    let runtime =
        format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=cid-web");
    format!(
        "IgnoreUnknown=true;K8S_POD_NAMESPACE={ns};K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=cid-web;K8S_POD_UID={uid};{runtime}"
    )
}

/// On a real kube-apiserver, as the node DaemonSet's ServiceAccount with deploy/'s RBAC
/// (get NADs, get and patch pods).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_source_reads_nads_and_pods_and_patches_network_status() {
    let Some(env) = envtest::shared("kube_source_reads_nads_and_pods_and_patches_network_status") else {
        return;
    };
    let ns = env.namespace("team").await.expect("namespace");
    let team = ns.name.clone();
    let admin = ns.admin_client().await.expect("admin client");
    let dir = tempfile::tempdir().expect("tempdir");
    let (bin, conf) = kube_source_conf(dir.path(), &ns.kubeconfig(envtest::NODE_ACCOUNT));
    envtest::create(&admin, Some("kube-system"), fake_nad("kube-system", "cluster")).await.expect("NAD");
    envtest::create(&admin, Some(&team), fake_nad(&team, "fast")).await.expect("NAD");
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web",
        "annotations": {"k8s.v1.cni.cncf.io/networks": "fast"}},
        "spec": {"containers": [{"name": "pause", "image": "registry.k8s.io/pause:3.10"}]}});
    let stored = envtest::create(&admin, Some(&team), pod).await.expect("pod");
    let uid = stored["metadata"]["uid"].as_str().expect("uid").to_string();
    let netns = dir.path().to_path_buf();
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(admin.clone(), &team);
    let status_of = || async {
        let pod = pods.get("web").await.expect("get pod");
        pod.metadata.annotations.unwrap_or_default().get("k8s.v1.cni.cncf.io/network-status").cloned()
    };

    let (code, out, err) = multus_blocking("ADD", &team, bin.clone(), netns.clone(), conf.clone()).await;
    assert_eq!(code, 0, "ADD: {out} {err}");
    // The cluster network's result, in the conf's version (0.4.0 has ips[].version).
    assert_eq!(out["cniVersion"], "0.4.0");
    assert_eq!(out["ips"], json!([{"address": "10.0.0.5/24", "interface": 0, "version": "4"}]));
    let status: Value =
        serde_json::from_str(&status_of().await.expect("merge-patched status")).expect("JSON");
    assert_eq!(
        status,
        json!([{"name": "kube-system/cluster", "interface": "eth0", "ips": ["10.0.0.5"], "mac": "02:00:00:00:00:00",
                "default": true, "dns": {}},
               {"name": format!("{team}/fast"), "interface": "net1", "ips": ["10.1.0.5"], "mac": "02:00:00:00:00:01", "dns": {}}])
    );
    let multus = |uid: &str| multus_args(&team, uid);
    // Added at once (rustMultus.parallelNetworks), so in either order.
    let mut adds = delegate_calls(&bin);
    adds.sort();
    assert_eq!(adds, vec![format!("ADD eth0 {}", multus(&uid)), format!("ADD net1 {}", multus(&uid))]);
    // The pod's events, as Multus writes them.
    let mut events: Vec<(String, String, String, String)> = envtest::list(&admin, Some(&team), "v1", "Event")
        .await
        .expect("events")
        .iter()
        .map(|e| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (s(&e["type"]), s(&e["reason"]), s(&e["message"]), s(&e["involvedObject"]["uid"]))
        })
        .collect();
    events.sort();
    assert_eq!(
        events,
        [
            (
                "Normal".into(),
                "AddedInterface".into(),
                "Add eth0 [10.0.0.5/24] from kube-system/cluster".into(),
                uid.clone()
            ),
            (
                "Normal".into(),
                "AddedInterface".into(),
                format!("Add net1 [10.1.0.5/24] from {team}/fast"),
                uid.clone()
            ),
        ]
    );

    // DEL clears the annotation (merge patch with null).
    let (code, out, err) = multus_blocking("DEL", &team, bin.clone(), netns.clone(), conf.clone()).await;
    assert_eq!(code, 0, "DEL: {out} {err}");
    assert_eq!(status_of().await, None);
    let mut dels = delegate_calls(&bin)[2..].to_vec();
    dels.sort();
    assert_eq!(dels, [format!("DEL eth0 {}", multus("")), format!("DEL net1 {}", multus(""))]);

    // A NAD the pod names but nobody made: refused, naming it, nothing added.
    let pod2 = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web",
        "annotations": {"k8s.v1.cni.cncf.io/networks": "missing"}},
        "spec": {"containers": [{"name": "pause", "image": "registry.k8s.io/pause:3.10"}]}});
    envtest::delete_pod(&admin, &team, "web").await.expect("delete pod");
    envtest::create(&admin, Some(&team), pod2).await.expect("pod");
    let (code, out, _) = multus_blocking("ADD", &team, bin.clone(), netns.clone(), conf.clone()).await;
    assert_eq!(code, 1, "{out}");
    let msg = out["msg"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains(&format!("{team}/missing")), "{out}");
}

/// Stand-in: it answers 503 on demand, as an API server that is down; the real one cannot
/// be taken down and brought back without failing the other tests that share it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_source_without_the_api_deletes_from_the_cache_and_add_retries_later() {
    let standin = rust_ipam_e2e::kube_standin::KubeStandin::start().await.expect("stand-in");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    standin.kubeconfig(&kubeconfig, "default").expect("kubeconfig");
    let (bin, conf) = kube_source_conf(dir.path(), &kubeconfig);
    let nads = |ns: &str| format!("/apis/k8s.cni.cncf.io/v1/namespaces/{ns}/network-attachment-definitions");
    standin.put_raw(&nads("kube-system"), fake_nad("kube-system", "cluster"));
    standin.put_raw(&nads("team"), fake_nad("team", "fast"));
    standin.put_raw(
        "/api/v1/namespaces/team/pods",
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "team",
            "annotations": {"k8s.v1.cni.cncf.io/networks": "fast"}}}),
    );
    let netns = dir.path().to_path_buf();
    let (code, out, err) = multus_blocking("ADD", "team", bin.clone(), netns.clone(), conf.clone()).await;
    assert_eq!(code, 0, "ADD: {out} {err}");
    standin.set_down(true);
    let (code, out, err) = multus_blocking("DEL", "team", bin.clone(), netns.clone(), conf.clone()).await;
    assert_eq!(code, 0, "DEL without the API: {out} {err}");
    // Deleted at once (rustMultus.parallelNetworks), so in either order.
    let mut dels = delegate_calls(&bin)[2..].to_vec();
    dels.sort();
    assert_eq!(
        dels,
        [format!("DEL eth0 {}", multus_args("team", "")), format!("DEL net1 {}", multus_args("team", ""))]
    );
    assert!(err.contains("clearing k8s.v1.cni.cncf.io/network-status of team/web"), "warning: {err}");
    // ADD without the API: try again later, naming what failed.
    let (code, out, _) = multus_blocking("ADD", "team", bin.clone(), netns.clone(), conf.clone()).await;
    assert_eq!(code, 1);
    assert_eq!(out["code"], 11, "{out}");
    assert!(
        out["msg"].as_str().is_some_and(|m| m.starts_with("pod team/web: API server answered 503")),
        "{out}"
    );
}

/// As [`FAKE_NET`], but DEL of an interface fails while `fail-<ifname>` exists beside it.
const FLAKY_NET: &str = r#"#!/bin/sh
cat >/dev/null
d=$(dirname "$0")
if [ -e "$d/slow" ]; then echo "begin $CNI_COMMAND $CNI_IFNAME" >> "$d/calls.log"; sleep 0.5; fi
echo "$CNI_COMMAND $CNI_IFNAME" >> "$d/calls.log"
if [ "$CNI_COMMAND" = DEL ] && [ -e "$d/fail-$CNI_IFNAME" ]; then
  printf '{"cniVersion":"1.0.0","code":11,"msg":"cannot delete %s"}' "$CNI_IFNAME"; exit 1
fi
[ "$CNI_COMMAND" = ADD ] && printf '{"cniVersion":"1.0.0","ips":[{"address":"10.9.0.5/24"}]}'
exit 0
"#;

fn run_here(command: &str, conf: &Value, bin: &Path) -> (i32, Value) {
    let args = format!("K8S_POD_NAMESPACE={POD_NS};K8S_POD_NAME=flaky");
    let env = [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "cid-flaky"),
        ("CNI_NETNS", "/nonexistent/netns"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", bin.to_str().expect("utf-8 path")),
        ("CNI_ARGS", &args),
    ];
    let out = run_cni(&mut Command::new(multus_bin()), &env, &conf.to_string());
    (out.code, out.out)
}

/// A node of shell plugins (FLAKY_NET) in `dir`: the cluster network and NADs `a` and `b`,
/// all `flaky`, for a pod `flaky` in `POD_NS`; the config for it, with `extra` laid over it.
fn flaky_node(dir: &Path, extra: Value) -> (PathBuf, Value) {
    use std::os::unix::fs::PermissionsExt as _;
    let (bin, objects, confdir) = (dir.join("bin"), dir.join("objects"), dir.join("conf"));
    for d in [&bin, &objects, &confdir] {
        std::fs::create_dir(d).expect("mkdir");
    }
    std::fs::write(bin.join("flaky"), FLAKY_NET).expect("plugin");
    std::fs::set_permissions(bin.join("flaky"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::write(confdir.join("c.conf"), r#"{"cniVersion":"1.0.0","name":"cluster-net","type":"flaky"}"#)
        .expect("conf");
    for name in ["a", "b"] {
        let nad = json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": name, "namespace": POD_NS}, "spec": {"config": r#"{"cniVersion":"1.0.0","type":"flaky"}"#}});
        std::fs::write(objects.join(format!("nad-{name}.json")), nad.to_string()).expect("nad");
    }
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "flaky", "namespace": POD_NS,
        "annotations": {"k8s.v1.cni.cncf.io/networks": "a,b"}}});
    std::fs::write(objects.join("pod.json"), pod.to_string()).expect("pod");
    let mut conf = json!({"cniVersion": "1.0.0", "name": "m", "clusterNetwork": "cluster-net", "confDir": confdir,
        "cniDir": dir.join("cache"), "binDir": bin, "rustMultus": {"objectsDir": objects}});
    if let (Some(c), Some(e)) = (conf["rustMultus"].as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    (bin, conf)
}

fn calls_of(bin: &Path) -> Vec<String> {
    std::fs::read_to_string(bin.join("calls.log")).expect("log").lines().map(str::to_string).collect()
}

/// The networks of one ADD or DEL are taken at once: every delegate has begun before any
/// has answered (each takes 0.5 s). `parallelNetworks: false` takes them one after
/// another, as Multus: ADD in the pod's order, DEL in reverse.
#[test]
fn the_networks_of_a_pod_are_added_and_deleted_at_once_unless_configured_otherwise() {
    for parallel in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let extra = if parallel { json!({}) } else { json!({"parallelNetworks": false}) };
        let (bin, conf) = flaky_node(dir.path(), extra);
        std::fs::write(bin.join("slow"), "").expect("marker");
        assert_eq!(
            run_here("ADD", &conf, &bin),
            (0, json!({"cniVersion": "1.0.0", "ips": [{"address": "10.9.0.5/24"}]}))
        );
        assert!(dir.path().join("cache").join("cid-flaky").exists(), "the ADD is cached");
        assert_eq!(run_here("DEL", &conf, &bin), (0, Value::Null));
        let calls = calls_of(&bin);
        assert_eq!(calls.len(), 12, "{calls:?}");
        if parallel {
            for (phase, verb) in [(&calls[..6], "ADD"), (&calls[6..], "DEL")] {
                let begun = phase[..3].iter().filter(|c| c.starts_with(&format!("begin {verb}"))).count();
                assert_eq!(begun, 3, "every {verb} begins before one answers: {calls:?}");
            }
        } else {
            let one_by_one = |verb: &str, ifs: [&str; 3]| -> Vec<String> {
                ifs.iter().flat_map(|i| [format!("begin {verb} {i}"), format!("{verb} {i}")]).collect()
            };
            assert_eq!(calls[..6], one_by_one("ADD", ["eth0", "net1", "net2"]), "ADD in order");
            assert_eq!(calls[6..], one_by_one("DEL", ["net2", "net1", "eth0"]), "DEL in reverse");
        }
    }
}

#[test]
fn del_tries_every_delegate_and_reports_every_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (bin, conf) = flaky_node(dir.path(), json!({}));
    let cache = dir.path().join("cache");
    assert_eq!(
        run_here("ADD", &conf, &bin),
        (0, json!({"cniVersion": "1.0.0", "ips": [{"address": "10.9.0.5/24"}]}))
    );
    std::fs::write(bin.join("fail-eth0"), "").expect("marker");
    std::fs::write(bin.join("fail-net2"), "").expect("marker");
    let (code, out) = run_here("DEL", &conf, &bin);
    assert_eq!(code, 1);
    assert_eq!(
        out,
        json!({"cniVersion": "1.0.0", "code": 11, "msg": "error deleting 2 of 3 networks: network \"team/b\" (net2): cannot delete net2 / network \"cluster-net\" (eth0): cannot delete eth0"})
    );
    let calls = || calls_of(&bin);
    // ADD and DEL ran each network at once (parallelNetworks), in any order; the failures
    // are reported in reverse order all the same.
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(sorted(calls()[..3].to_vec()), ["ADD eth0", "ADD net1", "ADD net2"]);
    assert_eq!(sorted(calls()[3..].to_vec()), ["DEL eth0", "DEL net1", "DEL net2"]);
    assert!(cache.join("cid-flaky").exists(), "the cache stays for the runtime's retry");
    std::fs::remove_file(bin.join("fail-eth0")).expect("rm");
    std::fs::remove_file(bin.join("fail-net2")).expect("rm");
    assert_eq!(run_here("DEL", &conf, &bin), (0, Value::Null));
    assert_eq!(sorted(calls()[6..].to_vec()), ["DEL eth0", "DEL net1", "DEL net2"]);
    assert!(!cache.join("cid-flaky").exists());
}

/// DRA on a real kube-apiserver, the node's ServiceAccount reading: the test writes what a
/// DRA driver and the scheduler would (a ResourceSlice of the node's VFs with Multus' device
/// attributes, a ResourceClaim allocated two of them and a GPU), and a pod that uses the
/// claim asks for two NADs of the VFs' resource. Each delegate gets one allocated VF's
/// deviceID, in the claim's order; the GPU (no resource name) is no network's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_source_gives_networks_the_devices_of_the_pods_resource_claims() {
    let Some(env) = envtest::shared("kube_source_gives_networks_the_devices_of_the_pods_resource_claims")
    else {
        return;
    };
    let ns = env.namespace("dra").await.expect("namespace");
    let team = ns.name.clone();
    let admin = ns.admin_client().await.expect("admin client");
    let dir = tempfile::tempdir().expect("tempdir");
    let (bin, mut conf) = kube_source_conf(dir.path(), &ns.kubeconfig(envtest::NODE_ACCOUNT));
    // No kubelet here: the claims alone give the devices. The cluster network is this
    // namespace's (kube-system's is another test's).
    conf["rustMultus"] = json!({"podResourcesSocket": dir.path().join("no-kubelet.sock")});
    conf["clusterNetwork"] = json!(format!("{team}/cluster"));
    let devices = fixtures::dra_rail_claim(&admin, &team, "node-a").await.expect("claim and slice");
    envtest::create(&admin, Some(&team), fake_nad(&team, "cluster")).await.expect("NAD");
    for name in ["rail-a", "rail-b"] {
        let mut nad = fake_nad(&team, name);
        nad["metadata"]["annotations"] =
            json!({"k8s.v1.cni.cncf.io/resourceName": fixtures::DRA_VF_RESOURCE});
        envtest::create(&admin, Some(&team), nad).await.expect("NAD");
    }
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web",
        "annotations": {"k8s.v1.cni.cncf.io/networks": "rail-a,rail-b"}},
        "spec": {"resourceClaims": [{"name": "rails", "resourceClaimName": "rails"}],
            "containers": [{"name": "pause", "image": "registry.k8s.io/pause:3.10", "resources": {"claims": [{"name": "rails"}]}}]}});
    envtest::create(&admin, Some(&team), pod).await.expect("pod");

    let netns = dir.path().to_path_buf();
    let (code, out, err) = multus_blocking("ADD", &team, bin.clone(), netns.clone(), conf.clone()).await;
    assert_eq!(code, 0, "ADD: {out} {err}");
    let got = |ifname: &str| -> Value {
        serde_json::from_slice(&std::fs::read(bin.join(format!("ADD-{ifname}.json"))).expect("recorded"))
            .expect("JSON")
    };
    assert_eq!(
        (got("net1")["deviceID"].as_str(), got("net2")["deviceID"].as_str()),
        (Some(devices[0]), Some(devices[1]))
    );
    assert!(got("eth0").get("deviceID").is_none(), "the cluster network has no device");
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(admin.clone(), &team);
    let annotations = pods.get("web").await.expect("pod").metadata.annotations.unwrap_or_default();
    let status: Value =
        serde_json::from_str(&annotations["k8s.v1.cni.cncf.io/network-status"]).expect("status");
    assert_eq!(
        status[1]["device-info"],
        json!({"type": "pci", "version": "1.1.0", "pci": {"pci-address": devices[0]}})
    );
    let (code, out, err) = multus_blocking("DEL", &team, bin.clone(), netns, conf).await;
    assert_eq!(code, 0, "DEL: {out} {err}");
}

/// A pod naming a NAD that does not exist (a typo) fails its ADD, and the pod hears why: a
/// Warning event `NoNetworkFound` naming the NAD and its namespace, nothing attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_source_tells_the_pod_about_a_missing_nad() {
    let Some(env) = envtest::shared("kube_source_tells_the_pod_about_a_missing_nad") else { return };
    let ns = env.namespace("typo").await.expect("namespace");
    let team = ns.name.clone();
    let admin = ns.admin_client().await.expect("admin client");
    let dir = tempfile::tempdir().expect("tempdir");
    let (bin, mut conf) = kube_source_conf(dir.path(), &ns.kubeconfig(envtest::NODE_ACCOUNT));
    conf["clusterNetwork"] = json!(format!("{team}/cluster"));
    envtest::create(&admin, Some(&team), fake_nad(&team, "cluster")).await.expect("NAD");
    envtest::create(&admin, Some(&team), fake_nad(&team, "fast")).await.expect("NAD");
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web",
        "annotations": {"k8s.v1.cni.cncf.io/networks": "fsat"}},
        "spec": {"containers": [{"name": "pause", "image": "registry.k8s.io/pause:3.10"}]}});
    let stored = envtest::create(&admin, Some(&team), pod).await.expect("pod");
    let (code, out, err) = multus_blocking("ADD", &team, bin.clone(), dir.path().to_path_buf(), conf).await;
    let msg = format!(
        "NetworkAttachmentDefinition {team}/fsat not found (networks are looked up in the pod's namespace unless one is given)"
    );
    assert_eq!((code, out["code"].as_u64(), out["msg"].as_str()), (1, Some(7), Some(msg.as_str())), "{err}");
    assert!(!bin.join("calls.log").exists(), "nothing was attached");
    let events = envtest::list(&admin, Some(&team), "v1", "Event").await.expect("events");
    fn s(v: &Value) -> &str {
        v.as_str().unwrap_or_default()
    }
    let seen: Vec<(&str, &str, &str, &str)> = events
        .iter()
        .map(|e| (s(&e["type"]), s(&e["reason"]), s(&e["message"]), s(&e["involvedObject"]["uid"])))
        .collect();
    let uid = stored["metadata"]["uid"].as_str().expect("uid");
    assert_eq!(seen, [("Warning", "NoNetworkFound", msg.as_str(), uid)]);
}
