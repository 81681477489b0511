//! The leader Lease (coordination.k8s.io/v1): who serves.
//!
//! Every write to it carries the resourceVersion it was based on (a merge patch that names
//! `metadata.resourceVersion` fails with Conflict when the object changed), so of two
//! replicas that both see an expired or released Lease only one takes it; the other reads
//! the winner on its next attempt. A holder that steps down clears `holderIdentity`, and a
//! replica that finds it empty takes it at once instead of waiting for it to expire, which
//! is what makes a rolling update's handover quick. [`watch_releases`] wakes a follower the
//! moment that happens rather than at its next poll.
//!
//! Expiry compares the holder's `renewTime` plus `leaseDurationSeconds` with this replica's
//! clock, as client-go does; replicas whose clocks disagree by more than the margin the
//! leader keeps (see [`super::leader`]) can overlap, which the lease store's preconditions
//! make harmless.

use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::{Client, ResourceExt as _};
use serde_json::json;
use tracing::debug;

/// What an attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// This replica holds the Lease (it took or renewed it).
    Leading,
    /// Another replica holds it: its `holderIdentity` ("" while nobody does and another
    /// replica took it first), and how long until its renewal runs out, if known (a
    /// follower tries again right then rather than at its next poll).
    Following(String, Option<Duration>),
}

/// Why an attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{op} of Lease {name}: {source}")]
    Api {
        op: &'static str,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("the API server did not answer within {0:?}")]
    TimedOut(Duration),
}

/// A coordination.k8s.io Lease held by one replica at a time.
#[derive(Debug, Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    holder: String,
    /// `leaseDurationSeconds`: the TTL in whole seconds, rounded up.
    seconds: i32,
}

fn now() -> String {
    // MicroTime: RFC 3339 with microseconds, as the API server writes it.
    format!("{:.6}", Timestamp::now())
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaseLock {
    /// The Lease `name` in `namespace`, held as `holder` for `ttl`.
    pub fn new(client: Client, namespace: &str, name: &str, holder: &str, ttl: Duration) -> LeaseLock {
        let seconds = i32::try_from(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).unwrap_or(i32::MAX);
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            holder: holder.into(),
            seconds,
        }
    }

    fn err(&self, op: &'static str) -> impl FnOnce(kube::Error) -> LockError + '_ {
        move |source| LockError::Api { op, name: self.name.clone(), source: Box::new(source) }
    }

    /// Takes the Lease if it is free, released or expired, renews it if this replica holds
    /// it, and says who holds it otherwise.
    pub async fn try_acquire_or_renew(&self) -> Result<Attempt, LockError> {
        // A conflict means another write came between our read and our patch; read once
        // more (it may have been our own renewal whose answer was lost).
        for _ in 0..2 {
            let Some(lease) = self.api.get_opt(&self.name).await.map_err(self.err("get"))? else {
                return self.create().await;
            };
            let spec = lease.spec.clone().unwrap_or_default();
            let holder = spec.holder_identity.clone().unwrap_or_default();
            let rv = lease.resource_version().unwrap_or_default();
            let now = now();
            let patch = if holder == self.holder {
                json!({"metadata": {"resourceVersion": rv},
                       "spec": {"renewTime": now, "leaseDurationSeconds": self.seconds}})
            } else if holder.is_empty() || expired(&spec) {
                json!({"metadata": {"resourceVersion": rv},
                       "spec": {"holderIdentity": self.holder, "acquireTime": now, "renewTime": now,
                                "leaseDurationSeconds": self.seconds,
                                "leaseTransitions": spec.lease_transitions.unwrap_or(0) + 1}})
            } else {
                return Ok(Attempt::Following(holder, expires_in(&spec)));
            };
            match self.api.patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => return Ok(Attempt::Leading),
                Err(e) if conflict(&e) => debug!(lease = %self.name, "the Lease changed since it was read"),
                Err(e) => return Err(self.err("patch")(e)),
            }
        }
        Ok(Attempt::Following(String::new(), None))
    }

    async fn create(&self) -> Result<Attempt, LockError> {
        let now = now();
        let lease: Lease = serde_json::from_value(json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.name},
            "spec": {"holderIdentity": self.holder, "acquireTime": now, "renewTime": now,
                     "leaseDurationSeconds": self.seconds, "leaseTransitions": 0}
        }))
        .map_err(|e| self.err("create")(kube::Error::SerdeError(e)))?;
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(Attempt::Leading),
            Err(e) if conflict(&e) => Ok(Attempt::Following(String::new(), None)),
            Err(e) => Err(self.err("create")(e)),
        }
    }

    /// Releases the Lease if this replica holds it: another replica may take it at once.
    pub async fn step_down(&self) -> Result<(), LockError> {
        let Some(lease) = self.api.get_opt(&self.name).await.map_err(self.err("get"))? else { return Ok(()) };
        let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone()).unwrap_or_default();
        if holder != self.holder {
            return Ok(());
        }
        let patch = json!({"metadata": {"resourceVersion": lease.resource_version()},
                           "spec": {"holderIdentity": ""}});
        self.api
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(self.err("release"))?;
        Ok(())
    }

    /// Watches the Lease and calls `released` whenever it is seen without a holder; runs
    /// until dropped, starting the watch again after an error or a server-side timeout.
    pub async fn watch_releases(&self, released: impl Fn()) {
        let params = WatchParams::default().fields(&format!("metadata.name={}", self.name)).timeout(290);
        loop {
            match self.api.watch(&params, "0").await {
                Ok(events) => {
                    let mut events = std::pin::pin!(events);
                    while let Some(Ok(event)) = events.next().await {
                        if let WatchEvent::Added(l) | WatchEvent::Modified(l) = event
                            && l.spec.and_then(|s| s.holder_identity).unwrap_or_default().is_empty()
                        {
                            released();
                        }
                    }
                }
                Err(e) => {
                    debug!(lease = %self.name, error = %e, "watching the Lease failed; polling covers it")
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// How long until the holder's renewal runs out by this replica's clock.
fn expires_in(spec: &k8s_openapi::api::coordination::v1::LeaseSpec) -> Option<Duration> {
    let (renewed, seconds) = (spec.renew_time.as_ref()?, spec.lease_duration_seconds?);
    let end = renewed.0.checked_add(SignedDuration::from_secs(i64::from(seconds))).ok()?;
    let left = end.duration_since(Timestamp::now());
    Some(Duration::try_from(left).unwrap_or(Duration::ZERO))
}

/// Whether the holder's renewal has run out by this replica's clock.
fn expired(spec: &k8s_openapi::api::coordination::v1::LeaseSpec) -> bool {
    let (Some(renewed), Some(seconds)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        // No renewal recorded: nobody can be relying on it.
        return true;
    };
    renewed
        .0
        .checked_add(SignedDuration::from_secs(i64::from(seconds)))
        .map_or(true, |end| Timestamp::now() > end)
}
