//! The apply layer: one ordered write path over the MVCC store and the
//! lessor, with durability before visibility.
//!
//! A write takes the state's write lock, applies itself to the in-memory
//! store, and queues its changes with storage *under the same lock*, so
//! storage sees writes in revision order. It is acknowledged once storage
//! reports it durable; concurrent writes share one commit (group commit).
//! Readers read at the committed revision, so nothing they see can be lost
//! in a crash. A single publisher task hands committed revisions to the
//! watch hub in order.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use muster_proto as pb;
use tokio::sync::Notify;
use tonic::Status;

use crate::auth::guard::Guard;
use crate::auth::{AuthConfig, AuthError, AuthStore, Caller, Throttle, Tokens};
use crate::faults::{FaultSpec, Faults};
use crate::lease::{LeaseError, Lessor, TimeToLive};
use crate::mvcc::{MvccError, Store};
use crate::storage::{Change, LeaseRecord, Recovered, Storage};
use crate::watch::{HeaderInfo, History, WatchHub};

/// Automatic compaction, as etcd's `--auto-compaction-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCompaction {
    /// Keep the last N revisions (`--auto-compaction-mode=revision`),
    /// checked every `interval`.
    Revisions {
        /// How many revisions of history to keep.
        keep: i64,
        /// How often to compact.
        interval: Duration,
    },
    /// Keep a time window of history (`--auto-compaction-mode=periodic`):
    /// every window/10 it compacts to the revision current one window ago.
    Periodic {
        /// The window.
        window: Duration,
    },
}

/// Limits and policies of the apply layer.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// The largest request accepted, in bytes (etcd: 1.5 MiB).
    pub max_request_bytes: usize,
    /// The most operations per transaction branch (etcd: 128).
    pub max_txn_ops: usize,
    /// TTLs below this many seconds are raised to it.
    pub min_lease_ttl: i64,
    /// Automatic compaction, if any.
    pub auto_compaction: Option<AutoCompaction>,
    /// Faults to inject (`muster serve --faults`); none by default.
    pub faults: Option<FaultSpec>,
    /// The space quota in bytes (`--quota-backend-bytes`; 0: etcd's
    /// default, 2 GiB).
    pub quota_backend_bytes: u64,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            max_request_bytes: 1536 * 1024,
            max_txn_ops: 128,
            min_lease_ttl: 2,
            auto_compaction: None,
            faults: None,
            quota_backend_bytes: crate::alarm::DEFAULT_QUOTA_BYTES,
        }
    }
}

/// Request counters, exported with etcd's gRPC metric names.
#[derive(Debug, Default)]
pub struct Counters {
    /// Watch streams opened.
    pub watch_streams: std::sync::atomic::AtomicU64,
    /// Keep-alive streams opened.
    pub keepalive_streams: std::sync::atomic::AtomicU64,
    /// Keep-alive requests received.
    pub keepalive_messages: std::sync::atomic::AtomicU64,
}

pub(crate) struct State {
    pub(crate) store: Store,
    pub(crate) lessor: Lessor,
    pub(crate) auth: AuthStore,
}

impl State {
    /// The checks of `caller`'s requests against this state.
    fn guard<'a>(&'a self, caller: &'a Caller) -> Guard<'a> {
        Guard {
            auth: &self.auth,
            lessor: &self.lessor,
            caller,
        }
    }
}

/// The server's state and write path.
pub struct Core {
    state: RwLock<State>,
    committed: AtomicI64,
    storage: Storage,
    hub: Arc<WatchHub>,
    pending: Mutex<VecDeque<(i64, Vec<pb::Event>)>>,
    publish: Notify,
    failed: AtomicBool,
    header: HeaderInfo,
    config: CoreConfig,
    started: Instant,
    tokens: Tokens,
    /// Mirrors the auth store's enabled flag (set under the state lock by
    /// every auth change), for request paths that only need to know
    /// whether to look at identity at all.
    auth_enabled: AtomicBool,
    internal_token: String,
    auth_config: AuthConfig,
    throttle: Throttle,
    /// Request counters.
    pub counters: Counters,
    faults: Option<Arc<Faults>>,
    /// The space quota and the active alarms.
    quota: crate::alarm::Quota,
    alarms: crate::alarm::Alarms,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("committed", &self.committed())
            .finish_non_exhaustive()
    }
}

pub(crate) fn mvcc_status(e: MvccError) -> Status {
    use crate::mvcc::ErrorKind;
    let msg = e.to_string();
    match e.kind() {
        ErrorKind::OutOfRange => Status::out_of_range(msg),
        ErrorKind::NotFound => Status::not_found(msg),
        ErrorKind::InvalidArgument => Status::invalid_argument(msg),
    }
}

pub(crate) fn lease_status(e: LeaseError) -> Status {
    let msg = e.to_string();
    match e {
        LeaseError::NotFound => Status::not_found(msg),
        LeaseError::Exists => Status::failed_precondition(msg),
        LeaseError::TtlTooLarge => Status::out_of_range(msg),
    }
}

/// What one write produced.
struct Applied<R> {
    result: R,
    revision: i64,
    events: Vec<pb::Event>,
    extra: Vec<Change>,
}

impl<R> Applied<R> {
    /// A write that changes no key, only what `change` records, at the
    /// store's `revision`.
    fn without_events(result: R, revision: i64, change: Change) -> Applied<R> {
        Applied {
            result,
            revision,
            events: Vec::new(),
            extra: vec![change],
        }
    }
}

impl Core {
    /// Builds the state from what storage recovered.
    pub fn new(
        storage: Storage,
        recovered: Recovered,
        header: HeaderInfo,
        config: CoreConfig,
        auth_config: AuthConfig,
    ) -> Arc<Core> {
        let Recovered {
            events,
            compact_revision,
            leases,
            revision,
            auth,
        } = recovered;
        let auth = AuthStore::restore(auth);
        let auth_on = auth.is_enabled();
        let mut store =
            Store::restore(events, compact_revision).with_max_txn_ops(config.max_txn_ops);
        store.bump_revision(revision);
        let mut lessor = Lessor::new(config.min_lease_ttl);
        let now = Instant::now();
        for LeaseRecord { id, ttl } in leases {
            // As etcd does: every lease gets its full TTL again.
            let _ = lessor.grant(id, ttl, now);
        }
        for (key, lease) in store.keys_with_lease() {
            lessor.reattach(key, 0, lease);
        }
        let committed = store.revision();
        let committed_bytes = store.bytes();
        let hub = WatchHub::new(header, committed);
        let alarms = crate::alarm::Alarms::new(storage.stored_alarms());
        let core = Arc::new(Core {
            state: RwLock::new(State {
                store,
                lessor,
                auth,
            }),
            committed: AtomicI64::new(committed),
            storage,
            hub,
            pending: Mutex::new(VecDeque::new()),
            publish: Notify::new(),
            failed: AtomicBool::new(false),
            header,
            started: Instant::now(),
            tokens: Tokens::new(auth_config.token_ttl),
            auth_enabled: AtomicBool::new(auth_on),
            internal_token: crate::auth::tokens::internal_token(),
            auth_config,
            throttle: Throttle::default(),
            counters: Counters::default(),
            faults: config.faults.clone().map(Faults::new),
            quota: crate::alarm::Quota::new(config.quota_backend_bytes, committed_bytes),
            alarms,
            config,
        });
        let history: Arc<dyn History> = core.clone();
        core.hub.set_history(Arc::downgrade(&history));
        core
    }

    /// Starts the background tasks (publisher, lease expiry). They hold the
    /// core: abort them to let it go.
    pub fn spawn_tasks(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = vec![
            tokio::spawn(publisher(self.clone())),
            tokio::spawn(expirer(self.clone())),
        ];
        if let Some(policy) = self.config.auto_compaction {
            tasks.push(tokio::spawn(compactor(self.clone(), policy)));
        }
        if let Some(faults) = &self.faults {
            tasks.push(tokio::spawn(faults.clone().run(self.clone())));
        }
        tasks
    }

    /// The faults being injected, if any.
    pub fn faults(&self) -> Option<&Arc<Faults>> {
        self.faults.as_ref()
    }

    /// The watch hub.
    pub fn hub(&self) -> &Arc<WatchHub> {
        &self.hub
    }

    /// The header stamp.
    pub fn header(&self, revision: i64) -> Option<pb::ResponseHeader> {
        self.header.at(revision)
    }

    /// Cluster and member ids.
    pub fn header_info(&self) -> HeaderInfo {
        self.header
    }

    /// The limits.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// The durable, visible revision.
    pub fn committed(&self) -> i64 {
        self.committed.load(Ordering::Acquire)
    }

    /// Storage statistics.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// How long the server has run.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_alive(&self) -> Result<(), Status> {
        if self.failed.load(Ordering::Acquire) {
            return Err(Status::unavailable(
                "etcdserver: storage failed; restart the server",
            ));
        }
        Ok(())
    }

    /// Runs `f` on the state as one write, makes it durable, publishes it.
    async fn write<R>(
        &self,
        f: impl FnOnce(&mut State) -> Result<Applied<R>, Status>,
    ) -> Result<(R, i64), Status> {
        self.check_alive()?;
        let (result, revision, durable) = {
            let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
            let applied = f(&mut state)?;
            // An event's prev_kv is the value from before the write, so a
            // key touched twice takes its lease from its earlier event.
            // (A single event, as of every put, needs no map.)
            let mut leases = std::collections::HashMap::new();
            let single = applied.events.len() == 1;
            for e in &applied.events {
                let key =
                    e.kv.as_ref()
                        .map(|kv| kv.key.as_slice())
                        .unwrap_or_default();
                let prev = leases
                    .get(key)
                    .copied()
                    .unwrap_or_else(|| e.prev_kv.as_ref().map_or(0, |kv| kv.lease));
                let new = if e.r#type == pb::EventType::Put as i32 {
                    e.kv.as_ref().map_or(0, |kv| kv.lease)
                } else {
                    0
                };
                if !single {
                    leases.insert(key, new);
                }
                state.lessor.reattach(key, prev, new);
            }
            let mut changes: Vec<Change> =
                Vec::with_capacity(applied.events.len() + 1 + applied.extra.len());
            changes.extend(applied.events.iter().enumerate().map(|(sub, event)| {
                Change::Event {
                    rev: applied.revision,
                    sub: sub as i64,
                    // Restore rebuilds prev_kv from the key's history:
                    // storing it would double the bytes of every overwrite.
                    event: pb::Event {
                        r#type: event.r#type,
                        kv: event.kv.clone(),
                        prev_kv: None,
                    },
                }
            }));
            if !applied.events.is_empty() {
                changes.push(Change::Revision(applied.revision));
            }
            changes.extend(applied.extra);
            // The quota's size, exact after every write (compactions too).
            self.quota.set_size(state.store.bytes());
            // Queued under the lock: storage sees writes in revision order.
            let durable = self.storage.commit(changes);
            if !applied.events.is_empty() {
                self.pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push_back((applied.revision, applied.events));
            }
            (applied.result, applied.revision, durable)
        };
        if let Err(e) = durable.await {
            tracing::error!(error = %e, "storage commit failed; refusing further requests");
            self.failed.store(true, Ordering::Release);
            return Err(Status::unavailable(format!(
                "etcdserver: storage failed: {e}"
            )));
        }
        self.committed.fetch_max(revision, Ordering::AcqRel);
        self.publish.notify_one();
        Ok((result, revision))
    }

    fn kv_write<R>(
        state: &mut State,
        f: impl FnOnce(&mut crate::mvcc::WriteTxn<'_>, &Lessor) -> Result<R, MvccError>,
    ) -> Result<Applied<R>, Status> {
        let State { store, lessor, .. } = state;
        let mut txn = store.write();
        let result = f(&mut txn, lessor).map_err(mvcc_status)?;
        let (revision, events) = txn.end();
        Ok(Applied {
            result,
            revision,
            events,
            extra: Vec::new(),
        })
    }

    /// A KV write (`Put`, `DeleteRange`, `Txn`) given the lessor's leases
    /// as those that exist, once `check` passed on the state it applies to:
    /// its result and revision. With access control on, `check` runs the
    /// request checks first (etcd refuses a malformed request before an
    /// unpermitted one); with it off they run once, in the write itself.
    async fn kv<R>(
        &self,
        check: impl FnOnce(&State) -> Result<(), Status>,
        f: impl FnOnce(&mut crate::mvcc::WriteTxn<'_>, &dyn Fn(i64) -> bool) -> Result<R, MvccError>,
    ) -> Result<(R, i64), Status> {
        self.write(|st| {
            check(st)?;
            Self::kv_write(st, |txn, lessor| f(txn, &|id| lessor.contains(id)))
        })
        .await
    }

    /// `KV.Range`.
    pub fn range(
        &self,
        req: &pb::RangeRequest,
        caller: &Caller,
    ) -> Result<pb::RangeResponse, Status> {
        self.check_alive()?;
        if req.key.is_empty() {
            return Err(mvcc_status(MvccError::EmptyKey));
        }
        let committed = self.committed();
        let st = self.read();
        st.guard(caller).range(req)?;
        let mut resp = st.store.range(req, committed).map_err(mvcc_status)?;
        drop(st);
        resp.header = self.header(committed);
        Ok(resp)
    }

    /// `KV.Put`.
    pub async fn put(
        &self,
        req: pb::PutRequest,
        caller: &Caller,
    ) -> Result<pb::PutResponse, Status> {
        self.check_corrupt()?;
        self.check_quota(crate::alarm::put_cost(&req)).await?;
        // One closure, so that the request is checked by reference and
        // then moved into the store (its value is not copied).
        let (mut resp, rev) = self
            .write(|st| {
                let guard = st.guard(caller);
                if guard.active() {
                    crate::mvcc::check_put_request(&req).map_err(mvcc_status)?;
                    guard.put(&req)?;
                }
                Self::kv_write(st, |txn, lessor| {
                    txn.put_owned(req, &|id| lessor.contains(id))
                })
            })
            .await?;
        resp.header = self.header(rev);
        Ok(resp)
    }

    /// `KV.DeleteRange`.
    pub async fn delete_range(
        &self,
        req: pb::DeleteRangeRequest,
        caller: &Caller,
    ) -> Result<pb::DeleteRangeResponse, Status> {
        self.check_corrupt()?;
        let check = |st: &State| {
            let guard = st.guard(caller);
            if guard.active() {
                if req.key.is_empty() {
                    return Err(mvcc_status(MvccError::EmptyKey));
                }
                guard.delete_range(&req)?;
            }
            Ok(())
        };
        let (mut resp, rev) = self.kv(check, |txn, _| txn.delete_range(&req)).await?;
        resp.header = self.header(rev);
        Ok(resp)
    }

    /// `KV.Txn`.
    pub async fn txn(
        &self,
        req: pb::TxnRequest,
        caller: &Caller,
    ) -> Result<pb::TxnResponse, Status> {
        if !crate::mvcc::is_read_only(&req) {
            self.check_corrupt()?;
        }
        self.check_quota(crate::alarm::txn_cost(&req)).await?;
        let max_ops = self.config.max_txn_ops;
        let check = |st: &State| {
            let guard = st.guard(caller);
            if guard.active() {
                crate::mvcc::check_txn(&req, max_ops).map_err(mvcc_status)?;
                guard.txn(&req)?;
            }
            Ok(())
        };
        let (mut resp, rev) = self.kv(check, |txn, leases| txn.txn(&req, leases)).await?;
        let header = self.header(rev);
        fill_txn_headers(&mut resp, &header);
        Ok(resp)
    }

    /// `KV.Compact`.
    pub async fn compact(&self, revision: i64) -> Result<pb::CompactionResponse, Status> {
        self.check_corrupt()?;
        let (_, rev) = self
            .write(|st| {
                let compacted = st.store.compact(revision).map_err(mvcc_status)?;
                let change = Change::Compact {
                    revision,
                    removed: compacted.removed,
                };
                Ok(Applied::without_events((), st.store.revision(), change))
            })
            .await?;
        Ok(pb::CompactionResponse {
            header: self.header(rev),
        })
    }

    /// `Lease.LeaseGrant`.
    pub async fn lease_grant(&self, id: i64, ttl: i64) -> Result<pb::LeaseGrantResponse, Status> {
        self.check_corrupt()?;
        self.check_quota(crate::alarm::LEASE_COST).await?;
        let ((id, ttl), rev) = self
            .write(|st| {
                let ttl = st.lessor.effective_ttl(ttl).map_err(lease_status)?;
                let id = if id == 0 { st.lessor.new_id() } else { id };
                let now = Instant::now();
                st.lessor.grant(id, ttl, now).map_err(lease_status)?;
                self.maybe_doom(&mut st.lessor, id, ttl, now);
                let change = Change::LeaseGrant(LeaseRecord { id, ttl });
                let revision = st.store.revision();
                Ok(Applied::without_events((id, ttl), revision, change))
            })
            .await?;
        Ok(pb::LeaseGrantResponse {
            header: self.header(rev),
            id,
            ttl,
            error: String::new(),
        })
    }

    /// `Lease.LeaseRevoke`, and expiry ([`Caller::System`]): deletes the
    /// lease's keys in one revision. A user needs WRITE on every key.
    pub async fn lease_revoke(
        &self,
        id: i64,
        caller: &Caller,
    ) -> Result<pb::LeaseRevokeResponse, Status> {
        // Expiry goes on (etcd's would retry until disarmed).
        if *caller != Caller::System {
            self.check_corrupt()?;
        }
        let (_, rev) = self
            .write(|st| {
                if !st.lessor.contains(id) {
                    return Err(lease_status(LeaseError::NotFound));
                }
                st.guard(caller).lease(id)?;
                let keys = st.lessor.revoke(id).map_err(lease_status)?;
                let mut applied = Self::kv_write(st, |txn, _| {
                    for key in keys {
                        txn.delete_range(&pb::DeleteRangeRequest {
                            key,
                            ..Default::default()
                        })?;
                    }
                    Ok(())
                })?;
                applied.extra.push(Change::LeaseRevoke(id));
                Ok(applied)
            })
            .await?;
        Ok(pb::LeaseRevokeResponse {
            header: self.header(rev),
        })
    }

    /// One keep-alive: the lease's TTL, or 0 when it does not exist.
    pub fn lease_renew(&self, id: i64) -> pb::LeaseKeepAliveResponse {
        let ttl = {
            let mut st = self.state.write().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let ttl = st.lessor.renew(id, now).unwrap_or(0);
            if ttl > 0 {
                self.maybe_doom(&mut st.lessor, id, ttl, now);
            }
            ttl
        };
        pb::LeaseKeepAliveResponse {
            header: self.header(self.committed()),
            id,
            ttl,
        }
    }

    /// `Lease.LeaseKeepAlive`, one message: [`Core::lease_renew`], except
    /// that a lease whose time is up but which the expirer has not revoked
    /// yet is revoked first, as etcd answers such a keep-alive only once the
    /// lease is gone. Otherwise a put could still attach a key to a lease
    /// that a keep-alive already reported dead.
    pub async fn lease_keep_alive(&self, id: i64) -> pb::LeaseKeepAliveResponse {
        let resp = self.lease_renew(id);
        if resp.ttl > 0 || !self.read().lessor.contains(id) {
            return resp;
        }
        // Gone either way: revoked here, or by the expirer meanwhile.
        if let Err(e) = self.lease_revoke(id, &Caller::System).await {
            tracing::debug!(lease = format_args!("{id:x}"), error = %e, "lease expiry on keep-alive");
        }
        pb::LeaseKeepAliveResponse {
            header: self.header(self.committed()),
            id,
            ttl: 0,
        }
    }

    /// The `lease-expire-early` fault, on a grant or renewal at `now`.
    fn maybe_doom(&self, lessor: &mut Lessor, id: i64, ttl: i64, now: Instant) {
        if let Some(faults) = &self.faults
            && let Some(after) = faults.lease_expiry(id, Duration::from_secs(ttl.max(0) as u64))
        {
            lessor.expire_early(id, now + after);
        }
    }

    /// `Lease.LeaseTimeToLive`.
    pub fn lease_time_to_live(&self, id: i64, keys: bool) -> pb::LeaseTimeToLiveResponse {
        let ttl: Option<TimeToLive> = self.read().lessor.time_to_live(id, Instant::now());
        let header = self.header(self.committed());
        match ttl {
            Some(t) => pb::LeaseTimeToLiveResponse {
                header,
                id,
                ttl: t.remaining,
                granted_ttl: t.granted,
                keys: if keys { t.keys } else { Vec::new() },
            },
            None => pb::LeaseTimeToLiveResponse {
                header,
                id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            },
        }
    }

    /// `Lease.LeaseLeases`.
    pub fn lease_leases(&self) -> pb::LeaseLeasesResponse {
        let ids = self.read().lessor.ids();
        pb::LeaseLeasesResponse {
            header: self.header(self.committed()),
            leases: ids.into_iter().map(|id| pb::LeaseStatus { id }).collect(),
        }
    }

    /// A token that makes requests the server's own (never checked): for
    /// in-process clients of the server, such as `muster serve`'s
    /// dashboard, which must see every service whatever the roles. Random
    /// per start, never logged or sent anywhere but loopback calls to this
    /// process.
    pub fn internal_token(&self) -> &str {
        &self.internal_token
    }

    /// Whether `token` is [`Core::internal_token`] (compared in constant
    /// time).
    pub fn is_internal_token(&self, token: &str) -> bool {
        let a = token.as_bytes();
        let b = self.internal_token.as_bytes();
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// Whether authentication is on (without taking the state lock).
    pub fn auth_enabled(&self) -> bool {
        self.auth_enabled.load(Ordering::Acquire)
    }

    /// The simple tokens.
    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// Login throttling and its counters.
    pub fn throttle(&self) -> &Throttle {
        &self.throttle
    }

    /// Token lifetime and bcrypt cost.
    pub fn auth_config(&self) -> &AuthConfig {
        &self.auth_config
    }

    /// Whether authentication is on, the auth revision, and the numbers
    /// of users and roles.
    pub fn auth_summary(&self) -> (bool, u64, usize, usize) {
        let st = self.read();
        let (users, roles) = st.auth.counts();
        (st.auth.is_enabled(), st.auth.revision(), users, roles)
    }

    /// Checks `caller` may `access` the key or range (watch creates).
    pub fn check_access(
        &self,
        caller: &Caller,
        access: crate::auth::Access,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), AuthError> {
        if !self.auth_enabled() || *caller == Caller::System {
            return Ok(());
        }
        self.read().auth.check(caller, access, key, range_end)
    }

    /// Live keys, leases and the compact revision, for status and metrics.
    pub fn counts(&self) -> (usize, usize, i64) {
        let st = self.read();
        (st.store.len(), st.lessor.len(), st.store.compact_revision())
    }
}

impl History for Core {
    fn events(
        &self,
        from: i64,
        to: i64,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<Vec<pb::Event>, i64> {
        let st = self.read();
        st.store
            .events(from, to, key, range_end)
            .map_err(|_| st.store.compact_revision())
    }
}

mod auth;
mod maintenance;
mod quota;

/// Stamps `header` on a txn response. The responses nested in it keep
/// what the store gave them: etcd's nested headers carry only a revision.
fn fill_txn_headers(resp: &mut pb::TxnResponse, header: &Option<pb::ResponseHeader>) {
    resp.header = *header;
}

/// Hands committed revisions to the watch hub, in order.
async fn publisher(core: Arc<Core>) {
    loop {
        let notified = core.publish.notified();
        let committed = core.committed();
        loop {
            let next = {
                let mut pending = core.pending.lock().unwrap_or_else(PoisonError::into_inner);
                match pending.front() {
                    Some((rev, _)) if *rev <= committed => pending.pop_front(),
                    _ => None,
                }
            };
            let Some((rev, events)) = next else { break };
            core.hub.dispatch(rev, &events);
        }
        notified.await;
    }
}

/// Compacts history by policy, as etcd's auto-compactors do.
async fn compactor(core: Arc<Core>, policy: AutoCompaction) {
    // Periodic: (when, revision) samples, to find the revision one window ago.
    let mut samples: VecDeque<(Instant, i64)> = VecDeque::new();
    let interval = match policy {
        AutoCompaction::Revisions { interval, .. } => interval,
        AutoCompaction::Periodic { window } => (window / 10).max(Duration::from_millis(10)),
    };
    loop {
        let now = Instant::now();
        let current = core.committed();
        let target = match policy {
            AutoCompaction::Revisions { keep, .. } => current - keep,
            AutoCompaction::Periodic { window } => {
                samples.push_back((now, current));
                let mut target = 0;
                while let Some(&(at, rev)) = samples.front() {
                    if now.duration_since(at) < window {
                        break;
                    }
                    target = rev;
                    samples.pop_front();
                }
                target
            }
        };
        let (_, _, compacted) = core.counts();
        if target > compacted {
            match core.compact(target).await {
                Ok(_) => tracing::info!(revision = target, "auto-compacted history"),
                Err(e) => tracing::debug!(revision = target, error = %e, "auto-compaction skipped"),
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// Revokes leases whose time is up.
async fn expirer(core: Arc<Core>) {
    loop {
        let expired = core.read().lessor.expired(Instant::now());
        for id in expired {
            match core.lease_revoke(id, &Caller::System).await {
                Ok(_) => tracing::debug!(lease = format_args!("{id:x}"), "lease expired"),
                Err(e) => {
                    tracing::debug!(lease = format_args!("{id:x}"), error = %e, "lease expiry")
                }
            }
        }
        let next = core.read().lessor.next_expiry();
        let wait = next.map_or(Duration::from_millis(500), |at| {
            at.saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(10), Duration::from_millis(500))
        });
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A core with its publisher but no expirer, so that a lease whose time
    /// is up stays unrevoked until something else revokes it.
    fn core_without_expirer() -> (Arc<Core>, tokio::task::JoinHandle<()>) {
        let (storage, recovered) = Storage::in_memory();
        let header = HeaderInfo {
            cluster_id: 1,
            member_id: 1,
        };
        let config = CoreConfig {
            min_lease_ttl: 1,
            ..CoreConfig::default()
        };
        let core = Core::new(storage, recovered, header, config, AuthConfig::default());
        let publisher = tokio::spawn(publisher(core.clone()));
        (core, publisher)
    }

    #[tokio::test]
    async fn a_keep_alive_answered_ttl_0_means_puts_onto_the_lease_fail() {
        let (core, publisher) = core_without_expirer();
        let id = core.lease_grant(7, 1).await.unwrap().id;
        core.put(
            pb::PutRequest {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                lease: id,
                ..Default::default()
            },
            &Caller::System,
        )
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !core.read().lessor.expired(Instant::now()).contains(&id) {
            assert!(Instant::now() < deadline, "the lease's time never ran out");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(core.lease_keep_alive(id).await.ttl, 0);
        let put = core
            .put(
                pb::PutRequest {
                    key: b"late".to_vec(),
                    value: b"v".to_vec(),
                    lease: id,
                    ..Default::default()
                },
                &Caller::System,
            )
            .await;
        let status = put.expect_err("a put onto a lease reported dead");
        assert_eq!(status.message(), "etcdserver: requested lease not found");
        // Its key went with it, in the revoke.
        let range = core
            .range(
                &pb::RangeRequest {
                    key: b"k".to_vec(),
                    ..Default::default()
                },
                &Caller::System,
            )
            .unwrap();
        assert!(range.kvs.is_empty(), "{range:?}");
        assert_eq!(core.lease_time_to_live(id, false).ttl, -1);
        publisher.abort();
    }
}
