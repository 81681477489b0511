//! The `rust-ipam` plugin's network configuration on stdin (field 0) merged with the node
//! file (field 1, written to a file the config reads as its default node file), then each
//! range as the server checks it (`RangeSpec::parse`, what `Allocate` does with it).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use ipam_cni::config::NetConf;
use ipam_server::allocator::{FieldPrefix, RangeInput, RangeSpec};
use libfuzzer_sys::fuzz_target;
use rust_ipam_fuzz::{check_cni_error, check_message, fields};

/// The node file, one per process (a fuzzing process runs one input at a time).
fn node_file() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("rust-ipam-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir.join("rust-ipam.conf")
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fields(data, 2);
    let node = node_file();
    if f[1].is_empty() {
        let _ = std::fs::remove_file(node);
    } else {
        std::fs::write(node, f[1]).expect("write node file");
    }
    match NetConf::parse(f[0], node) {
        Ok(conf) => {
            let Some(ipam) = conf.ipam else { return };
            assert!(!ipam.ranges.is_empty(), "an ipam config without ranges was accepted");
            assert!(!ipam.servers.is_empty() && !ipam.timeout.is_zero());
            for r in &ipam.ranges {
                let input = RangeInput {
                    range: r.range.clone(),
                    range_start: r.range_start.clone(),
                    range_end: r.range_end.clone(),
                    exclude: r.exclude.clone(),
                    gateway: ipam.gateway.clone(),
                };
                if let Err(e) = RangeSpec::parse(&input, FieldPrefix("")) {
                    check_message(&e.to_string());
                }
            }
        }
        Err(e) => check_cni_error(&e),
    }
});
