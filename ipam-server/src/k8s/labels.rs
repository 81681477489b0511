//! The labels of every Node and Namespace (metadata only), listed and then watched on
//! every replica, for the IPPools' `nodeSelector` and `namespaceSelector`, and the set of
//! Nodes for giving a deleted node's blocks back (reconcile).

use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::ResourceExt as _;
use kube::api::Api;
use kube::core::PartialObjectMeta;

use super::Seen;
use crate::pools::selector::{Kind, LabelMap, Labels};

/// Follows the `K` objects' labels into `labels` forever.
async fn follow_kind<K>(api: Api<K>, kind: Kind, labels: Labels, what: &str)
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut map = LabelMap::new();
    super::list_and_watch(
        what,
        |lp| {
            let api = &api;
            async move { api.list_metadata(&lp).await }
        },
        |wp, version| {
            let api = &api;
            async move { api.watch_metadata(&wp, &version).await }
        },
        |seen: Seen<PartialObjectMeta<K>>| {
            match seen {
                Seen::Listed(all) => {
                    map = all.into_iter().map(|o| (o.name_any(), o.labels().clone())).collect()
                }
                Seen::Applied(o) => {
                    let l = o.labels().clone();
                    if map.get(&o.name_any()) == Some(&l) {
                        return;
                    }
                    map.insert(o.name_any(), l);
                }
                Seen::Deleted(o) => {
                    if map.remove(&o.name_any()).is_none() {
                        return;
                    }
                }
            }
            labels.replace(kind, map.clone());
        },
    )
    .await;
}

/// Follows the Nodes' and the Namespaces' labels into `labels`, forever (needs `list` and
/// `watch` on both, cluster-wide).
pub async fn follow(client: kube::Client, labels: Labels) {
    tokio::join!(
        follow_kind(Api::<Node>::all(client.clone()), Kind::Node, labels.clone(), "Nodes"),
        follow_kind(Api::<Namespace>::all(client), Kind::Namespace, labels, "Namespaces"),
    );
}
