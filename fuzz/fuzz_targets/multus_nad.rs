//! rust-multus from its configuration to the delegates it would call: the config on stdin
//! (field 0), the pod's networks annotation (field 1) and default-network annotation
//! (field 3), and the `spec.config` every NetworkAttachmentDefinition has (field 2, served
//! by an in-memory object source for any namespace/name). Also reads field 2 as a
//! delegate's ADD answer, as `AddResult::parse` does.
#![no_main]

use std::collections::BTreeMap;

use cni::ErrorCode;
use libfuzzer_sys::fuzz_target;
use multus_core::multus::annotation::NETWORKS_ANNOTATION;
use multus_core::multus::config::MultusConf;
use multus_core::multus::delegate::AddResult;
use multus_core::multus::resolve::{self, DEFAULT_NETWORK_ANNOTATION, Pod};
use multus_core::multus::source::{NadInfo, ObjectSource, PodInfo, SourceError};
use rust_ipam_fuzz::{check_cni_error, fields, text};

/// Every NAD asked for exists, with the same config.
#[derive(Debug)]
struct OneConfig(String);

impl ObjectSource for OneConfig {
    fn pod(&self, _: &str, _: &str) -> Result<Option<PodInfo>, SourceError> {
        Ok(None)
    }
    fn nad(&self, _: &str, _: &str) -> Result<Option<NadInfo>, SourceError> {
        Ok(Some(NadInfo { config: self.0.clone(), resource_name: String::new() }))
    }
    fn annotate_pod(&self, _: &str, _: &str, _: &str, _: Option<&str>) -> Result<(), SourceError> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fields(data, 4);
    let nad = text(f[2]);
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&nad) {
        match AddResult::parse(&v, "1.0.0") {
            Ok(_) => {}
            Err(e) => check_cni_error(&e),
        }
    }
    let conf = match MultusConf::parse(f[0]) {
        Ok(c) => c,
        Err(e) => return check_cni_error(&e),
    };
    let mut annotations = BTreeMap::new();
    annotations.insert(NETWORKS_ANNOTATION.to_string(), text(f[1]));
    if !f[3].is_empty() {
        annotations.insert(DEFAULT_NETWORK_ANNOTATION.to_string(), text(f[3]));
    }
    let info = PodInfo { uid: "uid-1".into(), annotations, claims: Vec::new() };
    let source = OneConfig(nad);
    let pod = Pod { namespace: "default", info: Some(&info) };
    match resolve::delegates(&conf, Some(&source), &pod, "eth0") {
        Ok(delegates) => {
            for (i, d) in delegates.iter().enumerate() {
                let net =
                    d.network().unwrap_or_else(|e| panic!("delegate {i} loaded but does not parse: {e:?}"));
                assert!(!net.plugins.is_empty());
                assert!(!d.ifname("eth0", i).is_empty());
            }
        }
        // Files named by clusterNetwork may be missing or unreadable here: an I/O code is
        // fine, as long as it says so.
        Err(e) if e.code == ErrorCode::IO_FAILURE => rust_ipam_fuzz::check_message(&e.msg),
        Err(e) => check_cni_error(&e),
    }
});
