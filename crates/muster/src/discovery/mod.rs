//! Discovery: a local, always-current table of a service's instances.
//!
//! [`Discovery::service`] lists the service's keys at one revision (in pages
//! for large services), then watches from that revision + 1 on the handle's
//! shared watch stream, so no change between list and watch is lost. The
//! table is an immutable [`Snapshot`] behind an `ArcSwap`: reads are
//! lock-free and never touch the network.
//!
//! Failure handling:
//! - after a disconnect the watch resumes from the last revision seen
//!   (progress notifications count), so nothing is missed;
//! - after compaction, or when the registry was wiped, it re-lists and
//!   publishes the difference;
//! - during an outage it keeps serving the last known instances and reports
//!   how stale they are ([`Service::health`]); it never empties a service
//!   unless etcd itself says the instances are gone;
//! - a malformed value is skipped with a warning and counted; the rest of
//!   the service is still served.

mod snapshot;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use muster_proto as pb;
use tokio::sync::{broadcast, watch};

pub use snapshot::{Change, Snapshot, Update};

use crate::balance::{AnyLoadBalancer, Balancer, BalancerKind, Filter, LoadBalancer};
use crate::client::Etcd;
use crate::error::{Error, Result};
use crate::follow::{FollowConfig, FollowTask, Follower, Staleness, follow, list, next_update};
use crate::instance::{self, Instance};
use crate::layout::{LayoutKind, Source};
use crate::metrics::{ApplyStats, ServiceFigures};

/// How discovery behaves.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// Key prefix (default [`instance::DEFAULT_PREFIX`]; may be empty for
    /// layouts that use bare `service/id` keys).
    pub prefix: String,
    /// How the values under `prefix` are spelled (default muster's).
    pub layout: LayoutKind,
    /// More prefixes to follow each service under, each with its layout: a
    /// service's table is the union of its instances in every source (a
    /// mixed fleet). An id found in two sources is kept twice, the later
    /// one as `{id}@{layout}`.
    pub also: Vec<Source>,
    /// Keys per page when listing a service.
    pub page_size: i64,
    /// First retry delay after a failed list; doubles up to `backoff_cap`.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_cap: Duration,
    /// How many change batches a slow subscriber may lag before it gets a
    /// fresh [`Update::Reset`] instead.
    pub subscriber_buffer: usize,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            prefix: instance::DEFAULT_PREFIX.to_string(),
            layout: LayoutKind::Muster,
            also: Vec::new(),
            page_size: 500,
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(5),
            subscriber_buffer: 1024,
        }
    }
}

impl DiscoveryConfig {
    fn follow_config(&self) -> FollowConfig {
        FollowConfig {
            page_size: self.page_size,
            backoff_base: self.backoff_base,
            backoff_cap: self.backoff_cap,
        }
    }

    /// Sets the key prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Follows `source` (layout and prefix) as the primary source.
    pub fn with_source(mut self, source: Source) -> Self {
        self.layout = source.layout;
        self.prefix = source.prefix;
        self
    }

    /// Follows each service in `source` too (see [`DiscoveryConfig::also`]).
    pub fn also(mut self, source: Source) -> Self {
        self.also.push(source);
        self
    }

    /// Every source followed: the primary one first.
    pub fn sources(&self) -> Vec<Source> {
        let mut sources = vec![Source::with_prefix(self.layout, self.prefix.clone())];
        sources.extend(self.also.iter().cloned());
        sources
    }
}

/// Finds services; cheap to clone. One per process is typical: all of its
/// services share the [`Etcd`] handle's single watch stream.
#[derive(Clone, Debug)]
pub struct Discovery {
    inner: Arc<DiscoveryInner>,
}

#[derive(Debug)]
struct DiscoveryInner {
    etcd: Etcd,
    config: DiscoveryConfig,
    services: Mutex<HashMap<String, Weak<Shared>>>,
}

impl Discovery {
    /// Discovery under the default prefix.
    pub fn new(etcd: Etcd) -> Discovery {
        Discovery::with_config(etcd, DiscoveryConfig::default())
            .expect("the default config is valid")
    }

    /// Discovery with a configuration.
    pub fn with_config(etcd: Etcd, config: DiscoveryConfig) -> Result<Discovery> {
        for source in config.sources() {
            source.validate()?;
        }
        if config.page_size <= 0 {
            return Err(Error::invalid("page size", "must be positive"));
        }
        Ok(Discovery {
            inner: Arc::new(DiscoveryInner {
                etcd,
                config,
                services: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The etcd handle.
    pub fn etcd(&self) -> &Etcd {
        &self.inner.etcd
    }

    /// Follows a service: the first call lists it (and fails if the registry
    /// cannot be reached); later calls share the same table.
    pub async fn service(&self, name: &str) -> Result<Service> {
        instance::validate_name("service name", name)?;
        if let Some(shared) = self.existing(name) {
            return Ok(Service { shared });
        }
        let sources = self.inner.config.sources();
        let mut listed = Vec::with_capacity(sources.len());
        for source in &sources {
            let dir = source.service_dir(name);
            listed.push(list(&self.inner.etcd, &dir, self.inner.config.page_size).await?);
        }
        // Someone may have raced us; keep the first.
        let mut services = self.inner.services.lock().expect("services lock");
        if let Some(shared) = services.get(name).and_then(Weak::upgrade) {
            return Ok(Service { shared });
        }
        let (version, _) = watch::channel(0);
        let (changes, _) = broadcast::channel(self.inner.config.subscriber_buffer.max(1));
        let shared = Arc::new_cyclic(|weak: &Weak<Shared>| Shared {
            name: name.to_string(),
            parts: sources
                .iter()
                .enumerate()
                .map(|(index, source)| {
                    Arc::new(Part {
                        shared: weak.clone(),
                        index,
                        source: source.clone(),
                        stale: Staleness::default(),
                    })
                })
                .collect(),
            ids: Mutex::new(vec![BTreeMap::new(); sources.len()]),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            version,
            changes,
            malformed: AtomicU64::new(0),
            apply: ApplyStats::default(),
            tasks: sources.iter().map(|_| FollowTask::default()).collect(),
        });
        for (part, (revision, kvs)) in shared.parts.iter().zip(listed) {
            shared.apply_list(part.index, revision, kvs);
            let task = tokio::spawn(follow(
                Arc::downgrade(part),
                self.inner.etcd.clone(),
                part.source.service_dir(name),
                revision,
                self.inner.config.follow_config(),
            ));
            shared.tasks[part.index].set(task.abort_handle());
        }
        services.insert(name.to_string(), Arc::downgrade(&shared));
        services.retain(|_, w| w.strong_count() > 0);
        Ok(Service { shared })
    }

    /// The Prometheus text of every service followed through this
    /// discovery ([`crate::metrics`]): apply latency and revision lag per
    /// service, and the layouts' malformed counters.
    pub fn render_metrics(&self, out: &mut String) {
        let services: Vec<Arc<Shared>> = {
            let services = self.inner.services.lock().expect("services lock");
            services.values().filter_map(Weak::upgrade).collect()
        };
        let latest = self.inner.etcd.latest_watch_revision();
        let mut figures: Vec<ServiceFigures<'_>> = services
            .iter()
            .map(|s| ServiceFigures {
                service: &s.name,
                apply: &s.apply,
                lag: latest - s.snapshot.load().revision(),
            })
            .collect();
        figures.sort_by(|a, b| a.service.cmp(b.service));
        crate::metrics::render(out, &figures);
    }

    fn existing(&self, name: &str) -> Option<Arc<Shared>> {
        let services = self.inner.services.lock().expect("services lock");
        services.get(name).and_then(Weak::upgrade)
    }
}

/// A followed service. Cheap to clone; the following stops when the last
/// clone is dropped.
#[derive(Clone, Debug)]
pub struct Service {
    shared: Arc<Shared>,
}

/// How current a table (a service's, or the catalog) is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The revision of the table.
    pub revision: i64,
    /// `None` while the watch is live; otherwise how long the table may have
    /// been missing changes.
    pub stale_for: Option<Duration>,
    /// The last error, while stale.
    pub last_error: Option<String>,
    /// How many malformed values were skipped so far.
    pub malformed: u64,
}

impl Health {
    /// Stale when any part is: for the longest, with that part's error.
    pub(crate) fn of_parts<'a>(
        revision: i64,
        parts: impl IntoIterator<Item = &'a Staleness>,
        malformed: &AtomicU64,
    ) -> Health {
        let stale = parts
            .into_iter()
            .filter_map(Staleness::get)
            .max_by_key(|(for_, _)| *for_);
        Health {
            revision,
            stale_for: stale.as_ref().map(|(for_, _)| *for_),
            last_error: stale.map(|(_, e)| e),
            malformed: malformed.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug)]
struct Shared {
    name: String,
    /// One per source followed.
    parts: Vec<Arc<Part>>,
    /// Per part: the ids in its keys, to the ids in the table (the same,
    /// unless another part had it first).
    ids: Mutex<Vec<BTreeMap<String, String>>>,
    snapshot: ArcSwap<Snapshot>,
    version: watch::Sender<u64>,
    changes: broadcast::Sender<Update>,
    malformed: AtomicU64,
    /// Watch response received to snapshot visible.
    apply: ApplyStats,
    tasks: Vec<FollowTask>,
}

/// One source of a service: what its follow task feeds.
#[derive(Debug)]
struct Part {
    shared: Weak<Shared>,
    index: usize,
    source: Source,
    stale: Staleness,
}

impl Service {
    /// The service name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The current table. Lock-free; never waits on the network.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// The current instances (serving and draining).
    pub fn instances(&self) -> Vec<Arc<Instance>> {
        self.shared.snapshot.load().instances().to_vec()
    }

    /// How long changes took from arriving to being visible in the table.
    pub fn apply_stats(&self) -> &ApplyStats {
        &self.shared.apply
    }

    /// How current the table is.
    pub fn health(&self) -> Health {
        Health::of_parts(
            self.shared.snapshot.load().revision(),
            self.shared.parts.iter().map(|p| &p.stale),
            &self.shared.malformed,
        )
    }

    /// A receiver whose value bumps on every published change; wait on it
    /// with `changed()` and read [`Service::snapshot`].
    pub fn version(&self) -> watch::Receiver<u64> {
        self.shared.version.subscribe()
    }

    /// The changes from now on: first [`Update::Reset`] with the current
    /// table, then one [`Update::Changes`] per revision.
    pub fn updates(&self) -> Updates {
        Updates {
            rx: self.shared.changes.subscribe(),
            shared: self.shared.clone(),
            reset_pending: true,
        }
    }

    /// A load balancer over this service's instances, kept current: it is
    /// rebuilt (off the request path) on every change. The service is
    /// followed while the balancer lives.
    pub fn balancer(&self, kind: BalancerKind, filter: Filter) -> Arc<AnyLoadBalancer> {
        let lb = Arc::new(AnyLoadBalancer::new(kind, filter));
        self.keep_updated(&lb, |lb, all| lb.update(all));
        lb
    }

    /// Like [`Service::balancer`] with the algorithm chosen at compile time.
    pub fn balancer_of<B: Balancer>(&self, filter: Filter) -> Arc<LoadBalancer<B>> {
        let lb = Arc::new(LoadBalancer::<B>::with_filter(filter));
        self.keep_updated(&lb, |lb, all| lb.update(all));
        lb
    }

    fn keep_updated<T, F>(&self, target: &Arc<T>, update: F)
    where
        T: Send + Sync + 'static,
        F: Fn(&T, &[Arc<Instance>]) + Send + 'static,
    {
        let mut version = self.version();
        update(target, self.shared.snapshot.load().instances());
        let weak = Arc::downgrade(target);
        let service = self.clone();
        tokio::spawn(async move {
            while version.changed().await.is_ok() {
                let Some(target) = weak.upgrade() else { return };
                update(&target, service.shared.snapshot.load().instances());
            }
        });
    }

    /// Waits until `pred` holds for the table, or `timeout` passes; returns
    /// the snapshot that satisfied it.
    pub async fn wait_for<F>(&self, timeout: Duration, mut pred: F) -> Result<Arc<Snapshot>>
    where
        F: FnMut(&Snapshot) -> bool,
    {
        let mut version = self.version();
        let wait = async {
            loop {
                let snap = self.snapshot();
                if pred(&snap) {
                    return Ok(snap);
                }
                if version.changed().await.is_err() {
                    return Err(Error::Closed("discovery"));
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| Error::Timeout(timeout))?
    }
}

/// A subscriber's stream of [`Update`]s.
#[derive(Debug)]
pub struct Updates {
    rx: broadcast::Receiver<Update>,
    shared: Arc<Shared>,
    reset_pending: bool,
}

impl Updates {
    /// The next update.
    pub async fn next(&mut self) -> Option<Update> {
        let shared = &self.shared;
        next_update(&mut self.rx, &mut self.reset_pending, &shared.name, || {
            Update::Reset(shared.snapshot.load_full())
        })
        .await
    }
}

impl Shared {
    /// The instance at `kv`, if it is one of this service's: `None` for a
    /// key outside the layout or a value it cannot read (logged, counted).
    fn decode(&self, part: usize, key: &[u8], value: &[u8]) -> Option<Instance> {
        let source = &self.parts[part].source;
        match source.decode(key, value) {
            Some(Ok(i)) if i.service == self.name => Some(i),
            Some(Ok(_)) => None,
            Some(Err(e)) => {
                self.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(service = %self.name, layout = %source.layout, error = %e, "skipping a malformed registry entry");
                None
            }
            None => {
                self.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(service = %self.name, key = %String::from_utf8_lossy(key), "skipping a key outside the layout");
                None
            }
        }
    }

    /// The id in the table for `id` of `part`: `id`, unless the table has
    /// it from another part, then `{id}@{layout}`.
    fn table_id(
        &self,
        part: usize,
        id: &str,
        ids: &[BTreeMap<String, String>],
        taken: impl Fn(&str) -> bool,
    ) -> String {
        if let Some(known) = ids[part].get(id) {
            return known.clone();
        }
        if !taken(id) {
            return id.to_string();
        }
        format!("{id}@{}", self.parts[part].source.layout)
    }

    fn apply_list(&self, part: usize, revision: i64, kvs: Vec<pb::KeyValue>) {
        let mut ids = self.ids.lock().expect("ids lock");
        let current = self.snapshot.load_full();
        let mut map = current.to_map();
        for table_id in std::mem::take(&mut ids[part]).into_values() {
            map.remove(&table_id);
        }
        for kv in &kvs {
            let Some(mut i) = self.decode(part, &kv.key, &kv.value) else {
                continue;
            };
            let table_id = self.table_id(part, &i.id, &ids, |id| map.contains_key(id));
            ids[part].insert(i.id.clone(), table_id.clone());
            i.id = table_id.clone();
            map.insert(table_id, Arc::new(i));
        }
        let old = current.to_map();
        let changes = snapshot::diff(&old, &map);
        // One source: the list's revision, even when lower (a registry
        // wiped or restored); several: the latest of theirs.
        let revision = if self.parts.len() == 1 {
            revision
        } else {
            revision.max(current.revision())
        };
        self.publish(
            Snapshot::new(self.name.clone(), revision, map).published(Instant::now()),
            revision,
            changes,
        );
    }

    /// Applies a watch response received at `received`, timing it up to the
    /// moment the new snapshot is stored (observed just before, so that a
    /// caller woken by the new snapshot finds the change timed).
    fn apply_events(&self, part: usize, revision: i64, events: Vec<pb::Event>, received: Instant) {
        let mut ids = self.ids.lock().expect("ids lock");
        let current = self.snapshot.load_full();
        let mut table = current.to_table();
        let mut changes = Vec::new();
        let mut last_rev = current.revision();
        let source = &self.parts[part].source;
        for event in events {
            let Some(kv) = event.kv else { continue };
            last_rev = last_rev.max(kv.mod_revision);
            let Some((_, id)) = source.split_key(&kv.key) else {
                self.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(service = %self.name, key = %String::from_utf8_lossy(&kv.key), "skipping a key outside the layout");
                continue;
            };
            let next = if event.r#type == pb::EventType::Delete as i32 {
                None
            } else {
                self.decode(part, &kv.key, &kv.value)
            };
            let prev = ids[part]
                .remove(id)
                .and_then(|table_id| table.remove(&table_id));
            let next = next.map(|mut i| {
                let table_id = match &prev {
                    Some(old) => old.id.clone(),
                    None => self.table_id(part, id, &ids, |id| table.contains(id)),
                };
                ids[part].insert(id.to_string(), table_id.clone());
                i.id = table_id;
                Arc::new(i)
            });
            match (prev, next) {
                (None, Some(new)) => {
                    table.insert(new.clone());
                    changes.push(Change::Added(new));
                }
                (Some(old), Some(new)) => {
                    table.insert(new.clone());
                    if old != new {
                        changes.push(Change::Updated { old, new });
                    }
                }
                (Some(old), None) => changes.push(Change::Removed(old)),
                (None, None) => {}
            }
        }
        let revision = revision.max(last_rev);
        let snapshot = table.into_snapshot(self.name.clone(), revision);
        let now = Instant::now();
        self.apply.observe(now.saturating_duration_since(received));
        self.publish(snapshot.published(now), last_rev, changes);
    }

    fn progress(&self, revision: i64) {
        let current = self.snapshot.load();
        if revision > current.revision() {
            self.snapshot
                .store(Arc::new(current.with_revision(revision)));
        }
    }

    fn publish(&self, snapshot: Snapshot, revision: i64, changes: Vec<Change>) {
        self.snapshot.store(Arc::new(snapshot));
        if changes.is_empty() {
            return;
        }
        for c in &changes {
            match c {
                Change::Added(i) => {
                    tracing::info!(service = %self.name, id = %i.id, addr = %i.addr, "instance added")
                }
                Change::Removed(i) => {
                    tracing::info!(service = %self.name, id = %i.id, "instance removed")
                }
                Change::Updated { new, .. } => {
                    tracing::info!(service = %self.name, id = %new.id, status = %new.status, "instance updated")
                }
            }
        }
        let _ = self.changes.send(Update::Changes { revision, changes });
        self.version.send_modify(|v| *v += 1);
    }
}

impl Follower for Part {
    fn label(&self) -> String {
        let name = self
            .shared
            .upgrade()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        if self.index == 0 {
            format!("discovery of {name}")
        } else {
            format!("discovery of {name} in {}", self.source)
        }
    }

    async fn apply_list(&self, revision: i64, kvs: Vec<pb::KeyValue>, _: &Etcd) {
        if let Some(shared) = self.shared.upgrade() {
            shared.apply_list(self.index, revision, kvs);
        }
    }

    async fn apply_events(
        &self,
        revision: i64,
        events: Vec<pb::Event>,
        received: Instant,
        _: &Etcd,
    ) {
        self.apply_events_now(revision, events, received);
    }

    const INLINE: bool = true;

    fn apply_events_now(&self, revision: i64, events: Vec<pb::Event>, received: Instant) {
        if let Some(shared) = self.shared.upgrade() {
            shared.apply_events(self.index, revision, events, received);
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
