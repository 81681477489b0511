//! A CNI result (a delegate's ADD answer, a `prevResult`, a cached result): parsed, then
//! written in every supported version and read back, which must give the same result.
#![no_main]

use cni::{CniResult, SUPPORTED_VERSIONS};
use libfuzzer_sys::fuzz_target;
use rust_ipam_fuzz::check_cni_error;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    match CniResult::parse(&v) {
        Ok(r) => {
            for &version in SUPPORTED_VERSIONS {
                let s = version.to_string();
                let shown = r.render(version);
                let back = CniResult::parse(&shown)
                    .unwrap_or_else(|e| panic!("result rendered as {s} does not parse: {e:?}\n{shown}"));
                // Older versions drop what they cannot say; rendering that again is stable.
                assert_eq!(back.render(version), shown, "rendering as {s} is not stable");
            }
        }
        Err(e) => check_cni_error(&e),
    }
});
