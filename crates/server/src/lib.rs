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

pub mod alarm;
pub mod auth;
mod authority;
pub mod core;
pub mod faults;
pub mod lease;
pub mod metrics;
pub mod mvcc;
pub mod service;
pub mod snapshot;
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

    /// Sets the space quota in bytes (`--quota-backend-bytes`; 0: etcd's
    /// default, 2 GiB). See [`alarm`].
    pub fn with_quota_backend_bytes(mut self, bytes: u64) -> Self {
        self.core.quota_backend_bytes = bytes;
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
        // Every service, once: plaintext connections are served by
        // `inline` (see there) and TLS ones by tonic's server, over the
        // same routes and fault layer.
        let routes = tonic::service::Routes::new(
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
        let plain: inline::Svc = {
            use tower::Layer;
            faults::FaultLayer::new(core.faults().cloned()).layer(routes.clone().prepare())
        };
        let (shutdown, on_shutdown) = oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .layer(faults::FaultLayer::new(core.faults().cloned()))
            .add_routes(routes);
        let stop = async {
            let _ = on_shutdown.await;
        };
        let serve = match &tls {
            Some(tls) => {
                tasks.push(tls.spawn_reloader());
                // Handshakes happen in TlsServer's accept loop (which sets
                // TCP_NODELAY); tonic sees the peer certificates.
                let incoming = tokio_stream::StreamExt::map(tls.incoming(listener), |s| {
                    s.map(authority::AuthorityFix::new)
                });
                tokio::spawn(logged(router.serve_with_incoming_shutdown(incoming, stop)))
            }
            None => {
                drop(router);
                tokio::spawn(inline::serve(listener, plain, stop))
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

/// Plaintext gRPC serving in which each connection's requests run inside
/// the connection's own task, instead of one spawned task per request (as
/// tonic's `serve` does, through hyper's executor).
///
/// Why: under many concurrent unary calls (64 clients putting), the
/// requests of one group commit are acknowledged together. With a task per
/// request, tokio runs the connection task right after each request task
/// that completes (it wakes it into the LIFO slot), so each response went
/// out in its own `writev` (0.65 per put, each also paying for the loopback
/// delivery); a request task per call also costs a spawn and a wake-up.
/// Here the acknowledged requests of a connection are polled one after the
/// other and the connection flushes their responses in one write. Requests
/// of one connection share a worker thread (connections still spread over
/// the workers).
mod inline {
    use std::future::Future;
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex, PoisonError};
    use std::task::Poll;

    use futures_util::StreamExt;
    use futures_util::stream::FuturesUnordered;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    use tokio::net::TcpListener;
    use tokio::sync::watch;
    use tower::ServiceExt;

    type Spawned = Pin<Box<dyn Future<Output = ()> + Send>>;

    /// hyper's executor for one connection: futures it is given (the
    /// connection's requests) are queued for the connection's task to poll.
    #[derive(Clone, Default)]
    struct Queue(Arc<Mutex<Vec<Spawned>>>);

    impl<F> hyper::rt::Executor<F> for Queue
    where
        F: Future<Output = ()> + Send + 'static,
    {
        fn execute(&self, fut: F) {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Box::pin(fut));
        }
    }

    impl Queue {
        fn take(&self) -> Vec<Spawned> {
            std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
        }
    }

    /// The service every connection gets a clone of.
    pub(super) type Svc = crate::faults::FaultService<tonic::service::Routes>;

    /// Accepts on `listener` until `stop` resolves, then asks every
    /// connection to finish (HTTP/2 GOAWAY: requests in flight complete)
    /// and waits for them.
    pub(super) async fn serve(listener: TcpListener, svc: Svc, stop: impl Future<Output = ()>) {
        let (signal, watcher) = watch::channel(());
        let mut stop = std::pin::pin!(stop);
        loop {
            let accepted = tokio::select! {
                () = &mut stop => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: try again shortly.
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    continue;
                }
            };
            // Without it, small responses wait ~40 ms for the peer's
            // delayed ACK.
            let _ = stream.set_nodelay(true);
            let info = tonic::transport::server::TcpConnectInfo {
                local_addr: stream.local_addr().ok(),
                remote_addr: Some(remote),
            };
            tokio::spawn(connection(stream, info, svc.clone(), watcher.clone()));
        }
        // Close the listening socket now, not after the drain.
        drop(listener);
        drop(watcher);
        let _ = signal.send(());
        signal.closed().await;
    }

    async fn connection(
        stream: tokio::net::TcpStream,
        info: tonic::transport::server::TcpConnectInfo,
        svc: Svc,
        mut stop: watch::Receiver<()>,
    ) {
        let remote: Option<SocketAddr> = info.remote_addr;
        let svc = svc.map_request(move |mut req: http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(info.clone());
            req.map(tonic::body::Body::new)
        });
        let queue = Queue::default();
        // tonic's settings (its `Server::builder()` defaults): HTTP/2 only,
        // no limit on concurrent streams (watch streams), hyper's timer.
        let mut builder = Builder::new(queue.clone()).http2_only();
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(None)
            .max_pending_accept_reset_streams(None)
            .max_local_error_reset_streams(None);
        let conn = builder.serve_connection(
            TokioIo::new(crate::authority::AuthorityFix::new(stream)),
            TowerToHyperService::new(svc),
        );
        let mut conn = std::pin::pin!(conn);
        let mut requests: FuturesUnordered<Spawned> = FuturesUnordered::new();
        let mut conn_done = false;
        let mut stopping = false;
        // A dropped sender (the server aborted) stops too. `stop` itself
        // lives until the connection is done: the server waits for that.
        let mut stopped = std::pin::pin!(stop.changed());
        std::future::poll_fn(|cx| {
            if !stopping && stopped.as_mut().poll(cx).is_ready() {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            loop {
                // Requests first: the responses they complete go out with
                // the connection's next flush, together.
                while let Poll::Ready(Some(())) = requests.poll_next_unpin(cx) {}
                if !conn_done && let Poll::Ready(result) = conn.as_mut().poll(cx) {
                    conn_done = true;
                    if let Err(e) = result {
                        tracing::debug!(error = %e, ?remote, "connection ended");
                    }
                }
                let new = queue.take();
                if new.is_empty() {
                    break;
                }
                requests.extend(new);
            }
            if conn_done && requests.is_empty() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }
}
