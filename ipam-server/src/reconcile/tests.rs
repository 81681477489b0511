use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::allocator::{AllocateRequest, Attachment, Change, FieldPrefix, PodRef, RangeInput, RangeSpec};
use crate::metrics::Metrics;
use crate::role::Role;
use crate::store::{CommitError, LeaseStore, Loaded, StoreError};

const HOUR_MS: i64 = 3_600_000;
const GRACE: Duration = Duration::from_secs(600);

/// A store that keeps nothing but the changes it was given.
#[derive(Debug, Clone, Default)]
struct MemStore(Arc<Mutex<Vec<Change>>>);

impl LeaseStore for MemStore {
    fn describe(&self) -> String {
        "memory".into()
    }
    fn load(&self) -> Result<Loaded, StoreError> {
        Ok(Loaded::default())
    }
    fn commit(&mut self, changes: &[Change]) -> Result<(), CommitError> {
        self.0.lock().expect("lock").extend_from_slice(changes);
        Ok(())
    }
}

type Hook = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>;

/// Pods a test controls. `hook` runs inside the next `list`, after the list was taken and
/// before it is returned: what happens while a pass runs. `stale_list`, when set, is what
/// `list` returns instead of the pods (a list older than the truth).
#[derive(Default)]
struct FakePods {
    pods: Mutex<BTreeMap<(String, String), String>>,
    stale_list: Mutex<Option<Vec<PodInfo>>>,
    hook: Mutex<Option<Hook>>,
    fail_get: Mutex<Option<String>>,
    fail_list: Mutex<Option<String>>,
    lists: AtomicUsize,
    gets: Mutex<Vec<String>>,
    listed: Option<tokio::sync::mpsc::UnboundedSender<()>>,
}

impl std::fmt::Debug for FakePods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakePods")
    }
}

impl FakePods {
    fn with(pods: &[(&str, &str, &str)]) -> FakePods {
        let fake = FakePods::default();
        for (ns, name, uid) in pods {
            fake.put(ns, name, uid);
        }
        fake
    }
    fn put(&self, ns: &str, name: &str, uid: &str) {
        self.pods.lock().expect("lock").insert((ns.into(), name.into()), uid.into());
    }
}

impl PodSource for FakePods {
    fn list(&self) -> BoxFuture<'_, Result<Vec<PodInfo>, PodError>> {
        Box::pin(async move {
            self.lists.fetch_add(1, Ordering::SeqCst);
            if let Some(tx) = &self.listed {
                let _ = tx.send(());
            }
            if let Some(e) = self.fail_list.lock().expect("lock").clone() {
                return Err(PodError::List(e.into()));
            }
            let pods: Vec<PodInfo> = self
                .pods
                .lock()
                .expect("lock")
                .iter()
                .map(|((ns, name), uid)| PodInfo {
                    namespace: ns.clone(),
                    name: name.clone(),
                    uid: uid.clone(),
                })
                .collect();
            let pods = self.stale_list.lock().expect("lock").clone().unwrap_or(pods);
            let hook = self.hook.lock().expect("lock").take();
            if let Some(h) = hook {
                h().await;
            }
            Ok(pods)
        })
    }

    fn get<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<PodInfo>, PodError>> {
        Box::pin(async move {
            self.gets.lock().expect("lock").push(format!("{namespace}/{name}"));
            if let Some(e) = self.fail_get.lock().expect("lock").clone() {
                return Err(PodError::Get {
                    namespace: namespace.into(),
                    name: name.into(),
                    source: e.into(),
                });
            }
            let uid = self.pods.lock().expect("lock").get(&(namespace.into(), name.into())).cloned();
            Ok(uid.map(|uid| PodInfo { namespace: namespace.into(), name: name.into(), uid }))
        })
    }
}

fn now_ms() -> i64 {
    super::now_unix_ms()
}

fn holder(cid: &str, ns: &str, pod: &str, uid: &str) -> Arc<Attachment> {
    Arc::new(Attachment {
        container_id: cid.into(),
        ifname: "net1".into(),
        pod: PodRef { namespace: ns.into(), name: pod.into(), uid: uid.into() },
        node: "node-a".into(),
        ..Default::default()
    })
}

fn lease(ip: &str, holder: Arc<Attachment>, created_unix_ms: i64) -> Lease {
    Lease {
        address: ip.parse().expect("ip"),
        network: "".into(),
        range: "10.0.0.0/24".into(),
        prefix_len: 24,
        gateway: None,
        holder,
        created_unix_ms,
        note: String::new(),
    }
}

fn manual(ip: &str, created_unix_ms: i64) -> Lease {
    Lease { note: "router".into(), ..lease(ip, Arc::default(), created_unix_ms) }
}

async fn engine_with(leases: Vec<Lease>) -> (Engine, MemStore) {
    let store = MemStore::default();
    let engine = Engine::start(Box::new(store.clone()), Metrics::new()).await.expect("engine");
    engine
        .call(move |a, _| {
            for l in leases.clone() {
                a.adopt(l).expect("adopt");
            }
        })
        .await
        .expect("engine");
    (engine, store)
}

async fn held(engine: &Engine) -> Vec<(String, String)> {
    engine
        .call(|a, _| {
            a.leases(&LeaseFilter::default())
                .iter()
                .map(|l| (l.address.to_string(), l.holder.container_id.clone()))
                .collect()
        })
        .await
        .expect("engine")
}

fn summary(r: &Report) -> Vec<(String, &'static str, &'static str)> {
    r.entries.iter().map(|e| (e.lease.address.to_string(), e.reason.as_str(), e.action.as_str())).collect()
}

#[test]
fn judge_decides_by_name_then_uid_and_never_judges_leases_without_a_pod() {
    let t = 1;
    let pod = |uid: &str| PodInfo { namespace: "ns".into(), name: "p".into(), uid: uid.into() };
    let with_uid = lease("10.0.0.1", holder("c1", "ns", "p", "u1"), t);
    assert_eq!(judge(&with_uid, None), Verdict::Stale(Reason::PodGone));
    assert_eq!(judge(&with_uid, Some(&pod("u2"))), Verdict::Stale(Reason::PodReplaced));
    assert_eq!(judge(&with_uid, Some(&pod("u1"))), Verdict::Live);
    // No UID recorded (an older plugin, an import): only a missing pod makes it stale.
    let no_uid = lease("10.0.0.2", holder("c2", "ns", "p", ""), t);
    assert_eq!(judge(&no_uid, Some(&pod("anything"))), Verdict::Live);
    assert_eq!(judge(&no_uid, None), Verdict::Stale(Reason::PodGone));
    // Manual reservations and leases that name no pod are never judged.
    assert_eq!(judge(&manual("10.0.0.3", t), None), Verdict::NoPod);
    assert_eq!(judge(&lease("10.0.0.4", holder("c4", "", "", ""), t), None), Verdict::NoPod);
    assert_eq!(judge(&lease("10.0.0.5", holder("c5", "", "p", ""), t), None), Verdict::NoPod);
    assert!(!names_a_pod(&manual("10.0.0.3", t)));
    // Past the grace period means strictly older than the cutoff.
    assert!(past_grace(&lease("10.0.0.6", holder("c", "ns", "p", ""), 99), 100));
    assert!(!past_grace(&lease("10.0.0.6", holder("c", "ns", "p", ""), 100), 100));
    assert_eq!(Reason::PodGone.as_str(), "pod-gone");
    assert_eq!(Reason::PodReplaced.as_str(), "pod-replaced");
}

#[test]
fn the_conditional_release_frees_only_the_lease_that_was_judged() {
    let mut a = Allocator::new();
    let old = lease("10.0.0.1", holder("c1", "ns", "p", "u1"), 10);
    a.adopt(old.clone()).expect("adopt");
    let cutoff = 100;
    // Another holder now (the pod came back in a new sandbox): kept.
    let other = Lease { holder: holder("c2", "ns", "p", "u2"), ..old.clone() };
    assert_eq!(release_if_unchanged(&mut a, &other, cutoff, 1), None);
    // Same holder, another creation time (released and taken again): kept.
    let retaken = Lease { created_unix_ms: 11, ..old.clone() };
    assert_eq!(release_if_unchanged(&mut a, &retaken, cutoff, 1), None);
    // Too young for this cutoff: kept.
    assert_eq!(release_if_unchanged(&mut a, &old, 10, 1), None);
    assert_eq!(a.lease_count(), 1);
    assert_eq!(a.drain_journal().count(), 1, "only the adopt was journaled");
    // Exactly the judged lease, old enough: freed and journaled.
    let freed = release_if_unchanged(&mut a, &old, cutoff, 1).expect("freed");
    assert_eq!(*freed, old);
    assert_eq!(a.lease_count(), 0);
    let journal: Vec<Change> = a.drain_journal().collect();
    assert_eq!(
        journal,
        vec![Change::DeleteLease { network: "".into(), address: "10.0.0.1".parse().expect("ip") }]
    );
    // Already gone: nothing.
    assert_eq!(release_if_unchanged(&mut a, &old, cutoff, 1), None);
}

/// The leases of the pass tests: which pods exist, what each lease is.
async fn mixed() -> (Engine, MemStore, FakePods) {
    let now = now_ms();
    let old = now - HOUR_MS;
    let young = now - 60_000;
    let leases = vec![
        lease("10.0.0.1", holder("c-gone", "ns", "gone", "u-gone"), old),
        lease("10.0.0.2", holder("c-replaced", "ns", "replaced", "u-old"), old),
        lease("10.0.0.3", holder("c-live", "ns", "live", "u-live"), old),
        lease("10.0.0.4", holder("c-young", "ns", "young-gone", "u-young"), young),
        manual("10.0.0.5", old),
        lease("10.0.0.6", holder("c-nopod", "", "", ""), old),
        lease("10.0.0.7", holder("c-nouid-live", "ns", "nouid", ""), old),
        lease("10.0.0.8", holder("c-nouid-gone", "other", "nouid-gone", ""), old),
    ];
    let (engine, store) = engine_with(leases).await;
    let pods = FakePods::with(&[
        ("ns", "replaced", "u-new"),
        ("ns", "live", "u-live"),
        ("ns", "nouid", "u-whatever"),
        ("ns", "unrelated", "u-x"),
    ]);
    (engine, store, pods)
}

#[tokio::test]
async fn dry_run_and_real_pass_agree_and_only_stale_old_pod_leases_go() {
    let (engine, store, pods) = mixed().await;
    let before = held(&engine).await;
    let commits = store.0.lock().expect("lock").len();
    let dry =
        pass(&engine, &pods, PassOptions { dry_run: true, grace: GRACE }, now_ms()).await.expect("dry run");
    assert_eq!(
        summary(&dry),
        vec![
            ("10.0.0.1".to_string(), "pod-gone", "would-free"),
            ("10.0.0.2".to_string(), "pod-replaced", "would-free"),
            ("10.0.0.4".to_string(), "pod-gone", "kept-young"),
            ("10.0.0.8".to_string(), "pod-gone", "would-free"),
        ]
    );
    assert_eq!((dry.leases_checked, dry.pods_listed), (6, 4));
    assert_eq!(dry.entries[1].detail, "pod has uid u-new, the lease was taken by uid u-old");
    assert!(dry.entries[0].age >= Duration::from_secs(3600), "{:?}", dry.entries[0].age);
    // A dry run changes nothing.
    assert_eq!(held(&engine).await, before);
    assert_eq!(store.0.lock().expect("lock").len(), commits);

    let real =
        pass(&engine, &pods, PassOptions { dry_run: false, grace: GRACE }, now_ms()).await.expect("pass");
    let freed: Vec<_> =
        real.entries.iter().filter(|e| e.action == Action::Freed).map(|e| e.lease.address).collect();
    let would: Vec<_> =
        dry.entries.iter().filter(|e| e.action == Action::WouldFree).map(|e| e.lease.address).collect();
    assert_eq!(freed, would, "the real pass frees exactly what the dry run listed");
    assert_eq!(real.freed(), 3);
    assert_eq!(
        held(&engine).await,
        [
            ("10.0.0.3", "c-live"),
            ("10.0.0.4", "c-young"),
            ("10.0.0.5", ""),
            ("10.0.0.6", "c-nopod"),
            ("10.0.0.7", "c-nouid-live")
        ]
        .map(|(a, c)| (a.to_string(), c.to_string()))
        .to_vec()
    );
    // The deletes reached the store.
    let deleted: Vec<IpAddr> = store
        .0
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|c| if let Change::DeleteLease { address, .. } = c { Some(*address) } else { None })
        .collect();
    assert_eq!(deleted, freed);
    // Each candidate past grace was read again before it was freed; the young one was not.
    assert_eq!(*pods.gets.lock().expect("lock"), ["ns/gone", "ns/replaced", "other/nouid-gone"].repeat(2));

    // A third pass has nothing left to free.
    let again =
        pass(&engine, &pods, PassOptions { dry_run: false, grace: GRACE }, now_ms()).await.expect("pass");
    assert_eq!(summary(&again), vec![("10.0.0.4".to_string(), "pod-gone", "kept-young")]);
    // With no grace the young one goes too.
    let zero = pass(&engine, &pods, PassOptions { dry_run: false, grace: Duration::ZERO }, now_ms()).await;
    assert_eq!(summary(&zero.expect("pass")), vec![("10.0.0.4".to_string(), "pod-gone", "freed")]);
}

/// A pod recreated under the same name takes its lease back (a new sandbox, new UID) after
/// the pass listed pods without it: the conditional release sees another holder and keeps
/// the lease.
#[tokio::test]
async fn the_lease_snapshot_is_read_in_pages_and_misses_none() {
    let old = now_ms() - HOUR_MS;
    let per_net = SNAPSHOT_PAGE + SNAPSHOT_PAGE / 2;
    let mut leases = Vec::new();
    for net in ["", "rail0"] {
        for i in 0..per_net {
            let ip = std::net::Ipv4Addr::from(0x0a00_0001 + i as u32).to_string();
            let l = lease(&ip, holder(&format!("c{i}"), "ns", &format!("p{i}"), ""), old);
            leases.push(Lease { network: net.into(), ..l });
        }
    }
    // A manual reservation between the two networks' pages is never judged.
    leases.push(manual("10.200.0.1", old));
    let (engine, _store) = engine_with(leases).await;
    // Every pod is there but two, on either side of a page boundary (in both networks).
    let pods = FakePods::default();
    let gone = [SNAPSHOT_PAGE - 1, SNAPSHOT_PAGE];
    for i in (0..per_net).filter(|i| !gone.contains(i)) {
        pods.put("ns", &format!("p{i}"), "");
    }
    let report =
        pass(&engine, &pods, PassOptions { dry_run: true, grace: GRACE }, now_ms()).await.expect("dry run");
    assert_eq!(report.leases_checked, 2 * per_net);
    let stale: Vec<String> =
        report.entries.iter().map(|e| format!("{}/{}", e.lease.network, e.lease.holder.pod.name)).collect();
    let want: Vec<String> =
        ["", "rail0"].iter().flat_map(|net| gone.map(|i| format!("{net}/p{i}"))).collect();
    assert_eq!(stale, want, "the stale leases on both sides of page boundaries");
}

#[tokio::test]
async fn a_pod_recreated_while_the_pass_runs_keeps_its_lease() {
    let old = now_ms() - HOUR_MS;
    let (engine, _store) =
        engine_with(vec![lease("10.0.0.9", holder("c-old", "ns", "db-0", "u1"), old)]).await;
    let pods = Arc::new(FakePods::default());
    let (p, e) = (pods.clone(), engine.clone());
    *pods.hook.lock().expect("lock") = Some(Box::new(move || {
        Box::pin(async move {
            // After the list (which has no db-0) and before the pass goes on.
            p.put("ns", "db-0", "u2");
            let req = AllocateRequest {
                attachment: holder("c-new", "ns", "db-0", "u2"),
                network: "".into(),
                ranges: vec![
                    RangeSpec::parse(
                        &RangeInput { range: "10.0.0.0/24".into(), ..Default::default() },
                        FieldPrefix(""),
                    )
                    .expect("range"),
                ],
                requested: vec![],
            };
            let got = e.call(move |a, now| a.allocate(&req, now)).await.expect("engine").expect("allocate");
            assert_eq!(got[0].address.to_string(), "10.0.0.9", "the pod got its old address back");
        })
    }));
    let r = pass(&engine, pods.as_ref(), PassOptions { dry_run: false, grace: GRACE }, now_ms())
        .await
        .expect("pass");
    assert_eq!(summary(&r), vec![("10.0.0.9".to_string(), "pod-replaced", "kept-changed")]);
    assert_eq!(r.entries[0].detail, "the lease changed since it was read");
    assert_eq!(held(&engine).await, vec![("10.0.0.9".to_string(), "c-new".to_string())]);
}

/// A list that missed a live pod (older than the truth) is corrected by the second read.
#[tokio::test]
async fn the_second_read_keeps_a_pod_a_stale_list_missed() {
    let old = now_ms() - HOUR_MS;
    let (engine, _store) = engine_with(vec![lease("10.0.0.1", holder("c1", "ns", "web", "u1"), old)]).await;
    let pods = FakePods::with(&[("ns", "web", "u1")]);
    *pods.stale_list.lock().expect("lock") = Some(Vec::new());
    for dry_run in [true, false] {
        let r = pass(&engine, &pods, PassOptions { dry_run, grace: GRACE }, now_ms()).await.expect("pass");
        assert_eq!(summary(&r), vec![("10.0.0.1".to_string(), "pod-gone", "kept-pod-live")]);
    }
    assert_eq!(held(&engine).await, vec![("10.0.0.1".to_string(), "c1".to_string())]);
}

#[tokio::test]
async fn read_failures_free_nothing() {
    let old = now_ms() - HOUR_MS;
    let (engine, _store) = engine_with(vec![lease("10.0.0.1", holder("c1", "ns", "web", "u1"), old)]).await;
    let pods = FakePods::default();
    *pods.fail_get.lock().expect("lock") = Some("connection refused".into());
    let r = pass(&engine, &pods, PassOptions { dry_run: false, grace: GRACE }, now_ms()).await.expect("pass");
    assert_eq!(summary(&r), vec![("10.0.0.1".to_string(), "pod-gone", "failed")]);
    assert_eq!(r.entries[0].detail, "reading the pod again: pod ns/web: connection refused");
    assert_eq!(r.entries[0].failed_at, Some("get-pod"));
    *pods.fail_list.lock().expect("lock") = Some("403 forbidden".into());
    let err = pass(&engine, &pods, PassOptions { dry_run: false, grace: GRACE }, now_ms())
        .await
        .expect_err("fails");
    assert_eq!(err.to_string(), "listing pods: 403 forbidden");
    let cause = std::error::Error::source(&err).expect("the pod source's error");
    assert_eq!(cause.to_string(), "403 forbidden");
    assert_eq!(held(&engine).await.len(), 1);
}

#[tokio::test]
async fn reconciler_counts_passes_and_refuses_without_pods() {
    let mut builder = Metrics::builder();
    let counted = ReconcileMetrics::register(builder.sub_registry("reconcile"));
    let metrics = builder.build();
    let (engine, _store) = mixed_engine_only().await;
    let none = Reconciler::disabled();
    let err = none.run(&engine, false, None).await.expect_err("no pods");
    assert_eq!(
        err.to_string(),
        "reconcile needs the Kubernetes API to see pods (run in a cluster or pass --kubeconfig)"
    );
    let (_, _, pods) = mixed().await;
    let r = Reconciler::new(Some(Arc::new(pods)), Duration::ZERO, GRACE, counted);
    r.run(&engine, true, None).await.expect("dry run");
    let real = r.run(&engine, false, None).await.expect("pass");
    assert_eq!(real.grace, GRACE);
    let text = metrics.render(&[], &[], 0, true);
    for line in [
        "rustipam_reconcile_runs_total{mode=\"dry-run\",result=\"ok\"} 1",
        "rustipam_reconcile_runs_total{mode=\"real\",result=\"ok\"} 1",
        "rustipam_reconcile_freed_total{reason=\"pod-gone\"} 2",
        "rustipam_reconcile_freed_total{reason=\"pod-replaced\"} 1",
        "rustipam_reconcile_kept_total{action=\"kept-young\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
    }
}

async fn mixed_engine_only() -> (Engine, MemStore) {
    let (engine, store, _) = mixed().await;
    (engine, store)
}

#[tokio::test(start_paused = true)]
async fn only_the_leader_runs_the_timer() {
    let old = now_ms() - HOUR_MS;
    let (engine, _store) = engine_with(vec![lease("10.0.0.1", holder("c1", "ns", "gone", "u1"), old)]).await;
    let (tx, mut listed) = tokio::sync::mpsc::unbounded_channel();
    let pods = Arc::new(FakePods { listed: Some(tx), ..FakePods::default() });
    let every = Duration::from_secs(300);
    let r = Reconciler::new(Some(pods.clone()), every, GRACE, ReconcileMetrics::default());
    let (role, rx) = tokio::sync::watch::channel(Role::Follower(None));
    let timer = r.spawn_timer(Serving::new(rx)).expect("timer");

    // An hour as a follower: twelve ticks, no pass.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(pods.lists.load(Ordering::SeqCst), 0);

    role.send(Role::Leader(engine.clone())).expect("send");
    let became_leader = tokio::time::Instant::now();
    listed.recv().await.expect("a pass lists pods");
    assert!(became_leader.elapsed() <= every, "{:?}", became_leader.elapsed());
    // The pass goes on to free the lease.
    let mut freed = false;
    for _ in 0..1000 {
        if held(&engine).await.is_empty() {
            freed = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(freed, "the leader's timer pass freed the stale lease");

    role.send(Role::Follower(None)).expect("send");
    let lists = pods.lists.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    // At most a pass that had already started when leadership ended.
    assert!(pods.lists.load(Ordering::SeqCst) <= lists + 1);
    timer.abort();

    // No timer at all with a zero interval or without pods.
    let m = ReconcileMetrics::default;
    let (_, rx) = tokio::sync::watch::channel(Role::Follower(None));
    assert!(
        Reconciler::new(Some(pods), Duration::ZERO, GRACE, m())
            .spawn_timer(Serving::new(rx.clone()))
            .is_none()
    );
    assert!(Reconciler::new(None, every, GRACE, m()).spawn_timer(Serving::new(rx)).is_none());
}

#[test]
fn table_is_aligned_with_a_header() {
    let rows = vec![
        Row {
            network: String::new(),
            address: "10.0.0.1".into(),
            pod: "ns/web-0".into(),
            node: "node-a".into(),
            container: "0123456789abcdef".into(),
            age: Duration::from_secs(7300),
            reason: "pod-gone".into(),
            action: "freed".into(),
        },
        Row {
            network: "storage".into(),
            address: "fd00::10".into(),
            pod: "ns/db".into(),
            node: String::new(),
            container: "c2".into(),
            age: Duration::from_secs(30),
            reason: "pod-replaced".into(),
            action: "kept-young".into(),
        },
    ];
    assert_eq!(
        table(&rows),
        "NETWORK  ADDRESS   POD       NODE    CONTAINER     AGE  REASON        ACTION\n\
         -        10.0.0.1  ns/web-0  node-a  0123456789ab  2h   pod-gone      freed\n\
         storage  fd00::10  ns/db     -       c2            30s  pod-replaced  kept-young\n"
    );
    assert_eq!(age_text(Duration::from_secs(3 * 86_400)), "3d");
    assert_eq!(age_text(Duration::from_secs(600)), "10m");
}

#[tokio::test]
async fn a_deleted_nodes_block_goes_back_after_the_grace_period_once_empty() {
    use crate::pools::selector::{Kind, LabelMap, Labels};
    let (engine, _) = engine_with(Vec::new()).await;
    let cidr = |s: &str| s.parse::<crate::allocator::Block>().expect("block");
    // n1 and n2 each have a block of rail0; n2 still holds an address in its block.
    engine
        .call(move |a, now| {
            a.assign_block("rail0", cidr("198.18.0.0/29"), "n1", now);
            a.assign_block("rail0", cidr("198.18.0.8/29"), "n2", now);
            let on_n2 = Attachment { node: "n2".into(), ..Attachment::default() };
            let mut l =
                lease("198.18.0.10", Arc::new(Attachment { container_id: "c2".into(), ..on_n2 }), now);
            l.network = "rail0".into();
            a.adopt(l).expect("adopt");
        })
        .await
        .expect("engine");
    let labels = Labels::followed();
    let blocks = blocks::NodeBlocks::new(labels.clone(), Duration::from_secs(60));
    let t0 = 1_000_000;
    // Before the Nodes are read, nothing is judged.
    assert!(blocks.pass(&engine, false, t0).await.is_empty());
    let nodes =
        |names: &[&str]| -> LabelMap { names.iter().map(|n| (n.to_string(), BTreeMap::new())).collect() };
    labels.replace(Kind::Node, nodes(&["n1", "n2"]));
    assert!(blocks.pass(&engine, false, t0).await.is_empty(), "both nodes exist");
    labels.replace(Kind::Node, nodes(&[]));
    let judged = |entries: Vec<Entry>| -> Vec<(String, &'static str, &'static str)> {
        entries.iter().map(|e| (e.lease.holder.node.clone(), e.reason.as_str(), e.action.as_str())).collect()
    };
    let at = |s: &[(&str, &'static str)]| -> Vec<(String, &'static str, &'static str)> {
        s.iter().map(|(n, a)| (n.to_string(), "node-gone", *a)).collect()
    };
    // Gone, but not for the grace period yet.
    assert_eq!(
        judged(blocks.pass(&engine, false, t0).await),
        at(&[("n1", "kept-young"), ("n2", "kept-young")])
    );
    // n1 comes back before the grace period passes: its clock starts again.
    labels.replace(Kind::Node, nodes(&["n1"]));
    assert_eq!(judged(blocks.pass(&engine, false, t0 + 30_000).await), at(&[("n2", "kept-young")]));
    labels.replace(Kind::Node, nodes(&[]));
    assert_eq!(
        judged(blocks.pass(&engine, true, t0 + 61_000).await),
        at(&[("n1", "kept-young"), ("n2", "kept-pod-live")])
    );
    // n1 has been gone since t0 + 61 s again; n2 since t0.
    assert_eq!(
        judged(blocks.pass(&engine, false, t0 + 120_000).await),
        at(&[("n1", "kept-young"), ("n2", "kept-pod-live")])
    );
    assert_eq!(
        judged(blocks.pass(&engine, false, t0 + 121_000).await),
        at(&[("n1", "freed"), ("n2", "kept-pod-live")])
    );
    let left = engine.call(|a, _| a.assigned_blocks()).await.expect("engine");
    assert_eq!(
        left.iter().map(|(_, b, n, _)| (b.to_string(), n.as_str())).collect::<Vec<_>>(),
        [("198.18.0.8/29".to_string(), "n2")]
    );
    // n2's address goes (its pod's lease freed): the block follows at the next pass.
    engine
        .call(|a, now| a.release_address("rail0", "198.18.0.10".parse().expect("ip"), now))
        .await
        .expect("engine")
        .expect("held");
    assert_eq!(judged(blocks.pass(&engine, false, t0 + 122_000).await), at(&[("n2", "freed")]));
    assert!(engine.call(|a, _| a.assigned_blocks()).await.expect("engine").is_empty());
}

/// A keeper whose answer a test sets: whether owners want their leases.
#[derive(Debug, Default)]
struct FakeKeeper(std::sync::atomic::AtomicBool);

impl Keeper for FakeKeeper {
    fn owner<'a>(
        &'a self,
        _: &'a PodRef,
        _: &'a str,
    ) -> BoxFuture<'a, Result<Option<crate::allocator::Owner>, crate::keep::KeepError>> {
        Box::pin(async { Ok(None) })
    }
    fn claim_of_pod<'a>(
        &'a self,
        _: &'a PodRef,
        _: &'a str,
    ) -> BoxFuture<'a, Result<String, crate::keep::KeepError>> {
        Box::pin(async { Ok(String::new()) })
    }
    fn keeps(&self, _: &Lease) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    fn claim_allocated<'a>(&'a self, _: &'a str, _: &'a str, _: Vec<String>) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

#[tokio::test]
async fn a_pass_leaves_what_the_owner_keeps_and_frees_it_once_the_owner_lets_go() {
    let old = now_ms() - HOUR_MS;
    let set = crate::allocator::Owner::StatefulSet { name: "web".into(), uid: "s".into() };
    let kept = Arc::new(Attachment {
        owner: Some(set),
        kept: true,
        ..(*holder("c-web", "ns", "web-0", "u")).clone()
    });
    let (engine, _) = engine_with(vec![
        lease("10.0.0.1", kept, old),
        lease("10.0.0.2", holder("c-gone", "ns", "gone", "u"), old),
    ])
    .await;
    let pods = FakePods::with(&[]);
    let fake = Arc::new(FakeKeeper::default());
    fake.0.store(true, Ordering::SeqCst);
    let keeper: Arc<dyn Keeper> = fake.clone();
    let opts = PassOptions { dry_run: false, grace: GRACE };
    let r = pass_keeping(&engine, &pods, Some(&keeper), opts, now_ms()).await.expect("pass");
    assert_eq!(summary(&r), vec![("10.0.0.2".to_string(), "pod-gone", "freed")]);
    assert_eq!(held(&engine).await, vec![("10.0.0.1".to_string(), "c-web".to_string())]);
    fake.0.store(false, Ordering::SeqCst);
    let r = pass_keeping(&engine, &pods, Some(&keeper), opts, now_ms()).await.expect("pass");
    assert_eq!(summary(&r), vec![("10.0.0.1".to_string(), "pod-gone", "freed")]);
    assert!(held(&engine).await.is_empty());
}

#[test]
fn the_conditional_release_keeps_what_the_owner_wants() {
    let mut a = Allocator::new();
    let set = crate::allocator::Owner::StatefulSet { name: "web".into(), uid: "s".into() };
    let l = lease(
        "10.0.0.1",
        Arc::new(Attachment { owner: Some(set), ..(*holder("c", "ns", "web-0", "u")).clone() }),
        10,
    );
    a.adopt(l.clone()).expect("adopt");
    let fake = Arc::new(FakeKeeper::default());
    fake.0.store(true, Ordering::SeqCst);
    let keeper: Arc<dyn Keeper> = fake.clone();
    assert_eq!(release_unless_kept(&mut a, &l, Some(&keeper), 100, 1), None);
    fake.0.store(false, Ordering::SeqCst);
    assert!(release_unless_kept(&mut a, &l, Some(&keeper), 100, 1).is_some());
}
