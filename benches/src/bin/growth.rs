//! The worst single allocate while an allocator grows to millions of attachment leases:
//! shows whether map growth stalls a request (it is the engine thread's work, so every
//! waiting client would stall with it). Prints the slowest call between each doubling.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ipam_server::allocator::{
    AllocateRequest, Allocator, Attachment, FieldPrefix, PodRef, RangeInput, RangeSpec,
};

/// Fill one /8 with attachment leases and report the slowest allocate per doubling.
#[derive(Debug, Parser)]
struct Args {
    /// Leases to reach.
    #[arg(long, default_value_t = 2_000_000)]
    leases: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let range = RangeInput { range: "10.0.0.0/8".into(), ..Default::default() };
    let spec = RangeSpec::parse(&range, FieldPrefix("")).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut alloc = Allocator::new();
    println!("| leases | slowest allocate ms | mean us |");
    println!("|---:|---:|---:|");
    let (mut worst, mut total, mut since) = (Duration::ZERO, Duration::ZERO, 0usize);
    let mut next_report = 1024;
    for i in 0..args.leases {
        let id = format!("c{i}");
        let req = AllocateRequest {
            attachment: Arc::new(Attachment {
                container_id: id.clone(),
                ifname: "net1".into(),
                pod: PodRef { namespace: "growth".into(), name: id, uid: String::new() },
                node: "node-1".into(),
                ..Default::default()
            }),
            network: "".into(),
            ranges: vec![spec.clone()],
            requested: Vec::new(),
        };
        let started = Instant::now();
        alloc.allocate(&req, 0).map_err(|e| anyhow::anyhow!("{e}"))?;
        alloc.drain_journal().for_each(drop);
        let took = started.elapsed();
        worst = worst.max(took);
        total += took;
        since += 1;
        if i + 1 == next_report || i + 1 == args.leases {
            let mean = total.as_secs_f64() * 1e6 / since as f64;
            println!("| {} | {:.2} | {mean:.2} |", i + 1, worst.as_secs_f64() * 1e3);
            (worst, total, since) = (Duration::ZERO, Duration::ZERO, 0);
            next_report *= 2;
        }
    }
    Ok(())
}
