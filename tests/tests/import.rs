//! Migration from Whereabouts: `rust-ipam-server import-whereabouts` on the recorded
//! objects, then the server answers the same pods with the addresses Whereabouts gave them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rust_ipam_e2e::{ServerProcess, workspace_bin};
use rust_ipam_proto::v1 as pb;
use rust_ipam_proto::v1::{admin_client::AdminClient, ipam_client::IpamClient};

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/whereabouts");
    vec![dir.join("ippools.yaml"), dir.join("overlappingrangeipreservations.yaml")]
}

fn import(data: &Path, dry_run: bool) -> (i32, String) {
    let bin = workspace_bin("ipam-server", "rust-ipam-server").expect("server binary");
    let mut cmd = Command::new(bin);
    cmd.arg("--data-dir").arg(data).arg("import-whereabouts").args(fixtures());
    if dry_run {
        cmd.arg("--dry-run");
    }
    let out = cmd.output().expect("run import");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn leases(server: &ServerProcess) -> Vec<String> {
    let ch = rust_ipam_proto::connect(&server.endpoint, Duration::from_secs(5)).await.expect("connect");
    let list = AdminClient::new(ch).list_leases(pb::ListLeasesRequest::default()).await.expect("list");
    list.into_inner()
        .leases
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
    let add = |cid: &str, pod: &str| pb::AllocateRequest {
        attachment: Some(pb::Attachment {
            container_id: cid.into(),
            ifname: "net1".into(),
            pod: Some(pb::PodRef { namespace: "ai-training".into(), name: pod.into(), uid: String::new() }),
            node: String::new(),
        }),
        network: String::new(),
        ranges: vec![pb::Range {
            range: "192.168.100.0/24".into(),
            exclude: vec!["192.168.100.0/28".into()],
            ..Default::default()
        }],
        requested_addresses: vec![],
    };
    let same = ipam.allocate(add("cid-new", "train-0")).await.expect("allocate").into_inner();
    assert_eq!(same.leases[0].address, "192.168.100.16");
    let next = ipam.allocate(add("cid-x", "train-9")).await.expect("allocate").into_inner();
    assert_eq!(next.leases[0].address, "192.168.100.18");
}
