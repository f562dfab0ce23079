//! What a run tells its reader: one verdict line, and for a violation a
//! small excerpt of the history around it, as JSON.

use serde::{Deserialize, Serialize};

use crate::history::{History, Operation};
use crate::linearizability::{CheckOptions, Verdict, Violation};
use crate::model::State;
use crate::watch::{self, WatchRecord, WatchViolation};

/// The linearizability part of a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Linearizable {
    /// A linearization exists.
    Yes,
    /// None exists.
    No,
    /// The checker ran out of budget.
    Timeout,
}

impl<S> From<&Verdict<S>> for Linearizable {
    fn from(verdict: &Verdict<S>) -> Linearizable {
        match verdict {
            Verdict::Linearizable { .. } => Linearizable::Yes,
            Verdict::Violation(_) => Linearizable::No,
            Verdict::Timeout { .. } => Linearizable::Timeout,
        }
    }
}

/// Everything a run concluded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Whether the history is linearizable.
    pub linearizable: Linearizable,
    /// The broken watch guarantees (validated only against a linearizable
    /// history: without a linearization there is nothing to compare with).
    pub watch_violations: Vec<WatchViolation>,
    /// For a violation, the operations around it.
    pub excerpt: Option<Excerpt>,
    /// Acknowledged puts that a watch covering their revision did not
    /// deliver as written (see [`lost_writes`]): nothing acknowledged may
    /// be lost, across kill -9 restarts included.
    #[serde(default)]
    pub lost_writes: Vec<LostWrite>,
    /// The lease guarantees ([`crate::lease`]).
    #[serde(default)]
    pub leases: crate::lease::LeaseReport,
}

/// An acknowledged put that the watch does not show at its revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostWrite {
    /// Its index in the history.
    pub index: usize,
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
    /// The revision its answer named.
    pub revision: i64,
    /// What the watch delivered for the key at that revision, if anything.
    pub watched: Option<crate::watch::Event>,
}

/// Every acknowledged put (a put, or a txn's put in the branch that ran)
/// whose revision a watch stream covered (from its start to the last
/// revision it delivered, in a stream without compaction) and that no
/// stream delivered with its value at its revision. The watcher resumes
/// after each break (kill -9 included) from the next revision, so this is
/// the explicit form of "nothing acknowledged is lost": a write the
/// registry forgot shows as another event at its revision, or none.
pub fn lost_writes(history: &History, watches: &[WatchRecord]) -> Vec<LostWrite> {
    use std::collections::HashMap;
    let mut seen: HashMap<(i64, &str), &crate::watch::Event> = HashMap::new();
    let mut covered: Vec<(i64, i64)> = Vec::new();
    for w in watches {
        let mut last = None;
        let mut compacted = false;
        for r in &w.responses {
            compacted |= r.compact_revision > 0;
            for e in &r.events {
                seen.entry((e.mod_revision, &e.key)).or_insert(e);
                last = Some(e.mod_revision);
            }
        }
        let start = w.start_revision.max(1);
        if let Some(last) = last
            && !compacted
            && w.start_revision > 0
        {
            covered.push((start, last));
        }
    }
    let mut out = Vec::new();
    for (index, op) in history.operations.iter().enumerate() {
        let (Some(_), crate::history::Outcome::Response(r)) = (op.return_time, &op.outcome) else {
            continue;
        };
        let puts: Vec<(&str, &str)> = match (&op.request, &r.body) {
            (crate::history::Request::Put { key, value, .. }, _) => vec![(key, value)],
            (
                crate::history::Request::Txn {
                    success, failure, ..
                },
                crate::history::ResponseBody::Txn { succeeded, .. },
            ) => if *succeeded { success } else { failure }
                .iter()
                .filter_map(|o| match o {
                    crate::history::TxnOp::Put { key, value, .. } => {
                        Some((key.as_str(), value.as_str()))
                    }
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        for (key, value) in puts {
            let rev = r.revision;
            if !covered.iter().any(|&(a, b)| a <= rev && rev <= b) {
                continue;
            }
            let watched = seen.get(&(rev, key)).copied();
            if watched.is_none_or(|e| e.value != value || e.kind != crate::watch::EventKind::Put) {
                out.push(LostWrite {
                    index,
                    key: key.to_string(),
                    value: value.to_string(),
                    revision: rev,
                    watched: watched.cloned(),
                });
            }
        }
    }
    out
}

impl Report {
    /// Checks `history` (patched with what `watches` saw of lost puts, see
    /// [`watch::patch_history`]) and, if it is linearizable, `watches`
    /// against it.
    pub fn new(history: &History, watches: &[WatchRecord], options: CheckOptions) -> Report {
        Report::with_outages(history, watches, &[], options)
    }

    /// As [`Report::new`], for a run that had `outages` (which the lease
    /// TTL check counts from, [`crate::lease::check`]).
    pub fn with_outages(
        history: &History,
        watches: &[WatchRecord],
        outages: &[crate::lease::Outage],
        options: CheckOptions,
    ) -> Report {
        let history = &watch::patch_history(history, watches);
        let leases = crate::lease::check(history, watches, outages);
        let lost = lost_writes(history, watches);
        let mut report = match crate::check_history_with_watches(history, watches, options) {
            Verdict::Linearizable { state, .. } => Report {
                linearizable: Linearizable::Yes,
                watch_violations: watch::validate_against(&state, watches),
                excerpt: None,
                lost_writes: Vec::new(),
                leases: Default::default(),
            },
            Verdict::Violation(v) => Report {
                linearizable: Linearizable::No,
                watch_violations: Vec::new(),
                excerpt: Some(excerpt(history, &v)),
                lost_writes: Vec::new(),
                leases: Default::default(),
            },
            Verdict::Timeout { .. } => Report {
                linearizable: Linearizable::Timeout,
                watch_violations: Vec::new(),
                excerpt: None,
                lost_writes: Vec::new(),
                leases: Default::default(),
            },
        };
        report.lost_writes = lost;
        report.leases = leases;
        report
    }

    /// `linearizable: yes|no|timeout, watch: ok|N violations, leases:
    /// ok|...` ([`crate::lease::LeaseReport::line`]), and `, lost: N
    /// acknowledged writes` when there are any.
    pub fn line(&self) -> String {
        let mut line = verdict_line(self.linearizable, self.watch_violations.len());
        line.push_str(", ");
        line.push_str(&self.leases.line());
        if !self.lost_writes.is_empty() {
            line.push_str(&format!(
                ", lost: {} acknowledged writes",
                self.lost_writes.len()
            ));
        }
        line
    }

    /// Whether nothing was found wrong.
    pub fn ok(&self) -> bool {
        self.linearizable == Linearizable::Yes
            && self.watch_violations.is_empty()
            && self.lost_writes.is_empty()
            && self.leases.ok()
    }

    /// The report as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// `linearizable: yes|no|timeout, watch: ok|N violations`.
pub fn verdict_line(linearizable: Linearizable, watch_violations: usize) -> String {
    let lin = match linearizable {
        Linearizable::Yes => "yes",
        Linearizable::No => "no",
        Linearizable::Timeout => "timeout",
    };
    let watch = match watch_violations {
        0 => "ok".to_string(),
        1 => "1 violation".to_string(),
        n => format!("{n} violations"),
    };
    format!("linearizable: {lin}, watch: {watch}")
}

/// The operations around a linearizability violation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Excerpt {
    /// Index of the operation that could not be placed.
    pub stuck: usize,
    /// How many operations the longest linearization placed.
    pub linearized: usize,
    /// The model's revision after them.
    pub revision: i64,
    /// The operations of the excerpt, by invocation time.
    pub operations: Vec<ExcerptOp>,
}

/// One operation of an [`Excerpt`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExcerptOp {
    /// Its index in the history.
    pub index: usize,
    /// Its position in the longest linearization, if it was placed.
    pub linearized_at: Option<usize>,
    /// The operation.
    pub operation: Operation,
}

/// How many of the last linearized operations an excerpt shows, for the
/// state they leave behind.
const TAIL: usize = 5;

/// The operations overlapping the violation: the candidates that could not
/// be placed, everything whose interval meets theirs, and the last few
/// operations placed before.
pub fn excerpt(history: &History, violation: &Violation<State>) -> Excerpt {
    let ops = &history.operations;
    let position = |i: usize| violation.prefix.iter().position(|&p| p == i);
    let relevant: Vec<usize> = violation
        .candidates
        .iter()
        .copied()
        .filter(|&i| i < ops.len())
        .collect();
    let from = relevant.iter().map(|&i| ops[i].invoke).min().unwrap_or(0);
    let to = relevant
        .iter()
        .map(|&i| ops[i].effective_return())
        .max()
        .unwrap_or(0);
    let tail: Vec<usize> = violation.prefix.iter().rev().take(TAIL).copied().collect();
    let mut chosen: Vec<usize> = (0..ops.len())
        .filter(|&i| {
            relevant.contains(&i)
                || tail.contains(&i)
                || (ops[i].invoke <= to && ops[i].effective_return() >= from)
        })
        .collect();
    chosen.sort_by_key(|&i| (ops[i].invoke, i));
    Excerpt {
        stuck: violation.stuck,
        linearized: violation.prefix.len(),
        revision: violation.state.revision(),
        operations: chosen
            .into_iter()
            .map(|i| ExcerptOp {
                index: i,
                linearized_at: position(i),
                operation: ops[i].clone(),
            })
            .collect(),
    }
}
