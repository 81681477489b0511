//! What the tests build and read the same way: an Allocate request, a server's Status and
//! leases over gRPC, and our custom resources in an API server.

use std::time::Duration;

use rust_ipam_proto::v1 as pb;
use rust_ipam_proto::v1::{admin_client::AdminClient, ipam_client::IpamClient};
use serde_json::{Value, json};

use crate::envtest;

/// apiVersion of IPLease and RangePool.
pub const API_VERSION: &str = "ipam.rust-ipam.io/v1alpha1";

/// The path of the IPLease collection of `namespace`, as the API serves it.
pub fn ipleases_path(namespace: &str) -> String {
    format!("/apis/{API_VERSION}/namespaces/{namespace}/ipleases")
}

/// An IPLease object named `name` with `spec` as it is, valid or not.
pub fn iplease(name: &str, spec: Value) -> Value {
    json!({"apiVersion": API_VERSION, "kind": "IPLease", "metadata": {"name": name}, "spec": spec})
}

/// A pod reference.
pub fn pod(namespace: &str, name: &str, uid: &str) -> pb::PodRef {
    pb::PodRef { namespace: namespace.into(), name: name.into(), uid: uid.into() }
}

/// An Allocate for container `cid`'s `net1` (of `pod`, on `node`): one address from `range`
/// in the default network.
pub fn allocate_request(cid: &str, pod: Option<pb::PodRef>, node: &str, range: &str) -> pb::AllocateRequest {
    pb::AllocateRequest {
        attachment: Some(pb::Attachment {
            container_id: cid.into(),
            ifname: "net1".into(),
            pod,
            node: node.into(),
        }),
        network: String::new(),
        ranges: vec![pb::Range { range: range.into(), ..Default::default() }],
        requested_addresses: Vec::new(),
        pool: String::new(),
        ..Default::default()
    }
}

/// The Status of the server at `endpoint`; `None` when it does not answer.
pub async fn status(endpoint: &str) -> Option<pb::StatusResponse> {
    let ch = rust_ipam_proto::connect(endpoint, Duration::from_millis(500)).await.ok()?;
    IpamClient::new(ch).status(pb::StatusRequest {}).await.ok().map(|r| r.into_inner())
}

/// Every lease `filter` selects on the server at `endpoint` (its Admin service), through
/// every page. Panics when the server does not answer.
pub async fn leases(endpoint: &str, filter: pb::ListLeasesRequest) -> Vec<pb::Lease> {
    let ch = rust_ipam_proto::connect(endpoint, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("connecting to {endpoint}: {e}"));
    let mut admin = AdminClient::new(ch);
    let (mut req, mut out) = (filter, Vec::new());
    loop {
        let page = admin
            .list_leases(req.clone())
            .await
            .unwrap_or_else(|e| panic!("ListLeases on {endpoint}: {e}"))
            .into_inner();
        out.extend(page.leases);
        if page.next_page_token.is_empty() {
            return out;
        }
        req.page_token = page.next_page_token;
    }
}

/// The objects of our `kind` (IPLease, RangePool) in `namespace`, listed by `client`.
/// Panics when the API server refuses.
pub async fn objects(client: &kube::Client, namespace: &str, kind: &str) -> Vec<Value> {
    envtest::list(client, Some(namespace), API_VERSION, kind)
        .await
        .unwrap_or_else(|e| panic!("listing {kind} in {namespace}: {e:#}"))
}

/// An IPLease object as the tests compare it: its name and holder ("" for what it lacks).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseObject {
    pub name: String,
    pub address: String,
    pub container_id: String,
    pub pod_uid: String,
}

impl LeaseObject {
    /// Reads an IPLease object.
    pub fn of(object: &Value) -> LeaseObject {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let spec = &object["spec"];
        LeaseObject {
            name: text(&object["metadata"]["name"]),
            address: text(&spec["address"]),
            container_id: text(&spec["containerId"]),
            pod_uid: text(&spec["podUid"]),
        }
    }
}

/// The IPLease objects in `namespace`, listed by `client`, in the API server's order.
pub async fn lease_objects(client: &kube::Client, namespace: &str) -> Vec<LeaseObject> {
    objects(client, namespace, "IPLease").await.iter().map(LeaseObject::of).collect()
}

/// (container ID, address) of every IPLease object in `namespace`, listed by `client`, sorted.
pub async fn held_by_container(client: &kube::Client, namespace: &str) -> Vec<(String, String)> {
    let mut held: Vec<(String, String)> =
        lease_objects(client, namespace).await.into_iter().map(|o| (o.container_id, o.address)).collect();
    held.sort();
    held
}

/// The device-plugin resource name of the VFs [`dra_rail_claim`] allocates.
pub const DRA_VF_RESOURCE: &str = "example.com/rail_vf";

/// What a DRA driver and the scheduler write for a pod's ResourceClaim `rails` in
/// `namespace` on node `node`: a ResourceSlice of three VFs (with Multus' device attributes
/// `k8s.cni.cncf.io/resourceName` = [`DRA_VF_RESOURCE`] and `k8s.cni.cncf.io/deviceID`) and
/// a GPU, the claim asking for the GPU and two VFs, and its allocation: the GPU, then vf-2
/// and vf-0. Returns the VFs' device IDs in the claim's order, which the pod's networks of
/// that resource get one each.
pub async fn dra_rail_claim(
    admin: &kube::Client,
    namespace: &str,
    node: &str,
) -> anyhow::Result<[&'static str; 2]> {
    let driver = format!("vf-{namespace}.example.com");
    let vf = |name: &str, id: &str| {
        json!({"name": name, "attributes": {
            "k8s.cni.cncf.io/resourceName": {"string": DRA_VF_RESOURCE},
            "k8s.cni.cncf.io/deviceID": {"string": id}}})
    };
    let slice = json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice", "metadata": {"name": format!("{namespace}-{node}")},
        "spec": {"driver": driver, "nodeName": node, "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": [vf("vf-0", "0000:3b:00.2"), vf("vf-1", "0000:3b:00.3"), vf("vf-2", "0000:3b:00.4"),
                {"name": "gpu-0", "attributes": {"model": {"string": "h100"}}}]}});
    envtest::create(admin, None, slice).await?;
    let claim = json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim", "metadata": {"name": "rails"},
        "spec": {"devices": {"requests": [
            {"name": "gpu", "exactly": {"deviceClassName": "gpu.example.com"}},
            {"name": "vf", "exactly": {"deviceClassName": "vf.example.com", "count": 2, "allocationMode": "ExactCount"}}]}}});
    envtest::create(admin, Some(namespace), claim).await?;
    let result = |request: &str, device: &str| json!({"request": request, "driver": driver, "pool": node, "device": device});
    let status = json!({"status": {"allocation": {"devices": {"results": [
        result("gpu", "gpu-0"), result("vf", "vf-2"), result("vf", "vf-0")]}}}});
    let claims: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        admin.clone(),
        namespace,
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("resource.k8s.io", "v1", "ResourceClaim"),
            "resourceclaims",
        ),
    );
    claims
        .patch_status("rails", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&status))
        .await?;
    Ok(["0000:3b:00.4", "0000:3b:00.2"])
}
