//! The leases of one network by address: found in constant time for allocation, and read
//! in address order from any address for paged listing.
//!
//! Lookups go to a [`ShardedMap`] (no single growth step stalls a request, see
//! `sharded.rs`). The order lives beside it as set bits, 64 addresses to a word, the words
//! in a B-tree by address / 64 (one per family; every IPv4 address sorts before every
//! IPv6 one, as `IpAddr` does). Addresses are handed out lowest first, so neighbours share
//! a word: holding or freeing one is a search of a tree 64 times smaller than the lease
//! count and a bit flip, and a B-tree never rehashes. A page costs a seek plus its own
//! length instead of a sort of every lease.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Bound;
use std::sync::Arc;

use super::Lease;
use super::sharded::ShardedMap;

/// Leases keyed by address.
#[derive(Debug, Default)]
pub(super) struct ByAddress {
    map: ShardedMap<IpAddr, Arc<Lease>>,
    v4: Bits<u32>,
    v6: Bits<u128>,
}

/// Where an address sits in [`Bits`]: its word (address / 64) and bit (address % 64).
fn v4_slot(a: Ipv4Addr) -> (u32, u32) {
    (a.to_bits() >> 6, a.to_bits() & 63)
}

fn v6_slot(a: Ipv6Addr) -> (u128, u32) {
    (a.to_bits() >> 6, (a.to_bits() & 63) as u32)
}

impl ByAddress {
    pub(super) fn get(&self, ip: &IpAddr) -> Option<&Arc<Lease>> {
        self.map.get(ip)
    }

    /// Holds `lease` at its address, returning the one it replaces.
    pub(super) fn insert(&mut self, lease: Arc<Lease>) -> Option<Arc<Lease>> {
        let ip = lease.address;
        let old = self.map.insert(ip, lease);
        match ip {
            IpAddr::V4(a) => self.v4.set(v4_slot(a)),
            IpAddr::V6(a) => self.v6.set(v6_slot(a)),
        }
        old
    }

    pub(super) fn remove(&mut self, ip: &IpAddr) -> Option<Arc<Lease>> {
        let old = self.map.remove(ip)?;
        match *ip {
            IpAddr::V4(a) => self.v4.clear(v4_slot(a)),
            IpAddr::V6(a) => self.v6.clear(v6_slot(a)),
        }
        Some(old)
    }

    /// Every held address, lowest first.
    pub(super) fn addresses(&self) -> impl Iterator<Item = IpAddr> {
        self.from(Bound::Unbounded).map(|l| l.address)
    }

    /// The leases from `from` on, by address.
    pub(super) fn from(&self, from: Bound<IpAddr>) -> impl Iterator<Item = &Arc<Lease>> {
        // The first (word, bit) to yield in each family; `None`: none of that family.
        let next_bit = |(w, b): (u32, u32)| (w, b + 1);
        let (v4, v6) = match from {
            Bound::Unbounded => (Some((0, 0)), (0, 0)),
            Bound::Included(IpAddr::V4(a)) => (Some(v4_slot(a)), (0, 0)),
            Bound::Excluded(IpAddr::V4(a)) => (Some(next_bit(v4_slot(a))), (0, 0)),
            Bound::Included(IpAddr::V6(a)) => (None, v6_slot(a)),
            Bound::Excluded(IpAddr::V6(a)) => {
                let (w, b) = v6_slot(a);
                (None, (w, b + 1))
            }
        };
        let v4 = v4
            .into_iter()
            .flat_map(|start| self.v4.from(start))
            .map(|(w, b)| IpAddr::V4(Ipv4Addr::from_bits((w << 6) | b)));
        let v6 = self.v6.from(v6).map(|(w, b)| IpAddr::V6(Ipv6Addr::from_bits((w << 6) | u128::from(b))));
        v4.chain(v6).filter_map(|ip| self.map.get(&ip))
    }
}

impl std::ops::Index<&IpAddr> for ByAddress {
    type Output = Arc<Lease>;

    fn index(&self, ip: &IpAddr) -> &Arc<Lease> {
        &self.map[ip]
    }
}

/// A set of addresses of one family as bits, 64 to a word, words by index; a word that
/// empties is removed.
#[derive(Debug, Default)]
struct Bits<W> {
    words: BTreeMap<W, u64>,
}

impl<W: Copy + Ord> Bits<W> {
    fn set(&mut self, (w, b): (W, u32)) {
        *self.words.entry(w).or_insert(0) |= 1 << b;
    }

    fn clear(&mut self, (w, b): (W, u32)) {
        if let Entry::Occupied(mut e) = self.words.entry(w) {
            *e.get_mut() &= !(1 << b);
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    /// Every set (word, bit) from `(w, b)` on, in order; `b` may be 64 (the next word).
    fn from(&self, (start, first): (W, u32)) -> impl Iterator<Item = (W, u32)> {
        self.words.range(start..).flat_map(move |(&w, &bits)| {
            let bits = match (w == start, first) {
                (false, _) => bits,
                (true, 64..) => 0,
                (true, f) => bits & (u64::MAX << f),
            };
            Ones(bits).map(move |b| (w, b))
        })
    }
}

/// The set bits of a word, lowest first.
struct Ones(u64);

impl Iterator for Ones {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_iterate_in_order_from_any_point() {
        let mut bits: Bits<u32> = Bits::default();
        for (w, b) in [(3, 63), (0, 0), (3, 0), (1, 5), (0, 63)] {
            bits.set((w, b));
        }
        let all: Vec<_> = bits.from((0, 0)).collect();
        assert_eq!(all, [(0, 0), (0, 63), (1, 5), (3, 0), (3, 63)]);
        assert_eq!(bits.from((0, 1)).collect::<Vec<_>>(), [(0, 63), (1, 5), (3, 0), (3, 63)]);
        assert_eq!(bits.from((0, 64)).collect::<Vec<_>>(), [(1, 5), (3, 0), (3, 63)]);
        assert_eq!(bits.from((2, 0)).collect::<Vec<_>>(), [(3, 0), (3, 63)]);
        bits.clear((1, 5));
        bits.clear((1, 5));
        assert_eq!(bits.words.len(), 2, "an emptied word is removed");
        assert_eq!(bits.from((3, 64)).next(), None);
    }
}
