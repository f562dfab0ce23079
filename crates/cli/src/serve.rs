//! `muster serve`: the embedded registry.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use muster_server::{Server, ServerConfig};

/// Flags of `muster serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address for etcd's gRPC API.
    #[arg(long, default_value = "127.0.0.1:2379")]
    listen: SocketAddr,
    /// Address for HTTP: Prometheus metrics at /metrics, health at /health.
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
}

/// Runs until SIGINT or SIGTERM, then shuts down gracefully.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Before anything can announce readiness: a SIGTERM right after the
    // ready line must shut down gracefully, not kill the process.
    let shutdown = shutdown_signal()?;
    let mut config = if args.in_memory {
        ServerConfig::in_memory()
    } else {
        ServerConfig::persistent(&args.data_dir)
    };
    config = config
        .with_listen(args.listen)
        .with_min_lease_ttl(args.min_lease_ttl);
    let server = Server::start(config)
        .await
        .with_context(|| format!("cannot start the registry on {}", args.listen))?;
    let http = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", args.http_listen))?;
    let http_addr = http.local_addr()?;
    let core = server.core().clone();
    let app = axum::Router::new()
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
    http_task.abort();
    server.shutdown().await;
    Ok(())
}

/// Installs the SIGINT and SIGTERM handlers now; the future resolves on
/// the first signal.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}
