//! Multus-compatible meta-plugin and the macvlan/ipvlan delegates.
//!
//! The pod annotations: the `networks` request ([`annotation`]) and the `network-status`
//! answer ([`status`]); calling CNI plugins ([`exec`]); the meta-plugin `rust-multus`
//! ([`multus`]).

pub mod annotation;
pub mod exec;
pub mod multus;
pub mod status;
