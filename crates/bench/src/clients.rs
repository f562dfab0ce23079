//! Concurrent clients: spawning them, the closed loop each one runs (send
//! the next request as soon as the previous one is answered), and the
//! report every closed-loop workload shares (throughput and latency).

use std::time::{Duration, Instant};

use muster_proto::kv_client::KvClient;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::args::{Load, Plan};
use crate::auth::{Intercepted, TokenInterceptor};
use crate::connect::Channels;
use crate::error::Error;
use crate::keys::{KeySpace, Rng, Seed, random_value};
use crate::recorder::{Recorder, Summary};
use crate::report::Report;
use crate::units::{duration_as_secs, three_decimals};

/// Runs `work` (a closed-loop workload: connecting, the clients, their
/// report) on a current-thread runtime of its own, on a thread of its own,
/// and waits for it.
///
/// Why: on the multi-thread runtime a task woken by the one running goes
/// next (the LIFO slot). When a client queues a request on its connection,
/// the connection's task (hyper's HTTP/2 client) is woken and runs at
/// once, writing that one request: about two `writev` per put (its
/// HEADERS, then its DATA from the body's own task), each paying for the
/// loopback delivery. A current-thread runtime runs woken tasks in order:
/// the clients woken by a batch of responses all queue their next requests
/// before the connection's task runs and writes them together. The same
/// client goes to every registry, so this only makes the load generator
/// lighter. Within a current-thread runtime already (tests), or if the
/// runtime cannot start, `work` runs where it is.
pub(crate) async fn on_own_runtime<T: Send>(work: impl Future<Output = T> + Send) -> T {
    use tokio::runtime::{Builder, Handle, RuntimeFlavor};
    if Handle::current().runtime_flavor() != RuntimeFlavor::MultiThread {
        return work.await;
    }
    let runtime = match Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(_) => return work.await,
    };
    tokio::task::block_in_place(|| {
        let result = std::thread::scope(|scope| {
            scope
                .spawn(|| runtime.block_on(work))
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        });
        runtime.shutdown_background();
        result
    })
}

/// What a set of clients recorded, and how long they ran.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) recorder: Recorder,
    pub(crate) elapsed: Duration,
}

/// Runs `n` clients until each finishes (they watch the deadline, `duration`
/// from now, themselves); returns their merged records and the wall time.
pub(crate) async fn run_clients<F, Fut>(
    n: usize,
    duration: Option<Duration>,
    mut make: F,
) -> Result<Run, Error>
where
    F: FnMut(usize, Option<Instant>) -> Fut,
    Fut: Future<Output = Recorder> + Send + 'static,
{
    let start = Instant::now();
    // A duration past the clock's range is no deadline at all.
    let deadline = duration.and_then(|d| start.checked_add(d));
    let mut set = JoinSet::new();
    for client in 0..n {
        set.spawn(make(client, deadline));
    }
    let mut recorder = Recorder::default();
    while let Some(joined) = set.join_next().await {
        recorder.merge(joined.map_err(|source| Error::Task {
            what: "a client task",
            source,
        })?);
    }
    Ok(Run {
        recorder,
        elapsed: start.elapsed(),
    })
}

/// One client's closed loop: `request` (which sends one request and
/// records it) again and again until the deadline, or until the server
/// looks gone.
pub(crate) async fn closed_loop(
    deadline: Option<Instant>,
    mut request: impl AsyncFnMut(&mut Recorder),
) -> Recorder {
    let mut rec = Recorder::default();
    while rec.going(deadline) {
        request(&mut rec).await;
    }
    rec
}

/// What a client of the keyspace holds: a KV client on its connection (and
/// the connection's token), its own random numbers, the value it writes,
/// and the keys.
pub(crate) struct KvWorker {
    pub(crate) kv: KvClient<Intercepted>,
    pub(crate) auth: TokenInterceptor,
    pub(crate) rng: Rng,
    pub(crate) value: Vec<u8>,
    pub(crate) keys: KeySpace,
}

impl KvWorker {
    /// Client `client`: its value comes first from its random numbers,
    /// then its keys.
    pub(crate) fn new(client: usize, channels: &Channels, plan: &Plan<'_>) -> KvWorker {
        let mut rng = plan.seed.client(client);
        KvWorker {
            kv: KvClient::new(channels.get(client)),
            auth: channels.auth(client),
            value: random_value(&mut rng, plan.args.value_size),
            rng,
            keys: plan.keys.clone(),
        }
    }

    /// The index of the next key, picked at random.
    pub(crate) fn random_index(&mut self) -> u64 {
        self.keys.random_index(&mut self.rng)
    }

    /// Puts this client's value at a random key, timed into `rec` (the
    /// `put` workload's operation, and the load under others).
    pub(crate) async fn put_random(&mut self, rec: &mut Recorder) {
        let index = self.random_index();
        let KvWorker {
            kv,
            auth,
            value,
            keys,
            ..
        } = self;
        let request = || muster_proto::PutRequest {
            key: keys.key(index),
            value: value.clone(),
            ..Default::default()
        };
        rec.time_kv(kv, auth, request).await;
    }
}

/// The JSON fields of a closed-loop workload, then its own (`E`).
#[derive(Debug, Serialize)]
pub(crate) struct ClosedLoop<E> {
    clients: usize,
    connections: usize,
    #[serde(serialize_with = "duration_as_secs")]
    seconds: Duration,
    ops: u64,
    #[serde(serialize_with = "three_decimals")]
    ops_per_sec: f64,
    errors: u64,
    latency_ms: Option<Summary>,
    #[serde(flatten)]
    extra: E,
}

/// A workload with no fields of its own.
#[derive(Debug, Serialize)]
pub(crate) struct NoFields {}

/// The report of a closed-loop workload: a line of throughput (`what` says
/// what was sent), a line of latency, then the workload's own `lines` and
/// `fields`.
pub(crate) fn closed_loop_report<E>(
    workload: &'static str,
    what: String,
    load: Load,
    run: Run,
    seed: Option<Seed>,
    (mut lines, fields): (Vec<String>, E),
) -> Report<ClosedLoop<E>> {
    let Run { recorder, elapsed } = run;
    let ops = recorder.latencies.len();
    let rate = ops as f64 / elapsed.as_secs_f64().max(1e-9);
    let mut text = vec![
        format!(
            "{workload}: {what}, {} clients over {} connections, {:.2} s: \
             {ops} ops, {rate:.0} ops/s, {} errors",
            load.clients,
            load.connections,
            elapsed.as_secs_f64(),
            recorder.errors
        ),
        format!("{workload}: latency {}", recorder.latencies.text()),
    ];
    text.append(&mut lines);
    Report {
        workload,
        text,
        failure: recorder.failure(),
        fields: ClosedLoop {
            clients: load.clients,
            connections: load.connections,
            seconds: elapsed,
            ops,
            ops_per_sec: rate,
            errors: recorder.errors,
            latency_ms: recorder.latencies.summary(),
            extra: fields,
        },
        seed,
        relogins: 0,
    }
}
