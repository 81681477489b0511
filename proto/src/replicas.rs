//! Calling a set of replicas of which one leads: every client of the project (the CNI
//! plugin, `rust-ipam-ctl`, the reconcile one-shot) goes through [`Replicas`], so they all
//! follow a leader the same way.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

use crate::{ClientTls, LEADER_METADATA, client::open};

/// The endpoint forms a client can dial.
const SCHEMES: [&str; 3] = ["http://", "https://", "unix:///"];

/// Whether `endpoint` is one of the forms a client dials, with the one wording every
/// configuration uses when it is not.
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    if SCHEMES.iter().any(|p| endpoint.starts_with(p)) {
        Ok(())
    } else {
        Err(format!("server {endpoint:?} is not http://host:port, https://host:port or unix:///path"))
    }
}

/// How long one endpoint gets to accept a connection before the next is tried, unless
/// [`Replicas::connect_timeout`] says otherwise.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause after the first round over all endpoints: short, because a clean leader handover
/// takes a few hundred milliseconds; it doubles each round up to [`MAX_RETRY_PAUSE`], the
/// steady pace through a crash's takeover (about the Lease TTL): at most five rounds a
/// second per waiting caller.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// The replicas of one server, called in turn until one answers within the budget.
///
/// A replica that answers UNAVAILABLE (a follower, or one shutting down) and names the
/// leader in [`LEADER_METADATA`] sends the call there next; UNKNOWN and CANCELLED (a
/// connection dropped, a TLS server that refused this client's certificate, a call that
/// timed out) move on to the next replica as well. Every other status is the server's
/// answer. Rounds over all endpoints repeat, with a short growing pause, until the budget
/// of the call runs out: a leader that is being replaced is waited for.
///
/// Calls are retried, so they must be safe to repeat: every rust-ipam RPC is (an attachment
/// gets the same lease twice, a release of nothing releases nothing).
#[derive(Debug)]
pub struct Replicas {
    /// Endpoints with their open channel; leader hints are appended.
    servers: Vec<(String, Option<Channel>)>,
    tls: Option<ClientTls>,
    budget: Duration,
    connect_timeout: Duration,
    attempt_timeout: Duration,
}

/// Why a call to the replicas failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// A replica gave a definite answer.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Refused(tonic::Status),
    /// No replica answered within the budget; the text names the last failure.
    #[error("no rust-ipam server answered within {budget:?}; last error: {last}")]
    Unreachable { budget: Duration, last: String },
}

impl Replicas {
    /// The replicas at `endpoints` (at least one, each as [`check_endpoint`] accepts), with
    /// `budget` for each call, connection attempts and waiting for a leader included. An
    /// attempt on one replica may take the whole budget unless
    /// [`attempt_timeout`](Replicas::attempt_timeout) bounds it.
    pub fn new(endpoints: &[String], tls: Option<ClientTls>, budget: Duration) -> Result<Replicas, String> {
        if endpoints.is_empty() {
            return Err("no server endpoint given".to_string());
        }
        endpoints.iter().try_for_each(|e| check_endpoint(e))?;
        Ok(Replicas {
            servers: endpoints.iter().map(|e| (e.clone(), None)).collect(),
            tls,
            budget,
            connect_timeout: CONNECT_TIMEOUT,
            attempt_timeout: budget,
        })
    }

    /// How long one endpoint gets to accept a connection (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Replicas {
        self.connect_timeout = timeout;
        self
    }

    /// How long one replica gets to answer before the call moves on (and may be repeated
    /// there): a replica that hangs then costs this much, not the whole budget.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Replicas {
        self.attempt_timeout = timeout;
        self
    }

    /// Runs `f` on a channel to each replica in turn until one answers, as the type's
    /// documentation says.
    pub async fn call<T, F, Fut>(&mut self, mut f: F) -> Result<T, CallError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + self.budget;
        let mut last = String::from("no server tried");
        let mut pause = RETRY_PAUSE;
        loop {
            let mut order: VecDeque<usize> = (0..self.servers.len()).collect();
            let mut tried = Vec::new();
            while let Some(i) = order.pop_front() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                tried.push(i);
                let server = self.servers[i].0.clone();
                let channel = match &self.servers[i].1 {
                    Some(c) => c.clone(),
                    None => {
                        let connect = self.connect_timeout.min(left);
                        match open(&server, connect, self.attempt_timeout.min(left), self.tls.as_ref()).await
                        {
                            Ok(c) => {
                                self.servers[i].1 = Some(c.clone());
                                c
                            }
                            Err(e) => {
                                last = format!("{server}: {}", with_sources(&e));
                                continue;
                            }
                        }
                    }
                };
                match tokio::time::timeout(self.attempt_timeout.min(left), f(channel)).await {
                    Ok(Ok(r)) => return Ok(r.into_inner()),
                    Ok(Err(s)) if matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled) => {
                        last = format!("{server}: {}", status_text(&s));
                        self.servers[i].1 = None;
                        if let Some(hint) = leader_hint(&s) {
                            let j = match self.servers.iter().position(|(e, _)| *e == hint) {
                                Some(j) => j,
                                None => {
                                    self.servers.push((hint, None));
                                    self.servers.len() - 1
                                }
                            };
                            if !tried.contains(&j) {
                                order.retain(|k| *k != j);
                                order.push_front(j);
                            }
                        }
                    }
                    Ok(Err(s)) => return Err(CallError::Refused(s)),
                    Err(_) => {
                        last = format!("{server}: no answer in time");
                        self.servers[i].1 = None;
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CallError::Unreachable { budget: self.budget, last });
            }
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(MAX_RETRY_PAUSE);
        }
    }
}

/// An error's message followed by its causes, which hold what went wrong on the wire.
fn with_sources(e: &dyn std::error::Error) -> String {
    sources_after(e.to_string(), e)
}

/// A status's message followed by its causes (its Display would add debug dumps).
fn status_text(s: &tonic::Status) -> String {
    sources_after(s.message().to_string(), s)
}

fn sources_after(mut out: String, e: &dyn std::error::Error) -> String {
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out = format!("{out}: {text}");
        }
        cause = c.source();
    }
    out
}

/// The leader endpoint a follower named, if it is one a client can dial.
fn leader_hint(s: &tonic::Status) -> Option<String> {
    let hint = s.metadata().get(LEADER_METADATA)?.to_str().ok()?;
    check_endpoint(hint).is_ok().then(|| hint.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_with_one_wording() {
        assert!(check_endpoint("unix:///run/x.sock").is_ok());
        assert_eq!(
            Replicas::new(&["10.0.0.1:50051".to_string()], None, Duration::from_secs(1)).map(|_| ()),
            Err("server \"10.0.0.1:50051\" is not http://host:port, https://host:port or unix:///path".into())
        );
        assert_eq!(
            Replicas::new(&[], None, Duration::from_secs(1)).map(|_| ()),
            Err("no server endpoint given".into())
        );
    }

    #[tokio::test]
    async fn a_dead_endpoint_is_reported_after_the_budget() {
        // A port that was bound and released: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port());
        let endpoint = format!("http://127.0.0.1:{}", port.expect("a free port"));
        let mut r = Replicas::new(std::slice::from_ref(&endpoint), None, Duration::from_millis(300))
            .expect("valid endpoint");
        let started = Instant::now();
        let err = r
            .call(|c| async move {
                crate::v1::ipam_client::IpamClient::new(c).status(crate::v1::StatusRequest {}).await
            })
            .await
            .expect_err("nothing listens");
        assert!(started.elapsed() >= Duration::from_millis(250), "gave up early: {:?}", started.elapsed());
        let text = err.to_string();
        assert!(
            text.starts_with("no rust-ipam server answered within 300ms; last error: http://127.0.0.1:"),
            "{text}"
        );
        assert!(text.contains("onnection refused"), "{text}");
    }
}
