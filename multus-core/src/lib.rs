//! Multus-compatible meta-plugin and the macvlan/ipvlan delegates.
//!
//! So far the pod annotations: the `networks` request ([`annotation`]) and the
//! `network-status` answer ([`status`]). The meta-plugin and delegate binaries are not
//! written yet and nothing here is installed.

pub mod annotation;
pub mod status;
