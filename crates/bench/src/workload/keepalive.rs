//! `keepalive`: leases granted, then kept alive on keep-alive streams, as
//! fast as possible (one keep-alive in flight per stream) or paced at a
//! rate over all streams; revoked at the end.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use muster_proto as pb;
use pb::lease_client::LeaseClient;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;

use crate::args::Plan;
use crate::auth::Intercepted;
use crate::clients::{ClosedLoop, closed_loop_report, run_clients};
use crate::connect::{Channels, setup_failed, status_text};
use crate::error::Error;
use crate::recorder::Recorder;
use crate::report::Report;

/// How long to wait for a keep-alive response before calling it lost.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// Keep-alives a paced stream may have in flight.
const MAX_PENDING: usize = 4096;

/// Leases granted (and revoked) at the same time.
const LEASE_WORKERS: usize = 64;

/// The fields `keepalive` adds to the closed-loop ones.
#[derive(Debug, Serialize)]
pub(crate) struct Fields {
    leases: usize,
    rate: u64,
}

/// Runs `keepalive` for `--duration`.
pub(crate) async fn run(plan: &Plan<'_>) -> Result<Report<ClosedLoop<Fields>>, Error> {
    let args = plan.args;
    let leases = (args.leases as usize).max(1);
    let (load, channels) = plan.open((args.clients as usize).min(leases)).await?;
    let streams = load.clients;
    let ids = grant_leases(&channels, leases, args.lease_ttl).await?;
    // Between two keep-alives of one stream; None: closed loop.
    let period = (args.rate > 0).then(|| {
        Duration::from_secs_f64(streams as f64 / args.rate as f64).max(Duration::from_nanos(1))
    });
    let run = run_clients(streams, Some(args.duration), |s, deadline| {
        let client = LeaseClient::new(channels.get(s));
        let mine: Vec<i64> = ids.iter().skip(s).step_by(streams).copied().collect();
        keepalive_stream(client, mine, deadline, period)
    })
    .await;
    revoke_leases(&channels, ids).await;
    let run = run?;
    let mode = match args.rate {
        0 => "as fast as possible, one in flight per stream".to_string(),
        rate => format!("paced at {rate}/s"),
    };
    let what = format!("{leases} leases (TTL {} s), {mode}", args.lease_ttl);
    let fields = Fields {
        leases,
        rate: args.rate,
    };
    Ok(closed_loop_report(
        "keepalive",
        what,
        load,
        run,
        None,
        (Vec::new(), fields),
    ))
}

/// Grants `n` leases, [`LEASE_WORKERS`] at a time.
async fn grant_leases(channels: &Channels, n: usize, ttl: i64) -> Result<Vec<i64>, Error> {
    let workers = n.clamp(1, LEASE_WORKERS);
    let mut set = JoinSet::new();
    for w in 0..workers {
        let mut lease = LeaseClient::new(channels.get(w));
        let count = n / workers + usize::from(w < n % workers);
        set.spawn(async move {
            let mut ids = Vec::with_capacity(count);
            for _ in 0..count {
                let resp = lease
                    .lease_grant(pb::LeaseGrantRequest { ttl, id: 0 })
                    .await
                    .map_err(setup_failed("granting a lease"))?;
                ids.push(resp.into_inner().id);
            }
            Ok::<_, Error>(ids)
        });
    }
    let mut ids = Vec::with_capacity(n);
    while let Some(joined) = set.join_next().await {
        ids.extend(joined.map_err(|source| Error::Task {
            what: "a granting task",
            source,
        })??);
    }
    Ok(ids)
}

/// Revokes leases, [`LEASE_WORKERS`] at a time, for up to 30 s; failures
/// are ignored (the leases expire anyway).
async fn revoke_leases(channels: &Channels, ids: Vec<i64>) {
    let workers = ids.len().clamp(1, LEASE_WORKERS);
    let ids = Arc::new(ids);
    let next = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for w in 0..workers {
        let mut lease = LeaseClient::new(channels.get(w));
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

/// What the stream does next.
enum Step {
    /// Send the next keep-alive.
    Send,
    /// Wait again.
    Wait,
    /// The stream is broken: stop.
    Stop,
}

/// One keep-alive stream renewing `ids` in turn until the deadline, then
/// collecting the responses still due.
async fn keepalive_stream(
    mut client: LeaseClient<Intercepted>,
    ids: Vec<i64>,
    deadline: Option<Instant>,
    period: Option<Duration>,
) -> Recorder {
    let mut rec = Recorder::default();
    let Some(&first) = ids.first() else {
        return rec;
    };
    let (tx, rx) = mpsc::channel(MAX_PENDING);
    // A first keep-alive, not measured, queued before the call: etcd (like
    // any grpc-go server) sends the response headers, which the call waits
    // for, only with its first response.
    if tx
        .send(pb::LeaseKeepAliveRequest { id: first })
        .await
        .is_err()
    {
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
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker
    });
    let mut pending: VecDeque<(i64, Instant)> = VecDeque::new();
    let mut next = ids.iter().copied().cycle();
    loop {
        let open = rec.going(deadline);
        if !open && pending.is_empty() {
            break;
        }
        let step = if open && ticker.is_none() && pending.is_empty() {
            Step::Send
        } else {
            let tick_allowed = open && ticker.is_some() && pending.len() < MAX_PENDING;
            tokio::select! {
                () = tick(&mut ticker), if tick_allowed => Step::Send,
                msg = tokio::time::timeout(STREAM_TIMEOUT, responses.message()), if !pending.is_empty() => {
                    answered(&mut rec, &mut pending, msg)
                }
                else => Step::Stop,
            }
        };
        match step {
            Step::Send => {
                let Some(id) = next.next() else { break };
                pending.push_back((id, Instant::now()));
                if tx.send(pb::LeaseKeepAliveRequest { id }).await.is_err() {
                    rec.err("the keep-alive stream closed".to_string());
                    break;
                }
            }
            Step::Wait => {}
            Step::Stop => break,
        }
    }
    rec
}

/// The ticker's next tick; never, without a ticker.
async fn tick(ticker: &mut Option<Interval>) {
    match ticker {
        Some(ticker) => {
            ticker.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Records a keep-alive response (or the stream's end) against the oldest
/// keep-alive in flight.
fn answered(
    rec: &mut Recorder,
    pending: &mut VecDeque<(i64, Instant)>,
    msg: Result<
        Result<Option<pb::LeaseKeepAliveResponse>, tonic::Status>,
        tokio::time::error::Elapsed,
    >,
) -> Step {
    match msg {
        Ok(Ok(Some(resp))) => {
            let Some((id, started)) = pending.pop_front() else {
                rec.err("an unasked keep-alive response".to_string());
                return Step::Stop;
            };
            if resp.id != id {
                rec.err(format!(
                    "keep-alive response for lease {:x}, expected {id:x}",
                    resp.id
                ));
            } else if resp.ttl <= 0 {
                rec.err(format!("lease {id:x} not found"));
            } else {
                rec.ok(started);
            }
            Step::Wait
        }
        Ok(Ok(None)) => {
            rec.err("the server closed the keep-alive stream".to_string());
            Step::Stop
        }
        Ok(Err(status)) => {
            rec.err(status_text(&status));
            Step::Stop
        }
        Err(_) => {
            rec.err(format!("no keep-alive response within {STREAM_TIMEOUT:?}"));
            Step::Stop
        }
    }
}
