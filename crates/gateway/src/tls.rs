//! TLS on both sides of the gateway, on `muster-tls`.
//!
//! * The listener ([`listener`]): with a certificate and key configured,
//!   each client connection is handed to its serving thread, which shakes
//!   hands (ALPN `h2` and `http/1.1`) before serving it as usual. The
//!   files are re-read every `tls_reload_interval`; a plaintext request
//!   on the TLS port gets `400` (muster-tls answers it).
//! * Upstreams ([`TlsClients`]): an instance registered as
//!   `https://host:port` is dialled over TLS, offering only `http/1.1`
//!   (the upstream client speaks HTTP/1.1), and its certificate verified
//!   for `host` against the route's CA, the gateway's, or the system's
//!   roots. Connectors are built when the routes are (start and each
//!   reload of the routes file) and reused while their CA file's bytes do
//!   not change, so pooled connections survive an unrelated reload.
//!
//! [`Io`] is an upstream connection, plaintext or TLS.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};

use muster_tls::{ClientTls, ServerTls, TlsConnector, TlsServer, TlsStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::GatewayConfig;
use crate::error::GatewayError;

/// The listener's TLS, if the configuration asks for it.
pub(crate) fn listener(config: &GatewayConfig) -> Result<Option<TlsServer>, GatewayError> {
    let (cert, key) = match (&config.tls_cert, &config.tls_key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => {
            return Err(GatewayError::Config(
                "a TLS certificate needs its key (tls_key, --tls-key)".into(),
            ));
        }
        (None, Some(_)) => {
            return Err(GatewayError::Config(
                "a TLS key needs its certificate (tls_cert, --tls-cert)".into(),
            ));
        }
    };
    if config.tls_reload_interval.is_zero() {
        return Err(GatewayError::Config(
            "the TLS reload interval must be positive".into(),
        ));
    }
    let server = ServerTls::new(cert.as_path(), key.as_path())
        .with_alpn(&[muster_tls::ALPN_H2, muster_tls::ALPN_HTTP11])
        .with_reload_interval(config.tls_reload_interval)
        .build()?;
    Ok(Some(server))
}

/// A connector for `https://` instances, with an id that tells its pooled
/// connections apart from those of other connectors (another CA).
#[derive(Debug)]
pub(crate) struct UpstreamTls {
    /// Never 0 (plaintext connections' key).
    pub(crate) id: u64,
    pub(crate) connector: TlsConnector,
}

impl UpstreamTls {
    fn new(tls: &ClientTls) -> Result<Arc<UpstreamTls>, muster_tls::Error> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Ok(Arc::new(UpstreamTls {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            connector: tls
                .connector(&[muster_tls::ALPN_HTTP11])?
                .with_setting_names(
                    "upstream_ca / --upstream-cacert",
                    "a client certificate (not supported towards upstreams)",
                ),
        }))
    }
}

/// What a route's `https://` instances are verified against.
#[derive(Debug, Clone)]
pub(crate) enum Trust {
    /// A CA bundle (the route's or the gateway's), loaded.
    Ca(Arc<UpstreamTls>),
    /// The system's roots, loaded at the first `https://` instance.
    System,
}

/// A connector built from a CA file, and the file's bytes then.
#[derive(Debug)]
struct Loaded {
    bytes: Vec<u8>,
    tls: Arc<UpstreamTls>,
}

/// The upstream connectors of a gateway.
#[derive(Debug)]
pub(crate) struct TlsClients {
    /// The gateway's CA for routes that name none.
    default_ca: Option<PathBuf>,
    by_ca: Mutex<HashMap<PathBuf, Loaded>>,
    system: OnceLock<Result<Arc<UpstreamTls>, String>>,
}

impl TlsClients {
    pub(crate) fn new(default_ca: Option<PathBuf>) -> TlsClients {
        TlsClients {
            default_ca,
            by_ca: Mutex::default(),
            system: OnceLock::new(),
        }
    }

    /// Loads the gateway's own CA now, so that a bad file stops the start.
    pub(crate) fn check_default(&self) -> Result<(), GatewayError> {
        match &self.default_ca {
            Some(ca) => self
                .load(ca)
                .map(drop)
                .map_err(|e| GatewayError::Config(format!("upstream CA: {e}"))),
            None => Ok(()),
        }
    }

    /// The trust of a route whose own CA is `ca`: its CA file is read now
    /// (a missing or malformed one is the error).
    pub(crate) fn trust(&self, ca: Option<&Path>) -> Result<Trust, String> {
        match ca.or(self.default_ca.as_deref()) {
            Some(path) => self.load(path).map(Trust::Ca),
            None => Ok(Trust::System),
        }
    }

    /// The connector for `trust`; `Err` if the system's roots cannot be
    /// loaded.
    pub(crate) fn connector<'a>(
        &'a self,
        trust: &'a Trust,
    ) -> Result<&'a Arc<UpstreamTls>, &'a str> {
        match trust {
            Trust::Ca(tls) => Ok(tls),
            Trust::System => self
                .system
                .get_or_init(|| UpstreamTls::new(&ClientTls::new()).map_err(|e| e.to_string()))
                .as_ref()
                .map_err(String::as_str),
        }
    }

    fn load(&self, path: &Path) -> Result<Arc<UpstreamTls>, String> {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read the CA bundle {}: {e}", path.display()))?;
        let mut by_ca = self.by_ca.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(loaded) = by_ca.get(path)
            && loaded.bytes == bytes
        {
            return Ok(loaded.tls.clone());
        }
        let tls = UpstreamTls::new(&ClientTls::new().with_ca(path)).map_err(|e| e.to_string())?;
        by_ca.insert(
            path.to_path_buf(),
            Loaded {
                bytes,
                tls: tls.clone(),
            },
        );
        Ok(tls)
    }
}

/// An upstream connection: plaintext, or TLS.
#[derive(Debug)]
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl Io {
    /// Pushes out what TLS still holds (a TLS write may return before
    /// all of its records are on the socket). Nothing to do in plaintext.
    pub(crate) async fn flush_tls(&mut self) -> io::Result<()> {
        match self {
            Io::Plain(_) => Ok(()),
            Io::Tls(s) => tokio::io::AsyncWriteExt::flush(s).await,
        }
    }

    /// Whether an idle connection is still open: the upstream has sent
    /// nothing (no close, no stray bytes). Costs no system call unless the
    /// socket turned readable. Over TLS, records that carry no data (a
    /// session ticket) are taken in and do not count.
    pub(crate) fn is_idle_open(&mut self) -> bool {
        match self {
            Io::Plain(tcp) => {
                let mut probe = [0u8; 1];
                matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Io::Tls(stream) => {
                let mut probe = [0u8; 1];
                let mut buf = ReadBuf::new(&mut probe);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                matches!(
                    Pin::new(&mut **stream).poll_read(&mut cx, &mut buf),
                    Poll::Pending
                )
            }
        }
    }
}

impl AsyncRead for Io {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}
