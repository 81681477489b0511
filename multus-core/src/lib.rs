//! Multus-compatible meta-plugin and the macvlan/ipvlan delegates.
//!
//! So far the pod annotations: the `networks` request ([`annotation`]) and the
//! `network-status` answer ([`status`]), and calling CNI plugins ([`exec`]). The
//! meta-plugin and delegate binaries are not written yet.

pub mod annotation;
pub mod delegate;
pub mod exec;
pub mod status;
