//! The test API server itself: it starts from `$KUBEBUILDER_ASSETS` (or envtest's default
//! directory, or PATH), serves our CRDs, and enforces deploy/'s RBAC on the accounts each
//! test namespace gets, so the other kube tests exercise exactly the shipped permissions.

use rust_ipam_e2e::envtest::{self, NODE_ACCOUNT, SERVER_ACCOUNT};
use rust_ipam_e2e::fixtures::{API_VERSION, iplease};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_have_deploys_permissions_and_no_more() {
    let Some(env) = envtest::shared("accounts_have_deploys_permissions_and_no_more") else { return };
    let ns = env.namespace("rbac").await.expect("namespace");
    let server = ns.client(SERVER_ACCOUNT).await.expect("server client");
    let lease = iplease(
        "198.18.0.1",
        json!({"address": "198.18.0.1", "prefixLen": 24, "containerId": "c1", "ifname": "net1",
               "podRef": "a/b", "node": "n", "createdUnixMs": 0}),
    );
    envtest::create(&server, Some(&ns.name), lease.clone()).await.expect("the server may create IPLeases");
    let listed = envtest::list(&server, Some(&ns.name), API_VERSION, "IPLease").await;
    assert_eq!(listed.expect("the server may list IPLeases").len(), 1);

    // Not granted: the node account writes no leases, the server creates no pods, and
    // neither reaches another namespace's leases.
    let node = ns.client(NODE_ACCOUNT).await.expect("node client");
    let err = envtest::create(&node, Some(&ns.name), lease).await.expect_err("node may not create leases");
    assert!(format!("{err:#}").contains("forbidden"), "{err:#}");
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                     "spec": {"containers": [{"name": "c", "image": "pause"}]}});
    let err = envtest::create(&server, Some(&ns.name), pod).await.expect_err("server may not create pods");
    assert!(format!("{err:#}").contains("forbidden"), "{err:#}");
    let other = env.namespace("rbac-other").await.expect("namespace");
    let err = envtest::list(&server, Some(&other.name), API_VERSION, "IPLease")
        .await
        .expect_err("another namespace's leases");
    assert!(format!("{err:#}").contains("forbidden"), "{err:#}");
}
