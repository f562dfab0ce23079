//! Prometheus metrics, kept in atomics on the request path and rendered
//! as text on demand.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `muster_gateway_requests_total` | `route`, `status` | answered requests (`route="none"`: no route matched) |
//! | `muster_gateway_request_duration_seconds` | `route` | histogram: request start to response headers |
//! | `muster_gateway_upstream_duration_seconds` | `service`, `instance` | histogram: one upstream attempt to response headers |
//! | `muster_gateway_retries_total` | `route` | attempts repeated on another instance |
//! | `muster_gateway_upstream_errors_total` | `route`, `kind` | failed attempts: `connect`, `tls` (handshake with an `https://` instance), `request`, `timeout` |
//! | `muster_gateway_ejections_total` | `service`, `instance` | instances ejected by passive health checking |
//! | `muster_gateway_instances` | `service`, `state` | `eligible` and `ejected` instances |
//! | `muster_gateway_discovery_stale_seconds` | `service` | how long the service's table may have been missing changes (0: live) |
//! | `muster_gateway_discovery_revision` | `service` | the revision of the service's table |
//! | `muster_gateway_connections_total` | | accepted client connections |
//! | `muster_gateway_route_reloads_total` | `result` | routes file reloads (`ok`, `error`) |
//! | `muster_gateway_tls_handshake_failures_total` | | client connections whose TLS handshake failed (plaintext on the TLS port included) |
//! | `muster_gateway_tls_certificate_reloads_total` | `result` | new certificate pairs taken into use (`ok`) or refused (`error`) |

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// How many copies of the hot counters are kept: serving threads count
/// into their own copy (thread `i` into copy `i % SHARDS`), so that they do
/// not fight over the same cache lines on every request. Rendering sums
/// the copies.
const SHARDS: usize = 8;

thread_local! {
    /// The copy this thread counts into (0 unless it is a serving thread).
    static SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Makes the calling thread count into copy `i % SHARDS` (serving thread
/// `i`).
pub(crate) fn set_shard(i: usize) {
    SHARD.with(|s| s.set(i % SHARDS));
}

fn shard() -> usize {
    SHARD.with(std::cell::Cell::get)
}

/// One cache line pair to itself.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

/// A latency histogram: one counter per bucket (plus +Inf), a count and a
/// sum; lock-free, one copy per shard.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    shards: [Padded<HistogramShard>; SHARDS],
}

#[derive(Debug, Default)]
struct HistogramShard {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        let h = &self.shards[shard()].0;
        h.buckets[i].fetch_add(1, Ordering::Relaxed);
        h.count.fetch_add(1, Ordering::Relaxed);
        h.sum_nanos
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    fn sum(&self, f: impl Fn(&HistogramShard) -> &AtomicU64) -> u64 {
        self.shards
            .iter()
            .map(|s| f(&s.0).load(Ordering::Relaxed))
            .sum()
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.sum(|s| &s.buckets[i]);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.sum(|s| &s.buckets[BUCKETS.len()]);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let sum = self.sum(|s| &s.sum_nanos) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.sum(|s| &s.count));
    }
}

/// The kinds of failed upstream attempts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ErrorKind {
    Connect = 0,
    Request = 1,
    Timeout = 2,
    Tls = 3,
}

const ERROR_KINDS: [&str; 4] = ["connect", "request", "timeout", "tls"];

/// The counters of one route (kept across reloads of the routes file).
#[derive(Debug)]
pub(crate) struct RouteMetrics {
    label: String,
    /// Answers by status code (index = code, 0..1000), per shard.
    statuses: Box<[Padded<Box<[AtomicU64]>>]>,
    latency: Histogram,
    retries: AtomicU64,
    errors: [AtomicU64; 4],
}

impl RouteMetrics {
    fn new(label: String) -> Self {
        RouteMetrics {
            label,
            statuses: (0..SHARDS)
                .map(|_| Padded((0..1000).map(|_| AtomicU64::new(0)).collect()))
                .collect(),
            latency: Histogram::default(),
            retries: AtomicU64::new(0),
            errors: Default::default(),
        }
    }

    /// Counts one answered request.
    pub(crate) fn observe(&self, status: http::StatusCode, elapsed: Duration) {
        let code = usize::from(status.as_u16()).min(999);
        self.statuses[shard()].0[code].fetch_add(1, Ordering::Relaxed);
        self.latency.observe(elapsed);
    }

    pub(crate) fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Every metric of one gateway.
#[derive(Debug)]
pub(crate) struct Metrics {
    routes: Mutex<HashMap<String, Arc<RouteMetrics>>>,
    /// Requests no route matched (and the gateway's own paths).
    pub(crate) unrouted: Arc<RouteMetrics>,
    ejections: Mutex<HashMap<(String, String), u64>>,
    pub(crate) connections: AtomicU64,
    pub(crate) reloads_ok: AtomicU64,
    pub(crate) reloads_failed: AtomicU64,
    pub(crate) tls_handshake_failures: AtomicU64,
    /// The listener's certificate reloader, when TLS is on.
    pub(crate) tls: Option<muster_tls::TlsServer>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            routes: Mutex::default(),
            unrouted: Arc::new(RouteMetrics::new("none".into())),
            ejections: Mutex::default(),
            connections: AtomicU64::new(0),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            tls_handshake_failures: AtomicU64::new(0),
            tls: None,
        }
    }
}

/// Facts about one followed service, gathered for rendering.
#[derive(Debug)]
pub(crate) struct ServiceReport {
    pub(crate) name: String,
    pub(crate) stale_secs: Option<f64>,
    pub(crate) revision: Option<i64>,
    pub(crate) eligible: usize,
    pub(crate) ejected: usize,
    pub(crate) instances: Vec<(String, Arc<Histogram>)>,
}

impl Metrics {
    /// The counters of the route labelled `label` (created on first use).
    pub(crate) fn route(&self, label: &str) -> Arc<RouteMetrics> {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        routes
            .entry(label.to_string())
            .or_insert_with(|| Arc::new(RouteMetrics::new(label.to_string())))
            .clone()
    }

    pub(crate) fn ejected(&self, service: &str, instance: &str) {
        let mut e = self
            .ejections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *e.entry((service.to_string(), instance.to_string()))
            .or_insert(0) += 1;
    }

    /// The Prometheus text.
    pub(crate) fn render(&self, services: &[ServiceReport]) -> String {
        let mut out = String::with_capacity(8192);
        let mut routes: Vec<Arc<RouteMetrics>> = self
            .routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        routes.sort_by(|a, b| a.label.cmp(&b.label));
        routes.push(self.unrouted.clone());

        out.push_str(
            "# HELP muster_gateway_requests_total Requests answered, by route and status.\n",
        );
        out.push_str("# TYPE muster_gateway_requests_total counter\n");
        for r in &routes {
            let route = escape(&r.label);
            for code in 0..1000 {
                let n: u64 = r
                    .statuses
                    .iter()
                    .map(|s| s.0[code].load(Ordering::Relaxed))
                    .sum();
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "muster_gateway_requests_total{{route=\"{route}\",status=\"{code}\"}} {n}"
                    );
                }
            }
        }
        out.push_str("# HELP muster_gateway_request_duration_seconds Time from request to response headers, by route.\n");
        out.push_str("# TYPE muster_gateway_request_duration_seconds histogram\n");
        for r in &routes {
            let labels = format!("route=\"{}\"", escape(&r.label));
            r.latency
                .render(&mut out, "muster_gateway_request_duration_seconds", &labels);
        }
        out.push_str(
            "# HELP muster_gateway_retries_total Attempts repeated on another instance.\n",
        );
        out.push_str("# TYPE muster_gateway_retries_total counter\n");
        for r in &routes {
            let _ = writeln!(
                out,
                "muster_gateway_retries_total{{route=\"{}\"}} {}",
                escape(&r.label),
                r.retries.load(Ordering::Relaxed)
            );
        }
        out.push_str(
            "# HELP muster_gateway_upstream_errors_total Failed upstream attempts, by kind.\n",
        );
        out.push_str("# TYPE muster_gateway_upstream_errors_total counter\n");
        for r in &routes {
            for (i, kind) in ERROR_KINDS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "muster_gateway_upstream_errors_total{{route=\"{}\",kind=\"{kind}\"}} {}",
                    escape(&r.label),
                    r.errors[i].load(Ordering::Relaxed)
                );
            }
        }

        out.push_str("# HELP muster_gateway_upstream_duration_seconds One upstream attempt to response headers, by instance.\n");
        out.push_str("# TYPE muster_gateway_upstream_duration_seconds histogram\n");
        for s in services {
            for (id, h) in &s.instances {
                let labels = format!(
                    "service=\"{}\",instance=\"{}\"",
                    escape(&s.name),
                    escape(id)
                );
                h.render(
                    &mut out,
                    "muster_gateway_upstream_duration_seconds",
                    &labels,
                );
            }
        }
        out.push_str(
            "# HELP muster_gateway_ejections_total Instances ejected by passive health checking.\n",
        );
        out.push_str("# TYPE muster_gateway_ejections_total counter\n");
        {
            let e = self
                .ejections
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let mut rows: Vec<_> = e.iter().collect();
            rows.sort();
            for ((service, instance), n) in rows {
                let _ = writeln!(
                    out,
                    "muster_gateway_ejections_total{{service=\"{}\",instance=\"{}\"}} {n}",
                    escape(service),
                    escape(instance)
                );
            }
        }
        out.push_str("# HELP muster_gateway_instances Instances of a service, by state.\n");
        out.push_str("# TYPE muster_gateway_instances gauge\n");
        for s in services {
            let name = escape(&s.name);
            for (state, n) in [("eligible", s.eligible), ("ejected", s.ejected)] {
                let _ = writeln!(
                    out,
                    "muster_gateway_instances{{service=\"{name}\",state=\"{state}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP muster_gateway_discovery_stale_seconds How long the service's table may have been missing changes (0: live; -1: not discovered yet).\n");
        out.push_str("# TYPE muster_gateway_discovery_stale_seconds gauge\n");
        for s in services {
            let v = match (s.revision, s.stale_secs) {
                (None, _) => -1.0,
                (Some(_), None) => 0.0,
                (Some(_), Some(secs)) => secs,
            };
            let _ = writeln!(
                out,
                "muster_gateway_discovery_stale_seconds{{service=\"{}\"}} {v}",
                escape(&s.name)
            );
        }
        out.push_str("# HELP muster_gateway_discovery_revision The registry revision of the service's table.\n");
        out.push_str("# TYPE muster_gateway_discovery_revision gauge\n");
        for s in services {
            if let Some(rev) = s.revision {
                let _ = writeln!(
                    out,
                    "muster_gateway_discovery_revision{{service=\"{}\"}} {rev}",
                    escape(&s.name)
                );
            }
        }
        out.push_str("# HELP muster_gateway_connections_total Client connections accepted.\n");
        out.push_str("# TYPE muster_gateway_connections_total counter\n");
        let _ = writeln!(
            out,
            "muster_gateway_connections_total {}",
            self.connections.load(Ordering::Relaxed)
        );
        out.push_str("# HELP muster_gateway_route_reloads_total Reloads of the routes file.\n");
        out.push_str("# TYPE muster_gateway_route_reloads_total counter\n");
        for (result, n) in [("ok", &self.reloads_ok), ("error", &self.reloads_failed)] {
            let _ = writeln!(
                out,
                "muster_gateway_route_reloads_total{{result=\"{result}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        if let Some(tls) = &self.tls {
            out.push_str("# HELP muster_gateway_tls_handshake_failures_total Client connections whose TLS handshake failed.\n");
            out.push_str("# TYPE muster_gateway_tls_handshake_failures_total counter\n");
            let _ = writeln!(
                out,
                "muster_gateway_tls_handshake_failures_total {}",
                self.tls_handshake_failures.load(Ordering::Relaxed)
            );
            out.push_str("# HELP muster_gateway_tls_certificate_reloads_total Changes of the listener's certificate files, taken into use or refused.\n");
            out.push_str("# TYPE muster_gateway_tls_certificate_reloads_total counter\n");
            for (result, n) in [("ok", tls.reloads()), ("error", tls.reload_failures())] {
                let _ = writeln!(
                    out,
                    "muster_gateway_tls_certificate_reloads_total{{result=\"{result}\"}} {n}"
                );
            }
        }
        out
    }
}

/// Escapes a label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        let r = m.route("/api");
        r.observe(http::StatusCode::OK, Duration::from_millis(3));
        r.observe(http::StatusCode::OK, Duration::from_secs(100));
        r.retry();
        m.ejected("user", "u-1");
        let text = m.render(&[]);
        assert!(
            text.contains("muster_gateway_requests_total{route=\"/api\",status=\"200\"} 2"),
            "{text}"
        );
        assert!(text.contains(
            "muster_gateway_request_duration_seconds_bucket{route=\"/api\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "muster_gateway_request_duration_seconds_bucket{route=\"/api\",le=\"+Inf\"} 2"
        ));
        assert!(text.contains("muster_gateway_retries_total{route=\"/api\"} 1"));
        assert!(
            text.contains("muster_gateway_ejections_total{service=\"user\",instance=\"u-1\"} 1")
        );
    }
}
