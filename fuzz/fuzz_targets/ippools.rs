//! IPPools as a pools directory file holds them (YAML, several documents), checked as the
//! server checks them; every usable pool then allocates for three attachments on two nodes
//! (through its per-node blocks when it has them, aligned with its rail group's), releases
//! one under its cooldown, and reports its usage as status and metrics do. Bad pools must be refused with a message
//! naming what was wrong, never a panic; the block and count arithmetic must hold for any
//! range and prefix the checks let through.
#![no_main]

use std::sync::Arc;

use ipam_server::allocator::{AllocateRequest, Allocator, Attachment};
use ipam_server::pools::{allocate_in_blocks, dir, rail_siblings, stats};
use libfuzzer_sys::fuzz_target;
use rust_ipam_fuzz::check_message;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let set = dir::from_text("fuzz.yaml", text);
    for e in &set.unreadable {
        check_message(&e.to_string());
    }
    let mut alloc = Allocator::new();
    for (name, pool) in &set.pools {
        let pool = match pool {
            Ok(p) => p,
            Err(e) => {
                check_message(&e.to_string());
                continue;
            }
        };
        alloc.set_cooldown(name, pool.cooldown_ms());
        for (cid, node) in [("c1", "n1"), ("c2", "n2"), ("c3", "n1")] {
            let req = AllocateRequest {
                attachment: Arc::new(Attachment {
                    container_id: cid.into(),
                    ifname: "net1".into(),
                    node: node.into(),
                    ..Attachment::default()
                }),
                network: name.as_str().into(),
                ranges: pool.ranges.clone(),
                requested: Vec::new(),
            };
            let got = allocate_in_blocks(&mut alloc, &req, pool, &rail_siblings(&set, pool), 1);
            match got {
                Ok(leases) => assert_eq!(leases.len(), pool.ranges.len(), "one address per range"),
                Err(e) => check_message(&e.to_string()),
            }
        }
        alloc.release(name, "c1", "net1", 2);
    }
    for s in stats(&alloc, &set, 3) {
        let t = s.totals;
        assert!(t.used.saturating_add(t.excluded) <= t.size, "{} counts {t:?}", s.name);
    }
});
