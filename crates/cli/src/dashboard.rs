//! `muster dashboard`: the live web dashboard in front of any etcd cluster
//! (or muster's embedded registry), for the services under `--prefix`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use muster_dashboard::Dashboard;
use muster_tls::ServerTls;

use crate::global::GlobalArgs;
use crate::https::HttpListener;

/// How long open connections get to finish after SIGINT or SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Flags of `muster dashboard`.
#[derive(Debug, clap::Args)]
pub struct DashboardArgs {
    /// Address to serve the dashboard on. Loopback by default: when the
    /// registry has authentication off, the page shows everything the
    /// dashboard's client (--user) may read to anyone who can reach it.
    /// With authentication on it asks for a login with the registry's own
    /// users and shows each user what that user may read.
    #[arg(long, default_value = "127.0.0.1:2381")]
    pub listen: SocketAddr,
    /// Serve the dashboard over HTTPS with this certificate (PEM; leaf
    /// first). Re-read every few seconds: a rotated pair is used for new
    /// connections. (How the dashboard reaches the registry is set by the
    /// global client flags.)
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How often the certificate files are checked for changes.
    #[arg(long, hide = true, default_value = "5s", value_parser = crate::global::parse_duration)]
    pub tls_reload_interval: Duration,
}

impl DashboardArgs {
    /// The listener's TLS, from --tls-cert and --tls-key.
    fn server_tls(&self) -> Option<ServerTls> {
        let (cert, key) = (self.tls_cert.as_ref()?, self.tls_key.as_ref()?);
        Some(
            ServerTls::new(cert.as_path(), key.as_path())
                .with_reload_interval(self.tls_reload_interval),
        )
    }
}

/// Runs `muster dashboard` until SIGINT or SIGTERM.
pub async fn run(global: &GlobalArgs, args: DashboardArgs) -> anyhow::Result<()> {
    // Before the ready line: a signal right after it must shut down cleanly.
    let signal = crate::global::shutdown_signal()?;
    let etcd = global.connect()?;
    let catalog = muster::Catalog::follow_sources(etcd.clone(), global.sources())
        .await
        .with_context(|| format!("cannot read the registry at {}", global.endpoints.join(",")))?;
    let dashboard = Dashboard::with_catalog(etcd, catalog);
    let listener = HttpListener::bind(args.listen, args.server_tls().as_ref()).await?;
    let addr = listener.local_addr();
    // Session cookies over HTTPS only, when served over HTTPS.
    dashboard.set_secure_cookies(listener.tls().is_some());
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "the dashboard is reachable from other machines: it asks for a login only while the registry has authentication enabled"
        );
    }
    let url = format!("{}/", listener.url());
    tracing::info!(
        url = %url,
        endpoints = %global.endpoints.join(","),
        prefix = %global.prefix(),
        "muster dashboard ready at {url}"
    );

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut app = dashboard.router();
    if addr.ip().is_loopback() {
        app = muster_dashboard::local_hosts_only(app);
    }
    let server = listener.serve(app, async move {
        let _ = stopped.await;
    });
    let mut server = std::pin::pin!(server);
    tokio::select! {
        result = &mut server => return result.context("the HTTP server failed"),
        () = signal => {}
    }
    tracing::info!("shutting down");
    // Event streams never end on their own: end them, then let the server
    // finish what is in flight.
    dashboard.close();
    let _ = stop.send(());
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(result) => result.context("the HTTP server failed"),
        Err(_) => {
            tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; exiting anyway");
            Ok(())
        }
    }
}
