//! The IPPool objects, listed and then watched on every replica (not only the leader, so a
//! new leader resolves pools at once), each change replacing the [`Pools`] set.
//!
//! A pool the API server holds but the server finds invalid stays in the set with its
//! error: allocations naming it are refused with that error, and the leader writes it into
//! the object's `Valid` condition (`leader.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt as _;
use kube::ResourceExt as _;
use kube::api::{Api, WatchEvent, WatchParams};
use tracing::{debug, info, warn};

use super::crd::{IPPool, IPPoolSpec};
use crate::pools::{PoolSet, Pools};

/// Pause after a failed list or watch call before the next.
const RETRY: Duration = Duration::from_secs(1);

fn publish(pools: &Pools, objects: &BTreeMap<String, IPPoolSpec>) {
    pools.replace(PoolSet::from_specs(objects.iter().map(|(n, s)| (n.as_str(), s))));
}

/// Lists the IPPools, then watches from the list's resourceVersion, forever: a watch that
/// ends is resumed where it stopped, one whose history is gone (410) lists anew.
pub async fn follow(api: Api<IPPool>, pools: Pools) {
    loop {
        let mut objects = BTreeMap::new();
        let listed = super::for_each_page(
            500,
            |lp| {
                let api = &api;
                async move { api.list(&lp).await }
            },
            |obj: IPPool| {
                objects.insert(obj.name_any(), obj.spec);
            },
        )
        .await;
        let mut version = match listed {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "listing the IPPools failed; retrying");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        info!(pools = objects.len(), "IPPools listed; watching");
        publish(&pools, &objects);
        loop {
            let params = WatchParams::default().timeout(290);
            let events = match api.watch(&params, &version).await {
                Ok(events) => events,
                Err(e) => {
                    warn!(error = %e, "watching the IPPools failed; retrying");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            let mut events = std::pin::pin!(events);
            let mut gone = false;
            while let Some(event) = events.next().await {
                match event {
                    Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => {
                        version = o.resource_version().unwrap_or(version);
                        let name = o.name_any();
                        // Status writes come back as events too: only a new spec matters.
                        if objects.get(&name) != Some(&o.spec) {
                            objects.insert(name, o.spec);
                            publish(&pools, &objects);
                        }
                    }
                    Ok(WatchEvent::Deleted(o)) => {
                        version = o.resource_version().unwrap_or(version);
                        if objects.remove(&o.name_any()).is_some() {
                            publish(&pools, &objects);
                        }
                    }
                    Ok(WatchEvent::Bookmark(b)) => version = b.metadata.resource_version,
                    Ok(WatchEvent::Error(s)) if s.code == 410 => {
                        gone = true;
                        break;
                    }
                    Ok(WatchEvent::Error(s)) => {
                        debug!(code = s.code, message = %s.message, "the IPPool watch ended with an error");
                        break;
                    }
                    Err(e) => {
                        debug!(error = %e, "the IPPool watch broke off");
                        break;
                    }
                }
            }
            if gone {
                info!("the IPPool watch's history is gone; listing anew");
                break;
            }
        }
    }
}
