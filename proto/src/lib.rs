//! Generated `rustipam.v1` messages, clients and servers; [`connect`] to reach a server and
//! [`Replicas`] to call whichever replica leads.

mod client;
mod replicas;
pub use client::{Bearer, ClientTls, connect, connect_with};
pub use replicas::{CallError, Replicas, check_endpoint};

/// Metadata key of an UNAVAILABLE status from a replica that does not allocate: the
/// endpoint (`http://host:port`, ...) of the replica that does, for the client to try next.
pub const LEADER_METADATA: &str = "x-rust-ipam-leader";

/// Package `rustipam.v1`.
#[allow(unreachable_pub, missing_debug_implementations, clippy::all)]
pub mod v1 {
    tonic::include_proto!("rustipam.v1");
}

/// Encoded `FileDescriptorSet` of every file in `proto/`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/rustipam_v1_descriptor.bin"));
