//! Durability: `kill -9` the server in the middle of concurrent allocations, restart it on
//! the same data directory, and check that every acknowledged lease is there and no address
//! is held twice.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use rust_ipam_e2e::ServerProcess;
use rust_ipam_e2e::fixtures::{allocate_request, leases, pod};
use rust_ipam_proto::connect;
use rust_ipam_proto::v1 as pb;
use rust_ipam_proto::v1::ipam_client::IpamClient;

const CLIENTS: usize = 32;
/// Kill once this many allocations were acknowledged.
const KILL_AFTER: usize = 3000;

fn request(cid: &str) -> pb::AllocateRequest {
    // Two overlapping ranges, so the overlap index is exercised across the restart too.
    let range = if cid.ends_with('0') { "198.18.0.0/16" } else { "198.18.0.0/20" };
    allocate_request(cid, Some(pod("crash", cid, "")), "", range)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_leases_survive_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerProcess::start(dir.path()).await.expect("server");
    let acked: Arc<std::sync::Mutex<BTreeMap<String, String>>> = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let failed_after_kill = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (endpoint, acked, count) = (server.endpoint.clone(), acked.clone(), count.clone());
        let (failed_after_kill, killed) = (failed_after_kill.clone(), killed.clone());
        clients.push(tokio::spawn(async move {
            let ch = connect(&endpoint, Duration::from_secs(5)).await.expect("connect");
            let mut ipam = IpamClient::new(ch);
            // Bounded: each client stops at its first failure or after 2000 calls.
            for i in 0..2000 {
                let cid = format!("c{c}-{i}");
                match ipam.allocate(request(&cid)).await {
                    Ok(r) => {
                        let lease = &r.get_ref().leases[0];
                        acked.lock().expect("lock").insert(cid, lease.address.clone());
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        assert!(killed.load(Ordering::SeqCst), "allocation failed before the kill: {e}");
                        failed_after_kill.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
            }
        }));
    }
    while count.load(Ordering::SeqCst) < KILL_AFTER {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    killed.store(true, Ordering::SeqCst);
    server.kill_hard().expect("kill -9");
    let acked_at_kill = count.load(Ordering::SeqCst);
    for c in clients {
        c.await.expect("client task");
    }
    let acked = Arc::try_unwrap(acked).expect("clients done").into_inner().expect("lock");
    assert!(
        failed_after_kill.load(Ordering::SeqCst) > 0,
        "the kill must land while clients are still allocating (acked {acked_at_kill})"
    );

    let server = ServerProcess::start(dir.path()).await.expect("restart");
    let leases = leases(&server.endpoint, pb::ListLeasesRequest::default()).await;
    let mut seen = HashSet::new();
    let mut by_cid = BTreeMap::new();
    for l in &leases {
        assert!(seen.insert(l.address.clone()), "address {} held twice", l.address);
        assert!(
            by_cid.insert(l.container_id.clone(), l.address.clone()).is_none(),
            "{} holds two",
            l.container_id
        );
    }
    for (cid, addr) in &acked {
        assert_eq!(by_cid.get(cid), Some(addr), "acknowledged lease of {cid} lost or changed");
    }
    // Every stored lease is either acknowledged or was in flight when the server died.
    assert!(leases.len() >= acked.len() && leases.len() <= acked.len() + CLIENTS);
    // And the restarted server still answers an acknowledged attachment with its lease.
    let (cid, addr) = acked.iter().next().expect("something was acknowledged");
    let ch = connect(&server.endpoint, Duration::from_secs(5)).await.expect("connect");
    let again = IpamClient::new(ch).allocate(request(cid)).await.expect("allocate").into_inner();
    assert_eq!(&again.leases[0].address, addr);
    println!("acknowledged {} leases before kill -9; {} stored after restart", acked.len(), leases.len());
}
