//! Fault injection: a registry that misbehaves on purpose (`muster serve
//! --faults SPEC`), so that services can be tested against a slow, flaky or
//! lossy registry before production shows them one.
//!
//! Every fault is off unless the specification ([`FaultSpec`]) names it.
//! Each one is counted in `/metrics` (`muster_faults_injected_total`) and
//! logged when it acts (latency at debug level, as it acts on every
//! request; the others at info or warn):
//!
//! - **latency**: every request (unary, or the opening of a stream) waits
//!   before it is served; messages on open streams are not delayed.
//! - **drop-watch**: one open watch stream, chosen at random, ends with
//!   `Unavailable`, as when its connection breaks; clients must resume it
//!   from their last revision.
//! - **unavailable**: once per period, every request is refused with
//!   `Unavailable` for the window, and every watch and keep-alive stream is
//!   cut when it opens, as during a restart of the registry.
//! - **compact**: the history is compacted at the current revision every
//!   period, so that watchers that fall behind or reconnect late are told
//!   `compacted` and must list again.
//! - **lease-expire-early**: a lease grant or keep-alive dooms its lease
//!   with the given probability: it expires at a random moment within its
//!   TTL whatever keep-alives follow (they are answered as usual until it
//!   has expired, then with TTL 0, as etcd answers for a lost lease).
//!
//! The random choices come from one generator, seeded with `seed=` or with
//! a seed drawn at start and logged, so that a run can be repeated.

mod layer;
mod spec;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

pub use layer::{FaultBody, FaultLayer, FaultService};
pub use spec::{FAULT_NAMES, FaultSpec, FaultSpecError, Latency, Outage, Rate};

use crate::core::Core;

/// One fault, for its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A request delayed.
    Latency,
    /// A watch stream cut.
    DropWatch,
    /// A request refused or a stream cut during an outage window.
    Unavailable,
    /// A compaction.
    Compact,
    /// A lease doomed to expire early.
    LeaseExpireEarly,
}

impl Fault {
    const ALL: [Fault; 5] = [
        Fault::Latency,
        Fault::DropWatch,
        Fault::Unavailable,
        Fault::Compact,
        Fault::LeaseExpireEarly,
    ];

    /// Its name in the specification and in `/metrics`.
    pub fn name(self) -> &'static str {
        FAULT_NAMES[self as usize]
    }
}

/// Which streams a cut applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamKind {
    Watch,
    KeepAlive,
}

/// What to do with a request before it is served.
#[derive(Debug)]
pub(crate) enum Before {
    /// Serve it now.
    Go,
    /// Serve it after this long.
    Wait(Duration),
    /// Refuse it: the registry is in an outage window.
    Refuse,
}

/// The message of every refusal and cut, so that whoever reads a client's
/// log knows the registry did it on purpose.
pub(crate) const UNAVAILABLE_MESSAGE: &str =
    "muster: the registry is unavailable (fault injected by --faults unavailable=)";
/// The message of a cut watch stream.
pub(crate) const DROPPED_MESSAGE: &str =
    "muster: watch stream dropped (fault injected by --faults drop-watch=)";

/// The faults of a running server, and what they have done.
#[derive(Debug)]
pub struct Faults {
    spec: FaultSpec,
    seed: u64,
    rng: Mutex<fastrand::Rng>,
    /// Until when requests are refused, if an outage window is open.
    outage_until: Mutex<Option<Instant>>,
    streams: Mutex<HashMap<u64, (StreamKind, Arc<Cut>)>>,
    next_stream: AtomicU64,
    injected: [AtomicU64; 5],
}

/// Ends one stream when fired.
#[derive(Debug, Default)]
pub(crate) struct Cut {
    notify: Notify,
    reason: Mutex<Option<&'static str>>,
}

impl Cut {
    fn fire(&self, reason: &'static str) {
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
        self.notify.notify_one();
    }

    pub(crate) async fn fired(&self) -> &'static str {
        self.notify.notified().await;
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .unwrap_or(UNAVAILABLE_MESSAGE)
    }
}

/// A stream's registration; dropping it unregisters the stream.
#[derive(Debug)]
pub(crate) struct StreamGuard {
    faults: Arc<Faults>,
    id: u64,
    pub(crate) cut: Arc<Cut>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.faults.lock_streams().remove(&self.id);
    }
}

impl Faults {
    /// The faults of `spec`, ready to act once [`Faults::run`] runs.
    pub fn new(spec: FaultSpec) -> Arc<Faults> {
        let seed = spec.seed.unwrap_or_else(|| fastrand::u64(..));
        Arc::new(Faults {
            spec,
            seed,
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            outage_until: Mutex::new(None),
            streams: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(0),
            injected: Default::default(),
        })
    }

    /// What is injected.
    pub fn spec(&self) -> &FaultSpec {
        &self.spec
    }

    /// The seed of the random choices (given, or drawn at start).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// How many times `fault` has acted.
    pub fn injected(&self, fault: Fault) -> u64 {
        self.injected[fault as usize].load(Ordering::Relaxed)
    }

    /// Every fault's count, named, for `/metrics`.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        Fault::ALL
            .iter()
            .map(|&f| (f.name(), self.injected(f)))
            .collect()
    }

    fn count(&self, fault: Fault) {
        self.injected[fault as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn lock_streams(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (StreamKind, Arc<Cut>)>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn random<T>(&self, f: impl FnOnce(&mut fastrand::Rng) -> T) -> T {
        f(&mut self.rng.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Whether an outage window is open now.
    pub fn in_outage(&self) -> bool {
        self.outage_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|until| Instant::now() < until)
    }

    /// Decides a request's fate (and counts it).
    pub(crate) fn before_request(&self) -> Before {
        if self.in_outage() {
            self.count(Fault::Unavailable);
            return Before::Refuse;
        }
        let Some(Latency { base, jitter }) = self.spec.latency else {
            return Before::Go;
        };
        let wait = if jitter.is_zero() {
            base
        } else {
            let offset = self.random(|r| r.f64() * 2.0 - 1.0);
            Duration::from_secs_f64((base.as_secs_f64() + offset * jitter.as_secs_f64()).max(0.0))
        };
        self.count(Fault::Latency);
        tracing::debug!(?wait, "fault: delaying a request");
        Before::Wait(wait)
    }

    /// Registers an open stream, so that a fault can cut it.
    pub(crate) fn stream(self: &Arc<Self>, kind: StreamKind) -> StreamGuard {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let cut = Arc::new(Cut::default());
        self.lock_streams().insert(id, (kind, cut.clone()));
        StreamGuard {
            faults: self.clone(),
            id,
            cut,
        }
    }

    /// Whether a lease granted or renewed now with `ttl` is doomed, and if
    /// so how long from now it expires.
    pub fn lease_expiry(&self, id: i64, ttl: Duration) -> Option<Duration> {
        let p = self.spec.lease_expire_early?;
        let (doomed, at) = self.random(|r| (r.f64() < p, r.f64()));
        if !doomed {
            return None;
        }
        let after = ttl.mul_f64(at);
        self.count(Fault::LeaseExpireEarly);
        tracing::info!(
            lease = format_args!("{id:x}"),
            expires_in = ?after,
            "fault: lease doomed to expire early"
        );
        Some(after)
    }

    /// Cuts one watch stream chosen at random; false if none is open.
    fn drop_one_watch(&self) -> bool {
        let watches: Vec<Arc<Cut>> = self
            .lock_streams()
            .values()
            .filter(|(kind, _)| *kind == StreamKind::Watch)
            .map(|(_, cut)| cut.clone())
            .collect();
        if watches.is_empty() {
            return false;
        }
        let i = self.random(|r| r.usize(..watches.len()));
        watches[i].fire(DROPPED_MESSAGE);
        self.count(Fault::DropWatch);
        tracing::info!(open = watches.len(), "fault: dropped a watch stream");
        true
    }

    /// Opens an outage window of `duration`, cutting every stream.
    fn open_outage(&self, duration: Duration) {
        *self
            .outage_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + duration);
        let cuts: Vec<Arc<Cut>> = self
            .lock_streams()
            .values()
            .map(|(_, cut)| cut.clone())
            .collect();
        for cut in &cuts {
            cut.fire(UNAVAILABLE_MESSAGE);
            self.count(Fault::Unavailable);
        }
        tracing::warn!(
            ?duration,
            streams_cut = cuts.len(),
            "fault: registry unavailable"
        );
    }

    /// Waits about `mean` (uniformly between half and one and a half of it).
    async fn jittered(&self, mean: Duration) {
        let factor = self.random(|r| 0.5 + r.f64());
        tokio::time::sleep(mean.mul_f64(factor)).await;
    }

    /// Runs the timed faults (drop-watch, unavailable, compact) until the
    /// server stops: spawn it with the server's tasks.
    pub async fn run(self: Arc<Self>, core: Arc<Core>) {
        tracing::warn!(spec = %self.spec, seed = self.seed, "fault injection is on");
        let drop_watch = async {
            let Some(Rate { times, period }) = self.spec.drop_watch else {
                return std::future::pending().await;
            };
            let mean = period / times;
            loop {
                self.jittered(mean).await;
                self.drop_one_watch();
            }
        };
        let outage = async {
            let Some(Outage { duration, period }) = self.spec.unavailable else {
                return std::future::pending().await;
            };
            loop {
                tokio::time::sleep(period - duration).await;
                self.open_outage(duration);
                tokio::time::sleep(duration).await;
                tracing::info!("fault: registry available again");
            }
        };
        let compact = async {
            let Some(period) = self.spec.compact else {
                return std::future::pending().await;
            };
            loop {
                tokio::time::sleep(period).await;
                let revision = core.committed();
                let (_, _, compacted) = core.counts();
                if revision <= compacted {
                    continue;
                }
                match core.compact(revision).await {
                    Ok(_) => {
                        self.count(Fault::Compact);
                        tracing::info!(revision, "fault: compacted the history");
                    }
                    Err(e) => tracing::debug!(revision, error = %e, "fault: compaction skipped"),
                }
            }
        };
        tokio::join!(drop_watch, outage, compact);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults(spec: &str) -> Arc<Faults> {
        Faults::new(spec.parse().unwrap())
    }

    #[test]
    fn latency_stays_within_its_jitter() {
        let f = faults("latency=50ms±20ms,seed=1");
        for _ in 0..1000 {
            match f.before_request() {
                Before::Wait(d) => {
                    assert!(
                        d >= Duration::from_millis(30) && d <= Duration::from_millis(70),
                        "{d:?}"
                    )
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(f.injected(Fault::Latency), 1000);
    }

    #[test]
    fn an_outage_refuses_and_cuts_every_stream() {
        let f = faults("unavailable=1s/10s");
        assert!(matches!(f.before_request(), Before::Go));
        let watch = f.stream(StreamKind::Watch);
        let keepalive = f.stream(StreamKind::KeepAlive);
        f.open_outage(Duration::from_secs(60));
        assert!(matches!(f.before_request(), Before::Refuse));
        for guard in [&watch, &keepalive] {
            let reason = futures_now(guard.cut.fired());
            assert_eq!(reason, Some(UNAVAILABLE_MESSAGE));
        }
        assert_eq!(f.injected(Fault::Unavailable), 3);
    }

    #[test]
    fn drop_watch_cuts_one_watch_and_never_a_keepalive() {
        let f = faults("drop-watch=1/min,seed=3");
        assert!(!f.drop_one_watch(), "nothing to drop");
        let keepalive = f.stream(StreamKind::KeepAlive);
        assert!(!f.drop_one_watch(), "keep-alive streams are not watches");
        let a = f.stream(StreamKind::Watch);
        let b = f.stream(StreamKind::Watch);
        assert!(f.drop_one_watch());
        let cut = [&a, &b]
            .iter()
            .filter(|g| futures_now(g.cut.fired()).is_some())
            .count();
        assert_eq!(cut, 1);
        assert_eq!(futures_now(keepalive.cut.fired()), None);
        drop((a, b));
        assert_eq!(f.lock_streams().len(), 1, "dropped streams unregister");
    }

    #[test]
    fn leases_are_doomed_at_the_given_rate_within_their_ttl() {
        let f = faults("lease-expire-early=25%,seed=9");
        let ttl = Duration::from_secs(10);
        let doomed: Vec<Duration> = (0..4000).filter_map(|i| f.lease_expiry(i, ttl)).collect();
        assert!((800..1200).contains(&doomed.len()), "{}", doomed.len());
        assert!(doomed.iter().all(|d| *d < ttl));
        // Seeded: the same seed makes the same choices.
        let g = faults("lease-expire-early=25%,seed=9");
        let again: Vec<Duration> = (0..4000).filter_map(|i| g.lease_expiry(i, ttl)).collect();
        assert_eq!(doomed, again);
    }

    /// Polls a future once.
    fn futures_now<F: std::future::Future>(f: F) -> Option<F::Output> {
        let mut f = std::pin::pin!(f);
        let waker = std::task::Waker::noop();
        match f.as_mut().poll(&mut std::task::Context::from_waker(waker)) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
