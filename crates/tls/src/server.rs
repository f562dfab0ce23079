//! The server side: [`ServerTls`] names the files (etcd's `--cert-file`,
//! `--key-file`, `--trusted-ca-file`, `--client-cert-auth`), [`TlsServer`]
//! accepts connections with whatever those files hold *now*.
//!
//! Reload: [`TlsServer::spawn_reloader`] re-reads the files every
//! [`ServerTls::reload_interval`]. A changed certificate and key go into a
//! [`ResolvesServerCert`] that every new handshake asks, so new
//! connections get the new pair while open ones keep theirs (and session
//! resumption keeps working); a changed CA bundle rebuilds the
//! configuration around the same resolver. Material that does not load (a
//! half-written file, a key of another certificate: rotation tools write
//! the two files one after the other) is logged once and the old pair
//! stays in use until the files agree again.
//!
//! [`TlsServer::incoming`] turns a listener into a stream of established
//! TLS connections for tonic's `serve_with_incoming` (tonic still sees the
//! peer certificates) or any hyper server; handshakes run concurrently
//! with a deadline, so a slow or silent client holds up nobody. A
//! plaintext HTTP request on the TLS port is answered, as Go's servers do,
//! with `400 Client sent an HTTP request to an HTTPS server`.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::pem::{self, Pem};
use crate::{Error, provider};

/// A server TLS stream over TCP (tonic's server implements `Connected`
/// for it, so services see the client's certificates).
pub type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;

/// What a server presents and whom it lets in.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The certificate chain (`--cert-file`).
    pub cert: Pem,
    /// Its key (`--key-file`).
    pub key: Pem,
    /// CAs whose client certificates are accepted (`--trusted-ca-file`).
    pub client_ca: Option<Pem>,
    /// Require a client certificate signed by [`ServerTls::client_ca`]
    /// (`--client-cert-auth`). Without it, a certificate a client offers
    /// is still verified against the CA when one is given.
    pub client_cert_auth: bool,
    /// ALPN protocols offered, most preferred first.
    pub alpn: Vec<Vec<u8>>,
    /// How often the files are checked for a new pair.
    pub reload_interval: Duration,
    /// How long a client may take to finish its handshake.
    pub handshake_timeout: Duration,
}

impl ServerTls {
    /// Presents `cert` with `key`, asks no client certificate, offers
    /// HTTP/2 and HTTP/1.1, re-reads the files every 5 s.
    pub fn new(cert: impl Into<Pem>, key: impl Into<Pem>) -> ServerTls {
        ServerTls {
            cert: cert.into(),
            key: key.into(),
            client_ca: None,
            client_cert_auth: false,
            alpn: vec![crate::ALPN_H2.to_vec(), crate::ALPN_HTTP11.to_vec()],
            reload_interval: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
        }
    }

    /// Verifies client certificates against `ca`, and with `require` lets
    /// in only clients that present one.
    pub fn with_client_ca(mut self, ca: impl Into<Pem>, require: bool) -> Self {
        self.client_ca = Some(ca.into());
        self.client_cert_auth = require;
        self
    }

    /// Offers these ALPN protocols.
    pub fn with_alpn(mut self, alpn: &[&[u8]]) -> Self {
        self.alpn = alpn.iter().map(|p| p.to_vec()).collect();
        self
    }

    /// Checks the files this often.
    pub fn with_reload_interval(mut self, interval: Duration) -> Self {
        self.reload_interval = interval;
        self
    }

    /// Loads everything now: an error names the file at fault.
    pub fn build(&self) -> Result<TlsServer, Error> {
        if self.client_cert_auth && self.client_ca.is_none() {
            return Err(Error::Config(
                "client certificate authentication needs the CA that signs client certificates (--trusted-ca-file)".into(),
            ));
        }
        let files = self.read()?;
        let key = files.certified_key(self)?;
        let resolver = Arc::new(Resolver {
            key: ArcSwap::from_pointee(key),
        });
        let config = self.config(&files, resolver.clone())?;
        Ok(TlsServer {
            shared: Arc::new(Shared {
                spec: self.clone(),
                config: ArcSwap::from_pointee(config),
                resolver,
                state: Mutex::new(ReloadState {
                    loaded: files,
                    rejected: None,
                }),
                reloads: AtomicU64::new(0),
                reload_failures: AtomicU64::new(0),
            }),
        })
    }

    fn read(&self) -> Result<Files, Error> {
        Ok(Files {
            cert: self.cert.read()?,
            key: self.key.read()?,
            ca: self.client_ca.as_ref().map(Pem::read).transpose()?,
        })
    }

    fn config(&self, files: &Files, resolver: Arc<Resolver>) -> Result<ServerConfig, Error> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .map_err(|e| Error::Config(e.to_string()))?;
        let builder = match (&self.client_ca, &files.ca) {
            (Some(source), Some(bytes)) => {
                let certs = pem::parse_certs(bytes, "trusted CA bundle", source)?;
                let roots = pem::roots_from(&certs, "trusted CA bundle", source)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
                let verifier = if self.client_cert_auth {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                let verifier = verifier.build().map_err(|e| {
                    Error::material(format!("trusted CA bundle {source}"), e.to_string())
                })?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(resolver);
        config.alpn_protocols = self.alpn.clone();
        Ok(config)
    }
}

/// The bytes of the files as last read.
#[derive(Clone, PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Option<Vec<u8>>,
}

impl Files {
    fn certified_key(&self, spec: &ServerTls) -> Result<CertifiedKey, Error> {
        pem::certified_key(&spec.cert, &self.cert, &spec.key, &self.key, "server")
    }
}

#[derive(Debug)]
struct Resolver {
    key: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key.load_full())
    }
}

struct ReloadState {
    loaded: Files,
    /// The last material that failed to load, so a broken file is logged
    /// once, not at every check.
    rejected: Option<Files>,
}

struct Shared {
    spec: ServerTls,
    config: ArcSwap<ServerConfig>,
    resolver: Arc<Resolver>,
    state: Mutex<ReloadState>,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
}

/// A server's TLS, following its files. Cheap to clone.
#[derive(Clone)]
pub struct TlsServer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("cert", &self.shared.spec.cert)
            .field("client_cert_auth", &self.shared.spec.client_cert_auth)
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// The certificate chain new connections get.
    pub fn certificate(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        self.shared.resolver.key.load().cert.clone()
    }

    /// How many times new material was taken into use.
    pub fn reloads(&self) -> u64 {
        self.shared.reloads.load(Ordering::Relaxed)
    }

    /// How many times changed files could not be used.
    pub fn reload_failures(&self) -> u64 {
        self.shared.reload_failures.load(Ordering::Relaxed)
    }

    /// Re-reads the files now. `Ok(true)`: new material is in use;
    /// `Ok(false)`: nothing changed; `Err`: the files changed but do not
    /// load, and the old material stays in use.
    pub fn reload(&self) -> Result<bool, Error> {
        let spec = &self.shared.spec;
        let files = spec.read()?;
        let mut state = self
            .shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if files == state.loaded {
            state.rejected = None;
            return Ok(false);
        }
        let attempt = (|| {
            let key = files.certified_key(spec)?;
            let config = if files.ca != state.loaded.ca {
                Some(spec.config(&files, self.shared.resolver.clone())?)
            } else {
                None
            };
            Ok::<_, Error>((key, config))
        })();
        match attempt {
            Ok((key, config)) => {
                self.shared.resolver.key.store(Arc::new(key));
                if let Some(config) = config {
                    self.shared.config.store(Arc::new(config));
                }
                state.loaded = files;
                state.rejected = None;
                self.shared.reloads.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) => {
                if state.rejected.as_ref() != Some(&files) {
                    self.shared.reload_failures.fetch_add(1, Ordering::Relaxed);
                }
                state.rejected = Some(files);
                Err(e)
            }
        }
    }

    /// Checks the files every [`ServerTls::reload_interval`] until the
    /// handle is aborted (or dropped with the runtime). Logs each new pair
    /// and each broken one (once per distinct content).
    pub fn spawn_reloader(&self) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.shared.spec.reload_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let failures = this.reload_failures();
                match this.reload() {
                    Ok(true) => {
                        tracing::info!(cert = %this.shared.spec.cert, "TLS certificate reloaded; new connections use it")
                    }
                    Ok(false) => {}
                    Err(e) if this.reload_failures() != failures => tracing::warn!(
                        error = %e,
                        "TLS files changed but cannot be used; still serving the previous certificate"
                    ),
                    Err(e) => tracing::debug!(error = %e, "TLS files still unusable"),
                }
            }
        })
    }

    /// Shakes hands with a client that just connected. A plaintext HTTP
    /// request is answered with a 400 that says to use https.
    pub async fn accept(&self, tcp: TcpStream, peer: SocketAddr) -> Result<ServerStream, Error> {
        let timeout = self.shared.spec.handshake_timeout;
        let failed = |reason: String| Error::Handshake {
            peer: peer.to_string(),
            reason,
        };
        let run = async {
            let mut first = [0u8; 1];
            // 0x16: a TLS handshake record.
            match tcp.peek(&mut first).await {
                Ok(0) => {
                    return Err(failed(
                        "the client closed the connection before a handshake".into(),
                    ));
                }
                Ok(_) if first[0] != 0x16 => {
                    let mut tcp = tcp;
                    let _ = tcp
                        .write_all(b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
                        .await;
                    let _ = tcp.shutdown().await;
                    return Err(failed("the client sent plaintext to the TLS port".into()));
                }
                Ok(_) => {}
                Err(e) => return Err(failed(e.to_string())),
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(self.shared.config.load_full());
            acceptor
                .accept(tcp)
                .await
                .map_err(|e| failed(explain_server(&e)))
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(result) => result,
            Err(_) => Err(failed(format!(
                "the client did not finish its handshake within {timeout:?}"
            ))),
        }
    }

    /// Established TLS connections from `listener`, for tonic's
    /// `serve_with_incoming` or a hyper accept loop. Handshakes run
    /// concurrently; failed ones are logged (with the client's address and
    /// the reason) and left out. The accept loop ends when the stream is
    /// dropped.
    pub fn incoming(&self, listener: TcpListener) -> ReceiverStream<io::Result<ServerStream>> {
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = tx.closed() => return,
                };
                let (tcp, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let this = this.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match this.accept(tcp, peer).await {
                        Ok(stream) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Err(e) => tracing::warn!(error = %e, "rejected TLS connection"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

fn explain_server(e: &io::Error) -> String {
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return e.to_string();
    };
    match tls {
        rustls::Error::NoCertificatesPresented => {
            "the client sent no certificate and --client-cert-auth requires one".into()
        }
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
            "the client's certificate is not signed by the trusted CA (--trusted-ca-file)".into()
        }
        rustls::Error::InvalidCertificate(_) => {
            format!("the client's certificate was refused: {tls}")
        }
        rustls::Error::AlertReceived(alert) => {
            format!("the client refused our certificate ({alert:?})")
        }
        rustls::Error::NoApplicationProtocol => {
            "the client offered no protocol we serve (ALPN)".into()
        }
        other => other.to_string(),
    }
}
