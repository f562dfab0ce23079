//! `muster serve`: the embedded registry.
//!
//! TLS follows etcd's flags (`--cert-file`, `--key-file`,
//! `--trusted-ca-file`, `--client-cert-auth`) and etcd's client URLs: one
//! configuration for the gRPC port (ALPN h2) and the HTTP port (ALPN
//! http/1.1: /metrics, /health, the dashboard), both following the files
//! on disk.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::response::IntoResponse;
use std::time::Duration;

use muster_dashboard::Dashboard;
use muster_server::{AuthConfig, AutoCompaction, Server, ServerConfig};
use muster_tls::{ClientTls, ServerTls};

use crate::global::GlobalArgs;
use crate::https::HttpListener;

/// Flags of `muster serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address for etcd's gRPC API.
    #[arg(long, default_value = "127.0.0.1:2379")]
    listen: SocketAddr,
    /// Address for HTTP: Prometheus metrics at /metrics, health at /health,
    /// the dashboard at /. HTTPS with the same certificate and client
    /// certificate rules as the gRPC port when --cert-file is given.
    #[arg(long, default_value = "127.0.0.1:2381")]
    http_listen: SocketAddr,
    /// Where to keep data.
    #[arg(long, default_value = "./muster-data", conflicts_with = "in_memory")]
    data_dir: PathBuf,
    /// Keep everything in memory (tests, throwaway use).
    #[arg(long)]
    in_memory: bool,
    /// Lease TTLs below this many seconds are raised to it.
    #[arg(long, default_value_t = 2)]
    min_lease_ttl: i64,
    /// The largest request accepted, in bytes (etcd's default: 1.5 MiB).
    #[arg(long, default_value_t = 1536 * 1024)]
    max_request_bytes: usize,
    /// The most operations in one transaction branch.
    #[arg(long, default_value_t = 128)]
    max_txn_ops: usize,
    /// The space quota in bytes: past it, the NOSPACE alarm is raised and
    /// writes that could grow the store are refused until space is freed
    /// (delete, compact, defragment) and the alarm disarmed. 0: etcd's
    /// default, 2 GiB.
    #[arg(long, default_value_t = 0)]
    quota_backend_bytes: u64,
    /// Automatic compaction: `revision` keeps the last N revisions,
    /// `periodic` keeps a time window of history.
    #[arg(long, value_parser = ["revision", "periodic"], requires = "auto_compaction_retention")]
    auto_compaction_mode: Option<String>,
    /// For `revision`: how many revisions to keep. For `periodic`: the
    /// window, as `30m`, `1h`, `90s`, or a bare number of hours (as etcd).
    #[arg(long, requires = "auto_compaction_mode")]
    auto_compaction_retention: Option<String>,
    /// Inject faults on purpose, to test services against a misbehaving
    /// registry: comma-separated `latency=50ms±20ms`, `drop-watch=1/min`,
    /// `unavailable=2s/30s`, `compact=10s`, `lease-expire-early=5%`,
    /// `seed=N`. Off by default; see `muster_faults_injected_total` in
    /// /metrics.
    #[arg(long, value_name = "SPEC", env = "MUSTER_FAULTS")]
    faults: Option<muster_server::faults::FaultSpec>,
    /// Serve clients over TLS with this certificate (PEM; leaf first, then
    /// intermediates), on the gRPC port and the HTTP port alike. The files
    /// are re-read every few seconds: a rotated pair is used for new
    /// connections, open ones keep theirs.
    #[arg(long, value_name = "PATH", requires = "key_file", help_heading = "TLS")]
    cert_file: Option<PathBuf>,
    /// The private key of --cert-file (PEM).
    #[arg(
        long,
        value_name = "PATH",
        requires = "cert_file",
        help_heading = "TLS"
    )]
    key_file: Option<PathBuf>,
    /// The CA bundle that signs client certificates. As in etcd 3.4, giving
    /// it already requires every client to present a certificate signed by
    /// it, on both ports (see --client-cert-auth).
    #[arg(
        long,
        value_name = "PATH",
        requires = "cert_file",
        help_heading = "TLS"
    )]
    trusted_ca_file: Option<PathBuf>,
    /// Require client certificates signed by --trusted-ca-file, as etcd's
    /// client URLs do: on the gRPC port and on the HTTP port too, so
    /// Prometheus scraping /metrics, health checks of /health and browsers
    /// opening the dashboard need a client certificate. The dashboard
    /// inside `muster serve` connects to the registry trusting
    /// --trusted-ca-file and presenting --cert-file/--key-file, so that
    /// certificate must allow client authentication too (without a trusted
    /// CA it connects without verifying: it dials its own listener).
    #[arg(long, requires = "trusted_ca_file", help_heading = "TLS")]
    client_cert_auth: bool,
    /// How long an auth token lives without use, in seconds (etcd's
    /// --auth-token-ttl); every use starts it again.
    #[arg(long, value_name = "SECONDS", default_value_t = 300,
          value_parser = parse_token_ttl, help_heading = "Auth")]
    auth_token_ttl: u64,
    /// bcrypt cost of stored password hashes, 4 to 31 (etcd's
    /// --bcrypt-cost). Each step doubles the CPU time of every user add and
    /// login: 10 takes about 80 ms.
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(4..=31), help_heading = "Auth")]
    bcrypt_cost: u32,
    /// How often the certificate files are checked for changes.
    #[arg(long, hide = true, default_value = "5s", value_parser = crate::global::parse_duration)]
    tls_reload_interval: Duration,
    /// While authentication is enabled, answer /metrics only to requests
    /// with `Authorization: Bearer <token>`, a token of any user from
    /// Authenticate (`etcdctl --user NAME auth ...` or any etcd client's
    /// login), else 401. Like any simple token it dies after
    /// --auth-token-ttl without use (a scraper's requests count as use)
    /// and on a restart. Without this flag /metrics is open, as etcd's is;
    /// /health always is.
    #[arg(long)]
    metrics_require_token: bool,
    /// Also answer DNS on this address (UDP and TCP), with Consul's names,
    /// from the registry's own catalog of the services under --prefix (and
    /// every --also): the same server as `muster dns`. It reads every
    /// service whatever the registry's users and roles. Its metrics join
    /// /metrics.
    #[arg(long, value_name = "ADDR", help_heading = "DNS")]
    dns_listen: Option<SocketAddr>,
    /// The domain --dns-listen answers for.
    #[arg(long, default_value = muster_dns::DEFAULT_DOMAIN, help_heading = "DNS")]
    dns_domain: String,
    /// TTL of --dns-listen's answers, in seconds.
    #[arg(long, default_value_t = 0, help_heading = "DNS")]
    dns_ttl: u32,
}

impl ServeArgs {
    /// The TLS both ports serve, from the etcd-style flags; `None` without
    /// --cert-file.
    fn server_tls(&self) -> Option<ServerTls> {
        let (cert, key) = (self.cert_file.as_ref()?, self.key_file.as_ref()?);
        let mut tls = ServerTls::new(cert.as_path(), key.as_path())
            .with_reload_interval(self.tls_reload_interval);
        if let Some(ca) = &self.trusted_ca_file {
            // etcd 3.4 requires and verifies client certificates as soon
            // as a trusted CA is given, with or without --client-cert-auth
            // (checked against etcd 3.4.23: without a certificate the
            // handshake fails).
            tls = tls.with_client_ca(ca.as_path(), true);
        }
        Some(tls)
    }

    /// The auth store's settings from --auth-token-ttl and --bcrypt-cost
    /// (both range-checked by clap).
    fn auth_config(&self) -> AuthConfig {
        AuthConfig {
            token_ttl: Duration::from_secs(self.auth_token_ttl),
            bcrypt_cost: self.bcrypt_cost,
        }
    }

    /// How the in-process dashboard reaches the registry over TLS: trusting
    /// --trusted-ca-file (or, without one, not verifying our own server,
    /// which it dials on an address this process holds), presenting the
    /// server's own certificate when client certificates are required.
    fn dashboard_tls(&self) -> Option<ClientTls> {
        let tls = self.server_tls()?;
        let client = match &tls.client_ca {
            Some(ca) => ClientTls::new()
                .with_ca(ca.clone())
                .with_identity(tls.cert.clone(), tls.key.clone()),
            None => ClientTls::new().with_insecure_skip_verify(true),
        };
        Some(client)
    }
}

/// `--auth-token-ttl`: a whole number of seconds, at least 1.
fn parse_token_ttl(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("a token must live at least 1 second".into()),
        Ok(secs) => Ok(secs),
        Err(_) => Err(format!("{s:?} is not a whole number of seconds (e.g. 300)")),
    }
}

fn auto_compaction(mode: &str, retention: &str) -> anyhow::Result<AutoCompaction> {
    match mode {
        "revision" => {
            let keep: i64 = retention.parse().ok().filter(|n| *n > 0).with_context(|| {
                format!("--auto-compaction-retention {retention:?}: a positive number of revisions")
            })?;
            // etcd's revision compactor runs every 5 minutes.
            Ok(AutoCompaction::Revisions {
                keep,
                interval: Duration::from_secs(300),
            })
        }
        _ => {
            let window = parse_window(retention).with_context(|| {
                format!("--auto-compaction-retention {retention:?}: a duration like 30m, 1h, 90s, or hours")
            })?;
            Ok(AutoCompaction::Periodic { window })
        }
    }
}

fn parse_window(s: &str) -> Option<Duration> {
    let (number, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "h"),
    };
    let n: f64 = number.trim().parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
}

/// Runs until SIGINT or SIGTERM, then shuts down gracefully. The global
/// `--layout`, `--prefix` and `--also` are what the dashboard and DNS show.
pub async fn run(global: &GlobalArgs, args: ServeArgs) -> anyhow::Result<()> {
    // Before anything can announce readiness: a SIGTERM right after the
    // ready line must shut down gracefully, not kill the process.
    let shutdown = crate::global::shutdown_signal()?;
    let mut config = if args.in_memory {
        ServerConfig::in_memory()
    } else {
        ServerConfig::persistent(&args.data_dir)
    };
    config = config
        .with_listen(args.listen)
        .with_min_lease_ttl(args.min_lease_ttl)
        .with_quota_backend_bytes(args.quota_backend_bytes)
        .with_auth(args.auth_config());
    if args.max_request_bytes == 0 || args.max_txn_ops == 0 {
        anyhow::bail!("--max-request-bytes and --max-txn-ops must be positive");
    }
    config.core.max_request_bytes = args.max_request_bytes;
    config.core.max_txn_ops = args.max_txn_ops;
    if let (Some(mode), Some(retention)) =
        (&args.auto_compaction_mode, &args.auto_compaction_retention)
    {
        config = config.with_auto_compaction(auto_compaction(mode, retention)?);
    }
    if let Some(faults) = &args.faults {
        config = config.with_faults(faults.clone());
    }
    let tls = args.server_tls();
    if let Some(tls) = &tls {
        config = config.with_tls(tls.clone());
    }
    let server = Server::start(config)
        .await
        .with_context(|| format!("cannot start the registry on {}", args.listen))?;
    let http = HttpListener::bind(args.http_listen, tls.as_ref()).await?;
    let http_addr = http.local_addr();
    let http_url = http.url();
    let core = server.core().clone();
    let tls_listeners: Vec<(&'static str, muster_tls::TlsServer)> = server
        .tls()
        .map(|t| ("grpc", t.clone()))
        .into_iter()
        .chain(http.tls().map(|t| ("http", t.clone())))
        .collect();
    // DNS from the registry's own catalog, before /metrics (which renders
    // its metrics too).
    let dns = match args.dns_listen {
        Some(listen) => {
            let config = muster_dns::DnsConfig::new(listen)
                .with_domain(args.dns_domain.clone())
                .with_ttl(args.dns_ttl);
            Some(start_dns(&server, args.dashboard_tls(), global.sources(), config).await?)
        }
        None => None,
    };
    let dns_metrics = dns.as_ref().map(muster_dns::DnsServer::metrics);
    let require_token = args.metrics_require_token;
    let mut app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move |headers: axum::http::HeaderMap| {
                let core = Arc::clone(&core);
                let tls_listeners = tls_listeners.clone();
                let dns_metrics = dns_metrics.clone();
                async move {
                    if require_token && !metrics_allowed(&core, &headers) {
                        return metrics_refused();
                    }
                    let listeners: Vec<(&str, &muster_tls::TlsServer)> =
                        tls_listeners.iter().map(|(n, t)| (*n, t)).collect();
                    let mut text = muster_server::metrics::render(&core);
                    text.push_str(&muster_server::metrics::render_tls(&listeners));
                    if let Some(dns) = &dns_metrics {
                        text.push_str(&dns.render());
                    }
                    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
                }
            }),
        )
        .route(
            "/health",
            axum::routing::get(|| async { "{\"health\":\"true\"}" }),
        );
    // The dashboard (/, /api/...) next to /metrics and /health, through a
    // client of our own registry like any other.
    let dashboard = match start_dashboard(&server, args.dashboard_tls(), global.sources()).await {
        Ok(dashboard) => {
            // Logins when auth is on, asked of our own server: no probe.
            let core = server.core().clone();
            dashboard.set_auth_check(move || core.auth_summary().0);
            dashboard.set_secure_cookies(http.tls().is_some());
            // The quota next to the database size (etcd's API has no call
            // for it; we know our own).
            dashboard.set_quota(server.core().quota_bytes());
            // DNS rebinding protection for the dashboard's pages (not for
            // /metrics and /health, which scrapers reach by any name).
            let mut routes = dashboard.router();
            if http_addr.ip().is_loopback() {
                routes = muster_dashboard::local_hosts_only(routes);
            }
            app = app.merge(routes);
            Some(dashboard)
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "the dashboard is off");
            None
        }
    };
    let http_task = tokio::spawn(async move {
        if let Err(e) = http.serve(app, std::future::pending()).await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    let store = if args.in_memory {
        "in memory".to_string()
    } else {
        format!("data in {}", args.data_dir.display())
    };
    tracing::info!(
        endpoint = %server.endpoint(),
        http = %http_url,
        "muster serve ready ({store}); point etcdctl or muster at {}",
        server.endpoint()
    );
    shutdown.await;
    tracing::info!("shutting down");
    if let Some(dashboard) = dashboard {
        dashboard.close();
    }
    http_task.abort();
    drop(dns);
    server.shutdown().await;
    Ok(())
}

/// Whether a /metrics request may be answered under
/// `--metrics-require-token`: always while auth is off, else only with
/// `Authorization: Bearer <token>` naming a live token of any user (the
/// metrics hold counts, no keys or values, so no role is needed).
fn metrics_allowed(core: &muster_server::Core, headers: &axum::http::HeaderMap) -> bool {
    if !core.auth_summary().0 {
        return true;
    }
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    token.and_then(|t| core.tokens().resolve(t)).is_some()
}

/// /metrics' answer to a request without a valid token.
fn metrics_refused() -> axum::response::Response {
    (
        axum::http::StatusCode::UNAUTHORIZED,
        [
            (
                axum::http::header::WWW_AUTHENTICATE,
                "Bearer realm=\"muster metrics\"",
            ),
            (
                axum::http::header::CONTENT_TYPE,
                "text/plain; charset=utf-8",
            ),
        ],
        "authentication is enabled and muster serve --metrics-require-token is set: \
             send Authorization: Bearer <token> with a token from Authenticate\n",
    )
        .into_response()
}

/// The dashboard of the services under `prefix` in our own registry, over
/// TLS with `tls`.
async fn start_dashboard(
    server: &Server,
    tls: Option<ClientTls>,
    sources: Vec<muster::Source>,
) -> anyhow::Result<Dashboard> {
    let etcd = muster::Etcd::connect(dashboard_config(server, tls))?;
    let catalog = muster::Catalog::follow_sources(etcd.clone(), sources).await?;
    Ok(Dashboard::with_catalog(etcd, catalog))
}

/// The DNS server of `--dns-listen`, following `sources` in our own
/// registry as the dashboard does (internal token: it works with auth
/// on).
async fn start_dns(
    server: &Server,
    tls: Option<ClientTls>,
    sources: Vec<muster::Source>,
    config: muster_dns::DnsConfig,
) -> anyhow::Result<muster_dns::DnsServer> {
    let etcd = muster::Etcd::connect(dashboard_config(server, tls))?;
    let catalog = muster::Catalog::follow_sources(etcd, sources)
        .await
        .context("cannot follow the registry's own catalog for DNS")?;
    Ok(muster_dns::DnsServer::start(catalog, config).await?)
}

/// The client configuration of the in-process dashboard (and DNS server). A server
/// listening on all addresses is dialed on loopback (a certificate is
/// verified against the address dialed, and 0.0.0.0 is in none).
fn dashboard_config(server: &Server, tls: Option<ClientTls>) -> muster::Config {
    let mut addr = server.addr();
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut config = muster::Config::new([format!("{scheme}://{addr}")]);
    config.tls = tls;
    // The registry's own view: every service, whatever the roles (the
    // dashboard shows each logged-in user what that user may read).
    config.with_token(server.core().internal_token())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_windows() {
        assert_eq!(parse_window("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_window("2"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_window("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_window("0"), None);
        assert_eq!(parse_window("1x"), None);
        assert!(auto_compaction("revision", "-3").is_err());
        assert_eq!(parse_token_ttl("300"), Ok(300));
        assert!(parse_token_ttl("0").is_err() && parse_token_ttl("5m").is_err());
        assert!(matches!(
            auto_compaction("revision", "1000"),
            Ok(AutoCompaction::Revisions { keep: 1000, .. })
        ));
    }
}
