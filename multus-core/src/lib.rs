//! Multus-compatible meta-plugin and the macvlan/ipvlan delegates.
//!
//! The pod annotations: the `networks` request ([`annotation`]) and the `network-status`
//! answer ([`status`]); calling CNI plugins ([`exec`]); the meta-plugin `rust-multus`
//! ([`multus`]); the macvlan and ipvlan delegates ([`delegate`], binaries `rust-macvlan`
//! and `rust-ipvlan`).

pub mod annotation;
pub mod delegate;
pub mod exec;
pub mod multus;
pub mod status;
