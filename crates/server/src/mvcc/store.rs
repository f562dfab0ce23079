//! The multi-version store: a key index (etcd's `treeIndex`) and the
//! revision-ordered records (etcd's `key` bucket), both in memory.
//!
//! The lower layer: ranges, history, compaction and restore, and the
//! record-level write primitives (`put_record`, `delete_record`, `undo`),
//! which know nothing of transactions. The txn layer (`txn.rs`) builds
//! etcd's Put, DeleteRange and Txn on them; this module does not use it.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;

use muster_proto::range_request::{SortOrder, SortTarget};
use muster_proto::{Event, EventType, KeyValue, RangeRequest, RangeResponse};

use super::error::MvccError;
use super::key_index::{KeyIndex, Revision};

/// etcd's default `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;

/// One revision's record: a put's key-value, or a tombstone (key and
/// `mod_revision` only).
#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub(crate) kv: KeyValue,
    pub(crate) tombstone: bool,
}

/// What a compaction removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compacted {
    /// The `(main, sub)` revisions whose records storage may delete, in
    /// increasing order: versions superseded at or before the compact
    /// revision, and deleted keys' whole lives that ended at or before it.
    /// All have `main <=` the compact revision.
    pub removed: Vec<(i64, i64)>,
}

/// One stored event handed to [`Store::restore`], with the `(main, sub)`
/// revision it is stored under when known.
///
/// Give the revisions when storage has them: they are what
/// [`Compacted::removed`] names later. Without them, events of one main
/// revision are numbered 0, 1, ... in the order given, which matches the
/// original sub revisions only when no event of that revision was removed.
#[derive(Clone, Debug, PartialEq)]
pub struct RestoreRecord {
    /// `(main, sub)` revision, if known.
    pub revision: Option<(i64, i64)>,
    /// The event as a write ([`Store::write`]) returned it (`prev_kv` is
    /// ignored).
    pub event: Event,
}

impl From<Event> for RestoreRecord {
    fn from(event: Event) -> Self {
        RestoreRecord {
            revision: None,
            event,
        }
    }
}

impl From<((i64, i64), Event)> for RestoreRecord {
    fn from((revision, event): ((i64, i64), Event)) -> Self {
        RestoreRecord {
            revision: Some(revision),
            event,
        }
    }
}

/// The multi-version key-value store, with etcd 3.4's semantics.
///
/// Reads go through [`Store::range`] (and [`Store::read_txn`]), writes
/// through [`Store::write`]. Every write transaction that changes something
/// gets the next main revision; each change in it gets the next sub
/// revision, starting at 0. An empty store is at revision 1, so the first
/// write gets revision 2.
pub struct Store {
    /// Key to its revisions.
    pub(crate) index: BTreeMap<Vec<u8>, KeyIndex>,
    /// Revision to its record.
    pub(crate) records: BTreeMap<Revision, Record>,
    /// Latest applied revision.
    pub(crate) current_rev: i64,
    /// etcd's `compactMainRev`: -1 until the first compaction.
    pub(crate) compact_main_rev: i64,
    /// Number of live keys.
    pub(crate) live: usize,
    pub(crate) max_txn_ops: usize,
    /// The bytes of the kept records, as [`record_bytes`] counts them.
    pub(crate) bytes: u64,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("revision", &self.current_rev)
            .field("compact_revision", &self.compact_revision())
            .field("keys", &self.live)
            .field("records", &self.records.len())
            .finish_non_exhaustive()
    }
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

impl Store {
    /// An empty store at revision 1.
    pub fn new() -> Store {
        Store {
            index: BTreeMap::new(),
            records: BTreeMap::new(),
            current_rev: 1,
            compact_main_rev: -1,
            live: 0,
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
            bytes: 0,
        }
    }

    /// Sets the most compares, or operations in one branch, a txn may have
    /// (etcd's `--max-txn-ops`, default [`DEFAULT_MAX_TXN_OPS`]).
    pub fn with_max_txn_ops(mut self, max_txn_ops: usize) -> Store {
        self.max_txn_ops = max_txn_ops;
        self
    }

    /// The txn operation limit (see [`Store::with_max_txn_ops`]).
    pub fn max_txn_ops(&self) -> usize {
        self.max_txn_ops
    }

    /// The latest applied revision.
    pub fn revision(&self) -> i64 {
        self.current_rev
    }

    /// The compact revision; 0 until the first compaction.
    pub fn compact_revision(&self) -> i64 {
        self.compact_main_rev.max(0)
    }

    /// Raises the revision to `revision` if it is higher (after a restore,
    /// to the highest revision storage recorded); never lowers it.
    pub fn bump_revision(&mut self, revision: i64) {
        self.current_rev = self.current_rev.max(revision);
    }

    /// The bytes of the history kept (every record: live values, older
    /// versions and tombstones not yet compacted away), about as storage
    /// holds them.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Number of live keys.
    pub fn len(&self) -> usize {
        self.live
    }

    /// True when no key is live.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// The latest key-value of a live key.
    pub fn get(&self, key: &[u8]) -> Option<&KeyValue> {
        let rev = self.index.get(key)?.latest()?;
        self.records.get(&rev).map(|r| &r.kv)
    }

    /// Every live key that has a lease, with its lease id, in key order
    /// (to rebuild lease attachments after a restart).
    pub fn keys_with_lease(&self) -> impl Iterator<Item = (&[u8], i64)> + '_ {
        self.index.iter().filter_map(|(key, ki)| {
            let rec = self.records.get(&ki.latest()?)?;
            (rec.kv.lease != 0).then_some((key.as_slice(), rec.kv.lease))
        })
    }

    /// etcd's `Range`: reads at most `max_rev` (the durably committed
    /// revision; clamped to `1..=revision()`). Fills `kvs`, `more` and
    /// `count`; `header` is left `None`.
    ///
    /// As etcd 3.4: `revision` 0 (or negative) reads `max_rev`, a revision
    /// above it is [`MvccError::FutureRevision`], one below the compact
    /// revision [`MvccError::Compacted`]. `count` is the number of keys in
    /// the range before the `min/max_*_revision` filters and the limit;
    /// `more` tells whether the limit cut the (filtered) result. Sorted
    /// by a target other than the key, keys with the same target come in
    /// key order (ascending, also when sorting descends).
    pub fn range(&self, req: &RangeRequest, max_rev: i64) -> Result<RangeResponse, MvccError> {
        if req.key.is_empty() {
            return Err(MvccError::EmptyKey);
        }
        self.do_range(req, self.read_rev(max_rev))
    }

    /// etcd's `Compact`: forgets the history before `rev`. Reads at
    /// revisions below `rev` then fail with [`MvccError::Compacted`]; each
    /// key keeps its latest version at or before `rev` (a key deleted at or
    /// before `rev` disappears). `rev` at or below the compact revision is
    /// [`MvccError::Compacted`], above the store's revision
    /// [`MvccError::FutureRevision`].
    pub fn compact(&mut self, rev: i64) -> Result<Compacted, MvccError> {
        if rev <= self.compact_main_rev {
            return Err(MvccError::Compacted);
        }
        if rev > self.current_rev {
            return Err(MvccError::FutureRevision);
        }
        self.compact_main_rev = rev;
        let removed = self.compact_index(rev);
        Ok(Compacted {
            removed: removed.into_iter().map(|r| (r.main, r.sub)).collect(),
        })
    }

    /// `Maintenance.HashKV`: a CRC-32 (IEEE) of every record the store keeps
    /// with a main revision up to `rev` (0: `current`, the revision the
    /// caller counts as the store's), in revision order, each as its
    /// revision (main and sub, big-endian) then its key-value
    /// (prost-encoded) and whether it is a tombstone; and the compact
    /// revision (-1 before any compaction, as etcd reports it).
    ///
    /// It depends only on the history the store keeps, so the same history
    /// hashes the same after a restart or a snapshot round trip (and
    /// differently once a compaction removed part of it). It is not etcd's
    /// value: etcd hashes its bbolt records, a different encoding. As
    /// etcd's: `rev` above `current` is [`MvccError::FutureRevision`], and
    /// a given `rev` at or below the compact revision is
    /// [`MvccError::Compacted`].
    pub fn hash_kv(&self, rev: i64, current: i64) -> Result<(u32, i64), MvccError> {
        if rev > current {
            return Err(MvccError::FutureRevision);
        }
        if rev > 0 && rev <= self.compact_main_rev {
            return Err(MvccError::Compacted);
        }
        let rev = if rev <= 0 { current } else { rev };
        let mut h = crc32fast::Hasher::new();
        let mut buf = Vec::new();
        for (r, rec) in self.records.range(..=Revision::new(rev, i64::MAX)) {
            h.update(&r.main.to_be_bytes());
            h.update(&r.sub.to_be_bytes());
            buf.clear();
            prost::Message::encode(&rec.kv, &mut buf).expect("a Vec grows as needed");
            h.update(&buf);
            h.update(&[u8::from(rec.tombstone)]);
        }
        Ok((h.finalize(), self.compact_main_rev))
    }

    /// History for watchers: every event with `from_rev <= mod_revision <=
    /// to_rev` on a key in `[key, range_end)` (empty `range_end`: `key`
    /// only; `[0]`: every key `>= key`), in revision order.
    ///
    /// `prev_kv` is the key's value at the revision before the event's (as
    /// etcd's watch reads it: for a key a txn touched twice, the value from
    /// before the txn), `None` for an event creating the key (even one a
    /// txn deleted and put again), when the key did not exist then, or when
    /// that revision is older than the compact revision (etcd's watch finds
    /// none then either). A DELETE event's `kv` holds only the key and
    /// `mod_revision`, as etcd's. `from_rev` below the compact revision is
    /// [`MvccError::Compacted`]. Events of the compact revision itself are
    /// there only if compaction kept them (a deletion at the compact
    /// revision is gone, as in etcd).
    pub fn events(
        &self,
        from_rev: i64,
        to_rev: i64,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<Vec<Event>, MvccError> {
        if from_rev < self.compact_main_rev {
            return Err(MvccError::Compacted);
        }
        let mut out = Vec::new();
        if to_rev < from_rev {
            return Ok(out);
        }
        let lo = Revision::new(from_rev, 0);
        let hi = Revision::new(to_rev, i64::MAX);
        if range_end.is_empty() {
            // One key: walk its own revisions rather than all history.
            if let Some(ki) = self.index.get(key) {
                for rev in ki.revisions().filter(|r| *r >= lo && *r <= hi) {
                    if let Some(rec) = self.records.get(&rev) {
                        out.push(self.history_event(rev, rec));
                    }
                }
            }
        } else {
            for (rev, rec) in self.records.range(lo..=hi) {
                if in_range(&rec.kv.key, key, range_end) {
                    out.push(self.history_event(*rev, rec));
                }
            }
        }
        Ok(out)
    }

    /// Rebuilds a store from stored events (as writes returned them, or with their `(main, sub)` revisions, see [`RestoreRecord`])
    /// and the compact revision (0: never compacted). Events may come in any
    /// order; they are replayed in revision order. The revision becomes the
    /// highest of 1, the events' and the compact revision (raise it further
    /// with [`Store::bump_revision`]). History superseded at or before the
    /// compact revision is dropped again, as if compaction ran.
    pub fn restore<I>(events: I, compact_revision: i64) -> Store
    where
        I: IntoIterator,
        I::Item: Into<RestoreRecord>,
    {
        let mut items: Vec<(Revision, Event)> = Vec::new();
        let mut last = Revision::new(i64::MIN, 0);
        for item in events {
            let RestoreRecord { revision, event } = item.into();
            let Some(kv) = &event.kv else { continue };
            let rev = match revision {
                Some((main, sub)) => Revision::new(main, sub),
                None if kv.mod_revision == last.main => Revision::new(last.main, last.sub + 1),
                None => Revision::new(kv.mod_revision, 0),
            };
            last = rev;
            items.push((rev, event));
        }
        items.sort_by_key(|(rev, _)| *rev);

        let mut store = Store::new();
        for (rev, event) in items {
            let Some(kv) = event.kv else { continue };
            if rev.main < 1 || store.records.contains_key(&rev) {
                continue;
            }
            // As etcd's restore: every stored record raises the revision,
            // even one it cannot index.
            store.current_rev = store.current_rev.max(rev.main);
            if event.r#type == EventType::Delete as i32 {
                let Some(ki) = store.index.get_mut(&kv.key) else {
                    continue;
                };
                if !ki.tombstone(rev) {
                    continue;
                }
                store.insert_record(rev, tombstone_record(kv.key, rev));
            } else {
                let ki = store.index.entry(kv.key.clone()).or_default();
                if ki.latest().is_some_and(|latest| latest >= rev) {
                    continue;
                }
                let created_sub = if kv.create_revision == rev.main {
                    rev.sub
                } else {
                    0
                };
                let created = Revision::new(kv.create_revision, created_sub);
                ki.restore_put(rev, created, kv.version);
                store.insert_record(
                    rev,
                    Record {
                        kv,
                        tombstone: false,
                    },
                );
            }
        }
        store.live = store.index.values().filter(|ki| ki.is_live()).count();
        store.current_rev = store.current_rev.max(compact_revision);
        if compact_revision > 0 {
            store.compact_main_rev = compact_revision;
            store.compact_index(compact_revision);
        }
        store
    }

    // ----- primitives for the store's reads and for the txn layer -----

    /// The revision a read bounded by `max_rev` sees.
    pub(crate) fn read_rev(&self, max_rev: i64) -> i64 {
        max_rev.clamp(1, self.current_rev)
    }

    /// etcd's `checkRequestRange`: whether a range may read at `rev` when
    /// the current revision is `cur` (0 reads `cur`).
    pub(crate) fn check_range_revision(&self, rev: i64, cur: i64) -> Result<(), MvccError> {
        if rev == 0 {
            Ok(())
        } else if rev > cur {
            Err(MvccError::FutureRevision)
        } else if rev < self.compact_main_rev {
            Err(MvccError::Compacted)
        } else {
            Ok(())
        }
    }

    /// Compacts the index at `rev`, drops the removed records, and returns
    /// their revisions in increasing order.
    fn compact_index(&mut self, rev: i64) -> Vec<Revision> {
        let mut removed = Vec::new();
        self.index.retain(|_, ki| {
            ki.compact(rev, &mut removed);
            !ki.is_empty()
        });
        for r in &removed {
            self.remove_record(r);
        }
        removed.sort_unstable();
        removed
    }

    /// The live keys in `[key, end)` at main revision `rev`, with the
    /// revision holding each one's value, in key order.
    pub(crate) fn revs_at<'s>(
        &'s self,
        key: &[u8],
        end: &[u8],
        rev: i64,
    ) -> impl Iterator<Item = (&'s [u8], Revision)> + use<'s> {
        self.index
            .range::<[u8], _>(key_bounds(key, end))
            .filter_map(move |(k, ki)| ki.get(rev).map(|f| (k.as_slice(), f.modified)))
    }

    /// The key-values in `[key, end)` at main revision `rev`, in key order.
    pub(crate) fn iter_at<'s>(
        &'s self,
        key: &[u8],
        end: &[u8],
        rev: i64,
    ) -> impl Iterator<Item = &'s KeyValue> + use<'s> {
        self.revs_at(key, end, rev)
            .filter_map(move |(_, r)| self.records.get(&r).map(|rec| &rec.kv))
    }

    /// One key's key-value at main revision `rev`.
    pub(crate) fn kv_at(&self, key: &[u8], rev: i64) -> Option<&KeyValue> {
        let found = self.index.get(key)?.get(rev)?;
        self.records.get(&found.modified).map(|r| &r.kv)
    }

    /// etcd's mvcc `rangeKeys`: the key-values (at most `limit` when it is
    /// positive; none when `count_only`) and the count of all matches.
    #[allow(clippy::too_many_arguments)]
    fn range_kvs(
        &self,
        key: &[u8],
        end: &[u8],
        ro_rev: i64,
        cur: i64,
        limit: i64,
        count_only: bool,
        with_values: bool,
    ) -> Result<(Vec<KeyValue>, i64), MvccError> {
        if ro_rev > cur {
            return Err(MvccError::FutureRevision);
        }
        let rev = if ro_rev <= 0 { cur } else { ro_rev };
        if rev < self.compact_main_rev {
            return Err(MvccError::Compacted);
        }
        let cap = if limit > 0 {
            usize::try_from(limit).unwrap_or(usize::MAX)
        } else {
            usize::MAX
        };
        let mut kvs = Vec::new();
        let mut count = 0i64;
        for (_, r) in self.revs_at(key, end, rev) {
            count += 1;
            if count_only || kvs.len() >= cap {
                continue;
            }
            if let Some(rec) = self.records.get(&r) {
                kvs.push(if with_values {
                    rec.kv.clone()
                } else {
                    KeyValue {
                        key: rec.kv.key.clone(),
                        create_revision: rec.kv.create_revision,
                        mod_revision: rec.kv.mod_revision,
                        version: rec.kv.version,
                        value: Vec::new(),
                        lease: rec.kv.lease,
                    }
                });
            }
        }
        Ok((kvs, count))
    }

    /// etcd's `applierV3backend.Range` at read revision `cur` (the key is
    /// already checked non-empty). A sorted range is ordered by its target,
    /// ties by key ascending whether the target ascends or descends (see
    /// `sort_fn`): etcd leaves the order of ties undefined.
    pub(crate) fn do_range(&self, r: &RangeRequest, cur: i64) -> Result<RangeResponse, MvccError> {
        let none = SortOrder::None as i32;
        let filtered = r.min_mod_revision != 0
            || r.max_mod_revision != 0
            || r.min_create_revision != 0
            || r.max_create_revision != 0;
        let mut limit = r.limit;
        if r.sort_order != none || filtered {
            // Fetch everything; filter, sort and truncate afterwards.
            limit = 0;
        }
        if limit > 0 {
            // One extra for `more`.
            limit = limit.saturating_add(1);
        }
        let mut order = r.sort_order;
        if r.sort_target != SortTarget::Key as i32 && order == none {
            // mvcc returns keys ascending; other targets default to ASCEND.
            order = SortOrder::Ascend as i32;
        }
        let cmp = sort_fn(order, r.sort_target);
        let with_values =
            !r.keys_only || (cmp.is_some() && r.sort_target == SortTarget::Value as i32);
        let (mut kvs, count) = self.range_kvs(
            &r.key,
            &r.range_end,
            r.revision,
            cur,
            limit,
            r.count_only,
            with_values,
        )?;
        if r.max_mod_revision != 0 {
            kvs.retain(|kv| kv.mod_revision <= r.max_mod_revision);
        }
        if r.min_mod_revision != 0 {
            kvs.retain(|kv| kv.mod_revision >= r.min_mod_revision);
        }
        if r.max_create_revision != 0 {
            kvs.retain(|kv| kv.create_revision <= r.max_create_revision);
        }
        if r.min_create_revision != 0 {
            kvs.retain(|kv| kv.create_revision >= r.min_create_revision);
        }
        if let Some(cmp) = cmp {
            // A total order (keys are unique), so the result is the same
            // whatever the algorithm: ties by key ascending (see sort_fn).
            kvs.sort_unstable_by(cmp);
        }
        let mut more = false;
        if r.limit > 0 {
            let max = usize::try_from(r.limit).unwrap_or(usize::MAX);
            if kvs.len() > max {
                kvs.truncate(max);
                more = true;
            }
        }
        if r.keys_only {
            for kv in &mut kvs {
                kv.value = Vec::new();
            }
        }
        Ok(RangeResponse {
            header: None,
            kvs,
            more,
            count,
        })
    }

    /// Records a put of `key` at `rev` (after every recorded revision) and
    /// returns its event; `prev_kv` is the key's value at the revision
    /// before `rev.main` (etcd's watch `prev_kv`), `None` for a put that
    /// creates the key.
    pub(crate) fn put_record(
        &mut self,
        key: &[u8],
        value: Vec<u8>,
        lease: i64,
        rev: Revision,
    ) -> Event {
        // One search of the index for a key that exists (the common
        // overwrite); a new key pays for a second one, on insertion.
        let ki = match self.index.get_mut(key) {
            Some(ki) => ki,
            None => self.index.entry(key.to_vec()).or_default(),
        };
        let found = ki.get(rev.main);
        // A put creating the key has none, even if the key existed before
        // this write (etcd skips create events).
        let prev_kv = found
            .and_then(|_| ki.get(rev.main - 1))
            .and_then(|f| self.records.get(&f.modified).map(|r| r.kv.clone()));
        let (create_revision, version) = match found {
            Some(f) => (f.created.main, f.version + 1),
            None => (rev.main, 1),
        };
        if found.is_none() {
            self.live += 1;
        }
        ki.put(rev);
        let kv = KeyValue {
            key: key.to_vec(),
            create_revision,
            mod_revision: rev.main,
            version,
            value,
            lease,
        };
        self.insert_record(
            rev,
            Record {
                kv: kv.clone(),
                tombstone: false,
            },
        );
        Event {
            r#type: EventType::Put as i32,
            kv: Some(kv),
            prev_kv,
        }
    }

    /// Records the deletion of `key` at `rev` and returns its event, or
    /// `None` when the key does not exist; `prev_kv` as for
    /// [`Store::put_record`].
    pub(crate) fn delete_record(&mut self, key: &[u8], rev: Revision) -> Option<Event> {
        let ki = self.index.get_mut(key)?;
        ki.get(rev.main)?;
        let prev_kv = ki
            .get(rev.main - 1)
            .and_then(|f| self.records.get(&f.modified).map(|r| r.kv.clone()));
        if !ki.tombstone(rev) {
            return None;
        }
        self.live -= 1;
        let record = tombstone_record(key.to_vec(), rev);
        let kv = record.kv.clone();
        self.insert_record(rev, record);
        Some(Event {
            r#type: EventType::Delete as i32,
            kv: Some(kv),
            prev_kv,
        })
    }

    /// Keeps `record` at `rev`, counting its bytes.
    fn insert_record(&mut self, rev: Revision, record: Record) {
        self.bytes += record_bytes(&record);
        if let Some(old) = self.records.insert(rev, record) {
            self.bytes -= record_bytes(&old);
        }
    }

    /// Drops the record at `rev`, if any, and its bytes.
    fn remove_record(&mut self, rev: &Revision) {
        if let Some(old) = self.records.remove(rev) {
            self.bytes -= record_bytes(&old);
        }
    }

    /// Undoes the latest change, `event` recorded at `rev`.
    pub(crate) fn undo(&mut self, rev: Revision, event: &Event) {
        self.remove_record(&rev);
        let Some(key) = event.kv.as_ref().map(|kv| kv.key.as_slice()) else {
            return;
        };
        let Some(ki) = self.index.get_mut(key) else {
            return;
        };
        if event.r#type == EventType::Delete as i32 {
            ki.undo_tombstone();
            self.live += 1;
        } else {
            ki.undo_put();
            if !ki.is_live() {
                self.live -= 1;
            }
        }
        if ki.is_empty() {
            self.index.remove(key);
        }
    }

    /// The event of a stored record, with `prev_kv` as etcd's watch fills
    /// it: the key's value at the revision before the event's (`None` for
    /// an event creating the key, or when that revision is compacted).
    fn history_event(&self, rev: Revision, rec: &Record) -> Event {
        let creates = !rec.tombstone && rec.kv.create_revision == rec.kv.mod_revision;
        let prev_kv = if creates || rev.main - 1 < self.compact_main_rev {
            None
        } else {
            self.kv_at(&rec.kv.key, rev.main - 1).cloned()
        };
        let r#type = if rec.tombstone {
            EventType::Delete
        } else {
            EventType::Put
        };
        Event {
            r#type: r#type as i32,
            kv: Some(rec.kv.clone()),
            prev_kv,
        }
    }
}

/// A tombstone's record: the key and the deletion's main revision.
/// What a record takes in storage, about: its key and value, and a fixed
/// allowance for its revision key, the rest of its key-value and the
/// table's per-entry overhead. The space quota counts these (see
/// `crate::alarm`).
fn record_bytes(record: &Record) -> u64 {
    const PER_RECORD: u64 = 64;
    (record.kv.key.len() + record.kv.value.len()) as u64 + PER_RECORD
}

fn tombstone_record(key: Vec<u8>, rev: Revision) -> Record {
    Record {
        kv: KeyValue {
            key,
            mod_revision: rev.main,
            ..KeyValue::default()
        },
        tombstone: true,
    }
}

/// Index bounds of `[key, end)` under etcd's conventions: empty `end` is
/// `key` alone, `[0]` is every key from `key` on, an `end` not after `key`
/// is empty.
fn key_bounds<'k>(key: &'k [u8], end: &'k [u8]) -> (Bound<&'k [u8]>, Bound<&'k [u8]>) {
    if end.is_empty() {
        (Bound::Included(key), Bound::Included(key))
    } else if end == [0] {
        (Bound::Included(key), Bound::Unbounded)
    } else if end <= key {
        (Bound::Included(key), Bound::Excluded(key))
    } else {
        (Bound::Included(key), Bound::Excluded(end))
    }
}

/// Whether `k` is in `[key, end)` under the same conventions.
pub(crate) fn in_range(k: &[u8], key: &[u8], end: &[u8]) -> bool {
    if end.is_empty() {
        k == key
    } else if end == [0] {
        k >= key
    } else {
        k >= key && k < end
    }
}

type KvCmp = fn(&KeyValue, &KeyValue) -> Ordering;

/// The order a range sorts in, if `order` asks for sorting: by the sort
/// target, ascending or descending, and key-values with the same target (a
/// tie) by key ascending in either direction.
///
/// etcd defines no order of ties (Go's sort is not stable), so clients
/// cannot rely on one; ours is total, hence deterministic. Key ascending
/// both ways reads like an unsorted range within each tie, and it is what
/// etcd 3.4 answers for up to 12 keys (Go's insertion sort, stable, with
/// `sort.Reverse` flipping only the comparison).
fn sort_fn(order: i32, target: i32) -> Option<impl Fn(&KeyValue, &KeyValue) -> Ordering> {
    let descend = match SortOrder::try_from(order).ok()? {
        SortOrder::Ascend => false,
        SortOrder::Descend => true,
        SortOrder::None => return None,
    };
    let by_target: KvCmp = match SortTarget::try_from(target).ok()? {
        SortTarget::Key => |a, b| a.key.cmp(&b.key),
        SortTarget::Version => |a, b| a.version.cmp(&b.version),
        SortTarget::Create => |a, b| a.create_revision.cmp(&b.create_revision),
        SortTarget::Mod => |a, b| a.mod_revision.cmp(&b.mod_revision),
        SortTarget::Value => |a, b| a.value.cmp(&b.value),
    };
    Some(move |a: &KeyValue, b: &KeyValue| {
        let by_target = by_target(a, b);
        let by_target = if descend {
            by_target.reverse()
        } else {
            by_target
        };
        by_target.then_with(|| a.key.cmp(&b.key))
    })
}
