//! The Multus-compatible meta-plugin: thin (`rust-multus`) and thick (`rust-multus-shim`
//! forwarding to `rust-multus-daemon`), with the pod annotations it reads and writes
//! ([`multus`]). The CNI protocol and calling plugins are the `cni` crate's; the macvlan and
//! ipvlan drivers, which the daemon can run in-process, are `cni-link`'s.

pub mod multus;
