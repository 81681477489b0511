//! `--authorize` against a real API server: node identities from pod-bound ServiceAccount
//! tokens (TokenRequest with a boundObjectRef, checked by the server's TokenReview under
//! deploy/'s RBAC) and from client certificates; admins from `--admin` and the server's
//! own user on a unix socket. Each refusal is asserted by its gRPC code and its message (the
//! identity and the node), and by what the store still holds afterwards.

use std::time::Duration;

use rust_ipam_e2e::envtest::{self, SERVER_ACCOUNT, TestNamespace, create, token_request};
use rust_ipam_e2e::pki::Ca;
use rust_ipam_e2e::relay::Relay;
use rust_ipam_e2e::{ServerOptions, ServerProcess, run_ipam_plugin};
use rust_ipam_proto::v1 as pb;
use rust_ipam_proto::v1::admin_client::AdminClient;
use rust_ipam_proto::v1::ipam_client::IpamClient;
use rust_ipam_proto::{Bearer, ClientTls, connect, connect_with};
use serde_json::json;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const NODE_ACCOUNT: &str = "rust-ipam-node";
const ADMIN_ACCOUNT: &str = "rust-ipam-reconcile";
const AUDIENCE: &str = "rust-ipam";

/// A pod on `node` (nothing runs it) and a token of the node account bound to it.
async fn node_token(ns: &TestNamespace, pod: &str, node: &str) -> String {
    let admin = ns.admin_client().await.expect("admin client");
    let obj = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod},
                     "spec": {"nodeName": node, "serviceAccountName": NODE_ACCOUNT,
                              "containers": [{"name": "node", "image": "registry.k8s.io/pause:3.10"}]}});
    let stored = create(&admin, Some(&ns.name), obj).await.expect("pod");
    let uid = stored["metadata"]["uid"].as_str().expect("uid");
    let spec = json!({"audiences": [AUDIENCE], "expirationSeconds": 3600,
                      "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": uid}});
    token_request(&admin, &ns.name, NODE_ACCOUNT, spec).await.expect("node token")
}

/// A token of `account`, for our audience, bound to nothing.
async fn account_token(ns: &TestNamespace, account: &str) -> String {
    let admin = ns.admin_client().await.expect("admin client");
    token_request(&admin, &ns.name, account, json!({"audiences": [AUDIENCE], "expirationSeconds": 3600}))
        .await
        .expect("token")
}

fn authorize_args(ns: &TestNamespace) -> Vec<String> {
    [
        "--authorize",
        "--node-service-account",
        &format!("{}/{NODE_ACCOUNT}", ns.name),
        "--admin",
        &format!("system:serviceaccount:{}:{ADMIN_ACCOUNT}", ns.name),
        "--admin",
        "ops-admin",
    ]
    .map(String::from)
    .to_vec()
}

/// A server on the kube store in `ns` under `--authorize`, as deploy/'s ServiceAccount,
/// serving; its data and log in `dir`.
async fn kube_server(ns: &TestNamespace, identity: &str, dir: &std::path::Path) -> ServerProcess {
    let extra = authorize_args(ns);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut opts = ServerOptions::kube_replica(
        identity,
        &ns.kubeconfig(SERVER_ACCOUNT),
        &ns.name,
        dir.join("s.log"),
        &extra,
    );
    opts.wait_serving = true;
    ServerProcess::start_with(dir, &opts).await.expect("server")
}

type Ipam = IpamClient<InterceptedService<Channel, Bearer>>;

async fn ipam(endpoint: &str, token: Option<&str>) -> Ipam {
    let ch = connect(endpoint, Duration::from_secs(5)).await.expect("connect");
    IpamClient::with_interceptor(ch, Bearer::new(token).expect("bearer"))
}

fn attachment(cid: &str, node: &str) -> Option<pb::Attachment> {
    Some(pb::Attachment {
        container_id: cid.into(),
        ifname: "net1".into(),
        node: node.into(),
        ..Default::default()
    })
}

fn allocate(cid: &str, node: &str) -> pb::AllocateRequest {
    pb::AllocateRequest {
        attachment: attachment(cid, node),
        network: "authz".into(),
        ranges: vec![pb::Range { range: "10.77.0.0/24".into(), ..Default::default() }],
        ..Default::default()
    }
}

fn release(cid: &str) -> pb::ReleaseRequest {
    pb::ReleaseRequest { attachment: attachment(cid, ""), network: "authz".into() }
}

/// The status of a refused call; panics on success.
fn refused<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Status {
    r.expect_err("refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_act_only_for_their_own_node_and_admin_needs_an_admin() {
    let Some(env) = envtest::shared("nodes_act_only_for_their_own_node_and_admin_needs_an_admin") else {
        return;
    };
    let ns = env.namespace("authz").await.expect("namespace");
    let dir = tempfile::tempdir().expect("tempdir");
    let server = kube_server(&ns, "authz", dir.path()).await;
    let who = format!("system:serviceaccount:{}:{NODE_ACCOUNT}", ns.name);

    let token_a = node_token(&ns, "node-a-agent", "node-a").await;
    let token_b = node_token(&ns, "node-b-agent", "node-b").await;
    let mut a = ipam(&server.endpoint, Some(&token_a)).await;
    let mut b = ipam(&server.endpoint, Some(&token_b)).await;

    // node-a allocates for itself; a request naming no node is recorded on the caller's.
    let got = a.allocate(allocate("pod-a1", "node-a")).await.expect("own node").into_inner();
    assert_eq!(got.leases[0].node, "node-a");
    let got = a.allocate(allocate("pod-a2", "")).await.expect("no node named").into_inner();
    assert_eq!(got.leases[0].node, "node-a", "the caller's node is recorded");
    let a1 = got.leases[0].address.clone();

    // node-b may not allocate for node-a, nor release, check or GC node-a's attachments.
    let s = refused(b.allocate(allocate("pod-x", "node-a")).await);
    assert_eq!(s.code(), Code::PermissionDenied);
    assert_eq!(s.message(), format!("Allocate: {who} (node node-b) may not act for node node-a"));
    let s = refused(b.release(release("pod-a2")).await);
    assert_eq!(s.code(), Code::PermissionDenied);
    assert_eq!(
        s.message(),
        format!("Release: {who} (node node-b) may not act on leases recorded for node \"node-a\"")
    );
    let s = refused(
        b.check(pb::CheckRequest { attachment: attachment("pod-a2", ""), network: "authz".into() }).await,
    );
    assert_eq!(s.code(), Code::PermissionDenied);
    let s = refused(
        b.gc(pb::GcRequest { network: "authz".into(), node: "node-a".into(), ..Default::default() }).await,
    );
    assert_eq!(s.code(), Code::PermissionDenied);
    assert_eq!(s.message(), format!("Gc: {who} (node node-b) may not act for node node-a"));
    // Its own GC frees nothing of node-a's.
    b.gc(pb::GcRequest { network: "authz".into(), node: "node-b".into(), ..Default::default() })
        .await
        .expect("own gc");
    let held =
        a.check(pb::CheckRequest { attachment: attachment("pod-a2", ""), network: "authz".into() }).await;
    assert_eq!(
        held.expect("still held").into_inner().leases[0].address,
        a1,
        "node-a's lease survived node-b"
    );

    // Bad tokens: garbage, another audience, expired, none at all.
    for (what, token) in [
        ("garbage", "not-a-token".to_string()),
        ("another audience", {
            let admin = ns.admin_client().await.expect("admin");
            token_request(&admin, &ns.name, NODE_ACCOUNT, json!({"expirationSeconds": 3600}))
                .await
                .expect("token")
        }),
        ("expired", env.expired_copy(&token_a).expect("expired copy")),
    ] {
        let s =
            refused(ipam(&server.endpoint, Some(&token)).await.allocate(allocate("pod-z", "node-a")).await);
        assert_eq!(s.code(), Code::Unauthenticated, "{what}: {s:?}");
        assert!(
            s.message().starts_with("Allocate: the token was refused by the API server"),
            "{what}: {s:?}"
        );
        if what == "expired" {
            assert!(s.message().contains("expired"), "{what}: {s:?}");
        }
    }
    let s = refused(ipam(&server.endpoint, None).await.allocate(allocate("pod-z", "node-a")).await);
    assert_eq!(s.code(), Code::Unauthenticated);
    assert_eq!(s.message(), "Allocate: no ServiceAccount token and no client certificate");

    // Admin: a node is not one, nor is an account that is neither node nor admin; the
    // --admin account is.
    let admin_rpc = |token: String| {
        let endpoint = server.endpoint.clone();
        async move {
            let ch = connect(&endpoint, Duration::from_secs(5)).await.expect("connect");
            AdminClient::with_interceptor(ch, Bearer::new(Some(&token)).expect("bearer"))
                .list_leases(pb::ListLeasesRequest { network: Some("authz".into()), ..Default::default() })
                .await
        }
    };
    let s = refused(admin_rpc(token_a.clone()).await);
    assert_eq!(s.code(), Code::PermissionDenied);
    assert_eq!(s.message(), format!("ListLeases: {who} (node node-a) is not an admin (--admin)"));
    let server_token = account_token(&ns, SERVER_ACCOUNT).await;
    let s = refused(admin_rpc(server_token.clone()).await);
    assert_eq!(s.code(), Code::PermissionDenied);
    let s = refused(
        ipam(&server.endpoint, Some(&server_token)).await.allocate(allocate("pod-s", "node-a")).await,
    );
    assert_eq!(s.code(), Code::PermissionDenied, "an account that is not a node's speaks for no node");
    let leases = admin_rpc(account_token(&ns, ADMIN_ACCOUNT).await).await.expect("admin").into_inner().leases;
    assert_eq!(leases.len(), 2, "{leases:?}");

    // Refusals are counted.
    let (_, metrics) = server.http_get("/metrics").await.expect("metrics");
    for rpc in ["Allocate", "Release", "Check", "Gc", "ListLeases"] {
        assert!(
            metrics.contains(&format!("rustipam_authz_denied_total{{rpc=\"{rpc}\"}}")),
            "{rpc}:\n{metrics}"
        );
    }
    assert!(metrics.contains("rustipam_authz_unauthenticated_total 4"), "{metrics}");

    // The CNI plugin sends its token_file; a refusal is a clean CNI error.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token_b).expect("token file");
    let conf = json!({"cniVersion": "1.0.0", "name": "authz", "type": "rust-ipam",
        "ipam": {"type": "rust-ipam", "range": "10.77.0.0/24", "network_name": "authz",
                 "server": server.endpoint, "token_file": token_file, "node_name": "node-b"}});
    let out = run_ipam_plugin("ADD", "pod-b1", "K8S_POD_NAMESPACE=authz;K8S_POD_NAME=pod-b1", &conf);
    assert_eq!(out.code, 0, "{out:?}");
    let mut other = conf.clone();
    other["ipam"]["node_name"] = json!("node-a");
    let out = run_ipam_plugin("ADD", "pod-b2", "K8S_POD_NAMESPACE=authz;K8S_POD_NAME=pod-b2", &other);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.out["details"], "PermissionDenied", "{out:?}");
    assert!(
        out.out["msg"].as_str().unwrap_or_default().contains("(node node-b) may not act for node node-a"),
        "{out:?}"
    );
}

/// With the embedded store the API server is needed only to review tokens: while it cannot
/// be reached, a node whose token was reviewed before keeps allocating; a token never seen
/// cannot be verified and is answered UNAVAILABLE (the plugin tries again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_nodes_keep_allocating_while_the_api_server_is_unreachable() {
    let Some(env) = envtest::shared("verified_nodes_keep_allocating_while_the_api_server_is_unreachable")
    else {
        return;
    };
    let ns = env.namespace("authzdown").await.expect("namespace");
    let api: std::net::SocketAddr = env.url.trim_start_matches("https://").parse().expect("api addr");
    let relay = Relay::start(api).await.expect("relay");
    let kubeconfig =
        ns.kubeconfig_via(SERVER_ACCOUNT, &format!("https://{}", relay.addr)).expect("kubeconfig");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = authorize_args(&ns);
    // Every call reviews its token again, so the outage is met on the first call after it.
    args.extend(
        ["--store", "embedded", "--kubeconfig", &kubeconfig.display().to_string(), "--token-cache", "0s"]
            .map(String::from),
    );
    let opts = ServerOptions { args, log_file: Some(dir.path().join("s.log")), ..ServerOptions::default() };
    let server = ServerProcess::start_with(dir.path(), &opts).await.expect("server");

    let token_a = node_token(&ns, "node-a-agent", "node-a").await;
    let token_b = node_token(&ns, "node-b-agent", "node-b").await;
    let mut a = ipam(&server.endpoint, Some(&token_a)).await;
    a.allocate(allocate("pod-a1", "node-a")).await.expect("reviewed");

    relay.freeze();
    let got = a.allocate(allocate("pod-a2", "node-a")).await.expect("allocates on the earlier review");
    assert_eq!(got.into_inner().leases[0].node, "node-a");
    let s = refused(a.allocate(allocate("pod-a3", "node-b")).await);
    assert_eq!(s.code(), Code::PermissionDenied, "the earlier review still binds it to node-a");
    let s =
        refused(ipam(&server.endpoint, Some(&token_b)).await.allocate(allocate("pod-b1", "node-b")).await);
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert!(
        s.message().starts_with("Allocate: cannot verify the token: the API server did not answer"),
        "{s:?}"
    );
}

/// A client certificate speaks for the node it names (`system:node:NAME`); an admin
/// certificate's CN is on `--admin`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_speaks_for_the_node_it_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server_ca, client_ca) = (Ca::new("server-ca"), Ca::new("client-ca"));
    let (cert, key) = server_ca.issue("rust-ipam-server", &["127.0.0.1"]);
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    };
    let args = [
        "--tls-cert".to_string(),
        write("server.crt", &cert),
        "--tls-key".into(),
        write("server.key", &key),
        "--tls-client-ca".into(),
        write("client-ca.crt", &client_ca.pem),
        "--authorize".into(),
        "--admin".into(),
        "ops-admin".into(),
    ]
    .to_vec();
    let node_c = client_ca.issue("system:node:node-c", &[]);
    let tls = |id: &(String, String)| ClientTls {
        ca: server_ca.pem.clone().into_bytes(),
        identity: Some((id.0.clone().into_bytes(), id.1.clone().into_bytes())),
    };
    let opts = ServerOptions { args, tls: Some(tls(&node_c)), ..ServerOptions::default() };
    let server = ServerProcess::start_with(dir.path(), &opts).await.expect("server");
    let channel = |id: &(String, String)| {
        let (endpoint, tls) = (server.endpoint.clone(), tls(id));
        async move { connect_with(&endpoint, Duration::from_secs(5), Some(&tls)).await.expect("connect") }
    };
    let mut c = IpamClient::new(channel(&node_c).await);
    let got = c.allocate(allocate("pod-c1", "")).await.expect("own node").into_inner();
    assert_eq!(got.leases[0].node, "node-c");
    let s = refused(c.allocate(allocate("pod-c2", "node-a")).await);
    assert_eq!(s.code(), Code::PermissionDenied);
    assert_eq!(
        s.message(),
        "Allocate: certificate system:node:node-c (node node-c) may not act for node node-a"
    );
    let s =
        refused(AdminClient::new(channel(&node_c).await).list_pools(pb::ListPoolsRequest::default()).await);
    assert_eq!(s.code(), Code::PermissionDenied);
    let ops = client_ca.issue("ops-admin", &[]);
    let pools = AdminClient::new(channel(&ops).await).list_pools(pb::ListPoolsRequest::default()).await;
    assert_eq!(pools.expect("admin").into_inner().pools.len(), 1);
}

/// On a unix socket the server's own user (here: the test's) is an admin without a token;
/// the same call over TCP is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_own_user_on_a_unix_socket_is_an_admin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("admin.sock");
    let args = ["--authorize".to_string()].to_vec();
    let opts = ServerOptions { args, unix_socket: Some(sock.clone()), ..ServerOptions::default() };
    let server = ServerProcess::start_with(dir.path(), &opts).await.expect("server");
    let local = connect(&format!("unix://{}", sock.display()), Duration::from_secs(5)).await.expect("socket");
    let pools = AdminClient::new(local).list_pools(pb::ListPoolsRequest::default()).await;
    assert!(pools.expect("admin over the socket").into_inner().pools.is_empty());
    let tcp = connect(&server.endpoint, Duration::from_secs(5)).await.expect("tcp");
    let s = refused(AdminClient::new(tcp).list_pools(pb::ListPoolsRequest::default()).await);
    assert_eq!(s.code(), Code::Unauthenticated);
}

/// A pool with a namespaceSelector gives addresses by the pod's namespace, so a node may
/// allocate from it only for a pod the API server places on that node: otherwise a node
/// could name a pod of an admitted namespace that runs elsewhere (or does not exist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_selected_pool_serves_a_node_only_its_own_pods() {
    const TEST: &str = "a_namespace_selected_pool_serves_a_node_only_its_own_pods";
    let Some(env) = envtest::shared(TEST) else { return };
    let ns = env.namespace("authzsel").await.expect("namespace");
    let admin = ns.admin_client().await.expect("admin client");
    // IPPools are cluster-wide: named after this test's namespace.
    let pool = format!("{}-sel", ns.name);
    let obj = json!({"apiVersion": "ipam.rust-ipam.io/v1alpha1", "kind": "IPPool", "metadata": {"name": pool},
        "spec": {"ranges": [{"range": "10.78.0.0/24"}],
                 "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name}}}});
    create(&admin, None, obj).await.expect("IPPool");
    for (pod, node) in [("mine", "node-a"), ("theirs", "node-b")] {
        let obj = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod},
                         "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]}});
        create(&admin, Some(&ns.name), obj).await.expect("pod");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let server = kube_server(&ns, "authzsel", dir.path()).await;
    let who = format!("system:serviceaccount:{}:{NODE_ACCOUNT}", ns.name);
    let token_a = node_token(&ns, "node-a-agent", "node-a").await;
    let mut a = ipam(&server.endpoint, Some(&token_a)).await;
    let for_pod = |cid: &str, pod: &str| pb::AllocateRequest {
        attachment: Some(pb::Attachment {
            container_id: cid.into(),
            ifname: "net1".into(),
            pod: Some(pb::PodRef { namespace: ns.name.clone(), name: pod.into(), uid: String::new() }),
            node: "node-a".into(),
        }),
        pool: pool.clone(),
        ..Default::default()
    };

    // Its own pod: served, once the server has read the pool and the namespace's labels.
    let started = std::time::Instant::now();
    let got = loop {
        match a.allocate(for_pod("c-mine", "mine")).await {
            Ok(r) => break r.into_inner(),
            Err(s) if started.elapsed() < Duration::from_secs(30) && s.code() != Code::PermissionDenied => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(s) => panic!("node-a allocating for its own pod: {s:?}"),
        }
    };
    assert_eq!(got.leases[0].address, "10.78.0.1");

    // A pod of the admitted namespace on node-b, and a pod that does not exist: refused,
    // naming the pod and the nodes, and nothing is held for them.
    for (cid, pod, why) in [
        ("c-theirs", "theirs", "it is on node node-b, not node-a"),
        ("c-ghost", "ghost", "there is no such pod"),
    ] {
        let s = refused(a.allocate(for_pod(cid, pod)).await);
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(
            s.message(),
            format!("Allocate: {who} (node node-a) may not allocate for pod {}/{pod}: {why}", ns.name)
        );
    }
    let mut wrong_uid = for_pod("c-mine2", "mine");
    if let Some(p) = wrong_uid.attachment.as_mut().and_then(|a| a.pod.as_mut()) {
        p.uid = "not-its-uid".into();
    }
    let s = refused(a.allocate(wrong_uid).await);
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().ends_with(r#"its UID is not "not-its-uid""#), "{}", s.message());

    let ch = connect(&server.endpoint, Duration::from_secs(5)).await.expect("connect");
    let admin_token = account_token(&ns, ADMIN_ACCOUNT).await;
    let mut admin_rpc = AdminClient::with_interceptor(ch, Bearer::new(Some(&admin_token)).expect("bearer"));
    let held = admin_rpc
        .list_leases(pb::ListLeasesRequest { network: Some(pool.clone()), ..Default::default() })
        .await
        .expect("list")
        .into_inner();
    let cids: Vec<&str> = held.leases.iter().map(|l| l.container_id.as_str()).collect();
    assert_eq!(cids, ["c-mine"], "only the served pod holds an address");
}
