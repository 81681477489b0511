//! Multus-compatible meta-plugin and the macvlan/ipvlan delegates.
//!
//! Empty on purpose: this crate is filled by its own issue and ships no binary until it works.
