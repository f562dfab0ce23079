//! The catalog: every service under a prefix, for operators.
//!
//! [`Discovery`](crate::Discovery) follows the services a caller names; the
//! catalog follows the whole prefix, for tools that show everything: the
//! CLI's `ls`, `get` and `watch`, and the dashboard. It lists the prefix at
//! one revision, then watches it from the next revision on the handle's
//! shared watch stream, exactly as discovery does (re-listing after
//! compaction or a reset, serving the last known state during an outage).
//!
//! Besides the instances it keeps what operators ask about: each entry's
//! lease and revisions, and a log of recent events, where a removal is told
//! apart as `deregistered` (the key was deleted while its lease lived on, or
//! the instance was draining first: a graceful exit) or `expired` (the lease
//! is gone: the process stopped renewing it).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use muster_proto as pb;
use tokio::sync::broadcast;

use crate::client::Etcd;
use crate::discovery::Health;
use crate::error::Result;
use crate::follow::{FollowConfig, FollowTask, Follower, Staleness, follow, list, next_update};
use crate::instance::{self, Instance, Status};
use crate::layout::{LayoutKind, Source};
use crate::metrics::{ApplyStats, ServiceFigures};

/// How many events [`Catalog::recent`] keeps.
pub const RECENT_EVENTS: usize = 512;
/// Keys per page when listing.
const PAGE_SIZE: i64 = 1000;
/// How many update batches a subscriber may lag before it gets a reset.
const SUBSCRIBER_BUFFER: usize = 1024;

/// One registered instance as the registry holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The instance.
    pub instance: Arc<Instance>,
    /// The lease the key is attached to; 0 for none.
    pub lease: i64,
    /// The revision that created the key.
    pub create_revision: i64,
    /// The revision of its last change.
    pub mod_revision: i64,
    /// When it was first registered, if its writer said (muster's
    /// registrar does; etcd keeps no timestamps).
    pub registered_at: Option<SystemTime>,
}

/// Every service under the prefix at one revision. Immutable. Each
/// service's instances are shared between snapshots: a change copies the
/// map of the services it touches only.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CatalogSnapshot {
    revision: i64,
    services: BTreeMap<String, Arc<BTreeMap<String, Entry>>>,
}

impl CatalogSnapshot {
    /// The registry revision this snapshot reflects.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Service name to its instances by id, both sorted. A service with no
    /// instance is absent.
    pub fn services(&self) -> &BTreeMap<String, Arc<BTreeMap<String, Entry>>> {
        &self.services
    }

    /// One service's instances by id.
    pub fn service(&self, name: &str) -> Option<&BTreeMap<String, Entry>> {
        self.services.get(name).map(|s| &**s)
    }

    /// How many instances of `name` are serving and draining.
    pub fn counts(&self, name: &str) -> (usize, usize) {
        let Some(instances) = self.services.get(name) else {
            return (0, 0);
        };
        let serving = instances
            .values()
            .filter(|e| e.instance.is_serving())
            .count();
        (serving, instances.len() - serving)
    }

    /// How many instances there are in all.
    pub fn len(&self) -> usize {
        self.services.values().map(|s| s.len()).sum()
    }

    /// Whether there is no instance at all.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    fn get(&self, service: &str, id: &str) -> Option<&Entry> {
        self.services.get(service).and_then(|s| s.get(id))
    }
}

/// What happened to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// It appeared.
    Registered,
    /// Its fields changed (address, weight, metadata...), not its status.
    Updated,
    /// It started draining.
    Draining,
    /// It was draining and serves again.
    Serving,
    /// It was removed on purpose: deleted while its lease lived on, or
    /// removed after draining.
    Deregistered,
    /// Its lease expired (or was revoked without draining first): the
    /// process stopped keeping it alive.
    Expired,
}

impl EventKind {
    /// The lowercase name (`registered`, `draining`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Registered => "registered",
            EventKind::Updated => "updated",
            EventKind::Draining => "draining",
            EventKind::Serving => "serving",
            EventKind::Deregistered => "deregistered",
            EventKind::Expired => "expired",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event of the catalog's log.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogEvent {
    /// What happened.
    pub kind: EventKind,
    /// The service.
    pub service: String,
    /// The instance id.
    pub id: String,
    /// The instance after the change (its last known state, for a removal).
    pub instance: Arc<Instance>,
    /// The registry revision of the change.
    pub revision: i64,
    /// When the catalog saw it (wall clock of this process; etcd keeps no
    /// timestamps). For changes found by a re-list, the time of the re-list.
    pub at: SystemTime,
}

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq)]
pub enum CatalogUpdate {
    /// The full catalog, replacing whatever the subscriber held. Sent first,
    /// and again after the subscriber fell too far behind.
    Reset(Arc<CatalogSnapshot>),
    /// The events of one watch batch (one or more revisions), in order.
    Events(Arc<[CatalogEvent]>),
}

/// Every service under a prefix, kept current. Cheap to clone; following
/// stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Catalog {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// One per source followed.
    parts: Vec<Arc<Part>>,
    /// Held through each apply (which awaits lease lookups), so that the
    /// parts' follow tasks change the snapshot one at a time.
    apply: tokio::sync::Mutex<Parts>,
    snapshot: ArcSwap<CatalogSnapshot>,
    updates: broadcast::Sender<CatalogUpdate>,
    recent: Mutex<VecDeque<CatalogEvent>>,
    malformed: AtomicU64,
    /// Per service: watch response received to catalog visible.
    apply_stats: Mutex<BTreeMap<String, Arc<ApplyStats>>>,
    /// For the newest revision seen (the lag gauge).
    etcd: Etcd,
    tasks: Vec<FollowTask>,
}

/// What each part holds of the snapshot.
#[derive(Debug, Default)]
struct Parts {
    /// Per part: (service, id in its keys) to the id in the snapshot (the
    /// same, unless another part had it first: `{id}@{layout}`).
    ids: Vec<HashMap<(String, String), String>>,
    /// Per part: whether its first list is in (it makes no events).
    listed: Vec<bool>,
}

/// One source of the catalog: what its follow task feeds.
#[derive(Debug)]
struct Part {
    shared: Weak<Shared>,
    index: usize,
    source: Source,
    stale: Staleness,
}

impl Catalog {
    /// Lists every service under `prefix` once (at one revision).
    pub async fn list(etcd: &Etcd, prefix: &str) -> Result<CatalogSnapshot> {
        instance::validate_prefix(prefix)?;
        Catalog::list_source(etcd, &Source::with_prefix(LayoutKind::Muster, prefix)).await
    }

    /// Lists every service in `source` (a prefix and its layout) once.
    pub async fn list_source(etcd: &Etcd, source: &Source) -> Result<CatalogSnapshot> {
        source.validate()?;
        let (revision, kvs) = list(etcd, &source.dir(), PAGE_SIZE).await?;
        let mut malformed = 0;
        let snapshot = build(source, revision, kvs, &mut malformed);
        if malformed > 0 {
            tracing::warn!(malformed, "skipped malformed registry entries");
        }
        Ok(snapshot)
    }

    /// Lists every service in each of `sources` once, as one catalog (see
    /// [`Catalog::follow_sources`]).
    pub async fn list_sources(etcd: &Etcd, sources: Vec<Source>) -> Result<CatalogSnapshot> {
        match sources.as_slice() {
            [one] => Catalog::list_source(etcd, one).await,
            _ => Ok((*Catalog::follow_sources(etcd.clone(), sources)
                .await?
                .snapshot())
            .clone()),
        }
    }

    /// Lists every service under `prefix`, then follows every change. Fails
    /// if the registry cannot be reached for the first list.
    pub async fn follow(etcd: Etcd, prefix: &str) -> Result<Catalog> {
        instance::validate_prefix(prefix)?;
        Catalog::follow_source(etcd, Source::with_prefix(LayoutKind::Muster, prefix)).await
    }

    /// Like [`Catalog::follow`], for any layout: every service in `source`.
    /// With an empty prefix (go-zero's and etcd naming's default) that is
    /// the whole keyspace, of which only the keys of the form
    /// `{service}/{id}` are read.
    pub async fn follow_source(etcd: Etcd, source: Source) -> Result<Catalog> {
        Catalog::follow_sources(etcd, vec![source]).await
    }

    /// Every service in every one of `sources`, as one catalog (a mixed
    /// fleet): a service's instances are the union of its instances in each
    /// source; an id found in two sources is kept twice, the later one as
    /// `{id}@{layout}`.
    pub async fn follow_sources(etcd: Etcd, sources: Vec<Source>) -> Result<Catalog> {
        if sources.is_empty() {
            return Err(crate::error::Error::invalid(
                "catalog",
                "no source to follow",
            ));
        }
        let mut listed = Vec::with_capacity(sources.len());
        for source in &sources {
            source.validate()?;
            listed.push(list(&etcd, &source.dir(), PAGE_SIZE).await?);
        }
        let (updates, _) = broadcast::channel(SUBSCRIBER_BUFFER);
        let n = sources.len();
        let shared = Arc::new_cyclic(|weak: &Weak<Shared>| Shared {
            parts: sources
                .into_iter()
                .enumerate()
                .map(|(index, source)| {
                    Arc::new(Part {
                        shared: weak.clone(),
                        index,
                        source,
                        stale: Staleness::default(),
                    })
                })
                .collect(),
            apply: tokio::sync::Mutex::new(Parts {
                ids: vec![HashMap::new(); n],
                listed: vec![false; n],
            }),
            snapshot: ArcSwap::from_pointee(CatalogSnapshot::default()),
            updates,
            recent: Mutex::new(VecDeque::new()),
            malformed: AtomicU64::new(0),
            apply_stats: Mutex::new(BTreeMap::new()),
            etcd: etcd.clone(),
            tasks: (0..n).map(|_| FollowTask::default()).collect(),
        });
        for (part, (revision, kvs)) in shared.parts.iter().zip(listed) {
            shared.apply_list(part.index, revision, kvs, &etcd).await;
            let task = tokio::spawn(follow(
                Arc::downgrade(part),
                etcd.clone(),
                part.source.dir(),
                revision,
                FollowConfig {
                    page_size: PAGE_SIZE,
                    backoff_base: Duration::from_millis(100),
                    backoff_cap: Duration::from_secs(5),
                },
            ));
            shared.tasks[part.index].set(task.abort_handle());
        }
        Ok(Catalog { shared })
    }

    /// Every source it follows, the first one first.
    pub fn sources(&self) -> Vec<Source> {
        self.shared.parts.iter().map(|p| p.source.clone()).collect()
    }

    /// What it follows: the prefix and its layout.
    pub fn source(&self) -> &Source {
        &self.shared.parts[0].source
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.shared.parts[0].source.prefix
    }

    /// The current catalog. Lock-free; never waits on the network.
    pub fn snapshot(&self) -> Arc<CatalogSnapshot> {
        self.shared.snapshot.load_full()
    }

    /// The changes from now on: first [`CatalogUpdate::Reset`], then the
    /// events as they happen.
    pub fn subscribe(&self) -> CatalogEvents {
        CatalogEvents {
            rx: self.shared.updates.subscribe(),
            shared: self.shared.clone(),
            reset_pending: true,
        }
    }

    /// The most recent events (at most [`RECENT_EVENTS`]), oldest first.
    pub fn recent(&self) -> Vec<CatalogEvent> {
        let recent = self.shared.recent.lock().expect("recent lock");
        recent.iter().cloned().collect()
    }

    /// How long changes of `service` took from arriving to being visible
    /// in the catalog; `None` before its first change.
    pub fn apply_stats(&self, service: &str) -> Option<Arc<ApplyStats>> {
        let stats = self.shared.apply_stats.lock().expect("stats lock");
        stats.get(service).cloned()
    }

    /// The Prometheus text of the catalog's figures ([`crate::metrics`]):
    /// apply latency and revision lag per service, and the layouts'
    /// malformed counters.
    pub fn render_metrics(&self, out: &mut String) {
        let stats: Vec<(String, Arc<ApplyStats>)> = {
            let stats = self.shared.apply_stats.lock().expect("stats lock");
            stats.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let lag = self.shared.etcd.latest_watch_revision() - self.snapshot().revision();
        let figures: Vec<ServiceFigures<'_>> = stats
            .iter()
            .map(|(service, apply)| ServiceFigures {
                service,
                apply,
                lag,
            })
            .collect();
        crate::metrics::render(out, &figures);
    }

    /// How current the catalog is.
    pub fn health(&self) -> Health {
        Health::of_parts(
            self.shared.snapshot.load().revision(),
            self.shared.parts.iter().map(|p| &p.stale),
            &self.shared.malformed,
        )
    }
}

/// A subscriber's stream of [`CatalogUpdate`]s.
#[derive(Debug)]
pub struct CatalogEvents {
    rx: broadcast::Receiver<CatalogUpdate>,
    shared: Arc<Shared>,
    reset_pending: bool,
}

impl CatalogEvents {
    /// The next update; `None` once the catalog stopped.
    pub async fn next(&mut self) -> Option<CatalogUpdate> {
        let shared = &self.shared;
        next_update(&mut self.rx, &mut self.reset_pending, "catalog", || {
            CatalogUpdate::Reset(shared.snapshot.load_full())
        })
        .await
    }
}

/// The remaining time of each lease (`None`: the lease is gone), one
/// `LeaseTimeToLive` per distinct lease. Lease 0 (no lease) is skipped.
pub async fn lease_time_left(
    etcd: &Etcd,
    leases: impl IntoIterator<Item = i64>,
) -> Result<HashMap<i64, Option<Duration>>> {
    let mut out = HashMap::new();
    for lease in leases {
        if lease == 0 || out.contains_key(&lease) {
            continue;
        }
        let resp = etcd.lease_time_to_live(lease, false).await?;
        let left = u64::try_from(resp.ttl).ok().map(Duration::from_secs);
        out.insert(lease, left);
    }
    Ok(out)
}

fn build(
    source: &Source,
    revision: i64,
    kvs: Vec<pb::KeyValue>,
    malformed: &mut u64,
) -> CatalogSnapshot {
    let mut services: BTreeMap<String, BTreeMap<String, Entry>> = BTreeMap::new();
    for kv in kvs {
        match decode(source, &kv) {
            Decoded::Entry(entry) => {
                let service = entry.instance.service.clone();
                let id = entry.instance.id.clone();
                services.entry(service).or_default().insert(id, entry);
            }
            Decoded::Malformed => *malformed += 1,
            Decoded::Outside => {}
        }
    }
    CatalogSnapshot {
        revision,
        services: services
            .into_iter()
            .map(|(name, instances)| (name, Arc::new(instances)))
            .collect(),
    }
}

enum Decoded {
    Entry(Entry),
    /// An entry of the layout's form whose value it cannot read.
    Malformed,
    /// A key not of the layout's form.
    Outside,
}

fn decode(source: &Source, kv: &pb::KeyValue) -> Decoded {
    match source.decode(&kv.key, &kv.value) {
        Some(Ok(instance)) => Decoded::Entry(Entry {
            instance: Arc::new(instance),
            lease: kv.lease,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            registered_at: instance::registered_at(&kv.value),
        }),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "skipping a malformed registry entry");
            Decoded::Malformed
        }
        None if source.prefix.is_empty() => Decoded::Outside,
        None => {
            tracing::warn!(key = %String::from_utf8_lossy(&kv.key), "skipping a key outside the layout");
            Decoded::Malformed
        }
    }
}

/// A removal waiting to be classified.
struct Removal {
    event: usize,
    lease: i64,
}

impl Shared {
    /// The id in the snapshot for `id` of `service` in `part`.
    fn table_id(
        &self,
        part: usize,
        service: &str,
        id: &str,
        parts: &Parts,
        at: &CatalogSnapshot,
    ) -> String {
        if let Some(known) = parts.ids[part].get(&(service.to_string(), id.to_string())) {
            return known.clone();
        }
        if at.get(service, id).is_none() {
            return id.to_string();
        }
        format!("{id}@{}", self.parts[part].source.layout)
    }

    async fn apply_list(&self, part: usize, revision: i64, kvs: Vec<pb::KeyValue>, etcd: &Etcd) {
        let mut parts = self.apply.lock().await;
        let source = &self.parts[part].source;
        let mut malformed = 0;
        let listed = build(source, revision, kvs, &mut malformed);
        self.malformed.fetch_add(malformed, Ordering::Relaxed);
        let old = self.snapshot.load_full();
        // The new catalog: the others' entries as they are, this part's as listed.
        let mut new = (*old).clone();
        for ((service, _), table_id) in std::mem::take(&mut parts.ids[part]) {
            if let Some(instances) = new.services.get_mut(&service) {
                let instances = Arc::make_mut(instances);
                instances.remove(&table_id);
                if instances.is_empty() {
                    new.services.remove(&service);
                }
            }
        }
        for (service, instances) in listed.services {
            for (id, mut entry) in Arc::unwrap_or_clone(instances) {
                let table_id = self.table_id(part, &service, &id, &parts, &new);
                parts.ids[part].insert((service.clone(), id), table_id.clone());
                if entry.instance.id != table_id {
                    let mut i = (*entry.instance).clone();
                    i.id = table_id.clone();
                    entry.instance = Arc::new(i);
                }
                Arc::make_mut(new.services.entry(service.clone()).or_default())
                    .insert(table_id, entry);
            }
        }
        new.revision = if self.parts.len() == 1 {
            revision
        } else {
            revision.max(old.revision)
        };
        let mut events = Vec::new();
        let mut removals = Vec::new();
        let at = SystemTime::now();
        for (service, instances) in new.services() {
            for (id, entry) in instances.iter() {
                let before = old.get(service, id).map(|e| &e.instance);
                if let Some(kind) = put_kind(before, &entry.instance) {
                    events.push(event(kind, entry, entry.mod_revision, at));
                }
            }
        }
        for (service, instances) in old.services() {
            for (id, entry) in instances.iter() {
                if new.get(service, id).is_none() {
                    removals.push(Removal {
                        event: events.len(),
                        lease: entry.lease,
                    });
                    events.push(event(EventKind::Deregistered, entry, revision, at));
                }
            }
        }
        self.classify(etcd, &mut events, removals).await;
        let first = !std::mem::replace(&mut parts.listed[part], true);
        self.publish(new, if first { Vec::new() } else { events });
    }

    async fn apply_events(
        &self,
        part: usize,
        revision: i64,
        batch: Vec<pb::Event>,
        received: Instant,
        etcd: &Etcd,
    ) {
        let mut parts = self.apply.lock().await;
        let source = &self.parts[part].source;
        let current = self.snapshot.load_full();
        let mut next = (*current).clone();
        let mut events = Vec::new();
        let mut removals = Vec::new();
        let at = SystemTime::now();
        let mut last = current.revision();
        for ev in batch {
            let Some(kv) = ev.kv else { continue };
            last = last.max(kv.mod_revision);
            let Some((service, key_id)) = source.parse_key(&kv.key) else {
                if !source.prefix.is_empty() {
                    self.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(key = %String::from_utf8_lossy(&kv.key), "skipping a key outside the layout");
                }
                continue;
            };
            let new = if ev.r#type == pb::EventType::Delete as i32 {
                None
            } else {
                match decode(source, &kv) {
                    Decoded::Entry(entry) => Some(entry),
                    Decoded::Malformed | Decoded::Outside => {
                        self.malformed.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                }
            };
            let known = parts.ids[part].remove(&(service.clone(), key_id.clone()));
            let id = match &known {
                Some(table_id) => table_id.clone(),
                None => self.table_id(part, &service, &key_id, &parts, &next),
            };
            let service_map = Arc::make_mut(next.services.entry(service.clone()).or_default());
            let old = known.and_then(|table_id| service_map.remove(&table_id));
            match (old, new) {
                (old, Some(mut entry)) => {
                    parts.ids[part].insert((service.clone(), key_id), id.clone());
                    if entry.instance.id != id {
                        let mut i = (*entry.instance).clone();
                        i.id = id.clone();
                        entry.instance = Arc::new(i);
                    }
                    if let Some(kind) = put_kind(old.as_ref().map(|e| &e.instance), &entry.instance)
                    {
                        events.push(event(kind, &entry, kv.mod_revision, at));
                    }
                    service_map.insert(id, entry);
                }
                (Some(old), None) => {
                    // Removed after draining: a graceful exit, whatever
                    // happened to the lease. Otherwise the lease tells.
                    if old.instance.status != Status::Draining {
                        removals.push(Removal {
                            event: events.len(),
                            lease: old.lease,
                        });
                    }
                    events.push(event(EventKind::Deregistered, &old, kv.mod_revision, at));
                }
                (None, None) => {}
            }
            if service_map.is_empty() {
                next.services.remove(&service);
            }
        }
        next.revision = revision.max(last);
        self.classify(etcd, &mut events, removals).await;
        let touched: BTreeSet<String> = events.iter().map(|e| e.service.clone()).collect();
        self.publish(next, events);
        let took = received.elapsed();
        let mut stats = self.apply_stats.lock().expect("stats lock");
        for service in touched {
            stats.entry(service).or_default().observe(took);
        }
    }

    /// Tells expired instances from deregistered ones: a removal whose lease
    /// is gone expired (or was revoked without draining first).
    async fn classify(&self, etcd: &Etcd, events: &mut [CatalogEvent], removals: Vec<Removal>) {
        let leases: HashSet<i64> = removals
            .iter()
            .map(|r| r.lease)
            .filter(|l| *l != 0)
            .collect();
        if leases.is_empty() {
            return;
        }
        let left = match tokio::time::timeout(
            etcd.config().request_timeout,
            lease_time_left(etcd, leases),
        )
        .await
        {
            Ok(Ok(left)) => left,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot look up leases; calling removals deregistered");
                return;
            }
            Err(_) => return,
        };
        for removal in removals {
            if let Some(None) = left.get(&removal.lease)
                && let Some(event) = events.get_mut(removal.event)
            {
                event.kind = EventKind::Expired;
            }
        }
    }

    fn progress(&self, revision: i64) {
        let current = self.snapshot.load();
        if revision > current.revision() {
            let mut next = (**current).clone();
            next.revision = revision;
            self.snapshot.store(Arc::new(next));
        }
    }

    fn publish(&self, snapshot: CatalogSnapshot, events: Vec<CatalogEvent>) {
        self.snapshot.store(Arc::new(snapshot));
        if events.is_empty() {
            return;
        }
        {
            let mut recent = self.recent.lock().expect("recent lock");
            for e in &events {
                if recent.len() == RECENT_EVENTS {
                    recent.pop_front();
                }
                recent.push_back(e.clone());
            }
        }
        let _ = self.updates.send(CatalogUpdate::Events(events.into()));
    }
}

/// The event a put makes, or `None` when nothing an operator sees changed
/// (a re-registration under a new lease re-puts the same value).
fn put_kind(before: Option<&Arc<Instance>>, after: &Instance) -> Option<EventKind> {
    let Some(before) = before else {
        return Some(EventKind::Registered);
    };
    if **before == *after {
        return None;
    }
    Some(match (before.status, after.status) {
        (Status::Serving, Status::Draining) => EventKind::Draining,
        (Status::Draining, Status::Serving) => EventKind::Serving,
        _ => EventKind::Updated,
    })
}

fn event(kind: EventKind, entry: &Entry, revision: i64, at: SystemTime) -> CatalogEvent {
    CatalogEvent {
        kind,
        service: entry.instance.service.clone(),
        id: entry.instance.id.clone(),
        instance: entry.instance.clone(),
        revision,
        at,
    }
}

impl Follower for Part {
    fn label(&self) -> String {
        format!("catalog of {}", self.source)
    }

    async fn apply_list(&self, revision: i64, kvs: Vec<pb::KeyValue>, etcd: &Etcd) {
        if let Some(shared) = self.shared.upgrade() {
            shared.apply_list(self.index, revision, kvs, etcd).await;
        }
    }

    async fn apply_events(
        &self,
        revision: i64,
        events: Vec<pb::Event>,
        received: Instant,
        etcd: &Etcd,
    ) {
        if let Some(shared) = self.shared.upgrade() {
            shared
                .apply_events(self.index, revision, events, received, etcd)
                .await;
        }
    }

    fn progress(&self, revision: i64) {
        if let Some(shared) = self.shared.upgrade() {
            shared.progress(revision);
        }
    }

    fn staleness(&self) -> &Staleness {
        &self.stale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_kinds() {
        let a = Arc::new(Instance::new("s", "a", "127.0.0.1:1"));
        assert_eq!(put_kind(None, &a), Some(EventKind::Registered));
        assert_eq!(put_kind(Some(&a), &a), None);
        let draining = Instance {
            status: Status::Draining,
            ..(*a).clone()
        };
        assert_eq!(put_kind(Some(&a), &draining), Some(EventKind::Draining));
        assert_eq!(
            put_kind(Some(&Arc::new(draining)), &a),
            Some(EventKind::Serving)
        );
        assert_eq!(
            put_kind(Some(&a), &a.as_ref().clone().with_weight(7)),
            Some(EventKind::Updated)
        );
        assert_eq!(EventKind::Expired.to_string(), "expired");
    }

    #[test]
    fn prefix_dirs() {
        let dir = |p: &str| Source::with_prefix(LayoutKind::Muster, p).dir();
        assert_eq!(dir("/muster/services"), "/muster/services/");
        assert_eq!(dir("/x/"), "/x/");
        assert_eq!(dir(""), "");
    }
}
