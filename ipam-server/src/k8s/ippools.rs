//! The IPPool objects, listed and then watched on every replica (not only the leader, so a
//! new leader resolves pools at once), each change replacing the [`Pools`] set.
//!
//! A pool the API server holds but the server finds invalid stays in the set with its
//! error: allocations naming it are refused with that error, and the leader writes it into
//! the object's `Valid` condition (`leader.rs`).

use std::collections::BTreeMap;

use kube::ResourceExt as _;
use kube::api::Api;

use super::Seen;
use super::crd::{IPPool, IPPoolSpec};
use crate::pools::{PoolSet, Pools};

fn publish(pools: &Pools, objects: &BTreeMap<String, IPPoolSpec>) {
    pools.replace(PoolSet::from_specs(objects.iter().map(|(n, s)| (n.as_str(), s))));
}

/// Follows the IPPools forever ([`super::list_and_watch`]); only a new spec replaces the
/// set (the leader's status writes come back as events too).
pub async fn follow(api: Api<IPPool>, pools: Pools) {
    let mut objects = BTreeMap::new();
    super::follow_objects(api, "IPPools", |seen| match seen {
        Seen::Listed(all) => {
            objects = all.into_iter().map(|o| (o.name_any(), o.spec)).collect();
            publish(&pools, &objects);
        }
        Seen::Applied(o) => {
            let name = o.name_any();
            if objects.get(&name) != Some(&o.spec) {
                objects.insert(name, o.spec);
                publish(&pools, &objects);
            }
        }
        Seen::Deleted(o) => {
            if objects.remove(&o.name_any()).is_some() {
                publish(&pools, &objects);
            }
        }
    })
    .await;
}
