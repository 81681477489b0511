//! TLS on the gRPC TCP listeners (and on the metrics listener, `--metrics-tls-cert`): the
//! server's certificate and, for mutual TLS, the CA that client certificates must chain to. All of it comes from PEM files that are read again
//! when they change (a renewed certificate, a rotated Kubernetes Secret), so new
//! connections use the new files and established ones keep going.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{Instrument as _, debug, info, info_span, warn};

/// How long a client may take to finish its TLS handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes completed but not yet taken by the gRPC server, per listener.
const ACCEPT_BACKLOG: usize = 128;

/// The PEM files of the server's TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle client certificates must chain to; `None` accepts clients without one.
    pub client_ca: Option<PathBuf>,
}

/// Why the TLS files cannot be used. The messages carry the cause too: a reload failure is
/// logged with the message alone.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read, or what it holds is refused (PEM, certificate, key, CA).
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{}: holds no PEM CERTIFICATE block", path.display())]
    NoCertificate { path: PathBuf },
    /// rustls offers no protocol version with the crypto provider.
    #[error("TLS configuration: {0}")]
    Protocols(#[source] rustls::Error),
    /// The certificate chain and the key do not go together.
    #[error("TLS configuration: {} and {}: {source}", cert.display(), key.display())]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

fn file_error(path: &Path, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> TlsError {
    TlsError::File { path: path.to_path_buf(), source: source.into() }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_path_buf() });
    }
    Ok(certs)
}

/// The protocols a listener speaks, offered in the TLS handshake (ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// gRPC: HTTP/2 only.
    H2,
    /// `/metrics` and the probes: HTTP/1.1 only (Prometheus scrapes with HTTP/1.1 unless
    /// told otherwise, and the kubelet's probes speak it).
    Http1,
}

impl Alpn {
    fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::H2 => vec![b"h2".to_vec()],
            Alpn::Http1 => vec![b"http/1.1".to_vec()],
        }
    }
}

/// Builds the gRPC listeners' rustls configuration from the files as they are now.
pub fn load(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    load_for(files, Alpn::H2)
}

/// Builds the rustls configuration of a listener speaking `alpn` from the files as they
/// are now.
pub fn load_for(files: &TlsFiles, alpn: Alpn) -> Result<ServerConfig, TlsError> {
    let certs = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_error(&files.key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocols)?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certificates(ca)? {
                roots.add(c).map_err(|e| file_error(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| file_error(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|source| TlsError::Identity {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    })?;
    config.alpn_protocols = alpn.protocols();
    Ok(config)
}

/// What the files looked like when last read: modification time and length of each.
type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(files: &TlsFiles) -> Stamp {
    // metadata() follows symlinks: a Secret volume swaps a symlink, the target changes.
    [Some(&files.cert), Some(&files.key), files.client_ca.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

/// The current TLS configuration, replaced when the files change and still load.
#[derive(Debug)]
pub struct ServerTls {
    files: TlsFiles,
    alpn: Alpn,
    current: RwLock<Arc<ServerConfig>>,
    seen: Mutex<Stamp>,
}

impl ServerTls {
    /// Loads the files for a gRPC listener; the server does not start with files it cannot
    /// use.
    pub fn new(files: TlsFiles) -> Result<Arc<ServerTls>, TlsError> {
        ServerTls::for_protocol(files, Alpn::H2)
    }

    /// Loads the files for a listener speaking `alpn`.
    pub fn for_protocol(files: TlsFiles, alpn: Alpn) -> Result<Arc<ServerTls>, TlsError> {
        let seen = stamp(&files);
        let config = load_for(&files, alpn)?;
        Ok(Arc::new(ServerTls {
            files,
            alpn,
            current: RwLock::new(Arc::new(config)),
            seen: Mutex::new(seen),
        }))
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The acceptor for a new connection, with the configuration in use now.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Reads the files again if they changed since the last look. A change that does not
    /// load is reported and the configuration in use stays; it is not retried until the
    /// files change again. Returns whether a new configuration is in use.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamp(&self.files);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == now {
                return false;
            }
            *seen = now;
        }
        match load_for(&self.files, self.alpn) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
                info!(cert = %self.files.cert.display(), "TLS files changed: new connections use them");
                true
            }
            Err(e) => {
                warn!(error = %e, "TLS files changed but cannot be used; keeping the previous ones");
                false
            }
        }
    }

    /// Looks at the files every `every` until the process ends.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let this = self.clone();
            // Reading files is blocking I/O.
            let _ = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
        }
    }

    /// Accepts connections on `listener` and yields those whose TLS handshake succeeded.
    /// Handshakes run beside the accept loop, so a slow or hostile client delays no one;
    /// failed ones are logged with the peer and the reason. Accepting stops when the
    /// stream is dropped.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
    ) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
        let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
        let tls = self.clone();
        tokio::spawn(
            async move {
                loop {
                    let (tcp, peer) = tokio::select! {
                        () = tx.closed() => return,
                        r = listener.accept() => match r {
                            Ok(c) => c,
                            Err(e) => {
                                // Out of file descriptors and the like: pause, do not spin.
                                warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        },
                    };
                    let _ = tcp.set_nodelay(true);
                    let (acceptor, tx) = (tls.acceptor(), tx.clone());
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => {
                                debug!(%peer, "TLS connection");
                                let _ = tx.send(Ok(stream)).await;
                            }
                            Ok(Err(e)) => warn!(%peer, error = %e, "TLS handshake failed"),
                            Err(_) => {
                                warn!(%peer, "TLS handshake did not finish within {HANDSHAKE_TIMEOUT:?}")
                            }
                        }
                    });
                }
            }
            .instrument(info_span!("tls-accept")),
        );
        ReceiverStream::new(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("tls.crt");
        std::fs::write(&cert, "not a certificate\n").expect("write");
        let files = TlsFiles { cert: cert.clone(), key: dir.path().join("absent.key"), client_ca: None };
        let err = load(&files).expect_err("no certificate");
        assert!(matches!(&err, TlsError::NoCertificate { path } if *path == cert), "{err:?}");
        assert_eq!(err.to_string(), format!("{}: holds no PEM CERTIFICATE block", cert.display()));
        let missing = TlsFiles { cert: dir.path().join("absent.crt"), ..files };
        let err = load(&missing).expect_err("missing file");
        let cause = std::error::Error::source(&err).expect("the PEM reader's error").to_string();
        assert_eq!(err.to_string(), format!("{}: {cause}", dir.path().join("absent.crt").display()));
    }
}
