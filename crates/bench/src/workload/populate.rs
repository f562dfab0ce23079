//! `populate`: writes every key of the keyspace once, in transactions of
//! up to [`BATCH`] puts (memory and restart measurements; `range` fills
//! its keyspace with it too).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use muster_proto as pb;
use serde::Serialize;

use crate::args::Plan;
use crate::clients::{KvWorker, Run, run_clients};
use crate::connect::Channels;
use crate::error::Error;
use crate::recorder::{Recorder, Summary};
use crate::report::Report;
use crate::units::{duration_as_secs, three_decimals};

/// The most puts in one transaction (etcd's default `--max-txn-ops`).
pub(crate) const BATCH: u64 = 128;

/// The JSON fields of `populate`.
#[derive(Debug, Serialize)]
pub(crate) struct Fields {
    keys: u64,
    key_size: usize,
    value_size: usize,
    txns: u64,
    clients: usize,
    connections: usize,
    #[serde(serialize_with = "duration_as_secs")]
    seconds: Duration,
    #[serde(serialize_with = "three_decimals")]
    keys_per_sec: f64,
    errors: u64,
    txn_latency_ms: Option<Summary>,
}

/// Runs `populate`.
pub(crate) async fn run(plan: &Plan<'_>) -> Result<Report<Fields>, Error> {
    let args = plan.args;
    let (load, channels) = plan.open(args.clients as usize).await?;
    let Run { recorder, elapsed } = fill(plan, &channels, load.clients).await?;
    let txns = recorder.latencies.len();
    let written = if recorder.errors == 0 {
        plan.keys.count
    } else {
        txns.saturating_mul(BATCH).min(plan.keys.count)
    };
    let rate = written as f64 / elapsed.as_secs_f64().max(1e-9);
    let text = vec![
        format!(
            "populate: {written} keys ({} B keys, {} B values) in {txns} txns of up to \
             {BATCH} puts, {} clients over {} connections, {:.2} s: \
             {rate:.0} keys/s, {} errors",
            args.key_size,
            args.value_size,
            load.clients,
            load.connections,
            elapsed.as_secs_f64(),
            recorder.errors
        ),
        format!("populate: txn latency {}", recorder.latencies.text()),
    ];
    Ok(Report {
        workload: "populate",
        text,
        failure: recorder.failure(),
        fields: Fields {
            keys: written,
            key_size: args.key_size,
            value_size: args.value_size,
            txns,
            clients: load.clients,
            connections: load.connections,
            seconds: elapsed,
            keys_per_sec: rate,
            errors: recorder.errors,
            txn_latency_ms: recorder.latencies.summary(),
        },
        seed: Some(plan.seed),
        relogins: 0,
    })
}

/// Writes every key of the keyspace, in transactions of up to [`BATCH`]
/// puts, `clients` at a time (no more than there are transactions).
pub(crate) async fn fill(
    plan: &Plan<'_>,
    channels: &Channels,
    clients: usize,
) -> Result<Run, Error> {
    let batches = plan.keys.count.div_ceil(BATCH);
    let next = Arc::new(AtomicU64::new(0));
    let clients = clients
        .min(usize::try_from(batches).unwrap_or(usize::MAX))
        .max(1);
    run_clients(clients, None, |c, _| {
        let mut w = KvWorker::new(c, channels, plan);
        let next = next.clone();
        async move {
            let mut rec = Recorder::default();
            loop {
                let batch = next.fetch_add(1, Ordering::Relaxed);
                if batch >= batches || rec.gave_up() {
                    break;
                }
                let first = batch * BATCH;
                let last = (first + BATCH).min(w.keys.count);
                let KvWorker {
                    kv,
                    keys,
                    value,
                    auth,
                    ..
                } = &mut w;
                let request = || pb::TxnRequest {
                    compare: Vec::new(),
                    success: (first..last)
                        .map(|i| pb::RequestOp {
                            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                                key: keys.key(i),
                                value: value.clone(),
                                ..Default::default()
                            })),
                        })
                        .collect(),
                    failure: Vec::new(),
                };
                rec.time_kv(kv, auth, request).await;
            }
            rec
        }
    })
    .await
}
