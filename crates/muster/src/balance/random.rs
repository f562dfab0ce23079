//! Uniformly random selection.

use std::sync::Arc;

use super::{Balancer, Choice};
use crate::Instance;

/// Picks an instance uniformly at random with `fastrand`'s thread-local
/// generator (no shared state at all). Weights are ignored.
#[derive(Debug)]
pub struct Random {
    len: usize,
}

impl Balancer for Random {
    fn build(instances: &[Arc<Instance>], _previous: Option<&Self>) -> Self {
        Random {
            len: instances.len(),
        }
    }

    #[inline]
    fn pick(&self, _key: Option<&[u8]>) -> Option<Choice> {
        if self.len == 0 {
            return None;
        }
        Some(Choice::new(fastrand::usize(..self.len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_util::instances;

    #[test]
    fn roughly_even() {
        let set = instances(4);
        let r = Random::build(&set, None);
        let mut counts = [0usize; 4];
        for _ in 0..40_000 {
            counts[r.pick(None).unwrap().index] += 1;
        }
        // Expected 10 000 each, standard deviation ~87: 5% is > 5 sigma.
        for c in counts {
            assert!((9_500..=10_500).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn empty_picks_nothing() {
        assert!(Random::build(&[], None).pick(None).is_none());
    }
}
