//! Resolving deletes and lease revokes of unknown outcome from the watch.
//!
//! Puts are resolved by their unique values ([`crate::watch::patch_history`]).
//! A delete or a revoke carries no value, but the revision it made does show
//! in the watch: a revision that only deletes keys and that no answered
//! operation claims was made by one of the operations whose outcome is
//! unknown. So, as etcd's robustness suite resolves what it can before the
//! search:
//!
//! * Every such revision `r` gets its candidates: the unknown deletes of its
//!   one key, and the unknown revokes of the lease its keys were attached to
//!   just before `r` (all of them, and only them, per the watch), invoked
//!   before `r` existed (no answered operation that returned before the
//!   invocation reported a revision `>= r`).
//! * A revision with a single candidate was made by it: the operation is
//!   pinned (turned into an answered one at `r`, still without a return
//!   time) and is no candidate elsewhere, which may leave other revisions
//!   with one candidate, and so on.
//! * With a complete watch (every revision from 2 to the end delivered, no
//!   compaction), an unknown delete that is left a candidate of no revision
//!   made none: it found no key and had no effect, so it is dropped. So is
//!   such a revoke, when nothing else refers to its lease after it was
//!   invoked (its only other effect, the lease gone, is then unobservable).
//!
//! Anything still ambiguous (two lost deletes of the same key, a candidate
//! of two revisions) stays unknown. Pinning and dropping only ever remove
//! possibilities from the search, and only ones the watch rules out: they
//! cannot make a history that is not linearizable pass.
//!
//! The watch is assumed to cover every key written (the traffic watches its
//! whole prefix and writes nothing else), so that a revision it did not
//! deliver is a gap; with gaps before `r`, `r` is not used. Lease expiry is
//! another maker of delete-only revisions: the run adds a
//! [`Request::LeaseExpire`] of unknown outcome for every lease that could
//! expire, a candidate like a lost revoke of the same lease, so a revision
//! whose only candidate is the expiry is pinned to it. An expiry left a
//! candidate of no revision, with a complete watch, is dropped unless an
//! answer saw the lease gone (a keep-alive answered TTL 0, "lease not
//! found"). Leases that could expire without such an operation in the
//! history (`may_expire`) make their revisions ambiguous.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::history::{History, Operation, Outcome, Request, Response, ResponseBody, TxnOp};
use crate::model::claimed_revision;
use crate::watch::{Event, EventKind, WatchRecord};

/// What [`pin_unknown`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PinStats {
    /// Unknown deletes pinned to a revision.
    pub pinned_deletes: usize,
    /// Unknown revokes pinned to a revision.
    pub pinned_revokes: usize,
    /// Unknown deletes and revokes dropped (they made no revision and
    /// their effect, if any, is unobservable).
    pub dropped: usize,
}

/// Every event the watches delivered, by revision (each `(revision, key)`
/// once), and whether the revisions from 2 to the last one are gapless.
pub fn events_by_revision(watches: &[WatchRecord]) -> BTreeMap<i64, Vec<Event>> {
    let mut by_rev: BTreeMap<i64, Vec<Event>> = BTreeMap::new();
    let mut seen: HashSet<(i64, &str)> = HashSet::new();
    for e in watches
        .iter()
        .flat_map(|w| &w.responses)
        .flat_map(|r| &r.events)
    {
        if seen.insert((e.mod_revision, &e.key)) {
            by_rev.entry(e.mod_revision).or_default().push(e.clone());
        }
    }
    by_rev
}

/// A candidate's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Maker {
    Delete,
    Revoke,
}

/// Pins or drops the unknown deletes and revokes of `history` that the
/// watch resolves (see the module documentation). `complete`: the watch saw
/// every revision to the end of the history (none compacted away, it caught
/// up with the final revision). `may_expire`: leases that could have expired
/// on their own during the history.
pub fn pin_unknown(
    history: &History,
    watches: &[WatchRecord],
    complete: bool,
    may_expire: &HashSet<i64>,
) -> (History, PinStats) {
    let mut stats = PinStats::default();
    let ops = &history.operations;
    let by_rev = events_by_revision(watches);
    let claimed: HashSet<i64> = ops.iter().filter_map(claimed_revision).collect();

    // An unknown operation that could make a delete-only revision and is
    // neither a delete nor a revoke (a txn that deletes): then no revision's
    // candidates are known in full, and nothing is pinned.
    let wild = ops.iter().any(|op| {
        !op.is_known()
            && matches!(&op.request, Request::Txn { success, failure, .. }
                if success.iter().chain(failure).any(|o| matches!(o, TxnOp::Delete { .. })))
    });

    // The highest revision an answered operation reported by each time:
    // nothing invoked later can have made a revision at or below it.
    let mut answered: Vec<(u64, i64)> = ops
        .iter()
        .filter_map(|op| match (&op.outcome, op.return_time) {
            (Outcome::Response(r), Some(t)) => Some((t, r.revision)),
            _ => None,
        })
        .collect();
    answered.sort_unstable();
    let mut high = 0;
    for a in &mut answered {
        high = high.max(a.1);
        a.1 = high;
    }
    let floor = |invoke: u64| -> i64 {
        let i = answered.partition_point(|&(t, _)| t < invoke);
        if i == 0 { 0 } else { answered[i - 1].1 }
    };

    // Walk the watch in revision order, keeping each key's lease, and note
    // the candidates of every unclaimed delete-only revision.
    let unknown: Vec<(usize, Maker, &str, i64)> = ops
        .iter()
        .enumerate()
        .filter(|(_, op)| !op.is_known())
        .filter_map(|(i, op)| match &op.request {
            Request::Delete { key } => Some((i, Maker::Delete, key.as_str(), 0)),
            Request::LeaseRevoke { id } | Request::LeaseExpire { id } => {
                Some((i, Maker::Revoke, "", *id))
            }
            _ => None,
        })
        .collect();
    let last = by_rev.keys().next_back().copied().unwrap_or(1);
    let gapless_through = {
        let mut r = 1;
        while by_rev.contains_key(&(r + 1)) {
            r += 1;
        }
        r
    };
    let complete = complete && gapless_through == last;
    // Answered revokes: the revision in their answer is the one they made
    // when the lease had keys, and the current one otherwise. A revision
    // that fits an answered revoke invoked before it existed is taken as
    // the revoke's: had a lost delete made it instead, with the revoke
    // finding no keys right after, the same changes at the same place in
    // the order explain every answer (nothing that returned before the
    // revoke was invoked saw the revision), unless a keep-alive could tell
    // the lease was still there; then the revision stays ambiguous.
    let kept_alive: HashSet<i64> = ops
        .iter()
        .filter_map(|op| match op.request {
            Request::LeaseKeepAlive { id } => Some(id),
            _ => None,
        })
        .collect();
    let revoked: HashMap<(i64, i64), u64> = ops
        .iter()
        .filter_map(|op| match (&op.request, &op.outcome) {
            (Request::LeaseRevoke { id }, Outcome::Response(r)) if op.return_time.is_some() => {
                Some(((*id, r.revision), op.invoke))
            }
            _ => None,
        })
        .filter(|((_, rev), invoke)| floor(*invoke) < *rev)
        .collect();
    let mut lease_of: HashMap<&str, i64> = HashMap::new();
    // revision -> candidate operations; operation -> its revisions.
    let mut candidates: BTreeMap<i64, BTreeSet<usize>> = BTreeMap::new();
    let mut revisions_of: HashMap<usize, BTreeSet<i64>> = HashMap::new();
    // Revisions that some maker outside the candidates may have made.
    let mut open: HashSet<i64> = HashSet::new();
    for (&rev, events) in &by_rev {
        let delete_only = events.iter().all(|e| e.kind == EventKind::Delete);
        if delete_only && !claimed.contains(&rev) && rev <= gapless_through && !wild {
            let keys: BTreeSet<&str> = events.iter().map(|e| e.key.as_str()).collect();
            let leases: BTreeSet<i64> = keys
                .iter()
                .map(|k| lease_of.get(k).copied().unwrap_or(0))
                .collect();
            let attached = |id: i64| {
                leases.len() == 1
                    && leases.contains(&id)
                    && lease_of.values().filter(|l| **l == id).count() == keys.len()
            };
            let by_answered = leases
                .first()
                .filter(|&&l| attached(l) && revoked.contains_key(&(l, rev)));
            let mut set = BTreeSet::new();
            match by_answered {
                Some(l) if !kept_alive.contains(l) => {
                    // The answered revoke's: no candidates.
                    for e in events {
                        update(&mut lease_of, e);
                    }
                    continue;
                }
                Some(_) => {
                    open.insert(rev);
                }
                None => {}
            }
            for &(i, kind, key, id) in &unknown {
                if floor(ops[i].invoke) >= rev {
                    continue;
                }
                let fits = match kind {
                    Maker::Delete => keys.len() == 1 && keys.contains(key),
                    // Every key attached to the lease, and only those.
                    Maker::Revoke => attached(id),
                };
                if fits {
                    set.insert(i);
                    revisions_of.entry(i).or_default().insert(rev);
                }
            }
            if leases.len() == 1
                && let Some(&l) = leases.first()
                && may_expire.contains(&l)
            {
                open.insert(rev);
            }
            candidates.insert(rev, set);
        }
        for e in events {
            update(&mut lease_of, e);
        }
    }

    // Propagate the forced choices.
    let mut pinned: HashMap<usize, i64> = HashMap::new();
    let mut queue: Vec<i64> = candidates
        .iter()
        .filter(|(r, c)| c.len() == 1 && !open.contains(r))
        .map(|(r, _)| *r)
        .collect();
    while let Some(rev) = queue.pop() {
        let Some(set) = candidates.get(&rev) else {
            continue;
        };
        let Some(&op) = set.iter().next().filter(|_| set.len() == 1) else {
            continue;
        };
        candidates.remove(&rev);
        pinned.insert(op, rev);
        for other in revisions_of.remove(&op).unwrap_or_default() {
            if let Some(c) = candidates.get_mut(&other) {
                c.remove(&op);
                if c.len() == 1 && !open.contains(&other) {
                    queue.push(other);
                }
            }
        }
    }

    // Unknown revokes whose lease nothing refers to after their invocation.
    let unobservable = |i: usize, id: i64| {
        let since = ops[i].invoke;
        !ops.iter()
            .enumerate()
            .any(|(j, op)| j != i && op.effective_return() > since && refers_to_lease(op, id))
    };

    let mut out = History::default();
    for (i, op) in ops.iter().enumerate() {
        if let Some(&rev) = pinned.get(&i) {
            let body = match op.request {
                Request::Delete { .. } => {
                    stats.pinned_deletes += 1;
                    ResponseBody::Delete { deleted: 1 }
                }
                _ => {
                    stats.pinned_revokes += 1;
                    ResponseBody::LeaseRevoke
                }
            };
            let mut op = op.clone();
            op.outcome = Outcome::Response(Response {
                revision: rev,
                body,
            });
            out.operations.push(op);
            continue;
        }
        let made_none = complete
            && !wild
            && revisions_of
                .get(&i)
                .is_none_or(|revs| revs.iter().all(|r| !candidates.contains_key(r)));
        let drop = !op.is_known()
            && made_none
            && match op.request {
                Request::Delete { .. } => true,
                Request::LeaseRevoke { id } => unobservable(i, id),
                Request::LeaseExpire { id } => !seen_gone(ops, id),
                _ => false,
            };
        if drop {
            stats.dropped += 1;
        } else {
            out.operations.push(op.clone());
        }
    }
    (out, stats)
}

/// Whether an answer says lease `id` was gone: a keep-alive answered TTL
/// 0, or "lease not found" for a request naming it. An expiry that made no
/// revision (the lease had no keys left) matters to nothing else: without
/// such an answer, the history explained with it is explained without it
/// (every answer that saw the lease came before it), so it is dropped.
fn seen_gone(ops: &[Operation], id: i64) -> bool {
    ops.iter().any(|op| match (&op.request, &op.outcome) {
        (
            Request::LeaseKeepAlive { id: l },
            Outcome::Response(Response {
                body: ResponseBody::LeaseKeepAlive { ttl: 0 },
                ..
            }),
        ) => *l == id,
        (_, Outcome::Error(crate::history::EtcdError::LeaseNotFound)) => refers_to_lease(op, id),
        _ => false,
    })
}

/// Whether `op` refers to lease `id` (grants, attaches, keeps alive,
/// revokes it, or read a key attached to it).
fn refers_to_lease(op: &Operation, id: i64) -> bool {
    let request = match &op.request {
        Request::Put { lease, .. } => *lease == id,
        Request::LeaseGrant { id: l, .. }
        | Request::LeaseRevoke { id: l }
        | Request::LeaseExpire { id: l }
        | Request::LeaseKeepAlive { id: l } => *l == id,
        Request::Txn {
            success, failure, ..
        } => success
            .iter()
            .chain(failure)
            .any(|o| matches!(o, TxnOp::Put { lease, .. } if *lease == id)),
        _ => false,
    };
    let answer = match &op.outcome {
        Outcome::Response(r) => match &r.body {
            ResponseBody::Get { kv } => kv.iter().any(|kv| kv.lease == id),
            ResponseBody::Range { kvs } => kvs.iter().any(|kv| kv.lease == id),
            ResponseBody::LeaseGrant { id: l } => *l == id,
            ResponseBody::Txn { results, .. } => results.iter().any(|r| {
                matches!(r, crate::history::TxnOpResult::Get { kv: Some(kv) } if kv.lease == id)
            }),
            _ => false,
        },
        _ => false,
    };
    request || answer
}

/// Keeps each key's lease as the watch's events change it.
fn update<'a>(lease_of: &mut HashMap<&'a str, i64>, e: &'a Event) {
    match e.kind {
        EventKind::Put if e.lease != 0 => {
            lease_of.insert(&e.key, e.lease);
        }
        _ => {
            lease_of.remove(e.key.as_str());
        }
    }
}
