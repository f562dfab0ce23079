//! `muster dns`: a DNS server in front of any etcd cluster (or muster's
//! embedded registry) answering, with Consul's names, from the services
//! under `--prefix` in `--layout`, and those of every `--also` (see
//! `muster-dns` for the names and answers).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::response::IntoResponse;
use muster::Catalog;
use muster_dns::{DnsConfig, DnsServer};

use crate::global::GlobalArgs;
use crate::https::HttpListener;

/// Flags of `muster dns`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Names (under --domain, case-insensitive):
  {service}.service.muster          A, AAAA: serving instances; SRV: port and target
  _{service}._tcp.service.muster    SRV, RFC 2782 form
  {tag}.{service}.service.muster    only instances with the tag
  {service}.service.{zone}.muster   only instances in the zone
  {id}.{service}.instance.muster    one instance

Example:
  muster dns &
  dig @127.0.0.1 -p 8600 user.service.muster SRV")]
pub struct DnsArgs {
    /// Address for DNS over UDP and TCP (Consul's port by default).
    #[arg(long, default_value = "127.0.0.1:8600")]
    pub listen: SocketAddr,
    /// The domain answered for; names outside it are refused.
    #[arg(long, default_value = muster_dns::DEFAULT_DOMAIN)]
    pub domain: String,
    /// TTL of the answers, in seconds (0, as Consul: callers ask again).
    #[arg(long, default_value_t = 0)]
    pub ttl: u32,
    /// Serve Prometheus metrics at /metrics (and /health) on this address.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// At most this many TCP connections at once; more are closed at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tcp_connections: u32,
    /// Close TCP connections silent this long.
    #[arg(long, default_value = "10s", value_parser = crate::global::parse_duration)]
    pub tcp_idle_timeout: Duration,
}

impl DnsArgs {
    /// The server's configuration.
    pub fn config(&self) -> DnsConfig {
        DnsConfig::new(self.listen)
            .with_domain(self.domain.clone())
            .with_ttl(self.ttl)
            .with_max_tcp_connections(self.max_tcp_connections as usize)
            .with_tcp_idle_timeout(self.tcp_idle_timeout)
    }
}

/// Runs `muster dns` until SIGINT or SIGTERM.
pub async fn run(global: &GlobalArgs, args: DnsArgs) -> anyhow::Result<()> {
    let signal = crate::global::shutdown_signal()?;
    let etcd = global.connect()?;
    let catalog = Catalog::follow_sources(etcd, global.sources())
        .await
        .with_context(|| format!("cannot read the registry at {}", global.endpoints.join(",")))?;
    let server = DnsServer::start(catalog, args.config()).await?;
    let addr = server.local_addr();
    let mut metrics_task = None;
    let mut metrics_url = None;
    if let Some(listen) = args.metrics_listen {
        let listener = HttpListener::bind(listen, None).await?;
        metrics_url = Some(format!("{}/metrics", listener.url()));
        let app = metrics_router(server.metrics());
        metrics_task = Some(tokio::spawn(async move {
            if let Err(e) = listener.serve(app, std::future::pending()).await {
                tracing::error!(error = %e, "the metrics listener failed");
            }
        }));
    }
    tracing::info!(
        dns = %addr,
        metrics = metrics_url.as_deref().unwrap_or("off"),
        endpoints = %global.endpoints.join(","),
        sources = %global
            .sources()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        "muster dns ready on {addr}; try: dig @{} -p {} <service>.service.{} SRV",
        addr.ip(),
        addr.port(),
        server.domain().trim_end_matches('.'),
    );
    signal.await;
    tracing::info!("shutting down");
    if let Some(task) = metrics_task {
        task.abort();
    }
    server.shutdown();
    Ok(())
}

/// /metrics (the DNS server's) and /health.
pub fn metrics_router(metrics: muster_dns::DnsMetrics) -> axum::Router {
    axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4")],
                        metrics.render(),
                    )
                        .into_response()
                }
            }),
        )
        .route(
            "/health",
            axum::routing::get(|| async { "{\"health\":\"true\"}" }),
        )
}
