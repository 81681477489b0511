//! Compatibility with Whereabouts: replay the ADDs recorded in `shared/fixtures/whereabouts`
//! (same NAD settings, same order) and check that every attachment gets the address
//! Whereabouts 0.9.4 gave it, as read from the IPPool objects it wrote.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ipam_server::allocator::{
    AllocateRequest, Allocator, Attachment, FieldPrefix, PodRef, RangeInput, RangeSpec, range::ip_to_u128,
};
use ipnetwork::IpNetwork;
use serde::Deserialize;

#[derive(Deserialize)]
struct List {
    items: Vec<IpPool>,
}

#[derive(Deserialize)]
struct IpPool {
    metadata: Metadata,
    spec: PoolSpec,
}

#[derive(Deserialize)]
struct Metadata {
    name: String,
}

#[derive(Deserialize)]
struct PoolSpec {
    range: String,
    #[serde(default)]
    allocations: BTreeMap<String, Allocation>,
}

#[derive(Deserialize)]
struct Allocation {
    id: String,
    ifname: String,
    podref: String,
}

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures").join(path)
}

/// (container ID, ifname) -> (network, address), from the IPPool objects.
fn whereabouts_assignments() -> BTreeMap<(String, String), (String, IpAddr, String)> {
    let path = fixture("whereabouts/ippools.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let list: List = serde_yaml::from_str(&text).expect("IPPool list");
    let mut out = BTreeMap::new();
    for pool in list.items {
        let net: IpNetwork = pool.spec.range.parse().expect("pool range");
        // Pools of a named network are named "<network>-<range>".
        let range_name = pool.spec.range.replace(['/', ':'], "-");
        let network =
            pool.metadata.name.strip_suffix(&range_name).unwrap_or("").trim_end_matches('-').to_string();
        for (offset, a) in pool.spec.allocations {
            let base = ip_to_u128(net.network()) + offset.parse::<u128>().expect("decimal offset");
            let ip = match net {
                IpNetwork::V4(_) => IpAddr::from(std::net::Ipv4Addr::from(base as u32)),
                IpNetwork::V6(_) => IpAddr::from(std::net::Ipv6Addr::from(base)),
            };
            out.insert((a.id, a.ifname), (network.clone(), ip, a.podref));
        }
    }
    out
}

#[test]
fn replaying_the_recorded_adds_gives_whereabouts_addresses() {
    // The NADs and ADDs of shared/fixtures/README.md, in the order they were made.
    let adds = [
        ("cid-a1", "net1", "ai-training/train-0", "", "192.168.100.0/24", vec!["192.168.100.0/28"]),
        ("cid-a2", "net1", "ai-training/train-1", "", "192.168.100.0/24", vec!["192.168.100.0/28"]),
        ("cid-c1", "net1", "default/svc-0", "", "192.168.100.0/25", vec![]),
        ("cid-b1", "net2", "ai-training/train-0", "rail0", "10.50.0.0/16", vec!["10.50.0.0/24"]),
        ("cid-d1", "net1", "default/v6pod", "", "fd00:50::/64", vec![]),
    ];
    let want = whereabouts_assignments();
    assert_eq!(want.len(), adds.len(), "every recorded ADD has one allocation in the fixture");
    let mut alloc = Allocator::new();
    for (cid, ifname, podref, network, range, exclude) in adds {
        let (namespace, name) = podref.split_once('/').expect("ns/name");
        let spec = RangeSpec::parse(
            &RangeInput {
                range: range.into(),
                exclude: exclude.iter().map(|e| e.to_string()).collect(),
                ..Default::default()
            },
            FieldPrefix(""),
        )
        .expect("fixture range");
        let req = AllocateRequest {
            attachment: Arc::new(Attachment {
                container_id: cid.into(),
                ifname: ifname.into(),
                pod: PodRef { namespace: namespace.into(), name: name.into(), uid: String::new() },
                node: String::new(),
                ..Default::default()
            }),
            network: network.into(),
            ranges: vec![spec],
            requested: vec![],
        };
        let got = alloc.allocate(&req, 0).expect("allocate");
        let (want_network, want_ip, want_pod) = &want[&(cid.to_string(), ifname.to_string())];
        assert_eq!((&*got[0].network, got[0].address), (want_network.as_str(), *want_ip), "{cid} {ifname}");
        assert_eq!(podref, want_pod);
    }
}
