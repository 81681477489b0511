//! rust-ipam server: a pure allocator core, a durable store, and the gRPC services around
//! them.

pub mod allocator;
