//! The model's etcd rules.

use super::*;
use crate::model::State;

fn apply(state: &State, request: Request) -> (State, Outcome) {
    state.apply(&request)
}

#[test]
fn lease_revoke_deletes_attached_keys_in_one_revision() {
    let s = State::new();
    let (s, o) = apply(&s, Request::LeaseGrant { ttl: 60, id: 5 });
    assert_eq!(o, ok(1, ResponseBody::LeaseGrant { id: 5 }));
    let leased = |k: &str| Request::Put {
        key: k.into(),
        value: "v".into(),
        lease: 5,
    };
    let (s, _) = apply(&s, leased("a"));
    let (s, _) = apply(&s, leased("b"));
    let (s, _) = apply(&s, put("c", "v"));
    assert_eq!(s.revision(), 4);
    assert_eq!(s.lease_keys(5).map(|k| k.len()), Some(2));
    let (s, o) = apply(&s, Request::LeaseRevoke { id: 5 });
    assert_eq!(
        o,
        ok(5, ResponseBody::LeaseRevoke),
        "one revision for both keys"
    );
    assert!(s.get("a").is_none() && s.get("b").is_none());
    assert!(s.get("c").is_some());
    assert!(!s.has_lease(5));
    let changes = s.changes();
    let last = changes.last().expect("a change");
    assert_eq!((last.0, last.1.len()), (5, 2));
    let (s2, o) = apply(&s, Request::LeaseRevoke { id: 5 });
    assert_eq!(o, Outcome::Error(EtcdError::LeaseNotFound));
    assert_eq!(s2, s);
    let (_, o) = apply(&s, leased("d"));
    assert_eq!(o, Outcome::Error(EtcdError::LeaseNotFound));
}

#[test]
fn revoke_without_keys_takes_no_revision() {
    let (s, _) = apply(&State::new(), Request::LeaseGrant { ttl: 60, id: 5 });
    let (s, o) = apply(&s, Request::LeaseRevoke { id: 5 });
    assert_eq!(o, ok(1, ResponseBody::LeaseRevoke));
    assert_eq!(s.revision(), 1);
}

#[test]
fn put_moves_a_key_between_leases() {
    let (s, _) = apply(&State::new(), Request::LeaseGrant { ttl: 60, id: 5 });
    let (s, _) = apply(
        &s,
        Request::Put {
            key: "a".into(),
            value: "1".into(),
            lease: 5,
        },
    );
    let (s, _) = apply(&s, put("a", "2"));
    assert_eq!(s.lease_keys(5).map(|k| k.len()), Some(0));
    let (s, _) = apply(&s, Request::LeaseRevoke { id: 5 });
    assert_eq!(s.get("a").map(|kv| kv.value.as_str()), Some("2"));
}

#[test]
fn delete_of_a_missing_key_takes_no_revision() {
    let (s, o) = apply(&State::new(), Request::Delete { key: "a".into() });
    assert_eq!(o, ok(1, ResponseBody::Delete { deleted: 0 }));
    let (s, _) = apply(&s, put("a", "1"));
    let (s, o) = apply(&s, Request::Delete { key: "a".into() });
    assert_eq!(o, ok(3, ResponseBody::Delete { deleted: 1 }));
    let (s, o) = apply(&s, Request::Delete { key: "a".into() });
    assert_eq!(o, ok(3, ResponseBody::Delete { deleted: 0 }));
    assert_eq!(s.revision(), 3);
}

#[test]
fn versions_and_create_revision() {
    let (s, _) = apply(&State::new(), put("a", "1"));
    let (s, _) = apply(&s, put("a", "2"));
    assert_eq!(s.get("a"), Some(&kv("a", "2", 2, 3, 2)));
    let (s, _) = apply(&s, Request::Delete { key: "a".into() });
    let (s, _) = apply(&s, put("a", "3"));
    assert_eq!(s.get("a"), Some(&kv("a", "3", 5, 5, 1)));
    // Reads at past revisions.
    assert_eq!(s.get_at("a", 2), Some(kv("a", "1", 2, 2, 1)));
    assert_eq!(s.get_at("a", 4), None);
    assert_eq!(s.get_at("a", 1), None);
    let (_, o) = apply(
        &s,
        Request::Get {
            key: "a".into(),
            revision: 3,
            serializable: false,
        },
    );
    assert_eq!(o, got(5, Some(kv("a", "2", 2, 3, 2))));
    let (_, o) = apply(
        &s,
        Request::Get {
            key: "a".into(),
            revision: 6,
            serializable: false,
        },
    );
    assert_eq!(o, Outcome::Error(EtcdError::FutureRevision));
}

#[test]
fn range_of_a_prefix_now_and_then() {
    let (s, _) = apply(&State::new(), put("p/a", "1"));
    let (s, _) = apply(&s, put("p/b", "1"));
    let (s, _) = apply(&s, put("q", "1"));
    let (s, _) = apply(&s, Request::Delete { key: "p/a".into() });
    let keys = |kvs: Vec<KeyValue>| kvs.into_iter().map(|kv| kv.key).collect::<Vec<_>>();
    assert_eq!(keys(s.range_at("p/", 5)), vec!["p/b"]);
    assert_eq!(keys(s.range_at("p/", 3)), vec!["p/a", "p/b"]);
    assert_eq!(keys(s.range_at("p/", 2)), vec!["p/a"]);
}

#[test]
fn txn_rules() {
    let cmp = |target| Compare {
        key: "a".into(),
        op: CompareOp::Equal,
        target,
    };
    let txn = |compares, success| Request::Txn {
        compares,
        success,
        failure: vec![],
    };
    let put_b = TxnOp::Put {
        key: "b".into(),
        value: "1".into(),
        lease: 0,
    };
    // A value compare on a missing key fails, even "!=".
    let ne = Compare {
        op: CompareOp::NotEqual,
        ..cmp(CompareTarget::Value("x".into()))
    };
    let (s, o) = apply(&State::new(), txn(vec![ne], vec![put_b.clone()]));
    assert_eq!(
        o,
        ok(
            1,
            ResponseBody::Txn {
                succeeded: false,
                results: vec![]
            }
        )
    );
    // Version 0 of a missing key.
    let (s, o) = apply(
        &s,
        txn(vec![cmp(CompareTarget::Version(0))], vec![put_b.clone()]),
    );
    assert_eq!(
        o,
        ok(
            2,
            ResponseBody::Txn {
                succeeded: true,
                results: vec![TxnOpResult::Put]
            }
        )
    );
    // Several writes share one revision; a get sees the earlier put.
    let ops = vec![
        TxnOp::Put {
            key: "a".into(),
            value: "1".into(),
            lease: 0,
        },
        TxnOp::Get { key: "a".into() },
        TxnOp::Delete { key: "b".into() },
    ];
    let (s, o) = apply(&s, txn(vec![], ops));
    assert_eq!(
        o,
        ok(
            3,
            ResponseBody::Txn {
                succeeded: true,
                results: vec![
                    TxnOpResult::Put,
                    TxnOpResult::Get {
                        kv: Some(kv("a", "1", 3, 3, 1))
                    },
                    TxnOpResult::Delete { deleted: 1 },
                ],
            }
        )
    );
    // A branch that writes nothing takes no revision.
    let (s, o) = apply(&s, txn(vec![], vec![TxnOp::Delete { key: "b".into() }]));
    assert_eq!(
        o,
        ok(
            3,
            ResponseBody::Txn {
                succeeded: true,
                results: vec![TxnOpResult::Delete { deleted: 0 }]
            }
        )
    );
    let mod_gt = Compare {
        op: CompareOp::Greater,
        ..cmp(CompareTarget::ModRevision(2))
    };
    let (_, o) = apply(&s, txn(vec![mod_gt], vec![]));
    assert_eq!(
        o,
        ok(
            3,
            ResponseBody::Txn {
                succeeded: true,
                results: vec![]
            }
        )
    );
}

#[test]
fn step_checks_the_answer() {
    let s = State::new();
    assert!(s.step(&put("a", "1"), &put_ok(2)).is_some());
    assert!(s.step(&put("a", "1"), &put_ok(3)).is_none());
    assert!(s.step(&get("a"), &got(1, None)).is_some());
    assert!(s.step(&get("a"), &got(2, None)).is_none());
    // Any grant id the server chose, unless the client chose one.
    let grant = Request::LeaseGrant { ttl: 1, id: 0 };
    assert!(
        s.step(&grant, &ok(1, ResponseBody::LeaseGrant { id: 99 }))
            .is_some()
    );
    let chosen = Request::LeaseGrant { ttl: 1, id: 4 };
    assert!(
        s.step(&chosen, &ok(1, ResponseBody::LeaseGrant { id: 99 }))
            .is_none()
    );
    // Unknown outcomes apply when they can.
    assert_eq!(
        s.step_unknown(&put("a", "1")).map(|s| s.revision()),
        Some(2)
    );
    assert!(s.step_unknown(&Request::LeaseRevoke { id: 1 }).is_none());
    assert!(s.step_unknown(&grant).is_none());
}

#[test]
fn serializable_reads_may_be_stale() {
    let (s, _) = apply(&State::new(), put("a", "1"));
    let (s, _) = apply(&s, put("a", "2"));
    let read = Request::Get {
        key: "a".into(),
        revision: 0,
        serializable: true,
    };
    assert!(
        s.step(&read, &got(2, Some(kv("a", "1", 2, 2, 1))))
            .is_some()
    );
    assert!(s.step(&read, &got(1, None)).is_some());
    assert!(
        s.step(&read, &got(2, Some(kv("a", "2", 2, 3, 2))))
            .is_none(),
        "not what rev 2 held"
    );
    assert!(s.step(&read, &got(4, None)).is_none(), "from the future");
}
