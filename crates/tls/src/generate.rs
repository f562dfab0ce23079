//! Certificates for first steps and tests (feature `generate`): a CA and
//! server and client certificates it signs, as PEM, with rcgen. What
//! `muster certs` writes and what the test harness uses; production
//! certificates come from the operator's own PKI.
//!
//! Keys are ECDSA P-256 in PKCS#8; every certificate has a random 128-bit
//! serial; server certificates carry serverAuth and clientAuth (etcd uses
//! one certificate both ways), client certificates clientAuth.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};

use crate::Error;

/// One day.
pub const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// A certificate and its key, as PEM text.
#[derive(Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy)]
pub enum Leaf<'a> {
    /// A server: these subject alternative names (IP addresses or DNS
    /// names); the common name is the first DNS name.
    Server {
        /// IP addresses or DNS names.
        sans: &'a [&'a str],
    },
    /// A client with this common name (etcd's user name under
    /// `--client-cert-auth` with auth on).
    Client {
        /// The common name.
        cn: &'a str,
    },
}

/// A certificate authority: its certificate and, in memory, its key.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

fn failed(e: rcgen::Error) -> Error {
    Error::Config(format!("cannot generate a certificate: {e}"))
}

impl Authority {
    /// A new self-signed CA named `cn`, valid from a day ago for
    /// `valid_for`.
    pub fn new(cn: &str, organization: &str, valid_for: Duration) -> Result<Authority, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(cn, organization);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        validity(&mut params, now - DAY, now + valid_for);
        params.serial_number = Some(serial()?);
        let key = KeyPair::generate().map_err(failed)?;
        let pem = params.self_signed(&key).map_err(failed)?.pem();
        Ok(Authority {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// The CA certificate (what clients and servers trust).
    pub fn cert_pem(&self) -> &str {
        &self.pem
    }

    /// A new key and a certificate for it, valid from `not_before` to
    /// `not_after` (either may be in the past: expired certificates for
    /// tests).
    pub fn issue(
        &self,
        leaf: Leaf<'_>,
        organization: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued, Error> {
        let mut params = CertificateParams::default();
        validity(&mut params, not_before, not_after);
        params.serial_number = Some(serial()?);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        match leaf {
            Leaf::Server { sans } => {
                let cn = sans
                    .iter()
                    .find(|s| s.parse::<std::net::IpAddr>().is_err())
                    .unwrap_or(&"server");
                params.distinguished_name = name(cn, organization);
                params.subject_alt_names = CertificateParams::new(
                    sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
                )
                .map_err(failed)?
                .subject_alt_names;
                params.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
            }
            Leaf::Client { cn } => {
                params.distinguished_name = name(cn, organization);
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
        }
        let key = KeyPair::generate().map_err(failed)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(failed)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes `contents` to `path` through a temporary file and a rename, so
/// that a reader (a server reloading its certificate) never sees half a
/// file. Key files are created readable by their owner only.
pub fn write_atomically(path: &Path, contents: &str, private: bool) -> Result<(), Error> {
    use std::io::Write;
    let io = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)
}

/// Whole seconds since the epoch, from rcgen's epoch date (`time`'s
/// `From<SystemTime>` needs a feature rcgen does not enable).
fn validity(params: &mut CertificateParams, not_before: SystemTime, not_after: SystemTime) {
    let secs = |t: SystemTime| {
        Duration::from_secs(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs())
    };
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + secs(not_before);
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + secs(not_after);
}

fn name(cn: &str, organization: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, organization);
    dn
}

/// A random positive 128-bit serial, from the crypto provider's generator.
fn serial() -> Result<SerialNumber, Error> {
    let mut bytes = [0u8; 16];
    crate::provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| Error::Config("no secure random numbers for a certificate serial".into()))?;
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and never zero
    Ok(SerialNumber::from_slice(&bytes))
}
