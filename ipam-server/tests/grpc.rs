//! The gRPC services against a real server on loopback (and a unix socket), with the
//! embedded store in a temporary directory.

use std::path::Path;
use std::time::Duration;

use ipam_server::engine::Engine;
use ipam_server::metrics::Metrics;
use ipam_server::reconcile::Reconciler;
use ipam_server::server::{Bound, Listen, serve_single};
use ipam_server::store::embedded::EmbeddedStore;
use rust_ipam_proto::connect;
use rust_ipam_proto::v1 as pb;
use rust_ipam_proto::v1::{admin_client::AdminClient, ipam_client::IpamClient};
use tonic::Code;
use tonic::transport::Channel;

struct Server {
    endpoint: String,
    metrics_addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn start(dir: &Path, extra: Option<Listen>) -> Server {
        let store = EmbeddedStore::open(dir).expect("open store");
        let metrics = Metrics::new();
        let engine = Engine::start(Box::new(store), metrics.clone()).await.expect("start engine");
        let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind metrics");
        let metrics_addr = metrics_listener.local_addr().expect("metrics addr");
        let tcp = Bound::bind(&"127.0.0.1:0".parse().expect("listen")).await.expect("bind");
        let endpoint = tcp.endpoint();
        let mut listeners = vec![tcp];
        if let Some(l) = extra {
            listeners.push(Bound::bind(&l).await.expect("bind extra"));
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve_single(
            engine,
            "test-replica".into(),
            listeners.into(),
            (metrics, Some(metrics_listener)),
            Reconciler::disabled(),
            ipam_server::pools::Pools::empty(),
            async {
                let _ = stopped.await;
            },
        ));
        Server { endpoint, metrics_addr, stop: Some(stop), task }
    }

    async fn channel(&self) -> Channel {
        connect(&self.endpoint, Duration::from_secs(5)).await.expect("connect")
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        (&mut self.task).await.expect("join").expect("server ran cleanly");
    }
}

fn attachment(cid: &str, pod: &str) -> Option<pb::Attachment> {
    Some(pb::Attachment {
        container_id: cid.into(),
        ifname: "net1".into(),
        pod: Some(pb::PodRef {
            namespace: "ai-training".into(),
            name: pod.into(),
            uid: format!("uid-{pod}"),
        }),
        node: "node-a".into(),
    })
}

fn range(r: &str, exclude: &[&str]) -> pb::Range {
    pb::Range {
        range: r.into(),
        exclude: exclude.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn alloc_req(cid: &str, pod: &str, ranges: Vec<pb::Range>) -> pb::AllocateRequest {
    pb::AllocateRequest {
        attachment: attachment(cid, pod),
        network: String::new(),
        ranges,
        requested_addresses: vec![],
        pool: String::new(),
        ..Default::default()
    }
}

fn addresses(leases: &[pb::Lease]) -> Vec<String> {
    leases.iter().map(|l| format!("{}/{}", l.address, l.prefix_len)).collect()
}

#[tokio::test]
async fn allocate_check_release_gc_over_grpc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), None).await;
    let mut ipam = IpamClient::new(server.channel().await);
    let r = || {
        vec![pb::Range {
            gateway: "192.168.100.1".into(),
            ..range("192.168.100.0/24", &["192.168.100.0/28"])
        }]
    };

    let a = ipam.allocate(alloc_req("cid-a1", "train-0", r())).await.expect("allocate").into_inner();
    assert_eq!(addresses(&a.leases), vec!["192.168.100.16/24"]);
    assert_eq!(a.leases[0].gateway, "192.168.100.1");
    assert_eq!(a.leases[0].node, "node-a");
    assert!(a.leases[0].created_unix_ms > 1_700_000_000_000);
    let again = ipam.allocate(alloc_req("cid-a1", "train-0", r())).await.expect("allocate").into_inner();
    assert_eq!(again.leases, a.leases, "same attachment, same lease");
    let b = ipam.allocate(alloc_req("cid-a2", "train-1", r())).await.expect("allocate").into_inner();
    assert_eq!(addresses(&b.leases), vec!["192.168.100.17/24"]);

    let check = |cid: &str| pb::CheckRequest {
        attachment: Some(pb::Attachment {
            container_id: cid.into(),
            ifname: "net1".into(),
            ..Default::default()
        }),
        network: String::new(),
    };
    let held = ipam.check(check("cid-a1")).await.expect("check").into_inner();
    assert_eq!(addresses(&held.leases), vec!["192.168.100.16/24"]);
    let missing = ipam.check(check("cid-none")).await.expect_err("nothing held");
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(missing.message(), "container cid-none interface net1 holds no address in network \"\"");

    let release = |cid: &str| pb::ReleaseRequest { attachment: attachment(cid, ""), network: String::new() };
    let gone = ipam.release(release("cid-a1")).await.expect("release").into_inner();
    assert_eq!(addresses(&gone.released), vec!["192.168.100.16/24"]);
    let twice = ipam.release(release("cid-a1")).await.expect("release is idempotent").into_inner();
    assert!(twice.released.is_empty());

    ipam.allocate(alloc_req("cid-a3", "train-3", r())).await.expect("allocate");
    let gc = pb::GcRequest {
        network: String::new(),
        valid_attachments: vec![pb::AttachmentKey { container_id: "cid-a3".into(), ifname: "net1".into() }],
        node: String::new(),
    };
    let no_node = ipam.gc(gc.clone()).await.expect_err("node is required");
    assert_eq!(no_node.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        no_node.message(),
        "node \"\" is required: a GC frees only the leases of the node that sent it"
    );
    let other_node = ipam.gc(pb::GcRequest { node: "node-elsewhere".into(), ..gc.clone() }).await;
    assert!(other_node.expect("gc of another node").into_inner().released.is_empty());
    let gc = pb::GcRequest { node: "node-a".into(), ..gc };
    let freed = ipam.gc(gc).await.expect("gc").into_inner();
    assert_eq!(addresses(&freed.released), vec!["192.168.100.17/24"]);
    let status = ipam.status(pb::StatusRequest {}).await.expect("status").into_inner();
    assert!(status.serving);
    assert_eq!((status.leases, status.pools, status.leader.as_str()), (1, 1, "test-replica"));
    assert!(status.store.starts_with("embedded:"), "{}", status.store);
    server.stop().await;
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_field_and_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), None).await;
    let mut ipam = IpamClient::new(server.channel().await);
    let cases: Vec<(pb::AllocateRequest, &str)> = vec![
        (
            alloc_req("c", "p", vec![range("10.0.0.0/33", &[])]),
            r#"range "10.0.0.0/33" is not a CIDR or first-last/prefix range"#,
        ),
        (
            alloc_req(
                "c",
                "p",
                vec![pb::Range { range_start: "10.0.1.5".into(), ..range("10.0.0.0/24", &[]) }],
            ),
            r#"range_start "10.0.1.5" is outside range 10.0.0.0/24"#,
        ),
        (
            alloc_req("c", "p", vec![range("10.0.0.0/24", &["10.0.0.0/23"])]),
            r#"exclude "10.0.0.0/23" leaves no usable address in range 10.0.0.0/24 (254 addresses, all excluded)"#,
        ),
        (
            alloc_req("c", "p", vec![range("10.0.0.0/24", &[]), range("fd00::/64", &["10.0.0.1"])]),
            r#"ranges[1].exclude[0] "10.0.0.1" is not an IPv6 address (range fd00::/64 is IPv6)"#,
        ),
        (
            pb::AllocateRequest {
                requested_addresses: vec!["fd00::5".into()],
                ..alloc_req("c", "p", vec![range("10.0.0.0/24", &[])])
            },
            r#"requested_addresses "fd00::5" is not in any requested range (or two addresses were requested in one range)"#,
        ),
        (
            pb::AllocateRequest {
                requested_addresses: vec!["10.0.0.300".into()],
                ..alloc_req("c", "p", vec![range("10.0.0.0/24", &[])])
            },
            r#"requested_addresses[0] "10.0.0.300" is not an IP address"#,
        ),
        (alloc_req("", "p", vec![range("10.0.0.0/24", &[])]), r#"attachment.container_id "" is empty"#),
        (alloc_req("c", "p", vec![]), r#"ranges "" is empty: at least one range is required"#),
        (
            pb::AllocateRequest { attachment: None, ..alloc_req("c", "p", vec![range("10.0.0.0/24", &[])]) },
            r#"attachment "" is missing"#,
        ),
    ];
    for (req, want) in cases {
        let err = ipam.allocate(req).await.expect_err("must be refused");
        assert_eq!((err.code(), err.message()), (Code::InvalidArgument, want));
    }
    let status = ipam.status(pb::StatusRequest {}).await.expect("status").into_inner();
    assert_eq!((status.leases, status.pools), (0, 0), "bad requests leave nothing behind");
    server.stop().await;
}

#[tokio::test]
async fn exhaustion_and_held_static_addresses_have_their_own_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), None).await;
    let mut ipam = IpamClient::new(server.channel().await);
    let r = || vec![pb::Range { gateway: "10.9.0.1".into(), ..range("10.9.0.0/29", &["10.9.0.6"]) }];
    for cid in ["a", "b", "c", "d"] {
        ipam.allocate(alloc_req(cid, cid, r())).await.expect("allocate");
    }
    let err = ipam.allocate(alloc_req("e", "e", r())).await.expect_err("exhausted");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(err.message(), "range 10.9.0.0/29 is exhausted: size 6, held 4, excluded 2");

    let dup = pb::AllocateRequest {
        requested_addresses: vec!["10.9.0.2/29".into()],
        ..alloc_req("f", "f", vec![range("10.9.0.0/24", &[])])
    };
    let err = ipam.allocate(dup).await.expect_err("held");
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(
        err.message(),
        "address 10.9.0.2 in network \"\" is already held by pod ai-training/a (container a interface net1)"
    );
    server.stop().await;
}

#[tokio::test]
async fn admin_lists_reserves_and_releases_by_hand() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), None).await;
    let ch = server.channel().await;
    let (mut ipam, mut admin) = (IpamClient::new(ch.clone()), AdminClient::new(ch));
    ipam.allocate(alloc_req("c1", "train-0", vec![range("10.50.0.0/16", &["10.50.0.0/24"])]))
        .await
        .expect("allocate");
    let mut rail = alloc_req("c2", "train-1", vec![range("10.50.0.0/16", &[])]);
    rail.network = "rail0".into();
    ipam.allocate(rail).await.expect("allocate");

    let reserved = admin
        .reserve(pb::ReserveRequest {
            network: String::new(),
            address: "10.50.1.1".into(),
            note: "router".into(),
        })
        .await
        .expect("reserve")
        .into_inner();
    assert_eq!(
        (reserved.address.as_str(), reserved.note.as_str(), reserved.prefix_len),
        ("10.50.1.1", "router", 16)
    );
    let err = admin
        .reserve(pb::ReserveRequest { network: String::new(), address: "10.50.1.0".into(), note: "x".into() })
        .await
        .expect_err("held");
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = admin
        .reserve(pb::ReserveRequest { network: String::new(), address: "10.50.9.9".into(), note: " ".into() })
        .await
        .expect_err("no note");
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "note \" \" is empty: say why, it is kept and logged")
    );

    let pools = admin
        .list_pools(pb::ListPoolsRequest { network: String::new() })
        .await
        .expect("pools")
        .into_inner()
        .pools;
    let rows: Vec<_> = pools
        .iter()
        .map(|p| (p.network.as_str(), p.size.as_str(), p.used.as_str(), p.excluded.as_str(), p.free.as_str()))
        .collect();
    assert_eq!(rows, vec![("", "65534", "2", "255", "65277"), ("rail0", "65534", "1", "0", "65533")]);

    let list = |f: pb::ListLeasesRequest| {
        let mut admin = admin.clone();
        async move { addresses(&admin.list_leases(f).await.expect("list").into_inner().leases) }
    };
    assert_eq!(
        list(pb::ListLeasesRequest::default()).await,
        vec!["10.50.1.0/16", "10.50.1.1/16", "10.50.0.1/16"]
    );
    assert_eq!(
        list(pb::ListLeasesRequest { network: Some("rail0".into()), ..Default::default() }).await,
        vec!["10.50.0.1/16"]
    );
    assert_eq!(
        list(pb::ListLeasesRequest { pod_name: "train-0".into(), ..Default::default() }).await,
        vec!["10.50.1.0/16"]
    );
    assert_eq!(
        list(pb::ListLeasesRequest { node: "node-b".into(), ..Default::default() }).await,
        Vec::<String>::new()
    );

    // Pages of two: the token continues after the last lease of the page.
    let first = admin
        .list_leases(pb::ListLeasesRequest { page_size: 2, ..Default::default() })
        .await
        .expect("page 1")
        .into_inner();
    assert_eq!(addresses(&first.leases), vec!["10.50.1.0/16", "10.50.1.1/16"]);
    assert!(!first.next_page_token.is_empty());
    let second = admin
        .list_leases(pb::ListLeasesRequest {
            page_size: 2,
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .expect("page 2")
        .into_inner();
    assert_eq!(
        (addresses(&second.leases), second.next_page_token.as_str()),
        (vec!["10.50.0.1/16".to_string()], "")
    );
    let err = admin
        .list_leases(pb::ListLeasesRequest { page_token: "zz".into(), ..Default::default() })
        .await
        .expect_err("bad token");
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "page_token \"zz\" is not a token this server returned")
    );
    let err = admin
        .list_leases(pb::ListLeasesRequest { page_size: 10_001, ..Default::default() })
        .await
        .expect_err("too big");
    assert_eq!(err.message(), "page_size \"10001\" is over the maximum 10000");

    let who = admin
        .get_lease(pb::GetLeaseRequest { network: String::new(), address: "10.50.1.0".into() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!((who.container_id.as_str(), who.pod.expect("pod").name.as_str()), ("c1", "train-0"));
    let err = admin
        .get_lease(pb::GetLeaseRequest { network: String::new(), address: "10.50.7.7".into() })
        .await
        .expect_err("free");
    assert_eq!(
        (err.code(), err.message()),
        (Code::NotFound, "address 10.50.7.7 is not held in network \"\"")
    );

    let rel = |addr: &str, reason: &str| pb::ReleaseAddressRequest {
        network: String::new(),
        address: addr.into(),
        reason: reason.into(),
    };
    let freed =
        admin.release_address(rel("10.50.1.0", "pod gone, node lost")).await.expect("release").into_inner();
    assert_eq!(freed.released.expect("lease").container_id, "c1");
    let err = admin.release_address(rel("10.50.1.0", "again")).await.expect_err("gone");
    assert_eq!(err.code(), Code::NotFound);
    // The freed address is handed out again, lowest first.
    let next = ipam
        .allocate(alloc_req("c3", "train-2", vec![range("10.50.0.0/16", &["10.50.0.0/24"])]))
        .await
        .expect("allocate");
    assert_eq!(addresses(&next.into_inner().leases), vec!["10.50.1.0/16"]);
    server.stop().await;
}

#[tokio::test]
async fn leases_survive_a_restart_and_unix_socket_serves_the_same_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("ipam.sock");
    let server = Server::start(dir.path(), Some(Listen::Unix(sock.clone()))).await;
    let mut ipam = IpamClient::new(server.channel().await);
    let r = || vec![range("fd00:50::/64", &[]), range("198.18.0.0/16", &[])];
    let first = ipam.allocate(alloc_req("c1", "v6pod", r())).await.expect("allocate").into_inner();
    assert_eq!(addresses(&first.leases), vec!["fd00:50::1/64", "198.18.0.1/16"]);
    let mut over_unix = IpamClient::new(
        connect(&format!("unix://{}", sock.display()), Duration::from_secs(5)).await.expect("unix"),
    );
    let second = over_unix.allocate(alloc_req("c2", "other", r())).await.expect("allocate").into_inner();
    assert_eq!(addresses(&second.leases), vec!["fd00:50::2/64", "198.18.0.2/16"]);
    server.stop().await;
    assert!(!sock.exists(), "socket removed on shutdown");

    let server = Server::start(dir.path(), None).await;
    let mut ipam = IpamClient::new(server.channel().await);
    let same = ipam.allocate(alloc_req("c1", "v6pod", r())).await.expect("allocate").into_inner();
    assert_eq!(same.leases, first.leases, "the lease came back from disk unchanged");
    let third = ipam.allocate(alloc_req("c3", "third", r())).await.expect("allocate").into_inner();
    assert_eq!(addresses(&third.leases), vec!["fd00:50::3/64", "198.18.0.3/16"]);
    server.stop().await;
}

#[tokio::test]
async fn health_reports_serving() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), None).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["rustipam.v1.Ipam", "rustipam.v1.Admin", ""] {
        let r =
            health.check(HealthCheckRequest { service: service.into() }).await.expect("health").into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service}");
    }
    server.stop().await;
}

/// A plain HTTP/1.0 GET; returns (status line, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let (head, body) = http_response(addr, path).await;
    (head.lines().next().unwrap_or_default().to_string(), body)
}

/// A plain HTTP/1.0 GET; returns (head, body).
async fn http_response(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect metrics");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("http response");
    (head.to_string(), body.to_string())
}

#[tokio::test]
async fn metrics_count_requests_and_show_pools() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), None).await;
    let mut ipam = IpamClient::new(server.channel().await);
    let r = || vec![range("10.9.0.0/30", &[])];
    for cid in ["a", "b"] {
        ipam.allocate(alloc_req(cid, cid, r())).await.expect("allocate");
    }
    ipam.allocate(alloc_req("c", "c", r())).await.expect_err("exhausted");
    ipam.allocate(alloc_req("d", "d", vec![range("fd00::/64", &[])])).await.expect("allocate");

    let (head, body) = http_response(server.metrics_addr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
    // What Prometheus needs to pick its parser: the body is OpenMetrics, ending # EOF.
    assert!(
        head.lines().any(|l| l.eq_ignore_ascii_case(
            "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"
        )),
        "{head}"
    );
    assert_eq!(body.lines().last(), Some("# EOF"));
    for line in [
        // The embedded store's one replica leads.
        "rustipam_leader 1",
        r#"rustipam_requests_total{rpc="rustipam.v1.Ipam/Allocate",code="Ok"} 3"#,
        r#"rustipam_requests_total{rpc="rustipam.v1.Ipam/Allocate",code="ResourceExhausted"} 1"#,
        r#"rustipam_pool_free{network="",range="10.9.0.0/30"} 0.0"#,
        r#"rustipam_pool_used{network="",range="10.9.0.0/30"} 2.0"#,
        r#"rustipam_pool_size{network="",range="fd00::/64"} 18446744073709553000.0"#,
        "rustipam_leases 3",
        "rustipam_serving 1",
        "rustipam_store_commit_failures_total 0",
    ] {
        assert!(body.lines().any(|l| l == line), "missing {line:?} in:\n{body}");
    }
    let commits = body
        .lines()
        .find(|l| l.starts_with("rustipam_store_commit_seconds_count"))
        .expect("commit histogram");
    assert_ne!(commits, "rustipam_store_commit_seconds_count 0");
    assert_eq!(http_get(server.metrics_addr, "/readyz").await, ("HTTP/1.0 200 OK".into(), "ready\n".into()));
    assert_eq!(http_get(server.metrics_addr, "/healthz").await.0, "HTTP/1.0 200 OK");
    assert_eq!(http_get(server.metrics_addr, "/nope").await.0, "HTTP/1.0 404 Not Found");
    server.stop().await;
}
