//! Durable storage for the embedded server, on [redb].
//!
//! The apply task owns the in-memory MVCC store. It applies client writes in
//! order and hands each batch of resulting records ([`Change`]s) to
//! [`Storage::commit`]; it acknowledges the clients and makes the writes
//! visible only once the returned [`CommitTicket`] resolves, that is once the
//! batch is on disk (fsync'd).
//!
//! # Group commit
//!
//! A dedicated thread owns the database. While it commits one group of
//! batches, newly submitted batches queue up; it then drains the queue (up to
//! [`MAX_GROUP_BATCHES`] batches or about [`MAX_GROUP_BYTES`] bytes) and writes
//! all of them in one redb write transaction with
//! [`Durability::Immediate`], so that a single fsync covers many batches.
//! Batches are written and acknowledged in the order they were submitted.
//!
//! # Failures
//!
//! If writing or committing a group fails, every batch of the group fails
//! with the error, and the storage stays failed: every later commit fails with
//! [`StorageError::Failed`]. A write that was not acknowledged is never
//! acknowledged later.
//!
//! # Layout
//!
//! One file, `muster.redb`, in the directory given to [`Storage::open`], with
//! three tables:
//!
//! - `events`: `(revision, sub revision)` to a prost-encoded
//!   [`muster_proto::Event`];
//! - `leases`: lease id to TTL in seconds;
//! - `meta`: `format_version`, `revision` (the highest revision, when no
//!   event of it is stored: otherwise the events say it),
//!   `compact_revision`, `auth_enabled` (0 or 1) and `auth_revision`;
//! - `auth_users` and `auth_roles`: name to a prost-encoded
//!   [`authpb::User`] (with its bcrypt hash, never the password) or
//!   [`authpb::Role`], as etcd's `authUsers` and `authRoles` buckets.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use muster_proto::Event;
use muster_proto::authpb;
use prost::Message;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

/// Name of the database file inside the storage directory.
pub const FILE_NAME: &str = "muster.redb";

/// Most batches written in one commit (one redb write transaction).
pub const MAX_GROUP_BATCHES: usize = 1024;

/// Approximate most bytes of events written in one commit; a group is closed
/// once it reaches this size (a single batch larger than this is committed
/// alone).
pub const MAX_GROUP_BYTES: usize = 4 << 20;

/// Version of the on-disk layout, kept in the `meta` table.
const FORMAT_VERSION: i64 = 1;

/// Page cache of the database. The server keeps its whole state in memory
/// and only appends to the events table, so the cache only needs to cover
/// the right edge of the B-tree that each commit touches. Measured with
/// `bench-compare.sh` (100k keys): 64 MiB cost 37 MiB of resident memory
/// over 4 MiB for no gain in put throughput.
const CACHE_BYTES: usize = 4 << 20;

const EVENTS: TableDefinition<'static, (i64, i64), &[u8]> = TableDefinition::new("events");
const LEASES: TableDefinition<'static, i64, i64> = TableDefinition::new("leases");
const META: TableDefinition<'static, &str, i64> = TableDefinition::new("meta");
const AUTH_USERS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("auth_users");
const AUTH_ROLES: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("auth_roles");

const META_FORMAT_VERSION: &str = "format_version";
const META_REVISION: &str = "revision";
const META_COMPACT_REVISION: &str = "compact_revision";
const META_AUTH_ENABLED: &str = "auth_enabled";
const META_AUTH_REVISION: &str = "auth_revision";

/// Errors of the storage layer. Cheap to clone: one failed commit fails every
/// batch of its group with the same error.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// An I/O error outside the database itself (creating the directory,
    /// starting the storage thread).
    #[error("storage I/O error: {0}")]
    Io(Arc<std::io::Error>),
    /// An error reported by redb (opening, reading, writing or committing).
    #[error("storage database error: {0}")]
    Database(Arc<redb::Error>),
    /// A stored event record could not be decoded.
    #[error("corrupt event record at revision {rev} (sub revision {sub}): {reason}")]
    CorruptEvent {
        /// Main revision of the record.
        rev: i64,
        /// Sub revision of the record.
        sub: i64,
        /// Why decoding failed.
        reason: String,
    },
    /// A stored user or role record could not be decoded.
    #[error("corrupt {table} record {name:?}: {reason}")]
    CorruptAuth {
        /// `auth_users` or `auth_roles`.
        table: &'static str,
        /// The user or role name.
        name: String,
        /// Why decoding failed.
        reason: String,
    },
    /// The database file was written with an unknown layout version.
    #[error("unsupported storage format version {found} (this build reads version {expected})")]
    UnsupportedFormat {
        /// The version found in the file.
        found: i64,
        /// The version this build writes and reads.
        expected: i64,
    },
    /// An earlier commit failed; the storage accepts no more writes.
    #[error("storage failed earlier and accepts no more writes: {0}")]
    Failed(Arc<StorageError>),
    /// The storage thread is gone (it panicked), so the batch's outcome is
    /// unknown; treat it as not durable.
    #[error("storage thread stopped")]
    Closed,
}

impl From<std::io::Error> for StorageError {
    fn from(error: std::io::Error) -> Self {
        StorageError::Io(Arc::new(error))
    }
}

/// Converts any redb error into a [`StorageError::Database`].
fn db_error(error: impl Into<redb::Error>) -> StorageError {
    StorageError::Database(Arc::new(error.into()))
}

/// A lease as persisted: its id and granted TTL in seconds. Leases are
/// restored with their full TTL, as etcd does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Lease id.
    pub id: i64,
    /// Granted TTL, in seconds.
    pub ttl: i64,
}

/// One record written by a batch.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// A put or a delete, stored under `(rev, sub)`.
    Event {
        /// Main revision of the event.
        rev: i64,
        /// Sub revision of the event within its transaction.
        sub: i64,
        /// The event itself (key, value, revisions, lease; `prev_kv` too if
        /// set).
        event: Event,
    },
    /// The new highest revision (also when it has no event, for example
    /// after a compaction or a transaction without writes). The stored
    /// revision never decreases; event revisions raise it too.
    Revision(i64),
    /// A lease was granted (or its TTL changed).
    LeaseGrant(LeaseRecord),
    /// A lease was revoked or expired.
    LeaseRevoke(i64),
    /// A compaction: sets the compact revision and deletes the listed
    /// `(rev, sub)` event records.
    Compact {
        /// The new compact revision.
        revision: i64,
        /// The `(rev, sub)` keys of the event records to delete.
        removed: Vec<(i64, i64)>,
    },
    /// A user was written (`Some`) or deleted (`None`).
    AuthUser {
        /// The user's name.
        name: String,
        /// The user, with its password's bcrypt hash.
        user: Option<authpb::User>,
    },
    /// A role was written (`Some`) or deleted (`None`).
    AuthRole {
        /// The role's name.
        name: String,
        /// The role and its permissions.
        role: Option<authpb::Role>,
    },
    /// The auth store's enabled flag and revision.
    AuthState {
        /// Whether authentication is on.
        enabled: bool,
        /// The auth revision.
        revision: u64,
    },
}

impl Change {
    /// Rough number of bytes this change adds to a commit, to bound groups.
    fn approx_bytes(&self) -> usize {
        match self {
            Change::Event { event, .. } => 16 + event.encoded_len(),
            Change::Compact { removed, .. } => 16 + 16 * removed.len(),
            Change::AuthUser { name, user } => {
                16 + name.len() + user.as_ref().map_or(0, Message::encoded_len)
            }
            Change::AuthRole { name, role } => {
                16 + name.len() + role.as_ref().map_or(0, Message::encoded_len)
            }
            Change::Revision(_)
            | Change::LeaseGrant(_)
            | Change::LeaseRevoke(_)
            | Change::AuthState { .. } => 16,
        }
    }
}

/// Everything read back when opening the storage.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recovered {
    /// Every stored event with its `(main, sub)` revision, in that order;
    /// the MVCC store is rebuilt by replaying them. The revisions are the
    /// records' own keys: after a compaction removed some of a revision's
    /// events, renumbering the rest would make later compactions delete
    /// the wrong records.
    pub events: Vec<((i64, i64), Event)>,
    /// The compact revision (0 if never compacted).
    pub compact_revision: i64,
    /// Leases alive at shutdown or crash, in id order.
    pub leases: Vec<LeaseRecord>,
    /// The highest revision stored: at least the revision of every stored
    /// event and the compact revision (0 for a new store).
    pub revision: i64,
    /// The auth store as stored.
    pub auth: RecoveredAuth,
}

/// The auth store as read back.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RecoveredAuth {
    /// Whether authentication was on.
    pub enabled: bool,
    /// The auth revision (0 for a new store).
    pub revision: u64,
    /// Every user, in name order.
    pub users: Vec<authpb::User>,
    /// Every role, in name order.
    pub roles: Vec<authpb::Role>,
}

/// Counters of the storage, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StorageStats {
    /// Successful commits (redb write transactions, one fsync each; a group
    /// of empty batches needs none).
    pub commits: u64,
    /// Batches made durable by those commits; `commits < batches` shows that
    /// group commit is working.
    pub batches: u64,
    /// Size of the database file in bytes (0 in memory).
    pub file_bytes: u64,
}

/// Durable storage: a handle to the storage thread. Cheap to clone (an
/// [`Arc`]); all clones share one database. The thread finishes the queued
/// batches and exits, closing the database, when the last clone is dropped;
/// that drop waits for it, so the directory can be reopened right after.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// `None` for the in-memory storage.
    path: Option<PathBuf>,
    /// `None` for the in-memory storage; taken on drop.
    sender: Option<mpsc::Sender<Request>>,
    /// `None` for the in-memory storage; taken on drop.
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    commits: AtomicU64,
    batches: AtomicU64,
    /// Set once, by the storage thread, when a commit fails.
    failed: OnceLock<StorageError>,
}

impl Shared {
    fn failed_error(&self) -> Option<StorageError> {
        self.failed
            .get()
            .map(|error| StorageError::Failed(Arc::new(error.clone())))
    }
}

struct Request {
    changes: Vec<Change>,
    done: oneshot::Sender<Result<(), StorageError>>,
}

impl Storage {
    /// Opens (creating it if missing) the storage in `dir`, file
    /// [`FILE_NAME`], and reads back everything stored. Works after a crash:
    /// redb recovers the last committed transaction (repairing the file if
    /// needed, which is logged).
    ///
    /// Fails if the file is locked by another process, is not a redb
    /// database, has an unknown layout version, or holds an event that does
    /// not decode ([`StorageError::CorruptEvent`]).
    pub fn open(dir: &Path) -> Result<(Storage, Recovered), StorageError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE_NAME);
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .set_repair_callback({
                let warned = std::cell::Cell::new(false);
                move |_session| {
                    if !warned.replace(true) {
                        warn!("storage: repairing the database after an unclean shutdown");
                    }
                }
            })
            .create(&path)
            .map_err(db_error)?;
        Self::start(db, Some(path))
    }

    /// Storage that keeps nothing: every commit resolves immediately, in
    /// order, and the returned [`Recovered`] is empty. For tests and
    /// throwaway servers.
    pub fn in_memory() -> (Storage, Recovered) {
        let inner = Inner {
            shared: Arc::default(),
            path: None,
            sender: None,
            thread: None,
        };
        (
            Storage {
                inner: Arc::new(inner),
            },
            Recovered::default(),
        )
    }

    /// Recovers the state of `db`, then starts the storage thread owning it.
    fn start(db: Database, path: Option<PathBuf>) -> Result<(Storage, Recovered), StorageError> {
        init(&db)?;
        let started = std::time::Instant::now();
        let recovered = recover(&db)?;
        info!(
            path = ?path,
            events = recovered.events.len(),
            leases = recovered.leases.len(),
            revision = recovered.revision,
            compact_revision = recovered.compact_revision,
            elapsed = ?started.elapsed(),
            "storage: recovered"
        );
        let shared = Arc::new(Shared::default());
        let (sender, receiver) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("muster-storage".into())
            .spawn({
                let shared = Arc::clone(&shared);
                let revision = recovered.revision;
                move || run(db, receiver, &shared, revision)
            })?;
        let inner = Inner {
            shared,
            path,
            sender: Some(sender),
            thread: Some(thread),
        };
        Ok((
            Storage {
                inner: Arc::new(inner),
            },
            recovered,
        ))
    }

    /// Queues a batch. The returned ticket resolves once the batch, and every
    /// batch submitted before it, is durable; batches are committed in the
    /// order of the calls (the batch is queued by this call, not when the
    /// ticket is first polled). Dropping the ticket does not cancel the
    /// batch.
    ///
    /// An empty batch is a barrier: it resolves once everything submitted
    /// before it is durable.
    pub fn commit(&self, batch: Vec<Change>) -> CommitTicket {
        let shared = &self.inner.shared;
        if let Some(error) = shared.failed_error() {
            return CommitTicket::ready(Err(error));
        }
        let Some(sender) = &self.inner.sender else {
            shared.commits.fetch_add(1, Ordering::Relaxed);
            shared.batches.fetch_add(1, Ordering::Relaxed);
            return CommitTicket::ready(Ok(()));
        };
        let (done, receiver) = oneshot::channel();
        let request = Request {
            changes: batch,
            done,
        };
        if sender.send(request).is_err() {
            return CommitTicket::ready(Err(StorageError::Closed));
        }
        CommitTicket {
            state: TicketState::Waiting(receiver),
        }
    }

    /// Counters: commits, batches, and the size of the file.
    pub fn stats(&self) -> StorageStats {
        let shared = &self.inner.shared;
        let file_bytes = self
            .inner
            .path
            .as_deref()
            .and_then(|path| std::fs::metadata(path).ok())
            .map_or(0, |metadata| metadata.len());
        StorageStats {
            commits: shared.commits.load(Ordering::Relaxed),
            batches: shared.batches.load(Ordering::Relaxed),
            file_bytes,
        }
    }

    /// The error that failed the storage, if a commit failed; every later
    /// commit fails.
    pub fn failure(&self) -> Option<StorageError> {
        self.inner.shared.failed.get().cloned()
    }

    /// Path of the database file; `None` in memory.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// Whether this storage keeps nothing ([`Storage::in_memory`]).
    pub fn is_in_memory(&self) -> bool {
        self.inner.sender.is_none()
    }
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage")
            .field("path", &self.inner.path)
            .field("stats", &self.stats())
            .field("failed", &self.inner.shared.failed.get().is_some())
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel lets the thread commit what is queued and exit.
        drop(self.sender.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            error!("storage: the storage thread panicked");
        }
    }
}

/// Resolves when a committed batch is durable, or with the error that kept
/// it from being so. Returned by [`Storage::commit`]; `Send`, `'static` and
/// `Unpin`.
#[must_use = "a batch is not acknowledged until its ticket resolves"]
#[derive(Debug)]
pub struct CommitTicket {
    state: TicketState,
}

#[derive(Debug)]
enum TicketState {
    Ready(Option<Result<(), StorageError>>),
    Waiting(oneshot::Receiver<Result<(), StorageError>>),
}

impl CommitTicket {
    fn ready(result: Result<(), StorageError>) -> Self {
        CommitTicket {
            state: TicketState::Ready(Some(result)),
        }
    }
}

impl Future for CommitTicket {
    type Output = Result<(), StorageError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().state {
            // Polled again after completion: there is no outcome left to give.
            TicketState::Ready(result) => {
                Poll::Ready(result.take().unwrap_or(Err(StorageError::Closed)))
            }
            TicketState::Waiting(receiver) => Pin::new(receiver)
                .poll(cx)
                .map(|result| result.unwrap_or(Err(StorageError::Closed))),
        }
    }
}

/// Creates the tables and checks (or records) the format version.
fn init(db: &Database) -> Result<(), StorageError> {
    let txn = db.begin_write().map_err(db_error)?;
    {
        txn.open_table(EVENTS).map_err(db_error)?;
        txn.open_table(LEASES).map_err(db_error)?;
        txn.open_table(AUTH_USERS).map_err(db_error)?;
        txn.open_table(AUTH_ROLES).map_err(db_error)?;
        let mut meta = txn.open_table(META).map_err(db_error)?;
        let version = meta
            .get(META_FORMAT_VERSION)
            .map_err(db_error)?
            .map(|value| value.value());
        match version {
            Some(FORMAT_VERSION) => {}
            Some(found) => {
                return Err(StorageError::UnsupportedFormat {
                    found,
                    expected: FORMAT_VERSION,
                });
            }
            None => {
                meta.insert(META_FORMAT_VERSION, FORMAT_VERSION)
                    .map_err(db_error)?;
            }
        }
    }
    txn.commit().map_err(db_error)
}

/// Reads everything back, in one read transaction.
fn recover(db: &Database) -> Result<Recovered, StorageError> {
    let txn = db.begin_read().map_err(db_error)?;

    let meta = txn.open_table(META).map_err(db_error)?;
    let read_meta = |name: &str| -> Result<i64, StorageError> {
        Ok(meta
            .get(name)
            .map_err(db_error)?
            .map_or(0, |value| value.value()))
    };
    let compact_revision = read_meta(META_COMPACT_REVISION)?;
    let mut revision = read_meta(META_REVISION)?.max(compact_revision);

    let table = txn.open_table(EVENTS).map_err(db_error)?;
    let count = usize::try_from(table.len().map_err(db_error)?).unwrap_or(0);
    let mut events = Vec::with_capacity(count);
    for entry in table.iter().map_err(db_error)? {
        let (key, value) = entry.map_err(db_error)?;
        let (rev, sub) = key.value();
        let event = Event::decode(value.value()).map_err(|error| StorageError::CorruptEvent {
            rev,
            sub,
            reason: error.to_string(),
        })?;
        revision = revision.max(rev);
        events.push(((rev, sub), event));
    }

    let table = txn.open_table(LEASES).map_err(db_error)?;
    let mut leases = Vec::new();
    for entry in table.iter().map_err(db_error)? {
        let (id, ttl) = entry.map_err(db_error)?;
        leases.push(LeaseRecord {
            id: id.value(),
            ttl: ttl.value(),
        });
    }

    let auth = RecoveredAuth {
        enabled: read_meta(META_AUTH_ENABLED)? == 1,
        revision: u64::try_from(read_meta(META_AUTH_REVISION)?).unwrap_or(0),
        users: read_records(&txn, AUTH_USERS, "auth_users")?,
        roles: read_records(&txn, AUTH_ROLES, "auth_roles")?,
    };

    Ok(Recovered {
        events,
        compact_revision,
        leases,
        revision,
        auth,
    })
}

/// Every record of a name-keyed auth table, decoded, in name order.
fn read_records<M: Message + Default>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<'static, &str, &[u8]>,
    table: &'static str,
) -> Result<Vec<M>, StorageError> {
    let records = txn.open_table(def).map_err(db_error)?;
    let mut out = Vec::new();
    for entry in records.iter().map_err(db_error)? {
        let (name, value) = entry.map_err(db_error)?;
        let record = M::decode(value.value()).map_err(|error| StorageError::CorruptAuth {
            table,
            name: name.value().to_string(),
            reason: error.to_string(),
        })?;
        out.push(record);
    }
    Ok(out)
}

/// The storage thread: commits queued batches in groups until every
/// [`Storage`] handle is gone and the queue is empty.
fn run(db: Database, receiver: mpsc::Receiver<Request>, shared: &Shared, mut revision: i64) {
    let mut group: Vec<Request> = Vec::new();
    while let Ok(first) = receiver.recv() {
        let mut bytes = first
            .changes
            .iter()
            .map(Change::approx_bytes)
            .sum::<usize>();
        group.push(first);
        while group.len() < MAX_GROUP_BATCHES && bytes < MAX_GROUP_BYTES {
            let Ok(request) = receiver.try_recv() else {
                break;
            };
            bytes += request
                .changes
                .iter()
                .map(Change::approx_bytes)
                .sum::<usize>();
            group.push(request);
        }

        if let Some(error) = shared.failed_error() {
            for request in group.drain(..) {
                let _ = request.done.send(Err(error.clone()));
            }
            continue;
        }

        // Earlier groups are all durable, so a group without changes is too.
        let write = group.iter().any(|request| !request.changes.is_empty());
        let result = if write {
            write_group(&db, &group, &mut revision)
        } else {
            Ok(())
        };
        match result {
            Ok(()) => {
                if write {
                    shared.commits.fetch_add(1, Ordering::Relaxed);
                }
                shared
                    .batches
                    .fetch_add(group.len() as u64, Ordering::Relaxed);
                debug!(batches = group.len(), bytes, "storage: committed");
                for request in group.drain(..) {
                    // The caller may have dropped its ticket; that is fine.
                    let _ = request.done.send(Ok(()));
                }
            }
            Err(error) => {
                error!(%error, batches = group.len(), "storage: commit failed; storage is now failed");
                let _ = shared.failed.set(error.clone());
                for request in group.drain(..) {
                    let _ = request.done.send(Err(error.clone()));
                }
            }
        }
    }
    debug!("storage: all handles dropped, closing the database");
    drop(db);
}

/// Writes a group of batches in one durable write transaction. `revision` is
/// the highest stored revision; it is updated only if the commit succeeds.
fn write_group(db: &Database, group: &[Request], revision: &mut i64) -> Result<(), StorageError> {
    let mut txn = db.begin_write().map_err(db_error)?;
    txn.set_durability(Durability::Immediate)
        .map_err(db_error)?;
    let mut high = *revision;
    // The highest revision this group writes an event at: recovery reads
    // the revision back from the events themselves, so the meta table (a
    // B-tree of its own, copied on every write) is written only when the
    // revision moves past them.
    let mut high_event = i64::MIN;
    {
        let mut events = txn.open_table(EVENTS).map_err(db_error)?;
        let mut leases = txn.open_table(LEASES).map_err(db_error)?;
        let mut meta = txn.open_table(META).map_err(db_error)?;
        let mut users = txn.open_table(AUTH_USERS).map_err(db_error)?;
        let mut roles = txn.open_table(AUTH_ROLES).map_err(db_error)?;
        for change in group.iter().flat_map(|request| &request.changes) {
            match change {
                Change::Event { rev, sub, event } => {
                    let bytes = event.encode_to_vec();
                    events
                        .insert((*rev, *sub), bytes.as_slice())
                        .map_err(db_error)?;
                    high = high.max(*rev);
                    high_event = high_event.max(*rev);
                }
                Change::Revision(rev) => high = high.max(*rev),
                Change::LeaseGrant(lease) => {
                    leases.insert(lease.id, lease.ttl).map_err(db_error)?;
                }
                Change::LeaseRevoke(id) => {
                    leases.remove(*id).map_err(db_error)?;
                }
                Change::Compact { revision, removed } => {
                    meta.insert(META_COMPACT_REVISION, *revision)
                        .map_err(db_error)?;
                    for key in removed {
                        events.remove(*key).map_err(db_error)?;
                    }
                    high = high.max(*revision);
                }
                Change::AuthUser { name, user } => match user {
                    Some(user) => {
                        let bytes = user.encode_to_vec();
                        users
                            .insert(name.as_str(), bytes.as_slice())
                            .map_err(db_error)?;
                    }
                    None => {
                        users.remove(name.as_str()).map_err(db_error)?;
                    }
                },
                Change::AuthRole { name, role } => match role {
                    Some(role) => {
                        let bytes = role.encode_to_vec();
                        roles
                            .insert(name.as_str(), bytes.as_slice())
                            .map_err(db_error)?;
                    }
                    None => {
                        roles.remove(name.as_str()).map_err(db_error)?;
                    }
                },
                Change::AuthState { enabled, revision } => {
                    meta.insert(META_AUTH_ENABLED, i64::from(*enabled))
                        .map_err(db_error)?;
                    meta.insert(
                        META_AUTH_REVISION,
                        i64::try_from(*revision).unwrap_or(i64::MAX),
                    )
                    .map_err(db_error)?;
                }
            }
        }
        if high != *revision && high > high_event {
            meta.insert(META_REVISION, high).map_err(db_error)?;
        }
    }
    txn.commit().map_err(db_error)?;
    *revision = high;
    Ok(())
}

#[cfg(test)]
mod tests;
