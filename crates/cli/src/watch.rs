//! `muster watch [<service>]`: a live stream of registry changes, one line
//! each, until Ctrl-C.

use std::time::Duration;

use muster::Catalog;
use muster::catalog::{CatalogEvent, CatalogUpdate};
use muster::instance::validate_name;
use tokio::signal::unix::{SignalKind, signal};

use crate::global::{GlobalArgs, Output};
use crate::output::{print, registry_error, rfc3339};

/// Flags of `muster watch`.
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// Only this service (default: every service).
    pub service: Option<String>,
}

/// Runs `muster watch`.
pub async fn run(global: &GlobalArgs, args: WatchArgs) -> anyhow::Result<()> {
    if let Some(service) = &args.service {
        validate_name("service name", service)?;
    }
    // Installed once, before anything else, so no Ctrl-C is ever missed.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let etcd = global.connect()?;
    let catalog = Catalog::follow_sources(etcd.clone(), global.sources())
        .await
        .map_err(|e| registry_error(&etcd, e))?;
    let mut updates = catalog.subscribe();
    tracing::info!(
        prefix = %global.prefix(),
        revision = catalog.snapshot().revision(),
        "watching"
    );
    let mut health = tokio::time::interval(Duration::from_secs(1));
    let mut stale = false;
    let mut first_reset = true;
    loop {
        tokio::select! {
            update = updates.next() => match update {
                None => anyhow::bail!("the registry watch stopped"),
                Some(CatalogUpdate::Reset(_)) => {
                    if !std::mem::take(&mut first_reset) {
                        tracing::warn!("fell behind the registry; some changes were not printed");
                    }
                }
                Some(CatalogUpdate::Events(events)) => {
                    let mut out = String::new();
                    for event in events.iter() {
                        if args.service.as_ref().is_none_or(|s| *s == event.service) {
                            out.push_str(&line(global.output, event));
                        }
                    }
                    if !out.is_empty() {
                        print(&out)?;
                    }
                }
            },
            _ = health.tick() => {
                let now = catalog.health();
                match (stale, now.stale_for) {
                    (false, Some(_)) => {
                        stale = true;
                        tracing::warn!(
                            endpoints = %etcd.endpoints().join(","),
                            error = now.last_error.as_deref().unwrap_or("unknown"),
                            "lost the registry; reconnecting"
                        );
                    }
                    (true, None) => {
                        stale = false;
                        tracing::info!("watching again");
                    }
                    _ => {}
                }
            }
            _ = sigint.recv() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
        }
    }
}

/// One event as a line: aligned text or one JSON object.
fn line(output: Output, event: &CatalogEvent) -> String {
    let i = &event.instance;
    match output {
        Output::Json => format!(
            "{}\n",
            serde_json::json!({
                "at": rfc3339(event.at),
                "kind": event.kind.as_str(),
                "service": event.service,
                "id": event.id,
                "addr": i.addr,
                "status": i.status.to_string(),
                "zone": i.zone,
                "version": i.version,
                "weight": i.weight,
                "revision": event.revision,
            })
        ),
        Output::Table => format!(
            "{}  {:<12}  {}  {}  {}\n",
            rfc3339(event.at),
            event.kind.as_str(),
            event.service,
            event.id,
            i.addr
        ),
    }
}
