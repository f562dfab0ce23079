//! # muster-gateway
//!
//! An HTTP reverse proxy that routes to instances found by muster's
//! discovery.
//!
//! ```no_run
//! # async fn demo(discovery: muster::Discovery) -> Result<(), muster_gateway::GatewayError> {
//! use muster_gateway::{Gateway, GatewayConfig, Route};
//!
//! let config = GatewayConfig::new("127.0.0.1:8080".parse().unwrap())
//!     .with_route(Route::new("/api/users", "user").strip_prefix())
//!     .with_route(Route::new("/carts", "cart").hash_by_header("x-user"));
//! let gateway = Gateway::start(config, discovery).await?;
//! println!("listening on {}", gateway.local_addr());
//! gateway.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! How a request travels (`proxy.rs`):
//!
//! 1. The listener (`server.rs`) speaks HTTP/1.1 and h2c on one port, or
//!    with a certificate, HTTPS with HTTP/2 and HTTP/1.1 by ALPN (`tls.rs`;
//!    the certificate follows its files). HTTP/1.1 is the gateway's own
//!    (`downstream/`: malformed heads get 400, too large ones 431); h2c,
//!    HTTP/2 and protocol upgrades are hyper's.
//! 2. The gateway's own paths (health, metrics) are answered directly.
//! 3. The route table (`route.rs`) picks the route: host-specific routes
//!    first, then the longest prefix on segment boundaries. No route: 404
//!    with a JSON body.
//! 4. The route's load balancer (`muster::balance`, kept current from
//!    discovery's local table minus the ejected instances, `upstream.rs`;
//!    each serving thread has its own copy of the routes and balancers,
//!    `lane.rs`) picks an instance: power of two choices on in-flight requests unless
//!    the route says otherwise (consistent hashing on a header or cookie,
//!    round-robin, ...). None left: 503 naming the service.
//! 5. The head sent upstream is written in one pass over the client's
//!    headers: hop-by-hop ones go, `X-Forwarded-*` and `Forwarded` are
//!    added (`headers.rs`). The request's own task sends it on a pooled
//!    connection with its body streamed, and reads the answer's head
//!    (`client.rs` and `h1.rs`: HTTP/1.1 on the wire, over TLS to
//!    `https://` instances, one pool per serving thread). A pooled
//!    connection the upstream had closed is replaced by a fresh one to the
//!    same instance. A connect failure, or an idempotent request that
//!    failed before its body was touched and before any answer, is retried
//!    once on another instance.
//! 6. Failures count against the instance; enough in a row eject it for a
//!    while (`health.rs`). Timeouts give 504, other failures 502.
//! 7. The answer streams back. Trailers pass both ways (a chunked body's
//!    trailer section, HTTP/2 trailers). A `101 Switching Protocols` turns
//!    both connections into a byte tunnel (`upgrade.rs`).
//! 8. Client connections idle for `client_idle_timeout`, or whose request
//!    head never completes, are closed by their thread's watchdog
//!    (`watchdog.rs`).
//!
//! Routes can come from a TOML file that is reloaded when it changes
//! (`reload.rs`, format in [`config`]). Metrics are described in
//! `metrics.rs`.
#![forbid(unsafe_code)]

mod body;
mod client;
pub mod config;
mod downstream;
mod error;
mod h1;
mod headers;
mod health;
mod lane;
mod metrics;
mod proxy;
mod reload;
mod route;
mod server;
mod tls;
mod upgrade;
mod upstream;
mod watchdog;

use std::net::SocketAddr;
use std::sync::Arc;

use muster::Discovery;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use body::GatewayBody;
pub use config::{GatewayConfig, HashKey, HealthConfig, Route, RouteDefaults, RoutesFile};
pub use error::GatewayError;

use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::reload::Reloader;
use crate::route::RouteTable;
use crate::server::Workers;
use crate::upstream::Upstreams;

/// Starts gateways.
#[derive(Debug)]
pub struct Gateway;

impl Gateway {
    /// Validates the configuration, reads the routes file (if any), binds
    /// the listeners and starts serving. Services are followed through
    /// `discovery` from now on; a service the registry cannot list yet is
    /// retried in the background (its requests wait briefly, then get 503).
    pub async fn start(
        config: GatewayConfig,
        discovery: Discovery,
    ) -> Result<GatewayHandle, GatewayError> {
        for route in &config.routes {
            route.validate()?;
        }
        for path in [&config.health_path, &config.metrics_path]
            .into_iter()
            .flatten()
        {
            if !path.starts_with('/') {
                return Err(GatewayError::Config(format!(
                    "the path {path:?} must start with '/'"
                )));
            }
        }
        if config.defaults.timeout.is_zero() {
            return Err(GatewayError::Config(
                "the default timeout must be positive".into(),
            ));
        }
        if config.client_idle_timeout.is_zero() {
            return Err(GatewayError::Config(
                "the client idle timeout must be positive".into(),
            ));
        }
        if config.reload_interval.is_zero() {
            return Err(GatewayError::Config(
                "the reload interval must be positive".into(),
            ));
        }
        let file = match &config.routes_file {
            Some(path) => {
                let text = std::fs::read(path).map_err(|e| GatewayError::RoutesFile {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                let parsed = std::str::from_utf8(&text)
                    .map_err(|e| e.to_string())
                    .and_then(RoutesFile::parse)
                    .map_err(|reason| GatewayError::RoutesFile {
                        path: path.clone(),
                        reason,
                    })?;
                Some((path.clone(), text, parsed))
            }
            None => None,
        };

        // The routes file's [tls], unless the configuration names files.
        let mut config = config;
        if let Some((path, _, parsed)) = &file
            && let Some(tls) = &parsed.tls
        {
            if config.tls_cert.is_none() && config.tls_key.is_none() {
                config.tls_cert = Some(tls.cert.clone());
                config.tls_key = Some(tls.key.clone());
            } else {
                tracing::info!(path = %path.display(), "the [tls] of the routes file is overridden by --tls-cert/--tls-key");
            }
        }
        let listener = server::bind(config.listen).await?;
        let admin = match config.admin_listen {
            Some(addr) => Some(server::bind(addr).await?),
            None => None,
        };
        let local_addr = listener.local_addr().map_err(|source| GatewayError::Bind {
            addr: config.listen,
            source,
        })?;
        let admin_addr = match &admin {
            Some(l) => Some(l.local_addr().map_err(|source| GatewayError::Bind {
                addr: config.listen,
                source,
            })?),
            None => None,
        };

        let tls = tls::listener(&config)?;
        let mut metrics = Metrics::default();
        metrics.tls = tls.clone();
        let metrics = Arc::new(metrics);
        let workers = match config.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        // One lane of per-thread state per serving thread.
        let upstreams = Upstreams::new(discovery, config.health.clone(), metrics.clone(), workers);
        let proxy = Arc::new(Proxy::new(&config, upstreams, metrics));
        proxy.tls.check_default()?;
        let (stop_tx, stop) = watch::channel(false);
        let mut tasks = Vec::new();

        match file {
            Some((path, text, parsed)) => {
                let reloader = Reloader {
                    path,
                    interval: config.reload_interval,
                    fixed: config.routes.clone(),
                    defaults: config.defaults.clone(),
                    tls: parsed.tls.clone(),
                    last: Some(text),
                };
                let table = reloader.table(&parsed, &proxy)?;
                proxy.routes.store(Arc::new(table));
                tasks.push(tokio::spawn(reloader.run(proxy.clone(), stop.clone())));
            }
            None => {
                let table = RouteTable::build(
                    &config.routes,
                    &config.defaults,
                    None,
                    &proxy.upstreams,
                    &proxy.metrics,
                    &proxy.tls,
                )?;
                proxy.routes.store(Arc::new(table));
            }
        }
        let routes = proxy.routes.load().describe();
        if routes.is_empty() {
            tracing::warn!("the gateway has no routes: every request gets 404");
        }

        let workers = Workers::start(
            workers,
            &proxy,
            &stop,
            config.drain_timeout,
            config.client_idle_timeout,
            tls.clone(),
        )?;
        // Aborted on shutdown (the handle's `tasks` are awaited instead).
        let tls_reloader = tls.as_ref().map(|t| t.spawn_reloader());
        tasks.push(tokio::spawn(server::accept(
            listener,
            workers.queues(),
            proxy.clone(),
            stop.clone(),
        )));
        if let Some(admin) = admin {
            tasks.push(tokio::spawn(server::serve_admin(
                admin,
                proxy.clone(),
                stop.clone(),
                config.drain_timeout,
            )));
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(addr = %local_addr, %scheme, admin = ?admin_addr, ?routes, "gateway listening");
        Ok(GatewayHandle {
            local_addr,
            admin_addr,
            tls: tls.is_some(),
            tls_reloader,
            proxy,
            stop: stop_tx,
            tasks,
            workers: workers.done,
        })
    }
}

/// A running gateway. Dropping it stops accepting connections (requests in
/// progress finish in the background); [`shutdown`](Self::shutdown) also
/// waits for them.
#[derive(Debug)]
pub struct GatewayHandle {
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    tls: bool,
    /// Follows the listener's certificate files.
    tls_reloader: Option<JoinHandle<()>>,
    proxy: Arc<Proxy>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Fire when the serving threads have drained.
    workers: Vec<tokio::sync::oneshot::Receiver<()>>,
}

impl GatewayHandle {
    /// The address the gateway listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether the main listener speaks HTTPS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The admin listener's address, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The metrics in Prometheus text format (as served at `/metrics`).
    pub fn metrics(&self) -> String {
        self.proxy.render_metrics()
    }

    /// The current routes, as `host/prefix -> service` lines.
    pub fn routes(&self) -> Vec<String> {
        self.proxy.routes.load().describe()
    }

    /// Stops accepting connections, lets requests in progress finish (up
    /// to [`GatewayConfig::drain_timeout`]), then returns.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(reloader) = self.tls_reloader.take() {
            reloader.abort();
        }
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        for worker in self.workers.drain(..) {
            let _ = worker.await;
        }
        tracing::info!(addr = %self.local_addr, "gateway stopped");
    }
}

impl Drop for GatewayHandle {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if let Some(reloader) = self.tls_reloader.take() {
            reloader.abort();
        }
    }
}
