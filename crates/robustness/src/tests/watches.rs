//! Watch streams checked against a history's writes.

use super::*;
use crate::model::State;
use crate::watch::{
    Event, EventKind, WatchRecord, WatchResponseRecord, WatchViolation, validate_against,
};

/// rev 2: put a=1; rev 3: txn put a=2, put b=1; rev 4: delete a; rev 5: put c=1.
fn state() -> State {
    let s = State::new();
    let (s, _) = s.apply(&put("a", "1"));
    let (s, _) = s.apply(&Request::Txn {
        compares: vec![],
        success: vec![
            TxnOp::Put {
                key: "a".into(),
                value: "2".into(),
                lease: 0,
            },
            TxnOp::Put {
                key: "b".into(),
                value: "1".into(),
                lease: 0,
            },
        ],
        failure: vec![],
    });
    let (s, _) = s.apply(&Request::Delete { key: "a".into() });
    let (s, _) = s.apply(&put("c", "1"));
    assert_eq!(s.revision(), 5);
    s
}

fn events(s: &State) -> Vec<Event> {
    s.changes().into_iter().flat_map(|(_, e)| e).collect()
}

fn resp(header: i64, events: Vec<Event>) -> WatchResponseRecord {
    WatchResponseRecord {
        header_revision: header,
        events,
        compact_revision: 0,
        canceled: false,
        received: 0,
    }
}

fn all(responses: Vec<WatchResponseRecord>) -> WatchRecord {
    WatchRecord {
        key: String::new(),
        prefix: true,
        start_revision: 1,
        responses,
    }
}

#[test]
fn a_correct_stream() {
    let s = state();
    let e = events(&s);
    assert_eq!(e.len(), 5);
    let good = all(vec![
        resp(1, vec![]),
        resp(2, vec![e[0].clone()]),
        resp(4, vec![e[1].clone(), e[2].clone(), e[3].clone()]),
        resp(5, vec![e[4].clone()]),
    ]);
    assert_eq!(validate_against(&s, &[good]), vec![]);
    // One key, from "now" (the first header + 1), ending early.
    let one = WatchRecord {
        key: "a".into(),
        prefix: false,
        start_revision: 0,
        responses: vec![resp(2, vec![]), resp(3, vec![e[1].clone()])],
    };
    assert_eq!(validate_against(&s, &[one]), vec![]);
    assert_eq!(e[3].kind, EventKind::Delete);
}

#[test]
fn gap() {
    let s = state();
    let e = events(&s);
    let v = validate_against(&s, &[all(vec![resp(5, vec![e[0].clone(), e[4].clone()])])]);
    assert_eq!(v.len(), 3, "{v:?}");
    assert!(v.iter().all(|v| matches!(v, WatchViolation::Gap { .. })));
    assert!(v.contains(&WatchViolation::Gap {
        watch: 0,
        revision: 4,
        key: "a".into()
    }));
}

#[test]
fn duplicate() {
    let s = state();
    let e = events(&s);
    let v = validate_against(
        &s,
        &[all(vec![
            resp(2, vec![e[0].clone()]),
            resp(2, vec![e[0].clone()]),
        ])],
    );
    assert_eq!(
        v,
        vec![WatchViolation::Duplicate {
            watch: 0,
            revision: 2,
            key: "a".into()
        }]
    );
}

#[test]
fn out_of_order() {
    let s = state();
    let e = events(&s);
    let v = validate_against(
        &s,
        &[all(vec![resp(
            5,
            vec![
                e[0].clone(),
                e[1].clone(),
                e[2].clone(),
                e[4].clone(),
                e[3].clone(),
            ],
        )])],
    );
    // Revision 4 seems skipped when 5 comes, then arrives late.
    assert_eq!(
        v,
        vec![
            WatchViolation::Gap {
                watch: 0,
                revision: 4,
                key: "a".into()
            },
            WatchViolation::OutOfOrder {
                watch: 0,
                previous: 5,
                revision: 4
            },
        ]
    );
}

#[test]
fn split_txn() {
    let s = state();
    let e = events(&s);
    let v = validate_against(
        &s,
        &[all(vec![
            resp(3, vec![e[0].clone(), e[1].clone()]),
            resp(3, vec![e[2].clone()]),
        ])],
    );
    assert_eq!(
        v,
        vec![WatchViolation::SplitRevision {
            watch: 0,
            revision: 3
        }]
    );
}

#[test]
fn wrong_resume() {
    let s = state();
    let e = events(&s);
    // After a reconnect the stream replays revision 3 instead of going on at 4.
    let replay = all(vec![
        resp(3, vec![e[0].clone(), e[1].clone(), e[2].clone()]),
        resp(4, vec![e[1].clone(), e[2].clone(), e[3].clone()]),
    ]);
    let v = validate_against(&s, &[replay]);
    assert_eq!(v.len(), 2, "{v:?}");
    assert!(
        v.iter()
            .all(|v| matches!(v, WatchViolation::Duplicate { revision: 3, .. }))
    );
    // A compaction reported for a revision the stream already passed.
    let mut compacted = resp(5, vec![]);
    compacted.compact_revision = 3;
    compacted.canceled = true;
    let v = validate_against(
        &s,
        &[all(vec![resp(3, e[..3].to_vec()), compacted.clone()])],
    );
    assert_eq!(
        v,
        vec![WatchViolation::WrongCompaction {
            watch: 0,
            compact_revision: 3,
            next_revision: 4
        }]
    );
    // A genuine one excuses what lies below it; nothing may follow it.
    compacted.compact_revision = 5;
    let v = validate_against(
        &s,
        &[all(vec![resp(2, e[..1].to_vec()), compacted.clone()])],
    );
    assert_eq!(v, vec![]);
    let v = validate_against(
        &s,
        &[all(vec![
            resp(2, e[..1].to_vec()),
            compacted,
            resp(5, vec![e[4].clone()]),
        ])],
    );
    assert_eq!(v, vec![WatchViolation::EventsAfterCancel { watch: 0 }]);
}

#[test]
fn wrong_content_and_filter() {
    let s = state();
    let e = events(&s);
    let mut changed = e[0].clone();
    changed.value = "other".into();
    let mut invented = e[4].clone();
    invented.mod_revision = 9;
    let v = validate_against(
        &s,
        &[all(vec![
            resp(2, vec![changed]),
            resp(9, vec![invented.clone()]),
        ])],
    );
    assert!(matches!(v[0], WatchViolation::Mismatch { .. }), "{v:?}");
    assert_eq!(
        v[1],
        WatchViolation::Unexpected {
            watch: 0,
            event: invented
        }
    );
    let only_b = WatchRecord {
        key: "b".into(),
        prefix: false,
        start_revision: 3,
        responses: vec![resp(3, vec![e[1].clone(), e[2].clone()])],
    };
    let v = validate_against(&s, &[only_b]);
    assert_eq!(
        v,
        vec![WatchViolation::NotWatched {
            watch: 0,
            key: "a".into(),
            revision: 3
        }]
    );
    let mut behind = resp(1, vec![e[0].clone()]);
    behind.header_revision = 1;
    let v = validate_against(&s, &[all(vec![behind])]);
    assert_eq!(
        v,
        vec![WatchViolation::HeaderBehind {
            watch: 0,
            header_revision: 1,
            revision: 2
        }]
    );
    let late = WatchRecord {
        start_revision: 3,
        ..all(vec![resp(2, vec![e[0].clone()])])
    };
    assert_eq!(
        validate_against(&s, &[late]),
        vec![WatchViolation::BeforeStart {
            watch: 0,
            revision: 2
        }]
    );
}

#[test]
fn report_counts_watch_violations() {
    let s = state();
    let e = events(&s);
    // The history that made the state, answered.
    let history = History {
        operations: vec![op(1, 0, Some(1), put("a", "1"), put_ok(2))],
    };
    let watch = all(vec![resp(2, vec![e[0].clone(), e[0].clone()])]);
    let report = crate::report::Report::new(&history, &[watch], Default::default());
    assert_eq!(
        report.line(),
        "linearizable: yes, watch: 1 violation, leases: ok"
    );
    assert!(!report.ok());
}
