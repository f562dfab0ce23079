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

/// How often lease times are sent.
const LEASE_EVERY: Duration = Duration::from_secs(2);
/// How often an idle stream carries a keep-alive comment.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);
/// How long the browser waits before reconnecting a broken stream.
const RETRY: Duration = Duration::from_secs(2);
/// Messages queued per stream before the feeder waits for the client.
const QUEUE: usize = 16;

pub(crate) async fn stream(State(dashboard): State<Dashboard>) -> impl IntoResponse {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(feed(dashboard, tx));
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
}

type Tx = mpsc::Sender<Result<Event, Infallible>>;

/// Feeds one client until it goes away, the catalog stops, or the
/// dashboard closes.
async fn feed(dashboard: Dashboard, tx: Tx) {
    let mut updates = dashboard.catalog().subscribe();
    let mut closed = dashboard.inner.closed.subscribe();
    let mut lease_tick = tokio::time::interval(LEASE_EVERY);
    lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lease_read: Option<AbortOnDrop> = None;
    // The revision the client has seen everything up to.
    let mut seen = 0;
    let mut first = true;
    loop {
        if *closed.borrow_and_update() {
            return;
        }
        let sent = tokio::select! {
            update = updates.next() => match update {
                None => return,
                Some(CatalogUpdate::Reset(snapshot)) => {
                    seen = snapshot.revision();
                    let event = snapshot_event(&dashboard, &snapshot);
                    let event = if first { event.retry(RETRY) } else { event };
                    first = false;
                    // Lease times follow right away.
                    lease_tick.reset_immediately();
                    send(&tx, event).await
                }
                Some(CatalogUpdate::Events(batch)) => {
                    let snapshot = dashboard.catalog().snapshot();
                    let fresh: Vec<&CatalogEvent> =
                        batch.iter().filter(|e| e.revision > seen).collect();
                    let Some(last) = fresh.last() else { continue };
                    seen = seen.max(last.revision);
                    let (event, unknown_lease) = changes_event(&dashboard, &snapshot, &fresh, seen);
                    if unknown_lease {
                        lease_tick.reset_immediately();
                    }
                    send(&tx, event).await
                }
            },
            _ = lease_tick.tick() => {
                // Off this loop: a slow registry must not hold up changes.
                if lease_read.as_ref().is_none_or(|t| t.0.is_finished()) {
                    let (dashboard, tx) = (dashboard.clone(), tx.clone());
                    lease_read = Some(AbortOnDrop(tokio::spawn(async move {
                        let snapshot = dashboard.catalog().snapshot();
                        let leases = dashboard.lease_left(api::leases_of(&snapshot)).await;
                        send(&tx, leases_event(&leases)).await;
                    })));
                }
                true
            }
            _ = tx.closed() => return,
            _ = closed.changed() => return,
        };
        if !sent {
            return;
        }
    }
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

fn snapshot_event(dashboard: &Dashboard, snapshot: &CatalogSnapshot) -> Event {
    let leases = dashboard.cached_leases(api::leases_of(snapshot));
    let recent = dashboard.catalog().recent();
    let now = SystemTime::now();
    let message = SnapshotMessage {
        prefix: dashboard.prefix(),
        revision: snapshot.revision(),
        now_ms: api::millis(now),
        services: api::services_json(snapshot, &leases, now),
        events: recent
            .iter()
            .filter(|e| e.revision <= snapshot.revision())
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

fn leases_event(leases: &HashMap<i64, Option<Duration>>) -> Event {
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
    };
    json_event("leases", &message)
}
