//! `range`: concurrent single-key gets of random keys, linearizable (as
//! etcdctl) or serializable. The keyspace is populated first unless every
//! key is there.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use muster_proto as pb;
use pb::kv_client::KvClient;
use serde::Serialize;

use super::populate;
use crate::args::Plan;
use crate::auth::Intercepted;
use crate::clients::{ClosedLoop, KvWorker, closed_loop, closed_loop_report, run_clients};
use crate::connect::setup_failed;
use crate::error::Error;
use crate::keys::KeySpace;
use crate::report::Report;
use crate::units::duration_as_secs;

/// The fields `range` adds to the closed-loop ones.
#[derive(Debug, Serialize)]
pub(crate) struct Fields {
    /// How long populating took, if the keyspace had to be.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "populated_secs"
    )]
    populated_seconds: Option<std::time::Duration>,
    /// Gets that found no key.
    misses: u64,
    serializable: bool,
}

fn populated_secs<S: serde::Serializer>(
    d: &Option<std::time::Duration>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => duration_as_secs(d, s),
        None => s.serialize_none(),
    }
}

/// Runs `range` for `--duration` (after populating, if needed).
pub(crate) async fn run(plan: &Plan<'_>) -> Result<Report<ClosedLoop<Fields>>, Error> {
    let (args, keys) = (plan.args, &plan.keys);
    let (load, channels) = plan.open(args.clients as usize).await?;
    let mut lines = Vec::new();
    let mut populated_seconds = None;
    if count_keys(channels.get(0), keys).await? < keys.count {
        let populated = populate::fill(plan, &channels, load.clients).await?;
        if let Some(failure) = populated.recorder.failure() {
            return Err(Error::Setup {
                doing: "populating the keyspace",
                cause: failure,
            });
        }
        lines.push(format!(
            "range: populated {} keys first, in {:.2} s",
            keys.count,
            populated.elapsed.as_secs_f64()
        ));
        populated_seconds = Some(populated.elapsed);
    }
    let misses = Arc::new(AtomicU64::new(0));
    let serializable = args.serializable;
    let run = run_clients(load.clients, Some(args.duration), |c, deadline| {
        let mut w = KvWorker::new(c, &channels, plan);
        let misses = misses.clone();
        closed_loop(deadline, async move |rec| {
            let index = w.random_index();
            let KvWorker { kv, auth, keys, .. } = &mut w;
            let request = || pb::RangeRequest {
                key: keys.key(index),
                serializable,
                ..Default::default()
            };
            if rec
                .time_kv(kv, auth, request)
                .await
                .is_some_and(|resp| resp.kvs.is_empty())
            {
                misses.fetch_add(1, Ordering::Relaxed);
            }
        })
    })
    .await?;
    let misses = misses.load(Ordering::Relaxed);
    if misses > 0 {
        lines.push(format!("range: {misses} gets found no key"));
    }
    let what = format!(
        "{} single-key gets among {} keys",
        if serializable {
            "serializable"
        } else {
            "linearizable"
        },
        keys.count
    );
    let fields = Fields {
        populated_seconds,
        misses,
        serializable,
    };
    Ok(closed_loop_report(
        "range",
        what,
        load,
        run,
        Some(plan.seed),
        (lines, fields),
    ))
}

/// How many of the keyspace's keys exist.
async fn count_keys(channel: Intercepted, keys: &KeySpace) -> Result<u64, Error> {
    let resp = KvClient::new(channel)
        .range(pb::RangeRequest {
            key: keys.key(0),
            range_end: keys.range_end(),
            count_only: true,
            ..Default::default()
        })
        .await
        .map_err(setup_failed("counting the keyspace"))?;
    Ok(u64::try_from(resp.get_ref().count).unwrap_or(0))
}
