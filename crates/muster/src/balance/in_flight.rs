//! Counting requests in flight per instance.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The number of requests in flight to one instance.
///
/// Shared (`Arc`) between the balancers built for successive instance sets,
/// so requests started before a rebuild still count, and are still
/// subtracted when they finish, after it. Each counter sits on its own cache
/// line so counters of different instances do not contend.
#[repr(align(128))]
#[derive(Default)]
pub struct InFlightCounter {
    count: AtomicUsize,
}

impl InFlightCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        InFlightCounter::default()
    }

    /// The requests currently in flight.
    #[inline]
    pub fn get(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Counts one more request until the returned guard is dropped.
    #[inline]
    pub fn track(self: &Arc<Self>) -> InFlight {
        self.count.fetch_add(1, Ordering::Relaxed);
        InFlight {
            counter: Arc::clone(self),
        }
    }
}

impl fmt::Debug for InFlightCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("InFlightCounter").field(&self.get()).finish()
    }
}

/// A request counted as in flight; dropping it (when the request finishes,
/// fails or is cancelled) subtracts it again.
#[must_use = "the request stops counting as in flight as soon as this is dropped"]
pub struct InFlight {
    counter: Arc<InFlightCounter>,
}

impl InFlight {
    /// The requests in flight to the same instance, this one included.
    pub fn current(&self) -> usize {
        self.counter.get()
    }
}

impl Drop for InFlight {
    #[inline]
    fn drop(&mut self) {
        self.counter.count.fetch_sub(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("current", &self.current())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_count_until_dropped() {
        let c = Arc::new(InFlightCounter::new());
        let a = c.track();
        let b = c.track();
        assert_eq!(c.get(), 2);
        assert_eq!(a.current(), 2);
        drop(a);
        assert_eq!(c.get(), 1);
        drop(b);
        assert_eq!(c.get(), 0);
    }
}
