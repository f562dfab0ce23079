//! Validation of recorded watch streams against the linearized history.
//!
//! The writes of the linearization (the model's log, [`State::changes`])
//! say exactly which events a watch on a key or prefix from a revision must
//! deliver. Each stream is checked for etcd's watch guarantees:
//!
//! * ordered: events in revision order ([`WatchViolation::OutOfOrder`]);
//! * unique: no `(revision, key)` twice ([`WatchViolation::Duplicate`]);
//! * atomic: all events of one revision (one transaction) in one response
//!   ([`WatchViolation::SplitRevision`]);
//! * reliable: no event missing between the start revision and the last
//!   event seen ([`WatchViolation::Gap`]), every event one the history
//!   made, as it made it ([`WatchViolation::Unexpected`],
//!   [`WatchViolation::Mismatch`]), only watched keys
//!   ([`WatchViolation::NotWatched`]), nothing before the start
//!   ([`WatchViolation::BeforeStart`]);
//! * resumable: a stream that reconnects (the client resumes after the last
//!   revision it saw, within one record) continues exactly there — a replay
//!   shows as duplicates, a skip as a gap — or reports compaction past that
//!   point ([`WatchViolation::WrongCompaction`]), after which nothing more
//!   arrives ([`WatchViolation::EventsAfterCancel`]);
//! * headers: a response's header revision is at least its events'
//!   ([`WatchViolation::HeaderBehind`]).
//!
//! Events are only required up to the last one a stream delivered: a stream
//! that simply ended early is not a gap. A watch that saw a write whose
//! answer was lost, which the linearization chose not to apply, shows as
//! [`WatchViolation::Unexpected`]; [`patch_history`] first turns the lost
//! puts a watch saw into answered ones (values are unique), as etcd's suite
//! does. Lost deletes, transactions and revokes cannot be identified from
//! events, so the linearization may still pick another order for them than
//! the server did, and the watch then reports the difference.
//!
//! [`State::changes`]: crate::model::State::changes

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::history::{History, Outcome, Request, Response, ResponseBody, TxnOp, TxnOpResult};
use crate::model::State;

/// The kind of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A put.
    Put,
    /// A delete (value empty, create revision and version 0).
    Delete,
}

/// One watch event, as etcd sends it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key.
    pub key: String,
    /// The value (empty for a delete).
    #[serde(default)]
    pub value: String,
    /// The revision of the change.
    pub mod_revision: i64,
    /// The key's creation revision (0 for a delete).
    #[serde(default)]
    pub create_revision: i64,
    /// The key's version (0 for a delete).
    #[serde(default)]
    pub version: i64,
    /// The key's lease (0 for none or a delete).
    #[serde(default)]
    pub lease: i64,
}

/// One recorded watch stream, from its creation to its end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchRecord {
    /// The key, or the prefix when `prefix` is set.
    pub key: String,
    /// Whether every key starting with `key` is watched.
    #[serde(default)]
    pub prefix: bool,
    /// The start revision asked for; `0` means "after the current one" (the
    /// first response's header revision + 1).
    #[serde(default)]
    pub start_revision: i64,
    /// The responses, in the order received.
    pub responses: Vec<WatchResponseRecord>,
}

/// One response of a watch stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchResponseRecord {
    /// The header revision.
    pub header_revision: i64,
    /// The events.
    #[serde(default)]
    pub events: Vec<Event>,
    /// Non-zero when the watch was canceled because its start revision was
    /// compacted: the oldest revision still available.
    #[serde(default)]
    pub compact_revision: i64,
    /// Whether the server canceled the watch with this response.
    #[serde(default)]
    pub canceled: bool,
    /// When it arrived (monotonic nanoseconds, the history's clock; `0`
    /// when not recorded).
    #[serde(default)]
    pub received: u64,
}

/// A broken watch guarantee. `watch` is the index of the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchViolation {
    /// An event of a lower revision after one of a higher.
    OutOfOrder {
        /// The record.
        watch: usize,
        /// The revision seen before.
        previous: i64,
        /// The lower revision that followed.
        revision: i64,
    },
    /// The same `(revision, key)` delivered twice.
    Duplicate {
        /// The record.
        watch: usize,
        /// The revision.
        revision: i64,
        /// The key.
        key: String,
    },
    /// The events of one revision spread over several responses.
    SplitRevision {
        /// The record.
        watch: usize,
        /// The revision.
        revision: i64,
    },
    /// A change of the history the watch should have delivered, skipped.
    Gap {
        /// The record.
        watch: usize,
        /// The revision of the missing event.
        revision: i64,
        /// Its key.
        key: String,
    },
    /// An event no write of the history made.
    Unexpected {
        /// The record.
        watch: usize,
        /// The event.
        event: Event,
    },
    /// An event at the right revision and key, but not what the write made.
    Mismatch {
        /// The record.
        watch: usize,
        /// What the history says.
        expected: Event,
        /// What the watch delivered.
        observed: Event,
    },
    /// An event for a key the watch does not cover.
    NotWatched {
        /// The record.
        watch: usize,
        /// The key.
        key: String,
        /// The revision.
        revision: i64,
    },
    /// An event older than the start revision.
    BeforeStart {
        /// The record.
        watch: usize,
        /// The revision.
        revision: i64,
    },
    /// A compaction reported at or below a revision the stream had already
    /// passed (it should have continued instead).
    WrongCompaction {
        /// The record.
        watch: usize,
        /// The compact revision reported.
        compact_revision: i64,
        /// The revision the stream was at (last seen + 1, or its start).
        next_revision: i64,
    },
    /// Events after the watch was canceled.
    EventsAfterCancel {
        /// The record.
        watch: usize,
    },
    /// A response whose header revision is below one of its events'.
    HeaderBehind {
        /// The record.
        watch: usize,
        /// The header revision.
        header_revision: i64,
        /// The event revision above it.
        revision: i64,
    },
}

/// Validates `watches` against the writes of a linearization, `changes` as
/// [`State::changes`] returns them (revision order, events of one revision
/// in the order the request made them).
pub fn validate(watches: &[WatchRecord], changes: &[(i64, Vec<Event>)]) -> Vec<WatchViolation> {
    let mut out = Vec::new();
    for (w, record) in watches.iter().enumerate() {
        validate_one(w, record, changes, &mut out);
    }
    out
}

/// [`validate`] against the log of a linearization's final state.
pub fn validate_against(state: &State, watches: &[WatchRecord]) -> Vec<WatchViolation> {
    validate(watches, &state.changes())
}

fn validate_one(
    w: usize,
    record: &WatchRecord,
    changes: &[(i64, Vec<Event>)],
    out: &mut Vec<WatchViolation>,
) {
    let watched = |key: &str| {
        if record.prefix {
            key.starts_with(&record.key)
        } else {
            key == record.key
        }
    };
    let start = match (record.start_revision, record.responses.first()) {
        (s, _) if s > 0 => s,
        (_, Some(first)) => first.header_revision + 1,
        (_, None) => return,
    };
    let expected: Vec<&Event> = changes
        .iter()
        .filter(|(rev, _)| *rev >= start)
        .flat_map(|(_, events)| events.iter())
        .filter(|e| watched(&e.key))
        .collect();
    let mut next = 0; // index into `expected`
    let mut last_rev: Option<i64> = None;
    let mut seen: HashSet<(i64, &str)> = HashSet::new();
    let mut response_of: HashMap<i64, usize> = HashMap::new();
    let mut split_reported: HashSet<i64> = HashSet::new();
    let mut canceled = false;
    let mut after_cancel_reported = false;

    for (ri, resp) in record.responses.iter().enumerate() {
        if canceled && !resp.events.is_empty() && !after_cancel_reported {
            out.push(WatchViolation::EventsAfterCancel { watch: w });
            after_cancel_reported = true;
        }
        if resp.compact_revision > 0 {
            let next_revision = last_rev.map_or(start, |r| r + 1);
            if resp.compact_revision <= next_revision {
                out.push(WatchViolation::WrongCompaction {
                    watch: w,
                    compact_revision: resp.compact_revision,
                    next_revision,
                });
            }
            // What lies below the compaction is excused.
            while next < expected.len() && expected[next].mod_revision < resp.compact_revision {
                next += 1;
            }
            canceled = true;
        }
        canceled |= resp.canceled;
        for ev in &resp.events {
            if ev.mod_revision > resp.header_revision {
                out.push(WatchViolation::HeaderBehind {
                    watch: w,
                    header_revision: resp.header_revision,
                    revision: ev.mod_revision,
                });
            }
            if !watched(&ev.key) {
                out.push(WatchViolation::NotWatched {
                    watch: w,
                    key: ev.key.clone(),
                    revision: ev.mod_revision,
                });
                continue;
            }
            if ev.mod_revision < start {
                out.push(WatchViolation::BeforeStart {
                    watch: w,
                    revision: ev.mod_revision,
                });
                continue;
            }
            if !seen.insert((ev.mod_revision, &ev.key)) {
                out.push(WatchViolation::Duplicate {
                    watch: w,
                    revision: ev.mod_revision,
                    key: ev.key.clone(),
                });
                continue;
            }
            if let Some(prev) = last_rev
                && ev.mod_revision < prev
            {
                out.push(WatchViolation::OutOfOrder {
                    watch: w,
                    previous: prev,
                    revision: ev.mod_revision,
                });
                continue;
            }
            match response_of.get(&ev.mod_revision) {
                Some(&r) if r != ri => {
                    if split_reported.insert(ev.mod_revision) {
                        out.push(WatchViolation::SplitRevision {
                            watch: w,
                            revision: ev.mod_revision,
                        });
                    }
                }
                Some(_) => {}
                None => {
                    response_of.insert(ev.mod_revision, ri);
                }
            }
            last_rev = Some(ev.mod_revision);
            let found = expected[next..]
                .iter()
                .position(|e| e.mod_revision == ev.mod_revision && e.key == ev.key)
                .map(|p| p + next);
            match found {
                Some(p) => {
                    for missing in &expected[next..p] {
                        out.push(WatchViolation::Gap {
                            watch: w,
                            revision: missing.mod_revision,
                            key: missing.key.clone(),
                        });
                    }
                    if expected[p] != ev {
                        out.push(WatchViolation::Mismatch {
                            watch: w,
                            expected: expected[p].clone(),
                            observed: ev.clone(),
                        });
                    }
                    next = p + 1;
                }
                None => out.push(WatchViolation::Unexpected {
                    watch: w,
                    event: ev.clone(),
                }),
            }
        }
    }
}

/// The history with every put of unknown outcome that a watch delivered
/// (same key and value; the traffic writes unique values) turned into an
/// answered put at the event's revision. Its return time stays unknown:
/// it happened at some point after its invocation.
pub fn patch_history(history: &History, watches: &[WatchRecord]) -> History {
    let mut seen: HashMap<(&str, &str), i64> = HashMap::new();
    for event in watches
        .iter()
        .flat_map(|w| &w.responses)
        .flat_map(|r| &r.events)
        .filter(|e| e.kind == EventKind::Put)
    {
        seen.entry((&event.key, &event.value))
            .or_insert(event.mod_revision);
    }
    let mut patched = history.clone();
    for op in &mut patched.operations {
        if !matches!(op.outcome, Outcome::Unknown) {
            continue;
        }
        let Some((key, value)) = put_of(&op.request) else {
            continue;
        };
        let Some(&revision) = seen.get(&(key, value)) else {
            continue;
        };
        let body = match &op.request {
            // The put is in the success branch: the compare held. Only a
            // branch of puts alone is patched; the answers of its reads or
            // deletes would be guesses.
            Request::Txn { success, .. } => {
                if !success.iter().all(|o| matches!(o, TxnOp::Put { .. })) {
                    continue;
                }
                ResponseBody::Txn {
                    succeeded: true,
                    results: vec![TxnOpResult::Put; success.len()],
                }
            }
            _ => ResponseBody::Put,
        };
        op.outcome = Outcome::Response(Response { revision, body });
    }
    patched
}

/// The key and value a request puts, if it puts one: a put, or the first
/// put of a txn's success branch.
pub fn put_of(request: &Request) -> Option<(&str, &str)> {
    match request {
        Request::Put { key, value, .. } => Some((key, value)),
        Request::Txn { success, .. } => success.iter().find_map(|o| match o {
            TxnOp::Put { key, value, .. } => Some((key.as_str(), value.as_str())),
            _ => None,
        }),
        _ => None,
    }
}
