//! Running in a Kubernetes cluster: the custom resources, the store built on them, and
//! leader election among replicas.

pub mod crd;
pub mod leader;
pub mod lease_lock;
pub mod store;
pub mod whereabouts;
