//! Running in a Kubernetes cluster: the custom resources, the store built on them, leader
//! election among replicas, the IPPools NADs name, the StatefulSets and IPAMClaims addresses
//! are kept for, the pods reconcile reads and
//! Whereabouts' objects the import reads. Every list goes through [`for_each_page`].

pub mod crd;
pub mod ippools;
pub mod keep;
pub mod labels;
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

/// Lists all of `api`'s objects in one response served from the API server's watch cache
/// (`resourceVersion=0`), handing each to `each` as it is decoded, so what is held is the
/// response text and one object, not every object decoded at once. Returns the list's
/// resourceVersion, where a watch of what changed since starts.
///
/// The watch cache trails etcd by its watch's delay (milliseconds), so a caller must be
/// safe with a view that old: the lease store is, because every write it makes is
/// conditional (see `store`). For 100,000 IPLeases on a real API server this takes 5 s
/// where [`for_each_page`] from etcd takes 17 s: a paged list is read from etcd (a
/// continued page cannot come from the cache), and the API server encodes the same JSON
/// either way (docs/benchmarks.md). A list of every object at once from etcd would need
/// the API server to hold them all; from its cache it already does.
pub async fn for_each_cached<K>(api: &kube::Api<K>, each: impl FnMut(K)) -> Result<String, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned,
{
    let request = kube::core::Request::new(api.resource_url())
        .list(&ListParams::default().match_any())
        .map_err(kube::Error::BuildRequest)?;
    let text = api.clone().into_client().request_text(request).await?;
    each_listed(&text, each).map_err(kube::Error::SerdeError)
}

/// Decodes a list response, handing each item to `each` as it is decoded; returns the
/// list's resourceVersion.
fn each_listed<K: serde::de::DeserializeOwned>(
    text: &str,
    each: impl FnMut(K),
) -> serde_json::Result<String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let version =
        serde::Deserializer::deserialize_map(&mut de, cached::List { each, item: std::marker::PhantomData })?;
    de.end()?;
    Ok(version)
}

/// The decoding of [`for_each_cached`]'s response, one item at a time.
mod cached {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

    /// A list response: its `metadata.resourceVersion` is returned, its `items` handed on.
    pub(super) struct List<K, F> {
        pub(super) each: F,
        pub(super) item: PhantomData<K>,
    }

    impl<'de, K: DeserializeOwned, F: FnMut(K)> Visitor<'de> for List<K, F> {
        type Value = String;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a Kubernetes list")
        }

        fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<String, A::Error> {
            #[derive(serde::Deserialize, Default)]
            #[serde(rename_all = "camelCase")]
            struct Meta {
                #[serde(default)]
                resource_version: String,
            }
            let mut version = String::new();
            while let Some(key) = map.next_key::<String>()? {
                match key.as_str() {
                    "items" => map.next_value_seed(Items { each: &mut self.each, item: PhantomData })?,
                    "metadata" => version = map.next_value::<Meta>()?.resource_version,
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(version)
        }
    }

    /// The `items` array (or `null`), each element handed on as soon as it is decoded.
    struct Items<'a, K, F> {
        each: &'a mut F,
        item: PhantomData<K>,
    }

    impl<'de, K: DeserializeOwned, F: FnMut(K)> DeserializeSeed<'de> for Items<'_, K, F> {
        type Value = ();

        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de, K: DeserializeOwned, F: FnMut(K)> Visitor<'de> for Items<'_, K, F> {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("the list's items")
        }

        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while let Some(item) = seq.next_element::<K>()? {
                (self.each)(item);
            }
            Ok(())
        }
    }
}

/// What [`list_and_watch`] hands on: every object after a (re)list, then each change.
#[derive(Debug)]
pub enum Seen<T> {
    Listed(Vec<T>),
    Applied(T),
    Deleted(T),
}

/// Pause after a failed list or watch call before the next.
const FOLLOW_RETRY: std::time::Duration = std::time::Duration::from_secs(1);
/// Longest pause between lists that keep failing.
const FOLLOW_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// Lists the objects (paged), then watches from the list's resourceVersion, forever,
/// handing what it sees to `seen`: a watch that ends is resumed where it stopped, one
/// whose history is gone (410) lists anew. `what` names the objects in the log.
pub async fn list_and_watch<T, L, LFut, W, WFut, S>(
    what: &str,
    mut list: L,
    mut watch: W,
    mut seen: impl FnMut(Seen<T>),
) where
    T: kube::Resource + Clone,
    L: FnMut(ListParams) -> LFut,
    LFut: Future<Output = Result<ObjectList<T>, kube::Error>>,
    W: FnMut(kube::api::WatchParams, String) -> WFut,
    WFut: Future<Output = Result<S, kube::Error>>,
    S: futures::Stream<Item = Result<kube::api::WatchEvent<T>, kube::Error>>,
{
    use futures::StreamExt as _;
    use kube::api::WatchEvent;
    // Lists that keep failing (a CRD that is not installed, RBAC without the verb) back
    // off and warn once, then at debug level until one succeeds.
    let mut pause = FOLLOW_RETRY;
    loop {
        let mut objects = Vec::new();
        let mut version = match for_each_page(500, &mut list, |o| objects.push(o)).await {
            Ok(v) => v,
            Err(e) => {
                if pause == FOLLOW_RETRY {
                    tracing::warn!(error = %e, "listing the {what} failed; retrying (further failures at debug level)");
                } else {
                    tracing::debug!(error = %e, "listing the {what} failed; retrying");
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(FOLLOW_RETRY_MAX);
                continue;
            }
        };
        pause = FOLLOW_RETRY;
        tracing::info!(count = objects.len(), "{what} listed; watching");
        seen(Seen::Listed(objects));
        loop {
            let params = kube::api::WatchParams::default().timeout(290);
            let events = match watch(params, version.clone()).await {
                Ok(events) => events,
                Err(e) => {
                    tracing::warn!(error = %e, "watching the {what} failed; retrying");
                    tokio::time::sleep(FOLLOW_RETRY).await;
                    continue;
                }
            };
            let mut events = std::pin::pin!(events);
            let mut gone = false;
            while let Some(event) = events.next().await {
                match event {
                    Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => {
                        version = o.meta().resource_version.clone().unwrap_or(version);
                        seen(Seen::Applied(o));
                    }
                    Ok(WatchEvent::Deleted(o)) => {
                        version = o.meta().resource_version.clone().unwrap_or(version);
                        seen(Seen::Deleted(o));
                    }
                    Ok(WatchEvent::Bookmark(b)) => version = b.metadata.resource_version,
                    Ok(WatchEvent::Error(s)) if s.code == 410 => {
                        gone = true;
                        break;
                    }
                    Ok(WatchEvent::Error(s)) => {
                        tracing::debug!(code = s.code, message = %s.message, "the {what} watch ended with an error");
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "the {what} watch broke off");
                        break;
                    }
                }
            }
            if gone {
                tracing::info!("the {what} watch's history is gone; listing anew");
                break;
            }
        }
    }
}

/// [`list_and_watch`] of `api`'s objects, whole, handing each change to `apply`.
pub async fn follow_objects<K>(api: kube::Api<K>, what: &str, apply: impl FnMut(Seen<K>))
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    list_and_watch(
        what,
        |lp| {
            let api = &api;
            async move { api.list(&lp).await }
        },
        |wp, version| {
            let api = &api;
            async move { api.watch(&wp, &version).await }
        },
        apply,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::each_listed;

    fn names(text: &str) -> serde_json::Result<(String, Vec<String>)> {
        let mut names = Vec::new();
        let version =
            each_listed(text, |o: kube::api::DynamicObject| names.push(o.metadata.name.unwrap_or_default()))?;
        Ok((version, names))
    }

    #[test]
    fn a_list_response_is_decoded_item_by_item_in_any_key_order() {
        let text = r#"{"kind":"IPLeaseList","apiVersion":"ipam.rust-ipam.io/v1alpha1",
            "items":[{"metadata":{"name":"a"},"spec":{"x":1}},{"metadata":{"name":"b"}}],
            "metadata":{"resourceVersion":"42","continue":""}}"#;
        assert_eq!(names(text).unwrap(), ("42".to_string(), vec!["a".to_string(), "b".to_string()]));
        let empty = r#"{"metadata":{"resourceVersion":"7"},"items":null}"#;
        assert_eq!(names(empty).unwrap(), ("7".to_string(), vec![]));
        assert_eq!(names(r#"{"items":[]}"#).unwrap(), (String::new(), vec![]));
    }

    #[test]
    fn a_broken_response_is_an_error_naming_where() {
        let cut = r#"{"metadata":{"resourceVersion":"42"},"items":[{"metadata":{"name":"a"}},{"metad"#;
        assert!(names(cut).unwrap_err().to_string().contains("EOF while parsing"));
        let not_items = r#"{"items":{"a":1}}"#;
        assert!(names(not_items).unwrap_err().to_string().contains("the list's items"));
        let trailing = r#"{"items":[]} {"#;
        assert!(names(trailing).unwrap_err().to_string().contains("trailing characters"));
        assert!(names("[]").unwrap_err().to_string().contains("a Kubernetes list"));
    }
}
