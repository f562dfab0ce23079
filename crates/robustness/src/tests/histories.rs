//! Tiny hand-written histories, linearizable and not.

use super::*;
use crate::check_history;
use crate::linearizability::{CheckOptions, Verdict};
use crate::report::{Linearizable, Report};

fn verdict(ops: Vec<Operation>) -> Verdict<crate::model::State> {
    check_history(&History { operations: ops }, CheckOptions::default())
}

fn linearizable(ops: Vec<Operation>) -> bool {
    verdict(ops).is_linearizable()
}

#[test]
fn put_then_read_is_linearizable() {
    assert!(linearizable(vec![
        op(1, 0, Some(10), put("a", "1"), put_ok(2)),
        op(
            2,
            20,
            Some(30),
            get("a"),
            got(2, Some(kv("a", "1", 2, 2, 1)))
        ),
    ]));
}

#[test]
fn concurrent_puts_either_order() {
    // Both orders are possible; the reads pin b's put first.
    assert!(linearizable(vec![
        op(1, 0, Some(100), put("a", "1"), put_ok(3)),
        op(2, 0, Some(100), put("b", "2"), put_ok(2)),
        op(3, 0, Some(100), get("a"), got(1, None)),
        op(
            3,
            110,
            Some(120),
            get("a"),
            got(3, Some(kv("a", "1", 3, 3, 1)))
        ),
    ]));
}

#[test]
fn stale_read_after_completed_put() {
    let ops = vec![
        op(1, 0, Some(10), put("a", "1"), put_ok(2)),
        op(2, 20, Some(30), get("a"), got(1, None)),
    ];
    let Verdict::Violation(v) = verdict(ops) else {
        panic!("a stale read passed");
    };
    assert_eq!(v.prefix, vec![0], "the put returned before the read began");
    assert_eq!(v.stuck, 1, "the read cannot follow it");
    assert_eq!(v.candidates, vec![1]);
}

#[test]
fn two_puts_with_the_same_revision() {
    assert!(!linearizable(vec![
        op(1, 0, Some(10), put("a", "1"), put_ok(2)),
        op(2, 0, Some(10), put("b", "2"), put_ok(2)),
    ]));
}

#[test]
fn read_of_a_value_never_written() {
    assert!(!linearizable(vec![
        op(1, 0, Some(10), put("a", "1"), put_ok(2)),
        op(
            2,
            0,
            Some(10),
            get("a"),
            got(2, Some(kv("a", "x", 2, 2, 1)))
        ),
    ]));
}

#[test]
fn lost_acknowledged_write() {
    assert!(!linearizable(vec![
        op(1, 0, Some(10), put("a", "1"), put_ok(2)),
        op(1, 20, Some(30), put("b", "1"), put_ok(3)),
        op(2, 40, Some(50), get("a"), got(3, None)),
    ]));
}

#[test]
fn unknown_put_that_happened() {
    assert!(linearizable(vec![
        op(1, 0, None, put("a", "1"), Outcome::Unknown),
        op(
            2,
            20,
            Some(30),
            get("a"),
            got(2, Some(kv("a", "1", 2, 2, 1)))
        ),
        op(2, 40, Some(50), put("a", "2"), put_ok(3)),
    ]));
}

#[test]
fn unknown_put_that_did_not_happen() {
    assert!(linearizable(vec![
        op(1, 0, None, put("a", "1"), Outcome::Unknown),
        op(2, 20, Some(30), get("a"), got(1, None)),
        op(2, 40, Some(50), put("b", "2"), put_ok(2)),
        op(2, 60, Some(70), get("a"), got(2, None)),
    ]));
}

#[test]
fn unknown_put_cannot_happen_before_its_invocation() {
    assert!(!linearizable(vec![
        op(
            2,
            0,
            Some(10),
            get("a"),
            got(2, Some(kv("a", "1", 2, 2, 1)))
        ),
        op(1, 20, None, put("a", "1"), Outcome::Unknown),
    ]));
}

#[test]
fn unknown_put_does_not_take_a_claimed_revision() {
    // The known put owns revision 2; the unknown one can only come after.
    assert!(!linearizable(vec![
        op(1, 0, None, put("a", "1"), Outcome::Unknown),
        op(2, 0, Some(10), put("b", "1"), put_ok(2)),
        op(
            3,
            20,
            Some(30),
            get("a"),
            got(2, Some(kv("a", "1", 2, 2, 1)))
        ),
    ]));
}

#[test]
fn txn_compare_result_inconsistent() {
    let txn = Request::Txn {
        compares: vec![Compare {
            key: "a".into(),
            op: CompareOp::Equal,
            target: CompareTarget::Value("1".into()),
        }],
        success: vec![TxnOp::Put {
            key: "b".into(),
            value: "2".into(),
            lease: 0,
        }],
        failure: vec![TxnOp::Get { key: "a".into() }],
    };
    let failed = ok(
        2,
        ResponseBody::Txn {
            succeeded: false,
            results: vec![TxnOpResult::Get {
                kv: Some(kv("a", "1", 2, 2, 1)),
            }],
        },
    );
    let succeeded = ok(
        3,
        ResponseBody::Txn {
            succeeded: true,
            results: vec![TxnOpResult::Put],
        },
    );
    let first = op(1, 0, Some(10), put("a", "1"), put_ok(2));
    assert!(!linearizable(vec![
        first.clone(),
        op(2, 20, Some(30), txn.clone(), failed)
    ]));
    assert!(linearizable(vec![
        first,
        op(2, 20, Some(30), txn, succeeded)
    ]));
}

#[test]
fn definite_errors_must_be_true() {
    let grant = op(
        1,
        0,
        Some(10),
        Request::LeaseGrant { ttl: 60, id: 7 },
        ok(1, ResponseBody::LeaseGrant { id: 7 }),
    );
    let put_leased = Request::Put {
        key: "a".into(),
        value: "1".into(),
        lease: 7,
    };
    let not_found = Outcome::Error(EtcdError::LeaseNotFound);
    // Lease 7 exists once granted: "not found" afterwards is a lie...
    assert!(!linearizable(vec![
        grant.clone(),
        op(2, 20, Some(30), put_leased.clone(), not_found.clone()),
    ]));
    // ...before the grant it is the truth.
    assert!(linearizable(vec![
        op(2, 0, Some(5), put_leased, not_found),
        op(
            1,
            10,
            Some(20),
            Request::LeaseGrant { ttl: 60, id: 7 },
            ok(1, ResponseBody::LeaseGrant { id: 7 })
        ),
    ]));
}

#[test]
fn report_line_and_excerpt() {
    let history = History {
        operations: vec![
            op(1, 0, Some(10), put("a", "1"), put_ok(2)),
            op(2, 20, Some(30), get("a"), got(1, None)),
            op(3, 1000, Some(1010), put("z", "1"), put_ok(3)),
        ],
    };
    let report = Report::new(&history, &[], CheckOptions::default());
    assert_eq!(report.linearizable, Linearizable::No);
    assert_eq!(report.line(), "linearizable: no, watch: ok, leases: ok");
    let excerpt = report.excerpt.as_ref().expect("an excerpt");
    let indices: Vec<usize> = excerpt.operations.iter().map(|o| o.index).collect();
    assert_eq!(indices, vec![0, 1], "the far-away put is not part of it");
    let json = report.to_json();
    assert!(json.contains("\"linearizable\": \"no\""), "{json}");
}

#[test]
fn history_json_round_trip() {
    let history = History {
        operations: vec![
            op(1, 0, Some(10), put("a", "1"), put_ok(2)),
            op(
                1,
                20,
                None,
                Request::Delete { key: "a".into() },
                Outcome::Unknown,
            ),
            op(
                2,
                5,
                Some(9),
                get("a"),
                Outcome::Error(EtcdError::Other("boom".into())),
            ),
        ],
    };
    let json = history.to_json();
    assert_eq!(History::from_json(&json).expect("parses"), history);
    assert!(history.problems().is_empty());
    let mut bad = history.clone();
    bad.operations[0].return_time = Some(0);
    bad.operations[0].invoke = 5;
    assert_eq!(bad.problems().len(), 1);
}

#[test]
fn timeout_on_a_tiny_budget() {
    let ops: Vec<Operation> = (0..50)
        .map(|i| {
            op(
                i,
                0,
                Some(100),
                put(&format!("k{i}"), "v"),
                put_ok(i as i64 + 2),
            )
        })
        .collect();
    let v = check_history(
        &History { operations: ops },
        CheckOptions {
            max_steps: 10,
            timeout: None,
        },
    );
    assert!(matches!(v, Verdict::Timeout { .. }));
}

#[test]
fn lost_puts_take_the_revisions_reads_saw() {
    // Both lost puts happened: b's at revision 2, a's at 3, as the reads say.
    let ops = vec![
        op(1, 0, None, put("a", "1"), Outcome::Unknown),
        op(2, 0, None, put("b", "1"), Outcome::Unknown),
        op(
            3,
            100,
            Some(110),
            get("a"),
            got(3, Some(kv("a", "1", 3, 3, 1))),
        ),
        op(
            3,
            120,
            Some(130),
            get("b"),
            got(3, Some(kv("b", "1", 2, 2, 1))),
        ),
    ];
    let Verdict::Linearizable { order, state } = verdict(ops) else {
        panic!("not linearizable");
    };
    assert_eq!(order, vec![1, 0, 2, 3]);
    assert_eq!(state.revision(), 3);
}
