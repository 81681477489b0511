//! Per-node blocks of deleted Nodes, given back: a block assigned to a node (its marker
//! lease, see [`crate::allocator::blocks_network`]) is freed once the node has been missing
//! from the API server for the grace period and no address of the block is held.
//!
//! When a node went missing is kept in the leader's memory, from the first pass that saw it
//! missing: a new leader starts the clock again (later, never earlier). A node that comes
//! back (re-registered under the same name) keeps its block. The addresses of its pods are
//! freed by the stale-lease pass as their pods go; the block goes after the last of them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::info;

use super::{Action, Entry, Reason, duration_ms};
use crate::allocator::{Allocator, BLOCKS_SUFFIX, Lease};
use crate::engine::Engine;
use crate::pools::selector::{Kind, Labels};

/// Gives deleted nodes' blocks back; the Nodes come from `labels`.
#[derive(Debug)]
pub struct NodeBlocks {
    labels: Labels,
    grace: Duration,
    /// Node name -> when a pass first saw it missing (ms since the epoch).
    missing_since: Mutex<HashMap<String, i64>>,
}

/// A block marker as a pass read it, with the addresses held in its block.
struct Seen {
    marker: Arc<Lease>,
    held: u128,
}

/// The block markers, with what each block holds.
fn markers(a: &Allocator) -> Vec<Seen> {
    a.assigned_blocks()
        .into_iter()
        .filter_map(|(network, block, _, held)| {
            let marker = a.get(&crate::allocator::blocks_network(&network), block.first).ok()?;
            Some(Seen { marker, held })
        })
        .collect()
}

/// Frees the marker at `ip` of `blocks_network` if it is still `seen` (same node, same
/// creation) and its block still holds no address. Runs on the engine thread.
fn free_if_unchanged(a: &mut Allocator, seen: &Lease, now_unix_ms: i64) -> bool {
    let Ok(current) = a.get(&seen.network, seen.address) else { return false };
    if *current != *seen {
        return false;
    }
    let Some(network) = seen.network.strip_suffix(BLOCKS_SUFFIX) else { return false };
    let Ok(block) = seen.range.parse::<crate::allocator::Block>() else { return false };
    if a.leases_in(network, block).any(|l| !l.is_manual()) {
        return false;
    }
    a.unassign_block(network, block, now_unix_ms).is_ok()
}

impl NodeBlocks {
    /// Frees blocks of nodes missing from `labels`' Nodes for `grace`.
    pub fn new(labels: Labels, grace: Duration) -> NodeBlocks {
        NodeBlocks { labels, grace, missing_since: Mutex::new(HashMap::new()) }
    }

    /// One pass at `now_unix_ms`: an entry for every block of a missing node. Nothing is
    /// done before the Nodes have been read.
    pub async fn pass(&self, engine: &Engine, dry_run: bool, now_unix_ms: i64) -> Vec<Entry> {
        let Some(nodes) = self.labels.all(Kind::Node) else { return Vec::new() };
        let seen = match engine.call(|a, _| markers(a)).await {
            Ok(seen) => seen,
            Err(e) => {
                tracing::warn!(error = %e, "reading the per-node blocks failed");
                return Vec::new();
            }
        };
        let missing: HashSet<String> =
            seen.iter().map(|s| s.marker.holder.node.clone()).filter(|n| !nodes.contains_key(n)).collect();
        let since: HashMap<String, i64> = {
            let mut m = self.missing_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            m.retain(|node, _| missing.contains(node));
            for node in &missing {
                m.entry(node.clone()).or_insert(now_unix_ms);
            }
            m.clone()
        };
        let mut entries = Vec::new();
        for s in seen.into_iter().filter(|s| missing.contains(&s.marker.holder.node)) {
            let node = s.marker.holder.node.clone();
            let gone_for = now_unix_ms.saturating_sub(since.get(&node).copied().unwrap_or(now_unix_ms));
            let mut entry = Entry {
                lease: s.marker.clone(),
                reason: Reason::NodeGone,
                action: Action::KeptYoung,
                age: Duration::from_millis(gone_for.max(0) as u64),
                detail: format!("block {} of node {node}", s.marker.range),
                failed_at: None,
            };
            entry.action = if gone_for < duration_ms(self.grace) {
                Action::KeptYoung
            } else if s.held > 0 {
                entry.detail = format!("{}: {} of its addresses are still held", entry.detail, s.held);
                Action::KeptPodLive
            } else if dry_run {
                Action::WouldFree
            } else {
                let marker = s.marker.clone();
                match engine.call(move |a, now| free_if_unchanged(a, &marker, now)).await {
                    Ok(true) => {
                        info!(network = %s.marker.network, block = %entry.detail, node = %node,
                              "gave the block of a deleted node back");
                        Action::Freed
                    }
                    Ok(false) => Action::KeptChanged,
                    Err(e) => {
                        entry.detail = format!("releasing: {e}");
                        entry.failed_at = Some("release");
                        Action::Failed
                    }
                }
            };
            entries.push(entry);
        }
        entries
    }
}
