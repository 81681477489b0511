//! Where leases live between restarts. The [`LeaseStore`] trait hides the backend; the
//! embedded file database is the default.

pub mod embedded;

use crate::allocator::{Change, Lease, LoadProblem, RangeInput};

/// A store failure; the message says which operation and why.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {reason}")]
pub struct StoreError {
    pub op: &'static str,
    pub reason: String,
}

impl StoreError {
    pub(crate) fn new(op: &'static str, e: impl std::fmt::Display) -> StoreError {
        StoreError { op, reason: e.to_string() }
    }
}

/// Everything a store holds, as read at start-up.
#[derive(Debug, Default)]
pub struct Loaded {
    pub pools: Vec<(String, RangeInput)>,
    pub leases: Vec<Lease>,
    /// Records that could not be decoded; reported and skipped.
    pub problems: Vec<LoadProblem>,
}

/// Durable storage of pools and leases.
///
/// `commit` applies a batch of changes atomically and returns only once they are durable:
/// the server answers a request only after the batch holding its change is committed.
pub trait LeaseStore: Send + 'static {
    /// Human-readable description, e.g. `embedded:/var/lib/rust-ipam/leases.redb`.
    fn describe(&self) -> String;
    /// Reads every pool and lease.
    fn load(&self) -> Result<Loaded, StoreError>;
    /// Applies `changes` in order, all or nothing, durably.
    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError>;
}
