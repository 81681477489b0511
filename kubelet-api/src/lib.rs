//! The kubelet's gRPC APIs as far as this project speaks them (`proto/`, written here from
//! the kubelet's published field names and numbers): PodResources, which rust-multus
//! reads for the device IDs of SR-IOV networks, and the device plugin API, through which the
//! tests register fake devices. Both are served on unix sockets, which [`connect`] dials.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// PodResources API, package `v1`.
#[allow(unreachable_pub, missing_debug_implementations, clippy::all)]
pub mod podresources {
    tonic::include_proto!("v1");
}

/// Device plugin API, package `v1beta1`.
#[allow(unreachable_pub, missing_debug_implementations, clippy::all)]
pub mod deviceplugin {
    tonic::include_proto!("v1beta1");
}

/// Opens a channel to the gRPC server on the unix socket `socket`; connecting and each call
/// may take `timeout`.
pub async fn connect(socket: &Path, timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    let socket: PathBuf = socket.into();
    // The URI is required by the builder but unused: the connector dials the socket.
    Endpoint::from_static("http://unix.socket")
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { tokio::net::UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
}
