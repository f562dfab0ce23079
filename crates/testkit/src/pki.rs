//! Test certificates, generated at test time with rcgen (no private keys in
//! the repository).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use std::{fmt, process};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use tempfile::TempDir;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Common name of the main test CA.
pub const TEST_CA_NAME: &str = "muster test CA";
/// Common name of the second, unrelated CA.
pub const OTHER_CA_NAME: &str = "muster other test CA";
/// Subject alternative names of every server certificate [`TestPki`] issues
/// (unless asked otherwise with [`TestPki::issue_server_with_sans`]).
pub const SERVER_SANS: [&str; 2] = ["127.0.0.1", "localhost"];

/// A throw-away public key infrastructure for TLS tests: two unrelated CAs
/// and certificates signed by them, written as PEM files into a fresh
/// temporary directory (deleted when the `TestPki` is dropped, so keep it
/// alive as long as anything reads the files, e.g. an etcd started with
/// [`EtcdTls::from_pki`](crate::EtcdTls::from_pki)).
///
/// Files created by [`generate`](Self::generate), all in [`dir`](Self::dir):
///
/// | file | what |
/// |------|------|
/// | `ca.pem` | CA "muster test CA" (its key stays in memory, to sign more certificates) |
/// | `server.pem`, `server-key.pem` | server certificate signed by the CA: SANs IP `127.0.0.1` and DNS `localhost`, EKU serverAuth + clientAuth (etcd may use it as a client too), valid from 1 day ago to 30 days from now |
/// | `client.pem`, `client-key.pem` | client certificate CN `root`, EKU clientAuth, signed by the CA |
/// | `expired.pem`, `expired-key.pem` | client certificate CN `root` signed by the CA, valid from 10 days ago until 1 day ago |
/// | `other-ca.pem` | a second, unrelated CA "muster other test CA" |
/// | `other-client.pem`, `other-client-key.pem` | client certificate CN `root` signed by the other CA |
///
/// Every certificate has a distinct random 128-bit serial number. Keys are
/// ECDSA P-256, in PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
///
/// More certificates signed by the CA: [`issue_server`](Self::issue_server)
/// (e.g. for certificate rotation tests), [`issue_client`](Self::issue_client).
pub struct TestPki {
    ca: Issuer<'static, KeyPair>,
    other_ca: Issuer<'static, KeyPair>,
    // Declared last: removed after everything else is dropped.
    dir: TempDir,
}

impl fmt::Debug for TestPki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The CA keys are deliberately not printed.
        f.debug_struct("TestPki")
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl TestPki {
    /// Generates both CAs and all certificates listed in the
    /// [type documentation](Self) into a new temporary directory.
    pub fn generate() -> io::Result<TestPki> {
        let dir = tempfile::Builder::new().prefix("muster-pki-").tempdir()?;
        let (ca_params, ca_key) = new_ca(TEST_CA_NAME)?;
        write_file(
            &dir.path().join("ca.pem"),
            ca_params.self_signed(&ca_key).map_err(rc)?.pem(),
        )?;
        let (other_params, other_key) = new_ca(OTHER_CA_NAME)?;
        write_file(
            &dir.path().join("other-ca.pem"),
            other_params.self_signed(&other_key).map_err(rc)?.pem(),
        )?;
        let pki = TestPki {
            ca: Issuer::new(ca_params, ca_key),
            other_ca: Issuer::new(other_params, other_key),
            dir,
        };
        pki.issue_server("server")?;
        pki.issue_client("client", "root")?;
        let now = SystemTime::now();
        pki.issue(
            &pki.ca,
            "expired",
            leaf_params(Leaf::Client { cn: "root" }, now - 10 * DAY, now - DAY)?,
        )?;
        pki.issue(
            &pki.other_ca,
            "other-client",
            leaf_params(Leaf::Client { cn: "root" }, now - DAY, now + 30 * DAY)?,
        )?;
        Ok(pki)
    }

    /// Issues a fresh server certificate signed by the CA (new key, new
    /// serial, SANs [`SERVER_SANS`], EKU serverAuth + clientAuth, valid from 1
    /// day ago to 30 days from now) into `{name}.pem` / `{name}-key.pem` in
    /// [`dir`](Self::dir), replacing existing files of that name (each
    /// atomically, by write + rename; the key first, then the certificate).
    /// Returns `(cert_path, key_path)`.
    pub fn issue_server(&self, name: &str) -> io::Result<(PathBuf, PathBuf)> {
        self.issue_server_with_sans(name, &SERVER_SANS)
    }

    /// Like [`issue_server`](Self::issue_server) but with the given subject
    /// alternative names (IP addresses or DNS names), e.g. a certificate for
    /// a host name the client does not connect to.
    pub fn issue_server_with_sans(
        &self,
        name: &str,
        sans: &[&str],
    ) -> io::Result<(PathBuf, PathBuf)> {
        let now = SystemTime::now();
        let params = leaf_params(Leaf::Server { sans }, now - DAY, now + 30 * DAY)?;
        self.issue(&self.ca, name, params)
    }

    /// Issues a fresh client certificate with common name `cn` (EKU
    /// clientAuth, valid from 1 day ago to 30 days from now) signed by the
    /// CA, into `{name}.pem` / `{name}-key.pem` in [`dir`](Self::dir)
    /// (replaced atomically). Returns `(cert_path, key_path)`.
    pub fn issue_client(&self, name: &str, cn: &str) -> io::Result<(PathBuf, PathBuf)> {
        let now = SystemTime::now();
        let params = leaf_params(Leaf::Client { cn }, now - DAY, now + 30 * DAY)?;
        self.issue(&self.ca, name, params)
    }

    fn issue(
        &self,
        issuer: &Issuer<'static, KeyPair>,
        name: &str,
        params: CertificateParams,
    ) -> io::Result<(PathBuf, PathBuf)> {
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid certificate file name {name:?}"),
            ));
        }
        let key = KeyPair::generate().map_err(rc)?;
        let cert = params.signed_by(&key, issuer).map_err(rc)?;
        let cert_path = self.path(&format!("{name}.pem"));
        let key_path = self.path(&format!("{name}-key.pem"));
        write_file(&key_path, key.serialize_pem())?;
        write_file(&cert_path, cert.pem())?;
        Ok((cert_path, key_path))
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// The directory holding all files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `ca.pem`: the CA certificate (trust anchor for the server and client
    /// certificates).
    pub fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// `server.pem`: the server certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.path("server.pem")
    }

    /// `server-key.pem`: the server certificate's private key.
    pub fn server_key(&self) -> PathBuf {
        self.path("server-key.pem")
    }

    /// `client.pem`: the client certificate (CN `root`).
    pub fn client_cert(&self) -> PathBuf {
        self.path("client.pem")
    }

    /// `client-key.pem`: the client certificate's private key.
    pub fn client_key(&self) -> PathBuf {
        self.path("client-key.pem")
    }

    /// `expired.pem`: a client certificate (CN `root`) signed by the CA that
    /// expired a day ago.
    pub fn expired_cert(&self) -> PathBuf {
        self.path("expired.pem")
    }

    /// `expired-key.pem`: the expired certificate's private key.
    pub fn expired_key(&self) -> PathBuf {
        self.path("expired-key.pem")
    }

    /// `other-ca.pem`: a second CA, unrelated to [`ca`](Self::ca).
    pub fn other_ca(&self) -> PathBuf {
        self.path("other-ca.pem")
    }

    /// `other-client.pem`: a client certificate (CN `root`) signed by the
    /// other CA (so not trusted by anything trusting [`ca`](Self::ca)).
    pub fn other_client_cert(&self) -> PathBuf {
        self.path("other-client.pem")
    }

    /// `other-client-key.pem`: the other client certificate's private key.
    pub fn other_client_key(&self) -> PathBuf {
        self.path("other-client-key.pem")
    }
}

fn rc(e: rcgen::Error) -> io::Error {
    io::Error::other(format!("rcgen: {e}"))
}

/// Writes `contents` to `path` via a temporary file and a rename, so readers
/// never see a half-written file.
fn write_file(path: &Path, contents: String) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)
}

fn new_ca(cn: &str) -> io::Result<(CertificateParams, KeyPair)> {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    set_validity(&mut params, now - DAY, now + 365 * DAY);
    params.serial_number = Some(random_serial());
    Ok((params, KeyPair::generate().map_err(rc)?))
}

#[derive(Debug, Clone, Copy)]
enum Leaf<'a> {
    Server { sans: &'a [&'a str] },
    Client { cn: &'a str },
}

/// Parameters of an end-entity certificate valid from `not_before` to
/// `not_after`.
fn leaf_params(
    kind: Leaf<'_>,
    not_before: SystemTime,
    not_after: SystemTime,
) -> io::Result<CertificateParams> {
    let mut params = CertificateParams::default();
    set_validity(&mut params, not_before, not_after);
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    match kind {
        Leaf::Server { sans } => {
            params.distinguished_name = dn(sans
                .iter()
                .find(|s| s.parse::<std::net::IpAddr>().is_err())
                .unwrap_or(&"server"));
            params.subject_alt_names =
                CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                    .map_err(rc)?
                    .subject_alt_names;
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
        }
        Leaf::Client { cn } => {
            params.distinguished_name = dn(cn);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    Ok(params)
}

/// Sets the validity period. (Computed from the Unix epoch because the
/// `time` crate's `From<SystemTime>` needs its `std` feature, which rcgen
/// does not enable; whole seconds, as certificates have no finer precision.)
fn set_validity(params: &mut CertificateParams, not_before: SystemTime, not_after: SystemTime) {
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + whole_secs_since_epoch(not_before);
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + whole_secs_since_epoch(not_after);
}

fn whole_secs_since_epoch(t: SystemTime) -> Duration {
    Duration::from_secs(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs())
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "muster tests");
    dn
}

/// A random, positive, non-zero 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_err()
    {
        // Fallback: std's randomly keyed hasher over time, pid and a counter.
        use std::hash::{BuildHasher, Hash, Hasher};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        for chunk in bytes.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .hash(&mut h);
            process::id().hash(&mut h);
            COUNTER.fetch_add(1, Ordering::Relaxed).hash(&mut h);
            chunk.copy_from_slice(&h.finish().to_be_bytes());
        }
    }
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x40; // non-zero, and always 16 bytes long
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_params_ended_yesterday() {
        let now = SystemTime::now();
        let p = leaf_params(Leaf::Client { cn: "root" }, now - 10 * DAY, now - DAY).unwrap();
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        assert!(p.not_after < epoch + whole_secs_since_epoch(now));
        assert!(p.not_after <= epoch + whole_secs_since_epoch(now - DAY));
        assert!(p.not_before <= epoch + whole_secs_since_epoch(now - 10 * DAY));
        assert!(p.not_before < p.not_after);
    }

    #[test]
    fn serials_are_distinct_and_positive() {
        let a = random_serial().to_bytes();
        let b = random_serial().to_bytes();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a[0] & 0x80 == 0 && a[0] != 0);
    }
}
