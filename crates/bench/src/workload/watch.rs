//! `watch`: many watchers on one key, spread over streams, then paced puts
//! to the key: the latency from just before sending each put to each
//! watcher receiving its event, to the last watcher receiving it, and to
//! the put's acknowledgement.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use muster_proto as pb;
use pb::kv_client::KvClient;
use pb::watch_client::WatchClient;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;

use crate::args::Plan;
use crate::connect::{Channels, setup_failed, status_text};
use crate::error::Error;
use crate::keys::random_value;
use crate::recorder::{Latencies, Recorder, Summary};
use crate::report::Report;
use crate::units::duration_as_ms;

/// How long watchers wait for the events still due after the last put.
const GRACE: Duration = Duration::from_secs(10);

/// How long creating every watcher may take.
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);

/// The JSON fields of `watch`.
#[derive(Debug, Serialize)]
pub(crate) struct Fields {
    watchers: usize,
    streams: usize,
    connections: usize,
    puts: usize,
    #[serde(serialize_with = "duration_as_ms")]
    put_interval_ms: Duration,
    notifications: u64,
    expected: u64,
    foreign_events: u64,
    watch_latency_ms: Option<Summary>,
    all_watchers_latency_ms: Option<Summary>,
    put_latency_ms: Option<Summary>,
}

/// The (revision, arrival) of each event a stream received.
type Events = Vec<(i64, Instant)>;

/// Runs `watch`: creates the watchers, then `--puts` puts every
/// `--put-interval`.
pub(crate) async fn run(plan: &Plan<'_>) -> Result<Report<Fields>, Error> {
    let args = plan.args;
    let watchers = (args.watchers as usize).max(1);
    let streams = (args.watch_streams as usize).clamp(1, watchers);
    let conns = args.conns.map_or(streams, |c| c as usize).clamp(1, streams);
    let puts = args.puts as usize;
    // One more connection for the puts.
    let channels = Channels::open(plan, conns + 1).await?;
    let key = format!("{}watch", args.key_prefix).into_bytes();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(streams);
    let mut ready = Vec::with_capacity(streams);
    for s in 0..streams {
        let n = watchers / streams + usize::from(s < watchers % streams);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: key.clone(),
                    ..Default::default()
                },
            )),
        };
        // The creates, then nothing more, for as long as `keep_open` lives.
        let (keep_open, rx) = mpsc::channel(1);
        let requests = tokio_stream::iter(vec![create; n]).chain(ReceiverStream::new(rx));
        let responses = WatchClient::new(channels.get(s % conns))
            .watch(requests)
            .await
            .map_err(setup_failed("opening a watch stream"))?
            .into_inner();
        let (ready_tx, ready_rx) = oneshot::channel();
        ready.push(ready_rx);
        tasks.push(tokio::spawn(watch_stream(
            responses,
            keep_open,
            n,
            n * puts,
            ready_tx,
            stop_rx.clone(),
        )));
    }
    for (s, ready_rx) in ready.into_iter().enumerate() {
        match tokio::time::timeout(CREATE_TIMEOUT, ready_rx).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                let _ = stop_tx.send(true);
                let cause = match tasks.swap_remove(s).await {
                    Ok(Err(e)) => e,
                    _ => "the watch stream ended".to_string(),
                };
                return Err(Error::Setup {
                    doing: "creating watchers",
                    cause,
                });
            }
            Err(_) => return Err(Error::WatchersNotCreated),
        }
    }

    let mut kv = KvClient::new(channels.get(conns));
    let auth = channels.auth(conns);
    let value = random_value(&mut plan.seed.client(0), args.value_size);
    let mut sent: HashMap<i64, Instant> = HashMap::with_capacity(puts);
    let mut acks = Recorder::default();
    let mut ticker = tokio::time::interval(args.put_interval.max(Duration::from_nanos(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for _ in 0..puts {
        ticker.tick().await;
        let started = Instant::now();
        let request = || pb::PutRequest {
            key: key.clone(),
            value: value.clone(),
            ..Default::default()
        };
        if let Some(resp) = acks.time_kv(&mut kv, &auth, request).await {
            sent.insert(resp.header.map_or(0, |h| h.revision), started);
        }
        if acks.gave_up() {
            break;
        }
    }
    // Watchers stop once they have every event; the rest get a grace time.
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(GRACE).await;
        let _ = stop_tx.send(true);
    });
    let mut each = Latencies::new();
    // For each put: when it was sent, and when its last watcher got it.
    let mut last_seen: HashMap<i64, (Instant, Instant)> = HashMap::with_capacity(sent.len());
    let mut foreign = 0u64;
    let mut stream_errors = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok(events)) => {
                for (revision, seen) in events {
                    let Some(&started) = sent.get(&revision) else {
                        foreign += 1;
                        continue;
                    };
                    each.record(seen.saturating_duration_since(started));
                    let last = last_seen.entry(revision).or_insert((started, seen));
                    last.1 = last.1.max(seen);
                }
            }
            Ok(Err(e)) => stream_errors.push(e),
            Err(e) => stream_errors.push(format!("a watch task failed: {e}")),
        }
    }
    stopper.abort();
    let mut all = Latencies::new();
    for (started, seen) in last_seen.values() {
        all.record(seen.saturating_duration_since(*started));
    }
    let expected = (watchers * sent.len()) as u64;
    let received = each.len();
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
                "{missing} of {expected} notifications did not arrive within {GRACE:?}"
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
        format!("watch: put -> each watcher {}", each.text()),
        format!("watch: put -> all watchers {}", all.text()),
        format!("watch: put -> ack {}", acks.latencies.text()),
    ];
    Ok(Report {
        workload: "watch",
        text,
        failure,
        fields: Fields {
            watchers,
            streams,
            connections: conns,
            puts: sent.len(),
            put_interval_ms: args.put_interval,
            notifications: received,
            expected,
            foreign_events: foreign,
            watch_latency_ms: each.summary(),
            all_watchers_latency_ms: all.summary(),
            put_latency_ms: acks.latencies.summary(),
        },
        seed: Some(plan.seed),
        relogins: 0,
    })
}

/// Reads one watch stream: waits for its `watchers` to be created (then
/// signals `ready`), then records `(revision, arrival)` of each event until
/// it has `expected` of them or is told to stop.
async fn watch_stream(
    mut responses: tonic::Streaming<pb::WatchResponse>,
    // Dropping it would close the request stream: kept until done.
    _keep_open: mpsc::Sender<pb::WatchRequest>,
    watchers: usize,
    expected: usize,
    ready: oneshot::Sender<()>,
    mut stop: watch::Receiver<bool>,
) -> Result<Events, String> {
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
