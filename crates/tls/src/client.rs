//! The client side: [`ClientTls`] says what to trust and who we are,
//! [`TlsConnector`] dials `host:port`, shakes hands and turns every failure
//! into one sentence a person can act on.
//!
//! gRPC servers speak first (HTTP/2 SETTINGS right after the handshake).
//! In TLS 1.3 a server refuses a client certificate only *after* the
//! client considers the handshake done, so without a look at the server's
//! first bytes a refused certificate would surface later as a vague
//! connection error. [`TlsConnector::await_server_first`] waits for those
//! bytes (keeping them for the caller) and reports a refusal as such.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::pem::{self, Pem};
use crate::{Error, provider};

/// What a client trusts and presents: etcdctl's `--cacert`, `--cert`,
/// `--key`, `--insecure-skip-tls-verify`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// The CA bundle that signs the server's certificate; `None` trusts
    /// the system's roots (as etcdctl does).
    pub ca: Option<Pem>,
    /// Our certificate, for servers that require one (`--client-cert-auth`).
    pub cert: Option<Pem>,
    /// The key of [`ClientTls::cert`].
    pub key: Option<Pem>,
    /// The name to verify the server's certificate against instead of the
    /// endpoint's host (and to send as SNI).
    pub server_name: Option<String>,
    /// Accept any server certificate. Encrypts, but does not authenticate
    /// the server: for tests and first steps only.
    pub insecure_skip_verify: bool,
}

impl ClientTls {
    /// Trust the system's roots, present no certificate.
    pub fn new() -> ClientTls {
        ClientTls::default()
    }

    /// Trusts the CAs in `ca`.
    pub fn with_ca(mut self, ca: impl Into<Pem>) -> Self {
        self.ca = Some(ca.into());
        self
    }

    /// Presents this certificate and key.
    pub fn with_identity(mut self, cert: impl Into<Pem>, key: impl Into<Pem>) -> Self {
        self.cert = Some(cert.into());
        self.key = Some(key.into());
        self
    }

    /// Verifies the server against `name` instead of the endpoint's host.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Skips verifying the server's certificate (see
    /// [`ClientTls::insecure_skip_verify`]).
    pub fn with_insecure_skip_verify(mut self, skip: bool) -> Self {
        self.insecure_skip_verify = skip;
        self
    }

    /// The rustls configuration, offering these ALPN protocols. Reads
    /// every file now: a missing or malformed one is an error here, naming
    /// the file, not at the first connection.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Result<ClientConfig, Error> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .map_err(|e| Error::Config(e.to_string()))?;
        let builder = if self.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify))
        } else {
            let roots = match &self.ca {
                Some(ca) => pem::load_roots(ca, "CA bundle")?,
                None => system_roots()?,
            };
            builder.with_root_certificates(roots)
        };
        let mut config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let (cert_pem, key_pem) = (cert.read()?, key.read()?);
                // Checks that the key belongs to the certificate.
                let certified = pem::certified_key(cert, &cert_pem, key, &key_pem, "client")?;
                builder
                    .with_client_auth_cert(
                        certified.cert.clone(),
                        pem::parse_key(&key_pem, "client key", key)?,
                    )
                    .map_err(|e| Error::material(format!("client key {key}"), e.to_string()))?
            }
            (Some(cert), None) => {
                return Err(Error::material(
                    format!("client certificate {cert}"),
                    "given without its key (--key)",
                ));
            }
            (None, Some(key)) => {
                return Err(Error::material(
                    format!("client key {key}"),
                    "given without its certificate (--cert)",
                ));
            }
            (None, None) => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// The bytes of the files this configuration reads, to notice changes.
    fn files(&self) -> Result<Vec<Vec<u8>>, Error> {
        [&self.ca, &self.cert, &self.key]
            .into_iter()
            .flatten()
            .filter(|pem| pem.is_file())
            .map(Pem::read)
            .collect()
    }

    /// A connector with this configuration. Its files are read again
    /// before every new connection: a rotated client certificate (or CA
    /// bundle) is used from the next connection on; one that does not load
    /// is logged and the previous one stays in use.
    pub fn connector(&self, alpn: &[&[u8]]) -> Result<TlsConnector, Error> {
        let server_name = match &self.server_name {
            Some(name) => Some(ServerName::try_from(name.clone()).map_err(|_| {
                Error::material(
                    "server name",
                    format!("{name:?} is not a DNS name or IP address"),
                )
            })?),
            None => None,
        };
        let files = self.files()?;
        Ok(TlsConnector {
            inner: Arc::new(arc_swap::ArcSwap::from_pointee(
                tokio_rustls::TlsConnector::from(Arc::new(self.client_config(alpn)?)),
            )),
            reload: Arc::new(Reload {
                spec: self.clone(),
                alpn: alpn.iter().map(|p| p.to_vec()).collect(),
                files: std::sync::Mutex::new(files),
            }),
            server_name,
            await_server_first: None,
            nodelay: true,
            ca: self.ca.as_ref().map(ToString::to_string),
            cert: self.cert.as_ref().map(ToString::to_string),
            names: SettingNames::default(),
        })
    }
}

fn system_roots() -> Result<rustls::RootCertStore, Error> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return Err(Error::material(
            "system CA certificates",
            format!(
                "none could be loaded{why}; pass the CA bundle that signs the server's certificate (--cacert)"
            ),
        ));
    }
    Ok(roots)
}

/// Dials TLS connections. Cheap to clone.
#[derive(Clone)]
pub struct TlsConnector {
    inner: Arc<arc_swap::ArcSwap<tokio_rustls::TlsConnector>>,
    reload: Arc<Reload>,
    server_name: Option<ServerName<'static>>,
    await_server_first: Option<Duration>,
    nodelay: bool,
    ca: Option<String>,
    cert: Option<String>,
    names: SettingNames,
}

/// What the settings are called where the connector is configured, for
/// the "pass ..." part of messages: etcdctl's flags unless told otherwise.
#[derive(Clone, Copy, Debug)]
struct SettingNames {
    ca: &'static str,
    identity: &'static str,
}

impl Default for SettingNames {
    fn default() -> SettingNames {
        SettingNames {
            ca: "--cacert",
            identity: "--cert and --key",
        }
    }
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("server_name", &self.server_name)
            .field("await_server_first", &self.await_server_first)
            .finish_non_exhaustive()
    }
}

/// What a connector was built from, and the file contents it was built with.
struct Reload {
    spec: ClientTls,
    alpn: Vec<Vec<u8>>,
    files: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl TlsConnector {
    /// Names the settings that hold the CA bundle and the client identity
    /// where this connector is configured (e.g. a gateway's `upstream_ca`),
    /// for the "pass ..." part of handshake errors; etcdctl's `--cacert` and
    /// `--cert and --key` by default.
    pub fn with_setting_names(mut self, ca: &'static str, identity: &'static str) -> Self {
        self.names = SettingNames { ca, identity };
        self
    }

    /// Rebuilds the configuration when its files changed since the last
    /// connection (rotation of the client certificate or the CA bundle).
    fn refresh(&self) {
        let reload = &self.reload;
        let Ok(files) = reload.spec.files() else {
            // Unreadable mid-rotation: keep what works; the next
            // connection looks again.
            return;
        };
        let mut last = reload
            .files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *last == files {
            return;
        }
        let alpn: Vec<&[u8]> = reload.alpn.iter().map(Vec::as_slice).collect();
        match reload.spec.client_config(&alpn) {
            Ok(config) => {
                self.inner
                    .store(Arc::new(tokio_rustls::TlsConnector::from(Arc::new(config))));
                tracing::info!("client TLS files changed; new connections use them");
            }
            Err(e) => {
                tracing::warn!(error = %e, "client TLS files changed but cannot be used; keeping the previous ones")
            }
        }
        *last = files;
    }

    /// After the handshake, waits up to `timeout` for the server's first
    /// bytes, so that a server refusing our certificate (which TLS 1.3
    /// reports only after the handshake) is reported as such. For servers
    /// that speak first: gRPC (HTTP/2) does, HTTP/1.1 does not.
    pub fn await_server_first(mut self, timeout: Duration) -> Self {
        self.await_server_first = Some(timeout);
        self
    }

    /// Connects to `host:port` over TCP and shakes hands.
    pub async fn connect(&self, host: &str, port: u16) -> Result<TlsStream, Error> {
        let peer = format!("{host}:{port}");
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|source| Error::Connect {
                peer: peer.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(self.nodelay);
        self.handshake(tcp, host, &peer).await
    }

    /// Shakes hands over an established connection; `host` is verified
    /// against the certificate unless a server name was configured, `peer`
    /// names the other end in errors.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        host: &str,
        peer: &str,
    ) -> Result<TlsStream, Error> {
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => ServerName::try_from(host.to_string()).map_err(|_| Error::Handshake {
                peer: peer.to_string(),
                reason: format!(
                    "{host:?} is not a DNS name or IP address to verify the certificate against"
                ),
            })?,
        };
        self.refresh();
        let connector = self.inner.load_full();
        let mut stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| self.failure(peer, &e))?;
        let mut first = Vec::new();
        let tls13 = stream.get_ref().1.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
        if let (Some(timeout), true) = (self.await_server_first, tls13) {
            let mut buf = vec![0u8; 16 * 1024];
            match tokio::time::timeout(timeout, stream.read(&mut buf)).await {
                Ok(Ok(0)) => {
                    return Err(Error::Handshake {
                        peer: peer.to_string(),
                        reason: "the server closed the connection right after the handshake".into(),
                    });
                }
                Ok(Ok(n)) => {
                    buf.truncate(n);
                    first = buf;
                }
                Ok(Err(e)) => return Err(self.failure(peer, &e)),
                // Silent server: nothing to learn, go on.
                Err(_) => {}
            }
        }
        Ok(TlsStream {
            first,
            pos: 0,
            inner: stream,
        })
    }

    fn failure(&self, peer: &str, e: &io::Error) -> Error {
        Error::Handshake {
            peer: peer.to_string(),
            reason: explain(e, self.ca.as_deref(), self.cert.as_deref(), self.names),
        }
    }
}

/// A handshake failure in words.
fn explain(e: &io::Error, ca: Option<&str>, cert: Option<&str>, names: SettingNames) -> String {
    let trusted = match ca {
        Some(ca) => format!("the CA bundle {ca}"),
        None => "the system's CA certificates".to_string(),
    };
    let ours = match cert {
        Some(cert) => format!("our client certificate {cert}"),
        None => "our connection (we sent no client certificate)".to_string(),
    };
    let requires = format!(
        "the server requires a client certificate; pass {}",
        names.identity
    );
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => {
                format!(
                    "the server closed the connection during the handshake ({e}); is this a TLS port?"
                )
            }
            _ => e.to_string(),
        };
    };
    match tls {
        rustls::Error::InvalidCertificate(cert_error) => match cert_error {
            CertificateError::UnknownIssuer => format!(
                "the server's certificate is not signed by {trusted}; pass the CA that signed it ({})",
                names.ca
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("the server's certificate has expired ({tls})")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("the server's certificate is not valid yet ({tls}); check the clocks")
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "{tls}; connect by a name the certificate lists or set the server name to verify"
                )
            }
            _ => format!("the server's certificate was refused: {tls}"),
        },
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => requires,
            // Go's servers (etcd) answer a missing certificate with
            // bad_certificate.
            AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::HandshakeFailure
                if cert.is_none() =>
            {
                requires
            }
            AlertDescription::CertificateExpired => {
                format!("the server refused {ours}: it has expired")
            }
            AlertDescription::UnknownCA => {
                format!(
                    "the server refused {ours}: not signed by a CA it trusts (its --trusted-ca-file)"
                )
            }
            AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied
            | AlertDescription::DecryptError => format!(
                "the server refused {ours} ({alert:?}): not signed by a CA it trusts, expired, or not for client authentication"
            ),
            AlertDescription::NoApplicationProtocol => {
                "the server does not speak HTTP/2 (gRPC) over TLS on this port".to_string()
            }
            AlertDescription::ProtocolVersion | AlertDescription::HandshakeFailure => {
                format!("the server and we share no TLS version or cipher suite ({alert:?})")
            }
            other => format!("the server sent the alert {other:?}"),
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "the server does not speak TLS on this port (use an http:// endpoint)".to_string()
        }
        other => other.to_string(),
    }
}

/// `AsyncWrite` for a wrapper, forwarding every call to its `inner`
/// stream; with a second argument, errors pass through that method of the
/// wrapper (`fn(&Self, io::Error) -> io::Error`) on their way out.
macro_rules! forward_write {
    ($ty:ty) => {
        forward_write!($ty, |_: &$ty, e: io::Error| e);
    };
    ($ty:ty, $map:expr) => {
        impl AsyncWrite for $ty {
            fn poll_write(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
                polled.map_err(|e| $map(&*self, e))
            }
            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                let polled = Pin::new(&mut self.inner).poll_flush(cx);
                polled.map_err(|e| $map(&*self, e))
            }
            fn poll_shutdown(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut self.inner).poll_shutdown(cx)
            }
            fn poll_write_vectored(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
                polled.map_err(|e| $map(&*self, e))
            }
            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }
        }
    };
}

/// A client TLS stream; the bytes read while waiting for the server's
/// first message are replayed before the rest.
#[derive(Debug)]
pub struct TlsStream {
    first: Vec<u8>,
    pos: usize,
    inner: tokio_rustls::client::TlsStream<TcpStream>,
}

impl TlsStream {
    /// The negotiated ALPN protocol.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.inner.get_ref().1.alpn_protocol()
    }

    /// The server's certificate chain, leaf first.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.inner.get_ref().1.peer_certificates()
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.first.len() {
            let n = (this.first.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.first[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.first.len() {
                this.first = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

forward_write!(TlsStream);

/// Dials the URI's host and port (its scheme is not looked at: tonic is
/// given `http://` URIs so that it leaves TLS to us). For tonic's
/// `Endpoint::connect_with_connector`.
impl tower::Service<http::Uri> for TlsConnector {
    type Response = TokioIo<TlsStream>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| Error::Endpoint(uri.to_string()))?;
            let port = uri.port_u16().unwrap_or(443);
            Ok(TokioIo::new(this.connect(host, port).await?))
        })
    }
}

/// Dials plaintext connections and recognises a TLS server on the other
/// end: its first bytes are a TLS record or Go's "HTTP/1.0 400 Client sent
/// an HTTP request to an HTTPS server", which would otherwise reach the
/// HTTP/2 client as a vague protocol error. For tonic's
/// `Endpoint::connect_with_connector` on `http://` endpoints.
///
/// HTTP/2 keeps only the kind of an I/O error, not our words, so the
/// connector also keeps its last finding for the caller to ask
/// ([`PlainConnector::finding`]).
#[derive(Clone, Debug, Default)]
pub struct PlainConnector {
    finding: Arc<arc_swap::ArcSwapOption<ServerSpeaksTls>>,
}

impl PlainConnector {
    /// A connector with no finding yet.
    pub fn new() -> PlainConnector {
        PlainConnector::default()
    }

    /// What the last connection found: `Some` when its server spoke TLS
    /// (or hung up without a word), `None` once a server answered in
    /// plaintext.
    pub fn finding(&self) -> Option<Arc<ServerSpeaksTls>> {
        self.finding.load_full()
    }
}

impl tower::Service<http::Uri> for PlainConnector {
    type Response = TokioIo<Sniffed>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let finding = self.finding.clone();
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| Error::Endpoint(uri.to_string()))?;
            let port = uri.port_u16().unwrap_or(80);
            let peer = format!("{host}:{port}");
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let tcp = TcpStream::connect((host, port))
                .await
                .map_err(|source| Error::Connect {
                    peer: peer.clone(),
                    source,
                })?;
            let _ = tcp.set_nodelay(true);
            Ok(TokioIo::new(Sniffed {
                inner: tcp,
                peer,
                checked: false,
                finding,
            }))
        })
    }
}

/// A plaintext connection whose first bytes from the server are checked
/// for TLS (see [`PlainConnector`]).
#[derive(Debug)]
pub struct Sniffed {
    inner: TcpStream,
    peer: String,
    checked: bool,
    finding: Arc<arc_swap::ArcSwapOption<ServerSpeaksTls>>,
}

/// The error a [`Sniffed`] connection returns when the server speaks TLS,
/// or (`certain: false`) closed the connection before sending a byte, as
/// Go's TLS servers (etcd) do when a plaintext HTTP/2 client connects.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{peer} {}: use an https:// endpoint (with --cacert, and --cert/--key if it asks for a client certificate)", if *certain { "speaks TLS" } else { "closed the connection without answering, as TLS ports do to plaintext clients" })]
pub struct ServerSpeaksTls {
    /// `host:port`.
    pub peer: String,
    /// Whether the server's bytes were TLS (or an HTTPS server's 400), not
    /// just a connection closed before any answer.
    pub certain: bool,
}

impl Sniffed {
    /// A failure before the server sent anything: most likely a TLS port.
    fn unanswered(&self, e: io::Error) -> io::Error {
        let closed = matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::UnexpectedEof
        );
        if self.checked || !closed {
            return e;
        }
        self.found(e.kind(), false)
    }

    fn found(&self, kind: io::ErrorKind, certain: bool) -> io::Error {
        let found = ServerSpeaksTls {
            peer: self.peer.clone(),
            certain,
        };
        self.finding.store(Some(Arc::new(found.clone())));
        io::Error::new(kind, found)
    }
}

impl AsyncRead for Sniffed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Err(e)) = result {
            return Poll::Ready(Err(this.unanswered(e)));
        }
        if !this.checked && matches!(result, Poll::Ready(Ok(()))) {
            let new = &buf.filled()[before..];
            if new.is_empty() {
                return Poll::Ready(Err(this.unanswered(io::ErrorKind::UnexpectedEof.into())));
            }
            {
                this.checked = true;
                let tls_record = new.len() >= 2 && matches!(new[0], 0x15 | 0x16) && new[1] == 0x03;
                if tls_record || new.starts_with(b"HTTP/1.0 400") {
                    return Poll::Ready(Err(this.found(io::ErrorKind::InvalidData, true)));
                }
                this.finding.store(None);
            }
        }
        result
    }
}

forward_write!(Sniffed, Sniffed::unanswered);

/// `--insecure-skip-tls-verify`: any certificate passes, signatures are
/// still checked (the handshake must be with the key of the certificate
/// shown).
#[derive(Debug)]
struct NoVerify;

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
