//! muster's benchmarks. `muster bench` is a load generator for any etcd v3
//! endpoint (`muster serve`, etcd itself, or anything else speaking etcd's
//! v3 gRPC API); the `propagation` bench (`benches/`) measures the library
//! against a real etcd.
//!
//! Workloads ([`Workload`], one module each under `workload/`):
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
//! - `ready`: waits for the first successful Range (restart measurements);
//! - `dns`: UDP queries at a DNS server (`muster dns`, `muster serve
//!   --dns-listen`), one socket per client, one query in flight each.
//!
//! Latency percentiles are nearest-rank, from HDR histograms (nanoseconds,
//! three significant figures: within 0.1% of the exact figure), one per
//! client, merged. Keys and values are random but seeded: each client's
//! random numbers derive from the run's seed and the client's number, the
//! report prints the seed, and `--seed` repeats a run's choices. Clients
//! are spread over several HTTP/2 connections (one per 8 clients unless
//! `--conns` says otherwise), since one connection serializes its streams
//! on one TCP stream.
//!
//! With [`Credentials`] (servers with etcd's auth enabled), the bench logs
//! in once per endpoint before measuring and sends the token with every
//! request (gRPC metadata `token`, as etcd's client); a wrong password
//! fails the run at once. Should a server refuse the token later (simple
//! tokens expire some time after their last use, 300 s by default), the
//! clients of that endpoint log in again once and send the refused request
//! again; the report says how many times that happened.
//!
//! Modules: `args` (the flags, and the plan a workload runs from them),
//! `keys` (keyspace, values, seed), `auth` (login, token, new logins),
//! `connect` (channels, probe, errors as text), `recorder` (latencies and failures), `clients` (spawning
//! clients, their closed loop, its report), `report` (text and JSON),
//! `units`, `error`, and `workload/*`; [`run`] puts them together.
#![forbid(unsafe_code)]

mod args;
mod auth;
mod clients;
mod connect;
mod error;
mod keys;
mod recorder;
mod report;
mod units;
mod workload;

pub use args::{BenchArgs, DnsType, Workload};
pub use auth::Credentials;
pub use error::Error;
pub use recorder::{Latencies, Summary};
pub use report::Format;

use args::Plan;

/// Runs the workload against `endpoints` (`http://host:port` or
/// `https://host:port` URLs, the latter with `tls`: the system's roots when
/// `None`), logged in as `credentials` where auth is enabled, and writes
/// its report to `out` as `format`. Fails before measuring with
/// [`Error::Auth`] if a login fails (a wrong password), and (after writing
/// the report) with [`Error::Failed`] if any request failed.
pub async fn run(
    args: &BenchArgs,
    endpoints: &[String],
    tls: Option<&muster_tls::ClientTls>,
    credentials: Option<&Credentials>,
    format: Format,
    out: impl std::io::Write,
) -> Result<(), Error> {
    let mut plan = Plan::new(args, endpoints)?;
    plan.credentials = credentials.cloned();
    plan.client_tls = tls.cloned();
    if endpoints.iter().any(|e| e.starts_with("https://")) {
        let connector = tls
            .cloned()
            .unwrap_or_default()
            .connector(&[muster_tls::ALPN_H2])
            .map_err(Error::Tls)?;
        plan.tls = Some(connector.await_server_first(std::time::Duration::from_secs(5)));
    }
    use workload::*;
    match args.workload() {
        Workload::Put => finish(put::run(&plan).await?, &plan, format, out),
        Workload::Range => finish(range::run(&plan).await?, &plan, format, out),
        Workload::Txn => finish(txn::run(&plan).await?, &plan, format, out),
        Workload::Keepalive => finish(keepalive::run(&plan).await?, &plan, format, out),
        Workload::Watch => finish(watch::run(&plan).await?, &plan, format, out),
        Workload::Populate => finish(populate::run(&plan).await?, &plan, format, out),
        Workload::Ready => finish(ready::run(&plan).await?, &plan, format, out),
        Workload::Dns => finish(dns::run(&plan).await?, &plan, format, out),
        Workload::Propagation => propagation::run(&plan, format, out).await,
        Workload::Robustness => robustness::run(&plan, format, out).await,
    }
}

/// Writes `report`, with how many times the run logged in again.
pub(crate) fn finish<F: serde::Serialize>(
    mut report: report::Report<F>,
    plan: &Plan<'_>,
    format: Format,
    out: impl std::io::Write,
) -> Result<(), Error> {
    report.relogins = plan.relogins.load(std::sync::atomic::Ordering::Relaxed);
    report.finish(plan.endpoints, format, out)
}
