//! Robustness checks for muster's etcd-compatible server, in the style of
//! etcd's `tests/robustness`: record what concurrent clients asked and were
//! told, then check that the record is explainable by a correct etcd.
//!
//! This crate is the pure logic, with no network:
//!
//! * [`history`]: the recorded operations (requests, responses, definite
//!   errors, unknown outcomes, invoke/return times), serializable to
//!   `history.json`.
//! * [`model`]: etcd's KV store and leases as a deterministic state machine
//!   ([`model::State::step`]: the next state iff an answer is consistent).
//! * [`linearizability`]: a Wing & Gong / Lowe (porcupine) checker over any
//!   [`linearizability::Model`], with [`model::EtcdModel`] for histories.
//! * [`watch`]: validation of recorded watch streams against the writes of
//!   the linearization.
//! * [`lease`]: the lease guarantees said plainly: no key read after its
//!   lease ended, no lease outliving its TTL (across restarts) or expiring
//!   before it.
//! * [`report`]: the verdict line and a minimal failing excerpt.
//!
//! ```
//! use muster_robustness::history::*;
//! use muster_robustness::report::{Linearizable, Report};
//! use muster_robustness::linearizability::CheckOptions;
//!
//! let put = Operation {
//!     client: 1, invoke: 0, return_time: Some(10),
//!     request: Request::Put { key: "a".into(), value: "1".into(), lease: 0 },
//!     outcome: Outcome::Response(Response { revision: 2, body: ResponseBody::Put }),
//! };
//! let history = History { operations: vec![put] };
//! let report = Report::new(&history, &[], CheckOptions::default());
//! assert_eq!(report.line(), "linearizable: yes, watch: ok, leases: ok");
//! ```
#![forbid(unsafe_code)]

pub mod history;
pub mod lease;
pub mod linearizability;
pub mod model;
pub mod pin;
pub mod proxy;
pub mod report;
pub mod run;
mod shard;
pub mod traffic;
pub mod watch;

/// Checks a recorded history against the etcd model.
pub fn check_history(
    history: &history::History,
    options: linearizability::CheckOptions,
) -> linearizability::Verdict<model::State> {
    let model = model::EtcdModel::new(history);
    linearizability::check(&model, &history.operations, options)
}

/// Checks a recorded history against the etcd model, with what `watches`
/// saw of its writes narrowing where lost writes may go
/// ([`model::EtcdModel::with_watches`]).
pub fn check_history_with_watches(
    history: &history::History,
    watches: &[watch::WatchRecord],
    options: linearizability::CheckOptions,
) -> linearizability::Verdict<model::State> {
    let model = model::EtcdModel::with_watches(history, watches);
    linearizability::check(&model, &history.operations, options)
}

#[cfg(test)]
mod tests;
