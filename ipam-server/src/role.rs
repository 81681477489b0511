//! Whether this replica serves: it leads (and has its engine), or another replica does.
//! The gRPC services, health and readiness all read it from one place.

use tokio::sync::watch;

use crate::engine::Engine;

/// Another replica, as the election Lease names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub identity: String,
    /// Where it serves gRPC (`http://10.0.0.5:50051`); empty if it did not say.
    pub endpoint: String,
}

impl Peer {
    /// The election Lease's holderIdentity for this peer: `identity@endpoint`.
    pub fn holder(&self) -> String {
        if self.endpoint.is_empty() {
            self.identity.clone()
        } else {
            format!("{}@{}", self.identity, self.endpoint)
        }
    }

    /// Reads a holderIdentity written by [`Peer::holder`] (or by anything else: then it is
    /// all identity).
    pub fn from_holder(holder: &str) -> Peer {
        match holder.split_once('@') {
            Some((id, ep)) if ep.contains("://") => Peer { identity: id.into(), endpoint: ep.into() },
            _ => Peer { identity: holder.into(), endpoint: String::new() },
        }
    }
}

/// What this replica is doing.
#[derive(Debug, Clone)]
pub enum Role {
    /// Electing, or leading and loading state: nothing is served yet, and calls wait a
    /// moment for it (see [`Serving::ready_engine`]).
    Starting,
    /// Leading with its state loaded.
    Leader(Engine),
    /// Another replica leads (`None`: none is known).
    Follower(Option<Peer>),
    /// Shutting down: calls are refused at once, to go to another replica.
    Stopping,
}

/// Why this replica does not allocate now; a follower names the leader.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotServing {
    /// It led, and its engine stopped (the store said it may no longer write).
    #[error("this replica lost its engine and is reloading")]
    Reloading,
    /// Electing, or leading and not loaded yet.
    #[error("this replica is electing a leader or loading state")]
    Starting,
    #[error("this replica is not the leader; no leader is known")]
    NoLeader,
    #[error("this replica is shutting down")]
    Stopping,
    #[error("this replica is not the leader; the leader is {} at {}", .0.identity,
        if .0.endpoint.is_empty() { "an unknown endpoint" } else { &.0.endpoint })]
    Follower(Peer),
}

/// How long a call waits for a starting replica (see [`Serving::ready_engine`]).
pub const START_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A view of the current [`Role`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct Serving {
    rx: watch::Receiver<Role>,
}

impl Serving {
    /// A replica that always leads with `engine` (the embedded store has no election).
    pub fn fixed(engine: Engine) -> (Serving, watch::Sender<Role>) {
        let (tx, rx) = watch::channel(Role::Leader(engine));
        (Serving { rx }, tx)
    }

    /// A view of `rx`.
    pub fn new(rx: watch::Receiver<Role>) -> Serving {
        Serving { rx }
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.rx.borrow().clone()
    }

    /// Resolves when the role changes; false once nobody can change it any more.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }

    /// The engine when leading with state loaded; otherwise why not, naming the leader
    /// when one is known so a client can go there.
    pub fn engine(&self) -> Result<Engine, NotServing> {
        match &*self.rx.borrow() {
            Role::Leader(e) if !e.is_stopped() => Ok(e.clone()),
            Role::Leader(_) => Err(NotServing::Reloading),
            Role::Starting => Err(NotServing::Starting),
            Role::Follower(None) => Err(NotServing::NoLeader),
            Role::Follower(Some(p)) => Err(NotServing::Follower(p.clone())),
            Role::Stopping => Err(NotServing::Stopping),
        }
    }

    /// As [`Serving::engine`], but a replica that is starting (electing, or leading and
    /// loading its state) holds the call up to [`START_WAIT`] for that to finish. A leader
    /// loads from its warm copy in a fraction of a second, so a call that arrives during a
    /// handover is answered when the new leader is ready instead of being sent back to
    /// retry after a pause.
    pub async fn ready_engine(&self) -> Result<Engine, NotServing> {
        let mut rx = self.rx.clone();
        let starting = |r: &Role| matches!(r, Role::Starting);
        let _ = tokio::time::timeout(START_WAIT, rx.wait_for(|r| !starting(r))).await;
        self.engine()
    }

    /// Who leads, as Status reports it: this replica's identity when it leads.
    pub fn leader_identity(&self, me: &str) -> String {
        match &*self.rx.borrow() {
            Role::Leader(_) => me.to_string(),
            Role::Follower(Some(p)) => p.identity.clone(),
            Role::Starting | Role::Follower(None) | Role::Stopping => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_identity_round_trip_and_the_hint() {
        let p = Peer { identity: "ipam-0".into(), endpoint: "http://10.0.0.5:50051".into() };
        assert_eq!(p.holder(), "ipam-0@http://10.0.0.5:50051");
        assert_eq!(Peer::from_holder(&p.holder()), p);
        assert_eq!(
            Peer::from_holder("someone@else"),
            Peer { identity: "someone@else".into(), endpoint: String::new() }
        );

        let (tx, rx) = watch::channel(Role::Follower(Some(p.clone())));
        let s = Serving::new(rx);
        let not = s.engine().expect_err("follower");
        assert_eq!(not, NotServing::Follower(p));
        assert_eq!(
            not.to_string(),
            "this replica is not the leader; the leader is ipam-0 at http://10.0.0.5:50051"
        );
        assert_eq!(s.leader_identity("me"), "ipam-0");
        tx.send(Role::Starting).expect("send");
        assert_eq!(
            s.engine().expect_err("starting").to_string(),
            "this replica is electing a leader or loading state"
        );
        assert_eq!(s.leader_identity("me"), "");
    }

    #[tokio::test(start_paused = true)]
    async fn a_starting_replica_holds_calls_until_it_knows_its_role() {
        let (tx, rx) = watch::channel(Role::Starting);
        let s = Serving::new(rx);
        // Still starting after the wait: refused, having waited it out.
        let t = tokio::time::Instant::now();
        assert_eq!(s.ready_engine().await.expect_err("starting"), NotServing::Starting);
        assert_eq!(t.elapsed(), START_WAIT);
        // The role settles during the wait: the call gets the answer of the new role then.
        let p = Peer { identity: "ipam-1".into(), endpoint: "http://10.0.0.6:50051".into() };
        let call = tokio::spawn({
            let s = s.clone();
            async move { s.ready_engine().await.map(|_| ()) }
        });
        tokio::time::sleep(START_WAIT / 4).await;
        tx.send(Role::Follower(Some(p.clone()))).expect("send");
        assert_eq!(call.await.expect("join"), Err(NotServing::Follower(p)));
        // A replica shutting down refuses at once.
        tx.send(Role::Stopping).expect("send");
        let t = tokio::time::Instant::now();
        assert_eq!(
            s.ready_engine().await.expect_err("stopping").to_string(),
            "this replica is shutting down"
        );
        assert_eq!(t.elapsed(), std::time::Duration::ZERO);
    }
}
