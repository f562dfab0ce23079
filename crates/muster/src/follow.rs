//! Following a key prefix: list it at one revision, then watch it from the
//! next revision, and recover from every failure. Shared by discovery (one
//! service) and the catalog (every service).
//!
//! Recovery: after a disconnect the shared watch stream resumes from the
//! last revision delivered, so nothing is missed; after compaction, a
//! registry that went back in time (wiped or restored) or a cancelled
//! watch, the prefix is listed again and the owner is handed the new list;
//! a failing list is retried with capped, jittered backoff, forever. A watch
//! etcd refuses (`permission denied`, after the hub re-authenticated) is
//! logged as an error naming the user and range, kept as the owner's
//! staleness error, and tried again (list and watch) only after backoff, so
//! that granting the permission later heals it without a restart. During
//! all of it the owner keeps what it has and is told it is stale.

use std::future::Future;
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use muster_proto as pb;
use tokio::sync::broadcast;

use crate::client::watch::Sink;
use crate::client::{Etcd, WatchEvent, WatchOptions, backoff};
use crate::error::Result;
use crate::instance;

/// What a followed prefix feeds. Held weakly: following stops when the
/// owner is dropped.
pub(crate) trait Follower: Send + Sync + 'static {
    /// What to call it in logs.
    fn label(&self) -> String;
    /// The whole prefix at `revision` (first list, or a re-list).
    fn apply_list(
        &self,
        revision: i64,
        kvs: Vec<pb::KeyValue>,
        etcd: &Etcd,
    ) -> impl Future<Output = ()> + Send;
    /// One watch batch, which reached this process at `received`.
    fn apply_events(
        &self,
        revision: i64,
        events: Vec<pb::Event>,
        received: Instant,
        etcd: &Etcd,
    ) -> impl Future<Output = ()> + Send;
    /// Whether [`Follower::apply_events_now`] applies batches: they are
    /// then applied on the watch stream's task as they arrive, instead of
    /// travelling through the watcher's channel to the follow task.
    const INLINE: bool = false;
    /// One watch batch, applied at once (it must not wait); only called
    /// when [`Follower::INLINE`].
    fn apply_events_now(&self, revision: i64, events: Vec<pb::Event>, received: Instant) {
        let _ = (revision, events, received);
    }
    /// Every change up to `revision` has been delivered.
    fn progress(&self, revision: i64);
    /// The owner's staleness.
    fn staleness(&self) -> &Staleness;
}

/// How to list and when to retry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FollowConfig {
    /// Keys per page when listing.
    pub(crate) page_size: i64,
    /// First retry delay after a failed list; doubles up to `backoff_cap`.
    pub(crate) backoff_base: Duration,
    /// Longest retry delay.
    pub(crate) backoff_cap: Duration,
}

/// Since when, and why, what an owner holds may be missing changes.
#[derive(Debug, Default)]
pub(crate) struct Staleness(Mutex<Option<(Instant, String)>>);

impl Staleness {
    /// Marks it stale (keeping the first time it went stale).
    pub(crate) fn stale(&self, error: String) {
        let mut stale = self.0.lock().expect("stale lock");
        match stale.as_mut() {
            Some((_, e)) => *e = error,
            None => *stale = Some((Instant::now(), error)),
        }
    }

    /// Marks it current.
    pub(crate) fn fresh(&self) {
        *self.0.lock().expect("stale lock") = None;
    }

    /// How long it has been stale, and the last error; `None` when current.
    pub(crate) fn get(&self) -> Option<(Duration, String)> {
        let stale = self.0.lock().expect("stale lock");
        stale
            .as_ref()
            .map(|(since, e)| (since.elapsed(), e.clone()))
    }
}

/// The follow task of a followed table, aborted when its owner is dropped
/// (the task only holds a `Weak` to the owner, so it would otherwise wait
/// for its next event to notice).
#[derive(Debug, Default)]
pub(crate) struct FollowTask(Mutex<Option<tokio::task::AbortHandle>>);

impl FollowTask {
    /// Records the spawned task.
    pub(crate) fn set(&self, task: tokio::task::AbortHandle) {
        *self.0.lock().expect("task lock") = Some(task);
    }
}

impl Drop for FollowTask {
    fn drop(&mut self) {
        if let Some(task) = self.0.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

/// The next update for a subscriber of a followed table: `reset()` (the
/// whole current table) first and after the subscriber lagged, otherwise
/// the next broadcast update; `None` once the owner is gone.
pub(crate) async fn next_update<U: Clone>(
    rx: &mut broadcast::Receiver<U>,
    reset_pending: &mut bool,
    label: &str,
    reset: impl FnOnce() -> U,
) -> Option<U> {
    if std::mem::take(reset_pending) {
        return Some(reset());
    }
    match rx.recv().await {
        Ok(update) => Some(update),
        Err(broadcast::error::RecvError::Lagged(missed)) => {
            tracing::warn!(missed, "{label}: subscriber lagged; sending a reset");
            // Anything queued is older than the table sent now.
            *rx = rx.resubscribe();
            Some(reset())
        }
        Err(broadcast::error::RecvError::Closed) => None,
    }
}

/// Lists every key under `prefix` at one revision, page by page.
pub(crate) async fn list(
    etcd: &Etcd,
    prefix: &str,
    page_size: i64,
) -> Result<(i64, Vec<pb::KeyValue>)> {
    let range_end = instance::prefix_range_end(prefix.as_bytes());
    let mut key = prefix.as_bytes().to_vec();
    if key.is_empty() {
        // Every key (an empty prefix): etcd refuses an empty key.
        key.push(0);
    }
    let mut revision = 0;
    let mut kvs = Vec::new();
    loop {
        let resp = etcd
            .range(pb::RangeRequest {
                key: key.clone(),
                range_end: range_end.clone(),
                limit: page_size,
                revision,
                ..Default::default()
            })
            .await?;
        if revision == 0 {
            revision = resp.header.as_ref().map_or(0, |h| h.revision);
        }
        let more = resp.more;
        if let Some(last) = resp.kvs.last() {
            key = last.key.clone();
            key.push(0);
        }
        kvs.extend(resp.kvs);
        if !more {
            return Ok((revision, kvs));
        }
    }
}

/// For an inline follower, the sink that applies its events and progress
/// on the watch stream's task.
fn sink<T: Follower>(weak: &Weak<T>) -> Option<Sink> {
    if !T::INLINE {
        return None;
    }
    let weak = weak.clone();
    Some(Box::new(move |event| {
        let Some(owner) = weak.upgrade() else {
            return false;
        };
        match event {
            WatchEvent::Events {
                revision,
                events,
                received,
            } => owner.apply_events_now(revision, events, received),
            WatchEvent::Progress { revision } => owner.progress(revision),
            _ => return true,
        }
        owner.staleness().fresh();
        true
    }))
}

/// Keeps `weak`'s owner current with `prefix`, which it listed at `listed`,
/// until the owner is dropped.
pub(crate) async fn follow<T: Follower>(
    weak: Weak<T>,
    etcd: Etcd,
    prefix: String,
    listed: i64,
    config: FollowConfig,
) {
    let mut from = Some(listed);
    let mut attempt = 0u32;
    // Watches refused in a row; reset once a watch delivers.
    let mut denials = 0u32;
    loop {
        let revision = match from.take() {
            Some(rev) => rev,
            None => match list(&etcd, &prefix, config.page_size).await {
                Ok((rev, kvs)) => {
                    let Some(owner) = weak.upgrade() else { return };
                    owner.apply_list(rev, kvs, &etcd).await;
                    owner.staleness().fresh();
                    attempt = 0;
                    rev
                }
                Err(e) => {
                    let Some(owner) = weak.upgrade() else { return };
                    if attempt == 0 && !e.is_transient() {
                        // Not an outage (a refused permission, bad
                        // credentials): say so once; retries stay quiet.
                        tracing::error!(error = %e, "{}: cannot list; retrying", owner.label());
                    }
                    owner.staleness().stale(e.to_string());
                    drop(owner);
                    tokio::time::sleep(backoff(attempt, config.backoff_base, config.backoff_cap))
                        .await;
                    attempt = attempt.saturating_add(1);
                    continue;
                }
            },
        };
        let options = WatchOptions::prefix(prefix.as_bytes().to_vec()).from_revision(revision + 1);
        let mut watcher = match etcd.watch_into(options, sink(&weak)).await {
            Ok(w) => w,
            Err(e) => {
                let label = weak.upgrade().map(|o| o.label()).unwrap_or_default();
                tracing::error!(error = %e, "{label}: cannot watch; following stops");
                return;
            }
        };
        while let Some(event) = watcher.next().await {
            let Some(owner) = weak.upgrade() else { return };
            match event {
                WatchEvent::Events {
                    revision,
                    events,
                    received,
                } => {
                    denials = 0;
                    owner.apply_events(revision, events, received, &etcd).await;
                    owner.staleness().fresh();
                }
                WatchEvent::Progress { revision } => {
                    denials = 0;
                    owner.progress(revision);
                    owner.staleness().fresh();
                }
                WatchEvent::Disconnected { error } => owner.staleness().stale(error),
                WatchEvent::Resumed => {
                    denials = 0;
                    owner.staleness().fresh();
                }
                event @ WatchEvent::PermissionDenied { .. } => {
                    let error = event.error().map(|e| e.to_string()).unwrap_or_default();
                    let wait = backoff(denials, config.backoff_base, config.backoff_cap);
                    denials = denials.saturating_add(1);
                    tracing::error!(%error, retry_in = ?wait, "{}: cannot watch", owner.label());
                    owner.staleness().stale(error);
                    drop(owner);
                    tokio::time::sleep(wait).await;
                    break;
                }
                WatchEvent::Compacted { compact_revision } => {
                    tracing::info!(
                        compact_revision,
                        "{}: history compacted while behind; re-listing",
                        owner.label()
                    );
                    break;
                }
                WatchEvent::Reset { revision } => {
                    tracing::warn!(
                        revision,
                        "{}: registry went back in time (wiped or restored); re-listing",
                        owner.label()
                    );
                    break;
                }
                WatchEvent::Canceled { reason } => {
                    tracing::warn!(%reason, "{}: watch canceled; re-listing", owner.label());
                    owner.staleness().stale(reason);
                    break;
                }
            }
        }
    }
}
