//! Errors of the MVCC store, with etcd's messages and gRPC status classes.

/// The gRPC status class of an [`MvccError`], as etcd's `rpctypes` map them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// `codes.InvalidArgument`.
    InvalidArgument,
    /// `codes.OutOfRange` (compacted or future revisions).
    OutOfRange,
    /// `codes.NotFound` (missing lease).
    NotFound,
}

/// An error of a read, write or compaction. `Display` gives etcd's exact
/// message (what etcd's clients see as the gRPC status message).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum MvccError {
    /// The revision asked for is older than the compact revision.
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    /// The revision asked for is newer than the store's revision.
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    /// `ignore_value`/`ignore_lease` on a key that does not exist, or an
    /// empty `RequestOp` in a txn.
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// A put names a lease that does not exist.
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    /// A put sets both `ignore_value` and a value.
    #[error("etcdserver: value is provided")]
    ValueProvided,
    /// A put sets both `ignore_lease` and a lease.
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    /// A txn branch puts a key twice, or puts a key it also deletes.
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    /// A txn has more compares or operations in a branch than allowed.
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    /// A request (or a compare) has an empty key.
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// [`Store::read_txn`](super::Store::read_txn) was given a txn that
    /// writes (not an etcd error: a misuse by the caller).
    #[error("etcdserver: txn request is not read-only")]
    NotReadOnly,
}

impl MvccError {
    /// The gRPC status class etcd answers this error with.
    pub fn kind(&self) -> ErrorKind {
        match self {
            MvccError::Compacted | MvccError::FutureRevision => ErrorKind::OutOfRange,
            MvccError::LeaseNotFound => ErrorKind::NotFound,
            MvccError::KeyNotFound
            | MvccError::ValueProvided
            | MvccError::LeaseProvided
            | MvccError::DuplicateKey
            | MvccError::TooManyOps
            | MvccError::EmptyKey
            | MvccError::NotReadOnly => ErrorKind::InvalidArgument,
        }
    }
}
