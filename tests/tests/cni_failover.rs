//! Failover as pods see it: two `rust-ipam-server` replicas with the shipped election
//! defaults on a real kube-apiserver, ten CNI clients running the real `rust-ipam` plugin
//! (ADD after ADD, both replicas in its `server` list), and the leader killed with `kill -9`
//! and then, after a restart, stopped with SIGTERM as a rolling update does. No ADD may
//! fail, the longest time without an answered ADD is printed and bounded, and every
//! answered address is in the API server once.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rust_ipam_e2e::cni_load::{CLIENTS, Load, Outcome, longest_gap};
use rust_ipam_e2e::envtest::{self, SERVER_ACCOUNT, TestNamespace};
use rust_ipam_e2e::fixtures::{lease_objects, status};
use rust_ipam_e2e::{ServerOptions, ServerProcess};

/// A replica with the shipped election defaults: no --lease-ttl or --renew-every.
fn options(ns: &TestNamespace, identity: &str, log: PathBuf) -> ServerOptions {
    ServerOptions::kube_replica(identity, &ns.kubeconfig(SERVER_ACCOUNT), &ns.name, log, &[])
}

async fn serving(endpoint: &str) -> bool {
    status(endpoint).await.is_some_and(|s| s.serving)
}

/// Index of the replica that serves, once one does.
async fn leader(replicas: &[&ServerProcess]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for (i, r) in replicas.iter().enumerate() {
            if serving(&r.endpoint).await {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "no replica served within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the load across `event` (a leader loss), until the replica left has answered for
/// two seconds; asserts no ADD failed; the outcomes and the longest gap after the event.
async fn across(
    servers: Vec<String>,
    tag: &str,
    event: impl FnOnce() -> Instant,
) -> (Vec<Outcome>, Duration) {
    let load = Load::start(servers, tag, false);
    load.wait_answers(Instant::now(), 50, Duration::from_secs(30), &format!("before the {tag}")).await;
    // The event is timed from a moment an ADD had just been answered, so the gap measured
    // from it includes all of the outage.
    let at = tokio::task::block_in_place(event);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let after = load.answered_since(at + Duration::from_millis(100));
        let first = load.first_answer_after(at);
        if after > 0 && first.is_some_and(|f| f.elapsed() > Duration::from_secs(2)) {
            break;
        }
        assert!(Instant::now() < deadline, "no ADD was answered within 30 s of the {tag}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let outcomes = load.stop();
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} ADDs failed across the {tag}: {failed:?}",
        failed.len(),
        outcomes.len()
    );
    let gap = longest_gap(&outcomes, at);
    (outcomes, gap)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_and_rolling_stop_fail_no_add() {
    let Some(env) = envtest::shared("leader_kill_and_rolling_stop_fail_no_add") else { return };
    let ns = env.namespace("cni-failover").await.expect("namespace");
    let dir = tempfile::tempdir().expect("tempdir");
    let start = |name: &str| {
        let (ns, dir) = (ns.clone(), dir.path().to_path_buf());
        let name = name.to_string();
        async move {
            ServerProcess::start_with(&dir.join(&name), &options(&ns, &name, dir.join(format!("{name}.log"))))
                .await
                .expect("replica")
        }
    };
    let mut a = start("replica-a").await;
    let mut b = start("replica-b").await;
    let first = leader(&[&a, &b]).await;
    if first == 1 {
        std::mem::swap(&mut a, &mut b);
    }
    // a leads, b follows.
    let servers = vec![a.endpoint.clone(), b.endpoint.clone()];
    let (killed, kill_gap) = across(servers, "kill", || {
        let t = Instant::now();
        a.kill_hard().expect("kill -9 the leader");
        t
    })
    .await;
    assert!(serving(&b.endpoint).await, "the follower leads after the kill");

    // The killed replica comes back (as a new pod would) and follows; the leader is then
    // stopped as a rolling update stops it.
    let c = start("replica-c").await;
    assert_eq!(leader(&[&b, &c]).await, 0, "the restarted replica follows");
    let servers = vec![b.endpoint.clone(), c.endpoint.clone()];
    let (stopped, stop_gap) = across(servers, "rolling stop", || {
        let t = Instant::now();
        let status = b.terminate().expect("SIGTERM the leader");
        assert!(status.success(), "the leader exits cleanly on SIGTERM: {status}");
        t
    })
    .await;
    assert!(serving(&c.endpoint).await, "the restarted replica leads after the stop");

    // Every answered address is stored once, for its pod.
    let admin = ns.admin_client().await.expect("admin client");
    let stored: HashSet<(String, String)> =
        lease_objects(&admin, &ns.name).await.into_iter().map(|o| (o.container_id, o.address)).collect();
    let answered: Vec<(String, String)> =
        killed.iter().chain(&stopped).map(|o| (o.cid.clone(), o.result.clone().expect("answered"))).collect();
    let distinct: HashSet<&String> = answered.iter().map(|(_, a)| a).collect();
    assert_eq!(distinct.len(), answered.len(), "an address was answered twice");
    for a in &answered {
        assert!(stored.contains(a), "answered lease {a:?} is not in the API server");
    }
    println!(
        "cni failover (defaults: lease TTL 2 s, renew 500 ms; {CLIENTS} CNI clients): kill -9: {} ADDs, none \
         failed, longest time without an answer {kill_gap:?}; SIGTERM: {} ADDs, none failed, longest \
         {stop_gap:?}",
        killed.len(),
        stopped.len()
    );
    assert!(
        kill_gap <= Duration::from_secs(3),
        "kill -9 left ADDs unanswered for {kill_gap:?} (at most 3 s)"
    );
    // The goal is under 0.5 s and a quiet machine measures 0.16 to 0.25 s; a CI machine
    // loaded by other test binaries once took 0.59 s (before the plugin's first retry
    // pause went from 200 to 50 ms), so the bound leaves room for that.
    assert!(
        stop_gap < Duration::from_secs(1),
        "SIGTERM left ADDs unanswered for {stop_gap:?} (under 1 s; the goal is 0.5 s)"
    );
}
