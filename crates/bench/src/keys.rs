//! What the workloads write: the keyspace, the values, and the seeded
//! random choices among them.

use std::time::{SystemTime, UNIX_EPOCH};

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt as _, SeedableRng as _};

use crate::error::Error;

/// The benchmark's keys: the prefix, then the index zero-padded to fill the
/// key size, so they sort by index.
#[derive(Debug, Clone)]
pub(crate) struct KeySpace {
    prefix: Vec<u8>,
    width: usize,
    /// How many keys there are (at least one).
    pub(crate) count: u64,
}

impl KeySpace {
    /// `count` keys of `key_size` bytes under `prefix`; fails if the
    /// indexes do not fit.
    pub(crate) fn new(prefix: &str, key_size: usize, count: u64) -> Result<KeySpace, Error> {
        if count == 0 {
            return Err(Error::Usage("--keys must be at least 1".to_string()));
        }
        let digits = (count - 1).max(1).ilog10() as usize + 1;
        let needed = prefix.len() + digits;
        if key_size < needed {
            return Err(Error::Usage(format!(
                "--key-size {key_size} is too small for --key-prefix {prefix:?} and --keys {count} \
                 (needs at least {needed})"
            )));
        }
        Ok(KeySpace {
            prefix: prefix.as_bytes().to_vec(),
            width: key_size - prefix.len(),
            count,
        })
    }

    /// The key of `index`.
    pub(crate) fn key(&self, index: u64) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.prefix.len() + self.width);
        key.extend_from_slice(&self.prefix);
        let digits = format!("{index:0width$}", width = self.width);
        key.extend_from_slice(digits.as_bytes());
        key
    }

    /// The index of a key picked uniformly at random.
    pub(crate) fn random_index(&self, rng: &mut Rng) -> u64 {
        rng.random_range(0..self.count)
    }

    /// The end of `[key(0), key(count))`.
    pub(crate) fn range_end(&self) -> Vec<u8> {
        let digits = self.count.max(1).ilog10() as usize + 1;
        if digits <= self.width {
            self.key(self.count)
        } else {
            // Past the last index of this width: the end of the prefix's
            // digit keys.
            let mut end = self.prefix.clone();
            end.push(b'9' + 1);
            end
        }
    }

    /// The index of one of our keys.
    pub(crate) fn index(&self, key: &[u8]) -> Option<u64> {
        let digits = key.strip_prefix(self.prefix.as_slice())?;
        std::str::from_utf8(digits).ok()?.parse().ok()
    }
}

/// A client's random numbers: xoshiro256++, whose sequence for a seed is
/// fixed (rand's `SmallRng` may change algorithm between versions).
pub(crate) type Rng = Xoshiro256PlusPlus;

/// The seed of a run: every client's random numbers derive from it and the
/// client's number, so the same seed picks the same keys and values again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seed(pub(crate) u64);

impl Seed {
    /// `--seed`, or one from the clock.
    pub(crate) fn given_or_clock(given: Option<u64>) -> Seed {
        Seed(given.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        }))
    }

    /// The random numbers of client `client`.
    pub(crate) fn client(self, client: usize) -> Rng {
        // Distinct clients get distinct inputs (an odd multiplier is a
        // bijection), which seed_from_u64 spreads over the whole state.
        let stream = (client as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Rng::seed_from_u64(self.0 ^ stream)
    }
}

/// A value of `size` printable random bytes.
pub(crate) fn random_value(rng: &mut Rng, size: usize) -> Vec<u8> {
    (0..size).map(|_| rng.random_range(b'a'..=b'z')).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_index_and_parse_back() {
        let keys = KeySpace::new("bench/", 32, 100_000).unwrap();
        let k = keys.key(42);
        assert_eq!(k.len(), 32);
        assert_eq!(keys.index(&k), Some(42));
        assert!(keys.key(99_999) < keys.range_end());
        assert!(keys.key(9) < keys.key(10));
        assert!(KeySpace::new("bench/", 8, 100_000).is_err());
        assert!(KeySpace::new("bench/", 32, 0).is_err());
        let tight = KeySpace::new("p/", 4, 100).unwrap();
        assert_eq!(tight.key(99), b"p/99");
        assert!(tight.key(99) < tight.range_end());
    }

    #[test]
    fn a_seed_repeats_each_clients_choices() {
        let keys = KeySpace::new("k/", 8, 1000).unwrap();
        let picks = |seed: u64, client| {
            let mut rng = Seed(seed).client(client);
            let value = random_value(&mut rng, 16);
            let picked: Vec<_> = (0..20)
                .map(|_| keys.key(keys.random_index(&mut rng)))
                .collect();
            (value, picked)
        };
        assert_eq!(picks(7, 3), picks(7, 3));
        assert_ne!(picks(7, 3), picks(7, 4), "clients differ");
        assert_ne!(picks(7, 3), picks(8, 3), "seeds differ");
        let (value, picked) = picks(7, 3);
        assert!(value.iter().all(u8::is_ascii_lowercase));
        assert!(
            picked
                .iter()
                .all(|k| keys.index(k).is_some_and(|i| i < 1000))
        );
    }
}
