//! IPPools: the pools a NAD names (`"ipam": {"type": "rust-ipam", "pool": "rail0"}`),
//! checked into what the allocator takes, and the set the gRPC layer resolves names in.
//!
//! A pool's name is its network: every NAD naming the pool shares its addresses (and a NAD
//! with inline ranges and `network_name` equal to the name shares them too). The set comes
//! from the API server (`k8s/ippools.rs`, listed and watched) or from a directory of YAML
//! files ([`dir`]); each source replaces the whole set when it changes. An invalid pool is
//! kept in the set with its error, so an allocation naming it is refused with that error
//! instead of "unknown pool", and status and metrics can show it.

pub mod dir;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ipnetwork::IpNetwork;
use tracing::{info, warn};

use crate::allocator::{AllocError, Allocator, FieldPrefix, PoolTotals, RangeInput, RangeSpec};
use crate::k8s::crd::{IPPoolSpec, PoolDns, PoolRoute};

/// A pool as the allocator uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    /// The pool's name, which is also its network.
    pub name: String,
    /// The ranges, checked; one address is allocated from each.
    pub ranges: Vec<RangeSpec>,
    pub routes: Vec<PoolRoute>,
    pub dns: Option<PoolDns>,
    /// Released addresses are not handed out again for this long (zero: no cooldown).
    pub cooldown: Duration,
}

impl Pool {
    /// The ranges as `kubectl get` shows them: `198.18.0.0/24,fd00::/64`.
    pub fn ranges_text(&self) -> String {
        self.ranges.iter().map(RangeSpec::display).collect::<Vec<_>>().join(",")
    }

    /// The cooldown in milliseconds, as the allocator takes it.
    pub fn cooldown_ms(&self) -> u64 {
        u64::try_from(self.cooldown.as_millis()).unwrap_or(u64::MAX)
    }
}

/// Why a pool cannot be used, naming the pool, the field and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// A field of the spec is wrong.
    #[error("pool {pool:?} is invalid: {error}")]
    Invalid {
        pool: String,
        #[source]
        error: AllocError,
    },
    /// The object could not be read as an IPPool at all (a file of the pools directory).
    #[error("{source_name}: {reason}")]
    Unreadable { source_name: String, reason: String },
}

fn field_error(pool: &str, field: String, value: &str, reason: impl Into<String>) -> PoolError {
    PoolError::Invalid {
        pool: pool.to_string(),
        error: AllocError::Invalid { field, value: value.to_string(), reason: reason.into() },
    }
}

/// A cooldown as the spec writes it: `30s`, `500ms`, `5m`, `0` or empty.
fn parse_cooldown(pool: &str, v: &str) -> Result<Duration, PoolError> {
    if v.is_empty() {
        return Ok(Duration::ZERO);
    }
    crate::cli::parse_duration(v)
        .map_err(|_| field_error(pool, "spec.cooldown".into(), v, "is not a duration like 30s, 500ms or 5m"))
}

/// Checks a spec into a [`Pool`]; the error names the first wrong field.
pub fn check(name: &str, spec: &IPPoolSpec) -> Result<Pool, PoolError> {
    if spec.ranges.is_empty() {
        return Err(field_error(name, "spec.ranges".into(), "", "is empty: at least one range is required"));
    }
    let mut ranges = Vec::with_capacity(spec.ranges.len());
    for (i, r) in spec.ranges.iter().enumerate() {
        let prefix = format!("spec.ranges[{i}].");
        let input = RangeInput {
            range: r.range.clone(),
            range_start: r.range_start.clone(),
            range_end: r.range_end.clone(),
            exclude: r.exclude.clone(),
            gateway: r.gateway.clone(),
        };
        let invalid = |error| PoolError::Invalid { pool: name.to_string(), error };
        let parsed = RangeSpec::parse(&input, FieldPrefix(&prefix)).map_err(invalid)?;
        parsed.check_contained(FieldPrefix(&prefix)).map_err(invalid)?;
        ranges.push(parsed);
    }
    for (i, r) in spec.routes.iter().enumerate() {
        if r.dst.trim().parse::<IpNetwork>().is_err() {
            return Err(field_error(name, format!("spec.routes[{i}].dst"), &r.dst, "is not a CIDR"));
        }
        if !r.gw.is_empty() && r.gw.trim().parse::<IpAddr>().is_err() {
            return Err(field_error(name, format!("spec.routes[{i}].gw"), &r.gw, "is not an IP address"));
        }
    }
    if let Some(dns) = &spec.dns {
        for (i, ns) in dns.nameservers.iter().enumerate() {
            if ns.trim().parse::<IpAddr>().is_err() {
                return Err(field_error(
                    name,
                    format!("spec.dns.nameservers[{i}]"),
                    ns,
                    "is not an IP address",
                ));
            }
        }
    }
    Ok(Pool {
        name: name.to_string(),
        ranges,
        routes: spec.routes.clone(),
        dns: spec.dns.clone(),
        cooldown: parse_cooldown(name, &spec.cooldown)?,
    })
}

/// Every pool a source holds, by name: usable, or the reason it is not.
#[derive(Debug, Clone, Default)]
pub struct PoolSet {
    pub pools: BTreeMap<String, Result<Arc<Pool>, PoolError>>,
    /// What the source could not read at all (no name to file it under).
    pub unreadable: Vec<PoolError>,
    /// Whether a source has filled it (else the pools are not known yet).
    pub loaded: bool,
}

impl PoolSet {
    /// The set of these specs, each checked.
    pub fn from_specs<'a>(specs: impl IntoIterator<Item = (&'a str, &'a IPPoolSpec)>) -> PoolSet {
        let pools = specs.into_iter().map(|(n, s)| (n.to_string(), check(n, s).map(Arc::new))).collect();
        PoolSet { pools, unreadable: Vec::new(), loaded: true }
    }

    /// The usable pools.
    pub fn valid(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.pools.values().filter_map(|p| p.as_ref().ok())
    }
}

/// Why a pool name cannot be allocated from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("pool {0:?} does not exist (no IPPool of that name)")]
    Unknown(String),
    #[error("the IPPools have not been read yet (looking for pool {0:?}); try again")]
    NotLoaded(String),
    #[error(transparent)]
    Invalid(Box<PoolError>),
}

/// The current pools, shared by the source that fills them and the services that read
/// them. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Pools {
    current: Arc<RwLock<Arc<PoolSet>>>,
}

impl Pools {
    /// Pools a source will fill; until it has, lookups answer [`LookupError::NotLoaded`].
    pub fn new() -> Pools {
        Pools::default()
    }

    /// No pools, and none will come (no source configured).
    pub fn empty() -> Pools {
        let pools = Pools::default();
        pools.replace(PoolSet { loaded: true, ..PoolSet::default() });
        pools
    }

    /// The set as it is now.
    pub fn snapshot(&self) -> Arc<PoolSet> {
        // A writer that panicked left a whole set behind: still the last one it swapped in.
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The usable pool named `name`.
    pub fn get(&self, name: &str) -> Result<Arc<Pool>, LookupError> {
        let set = self.snapshot();
        match set.pools.get(name) {
            None if !set.loaded => Err(LookupError::NotLoaded(name.to_string())),
            None => Err(LookupError::Unknown(name.to_string())),
            Some(Ok(p)) => Ok(p.clone()),
            Some(Err(e)) => Err(LookupError::Invalid(Box::new(e.clone()))),
        }
    }

    /// Replaces the set, logging what changed: a pool that became usable, changed, went
    /// away or is invalid (once per distinct error, not at every reload).
    pub fn replace(&self, set: PoolSet) {
        let old = self.snapshot();
        for (name, p) in &set.pools {
            let before = old.pools.get(name);
            match p {
                Ok(pool) if before.is_none_or(|b| b.as_ref().ok() != Some(pool)) => {
                    info!(pool = %name, ranges = %pool.ranges_text(), cooldown = ?pool.cooldown, "pool ready");
                }
                Err(e) if before.is_none_or(|b| b.as_ref().err() != Some(e)) => {
                    warn!(pool = %name, error = %e, "pool is invalid and not used");
                }
                _ => {}
            }
        }
        for name in old.pools.keys().filter(|n| !set.pools.contains_key(*n)) {
            info!(pool = %name, "pool removed");
        }
        for e in set.unreadable.iter().filter(|e| !old.unreadable.contains(e)) {
            warn!(error = %e, "pool definition cannot be read and is not used");
        }
        let set = PoolSet { loaded: true, ..set };
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(set);
    }
}

/// One pool's state, for status and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    pub name: String,
    /// The ranges as `kubectl get` shows them ("" for an invalid pool).
    pub ranges: String,
    pub totals: PoolTotals,
    /// Released addresses whose cooldown has not passed.
    pub cooldown_holds: usize,
    /// Why the pool is not used; `None`: it is.
    pub error: Option<String>,
}

/// Usage of every pool of `set` at `now_unix_ms` (an invalid pool with zeros and its
/// error), by name. Runs on the engine thread.
pub fn stats(alloc: &Allocator, set: &PoolSet, now_unix_ms: i64) -> Vec<PoolStats> {
    set.pools
        .iter()
        .map(|(name, p)| match p {
            Ok(pool) => PoolStats {
                name: name.clone(),
                ranges: pool.ranges_text(),
                totals: alloc.usage_of(name, &pool.ranges),
                cooldown_holds: alloc.cooldown_holds(name, now_unix_ms),
                error: None,
            },
            Err(e) => PoolStats {
                name: name.clone(),
                ranges: String::new(),
                totals: PoolTotals::default(),
                cooldown_holds: 0,
                error: Some(e.to_string()),
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::crd::PoolRange;

    fn spec(ranges: Vec<PoolRange>) -> IPPoolSpec {
        IPPoolSpec { ranges, routes: Vec::new(), dns: None, cooldown: String::new() }
    }

    fn range(r: &str) -> PoolRange {
        PoolRange { range: r.into(), ..Default::default() }
    }

    fn err(s: &IPPoolSpec) -> String {
        check("rail0", s).expect_err("invalid").to_string()
    }

    #[test]
    fn a_valid_pool_keeps_its_ranges_routes_dns_and_cooldown() {
        let s = IPPoolSpec {
            ranges: vec![
                PoolRange {
                    gateway: "198.18.0.1".into(),
                    exclude: vec!["198.18.0.0/30".into()],
                    ..range("198.18.0.0/24")
                },
                PoolRange {
                    range_start: "fd00::10".into(),
                    range_end: "fd00::20".into(),
                    ..range("fd00::/64")
                },
            ],
            routes: vec![PoolRoute { dst: "198.19.0.0/16".into(), gw: "198.18.0.1".into() }],
            dns: Some(PoolDns { nameservers: vec!["198.18.0.53".into()], ..Default::default() }),
            cooldown: "30s".into(),
        };
        let p = check("rail0", &s).expect("valid");
        assert_eq!(p.ranges_text(), "198.18.0.0/24,fd00::10-fd00::20/64");
        assert_eq!(p.cooldown_ms(), 30_000);
        assert_eq!(p.ranges[0].gateway(), Some("198.18.0.1".parse().expect("ip")));
        assert_eq!(p.routes.len(), 1);
    }

    #[test]
    fn invalid_pools_name_the_pool_the_field_and_the_value() {
        assert_eq!(
            err(&spec(vec![])),
            r#"pool "rail0" is invalid: spec.ranges "" is empty: at least one range is required"#
        );
        assert_eq!(
            err(&spec(vec![range("198.18.0.0/33")])),
            r#"pool "rail0" is invalid: spec.ranges[0].range "198.18.0.0/33" is not a CIDR or first-last/prefix range"#
        );
        assert_eq!(
            err(&spec(vec![
                range("198.18.0.0/24"),
                PoolRange { range_start: "198.18.1.5".into(), ..range("198.18.2.0/24") }
            ])),
            r#"pool "rail0" is invalid: spec.ranges[1].range_start "198.18.1.5" is outside range 198.18.2.0/24"#
        );
        assert_eq!(
            err(&spec(vec![PoolRange { exclude: vec!["198.18.9.0/28".into()], ..range("198.18.0.0/24") }])),
            r#"pool "rail0" is invalid: spec.ranges[0].exclude[0] "198.18.9.0/28" is outside range 198.18.0.0/24"#
        );
        assert_eq!(
            err(&spec(vec![PoolRange { gateway: "fd00::1".into(), ..range("198.18.0.0/24") }])),
            r#"pool "rail0" is invalid: spec.ranges[0].gateway "fd00::1" is not an IPv4 address (range 198.18.0.0/24 is IPv4)"#
        );
        let with = |f: &dyn Fn(&mut IPPoolSpec)| {
            let mut s = spec(vec![range("198.18.0.0/24")]);
            f(&mut s);
            err(&s)
        };
        assert_eq!(
            with(&|s| s.cooldown = "30 seconds".into()),
            r#"pool "rail0" is invalid: spec.cooldown "30 seconds" is not a duration like 30s, 500ms or 5m"#
        );
        assert_eq!(
            with(&|s| s.routes = vec![PoolRoute { dst: "default".into(), gw: String::new() }]),
            r#"pool "rail0" is invalid: spec.routes[0].dst "default" is not a CIDR"#
        );
        assert_eq!(
            with(&|s| s.routes = vec![PoolRoute { dst: "0.0.0.0/0".into(), gw: "gw".into() }]),
            r#"pool "rail0" is invalid: spec.routes[0].gw "gw" is not an IP address"#
        );
        assert_eq!(
            with(&|s| s.dns = Some(PoolDns { nameservers: vec!["dns.example".into()], ..Default::default() })),
            r#"pool "rail0" is invalid: spec.dns.nameservers[0] "dns.example" is not an IP address"#
        );
    }

    #[test]
    fn lookups_tell_unknown_from_invalid() {
        let good = spec(vec![range("198.18.0.0/24")]);
        let bad = spec(vec![range("nonsense")]);
        let pools = Pools::new();
        pools.replace(PoolSet::from_specs([("good", &good), ("bad", &bad)]));
        assert_eq!(pools.get("good").expect("usable").name, "good");
        assert_eq!(
            pools.get("bad").expect_err("invalid").to_string(),
            r#"pool "bad" is invalid: spec.ranges[0].range "nonsense" is not a CIDR or first-last/prefix range"#
        );
        assert_eq!(
            pools.get("gone").expect_err("unknown").to_string(),
            r#"pool "gone" does not exist (no IPPool of that name)"#
        );
        assert_eq!(pools.snapshot().valid().count(), 1);
        assert_eq!(
            Pools::new().get("good").expect_err("not loaded").to_string(),
            r#"the IPPools have not been read yet (looking for pool "good"); try again"#
        );
    }
}
