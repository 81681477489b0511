//! The pod's `k8s.v1.cni.cncf.io/networks` annotation (comma form `ns/name@if` or the JSON
//! list), for a pod in the namespace of field 1. What it accepts must be what the rest of
//! the plugin relies on: valid names, distinct interfaces, at most one default route.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use multus_core::multus::annotation::{MAX_IFNAME, parse};
use rust_ipam_fuzz::{check_message, fields, text};

fuzz_target!(|data: &[u8]| {
    let f = fields(data, 2);
    let (value, namespace) = (text(f[0]), text(f[1]));
    match parse(&value, &namespace) {
        Ok(selections) => {
            let mut ifnames = BTreeSet::new();
            for s in &selections {
                assert!(!s.name.is_empty() && !s.namespace.is_empty(), "{s:?}");
                assert!(!s.interface.is_empty() && s.interface.len() <= MAX_IFNAME, "{s:?}");
                assert!(ifnames.insert(s.interface.clone()), "interface twice: {selections:?}");
            }
            assert!(selections.iter().filter(|s| !s.default_route.is_empty()).count() <= 1);
        }
        Err(e) => check_message(&e.0),
    }
});
