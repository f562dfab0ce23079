//! Test harness that runs **real** etcd processes on loopback.
//!
//! * [`EtcdNode`] is a single-member etcd; [`EtcdCluster`] is an N-member
//!   cluster (3 is typical). Every member listens on `127.0.0.1` only, on free
//!   ports picked at start-up, with its data dir and log file inside a
//!   [`tempfile::TempDir`].
//! * Members can be killed with `SIGKILL` (a real crash: no graceful shutdown),
//!   restarted on the same data dir and ports, and (single node) wiped, so the
//!   next restart brings up an empty etcd with a new cluster id.
//! * Start-up and restart block until etcd's `/health` endpoint reports
//!   `"health":"true"` (polled over plain HTTP/1.1); failures return an
//!   [`std::io::Error`] that includes the tail of etcd's log.
//! * With [`EtcdOptions::tls`] (e.g. [`EtcdNode::start_tls`]) members serve
//!   clients over TLS, optionally requiring client certificates; [`TestPki`]
//!   generates the certificates. `/health` and `/metrics` are then probed on
//!   a separate plain-HTTP metrics port (the testkit has no TLS client).
//! * Dropping a node or cluster kills (and reaps) every process it started and
//!   deletes its temporary directory.
//!
//! The crate is synchronous and std-only, so it can be used from plain
//! `#[test]`s as well as from async (e.g. tokio) tests. Tests should guard
//! themselves with [`require_etcd`]:
//!
//! ```no_run
//! let Some(()) = muster_testkit::require_etcd() else { return };
//! let etcd = muster_testkit::EtcdNode::start().unwrap();
//! let out = etcd.etcdctl(&["put", "k", "v"]).unwrap();
//! assert!(out.status.success());
//! ```
//!
//! [`golang`] builds and runs Go programs (the real Go code of other
//! registries' libraries) as test peers; [`require_go`] guards those tests.
//!
//! Environment variables:
//! * `MUSTER_REQUIRE_ETCD=1` — make [`require_etcd`] panic instead of skipping.
//! * `MUSTER_ETCD_BIN` / `MUSTER_ETCDCTL_BIN` — use these binaries instead of
//!   `etcd` / `etcdctl` from `PATH`.
//! * `MUSTER_REQUIRE_GO=1`, `MUSTER_GO_BIN`, `MUSTER_GOPATH`, `MUSTER_GO_CACHE`
//!   — see [`golang`].
//!
//! `ETCD_*` / `ETCDCTL_*` variables of the test process are not passed on to
//! the child processes (they would conflict with the command-line flags).

#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use std::{env, thread};

use tempfile::TempDir;

pub mod browser;
mod embedded;
pub mod golang;
mod pki;
mod registry;
pub use embedded::EmbeddedNode;
pub use golang::{GoProcess, GoProgram, require_go};
pub use muster_robustness::proxy::TcpProxy;
pub use pki::{OTHER_CA_NAME, SERVER_SANS, TEST_CA_NAME, TestPki};
pub use registry::{
    Backend, DEADLINE, Registry, RegistryOptions, eventually, registry, registry_with,
};

/// The auth settings of every test registry: bcrypt's lowest cost (see
/// [`RegistryOptions`]) and `token_ttl` (default 300 s).
fn test_auth_config(token_ttl: Option<Duration>) -> muster_server::AuthConfig {
    let mut auth = muster_server::AuthConfig {
        bcrypt_cost: TEST_BCRYPT_COST,
        ..Default::default()
    };
    if let Some(ttl) = token_ttl {
        auth.token_ttl = ttl;
    }
    auth
}

/// bcrypt cost of every test registry (etcd's `--bcrypt-cost`).
pub const TEST_BCRYPT_COST: u32 = 4;

/// Interval between readiness probes.
const POLL: Duration = Duration::from_millis(20);
/// Attempts (each with fresh ports) for the first start of a node/cluster.
const FIRST_START_ATTEMPTS: u32 = 5;
/// Attempts (same ports, growing back-off) for a restart.
const RESTART_ATTEMPTS: u32 = 5;

fn etcd_bin() -> OsString {
    env::var_os("MUSTER_ETCD_BIN").unwrap_or_else(|| "etcd".into())
}

fn etcdctl_bin() -> OsString {
    env::var_os("MUSTER_ETCDCTL_BIN").unwrap_or_else(|| "etcdctl".into())
}

/// Installs a log subscriber for tests (once): `RUST_LOG`, else muster's
/// crates at `info`, written through the test harness's capture.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                "muster=info,muster_gateway=info,muster_dashboard=info,muster_server=warn".into()
            }),
        )
        .with_test_writer()
        .try_init();
}

/// Whether the etcd binary is on `PATH` (or `MUSTER_ETCD_BIN` is runnable).
///
/// The answer is computed once (by running `etcd --version`) and cached.
pub fn etcd_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        Command::new(etcd_bin())
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// For tests: `Some(())` if etcd is available.
///
/// If it is not: when the environment variable `MUSTER_REQUIRE_ETCD=1` is set,
/// panics with a clear message; otherwise prints a loud multi-line warning to
/// stderr and returns `None`. Usage:
///
/// ```no_run
/// let Some(()) = muster_testkit::require_etcd() else { return };
/// ```
pub fn require_etcd() -> Option<()> {
    if etcd_available() {
        return Some(());
    }
    let current = thread::current();
    let test = current.name().unwrap_or("<unnamed>");
    if env::var("MUSTER_REQUIRE_ETCD").as_deref() == Ok("1") {
        panic!(
            "test `{test}` requires etcd (MUSTER_REQUIRE_ETCD=1) but `etcd` is not on PATH; \
             install etcd-server and etcd-client (e.g. `apt-get install etcd-server etcd-client`) \
             or point MUSTER_ETCD_BIN at an etcd binary"
        );
    }
    let bar = "!".repeat(78);
    // Written to the real stderr (not `eprintln!`) so libtest's output
    // capture does not hide the warning for passing tests.
    let _ = writeln!(
        io::stderr().lock(),
        "\n{bar}\n\
         !! SKIPPED: etcd not on PATH -- test `{test}` did NOT run.\n\
         !! To run it, install etcd-server (and etcd-client for etcdctl),\n\
         !!   e.g. `apt-get install etcd-server etcd-client`,\n\
         !! or set MUSTER_ETCD_BIN=/path/to/etcd.\n\
         !! Set MUSTER_REQUIRE_ETCD=1 to turn this skip into a failure.\n\
         {bar}"
    );
    None
}

/// Whether `program` runs (`program version_arg` succeeds). Without it,
/// what needs it (`what`) is skipped loudly, or fails when
/// `MUSTER_REQUIRE_ETCD=1`; `install` says how to get it.
pub fn require_tool(program: &str, version_arg: &str, what: &str, install: &str) -> bool {
    let runs = Command::new(program)
        .arg(version_arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if runs {
        return true;
    }
    assert!(
        std::env::var("MUSTER_REQUIRE_ETCD").as_deref() != Ok("1"),
        "{program} is required for {what} ({install})"
    );
    // Straight to stderr: the test harness captures eprintln! of passing
    // tests, and a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {program} not on PATH; {what} did not run \
         ({install}, or set MUSTER_REQUIRE_ETCD=1 to fail instead)"
    );
    false
}

/// Options for starting etcd members.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// `--heartbeat-interval` in milliseconds (default 50).
    pub heartbeat_ms: u64,
    /// `--election-timeout` in milliseconds (default 500). etcd's minimum
    /// lease TTL is derived from it (about 1.5 × election timeout, rounded up
    /// to whole seconds).
    pub election_ms: u64,
    /// `--auto-compaction-mode` (`"periodic"` or `"revision"`); `None` keeps
    /// etcd's default.
    pub auto_compaction_mode: Option<String>,
    /// `--auto-compaction-retention` (e.g. `"1m"` or `"1000"`); `None` keeps
    /// etcd's default (no auto compaction).
    pub auto_compaction_retention: Option<String>,
    /// How long to wait for a started/restarted member to become healthy
    /// (default 20 s).
    pub startup_timeout: Duration,
    /// Additional command-line arguments appended to every etcd invocation.
    pub extra_args: Vec<String>,
    /// Serve clients over TLS (`None`, the default: plain HTTP).
    pub tls: Option<EtcdTls>,
}

/// TLS settings for etcd's client port (peers always talk plain HTTP).
///
/// When set, members listen and advertise `https://127.0.0.1:<port>` for
/// clients with `--cert-file`/`--key-file` (plus `--trusted-ca-file` and
/// `--client-cert-auth` when given), and additionally serve `/health` and
/// `/metrics` over plain HTTP on `--listen-metrics-urls` (see
/// [`EtcdNode::metrics_port`]). The files are read by etcd, so they must
/// exist as long as etcd runs, including restarts (e.g. keep the
/// [`TestPki`] alive).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// `--cert-file`: the server certificate (PEM).
    pub cert_file: PathBuf,
    /// `--key-file`: the server certificate's private key (PEM).
    pub key_file: PathBuf,
    /// `--trusted-ca-file`: CA bundle that client certificates are verified
    /// against.
    ///
    /// Note: in etcd 3.4 (checked with 3.4.23) setting this alone already
    /// makes etcd *require* a client certificate signed by this CA on the
    /// client port, with or without `--client-cert-auth` (a client without
    /// one fails with "tls: client didn't provide a certificate" in etcd's
    /// log). So for server-only TLS leave this `None`.
    pub trusted_ca_file: Option<PathBuf>,
    /// `--client-cert-auth`: require and verify client certificates (against
    /// [`trusted_ca_file`](Self::trusted_ca_file), which should then be set).
    ///
    /// With `--trusted-ca-file` set, etcd 3.4 rejects clients without a valid
    /// certificate whether or not this flag is given (see
    /// [`trusted_ca_file`](Self::trusted_ca_file)); with this flag but no
    /// trusted CA, no client certificate can be verified. When etcd's auth is
    /// enabled, the certificate's common name is taken as the user name.
    pub client_cert_auth: bool,
    /// `--cacert` for the harness's own `etcdctl` calls
    /// ([`EtcdNode::etcdctl`], [`EtcdCluster::etcdctl`]): the CA that signed
    /// [`cert_file`](Self::cert_file).
    pub etcdctl_cacert: PathBuf,
    /// `--cert` and `--key` for the harness's own `etcdctl` calls: a client
    /// certificate and its key (`None`: etcdctl presents no certificate).
    pub etcdctl_client: Option<(PathBuf, PathBuf)>,
}

impl EtcdTls {
    /// TLS with `pki`'s server certificate. With `client_cert_auth`, clients
    /// must present a certificate signed by `pki`'s CA (`--trusted-ca-file`
    /// = [`TestPki::ca`] and `--client-cert-auth`); without, it is
    /// server-only TLS (no trusted CA: see
    /// [`trusted_ca_file`](Self::trusted_ca_file)). The harness's `etcdctl`
    /// trusts [`TestPki::ca`] and presents [`TestPki::client_cert`] (CN
    /// `root`).
    pub fn from_pki(pki: &TestPki, client_cert_auth: bool) -> EtcdTls {
        EtcdTls {
            cert_file: pki.server_cert(),
            key_file: pki.server_key(),
            trusted_ca_file: client_cert_auth.then(|| pki.ca()),
            client_cert_auth,
            etcdctl_cacert: pki.ca(),
            etcdctl_client: Some((pki.client_cert(), pki.client_key())),
        }
    }

    /// The `etcdctl` flags for [`etcdctl_cacert`](Self::etcdctl_cacert) and
    /// [`etcdctl_client`](Self::etcdctl_client).
    fn etcdctl_args(&self) -> Vec<OsString> {
        let mut args = vec![flag("--cacert=", &self.etcdctl_cacert)];
        if let Some((cert, key)) = &self.etcdctl_client {
            args.push(flag("--cert=", cert));
            args.push(flag("--key=", key));
        }
        args
    }
}

/// `--flag=path` as one argument.
fn flag(prefix: &str, path: &Path) -> OsString {
    let mut arg = OsString::from(prefix);
    arg.push(path);
    arg
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            heartbeat_ms: 50,
            election_ms: 500,
            auto_compaction_mode: None,
            auto_compaction_retention: None,
            startup_timeout: Duration::from_secs(20),
            extra_args: Vec::new(),
            tls: None,
        }
    }
}

/// One etcd process (or the slot for it while it is down).
#[derive(Debug)]
struct Member {
    name: String,
    data_dir: PathBuf,
    log_path: PathBuf,
    /// `https` for clients when TLS is on.
    tls: bool,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP `--listen-metrics-urls` port (TLS only; 0 otherwise).
    metrics_port: u16,
    child: Option<Child>,
}

impl Member {
    fn new(name: &str, base: &Path, opts: &EtcdOptions) -> Member {
        Member {
            name: name.to_owned(),
            data_dir: base.join(format!("{name}.etcd")),
            log_path: base.join(format!("{name}.log")),
            tls: opts.tls.is_some(),
            client_port: 0,
            peer_port: 0,
            metrics_port: 0,
            child: None,
        }
    }

    fn client_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The port serving `/health` and `/metrics` over plain HTTP.
    fn http_port(&self) -> u16 {
        if self.tls {
            self.metrics_port
        } else {
            self.client_port
        }
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// Appends a marker line to the member's log file.
    fn log_note(&self, note: &str) {
        if let Ok(mut f) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
        {
            let _ = writeln!(f, "=== muster-testkit: {note} ===");
        }
    }

    fn spawn(&mut self, initial_cluster: &str, token: &str, opts: &EtcdOptions) -> io::Result<()> {
        self.kill();
        self.log_note(&format!(
            "starting {} (client {}, peer {}, token {token})",
            self.name,
            self.client_url(),
            self.peer_url()
        ));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let log_err = log.try_clone()?;
        let mut cmd = Command::new(etcd_bin());
        for (key, _) in env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(key);
            }
        }
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg(format!("--listen-client-urls={}", self.client_url()))
            .arg(format!("--advertise-client-urls={}", self.client_url()))
            .arg(format!("--listen-peer-urls={}", self.peer_url()))
            .arg(format!("--initial-advertise-peer-urls={}", self.peer_url()))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .arg("--initial-cluster-state=new")
            .arg(format!("--initial-cluster-token={token}"))
            .arg(format!("--heartbeat-interval={}", opts.heartbeat_ms))
            .arg(format!("--election-timeout={}", opts.election_ms))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .arg(format!("--bcrypt-cost={TEST_BCRYPT_COST}"));
        if let Some(mode) = &opts.auto_compaction_mode {
            cmd.arg(format!("--auto-compaction-mode={mode}"));
        }
        if let Some(retention) = &opts.auto_compaction_retention {
            cmd.arg(format!("--auto-compaction-retention={retention}"));
        }
        if let Some(tls) = &opts.tls {
            cmd.arg(flag("--cert-file=", &tls.cert_file))
                .arg(flag("--key-file=", &tls.key_file))
                .arg(format!(
                    "--listen-metrics-urls=http://127.0.0.1:{}",
                    self.metrics_port
                ));
            if let Some(ca) = &tls.trusted_ca_file {
                cmd.arg(flag("--trusted-ca-file=", ca));
            }
            if tls.client_cert_auth {
                cmd.arg("--client-cert-auth");
            }
        }
        cmd.args(&opts.extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "failed to spawn {:?}: {e} (is etcd-server installed?)",
                    etcd_bin()
                ),
            )
        })?;
        tracing::debug!(name = %self.name, pid = child.id(), port = self.client_port, "etcd started");
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL + reap; no-op when not running.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            tracing::debug!(name = %self.name, port = self.client_port, "etcd killed");
        }
    }

    fn is_running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(Some(_)) => {
                self.child = None;
                false
            }
            Ok(None) | Err(_) => true,
        }
    }

    /// `Some(description)` if the process has exited (or was never started).
    fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(format!("exited with {status}"))
            }
            Ok(None) | Err(_) => None,
        }
    }

    fn wipe_data(&self) {
        match fs::remove_dir_all(&self.data_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %self.data_dir.display(), "cannot wipe etcd data dir: {e}")
            }
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = match fs::read(&self.log_path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => return format!("<cannot read {}: {e}>", self.log_path.display()),
        };
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `true` if `GET /health` on the client port answers `"health":"true"`.
fn health_ok(port: u16) -> bool {
    http_get(port, "/health").is_some_and(|body| body.contains("\"health\":\"true\""))
}

/// Resident memory of this process, in bytes (`/proc/self/statm`; 0 where
/// it cannot be read).
pub fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// A plain HTTP/1.1 GET on loopback; the whole response (headers and body),
/// or `None` if nothing answered.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(250)).ok()?;
    // etcd's own health check (a quorum read) times out after 1 s.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(1500)));
    let _ = stream.set_write_timeout(Some(Duration::from_millis(1500)));
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = Vec::new();
    let _ = stream.take(16 * 1024 * 1024).read_to_end(&mut response);
    Some(String::from_utf8_lossy(&response).into_owned())
}

/// Sums the samples of a Prometheus metric in `text` whose line starts with
/// `name` followed by `{` or a space and contains every label in `labels`
/// (each like `grpc_method="Watch"`). `None` if no sample matched.
pub fn metric_value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if !labels.iter().all(|l| rest.contains(l)) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

fn accepts_connections(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(250)).is_ok()
}

#[derive(Debug, Clone, Copy)]
enum Ready {
    /// `/health` reports healthy (needs a leader, i.e. quorum).
    Healthy,
    /// The client port accepts TCP connections.
    Listening,
}

enum WaitError {
    Exited(String),
    TimedOut(Duration),
}

/// Waits until members `which` are ready; fails fast if one exits.
fn wait_ready(
    members: &mut [Member],
    which: &[usize],
    ready: Ready,
    timeout: Duration,
) -> Result<(), (usize, WaitError)> {
    let deadline = Instant::now() + timeout;
    let mut pending = which.to_vec();
    loop {
        for &i in &pending {
            if let Some(how) = members[i].exited() {
                return Err((i, WaitError::Exited(how)));
            }
        }
        pending.retain(|&i| {
            let m = &members[i];
            !match ready {
                Ready::Healthy => health_ok(m.http_port()),
                Ready::Listening => accepts_connections(m.client_port),
            }
        });
        match pending.first() {
            None => return Ok(()),
            Some(&i) if Instant::now() >= deadline => {
                return Err((i, WaitError::TimedOut(timeout)));
            }
            Some(_) => thread::sleep(POLL),
        }
    }
}

fn startup_error(members: &[Member], i: usize, err: &WaitError) -> io::Error {
    let m = &members[i];
    let (kind, what) = match err {
        WaitError::Exited(how) => (io::ErrorKind::Other, how.clone()),
        WaitError::TimedOut(t) => (
            io::ErrorKind::TimedOut,
            format!("did not become ready within {t:?}"),
        ),
    };
    let mut msg = format!(
        "etcd member {} ({}) {what}; last log lines:\n{}",
        m.name,
        m.client_url(),
        m.log_tail(30)
    );
    for (j, other) in members.iter().enumerate() {
        if j != i {
            msg.push_str(&format!(
                "\n--- log of member {} ---\n{}",
                other.name,
                other.log_tail(10)
            ));
        }
    }
    io::Error::new(kind, msg)
}

/// A free loopback port, never handed out before by this process: for a
/// server a test starts, or an endpoint where nothing listens.
pub fn free_port() -> u16 {
    free_ports(1).expect("a free loopback port")[0]
}

/// Returns `n` distinct free loopback ports, never handed out before by this
/// process (so concurrently running harnesses do not collide with each other).
fn free_ports(n: usize) -> io::Result<Vec<u16>> {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    let mut listeners = Vec::new(); // held until done so the OS gives distinct ports
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        if listeners.len() > 10 * n + 100 {
            return Err(io::Error::other("cannot find enough free loopback ports"));
        }
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        if handed_out.insert(port) {
            ports.push(port);
        }
        listeners.push(listener);
    }
    Ok(ports)
}

/// A cluster token unique to this harness instance.
fn new_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "muster-testkit-{}-{}-{nanos:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn initial_cluster(members: &[Member]) -> String {
    members
        .iter()
        .map(|m| format!("{}={}", m.name, m.peer_url()))
        .collect::<Vec<_>>()
        .join(",")
}

/// First start of all members, retrying with fresh ports if a member exits
/// during start-up (e.g. because another process grabbed its port).
fn start_fresh(members: &mut [Member], token: &mut String, opts: &EtcdOptions) -> io::Result<()> {
    let all: Vec<usize> = (0..members.len()).collect();
    let mut attempt = 1;
    loop {
        let per_member = if opts.tls.is_some() { 3 } else { 2 };
        let ports = free_ports(members.len() * per_member)?;
        for (m, p) in members.iter_mut().zip(ports.chunks(per_member)) {
            m.client_port = p[0];
            m.peer_port = p[1];
            m.metrics_port = p.get(2).copied().unwrap_or(0);
        }
        let initial = initial_cluster(members);
        for m in members.iter_mut() {
            m.spawn(&initial, token, opts)?;
        }
        match wait_ready(members, &all, Ready::Healthy, opts.startup_timeout) {
            Ok(()) => return Ok(()),
            Err((i, err @ WaitError::Exited(_))) if attempt < FIRST_START_ATTEMPTS => {
                let e = startup_error(members, i, &err);
                tracing::warn!("etcd start attempt {attempt} failed, retrying with new ports: {e}");
                for m in members.iter_mut() {
                    m.kill();
                    m.wipe_data();
                }
                *token = new_token();
                attempt += 1;
            }
            Err((i, err)) => {
                let e = startup_error(members, i, &err);
                for m in members.iter_mut() {
                    m.kill();
                }
                return Err(e);
            }
        }
    }
}

/// (Re)starts member `i` on its existing ports and data dir. Retries a few
/// times with back-off if it exits during start-up (old sockets may linger).
fn restart_one(
    members: &mut [Member],
    i: usize,
    token: &str,
    opts: &EtcdOptions,
    ready: Ready,
) -> io::Result<()> {
    members[i].kill();
    let initial = initial_cluster(members);
    let mut attempt = 1;
    loop {
        members[i].spawn(&initial, token, opts)?;
        match wait_ready(members, &[i], ready, opts.startup_timeout) {
            Ok(()) => return Ok(()),
            Err((_, WaitError::Exited(how))) if attempt < RESTART_ATTEMPTS => {
                tracing::warn!(name = %members[i].name, "etcd restart attempt {attempt} {how}; retrying");
                thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
                attempt += 1;
            }
            Err((_, err)) => {
                let e = startup_error(members, i, &err);
                members[i].kill();
                return Err(e);
            }
        }
    }
}

/// Runs etcdctl (API v3) with `args` against any plaintext registry at
/// `endpoint` (`http://host:port` or `host:port`): etcd or the embedded
/// one.
pub fn etcdctl_at(endpoint: &str, args: &[&str]) -> io::Result<Output> {
    run_etcdctl(endpoint.trim_start_matches("http://"), None, args)
}

/// [`etcdctl_at`] feeding it `stdin`, expecting success: its stdout.
/// Panics with etcdctl's stderr when it fails. For test setup (users,
/// roles, `auth enable`) against either backend.
pub fn etcdctl_ok(endpoint: &str, args: &[&str], stdin: &str) -> String {
    let out = run_etcdctl_with(
        endpoint.trim_start_matches("http://"),
        None,
        args,
        Some(stdin),
    )
    .unwrap_or_else(|e| panic!("run etcdctl (is etcd-client installed?): {e}"));
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs etcdctl (API v3) with `args` against any TLS registry at
/// `endpoint` (`https://host:port`), trusting `pki`'s CA and presenting
/// its client certificate (CN `root`), as [`EtcdTls::from_pki`]'s.
pub fn etcdctl_tls_at(endpoint: &str, pki: &TestPki, args: &[&str]) -> io::Result<Output> {
    let tls = EtcdTls::from_pki(pki, true);
    run_etcdctl(endpoint, Some(&tls), args)
}

/// Runs etcdctl; with `tls`, its `--cacert`/`--cert`/`--key` flags come
/// before `args`.
fn run_etcdctl(endpoints: &str, tls: Option<&EtcdTls>, args: &[&str]) -> io::Result<Output> {
    run_etcdctl_with(endpoints, tls, args, None)
}

/// [`run_etcdctl`], with `stdin` as its input (none: no input).
fn run_etcdctl_with(
    endpoints: &str,
    tls: Option<&EtcdTls>,
    args: &[&str],
    stdin: Option<&str>,
) -> io::Result<Output> {
    let mut cmd = Command::new(etcdctl_bin());
    for (key, _) in env::vars_os() {
        if key.to_string_lossy().starts_with("ETCDCTL_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .args(tls.map(EtcdTls::etcdctl_args).unwrap_or_default())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let Some(input) = stdin else {
        return cmd.stdin(Stdio::null()).output();
    };
    let mut child = cmd.stdin(Stdio::piped()).spawn()?;
    if let Some(mut pipe) = child.stdin.take() {
        // etcdctl may exit before reading it all; its answer says why.
        let _ = pipe.write_all(input.as_bytes());
    }
    child.wait_with_output()
}

/// A single-member etcd on loopback. Killed (and its temp dir removed) on drop.
#[derive(Debug)]
pub struct EtcdNode {
    member: Member,
    opts: EtcdOptions,
    token: String,
    // Declared last: removed after the process has been killed.
    dir: TempDir,
}

impl EtcdNode {
    /// Starts a node with [`EtcdOptions::default`] and waits until it is healthy.
    pub fn start() -> io::Result<EtcdNode> {
        EtcdNode::start_with(EtcdOptions::default())
    }

    /// Starts a node serving clients over TLS with `pki`'s certificates
    /// ([`EtcdTls::from_pki`]; with `client_cert_auth`, clients must present
    /// a certificate signed by [`TestPki::ca`]) and otherwise default
    /// options, and waits until it is healthy. `pki` must outlive the node.
    pub fn start_tls(pki: &TestPki, client_cert_auth: bool) -> io::Result<EtcdNode> {
        EtcdNode::start_with(EtcdOptions {
            tls: Some(EtcdTls::from_pki(pki, client_cert_auth)),
            ..EtcdOptions::default()
        })
    }

    /// Starts a node with the given options and waits until it is healthy.
    pub fn start_with(opts: EtcdOptions) -> io::Result<EtcdNode> {
        let dir = tempfile::Builder::new().prefix("muster-etcd-").tempdir()?;
        let mut node = EtcdNode {
            member: Member::new("node0", dir.path(), &opts),
            opts,
            token: new_token(),
            dir,
        };
        start_fresh(
            std::slice::from_mut(&mut node.member),
            &mut node.token,
            &node.opts,
        )?;
        Ok(node)
    }

    /// The client URL, e.g. `http://127.0.0.1:2379` (`https://…` with TLS).
    pub fn endpoint(&self) -> String {
        self.member.client_url()
    }

    /// The client port (stable across restarts).
    pub fn client_port(&self) -> u16 {
        self.member.client_port
    }

    /// The port serving `/health` and `/metrics` over plain HTTP (e.g. for
    /// [`http_get`]; stable across restarts): the client port without TLS,
    /// etcd's `--listen-metrics-urls` port with TLS.
    pub fn metrics_port(&self) -> u16 {
        self.member.http_port()
    }

    /// The TLS settings the node was started with.
    pub fn tls(&self) -> Option<&EtcdTls> {
        self.opts.tls.as_ref()
    }

    /// The peer port (stable across restarts).
    pub fn peer_port(&self) -> u16 {
        self.member.peer_port
    }

    /// The etcd data directory (inside the harness's temp dir).
    pub fn data_dir(&self) -> &Path {
        &self.member.data_dir
    }

    /// The harness's temporary directory (data dir and log file live here).
    pub fn temp_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills etcd with `SIGKILL` and reaps it. Idempotent.
    pub fn kill(&mut self) {
        self.member.kill();
    }

    /// Starts etcd again on the same data dir and ports (killing it first if
    /// it is running) and waits until it is healthy.
    pub fn restart(&mut self) -> io::Result<()> {
        restart_one(
            std::slice::from_mut(&mut self.member),
            0,
            &self.token,
            &self.opts,
            Ready::Healthy,
        )
    }

    /// Kills etcd and deletes its data. The next [`restart`](Self::restart)
    /// starts an empty etcd with a new cluster id (on the same ports).
    pub fn wipe(&mut self) {
        self.member.kill();
        self.member.wipe_data();
        self.member.log_note("data wiped");
        self.token = new_token();
    }

    /// Whether the etcd process is alive (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        self.member.is_running()
    }

    /// Whether `GET /health` currently reports healthy.
    pub fn is_healthy(&self) -> bool {
        health_ok(self.member.http_port())
    }

    /// etcd's Prometheus metrics (`GET /metrics` on the
    /// [`metrics_port`](Self::metrics_port)).
    pub fn metrics(&self) -> String {
        http_get(self.member.http_port(), "/metrics").unwrap_or_default()
    }

    /// One metric's value summed over matching samples; see [`metric_value`].
    pub fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        metric_value(&self.metrics(), name, labels)
    }

    /// Runs `etcdctl` with `ETCDCTL_API=3 --endpoints=<endpoint>` plus `args`;
    /// with TLS also `--cacert`, `--cert` and `--key` (from
    /// [`EtcdTls::etcdctl_cacert`] and [`EtcdTls::etcdctl_client`]) before
    /// `args`.
    pub fn etcdctl(&self, args: &[&str]) -> io::Result<Output> {
        run_etcdctl(&self.endpoint(), self.opts.tls.as_ref(), args)
    }

    /// Runs `etcdctl` with `ETCDCTL_API=3 --endpoints=<endpoint>` plus `args`
    /// and no TLS flags of the harness's own (e.g. to pass other or no client
    /// certificates). Consider `--dial-timeout`/`--command-timeout` in `args`
    /// when the connection is expected to fail: etcdctl retries until they
    /// expire (5 s by default).
    pub fn etcdctl_raw(&self, args: &[&str]) -> io::Result<Output> {
        run_etcdctl(&self.endpoint(), None, args)
    }

    /// The last `lines` lines of etcd's log (all starts appended), for
    /// failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        self.member.log_tail(lines)
    }
}

impl Drop for EtcdNode {
    fn drop(&mut self) {
        self.member.kill();
    }
}

/// An N-member etcd cluster on loopback, each member with its own client port,
/// peer port and data dir. All members are killed on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    opts: EtcdOptions,
    token: String,
    // Declared last: removed after the processes have been killed.
    dir: TempDir,
}

impl EtcdCluster {
    /// Starts an `n`-member cluster with default options and waits until every
    /// member is healthy.
    pub fn start(n: usize) -> io::Result<EtcdCluster> {
        EtcdCluster::start_with(n, EtcdOptions::default())
    }

    /// Starts an `n`-member cluster with the given options and waits until
    /// every member is healthy.
    pub fn start_with(n: usize, opts: EtcdOptions) -> io::Result<EtcdCluster> {
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an etcd cluster needs at least one member",
            ));
        }
        let dir = tempfile::Builder::new()
            .prefix("muster-etcd-cluster-")
            .tempdir()?;
        let members = (0..n)
            .map(|i| Member::new(&format!("m{i}"), dir.path(), &opts))
            .collect();
        let mut cluster = EtcdCluster {
            members,
            opts,
            token: new_token(),
            dir,
        };
        start_fresh(&mut cluster.members, &mut cluster.token, &cluster.opts)?;
        Ok(cluster)
    }

    /// Client URLs of all members (running or not), in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// Client URL of member `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn member_endpoint(&self, i: usize) -> String {
        self.members[i].client_url()
    }

    /// Client URLs of the members this harness has not killed.
    pub fn running_endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(Member::client_url)
            .collect()
    }

    /// Kills member `i` with `SIGKILL` and reaps it. Idempotent.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn kill_member(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Restarts member `i` on its data dir and ports (killing it first if it
    /// is running). If a quorum of members is then running, waits until the
    /// member is healthy; otherwise (no leader possible yet) only waits until
    /// it accepts client connections.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn restart_member(&mut self, i: usize) -> io::Result<()> {
        let n = self.members.len();
        let others_running = (0..n)
            .filter(|&j| j != i && self.members[j].is_running())
            .count();
        let ready = if others_running + 1 > n / 2 {
            Ready::Healthy
        } else {
            Ready::Listening
        };
        restart_one(&mut self.members, i, &self.token, &self.opts, ready)
    }

    /// Whether member `i`'s process is alive.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn is_member_running(&mut self, i: usize) -> bool {
        self.members[i].is_running()
    }

    /// Whether member `i`'s `/health` currently reports healthy.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn is_member_healthy(&self, i: usize) -> bool {
        health_ok(self.members[i].http_port())
    }

    /// The port where member `i` serves `/health` and `/metrics` over plain
    /// HTTP: its client port without TLS, its `--listen-metrics-urls` port
    /// with TLS.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn member_metrics_port(&self, i: usize) -> u16 {
        self.members[i].http_port()
    }

    /// Waits until every running member reports healthy (e.g. after a
    /// [`kill_member`](Self::kill_member), until a new leader is elected).
    /// Fails after the start-up timeout or if a member exits meanwhile.
    pub fn wait_healthy(&mut self) -> io::Result<()> {
        let running: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].is_running())
            .collect();
        wait_ready(
            &mut self.members,
            &running,
            Ready::Healthy,
            self.opts.startup_timeout,
        )
        .map_err(|(i, err)| startup_error(&self.members, i, &err))
    }

    /// Runs `etcdctl` (API v3) against the endpoints of all members this
    /// harness has not killed, plus `args`; with TLS also `--cacert`,
    /// `--cert` and `--key` (see [`EtcdNode::etcdctl`]).
    pub fn etcdctl(&self, args: &[&str]) -> io::Result<Output> {
        run_etcdctl(
            &self.running_endpoints().join(","),
            self.opts.tls.as_ref(),
            args,
        )
    }

    /// Like [`etcdctl`](Self::etcdctl) but without the harness's TLS flags
    /// (see [`EtcdNode::etcdctl_raw`]).
    pub fn etcdctl_raw(&self, args: &[&str]) -> io::Result<Output> {
        run_etcdctl(&self.running_endpoints().join(","), None, args)
    }

    /// The last `lines` lines of member `i`'s log.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        self.members[i].log_tail(lines)
    }

    /// The harness's temporary directory (data dirs and logs live here).
    pub fn temp_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members (never true for a started cluster).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
    }
}
