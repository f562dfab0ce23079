//! Idle client connections are closed: kept-alive connections nobody uses,
//! and request heads that never complete (slowloris).
//!
//! A timer per request (hyper's header-read timeout) cost about 7% of the
//! gateway's CPU per request. Instead, each connection counts the requests
//! it started and finished ([`Activity`], two uncontended atomic additions
//! per request) and each serving thread's watchdog looks at its
//! connections a few times per idle period: one with no request in
//! progress whose counts have not moved for the idle timeout is closed
//! (its task aborted, which drops the socket). A connection serving a
//! request, however long, is left alone; the route timeout bounds the
//! upstream's part, and a tunnel (after an upgrade) no longer belongs to
//! its connection's task.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::task::AbortHandle;

/// What one client connection has done.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    started: AtomicU64,
    finished: AtomicU64,
}

impl Activity {
    /// A request arrived.
    pub(crate) fn start(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    /// A response was sent (or abandoned).
    pub(crate) fn finish(&self) {
        self.finished.fetch_add(1, Ordering::Relaxed);
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.started.load(Ordering::Relaxed),
            self.finished.load(Ordering::Relaxed),
        )
    }
}

/// Counts a request finished when dropped (it travels with the response
/// body, which hyper drops once it is written or the client has gone).
#[derive(Debug)]
pub(crate) struct Finished(pub(crate) Arc<Activity>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.finish();
    }
}

#[derive(Debug)]
struct Watched {
    activity: Arc<Activity>,
    task: AbortHandle,
    /// The counts at the last look, and when they last changed.
    seen: (u64, u64),
    since: Instant,
}

/// One serving thread's connections.
#[derive(Debug, Clone)]
pub(crate) struct Watchdog {
    connections: Arc<Mutex<Vec<Watched>>>,
    idle: Duration,
}

impl Watchdog {
    pub(crate) fn new(idle: Duration) -> Self {
        Watchdog {
            connections: Arc::default(),
            idle,
        }
    }

    /// Watches a connection served by `task`.
    pub(crate) fn watch(&self, activity: Arc<Activity>, task: AbortHandle) {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Watched {
                activity,
                task,
                seen: (0, 0),
                since: Instant::now(),
            });
    }

    /// How often [`look`](Self::look) should run.
    pub(crate) fn interval(&self) -> Duration {
        (self.idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(5))
    }

    /// Forgets finished connections and closes idle ones; gives how many
    /// it closed.
    pub(crate) fn look(&self) -> usize {
        let now = Instant::now();
        let mut closed = 0;
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain_mut(|c| {
                if c.task.is_finished() {
                    return false;
                }
                let counts = c.activity.counts();
                if counts != c.seen {
                    c.seen = counts;
                    c.since = now;
                    return true;
                }
                let busy = counts.0 != counts.1;
                if busy || now.saturating_duration_since(c.since) < self.idle {
                    return true;
                }
                c.task.abort();
                closed += 1;
                false
            });
        closed
    }

    /// Runs [`look`](Self::look) every [`interval`](Self::interval).
    pub(crate) async fn run(self) {
        let mut tick = tokio::time::interval(self.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let closed = self.look();
            if closed > 0 {
                tracing::debug!(closed, idle = ?self.idle, "closed idle client connections");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_connections_are_closed_busy_ones_kept() {
        let dog = Watchdog::new(Duration::from_millis(50));
        let spawn = |activity: &Arc<Activity>| {
            let task = tokio::spawn(std::future::pending::<()>());
            dog.watch(activity.clone(), task.abort_handle());
            task
        };
        let idle = Arc::new(Activity::default());
        let busy = Arc::new(Activity::default());
        let used = Arc::new(Activity::default());
        let idle_task = spawn(&idle);
        let busy_task = spawn(&busy);
        let used_task = spawn(&used);
        busy.start();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !idle_task.is_finished() {
            assert!(Instant::now() < deadline, "the idle connection was kept");
            // `used` keeps serving requests.
            used.start();
            used.finish();
            dog.look();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            !busy_task.is_finished(),
            "a request in progress is never cut"
        );
        assert!(!used_task.is_finished());
        // Once its request is done, the busy one goes idle too.
        {
            let _done = Finished(busy.clone());
        }
        while !busy_task.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the finished connection was kept"
            );
            used.start();
            used.finish();
            dog.look();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!used_task.is_finished());
        assert_eq!(dog.connections.lock().unwrap().len(), 1);
    }
}
