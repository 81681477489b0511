//! [`Keeper`] on the Kubernetes API: StatefulSets and IPAMClaims listed and then watched
//! on every replica (so a new leader decides at once), a pod's metadata read at ADD when
//! its name is `<set>-<n>` of a set that exists, and a claim read at ADD when one is named.
//!
//! Verbs (deploy/base/rbac.yaml): `list`/`watch` statefulsets (apps) and ipamclaims
//! (k8s.cni.cncf.io) in every namespace, `get` pods and ipamclaims, `patch`
//! ipamclaims/status.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::{CustomResource, ResourceExt as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tracing::{Instrument as _, info_span, warn};

use super::Seen as Change;

use crate::allocator::{Lease, Owner, PodRef};
use crate::keep::{KeepError, Keeper, SetState, set_keeps, split_ordinal};

/// k8snetworkplumbingwg's IPAMClaim (`ipamclaims.k8s.cni.cncf.io`, v1alpha1), as far as
/// rust-ipam reads and writes it. The CRD is theirs (KubeVirt's ipam-extensions installs
/// it); this type is written from its published schema.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "k8s.cni.cncf.io",
    version = "v1alpha1",
    kind = "IPAMClaim",
    plural = "ipamclaims",
    namespaced,
    status = "IPAMClaimStatus"
)]
pub struct IPAMClaimSpec {
    /// The network the claim's addresses are in.
    pub network: String,
    /// The pod interface the claim was made for.
    pub interface: String,
}

/// What the IPAM wrote: the claim's addresses.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct IPAMClaimStatus {
    /// `address/prefix`, one per family.
    pub ips: Vec<String>,
}

/// The IPAMClaim CRD as YAML, from [`IPAMClaim`]: what the tests install
/// (`tests/envtest/ipamclaims.yaml`) where KubeVirt's ipam-extensions would have.
pub fn ipamclaim_crd_yaml() -> String {
    use kube::CustomResourceExt as _;
    let header = "# k8snetworkplumbingwg's IPAMClaim CRD as rust-ipam reads it, generated from \
                  ipam-server/src/k8s/keep.rs for the tests\n# (`RUST_IPAM_REGENERATE=1 cargo test -p ipam-server --test crds`); \
                  a cluster installs the CRD from its own project.\n";
    format!("{header}{}", serde_yaml::to_string(&IPAMClaim::crd()).unwrap_or_default())
}

#[derive(Debug, Default)]
struct Seen {
    sets: HashMap<(String, String), SetState>,
    sets_listed: bool,
    claims: HashSet<(String, String)>,
    claims_listed: bool,
}

/// The keeper of a server with a Kubernetes API.
#[derive(Clone)]
pub struct KubeKeeper {
    client: kube::Client,
    /// Whether StatefulSet pods get an owner (`--keep-statefulset-addresses`).
    statefulsets: bool,
    seen: Arc<Mutex<Seen>>,
}

impl std::fmt::Debug for KubeKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeKeeper").field("statefulsets", &self.statefulsets).finish_non_exhaustive()
    }
}

fn set_state(s: &StatefulSet) -> Option<((String, String), SetState)> {
    let spec = s.spec.as_ref();
    let state = SetState {
        uid: s.metadata.uid.clone()?,
        replicas: spec.and_then(|sp| sp.replicas).map_or(1, |r| u32::try_from(r).unwrap_or(0)),
        start: spec
            .and_then(|sp| sp.ordinals.as_ref())
            .and_then(|o| o.start)
            .map_or(0, |r| u32::try_from(r).unwrap_or(0)),
    };
    Some(((s.namespace()?, s.name_any()), state))
}

fn claim_key(c: &IPAMClaim) -> Option<(String, String)> {
    Some((c.namespace()?, c.name_any()))
}

impl KubeKeeper {
    /// A keeper reading through `client`; `statefulsets` false turns the StatefulSet rule
    /// off (claims stay). [`KubeKeeper::spawn`] starts its watches.
    pub fn new(client: kube::Client, statefulsets: bool) -> KubeKeeper {
        KubeKeeper { client, statefulsets, seen: Arc::default() }
    }

    /// Starts following the StatefulSets (when their rule is on) and the IPAMClaims.
    pub fn spawn(&self) {
        if self.statefulsets {
            let seen = self.seen.clone();
            let api: Api<StatefulSet> = Api::all(self.client.clone());
            tokio::spawn(
                super::follow_objects(api, "StatefulSets", move |change| {
                    let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                    match change {
                        Change::Listed(all) => {
                            s.sets = all.iter().filter_map(set_state).collect();
                            s.sets_listed = true;
                        }
                        Change::Applied(o) => s.sets.extend(set_state(&o)),
                        Change::Deleted(o) => {
                            s.sets.remove(&(o.namespace().unwrap_or_default(), o.name_any()));
                        }
                    }
                })
                .instrument(info_span!("statefulsets")),
            );
        }
        let seen = self.seen.clone();
        let api: Api<IPAMClaim> = Api::all(self.client.clone());
        tokio::spawn(
            super::follow_objects(api, "IPAMClaims", move |change| {
                let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                match change {
                    Change::Listed(all) => {
                        s.claims = all.iter().filter_map(claim_key).collect();
                        s.claims_listed = true;
                    }
                    Change::Applied(o) => s.claims.extend(claim_key(&o)),
                    Change::Deleted(o) => {
                        s.claims.remove(&(o.namespace().unwrap_or_default(), o.name_any()));
                    }
                }
            })
            .instrument(info_span!("ipamclaims")),
        );
    }

    async fn claim_owner(&self, pod: &PodRef, claim: &str) -> Result<Option<Owner>, KeepError> {
        if pod.namespace.is_empty() {
            return Err(KeepError::NoNamespace(claim.into()));
        }
        let is_name = claim.len() <= 253
            && claim.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && claim.starts_with(|c: char| c.is_ascii_alphanumeric())
            && claim.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !is_name {
            return Err(KeepError::ClaimName { value: claim.into(), namespace: pod.namespace.clone() });
        }
        let api: Api<IPAMClaim> = Api::namespaced(self.client.clone(), &pod.namespace);
        match api.get_opt(claim).await {
            Ok(Some(_)) => Ok(Some(Owner::Claim { name: claim.into() })),
            Ok(None) => {
                Err(KeepError::ClaimNotFound { namespace: pod.namespace.clone(), name: claim.into() })
            }
            // No such resource at all: the CRD is not installed, so neither is the claim.
            Err(kube::Error::Api(e)) if e.code == 404 => {
                Err(KeepError::ClaimNotFound { namespace: pod.namespace.clone(), name: claim.into() })
            }
            Err(e) => Err(KeepError::Api {
                what: format!("reading IPAMClaim {}/{claim}", pod.namespace),
                source: e.into(),
            }),
        }
    }

    async fn set_owner(&self, pod: &PodRef) -> Result<Option<Owner>, KeepError> {
        let Some((set, _)) = split_ordinal(&pod.name) else { return Ok(None) };
        if pod.namespace.is_empty() {
            return Ok(None);
        }
        {
            let s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if s.sets_listed && !s.sets.contains_key(&(pod.namespace.clone(), set.to_string())) {
                return Ok(None);
            }
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let meta = api.get_metadata_opt(&pod.name).await.map_err(|e| KeepError::Api {
            what: format!("reading pod {}/{}", pod.namespace, pod.name),
            source: e.into(),
        })?;
        let Some(meta) = meta else { return Ok(None) };
        let controller = meta
            .metadata
            .owner_references
            .unwrap_or_default()
            .into_iter()
            .find(|r| r.controller == Some(true));
        Ok(controller
            .filter(|r| r.kind == "StatefulSet" && r.api_version == "apps/v1" && r.name == set)
            .map(|r| Owner::StatefulSet { name: r.name, uid: r.uid }))
    }
}

impl Keeper for KubeKeeper {
    fn owner<'a>(
        &'a self,
        pod: &'a PodRef,
        claim: &'a str,
    ) -> BoxFuture<'a, Result<Option<Owner>, KeepError>> {
        Box::pin(async move {
            if !claim.is_empty() {
                return self.claim_owner(pod, claim).await;
            }
            if !self.statefulsets {
                return Ok(None);
            }
            self.set_owner(pod).await
        })
    }

    fn claim_of_pod<'a>(
        &'a self,
        pod: &'a PodRef,
        ifname: &'a str,
    ) -> BoxFuture<'a, Result<String, KeepError>> {
        Box::pin(async move {
            if pod.namespace.is_empty() || pod.name.is_empty() {
                return Ok(String::new());
            }
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
            let meta = api.get_metadata_opt(&pod.name).await.map_err(|e| KeepError::Api {
                what: format!("reading pod {}/{}", pod.namespace, pod.name),
                source: e.into(),
            })?;
            let annotation = meta
                .and_then(|m| m.metadata.annotations)
                .and_then(|mut a| a.remove("k8s.v1.cni.cncf.io/networks"))
                .unwrap_or_default();
            crate::keep::claim_in_networks(&annotation, ifname).map_err(|reason| KeepError::Annotation {
                pod: format!("{}/{}", pod.namespace, pod.name),
                reason,
            })
        })
    }

    fn keeps(&self, lease: &Lease) -> bool {
        let h = &lease.holder;
        let s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match &h.owner {
            None => false,
            Some(Owner::StatefulSet { name, uid }) => {
                if !self.statefulsets {
                    return false;
                }
                !s.sets_listed || set_keeps(lease, uid, s.sets.get(&(h.pod.namespace.clone(), name.clone())))
            }
            Some(Owner::Claim { name }) => {
                !s.claims_listed || s.claims.contains(&(h.pod.namespace.clone(), name.clone()))
            }
        }
    }

    fn claim_allocated<'a>(
        &'a self,
        namespace: &'a str,
        claim: &'a str,
        ips: Vec<String>,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let api: Api<IPAMClaim> = Api::namespaced(self.client.clone(), namespace);
            let patch = Patch::Merge(serde_json::json!({ "status": { "ips": ips } }));
            if let Err(e) = api.patch_status(claim, &PatchParams::default(), &patch).await {
                warn!(claim = %format_args!("{namespace}/{claim}"), error = %e, "writing the IPAMClaim's status.ips failed");
            }
        })
    }
}
