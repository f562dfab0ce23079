//! Durable storage for the embedded server: a write-ahead log in front of
//! a [redb] database.
//!
//! The apply task owns the in-memory MVCC store. It applies client writes in
//! order and hands each batch of resulting records ([`Change`]s) to
//! [`Storage::commit`]; it acknowledges the clients and makes the writes
//! visible only once the returned [`CommitTicket`] resolves, that is once the
//! batch is on disk (fdatasync'd in the log).
//!
//! # Group commit
//!
//! A dedicated thread owns the log. While it logs one group of batches,
//! newly submitted batches queue up; it then drains the queue (up to
//! [`MAX_GROUP_BATCHES`] batches or about [`MAX_GROUP_BYTES`] bytes) and
//! appends all of them as one CRC-checked record to the current segment of
//! the log, then syncs it (one fdatasync, of one sequential write into a
//! preallocated file, for many batches). Batches are logged and
//! acknowledged in the order they were submitted.
//!
//! # Checkpoints
//!
//! Acknowledged groups go on to a second thread, the checkpointer, which
//! owns the database. It applies them to the database many at a time, in
//! one durable write transaction about every [`CHECKPOINT_INTERVAL`] under
//! load (sooner once [`CHECKPOINT_BYTES`] are waiting), recording in the
//! same transaction the log position up to which the database is complete
//! (the checkpoint); segments wholly before it are deleted. If it falls
//! behind by [`MAX_PENDING_BYTES`], the storage thread waits for it, so
//! memory stays bounded. Closing the storage checkpoints everything and
//! deletes the log: a clean restart replays nothing.
//!
//! [`Storage::open`] replays into the database every valid record of the
//! log past the checkpoint (at most about one checkpoint's worth after a
//! crash), in one transaction that also moves the checkpoint, then deletes
//! the log and reads the database back. Replaying is idempotent (every
//! change sets or removes a record by its key), so a crash during the
//! replay only means replaying again. The log's format and how its end is
//! told from damage are in the `wal` module: a record cut short by a crash
//! ends the log, a damaged record followed by valid ones is
//! [`StorageError::CorruptWal`].
//!
//! # Failures
//!
//! If logging a group fails, every batch of the group fails with the
//! error, and the storage stays failed: every later commit fails with
//! [`StorageError::Failed`]. A write that was not acknowledged is never
//! acknowledged later. A failed checkpoint fails the storage the same way
//! (what was acknowledged is in the log, and replayed on the next open).
//!
//! # Layout
//!
//! In the directory given to [`Storage::open`]:
//!
//! - `muster.redb` ([`FILE_NAME`]), the database, with these tables:
//!   - `events`: `(revision, sub revision)` to a prost-encoded
//!     [`muster_proto::Event`];
//!   - `leases`: lease id to TTL in seconds;
//!   - `meta`: `format_version`, `revision` (the highest revision, when no
//!     event of it is stored: otherwise the events say it),
//!     `compact_revision`, `auth_enabled` (0 or 1), `auth_revision`, and the
//!     checkpoint, `wal_segment` and `wal_offset`;
//!   - `auth_users` and `auth_roles`: name to a prost-encoded
//!     [`authpb::User`] (with its bcrypt hash, never the password) or
//!     [`authpb::Role`], as etcd's `authUsers` and `authRoles` buckets.
//! - `wal/` ([`WAL_DIR`]), the log: segment files named by their sequence
//!   number in 16 hex digits (`0000000000000001.wal`, ...), each
//!   preallocated with zeros to [`SEGMENT_BYTES`] (or to the size of one
//!   larger record), and `spare.tmp`, the next segment, zero-filled ahead
//!   of time (as `spare.tmp.part` until complete). Empty after a clean
//!   shutdown, but for the spare.
//!
//! A directory written before the log existed (format version 1: no `wal/`
//! directory, no checkpoint) opens as it is and is marked version 2, so
//! that an older build, which would ignore the log, refuses it.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, mpsc};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use muster_proto::Event;
use muster_proto::authpb;
use prost::Message;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use self::latency::Latency;
pub use self::latency::{LATENCY_BOUNDS, LatencySnapshot, StorageLatencies};
use self::wal::{Position, WalWriter};

mod latency;
mod wal;

/// Name of the database file inside the storage directory.
pub const FILE_NAME: &str = "muster.redb";

/// Most batches written in one commit (one redb write transaction).
pub const MAX_GROUP_BATCHES: usize = 1024;

/// Approximate most bytes of events written in one commit; a group is closed
/// once it reaches this size (a single batch larger than this is committed
/// alone).
pub const MAX_GROUP_BYTES: usize = 4 << 20;

/// Name of the write-ahead log's directory inside the storage directory.
pub const WAL_DIR: &str = "wal";

/// Size of a write-ahead log segment. Preallocated with zeros: appending
/// to a zero-filled file and fdatasync'ing measured 140-150 µs on the
/// development machine, against 200-260 µs for a file extended by the
/// append or sized with `set_len` or `fallocate` (their fdatasync also
/// journals the new size or the block allocation). Zero-filling 64 MiB
/// takes about 50 ms, on a helper thread ahead of time.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// Most time a logged group waits, under load, before the checkpointer
/// applies it to the database.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// A checkpoint starts as soon as this many bytes of changes are waiting
/// (approximately, as [`MAX_GROUP_BYTES`] counts them). This and
/// [`CHECKPOINT_INTERVAL`] bound what a restart after a crash replays.
pub const CHECKPOINT_BYTES: usize = 4 << 20;

/// The storage thread stops taking batches while this many bytes of logged
/// changes wait for the checkpointer.
pub const MAX_PENDING_BYTES: usize = 64 << 20;

/// Version of the on-disk layout, kept in the `meta` table: 2 since the
/// write-ahead log (version 1, the database alone, is read and upgraded).
const FORMAT_VERSION: i64 = 2;

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
const META_WAL_SEGMENT: &str = "wal_segment";
const META_WAL_OFFSET: &str = "wal_offset";

/// Errors of the storage layer. Cheap to clone: one failed commit fails every
/// batch of its group with the same error.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// An I/O error outside the database itself (creating the directory,
    /// writing or reading the write-ahead log, starting a thread).
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
    /// A record of the write-ahead log is damaged, and valid records follow
    /// it (damage at the very end is a write cut short by a crash, and just
    /// ends the log), or a record's checksum matches but its content does
    /// not decode.
    #[error("corrupt write-ahead log: segment {segment:016x}, offset {offset}: {reason}")]
    CorruptWal {
        /// Sequence number of the segment (its file name, in hex).
        segment: u64,
        /// Byte offset of the damaged or undecodable record in it.
        offset: u64,
        /// What is wrong.
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
    /// Successful commits (write-ahead log records, one fdatasync each; a
    /// group of empty batches needs none).
    pub commits: u64,
    /// Batches made durable by those commits; `commits < batches` shows that
    /// group commit is working.
    pub batches: u64,
    /// Size of the database file in bytes (0 in memory).
    pub file_bytes: u64,
    /// Checkpoints: database write transactions applying logged commits
    /// (one fsync each, many commits each).
    pub checkpoints: u64,
    /// Bytes appended to the write-ahead log (records with their headers).
    pub wal_bytes: u64,
    /// Approximate bytes of changes logged but not yet in the database.
    pub pending_bytes: u64,
}

/// Durable storage: a handle to the storage thread and the checkpointer.
/// Cheap to clone (an [`Arc`]); all clones share one database and log. The
/// storage thread logs the queued batches and exits when the last clone is
/// dropped, then the checkpointer applies everything logged to the database
/// and exits, closing it; that drop waits for both, so the directory can be
/// reopened right after (and replays nothing).
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
    /// `None` for the in-memory storage; taken on drop.
    checkpointer: Option<JoinHandle<()>>,
}

/// Tuning of the log and the checkpoints; [`Options::default`] in
/// production, smaller or switched off in tests.
#[derive(Clone, Debug)]
struct Options {
    /// Size of a log segment.
    segment_bytes: u64,
    /// Most time logged changes wait for a checkpoint (under load).
    checkpoint_interval: Duration,
    /// A checkpoint starts once this many bytes of changes are waiting.
    checkpoint_bytes: usize,
    /// The storage thread waits while this many bytes of changes are logged
    /// but not checkpointed yet.
    max_pending_bytes: usize,
    /// Whether closing checkpoints everything logged (tests turn it off, and
    /// set long intervals, to leave everything in the log as a crash would).
    checkpoint_on_close: bool,
    /// Tests: every log append fails while this is set.
    fail_wal: Option<Arc<AtomicBool>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            segment_bytes: SEGMENT_BYTES,
            checkpoint_interval: CHECKPOINT_INTERVAL,
            checkpoint_bytes: CHECKPOINT_BYTES,
            max_pending_bytes: MAX_PENDING_BYTES,
            checkpoint_on_close: true,
            fail_wal: None,
        }
    }
}

#[derive(Default)]
struct Shared {
    commits: AtomicU64,
    batches: AtomicU64,
    checkpoints: AtomicU64,
    wal_bytes: AtomicU64,
    /// Each log append with its fdatasync.
    wal_append: Latency,
    /// Each checkpoint transaction.
    checkpoint_latency: Latency,
    /// Set once, by the storage thread or the checkpointer, when a write
    /// fails.
    failed: OnceLock<StorageError>,
    /// Groups logged and acknowledged, waiting for the checkpointer.
    queue: Mutex<Queue>,
    /// Signalled when the checkpointer has work: enough bytes, or closing.
    work: Condvar,
    /// Signalled when the checkpointer made room (or stopped).
    room: Condvar,
    /// The alarms stored when the storage was opened.
    alarms: Mutex<Vec<AlarmRecord>>,
}

/// Logged groups on their way to the database.
#[derive(Default)]
struct Queue {
    groups: Vec<Logged>,
    /// Approximate bytes of the changes logged but not yet in the database
    /// (queued, or being applied by the checkpointer).
    bytes: usize,
    /// The storage thread has exited: nothing more will be queued.
    closed: bool,
    /// The checkpointer has exited (or failed): nothing more is taken.
    stopped: bool,
    /// Commands for the checkpointer (defragment, alarms), run after it
    /// checkpointed what is queued.
    commands: Vec<Command>,
}

/// One group, as logged.
struct Logged {
    batches: Vec<Vec<Change>>,
    /// The log position just past the group's record.
    end: Position,
    bytes: usize,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn failed_error(&self) -> Option<StorageError> {
        self.failed
            .get()
            .map(|error| StorageError::Failed(Arc::new(error.clone())))
    }

    /// Hands a logged group to the checkpointer; waits first while too much
    /// is waiting already (the checkpointer is behind).
    fn enqueue(&self, logged: Logged, options: &Options) {
        let mut queue = lock(&self.queue);
        while queue.bytes > options.max_pending_bytes && !queue.stopped {
            self.work.notify_one();
            queue = self
                .room
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if queue.stopped {
            // The checkpointer failed: the group stays in the log only.
            return;
        }
        let before = queue.bytes;
        queue.bytes += logged.bytes;
        queue.groups.push(logged);
        if before < options.checkpoint_bytes && queue.bytes >= options.checkpoint_bytes {
            self.work.notify_one();
        }
    }

    fn close_queue(&self) {
        lock(&self.queue).closed = true;
        self.work.notify_one();
    }

    fn stop_queue(&self) {
        let mut queue = lock(&self.queue);
        queue.stopped = true;
        queue.groups.clear();
        // Their callers see the storage closed.
        queue.commands.clear();
        self.room.notify_all();
    }
}

struct Request {
    changes: Vec<Change>,
    done: oneshot::Sender<Result<(), StorageError>>,
}

impl Storage {
    /// Opens (creating it if missing) the storage in `dir`: the database
    /// [`FILE_NAME`] and the log in [`WAL_DIR`]. Replays into the database
    /// whatever the log holds past the last checkpoint, then reads
    /// everything back. Works after a crash: redb recovers its last
    /// committed transaction (repairing the file if needed, which is
    /// logged), and a record the crash cut short ends the log.
    ///
    /// Fails if the file is locked by another process, is not a redb
    /// database, has an unknown layout version, holds an event that does
    /// not decode ([`StorageError::CorruptEvent`]), or if the log is
    /// damaged before its end ([`StorageError::CorruptWal`]).
    pub fn open(dir: &Path) -> Result<(Storage, Recovered), StorageError> {
        Self::open_with(dir, Options::default())
    }

    fn open_with(dir: &Path, options: Options) -> Result<(Storage, Recovered), StorageError> {
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
        Self::start(db, Some(path), &dir.join(WAL_DIR), options)
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
            checkpointer: None,
        };
        (
            Storage {
                inner: Arc::new(inner),
            },
            Recovered::default(),
        )
    }

    /// Replays the log in `wal_dir` into `db`, recovers the state of `db`,
    /// then starts the storage thread (appending to the log) and the
    /// checkpointer (owning `db`).
    fn start(
        db: Database,
        path: Option<PathBuf>,
        wal_dir: &Path,
        options: Options,
    ) -> Result<(Storage, Recovered), StorageError> {
        init(&db)?;
        let started = std::time::Instant::now();
        let (next_segment, replayed) = replay_wal(&db, wal_dir)?;
        let recovered = recover(&db)?;
        info!(
            path = ?path,
            events = recovered.events.len(),
            leases = recovered.leases.len(),
            revision = recovered.revision,
            compact_revision = recovered.compact_revision,
            replayed_records = replayed,
            elapsed = ?started.elapsed(),
            "storage: recovered"
        );
        let shared = Arc::new(Shared::default());
        *lock(&shared.alarms) = read_alarms(&db)?;
        let options = Arc::new(options);
        let checkpointer = std::thread::Builder::new()
            .name("muster-checkpoint".into())
            .spawn({
                let shared = Arc::clone(&shared);
                let options = Arc::clone(&options);
                let wal_dir = wal_dir.to_path_buf();
                let revision = recovered.revision;
                move || checkpointer(db, &shared, &wal_dir, revision, next_segment, &options)
            })?;
        let wal = WalWriter::new(
            wal_dir.to_path_buf(),
            next_segment,
            options.segment_bytes,
            options.fail_wal.clone(),
        );
        let (sender, receiver) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("muster-storage".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || run(wal, receiver, &shared, &options)
            });
        let thread = match thread {
            Ok(thread) => thread,
            Err(error) => {
                shared.close_queue();
                let _ = checkpointer.join();
                return Err(error.into());
            }
        };
        let inner = Inner {
            shared,
            path,
            sender: Some(sender),
            thread: Some(thread),
            checkpointer: Some(checkpointer),
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

    /// Counters: commits, batches, checkpoints, the log, and the size of the
    /// database file.
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
            checkpoints: shared.checkpoints.load(Ordering::Relaxed),
            wal_bytes: shared.wal_bytes.load(Ordering::Relaxed),
            pending_bytes: lock(&shared.queue).bytes as u64,
        }
    }

    /// How long log appends and checkpoints took (empty in memory).
    pub fn latencies(&self) -> StorageLatencies {
        let shared = &self.inner.shared;
        StorageLatencies {
            wal_append: shared.wal_append.snapshot(),
            checkpoint: shared.checkpoint_latency.snapshot(),
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
        // Closing the channel lets the thread log what is queued and exit.
        drop(self.sender.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            error!("storage: the storage thread panicked");
        }
        // The storage thread closes the queue as it exits; again in case it
        // panicked. The checkpointer then checkpoints what is left.
        self.shared.close_queue();
        if let Some(thread) = self.checkpointer.take()
            && thread.join().is_err()
        {
            error!("storage: the checkpointer panicked");
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
            // Before the write-ahead log: the same tables, and no
            // checkpoint (the log starts empty).
            Some(1) => {
                meta.insert(META_FORMAT_VERSION, FORMAT_VERSION)
                    .map_err(db_error)?;
            }
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

/// The checkpoint position stored in the database: everything the log holds
/// before it is in the database. `(0, 0)` if none (a new store, or one
/// written before the log existed).
fn read_checkpoint(db: &Database) -> Result<Position, StorageError> {
    let txn = db.begin_read().map_err(db_error)?;
    let meta = txn.open_table(META).map_err(db_error)?;
    let read = |name: &str| -> Result<u64, StorageError> {
        Ok(meta
            .get(name)
            .map_err(db_error)?
            .map_or(0, |value| u64::try_from(value.value()).unwrap_or(0)))
    };
    Ok(Position {
        segment: read(META_WAL_SEGMENT)?,
        offset: read(META_WAL_OFFSET)?,
    })
}

/// Applies every record the log holds past the database's checkpoint to the
/// database, in one durable write transaction that also moves the
/// checkpoint past them, then deletes every segment (all of them are in the
/// database now). Returns the number of the segment to log to next and
/// how many records were replayed.
///
/// Replaying is idempotent: every change sets or removes a record by its
/// key (events by revision, leases by id, users and roles by name, meta
/// values), and the revision only moves up; so a crash before the
/// replay's commit just replays the same records again.
fn replay_wal(db: &Database, wal_dir: &Path) -> Result<(u64, usize), StorageError> {
    if !wal_dir.exists() {
        std::fs::create_dir_all(wal_dir)?;
        if let Some(parent) = wal_dir.parent() {
            wal::sync_dir(parent)?;
        }
    }
    let from = read_checkpoint(db)?;
    let segments = wal::list_segments(wal_dir)?;
    let mut replayed = 0;
    let mut txn = db.begin_write().map_err(db_error)?;
    txn.set_durability(Durability::Immediate)
        .map_err(db_error)?;
    let last = {
        let mut tables = Tables::open(&txn)?;
        let mut revision = tables.stored_revision()?;
        let mut high = revision;
        let mut high_event = i64::MIN;
        let last = wal::replay(wal_dir, from, |changes, _end| {
            replayed += 1;
            changes
                .iter()
                .try_for_each(|change| tables.apply(change, &mut high, &mut high_event))
        })?;
        if let Some(end) = last {
            tables.finish(high, high_event, &mut revision)?;
            tables.set_checkpoint(end)?;
        }
        last
    };
    if let Some(end) = last {
        txn.commit().map_err(db_error)?;
        info!(
            records = replayed,
            segment = end.segment,
            offset = end.offset,
            "storage: replayed the write-ahead log"
        );
    } else {
        txn.abort().map_err(db_error)?;
    }
    for &seq in &segments {
        wal::remove_segment(wal_dir, seq)?;
    }
    if !segments.is_empty() {
        wal::sync_dir(wal_dir)?;
    }
    let next = segments
        .last()
        .copied()
        .unwrap_or(0)
        .max(from.segment)
        .max(last.map_or(0, |end| end.segment))
        + 1;
    Ok((next, replayed))
}

/// The tables of a write transaction, to apply changes to.
struct Tables<'txn> {
    events: redb::Table<'txn, (i64, i64), &'static [u8]>,
    leases: redb::Table<'txn, i64, i64>,
    meta: redb::Table<'txn, &'static str, i64>,
    users: redb::Table<'txn, &'static str, &'static [u8]>,
    roles: redb::Table<'txn, &'static str, &'static [u8]>,
    /// Reused buffer for encoding records.
    buf: Vec<u8>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn redb::WriteTransaction) -> Result<Self, StorageError> {
        Ok(Tables {
            events: txn.open_table(EVENTS).map_err(db_error)?,
            leases: txn.open_table(LEASES).map_err(db_error)?,
            meta: txn.open_table(META).map_err(db_error)?,
            users: txn.open_table(AUTH_USERS).map_err(db_error)?,
            roles: txn.open_table(AUTH_ROLES).map_err(db_error)?,
            buf: Vec::new(),
        })
    }

    /// The highest revision stored: of the meta table, or of the last event.
    fn stored_revision(&self) -> Result<i64, StorageError> {
        let meta = self
            .meta
            .get(META_REVISION)
            .map_err(db_error)?
            .map_or(0, |value| value.value());
        let event = self
            .events
            .last()
            .map_err(db_error)?
            .map_or(0, |(key, _)| key.value().0);
        Ok(meta.max(event))
    }

    /// Applies one change. `high` is raised to the highest revision seen,
    /// `high_event` to the highest revision of an event written.
    fn apply(
        &mut self,
        change: &Change,
        high: &mut i64,
        high_event: &mut i64,
    ) -> Result<(), StorageError> {
        match change {
            Change::Event { rev, sub, event } => {
                self.buf.clear();
                // Writing into a Vec cannot run out of room.
                let _ = event.encode(&mut self.buf);
                self.events
                    .insert((*rev, *sub), self.buf.as_slice())
                    .map_err(db_error)?;
                *high = (*high).max(*rev);
                *high_event = (*high_event).max(*rev);
            }
            Change::Revision(rev) => *high = (*high).max(*rev),
            Change::LeaseGrant(lease) => {
                self.leases.insert(lease.id, lease.ttl).map_err(db_error)?;
            }
            Change::LeaseRevoke(id) => {
                self.leases.remove(*id).map_err(db_error)?;
            }
            Change::Compact { revision, removed } => {
                self.meta
                    .insert(META_COMPACT_REVISION, *revision)
                    .map_err(db_error)?;
                for key in removed {
                    self.events.remove(*key).map_err(db_error)?;
                }
                *high = (*high).max(*revision);
            }
            Change::AuthUser { name, user } => match user {
                Some(user) => {
                    let bytes = user.encode_to_vec();
                    self.users
                        .insert(name.as_str(), bytes.as_slice())
                        .map_err(db_error)?;
                }
                None => {
                    self.users.remove(name.as_str()).map_err(db_error)?;
                }
            },
            Change::AuthRole { name, role } => match role {
                Some(role) => {
                    let bytes = role.encode_to_vec();
                    self.roles
                        .insert(name.as_str(), bytes.as_slice())
                        .map_err(db_error)?;
                }
                None => {
                    self.roles.remove(name.as_str()).map_err(db_error)?;
                }
            },
            Change::AuthState { enabled, revision } => {
                self.meta
                    .insert(META_AUTH_ENABLED, i64::from(*enabled))
                    .map_err(db_error)?;
                self.meta
                    .insert(
                        META_AUTH_REVISION,
                        i64::try_from(*revision).unwrap_or(i64::MAX),
                    )
                    .map_err(db_error)?;
            }
        }
        Ok(())
    }

    /// Records the highest revision if the events do not say it. `revision`
    /// is the one stored before; it becomes `high` (the caller commits).
    fn finish(
        &mut self,
        high: i64,
        high_event: i64,
        revision: &mut i64,
    ) -> Result<(), StorageError> {
        // Recovery reads the revision back from the events themselves, so
        // the meta table is written only when the revision moves past them.
        if high > *revision && high > high_event {
            self.meta.insert(META_REVISION, high).map_err(db_error)?;
        }
        *revision = (*revision).max(high);
        Ok(())
    }

    fn set_checkpoint(&mut self, end: Position) -> Result<(), StorageError> {
        let as_i64 = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        self.meta
            .insert(META_WAL_SEGMENT, as_i64(end.segment))
            .map_err(db_error)?;
        self.meta
            .insert(META_WAL_OFFSET, as_i64(end.offset))
            .map_err(db_error)?;
        Ok(())
    }
}

/// The storage thread: logs queued batches in groups, one record and one
/// fdatasync each, acknowledges them and hands them to the checkpointer,
/// until every [`Storage`] handle is gone and the queue is empty.
fn run(mut wal: WalWriter, receiver: mpsc::Receiver<Request>, shared: &Shared, options: &Options) {
    let mut group: Vec<Request> = Vec::new();
    let mut record = Vec::new();
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
        if group.iter().all(|request| request.changes.is_empty()) {
            shared
                .batches
                .fetch_add(group.len() as u64, Ordering::Relaxed);
            for request in group.drain(..) {
                let _ = request.done.send(Ok(()));
            }
            continue;
        }

        wal::encode_record(
            group.iter().flat_map(|request| &request.changes),
            &mut record,
        );
        let started = Instant::now();
        let appended = wal.append(&mut record);
        shared.wal_append.observe(started.elapsed());
        match appended {
            Ok(end) => {
                shared.commits.fetch_add(1, Ordering::Relaxed);
                shared
                    .batches
                    .fetch_add(group.len() as u64, Ordering::Relaxed);
                shared
                    .wal_bytes
                    .fetch_add(record.len() as u64, Ordering::Relaxed);
                debug!(batches = group.len(), bytes, "storage: logged");
                let batches = group
                    .drain(..)
                    .map(|request| {
                        // The caller may have dropped its ticket; that is fine.
                        let _ = request.done.send(Ok(()));
                        request.changes
                    })
                    .collect();
                shared.enqueue(
                    Logged {
                        batches,
                        end,
                        bytes,
                    },
                    options,
                );
            }
            Err(error) => {
                let error = StorageError::from(error);
                error!(%error, batches = group.len(), "storage: logging failed; storage is now failed");
                let _ = shared.failed.set(error.clone());
                for request in group.drain(..) {
                    let _ = request.done.send(Err(error.clone()));
                }
            }
        }
        if record.capacity() > 2 * MAX_GROUP_BYTES {
            record = Vec::new();
        }
    }
    debug!("storage: all handles dropped, closing the log");
    drop(wal);
    shared.close_queue();
}

/// The checkpointer: applies logged groups to the database, many per write
/// transaction (every [`CHECKPOINT_INTERVAL`] under load, or sooner once
/// [`CHECKPOINT_BYTES`] are waiting), each transaction durable and moving
/// the checkpoint; deletes the segments before it. On close, checkpoints
/// everything and deletes every segment.
fn checkpointer(
    mut db: Database,
    shared: &Shared,
    wal_dir: &Path,
    mut revision: i64,
    mut oldest: u64,
    options: &Options,
) {
    let mut last = Instant::now();
    let mut position = None;
    loop {
        let (groups, closed) = {
            let mut queue = lock(&shared.queue);
            loop {
                if queue.closed
                    || !queue.commands.is_empty()
                    || queue.bytes >= options.checkpoint_bytes
                    || queue.bytes > options.max_pending_bytes
                {
                    break;
                }
                let now = Instant::now();
                let due = last + options.checkpoint_interval;
                if now >= due && !queue.groups.is_empty() {
                    break;
                }
                let wait = due
                    .checked_duration_since(now)
                    .filter(|wait| !wait.is_zero())
                    .unwrap_or(options.checkpoint_interval);
                queue = shared
                    .work
                    .wait_timeout(queue, wait)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            (
                (
                    std::mem::take(&mut queue.groups),
                    std::mem::take(&mut queue.commands),
                ),
                queue.closed,
            )
        };
        let (groups, commands) = groups;
        if closed && !options.checkpoint_on_close {
            break;
        }
        if let Some(end) = groups.last().map(|logged| logged.end) {
            let started = Instant::now();
            let bytes: usize = groups.iter().map(|logged| logged.bytes).sum();
            let checkpointed = checkpoint(&db, &groups, end, &mut revision);
            shared.checkpoint_latency.observe(started.elapsed());
            if let Err(error) = checkpointed {
                error!(%error, "storage: checkpoint failed; storage is now failed");
                let _ = shared.failed.set(error);
                break;
            }
            shared.checkpoints.fetch_add(1, Ordering::Relaxed);
            debug!(groups = groups.len(), bytes, elapsed = ?started.elapsed(), "storage: checkpointed");
            position = Some(end);
            drop(groups);
            {
                let mut queue = lock(&shared.queue);
                queue.bytes = queue.bytes.saturating_sub(bytes);
                shared.room.notify_all();
            }
            // Segments wholly before the checkpoint are not needed anymore.
            if let Err(error) = remove_segments(wal_dir, &mut oldest, end.segment) {
                warn!(%error, "storage: cannot delete old write-ahead log segments");
            }
        }
        for command in commands {
            run_command(&mut db, shared, command);
        }
        last = Instant::now();
        if closed {
            // Everything logged is in the database: the last segment too.
            if let Some(end) = position
                && let Err(error) = remove_segments(wal_dir, &mut oldest, end.segment + 1)
            {
                warn!(%error, "storage: cannot delete old write-ahead log segments");
            }
            break;
        }
    }
    shared.stop_queue();
    debug!(checkpoint = ?position, "storage: closing the database");
    drop(db);
}

/// Deletes segments `*oldest..keep`, then sets `*oldest` to `keep`.
fn remove_segments(wal_dir: &Path, oldest: &mut u64, keep: u64) -> std::io::Result<()> {
    if *oldest >= keep {
        return Ok(());
    }
    for seq in *oldest..keep {
        wal::remove_segment(wal_dir, seq)?;
    }
    *oldest = keep;
    wal::sync_dir(wal_dir)
}

/// Applies `groups` to the database in one durable write transaction that
/// also records `end` as the checkpoint. `revision` is the highest stored
/// revision; it is updated only if the commit succeeds.
fn checkpoint(
    db: &Database,
    groups: &[Logged],
    end: Position,
    revision: &mut i64,
) -> Result<(), StorageError> {
    let mut txn = db.begin_write().map_err(db_error)?;
    txn.set_durability(Durability::Immediate)
        .map_err(db_error)?;
    let mut high = *revision;
    let mut high_event = i64::MIN;
    let mut stored = *revision;
    {
        let mut tables = Tables::open(&txn)?;
        for change in groups.iter().flat_map(|logged| &logged.batches).flatten() {
            tables.apply(change, &mut high, &mut high_event)?;
        }
        tables.finish(high, high_event, &mut stored)?;
        tables.set_checkpoint(end)?;
    }
    txn.commit().map_err(db_error)?;
    *revision = stored;
    Ok(())
}

/// Writes a new data directory in `dir` holding `state` (as a snapshot
/// restore needs): the database with every event under its own `(revision,
/// sub revision)`, the leases, the revisions and the auth store, in one
/// durable transaction, and an empty log. [`Storage::open`] then reads
/// `state` back. `dir` is created if missing and must not hold a database
/// already ([`StorageError::Io`] with `AlreadyExists` if it does).
pub fn create_from_state(dir: &Path, state: &Recovered) -> Result<(), StorageError> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(FILE_NAME);
    if path.exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} already exists", path.display()),
        )
        .into());
    }
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(&path)
        .map_err(db_error)?;
    init(&db)?;
    let mut txn = db.begin_write().map_err(db_error)?;
    txn.set_durability(Durability::Immediate)
        .map_err(db_error)?;
    {
        let mut tables = Tables::open(&txn)?;
        let mut high = 0;
        let mut high_event = i64::MIN;
        let mut changes: Vec<Change> = Vec::new();
        changes.push(Change::Compact {
            revision: state.compact_revision,
            removed: Vec::new(),
        });
        changes.push(Change::Revision(state.revision));
        changes.extend(state.leases.iter().copied().map(Change::LeaseGrant));
        changes.extend(state.auth.users.iter().map(|user| Change::AuthUser {
            name: String::from_utf8_lossy(&user.name).into_owned(),
            user: Some(user.clone()),
        }));
        changes.extend(state.auth.roles.iter().map(|role| Change::AuthRole {
            name: String::from_utf8_lossy(&role.name).into_owned(),
            role: Some(role.clone()),
        }));
        changes.push(Change::AuthState {
            enabled: state.auth.enabled,
            revision: state.auth.revision,
        });
        for change in &changes {
            tables.apply(change, &mut high, &mut high_event)?;
        }
        for ((rev, sub), event) in &state.events {
            let change = Change::Event {
                rev: *rev,
                sub: *sub,
                event: Event {
                    prev_kv: None,
                    ..event.clone()
                },
            };
            tables.apply(&change, &mut high, &mut high_event)?;
        }
        let mut stored = 0;
        tables.finish(high, high_event, &mut stored)?;
    }
    txn.commit().map_err(db_error)?;
    drop(db);
    let wal_dir = dir.join(WAL_DIR);
    std::fs::create_dir_all(&wal_dir)?;
    wal::sync_dir(&wal_dir)?;
    wal::sync_dir(dir)?;
    Ok(())
}

#[cfg(test)]
mod tests;

// ---------------------------------------------------------------------------
// Alarms and defragmentation (issue 17).
//
// Both are commands to the checkpointer, the owner of the database: it runs
// them once it has checkpointed every group queued before them.

/// Prefix of the `meta` records of active alarms: `alarm/<type>/<member>`
/// (type as etcd's `AlarmType` number, member in 16 hex digits), value 1.
const META_ALARM_PREFIX: &str = "alarm/";

/// An alarm as persisted: the member that raised it and etcd's `AlarmType`
/// number (1 NOSPACE, 2 CORRUPT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AlarmRecord {
    /// The member id (0 is a valid id, as in etcd).
    pub member: u64,
    /// etcd's `AlarmType` number.
    pub alarm: i32,
}

fn alarm_key(record: AlarmRecord) -> String {
    format!("{META_ALARM_PREFIX}{}/{:016x}", record.alarm, record.member)
}

/// The database file's size before and after a [`Storage::defragment`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Defragmented {
    /// Bytes before.
    pub before: u64,
    /// Bytes after.
    pub after: u64,
    /// Whether redb found anything to compact.
    pub compacted: bool,
}

enum Command {
    Defragment {
        path: PathBuf,
        done: oneshot::Sender<Result<Defragmented, StorageError>>,
    },
    Alarm {
        record: AlarmRecord,
        active: bool,
        done: oneshot::Sender<Result<(), StorageError>>,
    },
}

fn run_command(db: &mut Database, shared: &Shared, command: Command) {
    match command {
        Command::Defragment { path, done } => {
            let size = || std::fs::metadata(&path).map_or(0, |m| m.len());
            let before = size();
            let started = Instant::now();
            let result = db
                .compact()
                .map_err(db_error)
                .map(|compacted| Defragmented {
                    before,
                    after: size(),
                    compacted,
                });
            match &result {
                Ok(d) => info!(
                    before_bytes = d.before,
                    after_bytes = d.after,
                    elapsed = ?started.elapsed(),
                    "storage: defragmented the database"
                ),
                // The database is unchanged: redb compacts in transactions.
                Err(error) => warn!(%error, "storage: defragmentation failed"),
            }
            let _ = done.send(result);
        }
        Command::Alarm {
            record,
            active,
            done,
        } => {
            let result = write_alarm(db, record, active);
            if let Err(error) = &result {
                error!(%error, "storage: cannot store an alarm; storage is now failed");
                let _ = shared.failed.set(error.clone());
            }
            let _ = done.send(result);
        }
    }
}

fn write_alarm(db: &Database, record: AlarmRecord, active: bool) -> Result<(), StorageError> {
    let mut txn = db.begin_write().map_err(db_error)?;
    txn.set_durability(Durability::Immediate)
        .map_err(db_error)?;
    {
        let mut meta = txn.open_table(META).map_err(db_error)?;
        let key = alarm_key(record);
        if active {
            meta.insert(key.as_str(), 1).map_err(db_error)?;
        } else {
            meta.remove(key.as_str()).map_err(db_error)?;
        }
    }
    txn.commit().map_err(db_error)
}

/// The alarms stored in `db`, in (member, type) order.
fn read_alarms(db: &Database) -> Result<Vec<AlarmRecord>, StorageError> {
    let txn = db.begin_read().map_err(db_error)?;
    let meta = txn.open_table(META).map_err(db_error)?;
    let mut alarms = Vec::new();
    // '0' follows '/': the range holds exactly the prefixed keys.
    for entry in meta.range("alarm/".."alarm0").map_err(db_error)? {
        let (key, _) = entry.map_err(db_error)?;
        let key = key.value();
        let parsed = key
            .strip_prefix(META_ALARM_PREFIX)
            .and_then(|rest| rest.split_once('/'))
            .and_then(|(alarm, member)| {
                Some(AlarmRecord {
                    alarm: alarm.parse().ok()?,
                    member: u64::from_str_radix(member, 16).ok()?,
                })
            });
        match parsed {
            Some(record) => alarms.push(record),
            None => warn!(key, "storage: ignoring a malformed alarm record"),
        }
    }
    alarms.sort();
    Ok(alarms)
}

impl Storage {
    /// Runs `command` on the checkpointer once it checkpointed everything
    /// queued; `None` when the checkpointer is gone.
    fn send_command(&self, command: Command) -> Result<(), StorageError> {
        let shared = &self.inner.shared;
        let mut queue = lock(&shared.queue);
        if queue.stopped {
            return Err(StorageError::Closed);
        }
        queue.commands.push(command);
        shared.work.notify_one();
        Ok(())
    }

    /// The alarms stored when the storage was opened (none in memory).
    pub fn stored_alarms(&self) -> Vec<AlarmRecord> {
        lock(&self.inner.shared.alarms).clone()
    }

    /// Stores (`active`) or removes an alarm, durably (nothing in memory).
    /// Queued by this call, so calls take effect in their order; the future
    /// resolves once the change is on disk.
    pub fn set_alarm(
        &self,
        record: AlarmRecord,
        active: bool,
    ) -> impl Future<Output = Result<(), StorageError>> + Send + 'static {
        let queued = if self.is_in_memory() {
            None
        } else {
            let (done, receiver) = oneshot::channel();
            Some(
                self.send_command(Command::Alarm {
                    record,
                    active,
                    done,
                })
                .map(|()| receiver),
            )
        };
        async move {
            match queued {
                None => Ok(()),
                Some(Err(error)) => Err(error),
                Some(Ok(receiver)) => receiver.await.unwrap_or(Err(StorageError::Closed)),
            }
        }
    }

    /// Checkpoints everything logged so far, then compacts the database
    /// file (redb's `Database::compact`), giving back to the file system
    /// the pages freed by compactions and deletes. Writes go on meanwhile:
    /// they are logged (and acknowledged) as usual, and wait in the
    /// checkpointer's queue, the storage thread waiting once
    /// [`MAX_PENDING_BYTES`] are queued. In memory: nothing to do.
    pub async fn defragment(&self) -> Result<Defragmented, StorageError> {
        let Some(path) = self.path().map(Path::to_path_buf) else {
            return Ok(Defragmented {
                before: 0,
                after: 0,
                compacted: false,
            });
        };
        if let Some(error) = self.inner.shared.failed_error() {
            return Err(error);
        }
        let (done, receiver) = oneshot::channel();
        self.send_command(Command::Defragment { path, done })?;
        receiver.await.unwrap_or(Err(StorageError::Closed))
    }

    /// Size of the database file in bytes (0 in memory): as etcd's
    /// backend size (`etcd_mvcc_db_total_size_in_bytes`), what the space
    /// quota is checked against.
    pub fn file_bytes(&self) -> u64 {
        self.path()
            .and_then(|path| std::fs::metadata(path).ok())
            .map_or(0, |metadata| metadata.len())
    }
}
