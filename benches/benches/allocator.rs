//! Allocator core benchmarks.
//!
//! One iteration of the `allocator:` groups is what the engine thread does for a CNI ADD
//! followed by a DEL of the same attachment: `Allocator::allocate` of one address, then
//! `Allocator::release`, then `drain_journal` (the engine drains the journal once per batch;
//! draining it here keeps memory flat). The request is reused with a fixed container ID: it
//! is released every iteration, so each allocate finds and takes the first free address.
//!
//! Each range is measured with its first 0%, 50% and 99% of addresses already held (lowest
//! first, as `allocate` hands them out), except:
//! - `fd00::/64`: half a /64 cannot be held in memory, so it holds the same *counts* as the
//!   /16 (0, 32767, 64878); the group name says so.
//! - `10.0.0.0/8`: the real 50% and 99% (8,388,607 and 16,609,441 leases). Filling that many
//!   through `allocate` took over 60 s for the 50% level alone, so the /8 is filled with
//!   `Allocator::reserve` (manual reservations: the same lease map and range bitmap, but no
//!   attachment index entries). Even so the 99% fill takes about 70 s and ~15 GB of memory
//!   at its peak; the fill time and memory are printed to stderr.
//!
//! The `range:` groups measure one `RangePool` alone at the same fill levels (first free
//! address, mark it held, mark it free): the address-level core (bitmap, exclusions,
//! address arithmetic) without the allocator's networks, attachment indexes and lease
//! records.
//!
//! Under `cargo test --benches` (criterion's test mode) every routine runs once and the
//! fills are capped at [`SMOKE_MAX_HELD`], so a test run never builds the 15 GB /8.

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ipam_server::allocator::{
    AllocateRequest, Allocator, Attachment, FieldPrefix, Leases, PodRef, RangeInput, RangePool, RangeSpec,
};

const NETWORK: &str = "bench";
const IFNAME: &str = "net1";
const HOT_CONTAINER: &str = "bench-hot-container";
const NOW_UNIX_MS: i64 = 1_700_000_000_000;
/// The fill levels, in percent of the range (or of the basis range, see [`Case::basis`]).
const LEVELS: [u128; 3] = [0, 50, 99];
/// Largest fill in criterion's test mode, where only "does it run" matters.
const SMOKE_MAX_HELD: u128 = 4096;
/// How many fill changes may pile up in the journal before it is drained.
const JOURNAL_DRAIN_EVERY: u128 = 4096;

/// How a range is pre-filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// `Allocator::allocate` with one attachment (and pod) per address: the state a real
    /// server reaches.
    Allocate,
    /// `Allocator::reserve` of each address: used where `allocate` is too slow to fill.
    Reserve,
}

/// One range to measure.
#[derive(Debug, Clone, Copy)]
struct Case {
    cidr: &'static str,
    /// Bench group name after the `allocator: ` / `bitmap: ` prefix; states any fill that is
    /// not the plain percentage of `cidr`.
    title: &'static str,
    fill: Fill,
    /// Range whose size the fill percentages apply to, when not `cidr` itself.
    basis: Option<&'static str>,
}

const CASES: [Case; 4] = [
    Case { cidr: "10.0.0.0/24", title: "10.0.0.0/24", fill: Fill::Allocate, basis: None },
    Case { cidr: "10.0.0.0/16", title: "10.0.0.0/16", fill: Fill::Allocate, basis: None },
    Case { cidr: "10.0.0.0/8", title: "10.0.0.0/8", fill: Fill::Reserve, basis: None },
    Case {
        cidr: "fd00::/64",
        title: "fd00::/64 (first N held, N = the /16's 0/50/99% counts)",
        fill: Fill::Allocate,
        basis: Some("10.0.0.0/16"),
    },
];

/// Whether criterion runs in test mode (`cargo test --benches`, `cargo bench -- --test`),
/// decided as criterion decides it.
fn smoke_test_mode() -> bool {
    let has = |flag: &str| std::env::args().any(|a| a == flag);
    !has("--bench") || has("--test")
}

fn spec(cidr: &str) -> RangeSpec {
    let input = RangeInput { range: cidr.to_string(), ..Default::default() };
    RangeSpec::parse(&input, FieldPrefix("")).expect("bench ranges are valid")
}

impl Case {
    /// `(held, bench id)` for each fill level.
    fn levels(&self) -> Vec<(u128, String)> {
        let basis = spec(self.basis.unwrap_or(self.cidr)).size();
        let smoke = smoke_test_mode();
        LEVELS
            .iter()
            .map(|pct| {
                let held = basis * pct / 100;
                let id = match self.basis {
                    None => format!("{pct}% full ({held} held)"),
                    Some(b) => format!("{held} held ({b} at {pct}%)"),
                };
                (if smoke { held.min(SMOKE_MAX_HELD) } else { held }, id)
            })
            .collect()
    }
}

/// `VmRSS` and `VmHWM` (peak) of this process, for the fill reports.
fn memory() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse::<f64>().ok())
            .map_or_else(|| "?".to_string(), |kb| format!("{:.2} GiB", kb / 1024.0 / 1024.0))
    };
    format!("rss {} (peak {})", field("VmRSS:"), field("VmHWM:"))
}

fn request(spec: &RangeSpec, container_id: &str, pod: &str) -> AllocateRequest {
    AllocateRequest {
        attachment: Arc::new(Attachment {
            container_id: container_id.into(),
            ifname: IFNAME.into(),
            pod: PodRef { namespace: "bench".into(), name: pod.into(), uid: String::new() },
            node: "node-1".into(),
            ..Default::default()
        }),
        network: NETWORK.into(),
        ranges: vec![spec.clone()],
        requested: Vec::new(),
    }
}

/// An allocator with one range whose first `held` addresses are taken.
struct Filled {
    case: Case,
    spec: RangeSpec,
    alloc: Allocator,
    hot: AllocateRequest,
    held: u128,
}

impl Filled {
    fn new(case: Case) -> Filled {
        let spec = spec(case.cidr);
        let hot = request(&spec, HOT_CONTAINER, "hot-pod");
        let mut f = Filled { case, spec, alloc: Allocator::new(), hot, held: 0 };
        // The first allocate creates the pool, so reserved addresses are marked in its
        // bitmap as they come (rather than all at once when a pool appears later).
        f.cycle();
        f
    }

    /// The measured work: allocate the first free address, release it, drain the journal.
    /// Returns the allocated leases (dropping them is part of the work, as in the server).
    fn cycle(&mut self) -> Leases {
        let leases = self.alloc.allocate(&self.hot, NOW_UNIX_MS).expect("the range has room");
        black_box(self.alloc.release(NETWORK, HOT_CONTAINER, IFNAME, 0));
        self.alloc.drain_journal().for_each(drop);
        leases
    }

    /// Takes addresses until `target` are held. Fills only grow: levels run low to high.
    fn fill_to(&mut self, target: u128) {
        if target <= self.held {
            return;
        }
        let started = Instant::now();
        let from = self.held;
        match self.case.fill {
            Fill::Allocate => {
                let mut req = request(&self.spec, "", "");
                for i in from..target {
                    let id = format!("fill-{i}");
                    req.attachment = Arc::new(Attachment {
                        container_id: id.clone(),
                        pod: PodRef { name: id, ..req.attachment.pod.clone() },
                        ..(*req.attachment).clone()
                    });
                    self.alloc.allocate(&req, NOW_UNIX_MS).expect("fill allocate");
                    if i % JOURNAL_DRAIN_EVERY == 0 {
                        self.alloc.drain_journal().for_each(drop);
                    }
                }
            }
            Fill::Reserve => {
                for off in from..target {
                    self.alloc
                        .reserve(NETWORK, self.spec.addr(off), "bench fill", NOW_UNIX_MS)
                        .expect("fill reserve");
                    if off % JOURNAL_DRAIN_EVERY == 0 {
                        self.alloc.drain_journal().for_each(drop);
                    }
                }
            }
        }
        self.alloc.drain_journal().for_each(drop);
        self.held = target;
        eprintln!(
            "fill {}: {from} -> {target} held via {:?} in {:.1?}, {}",
            self.case.cidr,
            self.case.fill,
            started.elapsed(),
            memory()
        );
        // The fill must leave exactly the next address free, or the levels mean nothing.
        let got: Vec<IpAddr> = self.cycle().iter().map(|l| l.address).collect();
        assert_eq!(got, vec![self.spec.addr(target)], "first free after the fill");
    }
}

fn allocator(c: &mut Criterion) {
    for case in CASES {
        let how = if case.fill == Fill::Reserve { " (filled by reserve)" } else { "" };
        let mut group = c.benchmark_group(format!("allocator: {}{how}", case.title));
        group.throughput(Throughput::Elements(1));
        // Built on first use, so a criterion filter that skips the group skips the fill.
        let mut state: Option<Filled> = None;
        for (held, id) in case.levels() {
            group.bench_function(id, |b| {
                let f = state.get_or_insert_with(|| Filled::new(case));
                f.fill_to(held);
                b.iter(|| f.cycle());
            });
        }
        group.finish();
        if let Some(f) = state.take() {
            let started = Instant::now();
            drop(f);
            eprintln!("drop {}: {:.1?}", case.cidr, started.elapsed());
        }
    }
}

fn range(c: &mut Criterion) {
    for case in CASES {
        let mut group = c.benchmark_group(format!("range: {}", case.title));
        group.throughput(Throughput::Elements(1));
        let spec = spec(case.cidr);
        let mut state: Option<(RangePool, u128)> = None;
        for (held, id) in case.levels() {
            group.bench_function(id, |b| {
                let (pool, filled) = state.get_or_insert_with(|| (RangePool::new(spec.clone()), 0));
                for off in *filled..held {
                    pool.mark(spec.addr(off), true);
                }
                *filled = (*filled).max(held);
                assert_eq!(pool.first_free(), Some(spec.addr(held)), "first free after the fill");
                b.iter(|| {
                    let ip = pool.first_free().expect("the range has room");
                    pool.mark(ip, true);
                    pool.mark(ip, false);
                    ip
                });
            });
        }
        group.finish();
    }
}

fn config() -> Criterion {
    // Each routine takes around a microsecond, so short windows give tight intervals and
    // keep the whole run (24 benches plus the /8 fill) to a few minutes on 2 cores.
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(40)
        .nresamples(20_000)
        .without_plots()
}

criterion_group! {
    name = benches;
    config = config();
    targets = allocator, range
}
criterion_main!(benches);
