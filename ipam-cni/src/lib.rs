//! The `rust-ipam` CNI IPAM plugin: thin by design. It parses the CNI invocation and the
//! NAD's `ipam` keys (Whereabouts' keys work as they are), asks the rust-ipam server over
//! gRPC, and prints the result or a CNI error; the server owns the semantics.

pub mod config;
pub mod plugin;
