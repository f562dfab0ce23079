//! Per-worker state ("lanes").
//!
//! Every serving thread has a lane of its own: its own copy of the route
//! table's routes, its own load balancers (so power of two choices counts
//! the requests in flight from this thread) and its own handles on the
//! instances' shared state. A request then writes only to memory its own
//! thread writes: no reference count or in-flight counter moves between
//! cores on every request. What must be shared (passive health, discovery's
//! table, metrics, which are sharded themselves) is read on the request path,
//! or written only on failures.
//!
//! Threads that are not serving threads (the admin listener, tests) use
//! lane 0.

use std::cell::Cell;

thread_local! {
    static LANE: Cell<usize> = const { Cell::new(0) };
}

/// Makes the calling thread use lane `i` (serving thread `i`).
pub(crate) fn set(i: usize) {
    LANE.with(|l| l.set(i));
}

/// The calling thread's lane, below `lanes` (which must be positive).
#[inline]
pub(crate) fn current(lanes: usize) -> usize {
    let i = LANE.with(Cell::get);
    if i < lanes { i } else { i % lanes }
}
