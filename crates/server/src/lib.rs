//! muster's embedded registry: a single-node server that speaks etcd's v3
//! gRPC API (KV, Watch, Lease, Maintenance, Cluster), so that muster runs
//! with no etcd installed while the same client code talks to an etcd
//! cluster in production.
//!
//! The layers follow etcd's server: [`mvcc`] (revisions and history),
//! [`lease`] (time-to-live grants), [`watch`] (fan-out through an index,
//! slow watchers catching up from history), [`storage`] (durable log on
//! redb with group commit), [`core`] (the ordered write path), and
//! [`service`] (the gRPC API).
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! let server = muster_server::Server::start(muster_server::ServerConfig::in_memory()).await?;
//! println!("etcd API at {}", server.endpoint());
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! With [`ServerConfig::tls`] the gRPC port speaks only TLS (ALPN `h2`),
//! following etcd's `--cert-file`, `--key-file`, `--trusted-ca-file` and
//! `--client-cert-auth`; the certificate files are re-read every
//! [`ServerTls::reload_interval`], so a rotated pair is used for new
//! connections while open ones (watch streams) keep theirs.
#![forbid(unsafe_code)]

pub mod auth;
pub mod core;
pub mod faults;
pub mod lease;
pub mod metrics;
pub mod mvcc;
pub mod service;
pub mod storage;
pub mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use muster_proto as pb;
pub use muster_tls::{ServerTls, TlsServer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use crate::auth::AuthConfig;
pub use crate::core::{AutoCompaction, Core, CoreConfig};
use crate::service::Services;
use crate::storage::Storage;
use crate::watch::HeaderInfo;

/// The etcd API version the server reports in `Status`.
pub const ETCD_API_VERSION: &str = "3.4.0";

/// How to run a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen for gRPC (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Where to keep data; `None` keeps everything in memory.
    pub data_dir: Option<PathBuf>,
    /// Limits and lease policy.
    pub core: CoreConfig,
    /// How often watchers that asked for progress notifications get one
    /// (etcd's `--experimental-watch-progress-notify-interval`, 10 min).
    pub progress_notify_interval: Duration,
    /// TLS for the gRPC port; `None` serves plaintext. Its ALPN list is
    /// replaced by `h2` alone (gRPC needs HTTP/2).
    pub tls: Option<ServerTls>,
    /// Token lifetime and password hashing of the auth store.
    pub auth: AuthConfig,
}

impl ServerConfig {
    /// In memory, on a free loopback port.
    pub fn in_memory() -> ServerConfig {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: None,
            core: CoreConfig::default(),
            progress_notify_interval: Duration::from_secs(600),
            tls: None,
            auth: AuthConfig::default(),
        }
    }

    /// Durable in `dir`, on a free loopback port.
    pub fn persistent(dir: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            data_dir: Some(dir.into()),
            ..ServerConfig::in_memory()
        }
    }

    /// Sets the listen address.
    pub fn with_listen(mut self, listen: SocketAddr) -> Self {
        self.listen = listen;
        self
    }

    /// Serves gRPC over TLS.
    pub fn with_tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets the auth store's token lifetime and bcrypt cost.
    pub fn with_auth(mut self, auth: AuthConfig) -> Self {
        self.auth = auth;
        self
    }

    /// Sets automatic compaction.
    pub fn with_auto_compaction(mut self, policy: AutoCompaction) -> Self {
        self.core.auto_compaction = Some(policy);
        self
    }

    /// Injects faults (`muster serve --faults`).
    pub fn with_faults(mut self, faults: faults::FaultSpec) -> Self {
        self.core.faults = Some(faults);
        self
    }

    /// Sets the minimum lease TTL in seconds.
    pub fn with_min_lease_ttl(mut self, seconds: i64) -> Self {
        self.core.min_lease_ttl = seconds;
        self
    }
}

/// A running server. Dropping it stops it.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    core: Arc<Core>,
    tls: Option<TlsServer>,
    shutdown: Option<oneshot::Sender<()>>,
    serve: Option<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// Opens storage, recovers, binds and starts serving. With TLS, the
    /// certificate, key and CA files are loaded first: a missing or broken
    /// one is an error naming the file.
    pub async fn start(config: ServerConfig) -> std::io::Result<Server> {
        let tls = match &config.tls {
            Some(tls) => Some(
                tls.clone()
                    .with_alpn(&[muster_tls::ALPN_H2])
                    .build()
                    .map_err(std::io::Error::other)?,
            ),
            None => None,
        };
        let (storage, recovered) = match &config.data_dir {
            Some(dir) => Storage::open(dir).map_err(std::io::Error::other)?,
            None => Storage::in_memory(),
        };
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let header = HeaderInfo {
            cluster_id: random_id(),
            member_id: random_id(),
        };
        let core = Core::new(storage, recovered, header, config.core.clone(), config.auth);
        let mut tasks = core.spawn_tasks();
        let endpoint = endpoint_url(addr, tls.is_some());
        let cert_identity = config
            .tls
            .as_ref()
            .is_some_and(|t| t.client_cert_auth && t.client_ca.is_some());
        // At least 100 ms, as etcd enforces (and a zero interval is no timer).
        let progress_every = config
            .progress_notify_interval
            .max(Duration::from_millis(100));
        let services =
            Services::new(core.clone(), endpoint, progress_every).with_cert_identity(cert_identity);
        let max = service::TRANSPORT_LIMIT_BYTES;
        let (shutdown, on_shutdown) = oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .layer(faults::FaultLayer::new(core.faults().cloned()))
            .add_service(
                pb::kv_server::KvServer::new(services.clone()).max_decoding_message_size(max),
            )
            .add_service(
                pb::watch_server::WatchServer::new(services.clone()).max_decoding_message_size(max),
            )
            .add_service(
                pb::lease_server::LeaseServer::new(services.clone()).max_decoding_message_size(max),
            )
            .add_service(pb::maintenance_server::MaintenanceServer::new(
                services.clone(),
            ))
            .add_service(pb::cluster_server::ClusterServer::new(services.clone()))
            .add_service(pb::auth_server::AuthServer::new(services));
        let stop = async {
            let _ = on_shutdown.await;
        };
        let serve = match &tls {
            Some(tls) => {
                tasks.push(tls.spawn_reloader());
                // Handshakes happen in TlsServer's accept loop (which sets
                // TCP_NODELAY); tonic sees the peer certificates.
                let incoming = tls.incoming(listener);
                tokio::spawn(logged(router.serve_with_incoming_shutdown(incoming, stop)))
            }
            None => {
                // The builder's tcp_nodelay does not apply to a custom
                // incoming stream: without this, small responses wait
                // ~40 ms for the client's delayed ACK.
                let incoming =
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                tokio::spawn(logged(router.serve_with_incoming_shutdown(incoming, stop)))
            }
        };
        tracing::info!(
            %addr,
            tls = tls.is_some(),
            revision = core.committed(),
            "muster registry ready"
        );
        Ok(Server {
            addr,
            core,
            tls,
            shutdown: Some(shutdown),
            serve: Some(serve),
            tasks,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://host:port`, or `https://host:port` with TLS, for clients.
    pub fn endpoint(&self) -> String {
        endpoint_url(self.addr, self.tls.is_some())
    }

    /// The gRPC port's TLS (its certificate, reload counters), when on.
    pub fn tls(&self) -> Option<&TlsServer> {
        self.tls.as_ref()
    }

    /// The state, for metrics and tests.
    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Stops accepting requests, lets in-flight ones finish, and stops.
    pub async fn shutdown(mut self) {
        self.stop();
        if let Some(serve) = self.serve.take() {
            // Streams (watch, keep-alive) do not end by themselves.
            let _ = tokio::time::timeout(Duration::from_secs(5), serve).await;
        }
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        if let Some(serve) = self.serve.take() {
            serve.abort();
        }
    }
}

/// Serves until `serve` ends, logging why if it failed.
async fn logged(serve: impl std::future::Future<Output = Result<(), tonic::transport::Error>>) {
    if let Err(e) = serve.await {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

fn endpoint_url(addr: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{addr}")
}

fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() | 1
}
