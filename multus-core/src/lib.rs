//! Multus-compatible meta-plugin and the macvlan/ipvlan delegates.
//!
//! So far only the `k8s.v1.cni.cncf.io/networks` annotation grammar ([`annotation`]); the
//! meta-plugin and delegate binaries are not written yet and nothing here is installed.

pub mod annotation;
