//! Power of two choices on requests in flight.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Balancer, Choice, InFlightCounter};
use crate::Instance;

/// Picks two distinct instances at random and takes the one with fewer
/// requests in flight (ties go to the first candidate, itself random).
///
/// The pick counts the request as in flight; the count drops when the
/// [`InFlight`](super::InFlight) guard in the returned choice (held by
/// [`Picked`](super::Picked)) is dropped. Counters belong to instances, not
/// to a build, so they survive rebuilds for instances that stay: requests
/// started before a change are still counted after it. Weights are ignored.
///
/// This is the "power of two choices" of Mitzenmacher, as used by Finagle,
/// Linkerd and `tower::balance::p2c`: nearly as good as least-loaded and
/// O(1), without the herding onto one instance that strict least-loaded
/// shows when many clients see the same counts.
#[derive(Debug)]
pub struct PowerOfTwo {
    counters: Box<[Arc<InFlightCounter>]>,
    instances: Box<[Arc<Instance>]>,
}

impl PowerOfTwo {
    /// The requests in flight to each instance, in build order.
    pub fn in_flight(&self) -> Vec<usize> {
        self.counters.iter().map(|c| c.get()).collect()
    }
}

impl Balancer for PowerOfTwo {
    fn build(instances: &[Arc<Instance>], previous: Option<&Self>) -> Self {
        let carried: HashMap<(&str, &str), &Arc<InFlightCounter>> = previous
            .map(|p| {
                p.instances
                    .iter()
                    .zip(p.counters.iter())
                    .map(|(i, c)| ((i.service.as_str(), i.id.as_str()), c))
                    .collect()
            })
            .unwrap_or_default();
        let counters = instances
            .iter()
            .map(|i| {
                carried
                    .get(&(i.service.as_str(), i.id.as_str()))
                    .map_or_else(|| Arc::new(InFlightCounter::new()), |c| Arc::clone(c))
            })
            .collect();
        PowerOfTwo {
            counters,
            instances: instances.into(),
        }
    }

    #[inline]
    fn pick(&self, _key: Option<&[u8]>) -> Option<Choice> {
        let n = self.counters.len();
        let index = match n {
            0 => return None,
            1 => 0,
            _ => {
                let a = fastrand::usize(..n);
                let mut b = fastrand::usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                if self.counters[b].get() < self.counters[a].get() {
                    b
                } else {
                    a
                }
            }
        };
        Some(Choice::tracked(index, self.counters[index].track()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_util::instances;

    #[test]
    fn prefers_the_less_loaded() {
        let set = instances(2);
        let p = PowerOfTwo::build(&set, None);
        // Load instance 0 with three requests.
        let held: Vec<_> = (0..3).map(|_| p.counters[0].track()).collect();
        // With two instances both are always candidates: every pick goes to
        // instance 1 until it has as many in flight.
        let mut to_one = Vec::new();
        for _ in 0..3 {
            let c = p.pick(None).unwrap();
            assert_eq!(c.index, 1);
            to_one.push(c);
        }
        assert_eq!(p.in_flight(), vec![3, 3]);
        drop(held);
        assert_eq!(p.in_flight(), vec![0, 3]);
        assert_eq!(p.pick(None).unwrap().index, 0);
    }

    #[test]
    fn guards_decrement_on_drop() {
        let set = instances(3);
        let p = PowerOfTwo::build(&set, None);
        let picks: Vec<_> = (0..10).map(|_| p.pick(None).unwrap()).collect();
        assert_eq!(p.in_flight().iter().sum::<usize>(), 10);
        // Least-loaded of two among three: never more than 1 apart here.
        let f = p.in_flight();
        assert!(
            f.iter().max().unwrap() - f.iter().min().unwrap() <= 2,
            "{f:?}"
        );
        drop(picks);
        assert_eq!(p.in_flight(), vec![0, 0, 0]);
    }

    #[test]
    fn single_and_empty() {
        let set = instances(1);
        let p = PowerOfTwo::build(&set, None);
        let c = p.pick(None).unwrap();
        assert_eq!(c.index, 0);
        assert_eq!(p.in_flight(), vec![1]);
        assert!(PowerOfTwo::build(&[], None).pick(None).is_none());
    }

    #[test]
    fn rebuild_keeps_counts_of_instances_that_stay() {
        let set = instances(3);
        let a = PowerOfTwo::build(&set, None);
        let g0 = a.counters[0].track();
        let g2 = a.counters[2].track();
        let _g2b = a.counters[2].track();
        // Instance 1 leaves, a new one arrives, order changes.
        let new = Arc::new(Instance::new("svc", "i-9", "10.0.0.9:80"));
        let next = vec![Arc::clone(&set[2]), new, Arc::clone(&set[0])];
        let b = PowerOfTwo::build(&next, Some(&a));
        assert_eq!(b.in_flight(), vec![2, 0, 1]);
        // Guards from before the rebuild decrement the carried counters.
        drop(g0);
        drop(g2);
        assert_eq!(b.in_flight(), vec![1, 0, 0]);
    }
}
