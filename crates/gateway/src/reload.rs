//! Hot reload of the routes file: checked every `reload_interval`; a
//! changed file that parses replaces the routes atomically, one that does
//! not is logged and the old routes stay.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Route, RouteDefaults, RoutesFile};
use crate::error::GatewayError;
use crate::proxy::Proxy;
use crate::route::RouteTable;

/// What the watcher needs to rebuild the table.
#[derive(Debug)]
pub(crate) struct Reloader {
    pub(crate) path: PathBuf,
    pub(crate) interval: Duration,
    /// Routes given directly; they come before the file's.
    pub(crate) fixed: Vec<Route>,
    pub(crate) defaults: RouteDefaults,
    /// The file's `[tls]` at start: the listener's files are chosen then.
    pub(crate) tls: Option<crate::config::FileTls>,
    /// The contents the current table was built from (or last rejected).
    pub(crate) last: Option<Vec<u8>>,
}

impl Reloader {
    /// Builds the table for `file`'s routes after the fixed ones.
    pub(crate) fn table(
        &self,
        file: &RoutesFile,
        proxy: &Proxy,
    ) -> Result<RouteTable, GatewayError> {
        let mut routes = self.fixed.clone();
        routes.extend(file.resolved_routes());
        let previous = proxy.routes.load();
        RouteTable::build(
            &routes,
            &self.defaults,
            Some(&previous),
            &proxy.upstreams,
            &proxy.metrics,
            &proxy.tls,
        )
    }

    /// Polls the file until `stop` turns true.
    pub(crate) async fn run(mut self, proxy: Arc<Proxy>, mut stop: watch::Receiver<bool>) {
        let mut missing = false;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
            let path = self.path.clone();
            let read = tokio::task::spawn_blocking(move || std::fs::read(path))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            let contents = match read {
                Ok(c) => {
                    missing = false;
                    c
                }
                Err(e) => {
                    if !missing {
                        tracing::warn!(path = %self.path.display(), error = %e, "cannot read the routes file; keeping the current routes");
                        missing = true;
                    }
                    continue;
                }
            };
            if self.last.as_deref() == Some(&contents[..]) {
                continue;
            }
            let table = std::str::from_utf8(&contents)
                .map_err(|e| e.to_string())
                .and_then(RoutesFile::parse)
                .and_then(|file| {
                    if file.tls != self.tls {
                        tracing::warn!(path = %self.path.display(), "the [tls] section changed: the listener keeps the files it started with until a restart (their contents are re-read as they change)");
                    }
                    self.table(&file, &proxy).map_err(|e| e.to_string())
                });
            match table {
                Ok(table) => {
                    let routes = table.describe();
                    proxy.routes.store(Arc::new(table));
                    proxy.metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(path = %self.path.display(), ?routes, "routes reloaded");
                }
                Err(e) => {
                    proxy.metrics.reloads_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(path = %self.path.display(), error = %e, "invalid routes file; keeping the current routes");
                }
            }
            self.last = Some(contents);
        }
    }
}
