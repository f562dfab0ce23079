//! The lease guarantees, checked explicitly on a recorded run (on the
//! history as the watch resolved it, [`crate::traffic::patch_unknown`]):
//!
//! * **A key is never read after its lease ended.** When the watch
//!   delivered, at revision `R`, the deletion of keys that were all attached
//!   to one lease `L` and that no answered delete or transaction made (a
//!   revoke's, or the lease's expiry), no read at a revision `>= R` (its
//!   header revision, or the revision it asked for) may return one of those
//!   keys with lease `L` and a modification revision `< R`
//!   ([`StaleRead`]). The linearizability check rules this out too; this is
//!   the same guarantee said plainly, reported on its own.
//! * **No lease outlives its TTL by more than [`TTL_SLACK_NANOS`].** For every
//!   expiry the watch pinned to the revision that deleted its keys, the time
//!   the watch delivered that deletion, minus the latest of the grant's
//!   return, the last keep-alive answered TTL > 0, and the end of the last
//!   outage before it ([`Outage`]: a kill -9 and restart, a cut, a dropped
//!   watch), is at most the TTL plus [`TTL_SLACK_NANOS`] ([`TtlViolation`],
//!   `outlived`). A lease with a keep-alive of unknown outcome since the
//!   last restart is not timed: that keep-alive may have renewed it.
//! * **No lease expires before its TTL.** For every lease granted once and
//!   never revoked explicitly, the first sign that it was gone (the watch
//!   delivering its expiry, a keep-alive answered TTL 0, "lease not found")
//!   comes no earlier than the TTL after the invocation of its grant or of
//!   its last keep-alive answered TTL > 0, minus [`EARLY_SLACK_NANOS`]
//!   (`early`).
//!
//! The slack: etcd 3.4 checks for expired leases every 500 ms and, when its
//! member becomes leader (at every restart), renews every lease by its TTL
//! plus one election timeout (1 s by default); muster serve's expirer
//! wakes at the soonest expiry (every 500 ms at most) and a restart gives
//! every lease its full TTL from the moment it opens its data. With the
//! revoke's commit and the watch's delivery on a loaded machine, 2 s.
//! Measured by hand in `scripts/lease-ttl-after-kill.sh` (TTL 3 s, key gone
//! 2.4–2.9 s after the restart on muster serve, 3.8–4.6 s on etcd).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::history::{
    EtcdError, History, KeyValue, Operation, Outcome, Request, Response, ResponseBody, TxnOpResult,
};
use crate::model::claimed_revision;
use crate::watch::{EventKind, WatchRecord};

/// How much later than its TTL a lease may expire (see the module
/// documentation).
pub const TTL_SLACK_NANOS: u64 = 2_000_000_000;
/// How much earlier than its TTL a lease may seem to expire (timers and
/// clocks of one machine).
pub const EARLY_SLACK_NANOS: u64 = 100_000_000;

/// A time the run interrupted the registry or the watch, on the history's
/// clock (monotonic nanoseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outage {
    /// `kill` (kill -9 and restart: `end` is when it answered again),
    /// `cut`, `drop-watch`.
    pub kind: String,
    /// When it began.
    pub start: u64,
    /// When it was over.
    pub end: u64,
}

/// A read that returned a key after the watch delivered its deletion by
/// its lease's end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleRead {
    /// The read's index in the history.
    pub index: usize,
    /// The key.
    pub key: String,
    /// Its lease.
    pub lease: i64,
    /// The modification revision the read returned.
    pub mod_revision: i64,
    /// The revision that deleted it with its lease.
    pub deleted_at: i64,
    /// The revision the read was served at.
    pub read_at: i64,
}

/// A lease that ended too late or too early.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtlViolation {
    /// The lease.
    pub lease: i64,
    /// Its TTL in seconds.
    pub ttl: i64,
    /// The time its TTL counts from (nanoseconds).
    pub from: u64,
    /// The time it was seen gone (nanoseconds).
    pub gone: u64,
}

/// What [`check`] found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LeaseReport {
    /// Expiries the watch pinned to the revision that deleted their keys.
    pub expired: usize,
    /// Of those, the ones timed against the upper bound.
    pub timed: usize,
    /// The longest a timed lease lived past its TTL, in seconds (negative:
    /// all expired before the TTL since the reference point).
    pub max_over_ttl: Option<f64>,
    /// Keys read after their lease ended.
    pub stale_reads: Vec<StaleRead>,
    /// Leases that outlived their TTL by more than [`TTL_SLACK_NANOS`].
    pub outlived: Vec<TtlViolation>,
    /// Leases gone before their TTL (less [`EARLY_SLACK_NANOS`]).
    pub early: Vec<TtlViolation>,
}

impl LeaseReport {
    /// Whether no lease guarantee was broken.
    pub fn ok(&self) -> bool {
        self.stale_reads.is_empty() && self.outlived.is_empty() && self.early.is_empty()
    }

    /// `leases: ok`, or what was broken.
    pub fn line(&self) -> String {
        if self.ok() {
            return "leases: ok".into();
        }
        let mut parts = Vec::new();
        let plural = |n: usize, one: &str, many: &str| {
            if n == 1 {
                format!("1 {one}")
            } else {
                format!("{n} {many}")
            }
        };
        if !self.stale_reads.is_empty() {
            parts.push(plural(
                self.stale_reads.len(),
                "key read after its lease ended",
                "keys read after their lease ended",
            ));
        }
        if !self.outlived.is_empty() {
            parts.push(plural(
                self.outlived.len(),
                "lease outlived its TTL",
                "leases outlived their TTL",
            ));
        }
        if !self.early.is_empty() {
            parts.push(plural(
                self.early.len(),
                "lease expired early",
                "leases expired early",
            ));
        }
        format!("leases: {}", parts.join(", "))
    }
}

/// Checks the lease guarantees of `history` (resolved by the watch),
/// whose run had `outages`.
pub fn check(history: &History, watches: &[WatchRecord], outages: &[Outage]) -> LeaseReport {
    let by_rev = crate::pin::events_by_revision(watches);
    let mut report = LeaseReport {
        stale_reads: stale_reads(history, &by_rev),
        ..LeaseReport::default()
    };

    // When the watch first delivered each revision.
    let mut seen: HashMap<i64, u64> = HashMap::new();
    for r in watches.iter().flat_map(|w| &w.responses) {
        if r.received == 0 {
            continue;
        }
        for e in &r.events {
            let t = seen.entry(e.mod_revision).or_insert(r.received);
            *t = (*t).min(r.received);
        }
    }

    let leases = lease_facts(&history.operations);
    let mut over: Option<f64> = None;
    for (id, facts) in &leases {
        let Some(grant) = facts.grant.filter(|_| facts.grants == 1 && !facts.revoked) else {
            continue;
        };
        let ttl_nanos = u64::try_from(grant.ttl).unwrap_or(0) * 1_000_000_000;
        let expired_seen = facts.expired_at.and_then(|r| seen.get(&r).copied());
        if facts.expired_at.is_some() {
            report.expired += 1;
        }
        // The upper bound.
        if let Some(gone) = expired_seen {
            let last_kill = outages
                .iter()
                .filter(|o| o.kind == "kill" && o.start <= gone)
                .map(|o| o.start)
                .max()
                .unwrap_or(0);
            let renewed_unknown = facts.unknown_keep_alives.iter().any(|&t| t >= last_kill);
            if !renewed_unknown && let Some(grant_return) = grant.return_time {
                let outage_end = outages
                    .iter()
                    .filter(|o| o.start <= gone)
                    .map(|o| o.end.min(gone))
                    .max()
                    .unwrap_or(0);
                let acked = facts
                    .acked
                    .iter()
                    .filter(|(_, ret)| *ret <= gone)
                    .map(|(_, ret)| *ret)
                    .max()
                    .unwrap_or(0);
                let from = grant_return.max(acked).max(outage_end);
                report.timed += 1;
                let lived = gone.saturating_sub(from) as f64 / 1e9 - grant.ttl as f64;
                over = Some(over.map_or(lived, |o: f64| o.max(lived)));
                if gone.saturating_sub(from) > ttl_nanos + TTL_SLACK_NANOS {
                    report.outlived.push(TtlViolation {
                        lease: *id,
                        ttl: grant.ttl,
                        from,
                        gone,
                    });
                }
            }
        }
        // The lower bound.
        let gone = expired_seen
            .into_iter()
            .chain(facts.seen_gone.iter().copied())
            .min();
        if let Some(gone) = gone {
            let from = facts
                .acked
                .iter()
                .filter(|(invoke, _)| *invoke < gone)
                .map(|(invoke, _)| *invoke)
                .chain([grant.invoke])
                .max()
                .unwrap_or(grant.invoke);
            if gone + EARLY_SLACK_NANOS < from + ttl_nanos {
                report.early.push(TtlViolation {
                    lease: *id,
                    ttl: grant.ttl,
                    from,
                    gone,
                });
            }
        }
    }
    report.max_over_ttl = over;
    report
}

#[derive(Debug, Clone, Copy)]
struct Grant {
    ttl: i64,
    invoke: u64,
    return_time: Option<u64>,
}

/// What the history says of one lease.
#[derive(Debug, Default)]
struct Facts {
    grant: Option<Grant>,
    grants: usize,
    /// Any revoke of it asked for, whatever came of it.
    revoked: bool,
    /// The revision its expiry was pinned to.
    expired_at: Option<i64>,
    /// Keep-alives answered TTL > 0: invocation and return.
    acked: Vec<(u64, u64)>,
    /// Invocations of keep-alives of unknown outcome.
    unknown_keep_alives: Vec<u64>,
    /// Return times of answers saying it was gone.
    seen_gone: Vec<u64>,
}

fn lease_facts(ops: &[Operation]) -> BTreeMap<i64, Facts> {
    let mut out: BTreeMap<i64, Facts> = BTreeMap::new();
    for op in ops {
        match (&op.request, &op.outcome) {
            (
                Request::LeaseGrant { ttl, .. },
                Outcome::Response(Response {
                    body: ResponseBody::LeaseGrant { id },
                    ..
                }),
            ) => {
                let f = out.entry(*id).or_default();
                f.grants += 1;
                f.grant = Some(Grant {
                    ttl: *ttl,
                    invoke: op.invoke,
                    return_time: op.return_time,
                });
            }
            (Request::LeaseRevoke { id }, _) => out.entry(*id).or_default().revoked = true,
            (Request::LeaseExpire { id }, Outcome::Response(r)) => {
                out.entry(*id).or_default().expired_at = Some(r.revision);
            }
            (Request::LeaseKeepAlive { id }, outcome) => {
                let f = out.entry(*id).or_default();
                match outcome {
                    Outcome::Response(Response {
                        body: ResponseBody::LeaseKeepAlive { ttl },
                        ..
                    }) => match (ttl, op.return_time) {
                        (1.., Some(ret)) => f.acked.push((op.invoke, ret)),
                        (0, Some(ret)) => f.seen_gone.push(ret),
                        _ => {}
                    },
                    Outcome::Error(EtcdError::LeaseNotFound) => {
                        f.seen_gone.extend(op.return_time);
                    }
                    Outcome::Unknown => f.unknown_keep_alives.push(op.invoke),
                    _ => {}
                }
            }
            (Request::Put { lease, .. }, Outcome::Error(EtcdError::LeaseNotFound))
                if *lease != 0 =>
            {
                out.entry(*lease)
                    .or_default()
                    .seen_gone
                    .extend(op.return_time);
            }
            _ => {}
        }
    }
    out
}

/// The reads that returned a key the watch had seen deleted with its lease
/// (see the module documentation).
fn stale_reads(
    history: &History,
    by_rev: &BTreeMap<i64, Vec<crate::watch::Event>>,
) -> Vec<StaleRead> {
    let claimed: std::collections::HashSet<i64> = history
        .operations
        .iter()
        .filter_map(claimed_revision)
        .collect();
    // key -> (revision, lease) of its deletions with its lease.
    let mut ended: HashMap<&str, Vec<(i64, i64)>> = HashMap::new();
    let mut lease_of: HashMap<&str, i64> = HashMap::new();
    for (&rev, events) in by_rev {
        let delete_only = events.iter().all(|e| e.kind == EventKind::Delete);
        let leases: std::collections::BTreeSet<i64> = events
            .iter()
            .map(|e| lease_of.get(e.key.as_str()).copied().unwrap_or(0))
            .collect();
        if delete_only
            && !claimed.contains(&rev)
            && leases.len() == 1
            && let Some(&lease) = leases.first()
            && lease != 0
        {
            for e in events {
                ended.entry(&e.key).or_default().push((rev, lease));
            }
        }
        for e in events {
            match e.kind {
                EventKind::Put if e.lease != 0 => {
                    lease_of.insert(&e.key, e.lease);
                }
                _ => {
                    lease_of.remove(e.key.as_str());
                }
            }
        }
    }
    let mut out = Vec::new();
    for (index, op) in history.operations.iter().enumerate() {
        let Outcome::Response(r) = &op.outcome else {
            continue;
        };
        let (asked, kvs): (i64, Vec<&KeyValue>) = match (&op.request, &r.body) {
            (Request::Get { revision, .. }, ResponseBody::Get { kv }) => {
                (*revision, kv.iter().collect())
            }
            (Request::Range { revision, .. }, ResponseBody::Range { kvs }) => {
                (*revision, kvs.iter().collect())
            }
            (Request::Txn { .. }, ResponseBody::Txn { results, .. }) => {
                // A transaction that wrote read the revision before its own.
                let wrote = results
                    .iter()
                    .any(|r| !matches!(r, TxnOpResult::Get { .. }));
                let kvs = results
                    .iter()
                    .filter_map(|r| match r {
                        TxnOpResult::Get { kv } => kv.as_ref(),
                        _ => None,
                    })
                    .collect();
                (if wrote { r.revision - 1 } else { 0 }, kvs)
            }
            _ => continue,
        };
        let read_at = if asked > 0 { asked } else { r.revision };
        for kv in kvs {
            let Some(deletions) = ended.get(kv.key.as_str()) else {
                continue;
            };
            if let Some(&(deleted_at, lease)) = deletions
                .iter()
                .find(|&&(rev, lease)| lease == kv.lease && kv.mod_revision < rev && rev <= read_at)
            {
                out.push(StaleRead {
                    index,
                    key: kv.key.clone(),
                    lease,
                    mod_revision: kv.mod_revision,
                    deleted_at,
                    read_at,
                });
            }
        }
    }
    out
}
