//! An allocation engine on the kube store, driven directly (no gRPC), for the tests of the
//! store against a real or stand-in API server.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipam_server::allocator::{AllocateRequest, Attachment, FieldPrefix, PodRef, RangeInput, RangeSpec};
use ipam_server::engine::{Engine, EngineError};
use ipam_server::k8s::store::{Fence, KubeStore};
use ipam_server::metrics::Metrics;

/// An engine on `client`'s API server whose fence is open for an hour: a server that
/// believes it leads. It lists the leases from the API server's watch cache, or from etcd
/// `page` objects a page.
pub async fn kube_engine_paged(client: kube::Client, namespace: &str, page: Option<u32>) -> (Engine, Fence) {
    let fence = Fence::new();
    fence.open_until(Instant::now() + Duration::from_secs(3600));
    let mut store = KubeStore::new(client, namespace, tokio::runtime::Handle::current(), fence.clone());
    if let Some(page) = page {
        store = store.with_page_size(page);
    }
    (Engine::start(Box::new(store), Metrics::new()).await.expect("load from the API server"), fence)
}

/// [`kube_engine_paged`], listing from the watch cache.
pub async fn kube_engine(client: kube::Client, namespace: &str) -> (Engine, Fence) {
    kube_engine_paged(client, namespace, None).await
}

/// `cidr` as a range.
pub fn range(cidr: &str) -> RangeSpec {
    RangeSpec::parse(&RangeInput { range: cidr.into(), ..Default::default() }, FieldPrefix(""))
        .expect("range")
}

/// Container `cid`'s `net1`, of pod `ml/<pod>` on node-a.
pub fn attachment(cid: &str, pod: &str) -> Arc<Attachment> {
    Arc::new(Attachment {
        container_id: cid.into(),
        ifname: "net1".into(),
        pod: PodRef { namespace: "ml".into(), name: pod.into(), uid: format!("uid-{pod}") },
        node: "node-a".into(),
        ..Default::default()
    })
}

/// One address from `cidr` for container `cid` of `pod`: the engine's answer, and in it the
/// allocator's.
pub async fn allocate(
    e: &Engine,
    cidr: &str,
    cid: &str,
    pod: &str,
) -> Result<Result<IpAddr, String>, EngineError> {
    let req = AllocateRequest {
        attachment: attachment(cid, pod),
        network: "".into(),
        ranges: vec![range(cidr)],
        requested: vec![],
    };
    e.call(move |a, now| a.allocate(&req, now).map(|l| l[0].address).map_err(|e| e.to_string())).await
}
