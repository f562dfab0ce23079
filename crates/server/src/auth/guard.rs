//! What each KV and lease request needs, as etcd's auth applier
//! (`etcdserver/apply_auth.go`) checks it, run against the state the
//! request is applied to.
//!
//! - Range: READ on its range.
//! - Put: WRITE on the key; READ with `prev_kv`; WRITE on every key
//!   already attached to its lease (a user who may not revoke the lease
//!   may not attach to it either).
//! - DeleteRange: WRITE on the range; READ with `prev_kv`.
//! - Txn: READ on every compare, then every op of both branches as above.
//!   Unlike etcd 3.4, nested txns and a put's `prev_kv` and lease inside a
//!   txn are checked too (3.4 let them through unchecked).
//! - LeaseRevoke: WRITE on every attached key.

use muster_proto as pb;
use pb::request_op::Request as Op;

use super::error::AuthError;
use super::perms::Access;
use super::store::{AuthStore, Caller};
use crate::lease::Lessor;

/// Checks requests of one caller against one state.
pub struct Guard<'a> {
    /// The auth store.
    pub auth: &'a AuthStore,
    /// The leases (for the keys attached to them).
    pub lessor: &'a Lessor,
    /// Who asks.
    pub caller: &'a Caller,
}

impl Guard<'_> {
    /// Whether checks apply at all (auth on, and not the server itself).
    pub fn active(&self) -> bool {
        self.auth.is_enabled() && *self.caller != Caller::System
    }

    fn read(&self, key: &[u8], range_end: &[u8]) -> Result<(), AuthError> {
        self.auth.check(self.caller, Access::Read, key, range_end)
    }

    fn write(&self, key: &[u8], range_end: &[u8]) -> Result<(), AuthError> {
        self.auth.check(self.caller, Access::Write, key, range_end)
    }

    /// Range.
    pub fn range(&self, r: &pb::RangeRequest) -> Result<(), AuthError> {
        if !self.active() {
            return Ok(());
        }
        self.read(&r.key, &r.range_end)
    }

    /// Put.
    pub fn put(&self, p: &pb::PutRequest) -> Result<(), AuthError> {
        if !self.active() {
            return Ok(());
        }
        self.write(&p.key, &[])?;
        self.lease(p.lease)?;
        if p.prev_kv {
            self.read(&p.key, &[])?;
        }
        Ok(())
    }

    /// DeleteRange.
    pub fn delete_range(&self, d: &pb::DeleteRangeRequest) -> Result<(), AuthError> {
        if !self.active() {
            return Ok(());
        }
        self.write(&d.key, &d.range_end)?;
        if d.prev_kv {
            self.read(&d.key, &d.range_end)?;
        }
        Ok(())
    }

    /// Txn: compares, then both branches, nested txns included.
    pub fn txn(&self, t: &pb::TxnRequest) -> Result<(), AuthError> {
        if !self.active() {
            return Ok(());
        }
        for c in &t.compare {
            self.read(&c.key, &c.range_end)?;
        }
        for op in t.success.iter().chain(&t.failure) {
            match &op.request {
                Some(Op::RequestRange(r)) => self.range(r)?,
                Some(Op::RequestPut(p)) => self.put(p)?,
                Some(Op::RequestDeleteRange(d)) => self.delete_range(d)?,
                Some(Op::RequestTxn(t)) => self.txn(t)?,
                None => {}
            }
        }
        Ok(())
    }

    /// The keys on `lease` (etcd's `checkLeasePuts`), for LeaseRevoke and
    /// for a put attaching to it.
    pub fn lease(&self, lease: i64) -> Result<(), AuthError> {
        if !self.active() || lease == 0 {
            return Ok(());
        }
        for key in self.lessor.keys(lease) {
            self.write(key, &[])?;
        }
        Ok(())
    }
}
