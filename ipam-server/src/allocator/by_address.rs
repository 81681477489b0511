//! The leases of one network by address: found in constant time for allocation, and read
//! in address order from any address for paged listing.
//!
//! Lookups go to a [`ShardedMap`] (no single growth step stalls a request, see
//! `sharded.rs`); the order lives in a `BTreeSet` beside it, which never rehashes, so a
//! page costs a seek plus its own length instead of a sort of every lease.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::ops::Bound;
use std::sync::Arc;

use super::Lease;
use super::sharded::ShardedMap;

/// Leases keyed by address.
#[derive(Debug, Default)]
pub(super) struct ByAddress {
    map: ShardedMap<IpAddr, Arc<Lease>>,
    order: BTreeSet<IpAddr>,
}

impl ByAddress {
    pub(super) fn get(&self, ip: &IpAddr) -> Option<&Arc<Lease>> {
        self.map.get(ip)
    }

    /// Holds `lease` at its address, returning the one it replaces.
    pub(super) fn insert(&mut self, lease: Arc<Lease>) -> Option<Arc<Lease>> {
        let ip = lease.address;
        let old = self.map.insert(ip, lease);
        if old.is_none() {
            self.order.insert(ip);
        }
        old
    }

    pub(super) fn remove(&mut self, ip: &IpAddr) -> Option<Arc<Lease>> {
        let old = self.map.remove(ip)?;
        self.order.remove(ip);
        Some(old)
    }

    /// Every held address, lowest first.
    pub(super) fn addresses(&self) -> impl Iterator<Item = &IpAddr> {
        self.order.iter()
    }

    /// The leases from `from` on, by address.
    pub(super) fn from(&self, from: Bound<IpAddr>) -> impl Iterator<Item = &Arc<Lease>> {
        self.order.range((from, Bound::Unbounded)).filter_map(|ip| self.map.get(ip))
    }
}

impl std::ops::Index<&IpAddr> for ByAddress {
    type Output = Arc<Lease>;

    fn index(&self, ip: &IpAddr) -> &Arc<Lease> {
        &self.map[ip]
    }
}
