//! Writes and txns: etcd's `storeTxnWrite` and the v3 applier's Put,
//! DeleteRange and Txn, with the request checks of etcd's `v3rpc` layer.
//!
//! A layer over the store: [`Store::write`] and [`Store::read_txn`] are
//! defined here, and everything runs on the store's read and record-level
//! primitives (one main revision per write, a sub revision per change,
//! undo when a write is dropped). The store does not know this module.

use std::collections::HashSet;

use muster_proto::compare::{CompareResult, CompareTarget, TargetUnion};
use muster_proto::request_op::Request;
use muster_proto::response_op::Response;
use muster_proto::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, Event, KeyValue, PutRequest, PutResponse,
    RangeRequest, RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};

use super::error::MvccError;
use super::key_index::Revision;
use super::store::Store;

/// The txn layer's entry points on the store.
impl Store {
    /// A txn that only reads (see [`is_read_only`]), at most at `max_rev`
    /// like [`Store::range`], without a write lock. Validated as etcd
    /// validates any txn; a txn with writes is [`MvccError::NotReadOnly`]
    /// (use [`Store::write`] and [`WriteTxn::txn`]). The txn's header is
    /// left `None`; each range's nested header carries the revision read.
    pub fn read_txn(&self, req: &TxnRequest, max_rev: i64) -> Result<TxnResponse, MvccError> {
        check_txn_request(req, self.max_txn_ops)?;
        if !is_read_only(req) {
            return Err(MvccError::NotReadOnly);
        }
        let cur = self.read_rev(max_rev);
        let mut path = Vec::new();
        compare_to_path(self, cur, req, &mut path);
        let succeeded = path.first().copied().unwrap_or(false);
        let ops = if succeeded {
            &req.success
        } else {
            &req.failure
        };
        for op in ops {
            if let Some(Request::RequestRange(r)) = &op.request {
                self.check_range_revision(r.revision, cur)?;
            }
        }
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            if let Some(Request::RequestRange(r)) = &op.request {
                let mut resp = self.do_range(r, cur)?;
                resp.header = revision_header(cur);
                responses.push(ResponseOp {
                    response: Some(Response::ResponseRange(resp)),
                });
            }
        }
        Ok(TxnResponse {
            header: None,
            succeeded,
            responses,
        })
    }

    /// Starts a write. It creates at most one revision, when
    /// [`WriteTxn::end`] is called and only if it changed something;
    /// dropping it without `end` undoes its changes.
    pub fn write(&mut self) -> WriteTxn<'_> {
        WriteTxn::new(self)
    }
}

/// A write in progress on a [`Store`] (etcd's `TxnWrite`).
///
/// Every change made through it shares one main revision, the store's
/// revision + 1, with sub revisions 0, 1, ... in order. Its own reads see
/// its earlier changes. [`WriteTxn::end`] commits; dropping it without
/// `end` undoes every change it made.
///
/// Each operation either succeeds or fails with no effect.
pub struct WriteTxn<'a> {
    store: &'a mut Store,
    begin_rev: i64,
    changes: Vec<Event>,
    ended: bool,
}

impl std::fmt::Debug for WriteTxn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTxn")
            .field("begin_revision", &self.begin_rev)
            .field("changes", &self.changes.len())
            .finish_non_exhaustive()
    }
}

impl Drop for WriteTxn<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.rollback_to(0);
        }
    }
}

impl<'a> WriteTxn<'a> {
    fn new(store: &'a mut Store) -> WriteTxn<'a> {
        let begin_rev = store.current_rev;
        WriteTxn {
            store,
            begin_rev,
            changes: Vec::new(),
            ended: false,
        }
    }

    /// The revision reads in this write see: the store's, or the new one
    /// once something changed.
    fn cur_rev(&self) -> i64 {
        if self.changes.is_empty() {
            self.begin_rev
        } else {
            self.begin_rev + 1
        }
    }

    /// The revision of the next change.
    fn next_rev(&self) -> Revision {
        Revision::new(self.begin_rev + 1, self.changes.len() as i64)
    }

    /// The events so far, in order (event `i` has sub revision `i`).
    pub fn events(&self) -> &[Event] {
        &self.changes
    }

    /// etcd's `Range` inside the write: sees this write's own changes.
    /// Header left `None`.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, MvccError> {
        if req.key.is_empty() {
            return Err(MvccError::EmptyKey);
        }
        self.store.do_range(req, self.cur_rev())
    }

    /// etcd's `Put`. Checks, in etcd's order: empty key, `ignore_value`
    /// with a value ([`MvccError::ValueProvided`]), `ignore_lease` with a
    /// lease ([`MvccError::LeaseProvided`]), the lease exists
    /// ([`MvccError::LeaseNotFound`]), and with `ignore_value` or
    /// `ignore_lease` the key exists ([`MvccError::KeyNotFound`]). Always
    /// creates a change, even with an unchanged value. `prev_kv` is filled
    /// when asked and the key existed. Header left `None`.
    pub fn put(
        &mut self,
        req: &PutRequest,
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Result<PutResponse, MvccError> {
        check_put_request(req)?;
        if req.lease != 0 && !lease_exists(req.lease) {
            return Err(MvccError::LeaseNotFound);
        }
        self.apply_put(req, None)
    }

    /// [`WriteTxn::put`] taking the request, so that its value moves into
    /// the store instead of being copied (the put path of the server).
    pub fn put_owned(
        &mut self,
        mut req: PutRequest,
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Result<PutResponse, MvccError> {
        check_put_request(&req)?;
        if req.lease != 0 && !lease_exists(req.lease) {
            return Err(MvccError::LeaseNotFound);
        }
        let value = std::mem::take(&mut req.value);
        self.apply_put(&req, Some(value))
    }

    /// etcd's `DeleteRange` over `[key, range_end)` (empty `range_end`: the
    /// key alone; `[0]`: every key from `key` on). Deleting nothing changes
    /// nothing. Header left `None`.
    pub fn delete_range(
        &mut self,
        req: &DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, MvccError> {
        if req.key.is_empty() {
            return Err(MvccError::EmptyKey);
        }
        Ok(self.apply_delete(req))
    }

    /// etcd's `Txn`. The request is checked whole before anything runs (op
    /// counts against the txn limit, empty keys, put flags, empty ops,
    /// overlapping puts and deletes); then every compare, nested ones
    /// included, is evaluated against the state before the txn; then the
    /// chosen branches' puts (key exists for `ignore_*`, lease exists) and
    /// ranges (revision) are checked; then the ops run in order. A failed
    /// txn changes nothing. The txn's header is left `None`; the nested
    /// responses get etcd's nested headers, which carry only a revision:
    /// a range's is the revision it read at, a put's the write's revision,
    /// a delete's the write's revision once this txn changed anything (the
    /// delete included) and the revision before it otherwise, a nested
    /// txn's 0.
    pub fn txn(
        &mut self,
        req: &TxnRequest,
        lease_exists: &dyn Fn(i64) -> bool,
    ) -> Result<TxnResponse, MvccError> {
        check_txn_request(req, self.store.max_txn_ops)?;
        check_intervals(&req.success)?;
        check_intervals(&req.failure)?;

        let cur = self.cur_rev();
        let mut path = Vec::new();
        compare_to_path(self.store, cur, req, &mut path);

        let store: &Store = self.store;
        check_requests(req, &path, &mut 0, &mut |op| match &op.request {
            Some(Request::RequestPut(p)) => {
                if (p.ignore_value || p.ignore_lease) && store.kv_at(&p.key, cur).is_none() {
                    return Err(MvccError::KeyNotFound);
                }
                if p.lease != 0 && !lease_exists(p.lease) {
                    return Err(MvccError::LeaseNotFound);
                }
                Ok(())
            }
            _ => Ok(()),
        })?;
        check_requests(req, &path, &mut 0, &mut |op| match &op.request {
            Some(Request::RequestRange(r)) => store.check_range_revision(r.revision, cur),
            _ => Ok(()),
        })?;

        let checkpoint = self.changes.len();
        match self.apply_txn(req, &path, &mut 0) {
            Ok(resp) => Ok(resp),
            Err(e) => {
                // Only reachable where etcd itself would panic (a put with
                // ignore_value after a from-key delete of its key).
                self.rollback_to(checkpoint);
                Err(e)
            }
        }
    }

    /// Commits: returns the store's revision (the new one if anything
    /// changed, else unchanged) and the events in order. Event `i` has sub
    /// revision `i`. A PUT event carries the new key-value, a DELETE event
    /// a key-value with only `key` and `mod_revision` (as etcd's); each
    /// carries `prev_kv` as etcd's watch fills it: the key's value at the
    /// revision before this write (`None` if it did not exist then, and
    /// always for a put creating the key). For a key the txn touches twice
    /// (a put and a from-key delete) the second event carries the value
    /// from before the txn, not the first change's: a caller tracking
    /// leases per event must carry the first event's lease to the second.
    pub fn end(mut self) -> (i64, Vec<Event>) {
        self.ended = true;
        let changes = std::mem::take(&mut self.changes);
        if !changes.is_empty() {
            self.store.current_rev = self.begin_rev + 1;
        }
        (self.store.current_rev, changes)
    }

    /// Applies `p`; `owned` is `p`'s value when the caller moved it out
    /// (then `p.value` is not read).
    fn apply_put(
        &mut self,
        p: &PutRequest,
        owned: Option<Vec<u8>>,
    ) -> Result<PutResponse, MvccError> {
        let cur = self.cur_rev();
        let ignore = p.ignore_value || p.ignore_lease;
        let prev: Option<KeyValue> = if ignore || p.prev_kv {
            self.store.kv_at(&p.key, cur).cloned()
        } else {
            None
        };
        let (value, lease) = match (&prev, ignore) {
            (None, true) => return Err(MvccError::KeyNotFound),
            (Some(prev), true) => (
                if p.ignore_value {
                    prev.value.clone()
                } else {
                    owned.unwrap_or_else(|| p.value.clone())
                },
                if p.ignore_lease { prev.lease } else { p.lease },
            ),
            (_, false) => (owned.unwrap_or_else(|| p.value.clone()), p.lease),
        };
        let rev = self.next_rev();
        let event = self.store.put_record(&p.key, value, lease, rev);
        self.changes.push(event);
        Ok(PutResponse {
            header: None,
            prev_kv: if p.prev_kv { prev } else { None },
        })
    }

    fn apply_delete(&mut self, d: &DeleteRangeRequest) -> DeleteRangeResponse {
        let cur = self.cur_rev();
        let prev_kvs: Vec<KeyValue> = if d.prev_kv {
            self.store
                .iter_at(&d.key, &d.range_end, cur)
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        let keys: Vec<Vec<u8>> = self
            .store
            .revs_at(&d.key, &d.range_end, cur)
            .map(|(k, _)| k.to_vec())
            .collect();
        let mut deleted = 0;
        for key in keys {
            let rev = self.next_rev();
            if let Some(event) = self.store.delete_record(&key, rev) {
                self.changes.push(event);
                deleted += 1;
            }
        }
        DeleteRangeResponse {
            header: None,
            deleted,
            prev_kvs,
        }
    }

    /// etcd's `applyTxn`: runs the branch `path` chose, recursively. The
    /// responses of the ops get etcd's nested headers (see
    /// [`revision_header`]); the txn's own header is left `None` (the
    /// caller's, or [`revision_header`]`(0)` for a nested txn).
    fn apply_txn(
        &mut self,
        rt: &TxnRequest,
        path: &[bool],
        pos: &mut usize,
    ) -> Result<TxnResponse, MvccError> {
        let succeeded = path.get(*pos).copied().unwrap_or(false);
        *pos += 1;
        let ops = if succeeded { &rt.success } else { &rt.failure };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            let response = match &op.request {
                Some(Request::RequestRange(r)) => {
                    let mut resp = self.store.do_range(r, self.cur_rev())?;
                    // etcd: the revision the range read at.
                    resp.header = revision_header(self.cur_rev());
                    Some(Response::ResponseRange(resp))
                }
                Some(Request::RequestPut(p)) => {
                    let mut resp = self.apply_put(p, None)?;
                    // etcd: the write's revision.
                    resp.header = revision_header(self.begin_rev + 1);
                    Some(Response::ResponsePut(resp))
                }
                Some(Request::RequestDeleteRange(d)) => {
                    let mut resp = self.apply_delete(d);
                    // etcd: the write's revision once anything changed, else
                    // the revision before it.
                    resp.header = revision_header(self.cur_rev());
                    Some(Response::ResponseDeleteRange(resp))
                }
                Some(Request::RequestTxn(t)) => {
                    let mut resp = self.apply_txn(t, path, pos)?;
                    // etcd never fills a nested txn's header: revision 0.
                    resp.header = revision_header(0);
                    Some(Response::ResponseTxn(resp))
                }
                None => None,
            };
            responses.push(ResponseOp { response });
        }
        Ok(TxnResponse {
            header: None,
            succeeded,
            responses,
        })
    }

    /// Undoes changes until `n` are left.
    fn rollback_to(&mut self, n: usize) {
        while self.changes.len() > n {
            let Some(event) = self.changes.pop() else {
                break;
            };
            let rev = Revision::new(self.begin_rev + 1, self.changes.len() as i64);
            self.store.undo(rev, &event);
        }
    }
}

/// The header etcd gives a response nested in a txn: only a revision (the
/// server fills cluster, member and raft term on the top-level header
/// alone).
fn revision_header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..ResponseHeader::default()
    })
}

/// Whether a txn only reads (etcd's `isTxnReadonly`): both branches hold
/// range ops only (a nested txn counts as a write).
pub fn is_read_only(req: &TxnRequest) -> bool {
    req.success
        .iter()
        .chain(&req.failure)
        .all(|op| matches!(op.request, Some(Request::RequestRange(_))))
}

/// The checks etcd makes of a txn before anything else (access control
/// included): op counts, empty keys and ops, put flags, and overlapping
/// puts and deletes in a branch.
pub fn check_txn(r: &TxnRequest, max_txn_ops: usize) -> Result<(), MvccError> {
    check_txn_request(r, max_txn_ops)?;
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

/// etcd's `checkPutRequest`.
pub fn check_put_request(p: &PutRequest) -> Result<(), MvccError> {
    if p.key.is_empty() {
        return Err(MvccError::EmptyKey);
    }
    if p.ignore_value && !p.value.is_empty() {
        return Err(MvccError::ValueProvided);
    }
    if p.ignore_lease && p.lease != 0 {
        return Err(MvccError::LeaseProvided);
    }
    Ok(())
}

/// etcd's `checkTxnRequest`: at most `max_txn_ops` compares and ops per
/// branch (a nested txn gets what its parent left), no empty key, no
/// empty op.
fn check_txn_request(r: &TxnRequest, max_txn_ops: usize) -> Result<(), MvccError> {
    let opc = r.compare.len().max(r.success.len()).max(r.failure.len());
    if opc > max_txn_ops {
        return Err(MvccError::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(MvccError::EmptyKey);
    }
    for op in r.success.iter().chain(&r.failure) {
        check_request_op(op, max_txn_ops - opc)?;
    }
    Ok(())
}

/// etcd's `checkRequestOp`.
fn check_request_op(op: &RequestOp, max_txn_ops: usize) -> Result<(), MvccError> {
    match &op.request {
        Some(Request::RequestRange(r)) if r.key.is_empty() => Err(MvccError::EmptyKey),
        Some(Request::RequestRange(_)) => Ok(()),
        Some(Request::RequestPut(p)) => check_put_request(p),
        Some(Request::RequestDeleteRange(d)) if d.key.is_empty() => Err(MvccError::EmptyKey),
        Some(Request::RequestDeleteRange(_)) => Ok(()),
        Some(Request::RequestTxn(t)) => check_txn_request(t, max_txn_ops),
        // An empty op: etcd answers "key not found".
        None => Err(MvccError::KeyNotFound),
    }
}

/// A deleted interval, as etcd's `checkIntervals` builds it: a point for an
/// empty `range_end`, else `[key, range_end)` taken literally, so a from-key
/// delete (`range_end` `[0]`) is an empty interval and overlaps nothing
/// (etcd 3.4 behaves so).
#[derive(Clone, Copy)]
enum Deleted<'a> {
    Point(&'a [u8]),
    Range(&'a [u8], &'a [u8]),
}

impl Deleted<'_> {
    fn contains(&self, k: &[u8]) -> bool {
        match *self {
            Deleted::Point(a) => a == k,
            Deleted::Range(a, b) => a <= k && k < b,
        }
    }
}

type Puts<'a> = HashSet<&'a [u8]>;

/// etcd's `checkIntervals`: no key put twice, and no key both put and
/// deleted, in one branch (nested txns included; a nested txn's then and
/// else branches may put the same keys). Returns the branch's puts and
/// deletes for the parent's check.
fn check_intervals(reqs: &[RequestOp]) -> Result<(Puts<'_>, Vec<Deleted<'_>>), MvccError> {
    let mut dels: Vec<Deleted<'_>> = reqs
        .iter()
        .filter_map(|op| match &op.request {
            Some(Request::RequestDeleteRange(d)) if d.range_end.is_empty() => {
                Some(Deleted::Point(&d.key))
            }
            Some(Request::RequestDeleteRange(d)) => Some(Deleted::Range(&d.key, &d.range_end)),
            _ => None,
        })
        .collect();
    let hit = |dels: &[Deleted<'_>], k: &[u8]| dels.iter().any(|d| d.contains(k));

    let mut puts: Puts<'_> = HashSet::new();
    for op in reqs {
        let Some(Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for &k in &puts_then {
            if puts.contains(k) || hit(&dels, k) {
                return Err(MvccError::DuplicateKey);
            }
            puts.insert(k);
        }
        for &k in &puts_else {
            // The same key in then and else is fine: only one runs.
            if puts.contains(k) && !puts_then.contains(k) {
                return Err(MvccError::DuplicateKey);
            }
            if hit(&dels, k) {
                return Err(MvccError::DuplicateKey);
            }
            puts.insert(k);
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }

    for op in reqs {
        let Some(Request::RequestPut(p)) = &op.request else {
            continue;
        };
        let k = p.key.as_slice();
        if puts.contains(k) || hit(&dels, k) {
            return Err(MvccError::DuplicateKey);
        }
        puts.insert(k);
    }
    Ok((puts, dels))
}

/// etcd's `compareToPath`: the outcome of every txn that runs (this one,
/// then its chosen branch's nested txns, depth first), all evaluated at
/// revision `cur` before anything is applied.
fn compare_to_path(store: &Store, cur: i64, rt: &TxnRequest, path: &mut Vec<bool>) {
    let ok = rt.compare.iter().all(|c| apply_compare(store, cur, c));
    path.push(ok);
    let ops = if ok { &rt.success } else { &rt.failure };
    for op in ops {
        if let Some(Request::RequestTxn(t)) = &op.request {
            compare_to_path(store, cur, t, path);
        }
    }
}

/// etcd's `checkRequests`: runs `f` on every non-txn op of the branches
/// `path` chose.
fn check_requests(
    rt: &TxnRequest,
    path: &[bool],
    pos: &mut usize,
    f: &mut dyn FnMut(&RequestOp) -> Result<(), MvccError>,
) -> Result<(), MvccError> {
    let ok = path.get(*pos).copied().unwrap_or(false);
    *pos += 1;
    let ops = if ok { &rt.success } else { &rt.failure };
    for op in ops {
        match &op.request {
            Some(Request::RequestTxn(t)) => check_requests(t, path, pos, f)?,
            _ => f(op)?,
        }
    }
    Ok(())
}

/// etcd's `applyCompare`: every key in the compare's range must satisfy it;
/// with no key there, a VALUE compare fails and the others compare a
/// zero key-value (create, mod, version and lease 0).
fn apply_compare(store: &Store, cur: i64, c: &Compare) -> bool {
    let mut any = false;
    for kv in store.iter_at(&c.key, &c.range_end, cur) {
        any = true;
        if !compare_kv(c, kv) {
            return false;
        }
    }
    if any {
        return true;
    }
    if c.target == CompareTarget::Value as i32 {
        return false;
    }
    compare_kv(c, &KeyValue::default())
}

/// etcd's `compareKV`. A target union of the wrong kind compares against 0
/// (or an empty value); an unknown target compares equal; an unknown result
/// holds.
fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    let ord = match CompareTarget::try_from(c.target) {
        Ok(CompareTarget::Value) => {
            let want: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(want)
        }
        Ok(CompareTarget::Create) => kv.create_revision.cmp(&int_operand(c)),
        Ok(CompareTarget::Mod) => kv.mod_revision.cmp(&int_operand(c)),
        Ok(CompareTarget::Version) => kv.version.cmp(&int_operand(c)),
        Ok(CompareTarget::Lease) => kv.lease.cmp(&int_operand(c)),
        Err(_) => std::cmp::Ordering::Equal,
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ord.is_eq(),
        Ok(CompareResult::NotEqual) => ord.is_ne(),
        Ok(CompareResult::Greater) => ord.is_gt(),
        Ok(CompareResult::Less) => ord.is_lt(),
        Err(_) => true,
    }
}

/// The number an integer compare compares against: its target union's when
/// that is of the target's kind, else 0.
fn int_operand(c: &Compare) -> i64 {
    let target = CompareTarget::try_from(c.target);
    match (target, &c.target_union) {
        (Ok(CompareTarget::Create), Some(TargetUnion::CreateRevision(v)))
        | (Ok(CompareTarget::Mod), Some(TargetUnion::ModRevision(v)))
        | (Ok(CompareTarget::Version), Some(TargetUnion::Version(v)))
        | (Ok(CompareTarget::Lease), Some(TargetUnion::Lease(v))) => *v,
        _ => 0,
    }
}
