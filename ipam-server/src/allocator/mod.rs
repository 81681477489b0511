//! The allocator core: pure state, no I/O, no async.
//!
//! Addresses are unique per network across every range of that network. Each range (pool)
//! keeps a [`SparseBitmap`] of the held addresses it contains, so overlapping ranges see
//! each other. Every change is also recorded in a journal that the caller drains and
//! persists; the caller answers only after that commit.

pub mod bitmap;
pub mod blocks;
mod by_address;
pub mod range;
mod sharded;

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::ops::Bound;
use std::sync::{Arc, LazyLock};

use std::hash::BuildHasher as _;

use hashbrown::hash_map::EntryRef;
use hashbrown::{Equivalent, HashMap};
use serde::{Deserialize, Serialize};
use sharded::{Shard, ShardedMap, shard_of_hash};
use smallvec::SmallVec;

use bitmap::SparseBitmap;
pub use blocks::{BLOCKS_SUFFIX, Block, BlockCut, blocks_network};
use by_address::ByAddress;
pub use range::{Family, FieldPrefix, RangeInput, RangeSpec, ip_to_u128, parse_address, u128_to_ip};

/// Errors of the allocator, each naming what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// A request field is unusable.
    #[error("{field} \"{value}\" {reason}")]
    Invalid { field: String, value: String, reason: String },
    /// No free address is left in a range.
    #[error("range {range} is exhausted: size {size}, held {held}, excluded {excluded}")]
    Exhausted { range: String, size: u128, held: u128, excluded: u128 },
    /// A specific address is held by someone else.
    #[error("address {address} in network \"{network}\" is already held by {holder}")]
    Held { network: String, address: IpAddr, holder: String },
    /// The attachment holds another address in the range than the one it asks for.
    #[error("{attachment} already holds {held} in range {range}, not the requested {requested}")]
    Conflict { attachment: String, range: String, held: IpAddr, requested: IpAddr },
    /// Nobody holds the address.
    #[error("address {address} is not held in network \"{network}\"")]
    NotFound { network: String, address: IpAddr },
    /// Every per-node block of a range is another node's.
    #[error(transparent)]
    NoFreeBlock(Box<NoBlock>),
    /// A node's block has no free address.
    #[error(transparent)]
    BlockExhausted(Box<BlockFull>),
}

/// Every per-node block of a range is another node's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no free {kind} block for node {node:?} in {range} (network \"{network}\"): all {blocks} blocks are other nodes'"
)]
pub struct NoBlock {
    pub network: String,
    pub node: String,
    pub range: String,
    /// `/28` or `8-address`.
    pub kind: String,
    pub blocks: u128,
}

/// A node's per-node block with no free address, with the node's and the pool's counts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "block {block} of node {node:?} in network \"{network}\" is exhausted: size {size}, held {held}, excluded {excluded} (the whole pool: size {pool_size}, held {pool_held})"
)]
pub struct BlockFull {
    pub network: String,
    pub node: String,
    pub block: String,
    pub size: u128,
    pub held: u128,
    pub excluded: u128,
    pub pool_size: u128,
    pub pool_held: u128,
}

/// A shared, immutable string: leases share their network, range and pod strings.
pub type Str = Arc<str>;

/// The empty [`Str`], shared.
pub fn empty_str() -> Str {
    static EMPTY: LazyLock<Str> = LazyLock::new(|| Str::from(""));
    EMPTY.clone()
}

/// The pod an attachment belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
}

/// Who an address belongs to beyond the sandbox that holds it: a sandbox's DEL does not
/// free it while the owner still wants it (see `crate::keep`). Set only after the server
/// checked it against the API (the pod's controller, the claim's existence).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Owner {
    /// The pod is this StatefulSet's (its controller reference, with the set's UID): the
    /// address is kept for the pod's name (and interface) while the set wants the ordinal.
    StatefulSet { name: String, uid: String },
    /// An IPAMClaim of the pod's namespace: the address is the claim's, whichever pod
    /// names it, until the claim is deleted.
    Claim { name: String },
}

impl Owner {
    /// `statefulset/NAME` or `ipamclaim/NAME`, as leases show it.
    pub fn describe(&self) -> String {
        match self {
            Owner::StatefulSet { name, .. } => format!("statefulset/{name}"),
            Owner::Claim { name } => format!("ipamclaim/{name}"),
        }
    }
}

/// One interface of one sandbox: who holds a lease. One allocation is shared by the leases
/// it holds and by the indexes that find them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    pub pod: PodRef,
    pub node: String,
    /// Who the address belongs to beyond this sandbox, if anyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// The sandbox is gone (its DEL came) and the address is kept for the owner's next
    /// one: the fields above name the last holder.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kept: bool,
}

impl Attachment {
    /// The key of the second index, which a new sandbox finds its predecessor's
    /// addresses by: (namespace, claim name, "", true) for a claim's, else (namespace, pod
    /// name, interface, false).
    fn owner_key(&self) -> (&str, &str, &str, bool) {
        match &self.owner {
            Some(Owner::Claim { name }) => (&self.pod.namespace, name, "", true),
            _ => (&self.pod.namespace, &self.pod.name, &self.ifname, false),
        }
    }

    /// Whether this attachment is indexed by its owner key at all.
    fn has_owner_key(&self) -> bool {
        matches!(self.owner, Some(Owner::Claim { .. })) || !self.pod.name.is_empty()
    }

    /// Whether `self`, a new sandbox, may take over what `old` (found under the same owner
    /// key) holds: the same owner, or an old holder that had none (a pod's plain
    /// move to a new sandbox). A pod that is not the StatefulSet's never takes its
    /// ordinal's address.
    fn may_take_from(&self, old: &Attachment) -> bool {
        old.owner.is_none() || old.owner == self.owner
    }
}

/// The holder of manual reservations: nobody.
fn nobody() -> Arc<Attachment> {
    static NOBODY: LazyLock<Arc<Attachment>> = LazyLock::new(Arc::default);
    NOBODY.clone()
}

/// A held address and who holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub address: IpAddr,
    pub network: Str,
    /// Short form of the range it came from ("" for a manual reservation outside any range).
    pub range: Str,
    /// Prefix length of that range (the host length outside any range).
    pub prefix_len: u8,
    /// Gateway of that range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Who holds it; an empty container ID for a manual reservation.
    #[serde(flatten)]
    pub holder: Arc<Attachment>,
    pub created_unix_ms: i64,
    /// Reason of a manual reservation.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

impl Lease {
    /// Whether an operator reserved it by hand.
    pub fn is_manual(&self) -> bool {
        self.holder.container_id.is_empty()
    }

    /// Who holds it, for messages.
    pub fn who(&self) -> String {
        let h = &self.holder;
        if self.is_manual() {
            format!("a manual reservation ({})", self.note)
        } else if h.kept {
            let owner = h.owner.as_ref().map(Owner::describe).unwrap_or_default();
            format!("{owner} (kept since pod {}/{} interface {} left)", h.pod.namespace, h.pod.name, h.ifname)
        } else if h.pod.name.is_empty() {
            format!("container {} interface {}", h.container_id, h.ifname)
        } else {
            format!(
                "pod {}/{} (container {} interface {})",
                h.pod.namespace, h.pod.name, h.container_id, h.ifname
            )
        }
    }
}

/// The leases of one attachment: usually one, two for dual stack.
pub type Leases = SmallVec<[Arc<Lease>; 2]>;

/// What a request asks for, already validated.
#[derive(Debug, Clone)]
pub struct AllocateRequest {
    pub attachment: Arc<Attachment>,
    pub network: Str,
    pub ranges: Vec<RangeSpec>,
    /// Specific addresses wanted; each must fall in one of `ranges`.
    pub requested: Vec<IpAddr>,
}

/// A change to persist, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    PutLease(Arc<Lease>),
    DeleteLease { network: Str, address: IpAddr },
    PutPool { network: Str, range: RangeInput },
}

/// Size and use of one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUsage {
    pub network: Str,
    pub range: RangeInput,
    pub size: u128,
    pub used: u128,
    pub excluded: u128,
    pub free: u128,
}

/// Size and use of several ranges together (an IPPool's ranges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolTotals {
    /// Addresses the ranges may hand out (excluded ones included, as in [`PoolUsage`]).
    pub size: u128,
    pub used: u128,
    pub excluded: u128,
    pub free: u128,
}

/// Which leases to list; empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct LeaseFilter {
    pub network: Option<String>,
    pub pod_namespace: String,
    pub pod_name: String,
    pub node: String,
    pub range: String,
    pub container_id: String,
}

impl LeaseFilter {
    fn matches(&self, l: &Lease) -> bool {
        let eq = |want: &str, have: &str| want.is_empty() || want == have;
        let h = &l.holder;
        eq(&self.pod_namespace, &h.pod.namespace)
            && eq(&self.pod_name, &h.pod.name)
            && eq(&self.node, &h.node)
            && eq(&self.range, &l.range)
            && eq(&self.container_id, &h.container_id)
    }
}

/// One range and the addresses held in it: the address-level core that [`Allocator`]
/// composes with networks, attachments and the journal.
#[derive(Debug)]
pub struct RangePool {
    spec: RangeSpec,
    held: SparseBitmap,
}

impl RangePool {
    /// An empty pool for `spec`.
    pub fn new(spec: RangeSpec) -> RangePool {
        let held = SparseBitmap::new(spec.size());
        RangePool { spec, held }
    }

    /// Marks `ip` held (or free) if it is in the range and not excluded (excluded addresses
    /// are never handed out, so they need no bit).
    pub fn mark(&mut self, ip: IpAddr, held: bool) {
        if let Some(off) = self.spec.offset(ip).filter(|o| self.spec.exclusion_at(*o).is_none()) {
            if held {
                self.held.insert(off);
            } else {
                self.held.remove(off);
            }
        }
    }

    /// Lowest address that is neither held nor excluded.
    pub fn first_free(&self) -> Option<IpAddr> {
        self.first_free_from(0)
    }

    /// Lowest address at offset `from` or above that is neither held nor excluded.
    fn first_free_from(&self, mut from: u128) -> Option<IpAddr> {
        loop {
            let off = self.held.first_zero_from(from)?;
            match self.spec.exclusion_at(off) {
                Some((_, hi)) => from = hi.checked_add(1)?,
                None => return Some(self.spec.addr(off)),
            }
        }
    }

    /// Size and use, reported under `network`.
    pub fn usage(&self, network: &Str) -> PoolUsage {
        let (size, used, excluded) = (self.spec.size(), self.held.count(), self.spec.excluded_count());
        PoolUsage {
            network: network.clone(),
            range: self.spec.input().clone(),
            size,
            used,
            excluded,
            free: size - used - excluded,
        }
    }
}

/// Index key of an attachment: its (container ID, interface), with their hash computed once.
/// The maps hash only that number, so growing a map rehashes without reading the strings
/// (which would miss the cache once per entry and stall a big allocator for seconds).
#[derive(Debug)]
struct AttachKey {
    hash: u64,
    holder: Arc<Attachment>,
}

/// Borrowed form of [`AttachKey`], for lookups that allocate nothing.
struct AttachRef<'a> {
    hash: u64,
    container_id: &'a str,
    ifname: &'a str,
}

impl std::hash::Hash for AttachKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_u64(self.hash);
    }
}

impl std::hash::Hash for AttachRef<'_> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_u64(self.hash);
    }
}

impl PartialEq for AttachKey {
    fn eq(&self, other: &AttachKey) -> bool {
        self.hash == other.hash
            && self.holder.container_id == other.holder.container_id
            && self.holder.ifname == other.holder.ifname
    }
}

impl Eq for AttachKey {}

impl Equivalent<AttachKey> for AttachRef<'_> {
    fn equivalent(&self, k: &AttachKey) -> bool {
        self.hash == k.hash && k.holder.container_id == self.container_id && k.holder.ifname == self.ifname
    }
}

/// Index key of a pod's interface: its (namespace, name, interface), hashed once.
#[derive(Debug)]
struct PodKey {
    hash: u64,
    holder: Arc<Attachment>,
}

struct PodIfRef<'a> {
    hash: u64,
    namespace: &'a str,
    name: &'a str,
    ifname: &'a str,
    claim: bool,
}

impl std::hash::Hash for PodKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_u64(self.hash);
    }
}

impl std::hash::Hash for PodIfRef<'_> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_u64(self.hash);
    }
}

impl PartialEq for PodKey {
    fn eq(&self, other: &PodKey) -> bool {
        self.hash == other.hash && self.holder.owner_key() == other.holder.owner_key()
    }
}

impl Eq for PodKey {}

impl Equivalent<PodKey> for PodIfRef<'_> {
    fn equivalent(&self, k: &PodKey) -> bool {
        self.hash == k.hash && k.holder.owner_key() == (self.namespace, self.name, self.ifname, self.claim)
    }
}

impl Shard for AttachKey {
    fn shard(&self) -> usize {
        shard_of_hash(self.hash)
    }
}

impl Shard for AttachRef<'_> {
    fn shard(&self) -> usize {
        shard_of_hash(self.hash)
    }
}

impl Shard for PodKey {
    fn shard(&self) -> usize {
        shard_of_hash(self.hash)
    }
}

impl Shard for PodIfRef<'_> {
    fn shard(&self) -> usize {
        shard_of_hash(self.hash)
    }
}

/// Hashes index keys; one per network, randomly seeded.
#[derive(Debug, Default)]
struct KeyHasher(hashbrown::DefaultHashBuilder);

impl KeyHasher {
    fn attach<'a>(&self, container_id: &'a str, ifname: &'a str) -> AttachRef<'a> {
        AttachRef { hash: self.0.hash_one((container_id, ifname)), container_id, ifname }
    }

    fn pod<'a>(&self, h: &'a Attachment) -> PodIfRef<'a> {
        let (namespace, name, ifname, claim) = h.owner_key();
        PodIfRef { hash: self.0.hash_one((namespace, name, ifname, claim)), namespace, name, ifname, claim }
    }
}

/// Addresses one attachment (or pod interface) holds: usually one, two for dual stack.
type Held = SmallVec<[IpAddr; 2]>;

#[derive(Debug)]
struct Network {
    name: Str,
    pools: BTreeMap<Str, RangePool>,
    leases: ByAddress,
    by_attachment: ShardedMap<AttachKey, Held>,
    by_pod: ShardedMap<PodKey, Held>,
    keys: KeyHasher,
    /// Cooldown of released addresses (ms; 0: none): the IPPool's, set by the caller.
    cooldown_ms: u64,
    /// When each address released under a cooldown was released (ms since the epoch).
    /// Kept until the cooldown has passed; only in memory.
    cooling: HashMap<IpAddr, i64>,
}

fn unindex<K, Q>(map: &mut ShardedMap<K, Held>, key: &Q, ip: IpAddr)
where
    K: std::hash::Hash + Eq + Shard,
    Q: std::hash::Hash + Equivalent<K> + Shard + ?Sized,
{
    if let EntryRef::Occupied(mut e) = map.entry_ref(key) {
        e.get_mut().retain(|a| *a != ip);
        if e.get().is_empty() {
            e.remove();
        }
    }
}

impl Network {
    fn new(name: Str) -> Network {
        Network {
            name,
            pools: BTreeMap::new(),
            leases: ByAddress::default(),
            by_attachment: ShardedMap::default(),
            by_pod: ShardedMap::default(),
            keys: KeyHasher::default(),
            cooldown_ms: 0,
            cooling: HashMap::new(),
        }
    }

    fn insert(&mut self, lease: Arc<Lease>) {
        let ip = lease.address;
        if !self.cooling.is_empty() {
            self.cooling.remove(&ip);
        }
        for pool in self.pools.values_mut() {
            pool.mark(ip, true);
        }
        if !lease.is_manual() {
            let h = &lease.holder;
            let hash = self.keys.attach(&h.container_id, &h.ifname).hash;
            self.by_attachment.entry(AttachKey { hash, holder: h.clone() }).or_default().push(ip);
            if h.has_owner_key() {
                let hash = self.keys.pod(h).hash;
                self.by_pod.entry(PodKey { hash, holder: h.clone() }).or_default().push(ip);
            }
        }
        self.leases.insert(lease);
    }

    fn remove(&mut self, ip: IpAddr) -> Option<Arc<Lease>> {
        let lease = self.leases.remove(&ip)?;
        for pool in self.pools.values_mut() {
            pool.mark(ip, false);
        }
        if !lease.is_manual() {
            let h = &lease.holder;
            unindex(&mut self.by_attachment, &self.keys.attach(&h.container_id, &h.ifname), ip);
            if h.has_owner_key() {
                unindex(&mut self.by_pod, &self.keys.pod(h), ip);
            }
        }
        Some(lease)
    }

    /// Creates the pool of `spec` (marking what the network holds in it) unless it exists;
    /// returns whether it was created.
    fn ensure_pool(&mut self, spec: &RangeSpec) -> bool {
        if self.pools.contains_key(spec.key()) {
            return false;
        }
        let mut pool = RangePool::new(spec.clone());
        for ip in self.leases.addresses() {
            pool.mark(ip, true);
        }
        self.pools.insert(spec.key_str().clone(), pool);
        true
    }

    fn held_by(&self, container_id: &str, ifname: &str) -> Held {
        self.by_attachment.get(&self.keys.attach(container_id, ifname)).cloned().unwrap_or_default()
    }
}

/// A record the store held that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadProblem {
    pub what: String,
    pub error: String,
}

/// All networks, pools and leases.
#[derive(Debug, Default)]
pub struct Allocator {
    networks: HashMap<String, Network>,
    journal: Vec<Change>,
    lease_count: usize,
    /// Addresses handed out before their cooldown had passed, since the last
    /// [`Allocator::take_cooldown_overrides`]: the caller logs them.
    overrides: Vec<CooldownOverride>,
    /// Per network: allocations that could not be aligned with the pod's other rails,
    /// since this replica started leading.
    unaligned: HashMap<String, u64>,
}

/// An address handed out during its cooldown because its range had no other free address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CooldownOverride {
    pub network: Str,
    pub address: IpAddr,
    /// When it was released (ms since the epoch).
    pub released_unix_ms: i64,
    /// When its cooldown would have passed.
    pub until_unix_ms: i64,
}

/// What a range offers next: a free address, or (under a cooldown, when every free address
/// is cooling) the one released longest ago.
enum Pick {
    Free(IpAddr),
    Cooling { ip: IpAddr, released: i64 },
}

/// End of the cooldown of an address released at `released`.
fn cool_until(released: i64, cooldown_ms: u64) -> i64 {
    released.saturating_add(i64::try_from(cooldown_ms).unwrap_or(i64::MAX))
}

/// The lowest free address of `pool` that is not cooling at `now`; when every free address
/// is, the one whose cooldown ends first. Each step past the first lands on a cooling
/// address, so the walk is bounded by the number of them.
fn pick_free(pool: &RangePool, cooling: &HashMap<IpAddr, i64>, cooldown_ms: u64, now: i64) -> Option<Pick> {
    if cooldown_ms == 0 || cooling.is_empty() {
        return pool.first_free().map(Pick::Free);
    }
    let mut from = 0;
    let mut oldest: Option<(i64, IpAddr)> = None;
    while let Some(ip) = pool.first_free_from(from) {
        match cooling.get(&ip) {
            Some(&released) if now < cool_until(released, cooldown_ms) => {
                if oldest.is_none_or(|(r, _)| released < r) {
                    oldest = Some((released, ip));
                }
                let Some(next) = pool.spec.offset(ip).and_then(|o| o.checked_add(1)) else { break };
                from = next;
            }
            _ => return Some(Pick::Free(ip)),
        }
    }
    oldest.map(|(released, ip)| Pick::Cooling { ip, released })
}

/// The network named `name`, created empty if new.
fn network_mut<'a>(networks: &'a mut HashMap<String, Network>, name: &str) -> &'a mut Network {
    networks.entry_ref(name).or_insert_with(|| Network::new(name.into()))
}

/// Marks the lease at `ip` kept (its sandbox is gone) and journals it; `None` when nothing
/// is held there. A lease already kept is returned unchanged and nothing is journaled.
fn mark_kept(net: &mut Network, journal: &mut Vec<Change>, ip: IpAddr) -> Option<Arc<Lease>> {
    let old = net.leases.get(&ip)?.clone();
    if old.holder.kept {
        return Some(old);
    }
    net.remove(ip);
    let mut lease = (*old).clone();
    lease.holder = Arc::new(Attachment { kept: true, ..(*old.holder).clone() });
    let lease = Arc::new(lease);
    net.insert(lease.clone());
    journal.push(Change::PutLease(lease.clone()));
    Some(lease)
}

/// What a release did: the leases freed and those kept for their owner.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Released {
    pub freed: Leases,
    pub kept: Leases,
}

/// Removes one lease and journals it; under a cooldown the address starts cooling at `now`.
fn delete(
    net: &mut Network,
    journal: &mut Vec<Change>,
    count: &mut usize,
    ip: IpAddr,
    now_unix_ms: i64,
) -> Option<Arc<Lease>> {
    let lease = net.remove(ip)?;
    *count -= 1;
    if net.cooldown_ms > 0 {
        net.cooling.insert(ip, now_unix_ms);
    }
    journal.push(Change::DeleteLease { network: net.name.clone(), address: ip });
    Some(lease)
}

impl Allocator {
    /// An empty allocator.
    pub fn new() -> Allocator {
        Allocator::default()
    }

    /// Rebuilds state from stored pools and leases. Records that can't be used are reported
    /// and skipped; nothing is journaled.
    pub fn restore(
        pools: impl IntoIterator<Item = (String, RangeInput)>,
        leases: impl IntoIterator<Item = Lease>,
    ) -> (Allocator, Vec<LoadProblem>) {
        let mut a = Allocator::new();
        let mut problems = Vec::new();
        for mut lease in leases {
            let net = network_mut(&mut a.networks, &lease.network);
            if let Some(old) = net.leases.get(&lease.address) {
                problems.push(LoadProblem {
                    what: format!("lease {} in network \"{}\"", lease.address, lease.network),
                    error: format!("address already held by {}", old.who()),
                });
                continue;
            }
            // Share the network name instead of one copy per lease.
            lease.network = net.name.clone();
            net.insert(Arc::new(lease));
            a.lease_count += 1;
        }
        for (network, input) in pools {
            match RangeSpec::parse(&input, FieldPrefix("")) {
                Ok(spec) => {
                    network_mut(&mut a.networks, &network).ensure_pool(&spec);
                }
                Err(e) => problems.push(LoadProblem {
                    what: format!("pool {:?} in network \"{network}\"", input.range),
                    error: e.to_string(),
                }),
            }
        }
        (a, problems)
    }

    /// Takes the changes made since the last call, to persist them. The journal keeps its
    /// buffer for the next batch.
    pub fn drain_journal(&mut self) -> std::vec::Drain<'_, Change> {
        self.journal.drain(..)
    }

    /// Number of changes made since the journal was last drained.
    pub fn journal_len(&self) -> usize {
        self.journal.len()
    }

    /// Number of held addresses across all networks.
    pub fn lease_count(&self) -> usize {
        self.lease_count
    }

    /// Number of pools across all networks.
    pub fn pool_count(&self) -> usize {
        self.networks.values().map(|n| n.pools.len()).sum()
    }

    /// Gives the attachment one address from each range: what it (or its pod, under the
    /// same interface name) already holds there, else the requested address, else the
    /// lowest free one. All or nothing.
    pub fn allocate(&mut self, req: &AllocateRequest, now_unix_ms: i64) -> Result<Leases, AllocError> {
        let a = &req.attachment;
        let Allocator { networks, journal, lease_count, overrides, .. } = self;
        let net = network_mut(networks, &req.network);
        if net.cooldown_ms > 0 && !net.cooling.is_empty() {
            let cd = net.cooldown_ms;
            net.cooling.retain(|_, released| now_unix_ms < cool_until(*released, cd));
        }
        let overrides_before = overrides.len();

        // Which range each requested address belongs to.
        let mut wanted: SmallVec<[Option<IpAddr>; 4]> = smallvec::smallvec![None; req.ranges.len()];
        for ip in &req.requested {
            let slot = req
                .ranges
                .iter()
                .enumerate()
                .position(|(i, r)| wanted[i].is_none() && r.offset(*ip).is_some())
                .ok_or_else(|| AllocError::Invalid {
                    field: "requested_addresses".into(),
                    value: ip.to_string(),
                    reason: "is not in any requested range (or two addresses were requested in one range)"
                        .into(),
                })?;
            wanted[slot] = Some(*ip);
        }

        for spec in &req.ranges {
            if net.ensure_pool(spec) {
                journal.push(Change::PutPool { network: net.name.clone(), range: spec.input().clone() });
            }
        }

        let mut existing = net.held_by(&a.container_id, &a.ifname);
        // A sandbox ADDed again after its DEL kept its lease: it holds it again, not kept.
        let mut moved_from_pod = existing.iter().any(|ip| net.leases.get(ip).is_some_and(|l| l.holder.kept));
        if existing.is_empty()
            && a.has_owner_key()
            && let Some(v) = net.by_pod.get(&net.keys.pod(a))
        {
            // Another pod of the same name that was not the owner's (or the other way
            // round) shares the key but takes nothing.
            existing = v
                .iter()
                .copied()
                .filter(|ip| net.leases.get(ip).is_some_and(|l| a.may_take_from(&l.holder)))
                .collect();
            moved_from_pod = !existing.is_empty();
        }
        // Lowest first, so the choice does not depend on the order leases were taken.
        existing.sort_unstable();

        let mut chosen: SmallVec<[IpAddr; 4]> = SmallVec::new();
        let mut new_leases: SmallVec<[Arc<Lease>; 4]> = SmallVec::new();
        let result = (|| {
            for (i, spec) in req.ranges.iter().enumerate() {
                let reuse = existing.iter().copied().find(|ip| spec.allows(*ip) && !chosen.contains(ip));
                let ip = match (reuse, wanted[i]) {
                    (Some(held), Some(req_ip)) if held != req_ip => {
                        return Err(AllocError::Conflict {
                            attachment: format!("container {} interface {}", a.container_id, a.ifname),
                            range: spec.display().to_string(),
                            held,
                            requested: req_ip,
                        });
                    }
                    (Some(held), _) => {
                        chosen.push(held);
                        continue;
                    }
                    (None, Some(req_ip)) => {
                        if !spec.allows(req_ip) {
                            return Err(AllocError::Invalid {
                                field: "requested_addresses".into(),
                                value: req_ip.to_string(),
                                reason: format!("is excluded (or the gateway) in range {}", spec.display()),
                            });
                        }
                        if let Some(holder) = net.leases.get(&req_ip) {
                            return Err(AllocError::Held {
                                network: net.name.to_string(),
                                address: req_ip,
                                holder: holder.who(),
                            });
                        }
                        req_ip
                    }
                    (None, None) => {
                        let pool = &net.pools[spec.key()];
                        match pick_free(pool, &net.cooling, net.cooldown_ms, now_unix_ms) {
                            Some(Pick::Free(ip)) => ip,
                            Some(Pick::Cooling { ip, released }) => {
                                overrides.push(CooldownOverride {
                                    network: net.name.clone(),
                                    address: ip,
                                    released_unix_ms: released,
                                    until_unix_ms: cool_until(released, net.cooldown_ms),
                                });
                                ip
                            }
                            None => {
                                let u = pool.usage(&net.name);
                                return Err(AllocError::Exhausted {
                                    range: spec.display().to_string(),
                                    size: u.size,
                                    held: u.used,
                                    excluded: u.excluded,
                                });
                            }
                        }
                    }
                };
                let lease = Arc::new(Lease {
                    address: ip,
                    network: net.name.clone(),
                    range: spec.display_str().clone(),
                    prefix_len: spec.prefix_len(),
                    gateway: spec.gateway(),
                    holder: req.attachment.clone(),
                    created_unix_ms: now_unix_ms,
                    note: String::new(),
                });
                net.insert(lease.clone());
                new_leases.push(lease);
                chosen.push(ip);
            }
            Ok(())
        })();
        if let Err(e) = result {
            for lease in new_leases {
                // Back to cooling where it came from: nothing was handed out.
                if let Some(o) = overrides[overrides_before..].iter().find(|o| o.address == lease.address) {
                    net.cooling.insert(lease.address, o.released_unix_ms);
                }
                net.remove(lease.address);
            }
            overrides.truncate(overrides_before);
            return Err(e);
        }

        *lease_count += new_leases.len();
        if moved_from_pod {
            // The pod came back in a new sandbox (or a kept one came back): its leases
            // follow it.
            for ip in existing {
                if let Some(old) = net.remove(ip) {
                    let mut lease = (*old).clone();
                    lease.holder = req.attachment.clone();
                    let lease = Arc::new(lease);
                    journal.push(Change::PutLease(lease.clone()));
                    net.insert(lease);
                }
            }
        }
        journal.extend(new_leases.into_iter().map(Change::PutLease));
        Ok(chosen.iter().map(|ip| net.leases[ip].clone()).collect())
    }

    /// Releases what an attachment holds in a network; nothing held is not an error. Under
    /// a cooldown the addresses cool from `now_unix_ms`.
    pub fn release(&mut self, network: &str, container_id: &str, ifname: &str, now_unix_ms: i64) -> Leases {
        self.release_keeping(network, container_id, ifname, now_unix_ms, &|_| false).freed
    }

    /// [`Allocator::release`], except that a lease with an owner for which `keep` says so
    /// is kept for the owner's next sandbox (marked [`Attachment::kept`]) instead of freed.
    /// A lease already kept is freed only when `keep` no longer says so.
    pub fn release_keeping(
        &mut self,
        network: &str,
        container_id: &str,
        ifname: &str,
        now_unix_ms: i64,
        keep: &dyn Fn(&Lease) -> bool,
    ) -> Released {
        let Some(net) = self.networks.get_mut(network) else {
            return Released::default();
        };
        let mut out = Released::default();
        for ip in net.held_by(container_id, ifname) {
            match net.leases.get(&ip) {
                Some(l) if l.holder.owner.is_some() && keep(l) => {
                    if let Some(k) = mark_kept(net, &mut self.journal, ip) {
                        out.kept.push(k);
                    }
                }
                _ => out.freed.extend(delete(net, &mut self.journal, &mut self.lease_count, ip, now_unix_ms)),
            }
        }
        out
    }

    /// What an attachment holds in a network.
    pub fn check(&self, network: &str, container_id: &str, ifname: &str) -> Leases {
        let Some(net) = self.networks.get(network) else {
            return Leases::new();
        };
        net.held_by(container_id, ifname).iter().map(|ip| net.leases[ip].clone()).collect()
    }

    /// Counts an allocation in `network` that could not be aligned with its pod's rails.
    pub fn count_unaligned(&mut self, network: &str) {
        *self.unaligned.entry_ref(network).or_default() += 1;
    }

    /// Allocations in `network` that could not be aligned with their pod's rails.
    pub fn unaligned(&self, network: &str) -> u64 {
        self.unaligned.get(network).copied().unwrap_or(0)
    }

    /// Whether `attachment` (its sandbox, or its pod under the same interface name, or its
    /// owner, when it may take what the owner holds) holds an address in `network`.
    pub fn holds(&self, network: &str, attachment: &Attachment) -> bool {
        let Some(net) = self.networks.get(network) else { return false };
        let a = attachment;
        net.by_attachment.get(&net.keys.attach(&a.container_id, &a.ifname)).is_some()
            || (a.has_owner_key()
                && net.by_pod.get(&net.keys.pod(a)).is_some_and(|held| {
                    held.iter().any(|ip| net.leases.get(ip).is_some_and(|l| a.may_take_from(&l.holder)))
                }))
    }

    /// Releases every attachment lease of `network` allocated from `node` whose attachment
    /// is not in `valid`. Manual reservations and other nodes' leases stay.
    pub fn gc(
        &mut self,
        network: &str,
        node: &str,
        valid: &HashSet<(String, String)>,
        now_unix_ms: i64,
    ) -> Vec<Arc<Lease>> {
        self.gc_keeping(network, node, valid, now_unix_ms, &|_| false).freed.into_vec()
    }

    /// [`Allocator::gc`], keeping (as [`Allocator::release_keeping`] does) the leases of
    /// owners `keep` says so for. Leases already kept are not the runtime's to judge (it
    /// never knew their sandbox is wanted again) and are left alone.
    pub fn gc_keeping(
        &mut self,
        network: &str,
        node: &str,
        valid: &HashSet<(String, String)>,
        now_unix_ms: i64,
        keep: &dyn Fn(&Lease) -> bool,
    ) -> Released {
        let Some(net) = self.networks.get_mut(network) else {
            return Released::default();
        };
        let mut stale: Vec<IpAddr> = net
            .by_attachment
            .iter()
            .filter(|(k, _)| {
                k.holder.node == node
                    && !k.holder.kept
                    && !valid.contains(&(k.holder.container_id.clone(), k.holder.ifname.clone()))
            })
            .flat_map(|(_, ips)| ips.iter().copied())
            .collect();
        stale.sort();
        let mut out = Released::default();
        for ip in stale {
            match net.leases.get(&ip) {
                Some(l) if l.holder.owner.is_some() && keep(l) => {
                    out.kept.extend(mark_kept(net, &mut self.journal, ip));
                }
                _ => out.freed.extend(delete(net, &mut self.journal, &mut self.lease_count, ip, now_unix_ms)),
            }
        }
        out
    }

    /// Holds an address by hand so it is never handed out.
    pub fn reserve(
        &mut self,
        network: &str,
        ip: IpAddr,
        note: &str,
        now_unix_ms: i64,
    ) -> Result<Arc<Lease>, AllocError> {
        let net = network_mut(&mut self.networks, network);
        if let Some(l) = net.leases.get(&ip) {
            return Err(AllocError::Held { network: network.to_string(), address: ip, holder: l.who() });
        }
        let pool = net.pools.values().find(|p| p.spec.offset(ip).is_some()).map(|p| &p.spec);
        let lease = Arc::new(Lease {
            address: ip,
            network: net.name.clone(),
            range: pool.map_or_else(empty_str, |s| s.display_str().clone()),
            prefix_len: pool.map_or(if ip.is_ipv4() { 32 } else { 128 }, |s| s.prefix_len()),
            gateway: pool.and_then(|s| s.gateway()),
            holder: nobody(),
            created_unix_ms: now_unix_ms,
            note: note.to_string(),
        });
        net.insert(lease.clone());
        self.lease_count += 1;
        self.journal.push(Change::PutLease(lease.clone()));
        Ok(lease)
    }

    /// Takes over a lease made elsewhere (an import): held as given when the address is
    /// free; `Ok(false)` when the same attachment already holds it (nothing changes); an
    /// error naming the holder when someone else does.
    pub fn adopt(&mut self, lease: Lease) -> Result<bool, AllocError> {
        let net = network_mut(&mut self.networks, &lease.network);
        if let Some(held) = net.leases.get(&lease.address) {
            let same = held.holder.container_id == lease.holder.container_id
                && held.holder.ifname == lease.holder.ifname;
            return if same {
                Ok(false)
            } else {
                Err(AllocError::Held {
                    network: lease.network.to_string(),
                    address: lease.address,
                    holder: held.who(),
                })
            };
        }
        let lease = Arc::new(Lease { network: net.name.clone(), ..lease });
        net.insert(lease.clone());
        self.lease_count += 1;
        self.journal.push(Change::PutLease(lease));
        Ok(true)
    }

    /// Makes memory agree with the store about one address after the store refused a write
    /// there: `truth` is what the store holds (`None`: nothing). Nothing is journaled.
    pub fn sync_from_store(&mut self, network: &str, ip: IpAddr, truth: Option<Lease>) {
        let net = network_mut(&mut self.networks, network);
        if net.remove(ip).is_some() {
            self.lease_count -= 1;
        }
        if let Some(lease) = truth {
            net.insert(Arc::new(Lease { network: net.name.clone(), ..lease }));
            self.lease_count += 1;
        }
    }

    /// Frees one address whoever holds it (under a cooldown it cools from `now_unix_ms`).
    pub fn release_address(
        &mut self,
        network: &str,
        ip: IpAddr,
        now_unix_ms: i64,
    ) -> Result<Arc<Lease>, AllocError> {
        self.networks
            .get_mut(network)
            .and_then(|net| delete(net, &mut self.journal, &mut self.lease_count, ip, now_unix_ms))
            .ok_or_else(|| AllocError::NotFound { network: network.into(), address: ip })
    }

    /// Sets the cooldown of `network` (an IPPool's): an address released there is not handed
    /// out again for `cooldown_ms` unless its range has no other free address. 0 turns it
    /// off and forgets what was cooling. Only memory: a restart forgets cooldowns.
    pub fn set_cooldown(&mut self, network: &str, cooldown_ms: u64) {
        if cooldown_ms == 0 && !self.networks.contains_key(network) {
            return;
        }
        let net = network_mut(&mut self.networks, network);
        net.cooldown_ms = cooldown_ms;
        if cooldown_ms == 0 {
            net.cooling = HashMap::new();
        }
    }

    /// Addresses of `network` whose cooldown has not passed at `now_unix_ms`.
    pub fn cooldown_holds(&self, network: &str, now_unix_ms: i64) -> usize {
        self.networks.get(network).map_or(0, |net| {
            net.cooling.values().filter(|r| now_unix_ms < cool_until(**r, net.cooldown_ms)).count()
        })
    }

    /// Released addresses of `network` in `block` whose cooldown has not passed at `now`.
    pub fn cooldown_holds_in(&self, network: &str, block: Block, now_unix_ms: i64) -> usize {
        self.networks.get(network).map_or(0, |net| {
            net.cooling
                .iter()
                .filter(|(ip, r)| block.contains(**ip) && now_unix_ms < cool_until(**r, net.cooldown_ms))
                .count()
        })
    }

    /// The addresses handed out during their cooldown since the last call, to be logged.
    pub fn take_cooldown_overrides(&mut self) -> Vec<CooldownOverride> {
        std::mem::take(&mut self.overrides)
    }

    /// Size and use of `ranges` in `network` together (an IPPool's), whether or not an
    /// allocation has made their pools yet. Sums saturate: two IPv6 ranges can hold more
    /// addresses than a u128 counts.
    pub fn usage_of(&self, network: &str, ranges: &[RangeSpec]) -> PoolTotals {
        let mut t = PoolTotals::default();
        let net = self.networks.get(network);
        for spec in ranges {
            let (size, excluded) = (spec.size(), spec.excluded_count());
            let used = match net.and_then(|n| n.pools.get(spec.key())) {
                Some(pool) => pool.held.count(),
                None => net.map_or(0, |n| n.leases.addresses().filter(|ip| spec.allows(*ip)).count() as u128),
            };
            t.size = t.size.saturating_add(size);
            t.used = t.used.saturating_add(used);
            t.excluded = t.excluded.saturating_add(excluded);
            t.free = t.free.saturating_add(size - excluded - used);
        }
        t
    }

    /// Whether `ip` could be handed out from `spec` in `network` at `now`: allowed by the
    /// range, held by nobody and not cooling.
    pub fn is_free(&self, network: &str, spec: &RangeSpec, ip: IpAddr, now_unix_ms: i64) -> bool {
        if !spec.allows(ip) {
            return false;
        }
        let Some(net) = self.networks.get(network) else { return true };
        let cooling = net.cooling.get(&ip).is_some_and(|r| now_unix_ms < cool_until(*r, net.cooldown_ms));
        net.leases.get(&ip).is_none() && !cooling
    }

    /// Who holds an address.
    pub fn get(&self, network: &str, ip: IpAddr) -> Result<Arc<Lease>, AllocError> {
        self.networks
            .get(network)
            .and_then(|n| n.leases.get(&ip))
            .cloned()
            .ok_or_else(|| AllocError::NotFound { network: network.into(), address: ip })
    }

    /// Pools of one network (or all, for `None`), by network then range.
    pub fn pools(&self, network: Option<&str>) -> Vec<PoolUsage> {
        let mut out: Vec<PoolUsage> = self
            .networks
            .values()
            .filter(|net| network.is_none_or(|n| n == &*net.name))
            .flat_map(|net| net.pools.values().map(|p| p.usage(&net.name)))
            .collect();
        out.sort_by(|a, b| (&a.network, &a.range.range).cmp(&(&b.network, &b.range.range)));
        out
    }

    /// Every lease that matches the filter, by network then address, in one call. It
    /// visits and sorts every lease: for tests and tools on small allocators; the server
    /// reads in pages with [`Allocator::leases_after`].
    pub fn leases(&self, filter: &LeaseFilter) -> Vec<Arc<Lease>> {
        let mut out: Vec<Arc<Lease>> = self
            .networks
            .values()
            .filter(|net| filter.network.as_deref().is_none_or(|n| n == &*net.name))
            .flat_map(|net| net.leases.from(Bound::Unbounded).filter(|l| filter.matches(l)).cloned())
            .collect();
        out.sort_by(|a, b| (&a.network, a.address).cmp(&(&b.network, b.address)));
        out
    }

    /// Up to `limit` leases that match the filter, by network then address, starting after
    /// the key `after` (network, address); `limit` is taken as 1 to [`SCAN_LIMIT`].
    ///
    /// It seeks to the key and looks at no more than [`SCAN_LIMIT`] leases, so one call
    /// costs about its own page whatever the allocator holds: a filter that matches few
    /// leases may answer a short (even empty) page with a continuation. Reading on from
    /// [`LeasePage::next`] until it is `None` sees every lease that was held throughout,
    /// once; one that comes or goes between calls may or may not be seen.
    pub fn leases_after(
        &self,
        filter: &LeaseFilter,
        after: Option<(&str, IpAddr)>,
        limit: usize,
    ) -> LeasePage {
        self.scan_after(filter, after, limit, SCAN_LIMIT)
    }

    /// [`Allocator::leases_after`] looking at no more than `scan_limit` leases (at least 1),
    /// so tests can reach the limit with a handful.
    fn scan_after(
        &self,
        filter: &LeaseFilter,
        after: Option<(&str, IpAddr)>,
        limit: usize,
        scan_limit: usize,
    ) -> LeasePage {
        let scan_limit = scan_limit.max(1);
        let limit = limit.clamp(1, SCAN_LIMIT);
        // Few networks: sorting their names per call is cheap next to the page.
        let mut nets: Vec<&Network> = self
            .networks
            .values()
            .filter(|net| filter.network.as_deref().is_none_or(|n| n == &*net.name))
            .filter(|net| after.is_none_or(|(from, _)| &*net.name >= from))
            .collect();
        nets.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let mut leases = Vec::new();
        // The last key looked at: where the next call goes on when this one stops early.
        let mut cursor: Option<&Arc<Lease>> = None;
        let next = |cursor: Option<&Arc<Lease>>| match cursor {
            Some(l) => Some((l.network.clone(), l.address)),
            None => after.map(|(net, ip)| (Str::from(net), ip)),
        };
        let mut examined = 0;
        for net in nets {
            let from = match after {
                Some((name, ip)) if name == &*net.name => Bound::Excluded(ip),
                _ => Bound::Unbounded,
            };
            for lease in net.leases.from(from) {
                if examined == scan_limit {
                    return LeasePage { leases, next: next(cursor) };
                }
                examined += 1;
                if filter.matches(lease) {
                    if leases.len() == limit {
                        // One more match exists: the next page starts with it.
                        return LeasePage { leases, next: next(cursor) };
                    }
                    leases.push(lease.clone());
                }
                cursor = Some(lease);
            }
        }
        LeasePage { leases, next: None }
    }
}

/// Most leases one [`Allocator::leases_after`] call looks at: it runs on the engine thread,
/// where every allocation waits for it (a few milliseconds at most).
pub const SCAN_LIMIT: usize = 16_384;

/// One page of an ordered read of leases, see [`Allocator::leases_after`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LeasePage {
    /// The matching leases, by network then address.
    pub leases: Vec<Arc<Lease>>,
    /// The key (network, address) to read on after; `None`: nothing is left.
    pub next: Option<(Str, IpAddr)>,
}

#[cfg(test)]
mod tests;
