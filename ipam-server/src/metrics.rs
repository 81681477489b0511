//! The Prometheus registry: the server-wide metrics at its root (`rustipam_*`), and a
//! sub-registry for each module that owns its metrics (`rustipam_<module>_*`, e.g. the
//! reconcile's), so this module knows nothing of the modules that count.
//!
//! Counters and histograms are updated as requests and commits happen; pool and lease
//! gauges are set from the allocator when scraped, so they are never stale.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::allocator::PoolUsage;
use crate::pools::PoolStats;

// Labels are static strings: counting a request allocates nothing.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcCode {
    rpc: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Rpc {
    rpc: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Pool {
    network: String,
    range: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IpPool {
    pool: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IpPoolNode {
    pool: String,
    node: String,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// The registry and the server-wide metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RpcCode, Counter>,
    request_seconds: Family<Rpc, Histogram>,
    commit_seconds: Histogram,
    batch_size: Histogram,
    commit_failures: Counter,
    late_leases: Counter,
    leases: Gauge,
    serving: Gauge,
    leader: Gauge,
    // Sizes are floats: an IPv6 range holds more than i64 can count.
    pool_size: Family<Pool, FloatGauge>,
    pool_used: Family<Pool, FloatGauge>,
    pool_excluded: Family<Pool, FloatGauge>,
    pool_free: Family<Pool, FloatGauge>,
    ippool_size: Family<IpPool, FloatGauge>,
    ippool_used: Family<IpPool, FloatGauge>,
    ippool_free: Family<IpPool, FloatGauge>,
    ippool_cooldown_holds: Family<IpPool, Gauge>,
    ippool_valid: Family<IpPool, Gauge>,
    ippool_blocks: Family<IpPool, Gauge>,
    ippool_rail_unaligned: Family<IpPool, Gauge>,
    ippool_node_used: Family<IpPoolNode, FloatGauge>,
    ippool_node_free: Family<IpPoolNode, FloatGauge>,
    ippool_node_size: Family<IpPoolNode, FloatGauge>,
    ippool_node_cooldown_holds: Family<IpPoolNode, Gauge>,
}

/// Builds [`Metrics`]: modules register their own metrics in sub-registries first.
#[derive(Debug)]
pub struct MetricsBuilder {
    metrics: Metrics,
}

fn latency() -> Histogram {
    // 50 us to about 1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Metrics {
    /// A registry with the server-wide metrics only, every one at zero.
    pub fn new() -> Arc<Metrics> {
        Metrics::builder().build()
    }

    /// A builder with the server-wide metrics registered.
    pub fn builder() -> MetricsBuilder {
        let mut m = Metrics {
            registry: Registry::with_prefix("rustipam"),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency),
            commit_seconds: latency(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            commit_failures: Counter::default(),
            late_leases: Counter::default(),
            leases: Gauge::default(),
            serving: Gauge::default(),
            leader: Gauge::default(),
            pool_size: Family::default(),
            pool_used: Family::default(),
            pool_excluded: Family::default(),
            pool_free: Family::default(),
            ippool_size: Family::default(),
            ippool_used: Family::default(),
            ippool_free: Family::default(),
            ippool_cooldown_holds: Family::default(),
            ippool_valid: Family::default(),
            ippool_blocks: Family::default(),
            ippool_rail_unaligned: Family::default(),
            ippool_node_used: Family::default(),
            ippool_node_free: Family::default(),
            ippool_node_size: Family::default(),
            ippool_node_cooldown_holds: Family::default(),
        };
        let registry = &mut m.registry;
        registry.register("requests", "gRPC requests by method and status code", m.requests.clone());
        registry.register("request_seconds", "gRPC request latency by method", m.request_seconds.clone());
        registry.register(
            "store_commit_seconds",
            "Latency of one durable store commit",
            m.commit_seconds.clone(),
        );
        registry.register("store_batch_requests", "Requests answered by one commit", m.batch_size.clone());
        registry.register("store_commit_failures", "Store commits that failed", m.commit_failures.clone());
        registry.register(
            "late_leases_adopted",
            "Lease objects that landed after this replica loaded as leader (a previous leader's late creates), taken into memory",
            m.late_leases.clone(),
        );
        registry.register("leases", "Addresses held, all networks", m.leases.clone());
        registry.register("serving", "1 when this replica allocates", m.serving.clone());
        registry.register("leader", "1 while this replica holds the leader lease", m.leader.clone());
        registry.register("pool_size", "Addresses a pool may hand out", m.pool_size.clone());
        registry.register(
            "pool_used",
            "Addresses of a pool held by anyone in its network",
            m.pool_used.clone(),
        );
        registry.register(
            "pool_excluded",
            "Excluded addresses of a pool, gateway included",
            m.pool_excluded.clone(),
        );
        registry.register("pool_free", "Addresses a pool can still hand out", m.pool_free.clone());
        registry.register(
            "ippool_size",
            "Addresses of an IPPool's ranges, excluded ones included",
            m.ippool_size.clone(),
        );
        registry.register("ippool_used", "Addresses of an IPPool held", m.ippool_used.clone());
        registry.register("ippool_free", "Addresses an IPPool can still hand out", m.ippool_free.clone());
        registry.register(
            "ippool_cooldown_holds",
            "Released addresses of an IPPool whose cooldown has not passed",
            m.ippool_cooldown_holds.clone(),
        );
        registry.register(
            "ippool_blocks",
            "Per-node blocks of an IPPool that hold addresses",
            m.ippool_blocks.clone(),
        );
        registry.register(
            "ippool_rail_unaligned",
            "Allocations of an IPPool that could not take the host index the pod has on the other rails of its rail group, since this replica started leading",
            m.ippool_rail_unaligned.clone(),
        );
        registry.register(
            "ippool_node_used",
            "Addresses held in a node's per-node blocks of an IPPool",
            m.ippool_node_used.clone(),
        );
        registry.register(
            "ippool_node_free",
            "Addresses a node's per-node blocks of an IPPool can still hand out",
            m.ippool_node_free.clone(),
        );
        registry.register(
            "ippool_node_size",
            "Addresses a node's per-node blocks of an IPPool hand out (held or free)",
            m.ippool_node_size.clone(),
        );
        registry.register(
            "ippool_node_cooldown_holds",
            "Released addresses in a node's per-node blocks of an IPPool whose cooldown has not passed",
            m.ippool_node_cooldown_holds.clone(),
        );
        registry.register(
            "ippool_valid",
            "1 when the server uses an IPPool, 0 when it is invalid",
            m.ippool_valid.clone(),
        );
        MetricsBuilder { metrics: m }
    }

    /// Counts one gRPC request: `rpc` as `package.Service/Method`, `code` as the status
    /// code's name.
    pub fn observe_rpc(&self, rpc: &'static str, code: &'static str, took: Duration) {
        self.requests.get_or_create(&RpcCode { rpc, code }).inc();
        self.request_seconds.get_or_create(&Rpc { rpc }).observe(took.as_secs_f64());
    }

    /// Records one store commit of `batch` requests.
    pub fn observe_commit(&self, took: Duration, batch: usize, ok: bool) {
        self.commit_seconds.observe(took.as_secs_f64());
        self.batch_size.observe(batch as f64);
        if !ok {
            self.commit_failures.inc();
        }
    }

    /// Counts one lease object taken into memory after it landed late.
    pub fn count_late_lease(&self) {
        self.late_leases.inc();
    }

    /// Records whether this replica holds the leader lease.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// The text exposition, with the gauges set from the allocator's current state.
    pub fn render(&self, pools: &[PoolUsage], ippools: &[PoolStats], leases: usize, serving: bool) -> String {
        self.leases.set(leases as i64);
        self.serving.set(i64::from(serving));
        for f in [&self.pool_size, &self.pool_used, &self.pool_excluded, &self.pool_free] {
            f.clear();
        }
        for p in pools {
            let l = Pool { network: p.network.to_string(), range: p.range.range.clone() };
            self.pool_size.get_or_create(&l).set(p.size as f64);
            self.pool_used.get_or_create(&l).set(p.used as f64);
            self.pool_excluded.get_or_create(&l).set(p.excluded as f64);
            self.pool_free.get_or_create(&l).set(p.free as f64);
        }
        for f in [&self.ippool_size, &self.ippool_used, &self.ippool_free] {
            f.clear();
        }
        self.ippool_cooldown_holds.clear();
        self.ippool_valid.clear();
        self.ippool_blocks.clear();
        self.ippool_rail_unaligned.clear();
        self.ippool_node_used.clear();
        self.ippool_node_free.clear();
        self.ippool_node_size.clear();
        self.ippool_node_cooldown_holds.clear();
        for p in ippools {
            let l = IpPool { pool: p.name.clone() };
            self.ippool_valid.get_or_create(&l).set(i64::from(p.error.is_none()));
            if p.error.is_none() {
                self.ippool_size.get_or_create(&l).set(p.totals.size as f64);
                self.ippool_used.get_or_create(&l).set(p.totals.used as f64);
                self.ippool_free.get_or_create(&l).set(p.totals.free as f64);
                self.ippool_cooldown_holds.get_or_create(&l).set(p.cooldown_holds as i64);
                if !p.blocks.is_empty() {
                    self.ippool_blocks.get_or_create(&l).set(p.blocks.len() as i64);
                }
                let mut per_node: std::collections::BTreeMap<&str, (f64, f64, f64, i64)> = Default::default();
                for b in &p.blocks {
                    let n = per_node.entry(b.node.as_str()).or_default();
                    n.0 += b.used as f64;
                    n.1 += b.free as f64;
                    n.2 += b.size as f64;
                    n.3 += i64::try_from(b.cooldown_holds).unwrap_or(i64::MAX);
                }
                for (node, (used, free, size, cooling)) in per_node {
                    let l = IpPoolNode { pool: p.name.clone(), node: node.to_string() };
                    self.ippool_node_used.get_or_create(&l).set(used);
                    self.ippool_node_free.get_or_create(&l).set(free);
                    self.ippool_node_size.get_or_create(&l).set(size);
                    self.ippool_node_cooldown_holds.get_or_create(&l).set(cooling);
                }
                if p.unaligned > 0 {
                    self.ippool_rail_unaligned
                        .get_or_create(&l)
                        .set(i64::try_from(p.unaligned).unwrap_or(i64::MAX));
                }
            }
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl MetricsBuilder {
    /// The registry of one module's metrics: a name `n` registered there is exported as
    /// `rustipam_<prefix>_<n>`, after the server-wide metrics.
    pub fn sub_registry(&mut self, prefix: &str) -> &mut Registry {
        self.metrics.registry.sub_registry_with_prefix(prefix)
    }

    /// The metrics, ready to count and render.
    pub fn build(self) -> Arc<Metrics> {
        Arc::new(self.metrics)
    }
}
