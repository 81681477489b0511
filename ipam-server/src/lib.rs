//! rust-ipam server: a pure allocator core, a durable store, and the gRPC services around
//! them.

pub mod allocator;
pub mod authz;
pub mod cli;
pub mod engine;
pub mod grpc;
pub mod import;
pub mod k8s;
pub mod keep;
pub mod metrics;
pub mod pools;
pub mod reconcile;
pub mod role;
pub mod server;
pub mod store;
pub mod tls;
