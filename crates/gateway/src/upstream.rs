//! The services behind the routes: following them through discovery,
//! keeping per-instance state, and feeding the routes' load balancers the
//! instances that are not ejected.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use muster::balance::{AnyLoadBalancer, BalancerKind, Filter};
use muster::{Discovery, Instance, Service};
use tokio::sync::{Notify, watch};

use crate::config::HealthConfig;
use crate::health::{InstanceState, Verdict};
use crate::lane;
use crate::metrics::{Metrics, ServiceReport};

/// Every service the routes point at, shared by routes of the same service.
#[derive(Debug)]
pub(crate) struct Upstreams {
    discovery: Discovery,
    health: HealthConfig,
    metrics: Arc<Metrics>,
    /// Serving threads (see `crate::lane`).
    lanes: usize,
    services: Mutex<HashMap<String, Weak<ServiceState>>>,
}

impl Upstreams {
    /// The discovery the services are followed through.
    pub(crate) fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    /// Services for `lanes` serving threads.
    pub(crate) fn new(
        discovery: Discovery,
        health: HealthConfig,
        metrics: Arc<Metrics>,
        lanes: usize,
    ) -> Self {
        Upstreams {
            discovery,
            health,
            metrics,
            lanes: lanes.max(1),
            services: Mutex::new(HashMap::new()),
        }
    }

    /// How many lanes (serving threads) the services keep state for.
    pub(crate) fn lanes(&self) -> usize {
        self.lanes
    }

    /// The state of `name`, followed from now on (while some route uses it).
    pub(crate) fn service(&self, name: &str) -> Arc<ServiceState> {
        let mut services = self.services.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = services.get(name).and_then(Weak::upgrade) {
            return s;
        }
        let (resolved, _) = watch::channel(false);
        let state = Arc::new(ServiceState {
            name: name.to_string(),
            health: self.health.clone(),
            metrics: self.metrics.clone(),
            service: OnceLock::new(),
            resolved,
            last_error: Mutex::new(None),
            instances: ArcSwap::default(),
            lanes: (0..self.lanes).map(|_| ArcSwap::default()).collect(),
            balancers: Mutex::new(Vec::new()),
            wake: Arc::new(Notify::new()),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(follow(
            Arc::downgrade(&state),
            state.wake.clone(),
            self.discovery.clone(),
        ));
        *state.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(task.abort_handle());
        services.retain(|_, w| w.strong_count() > 0);
        services.insert(name.to_string(), Arc::downgrade(&state));
        state
    }

    /// Facts about every followed service, for the metrics.
    pub(crate) fn reports(&self) -> Vec<ServiceReport> {
        let services: Vec<Arc<ServiceState>> = self
            .services
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        let mut reports: Vec<ServiceReport> = services.iter().map(|s| s.report()).collect();
        reports.sort_by(|a, b| a.name.cmp(&b.name));
        reports
    }
}

/// One followed service.
#[derive(Debug)]
pub(crate) struct ServiceState {
    pub(crate) name: String,
    health: HealthConfig,
    metrics: Arc<Metrics>,
    /// The discovery handle once the first listing succeeded.
    service: OnceLock<Service>,
    /// Turns true once `service` is set and the balancers have its
    /// instances.
    resolved: watch::Sender<bool>,
    last_error: Mutex<Option<String>>,
    /// Per-instance state by id.
    instances: ArcSwap<HashMap<String, Arc<InstanceState>>>,
    /// Each lane's handles on `instances` (see [`LaneInstance`]).
    lanes: Box<[ArcSwap<LaneMap>]>,
    /// The load balancers of the routes to this service.
    balancers: Mutex<Vec<Weak<AnyLoadBalancer>>>,
    /// Wakes the follower to recompute when the next ejection ends.
    wake: Arc<Notify>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for ServiceState {
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

impl ServiceState {
    /// A load balancer for a route, kept fed with the eligible instances.
    pub(crate) fn balancer(&self, kind: BalancerKind, filter: Filter) -> Arc<AnyLoadBalancer> {
        let lb = Arc::new(AnyLoadBalancer::new(kind, filter));
        {
            let mut all = self
                .balancers
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            all.retain(|w| w.strong_count() > 0);
            all.push(Arc::downgrade(&lb));
        }
        if let Some(eligible) = self.eligible() {
            lb.update(&eligible);
        }
        lb
    }

    /// Whether discovery has listed the service yet.
    pub(crate) fn is_resolved(&self) -> bool {
        *self.resolved.borrow()
    }

    /// Waits up to `timeout` for the first listing.
    pub(crate) async fn wait_resolved(&self, timeout: Duration) -> bool {
        let mut rx = self.resolved.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The last discovery error, while unresolved.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The calling thread's handle on the state of instance `instance`
    /// (created if new).
    #[inline]
    pub(crate) fn instance(&self, instance: &Instance) -> Arc<LaneInstance> {
        let lane = &self.lanes[lane::current(self.lanes.len())];
        if let Some(s) = lane.load().get(&instance.id)
            && s.0.addr == instance.addr
        {
            return s.clone();
        }
        self.lane_instance_slow(lane, instance)
    }

    /// A lane's handle the lane map does not have yet: made, and kept.
    #[cold]
    fn lane_instance_slow(
        &self,
        lane: &ArcSwap<LaneMap>,
        instance: &Instance,
    ) -> Arc<LaneInstance> {
        let shared = self.shared_instance(instance);
        let fresh = Arc::new(LaneInstance(shared));
        lane.rcu(|map| {
            let mut map = HashMap::clone(map);
            match map.get(&instance.id) {
                Some(s) if Arc::ptr_eq(&s.0, &fresh.0) => {}
                _ => {
                    map.insert(instance.id.clone(), fresh.clone());
                }
            }
            map
        });
        // A handle on the same shared state as the map's, whichever of the
        // two allocations it is.
        fresh
    }

    /// The state of instance `instance` (created if new).
    fn shared_instance(&self, instance: &Instance) -> Arc<InstanceState> {
        if let Some(s) = self.instances.load().get(&instance.id)
            && s.addr == instance.addr
        {
            return s.clone();
        }
        let fresh = Arc::new(InstanceState::new(instance));
        self.instances.rcu(|map| {
            let mut map = HashMap::clone(map);
            match map.get(&instance.id) {
                Some(s) if s.addr == instance.addr => {}
                _ => {
                    map.insert(instance.id.clone(), fresh.clone());
                }
            }
            map
        });
        self.instances
            .load()
            .get(&instance.id)
            .cloned()
            .unwrap_or(fresh)
    }

    /// Records a successful attempt.
    #[inline]
    pub(crate) fn success(&self, state: &InstanceState) {
        state.success();
    }

    /// Records a failed attempt; ejects the instance if it fails too often.
    pub(crate) fn failure(&self, state: &InstanceState) {
        if let Verdict::Ejected(period) = state.failure(&self.health) {
            tracing::warn!(
                service = %self.name,
                instance = %state.id,
                addr = %state.addr,
                ?period,
                "instance keeps failing; ejecting it"
            );
            self.metrics.ejected(&self.name, &state.id);
            self.refresh();
        }
    }

    /// The instances the balancers should use: discovery's table less the
    /// ejected ones (all of them if that leaves no serving instance).
    fn eligible(&self) -> Option<Vec<Arc<Instance>>> {
        let snapshot = self.service.get()?.snapshot();
        let all = snapshot.instances();
        let now = Instant::now();
        let states = self.instances.load();
        let kept: Vec<Arc<Instance>> = all
            .iter()
            .filter(|i| {
                states
                    .get(&i.id)
                    .is_none_or(|s| s.addr != i.addr || s.ejected_until(now).is_none())
            })
            .cloned()
            .collect();
        if kept.iter().any(|i| i.is_serving()) || !all.iter().any(|i| i.is_serving()) {
            Some(kept)
        } else {
            tracing::warn!(service = %self.name, "every instance is ejected; using them all");
            Some(all.to_vec())
        }
    }

    /// Recomputes the eligible set now (after an ejection) and has the
    /// follower schedule the readmission.
    fn refresh(&self) {
        self.update_balancers();
        self.wake.notify_one();
    }

    /// Recomputes the eligible set and hands it to every balancer; drops
    /// the state of instances that left.
    fn update_balancers(&self) {
        let Some(service) = self.service.get() else {
            return;
        };
        let snapshot = service.snapshot();
        // Make sure every instance has its state, and forget departed ones.
        let current = self.instances.load();
        let stale = snapshot
            .instances()
            .iter()
            .any(|i| current.get(&i.id).is_none_or(|s| s.addr != i.addr))
            || current.len() != snapshot.len();
        if stale {
            let mut next = HashMap::with_capacity(snapshot.len());
            for i in snapshot.instances() {
                let s = match current.get(&i.id) {
                    Some(s) if s.addr == i.addr => s.clone(),
                    _ => Arc::new(InstanceState::new(i)),
                };
                next.insert(i.id.clone(), s);
            }
            // Each lane's handles follow: kept for states that stay.
            for lane in &self.lanes {
                let old = lane.load();
                let map: LaneMap = next
                    .iter()
                    .map(|(id, s)| {
                        let handle = match old.get(id) {
                            Some(h) if Arc::ptr_eq(&h.0, s) => h.clone(),
                            _ => Arc::new(LaneInstance(s.clone())),
                        };
                        (id.clone(), handle)
                    })
                    .collect();
                lane.store(Arc::new(map));
            }
            self.instances.store(Arc::new(next));
        }
        let Some(eligible) = self.eligible() else {
            return;
        };
        let balancers: Vec<Arc<AnyLoadBalancer>> = {
            let mut all = self
                .balancers
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            all.retain(|w| w.strong_count() > 0);
            all.iter().filter_map(Weak::upgrade).collect()
        };
        for lb in balancers {
            lb.update(&eligible);
        }
    }

    /// The earliest end of an ejection.
    fn next_readmission(&self) -> Option<Instant> {
        let now = Instant::now();
        self.instances
            .load()
            .values()
            .filter_map(|s| s.ejected_until(now))
            .min()
    }

    fn report(&self) -> ServiceReport {
        let service = self.service.get();
        let health = service.map(Service::health);
        let now = Instant::now();
        let states = self.instances.load();
        let ejected = states
            .values()
            .filter(|s| s.ejected_until(now).is_some())
            .count();
        let eligible = service
            .map_or(0, |s| s.snapshot().serving().count())
            .saturating_sub(ejected);
        let mut instances: Vec<_> = states
            .values()
            .map(|s| (s.id.clone(), s.latency.clone()))
            .collect();
        instances.sort_by(|a, b| a.0.cmp(&b.0));
        ServiceReport {
            name: self.name.clone(),
            stale_secs: health
                .as_ref()
                .and_then(|h| h.stale_for)
                .map(|d| d.as_secs_f64()),
            revision: health.map(|h| h.revision),
            eligible,
            ejected,
            instances,
        }
    }
}

/// One lane's handles on the instances' states, by id.
type LaneMap = HashMap<String, Arc<LaneInstance>, BuildHasherDefault<Fnv>>;

/// FNV-1a, for the lane maps: they are keyed by instance ids (short, and
/// from the registry, not from clients) and looked up on every request,
/// where SipHash cost more than the rest of the lookup.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// One lane's handle on an instance's shared state: an allocation of its
/// own, so that taking it for a request writes to a reference count only
/// this lane's thread writes (see `crate::lane`).
#[derive(Debug)]
pub(crate) struct LaneInstance(Arc<InstanceState>);

impl std::ops::Deref for LaneInstance {
    type Target = InstanceState;

    fn deref(&self) -> &InstanceState {
        &self.0
    }
}

/// Lists the service (retrying with backoff until the registry answers),
/// then keeps the balancers current: on every discovery change, every
/// ejection and every end of an ejection.
async fn follow(state: Weak<ServiceState>, wake: Arc<Notify>, discovery: Discovery) {
    let Some(name) = state.upgrade().map(|s| s.name.clone()) else {
        return;
    };
    let mut delay = Duration::from_millis(100);
    let service = loop {
        match discovery.service(&name).await {
            Ok(service) => break service,
            Err(e) => {
                let Some(s) = state.upgrade() else { return };
                tracing::warn!(service = %name, error = %e, retry_in = ?delay, "cannot discover the service yet");
                *s.last_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
                drop(s);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    };
    let mut version = service.version();
    {
        let Some(s) = state.upgrade() else { return };
        *s.last_error.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let _ = s.service.set(service);
        s.update_balancers();
        s.resolved.send_replace(true);
        tracing::info!(service = %name, instances = s.instances.load().len(), "following the service");
    }
    loop {
        let Some(s) = state.upgrade() else { return };
        let next = s.next_readmission();
        // Do not keep the state alive while waiting.
        let sleep_until = next.map(tokio::time::Instant::from_std);
        drop(s);
        tokio::select! {
            changed = version.changed() => if changed.is_err() { return },
            _ = wake.notified() => {},
            _ = async {
                match sleep_until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {},
        }
        let Some(s) = state.upgrade() else { return };
        s.update_balancers();
    }
}
