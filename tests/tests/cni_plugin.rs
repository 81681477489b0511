//! The `rust-ipam` CNI plugin binary as a runtime calls it (environment and stdin, JSON on
//! stdout, exit status), against a real server process.

use std::process::Command;

use rust_ipam_e2e::{CniOutput, ServerProcess, run_cni, workspace_bin};
use serde_json::{Value, json};

/// Runs the plugin; `cid` empty: no attachment variables (GC, STATUS, VERSION). A JSON
/// string `conf` is sent as it is (malformed input).
fn cni(command: &str, cid: &str, ifname: &str, args: &str, conf: &Value) -> CniOutput {
    let bin = workspace_bin("rust-ipam").expect("plugin binary");
    let mut env = vec![("CNI_COMMAND", command), ("CNI_PATH", "/opt/cni/bin")];
    if !cid.is_empty() {
        env.extend([("CNI_CONTAINERID", cid), ("CNI_IFNAME", ifname), ("CNI_NETNS", "/var/run/netns/test")]);
    }
    if !args.is_empty() {
        env.push(("CNI_ARGS", args));
    }
    let input = match conf.as_str() {
        Some(raw) => raw.to_string(),
        None => conf.to_string(),
    };
    run_cni(&mut Command::new(bin), &env, &input)
}

fn conf(version: &str, server: &str, ipam: Value) -> Value {
    let mut ipam = ipam;
    ipam["type"] = json!("rust-ipam");
    ipam["server"] = json!(server);
    json!({"cniVersion": version, "name": "backend", "type": "macvlan", "master": "eth1", "ipam": ipam})
}

const POD: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=ai-training;K8S_POD_NAME=train-0;K8S_POD_UID=u-1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_check_del_gc_status_over_the_plugin_binary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path()).await.expect("server");
    let ep = server.endpoint.as_str();
    let nad = json!({"range": "192.168.100.0/24", "exclude": ["192.168.100.0/28"], "gateway": "192.168.100.1",
        "routes": [{"dst": "10.0.0.0/8"}], "network_name": "rail0"});

    let add = cni("ADD", "cid-a1", "net1", POD, &conf("1.0.0", ep, nad.clone()));
    assert_eq!(add.code, 0, "{:?} {}", add.out, add.stderr);
    assert_eq!(
        add.out,
        json!({"cniVersion": "1.0.0", "ips": [{"address": "192.168.100.16/24", "gateway": "192.168.100.1"}],
            "routes": [{"dst": "10.0.0.0/8"}]})
    );
    // Same attachment again: same address. 0.3.1 shape carries ips[].version.
    let again = cni("ADD", "cid-a1", "net1", POD, &conf("0.3.1", ep, nad.clone()));
    assert_eq!(
        again.out["ips"][0],
        json!({"address": "192.168.100.16/24", "gateway": "192.168.100.1", "version": "4"})
    );

    // Static address from CNI_ARGS IP=, as Multus passes it.
    let other_pod = "K8S_POD_NAMESPACE=ai-training;K8S_POD_NAME=train-1;IP=192.168.100.77/24";
    let fixed = cni("ADD", "cid-a2", "net1", other_pod, &conf("1.0.0", ep, nad.clone()));
    assert_eq!(fixed.out["ips"][0]["address"], "192.168.100.77/24");

    let mut with_prev = conf("1.0.0", ep, nad.clone());
    with_prev["prevResult"] = add.out.clone();
    let check = cni("CHECK", "cid-a1", "net1", POD, &with_prev);
    assert_eq!((check.code, &check.out), (0, &Value::Null), "{}", check.stderr);

    let del = cni("DEL", "cid-a1", "net1", POD, &conf("1.0.0", ep, nad.clone()));
    assert_eq!((del.code, &del.out), (0, &Value::Null), "{}", del.stderr);
    let del_again = cni("DEL", "cid-a1", "net1", POD, &conf("1.0.0", ep, nad.clone()));
    assert_eq!(del_again.code, 0, "DEL is idempotent");
    let gone = cni("CHECK", "cid-a1", "net1", POD, &with_prev);
    assert_eq!(gone.code, 1);
    assert_eq!(gone.out["code"], 101);
    assert_eq!(gone.out["msg"], "container cid-a1 interface net1 holds no address in network \"rail0\"");

    // GC keeps what is valid and frees the rest of its own node; another node's runtime
    // did not list its attachments, so they stay.
    cni("ADD", "cid-a3", "net1", POD, &conf("1.1.0", ep, nad.clone()));
    let mut nad_b = nad.clone();
    nad_b["node_name"] = json!("node-b");
    let on_b = cni("ADD", "cid-b1", "net1", POD, &conf("1.1.0", ep, nad_b.clone()));
    assert_eq!(on_b.code, 0, "{:?}", on_b.out);
    let mut gc = conf("1.1.0", ep, nad.clone());
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "cid-a3", "ifname": "net1"}]);
    let gc = cni("GC", "", "", "", &gc);
    assert_eq!(gc.code, 0, "{:?}", gc.out);
    let mut prev_a2 = conf("1.0.0", ep, nad.clone());
    prev_a2["prevResult"] = fixed.out.clone();
    assert_eq!(
        cni("CHECK", "cid-a2", "net1", other_pod, &prev_a2).out["code"],
        101,
        "cid-a2 was not valid: freed"
    );
    let mut prev_b1 = conf("1.1.0", ep, nad_b);
    prev_b1["prevResult"] = on_b.out.clone();
    let kept = cni("CHECK", "cid-b1", "net1", POD, &prev_b1);
    assert_eq!((kept.code, &kept.out), (0, &Value::Null), "node-b's lease survives node-a's GC");

    let status = cni("STATUS", "", "", "", &conf("1.1.0", ep, nad.clone()));
    assert_eq!((status.code, &status.out), (0, &Value::Null));
    // Whereabouts' keys that do not apply are accepted; with log_level debug they are named.
    let log = dir.path().join("plugin.log");
    let mut chatty = nad.clone();
    chatty["datastore"] = json!("kubernetes");
    chatty["log_level"] = json!("debug");
    chatty["log_file"] = json!(log.display().to_string());
    assert_eq!(cni("DEL", "cid-a9", "net1", POD, &conf("1.0.0", ep, chatty)).code, 0);
    let logged = std::fs::read_to_string(&log).expect("debug log written");
    assert!(logged.contains("rust-ipam: ignoring ipam keys [\"datastore\"]"), "{logged}");
    assert!(logged.contains("rust-ipam: DEL cid-a9/net1 network \"rail0\""), "{logged}");

    let version = cni("VERSION", "", "", "", &json!({"cniVersion": "1.0.0"}));
    assert_eq!(version.out["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_come_as_cni_json_with_their_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerProcess::start(dir.path()).await.expect("server");
    let ep = server.endpoint.clone();
    let small = json!({"range": "10.9.0.0/30"});

    let bad_json = cni("ADD", "c", "net1", "", &json!("{not json"));
    assert_eq!((bad_json.code, bad_json.out["code"].clone()), (1, json!(6)));
    let bad_range = cni(
        "ADD",
        "c",
        "net1",
        "",
        &conf("1.0.0", &ep, json!({"range": "10.0.0.0/24", "range_start": "10.0.1.5"})),
    );
    assert_eq!(bad_range.out["code"], 7);
    assert_eq!(bad_range.out["msg"], "range_start \"10.0.1.5\" is outside range 10.0.0.0/24");
    let old = cni("ADD", "c", "net1", "", &conf("0.2.0", &ep, small.clone()));
    assert_eq!(old.out["code"], 1);
    let no_ifname = {
        let bin = workspace_bin("rust-ipam").expect("plugin");
        let out = Command::new(bin)
            .env_clear()
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", "c")
            .output()
            .expect("run");
        serde_json::from_slice::<Value>(&out.stdout).expect("json")
    };
    assert_eq!(no_ifname["code"], 4);

    // A /30 has two addresses: the third ADD is refused with the counts.
    for cid in ["a", "b"] {
        assert_eq!(cni("ADD", cid, "net1", "", &conf("1.0.0", &ep, small.clone())).code, 0);
    }
    let full = cni("ADD", "c", "net1", "", &conf("1.0.0", &ep, small.clone()));
    assert_eq!(full.out["code"], 100);
    assert_eq!(full.out["msg"], "range 10.9.0.0/30 is exhausted: size 2, held 2, excluded 0");

    // With the server gone: ADD says try again later, STATUS says not available, DEL still
    // succeeds (the lease is reclaimed later by GC or reconcile).
    server.kill_hard().expect("kill");
    let mut quick = small.clone();
    quick["timeout_ms"] = json!(1500);
    let add = cni("ADD", "d", "net1", "", &conf("1.1.0", &ep, quick.clone()));
    assert_eq!(add.out["code"], 11, "{:?}", add.out);
    let status = cni("STATUS", "", "", "", &conf("1.1.0", &ep, quick.clone()));
    assert_eq!(status.out["code"], 50);
    let del = cni("DEL", "a", "net1", "", &conf("1.1.0", &ep, quick));
    assert_eq!(del.code, 0);
    assert!(del.stderr.contains("the lease stays until GC or reconcile frees it"), "{}", del.stderr);
}

/// A replica that does not allocate: every call is UNAVAILABLE with a hint to the leader.
struct Follower {
    leader: String,
}

impl Follower {
    fn refuse<T>(&self) -> Result<tonic::Response<T>, tonic::Status> {
        let mut s = tonic::Status::unavailable("not the leader");
        s.metadata_mut()
            .insert(rust_ipam_proto::LEADER_METADATA, self.leader.parse().expect("ascii endpoint"));
        Err(s)
    }
}

#[tonic::async_trait]
impl rust_ipam_proto::v1::ipam_server::Ipam for Follower {
    async fn allocate(
        &self,
        _: tonic::Request<rust_ipam_proto::v1::AllocateRequest>,
    ) -> Result<tonic::Response<rust_ipam_proto::v1::AllocateResponse>, tonic::Status> {
        self.refuse()
    }
    async fn release(
        &self,
        _: tonic::Request<rust_ipam_proto::v1::ReleaseRequest>,
    ) -> Result<tonic::Response<rust_ipam_proto::v1::ReleaseResponse>, tonic::Status> {
        self.refuse()
    }
    async fn check(
        &self,
        _: tonic::Request<rust_ipam_proto::v1::CheckRequest>,
    ) -> Result<tonic::Response<rust_ipam_proto::v1::CheckResponse>, tonic::Status> {
        self.refuse()
    }
    async fn gc(
        &self,
        _: tonic::Request<rust_ipam_proto::v1::GcRequest>,
    ) -> Result<tonic::Response<rust_ipam_proto::v1::GcResponse>, tonic::Status> {
        self.refuse()
    }
    async fn status(
        &self,
        _: tonic::Request<rust_ipam_proto::v1::StatusRequest>,
    ) -> Result<tonic::Response<rust_ipam_proto::v1::StatusResponse>, tonic::Status> {
        self.refuse()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_sends_the_plugin_to_the_leader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let leader = ServerProcess::start(dir.path()).await.expect("server");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let follower = format!("http://{}", listener.local_addr().expect("addr"));
    let svc = rust_ipam_proto::v1::ipam_server::IpamServer::new(Follower { leader: leader.endpoint.clone() });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    // Only the follower is configured; the hint leads to the leader.
    let add = cni("ADD", "cid-h1", "net1", POD, &conf("1.0.0", &follower, json!({"range": "10.77.0.0/24"})));
    assert_eq!(add.code, 0, "{:?}", add.out);
    assert_eq!(add.out["ips"][0]["address"], "10.77.0.1/24");

    // A list of endpoints: one that refuses connections, then the leader.
    let dead = format!("http://127.0.0.1:{}", rust_ipam_e2e::free_port().expect("port"));
    let mut nad = conf("1.0.0", &dead, json!({"range": "10.77.0.0/24"}));
    nad["ipam"]["server"] = json!([dead, leader.endpoint]);
    let add = cni("ADD", "cid-h2", "net1", "K8S_POD_NAMESPACE=ai-training;K8S_POD_NAME=train-2", &nad);
    assert_eq!(add.out["ips"][0]["address"], "10.77.0.2/24", "{:?}", add.out);
}
