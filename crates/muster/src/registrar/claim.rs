//! The registrar's transactions: what it sends to etcd to claim, restore
//! and remove its keys, and how it reads the answers.
//!
//! Every write of a registration is a *claim*, one nested transaction
//! that is atomic in etcd:
//!
//! ```text
//! if create_revision(key) == 0   { put key under lease }   // absent
//! else if lease(key) == accept   { put key under lease }   // still ours
//! else                           { range key }             // read the holder
//! ```
//!
//! `accept` is the lease the key may already be under: the current lease,
//! or during recovery the lost one, so a key that outlived its lease moves
//! to the new one instead of being counted as someone else's.

use muster_proto as pb;
use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::request_op::Request as Op;
use pb::response_op::Response as OpResponse;

/// etcd's limit on operations per transaction.
pub(super) const MAX_TXN_OPS: usize = 128;

/// The outcome of claiming one key.
pub(super) enum Claim {
    /// Written under our lease.
    Written,
    /// Held under another lease (0 if the answer did not say which).
    HeldBy(i64),
}

/// Writes `key` under `lease` if it is absent or held by `accept` (our
/// current or previous lease); otherwise reads the holder.
pub(super) fn claim_op(key: &str, value: &[u8], lease: i64, accept: i64) -> pb::RequestOp {
    txn_op(
        compare(key, CompareTarget::Create, TargetUnion::CreateRevision(0)),
        vec![put_op(key, value, lease)],
        vec![txn_op(
            compare(key, CompareTarget::Lease, TargetUnion::Lease(accept)),
            vec![put_op(key, value, lease)],
            vec![range_op(key)],
        )],
    )
}

/// Reads the answer to a [`claim_op`].
pub(super) fn parse_claim(op: pb::ResponseOp) -> Claim {
    let Some(OpResponse::ResponseTxn(outer)) = op.response else {
        return Claim::HeldBy(0);
    };
    if outer.succeeded {
        return Claim::Written;
    }
    match outer.responses.into_iter().next().and_then(|r| r.response) {
        Some(OpResponse::ResponseTxn(inner)) if inner.succeeded => Claim::Written,
        Some(OpResponse::ResponseTxn(inner)) => {
            let holder = inner
                .responses
                .into_iter()
                .find_map(|r| match r.response {
                    Some(OpResponse::ResponseRange(range)) => range.kvs.into_iter().next(),
                    _ => None,
                })
                .map_or(0, |kv| kv.lease);
            Claim::HeldBy(holder)
        }
        _ => Claim::HeldBy(0),
    }
}

/// Puts our value back over a lease-less overwrite, unless the key
/// changed again since `mod_revision`.
pub(super) fn restore_over_op(
    key: &str,
    value: &[u8],
    lease: i64,
    mod_revision: i64,
) -> pb::RequestOp {
    txn_op(
        compare(
            key,
            CompareTarget::Mod,
            TargetUnion::ModRevision(mod_revision),
        ),
        vec![put_op(key, value, lease)],
        Vec::new(),
    )
}

/// Deletes `key` if it is still under `lease`: a transaction of its own.
pub(super) fn deregister_txn(key: &str, lease: i64) -> pb::TxnRequest {
    pb::TxnRequest {
        compare: vec![compare(
            key,
            CompareTarget::Lease,
            TargetUnion::Lease(lease),
        )],
        success: vec![pb::RequestOp {
            request: Some(Op::RequestDeleteRange(pb::DeleteRangeRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            })),
        }],
        failure: Vec::new(),
    }
}

/// [`deregister_txn`] as one op of a larger transaction (a nested txn).
pub(super) fn delete_if_ours_op(key: &str, lease: i64) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Op::RequestTxn(deregister_txn(key, lease))),
    }
}

/// A transaction of `ops`, unconditionally.
pub(super) fn txn_of(ops: Vec<pb::RequestOp>) -> pb::TxnRequest {
    pb::TxnRequest {
        compare: Vec::new(),
        success: ops,
        failure: Vec::new(),
    }
}

fn compare(key: &str, target: CompareTarget, value: TargetUnion) -> pb::Compare {
    pb::Compare {
        result: CompareResult::Equal as i32,
        target: target as i32,
        key: key.as_bytes().to_vec(),
        range_end: Vec::new(),
        target_union: Some(value),
    }
}

fn put_op(key: &str, value: &[u8], lease: i64) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Op::RequestPut(pb::PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.to_vec(),
            lease,
            ..Default::default()
        })),
    }
}

fn range_op(key: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Op::RequestRange(pb::RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        })),
    }
}

fn txn_op(
    compare: pb::Compare,
    success: Vec<pb::RequestOp>,
    failure: Vec<pb::RequestOp>,
) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Op::RequestTxn(pb::TxnRequest {
            compare: vec![compare],
            success,
            failure,
        })),
    }
}
