//! Lease expiry: the model's expiries and keep-alives, the watch pinning
//! expiries, and the explicit lease checks on crafted histories.

use super::*;
use crate::lease::{Outage, check};
use crate::linearizability::CheckOptions;
use crate::report::Report;
use crate::traffic::{Recorded, add_expiries, patch_unknown};
use crate::watch::{Event, EventKind, WatchRecord, WatchResponseRecord};

const S: u64 = 1_000_000_000;

/// One stream from revision 1, one response per event, each received at
/// the time given with it.
fn watch(events: Vec<(Event, u64)>) -> Vec<WatchRecord> {
    vec![WatchRecord {
        key: "key-".into(),
        prefix: true,
        start_revision: 1,
        responses: events
            .into_iter()
            .map(|(e, received)| WatchResponseRecord {
                header_revision: e.mod_revision,
                events: vec![e],
                compact_revision: 0,
                canceled: false,
                received,
            })
            .collect(),
    }]
}

fn grant(ttl: i64, invoke: u64, ret: u64) -> Operation {
    op(
        1,
        invoke,
        Some(ret),
        Request::LeaseGrant { ttl, id: 0 },
        ok(1, ResponseBody::LeaseGrant { id: 7 }),
    )
}

fn put_on_7(invoke: u64, ret: u64) -> Operation {
    op(
        1,
        invoke,
        Some(ret),
        Request::Put {
            key: "key-l1-1".into(),
            value: "v".into(),
            lease: 7,
        },
        put_ok(2),
    )
}

fn keep_alive(invoke: u64, ret: Option<u64>, ttl: Option<i64>) -> Operation {
    op(
        1,
        invoke,
        ret,
        Request::LeaseKeepAlive { id: 7 },
        match ttl {
            Some(ttl) => ok(2, ResponseBody::LeaseKeepAlive { ttl }),
            None => Outcome::Unknown,
        },
    )
}

fn leased() -> KeyValue {
    KeyValue {
        lease: 7,
        ..kv("key-l1-1", "v", 2, 2, 1)
    }
}

/// Lease 7 (TTL 2 s) granted at 0, `key-l1-1` put on it at 0.1 s, then
/// (with `deleted_at`) the watch delivering its deletion at revision 3,
/// received at that time.
fn recorded(mut ops: Vec<Operation>, deleted_at: Option<u64>) -> Recorded {
    let mut all = vec![grant(2, 0, S / 100), put_on_7(S / 10, S / 10 + 1)];
    all.append(&mut ops);
    // The history goes on past the TTL.
    let end = if deleted_at.is_some() { 3 } else { 2 };
    all.push(op(3, 9 * S, Some(9 * S + 1), get("a"), got(end, None)));
    let mut events = vec![(ev(EventKind::Put, "key-l1-1", "v", 2, 7), S / 10 + 2)];
    if let Some(t) = deleted_at {
        events.push((ev(EventKind::Delete, "key-l1-1", "", 3, 0), t));
    }
    Recorded {
        history: History { operations: all },
        watches: watch(events),
        ..Recorded::default()
    }
}

fn resolved(mut r: Recorded) -> Recorded {
    patch_unknown(&mut r, true);
    r
}

#[test]
fn an_expiry_is_added_for_a_lease_that_could_run_out() {
    let mut r = recorded(vec![keep_alive(S, Some(S + 1), Some(2))], None);
    // The history ends before the TTL: no expiry.
    r.history.operations.pop();
    assert!(
        !add_expiries(&r.history)
            .operations
            .iter()
            .any(|op| matches!(op.request, Request::LeaseExpire { .. }))
    );
    let r = recorded(vec![keep_alive(3 * S, Some(3 * S + 1), Some(2))], None);
    let with = add_expiries(&r.history);
    let expiry = with
        .operations
        .iter()
        .find(|op| op.request == Request::LeaseExpire { id: 7 })
        .expect("an expiry");
    assert_eq!(expiry.client, REGISTRY);
    assert_eq!(expiry.outcome, Outcome::Unknown);
    // Not before the last answer that saw the lease alive was invoked.
    assert_eq!(expiry.invoke, 3 * S);
}

#[test]
fn the_watch_pins_an_expiry_to_the_revision_that_deleted_its_keys() {
    let r = resolved(recorded(
        vec![op(2, 5 * S, Some(5 * S + 1), get("key-l1-1"), got(3, None))],
        Some(2 * S + S / 2),
    ));
    assert_eq!(r.pinned.pinned_revokes, 1, "{:?}", r.history);
    let expiry = r
        .history
        .operations
        .iter()
        .find(|op| op.request == Request::LeaseExpire { id: 7 })
        .unwrap();
    assert_eq!(expiry.outcome, ok(3, ResponseBody::LeaseRevoke));
    let report = Report::new(&r.history, &r.watches, CheckOptions::default());
    assert!(report.ok(), "{}", report.line());
    assert_eq!(report.leases.expired, 1);
    assert_eq!(report.leases.timed, 1);
    assert_eq!(
        report.line(),
        "linearizable: yes, watch: ok, leases: ok",
        "{report:?}"
    );
}

#[test]
fn an_expiry_nothing_saw_is_dropped() {
    // Lease 7 has no key, nothing says it is gone: its expiry is left out.
    let mut r = Recorded {
        history: History {
            operations: vec![
                grant(2, 0, 1),
                op(2, 5 * S, Some(5 * S), get("a"), got(1, None)),
            ],
        },
        ..Recorded::default()
    };
    patch_unknown(&mut r, true);
    assert_eq!(r.pinned.dropped, 1);
    assert!(r.history.operations.iter().all(|op| op.is_known()));
}

#[test]
fn a_keep_alive_answered_ttl_0_needs_the_lease_gone() {
    // Answered TTL 0 after the TTL: explained by the expiry (lease 7
    // holds no key).
    let gone = Recorded {
        history: History {
            operations: vec![
                grant(2, 0, S / 100),
                op(
                    1,
                    5 * S,
                    Some(5 * S + 1),
                    Request::LeaseKeepAlive { id: 7 },
                    ok(1, ResponseBody::LeaseKeepAlive { ttl: 0 }),
                ),
            ],
        },
        ..Recorded::default()
    };
    let r = resolved(gone.clone());
    assert!(
        r.history
            .operations
            .iter()
            .any(|op| op.request == Request::LeaseExpire { id: 7 }),
        "kept: the keep-alive saw the lease gone"
    );
    let report = Report::new(&r.history, &r.watches, CheckOptions::default());
    assert!(report.ok(), "{}", report.line());
    // Without the expiry nothing explains it.
    let report = Report::new(&gone.history, &[], CheckOptions::default());
    assert_eq!(report.linearizable, crate::report::Linearizable::No);
    // Answered TTL > 0 after the lease's key was deleted by its expiry:
    // not linearizable.
    let alive_after = resolved(recorded(
        vec![
            op(2, 3 * S, Some(3 * S + 1), get("key-l1-1"), got(3, None)),
            keep_alive(4 * S, Some(4 * S + 1), Some(2)),
        ],
        Some(2 * S + S / 2),
    ));
    let report = Report::new(
        &alive_after.history,
        &alive_after.watches,
        CheckOptions::default(),
    );
    assert_eq!(report.linearizable, crate::report::Linearizable::No);
}

#[test]
fn a_key_read_after_its_lease_ended_is_reported() {
    // The watch delivered the expiry at revision 3; a read at revision 3
    // still returns the key with its lease.
    let r = resolved(recorded(
        vec![op(
            2,
            3 * S,
            Some(3 * S + 1),
            get("key-l1-1"),
            got(3, Some(leased())),
        )],
        Some(2 * S + S / 2),
    ));
    let found = check(&r.history, &r.watches, &[]);
    assert_eq!(found.stale_reads.len(), 1, "{found:?}");
    assert_eq!(found.stale_reads[0].deleted_at, 3);
    assert_eq!(found.stale_reads[0].read_at, 3);
    let report = Report::new(&r.history, &r.watches, CheckOptions::default());
    assert!(!report.ok());
    assert!(
        report
            .line()
            .contains("leases: 1 key read after its lease ended"),
        "{}",
        report.line()
    );
    // The same read at revision 2 is fine.
    let r = resolved(recorded(
        vec![op(
            2,
            S / 5,
            Some(S / 5 + 1),
            get("key-l1-1"),
            got(2, Some(leased())),
        )],
        Some(2 * S + S / 2),
    ));
    assert!(check(&r.history, &r.watches, &[]).stale_reads.is_empty());
}

#[test]
fn a_lease_that_outlives_its_ttl_is_reported_unless_a_restart_explains_it() {
    // TTL 2 s from the grant's return at 0.01 s, deletion seen at 5 s:
    // 3 s past the TTL, over the 2 s slack.
    let late = resolved(recorded(vec![], Some(5 * S)));
    let found = check(&late.history, &late.watches, &[]);
    assert_eq!(found.outlived.len(), 1, "{found:?}");
    assert!(found.early.is_empty());
    let report = Report::new(&late.history, &late.watches, CheckOptions::default());
    assert!(!report.ok());
    assert!(
        report.line().contains("leases: 1 lease outlived its TTL"),
        "{}",
        report.line()
    );
    // A keep-alive answered at 2 s renews it: 5 s is within TTL + slack.
    let kept = resolved(recorded(
        vec![keep_alive(2 * S - 1, Some(2 * S), Some(2))],
        Some(5 * S),
    ));
    let found = check(&kept.history, &kept.watches, &[]);
    assert!(found.ok(), "{found:?}");
    assert_eq!(found.timed, 1);
    // So does a restart that ended at 2.5 s.
    let restart = [Outage {
        kind: "kill".into(),
        start: 2 * S,
        end: 2 * S + S / 2,
    }];
    let found = check(&late.history, &late.watches, &restart);
    assert!(found.ok(), "{found:?}");
    // A keep-alive of unknown outcome may have renewed it: not timed.
    let unknown = resolved(recorded(vec![keep_alive(S, None, None)], Some(5 * S)));
    let found = check(&unknown.history, &unknown.watches, &[]);
    assert!(found.ok(), "{found:?}");
    assert_eq!((found.expired, found.timed), (1, 0));
}

#[test]
fn a_lease_that_expires_before_its_ttl_is_reported() {
    // Kept alive at 1 s (answered TTL 2), gone per the watch at 2 s.
    let early = resolved(recorded(
        vec![keep_alive(S, Some(S + 1), Some(2))],
        Some(2 * S),
    ));
    let found = check(&early.history, &early.watches, &[]);
    assert_eq!(found.early.len(), 1, "{found:?}");
    assert_eq!(found.early[0].from, S);
    let report = Report::new(&early.history, &early.watches, CheckOptions::default());
    assert!(
        report.line().contains("1 lease expired early"),
        "{}",
        report.line()
    );
    // Or a keep-alive answered TTL 0 at 1.5 s.
    let early = recorded(
        vec![
            keep_alive(S, Some(S + 1), Some(2)),
            keep_alive(S + S / 2, Some(S + S / 2), Some(0)),
        ],
        None,
    );
    assert_eq!(check(&early.history, &[], &[]).early.len(), 1);
    // Gone at 3.5 s after the keep-alive at 1 s: fine.
    let fine = resolved(recorded(
        vec![keep_alive(S, Some(S + 1), Some(2))],
        Some(3 * S + S / 2),
    ));
    assert!(check(&fine.history, &fine.watches, &[]).ok());
}
