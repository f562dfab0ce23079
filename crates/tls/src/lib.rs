//! Transport security for every part of muster: TLS on rustls with the
//! ring provider, and the login throttle of the servers that check
//! passwords.
//!
//! * [`pem`]: certificates, keys and CA bundles from PEM files or memory,
//!   with errors that name the file and say what is wrong with it.
//! * [`client`]: [`ClientTls`] (etcdctl's `--cacert`, `--cert`, `--key`,
//!   `--insecure-skip-tls-verify`) and [`TlsConnector`], the connector the
//!   library's gRPC channels and the gateway's upstream client dial through.
//!   Handshake failures come back as one sentence naming the peer and the
//!   reason (untrusted certificate, wrong name, our client certificate
//!   refused, plaintext on the other end).
//! * [`server`]: [`ServerTls`] (etcd's `--cert-file`, `--key-file`,
//!   `--trusted-ca-file`, `--client-cert-auth`) and [`TlsServer`], an
//!   acceptor whose certificate follows the files on disk: a rotated pair is
//!   used for new connections, open ones keep theirs, and a broken file is
//!   logged while the old pair stays in use.
//! * [`throttle`]: [`Throttle`], failed logins from one peer slowed down
//!   (the embedded registry's and the dashboard's).
//!
//! Every configuration is built with [`provider()`] explicitly, never from
//! rustls's process-wide default, so no combination of cargo features
//! (ring and aws-lc both enabled by some other crate) can make a builder
//! panic; [`install_default_provider`] additionally installs ring as the
//! process default, once, for third-party code that asks for it.
#![forbid(unsafe_code)]

pub mod client;
pub mod error;
#[cfg(feature = "generate")]
pub mod generate;
pub mod pem;
pub mod server;
pub mod throttle;

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

pub use client::{ClientTls, PlainConnector, ServerSpeaksTls, TlsConnector, TlsStream};
pub use error::Error;
pub use pem::Pem;
pub use throttle::Throttle;

/// The subject Common Name of a DER certificate (the user name etcd takes
/// from a client certificate under `--client-cert-auth`); `None` when the
/// certificate does not parse or has no CN.
pub fn common_name(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}
pub use server::{ServerTls, TlsServer};

/// The crypto provider every muster TLS configuration is built with:
/// rustls's ring provider.
///
/// rustls 0.23.48 deprecates ring's provider for lacking post-quantum key
/// exchange; the alternative, aws-lc-rs, needs cmake and a long C build on
/// every machine, and etcd 3.4 (Go 1.x crypto/tls of its time) offers no
/// post-quantum groups anyway.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            install_default_provider();
            #[allow(deprecated)]
            Arc::new(rustls::crypto::ring::default_provider())
        })
        .clone()
}

/// Installs ring as rustls's process-wide default provider, if no provider
/// is installed yet. Idempotent; muster's own configurations do not need
/// it (they name their provider), code that calls `ClientConfig::builder()`
/// does.
pub fn install_default_provider() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // Err means another provider was installed first: keep it.
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The ALPN protocol id of HTTP/2, which gRPC requires.
pub const ALPN_H2: &[u8] = b"h2";
/// The ALPN protocol id of HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
