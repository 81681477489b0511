//! The `k8s.v1.cni.cncf.io/network-status` pod annotation: one entry per attached network,
//! built from each delegate's CNI result, in the shape Multus writes.

use serde::Serialize;
use serde_json::{Map, Value};

/// The pod annotation key.
pub const NETWORK_STATUS_ANNOTATION: &str = "k8s.v1.cni.cncf.io/network-status";

/// One network of the pod as the annotation lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetworkStatus {
    /// `namespace/name` of the NAD, or the cluster network's name.
    pub name: String,
    pub interface: String,
    /// Addresses without prefix.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// True for the cluster network (the pod's default route).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub default: bool,
    pub dns: Value,
}

/// Why a result could not be turned into a status entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("network {network}: {reason}")]
pub struct StatusError {
    pub network: String,
    pub reason: String,
}

/// The entry for `network`, attached as `ifname`, from its delegate's CNI `result`
/// (0.3.0 to 1.1.0 shape).
pub fn from_result(
    network: &str,
    ifname: &str,
    result: &Value,
    default: bool,
) -> Result<NetworkStatus, StatusError> {
    let fail = |reason: String| StatusError { network: network.to_string(), reason };
    let interfaces = result.get("interfaces").and_then(Value::as_array).cloned().unwrap_or_default();
    // The pod's side: the interface in a sandbox with the name asked for.
    let idx = interfaces.iter().position(|i| {
        i.get("sandbox").and_then(Value::as_str).is_some_and(|s| !s.is_empty())
            && i.get("name").and_then(Value::as_str) == Some(ifname)
    });
    let mac = idx.and_then(|i| interfaces[i].get("mac")).and_then(Value::as_str).map(str::to_string);
    let mut ips = Vec::new();
    for ip in result.get("ips").and_then(Value::as_array).into_iter().flatten() {
        let address = ip
            .get("address")
            .and_then(Value::as_str)
            .ok_or_else(|| fail(format!("ips entry {ip} has no address")))?;
        // An address belongs to the pod's interface when it points there, or points nowhere.
        let on_pod = match ip.get("interface").and_then(Value::as_u64) {
            Some(i) => Some(i as usize) == idx,
            None => true,
        };
        if on_pod {
            ips.push(address.split_once('/').map_or(address, |(a, _)| a).to_string());
        }
    }
    let dns = match result.get("dns") {
        Some(Value::Object(d)) => Value::Object(d.clone()),
        _ => Value::Object(Map::new()),
    };
    Ok(NetworkStatus { name: network.to_string(), interface: ifname.to_string(), ips, mac, default, dns })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fixture(path: &str) -> Value {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/multus").join(path);
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        serde_json::from_str(&text).expect("JSON fixture")
    }

    #[test]
    fn built_from_the_recorded_results_it_matches_what_multus_wrote() {
        // The cluster network's result as returned to the runtime, and the delegates'
        // results from libcni's cache.
        let eth0 = fixture("add-result.json");
        let net1 = fixture("cache/results/rail-0-cid-fx1-net1");
        let net2 = fixture("cache/results/rail-1-cid-fx1-net2");
        let status = vec![
            from_result("default-net", "eth0", &eth0, true).expect("eth0"),
            from_result("fixture/rail-0", "net1", &net1["result"], false).expect("net1"),
            from_result("fixture/rail-1", "net2", &net2["result"], false).expect("net2"),
        ];
        assert_eq!(serde_json::to_value(&status).expect("json"), fixture("network-status.json"));
    }

    #[test]
    fn ipam_style_results_and_bad_ones() {
        let r = serde_json::json!({"cniVersion": "0.3.1", "ips": [{"address": "10.1.0.5/16", "version": "4"}],
            "dns": {"nameservers": ["10.0.0.10"]}});
        let s = from_result("ns/a", "net1", &r, false).expect("status");
        assert_eq!(
            (s.ips, s.mac, s.dns["nameservers"][0].clone()),
            (vec!["10.1.0.5".to_string()], None, "10.0.0.10".into())
        );
        let bad = serde_json::json!({"ips": [{"gateway": "10.0.0.1"}]});
        assert_eq!(
            from_result("ns/a", "net1", &bad, false).expect_err("no address").to_string(),
            r#"network ns/a: ips entry {"gateway":"10.0.0.1"} has no address"#
        );
    }
}
