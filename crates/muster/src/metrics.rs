//! How fast changes reach this process's tables, in Prometheus text
//! format.
//!
//! Every followed service (and the catalog, per service) records the time
//! from a watch response arriving on the client's stream to the new
//! snapshot being visible to pickers, in a histogram per service
//! ([`ApplyStats`]), and how far its table's revision is behind the
//! newest revision the client has seen from the registry (progress
//! notifications move an idle service's table forward every few seconds,
//! so a lag that stays up means the table is not following).
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `muster_discovery_apply_seconds` | `service` | histogram: watch response received to snapshot visible |
//! | `muster_discovery_revision_lag` | `service` | gauge: registry revisions seen but not yet in the table |
//! | `muster_discovery_malformed_total` | `layout` | counter: entries skipped ([`crate::layout`]) |

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the apply histogram's buckets, in seconds: 10 µs to 1 s.
pub const APPLY_BUCKETS: [f64; 12] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.1,
    1.0,
];

/// A latency histogram with [`APPLY_BUCKETS`]: lock-free, written by one
/// follow task, read by metrics scrapes and dashboards.
#[derive(Debug, Default)]
pub struct ApplyStats {
    buckets: [AtomicU64; APPLY_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
    max_nanos: AtomicU64,
}

impl ApplyStats {
    /// Records one apply.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = APPLY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(APPLY_BUCKETS.len());
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.max_nanos.fetch_max(nanos, Ordering::Relaxed);
    }

    /// How many applies were recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The applies' summed time (with [`count`](Self::count): the mean).
    pub fn total(&self) -> Duration {
        Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed))
    }

    /// The longest apply recorded.
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max_nanos.load(Ordering::Relaxed))
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1) of the
    /// applies so far (`None` before the first); the largest observed
    /// value when it falls in the last, unbounded bucket.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let max = self.max();
                let bound = APPLY_BUCKETS.get(i).map(|b| Duration::from_secs_f64(*b));
                return Some(bound.map_or(max, |b| b.min(max)));
            }
        }
        Some(self.max())
    }

    /// Appends the histogram as `name` with `labels` (`key="value",...`).
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, bound) in APPLY_BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.buckets[APPLY_BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count());
    }
}

/// One followed service's figures, for [`render`].
#[derive(Debug)]
pub struct ServiceFigures<'a> {
    /// The service.
    pub service: &'a str,
    /// Its applies.
    pub apply: &'a ApplyStats,
    /// Registry revisions seen but not yet in its table.
    pub lag: i64,
}

/// The Prometheus text of these services' figures, and the layouts'
/// malformed counters.
pub fn render(out: &mut String, services: &[ServiceFigures<'_>]) {
    out.push_str(
        "# HELP muster_discovery_apply_seconds Time from a watch response arriving to the new table being visible to pickers.\n\
         # TYPE muster_discovery_apply_seconds histogram\n",
    );
    for s in services {
        s.apply.render(
            out,
            "muster_discovery_apply_seconds",
            &format!("service=\"{}\"", escape(s.service)),
        );
    }
    out.push_str(
        "# HELP muster_discovery_revision_lag Registry revisions the client has seen that a service's table does not reflect yet.\n\
         # TYPE muster_discovery_revision_lag gauge\n",
    );
    for s in services {
        let _ = writeln!(
            out,
            "muster_discovery_revision_lag{{service=\"{}\"}} {}",
            escape(s.service),
            s.lag.max(0)
        );
    }
    crate::layout::render_metrics(out);
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_rendering() {
        let h = ApplyStats::default();
        assert_eq!(h.quantile(0.99), None);
        for _ in 0..98 {
            h.observe(Duration::from_micros(20));
        }
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(2));
        assert_eq!(h.quantile(0.5), Some(Duration::from_secs_f64(0.000_025)));
        assert_eq!(h.quantile(0.99), Some(Duration::from_secs_f64(0.005)));
        assert_eq!(h.quantile(1.0), Some(Duration::from_secs(2)));
        let mut out = String::new();
        render(
            &mut out,
            &[ServiceFigures {
                service: "us\"er",
                apply: &h,
                lag: -3,
            }],
        );
        assert!(
            out.contains(
                "muster_discovery_apply_seconds_bucket{service=\"us\\\"er\",le=\"+Inf\"} 100"
            ),
            "{out}"
        );
        assert!(out.contains("muster_discovery_apply_seconds_count{service=\"us\\\"er\"} 100"));
        assert!(out.contains("muster_discovery_revision_lag{service=\"us\\\"er\"} 0"));
        assert!(out.contains("muster_discovery_malformed_total{layout=\"kratos\"}"));
    }
}
