//! One watch stream per [`Etcd`] handle, shared by every watcher.
//!
//! The hub owns the gRPC stream and multiplexes watchers on it, each with
//! its own watch id. It remembers, per watcher, the next revision it has to
//! deliver, so that:
//!
//! - after a disconnect it reconnects (with backoff, failing over between
//!   endpoints) and re-creates every watch from that revision: nothing is
//!   missed and nothing is delivered twice;
//! - a slow watcher never blocks the others: when its channel is full its
//!   server-side watch is cancelled and later re-created from the first
//!   undelivered revision, so it catches up from etcd's history in order;
//! - progress notifications advance quiet watchers' revisions;
//! - history lost to compaction ends the watcher with
//!   [`WatchEvent::Compacted`], and a registry whose revision went backwards
//!   (wiped, or restored from an old backup) ends it with
//!   [`WatchEvent::Reset`]: the owner re-lists and watches again;
//! - etcd checks the stream's token (the one it was opened with) at each
//!   watch create, and refuses a create with a dead token (`created` and
//!   `canceled`, watch id -1, the reason in `cancel_reason`; the stream and
//!   its other watches carry on). Creates are answered in the order they
//!   were sent, so the hub knows which watcher was refused. For an invalid
//!   token or an old auth revision (and, holding credentials, an empty user)
//!   it re-authenticates and moves every watch to a new stream, which
//!   carries the new token, from each watcher's next revision: nothing is
//!   missed and the watchers see no disconnect. A `permission denied` is
//!   retried once the same way (some servers said so for an expired token,
//!   etcd issue 12385); refused again, it ends the watcher with
//!   [`WatchEvent::PermissionDenied`], naming the key range.
//!
//! Inside the crate a watcher may instead hand its events and progress to
//! a [`Sink`] the hub calls on its own task, as each response is decoded
//! (discovery's tables, whose apply never waits): one channel hop and one
//! task wake-up less per change and watcher. Everything else (disconnects,
//! resumes and terminal events) still goes through the channel.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use muster_proto as pb;
use tokio::sync::{mpsc, oneshot, watch};

use super::{Etcd, Inner, backoff};
use crate::error::{AuthRefusal, Error, Result, describe_range};

/// How many responses a watcher may have waiting before it is paused.
const WATCHER_BUFFER: usize = 256;
/// How often the hub asks etcd for a progress notification.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// How often paused watchers are checked for room to resume.
const RESUME_INTERVAL: Duration = Duration::from_millis(50);

/// What to watch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchOptions {
    /// The key, or the start of the range.
    pub key: Vec<u8>,
    /// The exclusive end of the range; empty for a single key.
    pub range_end: Vec<u8>,
    /// The first revision to deliver; 0 means changes after now.
    pub start_revision: i64,
    /// Whether events carry the previous key-value.
    pub prev_kv: bool,
}

impl WatchOptions {
    /// Watches one key.
    pub fn key(key: impl Into<Vec<u8>>) -> Self {
        WatchOptions {
            key: key.into(),
            ..Default::default()
        }
    }

    /// Watches every key starting with `prefix`. End prefixes with `/`, or
    /// `foo` also matches `foo_other` (etcd issue 15022).
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        let mut key = prefix.into();
        let range_end = crate::instance::prefix_range_end(&key);
        if key.is_empty() {
            // Every key: etcd wants `\0` to `\0`, an empty key is refused.
            key = vec![0];
        }
        WatchOptions {
            key,
            range_end,
            ..Default::default()
        }
    }

    /// Delivers events from `revision` on.
    pub fn from_revision(mut self, revision: i64) -> Self {
        self.start_revision = revision;
        self
    }

    /// Asks for previous key-values in events.
    pub fn with_prev_kv(mut self) -> Self {
        self.prev_kv = true;
        self
    }
}

/// What a [`Watcher`] receives.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// The changes of one or more revisions, in order. Events of one
    /// transaction always arrive in one batch.
    Events {
        /// The store's revision when etcd sent the batch.
        revision: i64,
        /// The events.
        events: Vec<pb::Event>,
        /// When the response reached this process (what
        /// `muster_discovery_apply_seconds` measures from).
        received: Instant,
    },
    /// Every change up to `revision` has been delivered.
    Progress {
        /// The revision the watcher is now current with.
        revision: i64,
    },
    /// The stream broke; the hub is reconnecting and the watcher will resume
    /// where it stopped. Until [`WatchEvent::Resumed`], what the owner holds
    /// may be stale.
    Disconnected {
        /// Why.
        error: String,
    },
    /// The watch is back, resumed from the last delivered revision.
    Resumed,
    /// The revisions the watcher still needed were compacted. Terminal:
    /// re-list and watch again.
    Compacted {
        /// The oldest revision still available.
        compact_revision: i64,
    },
    /// The registry is behind what this watcher saw (it was wiped or
    /// restored). Terminal: re-list and watch again.
    Reset {
        /// The registry's current revision.
        revision: i64,
    },
    /// etcd cancelled the watch for another reason. Terminal.
    Canceled {
        /// etcd's reason.
        reason: String,
    },
    /// etcd refused to create the watch: the user lacks read permission on
    /// the range (refused again after re-authenticating), or the client has
    /// no credentials while auth is enabled. Terminal: see
    /// [`WatchEvent::error`].
    PermissionDenied {
        /// The etcd user the client authenticates as; `None` without
        /// credentials.
        user: Option<String>,
        /// What was refused: `watch prefix /muster/services/web/`.
        request: String,
    },
}

impl WatchEvent {
    /// Whether nothing follows this event on its watcher.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            WatchEvent::Compacted { .. }
                | WatchEvent::Reset { .. }
                | WatchEvent::Canceled { .. }
                | WatchEvent::PermissionDenied { .. }
        )
    }

    /// The error a terminal event reports: compacted history, a watch
    /// etcd cancelled or refused. `None` for the others ([`WatchEvent::Reset`]
    /// is no failure: re-list).
    pub fn error(&self) -> Option<Error> {
        match self {
            WatchEvent::Compacted { compact_revision } => Some(Error::Compacted {
                compact_revision: *compact_revision,
            }),
            WatchEvent::Canceled { reason } => {
                Some(Error::Grpc(tonic::Status::cancelled(reason.clone())))
            }
            WatchEvent::PermissionDenied { user, request } => Some(Error::PermissionDenied {
                user: user.clone(),
                request: request.clone(),
            }),
            _ => None,
        }
    }
}

/// The state of the shared stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    /// Not opened yet (no watcher so far).
    Idle,
    /// Open and delivering.
    Connected,
    /// Broken since `since`; reconnecting.
    Disconnected {
        /// When the stream broke.
        since: Instant,
        /// Why.
        error: String,
    },
}

/// A subscription on the shared watch stream; dropping it cancels the watch.
#[derive(Debug)]
pub struct Watcher {
    id: u64,
    rx: mpsc::Receiver<WatchEvent>,
    cmd: mpsc::UnboundedSender<Cmd>,
    connection: watch::Receiver<Connection>,
}

impl Watcher {
    /// The next event; `None` after a terminal event or when the client is gone.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        self.rx.recv().await
    }

    /// The state of the shared stream right now.
    pub fn connection(&self) -> Connection {
        self.connection.borrow().clone()
    }
}

impl tokio_stream::Stream for Watcher {
    type Item = WatchEvent;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<WatchEvent>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.cmd.send(Cmd::Cancel(self.id));
    }
}

/// Takes a watcher's [`WatchEvent::Events`] and [`WatchEvent::Progress`]
/// on the hub's task, in order; `false` once its owner is gone (the watch
/// is then cancelled). It must not wait: every watcher of the handle waits
/// on it.
pub(crate) type Sink = Box<dyn FnMut(WatchEvent) -> bool + Send>;

enum Cmd {
    Subscribe {
        options: WatchOptions,
        tx: mpsc::Sender<WatchEvent>,
        sink: Option<Sink>,
        reply: oneshot::Sender<u64>,
    },
    Cancel(u64),
}

/// The per-handle multiplexer; see the module docs.
pub(crate) struct Hub {
    cmd: mpsc::UnboundedSender<Cmd>,
    connection: watch::Receiver<Connection>,
    opened: Arc<AtomicU64>,
    latest: Arc<AtomicI64>,
}

impl Hub {
    pub(crate) fn start(etcd: Etcd) -> Hub {
        let (cmd, cmd_rx) = mpsc::unbounded_channel();
        let (conn_tx, connection) = watch::channel(Connection::Idle);
        let opened = Arc::new(AtomicU64::new(0));
        let latest = Arc::new(AtomicI64::new(0));
        let task = Task {
            latest: latest.clone(),
            user: etcd.user(),
            etcd: Arc::downgrade(&etcd.inner),
            cmd_rx,
            connection: conn_tx,
            opened: opened.clone(),
            subs: HashMap::new(),
            by_watch: HashMap::new(),
            pending: VecDeque::new(),
            confirmed: false,
            auth_retries: 0,
            maybe_paused: false,
            next_sub: 0,
            next_watch: 0,
        };
        drop(etcd);
        tokio::spawn(task.run());
        Hub {
            cmd,
            connection,
            opened,
            latest,
        }
    }

    pub(crate) async fn subscribe(
        &self,
        options: WatchOptions,
        sink: Option<Sink>,
    ) -> Result<Watcher> {
        let (tx, rx) = mpsc::channel(WATCHER_BUFFER);
        let (reply, id) = oneshot::channel();
        self.cmd
            .send(Cmd::Subscribe {
                options,
                tx,
                sink,
                reply,
            })
            .map_err(|_| Error::Closed("watch hub"))?;
        let id = id.await.map_err(|_| Error::Closed("watch hub"))?;
        Ok(Watcher {
            id,
            rx,
            cmd: self.cmd.clone(),
            connection: self.connection.clone(),
        })
    }

    pub(crate) fn streams_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    pub(crate) fn latest_revision(&self) -> i64 {
        self.latest.load(Ordering::Relaxed)
    }
}

struct Sub {
    options: WatchOptions,
    tx: mpsc::Sender<WatchEvent>,
    /// Where events and progress go instead of `tx`, when set.
    sink: Option<Sink>,
    /// The next revision to deliver; 0 until the first create answers.
    next_rev: i64,
    /// The server-side watch id on the current stream.
    watch_id: Option<i64>,
    created: bool,
    paused: bool,
    disconnected: bool,
    /// etcd said `permission denied` to its last create: once more (on a
    /// stream with a fresh token) and it ends.
    denied_once: bool,
}

/// What became of an event handed to a watcher.
enum Delivery {
    Sent,
    /// Its channel is full (never for a sink).
    Full,
    /// Its owner is gone.
    Gone,
}

impl Sub {
    /// Hands `event` to the sink, or else to the channel.
    fn deliver(&mut self, event: WatchEvent) -> Delivery {
        match self.sink.as_mut() {
            Some(sink) => {
                if sink(event) {
                    Delivery::Sent
                } else {
                    Delivery::Gone
                }
            }
            None => match self.tx.try_send(event) {
                Ok(()) => Delivery::Sent,
                Err(mpsc::error::TrySendError::Full(_)) => Delivery::Full,
                Err(mpsc::error::TrySendError::Closed(_)) => Delivery::Gone,
            },
        }
    }
}

struct Task {
    /// The newest header revision seen on any stream.
    latest: Arc<AtomicI64>,
    etcd: std::sync::Weak<Inner>,
    /// The configured user (`None`: no credentials).
    user: Option<String>,
    cmd_rx: mpsc::UnboundedReceiver<Cmd>,
    connection: watch::Sender<Connection>,
    opened: Arc<AtomicU64>,
    subs: HashMap<u64, Sub>,
    by_watch: HashMap<i64, u64>,
    /// Watch ids of the creates sent on the current stream and not answered
    /// yet, in order: etcd answers them in that order, and a refused one
    /// carries watch id -1.
    pending: VecDeque<i64>,
    /// Whether etcd created a watch on the current stream (it works).
    confirmed: bool,
    /// Token refreshes for the watch stream since a create last succeeded.
    auth_retries: u32,
    /// Whether a watcher may be paused: only then does the stream check
    /// for room to resume every [`RESUME_INTERVAL`] (a process with many
    /// handles would otherwise wake each one 20 times a second for
    /// nothing).
    maybe_paused: bool,
    next_sub: u64,
    next_watch: i64,
}

enum StreamEnd {
    Broken(String),
    /// etcd refused a create for the stream's token: re-authenticate and
    /// move the watches to a new stream.
    Reauth(String),
    Exit,
}

/// The start revision to ask for a watcher whose next revision is `next`:
/// one early, so that a compaction cannot cut its history silently.
///
/// etcd answers a watch from revision `r` with a compacted response only
/// when `r` is below the compact revision, and compaction at exactly `r`
/// removes a deletion made at `r` (a tombstone at the compact revision is
/// dropped). A watcher resuming at `r` would then miss that deletion and
/// hear nothing about it. Asking from `r - 1`, a revision it has seen,
/// turns that case into a compacted response (`r - 1` is below the compact
/// revision), upon which the caller lists again; the events of `r - 1`
/// that come again are dropped on arrival.
fn overlap_start(next: i64) -> i64 {
    if next > 1 { next - 1 } else { next }
}

impl Task {
    async fn run(mut self) {
        let mut attempt = 0u32;
        loop {
            if self.subs.is_empty() {
                match self.cmd_rx.recv().await {
                    Some(cmd) => self.apply_offline(cmd),
                    None => return,
                }
                continue;
            }
            let Some(inner) = self.etcd.upgrade() else {
                self.end_all("the etcd client was dropped");
                return;
            };
            let etcd = Etcd { inner };
            let creates: Vec<pb::WatchRequest> = {
                self.by_watch.clear();
                self.pending.clear();
                let ids: Vec<u64> = self.subs.keys().copied().collect();
                ids.into_iter()
                    .filter_map(|id| self.create_request(id))
                    .collect()
            };
            let opened = etcd.watch_stream_auth(creates).await;
            drop(etcd);
            let end = match opened {
                Ok((tx, stream, auth)) => {
                    self.opened.fetch_add(1, Ordering::Relaxed);
                    self.connection.send_replace(Connection::Connected);
                    self.confirmed = false;
                    let end = self.drive(tx, stream).await;
                    if self.confirmed {
                        attempt = 0;
                    }
                    match end {
                        StreamEnd::Exit => return,
                        StreamEnd::Broken(reason) => Err(reason),
                        StreamEnd::Reauth(reason) => Ok((reason, auth)),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            let wait = match end {
                Ok((reason, stale)) => {
                    let Some(inner) = self.etcd.upgrade() else {
                        self.end_all("the etcd client was dropped");
                        return;
                    };
                    let refreshed = Etcd { inner }.refresh_auth(&stale).await;
                    match refreshed {
                        Ok(()) => {
                            tracing::info!(%reason, "etcd refused a watch for the stream's token; moving the watches to a new stream with a fresh one");
                            self.reset_watches();
                            self.auth_retries = self.auth_retries.saturating_add(1);
                            match self.auth_retries {
                                1 => Duration::ZERO,
                                n => backoff(
                                    n - 2,
                                    Duration::from_millis(50),
                                    Duration::from_secs(2),
                                ),
                            }
                        }
                        Err(e) => {
                            self.disconnected(&format!(
                                "cannot re-authenticate for the watch stream ({reason}): {e}"
                            ));
                            let wait =
                                backoff(attempt, Duration::from_millis(50), Duration::from_secs(2));
                            attempt = attempt.saturating_add(1);
                            wait
                        }
                    }
                }
                Err(reason) => {
                    self.disconnected(&reason);
                    let wait = backoff(attempt, Duration::from_millis(50), Duration::from_secs(2));
                    attempt = attempt.saturating_add(1);
                    wait
                }
            };
            if wait.is_zero() {
                continue;
            }
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    cmd = self.cmd_rx.recv() => match cmd {
                        Some(cmd) => self.apply_offline(cmd),
                        None => return,
                    },
                }
            }
        }
    }

    fn apply_offline(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Subscribe {
                options,
                tx,
                sink,
                reply,
            } => {
                let id = self.add(options, tx, sink);
                let _ = reply.send(id);
            }
            Cmd::Cancel(id) => {
                if let Some(sub) = self.subs.remove(&id)
                    && let Some(w) = sub.watch_id
                {
                    self.by_watch.remove(&w);
                }
            }
        }
    }

    fn add(
        &mut self,
        options: WatchOptions,
        tx: mpsc::Sender<WatchEvent>,
        sink: Option<Sink>,
    ) -> u64 {
        let id = self.next_sub;
        self.next_sub += 1;
        let next_rev = options.start_revision.max(0);
        self.subs.insert(
            id,
            Sub {
                options,
                tx,
                sink,
                next_rev,
                watch_id: None,
                created: false,
                paused: false,
                disconnected: false,
                denied_once: false,
            },
        );
        id
    }

    /// Assigns a fresh watch id to `sub` and builds its create request.
    fn create_request(&mut self, sub_id: u64) -> Option<pb::WatchRequest> {
        let sub = self.subs.get_mut(&sub_id)?;
        self.next_watch += 1;
        let watch_id = self.next_watch;
        sub.watch_id = Some(watch_id);
        sub.created = false;
        sub.paused = false;
        self.by_watch.insert(watch_id, sub_id);
        self.pending.push_back(watch_id);
        Some(pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: sub.options.key.clone(),
                    range_end: sub.options.range_end.clone(),
                    start_revision: overlap_start(sub.next_rev),
                    progress_notify: true,
                    filters: Vec::new(),
                    prev_kv: sub.options.prev_kv,
                    watch_id,
                    fragment: false,
                },
            )),
        })
    }

    fn cancel_request(watch_id: i64) -> pb::WatchRequest {
        pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CancelRequest(
                pb::WatchCancelRequest { watch_id },
            )),
        }
    }

    async fn drive(
        &mut self,
        tx: mpsc::Sender<pb::WatchRequest>,
        mut stream: tonic::Streaming<pb::WatchResponse>,
    ) -> StreamEnd {
        let mut progress = tokio::time::interval(PROGRESS_INTERVAL);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        progress.tick().await;
        let mut resume = tokio::time::interval(RESUME_INTERVAL);
        resume.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut outgoing = Vec::new();
            tokio::select! {
                cmd = self.cmd_rx.recv() => match cmd {
                    None => return StreamEnd::Exit,
                    Some(Cmd::Subscribe { options, tx: sub_tx, sink, reply }) => {
                        let id = self.add(options, sub_tx, sink);
                        let _ = reply.send(id);
                        outgoing.extend(self.create_request(id));
                    }
                    Some(Cmd::Cancel(id)) => self.forget(id, &mut outgoing),
                },
                msg = stream.message() => match msg {
                    Ok(Some(resp)) => {
                        if let Some(end) = self.handle(resp, &mut outgoing) {
                            return end;
                        }
                    }
                    Ok(None) => return StreamEnd::Broken("watch stream closed by the server".into()),
                    Err(status) => return StreamEnd::Broken(Error::from_status(status).to_string()),
                },
                _ = resume.tick(), if self.maybe_paused => {
                    let ready: Vec<u64> = self
                        .subs
                        .iter()
                        .filter(|(_, s)| s.paused && s.tx.capacity() >= WATCHER_BUFFER / 2)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in ready {
                        tracing::debug!(watcher = id, "resuming a slow watcher from history");
                        outgoing.extend(self.create_request(id));
                    }
                    self.maybe_paused = self.subs.values().any(|s| s.paused);
                }
                _ = progress.tick() => {
                    outgoing.push(pb::WatchRequest {
                        request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(
                            pb::WatchProgressRequest {},
                        )),
                    });
                }
            }
            for req in outgoing {
                if tx.send(req).await.is_err() {
                    return StreamEnd::Broken("watch stream closed".into());
                }
            }
        }
    }

    /// Handles one response; `Some` when the stream has to be replaced.
    fn handle(
        &mut self,
        mut resp: pb::WatchResponse,
        outgoing: &mut Vec<pb::WatchRequest>,
    ) -> Option<StreamEnd> {
        let received = Instant::now();
        let revision = resp.header.as_ref().map_or(0, |h| h.revision);
        self.latest.fetch_max(revision, Ordering::Relaxed);
        // The watch a create answer is for: creates are answered in order,
        // and a refused one says -1.
        let watch_id = if resp.created {
            let position = self.pending.iter().position(|&w| w == resp.watch_id);
            match position {
                Some(i) => self.pending.remove(i),
                None if resp.watch_id == -1 => self.pending.pop_front(),
                None => Some(resp.watch_id),
            }
            .unwrap_or(resp.watch_id)
        } else {
            resp.watch_id
        };
        if resp.created
            && resp.canceled
            && let Some(refusal) = AuthRefusal::from_reason(&resp.cancel_reason)
        {
            return self.refused(watch_id, refusal, &resp.cancel_reason);
        }
        if watch_id == -1 && !resp.created && !resp.canceled && resp.events.is_empty() {
            // Answer to a progress request: every synced watcher is current.
            // A full channel drops it: a later one carries the same news.
            let mut gone = Vec::new();
            for (&id, sub) in self.subs.iter_mut().filter(|(_, s)| s.created && !s.paused) {
                if revision + 1 > sub.next_rev {
                    sub.next_rev = revision + 1;
                    if let Delivery::Gone = sub.deliver(WatchEvent::Progress { revision }) {
                        gone.push(id);
                    }
                }
            }
            for id in gone {
                self.forget(id, outgoing);
            }
            return None;
        }
        let Some(&sub_id) = self.by_watch.get(&watch_id) else {
            return None; // a watch we cancelled; its last responses are still arriving
        };
        let sub = self.subs.get_mut(&sub_id)?;
        let terminal = if resp.compact_revision > 0 {
            Some(WatchEvent::Compacted {
                compact_revision: resp.compact_revision,
            })
        } else if resp.canceled {
            Some(WatchEvent::Canceled {
                reason: if resp.cancel_reason.is_empty() {
                    "canceled by the server".into()
                } else {
                    resp.cancel_reason.clone()
                },
            })
        } else if resp.created && sub.next_rev > 0 && revision + 1 < sub.next_rev {
            outgoing.push(Self::cancel_request(watch_id));
            Some(WatchEvent::Reset { revision })
        } else {
            None
        };
        if let Some(event) = terminal {
            self.end_sub(sub_id, watch_id, event);
            return None;
        }
        if resp.created {
            sub.created = true;
            sub.denied_once = false;
            self.confirmed = true;
            self.auth_retries = 0;
            if sub.next_rev == 0 {
                sub.next_rev = revision + 1;
            }
            if sub.disconnected {
                sub.disconnected = false;
                let _ = sub.tx.try_send(WatchEvent::Resumed);
            }
            return None;
        }
        if resp.events.is_empty() {
            if revision + 1 > sub.next_rev {
                sub.next_rev = revision + 1;
                if let Delivery::Gone = sub.deliver(WatchEvent::Progress { revision }) {
                    self.forget(sub_id, outgoing);
                }
            }
            return None;
        }
        if resp
            .events
            .first()
            .and_then(|e| e.kv.as_ref())
            .is_some_and(|kv| kv.mod_revision < sub.next_rev)
        {
            // The revision before the one asked for, sent again because the
            // watch starts one early (see `overlap_start`): seen already.
            let next = sub.next_rev;
            resp.events
                .retain(|e| e.kv.as_ref().is_some_and(|kv| kv.mod_revision >= next));
            if resp.events.is_empty() {
                return None;
            }
        }
        let first = resp
            .events
            .first()
            .and_then(|e| e.kv.as_ref())
            .map_or(0, |kv| kv.mod_revision);
        let last = resp
            .events
            .last()
            .and_then(|e| e.kv.as_ref())
            .map_or(0, |kv| kv.mod_revision);
        match sub.deliver(WatchEvent::Events {
            revision,
            events: resp.events,
            received,
        }) {
            Delivery::Sent => sub.next_rev = sub.next_rev.max(last + 1),
            Delivery::Full => {
                // Too slow: stop the server-side watch and catch up from
                // history once the watcher has drained its backlog.
                tracing::warn!(
                    watcher = sub_id,
                    from = first,
                    "watcher is behind; pausing it"
                );
                sub.next_rev = first.max(sub.next_rev);
                sub.paused = true;
                self.maybe_paused = true;
                sub.created = false;
                if let Some(w) = sub.watch_id.take() {
                    self.by_watch.remove(&w);
                    outgoing.push(Self::cancel_request(w));
                }
            }
            Delivery::Gone => self.forget(sub_id, outgoing),
        }
        None
    }

    /// Drops watcher `sub_id` and cancels its server-side watch, if any.
    fn forget(&mut self, sub_id: u64, outgoing: &mut Vec<pb::WatchRequest>) {
        if let Some(w) = self.subs.remove(&sub_id).and_then(|s| s.watch_id) {
            self.by_watch.remove(&w);
            outgoing.push(Self::cancel_request(w));
        }
    }

    /// etcd refused to create watch `watch_id` for `refusal`: replace the
    /// stream when a fresh token may help, else end the watcher.
    fn refused(&mut self, watch_id: i64, refusal: AuthRefusal, reason: &str) -> Option<StreamEnd> {
        let sub_id = self.by_watch.remove(&watch_id)?;
        let credentials = self.user.is_some();
        let sub = self.subs.get_mut(&sub_id)?;
        sub.watch_id = None;
        sub.created = false;
        let retry = match refusal {
            AuthRefusal::InvalidToken | AuthRefusal::OldRevision => true,
            AuthRefusal::UserEmpty => credentials,
            AuthRefusal::Denied => credentials && !std::mem::replace(&mut sub.denied_once, true),
        };
        if retry {
            return Some(StreamEnd::Reauth(reason.to_string()));
        }
        let event = WatchEvent::PermissionDenied {
            user: self.user.clone(),
            request: format!(
                "watch {}",
                describe_range(&sub.options.key, &sub.options.range_end)
            ),
        };
        if let Some(e) = event.error() {
            tracing::error!(error = %e, "etcd refused a watch");
        }
        self.end_sub(sub_id, watch_id, event);
        None
    }

    /// Ends watcher `sub_id` (on watch `watch_id`) with a terminal event.
    fn end_sub(&mut self, sub_id: u64, watch_id: i64, event: WatchEvent) {
        tracing::debug!(?event, "watch ended");
        if let Some(sub) = self.subs.remove(&sub_id) {
            // try_send: the receiver may be full; a terminal event must
            // still arrive, so spawn the send if needed.
            if let Err(mpsc::error::TrySendError::Full(event)) = sub.tx.try_send(event) {
                let tx = sub.tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(event).await;
                });
            }
        }
        self.by_watch.remove(&watch_id);
    }

    /// Forgets the current stream's watches: every watcher is created
    /// again, from its next revision, on the next stream.
    fn reset_watches(&mut self) {
        self.by_watch.clear();
        self.pending.clear();
        self.subs.retain(|_, sub| !sub.tx.is_closed());
        for sub in self.subs.values_mut() {
            sub.watch_id = None;
            sub.created = false;
            sub.paused = false;
        }
    }

    fn disconnected(&mut self, reason: &str) {
        tracing::warn!(error = %reason, "etcd watch stream lost; reconnecting");
        if !matches!(*self.connection.borrow(), Connection::Disconnected { .. }) {
            self.connection.send_replace(Connection::Disconnected {
                since: Instant::now(),
                error: reason.to_string(),
            });
        }
        self.reset_watches();
        for sub in self.subs.values_mut() {
            if !sub.disconnected {
                sub.disconnected = true;
                let _ = sub.tx.try_send(WatchEvent::Disconnected {
                    error: reason.to_string(),
                });
            }
        }
    }

    fn end_all(&mut self, reason: &str) {
        for (_, sub) in self.subs.drain() {
            let _ = sub.tx.try_send(WatchEvent::Canceled {
                reason: reason.to_string(),
            });
        }
    }
}
