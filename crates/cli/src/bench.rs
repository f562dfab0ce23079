//! `muster bench`: a load generator for any etcd v3 endpoint (`muster
//! serve`, etcd itself, or anything else speaking etcd's v3 gRPC API).
//!
//! Workloads:
//!
//! - `put`: concurrent clients putting random keys of a keyspace;
//! - `range`: concurrent single-key gets (the keyspace is populated first
//!   unless it already is);
//! - `txn`: compare-and-put transactions (compare the key's version, then
//!   put);
//! - `keepalive`: leases kept alive on keep-alive streams, as fast as
//!   possible or at a given rate;
//! - `watch`: many watchers on one key, then paced puts: latency from just
//!   before sending each put to each watcher receiving its event;
//! - `populate`: writes the keyspace once (memory and restart measurements);
//! - `ready`: waits for the first successful Range (restart measurements).
//!
//! Latency percentiles are exact: every sample is kept and sorted. Clients
//! are spread over several HTTP/2 connections (one per 8 clients unless
//! `--conns` says otherwise), since one connection serializes its streams
//! on one TCP stream.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::future::Future;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::global::{GlobalArgs, Output, parse_duration};
use anyhow::{Context, anyhow, bail};
use muster_proto as pb;
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::watch_client::WatchClient;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// The most puts in one populating transaction (etcd's default
/// `--max-txn-ops`).
const POPULATE_BATCH: u64 = 128;

/// A client stops after this many failures in a row (the server is gone).
const GIVE_UP_AFTER: u32 = 100;

/// How long to wait for a response on a stream before calling it lost.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags of `muster bench`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  muster bench put --clients 64 --duration 10s
  muster bench --endpoints 127.0.0.1:2379 range --keys 100000 -o json
  muster bench watch --watchers 1000 --puts 200 --put-interval 20ms
  muster bench keepalive --leases 1000 --clients 64 --rate 0
  muster bench populate --keys 100000 --key-size 32 --value-size 256
  muster bench ready --ready-timeout 30s")]
pub struct BenchArgs {
    /// The workload to run.
    #[arg(value_enum)]
    workload: Workload,
    /// Concurrent clients (put, range, txn, populate) or keep-alive streams
    /// (keepalive).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    clients: u32,
    /// HTTP/2 connections [default: one per 8 clients; watch: one per
    /// stream].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    conns: Option<u32>,
    /// How long put, range, txn and keepalive run (e.g. 10s, 500ms, 1m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Key size in bytes: the prefix, then the key's zero-padded index.
    #[arg(long, default_value_t = 32)]
    key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Keyspace: put, range and txn pick among this many keys; populate
    /// writes them all.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    keys: u64,
    /// Prefix of every key written.
    #[arg(long, default_value = "bench/")]
    key_prefix: String,
    /// range: serializable reads (etcd serves them without a consensus
    /// round); default linearizable, as etcdctl.
    #[arg(long)]
    serializable: bool,
    /// keepalive: leases granted, then kept alive (revoked at the end).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    leases: u32,
    /// keepalive: TTL of the leases, in seconds.
    #[arg(long, default_value_t = 60)]
    lease_ttl: i64,
    /// keepalive: keep-alives per second over all streams, paced; 0: as
    /// fast as possible, one in flight per stream.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// watch: watchers on the key.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    watchers: u32,
    /// watch: streams the watchers are spread over.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    watch_streams: u32,
    /// watch: puts to the watched key.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    puts: u32,
    /// watch: pause between the starts of two puts.
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    put_interval: Duration,
    /// ready: give up after this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    ready_timeout: Duration,
}

/// What `muster bench` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Concurrent puts of random keys.
    Put,
    /// Concurrent single-key gets (populates the keyspace first if needed).
    Range,
    /// Compare-and-put transactions: compare the key's version, then put.
    Txn,
    /// Leases kept alive on keep-alive streams.
    Keepalive,
    /// Watchers on one key, then paced puts: put-to-watcher latency.
    Watch,
    /// Writes the whole keyspace once, in transactions of up to 128 puts.
    Populate,
    /// Waits for the first successful Range (for restart measurements).
    Ready,
}

/// Runs the workload and prints its report. Fails (after printing the
/// report) if any request failed.
pub async fn run(global: &GlobalArgs, args: BenchArgs) -> anyhow::Result<()> {
    let endpoints = global.endpoint_urls()?;
    let keys = KeySpace::new(&args.key_prefix, args.key_size, args.keys)?;
    let report = match args.workload {
        Workload::Put => bench_put(&args, &endpoints, &keys).await?,
        Workload::Range => bench_range(&args, &endpoints, &keys).await?,
        Workload::Txn => bench_txn(&args, &endpoints, &keys).await?,
        Workload::Keepalive => bench_keepalive(&args, &endpoints).await?,
        Workload::Watch => bench_watch(&args, &endpoints).await?,
        Workload::Populate => bench_populate(&args, &endpoints, &keys).await?,
        Workload::Ready => bench_ready(&args, &endpoints, &keys).await?,
    };
    let mut out = String::new();
    match global.output {
        Output::Table => {
            for line in &report.text {
                out.push_str(line);
                out.push('\n');
            }
        }
        Output::Json => {
            let mut fields = vec![
                ("workload", Json::Str(report.workload.to_string())),
                (
                    "endpoints",
                    Json::List(endpoints.iter().cloned().map(Json::Str).collect()),
                ),
            ];
            fields.extend(report.json);
            if let Some(failure) = &report.failure {
                fields.push(("failure", Json::Str(failure.clone())));
            }
            out.push_str(&Json::Obj(fields).render());
            out.push('\n');
        }
    }
    // A closed pipe (`| head -1`) is the reader's choice, not a failure.
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(e).context("cannot write the report");
        }
        _ => {}
    }
    match report.failure {
        Some(failure) => bail!("bench {}: {failure}", report.workload),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// Flags and keys

impl BenchArgs {
    /// Connections for `clients` clients.
    fn conns_for(&self, clients: usize) -> usize {
        self.conns
            .map_or(clients.div_ceil(8), |c| c as usize)
            .clamp(1, clients.max(1))
    }
}

/// The benchmark's keys: the prefix, then the index zero-padded to fill the
/// key size, so they sort by index.
#[derive(Debug, Clone)]
struct KeySpace {
    prefix: Vec<u8>,
    width: usize,
    count: u64,
}

impl KeySpace {
    fn new(prefix: &str, key_size: usize, count: u64) -> anyhow::Result<KeySpace> {
        let digits = (count - 1).max(1).ilog10() as usize + 1;
        let needed = prefix.len() + digits;
        if key_size < needed {
            bail!(
                "--key-size {key_size} is too small for --key-prefix {prefix:?} and --keys {count} \
                 (needs at least {needed})"
            );
        }
        Ok(KeySpace {
            prefix: prefix.as_bytes().to_vec(),
            width: key_size - prefix.len(),
            count,
        })
    }

    fn key(&self, index: u64) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.prefix.len() + self.width);
        key.extend_from_slice(&self.prefix);
        let digits = format!("{index:0width$}", width = self.width);
        key.extend_from_slice(digits.as_bytes());
        key
    }

    /// The end of `[key(0), key(count))`.
    fn range_end(&self) -> Vec<u8> {
        let digits = self.count.max(1).ilog10() as usize + 1;
        if digits <= self.width {
            self.key(self.count)
        } else {
            // Past the last index of this width: the end of the prefix's
            // digit keys.
            let mut end = self.prefix.clone();
            end.push(b'9' + 1);
            end
        }
    }

    fn index(&self, key: &[u8]) -> Option<u64> {
        let digits = key.strip_prefix(self.prefix.as_slice())?;
        std::str::from_utf8(digits).ok()?.parse().ok()
    }
}

/// splitmix64: plenty for picking keys.
struct Rng(u64);

impl Rng {
    fn new(stream: u64) -> Rng {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng(now ^ stream.wrapping_mul(0xA076_1D64_78BD_642F))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// A value of `size` printable random bytes.
fn random_value(size: usize, stream: u64) -> Vec<u8> {
    let mut rng = Rng::new(stream);
    (0..size).map(|_| b'a' + (rng.below(26) as u8)).collect()
}

// ---------------------------------------------------------------------------
// Connections and errors

/// Opens `n` connections, spread over the endpoints, and checks that each
/// endpoint answers a Range.
async fn connect(endpoints: &[String], n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut set = JoinSet::new();
    for i in 0..n {
        let url = endpoints[i % endpoints.len()].clone();
        set.spawn(async move { (i, connect_one(&url).await) });
    }
    let mut channels: Vec<Option<Channel>> = vec![None; n];
    while let Some(joined) = set.join_next().await {
        let (i, channel) = joined.context("a connecting task failed")?;
        channels[i] = Some(channel?);
    }
    let channels: Vec<Channel> = channels.into_iter().flatten().collect();
    for (i, url) in endpoints.iter().enumerate().take(n) {
        probe(channels[i].clone(), url).await?;
    }
    Ok(channels)
}

async fn connect_one(url: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(url.to_string())
        .with_context(|| format!("invalid endpoint {url}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| anyhow!("cannot connect to {url}: {}", error_chain(&e)))
}

/// Fails unless `url` answers a Range within a few seconds.
async fn probe(channel: Channel, url: &str) -> anyhow::Result<()> {
    let request = pb::RangeRequest {
        key: b"muster-bench-probe".to_vec(),
        count_only: true,
        ..Default::default()
    };
    match tokio::time::timeout(
        Duration::from_secs(10),
        KvClient::new(channel).range(request),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => bail!(
            "{url} does not answer etcd's KV.Range: {}",
            status_text(&status)
        ),
        Err(_) => bail!("{url} did not answer a Range within 10 s"),
    }
}

/// An error with its sources, on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let more = e.to_string();
        if !text.contains(&more) {
            let _ = write!(text, ": {more}");
        }
        source = e.source();
    }
    text
}

/// A gRPC status on one line: code, message, transport cause.
fn status_text(status: &tonic::Status) -> String {
    let mut text = format!("{:?}", status.code());
    if !status.message().is_empty() {
        let _ = write!(text, ": {}", status.message());
    }
    if let Some(source) = std::error::Error::source(status) {
        let cause = error_chain(source);
        if !text.contains(&cause) {
            let _ = write!(text, " ({cause})");
        }
    }
    text
}

// ---------------------------------------------------------------------------
// Measurements

/// Latencies (in nanoseconds) and failures of one or more clients.
#[derive(Debug, Default)]
struct Recorder {
    latencies: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
    in_a_row: u32,
}

impl Recorder {
    fn ok(&mut self, started: Instant) {
        self.latencies.push(nanos(started.elapsed()));
        self.in_a_row = 0;
    }

    fn err(&mut self, error: String) {
        self.errors += 1;
        self.in_a_row += 1;
        self.first_error.get_or_insert(error);
    }

    fn gave_up(&self) -> bool {
        self.in_a_row >= GIVE_UP_AFTER
    }

    fn merge(&mut self, other: Recorder) {
        self.latencies.extend(other.latencies);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// The failure line, if any request failed.
    fn failure(&self) -> Option<String> {
        (self.errors > 0).then(|| {
            format!(
                "{} of {} requests failed; first: {}",
                self.errors,
                self.errors + self.latencies.len() as u64,
                self.first_error.as_deref().unwrap_or("?")
            )
        })
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Exact percentiles of a set of samples.
#[derive(Debug, Clone, Copy)]
struct Summary {
    count: usize,
    mean: u64,
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

impl Summary {
    fn of(mut samples: Vec<u64>) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
        Some(Summary {
            count: samples.len(),
            mean: (sum / samples.len() as u128) as u64,
            p50: percentile(&samples, 0.50),
            p90: percentile(&samples, 0.90),
            p99: percentile(&samples, 0.99),
            p999: percentile(&samples, 0.999),
            max: samples[samples.len() - 1],
        })
    }

    fn text(&self) -> String {
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

    fn json(&self) -> Json {
        let f = |n: u64| Json::Num(n as f64 / 1e6);
        Json::Obj(vec![
            ("samples", Json::Int(self.count as i64)),
            ("p50", f(self.p50)),
            ("p90", f(self.p90)),
            ("p99", f(self.p99)),
            ("p999", f(self.p999)),
            ("max", f(self.max)),
            ("mean", f(self.mean)),
        ])
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[u64], q: f64) -> u64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Nanoseconds as milliseconds, for people.
fn ms(nanos: u64) -> String {
    let ms = nanos as f64 / 1e6;
    if ms < 10.0 {
        format!("{ms:.3} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

fn latency_json(samples: Vec<u64>) -> Json {
    Summary::of(samples).map_or(Json::Null, |s| s.json())
}

fn latency_text(samples: Vec<u64>) -> String {
    Summary::of(samples).map_or_else(|| "no samples".to_string(), |s| s.text())
}

/// What a workload reports.
struct Report {
    workload: &'static str,
    text: Vec<String>,
    json: Vec<(&'static str, Json)>,
    /// Set when requests failed: printed, then the command fails.
    failure: Option<String>,
}

/// The report of a closed-loop workload: throughput and latency.
#[allow(clippy::too_many_arguments)]
fn closed_loop_report(
    workload: &'static str,
    what: String,
    clients: usize,
    conns: usize,
    recorder: Recorder,
    elapsed: Duration,
    mut extra_text: Vec<String>,
    extra_json: Vec<(&'static str, Json)>,
) -> Report {
    let ops = recorder.latencies.len() as u64;
    let rate = ops as f64 / elapsed.as_secs_f64().max(1e-9);
    let failure = recorder.failure();
    let summary = Summary::of(recorder.latencies);
    let mut text = vec![format!(
        "{workload}: {what}, {clients} clients over {conns} connections, {:.2} s: \
         {ops} ops, {rate:.0} ops/s, {} errors",
        elapsed.as_secs_f64(),
        recorder.errors
    )];
    text.push(format!(
        "{workload}: latency {}",
        summary.map_or_else(|| "no samples".to_string(), |s| s.text())
    ));
    text.append(&mut extra_text);
    let mut json = vec![
        ("clients", Json::Int(clients as i64)),
        ("connections", Json::Int(conns as i64)),
        ("seconds", Json::Num(elapsed.as_secs_f64())),
        ("ops", Json::Int(ops as i64)),
        ("ops_per_sec", Json::Num(rate)),
        ("errors", Json::Int(recorder.errors as i64)),
        ("latency_ms", summary.map_or(Json::Null, |s| s.json())),
    ];
    json.extend(extra_json);
    Report {
        workload,
        text,
        json,
        failure,
    }
}

/// Runs `n` clients until each finishes (they watch the deadline
/// themselves); returns their merged records and the wall time.
async fn run_clients<F, Fut>(
    n: usize,
    duration: Option<Duration>,
    make: F,
) -> anyhow::Result<(Recorder, Duration)>
where
    F: Fn(usize, Option<Instant>) -> Fut,
    Fut: Future<Output = Recorder> + Send + 'static,
{
    let start = Instant::now();
    let deadline = duration.map(|d| start + d);
    let mut set = JoinSet::new();
    for client in 0..n {
        set.spawn(make(client, deadline));
    }
    let mut all = Recorder::default();
    while let Some(joined) = set.join_next().await {
        all.merge(joined.context("a client task failed")?);
    }
    Ok((all, start.elapsed()))
}

fn before(deadline: Option<Instant>) -> bool {
    deadline.is_none_or(|d| Instant::now() < d)
}

// ---------------------------------------------------------------------------
// Workloads

async fn bench_put(
    args: &BenchArgs,
    endpoints: &[String],
    keys: &KeySpace,
) -> anyhow::Result<Report> {
    let clients = args.clients as usize;
    let conns = args.conns_for(clients);
    let channels = connect(endpoints, conns).await?;
    let (recorder, elapsed) = run_clients(clients, Some(args.duration), |c, deadline| {
        let mut kv = KvClient::new(channels[c % conns].clone());
        let keys = keys.clone();
        let value = random_value(args.value_size, c as u64);
        async move {
            let mut rng = Rng::new(c as u64);
            let mut rec = Recorder::default();
            while before(deadline) && !rec.gave_up() {
                let request = pb::PutRequest {
                    key: keys.key(rng.below(keys.count)),
                    value: value.clone(),
                    ..Default::default()
                };
                let started = Instant::now();
                match kv.put(request).await {
                    Ok(_) => rec.ok(started),
                    Err(status) => rec.err(status_text(&status)),
                }
            }
            rec
        }
    })
    .await?;
    Ok(closed_loop_report(
        "put",
        format!(
            "random keys of {} ({} B keys, {} B values)",
            keys.count, args.key_size, args.value_size
        ),
        clients,
        conns,
        recorder,
        elapsed,
        Vec::new(),
        Vec::new(),
    ))
}

async fn bench_range(
    args: &BenchArgs,
    endpoints: &[String],
    keys: &KeySpace,
) -> anyhow::Result<Report> {
    let clients = args.clients as usize;
    let conns = args.conns_for(clients);
    let channels = connect(endpoints, conns).await?;
    let present = count_keys(channels[0].clone(), keys).await?;
    let mut text = Vec::new();
    let mut json = Vec::new();
    if present < keys.count {
        let (rec, elapsed) = populate(&channels, keys, args.value_size, clients).await?;
        if let Some(failure) = rec.failure() {
            bail!("populating the keyspace: {failure}");
        }
        text.push(format!(
            "range: populated {} keys first, in {:.2} s",
            keys.count,
            elapsed.as_secs_f64()
        ));
        json.push(("populated_seconds", Json::Num(elapsed.as_secs_f64())));
    }
    let misses = Arc::new(AtomicU64::new(0));
    let serializable = args.serializable;
    let (recorder, elapsed) = run_clients(clients, Some(args.duration), |c, deadline| {
        let mut kv = KvClient::new(channels[c % conns].clone());
        let keys = keys.clone();
        let misses = misses.clone();
        async move {
            let mut rng = Rng::new(c as u64);
            let mut rec = Recorder::default();
            while before(deadline) && !rec.gave_up() {
                let request = pb::RangeRequest {
                    key: keys.key(rng.below(keys.count)),
                    serializable,
                    ..Default::default()
                };
                let started = Instant::now();
                match kv.range(request).await {
                    Ok(resp) => {
                        rec.ok(started);
                        if resp.get_ref().kvs.is_empty() {
                            misses.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(status) => rec.err(status_text(&status)),
                }
            }
            rec
        }
    })
    .await?;
    let misses = misses.load(Ordering::Relaxed);
    if misses > 0 {
        text.push(format!("range: {misses} gets found no key"));
    }
    json.push(("misses", Json::Int(misses as i64)));
    json.push(("serializable", Json::Bool(serializable)));
    Ok(closed_loop_report(
        "range",
        format!(
            "{} single-key gets among {} keys",
            if serializable {
                "serializable"
            } else {
                "linearizable"
            },
            keys.count
        ),
        clients,
        conns,
        recorder,
        elapsed,
        text,
        json,
    ))
}

/// How many of the keyspace's keys exist.
async fn count_keys(channel: Channel, keys: &KeySpace) -> anyhow::Result<u64> {
    let resp = KvClient::new(channel)
        .range(pb::RangeRequest {
            key: keys.key(0),
            range_end: keys.range_end(),
            count_only: true,
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow!("counting the keyspace: {}", status_text(&s)))?;
    Ok(u64::try_from(resp.get_ref().count).unwrap_or(0))
}

/// Writes every key of the keyspace, in transactions of up to
/// [`POPULATE_BATCH`] puts, `clients` at a time.
async fn populate(
    channels: &[Channel],
    keys: &KeySpace,
    value_size: usize,
    clients: usize,
) -> anyhow::Result<(Recorder, Duration)> {
    let batches = keys.count.div_ceil(POPULATE_BATCH);
    let next = Arc::new(AtomicU64::new(0));
    let clients = clients.min(batches as usize).max(1);
    run_clients(clients, None, |c, _| {
        let mut kv = KvClient::new(channels[c % channels.len()].clone());
        let keys = keys.clone();
        let next = next.clone();
        let value = random_value(value_size, c as u64);
        async move {
            let mut rec = Recorder::default();
            loop {
                let batch = next.fetch_add(1, Ordering::Relaxed);
                if batch >= batches || rec.gave_up() {
                    break;
                }
                let first = batch * POPULATE_BATCH;
                let last = (first + POPULATE_BATCH).min(keys.count);
                let success = (first..last)
                    .map(|i| pb::RequestOp {
                        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                            key: keys.key(i),
                            value: value.clone(),
                            ..Default::default()
                        })),
                    })
                    .collect();
                let started = Instant::now();
                match kv
                    .txn(pb::TxnRequest {
                        compare: Vec::new(),
                        success,
                        failure: Vec::new(),
                    })
                    .await
                {
                    Ok(_) => rec.ok(started),
                    Err(status) => rec.err(status_text(&status)),
                }
            }
            rec
        }
    })
    .await
}

async fn bench_populate(
    args: &BenchArgs,
    endpoints: &[String],
    keys: &KeySpace,
) -> anyhow::Result<Report> {
    let clients = args.clients as usize;
    let conns = args.conns_for(clients);
    let channels = connect(endpoints, conns).await?;
    let (recorder, elapsed) = populate(&channels, keys, args.value_size, clients).await?;
    let txns = recorder.latencies.len() as u64;
    let written = if recorder.errors == 0 {
        keys.count
    } else {
        (txns * POPULATE_BATCH).min(keys.count)
    };
    let rate = written as f64 / elapsed.as_secs_f64().max(1e-9);
    let failure = recorder.failure();
    let text = vec![
        format!(
            "populate: {written} keys ({} B keys, {} B values) in {txns} txns of up to \
             {POPULATE_BATCH} puts, {clients} clients over {conns} connections, {:.2} s: \
             {rate:.0} keys/s, {} errors",
            args.key_size,
            args.value_size,
            elapsed.as_secs_f64(),
            recorder.errors
        ),
        format!(
            "populate: txn latency {}",
            latency_text(recorder.latencies.clone())
        ),
    ];
    let json = vec![
        ("keys", Json::Int(written as i64)),
        ("key_size", Json::Int(args.key_size as i64)),
        ("value_size", Json::Int(args.value_size as i64)),
        ("txns", Json::Int(txns as i64)),
        ("clients", Json::Int(clients as i64)),
        ("connections", Json::Int(conns as i64)),
        ("seconds", Json::Num(elapsed.as_secs_f64())),
        ("keys_per_sec", Json::Num(rate)),
        ("errors", Json::Int(recorder.errors as i64)),
        ("txn_latency_ms", latency_json(recorder.latencies)),
    ];
    Ok(Report {
        workload: "populate",
        text,
        json,
        failure,
    })
}

/// The version of every existing key of the keyspace, read page by page.
async fn key_versions(channel: Channel, keys: &KeySpace) -> anyhow::Result<HashMap<u64, i64>> {
    let mut kv = KvClient::new(channel);
    let mut versions = HashMap::new();
    let mut from = keys.key(0);
    let end = keys.range_end();
    loop {
        let resp = kv
            .range(pb::RangeRequest {
                key: from.clone(),
                range_end: end.clone(),
                keys_only: true,
                limit: 5000,
                ..Default::default()
            })
            .await
            .map_err(|s| anyhow!("reading key versions: {}", status_text(&s)))?
            .into_inner();
        for kv in &resp.kvs {
            if let Some(index) = keys.index(&kv.key) {
                versions.insert(index, kv.version);
            }
        }
        match resp.kvs.last() {
            Some(last) if resp.more => {
                from = last.key.clone();
                from.push(0);
            }
            _ => break,
        }
    }
    Ok(versions)
}

async fn bench_txn(
    args: &BenchArgs,
    endpoints: &[String],
    keys: &KeySpace,
) -> anyhow::Result<Report> {
    let clients = args.clients as usize;
    let conns = args.conns_for(clients);
    let channels = connect(endpoints, conns).await?;
    // Each client owns the keys whose index is its number modulo the number
    // of clients, so its compares succeed once it knows their versions.
    let known = key_versions(channels[0].clone(), keys).await?;
    let conflicts = Arc::new(AtomicU64::new(0));
    let (recorder, elapsed) = run_clients(clients, Some(args.duration), |c, deadline| {
        let mut kv = KvClient::new(channels[c % conns].clone());
        let keys = keys.clone();
        let value = random_value(args.value_size, c as u64);
        let stride = clients as u64;
        let owned = keys.count.saturating_sub(c as u64).div_ceil(stride);
        let mut versions: HashMap<u64, i64> = known
            .iter()
            .filter(|(i, _)| *i % stride == c as u64)
            .map(|(i, v)| (*i, *v))
            .collect();
        let conflicts = conflicts.clone();
        async move {
            let mut rng = Rng::new(c as u64);
            let mut rec = Recorder::default();
            while owned > 0 && before(deadline) && !rec.gave_up() {
                let index = c as u64 + stride * rng.below(owned);
                let key = keys.key(index);
                let version = versions.get(&index).copied().unwrap_or(0);
                let request = pb::TxnRequest {
                    compare: vec![pb::Compare {
                        result: pb::compare::CompareResult::Equal as i32,
                        target: pb::compare::CompareTarget::Version as i32,
                        key: key.clone(),
                        target_union: Some(pb::compare::TargetUnion::Version(version)),
                        range_end: Vec::new(),
                    }],
                    success: vec![pb::RequestOp {
                        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                            key: key.clone(),
                            value: value.clone(),
                            ..Default::default()
                        })),
                    }],
                    failure: vec![pb::RequestOp {
                        request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
                            key,
                            ..Default::default()
                        })),
                    }],
                };
                let started = Instant::now();
                match kv.txn(request).await {
                    Ok(resp) => {
                        rec.ok(started);
                        let resp = resp.into_inner();
                        if resp.succeeded {
                            versions.insert(index, version + 1);
                        } else {
                            conflicts.fetch_add(1, Ordering::Relaxed);
                            let seen = resp
                                .responses
                                .iter()
                                .find_map(|op| match &op.response {
                                    Some(pb::response_op::Response::ResponseRange(r)) => {
                                        Some(r.kvs.first().map_or(0, |kv| kv.version))
                                    }
                                    _ => None,
                                })
                                .unwrap_or(0);
                            versions.insert(index, seen);
                        }
                    }
                    Err(status) => rec.err(status_text(&status)),
                }
            }
            rec
        }
    })
    .await?;
    let conflicts = conflicts.load(Ordering::Relaxed);
    let ops = recorder.latencies.len() as u64;
    Ok(closed_loop_report(
        "txn",
        format!(
            "compare-version-and-put among {} keys ({} B keys, {} B values)",
            keys.count, args.key_size, args.value_size
        ),
        clients,
        conns,
        recorder,
        elapsed,
        vec![format!(
            "txn: {} succeeded, {conflicts} failed their compare",
            ops - conflicts
        )],
        vec![
            ("succeeded", Json::Int((ops - conflicts) as i64)),
            ("compare_failed", Json::Int(conflicts as i64)),
        ],
    ))
}

/// Grants `n` leases, up to 64 at a time.
async fn grant_leases(channels: &[Channel], n: usize, ttl: i64) -> anyhow::Result<Vec<i64>> {
    let workers = n.clamp(1, 64);
    let mut set = JoinSet::new();
    for w in 0..workers {
        let mut lease = LeaseClient::new(channels[w % channels.len()].clone());
        let count = n / workers + usize::from(w < n % workers);
        set.spawn(async move {
            let mut ids = Vec::with_capacity(count);
            for _ in 0..count {
                let resp = lease
                    .lease_grant(pb::LeaseGrantRequest { ttl, id: 0 })
                    .await
                    .map_err(|s| anyhow!("granting a lease: {}", status_text(&s)))?;
                ids.push(resp.into_inner().id);
            }
            anyhow::Ok(ids)
        });
    }
    let mut ids = Vec::with_capacity(n);
    while let Some(joined) = set.join_next().await {
        ids.extend(joined.context("a granting task failed")??);
    }
    Ok(ids)
}

/// Revokes leases, up to 64 at a time; failures are ignored.
async fn revoke_leases(channels: &[Channel], ids: Vec<i64>) {
    let workers = ids.len().clamp(1, 64);
    let ids = Arc::new(ids);
    let next = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for w in 0..workers {
        let mut lease = LeaseClient::new(channels[w % channels.len()].clone());
        let ids = ids.clone();
        let next = next.clone();
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(&id) = ids.get(i) else { break };
                let _ = lease.lease_revoke(pb::LeaseRevokeRequest { id }).await;
            }
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while set.join_next().await.is_some() {}
    })
    .await;
}

async fn bench_keepalive(args: &BenchArgs, endpoints: &[String]) -> anyhow::Result<Report> {
    let leases = args.leases as usize;
    let streams = (args.clients as usize).min(leases);
    let conns = args.conns_for(streams);
    let channels = connect(endpoints, conns).await?;
    let ids = grant_leases(&channels, leases, args.lease_ttl).await?;
    // Seconds between two keep-alives of one stream; None: closed loop.
    let period =
        (args.rate > 0).then(|| Duration::from_secs_f64(streams as f64 / args.rate as f64));
    let (recorder, elapsed) = run_clients(streams, Some(args.duration), |s, deadline| {
        let client = LeaseClient::new(channels[s % conns].clone());
        let mine: Vec<i64> = ids.iter().skip(s).step_by(streams).copied().collect();
        keepalive_stream(client, mine, deadline, period)
    })
    .await?;
    revoke_leases(&channels, ids).await;
    let mode = match args.rate {
        0 => "as fast as possible, one in flight per stream".to_string(),
        rate => format!("paced at {rate}/s"),
    };
    Ok(closed_loop_report(
        "keepalive",
        format!("{leases} leases (TTL {} s), {mode}", args.lease_ttl),
        streams,
        conns,
        recorder,
        elapsed,
        Vec::new(),
        vec![
            ("leases", Json::Int(leases as i64)),
            ("rate", Json::Int(args.rate as i64)),
        ],
    ))
}

/// One keep-alive stream renewing `ids` in turn until the deadline.
async fn keepalive_stream(
    mut client: LeaseClient<Channel>,
    ids: Vec<i64>,
    deadline: Option<Instant>,
    period: Option<Duration>,
) -> Recorder {
    const MAX_PENDING: usize = 4096;
    let mut rec = Recorder::default();
    if ids.is_empty() {
        return rec;
    }
    let (tx, rx) = mpsc::channel(MAX_PENDING);
    // A first keep-alive, not measured, queued before the call: etcd (like
    // any grpc-go server) sends the response headers, which the call waits
    // for, only with its first response.
    let warmup = pb::LeaseKeepAliveRequest { id: ids[0] };
    if tx.send(warmup).await.is_err() {
        rec.err("the keep-alive stream closed".to_string());
        return rec;
    }
    let opened = async {
        let mut responses = client
            .lease_keep_alive(ReceiverStream::new(rx))
            .await?
            .into_inner();
        responses.message().await?;
        Ok::<_, tonic::Status>(responses)
    };
    let mut responses = match tokio::time::timeout(STREAM_TIMEOUT, opened).await {
        Ok(Ok(responses)) => responses,
        Ok(Err(status)) => {
            rec.err(format!(
                "opening a keep-alive stream: {}",
                status_text(&status)
            ));
            return rec;
        }
        Err(_) => {
            rec.err(format!("no keep-alive response within {STREAM_TIMEOUT:?}"));
            return rec;
        }
    };
    let mut ticker = period.map(|p| {
        let mut ticker = tokio::time::interval(p);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker
    });
    let mut pending: VecDeque<(i64, Instant)> = VecDeque::new();
    let mut next = 0;
    loop {
        let open = before(deadline) && !rec.gave_up();
        if !open && pending.is_empty() {
            break;
        }
        let send_now = open
            && match ticker {
                None => pending.is_empty(),
                Some(_) => false,
            };
        let tick_allowed = open && ticker.is_some() && pending.len() < MAX_PENDING;
        if send_now {
            let id = ids[next % ids.len()];
            next += 1;
            pending.push_back((id, Instant::now()));
            if tx.send(pb::LeaseKeepAliveRequest { id }).await.is_err() {
                rec.err("the keep-alive stream closed".to_string());
                break;
            }
            continue;
        }
        tokio::select! {
            _ = async { ticker.as_mut().map(|t| t.tick()).expect("ticker").await }, if tick_allowed => {
                let id = ids[next % ids.len()];
                next += 1;
                pending.push_back((id, Instant::now()));
                if tx.send(pb::LeaseKeepAliveRequest { id }).await.is_err() {
                    rec.err("the keep-alive stream closed".to_string());
                    break;
                }
            }
            msg = tokio::time::timeout(STREAM_TIMEOUT, responses.message()), if !pending.is_empty() => {
                match msg {
                    Ok(Ok(Some(resp))) => {
                        let Some((id, started)) = pending.pop_front() else {
                            rec.err("an unasked keep-alive response".to_string());
                            break;
                        };
                        if resp.id != id {
                            rec.err(format!("keep-alive response for lease {:x}, expected {id:x}", resp.id));
                        } else if resp.ttl <= 0 {
                            rec.err(format!("lease {id:x} not found"));
                        } else {
                            rec.ok(started);
                        }
                    }
                    Ok(Ok(None)) => {
                        rec.err("the server closed the keep-alive stream".to_string());
                        break;
                    }
                    Ok(Err(status)) => {
                        rec.err(status_text(&status));
                        break;
                    }
                    Err(_) => {
                        rec.err(format!("no keep-alive response within {STREAM_TIMEOUT:?}"));
                        break;
                    }
                }
            }
        }
    }
    drop(tx);
    rec
}

async fn bench_watch(args: &BenchArgs, endpoints: &[String]) -> anyhow::Result<Report> {
    let watchers = args.watchers as usize;
    let streams = (args.watch_streams as usize).min(watchers);
    let conns = args.conns.map_or(streams, |c| c as usize).clamp(1, streams);
    let puts = args.puts as usize;
    // One more connection for the puts.
    let channels = connect(endpoints, conns + 1).await?;
    let key = format!("{}watch", args.key_prefix).into_bytes();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(streams);
    let mut ready = Vec::with_capacity(streams);
    for s in 0..streams {
        let n = watchers / streams + usize::from(s < watchers % streams);
        let mut client = WatchClient::new(channels[s % conns].clone());
        let (tx, rx) = mpsc::channel(n + 16);
        for _ in 0..n {
            let create = pb::WatchRequest {
                request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                    pb::WatchCreateRequest {
                        key: key.clone(),
                        ..Default::default()
                    },
                )),
            };
            tx.send(create)
                .await
                .map_err(|_| anyhow!("the watch request stream closed"))?;
        }
        let responses = client
            .watch(ReceiverStream::new(rx))
            .await
            .map_err(|s| anyhow!("opening a watch stream: {}", status_text(&s)))?
            .into_inner();
        let (ready_tx, ready_rx) = oneshot::channel();
        ready.push(ready_rx);
        tasks.push(tokio::spawn(watch_stream(
            responses,
            tx,
            n,
            n * puts,
            ready_tx,
            stop_rx.clone(),
        )));
    }
    for (s, ready_rx) in ready.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(60), ready_rx).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                let _ = stop_tx.send(true);
                let error = match tasks.swap_remove(s).await {
                    Ok(Err(e)) => e,
                    _ => "the watch stream ended".to_string(),
                };
                bail!("creating watchers: {error}");
            }
            Err(_) => bail!("watchers were not all created within 60 s"),
        }
    }

    let mut kv = KvClient::new(channels[conns].clone());
    let value = random_value(args.value_size, 0);
    let mut sent: HashMap<i64, Instant> = HashMap::with_capacity(puts);
    let mut acks = Recorder::default();
    let mut ticker = tokio::time::interval(args.put_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for _ in 0..puts {
        ticker.tick().await;
        let started = Instant::now();
        match kv
            .put(pb::PutRequest {
                key: key.clone(),
                value: value.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(resp) => {
                acks.ok(started);
                let revision = resp.get_ref().header.map_or(0, |h| h.revision);
                sent.insert(revision, started);
            }
            Err(status) => acks.err(status_text(&status)),
        }
        if acks.gave_up() {
            break;
        }
    }
    // Watchers stop once they have every event; the rest get a grace time.
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(STREAM_TIMEOUT).await;
        let _ = stop_tx.send(true);
    });
    let mut samples = Vec::with_capacity(watchers * sent.len());
    // For each put, when its last watcher got it.
    let mut last_seen: HashMap<i64, Instant> = HashMap::with_capacity(sent.len());
    let mut foreign = 0u64;
    let mut stream_errors = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok(events)) => {
                for (revision, seen) in events {
                    match sent.get(&revision) {
                        Some(&started) => {
                            samples.push(nanos(seen.saturating_duration_since(started)));
                            let last = last_seen.entry(revision).or_insert(seen);
                            *last = (*last).max(seen);
                        }
                        None => foreign += 1,
                    }
                }
            }
            Ok(Err(e)) => stream_errors.push(e),
            Err(e) => stream_errors.push(format!("a watch task failed: {e}")),
        }
    }
    stopper.abort();
    let all_reached: Vec<u64> = last_seen
        .iter()
        .map(|(rev, seen)| nanos(seen.saturating_duration_since(sent[rev])))
        .collect();
    let expected = watchers * sent.len();
    let received = samples.len();
    let missing = expected.saturating_sub(received);
    let mut failure = acks.failure();
    if failure.is_none() {
        if let Some(e) = stream_errors.first() {
            failure = Some(format!(
                "{} watch streams failed; first: {e}",
                stream_errors.len()
            ));
        } else if missing > 0 {
            failure = Some(format!(
                "{missing} of {expected} notifications did not arrive within {STREAM_TIMEOUT:?}"
            ));
        }
    }
    let text = vec![
        format!(
            "watch: {watchers} watchers on one key over {streams} streams ({conns} connections), \
             {} puts every {:?}: {received} of {expected} notifications",
            sent.len(),
            args.put_interval
        ),
        format!(
            "watch: put -> each watcher {}",
            latency_text(samples.clone())
        ),
        format!(
            "watch: put -> all watchers {}",
            latency_text(all_reached.clone())
        ),
        format!("watch: put -> ack {}", latency_text(acks.latencies.clone())),
    ];
    let json = vec![
        ("watchers", Json::Int(watchers as i64)),
        ("streams", Json::Int(streams as i64)),
        ("connections", Json::Int(conns as i64)),
        ("puts", Json::Int(sent.len() as i64)),
        (
            "put_interval_ms",
            Json::Num(args.put_interval.as_secs_f64() * 1e3),
        ),
        ("notifications", Json::Int(received as i64)),
        ("expected", Json::Int(expected as i64)),
        ("foreign_events", Json::Int(foreign as i64)),
        ("watch_latency_ms", latency_json(samples)),
        ("all_watchers_latency_ms", latency_json(all_reached)),
        ("put_latency_ms", latency_json(acks.latencies)),
    ];
    Ok(Report {
        workload: "watch",
        text,
        json,
        failure,
    })
}

/// Reads one watch stream: waits for its `watchers` to be created (then
/// signals `ready`), then records `(revision, arrival)` of each event until
/// it has `expected` of them or is told to stop.
async fn watch_stream(
    mut responses: tonic::Streaming<pb::WatchResponse>,
    // Dropping it would close the stream: kept until done.
    _requests: mpsc::Sender<pb::WatchRequest>,
    watchers: usize,
    expected: usize,
    ready: oneshot::Sender<()>,
    mut stop: watch::Receiver<bool>,
) -> Result<Vec<(i64, Instant)>, String> {
    let mut ready = Some(ready);
    let mut created = 0;
    let mut events = Vec::with_capacity(expected);
    while events.len() < expected || ready.is_some() {
        tokio::select! {
            biased;
            msg = responses.message() => {
                let now = Instant::now();
                match msg {
                    Ok(Some(resp)) => {
                        if resp.canceled {
                            return Err(format!(
                                "watch {} canceled: {}",
                                resp.watch_id, resp.cancel_reason
                            ));
                        }
                        if resp.created {
                            created += 1;
                            if created == watchers
                                && let Some(ready) = ready.take()
                            {
                                let _ = ready.send(());
                            }
                        }
                        for event in &resp.events {
                            if let Some(kv) = &event.kv {
                                events.push((kv.mod_revision, now));
                            }
                        }
                    }
                    Ok(None) => return Err("the server closed the watch stream".to_string()),
                    Err(status) => return Err(status_text(&status)),
                }
            }
            _ = stop.changed() => break,
        }
    }
    Ok(events)
}

async fn bench_ready(
    args: &BenchArgs,
    endpoints: &[String],
    keys: &KeySpace,
) -> anyhow::Result<Report> {
    let url = &endpoints[0];
    let start = Instant::now();
    let deadline = start + args.ready_timeout;
    let mut attempts = 0u64;
    let mut last_error = String::new();
    let found = loop {
        attempts += 1;
        let attempt = async {
            let channel = connect_one(url).await?;
            let resp = KvClient::new(channel)
                .range(pb::RangeRequest {
                    key: keys.key(0),
                    ..Default::default()
                })
                .await
                .map_err(|s| anyhow!("{}", status_text(&s)))?;
            anyhow::Ok(!resp.get_ref().kvs.is_empty())
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, attempt).await {
            Ok(Ok(found)) => break found,
            Ok(Err(e)) => last_error = format!("{e:#}"),
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            bail!(
                "{url}: no successful Range within {:?} ({attempts} attempts); last error: {last_error}",
                args.ready_timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let waited = start.elapsed();
    let unix_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| nanos(d) as i64);
    let key = String::from_utf8_lossy(&keys.key(0)).into_owned();
    Ok(Report {
        workload: "ready",
        text: vec![format!(
            "ready: first successful Range after {} ({attempts} attempts); key {key} {}",
            ms(nanos(waited)),
            if found { "found" } else { "not found" }
        )],
        json: vec![
            ("waited_ms", Json::Num(waited.as_secs_f64() * 1e3)),
            ("attempts", Json::Int(attempts as i64)),
            ("found", Json::Bool(found)),
            ("ready_unix_ns", Json::Int(unix_ns)),
        ],
        failure: None,
    })
}

// ---------------------------------------------------------------------------
// JSON output (flat enough not to need a library)

enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Num(f64),
    Str(String),
    List(Vec<Json>),
    Obj(Vec<(&'static str, Json)>),
}

impl Json {
    fn render(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Json::Num(n) if n.is_finite() => {
                let _ = write!(out, "{}", (n * 1000.0).round() / 1000.0);
            }
            Json::Num(_) => out.push_str("null"),
            Json::Str(s) => write_json_string(out, s),
            Json::List(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write(out);
                }
                out.push(']');
            }
            Json::Obj(fields) => {
                out.push('{');
                for (i, (name, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_json_string(out, name);
                    out.push(':');
                    value.write(out);
                }
                out.push('}');
            }
        }
    }
}

fn write_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_index_and_parse_back() {
        let keys = KeySpace::new("bench/", 32, 100_000).unwrap();
        let k = keys.key(42);
        assert_eq!(k.len(), 32);
        assert_eq!(keys.index(&k), Some(42));
        assert!(keys.key(99_999) < keys.range_end());
        assert!(keys.key(9) < keys.key(10));
        assert!(KeySpace::new("bench/", 8, 100_000).is_err());
        let tight = KeySpace::new("p/", 4, 100).unwrap();
        assert_eq!(tight.key(99), b"p/99");
        assert!(tight.key(99) < tight.range_end());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<u64> = (1..=100).collect();
        let s = Summary::of(samples).unwrap();
        assert_eq!((s.p50, s.p90, s.p99, s.max), (50, 90, 99, 100));
        assert_eq!(Summary::of(vec![7]).unwrap().p99, 7);
        assert!(Summary::of(Vec::new()).is_none());
    }

    #[test]
    fn json_escapes() {
        let j = Json::Obj(vec![
            ("a", Json::Str("x\"y\n".into())),
            ("b", Json::Num(1.23456)),
            ("c", Json::List(vec![Json::Int(1), Json::Null])),
        ]);
        assert_eq!(j.render(), r#"{"a":"x\"y\n","b":1.235,"c":[1,null]}"#);
    }
}
