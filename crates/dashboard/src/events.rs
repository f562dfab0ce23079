//! `GET /api/events`: server-sent events.
//!
//! * `snapshot`: every service with its instances, and the recent events.
//!   Sent first, and again whenever the catalog had to be re-read (the
//!   stream fell behind, or the registry was re-listed).
//! * `changes`: one per watch batch: the events, the instances they touched
//!   as they are now (`upserts`), and the ones that are gone (`removes`).
//! * `leases`: every 2 s, each lease's time left (milliseconds; `null` once
//!   the lease is gone), so the page's countdowns follow keep-alives.
//!
//! Keep-alive comments every 15 s keep proxies from closing an idle stream.
//!
//! With authentication on, a stream shows only the services its session's
//! user may read (decisions re-checked every few seconds: one that flips
//! brings a new `snapshot`), and ends when the session does; an anonymous
//! stream ends when authentication comes on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use muster::catalog::{CatalogEvent, CatalogSnapshot, CatalogUpdate};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::Dashboard;
use crate::api::{self, EventJson, InstanceJson, ServiceJson};
use crate::auth::{Viewer, Visible};

/// How often lease times are sent.
const LEASE_EVERY: Duration = Duration::from_secs(2);
/// How often an idle stream carries a keep-alive comment.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);
/// How long the browser waits before reconnecting a broken stream.
const RETRY: Duration = Duration::from_secs(2);
/// Messages queued per stream before the feeder waits for the client.
const QUEUE: usize = 16;

pub(crate) async fn stream(
    State(dashboard): State<Dashboard>,
    viewer: Viewer,
) -> impl IntoResponse {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(feed(dashboard, viewer, tx));
    let sse =
        Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE_EVERY));
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            // Tells nginx not to buffer the stream.
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        sse,
    )
}

#[derive(Serialize)]
struct SnapshotMessage<'a> {
    prefix: &'a str,
    revision: i64,
    now_ms: u64,
    services: Vec<ServiceJson<'a>>,
    events: Vec<EventJson<'a>>,
}

#[derive(Serialize)]
struct ChangesMessage<'a> {
    revision: i64,
    now_ms: u64,
    events: Vec<EventJson<'a>>,
    upserts: Vec<InstanceJson<'a>>,
    removes: Vec<Removed<'a>>,
}

#[derive(Serialize)]
struct Removed<'a> {
    service: &'a str,
    id: &'a str,
}

#[derive(Serialize)]
struct LeasesMessage {
    now_ms: u64,
    leases: BTreeMap<String, Option<u64>>,
    /// Per shown service: how fast its changes reached this dashboard's
    /// table (watch response received to visible), p99 over every change
    /// so far.
    apply: BTreeMap<String, api::ApplyJson>,
}

type Tx = mpsc::Sender<Result<Event, Infallible>>;

/// Feeds one client until it goes away, the catalog stops, the dashboard
/// closes, or the viewer may no longer look.
async fn feed(dashboard: Dashboard, viewer: Viewer, tx: Tx) {
    let mut updates = dashboard.catalog().subscribe();
    let mut closed = dashboard.inner.closed.subscribe();
    let mut lease_tick = tokio::time::interval(LEASE_EVERY);
    lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lease_read: Option<AbortOnDrop> = None;
    // The revision the client has seen everything up to.
    let mut seen = 0;
    let mut first = true;
    // What the client was last shown.
    let mut shown = Visible::All;
    loop {
        if *closed.borrow_and_update() {
            return;
        }
        let sent = tokio::select! {
            update = updates.next() => match update {
                None => return,
                Some(CatalogUpdate::Reset(snapshot)) => {
                    let Ok(visible) = visible_in(&dashboard, &viewer, &snapshot, &[]).await else {
                        return;
                    };
                    seen = snapshot.revision();
                    let event = snapshot_event(&dashboard, &snapshot, &visible);
                    let event = if first { event.retry(RETRY) } else { event };
                    first = false;
                    shown = visible;
                    // Lease times follow right away.
                    lease_tick.reset_immediately();
                    send(&tx, event).await
                }
                Some(CatalogUpdate::Events(batch)) => {
                    let snapshot = dashboard.catalog().snapshot();
                    let fresh: Vec<&CatalogEvent> =
                        batch.iter().filter(|e| e.revision > seen).collect();
                    let Some(last) = fresh.last() else { continue };
                    let Ok(visible) = visible_in(&dashboard, &viewer, &snapshot, &fresh).await else {
                        return;
                    };
                    if visible.flipped_from(&shown) {
                        // A permission changed: start the page over.
                        seen = snapshot.revision().max(last.revision);
                        shown = visible;
                        lease_tick.reset_immediately();
                        send(&tx, snapshot_event(&dashboard, &snapshot, &shown)).await
                    } else {
                        seen = seen.max(last.revision);
                        shown = visible;
                        let shown_events: Vec<&CatalogEvent> =
                            fresh.into_iter().filter(|e| shown.shows(&e.service)).collect();
                        if shown_events.is_empty() {
                            continue;
                        }
                        let (event, unknown_lease) =
                            changes_event(&dashboard, &snapshot, &shown_events, seen);
                        if unknown_lease {
                            lease_tick.reset_immediately();
                        }
                        send(&tx, event).await
                    }
                }
            },
            _ = lease_tick.tick() => {
                if !dashboard.still_valid(&viewer).await {
                    return;
                }
                let snapshot = dashboard.catalog().snapshot();
                let Ok(visible) = visible_in(&dashboard, &viewer, &snapshot, &[]).await else {
                    return;
                };
                let mut sent = true;
                if !first && visible.flipped_from(&shown) {
                    seen = seen.max(snapshot.revision());
                    sent = send(&tx, snapshot_event(&dashboard, &snapshot, &visible)).await;
                }
                shown = visible;
                // Off this loop: a slow registry must not hold up changes.
                if lease_read.as_ref().is_none_or(|t| t.0.is_finished()) {
                    let (dashboard, tx, visible) = (dashboard.clone(), tx.clone(), shown.clone());
                    lease_read = Some(AbortOnDrop(tokio::spawn(async move {
                        let snapshot = dashboard.catalog().snapshot();
                        let leases = dashboard.lease_left(api::leases_of(&snapshot, &visible)).await;
                        let apply = api::apply_of(&dashboard, &snapshot, &visible);
                        send(&tx, leases_event(&leases, apply)).await;
                    })));
                }
                sent
            }
            _ = tx.closed() => return,
            _ = closed.changed() => return,
        };
        if !sent {
            return;
        }
    }
}

/// What `viewer` may see of the snapshot's services, of the recent
/// events' and of `events`'.
async fn visible_in(
    dashboard: &Dashboard,
    viewer: &Viewer,
    snapshot: &CatalogSnapshot,
    events: &[&CatalogEvent],
) -> Result<Visible, crate::auth::Ended> {
    if matches!(viewer, Viewer::Anyone) {
        return Ok(Visible::All);
    }
    let recent = dashboard.catalog().recent();
    let names = api::service_names(snapshot)
        .chain(recent.iter().map(|e| e.service.as_str()))
        .chain(events.iter().map(|e| e.service.as_str()));
    dashboard.visible(viewer, names).await
}

/// A task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn send(tx: &Tx, event: Event) -> bool {
    tx.send(Ok(event)).await.is_ok()
}

fn json_event(name: &str, body: &impl Serialize) -> Event {
    match Event::default().event(name).json_data(body) {
        Ok(event) => event,
        Err(e) => {
            // Serializing these types cannot fail; say so if it ever does.
            tracing::error!(error = %e, "cannot encode a dashboard event");
            Event::default().comment("encoding error")
        }
    }
}

fn snapshot_event(dashboard: &Dashboard, snapshot: &CatalogSnapshot, visible: &Visible) -> Event {
    let leases = dashboard.cached_leases(api::leases_of(snapshot, visible));
    let recent = dashboard.catalog().recent();
    let now = SystemTime::now();
    let message = SnapshotMessage {
        prefix: dashboard.prefix(),
        revision: snapshot.revision(),
        now_ms: api::millis(now),
        services: api::services_json(snapshot, visible, &leases, now),
        events: recent
            .iter()
            .filter(|e| e.revision <= snapshot.revision() && visible.shows(&e.service))
            .map(EventJson::new)
            .collect(),
    };
    json_event("snapshot", &message)
}

/// The `changes` message for these events, with the touched instances as
/// `snapshot` holds them, and whether one of them has a lease not read yet.
fn changes_event(
    dashboard: &Dashboard,
    snapshot: &Arc<CatalogSnapshot>,
    events: &[&CatalogEvent],
    revision: i64,
) -> (Event, bool) {
    let touched: BTreeSet<(&str, &str)> = events
        .iter()
        .map(|e| (e.service.as_str(), e.id.as_str()))
        .collect();
    let mut upserts = Vec::new();
    let mut removes = Vec::new();
    for (service, id) in touched {
        match snapshot.service(service).and_then(|s| s.get(id)) {
            Some(entry) => upserts.push(entry),
            None => removes.push(Removed { service, id }),
        }
    }
    let leases: HashMap<i64, Option<Duration>> =
        dashboard.cached_leases(upserts.iter().map(|e| e.lease));
    let unknown_lease = upserts
        .iter()
        .any(|e| e.lease != 0 && !leases.contains_key(&e.lease));
    let now = SystemTime::now();
    let message = ChangesMessage {
        revision,
        now_ms: api::millis(now),
        events: events.iter().map(|e| EventJson::new(e)).collect(),
        upserts: upserts
            .into_iter()
            .map(|entry| InstanceJson::new(entry, &leases, now))
            .collect(),
        removes,
    };
    (json_event("changes", &message), unknown_lease)
}

fn leases_event(
    leases: &HashMap<i64, Option<Duration>>,
    apply: BTreeMap<String, api::ApplyJson>,
) -> Event {
    let message = LeasesMessage {
        now_ms: api::millis(SystemTime::now()),
        leases: leases
            .iter()
            .filter_map(|(lease, left)| {
                Some((
                    api::lease_hex(*lease)?,
                    left.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                ))
            })
            .collect(),
        apply,
    };
    json_event("leases", &message)
}
