//! The `k8s.v1.cni.cncf.io/network-status` pod annotation: one entry per attached network,
//! built from each delegate's typed CNI result, in the shape Multus writes.

use serde::Serialize;
use serde_json::{Map, Value};

use super::delegate::AddResult;

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
    /// The device of a device-plugin network (the device-info spec's object).
    #[serde(rename = "device-info", skip_serializing_if = "Option::is_none")]
    pub device_info: Option<Value>,
}

/// The entry for `network`, attached as `ifname`, from its delegate's result.
pub fn from_result(network: &str, ifname: &str, result: &AddResult, default: bool) -> NetworkStatus {
    let mut status = NetworkStatus {
        name: network.to_string(),
        interface: ifname.to_string(),
        ips: Vec::new(),
        mac: None,
        default,
        dns: Value::Object(Map::new()),
        device_info: None,
    };
    match result {
        AddResult::Typed(r, _) => {
            // The pod's side: the interface in a sandbox with the name asked for.
            let idx = r.interfaces.iter().position(|i| !i.sandbox.is_empty() && i.name == ifname);
            status.mac = idx.map(|i| r.interfaces[i].mac.clone()).filter(|m| !m.is_empty());
            // An address belongs to the pod's interface when it points there, or points nowhere.
            status.ips = r
                .ips
                .iter()
                .filter(|ip| ip.interface.is_none_or(|i| Some(i) == idx))
                .map(|ip| ip.address.ip().to_string())
                .collect();
            if let Some(d) = &r.dns {
                status.dns = d.to_json();
            }
        }
        // Only what has the same place in every version.
        AddResult::Legacy(raw) => {
            if let Some(d @ Value::Object(_)) = raw.get("dns") {
                status.dns = d.clone();
            }
        }
    }
    status
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
            from_result("default-net", "eth0", &typed(&eth0), true),
            from_result("fixture/rail-0", "net1", &typed(&net1["result"]), false),
            from_result("fixture/rail-1", "net2", &typed(&net2["result"]), false),
        ];
        assert_eq!(serde_json::to_value(&status).expect("json"), fixture("network-status.json"));
    }

    fn typed(v: &Value) -> AddResult {
        AddResult::parse(v, "1.0.0").expect("result")
    }

    #[test]
    fn ipam_style_and_legacy_results() {
        let r = serde_json::json!({"cniVersion": "0.3.1", "ips": [{"address": "10.1.0.5/16", "version": "4"}],
            "dns": {"nameservers": ["10.0.0.10"]}});
        let s = from_result("ns/a", "net1", &typed(&r), false);
        assert_eq!(
            (s.ips, s.mac, s.dns["nameservers"][0].clone()),
            (vec!["10.1.0.5".to_string()], None, "10.0.0.10".into())
        );
        let old = serde_json::json!({"cniVersion": "0.2.0", "ip4": {"ip": "10.1.0.5/16"},
            "dns": {"nameservers": ["10.0.0.10"]}});
        let s = from_result("ns/a", "net1", &typed(&old), false);
        assert_eq!(
            serde_json::to_value(&s).expect("json"),
            serde_json::json!({"name": "ns/a", "interface": "net1", "dns": {"nameservers": ["10.0.0.10"]}})
        );
    }
}
