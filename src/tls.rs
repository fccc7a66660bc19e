//! TLS on the gRPC port (`--tls-cert-file`, `--tls-key-file`, and
//! `--tls-client-ca-file` for client certificates), with rustls.
//!
//! - Everything on the gRPC port is behind it: `Meter`, `Admin`, Envoy's
//!   `RateLimitService`, health and reflection. The admin HTTP port
//!   (`/metrics`, `/livez`, `/readyz`, the pack page) stays plaintext: it is
//!   for probes and Prometheus on the pod network (README, "Security").
//! - The files are re-read when they change, so cert-manager (or anyone)
//!   can rotate them without a restart. Each new connection looks at the
//!   files' metadata (modification time, size, inode; at most once every
//!   [`RECHECK`]), and a change builds a new rustls configuration that the
//!   next handshakes use; connections already open keep theirs. A
//!   replacement that does not load (unreadable, not PEM, a key that does
//!   not match its certificate, a half-written rotation) keeps the
//!   configuration served before, with a warning and
//!   `packmeter_tls_reloads_total{result="error"}`; it is tried again when
//!   the files change again. The client CA is reloaded the same way.
//! - Handshakes run in their own tasks, each within [`HANDSHAKE_TIMEOUT`]:
//!   a slow or failing client delays nobody else, and a failure (a
//!   plaintext client, a client without a certificate when one is needed)
//!   closes that connection only; it is counted in
//!   `packmeter_tls_handshake_failures_total` and logged at debug.
//! - Connections are [`Lingering`] underneath, so the shutdown sequence
//!   (GOAWAY, last replies, lingering close) is the same with TLS.
//! - ALPN offers `h2` only: gRPC clients (grpc-go among them) insist on it.

use std::{
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use futures_util::{Stream, StreamExt};
use parking_lot::Mutex;
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    task::JoinSet,
};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tokio_util::task::TaskTracker;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

use crate::{
    file_stamp::{stamp, Stamp},
    linger::Lingering,
    metrics::Metrics,
};

/// How often the files' metadata is looked at, at most (on a new
/// connection).
pub const RECHECK: Duration = Duration::from_secs(1);

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The files of `--tls-cert-file`, `--tls-key-file` and
/// `--tls-client-ca-file`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the server's certificate, then any intermediates.
    pub cert: PathBuf,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM: the CAs a client certificate must chain to; with it, a client
    /// without a valid certificate is refused.
    pub client_ca: Option<PathBuf>,
}

/// A TLS file that does not load, with the setting it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct TlsError {
    /// `tls_cert_file`, `tls_key_file` or `tls_client_ca_file`.
    pub field: &'static str,
    pub message: String,
}

fn tls_err(field: &'static str, path: &Path, what: impl std::fmt::Display) -> TlsError {
    TlsError {
        field,
        message: format!("{}: {what}", path.display()),
    }
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| tls_err(field, path, format!("cannot read it: {e}")))
}

fn certificates(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(field, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(field, path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(tls_err(
            field,
            path,
            "holds no certificate; expected PEM blocks `-----BEGIN CERTIFICATE-----`",
        ));
    }
    Ok(certs)
}

/// The certificates in a PEM text (none if it holds none or is not PEM).
pub fn pem_certificates(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_default()
}

/// Checks a client's certificate and key (PEM): both parse, and the key is
/// the certificate's.
pub fn check_identity(cert: &[u8], key: &[u8]) -> Result<(), String> {
    let certs = pem_certificates(cert);
    if certs.is_empty() {
        return Err("the certificate file holds no PEM certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| format!("the key file holds no usable PEM private key ({e})"))?;
    rustls::sign::CertifiedKey::from_der(certs, key, &rustls::crypto::ring::default_provider())
        .map(|_| ())
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                "the key does not match the certificate".to_string()
            }
            e => e.to_string(),
        })
}

/// Builds the rustls configuration from the files, checking every one: the
/// certificates parse, the key parses and matches the certificate, and the
/// client CA (if any) holds usable CA certificates.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = certificates("tls_cert_file", &files.cert)?;
    let key_pem = read("tls_key_file", &files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        tls_err(
            "tls_key_file",
            &files.key,
            format!(
                "no usable private key ({e}); expected a PEM `PRIVATE KEY`, `RSA PRIVATE KEY` \
                 or `EC PRIVATE KEY` block"
            ),
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("tls_cert_file", &files.cert, e))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("tls_client_ca_file", path)? {
                roots.add(cert).map_err(|e| {
                    tls_err(
                        "tls_client_ca_file",
                        path,
                        format!("not a usable CA certificate: {e}"),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| tls_err("tls_client_ca_file", path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        let what = match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "does not match the certificate in {} (is it the key of another certificate, \
                 or a rotation half written?)",
                files.cert.display()
            ),
            e => format!(
                "not usable with the certificate in {}: {e}",
                files.cert.display()
            ),
        };
        tls_err("tls_key_file", &files.key, what)
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

struct Checked {
    stamps: Vec<Option<Stamp>>,
    at: Instant,
}

/// The configuration handshakes use, re-built when the files change.
pub struct TlsReloader {
    files: TlsFiles,
    current: ArcSwap<ServerConfig>,
    checked: Mutex<Checked>,
    metrics: Arc<Metrics>,
}

impl TlsReloader {
    /// Loads the files; an error names the setting and the file.
    pub fn new(files: TlsFiles, metrics: Arc<Metrics>) -> Result<TlsReloader, TlsError> {
        let stamps = Self::stamps(&files);
        let config = server_config(&files)?;
        Ok(TlsReloader {
            files,
            current: ArcSwap::from_pointee(config),
            checked: Mutex::new(Checked {
                stamps,
                at: Instant::now(),
            }),
            metrics,
        })
    }

    fn stamps(files: &TlsFiles) -> Vec<Option<Stamp>> {
        let mut s = vec![stamp(&files.cert), stamp(&files.key)];
        if let Some(ca) = &files.client_ca {
            s.push(stamp(ca));
        }
        s
    }

    /// Whether client certificates are required.
    pub fn client_auth(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The acceptor for one new connection, with the files re-read first
    /// if they changed.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.reload_if_changed();
        TlsAcceptor::from(self.current.load_full())
    }

    fn reload_if_changed(&self) {
        // One connection checks; the others meanwhile use what is loaded.
        let Some(mut checked) = self.checked.try_lock() else {
            return;
        };
        if checked.at.elapsed() < RECHECK {
            return;
        }
        checked.at = Instant::now();
        // Metadata before contents: a change after this point is seen at
        // the next check.
        let now = Self::stamps(&self.files);
        if now == checked.stamps {
            return;
        }
        checked.stamps = now;
        match server_config(&self.files) {
            Ok(config) => {
                self.current.store(Arc::new(config));
                self.metrics.tls_reloaded("ok");
                tracing::info!(cert = %self.files.cert.display(), "TLS files changed: new connections use the new certificate");
            }
            Err(e) => {
                self.metrics.tls_reloaded("error");
                tracing::warn!(error = %e, "TLS files changed but do not load; keeping the certificate served before");
            }
        }
    }
}

// === impl ServerIo ===

/// An accepted gRPC connection: plaintext, or TLS over the same lingering
/// socket.
pub enum ServerIo {
    Plain(Lingering),
    Tls(Box<TlsStream<Lingering>>),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            ServerIo::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            ServerIo::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerIo::Plain(s) => s.is_write_vectored(),
            ServerIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    /// With TLS, sends close_notify before the socket's write side closes.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

impl Connected for ServerIo {
    /// The TCP peer either way, so `Request::remote_addr` (the loopback
    /// check of [`crate::auth`]) works the same with TLS.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            ServerIo::Plain(s) => s.connect_info(),
            ServerIo::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

/// The gRPC port's connections: TCP_NODELAY on each, and, with `tls`, a
/// TLS handshake in its own task. Failed handshakes are left out (counted
/// and logged), so one bad client never stops the server.
pub fn incoming(
    listener: TcpListener,
    lingering: TaskTracker,
    tls: Option<Arc<TlsReloader>>,
    metrics: Arc<Metrics>,
) -> Pin<Box<dyn Stream<Item = io::Result<ServerIo>> + Send>> {
    // TCP_NODELAY on every accepted connection. tonic sets it only on the
    // listeners it binds itself; without it, Nagle holds a response's last
    // frame (the trailers) until the client's delayed ACK, up to 40 ms.
    let tcp = TcpIncoming::from(listener).with_nodelay(Some(true));
    let Some(tls) = tls else {
        return Box::pin(
            tcp.map(move |s| s.map(|s| ServerIo::Plain(Lingering::new(s, lingering.clone())))),
        );
    };
    type Handshake = Result<io::Result<TlsStream<Lingering>>, tokio::time::error::Elapsed>;
    struct State {
        tcp: TcpIncoming,
        handshakes: JoinSet<(Option<std::net::SocketAddr>, Handshake)>,
        tls: Arc<TlsReloader>,
        lingering: TaskTracker,
        metrics: Arc<Metrics>,
    }
    let state = State {
        tcp,
        handshakes: JoinSet::new(),
        tls,
        lingering,
        metrics,
    };
    Box::pin(futures_util::stream::unfold(state, |mut s| async move {
        loop {
            tokio::select! {
                accepted = s.tcp.next() => match accepted? {
                    // tonic logs it and keeps accepting.
                    Err(e) => return Some((Err(e), s)),
                    Ok(tcp) => {
                        let peer = tcp.peer_addr().ok();
                        let socket = Lingering::new(tcp, s.lingering.clone());
                        let tls = s.tls.clone();
                        s.handshakes.spawn(async move {
                            let acceptor = tls.acceptor();
                            (peer, tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await)
                        });
                    }
                },
                Some(done) = s.handshakes.join_next(), if !s.handshakes.is_empty() => match done {
                    Ok((_, Ok(Ok(stream)))) => return Some((Ok(ServerIo::Tls(Box::new(stream))), s)),
                    Ok((peer, Ok(Err(e)))) => {
                        s.metrics.tls_handshake_failed();
                        tracing::debug!(?peer, error = %e, "TLS handshake failed");
                    }
                    Ok((peer, Err(_))) => {
                        s.metrics.tls_handshake_failed();
                        tracing::debug!(?peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake did not finish in time");
                    }
                    // Only a panic in rustls would land here; the
                    // connection is gone, the server goes on.
                    Err(e) => tracing::warn!(error = %e, "TLS handshake task failed"),
                },
            }
        }
    }))
}
