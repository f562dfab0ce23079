//! `muster serve`: the embedded registry.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use std::time::Duration;

use muster_dashboard::Dashboard;
use muster_server::{AutoCompaction, Server, ServerConfig};

use crate::global::GlobalArgs;

/// Flags of `muster serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address for etcd's gRPC API.
    #[arg(long, default_value = "127.0.0.1:2379")]
    listen: SocketAddr,
    /// Address for HTTP: Prometheus metrics at /metrics, health at /health,
    /// the dashboard at /.
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
    /// Automatic compaction: `revision` keeps the last N revisions,
    /// `periodic` keeps a time window of history.
    #[arg(long, value_parser = ["revision", "periodic"], requires = "auto_compaction_retention")]
    auto_compaction_mode: Option<String>,
    /// For `revision`: how many revisions to keep. For `periodic`: the
    /// window, as `30m`, `1h`, `90s`, or a bare number of hours (as etcd).
    #[arg(long, requires = "auto_compaction_mode")]
    auto_compaction_retention: Option<String>,
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
/// `--prefix` is the one the dashboard shows.
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
        .with_min_lease_ttl(args.min_lease_ttl);
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
    let server = Server::start(config)
        .await
        .with_context(|| format!("cannot start the registry on {}", args.listen))?;
    let http = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", args.http_listen))?;
    let http_addr = http.local_addr()?;
    let core = server.core().clone();
    let mut app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let core = Arc::clone(&core);
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4")],
                        muster_server::metrics::render(&core),
                    )
                }
            }),
        )
        .route(
            "/health",
            axum::routing::get(|| async { "{\"health\":\"true\"}" }),
        );
    // The dashboard (/, /api/...) next to /metrics and /health, through a
    // client of our own registry like any other.
    let dashboard = match start_dashboard(&server.endpoint(), &global.prefix).await {
        Ok(dashboard) => {
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
        if let Err(e) = axum::serve(http, app).await {
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
        http = %format!("http://{http_addr}"),
        "muster serve ready ({store}); point etcdctl or muster at {}",
        server.endpoint()
    );
    shutdown.await;
    tracing::info!("shutting down");
    if let Some(dashboard) = dashboard {
        dashboard.close();
    }
    http_task.abort();
    server.shutdown().await;
    Ok(())
}

/// The dashboard of the services under `prefix` in the registry at `endpoint`.
async fn start_dashboard(endpoint: &str, prefix: &str) -> anyhow::Result<Dashboard> {
    let etcd = muster::Etcd::connect_to(endpoint)?;
    Ok(Dashboard::start(etcd, prefix).await?)
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
        assert!(matches!(
            auto_compaction("revision", "1000"),
            Ok(AutoCompaction::Revisions { keep: 1000, .. })
        ));
    }
}
