//! Load balancers: choosing one instance of a service per request.
//!
//! The design follows `pingora-load-balancing`: every selection algorithm is
//! a type implementing [`Balancer`], and a [`LoadBalancer`] holds the current
//! set of eligible instances together with the selector built for it in an
//! [`ArcSwap`](arc_swap::ArcSwap), so picking never takes a lock and never
//! waits for discovery.
//!
//! | algorithm | type | [`BalancerKind`] | pick cost | notes |
//! |---|---|---|---|---|
//! | round-robin | [`RoundRobin`] | `round-robin` | O(1) | per-thread cursors, no shared hot counter |
//! | random | [`Random`] | `random` | O(1) | thread-local generator |
//! | smooth weighted round-robin | [`SmoothWeighted`] | `weighted` | O(1) (O(n) under a lock for very irregular weights) | nginx's algorithm |
//! | power of two choices | [`PowerOfTwo`] | `p2c` | O(1) | least in-flight of two random candidates |
//! | consistent hashing | [`ConsistentHash`] | `hash` | O(log n) | ring with weighted virtual nodes, stable hash |
//!
//! Which instances are eligible is decided by a [`Filter`] (zone, version,
//! tags, zone preference); draining instances are never eligible.
//!
//! Discovery calls [`LoadBalancer::update`] with every instance of the service
//! whenever the service changes; that filters, rebuilds the selector (carrying
//! state such as in-flight counts over for instances that stay) and publishes
//! it atomically. Requests call [`LoadBalancer::pick`] (or
//! [`LoadBalancer::pick_key`] for consistent hashing).
//!
//! ```
//! use std::sync::Arc;
//! use muster::Instance;
//! use muster::balance::{Filter, LoadBalancer, RoundRobin};
//!
//! let lb: LoadBalancer<RoundRobin> = LoadBalancer::with_filter(Filter::new().prefer_zone("eu-1"));
//! lb.update(&[
//!     Arc::new(Instance::new("user", "u-1", "10.0.0.1:80").with_zone("eu-1")),
//!     Arc::new(Instance::new("user", "u-2", "10.0.0.2:80").with_zone("us-1")),
//! ]);
//! let picked = lb.pick().expect("an instance");
//! assert_eq!(picked.addr, "10.0.0.1:80"); // the only one in the preferred zone
//! ```
//!
//! When the algorithm comes from configuration, use [`AnyLoadBalancer`]:
//!
//! ```
//! use muster::balance::{AnyLoadBalancer, BalancerKind, Filter};
//!
//! let kind: BalancerKind = "p2c".parse().unwrap();
//! let lb = AnyLoadBalancer::new(kind, Filter::new());
//! assert!(lb.pick().is_none()); // no instances yet
//! ```

use std::sync::Arc;

use crate::Instance;

mod filter;
mod hash;
mod in_flight;
mod kind;
mod load_balancer;
mod p2c;
mod random;
mod round_robin;
mod shard;
mod weighted;

pub use filter::Filter;
pub use hash::{ConsistentHash, fnv1a_64, stable_hash};
pub use in_flight::{InFlight, InFlightCounter};
pub use kind::{AnyLoadBalancer, BalancerKind};
pub use load_balancer::{LoadBalancer, Picked};
pub use p2c::PowerOfTwo;
pub use random::Random;
pub use round_robin::RoundRobin;
pub use weighted::SmoothWeighted;

/// A selection algorithm.
///
/// A balancer is built for one fixed set of eligible instances and answers
/// picks with an index into that set. When the set changes a new balancer is
/// built, off the hot path, and may take over state from the previous one.
/// [`LoadBalancer`] does the bookkeeping; implement this trait to plug in
/// another algorithm.
pub trait Balancer: Send + Sync + Sized + 'static {
    /// Builds the selector for a new set of eligible instances.
    ///
    /// Called on every change of the set (never on the hot path). `previous`
    /// is the selector being replaced, so stateful algorithms can carry
    /// state (in-flight counts, cursor positions) over for instances that
    /// stay. `instances` may be empty.
    fn build(instances: &[Arc<Instance>], previous: Option<&Self>) -> Self;

    /// Picks an instance: an index into the slice given to
    /// [`build`](Balancer::build), or `None` when that slice was empty.
    ///
    /// `key` is the request key for consistent hashing; other algorithms
    /// ignore it.
    fn pick(&self, key: Option<&[u8]>) -> Option<Choice>;
}

/// The result of [`Balancer::pick`]: which instance, and for load-aware
/// algorithms the guard that counts the request as in flight.
#[derive(Debug)]
pub struct Choice {
    /// Index into the instances the balancer was built for.
    pub index: usize,
    /// Counts the request as in flight until dropped (only load-aware
    /// algorithms such as [`PowerOfTwo`] set it).
    pub in_flight: Option<InFlight>,
}

impl Choice {
    /// A choice that tracks nothing.
    #[inline]
    pub fn new(index: usize) -> Self {
        Choice {
            index,
            in_flight: None,
        }
    }

    /// A choice holding an in-flight guard.
    #[inline]
    pub fn tracked(index: usize, in_flight: InFlight) -> Self {
        Choice {
            index,
            in_flight: Some(in_flight),
        }
    }
}

/// The weight a balancer uses for `instance`: its weight clamped to
/// 1..=[`MAX_WEIGHT`](crate::instance::MAX_WEIGHT), so an unvalidated zero
/// or oversized weight cannot starve or swamp the others.
#[inline]
pub(crate) fn effective_weight(instance: &Instance) -> u32 {
    instance.weight.clamp(1, crate::instance::MAX_WEIGHT)
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::sync::Arc;

    use crate::Instance;

    /// `n` serving instances `i-0`..`i-{n-1}` of service `svc`.
    pub fn instances(n: usize) -> Vec<Arc<Instance>> {
        (0..n)
            .map(|i| {
                Arc::new(Instance::new(
                    "svc",
                    format!("i-{i}"),
                    format!("10.0.0.{i}:80"),
                ))
            })
            .collect()
    }

    /// Instances `a`, `b`, ... with the given weights.
    pub fn weighted(weights: &[u32]) -> Vec<Arc<Instance>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let id = char::from(b'a' + i as u8).to_string();
                Arc::new(Instance::new("svc", id.clone(), format!("{id}:80")).with_weight(w))
            })
            .collect()
    }
}
