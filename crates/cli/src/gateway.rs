//! `muster gateway`: the HTTP reverse proxy in front of the services under
//! `--prefix`, routing by path prefix (and host) to instances found by
//! discovery. With `--tls-cert` and `--tls-key` it serves HTTPS (HTTP/2 and
//! HTTP/1.1); instances registered as `https://host:port` are dialled over
//! TLS, verified against `--upstream-cacert` (or a route's `upstream-ca`),
//! else the system's roots. The registry connection takes the global TLS
//! flags, like every subcommand.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use muster::balance::BalancerKind;
use muster::{Discovery, DiscoveryConfig};
use muster_gateway::{Gateway, GatewayConfig, Route};

use crate::global::{GlobalArgs, parse_duration};

/// Flags of `muster gateway`.
#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// Address to listen on for HTTP/1.1 and h2c, or HTTPS with --tls-cert
    /// (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// A TOML routes file, reloaded when it changes (see `[[route]]` in the
    /// gateway's docs). Routes given with --route come first.
    #[arg(long, value_name = "FILE")]
    pub routes: Option<PathBuf>,
    /// A route: `/prefix=service[,strip][,host=NAME][,balancer=KIND]
    /// [,hash-header=NAME][,hash-cookie=NAME][,timeout=DURATION][,retries=N]
    /// [,tag=T][,zone=Z][,prefer-zone=Z][,version=V][,upstream-ca=FILE]`.
    /// Repeatable.
    #[arg(long = "route", value_name = "ROUTE", value_parser = parse_route)]
    pub route: Vec<Route>,
    /// Default load balancer: p2c, round-robin, random, weighted, hash.
    #[arg(long, default_value = "p2c", value_parser = parse_balancer)]
    pub balancer: BalancerKind,
    /// Default time allowed until the upstream's response headers.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Client connections with no request in progress are closed after
    /// this long without a new request (idle keep-alive, slow headers).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub client_idle_timeout: Duration,
    /// Optional admin listener serving /metrics and /healthz only.
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Path of the Prometheus metrics on the main listener (off unless set).
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<String>,
    /// Serving threads, each with its own event loop and upstream
    /// connection pool (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Path the gateway answers itself with 200 (health checks).
    #[arg(long, default_value = "/healthz", value_name = "PATH")]
    pub health_path: String,
    /// Serve HTTPS (HTTP/2 and HTTP/1.1) with this certificate chain (PEM).
    /// Re-read when it changes; new connections get the new certificate.
    /// The admin listener stays plaintext.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA bundle (PEM) that signs the certificates of instances registered
    /// as https://host:port, for routes without their own upstream-ca
    /// (default: the system's roots).
    #[arg(long, value_name = "FILE")]
    pub upstream_cacert: Option<PathBuf>,
}

fn parse_route(s: &str) -> Result<Route, String> {
    s.parse::<Route>().map_err(|e| e.to_string())
}

fn parse_balancer(s: &str) -> Result<BalancerKind, String> {
    s.parse::<BalancerKind>().map_err(|e| e.to_string())
}

/// How long requests in progress get to finish after SIGINT or SIGTERM.
const DRAIN: Duration = Duration::from_secs(10);

/// Runs `muster gateway` until SIGINT or SIGTERM, then drains.
pub async fn run(global: &GlobalArgs, args: GatewayArgs) -> anyhow::Result<()> {
    // Before the ready line: a signal right after it must shut down cleanly.
    let signal = crate::global::shutdown_signal()?;
    if args.route.is_empty() && args.routes.is_none() {
        anyhow::bail!("no routes: give --route /prefix=service or --routes FILE");
    }
    let etcd = global.connect()?;
    let mut discovery_config = DiscoveryConfig::default().with_source(global.source());
    discovery_config.also = global.also.clone();
    let discovery = Discovery::with_config(etcd, discovery_config)
        .with_context(|| format!("--prefix {:?}", global.prefix()))?;

    let mut config = GatewayConfig::new(args.listen);
    config.routes = args.route;
    config.routes_file = args.routes;
    config.defaults.balancer = args.balancer;
    config.defaults.timeout = args.timeout;
    config.admin_listen = args.admin_listen;
    config.metrics_path = args.metrics_path;
    config.health_path = Some(args.health_path);
    config.drain_timeout = DRAIN;
    config.workers = args.workers;
    config.client_idle_timeout = args.client_idle_timeout;
    config.tls_cert = args.tls_cert;
    config.tls_key = args.tls_key;
    config.upstream_ca = args.upstream_cacert;
    let gateway = Gateway::start(config, discovery)
        .await
        .context("cannot start the gateway")?;
    let addr = gateway.local_addr();
    let scheme = if gateway.is_tls() { "https" } else { "http" };
    tracing::info!(
        url = %format!("{scheme}://{addr}/"),
        admin = ?gateway.admin_addr(),
        routes = ?gateway.routes(),
        endpoints = %global.endpoints.join(","),
        prefix = %global.prefix(),
        layout = %global.layout,
        also = ?global.also.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "muster gateway ready on {scheme}://{addr}/"
    );
    signal.await;
    tracing::info!("shutting down; draining requests in progress");
    gateway.shutdown().await;
    Ok(())
}
