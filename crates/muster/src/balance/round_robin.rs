//! Round-robin selection.

use std::sync::Arc;

use super::shard::Cursor;
use super::{Balancer, Choice};
use crate::Instance;

/// Takes the instances in turn.
///
/// Each thread walks the instances in order from its own (initially random)
/// starting point using a per-thread counter, so a thread's picks are
/// exactly even over every `len` picks and threads never contend on one
/// shared counter. Positions are carried over when the set changes, so a
/// rebuild does not send the next request of every thread to the first
/// instance. Weights are ignored (see [`SmoothWeighted`](super::SmoothWeighted)).
#[derive(Debug)]
pub struct RoundRobin {
    len: usize,
    cursor: Cursor,
}

impl Balancer for RoundRobin {
    fn build(instances: &[Arc<Instance>], previous: Option<&Self>) -> Self {
        RoundRobin {
            len: instances.len(),
            cursor: Cursor::new(previous.map(|p| &p.cursor)),
        }
    }

    #[inline]
    fn pick(&self, _key: Option<&[u8]>) -> Option<Choice> {
        if self.len == 0 {
            return None;
        }
        Some(Choice::new(self.cursor.next() % self.len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_util::instances;

    #[test]
    fn exactly_even_and_in_order() {
        let set = instances(7);
        let rr = RoundRobin::build(&set, None);
        let first = rr.pick(None).unwrap().index;
        let mut counts = [0usize; 7];
        counts[first] += 1;
        for k in 1..7 * 100 {
            let i = rr.pick(None).unwrap().index;
            assert_eq!(i, (first + k) % 7, "picks walk the instances in order");
            counts[i] += 1;
        }
        assert_eq!(counts, [100; 7]);
    }

    #[test]
    fn empty_picks_nothing() {
        assert!(RoundRobin::build(&[], None).pick(None).is_none());
    }

    #[test]
    fn rebuild_continues_where_it_was() {
        let set = instances(5);
        let a = RoundRobin::build(&set, None);
        let last = a.pick(None).unwrap().index;
        let b = RoundRobin::build(&set, Some(&a));
        assert_eq!(b.pick(None).unwrap().index, (last + 1) % 5);
    }

    #[test]
    fn even_across_threads() {
        let set = instances(4);
        let rr = RoundRobin::build(&set, None);
        let counts: Vec<[usize; 4]> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let mut c = [0usize; 4];
                        for _ in 0..4000 {
                            c[rr.pick(None).unwrap().index] += 1;
                        }
                        c
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for c in counts {
            assert_eq!(c, [1000; 4], "each thread's picks are exactly even");
        }
    }
}
