//! A sparse hierarchical bitmap over `u128` offsets.
//!
//! Leaves hold 4096 bits (64 words); inner nodes have 64 children. Every node keeps a
//! `full` mask with one bit per word or child, so "first zero from here" descends one path
//! and never scans a full region: the cost grows with the depth (3 levels for a /8,
//! 10 for an IPv6 /64), not with how full the range is. Absent children are all-zero and
//! nodes are freed when they empty (but for one spare per level, kept for reuse), so memory
//! follows the number of set bits, not the capacity.

const LEAF_SHIFT: u32 = 12;
const FANOUT_SHIFT: u32 = 6;
const ALL: u64 = u64::MAX;

#[derive(Debug, Clone)]
struct Leaf {
    words: [u64; 64],
    /// Bit `w` set: `words[w]` is all ones.
    full: u64,
    count: u32,
}

#[derive(Debug, Clone)]
struct Inner {
    children: [Option<Box<Node>>; 64],
    /// Bit `c` set: child `c` exists.
    present: u64,
    /// Bit `c` set: child `c` exists and is full.
    full: u64,
}

#[derive(Debug, Clone)]
enum Node {
    Leaf(Leaf),
    Inner(Inner),
}

/// Mask of the bits strictly above `i` (0..64).
fn above(i: u32) -> u64 {
    if i >= 63 { 0 } else { ALL << (i + 1) }
}

/// Shift of the child index at inner `level` (1 = parent of leaves).
fn child_shift(level: u32) -> u32 {
    LEAF_SHIFT + FANOUT_SHIFT * (level - 1)
}

/// Clears the low `bits` bits of `x` (all of them when `bits >= 128`).
fn align_down(x: u128, bits: u32) -> u128 {
    if bits >= 128 { 0 } else { x & !((1u128 << bits) - 1) }
}

impl Node {
    fn new(level: u32) -> Node {
        if level == 0 {
            Node::Leaf(Leaf { words: [0; 64], full: 0, count: 0 })
        } else {
            Node::Inner(Inner { children: std::array::from_fn(|_| None), present: 0, full: 0 })
        }
    }

    fn is_full(&self) -> bool {
        match self {
            Node::Leaf(l) => l.full == ALL,
            Node::Inner(n) => n.full == ALL,
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Node::Leaf(l) => l.count == 0,
            Node::Inner(n) => n.present == 0,
        }
    }

    fn contains(&self, level: u32, i: u128) -> bool {
        match self {
            Node::Leaf(l) => {
                let w = ((i >> 6) & 63) as usize;
                l.words[w] & (1 << (i & 63)) != 0
            }
            Node::Inner(n) => {
                let c = ((i >> child_shift(level)) & 63) as usize;
                n.children[c].as_ref().is_some_and(|ch| ch.contains(level - 1, i))
            }
        }
    }

    /// Sets bit `i`; returns whether it was clear.
    fn insert(&mut self, level: u32, i: u128, spares: &mut Spares) -> bool {
        match self {
            Node::Leaf(l) => {
                let w = ((i >> 6) & 63) as usize;
                let bit = 1u64 << (i & 63);
                if l.words[w] & bit != 0 {
                    return false;
                }
                l.words[w] |= bit;
                l.count += 1;
                if l.words[w] == ALL {
                    l.full |= 1 << w;
                }
                true
            }
            Node::Inner(n) => {
                let c = ((i >> child_shift(level)) & 63) as usize;
                let child = n.children[c].get_or_insert_with(|| spares.take(level - 1));
                n.present |= 1 << c;
                let added = child.insert(level - 1, i, spares);
                if child.is_full() {
                    n.full |= 1 << c;
                }
                added
            }
        }
    }

    /// Clears bit `i`; returns whether it was set. Frees children that become empty.
    fn remove(&mut self, level: u32, i: u128, spares: &mut Spares) -> bool {
        match self {
            Node::Leaf(l) => {
                let w = ((i >> 6) & 63) as usize;
                let bit = 1u64 << (i & 63);
                if l.words[w] & bit == 0 {
                    return false;
                }
                l.words[w] &= !bit;
                l.count -= 1;
                l.full &= !(1 << w);
                true
            }
            Node::Inner(n) => {
                let c = ((i >> child_shift(level)) & 63) as usize;
                let Some(child) = n.children[c].as_mut() else {
                    return false;
                };
                let removed = child.remove(level - 1, i, spares);
                if removed {
                    n.full &= !(1 << c);
                    if child.is_empty() {
                        if let Some(empty) = n.children[c].take() {
                            spares.keep(level - 1, empty);
                        }
                        n.present &= !(1 << c);
                    }
                }
                removed
            }
        }
    }

    /// First clear bit at or after `from`, within this node (whose span holds `from`).
    /// `limit` masks which children may be considered (only the root of a range whose
    /// span exceeds 2^128 needs it).
    fn first_zero(&self, level: u32, from: u128, limit: u64) -> Option<u128> {
        match self {
            Node::Leaf(l) => {
                let w = ((from >> 6) & 63) as u32;
                let below = (1u64 << (from & 63)) - 1;
                let word = l.words[w as usize] | below;
                let base = align_down(from, LEAF_SHIFT);
                if word != ALL {
                    return Some(base | (u128::from(w) << 6) | u128::from(word.trailing_ones()));
                }
                let cand = !l.full & above(w);
                if cand == 0 {
                    return None;
                }
                let w = cand.trailing_zeros();
                let bit = l.words[w as usize].trailing_ones();
                Some(base | (u128::from(w) << 6) | u128::from(bit))
            }
            Node::Inner(n) => {
                let shift = child_shift(level);
                let c = ((from >> shift) & 63) as u32;
                match &n.children[c as usize] {
                    None => return Some(from),
                    Some(child) => {
                        if n.full & (1 << c) == 0
                            && let Some(p) = child.first_zero(level - 1, from, ALL)
                        {
                            return Some(p);
                        }
                    }
                }
                let cand = !n.full & above(c) & limit;
                if cand == 0 {
                    return None;
                }
                let c = cand.trailing_zeros();
                let start = align_down(from, shift + FANOUT_SHIFT) | (u128::from(c) << shift);
                match &n.children[c as usize] {
                    None => Some(start),
                    // Not full, so it has a zero.
                    Some(child) => child.first_zero(level - 1, start, ALL),
                }
            }
        }
    }
}

/// Emptied nodes kept for reuse, at most one per level: a range that hovers around empty
/// would otherwise allocate and free a whole path on every insert and remove.
#[derive(Debug, Clone, Default)]
struct Spares {
    by_level: Vec<Option<Box<Node>>>,
}

impl Spares {
    fn take(&mut self, level: u32) -> Box<Node> {
        self.by_level
            .get_mut(level as usize)
            .and_then(Option::take)
            .unwrap_or_else(|| Box::new(Node::new(level)))
    }

    /// `node` must be empty (all zero), as a freshly made one.
    fn keep(&mut self, level: u32, node: Box<Node>) {
        let l = level as usize;
        if self.by_level.len() <= l {
            self.by_level.resize_with(l + 1, || None);
        }
        self.by_level[l].get_or_insert(node);
    }
}

/// A set of offsets in `0..len`, stored as a sparse hierarchical bitmap.
#[derive(Debug, Clone)]
pub struct SparseBitmap {
    root: Option<Box<Node>>,
    /// Inner levels above the leaves.
    levels: u32,
    len: u128,
    count: u128,
    /// Children of the root that start below `len`.
    root_limit: u64,
    spares: Spares,
}

impl SparseBitmap {
    /// An empty bitmap for offsets `0..len`.
    pub fn new(len: u128) -> SparseBitmap {
        let bits = 128 - len.saturating_sub(1).leading_zeros();
        let levels = bits.saturating_sub(LEAF_SHIFT).div_ceil(FANOUT_SHIFT);
        let root_limit = if levels == 0 {
            ALL
        } else {
            let last = (len.saturating_sub(1) >> child_shift(levels)) as u32;
            if last >= 63 { ALL } else { (1u64 << (last + 1)) - 1 }
        };
        SparseBitmap { root: None, levels, len, count: 0, root_limit, spares: Spares::default() }
    }

    /// The capacity: valid offsets are `0..capacity`.
    pub fn capacity(&self) -> u128 {
        self.len
    }

    /// How many offsets are set.
    pub fn count(&self) -> u128 {
        self.count
    }

    /// Whether `i` is set.
    pub fn contains(&self, i: u128) -> bool {
        i < self.len && self.root.as_ref().is_some_and(|r| r.contains(self.levels, i))
    }

    /// Sets `i`; returns whether it was clear. Offsets outside `0..len` are ignored.
    pub fn insert(&mut self, i: u128) -> bool {
        if i >= self.len {
            return false;
        }
        let levels = self.levels;
        let spares = &mut self.spares;
        let root = self.root.get_or_insert_with(|| spares.take(levels));
        let added = root.insert(levels, i, spares);
        if added {
            self.count += 1;
        }
        added
    }

    /// Clears `i`; returns whether it was set.
    pub fn remove(&mut self, i: u128) -> bool {
        let Some(root) = self.root.as_mut() else {
            return false;
        };
        if i >= self.len || !root.remove(self.levels, i, &mut self.spares) {
            return false;
        }
        self.count -= 1;
        if root.is_empty()
            && let Some(empty) = self.root.take()
        {
            self.spares.keep(self.levels, empty);
        }
        true
    }

    /// The lowest clear offset at or after `from`, if any below `len`.
    pub fn first_zero_from(&self, from: u128) -> Option<u128> {
        if from >= self.len {
            return None;
        }
        let p = match &self.root {
            None => Some(from),
            Some(root) => root.first_zero(self.levels, from, self.root_limit),
        }?;
        (p < self.len).then_some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_range_fills_and_reports_exhaustion() {
        let mut b = SparseBitmap::new(254);
        for i in 0..254 {
            assert_eq!(b.first_zero_from(0), Some(i));
            assert!(b.insert(i));
        }
        assert_eq!(b.first_zero_from(0), None);
        assert_eq!(b.count(), 254);
        assert!(b.remove(100));
        assert_eq!(b.first_zero_from(0), Some(100));
        assert_eq!(b.first_zero_from(101), None);
    }

    #[test]
    fn insert_remove_contains_report_changes() {
        let mut b = SparseBitmap::new(10);
        assert!(b.insert(3));
        assert!(!b.insert(3));
        assert!(b.contains(3));
        assert!(!b.insert(10), "out of range is ignored");
        assert!(b.remove(3));
        assert!(!b.remove(3));
        assert!(b.root.is_none(), "empty bitmap frees its nodes");
        assert_eq!(b.spares.by_level.iter().flatten().count(), 1, "keeping one spare per level");
    }

    #[test]
    fn skips_full_leaves_and_crosses_boundaries() {
        let mut b = SparseBitmap::new(1 << 24);
        for i in 0..(3 * 4096 + 5) {
            b.insert(i);
        }
        assert_eq!(b.first_zero_from(0), Some(3 * 4096 + 5));
        // Fill a whole 64-leaf subtree and check it is skipped.
        for i in 0..(64 * 4096) {
            b.insert(i);
        }
        assert_eq!(b.first_zero_from(17), Some(64 * 4096));
        assert_eq!(b.count(), 64 * 4096);
        b.remove(4095);
        assert_eq!(b.first_zero_from(0), Some(4095));
        assert_eq!(b.first_zero_from(4096), Some(64 * 4096));
    }

    #[test]
    fn ipv6_64_range_works_at_both_ends() {
        let len = (1u128 << 64) - 2;
        let mut b = SparseBitmap::new(len);
        assert!(b.insert(len - 1));
        assert!(b.insert(0));
        assert_eq!(b.first_zero_from(0), Some(1));
        assert_eq!(b.first_zero_from(len - 1), None);
        assert_eq!(b.first_zero_from(len - 2), Some(len - 2));
        assert!(b.contains(len - 1));
        assert!(b.remove(len - 1));
        assert_eq!(b.count(), 1);
    }

    #[test]
    fn widest_range_does_not_overflow() {
        let len = u128::MAX - 1;
        let mut b = SparseBitmap::new(len);
        assert_eq!(b.first_zero_from(len - 1), Some(len - 1));
        assert!(b.insert(len - 1));
        assert_eq!(b.first_zero_from(len - 1), None);
        assert!(b.insert(1u128 << 127));
        assert_eq!(b.first_zero_from(1u128 << 127), Some((1u128 << 127) + 1));
    }

    proptest::proptest! {
        #[test]
        fn matches_a_naive_set(
            len in 1u128..20_000,
            ops in proptest::collection::vec((proptest::bool::ANY, 0u128..20_000), 0..400),
            probes in proptest::collection::vec(0u128..20_000, 1..20),
        ) {
            let mut b = SparseBitmap::new(len);
            let mut model = std::collections::BTreeSet::new();
            for (set, i) in ops {
                if set {
                    proptest::prop_assert_eq!(b.insert(i), i < len && model.insert(i));
                } else {
                    proptest::prop_assert_eq!(b.remove(i), model.remove(&i));
                }
            }
            proptest::prop_assert_eq!(b.count(), model.len() as u128);
            for from in probes {
                let want = (from..len).find(|i| !model.contains(i));
                proptest::prop_assert_eq!(b.first_zero_from(from), want);
            }
        }
    }
}
