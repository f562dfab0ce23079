//! Failed logins from one peer slowed down, for every muster server that
//! checks passwords (the embedded registry's `Authenticate`, the
//! dashboard's login form): after a failure, that peer's
//! next attempts are let through one at a time, each waiting a delay that
//! doubles with every consecutive failure (50 ms, 100 ms, ... up to 5 s).
//! A success forgets the peer; so do ten quiet minutes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The delay after the first failure.
const FIRST_DELAY: Duration = Duration::from_millis(50);
/// The longest delay.
const MAX_DELAY: Duration = Duration::from_secs(5);
/// How long a peer's failures are remembered without a new one.
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Peers remembered at most; past this, the quiet ones are forgotten first.
const MAX_PEERS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Peer {
    failures: u32,
    /// When this peer's next attempt may be checked.
    next: Instant,
    last_failure: Instant,
}

/// Per-peer login throttling, with counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Throttle {
    peers: Mutex<HashMap<IpAddr, Peer>>,
    failures: AtomicU64,
    delayed: AtomicU64,
}

fn delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (FIRST_DELAY * 2u32.pow(doublings)).min(MAX_DELAY)
}

impl Throttle {
    /// How long `peer`'s attempt must wait before its password is checked
    /// (zero for a peer without recent failures). Reserves the slot, so
    /// concurrent attempts from one peer queue up behind each other.
    pub fn reserve(&self, peer: Option<IpAddr>) -> Duration {
        let Some(ip) = peer else {
            return Duration::ZERO;
        };
        let now = Instant::now();
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(p) = peers.get_mut(&ip) else {
            return Duration::ZERO;
        };
        if now.duration_since(p.last_failure) > FORGET_AFTER {
            peers.remove(&ip);
            return Duration::ZERO;
        }
        let slot = p.next.max(now);
        p.next = slot + delay(p.failures);
        let wait = slot - now;
        if !wait.is_zero() {
            self.delayed.fetch_add(1, Ordering::Relaxed);
        }
        wait
    }

    /// Records a failed attempt from `peer`.
    pub fn failed(&self, peer: Option<IpAddr>) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let Some(ip) = peer else { return };
        let now = Instant::now();
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if peers.len() >= MAX_PEERS && !peers.contains_key(&ip) {
            peers.retain(|_, p| now.duration_since(p.last_failure) < FORGET_AFTER);
            if peers.len() >= MAX_PEERS
                && let Some(oldest) = peers
                    .iter()
                    .min_by_key(|(_, p)| p.last_failure)
                    .map(|(ip, _)| *ip)
            {
                peers.remove(&oldest);
            }
        }
        let p = peers.entry(ip).or_insert(Peer {
            failures: 0,
            next: now,
            last_failure: now,
        });
        p.failures = p.failures.saturating_add(1);
        p.last_failure = now;
        p.next = p.next.max(now + delay(p.failures));
    }

    /// Records a successful login from `peer`: its failures are forgotten.
    pub fn succeeded(&self, peer: Option<IpAddr>) {
        if let Some(ip) = peer {
            self.peers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&ip);
        }
    }

    /// Failed logins since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Login attempts that had to wait.
    pub fn delayed(&self) -> u64 {
        self.delayed.load(Ordering::Relaxed)
    }

    /// Peers currently slowed down.
    pub fn peers(&self) -> usize {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_with_failures_and_a_success_resets_them() {
        let t = Throttle::default();
        let peer = Some(IpAddr::from([127, 0, 0, 1]));
        assert_eq!(t.reserve(peer), Duration::ZERO);
        t.failed(peer);
        let first = t.reserve(peer);
        assert!(first > Duration::ZERO && first <= FIRST_DELAY, "{first:?}");
        t.failed(peer);
        t.failed(peer);
        // Queued behind the first reservation, then a 4x delay.
        let later = t.reserve(peer);
        assert!(later > first, "{later:?} after {first:?}");
        assert_eq!(t.failures(), 3);
        t.succeeded(peer);
        assert_eq!(t.reserve(peer), Duration::ZERO);
        // Other peers are never slowed by one peer's failures.
        t.failed(peer);
        assert_eq!(
            t.reserve(Some(IpAddr::from([127, 0, 0, 2]))),
            Duration::ZERO
        );
    }

    #[test]
    fn the_delay_is_capped() {
        assert_eq!(delay(1), FIRST_DELAY);
        assert_eq!(delay(2), FIRST_DELAY * 2);
        assert_eq!(delay(100), MAX_DELAY);
    }
}
