//! The revisions of one key, in generations, as etcd's `keyIndex`.
//!
//! A generation is one life of the key: from the put that creates it to the
//! tombstone that deletes it (the tombstone is its last revision). The last
//! generation is the current life, empty while the key is deleted.
//!
//! For example, put at 2, put at 3, delete at 4, put at 5 gives
//! `[{2, 3, 4(tombstone)}, {5}]`; a following delete at 6 gives
//! `[{2, 3, 4}, {5, 6}, {}]`.

/// A revision: `main` is the write (one per write transaction), `sub` the
/// change within it (0, 1, ...).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Revision {
    pub(crate) main: i64,
    pub(crate) sub: i64,
}

impl Revision {
    pub(crate) const fn new(main: i64, sub: i64) -> Revision {
        Revision { main, sub }
    }
}

/// One life of a key.
#[derive(Clone, Debug, Default)]
pub(crate) struct Generation {
    /// Version of the key at the last revision of `revs` (counting the
    /// tombstone, as etcd does).
    ver: i64,
    /// The revision that created this life.
    created: Revision,
    /// Revisions in increasing order; for a finished generation the last one
    /// is the tombstone.
    revs: Vec<Revision>,
}

/// What [`KeyIndex::get`] finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Found {
    /// The revision holding the key's value.
    pub(crate) modified: Revision,
    /// The revision that created this life of the key.
    pub(crate) created: Revision,
    /// The key's version at `modified`.
    pub(crate) version: i64,
}

/// The revisions of one key.
#[derive(Clone, Debug)]
pub(crate) struct KeyIndex {
    /// Never empty; the last one is the current life (empty: deleted).
    generations: Vec<Generation>,
}

impl Default for KeyIndex {
    fn default() -> Self {
        KeyIndex::new()
    }
}

impl KeyIndex {
    /// A key with no revision yet.
    pub(crate) fn new() -> KeyIndex {
        KeyIndex {
            generations: vec![Generation::default()],
        }
    }

    /// True when nothing is left (never written, or all compacted away).
    pub(crate) fn is_empty(&self) -> bool {
        self.generations.len() == 1 && self.generations[0].revs.is_empty()
    }

    /// True when the key currently exists.
    pub(crate) fn is_live(&self) -> bool {
        self.generations.last().is_some_and(|g| !g.revs.is_empty())
    }

    /// The latest revision of the current life, if the key exists.
    pub(crate) fn latest(&self) -> Option<Revision> {
        self.generations.last().and_then(|g| g.revs.last().copied())
    }

    /// Records a put at `rev` (greater than every revision recorded).
    pub(crate) fn put(&mut self, rev: Revision) {
        if self.generations.is_empty() {
            self.generations.push(Generation::default());
        }
        let last = self.generations.len() - 1;
        let g = &mut self.generations[last];
        if g.revs.is_empty() {
            g.created = rev;
            g.ver = 0;
        }
        g.revs.push(rev);
        g.ver += 1;
    }

    /// Records a put restored from storage: `created` and `version` come
    /// from the stored key-value (history before it may be compacted away).
    pub(crate) fn restore_put(&mut self, rev: Revision, created: Revision, version: i64) {
        self.put(rev);
        if let Some(g) = self.generations.last_mut() {
            if g.revs.len() == 1 {
                g.created = created;
            }
            g.ver = version;
        }
    }

    /// Records a deletion at `rev`; false (and nothing recorded) when the
    /// key does not exist.
    pub(crate) fn tombstone(&mut self, rev: Revision) -> bool {
        if !self.is_live() {
            return false;
        }
        self.put(rev);
        self.generations.push(Generation::default());
        true
    }

    /// Undoes the last [`KeyIndex::put`].
    pub(crate) fn undo_put(&mut self) {
        if let Some(g) = self.generations.last_mut() {
            g.revs.pop();
            g.ver -= 1;
            if g.revs.is_empty() {
                *g = Generation::default();
            }
        }
    }

    /// Undoes the last successful [`KeyIndex::tombstone`].
    pub(crate) fn undo_tombstone(&mut self) {
        self.generations.pop();
        self.undo_put();
    }

    /// The key as of main revision `at_rev` (etcd's `keyIndex.get`): `None`
    /// if it did not exist then.
    pub(crate) fn get(&self, at_rev: i64) -> Option<Found> {
        let g = &self.generations[self.find_generation(at_rev)?];
        let n = g.revs.iter().rposition(|r| r.main <= at_rev)?;
        Some(Found {
            modified: g.revs[n],
            created: g.created,
            version: g.ver - (g.revs.len() - n - 1) as i64,
        })
    }

    /// The generation holding the key's value at `rev` (etcd's
    /// `findGeneration`): `None` when the key was deleted then or not yet
    /// created.
    fn find_generation(&self, rev: i64) -> Option<usize> {
        let last = self.generations.len().checked_sub(1)?;
        for (i, g) in self.generations.iter().enumerate().rev() {
            let (Some(first), Some(tomb)) = (g.revs.first(), g.revs.last()) else {
                continue;
            };
            if i != last && tomb.main <= rev {
                return None;
            }
            if first.main <= rev {
                return Some(i);
            }
        }
        None
    }

    /// Compacts at main revision `at_rev` as etcd's `keyIndex.compact`:
    /// keeps, in the generation alive at `at_rev`, the latest revision at or
    /// before it and everything after; drops earlier generations whose
    /// tombstone is at or before `at_rev`. Every revision dropped goes to
    /// `removed`.
    pub(crate) fn compact(&mut self, at_rev: i64, removed: &mut Vec<Revision>) {
        let last = self.generations.len() - 1;
        // The first generation whose tombstone is after at_rev (or the last).
        let mut gi = 0;
        while gi < last {
            match self.generations[gi].revs.last() {
                Some(tomb) if tomb.main > at_rev => break,
                _ => gi += 1,
            }
        }
        let g = &mut self.generations[gi];
        if !g.revs.is_empty() {
            if let Some(n) = g.revs.iter().rposition(|r| r.main <= at_rev) {
                removed.extend(g.revs.drain(..n));
            }
            // Only a tombstone left: drop the generation too.
            if g.revs.len() == 1 && gi != last {
                gi += 1;
            }
        }
        for g in self.generations.drain(..gi) {
            removed.extend(g.revs);
        }
    }

    /// Every recorded revision, in increasing order.
    pub(crate) fn revisions(&self) -> impl Iterator<Item = Revision> + '_ {
        self.generations.iter().flat_map(|g| g.revs.iter().copied())
    }

    #[cfg(test)]
    pub(crate) fn all_revisions(&self) -> Vec<Revision> {
        self.revisions().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(main: i64) -> Revision {
        Revision::new(main, 0)
    }

    #[test]
    fn get_follows_generations() {
        let mut ki = KeyIndex::new();
        ki.put(r(2));
        ki.put(r(4));
        assert!(ki.tombstone(r(6)));
        ki.put(r(8));
        assert_eq!(ki.get(1), None);
        let f = ki.get(3).unwrap();
        assert_eq!((f.modified, f.created, f.version), (r(2), r(2), 1));
        let f = ki.get(5).unwrap();
        assert_eq!((f.modified, f.created, f.version), (r(4), r(2), 2));
        assert_eq!(ki.get(6), None);
        assert_eq!(ki.get(7), None);
        let f = ki.get(9).unwrap();
        assert_eq!((f.modified, f.created, f.version), (r(8), r(8), 1));
    }

    #[test]
    fn tombstone_of_deleted_key_is_refused() {
        let mut ki = KeyIndex::new();
        assert!(!ki.tombstone(r(2)));
        ki.put(r(2));
        assert!(ki.tombstone(r(3)));
        assert!(!ki.tombstone(r(4)));
        assert!(!ki.is_live());
    }

    #[test]
    fn same_main_revision_delete_and_recreate() {
        let mut ki = KeyIndex::new();
        ki.put(r(2));
        assert!(ki.tombstone(Revision::new(5, 0)));
        ki.put(Revision::new(5, 1));
        assert_eq!(ki.get(4).unwrap().modified, r(2));
        let f = ki.get(5).unwrap();
        assert_eq!(f.modified, Revision::new(5, 1));
        assert_eq!(f.version, 1);
    }

    #[test]
    fn compact_like_etcd() {
        // etcd's TestKeyIndexCompactAndKeep sequence, in short.
        let mut ki = KeyIndex::new();
        for rev in [2, 4, 6] {
            ki.put(r(rev));
        }
        assert!(ki.tombstone(r(8)));
        for rev in [10, 12] {
            ki.put(r(rev));
        }
        assert!(ki.tombstone(r(14)));
        ki.put(r(16));

        let mut removed = Vec::new();
        ki.compact(1, &mut removed);
        assert!(removed.is_empty());

        ki.compact(5, &mut removed);
        assert_eq!(removed, vec![r(2)]);
        assert_eq!(ki.get(5).unwrap().modified, r(4));

        removed.clear();
        ki.compact(8, &mut removed);
        assert_eq!(removed, vec![r(4), r(6), r(8)]);

        removed.clear();
        ki.compact(13, &mut removed);
        assert_eq!(removed, vec![r(10)]);
        assert_eq!(ki.all_revisions(), vec![r(12), r(14), r(16)]);

        removed.clear();
        ki.compact(15, &mut removed);
        assert_eq!(removed, vec![r(12), r(14)]);
        assert_eq!(ki.all_revisions(), vec![r(16)]);

        removed.clear();
        ki.compact(17, &mut removed);
        assert!(removed.is_empty());
        assert_eq!(ki.get(17).unwrap().modified, r(16));
        // Version counting survives trimming.
        assert_eq!(ki.get(17).unwrap().version, 1);
    }

    #[test]
    fn compact_deleted_key_empties_it() {
        let mut ki = KeyIndex::new();
        ki.put(r(2));
        assert!(ki.tombstone(r(3)));
        let mut removed = Vec::new();
        ki.compact(3, &mut removed);
        assert_eq!(removed, vec![r(2), r(3)]);
        assert!(ki.is_empty());
    }

    #[test]
    fn undo_restores_previous_state() {
        let mut ki = KeyIndex::new();
        ki.put(r(2));
        ki.put(r(3));
        ki.undo_put();
        assert_eq!(ki.get(9).unwrap().modified, r(2));
        assert!(ki.tombstone(r(3)));
        ki.undo_tombstone();
        assert!(ki.is_live());
        assert_eq!(ki.get(9).unwrap().version, 1);
        ki.undo_put();
        assert!(ki.is_empty());
    }
}
