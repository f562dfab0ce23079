//! The current instance set and its selector, swapped atomically.

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

use super::shard::{slot_count, thread_slot};
use super::{Balancer, Filter, InFlight};
use crate::Instance;

/// Picks instances of one service with algorithm `B`.
///
/// Holds the eligible instances and the selector built for them in an
/// [`ArcSwap`]: [`pick`](Self::pick) reads them without a lock, and
/// [`update`](Self::update) replaces them atomically, so picks never wait
/// for discovery and always see a consistent set. Share it with an `Arc`.
///
/// # Scaling across cores
///
/// A [`Picked`] owns a reference to its instance, and incrementing the
/// reference count of one `Arc<Instance>` shared by all threads would move
/// that count's cache line between cores on nearly every pick (measured:
/// it makes picks on two cores no faster than on one). So each instance is
/// held once per per-thread slot (a small `Arc` pointing at the shared
/// `Arc<Instance>`, one set per slot, see `shard.rs`), and a pick only
/// touches the calling thread's copy. The cost is one 32-byte allocation
/// per instance per slot (twice the CPU count, at most 64), made on update.
pub struct LoadBalancer<B: Balancer> {
    filter: Filter,
    current: ArcSwap<Snapshot<B>>,
    /// Serializes updates, so each build sees the selector it replaces.
    updating: Mutex<()>,
}

struct Snapshot<B> {
    /// Eligible instances, sorted by service and id.
    instances: Vec<Arc<Instance>>,
    /// One handle per instance per slot, slot-major: `[slot * len + index]`.
    handles: Box<[Arc<Handle>]>,
    balancer: B,
}

impl<B: Balancer> Snapshot<B> {
    fn new(instances: Vec<Arc<Instance>>, balancer: B) -> Self {
        // Allocated slot by slot, so one slot's handles share cache lines
        // only with each other.
        let handles = (0..slot_count())
            .flat_map(|_| instances.iter().map(|i| Arc::new(Handle(Arc::clone(i)))))
            .collect();
        Snapshot {
            instances,
            handles,
            balancer,
        }
    }
}

/// A per-slot reference to an instance; see "Scaling across cores".
#[derive(Debug)]
struct Handle(Arc<Instance>);

impl<B: Balancer> LoadBalancer<B> {
    /// A balancer admitting every serving instance, with no instances yet.
    pub fn new() -> Self {
        Self::with_filter(Filter::new())
    }

    /// A balancer admitting the instances `filter` selects, with no
    /// instances yet.
    pub fn with_filter(filter: Filter) -> Self {
        LoadBalancer {
            filter,
            current: ArcSwap::from_pointee(Snapshot::new(Vec::new(), B::build(&[], None))),
            updating: Mutex::new(()),
        }
    }

    /// The filter deciding eligibility.
    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// Replaces the instance set with the eligible ones among `all` (every
    /// instance of the service, draining ones included: they are filtered
    /// out here).
    ///
    /// Called by discovery on every change of the service. The selector is
    /// rebuilt from the previous one, so per-instance state (in-flight
    /// counts, cursor positions) carries over; if the eligible set is
    /// unchanged nothing is rebuilt. Instances are ordered by service and
    /// id, so the order of `all` does not matter.
    pub fn update(&self, all: &[Arc<Instance>]) {
        let mut eligible = self.filter.select(all);
        eligible.sort_by(|a, b| (&a.service, &a.id).cmp(&(&b.service, &b.id)));
        let _serial = self.updating.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.current.load();
        let unchanged = current.instances.len() == eligible.len()
            && current
                .instances
                .iter()
                .zip(&eligible)
                .all(|(a, b)| Arc::ptr_eq(a, b) || a == b);
        if unchanged {
            return;
        }
        let balancer = B::build(&eligible, Some(&current.balancer));
        self.current
            .store(Arc::new(Snapshot::new(eligible, balancer)));
    }

    /// Picks an instance, or `None` when none is eligible.
    ///
    /// For [`ConsistentHash`](super::ConsistentHash) this is a random pick;
    /// use [`pick_key`](Self::pick_key).
    #[inline]
    pub fn pick(&self) -> Option<Picked> {
        self.pick_with(None)
    }

    /// Picks an instance for a request with `key` (e.g. a user or session
    /// id): with [`ConsistentHash`](super::ConsistentHash) equal keys go to
    /// the same instance; other algorithms ignore the key.
    #[inline]
    pub fn pick_key(&self, key: &[u8]) -> Option<Picked> {
        self.pick_with(Some(key))
    }

    #[inline]
    fn pick_with(&self, key: Option<&[u8]>) -> Option<Picked> {
        let snapshot = self.current.load();
        let choice = snapshot.balancer.pick(key)?;
        let at = thread_slot() * snapshot.instances.len() + choice.index;
        Some(Picked {
            handle: Arc::clone(&snapshot.handles[at]),
            in_flight: choice.in_flight,
        })
    }

    /// The number of eligible instances.
    pub fn len(&self) -> usize {
        self.current.load().instances.len()
    }

    /// Whether no instance is eligible.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The eligible instances, sorted by service and id.
    pub fn instances(&self) -> Vec<Arc<Instance>> {
        self.current.load().instances.clone()
    }

    /// Runs `f` on the current selector (e.g. to inspect
    /// [`PowerOfTwo::in_flight`](super::PowerOfTwo::in_flight)).
    pub fn inspect<R>(&self, f: impl FnOnce(&B) -> R) -> R {
        f(&self.current.load().balancer)
    }
}

impl<B: Balancer> Default for LoadBalancer<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Balancer> fmt::Debug for LoadBalancer<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadBalancer")
            .field("algorithm", &std::any::type_name::<B>())
            .field("filter", &self.filter)
            .field("instances", &self.len())
            .finish()
    }
}

/// A picked instance.
///
/// Dereferences to the [`Instance`]. For load-aware algorithms
/// ([`PowerOfTwo`](super::PowerOfTwo)) the request counts as in flight
/// until this is dropped, so keep it for the duration of the request.
#[derive(Debug)]
#[must_use = "dropping the pick immediately ends the request for in-flight tracking"]
pub struct Picked {
    handle: Arc<Handle>,
    in_flight: Option<InFlight>,
}

impl Picked {
    /// The instance.
    pub fn instance(&self) -> &Arc<Instance> {
        &self.handle.0
    }

    /// Whether the request is counted as in flight.
    pub fn is_tracked(&self) -> bool {
        self.in_flight.is_some()
    }

    /// The instance and the in-flight guard, if any (drop the guard when
    /// the request ends).
    ///
    /// The instance returned is the `Arc` every thread shares: cloning it
    /// writes to a reference count other cores write too (see "Scaling
    /// across cores" on [`LoadBalancer`]). On a hot path, keep the
    /// `Picked` (it dereferences to the instance) and take the guard with
    /// [`into_in_flight`](Self::into_in_flight) when the instance is no
    /// longer needed.
    pub fn into_parts(self) -> (Arc<Instance>, Option<InFlight>) {
        (Arc::clone(&self.handle.0), self.in_flight)
    }

    /// The in-flight guard, if any, without the instance: the request
    /// keeps counting as in flight until the guard is dropped. Touches no
    /// reference count shared with other threads.
    pub fn into_in_flight(self) -> Option<InFlight> {
        self.in_flight
    }
}

impl Deref for Picked {
    type Target = Instance;

    fn deref(&self) -> &Instance {
        &self.handle.0
    }
}

impl AsRef<Instance> for Picked {
    fn as_ref(&self) -> &Instance {
        &self.handle.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Status;
    use crate::balance::test_util::instances;
    use crate::balance::{ConsistentHash, PowerOfTwo, Random, RoundRobin, SmoothWeighted};

    fn draining(i: &Instance) -> Arc<Instance> {
        Arc::new(Instance {
            status: Status::Draining,
            ..i.clone()
        })
    }

    fn empty_set_picks_nothing<B: Balancer>() {
        let lb = LoadBalancer::<B>::new();
        assert!(lb.pick().is_none());
        assert!(lb.pick_key(b"k").is_none());
        assert!(lb.is_empty());
        lb.update(&instances(2));
        assert!(lb.pick().is_some());
        lb.update(&[]);
        assert!(lb.pick().is_none());
        // All draining: nothing eligible.
        let all: Vec<_> = instances(3).iter().map(|i| draining(i)).collect();
        lb.update(&all);
        assert!(lb.pick().is_none());
    }

    #[test]
    fn every_algorithm_handles_empty_sets() {
        empty_set_picks_nothing::<RoundRobin>();
        empty_set_picks_nothing::<Random>();
        empty_set_picks_nothing::<SmoothWeighted>();
        empty_set_picks_nothing::<PowerOfTwo>();
        empty_set_picks_nothing::<ConsistentHash>();
    }

    #[test]
    fn draining_instances_are_excluded() {
        let mut all = instances(3);
        all[1] = draining(&all[1]);
        let lb = LoadBalancer::<RoundRobin>::new();
        lb.update(&all);
        assert_eq!(lb.len(), 2);
        for _ in 0..10 {
            assert_ne!(lb.pick().unwrap().id, "i-1");
        }
    }

    #[test]
    fn filter_and_zone_preference_apply() {
        let all: Vec<_> = instances(4)
            .iter()
            .enumerate()
            .map(|(n, i)| {
                let zone = if n < 2 { "eu-1" } else { "us-1" };
                Arc::new((**i).clone().with_zone(zone))
            })
            .collect();
        let lb = LoadBalancer::<Random>::with_filter(Filter::new().prefer_zone("us-1"));
        lb.update(&all);
        let ids: Vec<_> = lb.instances().iter().map(|i| i.id.clone()).collect();
        assert_eq!(ids, ["i-2", "i-3"]);
        // The preferred zone drains away: fall back to the rest.
        let rest: Vec<_> = all[..2].to_vec();
        lb.update(&rest);
        assert_eq!(lb.len(), 2);
        assert_eq!(lb.pick().unwrap().zone, "eu-1");
    }

    #[test]
    fn order_of_updates_does_not_matter() {
        let lb = LoadBalancer::<ConsistentHash>::new();
        let mut all = instances(5);
        lb.update(&all);
        let a = lb.pick_key(b"session-7").unwrap().id.clone();
        all.reverse();
        lb.update(&all);
        assert_eq!(lb.pick_key(b"session-7").unwrap().id, a);
        assert_eq!(lb.instances()[0].id, "i-0");
    }

    #[test]
    fn picked_holds_the_in_flight_guard() {
        let lb = LoadBalancer::<PowerOfTwo>::new();
        lb.update(&instances(3));
        let p = lb.pick().unwrap();
        assert!(p.is_tracked());
        assert_eq!(lb.inspect(|b| b.in_flight().iter().sum::<usize>()), 1);
        // An update while the request runs keeps counting it.
        lb.update(&instances(4));
        assert_eq!(lb.inspect(|b| b.in_flight().iter().sum::<usize>()), 1);
        drop(p);
        assert_eq!(lb.inspect(|b| b.in_flight().iter().sum::<usize>()), 0);
        // The guard alone keeps counting.
        let guard = lb.pick().unwrap().into_in_flight();
        assert!(guard.is_some());
        assert_eq!(lb.inspect(|b| b.in_flight().iter().sum::<usize>()), 1);
        drop(guard);
        assert_eq!(lb.inspect(|b| b.in_flight().iter().sum::<usize>()), 0);
        let rr = LoadBalancer::<RoundRobin>::new();
        rr.update(&instances(2));
        assert!(rr.pick().unwrap().into_in_flight().is_none());
        assert!(
            !LoadBalancer::<RoundRobin>::new()
                .pick()
                .is_some_and(|p| p.is_tracked())
        );
    }

    #[test]
    fn unchanged_set_is_not_rebuilt() {
        let lb = LoadBalancer::<RoundRobin>::new();
        let all = instances(3);
        lb.update(&all);
        let before = lb.inspect(|b| b as *const RoundRobin);
        lb.update(&all);
        // Equal but freshly allocated instances count as unchanged too.
        let copies: Vec<_> = all.iter().map(|i| Arc::new((**i).clone())).collect();
        lb.update(&copies);
        assert_eq!(lb.inspect(|b| b as *const RoundRobin), before);
    }

    #[test]
    fn round_robin_through_the_load_balancer_is_exact() {
        let lb = LoadBalancer::<RoundRobin>::new();
        lb.update(&instances(10));
        let mut counts = std::collections::HashMap::new();
        for _ in 0..1_000 {
            *counts.entry(lb.pick().unwrap().id.clone()).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 10);
        assert!(counts.values().all(|&c| c == 100), "{counts:?}");
    }

    #[test]
    fn concurrent_picks_and_updates() {
        let lb = LoadBalancer::<PowerOfTwo>::new();
        lb.update(&instances(8));
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..20_000 {
                        let p = lb.pick().expect("never empty");
                        assert!(p.id.starts_with("i-"));
                    }
                });
            }
            s.spawn(|| {
                for n in 0..200 {
                    lb.update(&instances(4 + n % 5));
                }
            });
        });
        assert_eq!(lb.inspect(|b| b.in_flight().iter().sum::<usize>()), 0);
    }
}
