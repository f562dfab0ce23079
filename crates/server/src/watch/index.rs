//! Finds the watchers an event key matches without scanning every watcher.
//!
//! Single-key watchers live in a map by key; prefix watchers (the common
//! case: a service's `{prefix}/{service}/`) in a map by prefix, probed with
//! the event key's prefixes of the lengths some watched prefix has: a
//! lookup per distinct prefix length (usually a handful), whatever the
//! number of watchers. Other ranges (rare: arbitrary ranges, from-key
//! watches) are checked one by one.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::WatcherKey;

pub use muster_proto::prefix_range_end;

/// Whether `key` is in `[start, end)` with etcd's conventions (empty end:
/// only `start`; end `[0]`: every key >= start).
pub fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    if end.is_empty() {
        return key == start;
    }
    if end == [0] {
        return key >= start;
    }
    key >= start && key < end
}

#[derive(Debug, Default)]
pub(crate) struct Index {
    exact: HashMap<Vec<u8>, HashSet<WatcherKey>>,
    prefixes: HashMap<Vec<u8>, HashSet<WatcherKey>>,
    /// How many keys of `prefixes` have each length: only those lengths
    /// are probed (probing every prefix of a 40-byte key hashed 40 keys
    /// of up to 40 bytes per event: 6% of a put's CPU with one watcher).
    prefix_lens: BTreeMap<usize, usize>,
    others: HashMap<WatcherKey, (Vec<u8>, Vec<u8>)>,
}

enum Shape {
    Exact,
    Prefix,
    Other,
}

fn shape(key: &[u8], range_end: &[u8]) -> Shape {
    if range_end.is_empty() {
        Shape::Exact
    } else if prefix_range_end(key) == range_end {
        Shape::Prefix
    } else {
        Shape::Other
    }
}

impl Index {
    pub(crate) fn insert(&mut self, id: WatcherKey, key: &[u8], range_end: &[u8]) {
        match shape(key, range_end) {
            Shape::Exact => {
                self.exact.entry(key.to_vec()).or_default().insert(id);
            }
            Shape::Prefix => {
                let set = self.prefixes.entry(key.to_vec()).or_default();
                if set.is_empty() {
                    *self.prefix_lens.entry(key.len()).or_default() += 1;
                }
                set.insert(id);
            }
            Shape::Other => {
                self.others.insert(id, (key.to_vec(), range_end.to_vec()));
            }
        }
    }

    pub(crate) fn remove(&mut self, id: WatcherKey, key: &[u8], range_end: &[u8]) {
        let (map, is_prefix) = match shape(key, range_end) {
            Shape::Exact => (&mut self.exact, false),
            Shape::Prefix => (&mut self.prefixes, true),
            Shape::Other => {
                self.others.remove(&id);
                return;
            }
        };
        if let Some(set) = map.get_mut(key) {
            set.remove(&id);
            if set.is_empty() {
                map.remove(key);
                if is_prefix
                    && let std::collections::btree_map::Entry::Occupied(mut n) =
                        self.prefix_lens.entry(key.len())
                {
                    *n.get_mut() -= 1;
                    if *n.get() == 0 {
                        n.remove();
                    }
                }
            }
        }
    }

    /// Calls `f` for every watcher whose range holds `key`.
    pub(crate) fn for_each_match(&self, key: &[u8], mut f: impl FnMut(WatcherKey)) {
        if let Some(set) = self.exact.get(key) {
            set.iter().copied().for_each(&mut f);
        }
        for &len in self.prefix_lens.keys() {
            if len > key.len() {
                break;
            }
            if let Some(set) = self.prefixes.get(&key[..len]) {
                set.iter().copied().for_each(&mut f);
            }
        }
        for (id, (start, end)) in &self.others {
            if in_range(key, start, end) {
                f(*id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(index: &Index, key: &[u8]) -> Vec<WatcherKey> {
        let mut out = Vec::new();
        index.for_each_match(key, |id| out.push(id));
        out.sort_unstable();
        out
    }

    #[test]
    fn finds_exact_prefix_and_range_watchers() {
        let mut ix = Index::default();
        ix.insert((1, 1), b"/a/x", b"");
        ix.insert((1, 2), b"/a/", &prefix_range_end(b"/a/"));
        ix.insert((1, 3), b"/a", b"/b");
        ix.insert((1, 4), b"", &[0]);
        ix.insert((1, 5), b"/b", &[0]);
        assert_eq!(matches(&ix, b"/a/x"), vec![(1, 1), (1, 2), (1, 3), (1, 4)]);
        assert_eq!(matches(&ix, b"/a_other"), vec![(1, 3), (1, 4)]);
        assert_eq!(matches(&ix, b"/c"), vec![(1, 4), (1, 5)]);
        ix.remove((1, 2), b"/a/", &prefix_range_end(b"/a/"));
        ix.remove((1, 4), b"", &[0]);
        assert_eq!(matches(&ix, b"/a/x"), vec![(1, 1), (1, 3)]);
    }

    #[test]
    fn prefixes_of_many_lengths_match_until_removed() {
        let mut ix = Index::default();
        let end = |p: &[u8]| prefix_range_end(p);
        ix.insert((1, 1), b"/a/", &end(b"/a/"));
        ix.insert((1, 2), b"/a/b/", &end(b"/a/b/"));
        ix.insert((2, 1), b"/a/b/", &end(b"/a/b/"));
        ix.insert((1, 3), b"/c/", &end(b"/c/"));
        assert_eq!(matches(&ix, b"/a/b/c"), vec![(1, 1), (1, 2), (2, 1)]);
        assert_eq!(matches(&ix, b"/a/"), vec![(1, 1)]);
        assert_eq!(matches(&ix, b"/c/x"), vec![(1, 3)]);
        assert_eq!(matches(&ix, b"/a"), vec![], "shorter than any prefix");
        // Two prefixes of length 3 and one of length 5, counted by length.
        assert_eq!(ix.prefix_lens, BTreeMap::from([(3, 2), (5, 1)]));
        ix.remove((1, 2), b"/a/b/", &end(b"/a/b/"));
        assert_eq!(matches(&ix, b"/a/b/c"), vec![(1, 1), (2, 1)]);
        ix.remove((2, 1), b"/a/b/", &end(b"/a/b/"));
        ix.remove((1, 3), b"/c/", &end(b"/c/"));
        assert_eq!(ix.prefix_lens, BTreeMap::from([(3, 1)]));
        assert_eq!(matches(&ix, b"/a/b/c"), vec![(1, 1)]);
        // Removing an unknown watcher changes nothing.
        ix.remove((9, 9), b"/a/", &end(b"/a/"));
        ix.remove((9, 9), b"/zz/", &end(b"/zz/"));
        assert_eq!(ix.prefix_lens, BTreeMap::from([(3, 1)]));
        ix.remove((1, 1), b"/a/", &end(b"/a/"));
        assert!(ix.prefix_lens.is_empty() && ix.prefixes.is_empty());
    }

    #[test]
    fn ranges() {
        assert!(in_range(b"a", b"a", b""));
        assert!(!in_range(b"ab", b"a", b""));
        assert!(in_range(b"zz", b"b", &[0]));
        assert!(!in_range(b"b", b"a", b"b"));
        assert_eq!(prefix_range_end(b"a\xff"), b"b".to_vec());
    }
}
