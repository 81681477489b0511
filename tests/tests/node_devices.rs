//! Device-plugin networks on the real node (tests/src/node.rs): a device plugin in the
//! tests (tests/src/device_plugin.rs) registers two fake VFs on each of eight rails
//! (`example.com/rail0` .. `rail7`, PCI-shaped IDs) with the kubelet; a pod asks for one of
//! each in `resources.limits` and for eight NADs, each annotated with its rail's resource.
//! rust-multus (thin, and the thick daemon) reads the kubelet's PodResources API and hands
//! each delegate its device.
//!
//! The delegate is `rust-macvlan` behind a recording wrapper (a shell script that keeps the
//! config it was given, then runs the real plugin): the links are real, and the test sees
//! the `deviceID` every delegate got. There is no SR-IOV hardware here, so no VF is moved.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use kubelet_api::podresources as pr;
use rust_ipam_e2e::ServerProcess;
use rust_ipam_e2e::device_plugin::{FakeDevicePlugin, vf_ids};
use rust_ipam_e2e::envtest::{self, TestNamespace};
use rust_ipam_e2e::node::{self, NODE_NAME, Node};
use serde_json::{Value, json};

const RAILS: usize = 8;

/// Installs a recording wrapper `record-<tag>` (its plugin type) in the node's bin dir: it
/// writes its stdin to `<dir>/<COMMAND>-<CONTAINERID>-<IFNAME>.json` and runs rust-macvlan
/// on it.
fn install_recorder(node: &Node, dir: &Path, tag: &str) -> String {
    let script = format!(
        "#!/bin/sh\ntee \"{}/$CNI_COMMAND-$CNI_CONTAINERID-$CNI_IFNAME.json\" | \"{}\"\n",
        dir.display(),
        node.bin_dir.join("rust-macvlan").display()
    );
    let name = format!("record-{tag}");
    let path = node.bin_dir.join(&name);
    std::fs::write(&path, script).expect("recorder");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    name
}

/// What the recorder kept of `command` for `interface` of sandbox `sandbox`.
fn recorded(dir: &Path, command: &str, sandbox: &str, interface: &str) -> Value {
    let path = dir.join(format!("{command}-{sandbox}-{interface}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("recorded config")
}

/// A NAD `name` of resource `resource` (annotation), on host link `master`, through the
/// recorder `plugin`, with rust-ipam giving addresses of `range` from `server`.
struct Rail<'a> {
    name: &'a str,
    resource: &'a str,
    plugin: &'a str,
    master: &'a str,
    range: &'a str,
    server: &'a str,
    caps: Value,
}

async fn rail_nad(ns: &TestNamespace, rail: Rail<'_>) {
    let Rail { name, resource, plugin, master, range, server, caps } = rail;
    let config = json!({"cniVersion": "1.0.0", "type": plugin, "master": master, "mode": "bridge",
        "capabilities": caps, "ipam": node::rust_ipam(range, server)});
    let annotations = json!({"k8s.v1.cni.cncf.io/resourceName": resource});
    node::create_nad(ns, name, annotations, config).await.expect("NAD");
}

/// Waits until the kubelet reports `count` of every rail resource as allocatable.
async fn wait_allocatable(node: &Node, count: usize) {
    let client = node.envtest.admin_client().await.expect("client");
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = nodes.get(NODE_NAME).await.expect("node");
        let alloc = n.status.and_then(|s| s.allocatable).unwrap_or_default();
        let ready = (0..RAILS)
            .all(|r| alloc.get(&format!("example.com/rail{r}")).is_some_and(|q| q.0 == count.to_string()));
        if ready {
            return;
        }
        assert!(Instant::now() < deadline, "the rails are not allocatable on the node: {alloc:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The devices the kubelet gave pod `ns/name`, by resource, from its PodResources API.
async fn kubelet_devices(node: &Node, ns: &str, name: &str) -> BTreeMap<String, Vec<String>> {
    let socket = node::pod_resources_socket(&node.dir);
    let ch = kubelet_api::connect(&socket, Duration::from_secs(5)).await.expect("PodResources socket");
    let list = pr::pod_resources_lister_client::PodResourcesListerClient::new(ch)
        .list(pr::ListPodResourcesRequest {})
        .await
        .expect("List")
        .into_inner();
    let pod =
        list.pod_resources.iter().find(|p| p.namespace == ns && p.name == name).expect("the pod is listed");
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in &pod.containers {
        for d in &c.devices {
            out.entry(d.resource_name.clone()).or_default().extend(d.device_ids.iter().cloned());
        }
    }
    out
}

/// The node's mode (thin or thick) is the node's, not a test's: the tests of this binary
/// take turns.
static NODE_MODE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Eight rails, eight device IDs per pod, end to end, through thin rust-multus and then
/// through the thick daemon: each delegate's config has the device the kubelet gave the
/// pod for its rail (`deviceID`, `pciBusID`, and `runtimeConfig.deviceID` where the NAD
/// declares the capability), the network-status lists it as the device's PCI address, no
/// device is given twice, and DEL carries the same device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_rails_get_the_kubelets_eight_devices_thin_and_thick() {
    let Some(node) = Node::shared("eight_rails_get_the_kubelets_eight_devices_thin_and_thick") else {
        return;
    };
    let _turn = NODE_MODE.lock().await;
    let mut plugins = Vec::new();
    for r in 0..RAILS {
        let p =
            FakeDevicePlugin::register(&format!("example.com/rail{r}"), vf_ids(r, 2)).await.expect("plugin");
        plugins.push(p);
    }
    wait_allocatable(node, 2).await;
    let records = tempfile::tempdir().expect("tempdir");
    let plugin = install_recorder(node, records.path(), "rails");
    let ns = node.envtest.namespace("rails").await.expect("namespace");
    let data = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(data.path()).await.expect("server");
    for r in 0..RAILS {
        // rail0 declares the capability: the device also comes as runtimeConfig.deviceID.
        let caps = if r == 0 { json!({"deviceID": true}) } else { json!({}) };
        let range = format!("10.{}.0.0/24", 90 + r);
        let resource = format!("example.com/rail{r}");
        let (name, master) = (format!("rail{r}"), node::master(r));
        let rail = Rail {
            name: &name,
            resource: &resource,
            plugin: &plugin,
            master: &master,
            range: &range,
            server: &server.endpoint,
            caps,
        };
        rail_nad(&ns, rail).await;
    }
    let networks: Vec<String> = (0..RAILS).map(|r| format!("rail{r}")).collect();
    let limits: serde_json::Map<String, Value> =
        (0..RAILS).map(|r| (format!("example.com/rail{r}"), json!("1"))).collect();
    let admin = ns.admin_client().await.expect("admin client");
    for thick in [false, true] {
        tokio::task::block_in_place(|| node.set_thick(thick)).expect("node mode");
        let run = node
            .run_pods_with(
                &admin,
                &ns.name,
                if thick { "gpu-thick" } else { "gpu" },
                2,
                |name| {
                    let mut pod = Node::pod(name, Some(&networks.join(",")));
                    pod["spec"]["containers"][0]["resources"] = json!({"limits": limits});
                    pod
                },
                Duration::from_secs(60),
            )
            .await
            .expect("pods run and check out");
        if thick {
            let adds =
                node.daemon_metric("rust_multus_calls_total{verb=\"ADD\",result=\"ok\"}").expect("metrics");
            assert!(adds >= 2.0, "the daemon answered the pods' ADDs: {adds}");
        }

        let mut given = BTreeSet::new();
        for p in &run.pods {
            let devices = kubelet_devices(node, &ns.name, &p.name).await;
            for r in 0..RAILS {
                let resource = format!("example.com/rail{r}");
                let want = &devices[&resource];
                assert_eq!(want.len(), 1, "{}: the kubelet gave {want:?} of {resource}", p.name);
                let ifname = format!("net{}", r + 1);
                let conf = recorded(records.path(), "ADD", &p.sandbox.id, &ifname);
                assert_eq!(conf["deviceID"], want[0], "{} {ifname}: {conf}", p.name);
                assert_eq!(conf["pciBusID"], want[0], "{} {ifname}: {conf}", p.name);
                if r == 0 {
                    assert_eq!(conf["runtimeConfig"]["deviceID"], want[0], "{conf}");
                } else {
                    assert!(
                        conf["runtimeConfig"].get("deviceID").is_none(),
                        "no capability, no runtimeConfig: {conf}"
                    );
                }
                let entry = &p.status[r + 1];
                assert_eq!(entry["interface"], ifname.as_str(), "{:?}", p.status);
                assert_eq!(
                    entry["device-info"],
                    json!({"type": "pci", "version": "1.1.0", "pci": {"pci-address": want[0]}}),
                    "{:?}",
                    p.status
                );
                assert!(given.insert(want[0].clone()), "{} given twice", want[0]);
            }
            assert!(
                p.status[0].get("device-info").is_none(),
                "the cluster network has no device: {:?}",
                p.status
            );
        }
        let all: BTreeSet<String> = (0..RAILS).flat_map(|r| vf_ids(r, 2)).collect();
        assert_eq!(given, all, "two pods take both VFs of every rail");

        let names: Vec<String> = run.pods.iter().map(|p| p.name.clone()).collect();
        node.delete_pods(&admin, &ns.name, &names, Duration::from_secs(60)).await.expect("deleted");
        for p in &run.pods {
            let add = recorded(records.path(), "ADD", &p.sandbox.id, "net3");
            let del = recorded(records.path(), "DEL", &p.sandbox.id, "net3");
            assert_eq!(del["deviceID"], add["deviceID"], "DEL gets the device ADD got");
        }
    }
    tokio::task::block_in_place(|| node.set_thick(false)).expect("thin again");
    drop(plugins);
}

/// A network whose resource the pod was given no device of fails the pod's sandbox with a
/// CNI error naming the network and the resource; the pod does not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_without_its_device_fails_naming_network_and_resource() {
    let Some(node) = Node::shared("a_network_without_its_device_fails_naming_network_and_resource") else {
        return;
    };
    let _turn = NODE_MODE.lock().await;
    let ns = node.envtest.namespace("nodev").await.expect("namespace");
    let data = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(data.path()).await.expect("server");
    let records = tempfile::tempdir().expect("tempdir");
    let plugin = install_recorder(node, records.path(), "nodev");
    let master = node::master(7);
    let rail = Rail {
        name: "rail9",
        resource: "example.com/rail9",
        plugin: &plugin,
        master: &master,
        range: "10.99.0.0/24",
        server: &server.endpoint,
        caps: json!({}),
    };
    rail_nad(&ns, rail).await;
    let admin = ns.admin_client().await.expect("admin client");
    envtest::create(&admin, Some(&ns.name), Node::pod("lonely", Some("rail9"))).await.expect("pod");
    let want = format!(
        "network \"{}/rail9\" needs a device of resource \"example.com/rail9\", but pod {}/lonely has 0 of them",
        ns.name, ns.name
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let events = envtest::list(&admin, Some(&ns.name), "v1", "Event").await.expect("events");
        let failed: Vec<&str> = events
            .iter()
            .filter(|e| e["reason"] == "FailedCreatePodSandBox")
            .filter_map(|e| e["message"].as_str())
            .collect();
        if let Some(m) = failed.first() {
            assert!(m.contains(&want), "the event names the network and the resource: {m}");
            break;
        }
        assert!(Instant::now() < deadline, "no FailedCreatePodSandBox event: {events:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let names = vec!["lonely".to_string()];
    let err = node.wait_running(&admin, &ns.name, &names, Duration::ZERO).await.expect_err("it cannot run");
    assert!(err.to_string().contains("1 of 1 pods not Running"), "{err:#}");
    node.delete_pods(&admin, &ns.name, &names, Duration::from_secs(60)).await.expect("deleted");
}
