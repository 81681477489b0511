//! The allocator core: pure state, no I/O, no async.
//!
//! Addresses are unique per network across every range of that network. Each range (pool)
//! keeps a [`SparseBitmap`] of the held addresses it contains, so overlapping ranges see
//! each other. Every change is also recorded in a journal that the caller drains and
//! persists; the caller answers only after that commit.

pub mod bitmap;
pub mod range;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use bitmap::SparseBitmap;
pub use range::{Family, FieldPrefix, RangeInput, RangeSpec, parse_address};

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
    /// Nothing matched.
    #[error("{0}")]
    NotFound(String),
}

/// The pod an attachment belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
}

/// One interface of one sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    pub pod: PodRef,
    pub node: String,
}

/// A held address and who holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub address: IpAddr,
    pub network: String,
    /// Short form of the range it came from ("" for a manual reservation outside any range).
    pub range: String,
    /// Prefix length of that range (the host length outside any range).
    pub prefix_len: u8,
    /// Gateway of that range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Empty for a manual reservation.
    pub container_id: String,
    pub ifname: String,
    pub pod: PodRef,
    pub node: String,
    pub created_unix_ms: i64,
    /// Reason of a manual reservation.
    #[serde(default)]
    pub note: String,
}

impl Lease {
    /// Whether an operator reserved it by hand.
    pub fn is_manual(&self) -> bool {
        self.container_id.is_empty()
    }

    fn holder(&self) -> String {
        if self.is_manual() {
            format!("a manual reservation ({})", self.note)
        } else if self.pod.name.is_empty() {
            format!("container {} interface {}", self.container_id, self.ifname)
        } else {
            format!(
                "pod {}/{} (container {} interface {})",
                self.pod.namespace, self.pod.name, self.container_id, self.ifname
            )
        }
    }
}

/// What a request asks for, already validated.
#[derive(Debug, Clone)]
pub struct AllocateRequest {
    pub attachment: Attachment,
    pub network: String,
    pub ranges: Vec<RangeSpec>,
    /// Specific addresses wanted; each must fall in one of `ranges`.
    pub requested: Vec<IpAddr>,
}

/// A change to persist, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    PutLease(Lease),
    DeleteLease { network: String, address: IpAddr },
    PutPool { network: String, range: RangeInput },
}

/// Size and use of one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUsage {
    pub network: String,
    pub range: RangeInput,
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
        eq(&self.pod_namespace, &l.pod.namespace)
            && eq(&self.pod_name, &l.pod.name)
            && eq(&self.node, &l.node)
            && eq(&self.range, &l.range)
            && eq(&self.container_id, &l.container_id)
    }
}

#[derive(Debug)]
struct Pool {
    spec: RangeSpec,
    held: SparseBitmap,
}

impl Pool {
    fn new(spec: RangeSpec) -> Pool {
        let held = SparseBitmap::new(spec.size());
        Pool { spec, held }
    }

    /// Marks `ip` held if it is in the range and not excluded (excluded addresses are never
    /// handed out, so they need no bit).
    fn mark(&mut self, ip: IpAddr, held: bool) {
        if let Some(off) = self.spec.offset(ip).filter(|o| self.spec.exclusion_at(*o).is_none()) {
            if held {
                self.held.insert(off);
            } else {
                self.held.remove(off);
            }
        }
    }

    /// Lowest address that is neither held nor excluded.
    fn first_free(&self) -> Option<IpAddr> {
        let mut from = 0;
        loop {
            let off = self.held.first_zero_from(from)?;
            match self.spec.exclusion_at(off) {
                Some((_, hi)) => from = hi.checked_add(1)?,
                None => return Some(self.spec.addr(off)),
            }
        }
    }

    fn usage(&self, network: &str) -> PoolUsage {
        let (size, used, excluded) = (self.spec.size(), self.held.count(), self.spec.excluded_count());
        PoolUsage {
            network: network.to_string(),
            range: self.spec.input().clone(),
            size,
            used,
            excluded,
            free: size - used - excluded,
        }
    }
}

type AttachKey = (String, String);
type PodKey = (String, String, String);

#[derive(Debug, Default)]
struct Network {
    pools: BTreeMap<String, Pool>,
    leases: HashMap<IpAddr, Lease>,
    by_attachment: HashMap<AttachKey, Vec<IpAddr>>,
    by_pod: HashMap<PodKey, Vec<IpAddr>>,
}

fn attach_key(container_id: &str, ifname: &str) -> AttachKey {
    (container_id.to_string(), ifname.to_string())
}

fn pod_key(l: &Lease) -> Option<PodKey> {
    (!l.pod.name.is_empty()).then(|| (l.pod.namespace.clone(), l.pod.name.clone(), l.ifname.clone()))
}

fn unindex<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Vec<IpAddr>>, key: K, ip: IpAddr) {
    if let Some(v) = map.get_mut(&key) {
        v.retain(|a| *a != ip);
        if v.is_empty() {
            map.remove(&key);
        }
    }
}

impl Network {
    fn insert(&mut self, lease: Lease) {
        let ip = lease.address;
        for pool in self.pools.values_mut() {
            pool.mark(ip, true);
        }
        if !lease.is_manual() {
            self.by_attachment.entry(attach_key(&lease.container_id, &lease.ifname)).or_default().push(ip);
            if let Some(k) = pod_key(&lease) {
                self.by_pod.entry(k).or_default().push(ip);
            }
        }
        self.leases.insert(ip, lease);
    }

    fn remove(&mut self, ip: IpAddr) -> Option<Lease> {
        let lease = self.leases.remove(&ip)?;
        for pool in self.pools.values_mut() {
            pool.mark(ip, false);
        }
        if !lease.is_manual() {
            unindex(&mut self.by_attachment, attach_key(&lease.container_id, &lease.ifname), ip);
            if let Some(k) = pod_key(&lease) {
                unindex(&mut self.by_pod, k, ip);
            }
        }
        Some(lease)
    }

    /// Returns the pool's key; creates the pool (and marks what the network holds in it)
    /// when it is new.
    fn ensure_pool(&mut self, spec: &RangeSpec) -> (String, bool) {
        let key = spec.key();
        if self.pools.contains_key(&key) {
            return (key, false);
        }
        let mut pool = Pool::new(spec.clone());
        for ip in self.leases.keys() {
            pool.mark(*ip, true);
        }
        self.pools.insert(key.clone(), pool);
        (key, true)
    }

    fn take(&self, key: &AttachKey) -> Vec<IpAddr> {
        self.by_attachment.get(key).cloned().unwrap_or_default()
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
        for lease in leases {
            let net = a.networks.entry(lease.network.clone()).or_default();
            if let Some(old) = net.leases.get(&lease.address) {
                problems.push(LoadProblem {
                    what: format!("lease {} in network \"{}\"", lease.address, lease.network),
                    error: format!("address already held by {}", old.holder()),
                });
                continue;
            }
            net.insert(lease);
            a.lease_count += 1;
        }
        for (network, input) in pools {
            match RangeSpec::parse(&input, FieldPrefix("")) {
                Ok(spec) => {
                    a.networks.entry(network).or_default().ensure_pool(&spec);
                }
                Err(e) => problems.push(LoadProblem {
                    what: format!("pool {:?} in network \"{network}\"", input.range),
                    error: e.to_string(),
                }),
            }
        }
        (a, problems)
    }

    /// Takes the changes made since the last call, to persist them.
    pub fn take_journal(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.journal)
    }

    /// Number of held addresses across all networks.
    pub fn lease_count(&self) -> usize {
        self.lease_count
    }

    /// Number of pools across all networks.
    pub fn pool_count(&self) -> usize {
        self.networks.values().map(|n| n.pools.len()).sum()
    }

    fn put(&mut self, network: &str, lease: Lease) {
        self.journal.push(Change::PutLease(lease.clone()));
        self.networks.entry(network.to_string()).or_default().insert(lease);
        self.lease_count += 1;
    }

    fn delete(&mut self, network: &str, ip: IpAddr) -> Option<Lease> {
        let lease = self.networks.get_mut(network)?.remove(ip)?;
        self.lease_count -= 1;
        self.journal.push(Change::DeleteLease { network: network.to_string(), address: ip });
        Some(lease)
    }

    /// Gives the attachment one address from each range: what it (or its pod, under the
    /// same interface name) already holds there, else the requested address, else the
    /// lowest free one. All or nothing.
    pub fn allocate(&mut self, req: &AllocateRequest, now_unix_ms: i64) -> Result<Vec<Lease>, AllocError> {
        let network = req.network.as_str();
        let a = &req.attachment;
        let Allocator { networks, journal, lease_count } = self;
        let net = networks.entry(network.to_string()).or_default();

        // Which range each requested address belongs to.
        let mut wanted: Vec<Option<IpAddr>> = vec![None; req.ranges.len()];
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

        let mut pool_keys = Vec::with_capacity(req.ranges.len());
        for spec in &req.ranges {
            let (key, created) = net.ensure_pool(spec);
            if created {
                journal.push(Change::PutPool { network: network.to_string(), range: spec.input().clone() });
            }
            pool_keys.push(key);
        }

        let mut existing = net.take(&attach_key(&a.container_id, &a.ifname));
        let mut moved_from_pod = false;
        if existing.is_empty() && !a.pod.name.is_empty() {
            let key = (a.pod.namespace.clone(), a.pod.name.clone(), a.ifname.clone());
            if let Some(v) = net.by_pod.get(&key) {
                existing = v.clone();
                moved_from_pod = true;
            }
        }
        // Lowest first, so the choice does not depend on the order leases were taken.
        existing.sort_unstable();

        let mut chosen: Vec<(IpAddr, bool)> = Vec::with_capacity(req.ranges.len());
        let mut new_leases: Vec<IpAddr> = Vec::new();
        let result = (|| {
            for (i, key) in pool_keys.iter().enumerate() {
                let pool = &net.pools[key];
                let spec = &pool.spec;
                let reuse = existing
                    .iter()
                    .copied()
                    .find(|ip| spec.allows(*ip) && !chosen.iter().any(|(c, _)| c == ip));
                let ip = match (reuse, wanted[i]) {
                    (Some(held), Some(req_ip)) if held != req_ip => {
                        return Err(AllocError::Conflict {
                            attachment: format!("container {} interface {}", a.container_id, a.ifname),
                            range: spec.display(),
                            held,
                            requested: req_ip,
                        });
                    }
                    (Some(held), _) => {
                        chosen.push((held, false));
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
                                network: network.to_string(),
                                address: req_ip,
                                holder: holder.holder(),
                            });
                        }
                        req_ip
                    }
                    (None, None) => pool.first_free().ok_or_else(|| {
                        let u = pool.usage(network);
                        AllocError::Exhausted {
                            range: spec.display(),
                            size: u.size,
                            held: u.used,
                            excluded: u.excluded,
                        }
                    })?,
                };
                net.insert(Lease {
                    address: ip,
                    network: network.to_string(),
                    range: spec.display(),
                    prefix_len: spec.prefix_len(),
                    gateway: spec.gateway(),
                    container_id: a.container_id.clone(),
                    ifname: a.ifname.clone(),
                    pod: a.pod.clone(),
                    node: a.node.clone(),
                    created_unix_ms: now_unix_ms,
                    note: String::new(),
                });
                new_leases.push(ip);
                chosen.push((ip, true));
            }
            Ok(())
        })();
        if let Err(e) = result {
            for ip in new_leases {
                net.remove(ip);
            }
            return Err(e);
        }

        *lease_count += new_leases.len();
        if moved_from_pod {
            // The pod came back in a new sandbox: its leases follow it.
            for ip in existing {
                if let Some(mut lease) = net.remove(ip) {
                    lease.container_id = a.container_id.clone();
                    lease.pod.uid = a.pod.uid.clone();
                    lease.node = a.node.clone();
                    journal.push(Change::PutLease(lease.clone()));
                    net.insert(lease);
                }
            }
        }
        for ip in &new_leases {
            journal.push(Change::PutLease(net.leases[ip].clone()));
        }
        Ok(chosen.iter().map(|(ip, _)| net.leases[ip].clone()).collect())
    }

    /// Releases what an attachment holds in a network; nothing held is not an error.
    pub fn release(&mut self, network: &str, container_id: &str, ifname: &str) -> Vec<Lease> {
        let held =
            self.networks.get(network).map(|n| n.take(&attach_key(container_id, ifname))).unwrap_or_default();
        held.into_iter().filter_map(|ip| self.delete(network, ip)).collect()
    }

    /// What an attachment holds in a network.
    pub fn check(&self, network: &str, container_id: &str, ifname: &str) -> Vec<Lease> {
        let Some(net) = self.networks.get(network) else {
            return Vec::new();
        };
        net.take(&attach_key(container_id, ifname)).iter().map(|ip| net.leases[ip].clone()).collect()
    }

    /// Releases every attachment lease of `network` whose attachment is not in `valid`.
    /// Manual reservations stay.
    pub fn gc(&mut self, network: &str, valid: &HashSet<(String, String)>) -> Vec<Lease> {
        let Some(net) = self.networks.get(network) else {
            return Vec::new();
        };
        let mut stale: Vec<IpAddr> = net
            .by_attachment
            .iter()
            .filter(|(k, _)| !valid.contains(*k))
            .flat_map(|(_, ips)| ips.iter().copied())
            .collect();
        stale.sort();
        stale.into_iter().filter_map(|ip| self.delete(network, ip)).collect()
    }

    /// Holds an address by hand so it is never handed out.
    pub fn reserve(
        &mut self,
        network: &str,
        ip: IpAddr,
        note: &str,
        now_unix_ms: i64,
    ) -> Result<Lease, AllocError> {
        let net = self.networks.entry(network.to_string()).or_default();
        if let Some(l) = net.leases.get(&ip) {
            return Err(AllocError::Held { network: network.to_string(), address: ip, holder: l.holder() });
        }
        let pool = net.pools.values().find(|p| p.spec.offset(ip).is_some()).map(|p| &p.spec);
        let lease = Lease {
            address: ip,
            network: network.to_string(),
            range: pool.map(|s| s.display()).unwrap_or_default(),
            prefix_len: pool.map_or(if ip.is_ipv4() { 32 } else { 128 }, |s| s.prefix_len()),
            gateway: pool.and_then(|s| s.gateway()),
            container_id: String::new(),
            ifname: String::new(),
            pod: PodRef::default(),
            node: String::new(),
            created_unix_ms: now_unix_ms,
            note: note.to_string(),
        };
        self.put(network, lease.clone());
        Ok(lease)
    }

    /// Frees one address whoever holds it.
    pub fn release_address(&mut self, network: &str, ip: IpAddr) -> Result<Lease, AllocError> {
        self.delete(network, ip)
            .ok_or_else(|| AllocError::NotFound(format!("address {ip} is not held in network \"{network}\"")))
    }

    /// Who holds an address.
    pub fn get(&self, network: &str, ip: IpAddr) -> Result<Lease, AllocError> {
        self.networks
            .get(network)
            .and_then(|n| n.leases.get(&ip))
            .cloned()
            .ok_or_else(|| AllocError::NotFound(format!("address {ip} is not held in network \"{network}\"")))
    }

    /// Pools of one network (or all, for `None`), by network then range.
    pub fn pools(&self, network: Option<&str>) -> Vec<PoolUsage> {
        let mut out: Vec<PoolUsage> = self
            .networks
            .iter()
            .filter(|(name, _)| network.is_none_or(|n| n == name.as_str()))
            .flat_map(|(name, net)| net.pools.values().map(|p| p.usage(name)))
            .collect();
        out.sort_by(|a, b| (&a.network, &a.range.range).cmp(&(&b.network, &b.range.range)));
        out
    }

    /// Leases that match the filter, by network then address.
    pub fn leases(&self, filter: &LeaseFilter) -> Vec<Lease> {
        let mut out: Vec<Lease> = self
            .networks
            .iter()
            .filter(|(name, _)| filter.network.as_deref().is_none_or(|n| n == name.as_str()))
            .flat_map(|(_, net)| net.leases.values().filter(|l| filter.matches(l)).cloned())
            .collect();
        out.sort_by(|a, b| (&a.network, a.address).cmp(&(&b.network, b.address)));
        out
    }
}

#[cfg(test)]
mod tests;
