//! muster's embedded registry as a test backend, with the same controls as
//! a real etcd: kill (abruptly, like a crash), restart on the same data and
//! port, wipe.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use muster_server::{Server, ServerConfig};
use tempfile::TempDir;

/// An embedded registry on its own runtime, persisting to a temporary
/// directory. Stops when dropped.
pub struct EmbeddedNode {
    dir: TempDir,
    port: u16,
    min_lease_ttl: i64,
    tls: Option<muster_tls::ServerTls>,
    auth: muster_server::AuthConfig,
    faults: Option<muster_server::faults::FaultSpec>,
    running: Option<(tokio::runtime::Runtime, Server)>,
}

impl std::fmt::Debug for EmbeddedNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedNode")
            .field("port", &self.port)
            .field("running", &self.running.is_some())
            .finish()
    }
}

impl EmbeddedNode {
    /// Starts a persistent embedded registry on a free loopback port, with
    /// a 1 s minimum lease TTL (as the harness's etcd has).
    pub fn start() -> io::Result<EmbeddedNode> {
        EmbeddedNode::launch(None, crate::test_auth_config(None), None)
    }

    /// [`EmbeddedNode::start`] injecting `faults` (`muster serve
    /// --faults`), kept across restarts.
    pub fn start_with_faults(faults: muster_server::faults::FaultSpec) -> io::Result<EmbeddedNode> {
        EmbeddedNode::launch(None, crate::test_auth_config(None), Some(faults))
    }

    /// [`EmbeddedNode::start`] with simple tokens that live `token_ttl`
    /// (`--auth-token-ttl`); passwords are hashed at bcrypt's lowest cost,
    /// as for every test registry (see [`RegistryOptions`](crate::RegistryOptions)).
    pub fn start_with_token_ttl(token_ttl: Duration) -> io::Result<EmbeddedNode> {
        EmbeddedNode::launch(None, crate::test_auth_config(Some(token_ttl)), None)
    }

    /// [`EmbeddedNode::start`] serving TLS with `pki`'s server certificate
    /// (etcd's `--cert-file`/`--key-file`), and with `client_cert_auth`
    /// requiring client certificates signed by its CA
    /// (`--trusted-ca-file` + `--client-cert-auth`), as
    /// [`EtcdNode::start_tls`](crate::EtcdNode::start_tls) does. The files
    /// are re-read every 100 ms, so rotation tests see a new pair quickly.
    pub fn start_tls(pki: &crate::TestPki, client_cert_auth: bool) -> io::Result<EmbeddedNode> {
        let mut tls = muster_tls::ServerTls::new(pki.server_cert(), pki.server_key())
            .with_reload_interval(Duration::from_millis(100));
        if client_cert_auth {
            tls = tls.with_client_ca(pki.ca(), true);
        }
        EmbeddedNode::launch(Some(tls), crate::test_auth_config(None), None)
    }

    /// A node on a free loopback port and a fresh directory, with a 1 s
    /// minimum lease TTL, started.
    fn launch(
        tls: Option<muster_tls::ServerTls>,
        auth: muster_server::AuthConfig,
        faults: Option<muster_server::faults::FaultSpec>,
    ) -> io::Result<EmbeddedNode> {
        let mut node = EmbeddedNode {
            dir: tempfile::Builder::new()
                .prefix("muster-embedded-")
                .tempdir()?,
            port: crate::free_port(),
            min_lease_ttl: 1,
            tls,
            auth,
            faults,
            running: None,
        };
        node.restart()?;
        Ok(node)
    }

    /// `http://127.0.0.1:<port>` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The gRPC port.
    pub fn client_port(&self) -> u16 {
        self.port
    }

    /// Stops abruptly: every task and connection is dropped, nothing is
    /// flushed beyond what was already durable.
    pub fn kill(&mut self) {
        if let Some((runtime, server)) = self.running.take() {
            drop(server);
            runtime.shutdown_background();
        }
    }

    /// Starts again on the same data directory and port.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut config = ServerConfig::persistent(self.dir.path().join("data"))
                .with_listen(SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)))
                .with_min_lease_ttl(self.min_lease_ttl)
                .with_auth(self.auth);
            if let Some(tls) = &self.tls {
                config = config.with_tls(tls.clone());
            }
            if let Some(faults) = &self.faults {
                config = config.with_faults(faults.clone());
            }
            // Its own runtime, started from a thread of its own: callers are
            // often inside a test's runtime, where blocking is not allowed.
            let started = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("muster-embedded")
                    .enable_all()
                    .build()?;
                let server = runtime.block_on(Server::start(config));
                Ok::<_, io::Error>((runtime, server))
            })
            .join()
            .map_err(|_| io::Error::other("the embedded registry's start panicked"))??;
            match started {
                (runtime, Ok(server)) => {
                    self.running = Some((runtime, server));
                    return Ok(());
                }
                // The old instance may still hold the port or the database
                // for a moment after a kill.
                (runtime, Err(e)) if Instant::now() < deadline => {
                    runtime.shutdown_background();
                    tracing::debug!(error = %e, "embedded registry not startable yet; retrying");
                    std::thread::sleep(Duration::from_millis(20));
                }
                (runtime, Err(e)) => {
                    runtime.shutdown_background();
                    return Err(e);
                }
            }
        }
    }

    /// Kills it and deletes its data: the next restart starts empty.
    pub fn wipe(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(self.dir.path().join("data"));
    }

    /// Whether it is running.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Its Prometheus metrics (empty when not running).
    pub fn metrics(&self) -> String {
        self.running
            .as_ref()
            .map(|(_, server)| muster_server::metrics::render(server.core()))
            .unwrap_or_default()
    }
}

impl Drop for EmbeddedNode {
    fn drop(&mut self) {
        self.kill();
    }
}
