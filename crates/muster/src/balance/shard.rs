//! Per-thread slots, so picks on different cores write to different cache
//! lines.
//!
//! On the hot path every write to memory another core also writes (a
//! shared counter, the reference count of a shared `Arc`) moves that cache
//! line between cores, which costs more than the whole rest of a pick and
//! stops picks from scaling with cores. The structures here are therefore
//! replicated [`slot_count`] times, and each thread uses the slot
//! [`thread_slot`] gives it. Live threads get distinct small numbers
//! (numbers of exited threads are reused), so threads share a slot only when
//! more than [`slot_count`] of them pick.
//!
//! A [`Cursor`] is a round-robin position built that way: one counter per
//! slot, each on its own cache line. Each slot walks the whole sequence in
//! order from its own starting point, so every thread's picks are exactly
//! even over each full cycle, and so are the process's (up to one cycle per
//! slot). Starting points are random for a new cursor (the reason gRPC's
//! round-robin starts at a random index: processes that rebuild at the same
//! moment would otherwise all send their next request to the first
//! instance) and carried over when a cursor replaces a previous one.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

/// At most this many slots.
const MAX_SLOTS: usize = 64;

/// How many slots per-thread structures have: twice the available
/// parallelism, rounded up to a power of two, at most 64.
pub(crate) fn slot_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cpus * 2).next_power_of_two().min(MAX_SLOTS)
    })
}

/// The calling thread's slot, below [`slot_count`].
#[inline]
pub(crate) fn thread_slot() -> usize {
    // During thread-local destruction the number may be gone: use slot 0.
    NUMBER.try_with(|n| n.slot).unwrap_or(0)
}

thread_local! {
    static NUMBER: ThreadNumber = ThreadNumber::acquire();
}

/// Numbers released by exited threads, smallest first.
static FREE: Mutex<BinaryHeap<Reverse<usize>>> = Mutex::new(BinaryHeap::new());
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A number unique among live threads, returned for reuse on thread exit,
/// and the slot it maps to.
struct ThreadNumber {
    number: usize,
    slot: usize,
}

impl ThreadNumber {
    fn acquire() -> Self {
        let reused = FREE.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let number = reused.map_or_else(|| NEXT.fetch_add(1, Ordering::Relaxed), |r| r.0);
        ThreadNumber {
            number,
            slot: number & (slot_count() - 1),
        }
    }
}

impl Drop for ThreadNumber {
    fn drop(&mut self) {
        FREE.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Reverse(self.number));
    }
}

/// One counter on its own cache line (128 bytes: adjacent-line prefetch
/// makes pairs of 64-byte lines behave as one on x86).
#[repr(align(128))]
struct Slot(AtomicUsize);

/// A per-thread round-robin position; see the module docs.
pub(crate) struct Cursor {
    slots: Box<[Slot]>,
}

impl Cursor {
    /// A cursor with random starting points, or with `previous`'s positions.
    pub(crate) fn new(previous: Option<&Cursor>) -> Self {
        let slots = (0..slot_count())
            .map(|i| {
                let start = match previous {
                    Some(p) => p.slots[i].0.load(Ordering::Relaxed),
                    None => fastrand::usize(..),
                };
                Slot(AtomicUsize::new(start))
            })
            .collect();
        Cursor { slots }
    }

    /// The next position of the calling thread's slot; reduce it modulo the
    /// sequence length.
    #[inline]
    pub(crate) fn next(&self) -> usize {
        // `fetch_add` rather than load-then-store keeps each slot exact even
        // when two threads share it; on a line only this core writes it
        // costs a few ns.
        self.slots[thread_slot()].0.fetch_add(1, Ordering::Relaxed)
    }
}

impl fmt::Debug for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cursor")
            .field("slots", &self.slots.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carries_positions_over() {
        let a = Cursor::new(None);
        let first = a.next();
        let b = Cursor::new(Some(&a));
        assert_eq!(b.next(), first.wrapping_add(1));
    }

    #[test]
    fn live_threads_get_distinct_numbers_and_exited_ones_are_reused() {
        let mine = NUMBER.with(|n| n.number);
        let barrier = std::sync::Barrier::new(2);
        let (a, b) = std::thread::scope(|s| {
            let f = || {
                let n = NUMBER.with(|n| n.number);
                barrier.wait();
                n
            };
            let a = s.spawn(f);
            let b = s.spawn(f);
            (a.join().unwrap(), b.join().unwrap())
        });
        assert!(mine != a && mine != b && a != b);
        assert_eq!(mine, NUMBER.with(|n| n.number));
        // Both exited: a new thread gets one of their numbers back (unless a
        // concurrently running test took it first).
        let c = std::thread::spawn(|| NUMBER.with(|n| n.number))
            .join()
            .unwrap();
        assert!(c != mine);
        assert!(thread_slot() < slot_count());
    }
}
