//! gRPC services: protobuf in, domain types to the engine, protobuf or a status out.
//!
//! Requests are checked and converted in the `check_*` functions; domain errors become
//! status codes in [`status`]. Nothing else here decides anything.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use rust_ipam_proto::v1 as pb;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::allocator::{
    self, AllocError, AllocateRequest, Attachment, FieldPrefix, LeaseFilter, Leases, PodRef, PoolUsage,
    RangeInput, RangeSpec,
};
use crate::authz::{Authz, Caller};
use crate::engine::EngineError;
use crate::keep::{self, KeepError, Keeper};
use crate::pools::{LookupError, Pool, Pools};
use crate::reconcile::{self, PassError, Reconciler};
use crate::role::{NotServing, Serving};

/// Metadata key naming the leader's identity next to [`rust_ipam_proto::LEADER_METADATA`]
/// (its endpoint).
pub const LEADER_IDENTITY_METADATA: &str = "x-rust-ipam-leader-identity";

/// Maps an allocator error to the status a client can act on.
pub fn status(e: AllocError) -> Status {
    let msg = e.to_string();
    match e {
        AllocError::Invalid { .. } => Status::invalid_argument(msg),
        AllocError::Exhausted { .. } => Status::resource_exhausted(msg),
        AllocError::Held { .. } => Status::already_exists(msg),
        AllocError::Conflict { .. } => Status::failed_precondition(msg),
        AllocError::NotFound { .. } => Status::not_found(msg),
        AllocError::NoFreeBlock(_) | AllocError::BlockExhausted(_) => Status::resource_exhausted(msg),
    }
}

impl From<NotServing> for Status {
    /// UNAVAILABLE; from a follower it names the leader in the metadata, so a client can go
    /// there.
    fn from(e: NotServing) -> Status {
        let mut s = Status::unavailable(e.to_string());
        if let NotServing::Follower(p) = &e {
            if let Ok(v) = MetadataValue::try_from(p.endpoint.as_str())
                && !p.endpoint.is_empty()
            {
                s.metadata_mut().insert(rust_ipam_proto::LEADER_METADATA, v);
            }
            if let Ok(v) = MetadataValue::try_from(p.identity.as_str()) {
                s.metadata_mut().insert(LEADER_IDENTITY_METADATA, v);
            }
        }
        s
    }
}

fn engine_status(e: EngineError) -> Status {
    match e {
        EngineError::Conflict(_) => Status::aborted(e.to_string()),
        EngineError::Commit(_) | EngineError::NotLeader(_) | EngineError::Stopped(_) => {
            Status::unavailable(e.to_string())
        }
    }
}

fn invalid(field: &str, value: &str, reason: &str) -> Status {
    status(AllocError::Invalid { field: field.into(), value: value.into(), reason: reason.into() })
}

fn check_attachment(a: Option<pb::Attachment>) -> Result<Attachment, Status> {
    let a = a.ok_or_else(|| invalid("attachment", "", "is missing"))?;
    if a.container_id.trim().is_empty() {
        return Err(invalid("attachment.container_id", &a.container_id, "is empty"));
    }
    if a.ifname.trim().is_empty() {
        return Err(invalid("attachment.ifname", &a.ifname, "is empty"));
    }
    let pod = a.pod.unwrap_or_default();
    Ok(Attachment {
        container_id: a.container_id,
        ifname: a.ifname,
        pod: PodRef { namespace: pod.namespace, name: pod.name, uid: pod.uid },
        node: a.node,
        ..Default::default()
    })
}

// Destructured on both sides: a field added to either type fails to compile here rather
// than being dropped on the way.
impl From<pb::Range> for RangeInput {
    /// The range as given: checked by [`RangeSpec::parse`], which names the bad field.
    fn from(r: pb::Range) -> RangeInput {
        let pb::Range { range, range_start, range_end, exclude, gateway } = r;
        RangeInput { range, range_start, range_end, exclude, gateway }
    }
}

impl From<RangeInput> for pb::Range {
    fn from(r: RangeInput) -> pb::Range {
        let RangeInput { range, range_start, range_end, exclude, gateway } = r;
        pb::Range { range, range_start, range_end, exclude, gateway }
    }
}

fn check_ranges(ranges: Vec<pb::Range>) -> Result<Vec<RangeSpec>, Status> {
    if ranges.is_empty() {
        return Err(invalid("ranges", "", "is empty: at least one range is required"));
    }
    let single = ranges.len() == 1;
    ranges
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let prefix = if single { String::new() } else { format!("ranges[{i}].") };
            RangeSpec::parse(&r.into(), FieldPrefix(&prefix)).map_err(status)
        })
        .collect()
}

fn check_address(field: &str, value: &str) -> Result<IpAddr, Status> {
    allocator::parse_address(field, value).map_err(status)
}

/// The network and ranges an Allocate works on, and the pool that gave them.
type Resolved = (String, Vec<RangeSpec>, Option<Arc<Pool>>);

/// The request's network and ranges: its own, or those of the pool it names (which is
/// returned too, for its routes, DNS and cooldown).
fn check_pool_or_ranges(r: &mut pb::AllocateRequest, pools: &Pools) -> Result<Resolved, Status> {
    if r.pool.is_empty() {
        if r.network.ends_with(crate::allocator::BLOCKS_SUFFIX) {
            return Err(invalid(
                "network",
                &r.network,
                &format!(
                    "ends in {:?}, which names the per-node block assignments of a pool",
                    crate::allocator::BLOCKS_SUFFIX
                ),
            ));
        }
        return Ok((std::mem::take(&mut r.network), check_ranges(std::mem::take(&mut r.ranges))?, None));
    }
    if let Some(first) = r.ranges.first() {
        return Err(invalid(
            "ranges",
            &first.range,
            &format!("must be empty when pool {:?} is set: the pool gives the ranges", r.pool),
        ));
    }
    if !r.network.is_empty() && r.network != r.pool {
        return Err(invalid(
            "network",
            &r.network,
            &format!(
                "must be empty or the pool's name {:?}: a pool's addresses are unique in its own network",
                r.pool
            ),
        ));
    }
    let pool = pools.get(&r.pool).map_err(|e| match e {
        LookupError::Unknown(_) => Status::not_found(e.to_string()),
        LookupError::NotLoaded(_) => Status::unavailable(e.to_string()),
        LookupError::Invalid(_) => Status::failed_precondition(e.to_string()),
    })?;
    Ok((pool.name.clone(), pool.ranges.clone(), Some(pool)))
}

fn check_allocate(
    mut r: pb::AllocateRequest,
    pools: &Pools,
) -> Result<(AllocateRequest, Option<Arc<Pool>>), Status> {
    let attachment = check_attachment(r.attachment.take())?;
    let (network, ranges, pool) = check_pool_or_ranges(&mut r, pools)?;
    let requested = r
        .requested_addresses
        .iter()
        .enumerate()
        .map(|(i, a)| check_address(&format!("requested_addresses[{i}]"), a))
        .collect::<Result<Vec<_>, _>>()?;
    let req =
        AllocateRequest { attachment: Arc::new(attachment), network: network.into(), ranges, requested };
    Ok((req, pool))
}

/// A pool's routes and DNS as the response carries them.
fn pb_pool_extras(pool: &Pool) -> (Vec<pb::Route>, Option<pb::Dns>) {
    let routes = pool.routes.iter().map(|r| pb::Route { dst: r.dst.clone(), gw: r.gw.clone() }).collect();
    let dns = pool.dns.as_ref().map(|d| pb::Dns {
        nameservers: d.nameservers.clone(),
        domain: d.domain.clone(),
        search: d.search.clone(),
        options: d.options.clone(),
    });
    (routes, dns)
}

pub(crate) fn pb_lease(l: Arc<allocator::Lease>) -> pb::Lease {
    pb::Lease {
        address: l.address.to_string(),
        prefix_len: l.prefix_len.into(),
        gateway: l.gateway.map(|g| g.to_string()).unwrap_or_default(),
        network: l.network.to_string(),
        range: l.range.to_string(),
        container_id: l.holder.container_id.clone(),
        ifname: l.holder.ifname.clone(),
        pod: Some(pb::PodRef {
            namespace: l.holder.pod.namespace.clone(),
            name: l.holder.pod.name.clone(),
            uid: l.holder.pod.uid.clone(),
        }),
        node: l.holder.node.clone(),
        created_unix_ms: l.created_unix_ms,
        note: l.note.clone(),
        owner: l.holder.owner.as_ref().map(allocator::Owner::describe).unwrap_or_default(),
        kept: l.holder.kept,
    }
}

fn pb_pool(p: PoolUsage) -> pb::Pool {
    pb::Pool {
        network: p.network.to_string(),
        range: Some(p.range.into()),
        size: p.size.to_string(),
        used: p.used.to_string(),
        excluded: p.excluded.to_string(),
        free: p.free.to_string(),
    }
}

impl From<reconcile::Reason> for pb::ReconcileReason {
    fn from(r: reconcile::Reason) -> pb::ReconcileReason {
        match r {
            reconcile::Reason::PodGone => pb::ReconcileReason::PodGone,
            reconcile::Reason::PodReplaced => pb::ReconcileReason::PodReplaced,
            reconcile::Reason::NodeGone => pb::ReconcileReason::NodeGone,
        }
    }
}

impl From<reconcile::Action> for pb::ReconcileAction {
    fn from(a: reconcile::Action) -> pb::ReconcileAction {
        match a {
            reconcile::Action::WouldFree => pb::ReconcileAction::WouldFree,
            reconcile::Action::Freed => pb::ReconcileAction::Freed,
            reconcile::Action::KeptYoung => pb::ReconcileAction::KeptYoung,
            reconcile::Action::KeptPodLive => pb::ReconcileAction::KeptPodLive,
            reconcile::Action::KeptChanged => pb::ReconcileAction::KeptChanged,
            reconcile::Action::Failed => pb::ReconcileAction::Failed,
        }
    }
}

/// A protobuf enum value without a domain value: UNSPECIFIED, which is also what prost
/// reads a value added after this build as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} has no meaning here")]
pub struct UnspecifiedValue(pub &'static str);

impl TryFrom<pb::ReconcileReason> for reconcile::Reason {
    type Error = UnspecifiedValue;

    fn try_from(r: pb::ReconcileReason) -> Result<reconcile::Reason, UnspecifiedValue> {
        match r {
            pb::ReconcileReason::PodGone => Ok(reconcile::Reason::PodGone),
            pb::ReconcileReason::PodReplaced => Ok(reconcile::Reason::PodReplaced),
            pb::ReconcileReason::NodeGone => Ok(reconcile::Reason::NodeGone),
            pb::ReconcileReason::Unspecified => Err(UnspecifiedValue(r.as_str_name())),
        }
    }
}

impl TryFrom<pb::ReconcileAction> for reconcile::Action {
    type Error = UnspecifiedValue;

    fn try_from(a: pb::ReconcileAction) -> Result<reconcile::Action, UnspecifiedValue> {
        match a {
            pb::ReconcileAction::WouldFree => Ok(reconcile::Action::WouldFree),
            pb::ReconcileAction::Freed => Ok(reconcile::Action::Freed),
            pb::ReconcileAction::KeptYoung => Ok(reconcile::Action::KeptYoung),
            pb::ReconcileAction::KeptPodLive => Ok(reconcile::Action::KeptPodLive),
            pb::ReconcileAction::KeptChanged => Ok(reconcile::Action::KeptChanged),
            pb::ReconcileAction::Failed => Ok(reconcile::Action::Failed),
            pb::ReconcileAction::Unspecified => Err(UnspecifiedValue(a.as_str_name())),
        }
    }
}

/// The node other than the caller's that holds one of `held`, if any: a node may act only
/// on the leases recorded for it.
fn foreign_node(held: &Leases, caller: &Caller) -> Option<String> {
    if caller.admin {
        return None;
    }
    held.iter().map(|l| &l.holder.node).find(|n| !caller.nodes.contains(n)).cloned()
}

/// What an engine call answers when the caller may not touch the attachment's leases.
enum Guarded<T> {
    Done(T),
    /// The attachment's leases are recorded for this other node.
    Foreign(String),
}

impl<T> Guarded<T> {
    fn or_deny(self, rpc: &'static str, caller: &Caller, authz: &Authz) -> Result<T, Status> {
        match self {
            Guarded::Done(t) => Ok(t),
            Guarded::Foreign(node) => Err(deny_foreign(rpc, caller, &node, authz)),
        }
    }
}

/// PERMISSION_DENIED: the leases are recorded for `node`, not the caller's.
fn deny_foreign(rpc: &'static str, caller: &Caller, node: &str, authz: &Authz) -> Status {
    authz.deny(rpc, caller, &format!("may not act on leases recorded for node {node:?}"))
}

/// The status a client gets when the owner of an attachment cannot be decided.
fn keep_status(e: KeepError) -> Status {
    let msg = e.to_string();
    match e {
        KeepError::ClaimNotFound { .. } => Status::not_found(msg),
        KeepError::ClaimName { .. } | KeepError::NoNamespace(_) | KeepError::Annotation { .. } => {
            Status::invalid_argument(msg)
        }
        KeepError::NoApi(_) | KeepError::NoApiForPod => Status::failed_precondition(msg),
        KeepError::Api { .. } => Status::unavailable(msg),
    }
}

/// The `rustipam.v1.Ipam` service.
#[derive(Debug, Clone)]
pub struct IpamService {
    serving: Serving,
    identity: String,
    authz: Arc<Authz>,
    pools: Pools,
    keeper: Option<Arc<dyn Keeper>>,
}

impl IpamService {
    /// Serves allocation while this replica leads; `identity` names it in Status; `authz`
    /// decides who may do what.
    pub fn new(serving: Serving, identity: String, authz: Arc<Authz>) -> IpamService {
        IpamService { serving, identity, authz, pools: Pools::empty(), keeper: None }
    }

    /// Keeps the addresses of StatefulSet pods and IPAMClaims as `keeper` decides
    /// (without one, nothing is kept and a claim reference is refused).
    pub fn with_keeper(self, keeper: Arc<dyn Keeper>) -> IpamService {
        IpamService { keeper: Some(keeper), ..self }
    }

    /// The keep rule the engine applies at release: clones of what it needs.
    fn keep_rule(&self) -> impl Fn(&allocator::Lease) -> bool + Send + 'static {
        let keeper = self.keeper.clone();
        move |l| keep::keeps(keeper.as_ref(), l)
    }

    /// Resolves the pools Allocate names in `pools` (and checks their selectors there).
    pub fn with_pools(self, pools: Pools) -> IpamService {
        IpamService { pools, ..self }
    }

    /// The cooldown of the pool whose network `network` is, if it is one: set before a
    /// release too, so a release before the first allocation since the start cools.
    fn pool_cooldown(&self, network: &str) -> Option<u64> {
        if network.is_empty() {
            return None;
        }
        self.pools.get(network).ok().map(|p| p.cooldown_ms())
    }

    /// The attachment's key, once the node the request names (if any) is the caller's.
    fn own_attachment(
        &self,
        rpc: &'static str,
        caller: &Caller,
        a: Option<pb::Attachment>,
    ) -> Result<(String, String), Status> {
        let a = check_attachment(a)?;
        if !a.node.is_empty() {
            caller.may_act_for(rpc, &a.node, &self.authz)?;
        }
        Ok((a.container_id, a.ifname))
    }
}

#[tonic::async_trait]
impl pb::ipam_server::Ipam for IpamService {
    async fn allocate(
        &self,
        request: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        let caller = self.authz.caller("Allocate", &request).await?;
        let mut r = request.into_inner();
        let mut claim = std::mem::take(&mut r.ipam_claim);
        let claim_from_pod = r.claim_from_pod;
        let (mut req, pool) = check_allocate(r, &self.pools)?;
        let node = caller.node_for(&req.attachment.node);
        caller.may_act_for("Allocate", &node, &self.authz)?;
        if node != req.attachment.node {
            Arc::make_mut(&mut req.attachment).node = node;
        }
        if let Some(p) = &pool {
            if p.namespace_selector.is_some() {
                let a = &req.attachment;
                self.authz.pod_on_callers_node("Allocate", &caller, &a.node, &a.pod).await?;
            }
            p.admit(self.pools.labels(), &req.attachment.node, &req.attachment.pod.namespace).map_err(
                |r| match r.is_transient() {
                    true => Status::unavailable(r.to_string()),
                    false => Status::failed_precondition(r.to_string()),
                },
            )?;
        }
        let who = caller.clone();
        let cooldown_ms = pool.as_ref().map(|p| p.cooldown_ms());
        let per_node = pool.as_ref().filter(|p| p.per_node.is_some()).map(|p| {
            let rails = crate::pools::rail_siblings(&self.pools.snapshot(), p);
            (p.clone(), rails)
        });
        if per_node.is_some() && req.attachment.node.is_empty() {
            let name = pool.as_ref().map(|p| p.name.as_str()).unwrap_or_default();
            return Err(invalid(
                "attachment.node",
                "",
                &format!("is required: pool {name:?} gives each node its own block"),
            ));
        }
        // Decided before the engine call, which then only compares: nothing is taken when
        // the claim is missing, and a plain pod reads nothing here.
        if claim.is_empty() && claim_from_pod {
            claim = match &self.keeper {
                Some(k) => {
                    k.claim_of_pod(&req.attachment.pod, &req.attachment.ifname).await.map_err(keep_status)?
                }
                None => return Err(keep_status(KeepError::NoApiForPod)),
            };
        }
        let owner = match &self.keeper {
            Some(k) => k.owner(&req.attachment.pod, &claim).await.map_err(keep_status)?,
            None if !claim.is_empty() => return Err(keep_status(KeepError::NoApi(claim))),
            None => None,
        };
        if owner.is_some() {
            Arc::make_mut(&mut req.attachment).owner = owner;
        }
        let claim_ns = req.attachment.pod.namespace.clone();
        let got = self
            .serving
            .ready_engine()
            .await?
            .call(move |a, now| {
                let held = a.check(&req.network, &req.attachment.container_id, &req.attachment.ifname);
                match foreign_node(&held, &who) {
                    Some(node) => Guarded::Foreign(node),
                    None => {
                        if let Some(ms) = cooldown_ms {
                            a.set_cooldown(&req.network, ms);
                        }
                        let got = match &per_node {
                            None => a.allocate(&req, now),
                            Some((pool, rails)) => {
                                crate::pools::allocate_in_blocks(a, &req, pool, rails, now)
                            }
                        };
                        Guarded::Done(got.map(|l| (l, a.take_cooldown_overrides())))
                    }
                }
            })
            .await
            .map_err(engine_status)?
            .or_deny("Allocate", &caller, &self.authz)?
            .map_err(status)?;
        let (got, overrides) = got;
        for o in &overrides {
            warn!(address = %o.address, network = %o.network, released_unix_ms = o.released_unix_ms,
                  cooldown_until_unix_ms = o.until_unix_ms,
                  "handing out an address before its cooldown has passed: its range has no other free address");
        }
        for l in &got {
            info!(address = %l.address, network = %l.network, container_id = %l.holder.container_id, ifname = %l.holder.ifname,
                pod = %format_args!("{}/{}", l.holder.pod.namespace, l.holder.pod.name), "allocated");
        }
        if let (false, Some(k)) = (claim.is_empty(), &self.keeper) {
            let ips = got.iter().map(|l| format!("{}/{}", l.address, l.prefix_len)).collect();
            k.claim_allocated(&claim_ns, &claim, ips).await;
        }
        let leases = got.into_iter().map(pb_lease).collect();
        let (routes, dns) = pool.as_deref().map(pb_pool_extras).unwrap_or_default();
        Ok(Response::new(pb::AllocateResponse { leases, routes, dns }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let caller = self.authz.caller("Release", &request).await?;
        let r = request.into_inner();
        let (cid, ifname) = self.own_attachment("Release", &caller, r.attachment)?;
        let network = r.network;
        let who = caller.clone();
        let cooldown_ms = self.pool_cooldown(&network);
        let keep = self.keep_rule();
        let released = self
            .serving
            .ready_engine()
            .await?
            .call(move |a, now| match foreign_node(&a.check(&network, &cid, &ifname), &who) {
                Some(node) => Guarded::Foreign(node),
                None => {
                    if let Some(ms) = cooldown_ms {
                        a.set_cooldown(&network, ms);
                    }
                    Guarded::Done(a.release_keeping(&network, &cid, &ifname, now, &keep))
                }
            })
            .await
            .map_err(engine_status)?
            .or_deny("Release", &caller, &self.authz)?;
        for l in &released.freed {
            info!(address = %l.address, network = %l.network, container_id = %l.holder.container_id, ifname = %l.holder.ifname, "released");
        }
        for l in &released.kept {
            info!(address = %l.address, network = %l.network, container_id = %l.holder.container_id, ifname = %l.holder.ifname,
                pod = %format_args!("{}/{}", l.holder.pod.namespace, l.holder.pod.name),
                owner = %l.holder.owner.as_ref().map(allocator::Owner::describe).unwrap_or_default(), "kept for its owner");
        }
        Ok(Response::new(pb::ReleaseResponse {
            released: released.freed.into_iter().map(pb_lease).collect(),
        }))
    }

    async fn check(&self, request: Request<pb::CheckRequest>) -> Result<Response<pb::CheckResponse>, Status> {
        let caller = self.authz.caller("Check", &request).await?;
        let r = request.into_inner();
        let (cid, ifname) = self.own_attachment("Check", &caller, r.attachment)?;
        let network = r.network;
        let (c2, i2, n2) = (cid.clone(), ifname.clone(), network.clone());
        let leases = self
            .serving
            .ready_engine()
            .await?
            .call(move |a, _| a.check(&n2, &c2, &i2))
            .await
            .map_err(engine_status)?;
        if let Some(node) = foreign_node(&leases, &caller) {
            return Err(deny_foreign("Check", &caller, &node, &self.authz));
        }
        if leases.is_empty() {
            return Err(Status::not_found(format!(
                "container {cid} interface {ifname} holds no address in network \"{network}\""
            )));
        }
        Ok(Response::new(pb::CheckResponse { leases: leases.into_iter().map(pb_lease).collect() }))
    }

    async fn gc(&self, request: Request<pb::GcRequest>) -> Result<Response<pb::GcResponse>, Status> {
        let caller = self.authz.caller("Gc", &request).await?;
        let r = request.into_inner();
        let mut valid = HashSet::new();
        for (i, k) in r.valid_attachments.into_iter().enumerate() {
            if k.container_id.is_empty() || k.ifname.is_empty() {
                return Err(invalid(
                    &format!("valid_attachments[{i}]"),
                    &format!("{}/{}", k.container_id, k.ifname),
                    "needs both container_id and ifname",
                ));
            }
            valid.insert((k.container_id, k.ifname));
        }
        if r.node.is_empty() {
            return Err(invalid(
                "node",
                "",
                "is required: a GC frees only the leases of the node that sent it",
            ));
        }
        caller.may_act_for("Gc", &r.node, &self.authz)?;
        let (network, node) = (r.network, r.node);
        let cooldown_ms = self.pool_cooldown(&network);
        let keep = self.keep_rule();
        let released = self
            .serving
            .ready_engine()
            .await?
            .call(move |a, now| {
                if let Some(ms) = cooldown_ms {
                    a.set_cooldown(&network, ms);
                }
                a.gc_keeping(&network, &node, &valid, now, &keep).freed
            })
            .await
            .map_err(engine_status)?;
        for l in &released {
            info!(address = %l.address, network = %l.network, container_id = %l.holder.container_id, ifname = %l.holder.ifname, "released by gc");
        }
        Ok(Response::new(pb::GcResponse { released: released.into_iter().map(pb_lease).collect() }))
    }

    async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let leader = self.serving.leader_identity(&self.identity);
        // A follower answers too: who leads is what a client asking it wants to know.
        let (serving, store, leases, pools) = match self.serving.engine() {
            Ok(engine) => {
                let (leases, pools) =
                    engine.call(|a, _| (a.lease_count(), a.pool_count())).await.map_err(engine_status)?;
                (true, engine.store().to_string(), leases as u64, pools as u64)
            }
            Err(_) => (false, String::new(), 0, 0),
        };
        Ok(Response::new(pb::StatusResponse {
            serving,
            leader,
            store,
            leases,
            pools,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }
}

/// The `rustipam.v1.Admin` service.
#[derive(Debug, Clone)]
pub struct AdminService {
    serving: Serving,
    reconciler: Option<Arc<Reconciler>>,
    authz: Arc<Authz>,
}

impl AdminService {
    /// Serves operator queries and changes while this replica leads, to the callers
    /// `authz` takes for admins.
    pub fn new(serving: Serving, authz: Arc<Authz>) -> AdminService {
        AdminService { serving, reconciler: None, authz }
    }

    /// Runs Reconcile passes with `reconciler` (without one, Reconcile answers
    /// FAILED_PRECONDITION).
    pub fn with_reconciler(self, reconciler: Arc<Reconciler>) -> AdminService {
        AdminService { reconciler: Some(reconciler), ..self }
    }
}

/// Leases per ListLeases page when the request does not say.
const DEFAULT_PAGE: usize = 1000;
/// Most leases per page: keeps an answer far below gRPC's 4 MiB default message limit.
const MAX_PAGE: usize = 10_000;

/// The token of the page after the lease at (network, address): opaque to clients.
fn page_token(network: &str, address: IpAddr) -> String {
    let raw = format!("{address}/{network}");
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn check_page_token(token: &str) -> Result<Option<(String, IpAddr)>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || invalid("page_token", token, "is not a token this server returned");
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| token.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    let raw = String::from_utf8(bytes).map_err(|_| bad())?;
    let (address, network) = raw.split_once('/').ok_or_else(bad)?;
    Ok(Some((network.to_string(), address.parse().map_err(|_| bad())?)))
}

fn check_note(field: &str, v: &str) -> Result<String, Status> {
    if v.trim().is_empty() {
        return Err(invalid(field, v, "is empty: say why, it is kept and logged"));
    }
    Ok(v.to_string())
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn list_pools(
        &self,
        request: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        self.authz.admin("ListPools", &request).await?;
        let network = request.into_inner().network;
        let pools = self
            .serving
            .ready_engine()
            .await?
            .call(move |a, _| a.pools((!network.is_empty()).then_some(network.as_str())))
            .await
            .map_err(engine_status)?;
        Ok(Response::new(pb::ListPoolsResponse { pools: pools.into_iter().map(pb_pool).collect() }))
    }

    async fn list_leases(
        &self,
        request: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        self.authz.admin("ListLeases", &request).await?;
        let r = request.into_inner();
        let page_size = match r.page_size {
            0 => DEFAULT_PAGE,
            n if n as usize > MAX_PAGE => {
                return Err(invalid("page_size", &n.to_string(), &format!("is over the maximum {MAX_PAGE}")));
            }
            n => n as usize,
        };
        let after = check_page_token(&r.page_token)?;
        let filter = LeaseFilter {
            network: r.network,
            pod_namespace: r.pod_namespace,
            pod_name: r.pod_name,
            node: r.node,
            range: r.range,
            container_id: r.container_id,
        };
        // One engine call per page, costing about the page (see `leases_after`).
        let page = self
            .serving
            .ready_engine()
            .await?
            .call(move |a, _| {
                a.leases_after(&filter, after.as_ref().map(|(n, ip)| (n.as_str(), *ip)), page_size)
            })
            .await
            .map_err(engine_status)?;
        let next_page_token = page.next.map(|(net, ip)| page_token(&net, ip)).unwrap_or_default();
        Ok(Response::new(pb::ListLeasesResponse {
            leases: page.leases.into_iter().map(pb_lease).collect(),
            next_page_token,
        }))
    }

    async fn get_lease(&self, request: Request<pb::GetLeaseRequest>) -> Result<Response<pb::Lease>, Status> {
        self.authz.admin("GetLease", &request).await?;
        let r = request.into_inner();
        let ip = check_address("address", &r.address)?;
        let network = r.network;
        let lease = self
            .serving
            .ready_engine()
            .await?
            .call(move |a, _| a.get(&network, ip))
            .await
            .map_err(engine_status)?
            .map_err(status)?;
        Ok(Response::new(pb_lease(lease)))
    }

    async fn reserve(&self, request: Request<pb::ReserveRequest>) -> Result<Response<pb::Lease>, Status> {
        self.authz.admin("Reserve", &request).await?;
        let r = request.into_inner();
        let ip = check_address("address", &r.address)?;
        let note = check_note("note", &r.note)?;
        let network = r.network;
        let lease = self
            .serving
            .ready_engine()
            .await?
            .call(move |a, now| a.reserve(&network, ip, &note, now))
            .await
            .map_err(engine_status)?
            .map_err(status)?;
        info!(address = %lease.address, network = %lease.network, note = %lease.note, "reserved by hand");
        Ok(Response::new(pb_lease(lease)))
    }

    async fn release_address(
        &self,
        request: Request<pb::ReleaseAddressRequest>,
    ) -> Result<Response<pb::ReleaseAddressResponse>, Status> {
        self.authz.admin("ReleaseAddress", &request).await?;
        let r = request.into_inner();
        let ip = check_address("address", &r.address)?;
        let reason = check_note("reason", &r.reason)?;
        let network = r.network;
        let lease = self
            .serving
            .ready_engine()
            .await?
            .call(move |a, now| a.release_address(&network, ip, now))
            .await
            .map_err(engine_status)?
            .map_err(status)?;
        info!(address = %lease.address, network = %lease.network, container_id = %lease.holder.container_id,
            pod = %format_args!("{}/{}", lease.holder.pod.namespace, lease.holder.pod.name), reason = %reason, "released by hand");
        Ok(Response::new(pb::ReleaseAddressResponse { released: Some(pb_lease(lease)) }))
    }

    async fn reconcile(
        &self,
        request: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::ReconcileResponse>, Status> {
        self.authz.admin("Reconcile", &request).await?;
        let r = request.into_inner();
        let engine = self.serving.ready_engine().await?;
        let reconciler = self
            .reconciler
            .as_ref()
            .ok_or_else(|| Status::failed_precondition(PassError::NoPods.to_string()))?;
        let grace = r.grace_seconds.map(std::time::Duration::from_secs);
        let report = reconciler.run(&engine, r.dry_run, grace).await.map_err(|e| match e {
            PassError::NoPods => Status::failed_precondition(e.to_string()),
            PassError::Engine(e) => engine_status(e),
            PassError::ListPods(_) => Status::unavailable(e.to_string()),
        })?;
        let freed = report.freed() as u64;
        let entries = report
            .entries
            .into_iter()
            .map(|e| pb::ReconcileEntry {
                lease: Some(pb_lease(e.lease)),
                reason: pb::ReconcileReason::from(e.reason).into(),
                action: pb::ReconcileAction::from(e.action).into(),
                age_seconds: e.age.as_secs(),
                detail: e.detail,
            })
            .collect();
        Ok(Response::new(pb::ReconcileResponse {
            dry_run: report.dry_run,
            grace_seconds: report.grace.as_secs(),
            leases_checked: report.leases_checked as u64,
            pods_listed: report.pods_listed as u64,
            entries,
            freed,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::Peer;

    #[test]
    fn ranges_convert_both_ways_unchanged() {
        let pb_range = pb::Range {
            range: "10.0.0.0/24".into(),
            range_start: "10.0.0.10".into(),
            range_end: "10.0.0.20".into(),
            exclude: vec!["10.0.0.12/31".into()],
            gateway: "10.0.0.1".into(),
        };
        let input = RangeInput::from(pb_range.clone());
        assert_eq!(
            input,
            RangeInput {
                range: "10.0.0.0/24".into(),
                range_start: "10.0.0.10".into(),
                range_end: "10.0.0.20".into(),
                exclude: vec!["10.0.0.12/31".into()],
                gateway: "10.0.0.1".into(),
            }
        );
        assert_eq!(pb::Range::from(input), pb_range);
    }

    #[test]
    fn reconcile_reasons_and_actions_convert_both_ways() {
        use reconcile::{Action, Reason};
        for r in [Reason::PodGone, Reason::PodReplaced, Reason::NodeGone] {
            assert_eq!(Reason::try_from(pb::ReconcileReason::from(r)), Ok(r));
        }
        let actions = [
            Action::WouldFree,
            Action::Freed,
            Action::KeptYoung,
            Action::KeptPodLive,
            Action::KeptChanged,
            Action::Failed,
        ];
        for a in actions {
            assert_eq!(Action::try_from(pb::ReconcileAction::from(a)), Ok(a));
        }
        assert_eq!(
            pb::ReconcileAction::from(Action::KeptPodLive).as_str_name(),
            "RECONCILE_ACTION_KEPT_POD_LIVE"
        );
        assert_eq!(
            Reason::try_from(pb::ReconcileReason::Unspecified),
            Err(UnspecifiedValue("RECONCILE_REASON_UNSPECIFIED"))
        );
        assert_eq!(
            Action::try_from(pb::ReconcileAction::Unspecified).map_err(|e| e.to_string()),
            Err("RECONCILE_ACTION_UNSPECIFIED has no meaning here".to_string())
        );
    }

    #[test]
    fn a_follower_names_the_leader_in_the_status() {
        let p = Peer { identity: "ipam-0".into(), endpoint: "http://10.0.0.5:50051".into() };
        let st = Status::from(NotServing::Follower(p));
        assert_eq!(st.code(), tonic::Code::Unavailable);
        assert_eq!(
            st.message(),
            "this replica is not the leader; the leader is ipam-0 at http://10.0.0.5:50051"
        );
        assert_eq!(
            st.metadata().get(rust_ipam_proto::LEADER_METADATA).and_then(|v| v.to_str().ok()),
            Some("http://10.0.0.5:50051")
        );
        assert_eq!(st.metadata().get(LEADER_IDENTITY_METADATA).and_then(|v| v.to_str().ok()), Some("ipam-0"));

        let unknown =
            Status::from(NotServing::Follower(Peer { identity: "ipam-1".into(), endpoint: String::new() }));
        assert_eq!(
            unknown.message(),
            "this replica is not the leader; the leader is ipam-1 at an unknown endpoint"
        );
        assert!(unknown.metadata().get(rust_ipam_proto::LEADER_METADATA).is_none());

        let starting = Status::from(NotServing::Starting);
        assert_eq!(starting.code(), tonic::Code::Unavailable);
        assert!(starting.metadata().get(LEADER_IDENTITY_METADATA).is_none());
    }
}
