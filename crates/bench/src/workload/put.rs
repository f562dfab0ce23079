//! `put`: concurrent clients putting random keys of the keyspace.

use crate::args::Plan;
use crate::clients::{
    ClosedLoop, KvWorker, NoFields, closed_loop, closed_loop_report, on_own_runtime, run_clients,
};
use crate::error::Error;
use crate::report::Report;

/// Runs `put` for `--duration`.
pub(crate) async fn run(plan: &Plan<'_>) -> Result<Report<ClosedLoop<NoFields>>, Error> {
    on_own_runtime(run_here(plan)).await
}

async fn run_here(plan: &Plan<'_>) -> Result<Report<ClosedLoop<NoFields>>, Error> {
    let args = plan.args;
    let (load, channels) = plan.open(args.clients as usize).await?;
    let run = run_clients(load.clients, Some(args.duration), |c, deadline| {
        let mut w = KvWorker::new(c, &channels, plan);
        closed_loop(deadline, async move |rec| w.put_random(rec).await)
    })
    .await?;
    let what = format!(
        "random keys of {} ({} B keys, {} B values)",
        plan.keys.count, args.key_size, args.value_size
    );
    Ok(closed_loop_report(
        "put",
        what,
        load,
        run,
        Some(plan.seed),
        (Vec::new(), NoFields {}),
    ))
}
