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
pub mod selector;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ipnetwork::IpNetwork;
use tracing::{info, warn};

use crate::allocator::{
    AllocError, AllocateRequest, Allocator, Block, BlockCut, BlockFull, FieldPrefix, Leases, PoolTotals,
    RangeInput, RangeSpec,
};
use crate::k8s::crd::{IPPoolSpec, PoolDns, PoolRoute, PoolSelector};
use selector::{Labels, Selector};

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
    /// Per-node subnets, if the pool has them.
    pub per_node: Option<PerNode>,
    /// The rail group the pool is aligned with ("": none).
    pub rail_group: String,
    /// The nodes whose pods may allocate from it (`None`: all).
    pub node_selector: Option<Selector>,
    /// The namespaces whose pods may allocate from it (`None`: all).
    pub namespace_selector: Option<Selector>,
    /// Blocks given to nodes by hand (`staticAllocations`).
    pub statics: Vec<StaticBlock>,
}

/// A block given to a node by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticBlock {
    pub node: String,
    /// Which of the pool's ranges holds it.
    pub range: usize,
    pub block: Block,
    /// Its own gateway, replacing gatewayIndex's.
    pub gateway: Option<IpAddr>,
}

/// How a pool is cut into per-node blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Subnets of this prefix length (`perNodePrefix`), each with its own gateway.
    Prefix(u8),
    /// Runs of this many addresses (`perNodeBlockSize`), sharing the range's prefix and
    /// gateway.
    Size(u32),
}

/// A pool's per-node blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerNode {
    pub cut: Cut,
    /// With [`Cut::Prefix`]: the gateway of a block, this index from its first address.
    pub gateway_index: Option<u32>,
}

impl PerNode {
    /// How `pool_range` is cut.
    pub fn cut_of(&self, pool_range: &RangeSpec) -> Result<BlockCut, AllocError> {
        match self.cut {
            Cut::Prefix(p) => BlockCut::by_prefix(pool_range.network(), p),
            Cut::Size(n) => BlockCut::by_size(pool_range, u128::from(n)),
        }
    }

    /// The range a node allocates from: its block, with the pool range's exclusions
    /// (clipped to the block), and the block's gateway (a subnet's, at gatewayIndex) or
    /// the range's (a run of addresses shares the range's prefix and gateway).
    pub fn block_range(&self, block: Block, pool_range: &RangeSpec) -> Result<RangeSpec, AllocError> {
        self.block_range_with(block, pool_range, None)
    }

    /// [`PerNode::block_range`] with `gateway` (a static block's) in place of gatewayIndex's.
    pub fn block_range_with(
        &self,
        block: Block,
        pool_range: &RangeSpec,
        gateway: Option<IpAddr>,
    ) -> Result<RangeSpec, AllocError> {
        let input = match self.cut {
            Cut::Prefix(_) => {
                let family = crate::allocator::Family::of(block.first);
                let by_index = self.gateway_index.map(|i| {
                    let ip = crate::allocator::ip_to_u128(block.first) + u128::from(i);
                    crate::allocator::u128_to_ip(family, ip)
                });
                let gateway = gateway.or(by_index).map_or_else(String::new, |g| g.to_string());
                RangeInput {
                    range: block.to_string(),
                    exclude: pool_range.input().exclude.clone(),
                    gateway,
                    ..RangeInput::default()
                }
            }
            Cut::Size(_) => RangeInput {
                range: pool_range.network().to_string(),
                range_start: block.first.to_string(),
                range_end: block.last.to_string(),
                exclude: pool_range.input().exclude.clone(),
                gateway: pool_range.input().gateway.clone(),
            },
        };
        RangeSpec::parse(&input, FieldPrefix(""))
    }
}

impl Pool {
    /// The range a node allocates from in `block` of range `range`: with a static block's
    /// gateway when it is one.
    pub fn block_spec(&self, per_node: PerNode, block: Block, range: usize) -> Result<RangeSpec, AllocError> {
        let gateway =
            self.statics.iter().find(|s| s.range == range && s.block == block).and_then(|s| s.gateway);
        per_node.block_range_with(block, &self.ranges[range], gateway)
    }

    /// The ranges as `kubectl get` shows them: `198.18.0.0/24,fd00::/64`.
    pub fn ranges_text(&self) -> String {
        self.ranges.iter().map(RangeSpec::display).collect::<Vec<_>>().join(",")
    }

    /// Whether an attachment on `node` of a pod in `namespace` may allocate from the pool,
    /// by its selectors and the labels in `labels`.
    pub fn admit(&self, labels: &Labels, node: &str, namespace: &str) -> Result<(), selector::Refusal> {
        if let Some(s) = &self.node_selector {
            labels.admit(&self.name, selector::Kind::Node, s, node)?;
        }
        if let Some(s) = &self.namespace_selector {
            labels.admit(&self.name, selector::Kind::Namespace, s, namespace)?;
        }
        Ok(())
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
    let per_node = check_per_node(name, spec, &ranges)?;
    if !spec.rail_group.is_empty() && per_node.is_none() {
        return Err(field_error(
            name,
            "spec.railGroup".into(),
            &spec.rail_group,
            "needs perNodePrefix or perNodeBlockSize (rails are aligned by their per-node blocks)",
        ));
    }
    let selector = |field: &str, s: &Option<PoolSelector>| {
        s.as_ref()
            .map(|s| Selector::check(field, s))
            .transpose()
            .map_err(|(field, value, reason)| field_error(name, field, &value, reason))
    };
    let statics = check_statics(name, spec, &ranges, per_node)?;
    Ok(Pool {
        name: name.to_string(),
        ranges,
        routes: spec.routes.clone(),
        dns: spec.dns.clone(),
        cooldown: parse_cooldown(name, &spec.cooldown)?,
        per_node,
        rail_group: spec.rail_group.clone(),
        node_selector: selector("spec.nodeSelector", &spec.node_selector)?,
        namespace_selector: selector("spec.namespaceSelector", &spec.namespace_selector)?,
        statics,
    })
}

/// perNodePrefix (with gatewayIndex) or perNodeBlockSize: a block must fit every range and
/// hold an address to hand out (a subnet's network and last addresses and its gateway are
/// never handed out); a range cut into subnets then describes no bounds or gateway of its
/// own.
fn check_per_node(name: &str, spec: &IPPoolSpec, ranges: &[RangeSpec]) -> Result<Option<PerNode>, PoolError> {
    let prefix = match (spec.per_node_prefix, spec.per_node_block_size) {
        (Some(_), Some(n)) => {
            return Err(field_error(
                name,
                "spec.perNodeBlockSize".into(),
                &n.to_string(),
                "is not taken with perNodePrefix (a block is one or the other)",
            ));
        }
        (None, Some(n)) => {
            if let Some(i) = spec.gateway_index {
                return Err(field_error(
                    name,
                    "spec.gatewayIndex".into(),
                    &i.to_string(),
                    "needs perNodePrefix (blocks of perNodeBlockSize share their range's gateway)",
                ));
            }
            for (i, r) in ranges.iter().enumerate() {
                if n == 0 || u128::from(n) > r.size() {
                    return Err(field_error(
                        name,
                        "spec.perNodeBlockSize".into(),
                        &n.to_string(),
                        format!(
                            "is not between 1 and the size of spec.ranges[{i}] {} ({})",
                            r.display(),
                            r.size()
                        ),
                    ));
                }
            }
            return Ok(Some(PerNode { cut: Cut::Size(n), gateway_index: None }));
        }
        (None, None) => {
            if let Some(i) = spec.gateway_index {
                return Err(field_error(
                    name,
                    "spec.gatewayIndex".into(),
                    &i.to_string(),
                    "needs perNodePrefix",
                ));
            }
            return Ok(None);
        }
        (Some(p), None) => p,
    };
    let field = || "spec.perNodePrefix".to_string();
    for (i, r) in ranges.iter().enumerate() {
        let net = r.network();
        let bits: u8 = if net.is_ipv4() { 32 } else { 128 };
        if prefix <= net.prefix() || prefix > bits {
            return Err(field_error(
                name,
                field(),
                &prefix.to_string(),
                format!(
                    "does not cut spec.ranges[{i}].range {net} into blocks (it must be longer than /{} and at most /{bits})",
                    net.prefix()
                ),
            ));
        }
        // A block's network and last addresses are never handed out, nor its gateway;
        // a /31 or /32 block (point-to-point) has no network or last address to spare.
        let size = 1u128 << (bits - prefix);
        let (lowest, usable) = if size <= 2 { (0, size) } else { (1, size - 2) };
        let highest = lowest + usable - 1;
        if usable < 1 + u128::from(spec.gateway_index.is_some()) {
            return Err(field_error(
                name,
                field(),
                &prefix.to_string(),
                "leaves no address of a block to hand out once its gateway is taken",
            ));
        }
        if let Some(gi) = spec.gateway_index
            && (u128::from(gi) < lowest || u128::from(gi) > highest)
        {
            return Err(field_error(
                name,
                "spec.gatewayIndex".into(),
                &gi.to_string(),
                format!("is not a usable address of a /{prefix} block ({lowest} to {highest})"),
            ));
        }
        let input = &spec.ranges[i];
        for (key, value) in [
            ("range_start", &input.range_start),
            ("range_end", &input.range_end),
            ("gateway", &input.gateway),
        ] {
            if !value.is_empty() {
                return Err(field_error(
                    name,
                    format!("spec.ranges[{i}].{key}"),
                    value,
                    "is not taken with perNodePrefix (blocks are whole; a block's gateway is gatewayIndex)",
                ));
            }
        }
    }
    Ok(Some(PerNode { cut: Cut::Prefix(prefix), gateway_index: spec.gateway_index }))
}

/// staticAllocations: each a whole block of perNodePrefix's length in one of the ranges,
/// each block and each node (per range) once, a gateway inside its block.
fn check_statics(
    name: &str,
    spec: &IPPoolSpec,
    ranges: &[RangeSpec],
    per_node: Option<PerNode>,
) -> Result<Vec<StaticBlock>, PoolError> {
    let mut out: Vec<StaticBlock> = Vec::new();
    for (i, s) in spec.static_allocations.iter().enumerate() {
        let at = |key: &str| format!("spec.staticAllocations[{i}].{key}");
        let Some(pn @ PerNode { cut: Cut::Prefix(prefix), .. }) = per_node else {
            return Err(field_error(name, at("prefix"), &s.prefix, "needs perNodePrefix"));
        };
        if s.node_name.trim().is_empty() {
            return Err(field_error(name, at("nodeName"), &s.node_name, "is empty"));
        }
        let net: IpNetwork = s
            .prefix
            .trim()
            .parse()
            .map_err(|_| field_error(name, at("prefix"), &s.prefix, "is not a CIDR"))?;
        if net.prefix() != prefix || net.ip() != net.network() {
            return Err(field_error(
                name,
                at("prefix"),
                &s.prefix,
                format!("is not a block of the pool: a /{prefix} starting at its first address"),
            ));
        }
        let Some(range) = ranges.iter().position(|r| r.network().contains(net.network())) else {
            return Err(field_error(name, at("prefix"), &s.prefix, "is in none of spec.ranges"));
        };
        let block = Block { first: net.network(), last: net.broadcast(), prefix: Some(prefix) };
        if let Some(other) =
            out.iter().find(|o| o.block == block || (o.range == range && o.node == s.node_name))
        {
            let why = match other.block == block {
                true => format!("is given to node {:?} already", other.node),
                false => format!("is a second block of node {:?} in that range", other.node),
            };
            return Err(field_error(name, at("prefix"), &s.prefix, why));
        }
        let gateway = match s.gateway.trim() {
            "" => None,
            g => {
                let ip: IpAddr = g
                    .parse()
                    .map_err(|_| field_error(name, at("gateway"), &s.gateway, "is not an IP address"))?;
                if !net.contains(ip) {
                    return Err(field_error(
                        name,
                        at("gateway"),
                        &s.gateway,
                        format!("is outside the block {net}"),
                    ));
                }
                Some(ip)
            }
        };
        let static_block = StaticBlock { node: s.node_name.trim().to_string(), range, block, gateway };
        // The block's range must take its gateway and leave an address for a pod.
        let probe = Pool {
            name: name.to_string(),
            ranges: ranges.to_vec(),
            routes: Vec::new(),
            dns: None,
            cooldown: Duration::ZERO,
            per_node: Some(pn),
            rail_group: String::new(),
            node_selector: None,
            namespace_selector: None,
            statics: vec![static_block.clone()],
        };
        probe
            .block_spec(pn, block, range)
            .map_err(|e| field_error(name, at("gateway"), &s.gateway, e.to_string()))?;
        out.push(static_block);
    }
    Ok(out)
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
    /// The Nodes' and Namespaces' labels the pools' selectors are checked against.
    labels: Labels,
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

    /// Checks the pools' selectors against `labels` (by default: no labels are read, so a
    /// pool with a selector admits nobody and says why).
    pub fn with_labels(self, labels: Labels) -> Pools {
        Pools { labels, ..self }
    }

    /// The labels selectors are checked against.
    pub fn labels(&self) -> &Labels {
        &self.labels
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

/// The other pools of `pool`'s rail group in `set` (none without a group).
pub fn rail_siblings(set: &PoolSet, pool: &Pool) -> Vec<Arc<Pool>> {
    if pool.rail_group.is_empty() {
        return Vec::new();
    }
    set.valid()
        .filter(|p| p.rail_group == pool.rail_group && p.name != pool.name && p.per_node.is_some())
        .cloned()
        .collect()
}

/// A sibling rail's side of one range: its cut, the node's block there (if it has one)
/// and that block's range.
struct Rail {
    network: String,
    cut: BlockCut,
    block: Option<(Block, RangeSpec)>,
}

impl Rail {
    /// `sibling`'s first range of `family`, and `node`'s block in it.
    fn of(a: &Allocator, sibling: &Pool, family: bool, node: &str) -> Option<Rail> {
        let pn = sibling.per_node?;
        let i = sibling.ranges.iter().position(|r| r.network().is_ipv4() == family)?;
        let cut = pn.cut_of(&sibling.ranges[i]).ok()?;
        let block = a
            .node_block_of(&sibling.name, &cut, node)
            .and_then(|b| Some((b, sibling.block_spec(pn, b, i).ok()?)));
        Some(Rail { network: sibling.name.clone(), cut, block })
    }
}

/// How many addresses of a block are tried for one free on every rail.
const ALIGN_TRIES: u128 = 4096;

/// The address of `block` (in `cut`, allowed by `spec`) to ask for so `req`'s pod has the
/// same host index on every rail of `rails`: the index its sandbox holds on a rail, else
/// the lowest index free in `block` and in the node's block of every rail. `None`: no
/// preference; `Err`: the index the sandbox holds elsewhere is not free here (the reason).
fn aligned_address(
    a: &Allocator,
    req: &AllocateRequest,
    cut: &BlockCut,
    block: Block,
    spec: &RangeSpec,
    rails: &[Rail],
    now: i64,
) -> Result<Option<IpAddr>, String> {
    let cid = &req.attachment.container_id;
    for rail in rails {
        let Some((theirs, _)) = &rail.block else { continue };
        let held = a.leases_in(&rail.network, *theirs).find(|l| &l.holder.container_id == cid);
        if let Some(l) = held {
            let host = rail.cut.host_index(l.address);
            return match cut.at(block, host) {
                Some(ip) if a.is_free(&req.network, spec, ip, now) => Ok(Some(ip)),
                Some(ip) => Err(format!(
                    "host index {host} ({ip}) is not free in block {block}, though the sandbox holds {} in network {:?}",
                    l.address, rail.network
                )),
                None => Err(format!("host index {host} is outside block {block}")),
            };
        }
    }
    for host in 0..cut.size().min(ALIGN_TRIES) {
        let Some(ip) = cut.at(block, host) else { break };
        if !a.is_free(&req.network, spec, ip, now) {
            continue;
        }
        let free_on_every_rail = rails.iter().all(|r| match &r.block {
            None => true,
            Some((theirs, spec)) => {
                r.cut.at(*theirs, host).is_some_and(|ip| a.is_free(&r.network, spec, ip, now))
            }
        });
        if free_on_every_rail {
            return Ok(Some(ip));
        }
    }
    Ok(None)
}

/// `mine`'s block, unless another node holds it (it held it before the pool gave it by
/// hand): then an error naming both.
fn static_block_of(
    a: &Allocator,
    network: &str,
    cut: &BlockCut,
    mine: &StaticBlock,
) -> Result<Block, AllocError> {
    let holder = a
        .node_blocks(network, cut)
        .into_iter()
        .find(|(b, node, _)| *b == mine.block && *node != mine.node)
        .map(|(_, node, _)| node);
    match holder {
        None => Ok(mine.block),
        Some(other) => Err(AllocError::Invalid {
            field: "spec.staticAllocations".into(),
            value: format!("{} {}", mine.node, mine.block),
            reason: format!(
                "gives the block to node {:?}, but node {other:?} holds it; free it there first",
                mine.node
            ),
        }),
    }
}

/// Allocates for `req` (whose network is `pool`'s, a per-node pool) from its node's block
/// of each of the pool's ranges: the block assigned to the node, else a new one (the
/// block index the node has on the other rails of `rails` when free, else the lowest
/// free), recorded as the node's in the same write as the address. Within the block, a
/// pod on several rails of one group gets the same host index on each when that address
/// is free (see [`aligned_address`]); when it is not, the lowest free address (logged).
/// An exhausted block is named with the node's and the pool's counts. Runs on the engine
/// thread, so choosing a block and holding an address in it are one step.
///
/// A pod back on another node (same name and interface, a new sandbox) gets an address
/// of the new node's block; the address it held in the old node's block is released once
/// the new one is held.
pub fn allocate_in_blocks(
    a: &mut Allocator,
    req: &AllocateRequest,
    pool: &Pool,
    rails: &[Arc<Pool>],
    now_unix_ms: i64,
) -> Result<Leases, AllocError> {
    let Some(per_node) = pool.per_node else { return a.allocate(req, now_unix_ms) };
    let node = &req.attachment.node;
    // Asked-for addresses (static IPs) and what the pod holds already come first.
    let aligning = !rails.is_empty() && req.requested.is_empty() && !a.holds(&req.network, &req.attachment);
    let mut blocks = Vec::with_capacity(pool.ranges.len());
    let mut ranges = Vec::with_capacity(pool.ranges.len());
    let mut requested = req.requested.clone();
    for (i, r) in pool.ranges.iter().enumerate() {
        let cut = per_node.cut_of(r)?;
        let rails: Vec<Rail> = match aligning {
            true => rails.iter().filter_map(|s| Rail::of(a, s, r.network().is_ipv4(), node)).collect(),
            false => Vec::new(),
        };
        let prefer = rails.iter().find_map(|rail| rail.block.as_ref().map(|(b, _)| rail.cut.index(b.first)));
        let statics = pool.statics.iter().filter(|s| s.range == i);
        let block = match statics.clone().find(|s| s.node == *node) {
            Some(mine) => static_block_of(a, &req.network, &cut, mine)?,
            None => {
                let reserved = statics.map(|s| cut.index(s.block.first)).collect();
                a.node_block_avoiding(&req.network, &cut, node, prefer, &reserved)?.0
            }
        };
        let spec = pool.block_spec(per_node, block, i)?;
        if aligning {
            match aligned_address(a, req, &cut, block, &spec, &rails, now_unix_ms) {
                Ok(Some(ip)) => requested.push(ip),
                Ok(None) => {}
                Err(why) => {
                    a.count_unaligned(&pool.name);
                    warn!(pool = %pool.name, rail_group = %pool.rail_group, node = %node,
                          container_id = %req.attachment.container_id, ifname = %req.attachment.ifname,
                          reason = %why, "cannot align this rail with the pod's others; taking the lowest free address");
                }
            }
        }
        blocks.push(block);
        ranges.push(spec);
    }
    let in_blocks = AllocateRequest { ranges, requested, ..req.clone() };
    let got = a.allocate(&in_blocks, now_unix_ms);
    if got.is_ok() {
        for block in &blocks {
            a.assign_block(&req.network, *block, node, now_unix_ms);
        }
        let held = a.check(&req.network, &req.attachment.container_id, &req.attachment.ifname);
        for l in held.iter().filter(|l| !in_blocks.ranges.iter().any(|b| b.allows(l.address))) {
            // It is held (just checked), so this cannot fail.
            let _ = a.release_address(&req.network, l.address, now_unix_ms);
        }
    }
    got.map_err(|e| match e {
        AllocError::Exhausted { range, size, held, excluded } => {
            let usage = a.usage_of(&req.network, &pool.ranges);
            AllocError::BlockExhausted(Box::new(BlockFull {
                network: req.network.to_string(),
                node: node.clone(),
                block: range,
                size,
                held,
                excluded,
                pool_size: usage.size,
                pool_held: usage.used,
            }))
        }
        e => e,
    })
}

/// One per-node block's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStats {
    pub block: String,
    pub node: String,
    /// Addresses held in it.
    pub used: u128,
    /// Addresses it can still hand out (not held, excluded or its gateway).
    pub free: u128,
    /// Addresses it hands out at all (held or free).
    pub size: u128,
    /// Released addresses in it whose cooldown has not passed.
    pub cooldown_holds: usize,
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
    /// Allocations that could not take the pod's host index of its other rails.
    pub unaligned: u64,
    /// Why the pool is not used; `None`: it is.
    pub error: Option<String>,
    /// Per-node pools: the blocks recorded or holding addresses, lowest first.
    pub blocks: Vec<BlockStats>,
}

/// The addresses at the end of `r` that no block of `n` addresses holds, less those
/// excluded anyway (a rest of more than 65536 addresses counts whole).
fn rest_reserved(r: &RangeSpec, n: u32) -> u128 {
    let rest = r.size() % u128::from(n);
    if rest > 1 << 16 {
        return rest;
    }
    (r.size() - rest..r.size()).filter(|o| r.allows(r.addr(*o))).count() as u128
}

/// Size and use of `pool`: per-node subnets count their network, last and gateway
/// addresses as excluded (they are never handed out), runs of addresses the rest of a
/// range no run holds.
fn totals(alloc: &Allocator, pool: &Pool) -> PoolTotals {
    let mut t = alloc.usage_of(&pool.name, &pool.ranges);
    if let Some(pn) = pool.per_node {
        let reserved = pool
            .ranges
            .iter()
            .map(|r| match pn.cut {
                Cut::Prefix(p) => r.block_reserved(p, pn.gateway_index),
                Cut::Size(n) => rest_reserved(r, n),
            })
            .fold(0u128, u128::saturating_add);
        t.excluded = t.excluded.saturating_add(reserved);
        t.free = t.free.saturating_sub(reserved);
        if let Cut::Prefix(p) = pn.cut {
            for r in &pool.ranges {
                add_point_to_point_edges(alloc, &pool.name, r, p, pn.gateway_index, &mut t);
            }
        }
    }
    t
}

/// Counts the range's own network and last address into `t` when its blocks are /31s or
/// /32s (/127s, /128s): the range leaves them out, but they are a block's hosts there.
fn add_point_to_point_edges(
    alloc: &Allocator,
    network: &str,
    r: &RangeSpec,
    prefix: u8,
    gateway_index: Option<u32>,
    t: &mut PoolTotals,
) {
    let net = r.network();
    let Ok(cut) = BlockCut::by_prefix(net, prefix) else { return };
    // A /31 or /32 range counts every address of its own already.
    let bits: u8 = if net.is_ipv4() { 32 } else { 128 };
    if cut.size() > 2 || net.prefix() + 1 >= bits {
        return;
    }
    for edge in [net.network(), net.broadcast()] {
        t.size = t.size.saturating_add(1);
        if alloc.get(network, edge).is_ok() {
            t.used = t.used.saturating_add(1);
        } else if gateway_index.is_some_and(|gi| cut.host_index(edge) == u128::from(gi)) {
            t.excluded = t.excluded.saturating_add(1);
        } else {
            t.free = t.free.saturating_add(1);
        }
    }
}

/// The blocks of `pool` (cut as `pn` says) that are recorded or hold addresses.
fn block_stats(alloc: &Allocator, pool: &Pool, pn: PerNode, now_unix_ms: i64) -> Vec<BlockStats> {
    let mut out = Vec::new();
    for (i, r) in pool.ranges.iter().enumerate() {
        let Ok(cut) = pn.cut_of(r) else { continue };
        for (block, node, used) in alloc.node_blocks(&pool.name, &cut) {
            let size = pool.block_spec(pn, block, i).map_or(0, |b| b.size() - b.excluded_count());
            out.push(BlockStats {
                block: block.to_string(),
                node,
                used,
                free: size.saturating_sub(used),
                size,
                cooldown_holds: alloc.cooldown_holds_in(&pool.name, block, now_unix_ms),
            });
        }
    }
    out
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
                totals: totals(alloc, pool),
                cooldown_holds: alloc.cooldown_holds(name, now_unix_ms),
                unaligned: alloc.unaligned(name),
                error: None,
                blocks: pool.per_node.map_or_else(Vec::new, |pn| block_stats(alloc, pool, pn, now_unix_ms)),
            },
            Err(e) => PoolStats {
                name: name.clone(),
                ranges: String::new(),
                totals: PoolTotals::default(),
                cooldown_holds: 0,
                unaligned: 0,
                error: Some(e.to_string()),
                blocks: Vec::new(),
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::crd::PoolRange;

    fn spec(ranges: Vec<PoolRange>) -> IPPoolSpec {
        IPPoolSpec { ranges, ..IPPoolSpec::default() }
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
            ..IPPoolSpec::default()
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
            with(&|s| s.cooldown = "999999999999999999m".into()),
            r#"pool "rail0" is invalid: spec.cooldown "999999999999999999m" is not a duration like 30s, 500ms or 5m"#
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

    #[test]
    fn per_node_blocks_are_checked_and_a_block_gets_its_gateway() {
        let per_node = |prefix: u8, gw: Option<u32>, r: PoolRange| IPPoolSpec {
            ranges: vec![r],
            per_node_prefix: Some(prefix),
            gateway_index: gw,
            ..IPPoolSpec::default()
        };
        let p = check("rail0", &per_node(28, Some(1), range("198.18.0.0/24"))).expect("valid");
        let pn = p.per_node.expect("per node");
        let block = pn.block_range("198.18.0.16/28".parse().expect("cidr"), &p.ranges[0]).expect("block");
        assert_eq!(
            (block.display(), block.gateway()),
            ("198.18.0.16/28", Some("198.18.0.17".parse().expect("ip")))
        );
        // 14 usable addresses less the gateway.
        assert_eq!(block.size() - block.excluded_count(), 13);
        assert_eq!(
            err(&per_node(24, None, range("198.18.0.0/24"))),
            r#"pool "rail0" is invalid: spec.perNodePrefix "24" does not cut spec.ranges[0].range 198.18.0.0/24 into blocks (it must be longer than /24 and at most /32)"#
        );
        assert_eq!(
            err(&per_node(30, Some(3), range("198.18.0.0/24"))),
            r#"pool "rail0" is invalid: spec.gatewayIndex "3" is not a usable address of a /30 block (1 to 2)"#
        );
        assert_eq!(
            err(&per_node(32, Some(1), range("198.18.0.0/24"))),
            r#"pool "rail0" is invalid: spec.perNodePrefix "32" leaves no address of a block to hand out once its gateway is taken"#
        );
        assert_eq!(
            err(&per_node(28, None, PoolRange { gateway: "198.18.0.1".into(), ..range("198.18.0.0/24") })),
            r#"pool "rail0" is invalid: spec.ranges[0].gateway "198.18.0.1" is not taken with perNodePrefix (blocks are whole; a block's gateway is gatewayIndex)"#
        );
        let mut no_prefix = spec(vec![range("198.18.0.0/24")]);
        no_prefix.gateway_index = Some(1);
        assert_eq!(err(&no_prefix), r#"pool "rail0" is invalid: spec.gatewayIndex "1" needs perNodePrefix"#);
    }

    /// Pool rail0: a /27 cut into /29 blocks, each block's gateway at index 1.
    fn rail_pool() -> Pool {
        let spec = IPPoolSpec {
            ranges: vec![range("198.18.0.0/27")],
            per_node_prefix: Some(29),
            gateway_index: Some(1),
            ..IPPoolSpec::default()
        };
        check("rail0", &spec).expect("valid")
    }

    /// An Allocate in rail0 for `cid`'s net1 on `node`, of pod ml/train-0 when `pod` is set.
    fn block_request(node: &str, cid: &str, pod: bool) -> AllocateRequest {
        let pod = match pod {
            true => {
                crate::allocator::PodRef { namespace: "ml".into(), name: "train-0".into(), uid: cid.into() }
            }
            false => crate::allocator::PodRef::default(),
        };
        AllocateRequest {
            attachment: Arc::new(crate::allocator::Attachment {
                container_id: cid.into(),
                ifname: "net1".into(),
                pod,
                node: node.into(),
                ..Default::default()
            }),
            network: "rail0".into(),
            ranges: Vec::new(),
            requested: Vec::new(),
        }
    }

    #[test]
    fn each_node_allocates_from_its_own_block() {
        let pool = rail_pool();
        let mut a = Allocator::new();
        let take = |a: &mut Allocator, node: &str, cid: &str| {
            allocate_in_blocks(a, &block_request(node, cid, false), &pool, &[], 1)
                .map(|l| (l[0].address.to_string(), l[0].prefix_len, l[0].gateway.map(|g| g.to_string())))
                .map_err(|e| e.to_string())
        };
        // A /29 block: .1 is the gateway, .2 to .6 go to pods.
        assert_eq!(take(&mut a, "n1", "a1"), Ok(("198.18.0.2".into(), 29, Some("198.18.0.1".into()))));
        assert_eq!(take(&mut a, "n2", "b1"), Ok(("198.18.0.10".into(), 29, Some("198.18.0.9".into()))));
        assert_eq!(take(&mut a, "n1", "a2"), Ok(("198.18.0.3".into(), 29, Some("198.18.0.1".into()))));
        for cid in ["a3", "a4", "a5"] {
            take(&mut a, "n1", cid).expect("room in n1's block");
        }
        assert_eq!(
            take(&mut a, "n1", "a6"),
            Err(r#"block 198.18.0.0/29 of node "n1" in network "rail0" is exhausted: size 6, held 5, excluded 1 (the whole pool: size 30, held 6)"#.into())
        );
        take(&mut a, "n3", "c1").expect("third block");
        take(&mut a, "n4", "d1").expect("fourth block");
        assert_eq!(
            take(&mut a, "n5", "e1"),
            Err(r#"no free /29 block for node "n5" in 198.18.0.0/27 (network "rail0"): all 4 blocks are other nodes'"#.into())
        );
    }

    #[test]
    fn a_per_node_pool_counts_each_blocks_reserved_addresses_as_excluded() {
        let with = |exclude: Vec<String>| IPPoolSpec {
            ranges: vec![PoolRange { exclude, ..range("198.18.0.0/27") }],
            per_node_prefix: Some(29),
            gateway_index: Some(1),
            ..IPPoolSpec::default()
        };
        let set = PoolSet::from_specs([("a", &with(vec![])), ("b", &with(vec!["198.18.0.8/30".into()]))]);
        let got = stats(&Allocator::new(), &set, 0);
        // Four /29 blocks of 5 addresses each; the range's own first and last are not in size.
        assert_eq!(got[0].totals, PoolTotals { size: 30, used: 0, excluded: 10, free: 20 });
        // .8 and .9 were excluded anyway; .10 and .11 are lost to pods.
        assert_eq!(got[1].totals, PoolTotals { size: 30, used: 0, excluded: 12, free: 18 });
        let v6 = IPPoolSpec {
            ranges: vec![range("fd00::/64")],
            per_node_prefix: Some(120),
            gateway_index: Some(1),
            ..IPPoolSpec::default()
        };
        let set = PoolSet::from_specs([("v6", &v6)]);
        let t = stats(&Allocator::new(), &set, 0)[0].totals;
        // 2^56 blocks of 253 addresses.
        assert_eq!(t.size - t.excluded, (1u128 << 56) * 253);
    }

    #[test]
    fn a_pod_back_on_another_node_moves_to_that_nodes_block() {
        let pool = rail_pool();
        let mut a = Allocator::new();
        let take = |a: &mut Allocator, node: &str, cid: &str| {
            allocate_in_blocks(a, &block_request(node, cid, true), &pool, &[], 1)
                .map(|l| l[0].address.to_string())
                .expect("allocate")
        };
        assert_eq!(take(&mut a, "n1", "sandbox-1"), "198.18.0.2");
        // The same pod, recreated on n2: n2's block, and nothing left in n1's.
        assert_eq!(take(&mut a, "n2", "sandbox-2"), "198.18.0.10");
        let held: Vec<String> =
            a.check("rail0", "sandbox-2", "net1").iter().map(|l| l.address.to_string()).collect();
        assert_eq!(held, ["198.18.0.10"]);
        // One address, and the two nodes' block markers.
        assert_eq!(a.lease_count(), 3);
        // n1's block stays n1's, though it holds nothing now.
        let within = pool.ranges[0].network();
        assert_eq!(
            a.node_block("rail0", &BlockCut::by_prefix(within, 29).expect("cut"), "n3", None)
                .map(|(b, _)| b.to_string()),
            Ok("198.18.0.16/29".into())
        );
        // Back on the same node in a new sandbox: the same address, moved to it.
        assert_eq!(take(&mut a, "n2", "sandbox-3"), "198.18.0.10");
        assert_eq!(a.lease_count(), 3);
    }

    /// Rail `name` of rail group "spectrum": `cidr` cut into /29 blocks, gateway at index 1.
    fn rail(name: &str, cidr: &str) -> Arc<Pool> {
        let spec = IPPoolSpec {
            ranges: vec![range(cidr)],
            per_node_prefix: Some(29),
            gateway_index: Some(1),
            rail_group: "spectrum".into(),
            ..IPPoolSpec::default()
        };
        Arc::new(check(name, &spec).expect("valid"))
    }

    #[test]
    fn a_pod_gets_the_same_host_index_and_a_node_the_same_block_on_every_rail() {
        let rails = [rail("rail0", "198.18.0.0/27"), rail("rail1", "198.18.1.0/27")];
        let mut set = PoolSet::default();
        for r in &rails {
            set.pools.insert(r.name.clone(), Ok(r.clone()));
        }
        let mut a = Allocator::new();
        let take = |a: &mut Allocator, rail: usize, node: &str, cid: &str| {
            let pool = &rails[rail];
            let mut req = block_request(node, cid, false);
            req.network = pool.name.as_str().into();
            allocate_in_blocks(a, &req, pool, &rail_siblings(&set, pool), 1).map(|l| l[0].address.to_string())
        };
        // Pod a on rail0 first: host index 2 (1 is the gateway).
        assert_eq!(take(&mut a, 0, "n1", "a"), Ok("198.18.0.2".into()));
        // Pod b starts on rail1: index 2 is free there but taken on rail0, so 3.
        assert_eq!(take(&mut a, 1, "n1", "b"), Ok("198.18.1.3".into()));
        assert_eq!(take(&mut a, 1, "n1", "a"), Ok("198.18.1.2".into()));
        assert_eq!(take(&mut a, 0, "n1", "b"), Ok("198.18.0.3".into()));
        // A node new on rail1 takes the block index it has on rail0 (the third), not the
        // lowest free one (the second).
        a.assign_block("rail0", "198.18.0.16/29".parse().expect("block"), "n2", 1);
        assert_eq!(take(&mut a, 1, "n2", "c"), Ok("198.18.1.18".into()));
        assert_eq!(take(&mut a, 0, "n2", "c"), Ok("198.18.0.18".into()));
        // The index pod d holds on rail0 is reserved on rail1: the lowest free address there,
        // counted.
        assert_eq!(take(&mut a, 0, "n1", "d"), Ok("198.18.0.4".into()));
        a.reserve("rail1", "198.18.1.4".parse().expect("ip"), "router", 1).expect("reserve");
        assert_eq!(take(&mut a, 1, "n1", "d"), Ok("198.18.1.5".into()));
        assert_eq!((a.unaligned("rail1"), a.unaligned("rail0")), (1, 0));
        // Asking again changes nothing: the pod holds its address.
        assert_eq!(take(&mut a, 1, "n1", "d"), Ok("198.18.1.5".into()));
        assert_eq!(a.unaligned("rail1"), 1);
    }

    #[test]
    fn a_rail_group_needs_per_node_blocks() {
        let s = IPPoolSpec { rail_group: "spectrum".into(), ..spec(vec![range("198.18.0.0/24")]) };
        assert_eq!(
            err(&s),
            r#"pool "rail0" is invalid: spec.railGroup "spectrum" needs perNodePrefix or perNodeBlockSize (rails are aligned by their per-node blocks)"#
        );
    }

    #[test]
    fn runs_of_addresses_per_node_share_the_ranges_prefix_and_gateway() {
        let sized = |n: u32| IPPoolSpec {
            ranges: vec![PoolRange { gateway: "198.18.0.1".into(), ..range("198.18.0.0/24") }],
            per_node_block_size: Some(n),
            ..IPPoolSpec::default()
        };
        let pool = check("rail0", &sized(8)).expect("valid");
        assert_eq!(pool.per_node, Some(PerNode { cut: Cut::Size(8), gateway_index: None }));
        let mut a = Allocator::new();
        let take = |a: &mut Allocator, node: &str, cid: &str| {
            allocate_in_blocks(a, &block_request(node, cid, false), &pool, &[], 1)
                .map(|l| (l[0].address.to_string(), l[0].prefix_len, l[0].gateway.map(|g| g.to_string())))
                .map_err(|e| e.to_string())
        };
        // n1 has .1 to .8, whose .1 is the range's gateway; n2 has .9 to .16.
        assert_eq!(take(&mut a, "n1", "a"), Ok(("198.18.0.2".into(), 24, Some("198.18.0.1".into()))));
        assert_eq!(take(&mut a, "n2", "b"), Ok(("198.18.0.9".into(), 24, Some("198.18.0.1".into()))));
        for cid in ["a2", "a3", "a4", "a5", "a6", "a7"] {
            take(&mut a, "n1", cid).expect("room in n1's run");
        }
        assert_eq!(
            take(&mut a, "n1", "a8"),
            Err(r#"block 198.18.0.1-198.18.0.8/24 of node "n1" in network "rail0" is exhausted: size 8, held 7, excluded 1 (the whole pool: size 254, held 8)"#.into())
        );
        // 31 runs of 8; the last 6 addresses are in none.
        let t = stats(&a, &PoolSet::from_specs([("rail0", &sized(8))]), 0)[0].totals;
        assert_eq!((t.size, t.excluded), (254, 1 + 6));
        let blocks = stats(&a, &PoolSet::from_specs([("rail0", &sized(8))]), 0)[0].blocks.clone();
        let brief: Vec<(&str, &str, u128, u128)> =
            blocks.iter().map(|b| (b.block.as_str(), b.node.as_str(), b.used, b.free)).collect();
        assert_eq!(brief, [("198.18.0.1-198.18.0.8", "n1", 7, 0), ("198.18.0.9-198.18.0.16", "n2", 1, 7)]);
        assert_eq!(
            err(&sized(255)),
            r#"pool "rail0" is invalid: spec.perNodeBlockSize "255" is not between 1 and the size of spec.ranges[0] 198.18.0.0/24 (254)"#
        );
        let both = IPPoolSpec { per_node_prefix: Some(28), ..sized(8) };
        assert_eq!(
            err(&both),
            r#"pool "rail0" is invalid: spec.perNodeBlockSize "8" is not taken with perNodePrefix (a block is one or the other)"#
        );
        let gi = IPPoolSpec { gateway_index: Some(1), ..sized(8) };
        assert_eq!(
            err(&gi),
            r#"pool "rail0" is invalid: spec.gatewayIndex "1" needs perNodePrefix (blocks of perNodeBlockSize share their range's gateway)"#
        );
    }

    #[test]
    fn a_point_to_point_block_per_node_gives_the_pod_the_address_beside_its_gateway() {
        // A /31 per node, its gateway the second address.
        let v4 = IPPoolSpec {
            ranges: vec![range("198.18.0.0/29")],
            per_node_prefix: Some(31),
            gateway_index: Some(1),
            ..IPPoolSpec::default()
        };
        let pool = check("rail0", &v4).expect("valid");
        let mut a = Allocator::new();
        let take = |a: &mut Allocator, node: &str, cid: &str| {
            allocate_in_blocks(a, &block_request(node, cid, false), &pool, &[], 1)
                .map(|l| (l[0].address.to_string(), l[0].prefix_len, l[0].gateway.map(|g| g.to_string())))
                .map_err(|e| e.to_string())
        };
        assert_eq!(take(&mut a, "n1", "a"), Ok(("198.18.0.0".into(), 31, Some("198.18.0.1".into()))));
        assert_eq!(take(&mut a, "n2", "b"), Ok(("198.18.0.2".into(), 31, Some("198.18.0.3".into()))));
        assert!(take(&mut a, "n1", "a2").expect_err("one address per node").contains("is exhausted"));
        // Four /31s of one address each for pods: all eight addresses count, the /29's
        // network and last too.
        let t = stats(&a, &PoolSet::from_specs([("rail0", &v4)]), 0)[0].totals;
        assert_eq!((t.size, t.excluded, t.used, t.free), (8, 4, 2, 2));
        assert_eq!(
            err(&IPPoolSpec { gateway_index: Some(2), ..v4 }),
            r#"pool "rail0" is invalid: spec.gatewayIndex "2" is not a usable address of a /31 block (0 to 1)"#
        );
    }

    #[test]
    fn a_static_block_is_its_nodes_alone_with_its_own_gateway() {
        let with = |statics: Vec<(&str, &str, &str)>| IPPoolSpec {
            ranges: vec![range("198.18.0.0/27")],
            per_node_prefix: Some(29),
            gateway_index: Some(1),
            static_allocations: statics
                .into_iter()
                .map(|(node, prefix, gateway)| crate::k8s::crd::StaticAllocation {
                    node_name: node.into(),
                    prefix: prefix.into(),
                    gateway: gateway.into(),
                })
                .collect(),
            ..IPPoolSpec::default()
        };
        let pool = check("rail0", &with(vec![("n9", "198.18.0.0/29", "198.18.0.6")])).expect("valid");
        let mut a = Allocator::new();
        let take = |a: &mut Allocator, node: &str, cid: &str| {
            allocate_in_blocks(a, &block_request(node, cid, false), &pool, &[], 1)
                .map(|l| (l[0].address.to_string(), l[0].gateway.map(|g| g.to_string())))
                .map_err(|e| e.to_string())
        };
        // n1 skips the first block, n9's by hand; n9 gets it with its own gateway.
        assert_eq!(take(&mut a, "n1", "a"), Ok(("198.18.0.10".into(), Some("198.18.0.9".into()))));
        assert_eq!(take(&mut a, "n9", "z"), Ok(("198.18.0.1".into(), Some("198.18.0.6".into()))));
        // A block another node held before it was given by hand stays that node's: refused.
        let late = check("rail0", &with(vec![("n9", "198.18.0.8/29", "")])).expect("valid");
        assert_eq!(
            allocate_in_blocks(&mut a, &block_request("n9", "z2", false), &late, &[], 1).map_err(|e| e.to_string()),
            Err(r#"spec.staticAllocations "n9 198.18.0.8/29" gives the block to node "n9", but node "n1" holds it; free it there first"#.into())
        );
        let bad = |statics| err(&with(statics));
        assert_eq!(
            bad(vec![("n1", "198.18.0.4/29", "")]),
            r#"pool "rail0" is invalid: spec.staticAllocations[0].prefix "198.18.0.4/29" is not a block of the pool: a /29 starting at its first address"#
        );
        assert_eq!(
            bad(vec![("n1", "198.18.9.0/29", "")]),
            r#"pool "rail0" is invalid: spec.staticAllocations[0].prefix "198.18.9.0/29" is in none of spec.ranges"#
        );
        assert_eq!(
            bad(vec![("n1", "198.18.0.0/29", ""), ("n2", "198.18.0.0/29", "")]),
            r#"pool "rail0" is invalid: spec.staticAllocations[1].prefix "198.18.0.0/29" is given to node "n1" already"#
        );
        assert_eq!(
            bad(vec![("n1", "198.18.0.0/29", "198.18.0.9")]),
            r#"pool "rail0" is invalid: spec.staticAllocations[0].gateway "198.18.0.9" is outside the block 198.18.0.0/29"#
        );
    }

    #[test]
    fn per_node_counts_take_each_blocks_size_and_cooldown_holds() {
        let spec = IPPoolSpec {
            ranges: vec![range("198.18.0.0/27")],
            per_node_prefix: Some(29),
            gateway_index: Some(1),
            cooldown: "30s".into(),
            ..IPPoolSpec::default()
        };
        let pool = check("rail0", &spec).expect("valid");
        let mut a = Allocator::new();
        a.set_cooldown("rail0", pool.cooldown_ms());
        for cid in ["a", "b"] {
            allocate_in_blocks(&mut a, &block_request("n1", cid, false), &pool, &[], 1).expect("allocate");
        }
        a.release("rail0", "a", "net1", 1_000);
        let set = PoolSet::from_specs([("rail0", &spec)]);
        let counts = |now| {
            let b = &stats(&a, &set, now)[0].blocks[0];
            (b.node.clone(), b.size, b.used, b.free, b.cooldown_holds)
        };
        // A /29 hands out five addresses (less its network, last and gateway).
        assert_eq!(counts(2_000), ("n1".to_string(), 5, 1, 4, 1));
        assert_eq!(counts(31_000), ("n1".to_string(), 5, 1, 4, 0));
    }
}
