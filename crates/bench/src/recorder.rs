//! Measurements: latencies in an HDR histogram (nanoseconds, three
//! significant figures: constant memory whatever the number of samples,
//! and mergeable across clients), failures, and the percentile summary.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use muster_proto as pb;
use pb::kv_client::KvClient;

use crate::auth::{Intercepted, Renewal, TokenInterceptor};
use crate::connect::status_text;
use crate::units::{ms, nanos, nanos_as_ms};

/// A client stops after this many failures in a row (the server is gone).
const GIVE_UP_AFTER: u32 = 100;

/// Significant figures the histograms keep: a percentile is within 0.1%
/// of the exact one.
const SIGNIFICANT_FIGURES: u8 = 3;

/// Latency samples, in nanoseconds, in an auto-resizing HDR histogram.
#[derive(Debug, Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Latencies {
        Latencies::new()
    }
}

impl Latencies {
    /// No samples yet.
    pub fn new() -> Latencies {
        Latencies(
            Histogram::new(SIGNIFICANT_FIGURES)
                .expect("3 significant figures are within hdrhistogram's 0..=5"),
        )
    }

    /// Adds one sample.
    pub fn record(&mut self, latency: Duration) {
        self.record_nanos(nanos(latency));
    }

    /// Adds one sample, in nanoseconds.
    pub fn record_nanos(&mut self, nanos: u64) {
        // Fails only past what a histogram can grow to (about 146 years):
        // such a sample counts as the largest value it can hold.
        if self.0.record(nanos).is_err() {
            self.0.saturating_record(nanos);
        }
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Latencies) {
        if self.0.add(&other.0).is_err() {
            for v in other.0.iter_recorded() {
                self.0
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    /// How many samples there are.
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Percentiles, mean and maximum; `None` without samples.
    pub fn summary(&self) -> Option<Summary> {
        let h = &self.0;
        (!h.is_empty()).then(|| Summary {
            samples: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean().round() as u64,
        })
    }

    /// The summary as one line ("no samples" without any).
    pub fn text(&self) -> String {
        self.summary()
            .map_or_else(|| "no samples".to_string(), |s| s.text())
    }
}

/// Nearest-rank percentiles of a set of samples, in nanoseconds, to three
/// significant figures; in JSON, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// How many samples.
    pub samples: u64,
    /// Median.
    #[serde(serialize_with = "nanos_as_ms")]
    pub p50: u64,
    /// 90th percentile.
    #[serde(serialize_with = "nanos_as_ms")]
    pub p90: u64,
    /// 99th percentile.
    #[serde(serialize_with = "nanos_as_ms")]
    pub p99: u64,
    /// 99.9th percentile.
    #[serde(serialize_with = "nanos_as_ms")]
    pub p999: u64,
    /// Largest sample.
    #[serde(serialize_with = "nanos_as_ms")]
    pub max: u64,
    /// Mean.
    #[serde(serialize_with = "nanos_as_ms")]
    pub mean: u64,
}

impl Summary {
    /// `p50 1.234 ms  p90 …  mean …`.
    pub fn text(&self) -> String {
        format!(
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {}",
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.p999),
            ms(self.max),
            ms(self.mean)
        )
    }
}

/// A KV request: how it is sent.
pub(crate) trait KvRequest: Sized {
    /// What it is answered with.
    type Response;
    /// Sends it on `kv`.
    fn send(
        self,
        kv: &mut KvClient<Intercepted>,
    ) -> impl Future<Output = Result<tonic::Response<Self::Response>, tonic::Status>> + Send + '_;
}

impl KvRequest for pb::PutRequest {
    type Response = pb::PutResponse;
    fn send(
        self,
        kv: &mut KvClient<Intercepted>,
    ) -> impl Future<Output = Result<tonic::Response<Self::Response>, tonic::Status>> + Send + '_
    {
        kv.put(self)
    }
}

impl KvRequest for pb::RangeRequest {
    type Response = pb::RangeResponse;
    fn send(
        self,
        kv: &mut KvClient<Intercepted>,
    ) -> impl Future<Output = Result<tonic::Response<Self::Response>, tonic::Status>> + Send + '_
    {
        kv.range(self)
    }
}

impl KvRequest for pb::TxnRequest {
    type Response = pb::TxnResponse;
    fn send(
        self,
        kv: &mut KvClient<Intercepted>,
    ) -> impl Future<Output = Result<tonic::Response<Self::Response>, tonic::Status>> + Send + '_
    {
        kv.txn(self)
    }
}

/// Latencies and failures of one or more clients.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    /// Latencies of the requests that succeeded.
    pub(crate) latencies: Latencies,
    /// Requests that failed.
    pub(crate) errors: u64,
    first_error: Option<String>,
    in_a_row: u32,
}

impl Recorder {
    /// A request started at `started` succeeded now.
    pub(crate) fn ok(&mut self, started: Instant) {
        self.latencies.record(started.elapsed());
        self.in_a_row = 0;
    }

    /// A request failed.
    pub(crate) fn err(&mut self, error: String) {
        self.errors += 1;
        self.in_a_row += 1;
        self.first_error.get_or_insert(error);
    }

    /// Sends the KV request `make` builds (before the clock starts) on
    /// `kv` and records how it went; its response if it succeeded. If the
    /// server refused the token it went
    /// out with (expired, say), logs in again (once for every client of the
    /// endpoint: see [`TokenInterceptor::renew`]) and sends it once more,
    /// built anew. Its latency counts from the first attempt, login
    /// included.
    pub(crate) async fn time_kv<R: KvRequest>(
        &mut self,
        kv: &mut KvClient<Intercepted>,
        auth: &TokenInterceptor,
        mut make: impl FnMut() -> R,
    ) -> Option<R::Response> {
        let request = make();
        let sent_with = auth.token();
        let started = Instant::now();
        let mut result = request.send(kv).await;
        if let Err(status) = &result {
            match auth.renew(sent_with, status).await {
                Renewal::NotNeeded => {}
                Renewal::Renewed => result = make().send(kv).await,
                Renewal::Failed(failure) => {
                    self.err(failure);
                    return None;
                }
            }
        }
        match result {
            Ok(response) => {
                self.ok(started);
                Some(response.into_inner())
            }
            Err(status) => {
                self.err(status_text(&status));
                None
            }
        }
    }

    /// Whether a client should send another request: before the deadline
    /// (if any), and not after too many failures in a row.
    pub(crate) fn going(&self, deadline: Option<Instant>) -> bool {
        deadline.is_none_or(|d| Instant::now() < d) && self.in_a_row < GIVE_UP_AFTER
    }

    /// Whether the server looks gone (too many failures in a row).
    pub(crate) fn gave_up(&self) -> bool {
        self.in_a_row >= GIVE_UP_AFTER
    }

    /// Adds another client's records.
    pub(crate) fn merge(&mut self, other: Recorder) {
        self.latencies.merge(&other.latencies);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// The failure line, if any request failed.
    pub(crate) fn failure(&self) -> Option<String> {
        (self.errors > 0).then(|| {
            format!(
                "{} of {} requests failed; first: {}",
                self.errors,
                self.errors + self.latencies.len(),
                self.first_error.as_deref().unwrap_or("?")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(samples: impl IntoIterator<Item = u64>) -> Latencies {
        let mut l = Latencies::new();
        for s in samples {
            l.record_nanos(s);
        }
        l
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = of(1..=100).summary().unwrap();
        assert_eq!((s.p50, s.p90, s.p99, s.max), (50, 90, 99, 100));
        assert_eq!((s.samples, s.mean, s.p999), (100, 51, 100));
        assert_eq!(of([7]).summary().unwrap().p99, 7);
        assert!(of([]).summary().is_none());
        assert_eq!(of([]).text(), "no samples");
    }

    #[test]
    fn histograms_merge_across_clients() {
        let mut all = of(1..=50);
        all.merge(&of(51..=100));
        all.merge(&Latencies::new());
        assert_eq!(all.summary(), of(1..=100).summary());
    }

    #[test]
    fn large_latencies_keep_three_significant_figures() {
        // 123.456789 ms and 2 s, recorded in nanoseconds.
        let s = of([123_456_789, 2_000_000_000]).summary().unwrap();
        assert!(s.p50.abs_diff(123_456_789) <= 123_456, "{s:?}");
        assert!(s.max.abs_diff(2_000_000_000) <= 2_000_000, "{s:?}");
        // The extreme: a sample beyond any histogram's range is clamped,
        // not lost.
        let mut l = of([1]);
        l.record_nanos(u64::MAX);
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn summaries_are_milliseconds_in_json() {
        let s = of([1_000, 1_500_000]).summary().unwrap();
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"samples":2,"p50":0.001,"p90":1.5,"p99":1.5,"p999":1.5,"max":1.5,"mean":0.75}"#
        );
    }

    #[test]
    fn failures_are_counted_and_the_first_kept() {
        let mut rec = Recorder::default();
        rec.ok(Instant::now());
        rec.err("first".into());
        rec.err("second".into());
        assert_eq!(
            rec.failure().as_deref(),
            Some("2 of 3 requests failed; first: first")
        );
        let mut all = Recorder::default();
        all.merge(rec);
        assert_eq!(all.errors, 2);
        assert!(!all.gave_up());
    }
}
