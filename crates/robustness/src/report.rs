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
}

impl Report {
    /// Checks `history` (patched with what `watches` saw of lost puts, see
    /// [`watch::patch_history`]) and, if it is linearizable, `watches`
    /// against it.
    pub fn new(history: &History, watches: &[WatchRecord], options: CheckOptions) -> Report {
        let history = &watch::patch_history(history, watches);
        match crate::check_history_with_watches(history, watches, options) {
            Verdict::Linearizable { state, .. } => Report {
                linearizable: Linearizable::Yes,
                watch_violations: watch::validate_against(&state, watches),
                excerpt: None,
            },
            Verdict::Violation(v) => Report {
                linearizable: Linearizable::No,
                watch_violations: Vec::new(),
                excerpt: Some(excerpt(history, &v)),
            },
            Verdict::Timeout { .. } => Report {
                linearizable: Linearizable::Timeout,
                watch_violations: Vec::new(),
                excerpt: None,
            },
        }
    }

    /// `linearizable: yes|no|timeout, watch: ok|N violations`.
    pub fn line(&self) -> String {
        verdict_line(self.linearizable, self.watch_violations.len())
    }

    /// Whether nothing was found wrong.
    pub fn ok(&self) -> bool {
        self.linearizable == Linearizable::Yes && self.watch_violations.is_empty()
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
