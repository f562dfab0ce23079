//! Test certificates, generated at test time with rcgen (no private keys in
//! the repository).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use muster_tls::generate::{Authority, DAY, Leaf, write_atomically};
use tempfile::TempDir;

/// The organization every test certificate names.
const ORGANIZATION: &str = "muster tests";

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
    ca: Authority,
    other_ca: Authority,
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
        let ca = Authority::new(TEST_CA_NAME, ORGANIZATION, 365 * DAY).map_err(tls)?;
        write_file(&dir.path().join("ca.pem"), ca.cert_pem(), false)?;
        let other_ca = Authority::new(OTHER_CA_NAME, ORGANIZATION, 365 * DAY).map_err(tls)?;
        write_file(&dir.path().join("other-ca.pem"), other_ca.cert_pem(), false)?;
        let pki = TestPki { ca, other_ca, dir };
        pki.issue_server("server")?;
        pki.issue_client("client", "root")?;
        let now = SystemTime::now();
        let root = Leaf::Client { cn: "root" };
        pki.issue(&pki.ca, "expired", root, now - 10 * DAY, now - DAY)?;
        pki.issue(
            &pki.other_ca,
            "other-client",
            root,
            now - DAY,
            now + 30 * DAY,
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
        self.issue(
            &self.ca,
            name,
            Leaf::Server { sans },
            now - DAY,
            now + 30 * DAY,
        )
    }

    /// Issues a fresh client certificate with common name `cn` (EKU
    /// clientAuth, valid from 1 day ago to 30 days from now) signed by the
    /// CA, into `{name}.pem` / `{name}-key.pem` in [`dir`](Self::dir)
    /// (replaced atomically). Returns `(cert_path, key_path)`.
    pub fn issue_client(&self, name: &str, cn: &str) -> io::Result<(PathBuf, PathBuf)> {
        let now = SystemTime::now();
        self.issue(
            &self.ca,
            name,
            Leaf::Client { cn },
            now - DAY,
            now + 30 * DAY,
        )
    }

    fn issue(
        &self,
        issuer: &Authority,
        name: &str,
        leaf: Leaf<'_>,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> io::Result<(PathBuf, PathBuf)> {
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid certificate file name {name:?}"),
            ));
        }
        let issued = issuer
            .issue(leaf, ORGANIZATION, not_before, not_after)
            .map_err(tls)?;
        let cert_path = self.path(&format!("{name}.pem"));
        let key_path = self.path(&format!("{name}-key.pem"));
        write_file(&key_path, &issued.key_pem, true)?;
        write_file(&cert_path, &issued.cert_pem, false)?;
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

fn tls(e: muster_tls::Error) -> io::Error {
    io::Error::other(e.to_string())
}

/// Writes through a temporary file and a rename: readers (a server
/// reloading its certificate) never see half a file.
fn write_file(path: &Path, contents: &str, private: bool) -> io::Result<()> {
    write_atomically(path, contents, private).map_err(tls)
}
