//! CNI clients for the failover and fault tests: threads running the real `rust-ipam`
//! plugin against a list of replicas, ADD after ADD, each client on its own pods. With
//! `release`, every other answered ADD is followed by its DEL (pods come and go); a failed
//! ADD is followed by a DEL, as a runtime does, so nothing half-made is left behind. Every
//! call's outcome is kept: when it finished, what it was, and the address or the plugin's
//! CNI error.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::run_ipam_plugin;

/// How many clients run at once.
pub const CLIENTS: usize = 10;

/// The network config every client uses: the plugin's own default budget (no
/// `timeout_ms`), as a NAD gets unless it says more.
pub fn conf(servers: &[String]) -> Value {
    json!({"cniVersion": "1.0.0", "name": "load", "type": "rust-ipam",
        "ipam": {"type": "rust-ipam", "range": "198.18.0.0/16", "server": servers}})
}

/// What the plugin printed when a call failed.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: i32,
    pub out: Value,
    pub stderr: String,
}

impl Failure {
    /// A clean CNI error: exit code 1 and an error object with a code and a message.
    pub fn is_clean_cni_error(&self) -> bool {
        self.code == 1
            && self.out["code"].as_u64().is_some()
            && self.out["msg"].as_str().is_some_and(|m| !m.is_empty())
    }
}

/// One call: when it finished, `ADD` or `DEL`, the container ID, and the address (ADD; an
/// empty string for DEL) or the failure.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub at: Instant,
    pub command: &'static str,
    pub cid: String,
    pub result: Result<String, Failure>,
}

/// Runs the plugin's `command` for container `cid`.
pub fn call(command: &'static str, servers: &[String], cid: &str) -> Result<String, Failure> {
    let out =
        run_ipam_plugin(command, cid, &format!("K8S_POD_NAMESPACE=load;K8S_POD_NAME={cid}"), &conf(servers));
    match (command, out.code, out.out["ips"][0]["address"].as_str()) {
        ("ADD", 0, Some(a)) => Ok(a.split('/').next().unwrap_or(a).to_string()),
        ("DEL", 0, _) => Ok(String::new()),
        _ => Err(Failure { code: out.code, out: out.out, stderr: out.stderr }),
    }
}

/// CNI clients calling until stopped.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    /// Starts [`CLIENTS`] clients on pods `<tag>-<n>`.
    pub fn start(servers: Vec<String>, tag: &str, release: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
        let seq = Arc::new(AtomicUsize::new(0));
        let threads = (0..CLIENTS)
            .map(|_| {
                let (servers, stop, outcomes, seq) =
                    (servers.clone(), stop.clone(), outcomes.clone(), seq.clone());
                let tag = tag.to_string();
                std::thread::spawn(move || {
                    let record = |command, cid: &str, result| {
                        let o = Outcome { at: Instant::now(), command, cid: cid.to_string(), result };
                        outcomes.lock().unwrap_or_else(|e| e.into_inner()).push(o);
                    };
                    while !stop.load(Ordering::SeqCst) {
                        let n = seq.fetch_add(1, Ordering::Relaxed);
                        let cid = format!("{tag}-{n}");
                        let added = call("ADD", &servers, &cid);
                        let del = added.is_err() || (release && n % 2 == 0);
                        record("ADD", &cid, added);
                        if del {
                            record("DEL", &cid, call("DEL", &servers, &cid));
                        }
                    }
                })
            })
            .collect();
        Load { stop, outcomes, threads }
    }

    /// How many ADDs were answered after `t`.
    pub fn answered_since(&self, t: Instant) -> usize {
        let outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        outcomes.iter().filter(|o| o.at > t && o.command == "ADD" && o.result.is_ok()).count()
    }

    /// When the first ADD after `t` was answered.
    pub fn first_answer_after(&self, t: Instant) -> Option<Instant> {
        let outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        outcomes.iter().filter(|o| o.at > t && o.command == "ADD" && o.result.is_ok()).map(|o| o.at).min()
    }

    /// Waits (on the current runtime) until `count` ADDs were answered after `t`; fails
    /// after `within`.
    pub async fn wait_answers(&self, t: Instant, count: usize, within: Duration, what: &str) {
        let deadline = Instant::now() + within;
        while self.answered_since(t) < count {
            assert!(Instant::now() < deadline, "fewer than {count} ADDs answered within {within:?} {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the clients; every outcome, in the order they finished.
    pub fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        let Load { threads, outcomes, .. } = self;
        for t in threads {
            t.join().expect("client thread");
        }
        let mut v = std::mem::take(&mut *outcomes.lock().unwrap_or_else(|e| e.into_inner()));
        v.sort_by_key(|o| o.at);
        v
    }
}

/// The longest time without an answered ADD, from `from` to the last outcome.
pub fn longest_gap(outcomes: &[Outcome], from: Instant) -> Duration {
    let mut last = from;
    let mut gap = Duration::ZERO;
    for o in outcomes.iter().filter(|o| o.at > from && o.command == "ADD" && o.result.is_ok()) {
        gap = gap.max(o.at - last);
        last = o.at;
    }
    gap
}

/// What the clients were told they hold: container ID → address, for every answered ADD
/// not followed by an answered DEL.
pub fn held(outcomes: &[Outcome]) -> BTreeMap<String, String> {
    let mut held = BTreeMap::new();
    for o in outcomes {
        match (o.command, &o.result) {
            ("ADD", Ok(a)) => {
                held.insert(o.cid.clone(), a.clone());
            }
            ("DEL", Ok(_)) => {
                held.remove(&o.cid);
            }
            _ => {}
        }
    }
    held
}

/// Containers whose last DEL failed (the runtime would call it again).
pub fn pending_dels(outcomes: &[Outcome]) -> Vec<String> {
    let mut last: BTreeMap<&str, bool> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.command == "DEL") {
        last.insert(&o.cid, o.result.is_ok());
    }
    last.into_iter().filter(|(_, ok)| !ok).map(|(c, _)| c.to_string()).collect()
}
