//! Behaviour tests of the MVCC store against etcd 3.4's semantics.

use std::collections::BTreeMap;

use muster_proto::compare::{CompareResult, CompareTarget, TargetUnion};
use muster_proto::range_request::{SortOrder, SortTarget};
use muster_proto::request_op::Request;
use muster_proto::response_op::Response;
use muster_proto::{
    Compare, DeleteRangeRequest, Event, EventType, KeyValue, PutRequest, RangeRequest,
    RangeResponse, RequestOp, TxnRequest, TxnResponse,
};

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use super::*;

const MAX: i64 = i64::MAX;

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn s(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

fn yes(_: i64) -> bool {
    true
}

fn put_req(k: &str, v: &str) -> PutRequest {
    PutRequest {
        key: b(k),
        value: b(v),
        ..Default::default()
    }
}

fn put(st: &mut Store, k: &str, v: &str) -> i64 {
    let mut w = st.write();
    w.put(&put_req(k, v), &yes).unwrap();
    w.end().0
}

fn put_lease(st: &mut Store, k: &str, v: &str, lease: i64) -> i64 {
    let mut w = st.write();
    let req = PutRequest {
        lease,
        ..put_req(k, v)
    };
    w.put(&req, &yes).unwrap();
    w.end().0
}

fn del(st: &mut Store, k: &str, end: &str) -> (i64, i64) {
    let mut w = st.write();
    let resp = w.delete_range(&del_req(k, end)).unwrap();
    (w.end().0, resp.deleted)
}

fn del_req(k: &str, end: &str) -> DeleteRangeRequest {
    DeleteRangeRequest {
        key: b(k),
        range_end: b(end),
        ..Default::default()
    }
}

fn rr(k: &str, end: &str) -> RangeRequest {
    RangeRequest {
        key: b(k),
        range_end: b(end),
        ..Default::default()
    }
}

fn range(st: &Store, req: &RangeRequest) -> RangeResponse {
    st.range(req, MAX).unwrap()
}

fn keys(resp: &RangeResponse) -> Vec<String> {
    resp.kvs.iter().map(|kv| s(&kv.key)).collect()
}

fn get(st: &Store, k: &str) -> Option<KeyValue> {
    range(st, &rr(k, "")).kvs.into_iter().next()
}

fn get_at(st: &Store, k: &str, rev: i64) -> Result<Option<KeyValue>, MvccError> {
    let req = RangeRequest {
        revision: rev,
        ..rr(k, "")
    };
    st.range(&req, MAX).map(|r| r.kvs.into_iter().next())
}

fn kv(k: &str, v: &str, create: i64, modr: i64, ver: i64, lease: i64) -> KeyValue {
    KeyValue {
        key: b(k),
        create_revision: create,
        mod_revision: modr,
        version: ver,
        value: b(v),
        lease,
    }
}

fn op_put(k: &str, v: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(put_req(k, v))),
    }
}

fn op_put_with(req: PutRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(req)),
    }
}

fn op_del(k: &str, end: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(del_req(k, end))),
    }
}

fn op_range(k: &str, end: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(rr(k, end))),
    }
}

fn op_range_with(req: RangeRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(req)),
    }
}

fn op_txn(t: TxnRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestTxn(t)),
    }
}

fn then(ops: Vec<RequestOp>) -> TxnRequest {
    TxnRequest {
        success: ops,
        ..Default::default()
    }
}

fn cmp(k: &str, target: CompareTarget, result: CompareResult, union: TargetUnion) -> Compare {
    Compare {
        result: result as i32,
        target: target as i32,
        key: b(k),
        range_end: Vec::new(),
        target_union: Some(union),
    }
}

fn cmp_range(
    k: &str,
    end: &str,
    target: CompareTarget,
    result: CompareResult,
    union: TargetUnion,
) -> Compare {
    Compare {
        range_end: b(end),
        ..cmp(k, target, result, union)
    }
}

/// Runs a txn; on success commits and returns (response, revision, events).
fn txn(st: &mut Store, req: &TxnRequest) -> Result<(TxnResponse, i64, Vec<Event>), MvccError> {
    txn_leases(st, req, &yes)
}

fn txn_leases(
    st: &mut Store,
    req: &TxnRequest,
    leases: &dyn Fn(i64) -> bool,
) -> Result<(TxnResponse, i64, Vec<Event>), MvccError> {
    let mut w = st.write();
    let resp = w.txn(req, leases)?;
    let (rev, events) = w.end();
    Ok((resp, rev, events))
}

fn compare_holds(st: &mut Store, c: Compare) -> bool {
    let req = TxnRequest {
        compare: vec![c],
        ..Default::default()
    };
    let before = st.revision();
    let (resp, rev, _) = txn(st, &req).unwrap();
    assert_eq!(rev, before, "a txn writing nothing creates no revision");
    resp.succeeded
}

fn ev_type(e: &Event) -> EventType {
    EventType::try_from(e.r#type).unwrap()
}

// ---------------------------------------------------------------- revisions

#[test]
fn revisions_versions_and_create_revision() {
    let mut st = Store::new();
    assert_eq!(st.revision(), 1);
    assert_eq!(st.compact_revision(), 0);
    assert_eq!(st.len(), 0);
    assert!(st.is_empty());

    assert_eq!(put(&mut st, "a", "1"), 2);
    assert_eq!(get(&st, "a").unwrap(), kv("a", "1", 2, 2, 1, 0));
    assert_eq!(put(&mut st, "a", "2"), 3);
    assert_eq!(get(&st, "a").unwrap(), kv("a", "2", 2, 3, 2, 0));
    // Same value: still a new revision and version.
    assert_eq!(put(&mut st, "a", "2"), 4);
    assert_eq!(get(&st, "a").unwrap(), kv("a", "2", 2, 4, 3, 0));
    assert_eq!(del(&mut st, "a", ""), (5, 1));
    assert_eq!(get(&st, "a"), None);
    assert_eq!(st.len(), 0);
    // Re-created: version restarts, create revision is the new one.
    assert_eq!(put(&mut st, "a", "3"), 6);
    assert_eq!(get(&st, "a").unwrap(), kv("a", "3", 6, 6, 1, 0));
    assert_eq!(st.len(), 1);

    // History.
    assert_eq!(get_at(&st, "a", 1).unwrap(), None);
    assert_eq!(
        get_at(&st, "a", 3).unwrap().unwrap(),
        kv("a", "2", 2, 3, 2, 0)
    );
    assert_eq!(get_at(&st, "a", 5).unwrap(), None);
    assert_eq!(
        get_at(&st, "a", 6).unwrap().unwrap(),
        kv("a", "3", 6, 6, 1, 0)
    );
}

#[test]
fn deleting_nothing_creates_no_revision() {
    let mut st = Store::new();
    put(&mut st, "a", "1");
    assert_eq!(del(&mut st, "b", ""), (2, 0));
    assert_eq!(del(&mut st, "b", "z"), (2, 0));
    let mut w = st.write();
    w.delete_range(&del_req("x", "")).unwrap();
    let (rev, events) = w.end();
    assert_eq!((rev, events.len()), (2, 0));
    assert_eq!(st.revision(), 2);
}

#[test]
fn one_write_one_revision_and_own_reads() {
    let mut st = Store::new();
    put(&mut st, "a", "0");
    let mut w = st.write();
    assert_eq!(w.range(&rr("a", "")).unwrap().kvs[0].value, b("0"));
    w.put(&put_req("a", "1"), &yes).unwrap();
    // Sees its own write, at the new revision.
    assert_eq!(
        w.range(&rr("a", "")).unwrap().kvs[0],
        kv("a", "1", 2, 3, 2, 0)
    );
    w.put(&put_req("b", "1"), &yes).unwrap();
    w.delete_range(&del_req("a", "")).unwrap();
    assert_eq!(w.range(&rr("a", "")).unwrap().kvs.len(), 0);
    assert_eq!(w.events().len(), 3);
    let (rev, events) = w.end();
    assert_eq!(rev, 3);
    assert_eq!(st.revision(), 3);
    let types: Vec<_> = events.iter().map(ev_type).collect();
    assert_eq!(types, [EventType::Put, EventType::Put, EventType::Delete]);
    assert!(
        events
            .iter()
            .all(|e| e.kv.as_ref().unwrap().mod_revision == 3)
    );
    assert_eq!(get(&st, "b").unwrap(), kv("b", "1", 3, 3, 1, 0));
    assert_eq!(get(&st, "a"), None);
}

#[test]
fn dropping_a_write_undoes_it() {
    let mut st = Store::new();
    put(&mut st, "a", "0");
    put(&mut st, "gone", "0");
    {
        let mut w = st.write();
        w.put(&put_req("a", "1"), &yes).unwrap();
        w.put(&put_req("new", "1"), &yes).unwrap();
        w.delete_range(&del_req("gone", "")).unwrap();
        w.put(&put_req("gone", "again"), &yes).unwrap();
        // dropped without end()
    }
    assert_eq!(st.revision(), 3);
    assert_eq!(st.len(), 2);
    assert_eq!(get(&st, "a").unwrap(), kv("a", "0", 2, 2, 1, 0));
    assert_eq!(get(&st, "gone").unwrap(), kv("gone", "0", 3, 3, 1, 0));
    assert_eq!(get(&st, "new"), None);
    assert!(st.events(1, 10, b"\0", b"\0").unwrap().len() == 2);
    // The next write still gets revision 4 with sub 0.
    let mut w = st.write();
    w.put(&put_req("a", "2"), &yes).unwrap();
    assert_eq!(w.end().0, 4);
    assert_eq!(get(&st, "a").unwrap(), kv("a", "2", 2, 4, 2, 0));
}

// -------------------------------------------------------------------- range

fn abcd() -> Store {
    let mut st = Store::new();
    for k in ["a", "b", "c", "d"] {
        put(&mut st, k, &format!("v{k}"));
    }
    st
}

#[test]
fn range_conventions() {
    let st = abcd();
    assert_eq!(keys(&range(&st, &rr("b", ""))), ["b"]);
    assert_eq!(keys(&range(&st, &rr("bb", ""))), Vec::<String>::new());
    assert_eq!(keys(&range(&st, &rr("b", "d"))), ["b", "c"]);
    assert_eq!(keys(&range(&st, &rr("b", "\0"))), ["b", "c", "d"]);
    assert_eq!(keys(&range(&st, &rr("\0", "\0"))), ["a", "b", "c", "d"]);
    assert_eq!(keys(&range(&st, &rr("c", "b"))).len(), 0);
    assert_eq!(keys(&range(&st, &rr("b", "b"))).len(), 0);
    assert_eq!(range(&st, &rr("c", "b")).count, 0);
    assert_eq!(range(&st, &rr("b", "\0")).count, 3);
    assert_eq!(range(&st, &rr("\0", "\0")).count, 4);
    assert!(range(&st, &rr("a", "")).header.is_none());
}

#[test]
fn range_limit_more_count() {
    let mut st = abcd();
    put(&mut st, "e", "ve");
    let lim = |l: i64| RangeRequest {
        limit: l,
        ..rr("a", "\0")
    };
    let r = range(&st, &lim(2));
    assert_eq!(
        (keys(&r), r.more, r.count),
        (vec!["a".into(), "b".into()], true, 5)
    );
    let r = range(&st, &lim(4));
    assert_eq!((r.kvs.len(), r.more, r.count), (4, true, 5));
    let r = range(&st, &lim(5));
    assert_eq!((r.kvs.len(), r.more, r.count), (5, false, 5));
    let r = range(&st, &lim(6));
    assert_eq!((r.kvs.len(), r.more, r.count), (5, false, 5));
    let r = range(&st, &lim(0));
    assert_eq!((r.kvs.len(), r.more, r.count), (5, false, 5));
    let r = range(&st, &lim(-1));
    assert_eq!((r.kvs.len(), r.more, r.count), (5, false, 5));
    let r = range(&st, &lim(MAX));
    assert_eq!((r.kvs.len(), r.more, r.count), (5, false, 5));

    let count_only = RangeRequest {
        count_only: true,
        limit: 2,
        ..rr("a", "\0")
    };
    let r = range(&st, &count_only);
    assert_eq!((r.kvs.len(), r.more, r.count), (0, false, 5));

    let keys_only = RangeRequest {
        keys_only: true,
        ..rr("b", "")
    };
    assert_eq!(range(&st, &keys_only).kvs[0], kv("b", "", 3, 3, 1, 0));
}

#[test]
fn range_revisions() {
    let mut st = Store::new();
    put(&mut st, "a", "2");
    put(&mut st, "a", "3");
    put(&mut st, "a", "4");
    // max_rev bounds what is visible.
    let r = st.range(&rr("a", ""), 3).unwrap();
    assert_eq!(r.kvs[0].value, b("3"));
    let at = |rev| RangeRequest {
        revision: rev,
        ..rr("a", "")
    };
    assert_eq!(st.range(&at(4), 3), Err(MvccError::FutureRevision));
    assert_eq!(st.range(&at(5), MAX), Err(MvccError::FutureRevision));
    assert_eq!(st.range(&at(2), MAX).unwrap().kvs[0].value, b("2"));
    // Negative: latest (etcd's rangeKeys treats rev <= 0 as current).
    assert_eq!(st.range(&at(-3), MAX).unwrap().kvs[0].value, b("4"));
    assert_eq!(st.range(&at(1), MAX).unwrap().kvs.len(), 0);
    st.compact(3).unwrap();
    assert_eq!(st.range(&at(2), MAX), Err(MvccError::Compacted));
    assert_eq!(st.range(&at(3), MAX).unwrap().kvs[0].value, b("3"));
    assert_eq!(st.range(&at(0), MAX).unwrap().kvs[0].value, b("4"));
}

/// b(rev 2, "1"), a(rev 3, "3"), c(rev 4, "2"), a(rev 5, "0").
fn sorted_fixture() -> Store {
    let mut st = Store::new();
    put(&mut st, "b", "1");
    put(&mut st, "a", "3");
    put(&mut st, "c", "2");
    put(&mut st, "a", "0");
    st
}

fn sorted(st: &Store, order: SortOrder, target: SortTarget) -> Vec<String> {
    sorted_in(st, order, target, "a", "\0")
}

fn sorted_in(
    st: &Store,
    order: SortOrder,
    target: SortTarget,
    key: &str,
    end: &str,
) -> Vec<String> {
    let req = RangeRequest {
        sort_order: order as i32,
        sort_target: target as i32,
        ..rr(key, end)
    };
    keys(&range(st, &req))
}

#[test]
fn range_sorting() {
    use SortOrder::*;
    use SortTarget::*;
    let st = sorted_fixture();
    assert_eq!(sorted(&st, None, Key), ["a", "b", "c"]);
    assert_eq!(sorted(&st, Ascend, Key), ["a", "b", "c"]);
    assert_eq!(sorted(&st, Descend, Key), ["c", "b", "a"]);
    assert_eq!(sorted(&st, Ascend, Value), ["a", "b", "c"]);
    assert_eq!(sorted(&st, Descend, Value), ["c", "b", "a"]);
    // NONE with a target other than KEY sorts ascending.
    assert_eq!(sorted(&st, None, Mod), ["b", "c", "a"]);
    assert_eq!(sorted(&st, None, Create), ["b", "a", "c"]);
    assert_eq!(sorted(&st, Descend, Create), ["c", "a", "b"]);
    assert_eq!(sorted(&st, Descend, Mod), ["a", "c", "b"]);
    // Ties in key order, also when descending.
    assert_eq!(sorted(&st, Ascend, Version), ["b", "c", "a"]);
    assert_eq!(sorted(&st, Descend, Version), ["a", "b", "c"]);

    // Sorting happens before the limit.
    let req = RangeRequest {
        sort_order: Descend as i32,
        limit: 2,
        ..rr("a", "\0")
    };
    let r = range(&st, &req);
    assert_eq!(
        (keys(&r), r.more, r.count),
        (vec!["c".into(), "b".into()], true, 3)
    );

    // keys_only still sorts by value.
    let req = RangeRequest {
        sort_order: Descend as i32,
        sort_target: Value as i32,
        keys_only: true,
        ..rr("a", "\0")
    };
    let r = range(&st, &req);
    assert_eq!(keys(&r), ["c", "b", "a"]);
    assert!(r.kvs.iter().all(|kv| kv.value.is_empty()));
}

#[test]
fn range_sort_ties_in_key_order_beyond_twelve_keys() {
    // 40 keys, values i % 3, written in an order unlike key order; every
    // fourth rewritten with its value (a second version, a later mod).
    let mut st = Store::new();
    for i in (0..40).rev() {
        put(&mut st, &format!("k{i:02}"), &format!("{}", i % 3));
    }
    for i in (0..40).step_by(4) {
        put(&mut st, &format!("k{i:02}"), &format!("{}", i % 3));
    }
    let all: Vec<KeyValue> = range(&st, &rr("k", "l")).kvs;
    for target in [SortTarget::Version, SortTarget::Mod, SortTarget::Value] {
        for order in [SortOrder::Ascend, SortOrder::Descend] {
            let of = |kv: &KeyValue| match target {
                SortTarget::Version => (kv.version, Vec::new()),
                SortTarget::Mod => (kv.mod_revision, Vec::new()),
                _ => (0, kv.value.clone()),
            };
            let mut want = all.clone();
            want.sort_by(|a, b| {
                let t = of(a).cmp(&of(b));
                let t = if order == SortOrder::Descend {
                    t.reverse()
                } else {
                    t
                };
                t.then(a.key.cmp(&b.key))
            });
            let want: Vec<String> = want.iter().map(|kv| s(&kv.key)).collect();
            let got = sorted_in(&st, order, target, "k", "l");
            assert_eq!(got, want, "{order:?} by {target:?}");
        }
    }
}

#[test]
fn range_sort_none_with_target_sorts_only_the_limited_fetch() {
    // etcd fetches limit+1 keys in key order when sort_order is NONE, and
    // only then sorts them ascending by a non-KEY target.
    let mut st = Store::new();
    put(&mut st, "c", "x"); // mod 2
    put(&mut st, "b", "x"); // mod 3
    put(&mut st, "a", "x"); // mod 4
    let req = |order: SortOrder| RangeRequest {
        sort_order: order as i32,
        sort_target: SortTarget::Mod as i32,
        limit: 1,
        ..rr("a", "\0")
    };
    let r = range(&st, &req(SortOrder::None));
    assert_eq!((keys(&r), r.more, r.count), (vec!["b".into()], true, 3));
    let r = range(&st, &req(SortOrder::Ascend));
    assert_eq!((keys(&r), r.more, r.count), (vec!["c".into()], true, 3));
}

#[test]
fn range_filters() {
    let st = sorted_fixture();
    let f = |min_mod, max_mod, min_create, max_create, limit| RangeRequest {
        min_mod_revision: min_mod,
        max_mod_revision: max_mod,
        min_create_revision: min_create,
        max_create_revision: max_create,
        limit,
        ..rr("a", "\0")
    };
    let r = range(&st, &f(4, 0, 0, 0, 0));
    assert_eq!(
        (keys(&r), r.more, r.count),
        (vec!["a".into(), "c".into()], false, 3)
    );
    assert_eq!(keys(&range(&st, &f(0, 4, 0, 0, 0))), ["b", "c"]);
    assert_eq!(keys(&range(&st, &f(0, 0, 3, 0, 0))), ["a", "c"]);
    assert_eq!(keys(&range(&st, &f(0, 0, 0, 3, 0))), ["a", "b"]);
    assert_eq!(keys(&range(&st, &f(3, 4, 2, 4, 0))), ["c"]);
    // Filters apply before the limit; count is before the filters.
    let r = range(&st, &f(4, 0, 0, 0, 1));
    assert_eq!((keys(&r), r.more, r.count), (vec!["a".into()], true, 3));
    let r = range(&st, &f(4, 0, 0, 0, 2));
    assert_eq!(
        (keys(&r), r.more, r.count),
        (vec!["a".into(), "c".into()], false, 3)
    );
}

// -------------------------------------------------------------- validation

#[test]
fn empty_keys_are_rejected() {
    let mut st = abcd();
    assert_eq!(st.range(&rr("", ""), MAX), Err(MvccError::EmptyKey));
    let mut w = st.write();
    assert_eq!(w.range(&rr("", "")), Err(MvccError::EmptyKey));
    assert_eq!(w.put(&put_req("", "x"), &yes), Err(MvccError::EmptyKey));
    assert_eq!(w.delete_range(&del_req("", "\0")), Err(MvccError::EmptyKey));
    assert_eq!(w.end().0, 5);

    let c = TxnRequest {
        compare: vec![cmp(
            "",
            CompareTarget::Version,
            CompareResult::Equal,
            TargetUnion::Version(0),
        )],
        ..Default::default()
    };
    assert_eq!(txn(&mut st, &c).unwrap_err(), MvccError::EmptyKey);
    for op in [op_put("", "x"), op_del("", ""), op_range("", "")] {
        let t = TxnRequest {
            failure: vec![op.clone()],
            ..Default::default()
        };
        assert_eq!(txn(&mut st, &t).unwrap_err(), MvccError::EmptyKey);
        let nested = then(vec![op_txn(then(vec![op]))]);
        assert_eq!(txn(&mut st, &nested).unwrap_err(), MvccError::EmptyKey);
    }
    assert_eq!(st.revision(), 5);
}

#[test]
fn put_checks_and_flags() {
    let mut st = Store::new();
    let leases = |id: i64| id == 7 || id == 8;
    let mut w = st.write();
    let with_lease = PutRequest {
        lease: 9,
        ..put_req("a", "v1")
    };
    assert_eq!(w.put(&with_lease, &leases), Err(MvccError::LeaseNotFound));
    let ignore_value = PutRequest {
        ignore_value: true,
        ..put_req("a", "v1")
    };
    assert_eq!(w.put(&ignore_value, &leases), Err(MvccError::ValueProvided));
    let ignore_lease = PutRequest {
        ignore_lease: true,
        lease: 7,
        ..put_req("a", "")
    };
    assert_eq!(w.put(&ignore_lease, &leases), Err(MvccError::LeaseProvided));
    let missing = PutRequest {
        ignore_value: true,
        ..put_req("a", "")
    };
    assert_eq!(w.put(&missing, &leases), Err(MvccError::KeyNotFound));
    // The lease is checked before the key.
    let missing_both = PutRequest {
        ignore_value: true,
        lease: 9,
        ..put_req("a", "")
    };
    assert_eq!(w.put(&missing_both, &leases), Err(MvccError::LeaseNotFound));
    assert_eq!(w.end().0, 1);

    // Create with lease 7; prev_kv of a creation is none.
    let mut w = st.write();
    let resp = w
        .put(
            &PutRequest {
                lease: 7,
                prev_kv: true,
                ..put_req("a", "v1")
            },
            &leases,
        )
        .unwrap();
    assert_eq!(resp.prev_kv, None);
    assert!(resp.header.is_none());
    w.end();

    // ignore_value keeps the value, takes the new lease.
    let mut w = st.write();
    let resp = w
        .put(
            &PutRequest {
                ignore_value: true,
                lease: 8,
                ..put_req("a", "")
            },
            &leases,
        )
        .unwrap();
    assert_eq!(resp.prev_kv, None, "prev_kv only when asked");
    assert_eq!(w.end().0, 3);
    assert_eq!(get(&st, "a").unwrap(), kv("a", "v1", 2, 3, 2, 8));

    // ignore_lease keeps the lease, takes the new value; prev_kv.
    let mut w = st.write();
    let resp = w
        .put(
            &PutRequest {
                ignore_lease: true,
                prev_kv: true,
                ..put_req("a", "v2")
            },
            &leases,
        )
        .unwrap();
    assert_eq!(resp.prev_kv.unwrap(), kv("a", "v1", 2, 3, 2, 8));
    w.end();
    assert_eq!(get(&st, "a").unwrap(), kv("a", "v2", 2, 4, 3, 8));

    // Both flags: a new revision with nothing else changed.
    let mut w = st.write();
    w.put(
        &PutRequest {
            ignore_lease: true,
            ignore_value: true,
            ..put_req("a", "")
        },
        &leases,
    )
    .unwrap();
    w.end();
    assert_eq!(get(&st, "a").unwrap(), kv("a", "v2", 2, 5, 4, 8));

    // A plain put drops the lease.
    put(&mut st, "a", "v3");
    assert_eq!(get(&st, "a").unwrap().lease, 0);
}

#[test]
fn delete_range_and_its_events() {
    let mut st = abcd();
    let mut w = st.write();
    let resp = w
        .delete_range(&DeleteRangeRequest {
            prev_kv: true,
            ..del_req("b", "d")
        })
        .unwrap();
    assert_eq!(resp.deleted, 2);
    assert_eq!(
        resp.prev_kvs,
        vec![kv("b", "vb", 3, 3, 1, 0), kv("c", "vc", 4, 4, 1, 0)]
    );
    let (rev, events) = w.end();
    assert_eq!(rev, 6);
    assert_eq!(
        events,
        vec![
            Event {
                r#type: EventType::Delete as i32,
                kv: Some(KeyValue {
                    key: b("b"),
                    mod_revision: 6,
                    ..Default::default()
                }),
                prev_kv: Some(kv("b", "vb", 3, 3, 1, 0)),
            },
            Event {
                r#type: EventType::Delete as i32,
                kv: Some(KeyValue {
                    key: b("c"),
                    mod_revision: 6,
                    ..Default::default()
                }),
                prev_kv: Some(kv("c", "vc", 4, 4, 1, 0)),
            },
        ]
    );
    assert_eq!(keys(&range(&st, &rr("\0", "\0"))), ["a", "d"]);
    // Without prev_kv no prev_kvs; from-key delete.
    let mut w = st.write();
    let resp = w.delete_range(&del_req("a", "\0")).unwrap();
    assert_eq!((resp.deleted, resp.prev_kvs.len()), (2, 0));
    w.end();
    assert_eq!(st.len(), 0);
}

#[test]
fn put_events_carry_prev_kv() {
    let mut st = Store::new();
    let mut w = st.write();
    w.put(&put_req("a", "1"), &yes).unwrap();
    let (_, events) = w.end();
    assert_eq!(
        events,
        vec![Event {
            r#type: EventType::Put as i32,
            kv: Some(kv("a", "1", 2, 2, 1, 0)),
            prev_kv: None,
        }]
    );
    let mut w = st.write();
    w.put(&put_req("a", "2"), &yes).unwrap();
    let (_, events) = w.end();
    assert_eq!(events[0].kv, Some(kv("a", "2", 2, 3, 2, 0)));
    assert_eq!(events[0].prev_kv, Some(kv("a", "1", 2, 2, 1, 0)));
}

// -------------------------------------------------------------------- txn

fn compare_fixture() -> Store {
    let mut st = Store::new();
    put(&mut st, "k", "v1"); // 2
    put(&mut st, "k", "v2"); // 3: create 2, mod 3, version 2
    put_lease(&mut st, "l", "x", 9); // 4
    put(&mut st, "p/1", "a"); // 5
    put(&mut st, "p/2", "b"); // 6
    put(&mut st, "p/2", "c"); // 7
    st
}

#[test]
fn txn_compares_on_existing_keys() {
    use CompareResult::*;
    use CompareTarget as T;
    use TargetUnion as U;
    let mut st = compare_fixture();
    let v = |x: &str| U::Value(b(x));
    assert!(compare_holds(&mut st, cmp("k", T::Value, Equal, v("v2"))));
    assert!(!compare_holds(&mut st, cmp("k", T::Value, Equal, v("v1"))));
    assert!(compare_holds(&mut st, cmp("k", T::Value, Greater, v("v1"))));
    assert!(compare_holds(&mut st, cmp("k", T::Value, Less, v("v3"))));
    assert!(compare_holds(
        &mut st,
        cmp("k", T::Value, NotEqual, v("v1"))
    ));
    assert!(!compare_holds(
        &mut st,
        cmp("k", T::Value, NotEqual, v("v2"))
    ));
    assert!(compare_holds(
        &mut st,
        cmp("k", T::Create, Equal, U::CreateRevision(2))
    ));
    assert!(compare_holds(
        &mut st,
        cmp("k", T::Mod, Equal, U::ModRevision(3))
    ));
    assert!(compare_holds(
        &mut st,
        cmp("k", T::Mod, Less, U::ModRevision(4))
    ));
    assert!(compare_holds(
        &mut st,
        cmp("k", T::Version, Equal, U::Version(2))
    ));
    assert!(compare_holds(
        &mut st,
        cmp("k", T::Version, Greater, U::Version(1))
    ));
    assert!(!compare_holds(
        &mut st,
        cmp("k", T::Version, Greater, U::Version(2))
    ));
    assert!(compare_holds(
        &mut st,
        cmp("k", T::Lease, Equal, U::Lease(0))
    ));
    assert!(compare_holds(
        &mut st,
        cmp("l", T::Lease, Equal, U::Lease(9))
    ));
    assert!(compare_holds(
        &mut st,
        cmp("l", T::Lease, Greater, U::Lease(8))
    ));
    // A union of the wrong kind compares against 0.
    assert!(compare_holds(
        &mut st,
        cmp("k", T::Mod, Greater, U::Version(99))
    ));
    assert!(!compare_holds(
        &mut st,
        cmp("k", T::Mod, Equal, U::ModRevision(0))
    ));
}

#[test]
fn txn_compares_on_missing_keys() {
    use CompareResult::*;
    use CompareTarget as T;
    use TargetUnion as U;
    let mut st = compare_fixture();
    // VALUE on a missing key is always false.
    assert!(!compare_holds(
        &mut st,
        cmp("nope", T::Value, Equal, U::Value(vec![]))
    ));
    assert!(!compare_holds(
        &mut st,
        cmp("nope", T::Value, NotEqual, U::Value(b("x")))
    ));
    // The others compare against zero.
    assert!(compare_holds(
        &mut st,
        cmp("nope", T::Create, Equal, U::CreateRevision(0))
    ));
    assert!(!compare_holds(
        &mut st,
        cmp("nope", T::Create, Greater, U::CreateRevision(0))
    ));
    assert!(compare_holds(
        &mut st,
        cmp("nope", T::Version, Equal, U::Version(0))
    ));
    assert!(compare_holds(
        &mut st,
        cmp("nope", T::Mod, Less, U::ModRevision(1))
    ));
    assert!(compare_holds(
        &mut st,
        cmp("nope", T::Lease, Equal, U::Lease(0))
    ));
    // A deleted key is missing too.
    del(&mut st, "k", "");
    assert!(compare_holds(
        &mut st,
        cmp("k", T::Version, Equal, U::Version(0))
    ));
}

#[test]
fn txn_compares_over_ranges() {
    use CompareResult::*;
    use CompareTarget as T;
    use TargetUnion as U;
    let mut st = compare_fixture();
    // Every key in the range must satisfy.
    assert!(compare_holds(
        &mut st,
        cmp_range("p/", "p0", T::Version, Greater, U::Version(0))
    ));
    assert!(!compare_holds(
        &mut st,
        cmp_range("p/", "p0", T::Version, Equal, U::Version(1))
    ));
    assert!(compare_holds(
        &mut st,
        cmp_range("p/", "p0", T::Mod, Less, U::ModRevision(8))
    ));
    assert!(!compare_holds(
        &mut st,
        cmp_range("p/", "p0", T::Mod, Less, U::ModRevision(7))
    ));
    assert!(compare_holds(
        &mut st,
        cmp_range("p/", "\0", T::Create, Greater, U::CreateRevision(4))
    ));
    // Empty range: VALUE false, others against zero.
    assert!(compare_holds(
        &mut st,
        cmp_range("q", "r", T::Create, Equal, U::CreateRevision(0))
    ));
    assert!(!compare_holds(
        &mut st,
        cmp_range("q", "r", T::Value, Equal, U::Value(vec![]))
    ));
    assert!(!compare_holds(
        &mut st,
        cmp_range("q", "r", T::Version, Greater, U::Version(0))
    ));
}

#[test]
fn txn_branches_and_responses() {
    use CompareResult::*;
    use CompareTarget as T;
    use TargetUnion as U;
    let mut st = compare_fixture();
    let before = st.revision();
    let req = TxnRequest {
        compare: vec![
            cmp("k", T::Value, Equal, U::Value(b("v2"))),
            cmp("nope", T::Version, Equal, U::Version(0)),
        ],
        success: vec![
            op_range("x", ""),
            op_put("x", "1"),
            op_range("x", ""),
            op_del("p/", "p0"),
            op_txn(TxnRequest {
                compare: vec![cmp("k", T::Version, Equal, U::Version(99))],
                success: vec![op_put("y", "then")],
                failure: vec![op_put("y", "else"), op_range("y", "")],
            }),
        ],
        failure: vec![op_put("z", "1")],
    };
    let (resp, rev, events) = txn(&mut st, &req).unwrap();
    assert!(resp.succeeded);
    assert!(resp.header.is_none());
    assert_eq!(rev, before + 1);
    assert_eq!(resp.responses.len(), 5);
    let Some(Response::ResponseRange(r0)) = &resp.responses[0].response else {
        panic!("range")
    };
    assert_eq!(r0.kvs.len(), 0, "a range before the put does not see it");
    // etcd's nested headers: only a revision, the one each op saw or made.
    assert_eq!(r0.header, only_revision(before));
    let Some(Response::ResponsePut(p)) = &resp.responses[1].response else {
        panic!("put")
    };
    assert_eq!(p.header, only_revision(rev));
    let Some(Response::ResponseRange(r2)) = &resp.responses[2].response else {
        panic!("range")
    };
    assert_eq!(r2.kvs, vec![kv("x", "1", rev, rev, 1, 0)]);
    assert_eq!(r2.header, only_revision(rev));
    let Some(Response::ResponseDeleteRange(d)) = &resp.responses[3].response else {
        panic!("delete")
    };
    assert_eq!(d.deleted, 2);
    assert_eq!(d.header, only_revision(rev));
    let Some(Response::ResponseTxn(t)) = &resp.responses[4].response else {
        panic!("txn")
    };
    assert!(!t.succeeded);
    assert_eq!(
        t.header,
        only_revision(0),
        "etcd leaves a nested txn's at 0"
    );
    assert_eq!(t.responses.len(), 2);
    let Some(Response::ResponseRange(ry)) = &t.responses[1].response else {
        panic!("nested range")
    };
    assert_eq!(ry.kvs[0].value, b("else"));
    assert_eq!(ry.header, only_revision(rev));

    // One revision, sub revisions in op order.
    let summary: Vec<(EventType, String)> = events
        .iter()
        .map(|e| (ev_type(e), s(&e.kv.as_ref().unwrap().key)))
        .collect();
    assert_eq!(
        summary,
        vec![
            (EventType::Put, "x".into()),
            (EventType::Delete, "p/1".into()),
            (EventType::Delete, "p/2".into()),
            (EventType::Put, "y".into()),
        ]
    );
    assert!(
        events
            .iter()
            .all(|e| e.kv.as_ref().unwrap().mod_revision == rev)
    );
    assert_eq!(get(&st, "z"), None);

    // Failing compare: failure branch.
    let req = TxnRequest {
        compare: vec![cmp("k", T::Value, Equal, U::Value(b("nope")))],
        success: vec![op_put("z", "s")],
        failure: vec![op_put("z", "f")],
    };
    let (resp, _, _) = txn(&mut st, &req).unwrap();
    assert!(!resp.succeeded);
    assert_eq!(get(&st, "z").unwrap().value, b("f"));

    // A delete of nothing before any change answers the revision before
    // the txn; after a change, the txn's.
    let before = st.revision();
    let req = then(vec![
        op_del("nothing", ""),
        op_put("w", "1"),
        op_del("nothing", ""),
    ]);
    let (resp, rev, _) = txn(&mut st, &req).unwrap();
    let headers: Vec<Option<i64>> = resp
        .responses
        .iter()
        .map(|op| match &op.response {
            Some(Response::ResponseDeleteRange(d)) => d.header.map(|h| h.revision),
            Some(Response::ResponsePut(p)) => p.header.map(|h| h.revision),
            _ => None,
        })
        .collect();
    assert_eq!(headers, [Some(before), Some(rev), Some(rev)]);
}

fn only_revision(revision: i64) -> Option<muster_proto::ResponseHeader> {
    Some(muster_proto::ResponseHeader {
        revision,
        ..Default::default()
    })
}

#[test]
fn events_of_a_key_touched_twice_carry_etcds_prev_kv() {
    let mut st = Store::new();
    put(&mut st, "a", "old"); // 2
    // A put, then a from-key delete over it: both events carry the value
    // from before the txn (etcd's watch reads prev_kv at revision - 1).
    let req = then(vec![op_put("a", "new"), op_del("a", "\0")]);
    let (_, rev, live) = txn(&mut st, &req).unwrap();
    let old = Some(kv("a", "old", 2, 2, 1, 0));
    let prevs: Vec<Option<KeyValue>> = live.iter().map(|e| e.prev_kv.clone()).collect();
    assert_eq!(prevs, [old.clone(), old]);
    assert_eq!(st.events(rev, rev, b"a", b"").unwrap(), live);
    // A from-key delete, then a put creating the key again: a create event
    // never has prev_kv.
    put(&mut st, "b", "old");
    let req = then(vec![op_del("b", "\0"), op_put("b", "new")]);
    let (_, rev, live) = txn(&mut st, &req).unwrap();
    assert!(live[0].prev_kv.is_some());
    assert_eq!(live[1].prev_kv, None);
    assert_eq!(live[1].kv.as_ref().unwrap().version, 1);
    assert_eq!(st.events(rev, rev, b"b", b"").unwrap(), live);
}

#[test]
fn txn_without_writes_creates_no_revision() {
    let mut st = compare_fixture();
    let before = st.revision();
    for req in [
        TxnRequest::default(),
        then(vec![op_range("k", "")]),
        then(vec![op_del("nothing", "")]),
        then(vec![op_txn(then(vec![op_range("k", "")]))]),
        TxnRequest {
            compare: vec![cmp(
                "k",
                CompareTarget::Version,
                CompareResult::Equal,
                TargetUnion::Version(0),
            )],
            success: vec![op_put("x", "1")],
            failure: vec![],
        },
    ] {
        let (_, rev, events) = txn(&mut st, &req).unwrap();
        assert_eq!((rev, events.len()), (before, 0));
    }
    assert_eq!(st.revision(), before);
}

#[test]
fn nested_compares_see_the_state_before_the_txn() {
    use CompareResult::*;
    use CompareTarget as T;
    use TargetUnion as U;
    let mut st = Store::new();
    let req = then(vec![
        op_put("c", "1"),
        op_txn(TxnRequest {
            compare: vec![cmp("c", T::Version, Equal, U::Version(0))],
            success: vec![op_put("d", "before")],
            failure: vec![op_put("d", "after")],
        }),
    ]);
    txn(&mut st, &req).unwrap();
    assert_eq!(get(&st, "d").unwrap().value, b("before"));
}

#[test]
fn txn_op_limits() {
    let mut st = Store::new();
    let puts =
        |n: usize| -> Vec<RequestOp> { (0..n).map(|i| op_put(&format!("k{i}"), "v")).collect() };
    assert_eq!(
        txn(&mut st, &then(puts(129))).unwrap_err(),
        MvccError::TooManyOps
    );
    let compares = TxnRequest {
        compare: (0..129)
            .map(|i| {
                cmp(
                    &format!("k{i}"),
                    CompareTarget::Version,
                    CompareResult::Equal,
                    TargetUnion::Version(0),
                )
            })
            .collect(),
        ..Default::default()
    };
    assert_eq!(txn(&mut st, &compares).unwrap_err(), MvccError::TooManyOps);
    let failure = TxnRequest {
        failure: puts(129),
        ..Default::default()
    };
    assert_eq!(txn(&mut st, &failure).unwrap_err(), MvccError::TooManyOps);
    assert_eq!(st.revision(), 1);
    let (_, rev, events) = txn(&mut st, &then(puts(128))).unwrap();
    assert_eq!((rev, events.len()), (2, 128));

    // A custom limit; a nested txn gets what its parent leaves.
    let mut st = Store::new().with_max_txn_ops(4);
    assert_eq!(st.max_txn_ops(), 4);
    assert_eq!(
        txn(&mut st, &then(puts(5))).unwrap_err(),
        MvccError::TooManyOps
    );
    let nested = |inner: usize| {
        let mut ops = puts(2);
        ops.push(op_txn(TxnRequest {
            success: (0..inner).map(|i| op_put(&format!("n{i}"), "v")).collect(),
            ..Default::default()
        }));
        then(ops)
    };
    assert_eq!(txn(&mut st, &nested(2)).unwrap_err(), MvccError::TooManyOps);
    assert!(txn(&mut st, &nested(1)).is_ok());
}

#[test]
fn txn_duplicate_keys() {
    let dup = Err(MvccError::DuplicateKey);
    let check = |req: TxnRequest| -> Result<(), MvccError> {
        let mut st = abcd();
        let before = st.revision();
        let r = txn(&mut st, &req).map(|_| ());
        if r.is_err() {
            assert_eq!(st.revision(), before);
        }
        r
    };
    assert_eq!(check(then(vec![op_put("a", "1"), op_put("a", "2")])), dup);
    assert_eq!(check(then(vec![op_put("a", "1"), op_del("a", "")])), dup);
    assert_eq!(check(then(vec![op_del("a", "c"), op_put("b", "1")])), dup);
    assert_eq!(check(then(vec![op_del("a", "c"), op_put("a", "1")])), dup);
    assert_eq!(
        check(then(vec![op_del("a", "c"), op_put("c", "1")])),
        Ok(())
    );
    assert_eq!(
        check(then(vec![op_del("a", ""), op_put("aa", "1")])),
        Ok(())
    );
    assert_eq!(check(then(vec![op_del("a", "b"), op_del("a", "")])), Ok(()));
    // Ranges do not count.
    assert_eq!(
        check(then(vec![op_range("a", ""), op_put("a", "1")])),
        Ok(())
    );
    // Then and else are checked separately.
    assert_eq!(
        check(TxnRequest {
            success: vec![op_put("a", "1")],
            failure: vec![op_put("a", "2")],
            ..Default::default()
        }),
        Ok(())
    );
    // Nested txns: their puts meet the parent's puts and deletes.
    let nested_then = |ops| op_txn(then(ops));
    assert_eq!(
        check(then(vec![
            op_put("a", "1"),
            nested_then(vec![op_put("a", "2")])
        ])),
        dup
    );
    assert_eq!(
        check(then(vec![
            op_del("a", ""),
            nested_then(vec![op_put("a", "2")])
        ])),
        dup
    );
    assert_eq!(
        check(then(vec![
            nested_then(vec![op_del("a", "")]),
            op_put("a", "1")
        ])),
        dup
    );
    assert_eq!(
        check(then(vec![
            nested_then(vec![op_put("a", "1")]),
            nested_then(vec![op_put("a", "2")]),
        ])),
        dup
    );
    // A nested txn's then and else may put the same key.
    assert_eq!(
        check(then(vec![op_txn(TxnRequest {
            success: vec![op_put("a", "1")],
            failure: vec![op_put("a", "2")],
            ..Default::default()
        })])),
        Ok(())
    );
    // ...but an else put meeting an earlier sibling's put is a duplicate.
    assert_eq!(
        check(then(vec![
            nested_then(vec![op_put("a", "1")]),
            op_txn(TxnRequest {
                failure: vec![op_put("a", "2")],
                ..Default::default()
            }),
        ])),
        dup
    );
    // Deep nesting is checked too.
    assert_eq!(
        check(then(vec![nested_then(vec![nested_then(vec![
            op_put("z", "1"),
            op_put("z", "2"),
        ])])])),
        dup
    );
    // etcd 3.4 takes a from-key delete's range end literally, so it
    // overlaps no put.
    assert_eq!(
        check(then(vec![op_del("a", "\0"), op_put("b", "1")])),
        Ok(())
    );
}

#[test]
fn from_key_delete_and_put_in_one_txn() {
    let mut st = abcd();
    let (_, rev, events) =
        txn(&mut st, &then(vec![op_del("c", "\0"), op_put("d", "new")])).unwrap();
    let summary: Vec<(EventType, String, bool)> = events
        .iter()
        .map(|e| {
            (
                ev_type(e),
                s(&e.kv.as_ref().unwrap().key),
                e.prev_kv.is_some(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (EventType::Delete, "c".into(), true),
            (EventType::Delete, "d".into(), true),
            (EventType::Put, "d".into(), false),
        ]
    );
    assert_eq!(get(&st, "d").unwrap(), kv("d", "new", rev, rev, 1, 0));
    // History at the previous revision is intact.
    assert_eq!(get_at(&st, "d", rev - 1).unwrap().unwrap().value, b("vd"));
    let hist = st.events(rev, rev, b"d", b"").unwrap();
    assert_eq!(hist, events[1..].to_vec());
}

#[test]
fn empty_request_op_is_key_not_found() {
    let mut st = Store::new();
    let req = then(vec![op_put("a", "1"), RequestOp { request: None }]);
    assert_eq!(txn(&mut st, &req).unwrap_err(), MvccError::KeyNotFound);
    assert_eq!(st.revision(), 1);
}

#[test]
fn txn_request_checks_follow_the_chosen_branch() {
    use CompareResult::*;
    use CompareTarget as T;
    use TargetUnion as U;
    let mut st = abcd();
    let before = st.revision();
    let ignore_missing = op_put_with(PutRequest {
        ignore_value: true,
        ..put_req("missing", "")
    });
    let unknown_lease = op_put_with(PutRequest {
        lease: 42,
        ..put_req("a", "x")
    });
    let no_leases = |_: i64| false;
    // In the chosen branch: errors, and nothing is applied.
    let req = then(vec![op_put("a", "changed"), ignore_missing.clone()]);
    assert_eq!(
        txn_leases(&mut st, &req, &no_leases).unwrap_err(),
        MvccError::KeyNotFound
    );
    let req = then(vec![op_put("b", "changed"), unknown_lease.clone()]);
    assert_eq!(
        txn_leases(&mut st, &req, &no_leases).unwrap_err(),
        MvccError::LeaseNotFound
    );
    let nested = then(vec![
        op_put("b", "x"),
        op_txn(then(vec![unknown_lease.clone()])),
    ]);
    assert_eq!(
        txn_leases(&mut st, &nested, &no_leases).unwrap_err(),
        MvccError::LeaseNotFound
    );
    assert_eq!(st.revision(), before);
    assert_eq!(get(&st, "a").unwrap().value, b("va"));
    // In the branch not taken: ignored.
    let req = TxnRequest {
        compare: vec![cmp("a", T::Version, Equal, U::Version(1))],
        success: vec![op_put("a", "ok")],
        failure: vec![ignore_missing.clone(), unknown_lease.clone()],
    };
    assert!(txn_leases(&mut st, &req, &no_leases).unwrap().0.succeeded);
    // ignore_value inside a txn takes the existing value.
    let req = then(vec![op_put_with(PutRequest {
        ignore_value: true,
        prev_kv: true,
        ..put_req("b", "")
    })]);
    let (resp, rev, _) = txn(&mut st, &req).unwrap();
    let Some(Response::ResponsePut(p)) = &resp.responses[0].response else {
        panic!("put")
    };
    assert_eq!(p.prev_kv.as_ref().unwrap().value, b("vb"));
    assert_eq!(get(&st, "b").unwrap(), kv("b", "vb", 3, rev, 2, 0));
}

#[test]
fn txn_range_revisions_are_checked_first() {
    let mut st = abcd(); // revision 5
    let at = |rev| {
        op_range_with(RangeRequest {
            revision: rev,
            ..rr("a", "")
        })
    };
    let req = then(vec![op_put("a", "x"), at(6)]);
    assert_eq!(txn(&mut st, &req).unwrap_err(), MvccError::FutureRevision);
    st.compact(3).unwrap();
    let req = then(vec![op_put("a", "x"), at(2)]);
    assert_eq!(txn(&mut st, &req).unwrap_err(), MvccError::Compacted);
    // Put checks come before range checks.
    let req = then(vec![
        at(99),
        op_put_with(PutRequest {
            ignore_lease: true,
            ..put_req("missing", "x")
        }),
    ]);
    assert_eq!(txn(&mut st, &req).unwrap_err(), MvccError::KeyNotFound);
    assert_eq!(st.revision(), 5);
    // Historical reads inside a txn.
    let (resp, _, _) = txn(&mut st, &then(vec![op_put("a", "x"), at(3)])).unwrap();
    let Some(Response::ResponseRange(r)) = &resp.responses[1].response else {
        panic!("range")
    };
    assert_eq!(r.kvs[0].value, b("va"));
}

#[test]
fn failed_apply_is_rolled_back() {
    // A from-key delete escapes the duplicate check; a following
    // ignore_value put then finds no key. etcd panics here; we undo.
    let mut st = abcd();
    put(&mut st, "e", "ve");
    let before = st.revision();
    let req = then(vec![
        op_put("a", "changed"),
        op_del("c", "\0"),
        op_put_with(PutRequest {
            ignore_value: true,
            ..put_req("d", "")
        }),
    ]);
    assert_eq!(txn(&mut st, &req).unwrap_err(), MvccError::KeyNotFound);
    assert_eq!(st.revision(), before);
    assert_eq!(st.len(), 5);
    assert_eq!(
        keys(&range(&st, &rr("\0", "\0"))),
        ["a", "b", "c", "d", "e"]
    );
    assert_eq!(get(&st, "a").unwrap().value, b("va"));
    assert_eq!(get(&st, "d").unwrap(), kv("d", "vd", 5, 5, 1, 0));
    // Earlier changes of the same write survive a failed txn.
    let mut w = st.write();
    w.put(&put_req("x", "1"), &yes).unwrap();
    assert!(w.txn(&req, &yes).is_err());
    let (rev, events) = w.end();
    assert_eq!((rev, events.len()), (before + 1, 1));
    assert_eq!(get(&st, "x").unwrap().mod_revision, rev);
    assert_eq!(get(&st, "a").unwrap().value, b("va"));
}

#[test]
fn read_only_txns() {
    use CompareResult::*;
    use CompareTarget as T;
    use TargetUnion as U;
    let mut st = abcd(); // a..d at 2..5
    put(&mut st, "a", "new"); // 6, not yet "durable"
    let req = TxnRequest {
        compare: vec![cmp("a", T::Value, Equal, U::Value(b("va")))],
        success: vec![op_range("a", "")],
        failure: vec![op_range("b", "")],
    };
    assert!(is_read_only(&req));
    let resp = st.read_txn(&req, 5).unwrap();
    assert!(resp.succeeded);
    let Some(Response::ResponseRange(r)) = &resp.responses[0].response else {
        panic!("range")
    };
    assert_eq!(r.kvs[0].value, b("va"));
    assert!(!st.read_txn(&req, MAX).unwrap().succeeded);
    let writes = then(vec![op_put("a", "x")]);
    assert!(!is_read_only(&writes));
    assert!(!is_read_only(&then(vec![op_txn(TxnRequest::default())])));
    assert_eq!(st.read_txn(&writes, MAX), Err(MvccError::NotReadOnly));
    let future = then(vec![op_range_with(RangeRequest {
        revision: 6,
        ..rr("a", "")
    })]);
    assert_eq!(st.read_txn(&future, 5), Err(MvccError::FutureRevision));
}

// -------------------------------------------------------------- compaction

/// a@2, a@3, b@4, b deleted @5, c@6, a@7.
fn history_fixture() -> Store {
    let mut st = Store::new();
    put(&mut st, "a", "2");
    put(&mut st, "a", "3");
    put(&mut st, "b", "4");
    del(&mut st, "b", "");
    put(&mut st, "c", "6");
    put(&mut st, "a", "7");
    st
}

#[test]
fn compaction() {
    let mut st = history_fixture();
    assert_eq!(st.compact(8), Err(MvccError::FutureRevision));
    let c = st.compact(5).unwrap();
    assert_eq!(c.removed, vec![(2, 0), (4, 0), (5, 0)]);
    assert_eq!(st.compact_revision(), 5);
    assert_eq!(st.compact(5), Err(MvccError::Compacted));
    assert_eq!(st.compact(4), Err(MvccError::Compacted));

    assert_eq!(get_at(&st, "a", 4), Err(MvccError::Compacted));
    assert_eq!(
        get_at(&st, "a", 5).unwrap().unwrap(),
        kv("a", "3", 2, 3, 2, 0)
    );
    assert_eq!(get_at(&st, "b", 5).unwrap(), None);
    assert_eq!(
        get_at(&st, "a", 7).unwrap().unwrap(),
        kv("a", "7", 2, 7, 3, 0)
    );
    assert_eq!(st.len(), 2);
    assert!(
        !st.index.contains_key(b"b".as_slice()),
        "b is gone entirely"
    );

    // Later writes keep counting versions.
    put(&mut st, "a", "8");
    assert_eq!(get(&st, "a").unwrap(), kv("a", "8", 2, 8, 4, 0));

    let c = st.compact(8).unwrap();
    assert_eq!(c.removed, vec![(3, 0), (7, 0)]);
    // Nothing more to remove.
    assert_eq!(st.compact(8), Err(MvccError::Compacted));
    let mut st2 = Store::new();
    assert_eq!(st2.compact(1).unwrap().removed, vec![]);
}

#[test]
fn compaction_at_a_deletion_drops_the_key() {
    let mut st = Store::new();
    put(&mut st, "a", "1"); // 2
    del(&mut st, "a", ""); // 3
    put(&mut st, "k", "1"); // 4
    let c = st.compact(3).unwrap();
    assert_eq!(c.removed, vec![(2, 0), (3, 0)]);
    assert_eq!(st.events(3, 4, b"\0", b"\0").unwrap().len(), 1);
    // The delete survives a compaction before it.
    let mut st = Store::new();
    put(&mut st, "a", "1"); // 2
    del(&mut st, "a", ""); // 3
    assert_eq!(st.compact(2).unwrap().removed, vec![]);
    let evs = st.events(2, 3, b"a", b"").unwrap();
    assert_eq!(evs.len(), 2);
    assert_eq!(ev_type(&evs[1]), EventType::Delete);
}

// ------------------------------------------------------------------ events

#[test]
fn history_events() {
    let mut st = history_fixture();
    let all = st.events(1, 100, b"\0", b"\0").unwrap();
    assert_eq!(all.len(), 6);
    assert_eq!(all[0].prev_kv, None);
    assert_eq!(all[1].prev_kv, Some(kv("a", "2", 2, 2, 1, 0)));
    assert_eq!(
        all[3],
        Event {
            r#type: EventType::Delete as i32,
            kv: Some(KeyValue {
                key: b("b"),
                mod_revision: 5,
                ..Default::default()
            }),
            prev_kv: Some(kv("b", "4", 4, 4, 1, 0)),
        }
    );
    let a: Vec<i64> = st
        .events(1, 100, b"a", b"")
        .unwrap()
        .iter()
        .map(|e| e.kv.as_ref().unwrap().mod_revision)
        .collect();
    assert_eq!(a, [2, 3, 7]);
    let window: Vec<i64> = st
        .events(3, 6, b"\0", b"\0")
        .unwrap()
        .iter()
        .map(|e| e.kv.as_ref().unwrap().mod_revision)
        .collect();
    assert_eq!(window, [3, 4, 5, 6]);
    assert_eq!(st.events(3, 100, b"b", b"c").unwrap().len(), 2);
    assert_eq!(st.events(1, 100, b"b", b"\0").unwrap().len(), 3);
    assert_eq!(st.events(5, 4, b"\0", b"\0").unwrap().len(), 0);
    assert_eq!(st.events(1, 100, b"c", b"a").unwrap().len(), 0);

    // Events from end() and from history agree.
    let mut w = st.write();
    w.put(&put_req("c", "8"), &yes).unwrap();
    w.delete_range(&del_req("a", "")).unwrap();
    let (rev, live) = w.end();
    assert_eq!(st.events(rev, rev, b"\0", b"\0").unwrap(), live);

    // After compaction: no history before; none of the prev_kv older
    // than the compact revision.
    st.compact(6).unwrap();
    assert_eq!(st.events(5, 100, b"\0", b"\0"), Err(MvccError::Compacted));
    let after = st.events(6, 100, b"\0", b"\0").unwrap();
    let summary: Vec<(i64, bool)> = after
        .iter()
        .map(|e| (e.kv.as_ref().unwrap().mod_revision, e.prev_kv.is_some()))
        .collect();
    assert_eq!(summary, [(6, false), (7, true), (8, true), (8, true)]);
}

// ------------------------------------------------------------------ restore

#[test]
fn restore_round_trip() {
    let mut st = Store::new();
    let mut stored: BTreeMap<(i64, i64), Event> = BTreeMap::new();
    let record = |rev: i64, events: Vec<Event>, stored: &mut BTreeMap<(i64, i64), Event>| {
        for (sub, e) in events.into_iter().enumerate() {
            stored.insert((rev, sub as i64), e);
        }
    };
    for i in 0..20 {
        let mut w = st.write();
        w.put(&put_req(&format!("k{}", i % 7), &format!("v{i}")), &yes)
            .unwrap();
        if i % 3 == 0 {
            let lease = PutRequest {
                lease: 100 + i,
                ..put_req(&format!("l{}", i % 4), "x")
            };
            w.put(&lease, &yes).unwrap();
        }
        if i % 5 == 4 {
            w.delete_range(&del_req(&format!("k{}", (i + 1) % 7), ""))
                .unwrap();
        }
        let (rev, events) = w.end();
        record(rev, events, &mut stored);
    }
    let compacted = st.compact(12).unwrap();
    for r in &compacted.removed {
        assert!(stored.remove(r).is_some());
    }
    let restored = Store::restore(
        stored.iter().map(|(r, e)| (*r, e.clone())),
        st.compact_revision(),
    );
    assert_same(&st, &restored);
    // The same history hashes the same, at every revision HashKV accepts.
    for rev in [0, 13, 17, st.revision()] {
        assert_eq!(
            st.hash_kv(rev, st.revision()),
            restored.hash_kv(rev, restored.revision()),
            "hash at {rev}"
        );
    }
    assert_eq!(st.hash_kv(12, st.revision()), Err(MvccError::Compacted));
    assert_eq!(
        st.hash_kv(st.revision() + 1, st.revision()),
        Err(MvccError::FutureRevision)
    );
    assert_ne!(
        st.hash_kv(13, st.revision()),
        st.hash_kv(14, st.revision()),
        "a revision's records are in its hash"
    );
    // Without sub revisions: renumbered, but the same state.
    let plain = Store::restore(stored.values().cloned(), st.compact_revision());
    assert_same(&st, &plain);

    // Leftover records storage failed to delete are compacted again.
    let mut leftovers = stored.clone();
    leftovers.insert(
        (2, 0),
        Event {
            r#type: EventType::Put as i32,
            kv: Some(kv("k0", "v0", 2, 2, 1, 0)),
            prev_kv: None,
        },
    );
    let with_leftovers = Store::restore(
        leftovers.iter().map(|(r, e)| (*r, e.clone())),
        st.compact_revision(),
    );
    assert_same(&st, &with_leftovers);

    // Writes continue identically.
    let mut restored = restored;
    assert_eq!(
        put(&mut st, "k1", "after"),
        put(&mut restored, "k1", "after")
    );
    assert_same(&st, &restored);
}

fn assert_same(a: &Store, b: &Store) {
    assert_eq!(a.revision(), b.revision());
    assert_eq!(a.compact_revision(), b.compact_revision());
    assert_eq!(a.len(), b.len());
    let la: Vec<_> = a.keys_with_lease().collect();
    let lb: Vec<_> = b.keys_with_lease().collect();
    assert_eq!(la, lb);
    for rev in a.compact_revision().max(1)..=a.revision() {
        let req = RangeRequest {
            revision: rev,
            ..rr("\0", "\0")
        };
        assert_eq!(a.range(&req, MAX), b.range(&req, MAX), "at {rev}");
    }
    let from = a.compact_revision();
    assert_eq!(
        a.events(from, MAX, b"\0", b"\0"),
        b.events(from, MAX, b"\0", b"\0")
    );
}

#[test]
fn restore_edge_cases() {
    let st = Store::restore(Vec::<Event>::new(), 0);
    assert_eq!((st.revision(), st.compact_revision(), st.len()), (1, 0, 0));
    // Everything compacted away: the revision is at least the compact one.
    let mut st = Store::restore(Vec::<Event>::new(), 9);
    assert_eq!((st.revision(), st.compact_revision()), (9, 9));
    assert_eq!(st.compact(9), Err(MvccError::Compacted));
    st.bump_revision(12);
    st.bump_revision(3);
    assert_eq!(st.revision(), 12);
    assert_eq!(put(&mut st, "a", "1"), 13);
    // A tombstone for an unknown key is skipped.
    let st = Store::restore(
        vec![Event {
            r#type: EventType::Delete as i32,
            kv: Some(KeyValue {
                key: b("x"),
                mod_revision: 4,
                ..Default::default()
            }),
            prev_kv: None,
        }],
        0,
    );
    assert_eq!((st.revision(), st.len()), (4, 0));
    assert_eq!(st.events(0, MAX, b"\0", b"\0").unwrap().len(), 0);
    // A trimmed history keeps create revision and version.
    let st = Store::restore(
        vec![
            Event {
                r#type: EventType::Put as i32,
                kv: Some(kv("a", "x", 2, 5, 3, 0)),
                prev_kv: None,
            },
            Event {
                r#type: EventType::Put as i32,
                kv: Some(kv("a", "y", 2, 6, 4, 0)),
                prev_kv: None,
            },
        ],
        5,
    );
    assert_eq!(get(&st, "a").unwrap(), kv("a", "y", 2, 6, 4, 0));
    let mut st = st;
    put(&mut st, "a", "z");
    assert_eq!(get(&st, "a").unwrap(), kv("a", "z", 2, 7, 5, 0));
}

// ------------------------------------------------------------------ misc

#[test]
fn lease_helpers() {
    let mut st = Store::new();
    put_lease(&mut st, "a", "1", 5);
    put_lease(&mut st, "b", "1", 0);
    put_lease(&mut st, "c", "1", 6);
    put_lease(&mut st, "c", "2", 7);
    put_lease(&mut st, "d", "1", 8);
    del(&mut st, "d", "");
    let got: Vec<(Vec<u8>, i64)> = st.keys_with_lease().map(|(k, l)| (k.to_vec(), l)).collect();
    assert_eq!(got, vec![(b("a"), 5), (b("c"), 7)]);
    assert_eq!(st.get(b"c").unwrap().lease, 7);
    assert_eq!(st.get(b"d"), None);
    assert_eq!(st.len(), 3);
}

#[test]
fn error_messages_and_kinds() {
    use ErrorKind::*;
    let cases = [
        (
            MvccError::Compacted,
            "etcdserver: mvcc: required revision has been compacted",
            OutOfRange,
        ),
        (
            MvccError::FutureRevision,
            "etcdserver: mvcc: required revision is a future revision",
            OutOfRange,
        ),
        (
            MvccError::KeyNotFound,
            "etcdserver: key not found",
            InvalidArgument,
        ),
        (
            MvccError::LeaseNotFound,
            "etcdserver: requested lease not found",
            NotFound,
        ),
        (
            MvccError::ValueProvided,
            "etcdserver: value is provided",
            InvalidArgument,
        ),
        (
            MvccError::LeaseProvided,
            "etcdserver: lease is provided",
            InvalidArgument,
        ),
        (
            MvccError::DuplicateKey,
            "etcdserver: duplicate key given in txn request",
            InvalidArgument,
        ),
        (
            MvccError::TooManyOps,
            "etcdserver: too many operations in txn request",
            InvalidArgument,
        ),
        (
            MvccError::EmptyKey,
            "etcdserver: key is not provided",
            InvalidArgument,
        ),
    ];
    for (e, msg, kind) in cases {
        assert_eq!(e.to_string(), msg);
        assert_eq!(e.kind(), kind);
    }
}

#[test]
fn many_keys_stay_fast() {
    let mut st = Store::new();
    let n = 100_000;
    for chunk in 0..(n / 1000) {
        let mut w = st.write();
        for i in 0..1000 {
            let k = format!("svc/{:06}", chunk * 1000 + i);
            w.put(&put_req(&k, "endpoint"), &yes).unwrap();
        }
        w.end();
    }
    assert_eq!(st.len(), n);
    for i in 0..n / 10 {
        put(&mut st, &format!("svc/{:06}", i * 10), "moved");
    }
    let r = range(
        &st,
        &RangeRequest {
            limit: 10,
            ..rr("svc/", "svc0")
        },
    );
    assert_eq!((r.kvs.len(), r.more, r.count), (10, true, n as i64));
    let c = st.compact(st.revision()).unwrap();
    assert_eq!(c.removed.len(), n / 10);
    assert_eq!(get(&st, "svc/000010").unwrap().version, 2);
}

// --------------------------------------------------- randomized vs a model

/// The seed of the randomized test: `MUSTER_TEST_SEED` (a `u64`) when set,
/// else a fixed one. Printed, and named in the assertions, so that a
/// failure can be repeated.
fn test_seed() -> u64 {
    let seed = match std::env::var("MUSTER_TEST_SEED") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("MUSTER_TEST_SEED={v:?} is not a u64")),
        Err(_) => 0x9e37_79b9_7f4a_7c15,
    };
    eprintln!("seed {seed} (MUSTER_TEST_SEED={seed} repeats this run)");
    seed
}

/// One of 12 keys.
fn random_key(rng: &mut Xoshiro256PlusPlus) -> String {
    format!("k{}", rng.random_range(0..12))
}

type Snapshot = BTreeMap<Vec<u8>, KeyValue>;

#[test]
fn randomized_against_snapshots() {
    let seed = test_seed();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut st = Store::new();
    // snapshots[rev] = the store at revision rev.
    let mut snapshots: Vec<Snapshot> = vec![Snapshot::new(), Snapshot::new()];
    let mut stored: BTreeMap<(i64, i64), Event> = BTreeMap::new();
    for step in 0..600 {
        let before = st.revision();
        let mut model = snapshots[before as usize].clone();
        let mut w = st.write();
        let new_rev = before + 1;
        for _ in 0..=rng.random_range(0..3) {
            match rng.random_range(0..10) {
                0..=5 => {
                    let k = random_key(&mut rng);
                    let v = format!("v{step}");
                    w.put(&put_req(&k, &v), &yes)
                        .unwrap_or_else(|e| panic!("seed {seed}, step {step}: {e}"));
                    let (create, version) = match model.get(k.as_bytes()) {
                        Some(old) => (old.create_revision, old.version + 1),
                        None => (new_rev, 1),
                    };
                    model.insert(b(&k), kv(&k, &v, create, new_rev, version, 0));
                }
                6..=7 => {
                    let k = random_key(&mut rng);
                    w.delete_range(&del_req(&k, ""))
                        .unwrap_or_else(|e| panic!("seed {seed}, step {step}: {e}"));
                    model.remove(k.as_bytes());
                }
                _ => {
                    let (x, y) = (random_key(&mut rng), random_key(&mut rng));
                    let (lo, hi) = if x <= y { (x, y) } else { (y, x) };
                    w.delete_range(&del_req(&lo, &hi))
                        .unwrap_or_else(|e| panic!("seed {seed}, step {step}: {e}"));
                    model.retain(|k, _| {
                        !(k.as_slice() >= lo.as_bytes() && k.as_slice() < hi.as_bytes())
                    });
                }
            }
        }
        let (rev, events) = w.end();
        if events.is_empty() {
            assert_eq!(rev, before, "seed {seed}, step {step}");
        } else {
            assert_eq!(rev, new_rev, "seed {seed}, step {step}");
            for (sub, e) in events.into_iter().enumerate() {
                stored.insert((rev, sub as i64), e);
            }
            snapshots.push(model);
        }
        if step % 97 == 96 && st.revision() > st.compact_revision() {
            let at = st.compact_revision().max(1)
                + rng.random_range(0..st.revision() - st.compact_revision());
            if at > st.compact_revision() {
                let compacted = match st.compact(at) {
                    Ok(c) => c,
                    Err(e) => panic!("seed {seed}: compact at {at}: {e}"),
                };
                for r in compacted.removed {
                    let once = stored.remove(&r).is_some();
                    assert!(once, "seed {seed}: removed {r:?} twice");
                }
            }
        }
    }
    assert_eq!(st.len(), snapshots.last().unwrap().len(), "seed {seed}");
    let first = st.compact_revision().max(1);
    let check = |st: &Store, which: &str| {
        for rev in first..=st.revision() {
            let req = RangeRequest {
                revision: rev,
                ..rr("\0", "\0")
            };
            let got = match st.range(&req, MAX) {
                Ok(r) => r.kvs,
                Err(e) => panic!("seed {seed}, {which}: range at {rev}: {e}"),
            };
            let want: Vec<KeyValue> = snapshots[rev as usize].values().cloned().collect();
            assert_eq!(got, want, "seed {seed}, {which}: range at {rev}");
        }
        for rev in 1..first {
            let req = RangeRequest {
                revision: rev,
                ..rr("\0", "\0")
            };
            let got = st.range(&req, MAX).map(|r| r.kvs);
            let want = Err(MvccError::Compacted);
            assert_eq!(got, want, "seed {seed}, {which}: range at {rev}");
        }
        // Every event after the compact revision is a change between
        // snapshots, with prev_kv the previous snapshot's value.
        for rev in first + 1..=st.revision() {
            let evs = st.events(rev, rev, b"\0", b"\0");
            let evs = evs.unwrap_or_else(|e| panic!("seed {seed}, {which}: events at {rev}: {e}"));
            let (old, new) = (&snapshots[rev as usize - 1], &snapshots[rev as usize]);
            let mut changed: Vec<Vec<u8>> = evs
                .iter()
                .map(|e| e.kv.as_ref().unwrap().key.clone())
                .collect();
            changed.dedup();
            for k in new.keys().chain(old.keys()) {
                let differs = new.get(k) != old.get(k);
                let seen = changed.contains(k);
                assert_eq!(differs, seen, "seed {seed}, {which}: key {} at {rev}", s(k));
            }
            for e in &evs {
                let kv = e.kv.as_ref().unwrap();
                let creates = ev_type(e) == EventType::Put && kv.create_revision == kv.mod_revision;
                let want = if creates { None } else { old.get(&kv.key) };
                let prev = e.prev_kv.as_ref();
                assert_eq!(
                    prev,
                    want,
                    "seed {seed}, {which}: prev of {} at {rev}",
                    s(&kv.key)
                );
            }
        }
    };
    check(&st, "store");
    // Storage's view restores to the same store.
    let restored = Store::restore(
        stored.iter().map(|(r, e)| (*r, e.clone())),
        st.compact_revision(),
    );
    check(&restored, "restored");
    assert_same(&st, &restored);
}
