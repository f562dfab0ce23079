//! nginx's smooth weighted round-robin.

use std::sync::{Arc, Mutex, PoisonError};

use super::shard::Cursor;
use super::{Balancer, Choice, effective_weight};
use crate::Instance;

/// The longest precomputed sequence (4 bytes an entry: 256 KiB).
const MAX_TABLE_LEN: u64 = 1 << 16;
/// The most work (sequence length x instances) spent precomputing a sequence
/// on a rebuild; a few milliseconds.
const MAX_TABLE_WORK: u64 = 1 << 24;

/// Smooth weighted round-robin, exactly as nginx does it.
///
/// Every pick adds each instance's weight to its running score, takes the
/// instance with the highest score (the first on a tie) and subtracts the
/// total weight from that score. Over every `sum(weights)` picks each
/// instance is chosen exactly `weight` times, spread out as evenly as
/// possible: weights 5, 1, 1 give `a a b a c a a`, not `a a a a a b c`.
/// Instances are weighted by [`Instance::weight`] (clamped to
/// 1..=[`MAX_WEIGHT`](crate::instance::MAX_WEIGHT)).
///
/// # Without a lock
///
/// The sequence is a pure function of the weights and repeats with period
/// `sum(weights / gcd(weights))` (scaling all weights by the same factor
/// does not change it). When that period is short enough (at most 65 536
/// picks and 2^24 steps of work to compute: always the case when weights are
/// equal or multiples of a common step, e.g. the default 100 with a canary at
/// 10) the whole period is precomputed on build and a pick is one lookup
/// at a per-thread position, like [`RoundRobin`](super::RoundRobin): lock-free
/// and contention-free. Each thread then walks the exact nginx sequence from
/// its own (random, to avoid herding after rebuilds) starting point, so each
/// thread's picks are exact over every period, and the process's picks are
/// exact up to one period per thread.
///
/// Otherwise (many instances with unrelated weights, e.g. 997 and 1000)
/// picks run nginx's O(n) step under a [`Mutex`] held only for that loop,
/// which is exact for the whole process. The `pick` benchmark measures both
/// paths; [`is_lock_free`](Self::is_lock_free) tells which one a build uses.
#[derive(Debug)]
pub struct SmoothWeighted {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Empty,
    Table {
        sequence: Box<[u32]>,
        cursor: Cursor,
    },
    Locked(Locked),
}

#[derive(Debug)]
struct Locked {
    weights: Box<[i64]>,
    total: i64,
    instances: Box<[Arc<Instance>]>,
    current: Mutex<Box<[i64]>>,
}

impl SmoothWeighted {
    /// Whether picks run without a lock (the sequence is precomputed); see
    /// the type docs.
    pub fn is_lock_free(&self) -> bool {
        !matches!(self.inner, Inner::Locked(_))
    }
}

impl Balancer for SmoothWeighted {
    fn build(instances: &[Arc<Instance>], previous: Option<&Self>) -> Self {
        if instances.is_empty() {
            return SmoothWeighted {
                inner: Inner::Empty,
            };
        }
        let mut weights: Vec<u64> = instances
            .iter()
            .map(|i| u64::from(effective_weight(i)))
            .collect();
        let g = weights.iter().copied().fold(0, gcd);
        weights.iter_mut().for_each(|w| *w /= g);
        let period: u64 = weights.iter().sum();
        let n = weights.len() as u64;
        let inner = if period <= MAX_TABLE_LEN && period.saturating_mul(n) <= MAX_TABLE_WORK {
            let previous = match previous.map(|p| &p.inner) {
                Some(Inner::Table { cursor, .. }) => Some(cursor),
                _ => None,
            };
            Inner::Table {
                sequence: smooth_sequence(&weights).into(),
                cursor: Cursor::new(previous),
            }
        } else {
            let weights: Box<[i64]> = weights.iter().map(|&w| w as i64).collect();
            // Carry the scores over only for the same instances with the
            // same weights; anything else restarts the sequence, as nginx
            // does on a reload.
            let current = match previous.map(|p| &p.inner) {
                Some(Inner::Locked(p))
                    if p.weights == weights
                        && p.instances.len() == instances.len()
                        && p.instances
                            .iter()
                            .zip(instances)
                            .all(|(a, b)| a.service == b.service && a.id == b.id) =>
                {
                    p.current
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone()
                }
                _ => vec![0; instances.len()].into(),
            };
            Inner::Locked(Locked {
                total: weights.iter().sum(),
                weights,
                instances: instances.into(),
                current: Mutex::new(current),
            })
        };
        SmoothWeighted { inner }
    }

    #[inline]
    fn pick(&self, _key: Option<&[u8]>) -> Option<Choice> {
        match &self.inner {
            Inner::Empty => None,
            Inner::Table { sequence, cursor } => Some(Choice::new(
                sequence[cursor.next() % sequence.len()] as usize,
            )),
            Inner::Locked(l) => {
                let mut current = l.current.lock().unwrap_or_else(PoisonError::into_inner);
                Some(Choice::new(step(&mut current, &l.weights, l.total)))
            }
        }
    }
}

/// One step of nginx's algorithm; returns the chosen index.
#[inline]
fn step(current: &mut [i64], weights: &[i64], total: i64) -> usize {
    let mut best = 0;
    let mut best_score = i64::MIN;
    for (i, (c, &w)) in current.iter_mut().zip(weights).enumerate() {
        *c += w;
        if *c > best_score {
            best = i;
            best_score = *c;
        }
    }
    current[best] -= total;
    best
}

/// The full period of the smooth weighted sequence for `weights` (already
/// divided by their gcd), starting from all-zero scores.
fn smooth_sequence(weights: &[u64]) -> Vec<u32> {
    let weights: Vec<i64> = weights.iter().map(|&w| w as i64).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0; weights.len()];
    let sequence: Vec<u32> = (0..total)
        .map(|_| step(&mut current, &weights, total) as u32)
        .collect();
    // Each instance chosen exactly `weight` times brings every score back to
    // zero, so the sequence repeats.
    debug_assert!(current.iter().all(|&c| c == 0), "{current:?}");
    sequence
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_util::weighted;

    fn picks(b: &SmoothWeighted, n: usize) -> Vec<usize> {
        (0..n).map(|_| b.pick(None).unwrap().index).collect()
    }

    fn is_rotation(got: &[usize], of: &[usize]) -> bool {
        (0..of.len()).any(|r| {
            got.iter()
                .enumerate()
                .all(|(k, &x)| x == of[(r + k) % of.len()])
        })
    }

    #[test]
    fn nginx_sequence() {
        assert_eq!(smooth_sequence(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]); // a a b a c a a
        assert_eq!(smooth_sequence(&[1, 1, 1]), [0, 1, 2]);
        assert_eq!(smooth_sequence(&[2, 1]), [0, 1, 0]);
    }

    #[test]
    fn picks_follow_the_nginx_sequence() {
        let set = weighted(&[500, 100, 100]); // same sequence as 5, 1, 1
        let b = SmoothWeighted::build(&set, None);
        assert!(b.is_lock_free());
        let seq = [0, 0, 1, 0, 2, 0, 0];
        let got = picks(&b, 70);
        // A random starting point, then the nginx sequence over and over.
        assert!(is_rotation(&got[..7], &seq), "{got:?}");
        assert!(got.chunks(7).all(|c| c == &got[..7]), "{got:?}");
    }

    #[test]
    fn exact_counts_and_smooth() {
        for weights in [&[3u32, 2, 1][..], &[100, 10], &[7, 13, 29, 1], &[1; 5]] {
            let set = weighted(weights);
            let b = SmoothWeighted::build(&set, None);
            let total: u32 = weights.iter().sum();
            let got = picks(&b, total as usize * 3);
            for window in got.chunks(total as usize) {
                let mut counts = vec![0u32; weights.len()];
                window.iter().for_each(|&i| counts[i] += 1);
                assert_eq!(counts, weights, "{weights:?}");
            }
            // Smooth: no instance of weight w gets more than
            // ceil(w * k / total) + 1 of any k consecutive picks.
            for k in 1..=total as usize {
                for window in got.windows(k) {
                    for (i, &w) in weights.iter().enumerate() {
                        let c = window.iter().filter(|&&x| x == i).count() as u32;
                        assert!(
                            c <= (w * k as u32).div_ceil(total) + 1,
                            "{weights:?} {window:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn locked_path_is_the_same_algorithm() {
        // Unrelated weights over many instances exceed the table budget.
        let weights: Vec<u32> = (0..300).map(|i| 5_000 + i * 7 + 1).collect();
        let set = weighted_many(&weights);
        let b = SmoothWeighted::build(&set, None);
        assert!(!b.is_lock_free());
        let w64: Vec<i64> = weights.iter().map(|&w| i64::from(w)).collect();
        let total = w64.iter().sum();
        let mut current = vec![0; w64.len()];
        for _ in 0..5_000 {
            assert_eq!(b.pick(None).unwrap().index, step(&mut current, &w64, total));
        }
        // A rebuild for the same instances continues the sequence.
        let b2 = SmoothWeighted::build(&set, Some(&b));
        for _ in 0..100 {
            assert_eq!(
                b2.pick(None).unwrap().index,
                step(&mut current, &w64, total)
            );
        }
    }

    #[test]
    fn exact_over_a_period_with_the_lock() {
        // Coprime weights: the period (69 905) is longer than the table.
        let set = weighted_many(&[
            7, 10_000, 9_999, 1, 3, 9_973, 9_000, 8_000, 7_919, 10_000, 5_003,
        ]);
        let b = SmoothWeighted::build(&set, None);
        assert!(!b.is_lock_free());
        let total: u64 = set.iter().map(|i| u64::from(i.weight)).sum();
        let mut counts = vec![0u64; set.len()];
        for _ in 0..total {
            counts[b.pick(None).unwrap().index] += 1;
        }
        for (c, i) in counts.iter().zip(&set) {
            assert_eq!(*c, u64::from(i.weight));
        }
    }

    #[test]
    fn rebuild_keeps_position() {
        let set = weighted(&[3, 2, 1]);
        let a = SmoothWeighted::build(&set, None);
        let before = picks(&a, 6);
        let b = SmoothWeighted::build(&set, Some(&a));
        let after = picks(&b, 6);
        assert_eq!(before, after, "the rebuilt balancer continues the period");
    }

    #[test]
    fn zero_weight_counts_as_one_and_empty_is_none() {
        let set = weighted(&[0, 1]);
        let b = SmoothWeighted::build(&set, None);
        let mut got = picks(&b, 2);
        got.sort_unstable();
        assert_eq!(got, [0, 1]);
        assert!(SmoothWeighted::build(&[], None).pick(None).is_none());
    }

    fn weighted_many(weights: &[u32]) -> Vec<Arc<Instance>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Arc::new(Instance::new("svc", format!("w-{i}"), "x:1").with_weight(w)))
            .collect()
    }
}
