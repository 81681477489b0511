//! Running in a Kubernetes cluster: the custom resources, the store built on them, leader
//! election among replicas, the IPPools NADs name, the pods reconcile reads and
//! Whereabouts' objects the import reads. Every list goes through [`for_each_page`].

pub mod crd;
pub mod ippools;
pub mod leader;
pub mod lease_lock;
pub mod mirror;
pub mod pods;
pub mod store;
pub mod whereabouts;

use std::future::Future;

use kube::api::{ListParams, ObjectList};

/// Lists page by page (`limit` objects a page, following the continue token), handing each
/// object to `each` so a caller holds one page at a time. `list` is the API call for the
/// given parameters (`Api::list`, `Api::list_metadata`, ...). Returns the list's
/// resourceVersion (every page of one list is read at the same one), where a watch of
/// what changed since starts.
pub async fn for_each_page<T, F, Fut>(
    limit: u32,
    mut list: F,
    mut each: impl FnMut(T),
) -> Result<String, kube::Error>
where
    T: Clone, // as ObjectList requires
    F: FnMut(ListParams) -> Fut,
    Fut: Future<Output = Result<ObjectList<T>, kube::Error>>,
{
    let mut params = ListParams::default().limit(limit);
    let mut version = None;
    loop {
        let page = list(params.clone()).await?;
        version.get_or_insert(page.metadata.resource_version.unwrap_or_default());
        page.items.into_iter().for_each(&mut each);
        match page.metadata.continue_.filter(|t| !t.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(version.unwrap_or_default()),
        }
    }
}
