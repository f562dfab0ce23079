//! PEM material from files or memory: certificates, private keys, CA
//! bundles. Errors name the source and its role ("client certificate
//! /etc/muster/client.pem: no CERTIFICATE block found").

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

/// Where PEM bytes come from.
#[derive(Clone, PartialEq, Eq)]
pub enum Pem {
    /// A file, read when a configuration is built (and re-read on reload).
    File(PathBuf),
    /// Bytes in memory; `name` stands for them in messages.
    Memory {
        /// What to call this material in messages.
        name: String,
        /// The PEM text.
        bytes: Arc<[u8]>,
    },
}

impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        match self {
            Pem::File(path) => f.debug_tuple("File").field(path).finish(),
            Pem::Memory { name, .. } => f.debug_struct("Memory").field("name", name).finish(),
        }
    }
}

impl fmt::Display for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pem::File(path) => write!(f, "{}", path.display()),
            Pem::Memory { name, .. } => write!(f, "{name} (in memory)"),
        }
    }
}

impl From<PathBuf> for Pem {
    fn from(path: PathBuf) -> Pem {
        Pem::File(path)
    }
}

impl From<&Path> for Pem {
    fn from(path: &Path) -> Pem {
        Pem::File(path.to_path_buf())
    }
}

/// A path (as etcdctl's flags take them).
impl From<&str> for Pem {
    fn from(path: &str) -> Pem {
        Pem::File(path.into())
    }
}

/// A path (as etcdctl's flags take them).
impl From<String> for Pem {
    fn from(path: String) -> Pem {
        Pem::File(path.into())
    }
}

impl Pem {
    /// PEM in a file.
    pub fn file(path: impl Into<PathBuf>) -> Pem {
        Pem::File(path.into())
    }

    /// PEM text in memory, called `name` in messages.
    pub fn memory(name: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Pem {
        Pem::Memory {
            name: name.into(),
            bytes: bytes.into().into(),
        }
    }

    /// Whether this comes from a file (and so can change on disk).
    pub fn is_file(&self) -> bool {
        matches!(self, Pem::File(_))
    }

    /// The bytes, read now.
    pub fn read(&self) -> Result<Vec<u8>, Error> {
        match self {
            Pem::File(path) => std::fs::read(path).map_err(|source| Error::Read {
                path: path.clone(),
                source,
            }),
            Pem::Memory { bytes, .. } => Ok(bytes.to_vec()),
        }
    }
}

fn pem_reason(e: &pem::Error, expected: &str) -> String {
    match e {
        pem::Error::NoItemsFound => format!("no {expected} block found"),
        other => format!("not valid PEM ({other:?})"),
    }
}

/// Every certificate in PEM text (a chain: leaf first). `role` names the
/// material in errors ("server certificate").
pub fn parse_certs(
    bytes: &[u8],
    role: &str,
    source: &Pem,
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let what = || format!("{role} {source}");
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::material(what(), pem_reason(&e, "CERTIFICATE")))?;
    if certs.is_empty() {
        let hint = if PrivateKeyDer::from_pem_slice(bytes).is_ok() {
            " (it holds a private key: were the certificate and key files swapped?)"
        } else {
            ""
        };
        return Err(Error::material(
            what(),
            format!("no CERTIFICATE block found{hint}"),
        ));
    }
    Ok(certs)
}

/// The private key in PEM text (PKCS#8, PKCS#1 RSA or SEC1 EC).
pub fn parse_key(bytes: &[u8], role: &str, source: &Pem) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| {
        let mut reason = pem_reason(&e, "PRIVATE KEY");
        if matches!(e, pem::Error::NoItemsFound)
            && CertificateDer::pem_slice_iter(bytes).next().is_some()
        {
            reason
                .push_str(" (it holds a certificate: were the certificate and key files swapped?)");
        }
        Error::material(format!("{role} {source}"), reason)
    })
}

/// Certificates read from `source`.
pub fn load_certs(source: &Pem, role: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    parse_certs(&source.read()?, role, source)
}

/// A trust store holding every certificate of a CA bundle.
pub fn load_roots(source: &Pem, role: &str) -> Result<RootCertStore, Error> {
    roots_from(&load_certs(source, role)?, role, source)
}

pub(crate) fn roots_from(
    certs: &[CertificateDer<'static>],
    role: &str,
    source: &Pem,
) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert.clone()).map_err(|e| {
            Error::material(
                format!("{role} {source}"),
                format!("not a usable CA certificate: {e}"),
            )
        })?;
    }
    Ok(roots)
}

/// A certificate chain and its key, checked to belong together.
pub fn certified_key(
    cert: &Pem,
    cert_bytes: &[u8],
    key: &Pem,
    key_bytes: &[u8],
    role: &str,
) -> Result<CertifiedKey, Error> {
    let chain = parse_certs(cert_bytes, &format!("{role} certificate"), cert)?;
    let der = parse_key(key_bytes, &format!("{role} key"), key)?;
    CertifiedKey::from_der(chain, der, &crate::provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => Error::material(
            format!("{role} key {key}"),
            format!("does not match the certificate {cert}"),
        ),
        other => Error::material(format!("{role} key {key}"), format!("unusable: {other}")),
    })
}
