//! A copy-on-write map in shards, for the model's state: a state is cloned
//! at every step of the search and changed in one or two keys, so a write
//! copies one shard (a 32nd of the map) instead of all of it, and the
//! map's hash (the XOR of its entries' hashes) is kept up to date instead
//! of recomputed over every key.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

const SHARDS: usize = 32;

/// A map of `K` to `V` in [`SHARDS`] copy-on-write shards.
#[derive(Debug, Clone)]
pub(crate) struct Sharded<K, V> {
    shards: Arc<Vec<Arc<BTreeMap<K, V>>>>,
    hash: u64,
    len: usize,
}

impl<K, V> Default for Sharded<K, V> {
    fn default() -> Self {
        Sharded {
            shards: Arc::new((0..SHARDS).map(|_| Arc::new(BTreeMap::new())).collect()),
            hash: 0,
            len: 0,
        }
    }
}

fn hash_of<T: Hash + ?Sized>(t: &T) -> u64 {
    let mut h = DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

impl<K: Ord + Hash + Clone, V: Hash + Clone> Sharded<K, V> {
    fn shard<Q: Hash + ?Sized>(key: &Q) -> usize {
        (hash_of(key) % SHARDS as u64) as usize
    }

    fn entry_hash(key: &K, value: &V) -> u64 {
        hash_of(&(key, value))
    }

    /// The value of `key`.
    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + Hash + ?Sized,
    {
        self.shards[Self::shard(key)].get(key)
    }

    /// Whether `key` is in the map.
    pub(crate) fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + Hash + ?Sized,
    {
        self.get(key).is_some()
    }

    fn shard_mut(&mut self, i: usize) -> &mut BTreeMap<K, V> {
        Arc::make_mut(&mut Arc::make_mut(&mut self.shards)[i])
    }

    /// Sets `key` to `value`; the old value.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        let h = Self::entry_hash(&key, &value);
        let old = self.shard_mut(Self::shard(&key)).insert(key.clone(), value);
        self.hash ^= h;
        match &old {
            Some(o) => self.hash ^= Self::entry_hash(&key, o),
            None => self.len += 1,
        }
        old
    }

    /// Removes `key`; its value.
    pub(crate) fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + Hash + ?Sized,
    {
        let i = Self::shard(key);
        if !self.shards[i].contains_key(key) {
            return None;
        }
        let (k, v) = self.shard_mut(i).remove_entry(key)?;
        self.hash ^= Self::entry_hash(&k, &v);
        self.len -= 1;
        Some(v)
    }

    /// Changes the value of `key` in place, inserting `V::default()`
    /// first if it is missing and `insert` is set; nothing if it is missing
    /// otherwise.
    pub(crate) fn update(&mut self, key: &K, insert: bool, f: impl FnOnce(&mut V))
    where
        V: Default,
    {
        let i = Self::shard(key);
        let old = self.shards[i].get(key).map(|v| Self::entry_hash(key, v));
        if old.is_none() && !insert {
            return;
        }
        let shard = self.shard_mut(i);
        let v = shard.entry(key.clone()).or_default();
        f(v);
        let new = Self::entry_hash(key, v);
        match old {
            Some(o) => self.hash ^= o,
            None => self.len += 1,
        }
        self.hash ^= new;
    }

    /// Every entry, sorted by key.
    pub(crate) fn sorted(&self) -> Vec<(&K, &V)> {
        let mut all: Vec<(&K, &V)> = self.shards.iter().flat_map(|s| s.iter()).collect();
        all.sort_by(|a, b| a.0.cmp(b.0));
        all
    }
}

impl<K: PartialEq, V: PartialEq> PartialEq for Sharded<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
            && self.len == other.len
            && self
                .shards
                .iter()
                .zip(other.shards.iter())
                .all(|(a, b)| Arc::ptr_eq(a, b) || a == b)
    }
}

impl<K: Eq, V: Eq> Eq for Sharded<K, V> {}

impl<K, V> Hash for Sharded<K, V> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.hash.hash(state);
        self.len.hash(state);
    }
}
