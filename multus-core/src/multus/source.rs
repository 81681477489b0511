//! Where Pods and NetworkAttachmentDefinitions come from: the Kubernetes API (kube) or a
//! directory of YAML files (`rustMultus.objectsDir`), behind one trait so the plugin runs
//! and is tested without a cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize as _;
use serde_json::{Value, json};

/// API group/version of NetworkAttachmentDefinitions.
pub const NAD_API_VERSION: &str = "k8s.cni.cncf.io/v1";
/// Kind of NetworkAttachmentDefinitions.
pub const NAD_KIND: &str = "NetworkAttachmentDefinition";

/// What the plugin needs of a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub annotations: BTreeMap<String, String>,
    /// The names of the pod's ResourceClaims (DRA): those it names in
    /// `spec.resourceClaims[].resourceClaimName`, those made for it from templates
    /// (`status.resourceClaimStatuses[].resourceClaimName`), and the one the scheduler made
    /// for extended resources backed by DRA (`status.extendedResourceClaimStatus`, asked for
    /// in `resources.limits` like a device plugin's).
    pub claims: Vec<String>,
}

/// What the plugin needs of a NAD.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NadInfo {
    /// `spec.config`; empty when the NAD points at a file in `confDir` by its name.
    pub config: String,
    /// The `k8s.v1.cni.cncf.io/resourceName` annotation: the device plugin resource whose
    /// device the network needs (SR-IOV); empty when it has none.
    pub resource_name: String,
}

/// An event about a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEvent<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    /// `Normal` or `Warning`.
    pub kind: &'a str,
    pub reason: &'a str,
    pub message: String,
}

/// Why a lookup failed (a missing object is not an error: lookups return `None`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The API server or the objects directory cannot be reached or read.
    #[error("{0}")]
    Unreachable(String),
    /// An object is there but malformed, or a write was refused.
    #[error("{0}")]
    Invalid(String),
}

/// Read (and annotate) Pods and NADs.
pub trait ObjectSource: std::fmt::Debug {
    /// The pod, or `None` when it does not exist.
    fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodInfo>, SourceError>;
    /// The NAD, or `None` when it does not exist.
    fn nad(&self, namespace: &str, name: &str) -> Result<Option<NadInfo>, SourceError>;
    /// Sets (`Some`) or removes (`None`) one annotation of a pod.
    fn annotate_pod(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), SourceError>;
    /// Records events on pods (`Normal` or `Warning`, a reason, a message), as Multus
    /// does; all of them at once. Sources without events (a directory) record nothing.
    fn pod_events(&self, events: &[PodEvent<'_>]) -> Result<(), SourceError> {
        let _ = events;
        Ok(())
    }
    /// A ResourceClaim (`resource.k8s.io/v1`) as JSON, or `None` when it does not exist.
    fn resource_claim(&self, namespace: &str, name: &str) -> Result<Option<Value>, SourceError> {
        let _ = name;
        Err(SourceError::Unreachable(format!(
            "this source cannot read ResourceClaims (namespace {namespace})"
        )))
    }
    /// The ResourceSlices (`resource.k8s.io/v1`) of DRA driver `driver`, as JSON.
    fn resource_slices(&self, driver: &str) -> Result<Vec<Value>, SourceError> {
        Err(SourceError::Unreachable(format!("this source cannot read the ResourceSlices of {driver}")))
    }
}

/// A source shared by many calls, handed to the plugin in place of the one its config
/// names (`kubeconfig`, `objectsDir`): the thick daemon's watch cache
/// ([`super::watch::WatchCache`]) reaches every verb this way. Equal only to itself.
#[derive(Clone)]
pub struct SharedSource(pub std::sync::Arc<dyn ObjectSource + Send + Sync>);

impl std::fmt::Debug for SharedSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SharedSource").field(&self.0).finish()
    }
}

impl PartialEq for SharedSource {
    fn eq(&self, other: &SharedSource) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl ObjectSource for SharedSource {
    fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodInfo>, SourceError> {
        self.0.pod(namespace, name)
    }

    fn nad(&self, namespace: &str, name: &str) -> Result<Option<NadInfo>, SourceError> {
        self.0.nad(namespace, name)
    }

    fn annotate_pod(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), SourceError> {
        self.0.annotate_pod(namespace, name, key, value)
    }

    fn pod_events(&self, events: &[PodEvent<'_>]) -> Result<(), SourceError> {
        self.0.pod_events(events)
    }

    fn resource_claim(&self, namespace: &str, name: &str) -> Result<Option<Value>, SourceError> {
        self.0.resource_claim(namespace, name)
    }

    fn resource_slices(&self, driver: &str) -> Result<Vec<Value>, SourceError> {
        self.0.resource_slices(driver)
    }
}

pub(super) fn pod_info(obj: &Value) -> PodInfo {
    let meta = &obj["metadata"];
    let annotations = meta["annotations"]
        .as_object()
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    let named = obj["spec"]["resourceClaims"].as_array().into_iter().flatten();
    let made = obj["status"]["resourceClaimStatuses"].as_array().into_iter().flatten();
    let extended = Some(&obj["status"]["extendedResourceClaimStatus"]).filter(|c| c.is_object());
    let mut claims: Vec<String> = Vec::new();
    for c in named.chain(made).chain(extended) {
        if let Some(n) = c["resourceClaimName"].as_str().filter(|n| !n.is_empty())
            && !claims.iter().any(|k| k == n)
        {
            claims.push(n.to_string());
        }
    }
    PodInfo { uid: meta["uid"].as_str().unwrap_or_default().to_string(), annotations, claims }
}

pub(super) fn nad_info(obj: &Value, what: &str) -> Result<NadInfo, SourceError> {
    let config = match &obj["spec"]["config"] {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => return Err(SourceError::Invalid(format!("{what}: spec.config is {other}, not a string"))),
    };
    let resource_name = match &obj["metadata"]["annotations"][super::devices::RESOURCE_NAME_ANNOTATION] {
        Value::Null => String::new(),
        Value::String(s) => s.trim().to_string(),
        other => {
            return Err(SourceError::Invalid(format!(
                "{what}: annotation {} is {other}, not a string",
                super::devices::RESOURCE_NAME_ANNOTATION
            )));
        }
    };
    Ok(NadInfo { config, resource_name })
}

/// Objects from `*.yaml`, `*.yml` and `*.json` files in one directory (not recursive). A
/// file may hold several documents (`---`) and `kind: List` objects. A pod's annotations
/// are written back into its file (comments and formatting of that file are not kept).
#[derive(Debug, Clone)]
pub struct DirSource {
    dir: PathBuf,
}

impl DirSource {
    /// A source reading `dir`; the directory is read on each lookup.
    pub fn new(dir: impl Into<PathBuf>) -> DirSource {
        DirSource { dir: dir.into() }
    }

    fn files(&self) -> Result<Vec<PathBuf>, SourceError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| {
            SourceError::Unreachable(format!("objects directory {}: {e}", self.dir.display()))
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
            })
            .collect();
        files.sort();
        Ok(files)
    }

    fn read_docs(path: &Path) -> Result<Vec<Value>, SourceError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SourceError::Unreachable(format!("{}: {e}", path.display())))?;
        let mut docs = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc)
                .map_err(|e| SourceError::Invalid(format!("{}: not valid YAML: {e}", path.display())))?;
            docs.push(v);
        }
        Ok(docs)
    }

    /// Calls `f` on every object matching kind/namespace/name in every file, with the file's
    /// documents, until `f` says it is done; the documents are rewritten if `f` changed one.
    fn visit(
        &self,
        api_version: Option<&str>,
        kind: &str,
        namespace: &str,
        name: &str,
        mut f: impl FnMut(&mut Value) -> Result<bool, SourceError>,
    ) -> Result<bool, SourceError> {
        fn matches(o: &Value, api_version: Option<&str>, kind: &str, namespace: &str, name: &str) -> bool {
            let meta = &o["metadata"];
            o["kind"] == kind
                && api_version.is_none_or(|a| o["apiVersion"] == a)
                && meta["name"] == name
                && meta["namespace"].as_str().unwrap_or("default") == namespace
        }
        for path in self.files()? {
            let mut docs = Self::read_docs(&path)?;
            let mut found = None;
            'docs: for doc in docs.iter_mut() {
                let objects: Vec<&mut Value> = if doc["kind"] == "List" {
                    doc["items"].as_array_mut().map(|a| a.iter_mut().collect()).unwrap_or_default()
                } else {
                    vec![doc]
                };
                for o in objects {
                    if matches(o, api_version, kind, namespace, name) {
                        found = Some(f(o)?);
                        break 'docs;
                    }
                }
            }
            match found {
                Some(true) => {
                    write_docs(&path, &docs)?;
                    return Ok(true);
                }
                Some(false) => return Ok(true),
                None => {}
            }
        }
        Ok(false)
    }
}

fn write_docs(path: &Path, docs: &[Value]) -> Result<(), SourceError> {
    let mut text = String::new();
    let json_file = path.extension().is_some_and(|e| e == "json");
    for (i, d) in docs.iter().filter(|d| !d.is_null()).enumerate() {
        if json_file && docs.len() == 1 {
            text = serde_json::to_string_pretty(d).unwrap_or_default();
            text.push('\n');
            break;
        }
        if i > 0 {
            text.push_str("---\n");
        }
        text.push_str(
            &serde_yaml::to_string(d)
                .map_err(|e| SourceError::Invalid(format!("{}: rendering YAML: {e}", path.display())))?,
        );
    }
    let tmp = path.with_extension("rust-multus-tmp");
    let fail = |e: std::io::Error| SourceError::Unreachable(format!("writing {}: {e}", path.display()));
    std::fs::write(&tmp, text).map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}

/// API version of ResourceClaims and ResourceSlices (DRA).
pub const DRA_API_VERSION: &str = "resource.k8s.io/v1";

impl ObjectSource for DirSource {
    fn resource_claim(&self, namespace: &str, name: &str) -> Result<Option<Value>, SourceError> {
        let mut out = None;
        self.visit(Some(DRA_API_VERSION), "ResourceClaim", namespace, name, |o| {
            out = Some(o.clone());
            Ok(false)
        })?;
        Ok(out)
    }

    fn resource_slices(&self, driver: &str) -> Result<Vec<Value>, SourceError> {
        let mut out = Vec::new();
        for path in self.files()? {
            for doc in Self::read_docs(&path)? {
                let objects = if doc["kind"] == "List" {
                    doc["items"].as_array().cloned().unwrap_or_default()
                } else {
                    vec![doc]
                };
                out.extend(objects.into_iter().filter(|o| {
                    o["apiVersion"] == DRA_API_VERSION
                        && o["kind"] == "ResourceSlice"
                        && o["spec"]["driver"] == driver
                }));
            }
        }
        Ok(out)
    }

    fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodInfo>, SourceError> {
        let mut out = None;
        self.visit(Some("v1"), "Pod", namespace, name, |o| {
            out = Some(pod_info(o));
            Ok(false)
        })?;
        Ok(out)
    }

    fn nad(&self, namespace: &str, name: &str) -> Result<Option<NadInfo>, SourceError> {
        let mut out = None;
        let what = format!("NetworkAttachmentDefinition {namespace}/{name}");
        self.visit(Some(NAD_API_VERSION), NAD_KIND, namespace, name, |o| {
            out = Some(nad_info(o, &what)?);
            Ok(false)
        })?;
        Ok(out)
    }

    fn annotate_pod(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), SourceError> {
        let found = self.visit(Some("v1"), "Pod", namespace, name, |o| {
            let meta = o["metadata"]
                .as_object_mut()
                .ok_or_else(|| SourceError::Invalid(format!("pod {namespace}/{name} has no metadata")))?;
            let ann = meta.entry("annotations").or_insert_with(|| json!({}));
            if !ann.is_object() {
                *ann = json!({});
            }
            let ann = ann.as_object_mut().expect("made an object above");
            match value {
                Some(v) => {
                    ann.insert(key.to_string(), Value::String(v.to_string()));
                }
                None => {
                    ann.remove(key);
                }
            }
            Ok(true)
        })?;
        if found {
            Ok(())
        } else {
            Err(SourceError::Invalid(format!("pod {namespace}/{name} not found in {}", self.dir.display())))
        }
    }
}

/// The Kubernetes API through kube. Each call blocks on a private single-threaded runtime
/// (the plugin is one short process per CNI command).
pub struct KubeSource {
    rt: tokio::runtime::Runtime,
    client: kube::Client,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource").finish_non_exhaustive()
    }
}

/// How long to wait for the API server before calling it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(15);

pub(super) fn kube_err(e: kube::Error, what: &str) -> SourceError {
    match e {
        // Overload and server errors are the API being away, not a bad object.
        kube::Error::Api(s) if s.code == 429 || s.code >= 500 => {
            SourceError::Unreachable(format!("{what}: API server answered {} {}", s.code, s.message))
        }
        kube::Error::Api(s) => SourceError::Invalid(format!("{what}: {} ({})", s.message, s.reason)),
        other => SourceError::Unreachable(format!("{what}: {other}")),
    }
}

impl KubeSource {
    /// A client from `kubeconfig`, or the in-cluster service account when `None`.
    pub fn new(kubeconfig: Option<&Path>) -> Result<KubeSource, SourceError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| SourceError::Unreachable(format!("starting the runtime: {e}")))?;
        let client = rt.block_on(async {
            let mut config = match kubeconfig {
                Some(path) => {
                    let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                        SourceError::Unreachable(format!("reading kubeconfig {}: {e}", path.display()))
                    })?;
                    kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                        .await
                        .map_err(|e| {
                            SourceError::Unreachable(format!("using kubeconfig {}: {e}", path.display()))
                        })?
                }
                None => kube::Config::incluster().map_err(|e| {
                    SourceError::Unreachable(format!("no kubeconfig and no in-cluster service account: {e}"))
                })?,
            };
            // kube's default retries a 503 fifteen times with backoff (minutes): a CNI
            // command must answer, and the runtime retries ADD itself.
            config.default_retry = false;
            config.connect_timeout = Some(CONNECT_TIMEOUT);
            config.read_timeout = Some(READ_TIMEOUT);
            kube::Client::try_from(config)
                .map_err(|e| SourceError::Unreachable(format!("building the Kubernetes client: {e}")))
        })?;
        Ok(KubeSource { rt, client })
    }
}

/// The API resource of NetworkAttachmentDefinitions.
pub(super) fn nad_resource() -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: "k8s.cni.cncf.io".into(),
        version: "v1".into(),
        api_version: NAD_API_VERSION.into(),
        kind: NAD_KIND.into(),
        plural: "network-attachment-definitions".into(),
    }
}

/// Creates core/v1 Events about pods, all at once (one round trip, not one per event);
/// the first failure, if any.
pub(super) async fn create_events(client: &kube::Client, events: &[PodEvent<'_>]) -> Result<(), SourceError> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let host = std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_default();
    let writes = events.iter().map(|e| {
        let (now, host) = (&now, &host);
        async move {
            let api: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
                client.clone(),
                e.namespace,
                &kube::api::ApiResource::erase::<k8s_openapi::api::core::v1::Event>(&()),
            );
            let event: kube::api::DynamicObject = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": format!("{}.", e.name), "namespace": e.namespace},
                "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": e.namespace, "name": e.name, "uid": e.uid},
                "type": e.kind, "reason": e.reason, "message": e.message,
                "source": {"component": "rust-multus", "host": host},
                "reportingComponent": "rust-multus", "reportingInstance": host,
                "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            }))
            .map_err(|err| SourceError::Invalid(format!("an event of pod {}/{}: {err}", e.namespace, e.name)))?;
            api.create(&kube::api::PostParams::default(), &event)
                .await
                .map_err(|err| kube_err(err, &format!("an event of pod {}/{}", e.namespace, e.name)))?;
            Ok::<(), SourceError>(())
        }
    });
    futures::future::join_all(writes).await.into_iter().collect()
}

fn dra_resource(kind: &str, plural: &str) -> kube::api::ApiResource {
    kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("resource.k8s.io", "v1", kind),
        plural,
    )
}

/// A ResourceClaim as JSON, or `None`.
pub(super) async fn get_resource_claim(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Option<Value>, SourceError> {
    let api: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        client.clone(),
        namespace,
        &dra_resource("ResourceClaim", "resourceclaims"),
    );
    let obj =
        api.get_opt(name).await.map_err(|e| kube_err(e, &format!("ResourceClaim {namespace}/{name}")))?;
    Ok(obj.map(|o| serde_json::to_value(&o).unwrap_or_default()))
}

/// The ResourceSlices of DRA driver `driver` as JSON (a field selector on `spec.driver`).
pub(super) async fn list_resource_slices(
    client: &kube::Client,
    driver: &str,
) -> Result<Vec<Value>, SourceError> {
    let api: kube::Api<kube::api::DynamicObject> =
        kube::Api::all_with(client.clone(), &dra_resource("ResourceSlice", "resourceslices"));
    let params = kube::api::ListParams::default().fields(&format!("spec.driver={driver}"));
    let list =
        api.list(&params).await.map_err(|e| kube_err(e, &format!("the ResourceSlices of {driver}")))?;
    Ok(list.items.iter().map(|o| serde_json::to_value(o).unwrap_or_default()).collect())
}

impl ObjectSource for KubeSource {
    fn pod_events(&self, events: &[PodEvent<'_>]) -> Result<(), SourceError> {
        self.rt.block_on(create_events(&self.client, events))
    }

    fn resource_claim(&self, namespace: &str, name: &str) -> Result<Option<Value>, SourceError> {
        self.rt.block_on(get_resource_claim(&self.client, namespace, name))
    }

    fn resource_slices(&self, driver: &str) -> Result<Vec<Value>, SourceError> {
        self.rt.block_on(list_resource_slices(&self.client, driver))
    }

    fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodInfo>, SourceError> {
        use k8s_openapi::api::core::v1::Pod;
        let api: kube::Api<Pod> = kube::Api::namespaced(self.client.clone(), namespace);
        let pod = self
            .rt
            .block_on(api.get_opt(name))
            .map_err(|e| kube_err(e, &format!("pod {namespace}/{name}")))?;
        Ok(pod.map(|p| {
            let v = serde_json::to_value(&p).unwrap_or_default();
            pod_info(&v)
        }))
    }

    fn nad(&self, namespace: &str, name: &str) -> Result<Option<NadInfo>, SourceError> {
        let ar = nad_resource();
        let api: kube::Api<kube::api::DynamicObject> =
            kube::Api::namespaced_with(self.client.clone(), namespace, &ar);
        let what = format!("NetworkAttachmentDefinition {namespace}/{name}");
        let obj = self.rt.block_on(api.get_opt(name)).map_err(|e| kube_err(e, &what))?;
        // The whole object: its annotations are in the metadata, the config in `data`.
        obj.map(|o| nad_info(&serde_json::to_value(&o).unwrap_or_default(), &what)).transpose()
    }

    fn annotate_pod(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), SourceError> {
        use k8s_openapi::api::core::v1::Pod;
        let api: kube::Api<Pod> = kube::Api::namespaced(self.client.clone(), namespace);
        // A JSON merge patch: null removes the key.
        let patch = json!({"metadata": {"annotations": {key: value}}});
        self.rt
            .block_on(api.patch(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)))
            .map_err(|e| kube_err(e, &format!("annotating pod {namespace}/{name}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OBJECTS: &str = r#"
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata:
  name: rail-0
  namespace: fixture
  annotations:
    k8s.v1.cni.cncf.io/resourceName: nvidia.com/rail0_vf
spec:
  config: '{"cniVersion":"1.0.0","type":"macvlan"}'
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata:
    name: trainer
    namespace: fixture
    uid: 0b6e8ad1
    annotations:
      k8s.v1.cni.cncf.io/networks: rail-0
- apiVersion: k8s.cni.cncf.io/v1
  kind: NetworkAttachmentDefinition
  metadata:
    name: from-file
"#;

    #[test]
    fn a_pods_claims_are_named_templated_and_extended_each_once() {
        let pod = serde_json::json!({
            "metadata": {"uid": "u1", "annotations": {"k8s.v1.cni.cncf.io/networks": "rail-0"}},
            "spec": {"resourceClaims": [
                {"name": "gpu", "resourceClaimName": "shared-gpu"},
                {"name": "vf", "resourceClaimTemplateName": "vf-template"}]},
            "status": {
                "resourceClaimStatuses": [
                    {"name": "gpu", "resourceClaimName": "shared-gpu"},
                    {"name": "vf", "resourceClaimName": "trainer-vf-x7k2p"}],
                "extendedResourceClaimStatus": {"resourceClaimName": "trainer-extended-resources-9qz",
                    "requestMappings": [{"containerName": "c", "resourceName": "example.com/rail_vf", "requestName": "r0"}]}}});
        let info = pod_info(&pod);
        assert_eq!(info.uid, "u1");
        assert_eq!(info.claims, ["shared-gpu", "trainer-vf-x7k2p", "trainer-extended-resources-9qz"]);
        assert_eq!(pod_info(&serde_json::json!({"metadata": {}})).claims, Vec::<String>::new());
    }

    #[test]
    fn directory_lookups_and_write_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("objects.yaml"), OBJECTS).expect("write");
        std::fs::write(dir.path().join("notes.txt"), "not: [yaml").expect("write");
        let s = DirSource::new(dir.path());
        let nad = s.nad("fixture", "rail-0").expect("read").expect("found");
        assert_eq!(nad.config, r#"{"cniVersion":"1.0.0","type":"macvlan"}"#);
        assert_eq!(nad.resource_name, "nvidia.com/rail0_vf");
        assert_eq!(s.nad("default", "from-file").expect("read"), Some(NadInfo::default()));
        assert_eq!(s.nad("other", "rail-0").expect("read"), None);
        let pod = s.pod("fixture", "trainer").expect("read").expect("found");
        assert_eq!(pod.uid, "0b6e8ad1");
        assert_eq!(pod.annotations["k8s.v1.cni.cncf.io/networks"], "rail-0");
        assert_eq!(s.pod("fixture", "rail-0").expect("read"), None, "a NAD is not a pod");

        s.annotate_pod("fixture", "trainer", "k8s.v1.cni.cncf.io/network-status", Some("[{\"a\":1}]"))
            .expect("annotate");
        let pod = s.pod("fixture", "trainer").expect("read").expect("found");
        assert_eq!(pod.annotations["k8s.v1.cni.cncf.io/network-status"], "[{\"a\":1}]");
        assert_eq!(s.nad("fixture", "rail-0").expect("still there").map(|n| n.config.len()), Some(39));
        s.annotate_pod("fixture", "trainer", "k8s.v1.cni.cncf.io/network-status", None).expect("remove");
        let pod = s.pod("fixture", "trainer").expect("read").expect("found");
        assert_eq!(pod.annotations.len(), 1);
        assert_eq!(
            s.annotate_pod("fixture", "gone", "k", Some("v")).expect_err("no pod"),
            SourceError::Invalid(format!("pod fixture/gone not found in {}", dir.path().display()))
        );

        std::fs::write(dir.path().join("bad.yaml"), "kind: [").expect("write");
        assert!(
            matches!(s.pod("x", "y"), Err(SourceError::Invalid(m)) if m.contains("bad.yaml: not valid YAML"))
        );
        let gone = DirSource::new(dir.path().join("missing"));
        assert!(
            matches!(gone.nad("a", "b"), Err(SourceError::Unreachable(m)) if m.starts_with("objects directory "))
        );
    }
}
