//! The `rust-ipam` CNI IPAM plugin.
//!
//! Empty on purpose: the plugin is the subject of its own issue and ships no binary until it
//! works. Until then a NAD cannot use `"type": "rust-ipam"`.
