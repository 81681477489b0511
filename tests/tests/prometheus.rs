//! A real Prometheus (Debian's `prometheus` package) scraping `rust-ipam-server`'s
//! `/metrics`, and what it then answers through its HTTP API: the target is up, the scrape
//! has no error (the body is parsed as the Content-Type says), `rustipam_leader` is 1 on a
//! serving replica and 0 on a follower, and the alert expression the docs give for "no
//! leader" (`max(rustipam_leader) < 1`) is false while a replica leads and true while none
//! does. Over plain HTTP and over HTTPS with a CA file (`--metrics-tls-cert`).
//!
//! Prometheus runs on a free loopback port with its storage in a temporary directory, so
//! a system Prometheus (the package's service on 9090) is never in the way.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rust_ipam_e2e::envtest::{self, SERVER_ACCOUNT};
use rust_ipam_e2e::pki::Ca;
use rust_ipam_e2e::{ServerOptions, ServerProcess, free_port, skip};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How often Prometheus scrapes here (its minimum is a second in practice).
const SCRAPE_EVERY: &str = "1s";
/// How long a change may take to show in Prometheus' answers: a few scrapes.
const SETTLE: Duration = Duration::from_secs(30);
/// The alert expression docs/operations.md gives for "no replica leads".
const NO_LEADER: &str = "max(rustipam_leader) < 1";

/// Debian's binary, or `None` with the reason to skip.
fn prometheus_bin() -> Result<PathBuf, String> {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join("prometheus");
        if p.exists() {
            return Ok(p);
        }
    }
    Err("prometheus is not installed (apt-get install prometheus)".into())
}

/// How Prometheus reaches the metrics listener.
enum Scheme<'a> {
    Http,
    /// HTTPS, checking the server's certificate against this CA file.
    Https {
        ca_file: &'a Path,
    },
}

/// A Prometheus process scraping one target; killed when dropped.
struct Prometheus {
    child: Child,
    /// `127.0.0.1:PORT` of its web listener (the HTTP API).
    web: String,
    log: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus with one job, `rust-ipam`, scraping `target` (`ip:port`), and
    /// waits until it is ready.
    async fn start(bin: &Path, dir: &Path, target: &str, scheme: Scheme<'_>) -> anyhow::Result<Prometheus> {
        let mut job = json!({
            "job_name": "rust-ipam",
            "scrape_interval": SCRAPE_EVERY,
            "scrape_timeout": SCRAPE_EVERY,
            "static_configs": [{"targets": [target]}],
        });
        if let Scheme::Https { ca_file } = scheme {
            job["scheme"] = json!("https");
            job["tls_config"] = json!({"ca_file": ca_file});
        }
        // JSON is YAML: Prometheus reads it as it is.
        let config = json!({
            "global": {"scrape_interval": SCRAPE_EVERY, "evaluation_interval": SCRAPE_EVERY},
            "scrape_configs": [job],
        });
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, serde_json::to_vec_pretty(&config)?)?;
        let web = format!("127.0.0.1:{}", free_port()?);
        let log = dir.join("prometheus.log");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={web}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut p = Prometheus { child, web, log };
        let deadline = Instant::now() + SETTLE;
        loop {
            if let Some(status) = p.child.try_wait()? {
                bail!("prometheus exited at startup ({status}): {}", p.log_tail());
            }
            if get(&p.web, "/-/ready").await.is_ok_and(|(code, _, _)| code == 200) {
                return Ok(p);
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready within {SETTLE:?}: {}", p.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// The API's answer to `path` (`data` of a `success` answer).
    async fn api(&self, path: &str) -> anyhow::Result<Value> {
        let (code, _, body) = get(&self.web, path).await?;
        let v: Value = serde_json::from_str(&body).with_context(|| format!("{path}: {code} {body}"))?;
        if v["status"] != "success" {
            bail!("{path}: {code} {body}");
        }
        Ok(v["data"].clone())
    }

    /// An instant query: each series' labels and value.
    async fn query(&self, expr: &str) -> anyhow::Result<Vec<(Value, f64)>> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(expr))).await?;
        let result = data["result"].as_array().with_context(|| format!("{expr}: no result list: {data}"))?;
        result
            .iter()
            .map(|s| {
                let v = s["value"][1].as_str().and_then(|v| v.parse().ok());
                Ok((s["metric"].clone(), v.with_context(|| format!("{expr}: no value in {s}"))?))
            })
            .collect()
    }

    /// The values of `expr`, once `ok` holds for them; fails with the last answer (and the
    /// scrape's health) after [`SETTLE`].
    async fn wait_for(&self, expr: &str, ok: impl Fn(&[f64]) -> bool) -> Vec<f64> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let got = self.query(expr).await.map(|r| r.into_iter().map(|(_, v)| v).collect::<Vec<_>>());
            if let Ok(values) = &got
                && ok(values)
            {
                return values.clone();
            }
            if Instant::now() > deadline {
                let targets = self.api("/api/v1/targets").await.map(|t| t.to_string());
                panic!(
                    "{expr}: last answer {got:?} after {SETTLE:?}; targets: {targets:?}; log: {}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The one active target, once it was scraped without error.
    async fn healthy_target(&self) -> Value {
        let deadline = Instant::now() + SETTLE;
        loop {
            let targets = self.api("/api/v1/targets").await.expect("targets");
            let active = targets["activeTargets"].as_array().cloned().unwrap_or_default();
            // Empty until discovery has run once.
            assert!(active.len() <= 1, "one target configured: {targets}");
            if let Some(t) = active.first()
                && t["health"] == "up"
            {
                assert_eq!(t["lastError"], "", "{t}");
                return t.clone();
            }
            assert!(Instant::now() < deadline, "target not up after {SETTLE:?}: {targets}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET over plain HTTP/1.0: status, headers, body.
async fn get(addr: &str, path: &str) -> anyhow::Result<(u16, String, String)> {
    let mut s =
        tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .context("read timed out")??;
    let out = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = out.split_once("\r\n\r\n").with_context(|| format!("no HTTP header end: {out:?}"))?;
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no status code")?;
    Ok((code, head.to_string(), body.to_string()))
}

/// The Content-Type header of a response head.
fn content_type(head: &str) -> Option<&str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case("content-type").then(|| v.trim())
    })
}

fn prometheus_or_skip(test: &str) -> Option<PathBuf> {
    match prometheus_bin() {
        Ok(p) => Some(p),
        Err(why) => {
            skip(test, &why);
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_serving_embedded_server_as_leader() {
    let Some(bin) = prometheus_or_skip("prometheus_scrapes_a_serving_embedded_server_as_leader") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerProcess::start(&dir.path().join("server")).await.expect("server");

    // What Prometheus 3 insists on (it refuses a scrape without a valid Content-Type):
    // the OpenMetrics type the body is written in, which Prometheus 2.42 asks for first.
    let (code, head, body) = get(&server.metrics_addr, "/metrics").await.expect("GET /metrics");
    assert_eq!(code, 200);
    assert_eq!(content_type(&head), Some("application/openmetrics-text; version=1.0.0; charset=utf-8"));
    assert!(body.ends_with("# EOF\n"), "OpenMetrics ends with # EOF: {body}");

    let prom =
        Prometheus::start(&bin, dir.path(), &server.metrics_addr, Scheme::Http).await.expect("prometheus");
    let target = prom.healthy_target().await;
    assert_eq!(target["scrapeUrl"], format!("http://{}/metrics", server.metrics_addr));
    assert_eq!(prom.wait_for("up{job=\"rust-ipam\"}", |v| !v.is_empty()).await, vec![1.0]);
    assert_eq!(prom.wait_for("rustipam_leader", |v| !v.is_empty()).await, vec![1.0]);
    assert_eq!(prom.wait_for("rustipam_serving", |v| !v.is_empty()).await, vec![1.0]);
    // A leader serves: the "no leader" alert has nothing to fire on.
    assert_eq!(prom.query(NO_LEADER).await.expect("query"), vec![]);
    // The pool metrics came through with their labels.
    let leases = prom.query("rustipam_leases").await.expect("query");
    assert_eq!(leases.iter().map(|(_, v)| *v).collect::<Vec<_>>(), vec![0.0], "{leases:?}");

    // The server stops: Prometheus sees the target down.
    server.terminate().expect("terminate");
    prom.wait_for("up{job=\"rust-ipam\"}", |v| v == [0.0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_reports_no_leader_until_it_takes_over() {
    let test = "a_follower_reports_no_leader_until_it_takes_over";
    let Some(bin) = prometheus_or_skip(test) else { return };
    let Some(env) = envtest::shared(test) else { return };
    let ns = env.namespace("prometheus").await.expect("namespace");
    let admin = ns.admin_client().await.expect("admin client");
    // Another replica (not running) holds the leader Lease for an hour: ours follows.
    let now = format!("{}.000000Z", utc_now());
    envtest::create(
        &admin,
        Some(&ns.name),
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "rust-ipam-leader"},
               "spec": {"holderIdentity": "ghost", "acquireTime": now, "renewTime": now,
                        "leaseDurationSeconds": 3600, "leaseTransitions": 0}}),
    )
    .await
    .expect("ghost Lease");
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = ServerOptions::kube_replica(
        "replica-a",
        &ns.kubeconfig(SERVER_ACCOUNT),
        &ns.name,
        dir.path().join("server.log"),
        &["--lease-ttl", "3s", "--renew-every", "500ms"],
    );
    let server = ServerProcess::start_with(&dir.path().join("server"), &opts).await.expect("replica");
    let prom =
        Prometheus::start(&bin, dir.path(), &server.metrics_addr, Scheme::Http).await.expect("prometheus");
    prom.healthy_target().await;

    // Up and following: leader 0, so "no leader" holds (and says 0).
    assert_eq!(prom.wait_for("up{job=\"rust-ipam\"}", |v| !v.is_empty()).await, vec![1.0]);
    assert_eq!(prom.wait_for("rustipam_leader", |v| !v.is_empty()).await, vec![0.0]);
    assert_eq!(prom.wait_for(NO_LEADER, |v| !v.is_empty()).await, vec![0.0]);
    assert_eq!(server.http_get("/readyz").await.expect("readyz").0, 503);

    // The ghost lets go (as a replica stepping down does): ours takes over, and the alert
    // clears.
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(admin.clone(), &ns.name);
    leases
        .patch(
            "rust-ipam-leader",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"holderIdentity": ""}})),
        )
        .await
        .expect("release the ghost's Lease");
    assert_eq!(prom.wait_for("rustipam_leader", |v| v == [1.0]).await, vec![1.0]);
    prom.wait_for(NO_LEADER, <[f64]>::is_empty).await;
    // rustipam_leader is 1 from the moment the Lease is held; ready once the state loaded.
    let deadline = Instant::now() + SETTLE;
    while server.http_get("/readyz").await.expect("readyz").0 != 200 {
        assert!(Instant::now() < deadline, "the new leader is not ready after {SETTLE:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Now as RFC 3339 seconds in UTC (`date -u`), for the Lease's MicroTime fields.
fn utc_now() -> String {
    let out = Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%S"]).output().expect("date");
    String::from_utf8(out.stdout).expect("utf-8").trim().to_string()
}

/// A CA and a certificate for 127.0.0.1 signed by it, as PEM files in `dir`: (ca, cert, key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca = Ca::new("metrics CA");
    let (cert, key) = ca.issue("rust-ipam-server", &["127.0.0.1"]);
    let files = (dir.join("ca.crt"), dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&files.0, &ca.pem).expect("write ca");
    std::fs::write(&files.1, cert).expect("write cert");
    std::fs::write(&files.2, key).expect("write key");
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_metrics_over_tls_with_a_ca_file() {
    let Some(bin) = prometheus_or_skip("prometheus_scrapes_metrics_over_tls_with_a_ca_file") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = certificates(dir.path());
    let opts = ServerOptions {
        args: vec![
            format!("--metrics-tls-cert={}", cert.display()),
            format!("--metrics-tls-key={}", key.display()),
        ],
        ..ServerOptions::default()
    };
    let server = ServerProcess::start_with(&dir.path().join("server"), &opts).await.expect("server");

    // Plain HTTP gets no metrics from the TLS listener.
    let plain = get(&server.metrics_addr, "/metrics").await;
    assert!(!plain.as_ref().is_ok_and(|(code, _, _)| *code == 200), "plain HTTP answered: {plain:?}");

    let prom = Prometheus::start(&bin, dir.path(), &server.metrics_addr, Scheme::Https { ca_file: &ca })
        .await
        .expect("prometheus");
    let target = prom.healthy_target().await;
    assert_eq!(target["scrapeUrl"], format!("https://{}/metrics", server.metrics_addr));
    assert_eq!(prom.wait_for("rustipam_leader", |v| !v.is_empty()).await, vec![1.0]);
    assert_eq!(prom.query(NO_LEADER).await.expect("query"), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_refuses_a_metrics_certificate_from_another_ca() {
    let Some(bin) = prometheus_or_skip("prometheus_refuses_a_metrics_certificate_from_another_ca") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, cert, key) = certificates(dir.path());
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).expect("mkdir");
    let (other_ca, _, _) = certificates(&other);
    let opts = ServerOptions {
        args: vec![
            format!("--metrics-tls-cert={}", cert.display()),
            format!("--metrics-tls-key={}", key.display()),
        ],
        ..ServerOptions::default()
    };
    let server = ServerProcess::start_with(&dir.path().join("server"), &opts).await.expect("server");
    let prom =
        Prometheus::start(&bin, dir.path(), &server.metrics_addr, Scheme::Https { ca_file: &other_ca })
            .await
            .expect("prometheus");
    // The scrape fails on the certificate, so the test above is not passing by accident.
    let deadline = Instant::now() + SETTLE;
    loop {
        let targets = prom.api("/api/v1/targets").await.expect("targets");
        let t = &targets["activeTargets"][0];
        // (Null until discovery has run once.)
        if t["health"] == "down" {
            let err = t["lastError"].as_str().unwrap_or_default();
            assert!(err.contains("certificate"), "{t}");
            break;
        }
        assert_ne!(t["health"], "up", "scraped with a certificate of another CA: {t}");
        assert!(Instant::now() < deadline, "target never scraped: {t}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(prom.wait_for("up{job=\"rust-ipam\"}", |v| !v.is_empty()).await, vec![0.0]);
}
