//! Connecting to a server by the endpoint forms the project uses everywhere:
//! `http://host:port`, `https://host:port` or `unix:///path`.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// Opens a channel to `endpoint`, failing after `timeout` if the server does not answer.
pub async fn connect(endpoint: &str, timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    if let Some(path) = endpoint.strip_prefix("unix://") {
        let path = path.to_string();
        // The URI is required by the builder but unused: the connector dials the socket.
        return Endpoint::from_static("http://unix.socket")
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
            }))
            .await;
    }
    Endpoint::from_shared(endpoint.to_string())?
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect()
        .await
}
