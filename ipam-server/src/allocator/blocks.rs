//! Per-node blocks: a pool's range cut into blocks (CIDRs of one prefix length, or runs of
//! one number of addresses), each node taking one of each range on its first allocation.
//!
//! Which block is whose is recorded as a manual lease per block, on the block's first
//! address, in the network [`blocks_network`] of the pool, holding the node and naming the
//! block in its `range`. Those leases are written with the address that made the node take
//! the block, so both stores persist them, a new leader loads them, and they show as
//! IPLeases. Blocks of pools from before the records are recognised by their leases.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::ops::Bound;
use std::str::FromStr;
use std::sync::Arc;

use super::{
    AllocError, Allocator, Attachment, Change, Family, Lease, NoBlock, RangeSpec, Str, ip_to_u128,
    network_mut, u128_to_ip,
};

/// The suffix of the network holding the per-node block assignments of a network.
pub const BLOCKS_SUFFIX: &str = "/node-blocks";

/// The network whose manual leases record which node each per-node block of `network`
/// belongs to.
pub fn blocks_network(network: &str) -> String {
    format!("{network}{BLOCKS_SUFFIX}")
}

/// One block: a CIDR (`198.18.0.16/28`), or a run of addresses (`198.18.0.9-198.18.0.16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Block {
    pub first: IpAddr,
    pub last: IpAddr,
    /// The prefix length, for a CIDR.
    pub prefix: Option<u8>,
}

impl Block {
    /// Whether `ip` is in the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        Family::of(ip) == Family::of(self.first)
            && (ip_to_u128(self.first)..=ip_to_u128(self.last)).contains(&ip_to_u128(ip))
    }
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix {
            Some(p) => write!(f, "{}/{p}", self.first),
            None => write!(f, "{}-{}", self.first, self.last),
        }
    }
}

impl FromStr for Block {
    type Err = String;

    fn from_str(s: &str) -> Result<Block, String> {
        let bad = || format!("{s:?} is not a block (a CIDR or first-last)");
        if let Some((first, last)) = s.split_once('-') {
            let (first, last): (IpAddr, IpAddr) =
                (first.parse().map_err(|_| bad())?, last.parse().map_err(|_| bad())?);
            return match Family::of(first) == Family::of(last) && first <= last {
                true => Ok(Block { first, last, prefix: None }),
                false => Err(bad()),
            };
        }
        let net: ipnetwork::IpNetwork = s.parse().map_err(|_| bad())?;
        Ok(Block { first: net.network(), last: net.broadcast(), prefix: Some(net.prefix()) })
    }
}

/// A range cut into equal blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockCut {
    /// The range cut, for messages.
    range: Str,
    family: Family,
    /// The first block's first address.
    first: u128,
    /// Addresses per block.
    size: u128,
    /// The prefix length of every block, when blocks are CIDRs.
    prefix: Option<u8>,
    /// How many blocks the range holds.
    pub blocks: u128,
}

impl BlockCut {
    /// `within` cut into CIDRs of prefix length `prefix`, which must be longer than
    /// `within`'s and at most the family's.
    pub fn by_prefix(within: ipnetwork::IpNetwork, prefix: u8) -> Result<BlockCut, AllocError> {
        let bits: u8 = if within.is_ipv4() { 32 } else { 128 };
        if prefix <= within.prefix() || prefix > bits {
            return Err(AllocError::Invalid {
                field: "perNodePrefix".into(),
                value: prefix.to_string(),
                reason: format!("is not longer than {within}'s prefix and at most {bits}"),
            });
        }
        let shift = u32::from(bits - prefix);
        let (first, last) = (ip_to_u128(within.network()), ip_to_u128(within.broadcast()));
        Ok(BlockCut {
            range: Arc::from(within.to_string()),
            family: Family::of(within.ip()),
            first,
            size: 1u128 << shift,
            prefix: Some(prefix),
            blocks: ((last - first) >> shift) + 1,
        })
    }

    /// The addresses `range` hands out (range_start to range_end), cut into runs of `size`
    /// from the first; a rest shorter than `size` at the end is no block.
    pub fn by_size(range: &RangeSpec, size: u128) -> Result<BlockCut, AllocError> {
        if size == 0 || size > range.size() {
            return Err(AllocError::Invalid {
                field: "perNodeBlockSize".into(),
                value: size.to_string(),
                reason: format!(
                    "is not between 1 and the size of range {} ({})",
                    range.display(),
                    range.size()
                ),
            });
        }
        let first = ip_to_u128(range.addr(0));
        Ok(BlockCut {
            range: range.display_str().clone(),
            family: range.family(),
            first,
            size,
            prefix: None,
            blocks: range.size() / size,
        })
    }

    /// Whether `ip` is in one of the blocks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let v = ip_to_u128(ip);
        Family::of(ip) == self.family && v >= self.first && (v - self.first) / self.size < self.blocks
    }

    /// The index of the block holding `ip` (which must be in one).
    pub fn index(&self, ip: IpAddr) -> u128 {
        (ip_to_u128(ip) - self.first) / self.size
    }

    /// Block number `i`.
    pub fn block(&self, i: u128) -> Block {
        let first = self.first + i * self.size;
        Block {
            first: u128_to_ip(self.family, first),
            last: u128_to_ip(self.family, first + (self.size - 1)),
            prefix: self.prefix,
        }
    }

    /// The host index of `ip` within its block.
    pub fn host_index(&self, ip: IpAddr) -> u128 {
        (ip_to_u128(ip) - self.first) % self.size
    }

    /// The address at host index `host` of `block` (`None` past its end).
    pub fn at(&self, block: Block, host: u128) -> Option<IpAddr> {
        (host < self.size).then(|| u128_to_ip(self.family, ip_to_u128(block.first) + host))
    }

    /// Addresses per block.
    pub fn size(&self) -> u128 {
        self.size
    }

    /// The blocks' kind, for messages: `/28` or `8-address`.
    pub fn kind(&self) -> String {
        match self.prefix {
            Some(p) => format!("/{p}"),
            None => format!("{}-address", self.size),
        }
    }

    /// The address the first block starts at.
    fn start(&self) -> IpAddr {
        u128_to_ip(self.family, self.first)
    }

    /// Whether `marker` (a lease of the blocks network) records a block of this cut.
    fn records(&self, marker: &Lease) -> bool {
        self.contains(marker.address) && *marker.range == *self.block(self.index(marker.address)).to_string()
    }
}

impl Allocator {
    /// The block of `cut` that belongs to `node` in `network`, and whether it is newly
    /// chosen: the block recorded as the node's, else the lowest block holding an address
    /// of one of the node's attachments (pools from before the records), else `prefer` (a
    /// block index) when no other node has it, else the lowest block neither recorded nor
    /// holding another node's address. Manual reservations claim no block.
    pub fn node_block(
        &self,
        network: &str,
        cut: &BlockCut,
        node: &str,
        prefer: Option<u128>,
    ) -> Result<(Block, bool), AllocError> {
        self.node_block_avoiding(network, cut, node, prefer, &BTreeSet::new())
    }

    /// [`Allocator::node_block`], never choosing a new block among `reserved` (block
    /// indexes given to other nodes by hand).
    pub fn node_block_avoiding(
        &self,
        network: &str,
        cut: &BlockCut,
        node: &str,
        prefer: Option<u128>,
        reserved: &BTreeSet<u128>,
    ) -> Result<(Block, bool), AllocError> {
        let mut taken = reserved.clone();
        for (i, owner) in self.block_markers(network, cut) {
            if owner == node {
                return Ok((cut.block(i), false));
            }
            taken.insert(i);
        }
        for l in self.leases_within(network, cut).filter(|l| !l.is_manual()) {
            let i = cut.index(l.address);
            if l.holder.node == node {
                return Ok((cut.block(i), true));
            }
            taken.insert(i);
        }
        if let Some(i) = prefer.filter(|i| *i < cut.blocks && !taken.contains(i)) {
            return Ok((cut.block(i), true));
        }
        // The lowest index not taken: `taken` is sorted, so walk it.
        let mut free = 0u128;
        for i in taken {
            if i != free {
                break;
            }
            free += 1;
        }
        if free >= cut.blocks {
            return Err(AllocError::NoFreeBlock(Box::new(NoBlock {
                network: network.to_string(),
                node: node.to_string(),
                range: cut.range.to_string(),
                kind: cut.kind(),
                blocks: cut.blocks,
            })));
        }
        Ok((cut.block(free), true))
    }

    /// The block of `cut` that is `node`'s in `network`, if it has one: recorded as its,
    /// else holding one of its attachments' addresses. Records nothing.
    pub fn node_block_of(&self, network: &str, cut: &BlockCut, node: &str) -> Option<Block> {
        let recorded = self.block_markers(network, cut).find(|(_, n)| *n == node).map(|(i, _)| i);
        let held = || {
            self.leases_within(network, cut)
                .find(|l| !l.is_manual() && l.holder.node == node)
                .map(|l| cut.index(l.address))
        };
        recorded.or_else(held).map(|i| cut.block(i))
    }

    /// The leases of `network` in `block`, lowest first.
    pub fn leases_in<'a>(&'a self, network: &str, block: Block) -> impl Iterator<Item = &'a Arc<Lease>> + 'a {
        self.networks.get(network).into_iter().flat_map(move |net| {
            net.leases.from(Bound::Included(block.first)).take_while(move |l| block.contains(l.address))
        })
    }

    /// Records `block` of `network` as `node`'s, unless a record is there already.
    pub fn assign_block(&mut self, network: &str, block: Block, node: &str, now_unix_ms: i64) {
        let markers = blocks_network(network);
        let net = network_mut(&mut self.networks, &markers);
        if net.leases.get(&block.first).is_some() {
            return;
        }
        let bits = if block.first.is_ipv4() { 32 } else { 128 };
        let lease = Arc::new(Lease {
            address: block.first,
            network: net.name.clone(),
            range: Arc::from(block.to_string()),
            prefix_len: block.prefix.unwrap_or(bits),
            gateway: None,
            holder: Arc::new(Attachment { node: node.to_string(), ..Attachment::default() }),
            created_unix_ms: now_unix_ms,
            note: format!("per-node block {block} of node {node} in network \"{network}\""),
        });
        net.insert(lease.clone());
        self.lease_count += 1;
        self.journal.push(Change::PutLease(lease));
    }

    /// Every recorded block: (network, block, node, held): the attachments' addresses held
    /// in the block.
    pub fn assigned_blocks(&self) -> Vec<(String, Block, String, u128)> {
        let mut out = Vec::new();
        for net in self.networks.values() {
            let Some(network) = net.name.strip_suffix(BLOCKS_SUFFIX) else { continue };
            for m in net.leases.from(Bound::Unbounded) {
                let Ok(block) = m.range.parse::<Block>() else { continue };
                let held = self.leases_in(network, block).filter(|l| !l.is_manual()).count() as u128;
                out.push((network.to_string(), block, m.holder.node.clone(), held));
            }
        }
        out.sort();
        out
    }

    /// Gives `block` of `network` back: its record goes, so another node may take it.
    pub fn unassign_block(
        &mut self,
        network: &str,
        block: Block,
        now_unix_ms: i64,
    ) -> Result<Arc<Lease>, AllocError> {
        self.release_address(&blocks_network(network), block.first, now_unix_ms)
    }

    /// The records of `network`'s blocks of `cut`: (block index, node).
    fn block_markers<'a>(
        &'a self,
        network: &str,
        cut: &'a BlockCut,
    ) -> impl Iterator<Item = (u128, &'a str)> + 'a {
        self.networks.get(blocks_network(network).as_str()).into_iter().flat_map(move |net| {
            net.leases
                .from(Bound::Included(cut.start()))
                .take_while(move |l| Family::of(l.address) == cut.family)
                .filter(move |l| cut.records(l))
                .map(move |l| (cut.index(l.address), l.holder.node.as_str()))
        })
    }

    /// The leases of `network` in `cut`'s blocks, lowest first.
    fn leases_within<'a>(
        &'a self,
        network: &str,
        cut: &'a BlockCut,
    ) -> impl Iterator<Item = &'a Arc<Lease>> + 'a {
        self.networks.get(network).into_iter().flat_map(move |net| {
            net.leases.from(Bound::Included(cut.start())).take_while(move |l| cut.contains(l.address))
        })
    }

    /// The blocks of `cut` in `network` that are recorded or hold attachment addresses,
    /// lowest first: each block, its node (the recorded one, else the first found holding
    /// an address there) and how many addresses it holds.
    pub fn node_blocks(&self, network: &str, cut: &BlockCut) -> Vec<(Block, String, u128)> {
        let mut blocks: BTreeMap<u128, (String, u128)> =
            self.block_markers(network, cut).map(|(i, node)| (i, (node.to_string(), 0))).collect();
        for l in self.leases_within(network, cut).filter(|l| !l.is_manual()) {
            blocks.entry(cut.index(l.address)).or_insert_with(|| (l.holder.node.clone(), 0)).1 += 1;
        }
        blocks.into_iter().map(|(i, (node, held))| (cut.block(i), node, held)).collect()
    }
}
