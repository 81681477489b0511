//! Where leases live between restarts. The [`LeaseStore`] trait hides the backend; the
//! embedded file database is the default.

pub mod embedded;

use std::net::IpAddr;

use crate::allocator::{Change, Lease, LoadProblem, RangeInput, Str};

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

/// Why a commit did not wholly apply.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Nothing of the batch is durable, or it is unknown which parts are: memory must be
    /// reloaded from the store.
    #[error(transparent)]
    Failed(#[from] StoreError),
    /// The store refused some writes (another server holds the address, or changed the
    /// lease first); every other write of the batch is durable.
    #[error("the store refused {} write(s)", .0.len())]
    Refused(Vec<Refusal>),
    /// This server may no longer write (it is not the leader); nothing was written.
    #[error("{0}")]
    Fenced(String),
}

/// One refused write and what the store holds at its address instead.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// Index of the change in the committed batch.
    pub index: usize,
    pub network: Str,
    pub address: IpAddr,
    /// The lease the store holds there now; `None`: the address is free in the store.
    pub truth: Option<Lease>,
    pub reason: String,
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
/// `commit` returns only once the changes it reports as applied are durable: the server
/// answers a request only after the changes it made are committed.
pub trait LeaseStore: Send + 'static {
    /// Human-readable description, e.g. `embedded:/var/lib/rust-ipam/leases.redb`.
    fn describe(&self) -> String;
    /// Reads every pool and lease.
    fn load(&self) -> Result<Loaded, StoreError>;
    /// Applies `changes` in order, durably. A store that cannot apply a batch atomically
    /// reports each write it refused ([`CommitError::Refused`]) and applies the rest.
    fn commit(&mut self, changes: &[Change]) -> Result<(), CommitError>;
    /// The same store taking writes without waiting for earlier ones, if it can: one
    /// whose writes are independent round trips (the API server) keeps many in flight,
    /// where a file database is better off committing a batch at once.
    fn pipelined(&mut self) -> Option<&mut dyn PipelinedStore> {
        None
    }
}

/// What became of one write given to [`PipelinedStore::submit`].
#[derive(Debug)]
pub enum WriteOutcome {
    /// Durable.
    Done,
    /// Not applied: the store holds something else there (its `index` is the write's id).
    Refused(Refusal),
    /// Unknown whether it applied.
    Failed(StoreError),
}

/// Reports the outcome of the write with the given id; called from the store's threads.
pub type WriteReport = std::sync::Arc<dyn Fn(usize, WriteOutcome) + Send + Sync>;

/// A store that takes writes while earlier ones are in flight.
pub trait PipelinedStore {
    /// Starts `writes` (id, change) and returns; `report` gets each one's outcome once
    /// known. Writes to one object apply in the order they were submitted, across calls;
    /// a write after one to the same object that did not apply is refused with the
    /// store's truth. `Err` (nothing started): this server may no longer write.
    fn submit(&mut self, writes: Vec<(usize, Change)>, report: WriteReport) -> Result<(), String>;
}
