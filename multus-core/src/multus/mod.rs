//! `rust-multus`, a Multus-compatible CNI meta-plugin (CNI 0.3.0 to 1.1.0: ADD, DEL,
//! CHECK, GC, STATUS, VERSION).
//!
//! On ADD it attaches the cluster network as the runtime's interface (`eth0`), then
//! `defaultNetworks`, then the NetworkAttachmentDefinitions of the pod's
//! `k8s.v1.cni.cncf.io/networks` annotation as `net1`, `net2`, ... (or the names asked
//! for), calling each delegate binary (from `binDir`, then `CNI_PATH`) as libcni would, with
//! Multus' `CNI_ARGS`. It returns the cluster network's result, writes the
//! `k8s.v1.cni.cncf.io/network-status` annotation to the pod and keeps the delegates in
//! `<cniDir>/<containerID>` (Multus' cache shape) so DEL needs no API server. A failing
//! delegate undoes the ones before it.
//!
//! Configuration: Multus' keys (`clusterNetwork`, `defaultNetworks`, `delegates`,
//! `kubeconfig`, `cniDir`, `binDir`, `confDir`, `multusNamespace`, `namespaceIsolation`,
//! `globalNamespaces`, `systemNamespaces`, `readinessindicatorfile`, `logFile`,
//! `runtimeConfig`), plus `"rustMultus": {"objectsDir": "/path"}`: read Pods and NADs from
//! the YAML files of that directory instead of the Kubernetes API (network-status is
//! written back into the pod's file). See [`config`], [`source`]; the pod annotations are
//! [`annotation`] (the request) and [`status`] (the answer).

pub mod annotation;
pub mod cache;
pub mod config;
pub mod daemon;
pub mod delegate;
pub mod devices;
pub mod plugin;
pub mod resolve;
pub mod route;
pub mod source;
pub mod status;
pub mod thick;
pub mod watch;

pub use plugin::MultusPlugin;
