//! The space quota and alarms, as etcd's (`--quota-backend-bytes`,
//! `Maintenance.Alarm`).
//!
//! The store's size is the bytes of the history it keeps
//! ([`crate::mvcc::Store::bytes`]: every record's key and value plus a
//! fixed allowance per record), what etcd reports as DB SIZE IN USE. etcd
//! 3.4 checks its bbolt file's high-water mark instead; redb grows its
//! file in doubling steps and leaves pages half full on appends (a
//! million 1 KB values take a 2.2 GB file), so the file size would refuse
//! writes at half the data etcd takes under the same quota. Deletes and
//! compaction free quota at once; defragmenting gives the file space back
//! to the file system. The write path keeps the count up to date, so the
//! check reads one atomic.
//!
//! As etcd 3.4: a write that could grow the store (a put, a transaction
//! with a put in a branch, a lease grant) is refused with
//! [`no_space`] when the size plus its cost reaches the quota, and the
//! refusal raises the NOSPACE alarm; while a NOSPACE alarm is active every
//! such write is refused (`applierV3Capped`), whatever the size. Reads,
//! watches, deletes, transactions without puts, compactions, lease revokes
//! and keep-alives go on. Disarming the alarm lets writes through again;
//! if the store is still over quota, the next write's check raises it
//! again.
//!
//! A CORRUPT alarm (only raised by `Maintenance.Alarm` here: muster has no
//! corruption check) refuses every write with [`CORRUPT`], as etcd's
//! `applierV3Corrupt`: puts, deletes, transactions that write, compactions,
//! lease grants and revokes; reads and read-only transactions go on.
//! Lease expiry goes on too (etcd's would be refused and retried).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use muster_proto as pb;
use tonic::Status;

use crate::storage::AlarmRecord;

/// etcd's default quota: 2 GiB (`--quota-backend-bytes 0` means it too).
pub const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;

/// etcd's `ErrGRPCNoSpace` message.
pub const NO_SPACE: &str = "etcdserver: mvcc: database space exceeded";

/// etcd's per-key overhead in its quota cost of a put.
const KV_OVERHEAD: u64 = 256;

/// etcd's `ErrGRPCCorrupt` message (code DataLoss): a write while a
/// CORRUPT alarm is active.
pub const CORRUPT: &str = "etcdserver: corrupt cluster";

/// etcd's quota cost of a lease grant.
pub const LEASE_COST: u64 = 64;

/// etcd's answer to a write refused for want of space.
pub fn no_space() -> Status {
    Status::resource_exhausted(NO_SPACE)
}

/// etcd's quota cost of a put.
pub fn put_cost(req: &pb::PutRequest) -> u64 {
    (req.key.len() + req.value.len()) as u64 + KV_OVERHEAD
}

/// etcd's quota cost of a transaction: the cost of the puts of its costlier
/// branch (nested transactions not counted, as etcd). 0: it cannot grow
/// the store.
pub fn txn_cost(req: &pb::TxnRequest) -> u64 {
    let branch = |ops: &[pb::RequestOp]| {
        ops.iter()
            .map(|op| match &op.request {
                Some(pb::request_op::Request::RequestPut(put)) => put_cost(put),
                _ => 0,
            })
            .sum::<u64>()
    };
    branch(&req.success).max(branch(&req.failure))
}

/// The space quota and the size it is checked against.
#[derive(Debug)]
pub struct Quota {
    limit: u64,
    /// The store's bytes ([`crate::mvcc::Store::bytes`]) after the last
    /// write, set by the write path.
    size: AtomicU64,
}

impl Quota {
    /// A quota of `limit` bytes (0: [`DEFAULT_QUOTA_BYTES`]) over a store
    /// of `size` bytes.
    pub fn new(limit: u64, size: u64) -> Quota {
        Quota {
            limit: if limit == 0 {
                DEFAULT_QUOTA_BYTES
            } else {
                limit
            },
            size: AtomicU64::new(size),
        }
    }

    /// The quota in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The store's size after the last write.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Records the store's size after a write.
    pub fn set_size(&self, bytes: u64) {
        self.size.store(bytes, Ordering::Relaxed);
    }

    /// Whether a write costing `cost` fits: etcd's `backendQuota.Available`.
    pub fn fits(&self, size: u64, cost: u64) -> bool {
        cost == 0 || size.saturating_add(cost) < self.limit
    }
}

/// The active alarms.
#[derive(Debug, Default)]
pub struct Alarms {
    active: Mutex<BTreeSet<AlarmRecord>>,
    nospace: AtomicBool,
    corrupt: AtomicBool,
}

impl Alarms {
    /// The alarms read back from storage.
    pub fn new(stored: Vec<AlarmRecord>) -> Alarms {
        let alarms = Alarms::default();
        let mut set = alarms.lock();
        set.extend(stored);
        alarms.update(&set);
        drop(set);
        alarms
    }

    /// Locks the set; [`Alarms::update`] after changing it.
    pub fn lock(&self) -> MutexGuard<'_, BTreeSet<AlarmRecord>> {
        self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Refreshes the flags from `set`, the locked set.
    pub fn update(&self, set: &BTreeSet<AlarmRecord>) {
        let nospace = set.iter().any(|r| r.alarm == pb::AlarmType::Nospace as i32);
        self.nospace.store(nospace, Ordering::Release);
        let corrupt = set.iter().any(|r| r.alarm == pb::AlarmType::Corrupt as i32);
        self.corrupt.store(corrupt, Ordering::Release);
    }

    /// Whether a CORRUPT alarm is active (of any member).
    pub fn corrupt(&self) -> bool {
        self.corrupt.load(Ordering::Acquire)
    }

    /// Whether a NOSPACE alarm is active (of any member).
    pub fn nospace(&self) -> bool {
        self.nospace.load(Ordering::Acquire)
    }

    /// The active alarms of type `alarm` (every alarm for NONE), as etcd's
    /// `AlarmStore.Get`.
    pub fn list(&self, alarm: i32) -> Vec<pb::AlarmMember> {
        self.lock()
            .iter()
            .filter(|r| alarm == pb::AlarmType::None as i32 || r.alarm == alarm)
            .map(|r| member(*r))
            .collect()
    }
}

/// An alarm as the API gives it.
pub fn member(record: AlarmRecord) -> pb::AlarmMember {
    pb::AlarmMember {
        member_id: record.member,
        alarm: record.alarm,
    }
}

/// An alarm as etcd's `Status.errors` lists it: gogo-proto's compact text
/// form, `memberID:<decimal> alarm:NOSPACE ` (with the trailing space).
pub fn status_error(alarm: &pb::AlarmMember) -> String {
    let name = pb::AlarmType::try_from(alarm.alarm)
        .map(|t| t.as_str_name().to_string())
        .unwrap_or_else(|_| alarm.alarm.to_string());
    format!("memberID:{} alarm:{name} ", alarm.member_id)
}
