//! Errors of loading TLS material and of handshakes.

use std::path::PathBuf;

/// What can go wrong with TLS. Every message is one sentence naming the
/// file or the peer and the reason.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A PEM file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// PEM material was read but is not what it should be (no certificate,
    /// no key, garbage, a key that does not match its certificate).
    #[error("{what}: {reason}")]
    Material {
        /// The file (or the name of the in-memory source) and its role,
        /// e.g. `client certificate /etc/muster/client.pem`.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// A TCP connection to the peer could not be made.
    #[error("cannot connect to {peer}: {source}")]
    Connect {
        /// `host:port`.
        peer: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TLS handshake with the peer failed.
    #[error("TLS handshake with {peer} failed: {reason}")]
    Handshake {
        /// `host:port`.
        peer: String,
        /// What went wrong, in words a person can act on.
        reason: String,
    },
    /// The endpoint could not be turned into a host and port.
    #[error("invalid TLS endpoint {0:?}: expected https://host:port")]
    Endpoint(String),
}

impl Error {
    pub(crate) fn material(what: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Material {
            what: what.into(),
            reason: reason.into(),
        }
    }
}
