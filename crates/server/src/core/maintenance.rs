//! The Maintenance service's reads of the core: a consistent copy for
//! snapshots, hashes of the store and leadership (a single member is always its own leader). While auth is
//! on, these are admin calls, as etcd's (its `authMaintenanceServer`
//! wraps them in an admin check).

use muster_proto as pb;
use tonic::Status;

use std::time::{Duration, Instant};

use super::{Core, mvcc_status};
use crate::auth::Caller;
use crate::storage::{LeaseRecord, Recovered};

impl Core {
    /// `Maintenance.HashKV`: see [`crate::mvcc::Store::hash_kv`]. Revision
    /// 0 hashes up to the committed revision (never a write still on its
    /// way to disk); the header carries the committed revision, as etcd's
    /// carries its current one.
    pub fn hash_kv(&self, revision: i64, caller: &Caller) -> Result<pb::HashKvResponse, Status> {
        self.check_alive()?;
        let st = self.read();
        st.auth.check_admin(caller)?;
        let committed = self.committed();
        let (hash, compact_revision) =
            st.store.hash_kv(revision, committed).map_err(mvcc_status)?;
        Ok(pb::HashKvResponse {
            header: self.header(committed),
            hash,
            compact_revision,
        })
    }

    /// `Maintenance.Hash`: a CRC-32 of the whole state at the committed
    /// revision: the key-value history (as HashKV's) and the leases (ids
    /// and granted TTLs, in id order). etcd hashes its whole bbolt file and
    /// documents the call as for testing only; this one is as stable as
    /// HashKV's across restarts.
    pub fn hash_all(&self, caller: &Caller) -> Result<pb::HashResponse, Status> {
        self.check_alive()?;
        let st = self.read();
        st.auth.check_admin(caller)?;
        let committed = self.committed();
        let (kv, _) = st.store.hash_kv(0, committed).map_err(mvcc_status)?;
        let mut h = crc32fast::Hasher::new();
        h.update(&kv.to_be_bytes());
        for (id, ttl) in st.lessor.granted() {
            h.update(&id.to_be_bytes());
            h.update(&ttl.to_be_bytes());
        }
        Ok(pb::HashResponse {
            header: self.header(committed),
            hash: h.finalize(),
        })
    }

    /// `Maintenance.MoveLeader`, as a single-member etcd answers it:
    /// moving leadership to itself succeeds at once (etcd waits until the
    /// transferee leads, which it already does); any other target is not a
    /// member, etcd's FailedPrecondition "etcdserver: bad leader
    /// transferee".
    pub fn move_leader(
        &self,
        target: u64,
        caller: &Caller,
    ) -> Result<pb::MoveLeaderResponse, Status> {
        self.read().auth.check_admin(caller)?;
        if target != self.header_info().member_id {
            return Err(Status::failed_precondition(
                "etcdserver: bad leader transferee",
            ));
        }
        Ok(pb::MoveLeaderResponse {
            header: self.header(self.committed()),
        })
    }
}

/// Event records copied per hold of the read lock by [`Core::snapshot_view`].
const SNAPSHOT_CHUNK_RECORDS: usize = 4096;

impl Core {
    /// A consistent copy of the state for `Maintenance.Snapshot`, at the
    /// committed revision C read when it starts: every event record up to C
    /// (under its `(revision, sub revision)`), the leases with their granted
    /// TTLs, and the auth store. Events of writes applied but not yet
    /// durable are left out. Needs the root role when auth is on, as etcd's
    /// snapshot does.
    ///
    /// Writers are not stopped for the whole copy: the records are copied
    /// [`SNAPSHOT_CHUNK_RECORDS`] at a time, each under the state's read
    /// lock. Records at or below C never change, as later writes only add
    /// records above it, except by a compaction; so the copy starts over
    /// if the compact revision moves meanwhile (the last attempt copies
    /// everything under one hold of the lock). Leases and the auth store
    /// are taken with the first chunk, as applied (a lease change in
    /// flight is included).
    pub fn snapshot_view(&self, caller: &Caller) -> Result<Recovered, Status> {
        use std::ops::Bound;
        const ATTEMPTS: usize = 3;
        self.check_alive()?;
        let mut attempt = 0;
        'attempt: loop {
            attempt += 1;
            let chunk = if attempt < ATTEMPTS {
                SNAPSHOT_CHUNK_RECORDS
            } else {
                usize::MAX
            };
            let st = self.read();
            if self.auth_enabled() && *caller != Caller::System {
                st.auth.check_admin(caller)?;
            }
            // Read under the lock: every write at or below it is applied.
            let committed = self.committed();
            let compact_revision = st.store.compact_revision().max(0);
            let leases: Vec<LeaseRecord> = st
                .lessor
                .granted()
                .into_iter()
                .map(|(id, ttl)| LeaseRecord { id, ttl })
                .collect();
            let auth = st.auth.export();
            // Sized once (an upper bound): growing it would copy it all
            // under the lock.
            let mut events = Vec::with_capacity(st.store.records.len());
            let mut last = None;
            let mut st = Some(st);
            let mut longest = Duration::ZERO;
            let mut chunks = 0;
            loop {
                let guard = match st.take() {
                    Some(guard) => guard,
                    None => self.read(),
                };
                let held = Instant::now();
                chunks += 1;
                if guard.store.compact_revision().max(0) != compact_revision {
                    continue 'attempt;
                }
                let lo = last.map_or(Bound::Unbounded, Bound::Excluded);
                let before = events.len();
                for (rev, rec) in guard
                    .store
                    .records
                    .range((lo, Bound::Unbounded))
                    .take_while(|(rev, _)| rev.main <= committed)
                    .take(chunk)
                {
                    let r#type = if rec.tombstone {
                        pb::EventType::Delete
                    } else {
                        pb::EventType::Put
                    };
                    events.push((
                        (rev.main, rev.sub),
                        pb::Event {
                            r#type: r#type as i32,
                            kv: Some(rec.kv.clone()),
                            prev_kv: None,
                        },
                    ));
                    last = Some(*rev);
                }
                drop(guard);
                longest = longest.max(held.elapsed());
                if events.len() - before < chunk {
                    break;
                }
            }
            tracing::debug!(
                attempt,
                chunks,
                longest_hold_ms = longest.as_secs_f64() * 1e3,
                "snapshot: copied"
            );
            return Ok(Recovered {
                events,
                compact_revision,
                leases,
                revision: committed.max(compact_revision),
                auth,
            });
        }
    }
}
