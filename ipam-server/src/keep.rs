//! Keeping an address past the sandbox that held it: for a StatefulSet's pod, and for an
//! IPAMClaim.
//!
//! A lease whose attachment has an [`Owner`] is not freed by its sandbox's DEL (nor by a
//! CNI GC) while the owner still wants it: it stays, marked kept, under the last holder's
//! namespace, pod name and interface, and the next sandbox the owner's rules allow takes it
//! back (the allocator's owner index, see `Allocator::allocate`).
//!
//! - **StatefulSet**: a pod named `<set>-<ordinal>` whose controller reference is the
//!   StatefulSet `<set>` (checked by reading the pod, with the set's UID recorded) gets the
//!   owner; its address is kept for that pod name and interface while the set exists
//!   with that UID and wants the ordinal (`spec.ordinals.start <= ordinal <
//!   start + spec.replicas`). A pod of the same name that is not the set's takes nothing.
//! - **IPAMClaim** (`k8s.cni.cncf.io/v1alpha1`, the network selection element's
//!   `ipam-claim-reference`): the claim must exist in the pod's namespace (read at ADD);
//!   the address is the claim's in that network, whichever pod names it, until the claim
//!   is deleted. The claim's `status.ips` gets the addresses.
//!
//! Deciding needs the API: [`Keeper`] is the server's view of it. Which owner a new
//! attachment has is read at ADD (the pod only when its name is `<set>-<n>` of a set
//! that exists, the claim only when one is named), so a plain pod's ADD reads nothing.
//! Whether an owner still wants a lease is answered from memory (watched StatefulSets
//! and IPAMClaims) on the engine thread at DEL, GC and reconcile, so a DEL reads nothing.
//! While those copies are not listed yet, every owner counts as wanting its leases: a
//! lease kept too long is freed by a later DEL or reconcile pass, a lease freed too early
//! could be handed to another pod.
//!
//! Release order does not matter: the new sandbox's ADD takes the lease from the old
//! sandbox whether or not the old one's DEL came (the move is one engine call), and the
//! old sandbox's late DEL then finds nothing under its container ID.

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::allocator::{Lease, Owner, PodRef};

/// A StatefulSet as keeping needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetState {
    pub uid: String,
    /// `spec.replicas` (1 when unset, as the API defaults it).
    pub replicas: u32,
    /// `spec.ordinals.start` (0 when unset).
    pub start: u32,
}

impl SetState {
    /// Whether the set wants a pod of `ordinal`.
    pub fn wants(&self, ordinal: u32) -> bool {
        ordinal >= self.start && ordinal - self.start < self.replicas
    }
}

/// The StatefulSet name and ordinal a pod name would have: `web-3` is ordinal 3 of
/// `web`. `None` when the name does not end in `-<decimal>` (no leading zero, as the
/// controller names them).
pub fn split_ordinal(pod: &str) -> Option<(&str, u32)> {
    let (set, n) = pod.rsplit_once('-')?;
    if set.is_empty()
        || n.is_empty()
        || !n.bytes().all(|b| b.is_ascii_digit())
        || (n.len() > 1 && n.starts_with('0'))
    {
        return None;
    }
    Some((set, n.parse().ok()?))
}

/// Whether `set` (as last seen; `None`: no such set) still wants the address of `lease`,
/// whose owner is the StatefulSet named in it with `uid`.
pub fn set_keeps(lease: &Lease, uid: &str, set: Option<&SetState>) -> bool {
    let Some(set) = set else { return false };
    let Some((_, ordinal)) = split_ordinal(&lease.holder.pod.name) else { return false };
    set.uid == uid && set.wants(ordinal)
}

/// Why the owner of an attachment could not be decided.
#[derive(Debug, thiserror::Error)]
pub enum KeepError {
    /// The network selection element names a claim the pod's namespace does not have.
    #[error("IPAMClaim {namespace}/{name} (ipam-claim-reference) does not exist")]
    ClaimNotFound { namespace: String, name: String },
    /// The claim reference is not a name (a claim is always in the pod's namespace).
    #[error(
        "ipam-claim-reference {value:?} is not an object name: an IPAMClaim is read from the pod's namespace {namespace:?}"
    )]
    ClaimName { value: String, namespace: String },
    /// A claim needs the pod's namespace, which the request did not carry.
    #[error("ipam-claim-reference {0:?} needs the pod's namespace (K8S_POD_NAMESPACE)")]
    NoNamespace(String),
    /// The pod's networks annotation cannot be read for its claim.
    #[error("pod {pod}: its k8s.v1.cni.cncf.io/networks annotation {reason}")]
    Annotation { pod: String, reason: String },
    /// This server has no Kubernetes API to check a claim with.
    #[error(
        "ipam-claim-reference {0:?}: this server has no Kubernetes API to read IPAMClaims (run it in a cluster or with --kubeconfig)"
    )]
    NoApi(String),
    /// The NAD has allowPersistentIPs, and this server cannot read the pod's claim.
    #[error(
        "the network has allowPersistentIPs: this server has no Kubernetes API to read the pod's IPAMClaim (run it in a cluster or with --kubeconfig)"
    )]
    NoApiForPod,
    /// Reading the pod or the claim failed.
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The server's view of owners: which owner a new attachment has, and whether an owner
/// still wants a lease. [`crate::k8s::keep::KubeKeeper`] reads the API; tests have their own.
pub trait Keeper: Send + Sync + std::fmt::Debug {
    /// The checked owner of a new attachment of `pod`: the claim `claim` names (it must
    /// exist in the pod's namespace) if not empty, else the pod's StatefulSet, else none.
    fn owner<'a>(
        &'a self,
        pod: &'a PodRef,
        claim: &'a str,
    ) -> BoxFuture<'a, Result<Option<Owner>, KeepError>>;

    /// The `ipam-claim-reference` of `pod`'s network selection element for interface
    /// `ifname` (see [`claim_in_networks`]); "" when it names none or the pod is gone.
    fn claim_of_pod<'a>(
        &'a self,
        pod: &'a PodRef,
        ifname: &'a str,
    ) -> BoxFuture<'a, Result<String, KeepError>>;

    /// Whether the owner of `lease` still wants it. From memory only: called on the engine
    /// thread, with every allocation waiting.
    fn keeps(&self, lease: &Lease) -> bool;

    /// Records the addresses (`address/prefix`) a claim holds in its status. Failing is
    /// logged, never fatal: the addresses are the claim's in the store already.
    fn claim_allocated<'a>(
        &'a self,
        namespace: &'a str,
        claim: &'a str,
        ips: Vec<String>,
    ) -> BoxFuture<'a, ()>;
}

/// The `ipam-claim-reference` of the element of a networks annotation
/// (`k8s.v1.cni.cncf.io/networks`) that gives interface `ifname`: the element whose
/// `interface` it is, else the one Multus names so by position (`net1` for the first).
/// "" when no element gives it or the element names no claim, and for the
/// comma-separated form, which cannot name one. The error says what is wrong.
pub fn claim_in_networks(annotation: &str, ifname: &str) -> Result<String, String> {
    let text = annotation.trim();
    if !text.starts_with('[') {
        return Ok(String::new());
    }
    let elements: Vec<serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| format!("is not a JSON list of network selection elements: {e}"))?;
    for (i, e) in elements.iter().enumerate() {
        let given = e.get("interface").and_then(|v| v.as_str()).filter(|s| !s.is_empty());
        let name = given.map_or_else(|| format!("net{}", i + 1), str::to_string);
        if name != ifname {
            continue;
        }
        return match e.get(CLAIM_KEY) {
            None | Some(serde_json::Value::Null) => Ok(String::new()),
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(format!("element {i} has {CLAIM_KEY} {other}, not a string")),
        };
    }
    Ok(String::new())
}

/// The network selection element's key naming an IPAMClaim.
pub const CLAIM_KEY: &str = "ipam-claim-reference";

/// The keep rule for a lease with an owner: `keeper`'s, or never without one.
pub fn keeps(keeper: Option<&Arc<dyn Keeper>>, lease: &Lease) -> bool {
    lease.holder.owner.is_some() && keeper.is_some_and(|k| k.keeps(lease))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::Attachment;

    #[test]
    fn the_claim_of_an_interface_is_read_from_its_selection_element() {
        let a = r#"[{"name": "default/tenantblue", "ipam-claim-reference": "vm1.tenantblue"},
                    {"name": "storage", "interface": "stor0", "ipam-claim-reference": "vm1.storage"},
                    {"name": "plain"}]"#;
        assert_eq!(claim_in_networks(a, "net1"), Ok("vm1.tenantblue".into()));
        assert_eq!(claim_in_networks(a, "stor0"), Ok("vm1.storage".into()));
        // The second element has its own name, so net2 is nobody's; net3 names no claim.
        assert_eq!(claim_in_networks(a, "net2"), Ok(String::new()));
        assert_eq!(claim_in_networks(a, "net3"), Ok(String::new()));
        assert_eq!(claim_in_networks("tenantblue,storage@stor0", "net1"), Ok(String::new()));
        assert_eq!(
            claim_in_networks(r#"[{"name": "x", "ipam-claim-reference": 7}]"#, "net1"),
            Err("element 0 has ipam-claim-reference 7, not a string".into())
        );
        assert!(claim_in_networks("[{", "net1").expect_err("bad JSON").starts_with("is not a JSON list"));
    }

    #[test]
    fn ordinals_are_read_as_the_controller_writes_them() {
        assert_eq!(split_ordinal("web-3"), Some(("web", 3)));
        assert_eq!(split_ordinal("my-db-0"), Some(("my-db", 0)));
        assert_eq!(split_ordinal("web-12"), Some(("web", 12)));
        assert_eq!(split_ordinal("web-03"), None);
        assert_eq!(split_ordinal("web-"), None);
        assert_eq!(split_ordinal("-3"), None);
        assert_eq!(split_ordinal("web"), None);
        assert_eq!(split_ordinal("web-7d9f8-x2z4q"), None);
        assert_eq!(split_ordinal("web-99999999999"), None);
    }

    #[test]
    fn a_set_wants_its_ordinals_from_the_start() {
        let s = SetState { uid: "u".into(), replicas: 3, start: 0 };
        assert!(s.wants(0) && s.wants(2));
        assert!(!s.wants(3));
        let s = SetState { uid: "u".into(), replicas: 2, start: 5 };
        assert!(!s.wants(4));
        assert!(s.wants(5) && s.wants(6));
        assert!(!s.wants(7));
        assert!(!SetState { uid: "u".into(), replicas: 0, start: 0 }.wants(0));
    }

    fn lease(pod: &str) -> Lease {
        Lease {
            address: "198.18.0.5".parse().expect("ip"),
            network: "".into(),
            range: "".into(),
            prefix_len: 24,
            gateway: None,
            holder: Arc::new(Attachment {
                container_id: "c".into(),
                ifname: "net1".into(),
                pod: PodRef { namespace: "ns".into(), name: pod.into(), uid: "p".into() },
                owner: Some(Owner::StatefulSet { name: "web".into(), uid: "u1".into() }),
                ..Default::default()
            }),
            created_unix_ms: 0,
            note: String::new(),
        }
    }

    #[test]
    fn a_set_keeps_while_it_exists_with_the_uid_and_wants_the_ordinal() {
        let set = SetState { uid: "u1".into(), replicas: 3, start: 0 };
        assert!(set_keeps(&lease("web-2"), "u1", Some(&set)));
        assert!(!set_keeps(&lease("web-3"), "u1", Some(&set)), "scaled below the ordinal");
        assert!(!set_keeps(&lease("web-2"), "u0", Some(&set)), "another set of the same name");
        assert!(!set_keeps(&lease("web-2"), "u1", None), "the set is gone");
    }
}
