//! Import from Whereabouts: its IPPool and OverlappingRangeIPReservation objects
//! (`whereabouts.cni.cncf.io/v1alpha1`, as `kubectl get -o yaml` lists them) become leases.
//!
//! An IPPool is named after its range (`/` and `:` as `-`), prefixed `<network_name>-` for a
//! named network; `spec.allocations` maps the decimal offset from the range's network
//! address to `{id, ifname, podref}`. An OverlappingRangeIPReservation holds one address
//! (named the same way) with `spec {ifname, podref}`; it must agree with the pools.
//! Nothing is dropped silently: every entry ends as create, exists, conflict or malformed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use serde::Deserialize;

use crate::allocator::range::ip_to_u128;
use crate::allocator::{Allocator, Attachment, Lease, PodRef};

/// What happens to one Whereabouts entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A new lease.
    Create,
    /// The same attachment already holds the address: nothing to do.
    Exists,
    /// Someone else holds the address (here or in another Whereabouts object).
    Conflict(String),
    /// The entry cannot be read.
    Malformed(String),
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Create => f.write_str("create"),
            Action::Exists => f.write_str("exists"),
            Action::Conflict(why) => write!(f, "conflict: {why}"),
            Action::Malformed(why) => write!(f, "malformed: {why}"),
        }
    }
}

/// One entry of the import and what happens to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// `kind/name` of the object, plus the allocation offset for pools.
    pub source: String,
    pub network: String,
    pub address: Option<IpAddr>,
    pub podref: String,
    pub container_id: String,
    pub ifname: String,
    pub action: Action,
}

#[derive(Debug, Deserialize)]
struct List {
    #[serde(default)]
    items: Vec<Object>,
}

#[derive(Debug, Deserialize)]
struct Object {
    #[serde(default)]
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: serde_yaml::Value,
}

#[derive(Debug, Deserialize)]
struct Metadata {
    name: String,
}

#[derive(Debug, Deserialize)]
struct PoolSpec {
    range: String,
    #[serde(default)]
    allocations: BTreeMap<String, PoolAllocation>,
}

#[derive(Debug, Deserialize)]
struct PoolAllocation {
    id: String,
    #[serde(default)]
    ifname: String,
    #[serde(default)]
    podref: String,
}

#[derive(Debug, Deserialize)]
struct ReservationSpec {
    #[serde(default)]
    ifname: String,
    #[serde(default)]
    podref: String,
}

/// `/` and `:` as `-`, as Whereabouts names its objects.
fn object_name(s: &str) -> String {
    s.replace(['/', ':'], "-")
}

/// The network of an object named `<network>-<suffix>` (or `<suffix>`).
fn network_of(name: &str, suffix: &str) -> Option<String> {
    if name == suffix {
        return Some(String::new());
    }
    name.strip_suffix(suffix)?.strip_suffix('-').map(str::to_string)
}

fn split_podref(podref: &str) -> Option<(String, String)> {
    let (ns, name) = podref.split_once('/')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains('/')).then(|| (ns.to_string(), name.to_string()))
}

/// Why the input as a whole cannot be read (an entry that cannot be read is a
/// [`Action::Malformed`] row instead). `input` counts the documents given from 1. The
/// message leaves the parser's words to the source: the command prints the chain.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("input {input} is not YAML")]
    NotYaml {
        input: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("input {input} is not a Kubernetes object or List")]
    NotObjects {
        input: usize,
        #[source]
        source: serde_yaml::Error,
    },
}

/// Reads Whereabouts objects (YAML or JSON `kind: List` documents, or single objects) and
/// decides each entry against `alloc`, adopting the new leases into it. Run on a copy for
/// a dry run; persist `alloc`'s journal to apply.
pub fn import(docs: &[String], alloc: &mut Allocator, now_unix_ms: i64) -> Result<Vec<Row>, ImportError> {
    let mut objects = Vec::new();
    for (input, doc) in (1..).zip(docs) {
        let not_objects = |source| ImportError::NotObjects { input, source };
        for d in serde_yaml::Deserializer::from_str(doc) {
            let v =
                serde_yaml::Value::deserialize(d).map_err(|source| ImportError::NotYaml { input, source })?;
            if v.get("items").is_some() {
                let list: List = serde_yaml::from_value(v).map_err(not_objects)?;
                objects.extend(list.items);
            } else if !v.is_null() {
                objects.push(serde_yaml::from_value(v).map_err(not_objects)?);
            }
        }
    }
    let mut rows = Vec::new();
    // Pools first: they carry the container IDs; reservations are checked against them.
    let mut reservations = Vec::new();
    for obj in objects {
        match obj.kind.as_str() {
            "IPPool" => rows.extend(import_pool(&obj, alloc, now_unix_ms)),
            "OverlappingRangeIPReservation" => reservations.push(obj),
            other => rows.push(Row {
                source: format!("{other}/{}", obj.metadata.name),
                network: String::new(),
                address: None,
                podref: String::new(),
                container_id: String::new(),
                ifname: String::new(),
                action: Action::Malformed(format!(
                    "kind {other:?} is not IPPool or OverlappingRangeIPReservation"
                )),
            }),
        }
    }
    for obj in reservations {
        rows.push(check_reservation(&obj, alloc));
    }
    Ok(rows)
}

fn import_pool(obj: &Object, alloc: &mut Allocator, now_unix_ms: i64) -> Vec<Row> {
    let source = format!("IPPool/{}", obj.metadata.name);
    let malformed = |why: String| Row {
        source: source.clone(),
        network: String::new(),
        address: None,
        podref: String::new(),
        container_id: String::new(),
        ifname: String::new(),
        action: Action::Malformed(why),
    };
    let spec: PoolSpec = match serde_yaml::from_value(obj.spec.clone()) {
        Ok(s) => s,
        Err(e) => return vec![malformed(format!("spec: {e}"))],
    };
    let Ok(net) = spec.range.parse::<IpNetwork>() else {
        return vec![malformed(format!("spec.range {:?} is not a CIDR", spec.range))];
    };
    let Some(network) = network_of(&obj.metadata.name, &object_name(&spec.range)) else {
        return vec![malformed(format!("name does not end with its range {:?}", object_name(&spec.range)))];
    };
    let base = ip_to_u128(net.network());
    let size = ip_to_u128(net.broadcast()) - base;
    let mut rows = Vec::new();
    for (offset, a) in &spec.allocations {
        let mut row = Row {
            source: format!("{source} offset {offset}"),
            network: network.clone(),
            address: None,
            podref: a.podref.clone(),
            container_id: a.id.clone(),
            ifname: a.ifname.clone(),
            action: Action::Create,
        };
        let address = match offset.parse::<u128>() {
            Ok(o) if o <= size => match net {
                IpNetwork::V4(_) => IpAddr::from(std::net::Ipv4Addr::from((base + o) as u32)),
                IpNetwork::V6(_) => IpAddr::from(std::net::Ipv6Addr::from(base + o)),
            },
            _ => {
                row.action =
                    Action::Malformed(format!("offset {offset:?} is not a number within {}", spec.range));
                rows.push(row);
                continue;
            }
        };
        row.address = Some(address);
        let pod = match split_podref(&a.podref) {
            Some((namespace, name)) => PodRef { namespace, name, uid: String::new() },
            None => {
                row.action = Action::Malformed(format!("podref {:?} is not namespace/name", a.podref));
                rows.push(row);
                continue;
            }
        };
        if a.id.is_empty() || a.ifname.is_empty() {
            row.action = Action::Malformed("allocation needs id and ifname".into());
            rows.push(row);
            continue;
        }
        let lease = Lease {
            address,
            network: network.as_str().into(),
            range: net.to_string().into(),
            prefix_len: net.prefix(),
            gateway: None,
            holder: Arc::new(Attachment {
                container_id: a.id.clone(),
                ifname: a.ifname.clone(),
                pod,
                node: String::new(),
                ..Default::default()
            }),
            created_unix_ms: now_unix_ms,
            note: String::new(),
        };
        row.action = match alloc.adopt(lease) {
            Ok(true) => Action::Create,
            Ok(false) => Action::Exists,
            Err(e) => Action::Conflict(e.to_string()),
        };
        rows.push(row);
    }
    rows
}

/// A reservation must name an address some pool gave to the same pod and interface.
fn check_reservation(obj: &Object, alloc: &Allocator) -> Row {
    let name = &obj.metadata.name;
    let mut row = Row {
        source: format!("OverlappingRangeIPReservation/{name}"),
        network: String::new(),
        address: None,
        podref: String::new(),
        container_id: String::new(),
        ifname: String::new(),
        action: Action::Exists,
    };
    let spec: ReservationSpec = match serde_yaml::from_value(obj.spec.clone()) {
        Ok(s) => s,
        Err(e) => {
            row.action = Action::Malformed(format!("spec: {e}"));
            return row;
        }
    };
    row.podref = spec.podref.clone();
    row.ifname = spec.ifname.clone();
    // The name is `[<network>-]<address>` with ':' as '-', which can read several ways
    // (IPv6, or a network name with '-'): prefer a reading the pools hold, else the first.
    let whole = std::iter::once(("", name.as_str()));
    let splits = name.char_indices().filter(|(_, c)| *c == '-').map(|(i, _)| (&name[..i], &name[i + 1..]));
    let readings: Vec<(String, IpAddr)> = whole
        .chain(splits)
        .filter_map(|(network, addr)| {
            let ip = addr
                .parse::<IpAddr>()
                .ok()
                .or_else(|| addr.replace('-', ":").parse().ok().filter(IpAddr::is_ipv6))?;
            Some((network.to_string(), ip))
        })
        .collect();
    let found =
        readings.iter().find(|(network, ip)| alloc.get(network, *ip).is_ok()).or(readings.first()).cloned();
    let Some((network, ip)) = found else {
        row.action = Action::Malformed("name is not [network-]address".into());
        return row;
    };
    row.network = network.clone();
    row.address = Some(ip);
    row.action = match alloc.get(&network, ip) {
        Ok(l) => {
            let held = format!("{}/{}", l.holder.pod.namespace, l.holder.pod.name);
            row.container_id = l.holder.container_id.clone();
            if held == spec.podref && l.holder.ifname == spec.ifname {
                Action::Exists
            } else {
                Action::Conflict(format!("the pools give {ip} to {held} {}", l.holder.ifname))
            }
        }
        Err(_) => Action::Conflict(format!(
            "no pool allocation holds {ip}: the reservation has no container ID to import"
        )),
    };
    row
}

/// The rows as an aligned table.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<40} {:<8} {:<26} {:<24} {:<10} {:<7} {}\n",
        "SOURCE", "NETWORK", "ADDRESS", "POD", "CONTAINER", "IFNAME", "ACTION"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<40} {:<8} {:<26} {:<24} {:<10} {:<7} {}\n",
            r.source,
            format!("{:?}", r.network),
            r.address.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            r.podref,
            r.container_id,
            r.ifname,
            r.action
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::LeaseFilter;

    fn fixture(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/whereabouts")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn fixtures() -> Vec<String> {
        vec![fixture("ippools.yaml"), fixture("overlappingrangeipreservations.yaml")]
    }

    #[test]
    fn unreadable_input_is_named_by_its_position() {
        let mut alloc = Allocator::new();
        let err = import(&[String::new(), "a: [1".into()], &mut alloc, 1).expect_err("not YAML");
        assert!(matches!(err, ImportError::NotYaml { input: 2, .. }), "{err:?}");
        assert_eq!(err.to_string(), "input 2 is not YAML");
        let source = std::error::Error::source(&err).expect("the YAML error");
        assert!(source.to_string().contains("line 2"), "{source}");
        let err = import(&["kind: [IPPool]".into()], &mut alloc, 1).expect_err("not an object");
        assert!(matches!(err, ImportError::NotObjects { input: 1, .. }), "{err:?}");
    }

    #[test]
    fn fixtures_import_once_and_agree_with_their_reservations() {
        let mut alloc = Allocator::new();
        let rows = import(&fixtures(), &mut alloc, 1).expect("import");
        let created: Vec<String> = rows
            .iter()
            .filter(|r| r.action == Action::Create)
            .map(|r| {
                format!("{:?} {} {} {}", r.network, r.address.expect("address"), r.podref, r.container_id)
            })
            .collect();
        assert_eq!(
            created,
            vec![
                "\"\" 192.168.100.16 ai-training/train-0 cid-a1",
                "\"\" 192.168.100.17 ai-training/train-1 cid-a2",
                "\"\" 192.168.100.1 default/svc-0 cid-c1",
                "\"\" fd00:50::1 default/v6pod cid-d1",
                "\"rail0\" 10.50.1.0 ai-training/train-0 cid-b1",
            ]
        );
        let reservations: Vec<&Row> = rows.iter().filter(|r| r.source.starts_with("Overlapping")).collect();
        assert_eq!(reservations.len(), 5);
        assert!(reservations.iter().all(|r| r.action == Action::Exists), "{}", table(&rows));
        assert_eq!(alloc.drain_journal().count(), 5);

        // Twice: nothing changes.
        let again = import(&fixtures(), &mut alloc, 2).expect("import");
        assert!(again.iter().all(|r| r.action == Action::Exists), "{}", table(&again));
        assert_eq!(alloc.drain_journal().count(), 0);
        let l = alloc.leases(&LeaseFilter { network: Some("rail0".into()), ..LeaseFilter::default() });
        assert_eq!(
            (l[0].address.to_string(), &*l[0].range, l[0].prefix_len),
            ("10.50.1.0".into(), "10.50.0.0/16", 16)
        );
    }

    #[test]
    fn conflicts_and_malformed_entries_are_reported_not_dropped() {
        let pools = r#"
apiVersion: v1
kind: List
items:
- kind: IPPool
  metadata: {name: 10.1.0.0-24}
  spec:
    range: 10.1.0.0/24
    allocations:
      "5": {id: c1, ifname: net1, podref: ns/a}
      "x": {id: c2, ifname: net1, podref: ns/b}
      "6": {id: c3, ifname: net1, podref: nopod}
      "999": {id: c4, ifname: net1, podref: ns/d}
- kind: IPPool
  metadata: {name: 10.1.0.0-25}
  spec:
    range: 10.1.0.0/25
    allocations:
      "5": {id: c9, ifname: net1, podref: ns/z}
- kind: IPPool
  metadata: {name: wrong-name}
  spec: {range: 10.2.0.0/24}
- kind: OverlappingRangeIPReservation
  metadata: {name: 10.1.0.5}
  spec: {ifname: net1, podref: ns/other}
- kind: ConfigMap
  metadata: {name: x}
"#;
        let mut alloc = Allocator::new();
        let rows = import(&[pools.to_string()], &mut alloc, 1).expect("import");
        let actions: Vec<String> = rows.iter().map(|r| format!("{}: {}", r.source, r.action)).collect();
        assert_eq!(
            actions,
            vec![
                "IPPool/10.1.0.0-24 offset 5: create",
                "IPPool/10.1.0.0-24 offset 6: malformed: podref \"nopod\" is not namespace/name",
                "IPPool/10.1.0.0-24 offset 999: malformed: offset \"999\" is not a number within 10.1.0.0/24",
                "IPPool/10.1.0.0-24 offset x: malformed: offset \"x\" is not a number within 10.1.0.0/24",
                "IPPool/10.1.0.0-25 offset 5: conflict: address 10.1.0.5 in network \"\" is already held by pod ns/a (container c1 interface net1)",
                "IPPool/wrong-name: malformed: name does not end with its range \"10.2.0.0-24\"",
                "ConfigMap/x: malformed: kind \"ConfigMap\" is not IPPool or OverlappingRangeIPReservation",
                "OverlappingRangeIPReservation/10.1.0.5: conflict: the pools give 10.1.0.5 to ns/a net1",
            ]
        );
        assert_eq!(alloc.lease_count(), 1);
    }
}
