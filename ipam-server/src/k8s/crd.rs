//! The custom resources that hold rust-ipam's state in a cluster (API group
//! `ipam.rust-ipam.io`, version v1alpha1).
//!
//! One [`IPLease`] object per held address, named from its network and address, so the API
//! server itself refuses a second holder: creating an existing name fails with
//! AlreadyExists, whichever server tries. Every object stays a few hundred bytes whatever
//! the range size. One [`RangePool`] per range keeps the range as configured and its usage
//! in status. An [`IPPool`] is a pool NADs name: ranges, routes, DNS and a cooldown kept
//! outside the NADs, with its usage in status.

// Each `printcolumn(...)` repeats the same keys, which this lint takes for a mistake.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::allocator::{Attachment, Lease, Owner, PodRef, RangeInput};

/// One held address.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ipam.rust-ipam.io",
    version = "v1alpha1",
    kind = "IPLease",
    plural = "ipleases",
    shortname = "ipl",
    namespaced,
    printcolumn(name = "Address", type_ = "string", json_path = ".spec.address"),
    printcolumn(name = "Network", type_ = "string", json_path = ".spec.network"),
    printcolumn(name = "Pod", type_ = "string", json_path = ".spec.podRef"),
    printcolumn(name = "Interface", type_ = "string", json_path = ".spec.ifname"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "Note", type_ = "string", json_path = ".spec.note", priority = 1),
    printcolumn(name = "Owner", type_ = "string", json_path = ".spec.owner.name", priority = 1),
    printcolumn(name = "Kept", type_ = "boolean", json_path = ".spec.kept", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct IPLeaseSpec {
    /// The network the address is unique in ("" is the default network).
    #[serde(default)]
    pub network: String,
    /// The held address.
    pub address: String,
    /// The range it came from, as configured ("" for a reservation outside any range).
    #[serde(default)]
    pub range: String,
    /// Prefix length of that range.
    pub prefix_len: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Container (sandbox) ID of the holder; empty for a manual reservation.
    #[serde(default)]
    pub container_id: String,
    #[serde(default)]
    pub ifname: String,
    /// `namespace/name` of the pod.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_ref: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_uid: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// When the address was first given to this holder (milliseconds since the epoch); kept
    /// when the pod moves to a new sandbox.
    pub created_unix_ms: i64,
    /// Reason of a manual reservation.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
    /// Who the address belongs to beyond the sandbox: its StatefulSet (kept for the pod's
    /// name and interface while the set wants the ordinal) or an IPAMClaim (kept until
    /// the claim is deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<LeaseOwner>,
    /// The holder's sandbox is gone and the address is kept for the owner's next one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kept: bool,
}

/// The owner of a lease (see [`Owner`]), in the pod's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LeaseOwner {
    /// `StatefulSet` or `IPAMClaim`.
    pub kind: String,
    pub name: String,
    /// The StatefulSet's UID.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

impl From<&Owner> for LeaseOwner {
    fn from(o: &Owner) -> LeaseOwner {
        match o {
            Owner::StatefulSet { name, uid } => {
                LeaseOwner { kind: "StatefulSet".into(), name: name.clone(), uid: uid.clone() }
            }
            Owner::Claim { name } => {
                LeaseOwner { kind: "IPAMClaim".into(), name: name.clone(), uid: String::new() }
            }
        }
    }
}

impl LeaseOwner {
    /// The owner as the allocator takes it.
    fn to_owner(&self) -> Result<Owner, BadObject> {
        match self.kind.as_str() {
            "StatefulSet" => Ok(Owner::StatefulSet { name: self.name.clone(), uid: self.uid.clone() }),
            "IPAMClaim" => Ok(Owner::Claim { name: self.name.clone() }),
            other => Err(BadObject::Field {
                field: "owner.kind",
                value: other.to_string(),
                reason: "is not StatefulSet or IPAMClaim".into(),
            }),
        }
    }
}

/// One range as configured, with its usage in status.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ipam.rust-ipam.io",
    version = "v1alpha1",
    kind = "RangePool",
    plural = "rangepools",
    shortname = "rpool",
    namespaced,
    status = "RangePoolStatus",
    printcolumn(name = "Network", type_ = "string", json_path = ".spec.network"),
    printcolumn(name = "Range", type_ = "string", json_path = ".spec.range"),
    printcolumn(name = "Size", type_ = "string", json_path = ".status.size"),
    printcolumn(name = "Used", type_ = "string", json_path = ".status.used"),
    printcolumn(name = "Free", type_ = "string", json_path = ".status.free"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct RangePoolSpec {
    #[serde(default)]
    pub network: String,
    /// CIDR or `first-last/prefix`.
    pub range: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub range_start: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub range_end: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway: String,
}

/// Usage of a range. Counts are decimal strings: an IPv6 range outgrows JSON's integers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RangePoolStatus {
    pub size: String,
    pub used: String,
    pub free: String,
    pub excluded: String,
}

impl RangePoolSpec {
    /// The pool of `range` in `network`.
    pub fn new(network: &str, range: &RangeInput) -> RangePoolSpec {
        RangePoolSpec {
            network: network.to_string(),
            range: range.range.clone(),
            range_start: range.range_start.clone(),
            range_end: range.range_end.clone(),
            exclude: range.exclude.clone(),
            gateway: range.gateway.clone(),
        }
    }

    /// The range as the allocator takes it.
    pub fn input(&self) -> RangeInput {
        RangeInput {
            range: self.range.clone(),
            range_start: self.range_start.clone(),
            range_end: self.range_end.clone(),
            exclude: self.exclude.clone(),
            gateway: self.gateway.clone(),
        }
    }
}

/// A pool of addresses that NADs name (`"ipam": {"type": "rust-ipam", "pool": "rail0"}`):
/// its ranges, their exclusions and gateways, and the routes and DNS every attachment gets.
/// The pool's name is the network its addresses are unique in, so every NAD naming it
/// shares them. Cluster-scoped; the leader writes its usage and validity into status.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "ipam.rust-ipam.io",
    version = "v1alpha1",
    kind = "IPPool",
    plural = "ippools",
    shortname = "ipool",
    status = "IPPoolStatus",
    validation = kube::core::Rule::new("!(has(self.spec.perNodePrefix) && has(self.spec.perNodeBlockSize))")
        .message("spec.perNodePrefix and spec.perNodeBlockSize are not taken together (a block is one or the other)"),
    validation = kube::core::Rule::new("!has(self.spec.gatewayIndex) || has(self.spec.perNodePrefix)")
        .message("spec.gatewayIndex needs spec.perNodePrefix"),
    validation = kube::core::Rule::new(
        "!has(self.spec.railGroup) || has(self.spec.perNodePrefix) || has(self.spec.perNodeBlockSize)"
    )
    .message("spec.railGroup needs spec.perNodePrefix or spec.perNodeBlockSize"),
    printcolumn(name = "Ranges", type_ = "string", json_path = ".status.ranges"),
    printcolumn(name = "Size", type_ = "string", json_path = ".status.size"),
    printcolumn(name = "Used", type_ = "string", json_path = ".status.used"),
    printcolumn(name = "Free", type_ = "string", json_path = ".status.free"),
    printcolumn(
        name = "Valid",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Valid\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolSpec {
    /// One address is allocated from each range (two ranges: dual stack).
    #[schemars(length(min = 1))]
    pub ranges: Vec<PoolRange>,
    /// Routes every attachment of the pool gets (CNI result routes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<PoolRoute>,
    /// DNS settings every attachment of the pool gets (CNI result dns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<PoolDns>,
    /// How long a released address is not handed out again (`30s`, `500ms`, `5m`; `0` or
    /// unset: none), unless its range has no other free address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(regex(pattern = r"^(0|[0-9]+(ms|s|m))$"))]
    pub cooldown: String,
    /// Per-node subnets: every range is cut into blocks of this prefix length (`28`: a /28
    /// per node), and a node's pods get addresses from its own block. A node's block is the
    /// one holding its pods' addresses; a node holding none takes the lowest free one.
    /// Ranges then take no range_start, range_end or gateway (see gatewayIndex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 128))]
    pub per_node_prefix: Option<u8>,
    /// Per-node runs of addresses (nv-ipam's IPPool): every range's addresses (range_start
    /// to range_end) are cut into runs of this many, and a node's pods get addresses from
    /// its own run, with the range's prefix length and gateway. Not with perNodePrefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub per_node_block_size: Option<u32>,
    /// With perNodePrefix: the gateway of each node's block, as an index from the block's
    /// first address (`1`: the first usable one); never handed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub gateway_index: Option<u32>,
    /// Pools of one rail group (one pool per rail of a GPU node's NICs, all with
    /// perNodePrefix) are aligned: a node gets the same block index in each, and a pod
    /// attached to several of them the same host index in each of its node's blocks, when
    /// that address is free; else the lowest free one (logged, and counted in
    /// `rustipam_rail_unaligned_total`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rail_group: String,
    /// With perNodePrefix: blocks given to nodes by hand (nv-ipam's CIDRPool
    /// `staticAllocations`). No other node gets them; a block's `gateway` replaces
    /// gatewayIndex's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub static_allocations: Vec<StaticAllocation>,
    /// The nodes whose pods may allocate from the pool, by the Node's labels (unset: all).
    /// A pod on another node gets a CNI error naming the pool and the selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<PoolSelector>,
    /// The namespaces whose pods may allocate from the pool, by the Namespace's labels
    /// (unset: all; `kubernetes.io/metadata.name` selects by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<PoolSelector>,
}

/// A per-node block given to a node by hand.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StaticAllocation {
    pub node_name: String,
    /// The block: a CIDR of perNodePrefix's length inside one of the ranges.
    pub prefix: String,
    /// The block's gateway (default: the one gatewayIndex gives).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway: String,
}

/// A label selector, as Kubernetes writes them: every label of `matchLabels` and every
/// requirement of `matchExpressions` must hold. An empty selector selects everything.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<SelectorRequirement>,
}

/// One requirement of a label selector.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct SelectorRequirement {
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    #[schemars(regex(pattern = r"^(In|NotIn|Exists|DoesNotExist)$"))]
    pub operator: String,
    /// For `In` and `NotIn`: at least one; for `Exists` and `DoesNotExist`: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// One range of a pool, with the keys and meaning of a NAD's inline ipam config
/// (Whereabouts' keys).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct PoolRange {
    /// CIDR (`198.18.0.0/24`) or `first-last/prefix`.
    pub range: String,
    /// First address handed out (default: network address + 1).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub range_start: String,
    /// Last address handed out (default: last address - 1).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub range_end: String,
    /// Addresses or CIDRs never handed out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// Gateway of the range: never handed out, returned with each address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway: String,
}

/// A route, as CNI writes it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct PoolRoute {
    /// Destination CIDR.
    pub dst: String,
    /// Next hop; unset: the interface's gateway.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gw: String,
}

/// DNS settings, as CNI writes them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct PoolDns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// What the leader last saw of a pool. Counts are decimal strings (an IPv6 range outgrows
/// JSON's integers); they are summed over the pool's ranges.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolStatus {
    /// The ranges, comma-separated (for `kubectl get`).
    pub ranges: String,
    pub size: String,
    pub used: String,
    pub excluded: String,
    pub free: String,
    /// Released addresses whose cooldown has not passed.
    pub cooldown_holds: String,
    /// `Valid`: whether the server uses the pool, and if not why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<PoolCondition>,
    /// With per-node blocks: the blocks recorded for nodes or holding addresses, whose they
    /// are and their use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<NodeBlock>,
}

/// A node's block of a per-node pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeBlock {
    pub node: String,
    /// The block's CIDR.
    pub block: String,
    /// Addresses held in it (a decimal string, as the other counts).
    pub used: String,
    /// Addresses it can still hand out.
    #[serde(default)]
    pub free: String,
    /// Addresses it hands out at all (held or free).
    #[serde(default)]
    pub size: String,
    /// Released addresses in it whose cooldown has not passed.
    #[serde(default)]
    pub cooldown_holds: String,
}

/// A status condition, in the shape Kubernetes conditions take.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct PoolCondition {
    /// `Valid`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True` or `False`.
    pub status: String,
    /// A CamelCase word: `Valid` or `Invalid`.
    pub reason: String,
    /// What is wrong, naming the field and the value.
    pub message: String,
}

/// The object name of `address` in `network`: readable, a valid DNS subdomain, and
/// different for every (network, address) pair that matters (a network's part carries a
/// hash of its exact name, so networks whose names differ only in case or punctuation do
/// not share names).
pub fn lease_name(network: &str, address: IpAddr) -> String {
    let addr = match address {
        IpAddr::V4(a) => a.to_string(),
        // Fully expanded so the name never starts or ends with '-'.
        IpAddr::V6(a) => a.segments().iter().map(|s| format!("{s:04x}")).collect::<Vec<_>>().join("-"),
    };
    if network.is_empty() { addr } else { format!("{}.{addr}", network_part(network)) }
}

/// The object name of a range pool: its network part, the range's text and a hash of the
/// whole configuration (two pools may share a range with other exclusions).
pub fn pool_name(network: &str, range: &RangeInput) -> String {
    let config = serde_json::to_string(range).unwrap_or_default();
    let text: String = range
        .range
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect();
    let text = text.trim_matches('-');
    let text = &text[..text.len().min(100)];
    let hash = fnv1a(config.as_bytes());
    if network.is_empty() {
        format!("{text}-{hash:08x}")
    } else {
        format!("{}.{text}-{hash:08x}", network_part(network))
    }
}

/// A DNS label for a network name: its readable part and a hash of the exact name.
fn network_part(network: &str) -> String {
    let slug: String = network
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .take(40)
        .collect();
    let slug = slug.trim_matches('-');
    let hash = fnv1a(network.as_bytes());
    if slug.is_empty() { format!("n-{hash:08x}") } else { format!("{slug}-{hash:08x}") }
}

/// 32-bit FNV-1a: stable across releases and platforms, which object names must be.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

impl From<&Lease> for IPLeaseSpec {
    fn from(l: &Lease) -> IPLeaseSpec {
        let h = &l.holder;
        IPLeaseSpec {
            network: l.network.to_string(),
            address: l.address.to_string(),
            range: l.range.to_string(),
            prefix_len: l.prefix_len,
            gateway: l.gateway.map(|g| g.to_string()),
            container_id: h.container_id.clone(),
            ifname: h.ifname.clone(),
            pod_ref: if h.pod.name.is_empty() {
                String::new()
            } else {
                format!("{}/{}", h.pod.namespace, h.pod.name)
            },
            pod_uid: h.pod.uid.clone(),
            node: h.node.clone(),
            created_unix_ms: l.created_unix_ms,
            note: l.note.clone(),
            owner: h.owner.as_ref().map(LeaseOwner::from),
            kept: h.kept,
        }
    }
}

/// Why an object cannot be used as a lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadObject {
    #[error("spec.{field} {value:?} {reason}")]
    Field { field: &'static str, value: String, reason: String },
    #[error("is named {name:?} but holds {address} in network {network:?}, whose name is {expected:?}")]
    Misnamed { name: String, address: IpAddr, network: String, expected: String },
}

impl IPLeaseSpec {
    /// The lease this spec describes, checked against the object's `name` (a copied or
    /// renamed object could otherwise hold an address under a second name, which the API
    /// server would not notice).
    pub fn to_lease(&self, name: &str) -> Result<Lease, BadObject> {
        let bad = |field, value: &str, reason: &str| BadObject::Field {
            field,
            value: value.to_string(),
            reason: reason.to_string(),
        };
        let address: IpAddr =
            self.address.parse().map_err(|_| bad("address", &self.address, "is not an IP address"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        if self.prefix_len > max {
            return Err(bad("prefixLen", &self.prefix_len.to_string(), &format!("is longer than {max}")));
        }
        let gateway = match &self.gateway {
            None => None,
            Some(g) => Some(g.parse().map_err(|_| bad("gateway", g, "is not an IP address"))?),
        };
        let expected = lease_name(&self.network, address);
        if name != expected {
            return Err(BadObject::Misnamed {
                name: name.into(),
                address,
                network: self.network.clone(),
                expected,
            });
        }
        let (namespace, pod) = match self.pod_ref.split_once('/') {
            Some((ns, pod)) => (ns.to_string(), pod.to_string()),
            None if self.pod_ref.is_empty() => (String::new(), String::new()),
            None => return Err(bad("podRef", &self.pod_ref, "is not namespace/name")),
        };
        if self.container_id.is_empty() != self.ifname.is_empty() {
            return Err(bad("ifname", &self.ifname, "must be set exactly when containerId is"));
        }
        Ok(Lease {
            address,
            network: self.network.as_str().into(),
            range: self.range.as_str().into(),
            prefix_len: self.prefix_len,
            gateway,
            holder: Arc::new(Attachment {
                container_id: self.container_id.clone(),
                ifname: self.ifname.clone(),
                pod: PodRef { namespace, name: pod, uid: self.pod_uid.clone() },
                node: self.node.clone(),
                owner: self.owner.as_ref().map(LeaseOwner::to_owner).transpose()?,
                kept: self.kept,
            }),
            created_unix_ms: self.created_unix_ms,
            note: self.note.clone(),
        })
    }
}

/// The CRDs as YAML documents, in the order `crds/` keeps them: what `rust-ipam-server
/// crds` prints and the drift test compares.
pub fn crd_yaml() -> Vec<(&'static str, String)> {
    use kube::CustomResourceExt;
    let header =
        "# Generated from ipam-server/src/k8s/crd.rs by `rust-ipam-server crds --out crds`; do not edit.\n";
    let render = |crd| format!("{header}{}", serde_yaml::to_string(&crd).unwrap_or_default());
    vec![
        ("ipleases.yaml", render(IPLease::crd())),
        ("rangepools.yaml", render(RangePool::crd())),
        ("ippools.yaml", render(IPPool::crd())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> Lease {
        Lease {
            address: "fd00::10".parse().expect("ip"),
            network: "Rail_0".into(),
            range: "fd00::/64".into(),
            prefix_len: 64,
            gateway: Some("fd00::1".parse().expect("ip")),
            holder: Arc::new(Attachment {
                container_id: "cid".into(),
                ifname: "net1".into(),
                pod: PodRef { namespace: "ml".into(), name: "trainer-0".into(), uid: "u-1".into() },
                node: "gpu-7".into(),
                ..Default::default()
            }),
            created_unix_ms: 1_700_000_000_000,
            note: String::new(),
        }
    }

    #[test]
    fn names_are_dns_subdomains_and_differ_per_network() {
        assert_eq!(lease_name("", "10.56.0.16".parse().expect("ip")), "10.56.0.16");
        assert_eq!(lease_name("", "fd00::".parse().expect("ip")), "fd00-0000-0000-0000-0000-0000-0000-0000");
        let a = lease_name("Rail_0", "10.0.0.1".parse().expect("ip"));
        let b = lease_name("rail-0", "10.0.0.1".parse().expect("ip"));
        assert!(a.starts_with("rail-0-") && b.starts_with("rail-0-") && a != b, "{a} {b}");
        assert!(a.ends_with(".10.0.0.1"));
        assert!(lease_name("///", "10.0.0.1".parse().expect("ip")).starts_with("n-"));
        let long = "x".repeat(300);
        for n in [a, b, lease_name(&long, "ffff::ffff".parse().expect("ip"))] {
            assert!(n.len() <= 253, "{n}");
            assert!(
                n.split('.').all(|l| !l.is_empty()
                    && l.len() <= 63
                    && l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')),
                "{n}"
            );
        }
        let r = RangeInput { range: "10.56.0.0/16".into(), ..Default::default() };
        let r2 = RangeInput { exclude: vec!["10.56.0.0/30".into()], ..r.clone() };
        assert!(pool_name("", &r).starts_with("10-56-0-0-16-"));
        assert_ne!(pool_name("", &r), pool_name("", &r2));
    }

    #[test]
    fn a_lease_survives_the_round_trip_and_bad_objects_are_named() {
        let l = lease();
        let spec = IPLeaseSpec::from(&l);
        assert_eq!(spec.pod_ref, "ml/trainer-0");
        let name = lease_name("Rail_0", l.address);
        assert_eq!(spec.to_lease(&name).expect("valid"), l);

        let err = spec.to_lease("fd00-0000-0000-0000-0000-0000-0000-0010").expect_err("misnamed");
        assert!(
            err.to_string()
                .starts_with("is named \"fd00-0000-0000-0000-0000-0000-0000-0010\" but holds fd00::10"),
            "{err}"
        );
        let bad = IPLeaseSpec { address: "10.0.0.300".into(), ..spec.clone() };
        assert_eq!(
            bad.to_lease(&name).expect_err("bad").to_string(),
            "spec.address \"10.0.0.300\" is not an IP address"
        );
        let bad = IPLeaseSpec { prefix_len: 129, ..spec.clone() };
        assert_eq!(
            bad.to_lease(&name).expect_err("bad").to_string(),
            "spec.prefixLen \"129\" is longer than 128"
        );
        let bad = IPLeaseSpec { pod_ref: "nopod".into(), ..spec.clone() };
        assert_eq!(
            bad.to_lease(&name).expect_err("bad").to_string(),
            "spec.podRef \"nopod\" is not namespace/name"
        );
        let bad = IPLeaseSpec { ifname: String::new(), ..spec };
        assert!(bad.to_lease(&name).is_err());
    }

    #[test]
    fn owners_and_kept_survive_the_round_trip() {
        let set = Owner::StatefulSet { name: "trainer".into(), uid: "s-1".into() };
        for (owner, kind) in [(set, "StatefulSet"), (Owner::Claim { name: "vm.net1".into() }, "IPAMClaim")] {
            let mut l = lease();
            l.holder = Arc::new(Attachment { owner: Some(owner), kept: true, ..(*l.holder).clone() });
            let spec = IPLeaseSpec::from(&l);
            assert_eq!(spec.owner.as_ref().map(|o| o.kind.as_str()), Some(kind));
            assert!(spec.kept);
            let name = lease_name("Rail_0", l.address);
            assert_eq!(spec.to_lease(&name).expect("valid"), l);
            let bad = IPLeaseSpec {
                owner: Some(LeaseOwner { kind: "Deployment".into(), name: "x".into(), uid: String::new() }),
                ..spec
            };
            assert_eq!(
                bad.to_lease(&name).expect_err("bad").to_string(),
                "spec.owner.kind \"Deployment\" is not StatefulSet or IPAMClaim"
            );
        }
    }
}
