//! Connecting to a server by the endpoint forms the project uses everywhere:
//! `http://host:port`, `https://host:port` or `unix:///path`.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Adds `authorization: Bearer <token>` to every request of a client it intercepts (the
/// server's `--authorize` takes a ServiceAccount token that way); nothing without a token.
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl Bearer {
    /// A bearer of `token`; refused when it cannot be sent as a header value.
    pub fn new(token: Option<&str>) -> Result<Bearer, String> {
        match token {
            None => Ok(Bearer(None)),
            Some(t) => format!("Bearer {t}")
                .parse()
                .map(|v| Bearer(Some(v)))
                .map_err(|_| "the token holds characters a header cannot carry".to_string()),
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// What a client needs for `https://` endpoints, as PEM: the CA that signed the server's
/// certificate and, for mutual TLS, this client's certificate chain and key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    pub ca: Vec<u8>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Opens a channel to `endpoint`, failing after `timeout` if the server does not answer.
pub async fn connect(endpoint: &str, timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    connect_with(endpoint, timeout, None).await
}

/// As [`connect`], with `tls` used for an `https://` endpoint (the server's name or IP
/// address in the endpoint must be in its certificate).
pub async fn connect_with(
    endpoint: &str,
    timeout: Duration,
    tls: Option<&ClientTls>,
) -> Result<Channel, tonic::transport::Error> {
    open(endpoint, timeout, timeout, tls).await
}

/// Opens a channel whose connection may take `connect` and each of whose calls `call`.
pub(crate) async fn open(
    endpoint: &str,
    connect: Duration,
    call: Duration,
    tls: Option<&ClientTls>,
) -> Result<Channel, tonic::transport::Error> {
    if let Some(path) = endpoint.strip_prefix("unix://") {
        let path = path.to_string();
        // The URI is required by the builder but unused: the connector dials the socket.
        return Endpoint::from_static("http://unix.socket")
            .connect_timeout(connect)
            .timeout(call)
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
            }))
            .await;
    }
    let mut ep = Endpoint::from_shared(endpoint.to_string())?;
    if let (Some(tls), true) = (tls, endpoint.starts_with("https://")) {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca));
        if let Some((cert, key)) = &tls.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        ep = ep.tls_config(config)?;
    }
    ep.connect_timeout(connect).timeout(call).tcp_nodelay(true).connect().await
}
