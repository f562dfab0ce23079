//! Prometheus metrics, kept in atomics on the query path and rendered as
//! text on demand ([`DnsServer::render_metrics`](crate::DnsServer::render_metrics)).
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `muster_dns_queries_total` | `type`, `rcode` | answered queries, by question type (`none` when unreadable) and response code |
//! | `muster_dns_query_duration_seconds` | `proto` | histogram: query read to answer encoded (`udp`, `tcp`) |
//! | `muster_dns_truncated_total` | | UDP answers cut to fit, with the TC bit set |
//! | `muster_dns_dropped_total` | `reason` | datagrams and messages not answered: `malformed` (shorter than a header, a response rather than a query, or from port 0) |
//! | `muster_dns_tcp_connections` | | open TCP connections |
//! | `muster_dns_tcp_connections_refused_total` | | TCP connections closed at once: the connection limit was reached |
//! | `muster_dns_catalog_stale_seconds` | | how long the catalog may have been missing changes (0: live) |
//! | `muster_dns_catalog_revision` | | the registry revision answers come from |
//! | `muster_dns_instances` | `addr` | instances by address: `ip` (A/AAAA and SRV), `name` (SRV target and instance CNAME only), `unusable` (no host in the address), `unnamed` (service name not a DNS label) |

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use crate::index::AddrCounts;

/// Upper bounds of the latency buckets, in seconds: a query answered from
/// memory takes microseconds.
const BUCKETS: [f64; 14] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.1, 0.5, 1.0,
];

/// Question types counted by name; the rest are `other`.
const TYPES: [&str; 10] = [
    "A", "AAAA", "SRV", "CNAME", "SOA", "NS", "ANY", "PTR", "TXT", "other",
];
/// `type="none"`: the question could not be read.
const NO_TYPE: usize = TYPES.len();
/// Response codes counted by name; the rest are `other`.
const RCODES: [&str; 8] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "BADVERS", "other",
];

/// The question type's row.
pub(crate) fn type_index(t: Option<RecordType>) -> usize {
    match t {
        None => NO_TYPE,
        Some(RecordType::A) => 0,
        Some(RecordType::AAAA) => 1,
        Some(RecordType::SRV) => 2,
        Some(RecordType::CNAME) => 3,
        Some(RecordType::SOA) => 4,
        Some(RecordType::NS) => 5,
        Some(RecordType::ANY) => 6,
        Some(RecordType::PTR) => 7,
        Some(RecordType::TXT) => 8,
        Some(_) => 9,
    }
}

fn rcode_index(rcode: ResponseCode) -> usize {
    match rcode {
        ResponseCode::NoError => 0,
        ResponseCode::FormErr => 1,
        ResponseCode::ServFail => 2,
        ResponseCode::NXDomain => 3,
        ResponseCode::NotImp => 4,
        ResponseCode::Refused => 5,
        ResponseCode::BADVERS => 6,
        _ => 7,
    }
}

/// Transport of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    Udp = 0,
    Tcp = 1,
}

/// Why a query got no answer.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Drop {
    Malformed = 0,
}

const DROPS: [&str; 1] = ["malformed"];

/// A latency histogram: one counter per bucket (plus +Inf), a count and a
/// sum in nanoseconds; lock-free.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.buckets[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Every counter of one DNS server.
#[derive(Debug)]
pub(crate) struct Metrics {
    queries: [[AtomicU64; RCODES.len()]; TYPES.len() + 1],
    latency: [Histogram; 2],
    truncated: AtomicU64,
    dropped: [AtomicU64; DROPS.len()],
    pub(crate) tcp_open: AtomicI64,
    pub(crate) tcp_refused: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            queries: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            latency: Default::default(),
            truncated: AtomicU64::new(0),
            dropped: Default::default(),
            tcp_open: AtomicI64::new(0),
            tcp_refused: AtomicU64::new(0),
        }
    }
}

/// What the catalog says at rendering time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CatalogFacts {
    pub(crate) stale_secs: f64,
    pub(crate) revision: i64,
    pub(crate) counts: AddrCounts,
}

impl Metrics {
    /// Counts one answered query.
    pub(crate) fn answered(
        &self,
        proto: Proto,
        qtype: usize,
        rcode: ResponseCode,
        truncated: bool,
        elapsed: Duration,
    ) {
        self.queries[qtype.min(NO_TYPE)][rcode_index(rcode)].fetch_add(1, Ordering::Relaxed);
        if truncated {
            self.truncated.fetch_add(1, Ordering::Relaxed);
        }
        self.latency[proto as usize].observe(elapsed);
    }

    /// Counts one query left unanswered.
    pub(crate) fn dropped(&self, why: Drop) {
        self.dropped[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text.
    pub(crate) fn render(&self, catalog: CatalogFacts) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP muster_dns_queries_total DNS queries answered, by question type and response code.\n");
        out.push_str("# TYPE muster_dns_queries_total counter\n");
        for (t, row) in self.queries.iter().enumerate() {
            let qtype = TYPES.get(t).copied().unwrap_or("none");
            for (r, n) in row.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let rcode = RCODES[r];
                    let _ = writeln!(
                        out,
                        "muster_dns_queries_total{{type=\"{qtype}\",rcode=\"{rcode}\"}} {n}"
                    );
                }
            }
        }
        out.push_str("# HELP muster_dns_query_duration_seconds Time from reading a query to its answer encoded, by transport.\n");
        out.push_str("# TYPE muster_dns_query_duration_seconds histogram\n");
        for (proto, h) in ["udp", "tcp"].iter().zip(&self.latency) {
            h.render(
                &mut out,
                "muster_dns_query_duration_seconds",
                &format!("proto=\"{proto}\""),
            );
        }
        let mut single = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        single(
            "muster_dns_truncated_total",
            "counter",
            "UDP answers cut to fit the client's size, with the TC bit set.",
            self.truncated.load(Ordering::Relaxed).to_string(),
        );
        single(
            "muster_dns_tcp_connections",
            "gauge",
            "Open TCP connections.",
            self.tcp_open.load(Ordering::Relaxed).to_string(),
        );
        single(
            "muster_dns_tcp_connections_refused_total",
            "counter",
            "TCP connections closed at once because the connection limit was reached.",
            self.tcp_refused.load(Ordering::Relaxed).to_string(),
        );
        single(
            "muster_dns_catalog_stale_seconds",
            "gauge",
            "How long the catalog may have been missing changes (0: live); answers keep coming from it.",
            catalog.stale_secs.to_string(),
        );
        single(
            "muster_dns_catalog_revision",
            "gauge",
            "The registry revision answers come from.",
            catalog.revision.to_string(),
        );
        out.push_str("# HELP muster_dns_dropped_total Queries left unanswered, by reason.\n");
        out.push_str("# TYPE muster_dns_dropped_total counter\n");
        for (reason, n) in DROPS.iter().zip(&self.dropped) {
            let _ = writeln!(
                out,
                "muster_dns_dropped_total{{reason=\"{reason}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP muster_dns_instances Instances by how their address can be answered: ip (A/AAAA, SRV), name (SRV target and instance CNAME only), unusable (no host), unnamed (service name is no DNS label).\n");
        out.push_str("# TYPE muster_dns_instances gauge\n");
        let c = catalog.counts;
        for (kind, n) in [
            ("ip", c.ip),
            ("name", c.name),
            ("unusable", c.unusable),
            ("unnamed", c.unnamed),
        ] {
            let _ = writeln!(out, "muster_dns_instances{{addr=\"{kind}\"}} {n}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.answered(
            Proto::Udp,
            type_index(Some(RecordType::SRV)),
            ResponseCode::NoError,
            true,
            Duration::from_micros(30),
        );
        m.answered(
            Proto::Udp,
            type_index(None),
            ResponseCode::FormErr,
            false,
            Duration::from_secs(3),
        );
        m.dropped(Drop::Malformed);
        let text = m.render(CatalogFacts {
            stale_secs: 1.5,
            revision: 7,
            counts: AddrCounts {
                ip: 3,
                ..Default::default()
            },
        });
        for line in [
            "muster_dns_queries_total{type=\"SRV\",rcode=\"NOERROR\"} 1",
            "muster_dns_queries_total{type=\"none\",rcode=\"FORMERR\"} 1",
            "muster_dns_query_duration_seconds_bucket{proto=\"udp\",le=\"0.00005\"} 1",
            "muster_dns_query_duration_seconds_bucket{proto=\"udp\",le=\"+Inf\"} 2",
            "muster_dns_query_duration_seconds_count{proto=\"tcp\"} 0",
            "muster_dns_truncated_total 1",
            "muster_dns_dropped_total{reason=\"malformed\"} 1",
            "muster_dns_catalog_stale_seconds 1.5",
            "muster_dns_catalog_revision 7",
            "muster_dns_instances{addr=\"ip\"} 3",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
