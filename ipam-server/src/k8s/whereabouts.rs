//! Reading Whereabouts' objects straight from the API server, for the import.

use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
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
        let api = &api;
        super::for_each_page(
            PAGE,
            |lp| async move { api.list(&lp).await },
            |mut obj| {
                // A list's items carry no type of their own; the import needs it.
                obj.types = Some(kube::api::TypeMeta {
                    api_version: format!("{GROUP}/{VERSION}"),
                    kind: kind.to_string(),
                });
                items.push(serde_json::to_value(obj).unwrap_or(Value::Null));
            },
        )
        .await?;
    }
    Ok(json!({ "apiVersion": "v1", "kind": "List", "items": items }).to_string())
}
