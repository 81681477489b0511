//! Stale-lease reconcile: frees the leases of pods that no longer exist.
//!
//! A lease is stale when the pod it was taken for is gone (no pod of that namespace/name),
//! or is another pod under the same name (another UID, when the lease recorded one), and
//! the lease is older than a grace period. This is where Whereabouts' reconciler handed out
//! duplicate addresses, so a pass is built to never free the address of a live pod:
//!
//! 1. the leases are read (from the leader's memory) **before** the pods, so a lease in the
//!    snapshot was taken for a pod that existed before the pod list was read. They are read
//!    in pages, one bounded engine call each, so allocations go on in between: the snapshot
//!    is not one instant, each lease is as its page saw it (one taken or moved meanwhile
//!    may be missed until the next pass; one freed meanwhile is caught by step 3);
//! 2. each candidate's pod is read again right before it is freed;
//! 3. the release itself is conditional and runs on the engine thread, atomically with
//!    every allocation: it frees the address only if it is still held by the very same
//!    attachment (container, interface, pod and UID, node) with the same creation time, and
//!    that time is older than the grace cutoff. A pod recreated under the same name that
//!    took the lease back meanwhile holds it under another container ID, so it is kept.
//!
//! Leases younger than the grace period are reported and never freed; manual reservations
//! and leases without a pod (imports without a podref) are never looked at, and neither
//! are leases whose owner (a StatefulSet that still wants the ordinal, an IPAMClaim that
//! exists: see [`crate::keep`]) keeps them, asked when the leases are read and again in
//! the conditional release. A kept lease whose owner lets go is judged like any other: its
//! pod is gone (or replaced), so it is freed. A dry run
//! takes the same steps up to (not including) the release, so it lists what a real pass
//! would free.
//!
//! The same pass gives deleted nodes' per-node blocks back ([`blocks`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tracing::{Instrument as _, debug, info, info_span, warn};

pub mod blocks;

use crate::allocator::{Allocator, Lease, LeaseFilter, Str};
use crate::engine::{Engine, EngineError};
use crate::keep::{self, Keeper};
use crate::role::Serving;

/// A pod as the API server lists it: all reconcile needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// Reading pods failed, with the pod source's own error (the API server's, for
/// [`crate::k8s::pods::KubePods`]) as the source.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(transparent)]
    List(Box<dyn std::error::Error + Send + Sync>),
    #[error("pod {namespace}/{name}: {source}")]
    Get {
        namespace: String,
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Where pods are read from: the Kubernetes API ([`crate::k8s::pods::KubePods`]), or a test's own.
pub trait PodSource: Send + Sync + std::fmt::Debug {
    /// Every pod of the cluster, read fresh (not from a cache).
    fn list(&self) -> BoxFuture<'_, Result<Vec<PodInfo>, PodError>>;
    /// One pod, read fresh; `None` when there is no pod of that name.
    fn get<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<PodInfo>, PodError>>;
}

/// Why a lease is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No pod of the lease's namespace/name exists.
    PodGone,
    /// A pod of that namespace/name exists with another UID than the lease recorded.
    PodReplaced,
    /// A per-node block's Node is gone (the lease is the block's marker).
    NodeGone,
}

impl Reason {
    /// The reason as reported and as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PodGone => "pod-gone",
            Reason::PodReplaced => "pod-replaced",
            Reason::NodeGone => "node-gone",
        }
    }
}

/// What [`judge`] says of one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A manual reservation or a lease that names no pod: reconcile never frees it.
    NoPod,
    /// Its pod is there.
    Live,
    /// Its pod is gone or replaced.
    Stale(Reason),
}

/// Whether reconcile looks at a lease at all: it was taken for a pod (not by hand, and the
/// pod's namespace and name were recorded).
pub fn names_a_pod(lease: &Lease) -> bool {
    let p = &lease.holder.pod;
    !lease.is_manual() && !p.name.is_empty() && !p.namespace.is_empty()
}

/// Judges a lease by the pod found under its namespace/name (`None`: none found). A lease
/// that recorded no pod UID is stale only when the pod is gone.
pub fn judge(lease: &Lease, pod: Option<&PodInfo>) -> Verdict {
    let p = &lease.holder.pod;
    if !names_a_pod(lease) {
        return Verdict::NoPod;
    }
    match pod {
        None => Verdict::Stale(Reason::PodGone),
        Some(found) if !p.uid.is_empty() && found.uid != p.uid => Verdict::Stale(Reason::PodReplaced),
        Some(_) => Verdict::Live,
    }
}

/// Whether a lease is older than the grace period: taken strictly before `cutoff_unix_ms`
/// (now minus the grace period).
pub fn past_grace(lease: &Lease, cutoff_unix_ms: i64) -> bool {
    lease.created_unix_ms < cutoff_unix_ms
}

/// Frees `seen`'s address only if the lease there is still the one a pass judged: same
/// holder (container, interface, pod with UID, node), same creation time, past the grace
/// cutoff. Runs on the engine thread, so nothing can change between the check and the
/// release. Returns the freed lease.
pub fn release_if_unchanged(
    a: &mut Allocator,
    seen: &Lease,
    cutoff_unix_ms: i64,
    now_unix_ms: i64,
) -> Option<Arc<Lease>> {
    release_unless_kept(a, seen, None, cutoff_unix_ms, now_unix_ms)
}

/// [`release_if_unchanged`], also keeping the lease when `keeper` says its owner wants it.
pub fn release_unless_kept(
    a: &mut Allocator,
    seen: &Lease,
    keeper: Option<&Arc<dyn Keeper>>,
    cutoff_unix_ms: i64,
    now_unix_ms: i64,
) -> Option<Arc<Lease>> {
    let current = a.get(&seen.network, seen.address).ok()?;
    let unchanged = current.holder == seen.holder && current.created_unix_ms == seen.created_unix_ms;
    if !unchanged || !past_grace(&current, cutoff_unix_ms) || keep::keeps(keeper, &current) {
        return None;
    }
    a.release_address(&seen.network, seen.address, now_unix_ms).ok()
}

/// What a pass did with a stale lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Dry run: a real pass would free it (if nothing changes meanwhile).
    WouldFree,
    Freed,
    /// Younger than the grace period.
    KeptYoung,
    /// Its pod was there when read again right before freeing.
    KeptPodLive,
    /// The lease changed hands (or was released) since the pass read it.
    KeptChanged,
    /// Reading the pod again or releasing failed; nothing was freed.
    Failed,
}

impl Action {
    /// The action as reported and as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::WouldFree => "would-free",
            Action::Freed => "freed",
            Action::KeptYoung => "kept-young",
            Action::KeptPodLive => "kept-pod-live",
            Action::KeptChanged => "kept-changed",
            Action::Failed => "failed",
        }
    }
}

/// One stale lease and what became of it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The lease as the pass read it.
    pub lease: Arc<Lease>,
    pub reason: Reason,
    pub action: Action,
    /// Age of the lease when the pass started.
    pub age: Duration,
    /// The UIDs of a replaced pod, or the error of a failed entry.
    pub detail: String,
    /// For [`Action::Failed`]: the step that failed (`get-pod` or `release`).
    pub failed_at: Option<&'static str>,
}

/// The outcome of one pass.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub dry_run: bool,
    pub grace: Duration,
    /// Leases held for pods (the ones a pass looks at).
    pub leases_checked: usize,
    pub pods_listed: usize,
    /// Stale leases by network then address.
    pub entries: Vec<Entry>,
}

impl Report {
    /// Leases the pass freed.
    pub fn freed(&self) -> usize {
        self.entries.iter().filter(|e| e.action == Action::Freed).count()
    }

    /// Entries with `action`.
    pub fn count(&self, action: Action) -> usize {
        self.entries.iter().filter(|e| e.action == action).count()
    }
}

/// Why a pass could not run.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// No Kubernetes API to read pods from.
    #[error("reconcile needs the Kubernetes API to see pods (run in a cluster or pass --kubeconfig)")]
    NoPods,
    #[error("reading leases: {0}")]
    Engine(#[from] EngineError),
    #[error("listing pods: {0}")]
    ListPods(#[source] PodError),
}

/// How to run a pass.
#[derive(Debug, Clone, Copy)]
pub struct PassOptions {
    pub dry_run: bool,
    pub grace: Duration,
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn pod_of(l: &Lease) -> String {
    format!("{}/{}", l.holder.pod.namespace, l.holder.pod.name)
}

/// Runs one pass at wall-clock time `now_unix_ms` (see the module docs for the order of
/// its steps). Each freed lease is logged; per-lease failures become [`Action::Failed`]
/// entries, and only a failure to read the leases or list the pods fails the pass.
pub async fn pass(
    engine: &Engine,
    pods: &dyn PodSource,
    opts: PassOptions,
    now_unix_ms: i64,
) -> Result<Report, PassError> {
    pass_keeping(engine, pods, None, opts, now_unix_ms).await
}

/// [`pass`], leaving alone the leases `keeper` keeps for their owners.
pub async fn pass_keeping(
    engine: &Engine,
    pods: &dyn PodSource,
    keeper: Option<&Arc<dyn Keeper>>,
    opts: PassOptions,
    now_unix_ms: i64,
) -> Result<Report, PassError> {
    let cutoff = now_unix_ms.saturating_sub(duration_ms(opts.grace));
    // Leases first: see the module docs.
    let leases = read_leases(engine, keeper).await?;
    let listed = pods.list().await.map_err(PassError::ListPods)?;
    let mut report = Report {
        dry_run: opts.dry_run,
        grace: opts.grace,
        leases_checked: leases.len(),
        pods_listed: listed.len(),
        entries: Vec::new(),
    };
    let by_name: HashMap<(&str, &str), &PodInfo> =
        listed.iter().map(|p| ((p.namespace.as_str(), p.name.as_str()), p)).collect();
    for lease in leases {
        let key = (lease.holder.pod.namespace.as_str(), lease.holder.pod.name.as_str());
        let Verdict::Stale(listed_reason) = judge(&lease, by_name.get(&key).copied()) else { continue };
        let age = Duration::from_millis(now_unix_ms.saturating_sub(lease.created_unix_ms).max(0) as u64);
        let mut entry = Entry {
            lease,
            reason: listed_reason,
            action: Action::Failed,
            age,
            detail: String::new(),
            failed_at: None,
        };
        entry.action = decide(engine, pods, keeper, &mut entry, opts, cutoff).await;
        report.entries.push(entry);
    }
    Ok(report)
}

/// Leases per engine call of [`read_leases`]: each call is bounded (see
/// [`Allocator::leases_after`]), so allocations wait for one page, not for every lease.
const SNAPSHOT_PAGE: usize = 4096;

/// Every lease held for a pod and not kept for its owner, read page by page in (network,
/// address) order.
async fn read_leases(
    engine: &Engine,
    keeper: Option<&Arc<dyn Keeper>>,
) -> Result<Vec<Arc<Lease>>, EngineError> {
    let mut out = Vec::new();
    let mut after: Option<(Str, IpAddr)> = None;
    loop {
        let from = after.take();
        let keeper = keeper.cloned();
        let page = engine
            .call(move |a, _| {
                let from = from.as_ref().map(|(net, ip)| (&**net, *ip));
                let mut page = a.leases_after(&LeaseFilter::default(), from, SNAPSHOT_PAGE);
                page.leases.retain(|l| names_a_pod(l) && !keep::keeps(keeper.as_ref(), l));
                page
            })
            .await?;
        out.extend(page.leases);
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(out),
        }
    }
}

/// Re-checks one stale lease and, unless dry, frees it under the engine's condition.
async fn decide(
    engine: &Engine,
    pods: &dyn PodSource,
    keeper: Option<&Arc<dyn Keeper>>,
    entry: &mut Entry,
    opts: PassOptions,
    cutoff: i64,
) -> Action {
    let lease = entry.lease.clone();
    let holder = &lease.holder;
    if !past_grace(&lease, cutoff) {
        debug!(network = %lease.network, address = %lease.address, pod = %pod_of(&lease), reason = entry.reason.as_str(),
            "stale lease is younger than the grace period; kept");
        return Action::KeptYoung;
    }
    // The pod, read again right before freeing: a list can be older than this moment.
    let again = match pods.get(&holder.pod.namespace, &holder.pod.name).await {
        Ok(p) => p,
        Err(e) => {
            entry.detail = format!("reading the pod again: {e}");
            entry.failed_at = Some("get-pod");
            return Action::Failed;
        }
    };
    match judge(&lease, again.as_ref()) {
        Verdict::Stale(reason) => entry.reason = reason,
        Verdict::Live | Verdict::NoPod => {
            entry.detail = "the pod exists with the lease's UID".into();
            return Action::KeptPodLive;
        }
    }
    if let (Reason::PodReplaced, Some(p)) = (entry.reason, &again) {
        entry.detail = format!("pod has uid {}, the lease was taken by uid {}", p.uid, holder.pod.uid);
    }
    if opts.dry_run {
        info!(network = %lease.network, address = %lease.address, pod = %pod_of(&lease),
            container_id = %holder.container_id, reason = entry.reason.as_str(), "dry run: would free stale lease");
        return Action::WouldFree;
    }
    let seen = lease.clone();
    let keeper = keeper.cloned();
    match engine.call(move |a, now| release_unless_kept(a, &seen, keeper.as_ref(), cutoff, now)).await {
        Ok(Some(_)) => {
            info!(network = %lease.network, address = %lease.address, pod = %pod_of(&lease),
                container_id = %holder.container_id, ifname = %holder.ifname, node = %holder.node,
                reason = entry.reason.as_str(), "reconcile freed a stale lease");
            Action::Freed
        }
        Ok(None) => {
            entry.detail = "the lease changed since it was read".into();
            Action::KeptChanged
        }
        Err(e) => {
            entry.detail = format!("releasing: {e}");
            entry.failed_at = Some("release");
            Action::Failed
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    mode: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

/// The reconcile metrics. `default()` makes unregistered ones: they count, and nothing
/// exports them.
#[derive(Debug, Default)]
pub struct ReconcileMetrics {
    runs: Family<RunLabels, Counter>,
    freed: Family<ReasonLabel, Counter>,
    kept: Family<ActionLabel, Counter>,
    errors: Family<StageLabel, Counter>,
}

impl ReconcileMetrics {
    /// Registers the metrics (`runs`, `freed`, `kept`, `errors`) in `registry`, the
    /// reconcile's own sub-registry.
    pub fn register(registry: &mut Registry) -> ReconcileMetrics {
        let m = ReconcileMetrics::default();
        registry.register("runs", "Reconcile passes by mode (real, dry-run) and result", m.runs.clone());
        registry.register("freed", "Stale leases freed by reconcile, by reason", m.freed.clone());
        registry.register(
            "kept",
            "Stale leases a real reconcile pass kept, by action (kept-young, kept-pod-live, kept-changed)",
            m.kept.clone(),
        );
        registry.register(
            "errors",
            "Reconcile failures by stage (leases, list-pods, get-pod, release)",
            m.errors.clone(),
        );
        m
    }

    fn observe(&self, dry_run: bool, outcome: &Result<Report, PassError>) {
        let mode = if dry_run { "dry-run" } else { "real" };
        let result = if outcome.is_ok() { "ok" } else { "error" };
        self.runs.get_or_create(&RunLabels { mode, result }).inc();
        let stage = |stage| {
            self.errors.get_or_create(&StageLabel { stage }).inc();
        };
        let report = match outcome {
            Ok(r) => r,
            Err(PassError::NoPods) => return,
            Err(PassError::Engine(_)) => return stage("leases"),
            Err(PassError::ListPods(_)) => return stage("list-pods"),
        };
        for e in &report.entries {
            match e.action {
                Action::Freed => {
                    self.freed.get_or_create(&ReasonLabel { reason: e.reason.as_str() }).inc();
                }
                Action::Failed => stage(e.failed_at.unwrap_or("get-pod")),
                Action::KeptYoung | Action::KeptPodLive | Action::KeptChanged if !dry_run => {
                    self.kept.get_or_create(&ActionLabel { action: e.action.as_str() }).inc();
                }
                _ => {}
            }
        }
    }
}

/// Runs passes for the Reconcile RPC and on a timer, one at a time.
#[derive(Debug)]
pub struct Reconciler {
    pods: Option<Arc<dyn PodSource>>,
    /// Whose leases are kept past their pods (see [`crate::keep`]); the gRPC services
    /// take the same one from here.
    keeper: Option<Arc<dyn Keeper>>,
    /// Time between timer passes; zero: no timer.
    every: Duration,
    /// Grace period of timer passes and of RPCs that name none.
    grace: Duration,
    metrics: ReconcileMetrics,
    /// Gives deleted nodes' blocks back, when the Nodes are read.
    blocks: Option<blocks::NodeBlocks>,
    running: tokio::sync::Mutex<()>,
}

fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, duration_ms)
}

impl Reconciler {
    /// Reads pods from `pods` (`None`: passes fail with [`PassError::NoPods`] and there is
    /// no timer); every `every` (zero: never) the leader runs a pass with `grace`.
    pub fn new(
        pods: Option<Arc<dyn PodSource>>,
        every: Duration,
        grace: Duration,
        metrics: ReconcileMetrics,
    ) -> Arc<Reconciler> {
        Reconciler::keeping(pods, None, every, grace, metrics, None)
    }

    /// As [`Reconciler::new`], leaving alone the leases `keeper` keeps for their owners,
    /// and with `blocks`, giving deleted nodes' per-node blocks back in each pass.
    pub fn keeping(
        pods: Option<Arc<dyn PodSource>>,
        keeper: Option<Arc<dyn Keeper>>,
        every: Duration,
        grace: Duration,
        metrics: ReconcileMetrics,
        blocks: Option<blocks::NodeBlocks>,
    ) -> Arc<Reconciler> {
        Arc::new(Reconciler {
            pods,
            keeper,
            every,
            grace,
            metrics,
            blocks,
            running: tokio::sync::Mutex::new(()),
        })
    }

    /// The keeper passes consult, which Allocate, Release and GC use too.
    pub fn keeper(&self) -> Option<Arc<dyn Keeper>> {
        self.keeper.clone()
    }

    /// A reconciler without pods and without a timer. Its metrics are registered nowhere:
    /// it never runs a pass to count.
    pub fn disabled() -> Arc<Reconciler> {
        Reconciler::new(None, Duration::ZERO, Duration::from_secs(600), ReconcileMetrics::default())
    }

    /// The default grace period.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Runs one pass with `grace` (`None`: the default), counting it in the metrics.
    pub async fn run(
        &self,
        engine: &Engine,
        dry_run: bool,
        grace: Option<Duration>,
    ) -> Result<Report, PassError> {
        let Some(pods) = &self.pods else { return Err(PassError::NoPods) };
        let opts = PassOptions { dry_run, grace: grace.unwrap_or(self.grace) };
        let _one_at_a_time = self.running.lock().await;
        let now = now_unix_ms();
        let mut outcome = pass_keeping(engine, pods.as_ref(), self.keeper.as_ref(), opts, now).await;
        if let (Ok(report), Some(blocks)) = (&mut outcome, &self.blocks) {
            report.entries.extend(blocks.pass(engine, dry_run, now).await);
        }
        self.metrics.observe(dry_run, &outcome);
        match &outcome {
            Ok(r) => info!(dry_run, grace = ?opts.grace, leases = r.leases_checked, pods = r.pods_listed,
                stale = r.entries.len(), freed = r.freed(), young = r.count(Action::KeptYoung),
                failed = r.count(Action::Failed), "reconcile pass done"),
            Err(e) => warn!(dry_run, error = %e, "reconcile pass failed"),
        }
        outcome
    }

    /// Starts the timer: every `every`, a pass while this replica leads (a follower's
    /// timer does nothing). `None` when there is no timer (zero interval or no pods).
    pub fn spawn_timer(self: &Arc<Self>, serving: Serving) -> Option<tokio::task::JoinHandle<()>> {
        if self.every.is_zero() {
            return None;
        }
        if self.pods.is_none() {
            info!("no reconcile timer: no Kubernetes API to see pods");
            return None;
        }
        let me = self.clone();
        Some(tokio::spawn(
            async move {
                loop {
                    tokio::time::sleep(me.every).await;
                    // Only the leader, and only with its state loaded.
                    let Ok(engine) = serving.engine() else { continue };
                    let _ = me.run(&engine, false, None).await;
                }
            }
            .instrument(info_span!("reconcile-timer")),
        ))
    }
}

fn age_text(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// One row of [`table`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub network: String,
    pub address: String,
    pub pod: String,
    pub node: String,
    pub container: String,
    pub age: Duration,
    pub reason: String,
    pub action: String,
}

/// Rows as an aligned text table with a header (NETWORK ADDRESS POD NODE CONTAINER AGE
/// REASON ACTION); the default network shows as `-`, container IDs are cut to 12 chars.
pub fn table(rows: &[Row]) -> String {
    let header = ["NETWORK", "ADDRESS", "POD", "NODE", "CONTAINER", "AGE", "REASON", "ACTION"];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            let or_dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
            [
                or_dash(&r.network),
                r.address.clone(),
                or_dash(&r.pod),
                or_dash(&r.node),
                or_dash(&r.container.chars().take(12).collect::<String>()),
                age_text(r.age),
                r.reason.clone(),
                r.action.clone(),
            ]
        })
        .collect();
    let mut width = header.map(str::len);
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cols: &[String]| {
        let text: Vec<String> = cols.iter().zip(width).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(&header.map(String::from));
    for row in &cells {
        line(row);
    }
    out
}

#[cfg(test)]
mod tests;
