//! Consistent hashing on a ring with weighted virtual nodes.

use std::io::Write;
use std::sync::Arc;

use super::{Balancer, Choice, effective_weight};
use crate::Instance;

/// Ring points per 100 units of weight: an instance of the default weight
/// (100) gets 160 points, ketama's figure; weight 1 gets 2, weight 10 000
/// gets 16 000.
const POINTS_PER_100_WEIGHT: u64 = 160;
/// The most points on a ring (12 bytes each: 12 MiB). Beyond it every
/// instance's points are scaled down by the same factor.
const MAX_POINTS: u64 = 1 << 20;

/// Sends equal keys to the same instance, and moves few keys when instances
/// come and go.
///
/// Each instance gets points on a 64-bit ring, in proportion to its weight
/// (160 per 100 units of [`Instance::weight`], at least 1); a key goes to the
/// owner of the first point at or after the key's hash. Points are
/// [`stable_hash`] of `"{id}#{n}"` for n = 0, 1, ..., and depend only on the
/// instance's own id and weight, so every process builds the same ring
/// whatever the order of the instances, and removing an instance moves only
/// the keys that instance owned (adding one moves only the keys it takes).
/// The one exception: a ring of more than 2^20 points (e.g. thousands of
/// instances of maximal weight) is scaled down as a whole.
///
/// Keys are hashed with [`stable_hash`], identical across processes,
/// platforms and Rust versions. A pick without a key goes to a random ring
/// point, i.e. a random instance in proportion to weight.
#[derive(Debug)]
pub struct ConsistentHash {
    /// Point hashes, sorted.
    hashes: Box<[u64]>,
    /// The instance owning each point.
    owners: Box<[u32]>,
}

impl ConsistentHash {
    /// The number of points on the ring.
    pub fn points(&self) -> usize {
        self.hashes.len()
    }

    /// The index of the instance owning `hash`.
    #[inline]
    fn owner(&self, hash: u64) -> usize {
        let pos = self.hashes.partition_point(|&p| p < hash);
        let pos = if pos == self.hashes.len() { 0 } else { pos };
        self.owners[pos] as usize
    }
}

impl Balancer for ConsistentHash {
    fn build(instances: &[Arc<Instance>], _previous: Option<&Self>) -> Self {
        let mut points: Vec<u64> = instances
            .iter()
            .map(|i| (u64::from(effective_weight(i)) * POINTS_PER_100_WEIGHT).div_ceil(100))
            .collect();
        let total: u64 = points.iter().sum();
        if total > MAX_POINTS {
            points
                .iter_mut()
                .for_each(|p| *p = (*p * MAX_POINTS / total).max(1));
        }
        let mut ring: Vec<(u64, u32)> = Vec::with_capacity(points.iter().sum::<u64>() as usize);
        let mut buf = Vec::new();
        for (index, (instance, &count)) in instances.iter().zip(&points).enumerate() {
            for n in 0..count {
                buf.clear();
                buf.extend_from_slice(instance.id.as_bytes());
                buf.push(b'#');
                write!(buf, "{n}").expect("writing to a Vec cannot fail");
                ring.push((stable_hash(&buf), index as u32));
            }
        }
        // Ties (practically never) go to the smaller id, so the ring does
        // not depend on the order of `instances`.
        ring.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| instances[a.1 as usize].id.cmp(&instances[b.1 as usize].id))
        });
        ConsistentHash {
            hashes: ring.iter().map(|p| p.0).collect(),
            owners: ring.iter().map(|p| p.1).collect(),
        }
    }

    #[inline]
    fn pick(&self, key: Option<&[u8]>) -> Option<Choice> {
        if self.hashes.is_empty() {
            return None;
        }
        let index = match key {
            Some(key) => self.owner(stable_hash(key)),
            None => self.owners[fastrand::usize(..self.owners.len())] as usize,
        };
        Some(Choice::new(index))
    }
}

/// 64-bit FNV-1a (offset basis `0xcbf29ce484222325`, prime `0x100000001b3`).
///
/// Fast and stable but weakly mixed in its high bits for short, similar
/// inputs; [`stable_hash`] adds a finalizer.
#[inline]
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The hash [`ConsistentHash`] uses for keys and ring points:
/// [`fnv1a_64`] followed by MurmurHash3's 64-bit finalizer (`fmix64`) for
/// full avalanche.
///
/// Defined by those two published algorithms alone, so it is identical in
/// every process, on every platform and Rust version, and easy to reproduce
/// in another language (e.g. for a Go client that must agree on placement):
///
/// ```text
/// h = fnv1a_64(bytes)
/// h ^= h >> 33; h *= 0xff51afd7ed558ccd
/// h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53
/// h ^= h >> 33
/// ```
#[inline]
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h = fnv1a_64(bytes);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::balance::test_util::instances;

    fn owner_id(ring: &ConsistentHash, set: &[Arc<Instance>], key: &[u8]) -> String {
        set[ring.pick(Some(key)).unwrap().index].id.clone()
    }

    fn keys(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|k| format!("user:{k}").into_bytes()).collect()
    }

    #[test]
    fn hash_values_are_pinned() {
        // Published FNV-1a test vectors.
        assert_eq!(fnv1a_64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x85944171f73967e8);
        // Changing these moves every key of every deployed ring.
        assert_eq!(stable_hash(b""), 0xefd01f60ba992926);
        assert_eq!(stable_hash(b"a"), 0x82a2a958a9bece5b);
        assert_eq!(stable_hash(b"user:42"), 0x998817bee6718248);
        assert_eq!(stable_hash(b"i-0#0"), 0xa3ed070fb3246bec);
    }

    #[test]
    fn same_key_same_instance_whatever_the_order() {
        let set = instances(10);
        let ring = ConsistentHash::build(&set, None);
        let mut reversed = set.clone();
        reversed.reverse();
        let other = ConsistentHash::build(&reversed, None);
        for key in keys(1_000) {
            let a = owner_id(&ring, &set, &key);
            assert_eq!(a, owner_id(&ring, &set, &key));
            assert_eq!(a, owner_id(&other, &reversed, &key));
        }
    }

    #[test]
    fn removing_an_instance_moves_only_its_keys() {
        let set = instances(10);
        let ring = ConsistentHash::build(&set, None);
        let removed = "i-3";
        let rest: Vec<_> = set.iter().filter(|i| i.id != removed).cloned().collect();
        let smaller = ConsistentHash::build(&rest, Some(&ring));
        let mut moved = 0;
        for key in keys(10_000) {
            let before = owner_id(&ring, &set, &key);
            let after = owner_id(&smaller, &rest, &key);
            if before == removed {
                moved += 1;
                assert_ne!(after, removed);
            } else {
                assert_eq!(before, after, "a key of another instance moved");
            }
        }
        // About a tenth of the keys lived on the removed instance.
        assert!((600..=1_400).contains(&moved), "{moved}");
        // Adding it back restores the original placement exactly.
        let again = ConsistentHash::build(&set, Some(&smaller));
        for key in keys(2_000) {
            assert_eq!(owner_id(&ring, &set, &key), owner_id(&again, &set, &key));
        }
    }

    #[test]
    fn spreads_keys_by_weight() {
        let mut set = instances(4);
        set.push(Arc::new(
            Instance::new("svc", "heavy", "h:1").with_weight(400),
        ));
        let ring = ConsistentHash::build(&set, None);
        let mut counts: HashMap<String, usize> = HashMap::new();
        for key in keys(80_000) {
            *counts.entry(owner_id(&ring, &set, &key)).or_default() += 1;
        }
        // Weights 100 x 4 and 400: expected 10 000 each and 40 000.
        for i in &set[..4] {
            let c = counts[&i.id];
            assert!((6_500..=13_500).contains(&c), "{counts:?}");
        }
        assert!((32_000..=48_000).contains(&counts["heavy"]), "{counts:?}");
    }

    #[test]
    fn missing_key_is_random_and_empty_is_none() {
        let set = instances(3);
        let ring = ConsistentHash::build(&set, None);
        let mut seen = [false; 3];
        for _ in 0..300 {
            seen[ring.pick(None).unwrap().index] = true;
        }
        assert_eq!(seen, [true; 3]);
        assert!(ConsistentHash::build(&[], None).pick(Some(b"k")).is_none());
    }

    #[test]
    fn ring_size_follows_weight_and_is_capped() {
        let set = instances(2);
        assert_eq!(ConsistentHash::build(&set, None).points(), 320);
        let huge: Vec<_> = (0..100)
            .map(|i| Arc::new(Instance::new("s", format!("{i}"), "a:1").with_weight(10_000)))
            .collect();
        let ring = ConsistentHash::build(&huge, None);
        assert!(ring.points() as u64 <= MAX_POINTS);
    }
}
