//! The JSON the page reads: instances, events, registry status.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use muster::catalog::{CatalogEvent, CatalogSnapshot, Entry};
use serde::Serialize;

use crate::auth::{Viewer, Visible};
use crate::{Dashboard, Error};

/// Milliseconds since the Unix epoch.
pub(crate) fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A lease id as the page shows it (etcd's hex form); `None` for no lease.
/// Hex also keeps 64-bit ids exact in JavaScript.
pub(crate) fn lease_hex(lease: i64) -> Option<String> {
    (lease != 0).then(|| format!("{lease:x}"))
}

/// One instance as the page and `/api/services` show it.
#[derive(Debug, Serialize)]
pub(crate) struct InstanceJson<'a> {
    service: &'a str,
    id: &'a str,
    addr: &'a str,
    version: &'a str,
    zone: &'a str,
    weight: u32,
    status: &'static str,
    tags: &'a [String],
    metadata: &'a BTreeMap<String, String>,
    /// The lease in hex; `null` for a key without a lease.
    lease: Option<String>,
    /// Absent when not known (yet); `null` when the lease is gone.
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_left_ms: Option<Option<u64>>,
    /// `null` when the writer did not record it.
    registered_at_ms: Option<u64>,
    age_ms: Option<u64>,
    create_revision: i64,
    mod_revision: i64,
}

impl<'a> InstanceJson<'a> {
    pub(crate) fn new(
        entry: &'a Entry,
        leases: &HashMap<i64, Option<Duration>>,
        now: SystemTime,
    ) -> Self {
        let instance = &entry.instance;
        let registered_at = entry.registered_at;
        InstanceJson {
            service: &instance.service,
            id: &instance.id,
            addr: &instance.addr,
            version: &instance.version,
            zone: &instance.zone,
            weight: instance.weight,
            status: if instance.is_serving() {
                "serving"
            } else {
                "draining"
            },
            tags: &instance.tags,
            metadata: &instance.metadata,
            lease: lease_hex(entry.lease),
            lease_left_ms: leases
                .get(&entry.lease)
                .map(|left| left.map(duration_millis)),
            registered_at_ms: registered_at.map(millis),
            age_ms: registered_at.map(|at| now.duration_since(at).map_or(0, duration_millis)),
            create_revision: entry.create_revision,
            mod_revision: entry.mod_revision,
        }
    }
}

/// One service with its instances, sorted by id.
#[derive(Debug, Serialize)]
pub(crate) struct ServiceJson<'a> {
    name: &'a str,
    serving: usize,
    draining: usize,
    instances: Vec<InstanceJson<'a>>,
}

/// Every service `visible` shows, sorted by name.
pub(crate) fn services_json<'a>(
    snapshot: &'a CatalogSnapshot,
    visible: &Visible,
    leases: &HashMap<i64, Option<Duration>>,
    now: SystemTime,
) -> Vec<ServiceJson<'a>> {
    snapshot
        .services()
        .iter()
        .filter(|(name, _)| visible.shows(name))
        .map(|(name, instances)| {
            let (serving, draining) = snapshot.counts(name);
            ServiceJson {
                name,
                serving,
                draining,
                instances: instances
                    .values()
                    .map(|entry| InstanceJson::new(entry, leases, now))
                    .collect(),
            }
        })
        .collect()
}

/// How fast one service's changes reach the dashboard's table.
#[derive(Debug, Serialize)]
pub(crate) struct ApplyJson {
    /// p99 of watch response received to visible, in milliseconds.
    p99_ms: f64,
    /// Changes measured.
    count: u64,
}

/// [`ApplyJson`] of every service `visible` shows that changed since the
/// dashboard started.
pub(crate) fn apply_of(
    dashboard: &crate::Dashboard,
    snapshot: &CatalogSnapshot,
    visible: &Visible,
) -> BTreeMap<String, ApplyJson> {
    snapshot
        .services()
        .keys()
        .filter(|name| visible.shows(name))
        .filter_map(|name| {
            let stats = dashboard.catalog().apply_stats(name)?;
            let p99 = stats.quantile(0.99)?;
            Some((
                name.clone(),
                ApplyJson {
                    p99_ms: p99.as_secs_f64() * 1e3,
                    count: stats.count(),
                },
            ))
        })
        .collect()
}

/// Every lease of the services `visible` shows.
pub(crate) fn leases_of<'a>(
    snapshot: &'a CatalogSnapshot,
    visible: &'a Visible,
) -> impl Iterator<Item = i64> + 'a {
    snapshot
        .services()
        .iter()
        .filter(|(name, _)| visible.shows(name))
        .flat_map(|(_, instances)| instances.values().map(|e| e.lease))
        .filter(|lease| *lease != 0)
}

/// The names of the snapshot's services.
pub(crate) fn service_names(snapshot: &CatalogSnapshot) -> impl Iterator<Item = &str> {
    snapshot.services().keys().map(String::as_str)
}

/// One event of the log.
#[derive(Debug, Serialize)]
pub(crate) struct EventJson<'a> {
    kind: &'static str,
    service: &'a str,
    id: &'a str,
    addr: &'a str,
    zone: &'a str,
    version: &'a str,
    status: &'static str,
    revision: i64,
    at_ms: u64,
}

impl<'a> EventJson<'a> {
    pub(crate) fn new(event: &'a CatalogEvent) -> Self {
        EventJson {
            kind: event.kind.as_str(),
            service: &event.service,
            id: &event.id,
            addr: &event.instance.addr,
            zone: &event.instance.zone,
            version: &event.instance.version,
            status: if event.instance.is_serving() {
                "serving"
            } else {
                "draining"
            },
            revision: event.revision,
            at_ms: millis(event.at),
        }
    }
}

/// `GET /api/services`.
#[derive(Debug, Serialize)]
struct ServicesResponse<'a> {
    prefix: &'a str,
    revision: i64,
    now_ms: u64,
    instances: usize,
    services: Vec<ServiceJson<'a>>,
}

pub(crate) async fn services(State(dashboard): State<Dashboard>, viewer: Viewer) -> Response {
    let snapshot = dashboard.catalog().snapshot();
    let Ok(visible) = dashboard.visible(&viewer, service_names(&snapshot)).await else {
        return crate::auth::login_required();
    };
    let leases = dashboard.lease_left(leases_of(&snapshot, &visible)).await;
    let now = SystemTime::now();
    let services = services_json(&snapshot, &visible, &leases, now);
    let body = ServicesResponse {
        prefix: dashboard.prefix(),
        revision: snapshot.revision(),
        now_ms: millis(now),
        instances: services.iter().map(|s| s.instances.len()).sum(),
        services,
    };
    no_store(Json(body))
}

/// The registry's status, as `/api/status` answers it.
#[derive(Debug, Clone, Serialize)]
pub struct RegistryStatus {
    /// The endpoint the client talks to.
    pub endpoint: String,
    /// Every configured endpoint.
    pub endpoints: Vec<String>,
    /// The key prefix the dashboard follows.
    pub prefix: String,
    /// The registry's current revision.
    pub revision: i64,
    /// How many keys the registry holds in all; `None` when the
    /// dashboard's client may not read them all (auth on, not root).
    pub keys: Option<i64>,
    /// How many of them are under the prefix; `None` when the dashboard's
    /// client may not read the prefix as a whole.
    pub prefix_keys: Option<i64>,
    /// The backend database's size in bytes.
    pub db_size: i64,
    /// The part of it in use, in bytes.
    pub db_size_in_use: i64,
    /// The space quota in bytes, when known (see `Dashboard::set_quota`).
    pub quota: Option<u64>,
    /// Active alarms, by type (`NOSPACE`, `CORRUPT`); empty when there are
    /// none or the client may not ask.
    pub alarms: Vec<String>,
    /// The leader's member id (hex); empty without a leader.
    pub leader: String,
    /// The leader's name, when the member list has it.
    pub leader_name: Option<String>,
    /// The answering member's id (hex).
    pub member_id: String,
    /// Whether the answering member is the leader.
    pub is_leader: bool,
    /// The server's version.
    pub version: String,
    /// The raft term.
    pub raft_term: u64,
    /// Alarms and errors the member reports.
    pub errors: Vec<String>,
    /// The revision the dashboard's catalog reflects.
    pub catalog_revision: i64,
    /// How long the catalog may have been missing changes (its watch is
    /// down); `None` while it is live.
    pub catalog_stale_ms: Option<u64>,
    /// Why the catalog is stale.
    pub catalog_error: Option<String>,
    /// Malformed values skipped so far.
    pub malformed: u64,
}

fn count_range(key: Vec<u8>, range_end: Vec<u8>) -> muster_proto::RangeRequest {
    muster_proto::RangeRequest {
        key,
        range_end,
        count_only: true,
        ..Default::default()
    }
}

/// The number of keys in `[key, end)`; `None` when the client may not
/// read them.
async fn count_if_permitted(
    etcd: &muster::Etcd,
    key: Vec<u8>,
    end: Vec<u8>,
) -> Result<Option<i64>, Error> {
    match etcd.range(count_range(key, end)).await {
        Ok(resp) => Ok(Some(resp.count)),
        Err(muster::Error::PermissionDenied { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub(crate) async fn registry_status(dashboard: &Dashboard) -> Result<RegistryStatus, Error> {
    let etcd = &dashboard.inner.etcd;
    let status = etcd.status().await?;
    // Every key: from "\0" to the end of the keyspace ("\0").
    let keys = count_if_permitted(etcd, vec![0], vec![0]).await?;
    let dir = format!("{}/", dashboard.prefix().trim_end_matches('/'));
    let end = muster::instance::prefix_range_end(dir.as_bytes());
    let prefix_keys = count_if_permitted(etcd, dir.into_bytes(), end).await?;
    let leader_name = match etcd.member_list().await {
        Ok(members) => members
            .members
            .iter()
            .find(|m| m.id == status.leader && status.leader != 0)
            .map(|m| m.name.clone())
            .filter(|name| !name.is_empty()),
        Err(e) => {
            tracing::debug!(error = %e, "cannot list members");
            None
        }
    };
    let alarms = match etcd.alarms().await {
        Ok(alarms) => alarms
            .iter()
            .map(|a| {
                muster_proto::AlarmType::try_from(a.alarm).map_or_else(
                    |_| format!("alarm {}", a.alarm),
                    |t| t.as_str_name().to_string(),
                )
            })
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "cannot list alarms");
            Vec::new()
        }
    };
    let header = status.header.unwrap_or_default();
    let health = dashboard.catalog().health();
    Ok(RegistryStatus {
        endpoint: etcd.current_endpoint(),
        endpoints: etcd.endpoints(),
        prefix: dashboard.prefix().to_string(),
        revision: header.revision,
        keys,
        prefix_keys,
        db_size: status.db_size,
        db_size_in_use: status.db_size_in_use,
        quota: dashboard.quota(),
        alarms,
        leader: if status.leader == 0 {
            String::new()
        } else {
            format!("{:x}", status.leader)
        },
        leader_name,
        member_id: format!("{:x}", header.member_id),
        is_leader: status.leader != 0 && status.leader == header.member_id,
        version: status.version,
        raft_term: status.raft_term,
        errors: status.errors,
        catalog_revision: health.revision,
        catalog_stale_ms: health.stale_for.map(duration_millis),
        catalog_error: health.last_error,
        malformed: health.malformed,
    })
}

pub(crate) async fn status(State(dashboard): State<Dashboard>, viewer: Viewer) -> Response {
    match dashboard.status().await {
        Ok(status) => {
            if matches!(viewer, Viewer::Anyone) {
                return no_store(Json(status));
            }
            // Key counts only for a user who may read those keys.
            let whole = dashboard.may_read(&viewer, vec![0], vec![0]).await;
            let dir = format!("{}/", dashboard.prefix().trim_end_matches('/'));
            let end = muster::instance::prefix_range_end(dir.as_bytes());
            let prefix = whole || dashboard.may_read(&viewer, dir.into_bytes(), end).await;
            let mut body = serde_json::to_value(&status).unwrap_or_default();
            if !whole {
                body["keys"] = serde_json::Value::Null;
            }
            if !prefix {
                body["prefix_keys"] = serde_json::Value::Null;
            }
            no_store(Json(body))
        }
        Err(e) => {
            tracing::debug!(error = %e, "registry status unavailable");
            let body = serde_json::json!({ "error": e.to_string() });
            let mut resp = no_store(Json(body));
            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            resp
        }
    }
}

/// API answers are live data: never cached.
fn no_store(body: impl IntoResponse) -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}
