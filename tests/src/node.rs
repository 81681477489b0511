//! A real node for the tests: containerd and a kubelet 1.36 registered with this test
//! binary's API server ([`crate::envtest`]), with `rust-multus` as the node's CNI
//! meta-plugin, so pods go the whole way a user's do: API server → kubelet → containerd's
//! CRI → `rust-multus` → the delegates and `rust-ipam`.
//!
//! One node per test binary, started on first use ([`Node::shared`]). What it needs and
//! where it is looked for, as users provide them: `kubelet` and the pause image archive
//! `pause-oci.tar` by envtest's convention ([`crate::envtest::find_asset`]:
//! `$KUBEBUILDER_ASSETS`, `/usr/local/kubebuilder/bin`, `PATH`), `containerd`, `ctr` and
//! `runc` on `PATH`. Missing, the test prints SKIP with the reason (and fails under `CI`).
//!
//! Everything is the node's own where the programs let it be: containerd's root, state and
//! socket, runc's state, the kubelet's root and logs, the CNI bin and conf directories, the
//! host links the NADs hang off, all under one temporary directory. Some paths are fixed
//! by the programs and shared with the machine (`/run/containerd/s`, `/var/lib/cni`,
//! `/var/run/netns/cni-*`, `/var/lib/kubelet/pod-resources`), and the host links' names are
//! fixed, so only one node runs on a machine at a time: a node starts only once it holds
//! [`node_lock`], which its watchdog keeps until the teardown has ended. A second test
//! binary (or a second checkout's tests) waits for the first one's node to be gone.
//!
//! Nothing outlives the test binary: a watchdog shell waits for it to exit, however it
//! exits, and then kills the kubelet, every container of this containerd and containerd,
//! unmounts what is mounted under the directory, deletes the pod network namespaces made
//! since the node started, the host links and the kubelet's cgroups, and the directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::{Value, json};

use crate::envtest::{self, Envtest, TestNamespace};

/// The node's name: the kubelet's `--hostname-override` and the test pods' `spec.nodeName`
/// (there is no scheduler).
pub const NODE_NAME: &str = "e2e-node-0";
/// The sandbox image and every test pod's container image: imported from the archive,
/// never pulled.
pub const PAUSE_IMAGE: &str = "localhost/pause:3.10.2";
/// The host bridge of the cluster network (eth0 of every pod): the reference `bridge`
/// plugin with `host-local` in [`CLUSTER_SUBNET`].
pub const CLUSTER_BRIDGE: &str = "e2enode0";
/// Addresses of the cluster network.
pub const CLUSTER_SUBNET: &str = "198.18.0.0/16";
/// How many host links the node has for the NADs' macvlan interfaces ([`master`]).
pub const MASTERS: usize = 8;
/// The annotation that asks for networks.
pub const NETWORKS: &str = "k8s.v1.cni.cncf.io/networks";
/// The annotation rust-multus writes.
pub const NETWORK_STATUS: &str = "k8s.v1.cni.cncf.io/network-status";

/// Creates NAD `name` in `ns` with `annotations` and `config` (its `spec.config`, `name`
/// set to the NAD's).
pub async fn create_nad(
    ns: &TestNamespace,
    name: &str,
    annotations: Value,
    mut config: Value,
) -> anyhow::Result<()> {
    config["name"] = json!(name);
    let nad = json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": name, "annotations": annotations}, "spec": {"config": config.to_string()}});
    envtest::create(&ns.admin_client().await?, Some(&ns.name), nad).await?;
    Ok(())
}

/// Creates NAD `name` in `ns`: `rust-macvlan` (bridge mode) on host link `master` with
/// `ipam`; CNI 1.1.0, so the runtime's GC reaches it (1.0.0 with host-local, below).
pub async fn macvlan_nad(ns: &TestNamespace, name: &str, master: &str, ipam: Value) -> anyhow::Result<()> {
    // Debian's host-local (the benchmark's floor) speaks CNI up to 1.0.0 and refuses a 1.1.0
    // config; our plugins speak 1.1.0 (GC, STATUS).
    let version = if ipam["type"] == "host-local" { "1.0.0" } else { "1.1.0" };
    let config = json!({"cniVersion": version, "type": "rust-macvlan", "master": master, "mode": "bridge", "ipam": ipam});
    create_nad(ns, name, json!({}), config).await
}

/// `rust-ipam` giving addresses of `range` from the server at `server`.
pub fn rust_ipam(range: &str, server: &str) -> Value {
    json!({"type": "rust-ipam", "range": range, "server": server})
}

/// Host link `i` (0..[`MASTERS`]) that NADs use as `master`: one end of a veth pair whose
/// other end stays on this host, so nothing the pods send leaves the machine.
pub fn master(i: usize) -> String {
    format!("e2erail{i}")
}

/// The programs a node runs.
#[derive(Debug, Clone)]
struct Programs {
    kubelet: PathBuf,
    pause: PathBuf,
    containerd: PathBuf,
    ctr: PathBuf,
    runc: PathBuf,
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl Programs {
    fn find() -> Result<Programs, String> {
        let found = [
            ("kubelet", envtest::find_asset("kubelet")),
            ("pause-oci.tar", envtest::find_asset("pause-oci.tar")),
            ("containerd", on_path("containerd")),
            ("ctr", on_path("ctr")),
            ("runc", on_path("runc")),
        ];
        let missing: Vec<&str> = found.iter().filter(|f| f.1.is_none()).map(|f| f.0).collect();
        if !missing.is_empty() {
            return Err(format!(
                "{} not found (kubelet and pause-oci.tar in $KUBEBUILDER_ASSETS or /usr/local/kubebuilder/bin, \
                 containerd, ctr and runc on PATH; README: \"A real node for the tests\")",
                missing.join(", ")
            ));
        }
        let [kubelet, pause, containerd, ctr, runc] = found.map(|f| f.1.unwrap_or_default());
        Ok(Programs { kubelet, pause, containerd, ctr, runc })
    }
}

/// A running node: containerd and a kubelet, Ready.
#[derive(Debug)]
pub struct Node {
    /// The API server the kubelet registered with.
    pub envtest: &'static Envtest,
    /// Root of everything the node owns.
    pub dir: PathBuf,
    /// The CNI plugin directory (containerd's `bin_dir`, rust-multus' `binDir`).
    pub bin_dir: PathBuf,
    /// The CNI config directory (containerd's `conf_dir`, rust-multus' `confDir`).
    pub conf_dir: PathBuf,
    /// The namespace whose node ServiceAccount rust-multus runs as.
    pub account: TestNamespace,
    programs: Programs,
    containerd: Mutex<Child>,
    kubelet: Mutex<Child>,
    /// `rust-multus-daemon` while the node is in thick mode ([`Node::set_thick`]).
    daemon: Mutex<Option<Child>>,
    /// The daemon's `/metrics` and probes port (loopback).
    pub daemon_metrics: u16,
}

/// The node's CNI config file: rust-multus (thin) or rust-multus-shim (thick).
const MULTUS_CONF: &str = "00-rust-multus.conf";

impl Node {
    /// The node of this test binary, started on first use. Prints SKIP with the reason and
    /// returns `None` when a program is missing (in CI that fails the test); a node that
    /// does not become Ready fails the test with the logs' ends.
    pub fn shared(test: &str) -> Option<&'static Node> {
        static NODE: OnceLock<Result<Node, String>> = OnceLock::new();
        let env = envtest::shared(test)?;
        let node = NODE.get_or_init(|| {
            let programs = Programs::find()?;
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(Node::start(env, programs))
            })
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("starting the node panicked")))
            .map_err(|e| format!("START FAILED: {e:#}"))
        });
        match node {
            Ok(node) => Some(node),
            Err(e) if e.starts_with("START FAILED") => panic!("{test}: {e}"),
            Err(why) => {
                crate::skip(test, why);
                None
            }
        }
    }

    async fn start(envtest: &'static Envtest, programs: Programs) -> anyhow::Result<Node> {
        let dir = tempfile::Builder::new().prefix("e2e-node-").tempdir()?.keep();
        let account = envtest.namespace("node").await?;
        let (bin_dir, conf_dir) = (dir.join("cni/bin"), dir.join("cni/net.d"));
        for d in [&bin_dir, &conf_dir, &dir.join("kubelet"), &dir.join("pod-logs")] {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(dir.join("started"), "")?;
        watchdog(&dir, &programs)?;
        wait_for_lock(&dir)?;

        // The plugins: ours (the workspace's build) and the reference plugins containerd
        // and the cluster network need, by symbolic link.
        for name in ["rust-multus", "rust-multus-shim", "rust-ipam", "rust-macvlan", "rust-ipvlan"] {
            std::os::unix::fs::symlink(crate::workspace_bin(name)?, bin_dir.join(name))?;
        }
        for name in ["loopback", "bridge", "host-local", "macvlan", "ipvlan"] {
            let reference = Path::new("/usr/lib/cni").join(name);
            if !reference.is_file() {
                bail!("{} is missing (Debian's containernetworking-plugins)", reference.display());
            }
            std::os::unix::fs::symlink(reference, bin_dir.join(name))?;
        }
        let cluster = json!({"cniVersion": "1.0.0", "name": "cluster-net", "plugins": [{
            "type": "bridge", "bridge": CLUSTER_BRIDGE, "isGateway": true,
            "ipam": {"type": "host-local", "subnet": CLUSTER_SUBNET, "dataDir": dir.join("host-local")}}]});
        std::fs::write(conf_dir.join("10-cluster.conflist"), serde_json::to_vec_pretty(&cluster)?)?;
        // rust-multus first by name: with max_conf_num 1 containerd takes only it.
        let multus = json!({"cniVersion": "1.0.0", "name": "multus-cni-network", "type": "rust-multus",
            "clusterNetwork": "cluster-net", "confDir": conf_dir, "binDir": bin_dir,
            "cniDir": dir.join("multus-cache"), "kubeconfig": account.kubeconfig(envtest::NODE_ACCOUNT),
            "rustMultus": {"podResourcesSocket": pod_resources_socket(&dir)}});
        std::fs::write(conf_dir.join(MULTUS_CONF), serde_json::to_vec_pretty(&multus)?)?;
        // What [`Node::set_thick`] puts back, and the daemon's config: the same keys
        // without the kubeconfig (the daemon has its own client).
        std::fs::write(dir.join("multus-thin.conf"), serde_json::to_vec_pretty(&multus)?)?;
        let mut daemon_conf = multus.clone();
        daemon_conf.as_object_mut().map(|o| o.remove("kubeconfig"));
        std::fs::write(dir.join("multus-daemon.json"), serde_json::to_vec_pretty(&daemon_conf)?)?;

        // Holding the lock, a link of these names is a node's whose teardown never ran (its
        // watchdog killed with it): ours to replace.
        for link in host_links() {
            let _ = Command::new("ip").args(["link", "del", &link]).stderr(Stdio::null()).status();
        }
        for i in 0..MASTERS {
            let (m, peer) = (master(i), format!("{}p", master(i)));
            run("ip", &["link", "add", &m, "type", "veth", "peer", "name", &peer])?;
            run("ip", &["link", "set", &m, "up"])?;
            run("ip", &["link", "set", &peer, "up"])?;
        }

        std::fs::write(dir.join("containerd.toml"), containerd_config(&dir, &bin_dir, &conf_dir))?;
        let containerd = spawn_containerd(&dir, &programs)?;

        envtest.certificate_kubeconfig(
            &dir.join("kubelet.kubeconfig"),
            &format!("system:node:{NODE_NAME}"),
            "system:nodes",
        )?;
        std::fs::write(dir.join("resolv.conf"), "nameserver 127.0.0.1\n")?;
        std::fs::write(dir.join("kubelet.yaml"), serde_json::to_vec_pretty(&kubelet_config(&dir)?)?)?;
        let kubelet = spawn_kubelet(&dir, &programs)?;
        let node = Node {
            envtest,
            dir,
            bin_dir,
            conf_dir,
            account,
            programs,
            containerd: Mutex::new(containerd),
            kubelet: Mutex::new(kubelet),
            daemon: Mutex::new(None),
            daemon_metrics: crate::free_port()?,
        };
        node.wait_ready(Duration::from_secs(90)).await?;
        Ok(node)
    }

    /// The node of this test binary in thick mode: as [`Node::shared`], then
    /// [`Node::set_thick`]. Fails the test when the daemon does not become ready.
    pub fn shared_thick(test: &str) -> Option<&'static Node> {
        let node = Node::shared(test)?;
        if let Err(e) = node.set_thick(true) {
            panic!("{test}: thick mode: {e:#}");
        }
        Some(node)
    }

    /// Thick mode on: `rust-multus-daemon` runs (the node ServiceAccount's kubeconfig, the
    /// thin config's keys as its `--config`, socket and log under the node's directory,
    /// metrics on [`Node::daemon_metrics`]) and the node's CNI config is the shim's. Off:
    /// the thin config again, and the daemon stopped (SIGTERM). containerd reloads the
    /// config directory on change; this waits a moment for it.
    pub fn set_thick(&self, on: bool) -> anyhow::Result<()> {
        let mut daemon = self.daemon.lock().unwrap_or_else(|e| e.into_inner());
        if on == daemon.is_some() {
            return Ok(());
        }
        let socket = self.dir.join("multus-daemon/daemon.sock");
        if on {
            let child = spawn_logged(
                &[("NODE_NAME", NODE_NAME), ("RUST_LOG", "info")],
                &crate::workspace_bin("rust-multus-daemon")?,
                &[
                    format!("--kubeconfig={}", self.account.kubeconfig(envtest::NODE_ACCOUNT).display()),
                    format!("--node-name={NODE_NAME}"),
                    format!("--socket={}", socket.display()),
                    format!("--config={}", self.dir.join("multus-daemon.json").display()),
                    format!("--metrics-listen=127.0.0.1:{}", self.daemon_metrics),
                ],
                &self.dir.join("multus-daemon.log"),
                &self.dir.join("multus-daemon.pid"),
            )?;
            *daemon = Some(child);
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.daemon_http("/readyz")?.0 != 200 {
                if Instant::now() > deadline {
                    bail!(
                        "rust-multus-daemon not ready within 30 s; its log ends:\n{}",
                        envtest::tail(&self.dir.join("multus-daemon.log"))
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let shim = json!({"cniVersion": "1.0.0", "name": "multus-cni-network", "type": "rust-multus-shim",
                "daemonSocket": socket, "daemonTimeoutSeconds": 60});
            std::fs::write(self.conf_dir.join(MULTUS_CONF), serde_json::to_vec_pretty(&shim)?)?;
        } else {
            std::fs::copy(self.dir.join("multus-thin.conf"), self.conf_dir.join(MULTUS_CONF))?;
            if let Some(mut child) = daemon.take() {
                let _ = Command::new("kill").arg(child.id().to_string()).status();
                child.wait()?;
            }
        }
        // containerd's CRI reloads the CNI config directory on an inotify event.
        std::thread::sleep(Duration::from_secs(2));
        Ok(())
    }

    /// A GET of the daemon's HTTP endpoint: status and body (0 when nothing answers).
    pub fn daemon_http(&self, path: &str) -> anyhow::Result<(u16, String)> {
        use std::io::{Read as _, Write as _};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.daemon_metrics)) else {
            return Ok((0, String::new()));
        };
        write!(s, "GET {path} HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        Ok((status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
    }

    /// The value of the daemon's metric line `name` (with its labels), 0 when absent.
    pub fn daemon_metric(&self, name: &str) -> anyhow::Result<f64> {
        let (_, body) = self.daemon_http("/metrics")?;
        Ok(body
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
            .unwrap_or(0.0))
    }

    /// Waits until the Node object says Ready.
    pub async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let client = self.envtest.admin_client().await?;
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client);
        let deadline = Instant::now() + within;
        loop {
            let ready = nodes.get_opt(NODE_NAME).await.ok().flatten().is_some_and(|n| {
                n.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {NODE_NAME} not Ready within {within:?}; kubelet log ends:\n{}\ncontainerd log ends:\n{}",
                    envtest::tail(&self.dir.join("kubelet.log")),
                    envtest::tail(&self.dir.join("containerd.log"))
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Kills the kubelet (SIGKILL: no shutdown path) and starts it again; pods keep running.
    pub async fn restart_kubelet(&self) -> anyhow::Result<()> {
        {
            let mut k = self.kubelet.lock().unwrap_or_else(|e| e.into_inner());
            let _ = k.kill();
            let _ = k.wait();
            *k = spawn_kubelet(&self.dir, &self.programs)?;
        }
        self.wait_ready(Duration::from_secs(60)).await
    }

    /// Kills containerd (SIGKILL) and starts it again; the containers live on in their
    /// shims, as they do when a node's containerd restarts.
    pub async fn restart_containerd(&self) -> anyhow::Result<()> {
        {
            let mut c = self.containerd.lock().unwrap_or_else(|e| e.into_inner());
            let _ = c.kill();
            let _ = c.wait();
            *c = spawn_containerd(&self.dir, &self.programs)?;
        }
        self.wait_ready(Duration::from_secs(60)).await
    }

    /// Stops the whole node as a power loss would: the kubelet, containerd and every
    /// container killed, containerd's runtime state and the pod network namespaces gone
    /// (on a node they live in /run, which a boot empties), the rest of containerd's and
    /// the kubelet's state kept. With `forget_sandboxes`, containerd's own store goes too
    /// (a reinstalled runtime, a replaced disk): the runtime then knows no sandbox of
    /// before, and no DEL ever comes for them. Pods keep their status in the API server
    /// until [`Node::power_on`].
    pub fn power_off(&self, forget_sandboxes: bool) -> anyhow::Result<()> {
        let mut kubelet = self.kubelet.lock().unwrap_or_else(|e| e.into_inner());
        let mut containerd = self.containerd.lock().unwrap_or_else(|e| e.into_inner());
        for child in [&mut *kubelet, &mut *containerd] {
            let _ = child.kill();
            let _ = child.wait();
        }
        run("bash", &["-c", &containers_gone(&self.dir, &self.programs.runc)])?;
        std::fs::remove_dir_all(self.dir.join("containerd/state"))?;
        if forget_sandboxes {
            std::fs::remove_dir_all(self.dir.join("containerd/root"))?;
        }
        Ok(())
    }

    /// Starts containerd and the kubelet again after [`Node::power_off`] and waits for
    /// Ready. The kubelet then finds every pod's sandbox dead (or unknown), stops the dead
    /// ones (the runtime's CNI DEL, with no network namespace left) and makes new ones.
    pub async fn power_on(&self) -> anyhow::Result<()> {
        {
            *self.containerd.lock().unwrap_or_else(|e| e.into_inner()) =
                spawn_containerd(&self.dir, &self.programs)?;
            *self.kubelet.lock().unwrap_or_else(|e| e.into_inner()) =
                spawn_kubelet(&self.dir, &self.programs)?;
        }
        self.wait_ready(Duration::from_secs(90)).await
    }

    /// The IDs of the sandboxes running on this node, each with its network namespace.
    pub fn live_sandboxes(&self) -> anyhow::Result<Vec<Sandbox>> {
        let mut live = Vec::new();
        for line in self.ctr(&["tasks", "ls"])?.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.get(2) != Some(&"RUNNING") {
                continue;
            }
            let info: Value = serde_json::from_str(&self.ctr(&["containers", "info", cols[0]])?)?;
            if info["Labels"]["io.cri-containerd.kind"] != "sandbox" {
                continue;
            }
            if let Some(netns) = sandbox_netns_path(&info) {
                live.push(Sandbox { id: cols[0].to_string(), netns });
            }
        }
        Ok(live)
    }

    /// The containerd socket, for `ctr --address`.
    pub fn socket(&self) -> String {
        sock(&self.dir)
    }

    /// A pod on this node running the pause image, asking for `networks` (the annotation's
    /// value) if given. Its service-account token is not mounted: there is no controller
    /// to publish the root CA that the token volume needs.
    pub fn pod(name: &str, networks: Option<&str>) -> Value {
        let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeName": NODE_NAME, "automountServiceAccountToken": false, "enableServiceLinks": false,
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "pause", "image": PAUSE_IMAGE, "imagePullPolicy": "Never"}]}});
        if let Some(n) = networks {
            pod["metadata"]["annotations"] = json!({ NETWORKS: n });
        }
        pod
    }

    /// The network namespace (`/var/run/netns/...`) of pod `uid`'s live sandbox, read
    /// from containerd: the sandbox container's OCI spec. `None` while it has none.
    pub fn sandbox_netns(&self, uid: &str) -> anyhow::Result<Option<Sandbox>> {
        let filter = format!("labels.\"io.kubernetes.pod.uid\"=={uid}");
        let ids = self.ctr(&["containers", "ls", "-q", &filter])?;
        for id in ids.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let info: Value = serde_json::from_str(&self.ctr(&["containers", "info", id])?)
                .with_context(|| format!("ctr containers info {id}"))?;
            if info["Labels"]["io.cri-containerd.kind"] != "sandbox" {
                continue;
            }
            if let Some(path) = sandbox_netns_path(&info).filter(|p| Path::new(p).exists()) {
                return Ok(Some(Sandbox { id: id.to_string(), netns: path }));
            }
        }
        Ok(None)
    }

    /// Pod network namespaces this node made that no running sandbox uses: what a
    /// half-built or half-torn-down pod would leave.
    pub fn stray_netns(&self) -> anyhow::Result<Vec<String>> {
        let started = std::fs::metadata(self.dir.join("started"))?.modified()?;
        let live = self.live_sandboxes()?;
        let mut stray = Vec::new();
        for entry in std::fs::read_dir("/var/run/netns")? {
            let entry = entry?;
            let path = entry.path();
            let ours = entry.file_name().to_string_lossy().starts_with("cni-")
                && entry.metadata()?.modified()? >= started;
            if ours && !live.iter().any(|l| Path::new(&l.netns) == path) {
                stray.push(path.display().to_string());
            }
        }
        Ok(stray)
    }

    fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.programs.ctr)
            .args(["--address", &self.socket(), "--namespace", "k8s.io"])
            .args(args)
            .output()
            .context("running ctr")?;
        if !out.status.success() {
            bail!("ctr {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates `count` pods `<prefix>-<i>` in `ns` at once, each asking for `networks`,
    /// waits until all are Running, and checks each one from its sandbox: see
    /// [`PodCheck`]. Fails when a pod does not run within `within`, when an address inside
    /// a pod differs from its network-status, or when an address is on two pods.
    pub async fn run_pods(
        &self,
        client: &kube::Client,
        ns: &str,
        prefix: &str,
        count: usize,
        networks: Option<&str>,
        within: Duration,
    ) -> anyhow::Result<PodsRun> {
        self.run_pods_with(client, ns, prefix, count, |name| Node::pod(name, networks), within).await
    }

    /// As [`Node::run_pods`], each pod made by `pod` from its name.
    pub async fn run_pods_with(
        &self,
        client: &kube::Client,
        ns: &str,
        prefix: &str,
        count: usize,
        pod: impl Fn(&str) -> Value,
        within: Duration,
    ) -> anyhow::Result<PodsRun> {
        let (names, running) = self.start_pods_with(client, ns, prefix, count, pod, within).await?;
        let pods = self.check_pods(client, ns, &names).await?;
        Ok(PodsRun { running, pods })
    }

    /// The first half of [`Node::run_pods_with`]: creates the pods `{prefix}-0..count` at
    /// once and waits until all are Running; their names and the time from the first create
    /// to all Running.
    pub async fn start_pods_with(
        &self,
        client: &kube::Client,
        ns: &str,
        prefix: &str,
        count: usize,
        pod: impl Fn(&str) -> Value,
        within: Duration,
    ) -> anyhow::Result<(Vec<String>, Duration)> {
        let started = Instant::now();
        let mut creates = tokio::task::JoinSet::new();
        for i in 0..count {
            let (client, ns, pod) = (client.clone(), ns.to_string(), pod(&format!("{prefix}-{i}")));
            creates.spawn(async move { envtest::create(&client, Some(&ns), pod).await });
        }
        while let Some(r) = creates.join_next().await {
            r??;
        }
        let names: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
        self.wait_running(client, ns, &names, within).await?;
        Ok((names, started.elapsed()))
    }

    /// The second half of [`Node::run_pods_with`]: checks each pod of `names` from inside
    /// its sandbox ([`Node::check_pod`]) and that no address is on two of them.
    pub async fn check_pods(
        &self,
        client: &kube::Client,
        ns: &str,
        names: &[String],
    ) -> anyhow::Result<Vec<PodCheck>> {
        let mut pods = Vec::new();
        for name in names {
            pods.push(self.check_pod(client, ns, name).await?);
        }
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for p in &pods {
            for (ifname, addrs) in &p.addresses {
                if ifname == "lo" {
                    continue;
                }
                for a in addrs {
                    if let Some(other) = seen.insert(a, &p.name) {
                        bail!("{a} is on two pods: {other} and {} ({ifname})", p.name);
                    }
                }
            }
        }
        Ok(pods)
    }

    /// Waits until every pod of `names` in `ns` is Running; the failures' reasons if not.
    pub async fn wait_running(
        &self,
        client: &kube::Client,
        ns: &str,
        names: &[String],
        within: Duration,
    ) -> anyhow::Result<()> {
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
        let deadline = Instant::now() + within;
        loop {
            let list = pods.list(&ListParams::default()).await?;
            let phase = |n: &str| {
                list.items
                    .iter()
                    .find(|p| p.metadata.name.as_deref() == Some(n))
                    .and_then(|p| p.status.as_ref().and_then(|s| s.phase.clone()))
            };
            let waiting: Vec<&String> =
                names.iter().filter(|n| phase(n).as_deref() != Some("Running")).collect();
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let events = envtest::list(client, Some(ns), "v1", "Event").await.unwrap_or_default();
                let reasons: Vec<String> = events
                    .iter()
                    .filter(|e| e["type"] == "Warning")
                    .map(|e| format!("{}: {}", e["involvedObject"]["name"], e["message"]))
                    .collect();
                bail!(
                    "{} of {} pods not Running within {within:?} (first: {}); warnings:\n{}\nkubelet log ends:\n{}",
                    waiting.len(),
                    names.len(),
                    waiting[0],
                    reasons.join("\n"),
                    envtest::tail(&self.dir.join("kubelet.log"))
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reads pod `name` back: its network-status, and the addresses inside its sandbox's
    /// network namespace, which must be exactly those network-status lists for each
    /// interface it names.
    pub async fn check_pod(&self, client: &kube::Client, ns: &str, name: &str) -> anyhow::Result<PodCheck> {
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
        let pod = pods.get(name).await.with_context(|| format!("reading pod {ns}/{name}"))?;
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let annotations = pod.metadata.annotations.unwrap_or_default();
        let status: Vec<Value> = match annotations.get(NETWORK_STATUS) {
            Some(s) => serde_json::from_str(s).with_context(|| format!("{ns}/{name}: network-status {s}"))?,
            None => bail!("{ns}/{name} has no {NETWORK_STATUS} annotation: {annotations:?}"),
        };
        let sandbox = self.sandbox_netns(&uid)?.with_context(|| format!("{ns}/{name}: no live sandbox"))?;
        let addresses = netns_addresses(&sandbox.netns)?;
        for entry in &status {
            let ifname = entry["interface"].as_str().unwrap_or_default();
            let mut listed: Vec<String> = entry["ips"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i.as_str())
                .map(String::from)
                .collect();
            listed.sort();
            let mut inside = addresses.get(ifname).cloned().unwrap_or_default();
            inside.sort();
            if listed != inside {
                bail!(
                    "{ns}/{name}: network-status lists {listed:?} on {ifname:?} but the sandbox ({}) has {inside:?}",
                    sandbox.netns
                );
            }
        }
        Ok(PodCheck { name: name.to_string(), uid, sandbox, status, addresses })
    }

    /// Deletes pods `names` in `ns` and waits until the kubelet has stopped them and they
    /// are gone from the API server.
    pub async fn delete_pods(
        &self,
        client: &kube::Client,
        ns: &str,
        names: &[String],
        within: Duration,
    ) -> anyhow::Result<()> {
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
        for n in names {
            pods.delete(n, &DeleteParams::default()).await.with_context(|| format!("deleting {ns}/{n}"))?;
        }
        let deadline = Instant::now() + within;
        loop {
            let mut left = Vec::new();
            for n in names {
                if pods.get_opt(n).await?.is_some() {
                    left.push(n.as_str());
                }
            }
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("pods {left:?} in {ns} still there {within:?} after deletion");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The network namespace path in a sandbox container's `ctr containers info`.
fn sandbox_netns_path(info: &Value) -> Option<String> {
    info["Spec"]["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .map(str::to_string)
}

/// A pod's live sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// containerd's container ID of the sandbox (the CNI container ID).
    pub id: String,
    /// Its network namespace.
    pub netns: String,
}

/// One pod checked from inside.
#[derive(Debug, Clone)]
pub struct PodCheck {
    pub name: String,
    pub uid: String,
    pub sandbox: Sandbox,
    /// The network-status annotation's entries.
    pub status: Vec<Value>,
    /// Global addresses inside the sandbox by interface.
    pub addresses: BTreeMap<String, Vec<String>>,
}

impl PodCheck {
    /// The addresses network-status gives network `name` (`namespace/name` for a NAD).
    pub fn ips_of(&self, network: &str) -> Vec<String> {
        self.status
            .iter()
            .filter(|e| e["name"] == network)
            .flat_map(|e| e["ips"].as_array().cloned().unwrap_or_default())
            .filter_map(|i| i.as_str().map(String::from))
            .collect()
    }
}

/// What [`Node::run_pods`] saw.
#[derive(Debug)]
pub struct PodsRun {
    /// From the first create to all Running.
    pub running: Duration,
    pub pods: Vec<PodCheck>,
}

/// The global (not link-local) addresses inside network namespace `netns` (a path), by
/// interface, as `ip -j addr` reports them.
pub fn netns_addresses(netns: &str) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let out = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["ip", "-j", "addr", "show"])
        .output()
        .context("running nsenter ip")?;
    if !out.status.success() {
        bail!("ip addr in {netns}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let links: Value = serde_json::from_slice(&out.stdout).context("ip -j addr")?;
    let mut by_if = BTreeMap::new();
    for link in links.as_array().into_iter().flatten() {
        let addrs: Vec<String> = link["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["scope"] == "global")
            .map(|a| a["local"].as_str().unwrap_or_default().to_string())
            .collect();
        by_if.insert(link["ifname"].as_str().unwrap_or_default().to_string(), addrs);
    }
    Ok(by_if)
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The kubelet's PodResources socket: under its root directory.
pub fn pod_resources_socket(dir: &Path) -> PathBuf {
    dir.join("kubelet/pod-resources/kubelet.sock")
}

fn sock(dir: &Path) -> String {
    dir.join("containerd.sock").display().to_string()
}

/// containerd's configuration: its own root, state, sockets and runc root; the CRI
/// settings that make a node Ready on this machine (`../shared/node/README.md`).
fn containerd_config(dir: &Path, bin_dir: &Path, conf_dir: &Path) -> String {
    let d = |p: &str| dir.join(p).display().to_string();
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  disable_hugetlb_controller = true
  tolerate_missing_hugetlb_controller = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
        root = d("containerd/root"),
        state = d("containerd/state"),
        sock = sock(dir),
        opt = d("containerd/opt"),
        runc = d("runc"),
        bin = bin_dir.display(),
        conf = conf_dir.display(),
    )
}

/// The kubelet's configuration (JSON is YAML): the settings `../shared/node/README.md`
/// found make it Ready here, its own ports on loopback.
fn kubelet_config(dir: &Path) -> anyhow::Result<Value> {
    let endpoint = format!("unix://{}", sock(dir));
    Ok(json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": false,
        "failSwapOn": false,
        "oomScoreAdj": 0,
        "containerRuntimeEndpoint": endpoint,
        "imageServiceEndpoint": endpoint,
        "address": "127.0.0.1",
        "port": crate::free_port()?,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": crate::free_port()?,
        "authentication": {"anonymous": {"enabled": true}, "webhook": {"enabled": false}},
        "authorization": {"mode": "AlwaysAllow"},
        "makeIPTablesUtilChains": false,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "0%", "nodefs.inodesFree": "0%",
            "imagefs.available": "0%", "imagefs.inodesFree": "0%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "maxPods": 250,
        "serializeImagePulls": false,
        "podLogsDir": dir.join("pod-logs"),
        "resolvConf": dir.join("resolv.conf"),
    }))
}

/// Starts a program with `env` added, its output appended to `log`, its PID in `pidfile`
/// for the watchdog.
fn spawn_logged(
    env: &[(&str, &str)],
    program: &Path,
    args: &[String],
    log: &Path,
    pidfile: &Path,
) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let child = Command::new(program)
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    std::fs::write(pidfile, child.id().to_string())?;
    Ok(child)
}

/// Starts containerd, waits until it answers and imports the pause image (again, if it
/// has it: the import is idempotent). `NODE_NAME` in its environment reaches
/// the CNI plugins it runs, as the node DaemonSet's downward-API variable does (the
/// machine's hostname is not the node's name here).
fn spawn_containerd(dir: &Path, programs: &Programs) -> anyhow::Result<Child> {
    let mut child = spawn_logged(
        &[("NODE_NAME", NODE_NAME)],
        &programs.containerd,
        &["--config".into(), dir.join("containerd.toml").display().to_string()],
        &dir.join("containerd.log"),
        &dir.join("containerd.pid"),
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = Command::new(&programs.ctr)
            .args(["--address", &sock(dir), "version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            let out = Command::new(&programs.ctr)
                .args(["--address", &sock(dir), "--namespace", "k8s.io", "images", "import"])
                .arg(&programs.pause)
                .output()
                .context("running ctr images import")?;
            if !out.status.success() {
                bail!("importing {}: {}", programs.pause.display(), String::from_utf8_lossy(&out.stderr));
            }
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "containerd exited ({status}); its log ends:\n{}",
                envtest::tail(&dir.join("containerd.log"))
            );
        }
        if Instant::now() > deadline {
            bail!(
                "containerd did not answer within 30 s; its log ends:\n{}",
                envtest::tail(&dir.join("containerd.log"))
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spawn_kubelet(dir: &Path, programs: &Programs) -> anyhow::Result<Child> {
    let p = |f: &str| dir.join(f).display().to_string();
    spawn_logged(
        &[],
        &programs.kubelet,
        &[
            format!("--config={}", p("kubelet.yaml")),
            format!("--kubeconfig={}", p("kubelet.kubeconfig")),
            format!("--root-dir={}", p("kubelet")),
            format!("--cert-dir={}", p("kubelet/pki")),
            format!("--hostname-override={NODE_NAME}"),
            "--node-ip=127.0.0.1".into(),
            "--v=2".into(),
        ],
        &dir.join("kubelet.log"),
        &dir.join("kubelet.pid"),
    )
}

/// Shell that kills every container of the node's containerd (which must be stopped
/// already) and their shims, unmounts containerd's state and deletes the pod network
/// namespaces: what a power loss takes from a node (it all lives in /run).
fn containers_gone(dir: &Path, runc: &Path) -> String {
    let d = dir.display();
    format!(
        r#"for root in '{d}'/runc/*; do
  for id in $('{runc}' --root "$root" list -q); do '{runc}' --root "$root" delete --force "$id"; done
done
# [2]: the pattern must not match this script's own command line.
pkill -KILL -f 'containerd-shim-runc-v[2] .*-address {d}/containerd.sock'
sleep 0.5
grep -o ' {d}/containerd/state[^ ]*' /proc/self/mounts | sort -r | while read -r m; do umount -l "$m"; done
for ns in $(find /var/run/netns -maxdepth 1 -name 'cni-*' -newer '{d}/started'); do ip netns del "$(basename "$ns")"; done
"#,
        runc = runc.display()
    )
}

/// The host links a node makes (the NADs' masters) or its cluster network's bridge plugin
/// makes, and its teardown deletes.
fn host_links() -> Vec<String> {
    (0..MASTERS).map(master).chain([CLUSTER_BRIDGE.to_string()]).collect()
}

/// The machine-wide lock file a node holds from before it starts until its teardown has
/// ended (see the module's documentation).
fn node_lock() -> PathBuf {
    std::env::temp_dir().join("rust-ipam-e2e-node.lock")
}

/// How long a node waits for another process's node to be torn down.
const LOCK_WAIT: Duration = Duration::from_secs(600);

/// Waits until the watchdog of the node in `dir` holds [`node_lock`] (it writes `locked`),
/// saying once on stderr that it waits, and fails naming the lock when that takes longer
/// than [`LOCK_WAIT`].
fn wait_for_lock(dir: &Path) -> anyhow::Result<()> {
    let (start, mut said) = (Instant::now(), false);
    while !dir.join("locked").exists() {
        if let Ok(status) = std::fs::read_to_string(dir.join("lock-failed")) {
            bail!(
                "taking {} failed (flock exited {}; 1: another node held it for more than {} s)",
                node_lock().display(),
                status.trim(),
                LOCK_WAIT.as_secs()
            );
        }
        if start.elapsed() > LOCK_WAIT + Duration::from_secs(10) {
            bail!("the node's watchdog neither took {} nor failed to", node_lock().display());
        }
        if !said && start.elapsed() > Duration::from_secs(1) {
            eprintln!(
                "waiting for another process's test node to be torn down ({} is held)",
                node_lock().display()
            );
            said = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Starts the shell that takes [`node_lock`] for the node, then tears the node down once
/// this process has exited, and lets the lock go when it ends.
fn watchdog(dir: &Path, programs: &Programs) -> anyhow::Result<()> {
    let d = dir.display();
    let script = format!(
        r#"exec >/dev/null 2>&1
exec 9>>'{lock}'
flock -w {wait} 9 || {{ echo $? >'{d}/lock-failed.new'; mv '{d}/lock-failed.new' '{d}/lock-failed'; exit 1; }}
: >'{d}/locked'
while kill -0 {parent}; do sleep 0.5; done
kill -KILL $(cat '{d}/kubelet.pid') $(cat '{d}/containerd.pid') $(cat '{d}/multus-daemon.pid')
{gone}
grep -o ' {d}[^ ]*' /proc/self/mounts | sort -r | while read -r m; do umount -l "$m"; done
for l in {links}; do ip link del "$l"; done
for c in /sys/fs/cgroup/*/kubepods; do find "$c" -depth -type d -exec rmdir {{}} \; ; done
rm -f /var/lib/cni/results/multus-cni-network-* /var/lib/cni/results/cni-loopback-*
rm -rf '{d}'"#,
        lock = node_lock().display(),
        wait = LOCK_WAIT.as_secs(),
        parent = std::process::id(),
        gone = containers_gone(dir, &programs.runc),
        links = host_links().join(" "),
    );
    Command::new("bash")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the node's watchdog")?;
    Ok(())
}
