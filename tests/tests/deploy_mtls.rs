//! The production overlay `deploy/overlays/mtls` working as in a cluster: its server args,
//! the certificates docs/operations.md makes with openssl, the node installer in TLS mode and
//! the real `rust-ipam` plugin, together over mutual TLS.
//!
//! Needs `kubectl` (for kustomize), `openssl` and `bash`; without them the test prints `SKIP`
//! (and fails when `CI` is set).

use std::process::Command;

use rust_ipam_e2e::deploy::{
    Installer, KUBECTL, Killed, MTLS_OVERLAY, container, find, missing, mode, output_text, read, render,
    secret_volume, string_list, yaml_docs,
};
use rust_ipam_e2e::{free_port, run_ipam_plugin, skip, workspace_bin};
use serde_json::json;

/// The openssl commands of docs/operations.md ("Mutual TLS in a cluster"), with the
/// ClusterIP 127.0.0.1, run by bash in `dir`: ca.crt, server.crt/key, node.crt/key.
const DOC_OPENSSL: &str = r#"set -e
CLUSTER_IP=127.0.0.1
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 -subj /CN=rust-ipam-ca \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
  -keyout ca.key -out ca.crt
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=rust-ipam -keyout server.key -out server.csr
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -out server.crt -extfile <(
  printf 'subjectAltName=IP:%s,DNS:rust-ipam.rust-ipam.svc,DNS:rust-ipam.rust-ipam.svc.cluster.local\n' "$CLUSTER_IP"
  printf 'extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n')
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=rust-ipam-node -keyout node.key -out node.csr
openssl x509 -req -in node.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -out node.crt -extfile <(
  printf 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n')
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 -subj /CN=rust-ipam-admin-ca \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
  -keyout admin-ca.key -out admin-ca.crt
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=rust-ipam-reconcile -keyout admin.key -out admin.csr
openssl x509 -req -in admin.csr -CA admin-ca.crt -CAkey admin-ca.key -CAcreateserial -days 365 -out admin.crt -extfile <(
  printf 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n')
"#;

/// The pieces working together as in a cluster with the overlay: certificates made by the
/// documented openssl commands, the server started with the overlay's own args (paths and
/// addresses mapped to a temp dir and loopback, the embedded store for the kube store), the
/// installer writing the node file in TLS mode, and the real `rust-ipam` plugin allocating
/// through it over mutual TLS; Admin answers on the socket and, to the CronJob's own args
/// and admin certificate, on the admin port, never on the gRPC port; no certificate, no
/// entry.
#[test]
fn mtls_overlay_args_docs_certificates_installer_and_plugin_work_together() {
    const TEST: &str = "mtls_overlay_args_docs_certificates_installer_and_plugin_work_together";
    if let Some(why) =
        missing(&[KUBECTL, ("openssl", &["version"]), ("bash", &["-c", "command -v cmp >/dev/null"])])
    {
        return skip(TEST, &why);
    }
    // The commands are the docs' own, line for line (but the ClusterIP).
    let docs_text = read("docs/operations.md");
    for line in DOC_OPENSSL.lines().filter(|l| !l.starts_with("set -e") && !l.starts_with("CLUSTER_IP=")) {
        assert!(docs_text.contains(line), "docs/operations.md must contain the line {line:?}");
    }
    let inst = Installer::in_temp_dir();
    let root = inst.dir.path();
    let pki = root.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let o = Command::new("bash").arg("-c").arg(DOC_OPENSSL).current_dir(&pki).output().expect("bash");
    assert!(o.status.success(), "the documented openssl commands failed:\n{}", output_text(&o));
    let pem = |f: &str| std::fs::read_to_string(pki.join(f)).unwrap();
    // The two Secrets as mounted volumes.
    let server_secret = root.join("server-tls");
    secret_volume(
        &server_secret,
        1,
        &[("tls.crt", &pem("server.crt")), ("tls.key", &pem("server.key")), ("ca.crt", &pem("ca.crt"))],
    );
    let node_secret = root.join("node-tls");
    secret_volume(
        &node_secret,
        1,
        &[("tls.crt", &pem("node.crt")), ("tls.key", &pem("node.key")), ("ca.crt", &pem("ca.crt"))],
    );

    // The server's view of the admin Secret (its ca.crt only) and the CronJob's projected
    // volume (the admin certificate, and the node Secret's ca.crt as server-ca.crt).
    let admin_ca = root.join("admin-ca");
    secret_volume(&admin_ca, 1, &[("ca.crt", &pem("admin-ca.crt"))]);
    let cron_tls = root.join("admin-tls");
    secret_volume(
        &cron_tls,
        1,
        &[("tls.crt", &pem("admin.crt")), ("tls.key", &pem("admin.key")), ("server-ca.crt", &pem("ca.crt"))],
    );

    // The server with the overlay's args.
    let docs = yaml_docs(&render(MTLS_OVERLAY));
    let deployment = find(&docs, "Deployment", "rust-ipam-server");
    let server = container(&deployment["spec"]["template"]["spec"], "server");
    let (port, metrics) = (free_port().unwrap(), free_port().unwrap());
    let admin_port = free_port().unwrap();
    let run_dir = root.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    // Without an API server here to review tokens, --authorize and what goes with it are
    // left out (tests/tests/authz.rs runs them against a real one).
    let authz =
        |a: &&&str| ["--authorize", "--node-service-account=", "--admin="].iter().any(|p| a.starts_with(p));
    let mut args: Vec<String> = string_list(&server["args"])
        .iter()
        .filter(|a| !authz(a))
        .map(|a| {
            a.replace("--listen=0.0.0.0:50051", &format!("--listen=127.0.0.1:{port}"))
                .replace("--metrics-listen=0.0.0.0:9090", &format!("--metrics-listen=127.0.0.1:{metrics}"))
                .replace("--store=kube", "--store=embedded")
                .replace("--admin-listen=0.0.0.0:50052", &format!("--admin-listen=127.0.0.1:{admin_port}"))
                .replace("/etc/rust-ipam/tls", server_secret.to_str().unwrap())
                .replace("/etc/rust-ipam/admin-ca", admin_ca.to_str().unwrap())
                .replace("/run/rust-ipam", run_dir.to_str().unwrap())
        })
        .collect();
    args.push(format!("--data-dir={}", root.join("data").display()));
    let bin = workspace_bin("rust-ipam-server").expect("server binary");
    let ctl_bin = workspace_bin("rust-ipam-ctl").expect("ctl binary");
    let log = root.join("server.log");
    let _server = Killed(
        Command::new(&bin)
            .args(&args)
            .env_clear()
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start rust-ipam-server"),
    );
    let socket = format!("unix://{}/admin.sock", run_dir.display());
    let ctl = |args: &[&str]| Command::new(&ctl_bin).args(args).env_clear().output().expect("rust-ipam-ctl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let o = ctl(&["--server", &socket, "status"]);
        if o.status.success() && output_text(&o).contains("serving=true") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server did not serve on {socket}: {}\nlog:\n{}",
            output_text(&o),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(mode(&run_dir.join("admin.sock")), 0o600);

    // The node: the installer in TLS mode, naming this server.
    let conf_dir = inst.conf_dir();
    let endpoint = format!("https://127.0.0.1:{port}");
    let o = inst.run(
        "install",
        &[
            ("RUST_IPAM_TLS_DIR", node_secret.to_str().unwrap()),
            ("RUST_IPAM_NODE_CONF_DIR", conf_dir.to_str().unwrap()),
            ("RUST_IPAM_SERVER", &endpoint),
        ],
    );
    assert!(o.status.success(), "{}", output_text(&o));

    // The plugin, as the runtime runs it for a NAD that leaves the server to the node file.
    let conf_path = conf_dir.join("rust-ipam.conf");
    let nad = json!({
        "cniVersion": "1.0.0", "name": "backend-network", "type": "macvlan",
        "ipam": {"type": "rust-ipam", "range": "10.56.0.0/16", "exclude": ["10.56.0.0/28"],
                 "configuration_path": conf_path}
    });
    let plugin = |command: &str| {
        run_ipam_plugin(
            command,
            "c0ffee",
            "K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod-a;K8S_POD_UID=uid-a",
            &nad,
        )
    };
    let o = plugin("ADD");
    assert_eq!(o.code, 0, "ADD over mutual TLS failed:\n{}\n{}", o.out, o.stderr);
    assert_eq!(o.out["ips"][0]["address"], "10.56.0.16/16", "{}", o.out);

    // Admin on the socket sees the lease; the TLS port refuses Admin even with a
    // certificate, and refuses any call without one.
    let o = ctl(&["--server", &socket, "leases"]);
    assert!(o.status.success() && output_text(&o).contains("10.56.0.16"), "{}", output_text(&o));
    let (ca, crt, key) = (pki.join("ca.crt"), pki.join("node.crt"), pki.join("node.key"));
    let tls_args = [
        "--tls-ca",
        ca.to_str().unwrap(),
        "--tls-cert",
        crt.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let with_cert = |cmd: &str| ctl(&[&["--server", endpoint.as_str()][..], &tls_args, &[cmd]].concat());
    let o = with_cert("status");
    assert!(o.status.success(), "{}", output_text(&o));
    let o = with_cert("pools");
    assert!(!o.status.success() && output_text(&o).contains("Unimplemented"), "{}", output_text(&o));
    let o = ctl(&["--server", &endpoint, "--tls-ca", ca.to_str().unwrap(), "status"]);
    assert!(!o.status.success(), "a client without a certificate got in: {}", output_text(&o));

    // The CronJob's own args, reaching the admin port as the Service would: the pass runs
    // there (the embedded store has no pods to check against, and says so), and the admin
    // certificate lists the lease. A node's certificate is refused there.
    let cronjob = find(&docs, "CronJob", "rust-ipam-reconcile");
    let rc = container(&cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"], "reconcile");
    assert_eq!(rc["command"], json!(["rust-ipam-ctl"]));
    let admin_endpoint = format!("https://127.0.0.1:{admin_port}");
    let cron_args: Vec<String> = string_list(&rc["args"])
        .iter()
        .filter(|a| !a.starts_with("--token-file="))
        .map(|a| {
            a.replace("https://rust-ipam.rust-ipam.svc:50052", &admin_endpoint)
                .replace("/etc/rust-ipam/admin-tls", cron_tls.to_str().unwrap())
        })
        .collect();
    let cron_args: Vec<&str> = cron_args.iter().map(String::as_str).collect();
    let o = ctl(&cron_args);
    assert!(
        !o.status.success()
            && output_text(&o).contains("FailedPrecondition: reconcile needs the Kubernetes API to see pods"),
        "the CronJob's call did not reach the pass: {}",
        output_text(&o)
    );
    let mut list = cron_args[1..].to_vec();
    list.push("leases");
    let o = ctl(&list);
    assert!(o.status.success() && output_text(&o).contains("10.56.0.16"), "{}", output_text(&o));
    let o =
        ctl(&[&["--server", admin_endpoint.as_str(), "--timeout-ms", "1000"][..], &tls_args, &["pools"]]
            .concat());
    assert!(!o.status.success(), "a node certificate reached Admin: {}", output_text(&o));

    let o = plugin("DEL");
    assert_eq!(o.code, 0, "DEL over mutual TLS failed:\n{}\n{}", o.out, o.stderr);
    let o = ctl(&["--server", &socket, "leases"]);
    assert!(o.status.success() && !output_text(&o).contains("10.56.0.16"), "{}", output_text(&o));
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("TLS handshake failed"), "the refusal is logged:\n{log_text}");
}
