//! Reading Whereabouts' objects straight from the API server, for the import.

use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use serde_json::{Value, json};

/// Whereabouts' API group and version.
const GROUP: &str = "whereabouts.cni.cncf.io";
const VERSION: &str = "v1alpha1";

/// Objects per list call.
const PAGE: u32 = 500;

/// Every IPPool and OverlappingRangeIPReservation in `namespace` (where Whereabouts keeps
/// them, `kube-system` by default), as one `v1 List` document the import reads.
pub async fn list_objects(client: Client, namespace: &str) -> Result<String, kube::Error> {
    let mut items: Vec<Value> = Vec::new();
    for (kind, plural) in
        [("IPPool", "ippools"), ("OverlappingRangeIPReservation", "overlappingrangeipreservations")]
    {
        let resource =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, kind), plural);
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
        let mut params = ListParams::default().limit(PAGE);
        loop {
            let page = api.list(&params).await?;
            for mut obj in page.items {
                // A list's items carry no type of their own; the import needs it.
                obj.types = Some(kube::api::TypeMeta {
                    api_version: format!("{GROUP}/{VERSION}"),
                    kind: kind.to_string(),
                });
                items.push(serde_json::to_value(obj).unwrap_or(Value::Null));
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
    }
    Ok(json!({ "apiVersion": "v1", "kind": "List", "items": items }).to_string())
}
