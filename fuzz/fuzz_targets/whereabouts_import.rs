//! `rust-ipam-ctl import`: Whereabouts' IPPool and OverlappingRangeIPReservation objects
//! (YAML or JSON, single objects, `---` streams or `kind: List`; up to three inputs split at
//! NUL) decided against an empty allocator. Every entry it creates is a new lease, each
//! address once.
#![no_main]

use ipam_server::allocator::Allocator;
use ipam_server::import::{Action, import, table};
use libfuzzer_sys::fuzz_target;
use rust_ipam_fuzz::{check_message, fields, text};

fuzz_target!(|data: &[u8]| {
    let docs: Vec<String> = fields(data, 3).into_iter().filter(|d| !d.is_empty()).map(text).collect();
    let mut alloc = Allocator::new();
    match import(&docs, &mut alloc, 1_700_000_000_000) {
        Ok(rows) => {
            let created = rows.iter().filter(|r| r.action == Action::Create).count();
            assert_eq!(created, alloc.lease_count(), "rows created vs leases adopted: {rows:?}");
            for r in &rows {
                match &r.action {
                    Action::Create | Action::Exists => assert!(r.address.is_some(), "{r:?}"),
                    Action::Conflict(why) | Action::Malformed(why) => check_message(why),
                }
            }
            let _ = table(&rows);
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            check_message(&msg);
        }
    }
});
