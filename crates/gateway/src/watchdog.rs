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

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::task::AbortHandle;

/// What one client connection has done, and whether it is asked to
/// finish (the gateway is draining).
#[derive(Debug, Default)]
pub(crate) struct Activity {
    started: AtomicU64,
    finished: AtomicU64,
    draining: AtomicBool,
    /// Wakes the connection's task to start its graceful shutdown.
    waker: Mutex<Option<Waker>>,
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

    /// Asks the connection to finish gracefully (see [`Drainable`]).
    pub(crate) fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let waker = self
            .waker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
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

/// A client connection that starts its graceful shutdown once its
/// [`Activity`] is asked to drain.
///
/// hyper-util's `GracefulShutdown` polled a watch channel's `changed()`
/// future on every poll of every connection (about 2% of the CPU per
/// request); this looks at one flag instead, and hands its task's waker
/// over only when it changes (for a spawned task, once).
pub(crate) struct Drainable<C> {
    conn: Pin<Box<C>>,
    activity: Arc<Activity>,
    shutdown: fn(Pin<&mut C>),
    waker: Option<Waker>,
    draining: bool,
}

impl<C: Future> Drainable<C> {
    /// `conn`, shut down with `shutdown` when `activity` drains.
    pub(crate) fn new(conn: C, activity: Arc<Activity>, shutdown: fn(Pin<&mut C>)) -> Self {
        Drainable {
            conn: Box::pin(conn),
            activity,
            shutdown,
            waker: None,
            draining: false,
        }
    }
}

impl<C: Future> Future for Drainable<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        if !this.draining {
            if this.waker.as_ref().is_none_or(|w| !w.will_wake(cx.waker())) {
                let waker = cx.waker().clone();
                *this
                    .activity
                    .waker
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(waker.clone());
                this.waker = Some(waker);
            }
            // After the waker is handed over: a drain from now on wakes it.
            if this.activity.is_draining() {
                this.draining = true;
                (this.shutdown)(this.conn.as_mut());
            }
        }
        this.conn.as_mut().poll(cx)
    }
}

impl<C> std::fmt::Debug for Drainable<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drainable")
            .field("draining", &self.draining)
            .finish_non_exhaustive()
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

    /// Asks every connection to finish gracefully.
    pub(crate) fn drain(&self) {
        for c in self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            c.activity.drain();
        }
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

    /// A connection that ends once shut down.
    struct Conn {
        shut: bool,
    }

    impl Future for Conn {
        type Output = ();

        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            if self.shut {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[tokio::test]
    async fn drained_connections_shut_down() {
        let activity = Arc::new(Activity::default());
        let conn = Drainable::new(Conn { shut: false }, activity.clone(), |mut c| {
            c.shut = true
        });
        let task = tokio::spawn(conn);
        // Polled once, waiting.
        tokio::task::yield_now().await;
        assert!(!task.is_finished());
        // The drain wakes it, and it shuts down.
        let dog = Watchdog::new(Duration::from_secs(60));
        dog.watch(activity, task.abort_handle());
        dog.drain();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the connection finished")
            .unwrap();
        // Drained before its first poll: shut down at once.
        let activity = Arc::new(Activity::default());
        activity.drain();
        let conn = Drainable::new(Conn { shut: false }, activity, |mut c| c.shut = true);
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("the connection finished");
    }
}
