//! The Maintenance service's checks on the core: hashes of the store and
//! leadership (a single member is always its own leader). While auth is
//! on, these are admin calls, as etcd's (its `authMaintenanceServer`
//! wraps them in an admin check).

use muster_proto as pb;
use tonic::Status;

use super::{Core, mvcc_status};
use crate::auth::Caller;

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
        let mut ids = st.lessor.ids();
        ids.sort_unstable();
        for id in ids {
            h.update(&id.to_be_bytes());
            let ttl = st.lessor.granted_ttl(id).unwrap_or(0);
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
