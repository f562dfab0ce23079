//! How long the storage's durable steps take: a histogram of fixed bounds
//! updated with atomics, one per step (a log append with its fdatasync, a
//! checkpoint), as etcd's `etcd_disk_wal_fsync_duration_seconds` and
//! `etcd_disk_backend_commit_duration_seconds` are.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds: 100 µs doubling to 6.55 s
/// (etcd's disk histograms start at 1 ms, above most of this log's
/// appends).
pub const LATENCY_BOUNDS: [f64; 17] = [
    0.0001, 0.0002, 0.0004, 0.0008, 0.0016, 0.0032, 0.0064, 0.0128, 0.0256, 0.0512, 0.1024, 0.2048,
    0.4096, 0.8192, 1.6384, 3.2768, 6.5536,
];

/// Observations per bucket, and above the last bound.
#[derive(Debug, Default)]
pub(super) struct Latency {
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Latency {
    pub(super) fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let at = LATENCY_BOUNDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[at].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum: Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed)),
        }
    }
}

/// A [`Latency`] read at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Observations in each bucket of [`LATENCY_BOUNDS`] (not cumulative),
    /// the last one for those above every bound.
    pub buckets: [u64; LATENCY_BOUNDS.len() + 1],
    /// Total time observed.
    pub sum: Duration,
}

impl LatencySnapshot {
    /// How many observations.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Cumulative counts per bound, as Prometheus buckets (`le`), without
    /// `+Inf` (which is [`LatencySnapshot::count`]).
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        LATENCY_BOUNDS
            .iter()
            .zip(self.buckets.iter().scan(0, |total, n| {
                *total += n;
                Some(*total)
            }))
            .map(|(bound, total)| (*bound, total))
    }
}

/// The storage's latency histograms, read at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StorageLatencies {
    /// Appending a commit's record to the write-ahead log and syncing it
    /// (a rotation to a new segment included, when one was due).
    pub wal_append: LatencySnapshot,
    /// Applying logged commits to the database in one durable transaction.
    pub checkpoint: LatencySnapshot,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_count_each_observation_once_at_its_bound() {
        let latency = Latency::default();
        for micros in [50, 100, 101, 3_000, 10_000_000] {
            latency.observe(Duration::from_micros(micros));
        }
        let snapshot = latency.snapshot();
        assert_eq!(snapshot.count(), 5);
        // 50 µs and exactly 100 µs in the first bucket, 101 µs in the second.
        assert_eq!(snapshot.buckets[0], 2);
        assert_eq!(snapshot.buckets[1], 1);
        // 3 ms under 3.2 ms; 10 s above every bound.
        assert_eq!(snapshot.buckets[5], 1);
        assert_eq!(snapshot.buckets[LATENCY_BOUNDS.len()], 1);
        let cumulative: Vec<u64> = snapshot.cumulative().map(|(_, n)| n).collect();
        assert_eq!(cumulative.len(), LATENCY_BOUNDS.len());
        assert_eq!(cumulative[0], 2);
        assert_eq!(cumulative[4], 3);
        assert_eq!(*cumulative.last().unwrap(), 4);
        assert!(cumulative.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(snapshot.sum, Duration::from_micros(10_003_251));
    }
}
