//! A hash map split into shards that grow one at a time.
//!
//! A single map with a million entries doubles in one insert and stalls that request for
//! about a second (every entry moves to a random place in a new table). Split 32 ways, each
//! growth moves a thirty-second of the entries, and growths of different shards fall on
//! different requests.

use std::hash::Hash;
use std::net::IpAddr;

use hashbrown::hash_map::{Entry, EntryRef};
use hashbrown::{Equivalent, HashMap};

const SHARDS: usize = 32;

/// Which shard a key (or a borrowed form of it) lives in; equal keys must agree.
pub(super) trait Shard {
    fn shard(&self) -> usize;
}

impl Shard for IpAddr {
    fn shard(&self) -> usize {
        // Addresses are handed out in order, so the low bits spread them evenly.
        let low = match self {
            IpAddr::V4(a) => a.octets()[3],
            IpAddr::V6(a) => a.octets()[15],
        };
        usize::from(low) % SHARDS
    }
}

/// For keys that carry a precomputed hash: its top bits (the maps use the low ones).
pub(super) fn shard_of_hash(hash: u64) -> usize {
    (hash >> 59) as usize % SHARDS
}

/// The map.
#[derive(Debug)]
pub(super) struct ShardedMap<K, V> {
    shards: Vec<HashMap<K, V>>,
}

impl<K, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        ShardedMap { shards: (0..SHARDS).map(|_| HashMap::new()).collect() }
    }
}

impl<K: Hash + Eq + Shard, V> ShardedMap<K, V> {
    pub(super) fn get<Q: Hash + Equivalent<K> + Shard + ?Sized>(&self, q: &Q) -> Option<&V> {
        self.shards[q.shard()].get(q)
    }

    pub(super) fn insert(&mut self, k: K, v: V) -> Option<V> {
        self.shards[k.shard()].insert(k, v)
    }

    pub(super) fn remove<Q: Hash + Equivalent<K> + Shard + ?Sized>(&mut self, q: &Q) -> Option<V> {
        self.shards[q.shard()].remove(q)
    }

    pub(super) fn entry(&mut self, k: K) -> Entry<'_, K, V, hashbrown::DefaultHashBuilder> {
        let s = k.shard();
        self.shards[s].entry(k)
    }

    pub(super) fn entry_ref<'a, 'b, Q: Hash + Equivalent<K> + Shard + ?Sized>(
        &'a mut self,
        q: &'b Q,
    ) -> EntryRef<'a, 'b, K, Q, V, hashbrown::DefaultHashBuilder> {
        self.shards[q.shard()].entry_ref(q)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(HashMap::iter)
    }
}

impl<K: Hash + Eq + Shard, V> std::ops::Index<&K> for ShardedMap<K, V> {
    type Output = V;

    fn index(&self, k: &K) -> &V {
        self.get(k).expect("ShardedMap index: key present")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_one_map() {
        let mut m: ShardedMap<IpAddr, u32> = ShardedMap::default();
        for i in 0..1000u32 {
            let ip = IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]);
            assert_eq!(m.insert(ip, i), None);
        }
        let ip = IpAddr::from([10, 0, 1, 7]);
        assert_eq!((m.get(&ip), m[&ip]), (Some(&263), 263));
        assert_eq!(m.remove(&ip), Some(263));
        assert_eq!(m.get(&ip), None);
        assert_eq!(
            (m.iter().count(), m.iter().map(|(_, v)| v).sum::<u32>()),
            (999, (0..1000).sum::<u32>() - 263)
        );
        assert!(m.shards.iter().all(|s| s.len() >= 999 / SHARDS - 1), "evenly spread");
        *m.entry(ip).or_insert(0) += 5;
        assert_eq!(m.iter().find(|(k, _)| **k == ip).map(|(_, v)| *v), Some(5));
    }
}
