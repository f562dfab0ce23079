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
use std::time::Duration;

use arc_swap::ArcSwap;
use muster_proto as pb;
use tokio::sync::{broadcast, watch};

pub use snapshot::{Change, Snapshot, Update};

use crate::balance::{AnyLoadBalancer, Balancer, BalancerKind, Filter, LoadBalancer};
use crate::client::Etcd;
use crate::error::{Error, Result};
use crate::follow::{FollowConfig, FollowTask, Follower, Staleness, follow, list, next_update};
use crate::instance::{self, Instance};

/// How discovery behaves.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// Key prefix (default [`instance::DEFAULT_PREFIX`]).
    pub prefix: String,
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
        instance::validate_prefix(&config.prefix)?;
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
        let prefix = instance::service_prefix(&self.inner.config.prefix, name);
        let (revision, kvs) = list(&self.inner.etcd, &prefix, self.inner.config.page_size).await?;
        // Someone may have raced us; keep the first.
        let mut services = self.inner.services.lock().expect("services lock");
        if let Some(shared) = services.get(name).and_then(Weak::upgrade) {
            return Ok(Service { shared });
        }
        let (version, _) = watch::channel(0);
        let (changes, _) = broadcast::channel(self.inner.config.subscriber_buffer.max(1));
        let shared = Arc::new(Shared {
            name: name.to_string(),
            prefix: self.inner.config.prefix.clone(),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            version,
            changes,
            stale: Staleness::default(),
            malformed: AtomicU64::new(0),
            task: FollowTask::default(),
        });
        shared.apply_list(revision, kvs);
        let task = tokio::spawn(follow(
            Arc::downgrade(&shared),
            self.inner.etcd.clone(),
            prefix,
            revision,
            self.inner.config.follow_config(),
        ));
        shared.task.set(task.abort_handle());
        services.insert(name.to_string(), Arc::downgrade(&shared));
        services.retain(|_, w| w.strong_count() > 0);
        Ok(Service { shared })
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
    pub(crate) fn new(revision: i64, stale: &Staleness, malformed: &AtomicU64) -> Health {
        let stale = stale.get();
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
    prefix: String,
    snapshot: ArcSwap<Snapshot>,
    version: watch::Sender<u64>,
    changes: broadcast::Sender<Update>,
    stale: Staleness,
    malformed: AtomicU64,
    task: FollowTask,
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

    /// How current the table is.
    pub fn health(&self) -> Health {
        Health::new(
            self.shared.snapshot.load().revision(),
            &self.shared.stale,
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
    fn decode(&self, key: &[u8], value: &[u8]) -> Option<Instance> {
        match Instance::decode(&self.prefix, key, value) {
            Ok(i) if i.service == self.name => Some(i),
            Ok(_) => None,
            Err(e) => {
                self.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(service = %self.name, error = %e, "skipping a malformed registry entry");
                None
            }
        }
    }

    fn apply_list(&self, revision: i64, kvs: Vec<pb::KeyValue>) {
        let new: BTreeMap<String, Arc<Instance>> = kvs
            .iter()
            .filter_map(|kv| self.decode(&kv.key, &kv.value))
            .map(|i| (i.id.clone(), Arc::new(i)))
            .collect();
        let old = self.snapshot.load().to_map();
        let changes = snapshot::diff(&old, &new);
        self.publish(
            Snapshot::new(self.name.clone(), revision, new),
            revision,
            changes,
        );
    }

    fn apply_events(&self, revision: i64, events: Vec<pb::Event>) {
        let current = self.snapshot.load_full();
        let mut map = current.to_map();
        let mut changes = Vec::new();
        let mut last_rev = current.revision();
        for event in events {
            let Some(kv) = event.kv else { continue };
            last_rev = last_rev.max(kv.mod_revision);
            let Some((_, id)) = instance::parse_key(&self.prefix, &kv.key) else {
                self.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(service = %self.name, key = %String::from_utf8_lossy(&kv.key), "skipping a key outside the schema");
                continue;
            };
            let next = if event.r#type == pb::EventType::Delete as i32 {
                None
            } else {
                self.decode(&kv.key, &kv.value).map(Arc::new)
            };
            let prev = map.remove(&id);
            match (prev, next) {
                (None, Some(new)) => {
                    map.insert(id, new.clone());
                    changes.push(Change::Added(new));
                }
                (Some(old), Some(new)) => {
                    map.insert(id, new.clone());
                    if old != new {
                        changes.push(Change::Updated { old, new });
                    }
                }
                (Some(old), None) => changes.push(Change::Removed(old)),
                (None, None) => {}
            }
        }
        let revision = revision.max(last_rev);
        self.publish(
            Snapshot::new(self.name.clone(), revision, map),
            last_rev,
            changes,
        );
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

impl Follower for Shared {
    fn label(&self) -> String {
        format!("discovery of {}", self.name)
    }

    async fn apply_list(&self, revision: i64, kvs: Vec<pb::KeyValue>, _: &Etcd) {
        Shared::apply_list(self, revision, kvs);
    }

    async fn apply_events(&self, revision: i64, events: Vec<pb::Event>, _: &Etcd) {
        Shared::apply_events(self, revision, events);
    }

    fn progress(&self, revision: i64) {
        Shared::progress(self, revision);
    }

    fn staleness(&self) -> &Staleness {
        &self.stale
    }
}
