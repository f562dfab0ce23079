//! Leases: time-to-live grants that keys attach to.
//!
//! The lessor only keeps time and bookkeeping; revoking a lease (deleting its
//! keys in one revision) goes through the server's write path. Like etcd, a
//! restarted server gives every lease its full TTL again, and keep-alives are
//! not persisted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// The largest TTL etcd accepts (`MaxLeaseTTL`).
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// Why a lease operation failed, with etcd's messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// No such lease (never granted, revoked or expired).
    #[error("etcdserver: requested lease not found")]
    NotFound,
    /// Granting an id that is in use.
    #[error("etcdserver: lease already exists")]
    Exists,
    /// A TTL above [`MAX_LEASE_TTL`].
    #[error("etcdserver: too large lease TTL")]
    TtlTooLarge,
}

#[derive(Debug, Clone)]
struct Lease {
    ttl: i64,
    expires: Instant,
    keys: BTreeSet<Vec<u8>>,
    /// Doomed by fault injection: keep-alives no longer extend it.
    doomed: bool,
}

/// A lease's state as `LeaseTimeToLive` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeToLive {
    /// Whole seconds left (rounded down, as etcd does).
    pub remaining: i64,
    /// The granted TTL.
    pub granted: i64,
    /// The attached keys, sorted.
    pub keys: Vec<Vec<u8>>,
}

/// All leases of the server.
#[derive(Debug, Default)]
pub struct Lessor {
    leases: HashMap<i64, Lease>,
    by_expiry: BTreeMap<(Instant, i64), ()>,
    min_ttl: i64,
}

impl Lessor {
    /// An empty lessor; TTLs below `min_ttl` seconds are raised to it
    /// (etcd's minimum is 1.5 election timeouts, 2 s by default).
    pub fn new(min_ttl: i64) -> Lessor {
        Lessor {
            leases: HashMap::new(),
            by_expiry: BTreeMap::new(),
            min_ttl: min_ttl.max(1),
        }
    }

    /// The TTL a grant of `ttl` gets.
    pub fn effective_ttl(&self, ttl: i64) -> Result<i64, LeaseError> {
        if ttl > MAX_LEASE_TTL {
            return Err(LeaseError::TtlTooLarge);
        }
        Ok(ttl.max(self.min_ttl))
    }

    /// A fresh positive id not in use.
    pub fn new_id(&self) -> i64 {
        loop {
            let id = (next_random() >> 1) as i64;
            if id > 0 && !self.leases.contains_key(&id) {
                return id;
            }
        }
    }

    /// Whether the lease exists (even if its time is up but it was not
    /// revoked yet).
    pub fn contains(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    /// Adds a lease expiring `ttl` seconds from `now`.
    pub fn grant(&mut self, id: i64, ttl: i64, now: Instant) -> Result<(), LeaseError> {
        if self.leases.contains_key(&id) {
            return Err(LeaseError::Exists);
        }
        let expires = now + Duration::from_secs(ttl.max(0) as u64);
        self.leases.insert(
            id,
            Lease {
                ttl,
                expires,
                keys: BTreeSet::new(),
                doomed: false,
            },
        );
        self.by_expiry.insert((expires, id), ());
        Ok(())
    }

    /// Removes a lease; returns its keys (to delete).
    pub fn revoke(&mut self, id: i64) -> Result<Vec<Vec<u8>>, LeaseError> {
        let lease = self.leases.remove(&id).ok_or(LeaseError::NotFound)?;
        self.by_expiry.remove(&(lease.expires, id));
        Ok(lease.keys.into_iter().collect())
    }

    /// Renews a lease to its full TTL; returns the TTL, or `NotFound` when
    /// it does not exist or its time is already up.
    pub fn renew(&mut self, id: i64, now: Instant) -> Result<i64, LeaseError> {
        let lease = self.leases.get_mut(&id).ok_or(LeaseError::NotFound)?;
        if lease.expires <= now {
            return Err(LeaseError::NotFound);
        }
        if lease.doomed {
            // Answered as usual; it expires when it was doomed to.
            return Ok(lease.ttl);
        }
        self.by_expiry.remove(&(lease.expires, id));
        lease.expires = now + Duration::from_secs(lease.ttl as u64);
        self.by_expiry.insert((lease.expires, id), ());
        Ok(lease.ttl)
    }

    /// Makes a lease expire at `at` (if that is sooner) whatever
    /// keep-alives follow: the `lease-expire-early` fault.
    pub fn expire_early(&mut self, id: i64, at: Instant) {
        let Some(lease) = self.leases.get_mut(&id) else {
            return;
        };
        lease.doomed = true;
        if at < lease.expires {
            self.by_expiry.remove(&(lease.expires, id));
            lease.expires = at;
            self.by_expiry.insert((at, id), ());
        }
    }

    /// The keys attached to a lease (none for an unknown lease).
    pub fn keys(&self, id: i64) -> impl Iterator<Item = &[u8]> + '_ {
        self.leases
            .get(&id)
            .into_iter()
            .flat_map(|l| l.keys.iter().map(Vec::as_slice))
    }

    /// A lease's remaining time and keys.
    pub fn time_to_live(&self, id: i64, now: Instant) -> Option<TimeToLive> {
        let lease = self.leases.get(&id)?;
        Some(TimeToLive {
            remaining: lease.expires.saturating_duration_since(now).as_secs() as i64,
            granted: lease.ttl,
            keys: lease.keys.iter().cloned().collect(),
        })
    }

    /// Every lease with the TTL it was granted, in id order.
    pub fn granted(&self) -> Vec<(i64, i64)> {
        let mut all: Vec<(i64, i64)> = self.leases.iter().map(|(id, l)| (*id, l.ttl)).collect();
        all.sort_unstable();
        all
    }

    /// Every lease id, the soonest to expire first (etcd's `LeaseLeases`
    /// order).
    pub fn ids(&self) -> Vec<i64> {
        self.by_expiry.keys().map(|(_, id)| *id).collect()
    }

    /// Leases whose time is up at `now`.
    pub fn expired(&self, now: Instant) -> Vec<i64> {
        self.by_expiry
            .range(..(now, i64::MAX))
            .map(|((_, id), _)| *id)
            .collect()
    }

    /// When the next lease expires.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.by_expiry.keys().next().map(|(at, _)| *at)
    }

    /// Records that `key` now belongs to `lease` (0: none), detaching it from
    /// `previous`.
    pub fn reattach(&mut self, key: &[u8], previous: i64, lease: i64) {
        if previous == lease {
            return;
        }
        if previous != 0
            && let Some(l) = self.leases.get_mut(&previous)
        {
            l.keys.remove(key);
        }
        if lease != 0
            && let Some(l) = self.leases.get_mut(&lease)
        {
            l.keys.insert(key.to_vec());
        }
    }

    /// How many leases exist.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }
}

/// A random u64 from std's randomly keyed hasher (no extra dependency).
fn next_random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_renew_expire_revoke() {
        let mut l = Lessor::new(2);
        assert_eq!(l.effective_ttl(1), Ok(2));
        assert_eq!(
            l.effective_ttl(MAX_LEASE_TTL + 1),
            Err(LeaseError::TtlTooLarge)
        );
        let t0 = Instant::now();
        let id = l.new_id();
        l.grant(id, 5, t0).unwrap();
        assert_eq!(l.grant(id, 5, t0), Err(LeaseError::Exists));
        l.reattach(b"/a", 0, id);
        l.reattach(b"/b", 0, id);
        l.reattach(b"/b", id, 0);
        let ttl = l
            .time_to_live(id, t0 + Duration::from_millis(1500))
            .unwrap();
        assert_eq!((ttl.remaining, ttl.granted), (3, 5));
        assert_eq!(ttl.keys, vec![b"/a".to_vec()]);
        assert_eq!(l.renew(id, t0 + Duration::from_secs(4)), Ok(5));
        assert!(l.expired(t0 + Duration::from_secs(8)).is_empty());
        assert_eq!(l.expired(t0 + Duration::from_secs(10)), vec![id]);
        assert_eq!(
            l.renew(id, t0 + Duration::from_secs(10)),
            Err(LeaseError::NotFound)
        );
        assert_eq!(l.revoke(id), Ok(vec![b"/a".to_vec()]));
        assert_eq!(l.revoke(id), Err(LeaseError::NotFound));
        assert!(l.is_empty());
    }

    #[test]
    fn ids_are_positive_and_distinct() {
        let l = Lessor::new(1);
        let a = l.new_id();
        let b = l.new_id();
        assert!(a > 0 && b > 0 && a != b);
    }
}
