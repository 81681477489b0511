//! A real etcd and kube-apiserver for the tests, one pair per test binary (controller-
//! runtime's envtest convention): the binaries come from `$KUBEBUILDER_ASSETS`, else from
//! `/usr/local/kubebuilder/bin` (envtest's default), else from `PATH`. Each test takes its
//! own namespace ([`Envtest::namespace`]) with the ServiceAccounts and RBAC of
//! `deploy/base/rbac.yaml` bound in it, so the server runs under exactly the permissions it
//! is shipped with and a missing verb fails the test.
//!
//! What the API server needs here: certificates made by the test (a CA, a serving
//! certificate for 127.0.0.1, an admin client certificate in `system:masters`), a
//! service-account key pair, RBAC authorization, free loopback ports and a temporary data
//! directory. There is no controller-manager: namespaces are never deleted (each test has a
//! fresh one) and ServiceAccount tokens come from the TokenRequest API.
//!
//! The processes outlive nothing: each runs under a small shell watchdog that kills it and
//! removes the data directory once the test binary has exited, however it exits (Rust never
//! drops statics, and a failed test must not leave an API server behind).

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use kube::api::{Api, DynamicObject, PostParams};
use kube::discovery::ApiResource;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use serde_json::{Value, json};

/// The ServiceAccount the server Deployment runs as (deploy/base/rbac.yaml).
pub const SERVER_ACCOUNT: &str = "rust-ipam-server";
/// The ServiceAccount of the node DaemonSet, which rust-multus uses.
pub const NODE_ACCOUNT: &str = "rust-ipam-node";

/// Where envtest's convention puts a test binary `name`: `$KUBEBUILDER_ASSETS`, then
/// `/usr/local/kubebuilder/bin` (envtest's default), then `PATH`.
pub fn find_asset(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("KUBEBUILDER_ASSETS").filter(|d| !d.is_empty()) {
        dirs.push(d.into());
    }
    dirs.push("/usr/local/kubebuilder/bin".into());
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// The pair of binaries a test needs, or why they cannot be found.
fn assets() -> Result<(PathBuf, PathBuf), String> {
    match (find_asset("kube-apiserver"), find_asset("etcd")) {
        (Some(a), Some(e)) => Ok((a, e)),
        (a, e) => {
            let missing: Vec<&str> = [("kube-apiserver", a.is_none()), ("etcd", e.is_none())]
                .into_iter()
                .filter(|m| m.1)
                .map(|m| m.0)
                .collect();
            Err(format!(
                "{} not found in $KUBEBUILDER_ASSETS, /usr/local/kubebuilder/bin or PATH (README: \"A real API server for the tests\")",
                missing.join(" and ")
            ))
        }
    }
}

/// The API server of this test binary, started on first use. Prints SKIP with the reason
/// and returns `None` when the binaries are missing; in CI (`CI` set) that fails the test
/// instead. A server that is there but does not start fails the test.
pub fn shared(test: &str) -> Option<&'static Envtest> {
    static ENV: OnceLock<Result<Envtest, String>> = OnceLock::new();
    let env = ENV.get_or_init(|| {
        let (apiserver, etcd) = assets()?;
        // Started on a thread of its own: tests call this from inside their tokio runtime.
        std::thread::spawn(move || Envtest::start(&apiserver, &etcd).map_err(|e| format!("{e:#}")))
            .join()
            .unwrap_or_else(|_| Err("starting the API server panicked".into()))
            .map_err(|e| format!("START FAILED: {e}"))
    });
    match env {
        Ok(env) => Some(env),
        Err(e) if e.starts_with("START FAILED") => panic!("{test}: {e}"),
        Err(why) => {
            crate::skip(test, why);
            None
        }
    }
}

/// A running etcd + kube-apiserver pair.
pub struct Envtest {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The directory of certificates, kubeconfigs and etcd's data (removed at exit).
    pub dir: PathBuf,
    /// kubeconfig of a cluster admin (client certificate in `system:masters`).
    pub admin_kubeconfig: PathBuf,
    ca_pem: String,
    /// Signs client certificates: the API server trusts this CA for them.
    ca: Issuer<'static, KeyPair>,
    procs: std::sync::Mutex<[Proc; 2]>,
}

/// One of the two processes, as it was started (to start it again).
#[derive(Debug, Clone)]
struct Proc {
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    cleanup: Option<PathBuf>,
    pid: u32,
}

/// The processes of an [`Envtest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Etcd = 0,
    ApiServer = 1,
}

impl std::fmt::Debug for Envtest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envtest").field("url", &self.url).field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// Starts `bin` under a watchdog that kills it once this process is gone; the watchdog of
/// etcd (`cleanup`) then removes the data directory (only then: a test may kill etcd and
/// start it again on the same data).
pub(crate) fn spawn_watched(
    bin: &Path,
    args: &[String],
    log: &Path,
    cleanup: Option<&Path>,
) -> anyhow::Result<u32> {
    let script = format!(
        r#""$@" >>"{log}" 2>&1 & c=$!; echo $c; exec >/dev/null
while kill -0 {parent} 2>/dev/null && kill -0 $c 2>/dev/null; do sleep 0.5; done
kill -KILL $c 2>/dev/null; wait $c; kill -0 {parent} 2>/dev/null || {{ {cleanup}; }}"#,
        log = log.display(),
        parent = std::process::id(),
        cleanup = cleanup.map_or_else(|| ":".to_string(), |d| format!("rm -rf '{}'", d.display())),
    );
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg("watchdog")
        .arg(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut pid = String::new();
    let mut out = child.stdout.take().context("watchdog stdout")?;
    let mut byte = [0u8; 1];
    while out.read(&mut byte)? == 1 && byte[0] != b'\n' {
        pid.push(byte[0] as char);
    }
    pid.trim().parse().with_context(|| format!("watchdog of {} printed no pid ({pid:?})", bin.display()))
}

impl Proc {
    /// Starts it (under its watchdog); itself with the new PID.
    fn spawned(mut self) -> anyhow::Result<Proc> {
        self.pid = spawn_watched(&self.bin, &self.args, &self.log, self.cleanup.as_deref())?;
        Ok(self)
    }
}

/// Waits until etcd (`p`) is healthy.
fn wait_etcd(p: &Proc) -> anyhow::Result<()> {
    let client = p
        .args
        .iter()
        .find_map(|a| a.strip_prefix("--listen-client-urls=http://"))
        .context("etcd has no client URL")?
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_status(&client, "/health") != Some(200) {
        if Instant::now() > deadline {
            bail!("etcd was not healthy within 30 s; its log ends:\n{}", tail(&p.log));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

pub(crate) fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Plain HTTP GET on loopback; the status code.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

struct Pki {
    ca_pem: String,
    ca: Issuer<'static, KeyPair>,
    serving: (String, String),
    admin: (String, String),
    sa_key: KeyPair,
}

impl Pki {
    fn new() -> anyhow::Result<Pki> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, "envtest-ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate()?;
        let ca_pem = params.self_signed(&key)?.pem();
        let ca = Issuer::new(params, key);
        let serving = leaf(
            &ca,
            "kube-apiserver",
            None,
            vec![SanType::IpAddress([127, 0, 0, 1].into()), SanType::DnsName("localhost".try_into()?)],
        )?;
        let admin = leaf(&ca, "envtest-admin", Some("system:masters"), vec![])?;
        Ok(Pki { ca_pem, ca, serving, admin, sa_key: KeyPair::generate()? })
    }
}

/// A certificate (PEM) for `cn`, in group `org` if any, signed by `ca`, and its key (PEM).
fn leaf(
    ca: &Issuer<'static, KeyPair>,
    cn: &str,
    org: Option<&str>,
    sans: Vec<SanType>,
) -> anyhow::Result<(String, String)> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, cn);
    if let Some(o) = org {
        p.distinguished_name.push(DnType::OrganizationName, o);
    }
    p.subject_alt_names = sans;
    let k = KeyPair::generate()?;
    Ok((p.signed_by(&k, ca)?.pem(), k.serialize_pem()))
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

impl Envtest {
    fn start(apiserver: &Path, etcd: &Path) -> anyhow::Result<Envtest> {
        let dir = tempfile::Builder::new().prefix("envtest-").tempdir()?.keep();
        let pki = Pki::new()?;
        let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
            Ok(p)
        };
        let ca = write("ca.crt", &pki.ca_pem)?;
        let serving_crt = write("apiserver.crt", &pki.serving.0)?;
        let serving_key = write("apiserver.key", &pki.serving.1)?;
        let sa_pub = write("sa.pub", &pki.sa_key.public_key_pem())?;
        let sa_key = write("sa.key", &pki.sa_key.serialize_pem())?;

        let (client_port, peer_port, api_port) =
            (crate::free_port()?, crate::free_port()?, crate::free_port()?);
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let etcd = Proc {
            bin: etcd.to_path_buf(),
            args: vec![
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-cluster=default=http://127.0.0.1:{peer_port}"),
                "--log-level=warn".into(),
            ],
            log: dir.join("etcd.log"),
            cleanup: Some(dir.clone()),
            pid: 0,
        }
        .spawned()?;
        wait_etcd(&etcd)?;

        let url = format!("https://127.0.0.1:{api_port}");
        let issuer = "https://kubernetes.default.svc.cluster.local";
        let api = Proc {
            bin: apiserver.to_path_buf(),
            args: vec![
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={api_port}"),
                format!("--tls-cert-file={}", serving_crt.display()),
                format!("--tls-private-key-file={}", serving_key.display()),
                format!("--client-ca-file={}", ca.display()),
                format!("--service-account-issuer={issuer}"),
                format!("--api-audiences={issuer}"),
                format!("--service-account-key-file={}", sa_pub.display()),
                format!("--service-account-signing-key-file={}", sa_key.display()),
                // Node: kubelets (tests/src/node.rs) get what a real cluster gives them.
                "--authorization-mode=Node,RBAC".into(),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                format!("--cert-dir={}", dir.join("certs").display()),
            ],
            log: dir.join("kube-apiserver.log"),
            cleanup: None,
            pid: 0,
        }
        .spawned()?;
        let api_log = api.log.clone();
        let admin_kubeconfig = dir.join("admin.kubeconfig");
        let env = Envtest {
            url,
            dir: dir.clone(),
            admin_kubeconfig,
            ca_pem: pki.ca_pem.clone(),
            ca: pki.ca,
            procs: std::sync::Mutex::new([etcd, api]),
        };
        env.write_kubeconfig(
            &env.admin_kubeconfig,
            "default",
            json!({
                "client-certificate-data": b64(&pki.admin.0),
                "client-key-data": b64(&pki.admin.1),
            }),
        )?;

        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            env.wait_ready(&api_log, Duration::from_secs(60)).await?;
            env.install_crds(&env.admin_client().await?).await
        })?;
        Ok(env)
    }

    /// The PID of `c` now.
    pub fn pid(&self, c: Component) -> u32 {
        self.procs.lock().unwrap_or_else(|e| e.into_inner())[c as usize].pid
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to `c`.
    pub fn signal(&self, c: Component, signal: &str) -> anyhow::Result<()> {
        let pid = self.pid(c).to_string();
        let ok = Command::new("kill").args([format!("-{signal}").as_str(), &pid]).status()?.success();
        if !ok {
            bail!("kill -{signal} {pid} ({c:?}) failed");
        }
        Ok(())
    }

    /// Kills `c` (SIGKILL, as a crash or an OOM kill) and starts it again with the same
    /// flags, data and port; returns once it serves again (etcd healthy, the API server
    /// ready).
    pub async fn restart(&self, c: Component) -> anyhow::Result<()> {
        let p = {
            let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
            let old = procs[c as usize].pid;
            let _ = Command::new("kill").args(["-KILL", &old.to_string()]).status();
            // Gone before the new one binds the same ports.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{old}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            procs[c as usize] = procs[c as usize].clone().spawned()?;
            procs[c as usize].clone()
        };
        match c {
            Component::Etcd => tokio::task::spawn_blocking(move || wait_etcd(&p)).await?,
            Component::ApiServer => self.wait_ready(&p.log, Duration::from_secs(60)).await,
        }
    }

    /// Waits until the API server answers `/readyz` with `ok`.
    async fn wait_ready(&self, log: &Path, within: Duration) -> anyhow::Result<()> {
        let client = self.admin_client().await?;
        let deadline = Instant::now() + within;
        loop {
            let req = http::Request::get("/readyz").body(Vec::new())?;
            match client.request_text(req).await {
                Ok(t) if t == "ok" => return Ok(()),
                _ if Instant::now() > deadline => {
                    bail!("kube-apiserver was not ready within {within:?}; its log ends:\n{}", tail(log))
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Writes a kubeconfig of user `cn` in group `group` (a client certificate of the API
    /// server's CA), as a kubelet's `system:node:NAME` in `system:nodes`.
    pub fn certificate_kubeconfig(&self, path: &Path, cn: &str, group: &str) -> anyhow::Result<()> {
        let (cert, key) = leaf(&self.ca, cn, Some(group), vec![])?;
        self.write_kubeconfig(
            path,
            "default",
            json!({"client-certificate-data": b64(&cert), "client-key-data": b64(&key)}),
        )
    }

    /// Writes a kubeconfig for this API server with `user` as the credentials and
    /// `namespace` as the default.
    fn write_kubeconfig(&self, path: &Path, namespace: &str, user: Value) -> anyhow::Result<()> {
        let cfg = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "envtest", "cluster": {"server": self.url, "certificate-authority-data": b64(&self.ca_pem)}}],
            "users": [{"name": "user", "user": user}],
            "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": "user", "namespace": namespace}}],
            "current-context": "envtest",
        });
        std::fs::write(path, serde_json::to_vec_pretty(&cfg)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// A client (on the current tokio runtime) from a kubeconfig file.
    pub async fn client_from(path: &Path) -> anyhow::Result<kube::Client> {
        let kc = kube::config::Kubeconfig::read_from(path)?;
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// A cluster-admin client on the current tokio runtime.
    pub async fn admin_client(&self) -> anyhow::Result<kube::Client> {
        Envtest::client_from(&self.admin_kubeconfig).await
    }

    /// Our CRDs (crds/), and the peers' that tests write objects of: Multus'
    /// NetworkAttachmentDefinition and Whereabouts' IPPool and OverlappingRangeIPReservation
    /// (tests/envtest/), each waited for until it is served.
    async fn install_crds(&self, client: &kube::Client) -> anyhow::Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?;
        let mut files = Vec::new();
        for dir in [root.join("crds"), root.join("tests/envtest")] {
            for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "yaml") {
                    files.push(path);
                }
            }
        }
        let mut served = Vec::new();
        for path in files {
            for obj in yaml_objects(&path)? {
                let group = obj["spec"]["group"].as_str().unwrap_or_default().to_string();
                let plural = obj["spec"]["names"]["plural"].as_str().unwrap_or_default().to_string();
                let version = obj["spec"]["versions"][0]["name"].as_str().unwrap_or_default().to_string();
                create(client, None, obj).await.with_context(|| format!("CRD from {}", path.display()))?;
                served.push(format!("/apis/{group}/{version}/{plural}"));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for path in served {
            loop {
                let req = http::Request::get(format!("{path}?limit=1")).body(Vec::new())?;
                if client.request_text(req).await.is_ok() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{path} was not served within 30 s of creating its CRD");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// A fresh namespace `<prefix>-<n>` holding what `deploy/base/rbac.yaml` and
    /// `deploy/overlays/thick/rbac.yaml` put in `rust-ipam` (ServiceAccounts, Role and
    /// bindings, the ClusterRoleBindings renamed per namespace) and a `default` ServiceAccount (pods need one; there is no controller
    /// to make it), with kubeconfigs for its accounts.
    pub async fn namespace(&self, prefix: &str) -> anyhow::Result<TestNamespace> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let client = self.admin_client().await?;
        create(&client, None, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))
            .await?;
        create(
            &client,
            Some(&name),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}),
        )
        .await?;
        // The base's accounts and rights, and what thick mode adds to the node account.
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let files = [repo.join("deploy/base/rbac.yaml"), repo.join("deploy/overlays/thick/rbac.yaml")];
        let objects = files
            .iter()
            .map(|f| yaml_objects(f).map(|objs| objs.into_iter().map(move |o| (f, o))))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for (rbac, mut obj) in objects.into_iter().flatten() {
            if obj["metadata"]["namespace"].is_string() {
                obj["metadata"]["namespace"] = json!(name);
            }
            if obj["kind"] == "ClusterRoleBinding" {
                let renamed = format!("{}-{name}", obj["metadata"]["name"].as_str().unwrap_or_default());
                obj["metadata"]["name"] = json!(renamed);
            }
            if let Some(subjects) = obj["subjects"].as_array_mut() {
                for s in subjects {
                    s["namespace"] = json!(name);
                }
            }
            let ns = obj["metadata"]["namespace"].as_str().map(str::to_string);
            match create(&client, ns.as_deref(), obj.clone()).await {
                // ClusterRoles are shared by every namespace of this API server.
                Err(e) if obj["kind"] == "ClusterRole" && is_conflict(&e) => {}
                r => {
                    r.with_context(|| {
                        format!("{} {} from {}", obj["kind"], obj["metadata"]["name"], rbac.display())
                    })?;
                }
            }
        }
        let dir = self.dir.join(&name);
        std::fs::create_dir_all(&dir)?;
        let ns = TestNamespace { name, dir, admin_kubeconfig: self.admin_kubeconfig.clone() };
        for account in [SERVER_ACCOUNT, NODE_ACCOUNT] {
            let token = self.token(&client, &ns.name, account).await?;
            self.write_kubeconfig(&ns.kubeconfig(account), &ns.name, json!({"token": token}))?;
        }
        Ok(ns)
    }

    /// A token of `account` from the TokenRequest API (a day long, as a projected token
    /// that the kubelet would renew).
    async fn token(&self, client: &kube::Client, ns: &str, account: &str) -> anyhow::Result<String> {
        token_request(client, ns, account, json!({"expirationSeconds": 86400})).await
    }

    /// `token` (a JWT this API server issued) signed again with its service-account key,
    /// expired an hour ago: what a node would present with a token it failed to renew.
    pub fn expired_copy(&self, token: &str) -> anyhow::Result<String> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts = token.split('.');
        let (Some(header), Some(claims)) = (parts.next(), parts.next()) else { bail!("not a JWT") };
        let mut claims: Value = serde_json::from_slice(&b64.decode(claims)?)?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
        claims["exp"] = json!(now - 3600);
        claims["iat"] = json!(now - 7200);
        claims["nbf"] = json!(now - 7200);
        let signed = format!("{header}.{}", b64.encode(serde_json::to_vec(&claims)?));
        let key = KeyPair::from_pem(&std::fs::read_to_string(self.dir.join("sa.key"))?)?;
        let der = rcgen::SigningKey::sign(&key, signed.as_bytes())?;
        Ok(format!("{signed}.{}", b64.encode(ecdsa_fixed(&der)?)))
    }
}

/// A token of `account` in `ns` from the TokenRequest API with `spec` (audiences,
/// expirationSeconds, boundObjectRef).
pub async fn token_request(
    client: &kube::Client,
    ns: &str,
    account: &str,
    spec: Value,
) -> anyhow::Result<String> {
    let req = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec});
    let req = http::Request::post(format!("/api/v1/namespaces/{ns}/serviceaccounts/{account}/token"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&req)?)?;
    let answer: Value = client.request(req).await.with_context(|| format!("token of {ns}/{account}"))?;
    answer["status"]["token"].as_str().map(str::to_string).context("TokenRequest answered no token")
}

/// An ECDSA P-256 signature as JWT's ES256 wants it (r and s, 32 bytes each) from the DER
/// SEQUENCE of two INTEGERs that the signer gives.
fn ecdsa_fixed(der: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(64);
    let mut at = 2; // SEQUENCE tag and its (short) length
    for _ in 0..2 {
        anyhow::ensure!(der.get(at) == Some(&0x02), "not an ECDSA DER signature");
        let len = usize::from(*der.get(at + 1).context("short signature")?);
        let int = der.get(at + 2..at + 2 + len).context("short signature")?;
        let int = &int[int.len().saturating_sub(32)..];
        out.extend(std::iter::repeat_n(0u8, 32 - int.len()));
        out.extend_from_slice(int);
        at += 2 + len;
    }
    Ok(out)
}

/// One test's namespace on the shared API server.
#[derive(Debug, Clone)]
pub struct TestNamespace {
    /// The namespace.
    pub name: String,
    /// A directory for this test's files (kubeconfigs).
    pub dir: PathBuf,
    /// kubeconfig of a cluster admin, for what a test does as the cluster's operator.
    pub admin_kubeconfig: PathBuf,
}

impl TestNamespace {
    /// kubeconfig of a ServiceAccount of deploy/base/rbac.yaml in this namespace
    /// ([`SERVER_ACCOUNT`], [`NODE_ACCOUNT`]), with this namespace as the default.
    pub fn kubeconfig(&self, account: &str) -> PathBuf {
        self.dir.join(format!("{account}.kubeconfig"))
    }

    /// A kubeconfig of `account` that reaches the API server at `server` instead (a relay
    /// in front of it), with the same credentials.
    pub fn kubeconfig_via(&self, account: &str, server: &str) -> anyhow::Result<PathBuf> {
        let mut cfg: Value = serde_json::from_slice(&std::fs::read(self.kubeconfig(account))?)?;
        cfg["clusters"][0]["cluster"]["server"] = json!(server);
        let path = self.dir.join(format!("{account}-via-{}.kubeconfig", server.replace([':', '/'], "_")));
        std::fs::write(&path, serde_json::to_vec_pretty(&cfg)?)?;
        Ok(path)
    }

    /// A client of `account` on the current tokio runtime.
    pub async fn client(&self, account: &str) -> anyhow::Result<kube::Client> {
        Envtest::client_from(&self.kubeconfig(account)).await
    }

    /// A cluster-admin client on the current tokio runtime.
    pub async fn admin_client(&self) -> anyhow::Result<kube::Client> {
        Envtest::client_from(&self.admin_kubeconfig).await
    }
}

/// The objects of a YAML file of one or more documents.
pub fn yaml_objects(path: &Path) -> anyhow::Result<Vec<Value>> {
    use serde::Deserialize as _;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc).with_context(|| format!("parsing {}", path.display()))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// Whether a kube error is 409 (AlreadyExists or Conflict).
pub fn is_conflict(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<kube::Error>(), Some(kube::Error::Api(s)) if s.code == 409)
}

/// The API resource of an object, from its apiVersion and kind.
fn resource_of(obj: &Value) -> anyhow::Result<ApiResource> {
    let api_version = obj["apiVersion"].as_str().context("object without apiVersion")?;
    let kind = obj["kind"].as_str().context("object without kind")?;
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let plural = match kind {
        "NetworkAttachmentDefinition" => "network-attachment-definitions".to_string(),
        k => format!("{}s", k.to_lowercase()),
    };
    let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
    Ok(ApiResource::from_gvk_with_plural(&gvk, &plural))
}

/// The API for objects like `obj`, in `namespace` (`None`: cluster-scoped).
pub fn api_for(
    client: &kube::Client,
    namespace: Option<&str>,
    obj: &Value,
) -> anyhow::Result<Api<DynamicObject>> {
    let ar = resource_of(obj)?;
    Ok(match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    })
}

/// Creates `obj` (any kind) in `namespace`; the object as stored.
pub async fn create(client: &kube::Client, namespace: Option<&str>, obj: Value) -> anyhow::Result<Value> {
    let api = api_for(client, namespace, &obj)?;
    let dynamic: DynamicObject = serde_json::from_value(obj)?;
    let stored = api.create(&PostParams::default(), &dynamic).await?;
    Ok(serde_json::to_value(stored)?)
}

/// Every object of `kind` (`apiVersion` as in the object) in `namespace` (`None`: in every
/// namespace) as JSON, through every page.
pub async fn list(
    client: &kube::Client,
    namespace: Option<&str>,
    api_version: &str,
    kind: &str,
) -> anyhow::Result<Vec<Value>> {
    let api = api_for(client, namespace, &json!({"apiVersion": api_version, "kind": kind}))?;
    let mut out = Vec::new();
    let mut params = kube::api::ListParams::default().limit(500);
    loop {
        let page = api.list(&params).await?;
        for item in page.items {
            out.push(serde_json::to_value(item)?);
        }
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => params = params.continue_token(&c),
            _ => return Ok(out),
        }
    }
}

/// Creates pod `name` (a pause container, no node: nothing runs it) in `namespace`; its UID.
pub async fn create_pod(client: &kube::Client, namespace: &str, name: &str) -> anyhow::Result<String> {
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                     "spec": {"containers": [{"name": "pause", "image": "registry.k8s.io/pause:3.10"}]}});
    let stored = create(client, Some(namespace), pod)
        .await
        .with_context(|| format!("creating pod {namespace}/{name}"))?;
    stored["metadata"]["uid"].as_str().map(str::to_string).context("the API server gave the pod no uid")
}

/// Deletes pod `name` in `namespace`; a pod on no node is gone at once.
pub async fn delete_pod(client: &kube::Client, namespace: &str, name: &str) -> anyhow::Result<()> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    pods.delete(name, &kube::api::DeleteParams::default())
        .await
        .with_context(|| format!("deleting pod {namespace}/{name}"))?;
    Ok(())
}
