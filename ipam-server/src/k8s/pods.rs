//! Pods from the Kubernetes API, read-only: one paginated list of every pod's metadata
//! (`list pods` across namespaces) and a fresh `get pod` per candidate.
//!
//! Only metadata is asked for (`PartialObjectMetadata`): a pass needs names and UIDs, not
//! specs, so a list of many thousands of pods stays small. Neither call sets a
//! `resourceVersion`, so the API server answers from etcd (a quorum read), never from its
//! watch cache: the pod list is at least as new as the lease snapshot read before it.

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::core::PartialObjectMeta;

use crate::reconcile::{PodError, PodInfo, PodSource};

/// Pods per list page.
const PAGE: u32 = 500;

/// Reads pods through a kube client.
#[derive(Clone)]
pub struct KubePods {
    client: kube::Client,
}

impl std::fmt::Debug for KubePods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubePods")
    }
}

impl KubePods {
    /// Pods through `client` (needs `get` and `list` on pods in every namespace).
    pub fn new(client: kube::Client) -> KubePods {
        KubePods { client }
    }
}

fn info(m: PartialObjectMeta<Pod>) -> Option<PodInfo> {
    let meta = m.metadata;
    Some(PodInfo { namespace: meta.namespace?, name: meta.name?, uid: meta.uid.unwrap_or_default() })
}

impl PodSource for KubePods {
    fn list(&self) -> BoxFuture<'_, Result<Vec<PodInfo>, PodError>> {
        Box::pin(async move {
            let api: Api<Pod> = Api::all(self.client.clone());
            let mut pods = Vec::new();
            let api = &api;
            super::for_each_page(
                PAGE,
                |lp| async move { api.list_metadata(&lp).await },
                |m| pods.extend(info(m)),
            )
            .await
            .map_err(|e| PodError::List(e.into()))?;
            Ok(pods)
        })
    }

    fn get<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<PodInfo>, PodError>> {
        Box::pin(async move {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            let got = api.get_metadata_opt(name).await.map_err(|e| PodError::Get {
                namespace: namespace.into(),
                name: name.into(),
                source: e.into(),
            })?;
            Ok(got.and_then(info))
        })
    }
}
