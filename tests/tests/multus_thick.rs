//! rust-multus in thick mode end to end: `rust-multus-daemon` on the real API server
//! (tests/src/envtest.rs, as the node ServiceAccount under deploy/'s RBAC, the thick
//! overlay's list/watch included), `rust-multus-shim` run as a runtime runs a plugin, pods
//! as network namespaces this test makes. The cluster network is a conflist (Debian's
//! bridge + host-local, then tuning), the NADs `rust-macvlan` + `rust-ipam` against a real
//! server, on veth masters in the host namespace (the daemon reaches the API server on
//! the host's loopback, so it runs there).
//!
//! Needs root, iproute2 and /usr/lib/cni, and the API server; without them SKIP.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rust_ipam_e2e::envtest::{self, TestNamespace};
use rust_ipam_e2e::netns::{CNI_DIR, Netns, addresses, ip, skip};
use rust_ipam_e2e::{CniOutput, ServerOptions, ServerProcess, fixtures, free_port, run_cni, workspace_bin};
use rust_ipam_proto::v1 as pb;
use serde_json::{Value, json};

const PLUGINS: &[&str] = &["bridge", "host-local", "tuning"];

/// A delegate that takes `SLOW_SECONDS` (file beside it, default 0) on ADD and logs when
/// each call starts and ends, so a test sees how many ran at once; the config it was given
/// is kept beside it as `<command>-<ifname>.json`.
const SLOW_NET: &str = r#"#!/bin/sh
d=$(dirname "$0")
cat >"$d/$CNI_COMMAND-$CNI_IFNAME.json"
echo "start $(date +%s.%N) $CNI_COMMAND $CNI_CONTAINERID" >> "$d/slow.log"
[ "$CNI_COMMAND" = ADD ] && sleep "$(cat "$d/SLOW_SECONDS" 2>/dev/null || echo 0)"
echo "end $(date +%s.%N) $CNI_COMMAND $CNI_CONTAINERID" >> "$d/slow.log"
[ "$CNI_COMMAND" = ADD ] && printf '{"cniVersion":"1.0.0","ips":[{"address":"10.77.0.5/24"}]}'
exit 0
"#;

/// Links made in the host namespace, deleted however the test ends.
struct HostLinks(Vec<String>);

impl Drop for HostLinks {
    fn drop(&mut self) {
        for l in &self.0 {
            let _ = Command::new("ip").args(["link", "del", l]).output();
        }
    }
}

/// One thick node: its directories, the daemon, the host links.
struct Thick {
    dir: tempfile::TempDir,
    ns: TestNamespace,
    node: String,
    socket: PathBuf,
    metrics: u16,
    daemon: Option<Child>,
    extra_args: Vec<String>,
    /// Whether the shim's CNI_PATH holds our plugin binaries (`rust-ipam`, `rust-macvlan`)
    /// beside the reference plugins; without them only the daemon's in-process answers
    /// can serve those types.
    ours_on_path: bool,
    _links: HostLinks,
}

impl Thick {
    /// A node named after `tag` with `masters` veth masters `<tag>m<i>` and the bridge
    /// `<tag>br`; the daemon is not started yet.
    async fn new(env: &'static envtest::Envtest, tag: &str, masters: usize) -> Thick {
        let ns = env.namespace(&format!("thick-{tag}")).await.expect("namespace");
        let dir = tempfile::tempdir().expect("tempdir");
        for d in ["conf", "cache", "host-local", "bin"] {
            std::fs::create_dir(dir.path().join(d)).expect("mkdir");
        }
        // Each node's bridge in the host namespace gets its own subnet.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(120);
        let subnet = format!("198.18.{}.0/24", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let mut links = vec![format!("{tag}br")];
        for i in 0..masters {
            let m = format!("{tag}m{i}");
            ip(&["link", "add", &m, "type", "veth", "peer", "name", &format!("{m}p")]);
            ip(&["link", "set", &m, "up"]);
            ip(&["link", "set", &format!("{m}p"), "up"]);
            links.push(m);
        }
        // The conflist of Multus #1449: IPAM in the first plugin, another plugin after it.
        let cluster = json!({"cniVersion": "1.0.0", "name": "cluster-net", "plugins": [
            {"type": "bridge", "bridge": format!("{tag}br"), "isGateway": true,
             "ipam": {"type": "host-local", "subnet": subnet, "dataDir": dir.path().join("host-local")}},
            {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.arp_notify": "1"}}]});
        std::fs::write(dir.path().join("conf/10-cluster.conflist"), cluster.to_string()).expect("conflist");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(dir.path().join("bin/slow-net"), SLOW_NET).expect("plugin");
        std::fs::set_permissions(dir.path().join("bin/slow-net"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        // No kubelet here: devices come from DRA claims alone.
        let base = json!({"cniVersion": "1.0.0", "name": "multus-cni-network", "type": "rust-multus",
            "clusterNetwork": "cluster-net", "confDir": dir.path().join("conf"),
            "cniDir": dir.path().join("cache"), "binDir": dir.path().join("bin"),
            "rustMultus": {"podResourcesSocket": dir.path().join("no-kubelet.sock")}});
        std::fs::write(dir.path().join("daemon.json"), base.to_string()).expect("config");
        let socket = dir.path().join("run/daemon.sock");
        Thick {
            node: format!("thick-{tag}-node"),
            ns,
            socket,
            metrics: free_port().expect("port"),
            daemon: None,
            extra_args: Vec::new(),
            ours_on_path: true,
            dir,
            _links: HostLinks(links),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Starts the daemon and waits until it is ready (its caches listed).
    fn start(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.path("daemon.log")).expect("log");
        let child = Command::new(workspace_bin("rust-multus-daemon").expect("daemon binary"))
            .arg(format!("--kubeconfig={}", self.ns.kubeconfig(envtest::NODE_ACCOUNT).display()))
            .arg(format!("--node-name={}", self.node))
            .arg(format!("--socket={}", self.socket.display()))
            .arg(format!("--config={}", self.path("daemon.json").display()))
            .arg(format!("--metrics-listen=127.0.0.1:{}", self.metrics))
            .args(&self.extra_args)
            .env("NODE_NAME", &self.node)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting rust-multus-daemon");
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.http("/readyz").0 != 200 {
            assert!(Instant::now() < deadline, "daemon not ready; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    /// A GET of the daemon's HTTP endpoint: status and body (0 when nothing answers).
    fn http(&self, path: &str) -> (u16, String) {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.metrics)) else { return (0, String::new()) };
        let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
    }

    /// The value of metric line `name` (labels included), 0 when absent.
    fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.http("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
            .unwrap_or(0.0)
    }

    /// The node's CNI config: only the shim's keys; the daemon's config has the rest.
    fn shim_conf(&self) -> Value {
        json!({"cniVersion": "1.0.0", "name": "multus-cni-network", "type": "rust-multus-shim",
            "daemonSocket": self.socket, "daemonTimeoutSeconds": 30})
    }

    /// Runs the shim as the runtime would for pod `pod` of this namespace in netns `netns`.
    fn shim(&self, command: &str, pod: &str, netns: &str) -> CniOutput {
        let ours = workspace_bin("rust-ipam").expect("rust-ipam");
        workspace_bin("rust-macvlan").expect("rust-macvlan");
        let path = match self.ours_on_path {
            true => format!("{}:{CNI_DIR}", ours.parent().expect("dir").display()),
            false => CNI_DIR.to_string(),
        };
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID=cid-{pod}",
            self.ns.name
        );
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", &format!("cid-{pod}")),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", &path),
            ("CNI_ARGS", &args),
        ];
        let shim = workspace_bin("rust-multus-shim").expect("shim binary");
        run_cni(&mut Command::new(shim), &env, &self.shim_conf().to_string())
    }

    /// Creates NAD `name` with `config` in this namespace.
    async fn nad(&self, name: &str, config: Value) {
        let nad = json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": name}, "spec": {"config": config.to_string()}});
        envtest::create(&self.ns.admin_client().await.expect("admin"), Some(&self.ns.name), nad)
            .await
            .expect("NAD");
    }

    /// Creates pod `name` on this node asking for `networks`.
    async fn pod(&self, name: &str, networks: &str) -> String {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name,
            "annotations": {"k8s.v1.cni.cncf.io/networks": networks}},
            "spec": {"nodeName": self.node, "containers": [{"name": "pause", "image": "localhost/pause:3.10.2"}]}});
        let admin = self.ns.admin_client().await.expect("admin");
        let stored = envtest::create(&admin, Some(&self.ns.name), pod).await.expect("pod");
        stored["metadata"]["uid"].as_str().expect("uid").to_string()
    }

    async fn network_status(&self, pod: &str) -> Option<Value> {
        let admin = self.ns.admin_client().await.expect("admin");
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(admin, &self.ns.name);
        let p = pods.get(pod).await.expect("get pod");
        let ann = p.metadata.annotations.unwrap_or_default();
        ann.get("k8s.v1.cni.cncf.io/network-status").map(|s| serde_json::from_str(s).expect("status JSON"))
    }

    /// host-local's lease files of the cluster network.
    fn host_local_leases(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.path("host-local/cluster-net"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
            .collect();
        out.sort();
        out
    }

    /// Waits until the daemon's cache holds `n` pods.
    fn wait_cached_pods(&self, n: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.metric("rust_multus_cache_objects{kind=\"pods\"}") != n {
            assert!(Instant::now() < deadline, "the cache never held {n} pods:\n{}", self.http("/metrics").1);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Thick {
    fn drop(&mut self) {
        self.kill();
    }
}

fn needs(test: &str) -> Option<&'static envtest::Envtest> {
    if skip(test, PLUGINS) {
        return None;
    }
    envtest::shared(test)
}

fn strip(a: &str) -> String {
    a.split('/').next().unwrap_or_default().to_string()
}

/// A pod with eight rail NADs through shim and daemon: the addresses in its namespace are
/// what the network-status says and what the server holds; the ADD read nothing from the
/// API (the watch cache had the pod and NADs) and wrote the status once. DEL through the
/// daemon frees every delegate's IPAM, the conflist cluster network's host-local lease
/// included (what Multus 4.3's thick daemon leaks, #1449), and every rust-ipam lease.
/// Neither `rust-macvlan` nor `rust-ipam` is on the CNI path: the daemon answers both in
/// process (its default), which is what this test runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_rails_through_the_daemon_and_del_frees_every_ipam() {
    let test = "eight_rails_through_the_daemon_and_del_frees_every_ipam";
    let Some(env) = needs(test) else { return };
    let mut node = Thick::new(env, "tk8", 8).await;
    node.ours_on_path = false;
    let sock = node.path("ipam.sock");
    let opts = ServerOptions { unix_socket: Some(sock.clone()), ..ServerOptions::default() };
    let server = ServerProcess::start_with(&node.path("data"), &opts).await.expect("server");
    let endpoint = format!("unix://{}", sock.display());
    for r in 0..8 {
        node.nad(
            &format!("rail{r}"),
            json!({"cniVersion": "1.0.0", "name": format!("rail{r}"),
            "type": "rust-macvlan", "master": format!("tk8m{r}"), "mode": "bridge",
            "ipam": {"type": "rust-ipam", "range": format!("198.19.{}.0/24", 10 + r), "server": endpoint}}),
        )
        .await;
    }
    let networks: Vec<String> = (0..8).map(|r| format!("rail{r}")).collect();
    node.pod("gpu", &networks.join(",")).await;
    node.start();
    node.wait_cached_pods(1.0);
    // Every namespace's NADs: the other tests of this binary make theirs too.
    assert!(node.metric("rust_multus_cache_objects{kind=\"nads\"}") >= 8.0, "{}", node.http("/metrics").1);
    let gets_before = node.metric("rust_multus_api_calls{kind=\"get\"}");
    let pod_ns = Netns::new(&["tk8-gpu"]);

    let out = tokio::task::block_in_place(|| node.shim("ADD", "gpu", &pod_ns.path(0)));
    assert_eq!(out.code, 0, "ADD: {} {}\n{}", out.out, out.stderr, node.log());
    let eth0 = strip(out.out["ips"][0]["address"].as_str().expect("eth0 address"));
    assert!(eth0.starts_with("198.18.1"), "{}", out.out);
    assert_eq!(node.metric("rust_multus_api_calls{kind=\"get\"}"), gets_before, "the ADD read from the API");
    assert_eq!(node.metric("rust_multus_api_calls{kind=\"patch\"}"), 1.0);
    assert_eq!(node.metric("rust_multus_calls_total{verb=\"ADD\",result=\"ok\"}"), 1.0);

    let status = node.network_status("gpu").await.expect("network-status written");
    let status = status.as_array().expect("list").clone();
    assert_eq!(status.len(), 9, "{status:?}");
    assert_eq!(status[0]["interface"], "eth0");
    assert_eq!(status[0]["ips"], json!([eth0]));
    assert_eq!(
        addresses(pod_ns.name(0), "eth0").iter().map(|a| strip(a)).collect::<Vec<_>>(),
        vec![eth0.clone()]
    );
    let mut held = Vec::new();
    for r in 0..8 {
        let e = &status[r + 1];
        assert_eq!(e["name"], format!("{}/rail{r}", node.ns.name));
        assert_eq!(e["interface"], format!("net{}", r + 1));
        let want = e["ips"][0].as_str().expect("address").to_string();
        assert!(want.starts_with(&format!("198.19.{}.", 10 + r)), "{e}");
        let got: Vec<String> =
            addresses(pod_ns.name(0), &format!("net{}", r + 1)).iter().map(|a| strip(a)).collect();
        assert_eq!(got, vec![want.clone()], "net{}", r + 1);
        held.push(want);
    }
    let mut leased: Vec<String> = fixtures::leases(&server.endpoint, pb::ListLeasesRequest::default())
        .await
        .into_iter()
        .map(|l| l.address)
        .collect();
    leased.sort();
    held.sort();
    assert_eq!(leased, held, "the server holds the pod's eight addresses");
    assert_eq!(node.host_local_leases(), vec![eth0.clone()]);

    let out = tokio::task::block_in_place(|| node.shim("CHECK", "gpu", &pod_ns.path(0)));
    assert_eq!(out.code, 0, "CHECK: {}", out.out);

    let out = tokio::task::block_in_place(|| node.shim("DEL", "gpu", &pod_ns.path(0)));
    assert_eq!(out.code, 0, "DEL: {} {}", out.out, out.stderr);
    assert_eq!(node.host_local_leases(), Vec::<String>::new(), "the cluster network's lease is freed");
    assert!(fixtures::leases(&server.endpoint, pb::ListLeasesRequest::default()).await.is_empty());
    assert!(addresses(pod_ns.name(0), "net1").is_empty(), "net1 is gone");
    assert_eq!(node.network_status("gpu").await, None, "network-status cleared");
    // Again: DEL is idempotent.
    let out = tokio::task::block_in_place(|| node.shim("DEL", "gpu", &pod_ns.path(0)));
    assert_eq!(out.code, 0, "second DEL: {}", out.out);
}

/// DRA through the daemon: the pod's ResourceClaim (written as a DRA driver and the
/// scheduler would) gives its two networks of the VFs' resource one allocated VF each, in
/// the claim's order: `deviceID` in each delegate's config and `device-info` in the
/// network-status. The claims come from the cached pod (its spec), so the daemon must watch
/// pods whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dra_devices_through_the_daemon() {
    let test = "dra_devices_through_the_daemon";
    let Some(env) = needs(test) else { return };
    let mut node = Thick::new(env, "tkd", 0).await;
    let admin = node.ns.admin_client().await.expect("admin");
    let team = node.ns.name.clone();
    let devices = fixtures::dra_rail_claim(&admin, &team, &node.node).await.expect("claim and slice");
    for name in ["rail-a", "rail-b"] {
        let nad = json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": name, "annotations": {"k8s.v1.cni.cncf.io/resourceName": fixtures::DRA_VF_RESOURCE}},
            "spec": {"config": json!({"cniVersion": "1.0.0", "name": name, "type": "slow-net"}).to_string()}});
        envtest::create(&admin, Some(&team), nad).await.expect("NAD");
    }
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "dra",
        "annotations": {"k8s.v1.cni.cncf.io/networks": "rail-a,rail-b"}},
        "spec": {"nodeName": node.node, "resourceClaims": [{"name": "rails", "resourceClaimName": "rails"}],
            "containers": [{"name": "pause", "image": "localhost/pause:3.10.2", "resources": {"claims": [{"name": "rails"}]}}]}});
    envtest::create(&admin, Some(&team), pod).await.expect("pod");
    node.start();
    node.wait_cached_pods(1.0);
    let gets_before = node.metric("rust_multus_api_calls{kind=\"get\"}");
    let pod_ns = Netns::new(&["tkd-a"]);

    let out = tokio::task::block_in_place(|| node.shim("ADD", "dra", &pod_ns.path(0)));
    assert_eq!(out.code, 0, "ADD: {} {}\n{}", out.out, out.stderr, node.log());
    assert_eq!(
        (
            recorded(&node, "ADD", "net1")["deviceID"].as_str(),
            recorded(&node, "ADD", "net2")["deviceID"].as_str()
        ),
        (Some(devices[0]), Some(devices[1]))
    );
    assert_eq!(
        node.metric("rust_multus_api_calls{kind=\"get\"}"),
        gets_before,
        "the pod came from the cache"
    );
    let status = node.network_status("dra").await.expect("network-status written");
    assert_eq!(
        status[1]["device-info"],
        json!({"type": "pci", "version": "1.1.0", "pci": {"pci-address": devices[0]}})
    );
    assert_eq!(
        status[2]["device-info"],
        json!({"type": "pci", "version": "1.1.0", "pci": {"pci-address": devices[1]}})
    );
    // The daemon writes the pod's events after answering: one AddedInterface per interface.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = envtest::list(&admin, Some(&team), "v1", "Event").await.expect("events");
        let added = events
            .iter()
            .filter(|e| e["involvedObject"]["name"] == "dra" && e["reason"] == "AddedInterface")
            .count();
        if added == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{added} AddedInterface events, not 3: {events:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = tokio::task::block_in_place(|| node.shim("DEL", "dra", &pod_ns.path(0)));
    assert_eq!(out.code, 0, "DEL: {}", out.out);
    assert_eq!(
        recorded(&node, "DEL", "net1")["deviceID"].as_str(),
        Some(devices[0]),
        "DEL gets the same device"
    );
}

/// The config `slow-net` was last given for `command` of `ifname`.
fn recorded(node: &Thick, command: &str, ifname: &str) -> Value {
    let file = node.path(&format!("bin/{command}-{ifname}.json"));
    serde_json::from_slice(&std::fs::read(&file).expect("recorded")).expect("JSON")
}

/// `--exec-ipam`: the daemon starts `rust-ipam` as a process, found on the CNI path like any
/// other plugin; with it missing there, the ADD fails naming it and undoes the link (the
/// in-process `rust-macvlan` made it). With it on the path, the same ADD works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_ipam_starts_rust_ipam_from_the_cni_path() {
    let test = "exec_ipam_starts_rust_ipam_from_the_cni_path";
    let Some(env) = needs(test) else { return };
    let mut node = Thick::new(env, "tkx", 1).await;
    node.extra_args.push("--exec-ipam".into());
    let sock = node.path("ipam.sock");
    let opts = ServerOptions { unix_socket: Some(sock.clone()), ..ServerOptions::default() };
    let server = ServerProcess::start_with(&node.path("data"), &opts).await.expect("server");
    node.nad(
        "rail",
        json!({"cniVersion": "1.0.0", "name": "rail", "type": "rust-macvlan", "master": "tkxm0",
        "ipam": {"type": "rust-ipam", "range": "198.19.30.0/24", "server": format!("unix://{}", sock.display())}}),
    )
    .await;
    node.pod("x", "rail").await;
    node.start();
    node.wait_cached_pods(1.0);
    let pod_ns = Netns::new(&["tkx-a"]);

    node.ours_on_path = false;
    let out = tokio::task::block_in_place(|| node.shim("ADD", "x", &pod_ns.path(0)));
    assert_eq!(out.code, 1, "{}", out.out);
    let msg = out.out["msg"].as_str().expect("msg");
    assert!(msg.contains("plugin \"rust-ipam\" not found in CNI_PATH"), "{}", out.out);
    assert!(addresses(pod_ns.name(0), "net1").is_empty(), "the failed ADD left net1");
    assert!(fixtures::leases(&server.endpoint, pb::ListLeasesRequest::default()).await.is_empty());

    node.ours_on_path = true;
    let out = tokio::task::block_in_place(|| node.shim("ADD", "x", &pod_ns.path(0)));
    assert_eq!(out.code, 0, "{} {}", out.out, node.log());
    let leases = fixtures::leases(&server.endpoint, pb::ListLeasesRequest::default()).await;
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(
        addresses(pod_ns.name(0), "net1").iter().map(|a| strip(a)).collect::<Vec<_>>(),
        vec![leases[0].address.clone()]
    );
    let out = tokio::task::block_in_place(|| node.shim("DEL", "x", &pod_ns.path(0)));
    assert_eq!(out.code, 0, "{}", out.out);
    assert!(fixtures::leases(&server.endpoint, pb::ListLeasesRequest::default()).await.is_empty());
}

/// An ADD for a pod the cache lacks asks the API server: one that does not exist is error
/// 11 naming it, one created the moment before the ADD is attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_add_for_a_pod_the_cache_lacks_asks_the_api_server() {
    let test = "an_add_for_a_pod_the_cache_lacks_asks_the_api_server";
    let Some(env) = needs(test) else { return };
    let mut node = Thick::new(env, "tkn", 0).await;
    node.nad("slow", json!({"cniVersion": "1.0.0", "name": "slow", "type": "slow-net"})).await;
    node.start();
    let pod_ns = Netns::new(&["tkn-a", "tkn-b"]);
    let out = tokio::task::block_in_place(|| node.shim("ADD", "ghost", &pod_ns.path(1)));
    assert_eq!(out.code, 1, "{}", out.out);
    assert_eq!(out.out["code"], 11, "{}", out.out);
    assert_eq!(out.out["msg"], format!("pod {}/ghost not found", node.ns.name));
    assert!(node.metric("rust_multus_api_calls{kind=\"get\"}") >= 1.0, "{}", node.http("/metrics").1);
    node.pod("fresh", "slow").await;
    let out = tokio::task::block_in_place(|| node.shim("ADD", "fresh", &pod_ns.path(0)));
    assert_eq!(out.code, 0, "{} {}", out.out, node.log());
    let status = node.network_status("fresh").await.expect("status");
    assert_eq!(status[1]["name"], format!("{}/slow", node.ns.name));
    assert_eq!(status[1]["ips"], json!(["10.77.0.5"]));
    let out = tokio::task::block_in_place(|| node.shim("DEL", "fresh", &pod_ns.path(0)));
    assert_eq!(out.code, 0, "{}", out.out);
    assert!(node.host_local_leases().is_empty());
}

/// Starts `n` shim ADDs at once for pods `p0..` (each in its own namespace) on threads.
fn adds_at_once(node: &std::sync::Arc<Thick>, pods: &Netns) -> Vec<std::thread::JoinHandle<CniOutput>> {
    (0..pods.len())
        .map(|i| {
            let (node, netns) = (node.clone(), pods.path(i));
            std::thread::spawn(move || node.shim("ADD", &format!("p{i}"), &netns))
        })
        .collect()
}

/// (start, end) of each slow-net ADD the log holds.
fn slow_adds(bin: &Path) -> Vec<(f64, f64)> {
    let log = std::fs::read_to_string(bin.join("slow.log")).unwrap_or_default();
    let mut starts = std::collections::HashMap::new();
    let mut out = Vec::new();
    for l in log.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        if f.len() != 4 || f[2] != "ADD" {
            continue;
        }
        let t: f64 = f[1].parse().expect("time");
        match f[0] {
            "start" => {
                starts.insert(f[3].to_string(), t);
            }
            _ => out.push((starts[f[3]], t)),
        }
    }
    out
}

/// With `--max-calls 2`, six ADDs whose delegate takes 0.6 s run two at a time (never a
/// third at once) and all succeed; the metrics saw calls waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_the_limit_wait_for_a_slot() {
    let test = "calls_beyond_the_limit_wait_for_a_slot";
    let Some(env) = needs(test) else { return };
    let mut node = Thick::new(env, "tkc", 0).await;
    node.nad("slow", json!({"cniVersion": "1.0.0", "name": "slow", "type": "slow-net"})).await;
    std::fs::write(node.path("bin/SLOW_SECONDS"), "0.6").expect("write");
    for i in 0..6 {
        node.pod(&format!("p{i}"), "slow").await;
    }
    node.extra_args = vec!["--max-calls=2".into()];
    node.start();
    node.wait_cached_pods(6.0);
    let pods = Netns::new(&["tkc-0", "tkc-1", "tkc-2", "tkc-3", "tkc-4", "tkc-5"]);
    let node = std::sync::Arc::new(node);
    let started = Instant::now();
    let calls = adds_at_once(&node, &pods);
    let mut waiting_seen = 0.0f64;
    while calls.iter().any(|c| !c.is_finished()) {
        waiting_seen = waiting_seen.max(node.metric("rust_multus_calls_waiting"));
        assert!(node.metric("rust_multus_calls_in_flight") <= 2.0);
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in calls {
        let out = c.join().expect("thread");
        assert_eq!(out.code, 0, "{}", out.out);
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1800), "6 calls of 0.6 s two at a time took {took:?}");
    assert!(waiting_seen >= 1.0, "no call was seen waiting");
    let adds = slow_adds(&node.path("bin"));
    assert_eq!(adds.len(), 6, "{adds:?}");
    let most = adds.iter().map(|(s, _)| adds.iter().filter(|(s2, e2)| s2 <= s && s < e2).count()).max();
    assert_eq!(most, Some(2), "ADDs at once: {adds:?}");
    for i in 0..6 {
        let out = tokio::task::block_in_place(|| node.shim("DEL", &format!("p{i}"), &pods.path(i)));
        assert_eq!(out.code, 0, "{}", out.out);
    }
    assert!(node.host_local_leases().is_empty());
}

/// kill -9 of the daemon with four ADDs in flight, a new daemon a moment later: every
/// shim's call completes (the interrupted ADD undone by a DEL, then sent again), each pod
/// has one eth0 address, host-local holds exactly those four (nothing leaked by the
/// interrupted attempts), and the DELs free them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_with_calls_in_flight_is_ridden_out_by_the_shim() {
    let test = "a_daemon_killed_with_calls_in_flight_is_ridden_out_by_the_shim";
    let Some(env) = needs(test) else { return };
    let mut node = Thick::new(env, "tkr", 0).await;
    node.nad("slow", json!({"cniVersion": "1.0.0", "name": "slow", "type": "slow-net"})).await;
    std::fs::write(node.path("bin/SLOW_SECONDS"), "1.5").expect("write");
    for i in 0..4 {
        node.pod(&format!("p{i}"), "slow").await;
    }
    node.start();
    node.wait_cached_pods(4.0);
    let pods = Netns::new(&["tkr-0", "tkr-1", "tkr-2", "tkr-3"]);
    let node = std::sync::Arc::new(std::sync::Mutex::new(node));
    let shared = {
        // The shim side only reads the node's paths: a snapshot without the daemon handle.
        let n = node.lock().expect("lock");
        std::sync::Arc::new(Shim { ns: n.ns.name.clone(), conf: n.shim_conf() })
    };
    let calls: Vec<_> = (0..4)
        .map(|i| {
            let (s, netns) = (shared.clone(), pods.path(i));
            std::thread::spawn(move || s.call("ADD", &format!("p{i}"), &netns))
        })
        .collect();
    // Every ADD is inside slow-net (eth0 made, lease taken) when the daemon dies.
    let bin = node.lock().expect("lock").path("bin");
    let deadline = Instant::now() + Duration::from_secs(20);
    while slow_adds_started(&bin) < 4 {
        assert!(Instant::now() < deadline, "the ADDs never reached slow-net");
        std::thread::sleep(Duration::from_millis(20));
    }
    {
        let mut n = node.lock().expect("lock");
        n.kill();
        assert!(n.socket.exists(), "kill -9 leaves the socket file behind");
        std::thread::sleep(Duration::from_millis(300));
        n.start();
    }
    for c in calls {
        let out = c.join().expect("thread");
        assert_eq!(out.code, 0, "ADD across the restart: {} {}", out.out, out.stderr);
    }
    let n = node.lock().expect("lock");
    let mut eth0s = Vec::new();
    for i in 0..4 {
        let a = addresses(pods.name(i), "eth0");
        assert_eq!(a.len(), 1, "p{i}: {a:?}");
        eth0s.push(strip(&a[0]));
    }
    eth0s.sort();
    let mut leases = n.host_local_leases();
    leases.sort();
    assert_eq!(leases, eth0s, "host-local holds exactly the pods' addresses");
    for i in 0..4 {
        let out = shared.call("DEL", &format!("p{i}"), &pods.path(i));
        assert_eq!(out.code, 0, "{}", out.out);
    }
    assert!(n.host_local_leases().is_empty(), "{:?}", n.host_local_leases());
}

fn slow_adds_started(bin: &Path) -> usize {
    std::fs::read_to_string(bin.join("slow.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("start ") && l.contains(" ADD "))
        .count()
}

/// What a shim call needs, without the daemon's handle (which the test kills).
struct Shim {
    ns: String,
    conf: Value,
}

impl Shim {
    fn call(&self, command: &str, pod: &str, netns: &str) -> CniOutput {
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID=cid-{pod}",
            self.ns
        );
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", &format!("cid-{pod}")),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", CNI_DIR),
            ("CNI_ARGS", &args),
        ];
        let shim = workspace_bin("rust-multus-shim").expect("shim binary");
        run_cni(&mut Command::new(shim), &env, &self.conf.to_string())
    }
}

/// SIGTERM with two ADDs in flight: the daemon removes its socket at once, finishes both
/// (each ADD runs once: nothing undone, nothing sent again) and exits; a new daemon binds
/// the socket meanwhile and answers the next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_calls_in_flight() {
    let test = "sigterm_drains_the_calls_in_flight";
    let Some(env) = needs(test) else { return };
    let mut node = Thick::new(env, "tkt", 0).await;
    node.nad("slow", json!({"cniVersion": "1.0.0", "name": "slow", "type": "slow-net"})).await;
    std::fs::write(node.path("bin/SLOW_SECONDS"), "1.5").expect("write");
    for i in 0..3 {
        node.pod(&format!("p{i}"), "slow").await;
    }
    node.start();
    node.wait_cached_pods(3.0);
    let pods = Netns::new(&["tkt-0", "tkt-1", "tkt-2"]);
    let shim = std::sync::Arc::new(Shim { ns: node.ns.name.clone(), conf: node.shim_conf() });
    let calls: Vec<_> = (0..2)
        .map(|i| {
            let (s, netns) = (shim.clone(), pods.path(i));
            std::thread::spawn(move || s.call("ADD", &format!("p{i}"), &netns))
        })
        .collect();
    let bin = node.path("bin");
    let deadline = Instant::now() + Duration::from_secs(20);
    while slow_adds_started(&bin) < 2 {
        assert!(Instant::now() < deadline, "the ADDs never reached slow-net");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut old = node.daemon.take().expect("daemon");
    let status = Command::new("kill").args(["-TERM", &old.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(1);
    while node.socket.exists() {
        assert!(Instant::now() < deadline, "the socket is still there after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(old.try_wait().expect("wait"), None, "the daemon exited with calls in flight");
    // The old daemon still holds its metrics port while it drains.
    node.metrics = free_port().expect("port");
    node.start();
    for c in calls {
        let out = c.join().expect("thread");
        assert_eq!(out.code, 0, "ADD during the drain: {} {}", out.out, out.stderr);
    }
    assert!(old.wait().expect("wait").success(), "the old daemon exits cleanly");
    let log = std::fs::read_to_string(bin.join("slow.log")).expect("log");
    assert_eq!(log.lines().filter(|l| l.starts_with("start ")).count(), 2, "each ADD ran once:\n{log}");
    let out = shim.call("ADD", "p2", &pods.path(2));
    assert_eq!(out.code, 0, "ADD on the new daemon: {}", out.out);
    for i in 0..3 {
        let out = shim.call("DEL", &format!("p{i}"), &pods.path(i));
        assert_eq!(out.code, 0, "{}", out.out);
    }
    assert!(node.host_local_leases().is_empty());
}
