//! `robustness`: a registry of its own under random conflicting traffic and
//! faults, then its history checked for linearizability and its watches
//! validated (see [`muster_robustness::run`]). Prints the operations, the
//! faults injected and one verdict line, and fails (non-zero exit) on any
//! violation; the history, the watches and the report (with a minimal
//! failing excerpt) stay in the directory it names.

use std::io::Write;

use muster_robustness::run::{Backend, RunConfig};
use muster_robustness::traffic::TrafficConfig;
use serde_json::json;

use crate::args::{Plan, RobustnessRegistry};
use crate::error::Error;
use crate::report::Format;

pub(crate) async fn run(plan: &Plan<'_>, format: Format, mut out: impl Write) -> Result<(), Error> {
    let args = plan.args;
    let seed = plan.seed.0;
    let backend = match args.registry {
        RobustnessRegistry::Muster => Backend::Muster {
            exe: std::env::current_exe().map_err(|e| Error::Setup {
                doing: "finding this program to run its registry",
                cause: e.to_string(),
            })?,
            faults: args.serve_faults.clone(),
        },
        RobustnessRegistry::Etcd if args.serve_faults.is_some() => {
            return Err(Error::Setup {
                doing: "starting etcd",
                cause: "--serve-faults is muster serve's fault injection; etcd has none".into(),
            });
        }
        RobustnessRegistry::Etcd => Backend::Etcd {
            binary: args.etcd_binary.clone(),
        },
    };
    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("muster-robustness-{seed}")));
    let config = RunConfig {
        backend: backend.clone(),
        traffic: TrafficConfig {
            clients: args.traffic_clients,
            duration: args.duration,
            seed,
            rate: args.traffic_rate,
            edge_probes: args.lease_edge_probes,
            ..TrafficConfig::default()
        },
        check_timeout: args.check_timeout,
        faults: args.faults.0.clone(),
        fault_every: args.fault_every,
        dir,
    };
    let summary = muster_robustness::run::run(&config)
        .await
        .map_err(|cause| Error::Setup {
            doing: "running the robustness check",
            cause,
        })?;
    let verdict = summary.report.line();
    let written = match format {
        Format::Text => writeln!(
            out,
            "robustness: {}: {} operations ({} unknown; {} answers lost, resolved from the watch: \
             {} deletes and {} revokes pinned, {} dropped), {} watch streams, {}, faults: {}{}\n\
             robustness: {verdict} (checked in {:.2} s)\n\
             robustness: history, watches and report in {}\n\
             robustness: seed {seed} (repeat with --seed {seed})",
            backend.name(),
            summary.operations,
            summary.unknown,
            summary.lost_answers,
            summary.pinned.pinned_deletes,
            summary.pinned.pinned_revokes,
            summary.pinned.dropped,
            summary.watches,
            leases_text(&summary.report.leases),
            summary.faults_text(),
            registry_faults_text(&summary.registry_faults),
            summary.checked_in.as_secs_f64(),
            summary.dir.display(),
        ),
        Format::Json => writeln!(
            out,
            "{}",
            json!({
                "workload": "robustness",
                "registry": backend.name(),
                "seed": seed,
                "operations": summary.operations,
                "unknown": summary.unknown,
                "lost_answers": summary.lost_answers,
                "pinned_deletes": summary.pinned.pinned_deletes,
                "pinned_revokes": summary.pinned.pinned_revokes,
                "dropped": summary.pinned.dropped,
                "watch_streams": summary.watches,
                "faults": summary.injected.iter().map(|k| k.name()).collect::<Vec<_>>(),
                "serve_faults": args.serve_faults,
                "serve_faults_injected": summary
                    .registry_faults
                    .iter()
                    .map(|(name, n)| (name.clone(), json!(n)))
                    .collect::<serde_json::Map<_, _>>(),
                "leases_expired": summary.report.leases.expired,
                "leases_timed": summary.report.leases.timed,
                "lease_max_seconds_over_ttl": summary.report.leases.max_over_ttl,
                "verdict": verdict,
                "ok": summary.report.ok(),
                "checked_seconds": summary.checked_in.as_secs_f64(),
                "dir": summary.dir.display().to_string(),
            })
        ),
    };
    written.map_err(|e| Error::Setup {
        doing: "writing the report",
        cause: e.to_string(),
    })?;
    if summary.report.ok() {
        Ok(())
    } else {
        Err(Error::Failed {
            workload: "robustness",
            failure: format!("{verdict}; see {}", summary.dir.display()),
        })
    }
}

/// `leases expired: 40 (31 timed, at most +0.43 s past their TTL)`.
fn leases_text(leases: &muster_robustness::lease::LeaseReport) -> String {
    match leases.max_over_ttl {
        Some(over) => format!(
            "leases expired: {} ({} timed, at most {over:+.2} s past their TTL)",
            leases.expired, leases.timed
        ),
        None => format!("leases expired: {}", leases.expired),
    }
}

/// `; the registry's own: drop-watch 12, latency 3400` (empty without).
fn registry_faults_text(injected: &[(String, u64)]) -> String {
    if injected.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = injected
        .iter()
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    format!("; the registry's own: {}", parts.join(", "))
}
