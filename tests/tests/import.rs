//! Migration from Whereabouts: `rust-ipam-server import-whereabouts` on the recorded
//! objects (from files into the embedded store, or from a real kube-apiserver into the kube
//! store), then the server answers the same pods with the addresses Whereabouts gave them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rust_ipam_e2e::envtest::{self, SERVER_ACCOUNT};
use rust_ipam_e2e::{ServerOptions, ServerProcess, fixtures, workspace_bin};
use rust_ipam_proto::v1 as pb;
use rust_ipam_proto::v1::ipam_client::IpamClient;
use serde_json::Value;

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/whereabouts");
    vec![dir.join("ippools.yaml"), dir.join("overlappingrangeipreservations.yaml")]
}

fn import(data: &Path, dry_run: bool) -> (i32, String) {
    let bin = workspace_bin("rust-ipam-server").expect("server binary");
    let mut cmd = Command::new(bin);
    cmd.arg("--data-dir").arg(data).arg("import-whereabouts").args(fixtures());
    if dry_run {
        cmd.arg("--dry-run");
    }
    let out = cmd.output().expect("run import");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The server's leases, as "network address container".
async fn leases(server: &ServerProcess) -> Vec<String> {
    fixtures::leases(&server.endpoint, pb::ListLeasesRequest::default())
        .await
        .iter()
        .map(|l| format!("{:?} {} {}", l.network, l.address, l.container_id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_pods_keep_their_whereabouts_addresses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");

    let (code, out) = import(&data, true);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.ends_with("dry run: 5 would be created, 5 exist, 0 not importable; nothing changed\n"),
        "{out}"
    );
    let server = ServerProcess::start(&data).await.expect("server");
    assert!(leases(&server).await.is_empty(), "a dry run changes nothing");
    drop(server);

    let (code, out) = import(&data, false);
    assert_eq!(code, 0, "{out}");
    assert!(out.ends_with("5 created, 5 already present, 0 not importable\n"), "{out}");
    let (code, out) = import(&data, false);
    assert_eq!((code, out.lines().last()), (0, Some("0 created, 10 already present, 0 not importable")));

    let server = ServerProcess::start(&data).await.expect("server");
    assert_eq!(
        leases(&server).await,
        vec![
            "\"\" 192.168.100.1 cid-c1",
            "\"\" 192.168.100.16 cid-a1",
            "\"\" 192.168.100.17 cid-a2",
            "\"\" fd00:50::1 cid-d1",
            "\"rail0\" 10.50.1.0 cid-b1",
        ]
    );
    // The NAD now says rust-ipam; the pod's next ADD gets its old address, and a new pod
    // gets the next free one.
    let ch = rust_ipam_proto::connect(&server.endpoint, Duration::from_secs(5)).await.expect("connect");
    let mut ipam = IpamClient::new(ch);
    let add = |cid: &str, pod: &str| {
        let mut req = fixtures::allocate_request(
            cid,
            Some(fixtures::pod("ai-training", pod, "")),
            "",
            "192.168.100.0/24",
        );
        req.ranges[0].exclude = vec!["192.168.100.0/28".into()];
        req
    };
    let same = ipam.allocate(add("cid-new", "train-0")).await.expect("allocate").into_inner();
    assert_eq!(same.leases[0].address, "192.168.100.16");
    let next = ipam.allocate(add("cid-x", "train-9")).await.expect("allocate").into_inner();
    assert_eq!(next.leases[0].address, "192.168.100.18");
}

/// Writes the fixture objects into `namespace` as Whereabouts did (the recorded server-set
/// metadata left out: the API server sets its own).
async fn seed_whereabouts(admin: &kube::Client, namespace: &str) {
    for file in fixtures() {
        let text = std::fs::read_to_string(&file).expect("fixture");
        let list: Value = serde_yaml::from_str(&text).expect("fixture YAML");
        for item in list["items"].as_array().expect("a List") {
            let mut obj = item.clone();
            let name = obj["metadata"]["name"].clone();
            obj["metadata"] = serde_json::json!({ "name": name });
            envtest::create(admin, Some(namespace), obj).await.expect("seed a Whereabouts object");
        }
    }
}

/// The import run as the cluster's operator (it reads Whereabouts' objects, which the
/// server's account may not) from `from` into the kube store in `into`.
fn import_kube(kubeconfig: &Path, from: &str, into: &str, dry_run: bool) -> (i32, String) {
    let bin = workspace_bin("rust-ipam-server").expect("server binary");
    let mut cmd = Command::new(bin);
    cmd.arg("--kubeconfig").arg(kubeconfig).args(["--namespace", into]);
    cmd.args(["import-whereabouts", "--from-namespace", from]);
    if dry_run {
        cmd.arg("--dry-run");
    }
    let out = cmd.output().expect("run import");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_from_the_api_server_into_the_kube_store() {
    let Some(env) = envtest::shared("import_from_the_api_server_into_the_kube_store") else { return };
    let ns = env.namespace("import").await.expect("namespace");
    let wa = env.namespace("whereabouts").await.expect("namespace").name;
    let admin = ns.admin_client().await.expect("admin client");
    seed_whereabouts(&admin, &wa).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = &ns.admin_kubeconfig;
    let objects = || fixtures::lease_objects(&admin, &ns.name);

    let (code, out) = import_kube(cfg, &wa, &ns.name, true);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("dry run: 5 would be created, 5 exist, 0 not importable; nothing changed"), "{out}");
    assert!(objects().await.is_empty(), "a dry run writes nothing");

    let (code, out) = import_kube(cfg, &wa, &ns.name, false);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("5 created, 5 already present, 0 not importable"), "{out}");
    let mut stored: Vec<String> =
        objects().await.iter().map(|o| format!("{} {} {}", o.name, o.address, o.container_id)).collect();
    stored.sort();
    assert_eq!(
        stored,
        vec![
            "192.168.100.1 192.168.100.1 cid-c1",
            "192.168.100.16 192.168.100.16 cid-a1",
            "192.168.100.17 192.168.100.17 cid-a2",
            "fd00-0050-0000-0000-0000-0000-0000-0001 fd00:50::1 cid-d1",
        ]
        .into_iter()
        .map(String::from)
        .chain(stored.iter().filter(|s| s.contains("cid-b1")).cloned())
        .collect::<Vec<_>>(),
        "one IPLease per imported address"
    );
    assert_eq!(stored.len(), 5, "{stored:?}");
    let (code, out) = import_kube(cfg, &wa, &ns.name, false);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 created, 10 already present, 0 not importable"), "{out}");

    // A replica elected on the store, as the server's account, serves the imported pods
    // their addresses.
    let opts = ServerOptions {
        args: ["--kubeconfig", &ns.kubeconfig(SERVER_ACCOUNT).display().to_string(), "--namespace", &ns.name]
            .map(String::from)
            .to_vec(),
        ..ServerOptions::default()
    };
    let server = ServerProcess::start_with(&dir.path().join("data"), &opts).await.expect("server");
    let rail0 = leases(&server).await.into_iter().filter(|l| l.contains("cid-b1")).collect::<Vec<_>>();
    assert_eq!(rail0, vec!["\"rail0\" 10.50.1.0 cid-b1"]);
}

#[test]
fn from_namespace_needs_the_kube_store() {
    let bin = workspace_bin("rust-ipam-server").expect("server binary");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(bin)
        .args(["--store", "embedded", "--data-dir"])
        .arg(dir.path())
        .args(["import-whereabouts", "--from-namespace", "kube-system"])
        .output()
        .expect("run import");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--from-namespace reads the API server: give --kubeconfig, or run in a cluster"),
        "{err}"
    );
}

/// The store flags are global: a new user puts them after the subcommand.
#[test]
fn store_flags_after_the_subcommand() {
    let bin = workspace_bin("rust-ipam-server").expect("server binary");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(&bin)
        .args(["import-whereabouts", "--from-namespace", "kube-system", "--store", "embedded", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("run import");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--from-namespace reads the API server: give --kubeconfig, or run in a cluster"),
        "{err}"
    );

    // The kubeconfig given after the subcommand is the one read.
    let missing = dir.path().join("no-such-kubeconfig");
    let out = Command::new(&bin)
        .args(["import-whereabouts", "--from-namespace", "kube-system", "--kubeconfig"])
        .arg(&missing)
        .output()
        .expect("run import");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("reading kubeconfig {}", missing.display())), "{err}");
}
