//! Multi-version key-value store with etcd 3.4's semantics (etcd's
//! `mvcc` package plus the KV parts of its v3 applier and request checks).
//!
//! - [`Store`] holds every key's history: a key index (per key, its
//!   revisions in generations, etcd's `keyIndex`) in a `BTreeMap` ordered by
//!   key, and the records (key-values and tombstones) in a `BTreeMap`
//!   ordered by revision. Reading the latest revision walks the index only;
//!   writes are `O(log n)`.
//! - [`Store::range`] serves `Range`; [`Store::write`] starts a
//!   [`WriteTxn`] for `Put`, `DeleteRange` and `Txn`, which yields the
//!   revision and the events to persist and publish.
//! - [`Store::compact`] drops history and lists the records storage may
//!   delete; [`Store::events`] serves watchers catching up;
//!   [`Store::restore`] rebuilds from stored events.
//!
//! Two layers, imported one way: `store` holds the data, its reads and its
//! record-level write primitives; `txn` builds etcd's Put, DeleteRange and
//! Txn (and read-only txns) on them, and adds [`Store::write`] and
//! [`Store::read_txn`] to the store.
//!
//! Revisions: an empty store is at revision 1; each write that changes
//! something gets the next main revision, and each change within it the next
//! sub revision (0, 1, ...). A delete of nothing and a txn that writes
//! nothing create no revision; a put always does.
//!
//! Top-level response headers are never filled here: the service layer
//! adds them. Responses nested in a txn get etcd's nested headers, which
//! carry only a revision (see [`WriteTxn::txn`]).
//!
//! Events carry `prev_kv` as etcd's watch fills it: the key's value at the
//! revision before the event's.

mod error;
mod key_index;
mod store;
mod txn;

pub use error::{ErrorKind, MvccError};
pub use store::{Compacted, DEFAULT_MAX_TXN_OPS, RestoreRecord, Store};
pub use txn::{WriteTxn, check_put_request, check_txn, is_read_only};

#[cfg(test)]
mod tests;
