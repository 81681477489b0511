//! The `k8s.v1.cni.cncf.io/networks` pod annotation: which NetworkAttachmentDefinitions a
//! pod asks for, as Multus reads it. Two forms:
//! - comma list: `[namespace/]name[@interface]`, e.g. `rail-0, storage/nfs@net5`;
//! - JSON list of selection objects: `[{"name": "rail-1", "interface": "net2", "ips": [...]}]`.
//!
//! Parsing checks everything that can be checked without the NADs: names, interface names
//! (kernel limit, duplicates), static addresses and MACs, and at most one default route.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::Deserialize;
use serde_json::{Map, Value};

/// The pod annotation key.
pub const NETWORKS_ANNOTATION: &str = "k8s.v1.cni.cncf.io/networks";
/// Longest interface name the kernel takes (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

/// One network the pod asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSelection {
    /// Namespace of the NAD (the pod's when not given).
    pub namespace: String,
    /// Name of the NAD.
    pub name: String,
    /// Interface name in the pod: requested, or `net<N>` by position (1-based).
    pub interface: String,
    /// Whether the name was requested (not generated).
    pub interface_requested: bool,
    /// Static addresses with prefix, passed to the delegate as the `ips` capability.
    pub ips: Vec<String>,
    /// MAC address, passed as the `mac` capability.
    pub mac: Option<String>,
    /// Gateways for the pod's default route through this network.
    pub default_route: Vec<IpAddr>,
    /// Extra `args.cni` keys for the delegate: the annotation's `cni-args`, and its
    /// `ipam-claim-reference` under that same key (see [`IPAM_CLAIM_KEY`]).
    pub cni_args: Map<String, Value>,
}

/// The selection key naming an IPAMClaim (k8snetworkplumbingwg/ipamclaims). Multus has no
/// place for it in a delegate's config, so it goes into `args.cni` under the same key,
/// where an IPAM plugin reads it (rust-ipam does) beside the other `cni-args`.
pub const IPAM_CLAIM_KEY: &str = "ipam-claim-reference";

/// Why an annotation was refused; each message names the entry and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{NETWORKS_ANNOTATION}: {0}")]
pub struct AnnotationError(pub String);

fn err(msg: impl Into<String>) -> AnnotationError {
    AnnotationError(msg.into())
}

/// Multus' rule for names in the comma form: letters, digits, `-` and `.`.
fn valid_name_chars(s: &str) -> bool {
    s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

/// A Kubernetes object name (DNS-1123 subdomain): lower case alphanumerics, `-` and `.`,
/// starting and ending alphanumeric, at most 253 characters.
fn valid_object_name(s: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    !s.is_empty()
        && s.len() <= 253
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && edge(s.chars().next())
        && edge(s.chars().last())
}

fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_IFNAME
        && s != "."
        && s != ".."
        && !s.contains(['/', ':'])
        && !s.chars().any(char::is_whitespace)
}

/// A selection as written. Keys Multus knows that have no use here (`portMappings`,
/// `bandwidth`, `infiniband-guid`, ...) are ignored, as Multus ignores unknown keys.
#[derive(Debug, Deserialize)]
struct RawSelection {
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    interface: String,
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default)]
    mac: String,
    #[serde(default, rename = "default-route")]
    default_route: Vec<String>,
    #[serde(default, rename = "cni-args")]
    cni_args: Option<Map<String, Value>>,
    #[serde(default, rename = "ipam-claim-reference")]
    ipam_claim_reference: String,
}

/// Parses the annotation of a pod in `pod_namespace`.
pub fn parse(value: &str, pod_namespace: &str) -> Result<Vec<NetworkSelection>, AnnotationError> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(Vec::new());
    }
    let raw: Vec<RawSelection> = if value.starts_with('[') {
        serde_json::from_str(value).map_err(|e| err(format!("not a valid JSON list of networks: {e}")))?
    } else {
        value.split(',').map(|item| parse_item(item.trim())).collect::<Result<_, _>>()?
    };
    let mut out = Vec::with_capacity(raw.len());
    let mut ifnames = BTreeSet::new();
    let mut default_routes = 0;
    for (i, r) in raw.into_iter().enumerate() {
        let what = format!("network {} ({:?})", i + 1, r.name);
        if !valid_object_name(&r.name) {
            return Err(err(format!(
                "{what}: name {:?} is not a valid object name (lower case letters, digits, '-' and '.', starting and ending alphanumeric)",
                r.name
            )));
        }
        let namespace = if r.namespace.is_empty() { pod_namespace.to_string() } else { r.namespace };
        if !valid_object_name(&namespace) {
            return Err(err(format!("{what}: namespace {namespace:?} is not a valid namespace name")));
        }
        let interface_requested = !r.interface.is_empty();
        let interface = if interface_requested { r.interface } else { format!("net{}", i + 1) };
        if !valid_ifname(&interface) {
            return Err(err(format!(
                "{what}: interface {interface:?} is not a valid interface name (1 to {MAX_IFNAME} characters, no '/', ':' or spaces)"
            )));
        }
        if !ifnames.insert(interface.clone()) {
            return Err(err(format!("{what}: interface {interface:?} is used by two networks")));
        }
        for ip in &r.ips {
            let ok = ip.split_once('/').is_some_and(|(a, p)| {
                a.parse::<IpAddr>()
                    .is_ok_and(|a| p.parse::<u8>().is_ok_and(|p| p <= if a.is_ipv4() { 32 } else { 128 }))
            });
            if !ok {
                return Err(err(format!(
                    "{what}: ips entry {ip:?} is not an address with prefix (e.g. 10.1.1.5/24)"
                )));
            }
        }
        let mac = (!r.mac.is_empty()).then_some(r.mac);
        if let Some(m) = &mac {
            let parts: Vec<&str> = m.split(':').collect();
            if parts.len() != 6 || !parts.iter().all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok()) {
                return Err(err(format!("{what}: mac {m:?} is not a MAC address (e.g. c2:11:22:33:44:55)")));
            }
        }
        let default_route = r
            .default_route
            .iter()
            .map(|g| {
                g.parse::<IpAddr>()
                    .map_err(|_| err(format!("{what}: default-route gateway {g:?} is not an IP address")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !default_route.is_empty() {
            default_routes += 1;
        }
        if default_routes > 1 {
            return Err(err(format!(
                "{what}: only one network may set default-route (no ECMP default routes)"
            )));
        }
        let mut cni_args = r.cni_args.unwrap_or_default();
        if !r.ipam_claim_reference.is_empty() {
            if !valid_object_name(&r.ipam_claim_reference) {
                return Err(err(format!(
                    "{what}: ipam-claim-reference {:?} is not an object name (the claim is in the pod's namespace)",
                    r.ipam_claim_reference
                )));
            }
            cni_args.insert(IPAM_CLAIM_KEY.into(), Value::String(r.ipam_claim_reference));
        }
        out.push(NetworkSelection {
            namespace,
            name: r.name,
            interface,
            interface_requested,
            ips: r.ips,
            mac,
            default_route,
            cni_args,
        });
    }
    Ok(out)
}

/// One item of the comma form: `[namespace/]name[@interface]`.
fn parse_item(item: &str) -> Result<RawSelection, AnnotationError> {
    if item.is_empty() {
        return Err(err("empty entry in the comma-separated list"));
    }
    let (namespace, rest) = match item.split('/').collect::<Vec<_>>()[..] {
        [name] => ("", name),
        [ns, name] => (ns, name),
        _ => {
            return Err(err(format!(
                "entry {item:?} has more than one '/' (expected [namespace/]name[@interface])"
            )));
        }
    };
    let (name, interface) = match rest.split('@').collect::<Vec<_>>()[..] {
        [name] => (name, ""),
        [name, ifname] => (name, ifname),
        _ => {
            return Err(err(format!(
                "entry {item:?} has more than one '@' (expected [namespace/]name[@interface])"
            )));
        }
    };
    for part in [namespace, name, interface] {
        if !valid_name_chars(part) {
            return Err(err(format!(
                "entry {item:?}: {part:?} may hold only letters, digits, '-' and '.' (expected [namespace/]name[@interface])"
            )));
        }
    }
    Ok(RawSelection {
        name: name.to_string(),
        namespace: namespace.to_string(),
        interface: interface.to_string(),
        ips: Vec::new(),
        mac: String::new(),
        default_route: Vec::new(),
        cni_args: None,
        ipam_claim_reference: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(v: &[NetworkSelection]) -> Vec<String> {
        v.iter().map(|n| format!("{}/{}@{}", n.namespace, n.name, n.interface)).collect()
    }

    fn refused(value: &str) -> String {
        parse(value, "default").expect_err("must be refused").to_string()
    }

    #[test]
    fn comma_form_with_namespaces_and_interfaces() {
        let v = parse(" rail-0, storage/nfs@net5 ,rail-1 ", "ai-training").expect("valid");
        assert_eq!(names(&v), vec!["ai-training/rail-0@net1", "storage/nfs@net5", "ai-training/rail-1@net3"]);
        assert!(!v[0].interface_requested && v[1].interface_requested);
        assert!(parse("", "x").expect("empty").is_empty());
    }

    #[test]
    fn json_form_as_in_the_multus_fixture() {
        // The annotation of shared/fixtures/multus (pod fixture/trainer).
        let v = parse(
            r#"[{"name":"rail-0","interface":"net1"},{"name":"rail-1","interface":"net2","ips":["198.18.31.42/24"]}]"#,
            "fixture",
        )
        .expect("valid");
        assert_eq!(names(&v), vec!["fixture/rail-0@net1", "fixture/rail-1@net2"]);
        assert_eq!(v[1].ips, vec!["198.18.31.42/24"]);
        let v = parse(
            r#"[{"name":"a","namespace":"n","mac":"c2:11:22:33:44:55","default-route":["10.1.1.1"],
                "cni-args":{"mtu":9000},"portMappings":[],"bandwidth":{"ingressRate":1}}]"#,
            "x",
        )
        .expect("valid");
        assert_eq!(v[0].mac.as_deref(), Some("c2:11:22:33:44:55"));
        assert_eq!(v[0].default_route, vec!["10.1.1.1".parse::<IpAddr>().expect("ip")]);
        assert_eq!(v[0].cni_args.get("mtu"), Some(&json!(9000)));
    }

    #[test]
    fn an_ipam_claim_reference_goes_to_the_cni_args() {
        let v = parse(r#"[{"name":"a","ipam-claim-reference":"vm-a.net1","cni-args":{"mtu":9000}}]"#, "x")
            .expect("valid");
        assert_eq!(v[0].cni_args.get("ipam-claim-reference"), Some(&json!("vm-a.net1")));
        assert_eq!(v[0].cni_args.get("mtu"), Some(&json!(9000)));
        assert_eq!(
            refused(r#"[{"name":"a","ipam-claim-reference":"other/claim"}]"#),
            "k8s.v1.cni.cncf.io/networks: network 1 (\"a\"): ipam-claim-reference \"other/claim\" is not an object name (the claim is in the pod's namespace)"
        );
    }

    #[test]
    fn every_rule_has_its_message() {
        let p = "k8s.v1.cni.cncf.io/networks: ";
        assert_eq!(
            refused("a/b/c"),
            format!("{p}entry \"a/b/c\" has more than one '/' (expected [namespace/]name[@interface])")
        );
        assert_eq!(
            refused("a@b@c"),
            format!("{p}entry \"a@b@c\" has more than one '@' (expected [namespace/]name[@interface])")
        );
        assert_eq!(
            refused("rail_0"),
            format!(
                "{p}entry \"rail_0\": \"rail_0\" may hold only letters, digits, '-' and '.' (expected [namespace/]name[@interface])"
            )
        );
        assert_eq!(refused("a,,b"), format!("{p}empty entry in the comma-separated list"));
        assert_eq!(
            refused("Rail0"),
            format!(
                "{p}network 1 (\"Rail0\"): name \"Rail0\" is not a valid object name (lower case letters, digits, '-' and '.', starting and ending alphanumeric)"
            )
        );
        assert_eq!(
            refused("a@averyveryverylongname"),
            format!(
                "{p}network 1 (\"a\"): interface \"averyveryverylongname\" is not a valid interface name (1 to 15 characters, no '/', ':' or spaces)"
            )
        );
        assert_eq!(
            refused("a@net2,b"),
            format!("{p}network 2 (\"b\"): interface \"net2\" is used by two networks")
        );
        assert_eq!(
            refused(r#"[{"name":"a","ips":["10.1.1.5"]}]"#),
            format!(
                "{p}network 1 (\"a\"): ips entry \"10.1.1.5\" is not an address with prefix (e.g. 10.1.1.5/24)"
            )
        );
        assert_eq!(
            refused(r#"[{"name":"a","mac":"c2:11:22:33:44"}]"#),
            format!(
                "{p}network 1 (\"a\"): mac \"c2:11:22:33:44\" is not a MAC address (e.g. c2:11:22:33:44:55)"
            )
        );
        assert_eq!(
            refused(
                r#"[{"name":"a","default-route":["10.0.0.1"]},{"name":"b","default-route":["10.0.1.1"]}]"#
            ),
            format!("{p}network 2 (\"b\"): only one network may set default-route (no ECMP default routes)")
        );
        assert_eq!(
            refused(r#"[{"name":"a","default-route":["gw"]}]"#),
            format!("{p}network 1 (\"a\"): default-route gateway \"gw\" is not an IP address")
        );
        assert!(refused(r#"[{"nam":"a"}]"#).starts_with(&format!("{p}not a valid JSON list of networks: ")));
        assert!(refused("[{").starts_with(&format!("{p}not a valid JSON list of networks: ")));
    }
}
