//! Who may do what (`--authorize`).
//!
//! Off by default: every caller the listener admits may do everything, as before. On, each
//! call is made by an identity:
//! - a ServiceAccount token in `authorization: Bearer`, checked with a TokenReview for the
//!   audience `--token-audience`. A token of a node account (`--node-service-account`) is
//!   bound to the pod it was issued for; that pod's `spec.nodeName` is the caller's node.
//! - else a client certificate: its subject CN and DNS names (`system:node:NAME` or `NAME`)
//!   are the nodes it speaks for;
//! - else, on a unix socket, a process of root or of the server's own user is an admin: it
//!   could read the server's files anyway (`kubectl exec ... rust-ipam-ctl --server
//!   unix:///run/rust-ipam/admin.sock`).
//!
//! A node may allocate, check and release only attachments on its own node (the request's
//! node and the node recorded on the lease) and GC only its own node. Where the pod's
//! namespace decides what it gets (an IPPool with a namespaceSelector), the pod must be
//! on the caller's node too: the API server is asked ([`Authz::pod_on_callers_node`]). Admin RPCs need an
//! identity on `--admin` (a ServiceAccount user name, or a certificate's CN or DNS name);
//! admins may do everything. Refusals are PERMISSION_DENIED naming the identity and the
//! node, logged and counted; a call without a valid identity is UNAUTHENTICATED.
//!
//! A token's review is kept for `--token-cache` and reused after that, until the token
//! itself expires, while the API server cannot be reached: verified nodes keep allocating
//! through an API server outage.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tonic::{Request, Status};
use tracing::{debug, warn};

/// The pod a bound ServiceAccount token was issued for (TokenReview `status.user.extra`).
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// Tokens kept at most; expired ones go first.
const CACHE_MAX: usize = 10_000;
/// How long a TokenReview may take before a token reviewed earlier is taken on that
/// review: a plugin's attempt gets 2 s in all.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(1);

/// What `--authorize` and its companions say.
#[derive(Debug, Clone, Default)]
pub struct AuthzConfig {
    /// Enforce; when false everything below is unused.
    pub enabled: bool,
    /// ServiceAccounts (`namespace/name`) whose tokens speak for the node of their pod.
    pub node_accounts: Vec<String>,
    /// Identities allowed the Admin service: `system:serviceaccount:NS:NAME`, or a client
    /// certificate's CN or DNS name.
    pub admins: Vec<String>,
    /// The audience node tokens are issued for.
    pub audience: String,
    /// How long a TokenReview's answer is used before asking again.
    pub cache_for: Duration,
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// User name or certificate name, for messages and logs.
    pub identity: String,
    /// The nodes it speaks for (empty: none).
    pub nodes: Vec<String>,
    pub admin: bool,
}

impl Caller {
    fn anyone() -> Caller {
        Caller { identity: "anyone (authorization off)".into(), nodes: Vec::new(), admin: true }
    }

    fn nodes_text(&self) -> String {
        if self.nodes.is_empty() { "no node".into() } else { format!("node {}", self.nodes.join(",")) }
    }

    /// Ok if the caller may act on `node`'s attachments.
    pub fn may_act_for(&self, rpc: &'static str, node: &str, authz: &Authz) -> Result<(), Status> {
        if self.admin || self.nodes.iter().any(|n| n == node) {
            return Ok(());
        }
        let target =
            if node.is_empty() { "an attachment with no node".to_string() } else { format!("node {node}") };
        Err(authz.deny(rpc, self, &format!("may not act for {target}")))
    }

    /// The node to record on a new lease: the request's, else the caller's own (when it
    /// speaks for exactly one).
    pub fn node_for(&self, requested: &str) -> String {
        match (requested.is_empty(), self.nodes.as_slice()) {
            (true, [only]) => only.clone(),
            _ => requested.to_string(),
        }
    }
}

/// Label of the refusal counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Denied {
    rpc: &'static str,
}

/// A review kept for reuse.
#[derive(Debug, Clone)]
struct Reviewed {
    caller: Caller,
    at: Instant,
    /// The token's own expiry (`exp`), if it has one.
    expires: Option<SystemTime>,
}

/// Decides, per call, who the caller is and what it may do.
pub struct Authz {
    config: AuthzConfig,
    client: Option<kube::Client>,
    cache: Mutex<HashMap<String, Reviewed>>,
    denied: Family<Denied, Counter>,
    unauthenticated: Counter,
}

impl std::fmt::Debug for Authz {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authz").field("config", &self.config).field("tokens", &self.client.is_some()).finish()
    }
}

impl Authz {
    /// Everything allowed (`--authorize` not given).
    pub fn off() -> Arc<Authz> {
        Arc::new(Authz::new(AuthzConfig::default(), None, &mut Registry::default()))
    }

    /// Enforces `config`; tokens are reviewed through `client` (without one, only client
    /// certificates identify callers). Registers its counters in `registry`.
    pub fn new(config: AuthzConfig, client: Option<kube::Client>, registry: &mut Registry) -> Authz {
        let a = Authz {
            config,
            client,
            cache: Mutex::default(),
            denied: Family::default(),
            unauthenticated: Counter::default(),
        };
        registry.register("denied", "Calls refused PERMISSION_DENIED, by method", a.denied.clone());
        registry.register(
            "unauthenticated",
            "Calls refused for want of a valid identity",
            a.unauthenticated.clone(),
        );
        a
    }

    /// PERMISSION_DENIED for `caller`, logged and counted.
    pub fn deny(&self, rpc: &'static str, caller: &Caller, what: &str) -> Status {
        self.denied.get_or_create(&Denied { rpc }).inc();
        let msg = format!("{rpc}: {} ({}) {what}", caller.identity, caller.nodes_text());
        warn!(%msg, "permission denied");
        Status::permission_denied(msg)
    }

    fn unauthenticated(&self, rpc: &'static str, why: String) -> Status {
        self.unauthenticated.inc();
        let msg = format!("{rpc}: {why}");
        warn!(%msg, "unauthenticated");
        Status::unauthenticated(msg)
    }

    /// The caller of `request`.
    pub async fn caller<T>(&self, rpc: &'static str, request: &Request<T>) -> Result<Caller, Status> {
        if !self.config.enabled {
            return Ok(Caller::anyone());
        }
        if let Some(v) = request.metadata().get("authorization") {
            let token = v
                .to_str()
                .ok()
                .and_then(|s| s.strip_prefix("Bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    self.unauthenticated(rpc, "the authorization header is not \"Bearer <token>\"".into())
                })?;
            return self.token_caller(rpc, token).await;
        }
        if let Some(certs) = request.peer_certs()
            && let Some(leaf) = certs.first()
        {
            return certificate_caller(leaf.as_ref(), &self.config.admins)
                .map_err(|why| self.unauthenticated(rpc, format!("client certificate: {why}")));
        }
        if let Some(uid) = local_user(request) {
            return Ok(Caller {
                identity: format!("uid {uid} on a unix socket"),
                nodes: Vec::new(),
                admin: true,
            });
        }
        Err(self.unauthenticated(rpc, "no ServiceAccount token and no client certificate".into()))
    }

    /// The caller of an Admin RPC, refused unless it is an admin.
    pub async fn admin<T>(&self, rpc: &'static str, request: &Request<T>) -> Result<Caller, Status> {
        let caller = self.caller(rpc, request).await?;
        if caller.admin { Ok(caller) } else { Err(self.deny(rpc, &caller, "is not an admin (--admin)")) }
    }

    /// Ok if the pod `namespace`/`name` (of `uid`, when given) is on the node the caller
    /// acts for, as the API server says; always for an admin or with authorization off.
    /// For a request whose pod decides what it gets: a node could otherwise name a pod of
    /// another namespace, on another node, that a pool admits. Refused PERMISSION_DENIED
    /// naming the pod and both nodes; UNAVAILABLE when the API server cannot be asked.
    pub async fn pod_on_callers_node(
        &self,
        rpc: &'static str,
        caller: &Caller,
        node: &str,
        pod: &crate::allocator::PodRef,
    ) -> Result<(), Status> {
        if !self.config.enabled || caller.admin {
            return Ok(());
        }
        let who = format!("pod {}/{}", pod.namespace, pod.name);
        if pod.namespace.is_empty() || pod.name.is_empty() {
            return Err(self.deny(
                rpc,
                caller,
                &format!("names no pod ({who}), so its namespace is unproven"),
            ));
        }
        let Some(client) = &self.client else {
            return Err(Status::failed_precondition(format!(
                "{rpc}: checking that {who} is on node {node} needs the Kubernetes API (kube store or --kubeconfig)"
            )));
        };
        let api = Api::<Pod>::namespaced(client.clone(), &pod.namespace);
        let found = tokio::time::timeout(REVIEW_TIMEOUT, api.get_opt(&pod.name))
            .await
            .map_err(|_| ReviewError::TimedOut)
            .and_then(|r| r.map_err(ReviewError::Api))
            .map_err(|e| Status::unavailable(format!("{rpc}: cannot read {who}: {e}")))?;
        let Some(found) = found else {
            return Err(self.deny(rpc, caller, &format!("may not allocate for {who}: there is no such pod")));
        };
        if !pod.uid.is_empty() && found.metadata.uid.as_deref() != Some(pod.uid.as_str()) {
            return Err(self.deny(
                rpc,
                caller,
                &format!("may not allocate for {who}: its UID is not {:?}", pod.uid),
            ));
        }
        match found.spec.and_then(|s| s.node_name).filter(|n| !n.is_empty()) {
            Some(on) if on == node => Ok(()),
            Some(on) => Err(self.deny(
                rpc,
                caller,
                &format!("may not allocate for {who}: it is on node {on}, not {node}"),
            )),
            None => Err(self.deny(rpc, caller, &format!("may not allocate for {who}: it is on no node yet"))),
        }
    }

    async fn token_caller(&self, rpc: &'static str, token: &str) -> Result<Caller, Status> {
        let cached = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(token).cloned();
        let usable = |r: &Reviewed| r.expires.is_none_or(|e| SystemTime::now() < e);
        if let Some(r) = &cached
            && r.at.elapsed() < self.config.cache_for
            && usable(r)
        {
            return Ok(r.caller.clone());
        }
        let Some(client) = &self.client else {
            return Err(self
                .unauthenticated(rpc, "tokens need the Kubernetes API (kube store or --kubeconfig)".into()));
        };
        let review = tokio::time::timeout(REVIEW_TIMEOUT, self.review(client, token)).await;
        let review = review.unwrap_or_else(|_| Err(ReviewError::TimedOut));
        match review {
            Ok(Ok(caller)) => {
                let reviewed =
                    Reviewed { caller: caller.clone(), at: Instant::now(), expires: token_expiry(token) };
                let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                if cache.len() >= CACHE_MAX {
                    cache.retain(|_, r| usable(r));
                    if cache.len() >= CACHE_MAX {
                        cache.clear();
                    }
                }
                cache.insert(token.to_string(), reviewed);
                Ok(caller)
            }
            Ok(Err(why)) => {
                self.cache.lock().unwrap_or_else(|e| e.into_inner()).remove(token);
                Err(self.unauthenticated(rpc, why))
            }
            // The API server cannot answer: a token verified before stays good until it expires.
            Err(e) => match cached.filter(usable) {
                Some(r) => {
                    debug!(error = %e, identity = %r.caller.identity, "token review failed; using the earlier review");
                    Ok(r.caller)
                }
                None => Err(Status::unavailable(format!("{rpc}: cannot verify the token: {e}"))),
            },
        }
    }

    /// Asks the API server who `token` is. `Ok(Err)`: it is not valid (the reason);
    /// `Err`: the API server could not be asked.
    async fn review(
        &self,
        client: &kube::Client,
        token: &str,
    ) -> Result<Result<Caller, String>, ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![self.config.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let answer = Api::<TokenReview>::all(client.clone()).create(&PostParams::default(), &review).await?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.filter(|e| !e.is_empty()).unwrap_or_else(|| "not authenticated".into());
            return Ok(Err(format!("the token was refused by the API server: {why}")));
        }
        if !status.audiences.unwrap_or_default().contains(&self.config.audience) {
            return Ok(Err(format!("the token is not for the audience {:?}", self.config.audience)));
        }
        let user = status.user.unwrap_or_default();
        let identity = user.username.unwrap_or_default();
        let admin = self.config.admins.contains(&identity);
        let account = identity.strip_prefix("system:serviceaccount:").and_then(|r| r.split_once(':'));
        let node_account = account.is_some_and(|(ns, name)| {
            self.config.node_accounts.iter().any(|a| a.split_once('/') == Some((ns, name)))
        });
        let mut nodes = Vec::new();
        if node_account && let Some((ns, _)) = account {
            let extra = user.extra.unwrap_or_default();
            let one = |k: &str| extra.get(k).and_then(|v| v.first()).cloned().unwrap_or_default();
            let (pod, uid) = (one(POD_NAME), one(POD_UID));
            if pod.is_empty() {
                return Ok(Err(format!("{identity}: the token is not bound to a pod, so it names no node")));
            }
            let found = Api::<Pod>::namespaced(client.clone(), ns).get_opt(&pod).await?;
            let Some(found) = found.filter(|p| p.metadata.uid.as_deref() == Some(uid.as_str())) else {
                return Ok(Err(format!("{identity}: the pod {ns}/{pod} the token was issued for is gone")));
            };
            match found.spec.and_then(|s| s.node_name).filter(|n| !n.is_empty()) {
                Some(node) => nodes.push(node),
                None => return Ok(Err(format!("{identity}: the pod {ns}/{pod} is not on a node yet"))),
            }
        }
        Ok(Ok(Caller { identity, nodes, admin }))
    }
}

/// Why a token could not be reviewed.
#[derive(Debug, thiserror::Error)]
enum ReviewError {
    #[error("the API server: {0}")]
    Api(#[from] kube::Error),
    #[error("the API server did not answer within {REVIEW_TIMEOUT:?}")]
    TimedOut,
}

/// The caller's uid when it came over a unix socket as root or as the server's own user.
fn local_user<T>(request: &Request<T>) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let info = request.extensions().get::<tonic::transport::server::UdsConnectInfo>()?;
    let uid = info.peer_cred.as_ref()?.uid();
    // /proc/self belongs to this process's effective user.
    let own = std::fs::metadata("/proc/self").ok()?.uid();
    (uid == 0 || uid == own).then_some(uid)
}

/// The `exp` claim of a JWT, read without checking the signature (the TokenReview did).
fn token_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    Some(UNIX_EPOCH + Duration::from_secs(exp))
}

/// The caller a client certificate makes: its CN and DNS names, `system:node:` removed,
/// are its nodes; it is an admin when one of them (or the CN as written) is on `admins`.
fn certificate_caller(der: &[u8], admins: &[String]) -> Result<Caller, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("cannot be read: {e}"))?;
    let mut names: Vec<String> = Vec::new();
    for cn in cert.subject().iter_common_name() {
        if let Ok(s) = cn.as_str() {
            names.push(s.to_string());
        }
    }
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push((*d).to_string());
            }
        }
    }
    let Some(identity) = names.first().cloned() else {
        return Err("has neither a CN nor a DNS name".into());
    };
    let admin = names.iter().any(|n| admins.contains(n));
    let mut nodes: Vec<String> = Vec::new();
    for n in &names {
        let node = n.strip_prefix("system:node:").unwrap_or(n).to_string();
        if !nodes.contains(&node) {
            nodes.push(node);
        }
    }
    Ok(Caller { identity: format!("certificate {identity}"), nodes, admin })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str, dns: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn a_certificate_speaks_for_the_nodes_it_names() {
        let c = certificate_caller(&cert("system:node:gpu-7", &["gpu-7.example"]), &[]).expect("caller");
        assert_eq!(c.identity, "certificate system:node:gpu-7");
        assert_eq!(c.nodes, vec!["gpu-7", "gpu-7.example"]);
        assert!(!c.admin);
        let a =
            certificate_caller(&cert("rust-ipam-admin", &[]), &["rust-ipam-admin".into()]).expect("caller");
        assert!(a.admin);
        assert!(certificate_caller(b"not a certificate", &[]).unwrap_err().starts_with("cannot be read"));
    }

    #[test]
    fn a_nodes_new_lease_records_its_node() {
        let c = Caller { identity: "x".into(), nodes: vec!["n1".into()], admin: false };
        assert_eq!(c.node_for(""), "n1");
        assert_eq!(c.node_for("n2"), "n2");
        let authz =
            Authz::new(AuthzConfig { enabled: true, ..Default::default() }, None, &mut Registry::default());
        assert!(c.may_act_for("Allocate", "n1", &authz).is_ok());
        let e = c.may_act_for("Release", "n2", &authz).expect_err("other node");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert_eq!(e.message(), "Release: x (node n1) may not act for node n2");
    }

    #[test]
    fn token_expiry_is_read_from_the_claims() {
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"exp":2000000000}"#);
        let t = format!("h.{claims}.s");
        assert_eq!(token_expiry(&t), Some(UNIX_EPOCH + Duration::from_secs(2_000_000_000)));
        assert_eq!(token_expiry("garbage"), None);
    }
}
