//! Unknown deletes and revokes pinned to (or dropped by) what the watch
//! delivered.

use std::collections::HashSet;

use proptest::prelude::*;

use super::generate::{Shape, generate};
use super::*;
use crate::linearizability::CheckOptions;
use crate::pin::{PinStats, pin_unknown};
use crate::watch::{Event, EventKind, WatchRecord, WatchResponseRecord, patch_history};

/// One stream from revision 1, one response per revision.
fn watch(events: Vec<Event>) -> Vec<WatchRecord> {
    let mut responses: Vec<WatchResponseRecord> = Vec::new();
    for e in events {
        match responses.last_mut() {
            Some(r) if r.header_revision == e.mod_revision => r.events.push(e),
            _ => responses.push(WatchResponseRecord {
                header_revision: e.mod_revision,
                events: vec![e],
                compact_revision: 0,
                canceled: false,
                received: 0,
            }),
        }
    }
    vec![WatchRecord {
        key: String::new(),
        prefix: true,
        start_revision: 1,
        responses,
    }]
}

fn delete(key: &str) -> Request {
    Request::Delete { key: key.into() }
}

/// Client 1 grants lease 7 for `ttl` seconds (revision 1), then puts
/// `a` = 1 on it (revision 2): the start of the histories where a key's
/// delete event may be its lease's.
fn lease_7_holding_a(ttl: i64) -> Vec<Operation> {
    vec![
        op(
            1,
            0,
            Some(5),
            Request::LeaseGrant { ttl, id: 7 },
            ok(1, ResponseBody::LeaseGrant { id: 7 }),
        ),
        op(
            1,
            6,
            Some(10),
            Request::Put {
                key: "a".into(),
                value: "1".into(),
                lease: 7,
            },
            put_ok(2),
        ),
    ]
}

fn pin(history: &[Operation], watches: &[WatchRecord], complete: bool) -> (History, PinStats) {
    pin_unknown(
        &History {
            operations: history.to_vec(),
        },
        watches,
        complete,
        &HashSet::new(),
    )
}

fn pinned_at(op: &Operation) -> Option<i64> {
    match (&op.return_time, &op.outcome) {
        (None, Outcome::Response(r)) => Some(r.revision),
        _ => None,
    }
}

fn linearizable(history: &History, watches: &[WatchRecord]) -> bool {
    crate::check_history_with_watches(history, watches, CheckOptions::default()).is_linearizable()
}

/// rev 2 put a=1 (answered), rev 3 delete a (lost answer), rev 4 put b=1.
fn lost_delete() -> (Vec<Operation>, Vec<WatchRecord>) {
    let ops = vec![
        op(1, 0, Some(10), put("a", "1"), put_ok(2)),
        op(2, 20, None, delete("a"), Outcome::Unknown),
        op(3, 30, Some(40), put("b", "1"), put_ok(4)),
    ];
    let w = watch(vec![
        ev(EventKind::Put, "a", "1", 2, 0),
        ev(EventKind::Delete, "a", "", 3, 0),
        ev(EventKind::Put, "b", "1", 4, 0),
    ]);
    (ops, w)
}

#[test]
fn a_lost_delete_is_pinned_to_its_event() {
    let (ops, w) = lost_delete();
    let (h, stats) = pin(&ops, &w, true);
    assert_eq!(stats.pinned_deletes, 1);
    assert_eq!(pinned_at(&h.operations[1]), Some(3));
    assert!(linearizable(&h, &w));
    // Pinned, a read at revision 3 that still sees `a` is caught.
    let mut bad = h.clone();
    bad.operations.push(op(
        4,
        50,
        Some(60),
        get("a"),
        got(4, Some(kv("a", "1", 2, 2, 1))),
    ));
    assert!(!linearizable(&bad, &w));
}

#[test]
fn a_delete_invoked_after_the_revision_existed_is_not_pinned() {
    // The delete is invoked after an answer reported revision 3: it
    // cannot have made it, so nothing fits revision 3.
    let (mut ops, w) = lost_delete();
    ops[1].invoke = 45;
    let (h, stats) = pin(&ops, &w, false);
    assert_eq!(stats, PinStats::default());
    assert!(!h.operations[1].is_known());
}

#[test]
fn two_lost_deletes_of_one_key_stay_unknown() {
    let (mut ops, w) = lost_delete();
    ops.push(op(4, 25, None, delete("a"), Outcome::Unknown));
    let (h, stats) = pin(&ops, &w, true);
    assert_eq!(stats, PinStats::default());
    assert_eq!(h.operations.iter().filter(|o| !o.is_known()).count(), 2);
    assert!(linearizable(&h, &w));
}

#[test]
fn a_delete_or_a_revoke_of_the_same_key_stays_unknown() {
    // `a` is attached to lease 7: its delete event may be the delete's or
    // the revoke's.
    let mut ops = lease_7_holding_a(600);
    ops.extend([
        op(2, 20, None, delete("a"), Outcome::Unknown),
        op(
            3,
            21,
            None,
            Request::LeaseRevoke { id: 7 },
            Outcome::Unknown,
        ),
    ]);
    let w = watch(vec![
        ev(EventKind::Put, "a", "1", 2, 7),
        ev(EventKind::Delete, "a", "", 3, 0),
    ]);
    let (h, stats) = pin(&ops, &w, true);
    assert_eq!(stats.pinned_deletes + stats.pinned_revokes, 0);
    assert!(linearizable(&h, &w));
}

#[test]
fn a_lost_revoke_is_pinned_to_its_keys_deletes() {
    let lease_put = |key: &str, rev| {
        op(
            1,
            rev as u64 * 10,
            Some(rev as u64 * 10 + 5),
            Request::Put {
                key: key.into(),
                value: format!("{key}1"),
                lease: 7,
            },
            put_ok(rev),
        )
    };
    let ops = vec![
        op(
            1,
            0,
            Some(5),
            Request::LeaseGrant { ttl: 600, id: 7 },
            ok(1, ResponseBody::LeaseGrant { id: 7 }),
        ),
        lease_put("a", 2),
        lease_put("b", 3),
        op(
            2,
            40,
            None,
            Request::LeaseRevoke { id: 7 },
            Outcome::Unknown,
        ),
        // A lost delete of `a` too: it cannot have made revision 4 (two
        // keys), and the revoke's deletion leaves it nothing to delete.
        op(3, 41, None, delete("a"), Outcome::Unknown),
    ];
    let w = watch(vec![
        ev(EventKind::Put, "a", "a1", 2, 7),
        ev(EventKind::Put, "b", "b1", 3, 7),
        ev(EventKind::Delete, "a", "", 4, 0),
        ev(EventKind::Delete, "b", "", 4, 0),
    ]);
    let (h, stats) = pin(&ops, &w, true);
    assert_eq!(stats.pinned_revokes, 1);
    assert_eq!(stats.dropped, 1, "the delete made no revision");
    assert_eq!(pinned_at(&h.operations[3]), Some(4));
    assert!(linearizable(&h, &w));
}

#[test]
fn a_lost_delete_no_complete_watch_saw_is_dropped() {
    let ops = vec![
        op(1, 0, Some(10), put("a", "1"), put_ok(2)),
        op(2, 20, None, delete("b"), Outcome::Unknown),
        op(3, 30, Some(40), put("b", "1"), put_ok(3)),
    ];
    let w = watch(vec![
        ev(EventKind::Put, "a", "1", 2, 0),
        ev(EventKind::Put, "b", "1", 3, 0),
    ]);
    let (h, stats) = pin(&ops, &w, true);
    assert_eq!(stats.dropped, 1);
    assert_eq!(h.operations.len(), 2);
    // Not when the watch may have missed something.
    let (h, stats) = pin(&ops, &w, false);
    assert_eq!(stats, PinStats::default());
    assert_eq!(h.operations.len(), 3);
}

#[test]
fn forced_choices_propagate() {
    // Revision 3 can only be the first delete (the second is invoked
    // after it existed); revision 5 then is the second's.
    let ops = vec![
        op(1, 0, Some(10), put("a", "1"), put_ok(2)),
        op(2, 20, None, delete("a"), Outcome::Unknown),
        op(1, 30, Some(40), put("a", "2"), put_ok(4)),
        op(3, 45, None, delete("a"), Outcome::Unknown),
        op(1, 50, Some(60), put("b", "1"), put_ok(6)),
    ];
    let w = watch(vec![
        ev(EventKind::Put, "a", "1", 2, 0),
        ev(EventKind::Delete, "a", "", 3, 0),
        ev(EventKind::Put, "a", "2", 4, 0),
        ev(EventKind::Delete, "a", "", 5, 0),
        ev(EventKind::Put, "b", "1", 6, 0),
    ]);
    let (h, stats) = pin(&ops, &w, true);
    assert_eq!(stats.pinned_deletes, 2);
    assert_eq!(pinned_at(&h.operations[1]), Some(3));
    assert_eq!(pinned_at(&h.operations[3]), Some(5));
    assert!(linearizable(&h, &w));
}

#[test]
fn a_revision_an_expiry_may_have_made_is_not_pinned() {
    let mut ops = lease_7_holding_a(1);
    ops.push(op(
        2,
        20,
        None,
        Request::LeaseRevoke { id: 7 },
        Outcome::Unknown,
    ));
    let w = watch(vec![
        ev(EventKind::Put, "a", "1", 2, 7),
        ev(EventKind::Delete, "a", "", 3, 0),
    ]);
    let (_, stats) = pin_unknown(&History { operations: ops }, &w, true, &HashSet::from([7]));
    assert_eq!(stats.pinned_revokes, 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// On histories of a correct server, with the watch it would deliver,
    /// pinning and dropping never remove the real linearization.
    #[test]
    fn pinning_keeps_valid_histories_linearizable(
        seed in any::<u64>(),
        clients in 1u32..6,
        ops in 1usize..200,
        keys in 1usize..5,
        unknown_per_mille in 0u32..100,
    ) {
        let (history, expected) = generate(seed, &Shape { clients, ops, keys, unknown_per_mille });
        let w = watch(expected.changes().into_iter().flat_map(|(_, e)| e).collect());
        let patched = patch_history(&history, &w);
        let (pinned, _) = pin_unknown(&patched, &w, true, &HashSet::new());
        let verdict = crate::check_history_with_watches(&pinned, &w, CheckOptions::default());
        // Not a violation; (a timeout on a loaded machine is no finding).
        prop_assert!(
            !matches!(verdict, crate::linearizability::Verdict::Violation(_)),
            "{}",
            history.to_json()
        );
    }
}

#[test]
fn an_acknowledged_put_the_watch_lost_is_reported() {
    let ops = vec![
        op(1, 0, Some(10), put("a", "1"), put_ok(2)),
        op(2, 20, Some(30), put("a", "2"), put_ok(3)),
        op(3, 40, Some(50), put("b", "1"), put_ok(4)),
    ];
    let history = History { operations: ops };
    let good = watch(vec![
        ev(EventKind::Put, "a", "1", 2, 0),
        ev(EventKind::Put, "a", "2", 3, 0),
        ev(EventKind::Put, "b", "1", 4, 0),
    ]);
    assert_eq!(crate::report::lost_writes(&history, &good), vec![]);
    // After a restart the registry reused revision 3 for another write.
    let forgot = watch(vec![
        ev(EventKind::Put, "a", "1", 2, 0),
        ev(EventKind::Put, "b", "1", 3, 0),
        ev(EventKind::Put, "b", "1", 4, 0),
    ]);
    let lost = crate::report::lost_writes(&history, &forgot);
    assert_eq!(lost.len(), 1);
    assert_eq!((lost[0].index, lost[0].revision), (1, 3));
    let report = crate::report::Report::new(&history, &forgot, CheckOptions::default());
    assert!(!report.ok());
    assert!(
        report.line().contains("lost: 1 acknowledged writes"),
        "{}",
        report.line()
    );
}

#[test]
fn a_revision_an_answered_revoke_made_is_not_a_lost_deletes() {
    let mut ops = lease_7_holding_a(600);
    ops.extend([
        op(2, 20, None, delete("a"), Outcome::Unknown),
        op(
            1,
            21,
            Some(30),
            Request::LeaseRevoke { id: 7 },
            ok(3, ResponseBody::LeaseRevoke),
        ),
    ]);
    let w = watch(vec![
        ev(EventKind::Put, "a", "1", 2, 7),
        ev(EventKind::Delete, "a", "", 3, 0),
    ]);
    let (h, stats) = pin(&ops, &w, true);
    assert_eq!(stats.pinned_deletes, 0);
    assert_eq!(stats.dropped, 1);
    assert!(linearizable(&h, &w));
    // Without a complete watch it stays, unknown.
    let (_, stats) = pin(&ops, &w, false);
    assert_eq!(stats, PinStats::default());
}

/// Re-resolves and checks a recorded run: `MUSTER_RUN_DIR=dir cargo test
/// -p muster-robustness --lib recheck -- --ignored --nocapture`.
#[test]
#[ignore]
fn recheck_a_recorded_run() {
    let Ok(dir) = std::env::var("MUSTER_RUN_DIR") else {
        return;
    };
    let dir = std::path::Path::new(&dir);
    let history =
        History::from_json(&std::fs::read_to_string(dir.join("history.json")).unwrap()).unwrap();
    let w: Vec<WatchRecord> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("watches.json")).unwrap()).unwrap();
    let started = std::time::Instant::now();
    let (pinned, stats) = pin_unknown(&history, &w, true, &HashSet::new());
    println!("{stats:?} in {:?}", started.elapsed());
    let started = std::time::Instant::now();
    // Runs before the lease check have no outages.json.
    let outages: Vec<crate::lease::Outage> = std::fs::read_to_string(dir.join("outages.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let t = std::time::Instant::now();
    let leases = crate::lease::check(&pinned, &w, &outages);
    println!(
        "lease check: {:?} ({} expired)",
        t.elapsed(),
        leases.expired
    );
    let t = std::time::Instant::now();
    let verdict = crate::check_history_with_watches(&pinned, &w, CheckOptions::default());
    println!(
        "linearizability: {:?} ({})",
        t.elapsed(),
        verdict.is_linearizable()
    );
    let report =
        crate::report::Report::with_outages(&pinned, &w, &outages, CheckOptions::default());
    println!("{} in {:?}", report.line(), started.elapsed());
    println!("{:?}", report.leases);
}
