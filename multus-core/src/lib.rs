//! Multus-compatible meta-plugin and the macvlan/ipvlan link drivers.
//!
//! The meta-plugin `rust-multus` with the pod annotations it reads and writes ([`multus`]);
//! calling CNI plugins ([`exec`]); the macvlan and ipvlan link drivers ([`link`], binaries
//! `rust-macvlan` and `rust-ipvlan`). The CNI protocol itself is the `cni` crate's.

pub mod exec;
pub mod link;
pub mod multus;
