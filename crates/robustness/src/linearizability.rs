//! A Wing & Gong / Lowe linearizability checker, as porcupine implements it.
//!
//! The operations become call and return events sorted by time (a call
//! before a return at the same instant: such operations overlap) in a doubly
//! linked list. A depth-first search takes the first call in the list whose
//! operation the model accepts in the current state, removes its call and
//! return ("lifts" it) and starts again from the head; reaching a return
//! means the operation it ends could not be placed before it, so the search
//! backtracks to the last lifted operation and tries the next call after it.
//! A cache of (set of linearized operations, model state) prunes the
//! configurations already explored; the set is kept as a Zobrist hash, so
//! that a step costs the same at the end of a 50k-operation history as at
//! its start.
//!
//! Operations whose outcome is unknown return at infinity: they may be
//! linearized at any point after their invocation, or never (the history is
//! linearizable once every known operation is placed).
//!
//! Three things keep the search close to linear on etcd histories:
//!
//! * The model pins operations: an answered write names its revision and an
//!   answered read its header revision, so at each point only the
//!   operations of the next revision fit (see [`crate::model::EtcdModel`]
//!   for lost writes).
//! * A known operation that leaves the state unchanged (a read, a definite
//!   error) is placed as soon as it fits, and no other candidate is tried
//!   in its place: anything valid with it later is valid with it there.
//! * Unknown-outcome operations are only tried where no known one fits,
//!   latest invoked first; and before the search the watch resolves most
//!   of them ([`crate::watch::patch_history`], [`crate::pin`]).
//!
//! Measured in a debug build on generated histories (8 clients, 10 keys),
//! without watch resolution (recorded runs: see ROBUSTNESS.md):
//! 10k operations with 1% lost answers check in about 2 s; with 3% lost,
//! 2000 operations take 0.6 s, 6000 about 19 s, and 10k exceed a minute
//! (every lost write that never happened stays a candidate to the end).
//! Disproving a history means exhausting the search before the bad
//! operation: quick without lost answers (10k in about 1 s), expensive
//! with many.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

/// A sequential specification the checker tests histories against.
pub trait Model {
    /// The state; equal states must hash equally (the cache relies on it).
    type State: Clone + Eq + Hash;
    /// One recorded operation: input, output and times.
    type Op;

    /// The state before the first operation.
    fn init(&self) -> Self::State;
    /// Invocation and return time; a return of `u64::MAX` is infinity.
    fn interval(&self, op: &Self::Op) -> (u64, u64);
    /// Whether `op` must take effect (its outcome is known). Operations that
    /// need not may stay unlinearized at the end.
    fn must_linearize(&self, op: &Self::Op) -> bool;
    /// The state after `op` at this point, or `None` if its recorded outcome
    /// is impossible here.
    fn step(&self, state: &Self::State, op: &Self::Op) -> Option<Self::State>;
}

/// Limits on the search.
#[derive(Debug, Clone, Copy)]
pub struct CheckOptions {
    /// Give up after this many attempted steps.
    pub max_steps: u64,
    /// Give up after this much wall time.
    pub timeout: Option<Duration>,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            max_steps: 50_000_000,
            timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// The checker's answer.
#[derive(Debug, Clone)]
pub enum Verdict<S> {
    /// A linearization exists.
    Linearizable {
        /// The operations (indices into the input) in linearization order;
        /// unknown-outcome operations left out did not take effect.
        order: Vec<usize>,
        /// The model state after all of them.
        state: S,
    },
    /// No linearization exists.
    Violation(Violation<S>),
    /// The budget ran out before an answer.
    Timeout {
        /// Steps attempted.
        steps: u64,
    },
}

impl<S> Verdict<S> {
    /// Whether the verdict is [`Verdict::Linearizable`].
    pub fn is_linearizable(&self) -> bool {
        matches!(self, Verdict::Linearizable { .. })
    }
}

/// Where the search got stuck, at its deepest.
#[derive(Debug, Clone)]
pub struct Violation<S> {
    /// The longest sequence of operations the search could linearize
    /// (indices into the input, in order).
    pub prefix: Vec<usize>,
    /// The model state after `prefix`.
    pub state: S,
    /// The operation whose return was reached without it having been placed:
    /// it cannot take effect after `prefix`, nor can anything that had to
    /// come before it.
    pub stuck: usize,
    /// The operations that were candidates at that point (invoked before
    /// `stuck` returned and not in `prefix`), `stuck` among them.
    pub candidates: Vec<usize>,
}

const NIL: usize = usize::MAX;

#[derive(Debug, Clone, Copy)]
struct Node {
    op: usize,
    call: bool,
    prev: usize,
    next: usize,
    /// For a call, its return node.
    ret: usize,
}

/// The set of linearized operations, as a Zobrist hash: the XOR of a
/// random 128-bit word per operation in it. Updating it is O(1) where a
/// bit set costs O(n) per cache entry (clone, hash, compare), which made
/// the search quadratic on long histories. Two different sets collide
/// with probability about 2^-128 per pair: a collision could only prune a
/// configuration wrongly, i.e. miss a linearization, never invent one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
struct SetHash(u64, u64);

impl SetHash {
    fn toggle(&mut self, op: usize) {
        let (a, b) = zobrist(op);
        self.0 ^= a;
        self.1 ^= b;
    }
}

/// Two splitmix64 outputs for `op`.
fn zobrist(op: usize) -> (u64, u64) {
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let x = (op as u64).wrapping_mul(2).wrapping_add(1);
    (
        mix(x.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        mix((x + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5bd1_e995),
    )
}

/// Checks `ops` against `model`.
pub fn check<M: Model>(model: &M, ops: &[M::Op], options: CheckOptions) -> Verdict<M::State> {
    let n = ops.len();
    // Events: (time, is_return, op); calls sort before returns at a tie.
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, op) in ops.iter().enumerate() {
        let (invoke, ret) = model.interval(op);
        events.push((invoke, false, i));
        events.push((ret.max(invoke), true, i));
    }
    events.sort_unstable();

    // Node `2n` is the head sentinel.
    let head = 2 * n;
    let mut nodes = vec![
        Node {
            op: NIL,
            call: false,
            prev: NIL,
            next: NIL,
            ret: NIL,
        };
        2 * n + 1
    ];
    let mut call_of = vec![NIL; n];
    let mut prev = head;
    for (idx, &(_, is_return, op)) in events.iter().enumerate() {
        nodes[idx] = Node {
            op,
            call: !is_return,
            prev,
            next: NIL,
            ret: NIL,
        };
        nodes[prev].next = idx;
        if is_return {
            nodes[call_of[op]].ret = idx;
        } else {
            call_of[op] = idx;
        }
        prev = idx;
    }

    let mut known_left = ops.iter().filter(|op| model.must_linearize(op)).count();
    let mut state = model.init();
    let mut linearized = SetHash::default();
    let mut cache: HashMap<(SetHash, u64), Vec<M::State>> = HashMap::new();
    let mut stack: Vec<Frame<M::State>> = Vec::new();
    let mut deepest: Option<Violation<M::State>> = None;
    // The deepest prefix is kept up to date incrementally: `unchanged` is
    // how much of it the stack still holds (the lowest the stack went
    // since it was taken), so a new deepest point copies only what is new
    // instead of the whole stack (which made long searches quadratic).
    let mut unchanged: usize = 0;
    let started = Instant::now();
    let mut steps: u64 = 0;
    let mut entry = nodes[head].next;
    // First the known operations among the candidates (from the head to the
    // first return of a known operation, the stop), then the unknown ones,
    // latest invoked first (from the stop back to the head): an operation
    // that need not take effect is only tried where nothing that must take
    // effect fits, and the one most likely to have taken effect there first.
    // The order only changes which linearization is found first, not
    // whether one is.
    let mut stop = NIL;

    loop {
        if known_left == 0 {
            let order = stack.iter().map(|f| nodes[f.node].op).collect();
            return Verdict::Linearizable { order, state };
        }
        steps += 1;
        if steps > options.max_steps
            || (steps.is_multiple_of(1024)
                && options.timeout.is_some_and(|t| started.elapsed() > t))
        {
            return Verdict::Timeout { steps };
        }
        let node = if entry == NIL || entry == head {
            None
        } else {
            Some(nodes[entry])
        };
        let unknown_phase = stop != NIL;
        // Forward through the list for known candidates, backward from the
        // stop for unknown ones.
        let onward = |node: &Node| if unknown_phase { node.prev } else { node.next };
        let mut backtrack = false;
        match node {
            Some(node) if !node.call || model.must_linearize(&ops[node.op]) == unknown_phase => {
                if !node.call && !unknown_phase && model.must_linearize(&ops[node.op]) {
                    // The first return of a known operation: the known
                    // candidates are exhausted, now the unknown ones.
                    stop = entry;
                    entry = node.prev;
                } else {
                    // Not this phase's kind of candidate, or the return of
                    // an operation that may stay unlinearized forever.
                    entry = onward(&node);
                }
            }
            Some(node) => {
                let op = node.op;
                let must = !unknown_phase;
                match model.step(&state, &ops[op]) {
                    None => entry = onward(&node),
                    // No effect and nothing to verify: the same as never.
                    Some(s) if !must && s == state => entry = onward(&node),
                    Some(s) => {
                        // A known operation that leaves the state as it is
                        // (a read, a definite error) can be placed as soon
                        // as it is a candidate without loss: anything valid
                        // with it later is valid with it here. So it is not
                        // worth trying the other candidates in its place.
                        let forced = must && s == state;
                        linearized.toggle(op);
                        let key = (linearized, state_hash(&s));
                        let bucket = cache.entry(key).or_default();
                        if bucket.contains(&s) {
                            linearized.toggle(op);
                            if forced {
                                backtrack = true;
                            } else {
                                entry = onward(&node);
                            }
                        } else {
                            bucket.push(s.clone());
                            stack.push(Frame {
                                node: entry,
                                state: std::mem::replace(&mut state, s),
                                forced,
                                stop,
                            });
                            if must {
                                known_left -= 1;
                            }
                            lift(&mut nodes, entry);
                            entry = nodes[head].next;
                            stop = NIL;
                        }
                    }
                }
            }
            None if !unknown_phase => {
                // The end of the list with known operations left cannot
                // happen (their returns are in it); treat it as a stop.
                stop = head;
                entry = head;
            }
            None => {
                // Every candidate before the stop tried.
                if deepest
                    .as_ref()
                    .is_none_or(|d| stack.len() > d.prefix.len())
                {
                    let stuck = if stop == head { NIL } else { nodes[stop].op };
                    let mut candidates = Vec::new();
                    let mut e = nodes[head].next;
                    while e != NIL && e != stop {
                        if nodes[e].call {
                            candidates.push(nodes[e].op);
                        }
                        e = nodes[e].next;
                    }
                    let mut prefix = deepest.take().map(|d| d.prefix).unwrap_or_default();
                    prefix.truncate(unchanged);
                    prefix.extend(stack[unchanged..].iter().map(|f| nodes[f.node].op));
                    unchanged = stack.len();
                    deepest = Some(Violation {
                        prefix,
                        state: state.clone(),
                        stuck,
                        candidates,
                    });
                }
                backtrack = true;
            }
        }
        while backtrack {
            let Some(frame) = stack.pop() else {
                return Verdict::Violation(deepest.expect("recorded before backtracking"));
            };
            unchanged = unchanged.min(stack.len());
            let op = nodes[frame.node].op;
            state = frame.state;
            linearized.toggle(op);
            if model.must_linearize(&ops[op]) {
                known_left += 1;
            }
            unlift(&mut nodes, frame.node);
            stop = frame.stop;
            entry = if stop == NIL {
                nodes[frame.node].next
            } else {
                nodes[frame.node].prev
            };
            backtrack = frame.forced;
        }
    }
}

/// One linearized operation on the search stack.
struct Frame<S> {
    /// Its call node.
    node: usize,
    /// The state before it.
    state: S,
    /// Placed without alternatives (see the search loop).
    forced: bool,
    /// The stop of the scan for unknown candidates it was placed in, or
    /// `NIL` if it was placed in the scan for known ones.
    stop: usize,
}

fn state_hash<S: Hash>(state: &S) -> u64 {
    let mut h = DefaultHasher::new();
    state.hash(&mut h);
    h.finish()
}

fn lift(nodes: &mut [Node], call: usize) {
    let c = nodes[call];
    nodes[c.prev].next = c.next;
    if c.next != NIL {
        nodes[c.next].prev = c.prev;
    }
    let r = nodes[c.ret];
    nodes[r.prev].next = r.next;
    if r.next != NIL {
        nodes[r.next].prev = r.prev;
    }
}

fn unlift(nodes: &mut [Node], call: usize) {
    let ret = nodes[call].ret;
    let r = nodes[ret];
    nodes[r.prev].next = ret;
    if r.next != NIL {
        nodes[r.next].prev = ret;
    }
    let c = nodes[call];
    nodes[c.prev].next = call;
    if c.next != NIL {
        nodes[c.next].prev = call;
    }
}
