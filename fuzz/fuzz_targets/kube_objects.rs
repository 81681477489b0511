//! What a new leader reads back from the API server: `IPLease` and `RangePool` objects
//! (a JSON or YAML `kind: List`, or one object), decoded as the kube store decodes them
//! (`decode_lease`, `RangePoolSpec`), then restored into an allocator as a takeover does.
//! Objects are typed by the API server's schema, but another writer (an older or newer
//! replica, a `kubectl edit`) can still put anything the schema allows into them.
#![no_main]

use ipam_server::allocator::{Allocator, LeaseFilter};
use ipam_server::k8s::crd::RangePoolSpec;
use ipam_server::k8s::store::decode_lease;
use kube::api::DynamicObject;
use libfuzzer_sys::fuzz_target;
use rust_ipam_fuzz::check_message;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(v) = serde_yaml::from_str::<serde_json::Value>(text) else { return };
    let items = match v.get("items").and_then(|i| i.as_array()) {
        Some(items) => items.clone(),
        None => vec![v],
    };
    let (mut pools, mut leases) = (Vec::new(), Vec::new());
    for item in items {
        let Ok(obj) = serde_json::from_value::<DynamicObject>(item) else { continue };
        let kind = obj.types.as_ref().map(|t| t.kind.as_str()).unwrap_or_default();
        if kind == "RangePool" {
            let spec = obj.data.get("spec").cloned().unwrap_or_default();
            if let Ok(s) = serde_json::from_value::<RangePoolSpec>(spec) {
                pools.push((s.network.clone(), s.input()));
            }
        } else {
            match decode_lease(&obj) {
                Ok(l) => leases.push(l),
                Err(e) => check_message(&e),
            }
        }
    }
    let (alloc, problems) = Allocator::restore(pools, leases);
    for p in &problems {
        check_message(&p.error);
    }
    let _ = alloc.pools(None);
    let _ = alloc.leases(&LeaseFilter::default());
});
