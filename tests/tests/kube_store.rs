//! The kube lease store through the real kube client against a real kube-apiserver
//! (`rust_ipam_e2e::envtest`), as the server's ServiceAccount with deploy/'s RBAC: the API
//! server enforces AlreadyExists, resourceVersion and uid preconditions and pagination.
//! Two tests keep the stand-in (`rust_ipam_e2e::kube_standin`): for objects the real
//! server's schema refuses, and for a create answered with a timeout and applied later;
//! each says why.

use std::time::{Duration, Instant};

use ipam_server::allocator::LeaseFilter;
use ipam_server::engine::{Engine, EngineError};
use ipam_server::k8s::store::{Fence, KubeStore};
use ipam_server::metrics::Metrics;
use rust_ipam_e2e::engine::{allocate, kube_engine, kube_engine_paged};
use rust_ipam_e2e::envtest::{self, SERVER_ACCOUNT, TestNamespace};
use rust_ipam_e2e::fixtures::{held_by_container, iplease, ipleases_path, lease_objects, objects};
use rust_ipam_e2e::kube_standin::KubeStandin;
use serde_json::{Value, json};

/// Before a new engine loads what was just written. A new leader lists the leases from the
/// API server's watch cache, which trails etcd by milliseconds; in a cluster another
/// replica leads a third of the TTL or more after the last write (src/k8s/store.rs), so the
/// cache has it by then. A test that loads at once could read the cache just behind.
async fn cache_catches_up() {
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// An engine in `ns` of the test API server, as the server's ServiceAccount.
async fn engine(ns: &TestNamespace) -> (Engine, Fence) {
    kube_engine(ns.client(SERVER_ACCOUNT).await.expect("server client"), &ns.name).await
}

/// The test API server and a fresh namespace, or `None` after SKIP.
async fn namespace(test: &str) -> Option<TestNamespace> {
    let env = envtest::shared(test)?;
    Some(env.namespace("kube-store").await.expect("namespace"))
}

/// (address, container ID) of every lease object in `ns`, sorted.
async fn stored(ns: &TestNamespace) -> Vec<(String, String)> {
    let client = ns.client(SERVER_ACCOUNT).await.expect("client");
    let mut v: Vec<(String, String)> =
        lease_objects(&client, &ns.name).await.into_iter().map(|o| (o.address, o.container_id)).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_that_both_believe_they_lead_never_persist_a_duplicate() {
    let Some(ns) = namespace("two_servers_that_both_believe_they_lead_never_persist_a_duplicate").await
    else {
        return;
    };
    let (a, _fa) = engine(&ns).await;
    let (b, _fb) = engine(&ns).await;
    // Both start empty and race for the same /26 with 30 pods each.
    let mut tasks = Vec::new();
    for i in 0..30 {
        for (tag, e) in [("a", a.clone()), ("b", b.clone())] {
            tasks.push(tokio::spawn(async move {
                let cid = format!("{tag}-{i}");
                let got = allocate(&e, "198.18.0.0/26", &cid, &cid).await;
                (cid, got)
            }));
        }
    }
    let mut acked = Vec::new();
    for t in tasks {
        let (cid, got) = t.await.expect("join");
        match got {
            Ok(Ok(ip)) => acked.push((ip.to_string(), cid)),
            // Refused four times in a row is allowed under this much contention; never a
            // wrong answer.
            Ok(Err(e)) => panic!("{cid}: allocator error {e}"),
            Err(e) => assert!(matches!(e, EngineError::Conflict(_)), "{cid}: {e}"),
        }
    }
    acked.sort();
    let mut addrs: Vec<&String> = acked.iter().map(|(ip, _)| ip).collect();
    addrs.dedup();
    assert_eq!(addrs.len(), acked.len(), "an address was acknowledged to two holders: {acked:?}");
    // Every acknowledged lease is in the store with its holder, and nothing else is.
    assert_eq!(stored(&ns).await, acked);
    // Liveness: refusals are rare even in this worst case (two full views diverging).
    assert!(acked.len() >= 45, "only {} of 60 allocations succeeded", acked.len());
    // Both started from the same empty view, so both won some: the race was real.
    for tag in ["a-", "b-"] {
        assert!(acked.iter().any(|(_, cid)| cid.starts_with(tag)), "no {tag} allocation won: {acked:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leaders_writes_are_rejected_not_applied() {
    let Some(ns) = namespace("a_deposed_leaders_writes_are_rejected_not_applied").await else { return };
    let (old, _f) = engine(&ns).await;
    let first = allocate(&old, "198.18.1.0/24", "c1", "trainer").await.expect("engine").expect("allocate");
    assert_eq!(first.to_string(), "198.18.1.1");

    // A new leader loads the store; the pod comes back in a new sandbox and its lease moves
    // (the object is updated, so its resourceVersion changes).
    cache_catches_up().await;
    let (new, _g) = engine(&ns).await;
    let moved = allocate(&new, "198.18.1.0/24", "c2", "trainer").await.expect("engine").expect("allocate");
    assert_eq!(moved, first);
    let taken = allocate(&new, "198.18.1.0/24", "c3", "other").await.expect("engine").expect("allocate");
    assert_eq!(taken.to_string(), "198.18.1.2");

    // The old leader, unaware, releases c1 (a DEL that reached it late): its delete carries
    // the old resourceVersion and is refused; the moved lease stays.
    old.call(|a, now| a.release("", "c1", "net1", now)).await.expect("answered, with what the store says");
    assert_eq!(
        stored(&ns).await,
        vec![("198.18.1.1".into(), "c2".into()), ("198.18.1.2".into(), "c3".into())]
    );
    // And it learned the truth: c2 holds .1 now.
    let holder = old
        .call(|a, _| a.get("", "198.18.1.1".parse().expect("ip")).map(|l| l.holder.container_id.clone()))
        .await;
    assert_eq!(holder.expect("engine").expect("held"), "c2");

    // Its allocation of what it thinks is free (.2) is refused by AlreadyExists, and it
    // chooses again.
    let late = allocate(&old, "198.18.1.0/24", "c4", "late").await.expect("engine").expect("allocate");
    assert_eq!(late.to_string(), "198.18.1.3");
    assert_eq!(stored(&ns).await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_server_writes_nothing_and_stops() {
    let Some(ns) = namespace("a_fenced_server_writes_nothing_and_stops").await else { return };
    let (e, fence) = engine(&ns).await;
    fence.close();
    let err = allocate(&e, "198.18.2.0/24", "c1", "p").await.expect_err("fenced");
    assert_eq!(err.to_string(), "not the leader: this server does not hold the leader lease");
    assert!(stored(&ns).await.is_empty());
    e.stopped().await;
    assert!(e.is_stopped());
}

/// Once from the watch cache (what a new leader with no mirror does) and once from etcd
/// in pages (what a replica does whose own writes just landed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_rebuilds_the_bitmaps_from_the_cache_and_from_paged_lists() {
    const TEST: &str = "a_restart_rebuilds_the_bitmaps_from_the_cache_and_from_paged_lists";
    let Some(ns) = namespace(TEST).await else { return };
    let (e, _f) = engine(&ns).await;
    let mut tasks = Vec::new();
    for i in 0..1200 {
        let e = e.clone();
        tasks.push(tokio::spawn(async move {
            allocate(&e, "198.18.16.0/20", &format!("c{i}"), &format!("p{i}")).await
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.expect("join").expect("engine").expect("allocate"));
    }
    // The 1200 requests reach the engine in any order: c7 holds whichever address it got.
    let c7 = got[7];
    e.call(|a, now| a.release("", "c7", "net1", now)).await.expect("release");
    drop(e);
    cache_catches_up().await;
    let client = ns.client(SERVER_ACCOUNT).await.expect("server client");
    // 1199 objects: at once, then in three pages of 500.
    for page in [None, Some(500)] {
        let (again, _g) = kube_engine_paged(client.clone(), &ns.name, page).await;
        let leases = again.call(|a, _| a.leases(&LeaseFilter::default())).await.expect("engine");
        let mut from_memory: Vec<(String, String)> =
            leases.iter().map(|l| (l.address.to_string(), l.holder.container_id.clone())).collect();
        from_memory.sort();
        assert_eq!(from_memory.len(), 1199, "listed with pages {page:?}");
        assert_eq!(from_memory, stored(&ns).await, "listed with pages {page:?}");
        let pools = again.call(|a, _| a.pools(None)).await.expect("engine");
        assert_eq!((pools.len(), pools[0].used, pools[0].free), (1, 1199, 4094 - 1199));
        // The freed address is the only free one below the 1199 held, so it comes first
        // again; released, so the next load finds the same 1199.
        let next = allocate(&again, "198.18.16.0/20", "new", "new").await.expect("engine").expect("allocate");
        assert_eq!(next, c7);
        again.call(|a, now| a.release("", "new", "net1", now)).await.expect("release");
        drop(again);
        cache_catches_up().await;
    }
}

/// Stand-in: the real API server refuses `"prefixLen": "wide"` and a missing spec by the
/// CRD's schema, but such objects exist after a schema change or a restore from backup;
/// the stand-in stores whatever it is given. The same test with the objects the real
/// server accepts follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_edited_nonsense_is_skipped_and_never_causes_a_duplicate() {
    let standin = KubeStandin::start().await.expect("stand-in");
    let config = kube::Config::new(standin.url.parse().expect("stand-in URL"));
    let client = || kube::Client::try_from(config.clone()).expect("kube client");
    let (e, _f) = kube_engine(client(), "rust-ipam").await;
    for i in 1..=3 {
        allocate(&e, "198.18.3.0/24", &format!("c{i}"), &format!("p{i}"))
            .await
            .expect("engine")
            .expect("allocate");
    }
    drop(e);
    let leases = ipleases_path("rust-ipam");
    let good = standin.objects(&leases)[0].clone();
    // A copy of .1's object under another name: it must not make .1 look held twice, nor
    // free .1 if someone deletes the copy.
    let mut copy = good.clone();
    copy["metadata"] = json!({"name": "198.18.3.9"});
    standin.put_raw(&leases, copy);
    // Nonsense under .4's proper name: the address stays held by something unreadable.
    standin.put_raw(&leases, iplease("198.18.3.4", json!({"address": "banana", "prefixLen": 24})));
    standin.put_raw(&leases, iplease("no-spec", Value::Null));
    standin.put_raw(&leases, iplease("198.18.3.6", json!({"address": "198.18.3.6", "prefixLen": "wide"})));

    let (e, _g) = kube_engine(client(), "rust-ipam").await;
    let n = e.call(|a, _| a.lease_count()).await.expect("engine");
    assert_eq!(n, 3, "only the three readable, properly named leases load");
    // .4 and .6 look free in memory, but their names are taken: the creates are refused,
    // memory marks them held by an unreadable object, and the allocation moves on.
    let got = allocate(&e, "198.18.3.0/24", "c9", "p9").await.expect("engine").expect("allocate");
    assert_eq!(got.to_string(), "198.18.3.5");
    let got = allocate(&e, "198.18.3.0/24", "c10", "p10").await.expect("engine").expect("allocate");
    assert_eq!(got.to_string(), "198.18.3.7");
    let blocker = e.call(|a, _| a.get("", "198.18.3.4".parse().expect("ip")).map(|l| l.note.clone())).await;
    let note = blocker.expect("engine").expect("held");
    assert!(note.starts_with("unreadable IPLease 198.18.3.4: spec: "), "{note}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_under_another_name_and_an_unreadable_address_are_skipped() {
    let Some(ns) = namespace("a_copy_under_another_name_and_an_unreadable_address_are_skipped").await else {
        return;
    };
    let (e, _f) = engine(&ns).await;
    for i in 1..=3 {
        allocate(&e, "198.18.3.0/24", &format!("c{i}"), &format!("p{i}"))
            .await
            .expect("engine")
            .expect("allocate");
    }
    drop(e);
    let admin = ns.admin_client().await.expect("admin");
    let mut good = objects(&admin, &ns.name, "IPLease").await[0].clone();
    let spec = good["spec"].clone();
    // A copy of .1's object under another name: it must not make .1 look held twice, nor
    // free .1 if someone deletes the copy. And an unparsable address under .4's name.
    good["metadata"] = json!({"name": "198.18.3.9"});
    envtest::create(&admin, Some(&ns.name), good).await.expect("copy");
    let mut banana = iplease("198.18.3.4", spec);
    banana["spec"]["address"] = json!("banana");
    envtest::create(&admin, Some(&ns.name), banana).await.expect("banana");

    cache_catches_up().await;
    let (e, _g) = engine(&ns).await;
    assert_eq!(e.call(|a, _| a.lease_count()).await.expect("engine"), 3);
    // .4 looks free in memory, but its name is taken: the create is refused, memory marks
    // it held by an unreadable object, and the allocation moves on.
    let got = allocate(&e, "198.18.3.0/24", "c9", "p9").await.expect("engine").expect("allocate");
    assert_eq!(got.to_string(), "198.18.3.5");
    let blocker = e.call(|a, _| a.get("", "198.18.3.4".parse().expect("ip")).map(|l| l.note.clone())).await;
    let note = blocker.expect("engine").expect("held");
    assert!(note.starts_with("unreadable IPLease 198.18.3.4: "), "{note}");
    assert_eq!(stored(&ns).await.len(), 6);
}

/// A new leader loads from the replica's mirror (a list, then a watch that brings what
/// changed after it), and its writes go through under the preconditions the watch
/// delivered. An account without `watch` (RBAC older than this server) leaves the mirror
/// failing, and the load lists instead of waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_loads_from_its_mirror_and_lists_when_it_cannot_watch() {
    const TEST: &str = "a_new_leader_loads_from_its_mirror_and_lists_when_it_cannot_watch";
    let Some(ns) = namespace(TEST).await else { return };
    let (e, _f) = engine(&ns).await;
    for i in 0..20 {
        allocate(&e, "198.18.32.0/24", &format!("c{i}"), &format!("p{i}"))
            .await
            .expect("engine")
            .expect("allocate");
    }
    let client = ns.client(SERVER_ACCOUNT).await.expect("client");
    let mirror = KubeStore::start_mirror(client.clone(), &ns.name);
    // Written while the mirror lists or watches: the watch brings both either way.
    let late = allocate(&e, "198.18.32.0/24", "late", "late").await.expect("engine").expect("allocate");
    let freed = e.call(|a, now| a.release("", "c3", "net1", now)).await.expect("engine");
    assert_eq!(freed.len(), 1);
    drop(e);
    // A new leader takes over a third of the lease TTL or more after the old one's last
    // write (src/k8s/mirror.rs): the watch has brought those writes by then. Taking over at
    // once, as this test could, would read the copy before they arrived; 5 s (the default
    // TTL is 2 s) leaves room for a loaded machine.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let leader = |client: kube::Client, mirror| {
        let fence = Fence::new();
        fence.open_until(Instant::now() + Duration::from_secs(3600));
        let store = KubeStore::new(client, &ns.name, tokio::runtime::Handle::current(), fence);
        Engine::start(Box::new(store.with_mirror(mirror)), Metrics::new())
    };
    let held = |e: Engine| async move {
        let leases = e.call(|a, _| a.leases(&LeaseFilter::default())).await.expect("engine");
        let mut v: Vec<(String, String)> =
            leases.iter().map(|l| (l.address.to_string(), l.holder.container_id.clone())).collect();
        v.sort();
        v
    };
    let again = leader(client, mirror).await.expect("load from the mirror");
    let loaded = held(again.clone()).await;
    assert_eq!(loaded.len(), 20, "{loaded:?}");
    assert!(loaded.contains(&(late.to_string(), "late".to_string())), "{loaded:?}");
    assert_eq!(loaded, stored(&ns).await);
    // Its delete carries the resourceVersion and uid the watch delivered, and applies.
    let freed = again.call(|a, now| a.release("", "late", "net1", now)).await.expect("engine");
    assert_eq!(freed.len(), 1);
    assert!(!stored(&ns).await.iter().any(|(_, cid)| cid == "late"));
    drop(again);

    // An account that may do everything the store does but watch.
    let admin = ns.admin_client().await.expect("admin");
    let objects = [
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "no-watch"}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "no-watch"},
               "rules": [{"apiGroups": ["ipam.rust-ipam.io"], "resources": ["ipleases"],
                          "verbs": ["get", "list", "create", "update", "delete"]},
                         {"apiGroups": ["ipam.rust-ipam.io"], "resources": ["rangepools"],
                          "verbs": ["list", "create"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "no-watch"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "no-watch"},
               "subjects": [{"kind": "ServiceAccount", "name": "no-watch", "namespace": ns.name}]}),
    ];
    for o in objects {
        envtest::create(&admin, Some(&ns.name), o).await.expect("create");
    }
    let kubeconfig = kube::config::Kubeconfig::read_from(&ns.admin_kubeconfig).expect("kubeconfig");
    let mut cfg =
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.expect("config");
    cfg.auth_info.impersonate = Some(format!("system:serviceaccount:{}:no-watch", ns.name));
    let no_watch = kube::Client::try_from(cfg).expect("client");
    let mirror = KubeStore::start_mirror(no_watch.clone(), &ns.name);
    let third = tokio::time::timeout(Duration::from_secs(30), leader(no_watch, mirror))
        .await
        .expect("the load waited for a mirror that cannot watch")
        .expect("load by listing");
    assert_eq!(held(third).await, stored(&ns).await);
}

/// A create answered 504 Timeout and applied a moment later: the API server's request
/// timeout fired while etcd still committed the write. The stand-in injects it; a real
/// server shows it only by chance (a loaded etcd, a restart). The write is settled, not
/// given up: the pod is told the address its object holds, no second object is left for
/// it, and memory agrees with the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_answered_with_a_timeout_and_applied_later_leaves_one_object_for_its_pod() {
    let standin = KubeStandin::start().await.expect("stand-in");
    let config = kube::Config::new(standin.url.parse().expect("stand-in URL"));
    let client = kube::Client::try_from(config).expect("kube client");
    let (e, _f) = kube_engine(client.clone(), "rust-ipam").await;
    let late = Duration::from_millis(300);
    standin.answer_creates_late(1, late);
    let first = allocate(&e, "198.18.4.0/24", "c1", "p1").await.expect("engine").expect("allocate");
    tokio::time::sleep(late * 2).await;
    let second = allocate(&e, "198.18.4.0/24", "c2", "p2").await.expect("engine").expect("allocate");
    assert_ne!(first, second);
    assert_eq!(
        held_by_container(&client, "rust-ipam").await,
        vec![("c1".to_string(), first.to_string()), ("c2".to_string(), second.to_string())],
        "each pod holds what it was told, once"
    );
}
