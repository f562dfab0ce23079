//! `txn`: compare-and-put transactions: compare the key's version, then
//! put. Each client owns the keys whose index is its number modulo the
//! number of clients, and reads their versions first, so that its
//! compares succeed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use muster_proto as pb;
use pb::kv_client::KvClient;
use rand::RngExt as _;
use serde::Serialize;

use crate::args::Plan;
use crate::auth::Intercepted;
use crate::clients::{ClosedLoop, KvWorker, closed_loop, closed_loop_report, run_clients};
use crate::connect::setup_failed;
use crate::error::Error;
use crate::keys::KeySpace;
use crate::report::Report;

/// The fields `txn` adds to the closed-loop ones.
#[derive(Debug, Serialize)]
pub(crate) struct Fields {
    succeeded: u64,
    compare_failed: u64,
}

/// Runs `txn` for `--duration`.
pub(crate) async fn run(plan: &Plan<'_>) -> Result<Report<ClosedLoop<Fields>>, Error> {
    let (args, keys) = (plan.args, &plan.keys);
    let (load, channels) = plan.open(args.clients as usize).await?;
    let known = key_versions(channels.get(0), keys).await?;
    let conflicts = Arc::new(AtomicU64::new(0));
    let stride = load.clients as u64;
    let run = run_clients(load.clients, Some(args.duration), |c, deadline| {
        let mut w = KvWorker::new(c, &channels, plan);
        let mine = c as u64;
        let owned = keys.count.saturating_sub(mine).div_ceil(stride);
        let mut versions: HashMap<u64, i64> = known
            .iter()
            .filter(|(i, _)| *i % stride == mine)
            .map(|(i, v)| (*i, *v))
            .collect();
        let conflicts = conflicts.clone();
        // A client owning no key has nothing to do.
        let deadline = if owned > 0 {
            deadline
        } else {
            Some(std::time::Instant::now())
        };
        closed_loop(deadline, async move |rec| {
            let index = mine + stride * w.rng.random_range(0..owned.max(1));
            let version = versions.get(&index).copied().unwrap_or(0);
            let KvWorker {
                kv,
                auth,
                value,
                keys,
                ..
            } = &mut w;
            let request = || compare_and_put(keys.key(index), version, value.clone());
            let Some(resp) = rec.time_kv(kv, auth, request).await else {
                return;
            };
            if resp.succeeded {
                versions.insert(index, version + 1);
            } else {
                conflicts.fetch_add(1, Ordering::Relaxed);
                versions.insert(index, seen_version(&resp));
            }
        })
    })
    .await?;
    let compare_failed = conflicts.load(Ordering::Relaxed);
    let succeeded = run.recorder.latencies.len().saturating_sub(compare_failed);
    let what = format!(
        "compare-version-and-put among {} keys ({} B keys, {} B values)",
        keys.count, args.key_size, args.value_size
    );
    let lines = vec![format!(
        "txn: {succeeded} succeeded, {compare_failed} failed their compare"
    )];
    let fields = Fields {
        succeeded,
        compare_failed,
    };
    Ok(closed_loop_report(
        "txn",
        what,
        load,
        run,
        Some(plan.seed),
        (lines, fields),
    ))
}

/// If `key`'s version is `version`, put `value`; otherwise read the key.
fn compare_and_put(key: Vec<u8>, version: i64, value: Vec<u8>) -> pb::TxnRequest {
    pb::TxnRequest {
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
                value,
                ..Default::default()
            })),
        }],
        failure: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
                key,
                ..Default::default()
            })),
        }],
    }
}

/// The key's version in the read of a failed compare (0: no such key).
fn seen_version(resp: &pb::TxnResponse) -> i64 {
    resp.responses
        .iter()
        .find_map(|op| match &op.response {
            Some(pb::response_op::Response::ResponseRange(r)) => {
                Some(r.kvs.first().map_or(0, |kv| kv.version))
            }
            _ => None,
        })
        .unwrap_or(0)
}

/// The version of every existing key of the keyspace, read page by page.
async fn key_versions(channel: Intercepted, keys: &KeySpace) -> Result<HashMap<u64, i64>, Error> {
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
            .map_err(setup_failed("reading key versions"))?
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
