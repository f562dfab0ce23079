//! The space quota's write gate, `Maintenance.Alarm` and
//! `Maintenance.Defragment` on the core (see [`crate::alarm`]).

use muster_proto as pb;
use tonic::Status;

use super::Core;
use crate::alarm::{self, no_space};
use crate::auth::Caller;
use crate::storage::AlarmRecord;

impl Core {
    /// The quota gate of a write costing `cost` (0: it cannot grow the
    /// store): refused while a NOSPACE alarm is active, or when it would
    /// take the store to the quota, which raises the alarm (etcd's
    /// `quotaKVServer.check` and `applierV3Capped`).
    pub(crate) async fn check_quota(&self, cost: u64) -> Result<(), Status> {
        if cost == 0 {
            return Ok(());
        }
        if self.alarms.nospace() {
            return Err(no_space());
        }
        let size = self.quota.size();
        if self.quota.fits(size, cost) {
            return Ok(());
        }
        tracing::warn!(
            size,
            quota = self.quota.limit(),
            "database space exceeded: raising the NOSPACE alarm"
        );
        let record = AlarmRecord {
            member: self.header.member_id,
            alarm: pb::AlarmType::Nospace as i32,
        };
        if let Err(e) = self.set_alarm(record, true).await {
            tracing::error!(error = %e, "cannot store the NOSPACE alarm");
        }
        Err(no_space())
    }

    /// Refuses a write while a CORRUPT alarm is active (etcd's
    /// `applierV3Corrupt`: every write, reads and read-only transactions
    /// aside).
    pub(crate) fn check_corrupt(&self) -> Result<(), Status> {
        if self.alarms.corrupt() {
            return Err(Status::data_loss(alarm::CORRUPT));
        }
        Ok(())
    }

    /// The bytes of the history the store keeps: what the quota is
    /// checked against, and Status's `db_size_in_use`.
    pub fn data_bytes(&self) -> u64 {
        self.quota.size()
    }

    /// The space quota in bytes.
    pub fn quota_bytes(&self) -> u64 {
        self.quota.limit()
    }

    /// The active alarms (all types).
    pub fn alarms(&self) -> Vec<pb::AlarmMember> {
        self.alarms.list(pb::AlarmType::None as i32)
    }

    /// Raises (`active`) or clears an alarm, durably: whether it changed.
    async fn set_alarm(&self, record: AlarmRecord, active: bool) -> Result<bool, Status> {
        let durable = {
            let mut set = self.alarms.lock();
            let changed = if active {
                set.insert(record)
            } else {
                set.remove(&record)
            };
            if !changed {
                return Ok(false);
            }
            self.alarms.update(&set);
            // Queued under the lock: storage sees the changes in order.
            self.storage.set_alarm(record, active)
        };
        durable
            .await
            .map_err(|e| Status::unavailable(format!("etcdserver: cannot store the alarm: {e}")))?;
        Ok(true)
    }

    /// `Maintenance.Alarm`, as etcd's `applierV3backend.Alarm`: GET lists
    /// the alarms of a type (all for NONE); ACTIVATE raises one of the
    /// type for the member given, any id (0 too), and answers it (NONE too:
    /// etcd stores it, and it caps nothing); DEACTIVATE clears the member's
    /// alarm of that type and answers it, or nothing if it was not active.
    pub async fn alarm(&self, req: &pb::AlarmRequest) -> Result<pb::AlarmResponse, Status> {
        use pb::alarm_request::AlarmAction;
        self.check_alive()?;
        let record = AlarmRecord {
            member: req.member_id,
            alarm: req.alarm,
        };
        let alarms = match AlarmAction::try_from(req.action) {
            Ok(AlarmAction::Get) => self.alarms.list(req.alarm),
            // Even of type NONE: etcd stores it (it caps nothing).
            Ok(AlarmAction::Activate) => {
                self.set_alarm(record, true).await?;
                vec![alarm::member(record)]
            }
            Ok(AlarmAction::Deactivate) => {
                if self.set_alarm(record, false).await? {
                    vec![alarm::member(record)]
                } else {
                    Vec::new()
                }
            }
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown alarm action {}",
                    req.action
                )));
            }
        };
        // etcd 3.4 sends no header with either answer.
        Ok(pb::AlarmResponse {
            header: None,
            alarms,
        })
    }

    /// `Maintenance.Defragment`: checkpoints, then compacts the database
    /// file, online (see [`crate::storage::Storage::defragment`]). In
    /// memory there is nothing to do. With access control on, only the
    /// root role may (etcd's `authMaintenanceServer`).
    pub async fn defragment(&self, caller: &Caller) -> Result<pb::DefragmentResponse, Status> {
        self.check_alive()?;
        if let Err(e) = self.read().auth.check_admin(caller) {
            // etcd's `authMaintenanceServer` passes the auth package's own
            // error through, untranslated: code Unknown, "auth: ...".
            let msg = e.to_string();
            let msg = msg.strip_prefix("etcdserver: ").unwrap_or(&msg);
            return Err(Status::unknown(format!("auth: {msg}")));
        }
        let done = self
            .storage
            .defragment()
            .await
            .map_err(|e| Status::internal(format!("etcdserver: defragment failed: {e}")))?;
        // The next quota check sees the new size.
        let size = self.quota.size();
        tracing::debug!(
            before = done.before,
            after = done.after,
            size,
            "defragmented"
        );
        Ok(pb::DefragmentResponse { header: None })
    }
}
