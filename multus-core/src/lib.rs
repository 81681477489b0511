//! Multus-compatible meta-plugin and the macvlan/ipvlan delegates.
//!
//! So far the pod annotations: the `networks` request ([`annotation`]) and the
//! `network-status` answer ([`status`]), calling CNI plugins ([`exec`]), and the macvlan and
//! ipvlan delegates ([`delegate`], binaries `rust-macvlan` and `rust-ipvlan`).

pub mod annotation;
pub mod delegate;
pub mod exec;
pub mod status;
