//! Watch fan-out: events reach the watchers they match through an index,
//! and a slow watcher never blocks the writer or the other watchers.
//!
//! As in etcd, a watcher is either **synced** (in the index, fed by
//! [`WatchHub::dispatch`] as revisions commit) or **unsynced** (catching up
//! from the store's history in a task of its own). Every new watcher starts
//! unsynced and catches up from its start revision to the last dispatched
//! one, then joins the synced set under the hub's lock, so nothing falls
//! between history and live events. A synced watcher whose stream is full
//! drops back to unsynced at the revision it missed and catches up the same
//! way: in order, nothing lost, nothing twice.
//!
//! A progress request is answered once every watcher of its stream is
//! synced (see [`WatchHub::progress`]), so that the revision it reports
//! never runs ahead of events a watcher has yet to get; a stream waiting
//! for that listens to [`WatchHub::progress_signal`].

mod index;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use muster_proto::{Event, ResponseHeader, WatchCreateRequest, WatchResponse};
use tokio::sync::mpsc;

use index::Index;
pub use index::{in_range, prefix_range_end};

/// The most revisions one catch-up response carries (etcd's
/// `watchBatchMaxRevs`).
const WATCH_BATCH_MAX_REVS: usize = 1000;

/// A watcher: the stream it lives on and its watch id there.
pub type WatcherKey = (u64, i64);

/// Where catching-up watchers read past events.
pub trait History: Send + Sync + 'static {
    /// Every event with `from <= mod_revision <= to` in `[key, range_end)`,
    /// in order, with `prev_kv` filled; `Err(compact_revision)` when `from`
    /// was compacted away.
    fn events(&self, from: i64, to: i64, key: &[u8], range_end: &[u8]) -> Result<Vec<Event>, i64>;
}

/// The identity stamped on every response header.
#[derive(Debug, Clone, Copy)]
pub struct HeaderInfo {
    /// The cluster id.
    pub cluster_id: u64,
    /// This member's id.
    pub member_id: u64,
}

impl HeaderInfo {
    /// A header at `revision`.
    pub fn at(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision,
            raft_term: 1,
        })
    }
}

struct Watcher {
    key: Vec<u8>,
    range_end: Vec<u8>,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    /// Events went out since the last progress notification tick (etcd
    /// then skips the watcher's next notification).
    sent_events: bool,
    tx: mpsc::Sender<WatchResponse>,
    synced: bool,
    /// Unsynced: the next revision to read from history. Synced: events
    /// below it are not delivered (a watch started in the future).
    next: i64,
}

impl Watcher {
    /// This watcher's view of `events` (filters, prev_kv), or `None`.
    fn view<'a>(&self, events: impl IntoIterator<Item = &'a Event>) -> Option<Vec<Event>> {
        let out: Vec<Event> = events
            .into_iter()
            .filter(|e| {
                let is_put = e.r#type == muster_proto::EventType::Put as i32;
                !(is_put && self.no_put || !is_put && self.no_delete)
            })
            // One copy per watcher, without prev_kv unless it asked for it.
            .map(|e| Event {
                r#type: e.r#type,
                kv: e.kv.clone(),
                prev_kv: if self.prev_kv {
                    e.prev_kv.clone()
                } else {
                    None
                },
            })
            .collect();
        (!out.is_empty()).then_some(out)
    }
}

struct HubState {
    watchers: HashMap<WatcherKey, Watcher>,
    index: Index,
    /// The last revision handed to synced watchers.
    dispatched: i64,
    next_stream: u64,
}

/// Every watcher of the server; see the module docs.
pub struct WatchHub {
    state: Mutex<HubState>,
    header: HeaderInfo,
    history: OnceLock<Weak<dyn History>>,
    fell_behind: std::sync::atomic::AtomicU64,
    /// Bumped when a stream's watchers may have become current: a revision
    /// dispatched, a watcher caught up or removed.
    progress_signal: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for WatchHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchHub")
            .field("watchers", &self.watcher_count())
            .finish_non_exhaustive()
    }
}

/// Why a watch could not be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateError {
    /// The id is in use on this stream (etcd's message).
    DuplicateId,
    /// `range_end` is not after `key` (and not `""` or `"\0"`).
    EmptyRange,
}

impl std::fmt::Display for CreateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CreateError::DuplicateId => "mvcc: duplicate watch ID provided on the WatchStream",
            CreateError::EmptyRange => "mvcc: watcher range is empty",
        })
    }
}

/// etcd's first check of a watch: a range that holds no key is refused
/// (before an id is chosen for it).
pub fn check_range(req: &WatchCreateRequest) -> Result<(), CreateError> {
    let end = req.range_end.as_slice();
    if !end.is_empty() && end != [0] && req.key.as_slice() >= end {
        return Err(CreateError::EmptyRange);
    }
    Ok(())
}

impl WatchHub {
    /// A hub whose history starts after `revision`.
    pub fn new(header: HeaderInfo, revision: i64) -> Arc<WatchHub> {
        Arc::new(WatchHub {
            state: Mutex::new(HubState {
                watchers: HashMap::new(),
                index: Index::default(),
                dispatched: revision,
                next_stream: 0,
            }),
            header,
            history: OnceLock::new(),
            fell_behind: std::sync::atomic::AtomicU64::new(0),
            progress_signal: tokio::sync::watch::channel(0).0,
        })
    }

    /// Connects the store that catching-up watchers read from.
    pub fn set_history(&self, history: Weak<dyn History>) {
        let _ = self.history.set(history);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes whenever [`WatchHub::progress`] may have become `Some`;
    /// subscribe before asking it, then wait for a change to ask again.
    pub fn progress_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.progress_signal.subscribe()
    }

    /// Wakes the streams waiting to answer a progress request (none
    /// usually: then this costs an atomic load). Call after the change,
    /// with the hub unlocked.
    fn signal_progress(&self) {
        if self.progress_signal.receiver_count() > 0 {
            self.progress_signal.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// An id for a new gRPC watch stream.
    pub fn new_stream(&self) -> u64 {
        let mut s = self.lock();
        s.next_stream += 1;
        s.next_stream
    }

    /// The last revision delivered to synced watchers.
    pub fn dispatched(&self) -> i64 {
        self.lock().dispatched
    }

    /// How many times a synced watcher fell behind (its stream was full)
    /// and went back to catching up from history.
    pub fn fell_behind(&self) -> u64 {
        self.fell_behind.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a watcher with this id exists.
    pub fn contains(&self, id: WatcherKey) -> bool {
        self.lock().watchers.contains_key(&id)
    }

    /// How many watchers exist.
    pub fn watcher_count(&self) -> usize {
        self.lock().watchers.len()
    }

    /// Adds a watcher (unsynced); returns the revision for its `created`
    /// answer (the later of `committed` and the last dispatched revision;
    /// without a start revision the watch starts after it). Send that
    /// answer, then call [`WatchHub::start`].
    pub fn register(
        &self,
        id: WatcherKey,
        req: &WatchCreateRequest,
        tx: mpsc::Sender<WatchResponse>,
        committed: i64,
    ) -> Result<i64, CreateError> {
        check_range(req)?;
        let mut s = self.lock();
        if s.watchers.contains_key(&id) {
            return Err(CreateError::DuplicateId);
        }
        // As etcd: from the current revision, which an acknowledged write
        // has reached even if it is not dispatched yet (its events then
        // reach this watcher neither live nor from history).
        let dispatched = s.dispatched.max(committed);
        let filters =
            |f: muster_proto::watch_create_request::FilterType| req.filters.contains(&(f as i32));
        s.watchers.insert(
            id,
            Watcher {
                // As etcd: an empty key is "\0", the smallest key.
                key: if req.key.is_empty() {
                    vec![0]
                } else {
                    req.key.clone()
                },
                range_end: req.range_end.clone(),
                prev_kv: req.prev_kv,
                no_put: filters(muster_proto::watch_create_request::FilterType::Noput),
                no_delete: filters(muster_proto::watch_create_request::FilterType::Nodelete),
                progress_notify: req.progress_notify,
                sent_events: false,
                tx,
                synced: false,
                next: if req.start_revision <= 0 {
                    dispatched + 1
                } else {
                    req.start_revision
                },
            },
        );
        Ok(dispatched)
    }

    /// Starts catching a registered watcher up.
    pub fn start(self: &Arc<Self>, id: WatcherKey) {
        tokio::spawn(self.clone().catch_up(id));
    }

    /// Removes a watcher; whether it existed.
    pub fn cancel(&self, id: WatcherKey) -> bool {
        let existed = {
            let mut s = self.lock();
            match s.watchers.remove(&id) {
                Some(w) => {
                    if w.synced {
                        s.index.remove(id, &w.key, &w.range_end);
                    }
                    true
                }
                None => false,
            }
        };
        if existed {
            self.signal_progress();
        }
        existed
    }

    /// Removes every watcher of a stream.
    pub fn remove_stream(&self, stream: u64) {
        let mut s = self.lock();
        let ids: Vec<WatcherKey> = s
            .watchers
            .keys()
            .filter(|k| k.0 == stream)
            .copied()
            .collect();
        for id in ids {
            if let Some(w) = s.watchers.remove(&id)
                && w.synced
            {
                s.index.remove(id, &w.key, &w.range_end);
            }
        }
    }

    /// The revision to answer a progress request on `stream` with: the
    /// last dispatched one, once it is at least `at_least` (the revision
    /// committed when the request came) and every watcher of the stream is
    /// synced, so that it has been handed every event up to it; `None`
    /// until then (wait on [`WatchHub::progress_signal`]). A stream
    /// without watchers is answered too, as etcd 3.4 does.
    pub fn progress(&self, stream: u64, at_least: i64) -> Option<i64> {
        let s = self.lock();
        (s.dispatched >= at_least
            && s.watchers
                .iter()
                .filter(|(k, _)| k.0 == stream)
                .all(|(_, w)| w.synced))
        .then_some(s.dispatched)
    }

    /// The watchers of `stream` due a progress notification at this tick,
    /// and the revision they are current with: as etcd's, those that asked
    /// for them, are synced, and got no events since the previous tick.
    pub fn progress_notify_targets(&self, stream: u64) -> (i64, Vec<i64>) {
        let mut s = self.lock();
        let mut ids = Vec::new();
        for (k, w) in s.watchers.iter_mut() {
            if k.0 != stream || !w.progress_notify {
                continue;
            }
            if w.synced && !w.sent_events {
                ids.push(k.1);
            }
            w.sent_events = false;
        }
        (s.dispatched, ids)
    }

    /// Hands the events of one committed revision to the synced watchers
    /// they match. Call in revision order.
    pub fn dispatch(self: &Arc<Self>, revision: i64, events: &[Event]) {
        let mut behind = Vec::new();
        {
            let mut s = self.lock();
            s.dispatched = s.dispatched.max(revision);
            // (watcher, event index) pairs, grouped by watcher with its
            // events in order: a flat list, sorted only when the revision
            // has several events (a map of lists cost a hash and an
            // allocation per watcher on every dispatch).
            let mut matched: Vec<(WatcherKey, usize)> = Vec::new();
            for (i, e) in events.iter().enumerate() {
                let Some(kv) = e.kv.as_ref() else { continue };
                s.index.for_each_match(&kv.key, |id| matched.push((id, i)));
            }
            if events.len() > 1 {
                matched.sort_unstable();
                matched.dedup();
            }
            let mut closed = Vec::new();
            let mut rest = matched.as_slice();
            while let Some(&(id, _)) = rest.first() {
                let n = rest.iter().take_while(|(other, _)| *other == id).count();
                let (group, tail) = rest.split_at(n);
                rest = tail;
                let Some(w) = s.watchers.get_mut(&id) else {
                    continue;
                };
                if revision < w.next {
                    continue;
                }
                let Some(view) = w.view(group.iter().map(|&(_, i)| &events[i])) else {
                    continue;
                };
                let resp = WatchResponse {
                    header: self.header.at(revision),
                    watch_id: id.1,
                    events: view,
                    ..Default::default()
                };
                match w.tx.try_send(resp) {
                    Ok(()) => w.sent_events = true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        w.synced = false;
                        w.next = revision;
                        behind.push(id);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => closed.push(id),
                }
            }
            for id in &behind {
                if let Some(w) = s.watchers.get(id) {
                    let (key, end) = (w.key.clone(), w.range_end.clone());
                    s.index.remove(*id, &key, &end);
                }
            }
            for id in closed {
                if let Some(w) = s.watchers.remove(&id)
                    && w.synced
                {
                    s.index.remove(id, &w.key, &w.range_end);
                }
            }
        }
        self.signal_progress();
        self.fell_behind
            .fetch_add(behind.len() as u64, std::sync::atomic::Ordering::Relaxed);
        for id in behind {
            tracing::debug!(
                stream = id.0,
                watch = id.1,
                revision,
                "watcher fell behind; catching up from history"
            );
            self.start(id);
        }
    }

    async fn catch_up(self: Arc<Self>, id: WatcherKey) {
        let Some(history) = self.history.get().and_then(Weak::upgrade) else {
            return;
        };
        loop {
            let (from, key, end, tx, upto) = {
                let s = self.lock();
                let Some(w) = s.watchers.get(&id) else { return };
                if w.synced {
                    return;
                }
                (
                    w.next,
                    w.key.clone(),
                    w.range_end.clone(),
                    w.tx.clone(),
                    s.dispatched,
                )
            };
            if from <= upto {
                let events = match history.events(from, upto, &key, &end) {
                    Ok(events) => events,
                    Err(compact_revision) => {
                        let _ = tx
                            .send(WatchResponse {
                                // etcd's compaction answer carries revision 0.
                                header: self.header.at(0),
                                watch_id: id.1,
                                canceled: true,
                                compact_revision,
                                ..Default::default()
                            })
                            .await;
                        self.cancel(id);
                        return;
                    }
                };
                // As etcd's syncWatchers: the history in one response (at
                // most WATCH_BATCH_MAX_REVS revisions each) stamped with the
                // revision caught up to.
                let mut start = 0;
                while start < events.len() {
                    let mut stop = start;
                    let mut revs = 0;
                    let mut last = None;
                    while stop < events.len() {
                        let rev = events[stop].kv.as_ref().map_or(0, |kv| kv.mod_revision);
                        if last != Some(rev) {
                            if revs == WATCH_BATCH_MAX_REVS {
                                break;
                            }
                            revs += 1;
                            last = Some(rev);
                        }
                        stop += 1;
                    }
                    let view = {
                        let s = self.lock();
                        let Some(w) = s.watchers.get(&id) else { return };
                        w.view(&events[start..stop])
                    };
                    if let Some(view) = view {
                        let resp = WatchResponse {
                            header: self.header.at(upto),
                            watch_id: id.1,
                            events: view,
                            ..Default::default()
                        };
                        if tx.send(resp).await.is_err() {
                            self.cancel(id);
                            return;
                        }
                        if let Some(w) = self.lock().watchers.get_mut(&id) {
                            w.sent_events = true;
                        }
                    }
                    start = stop;
                }
            }
            let caught_up = {
                let mut s = self.lock();
                let dispatched = s.dispatched;
                let Some(w) = s.watchers.get_mut(&id) else {
                    return;
                };
                w.next = w.next.max(upto + 1);
                let caught_up = w.next > dispatched;
                if caught_up {
                    // Live events from here on.
                    w.synced = true;
                    let (key, end) = (w.key.clone(), w.range_end.clone());
                    s.index.insert(id, &key, &end);
                }
                caught_up
            };
            if caught_up {
                self.signal_progress();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
