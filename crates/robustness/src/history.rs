//! The recorded history: what each client asked, when, and what it was told.
//!
//! The types follow etcd's v3 API closely so a recorder can fill them straight
//! from gRPC responses: revisions and lease ids are `i64` as on the wire, a
//! revision or lease of `0` means "none" (current revision, no lease). Keys and
//! values are strings so that `history.json` stays readable; the traffic
//! generator uses ASCII keys and unique values, and a recorder converts etcd's
//! bytes with `String::from_utf8_lossy`.
//!
//! Times are monotonic nanoseconds from any fixed origin shared by all
//! clients. An operation whose result is unknown (timeout, connection lost)
//! has no return time: it may or may not have taken effect, at any point after
//! its invocation.

use serde::{Deserialize, Serialize};

/// Identifies the client (one logical connection, one operation at a time)
/// that issued an operation.
pub type ClientId = u32;

/// A whole recorded run: every operation of every client, in any order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// The operations; the checker sorts them by time itself.
    pub operations: Vec<Operation>,
}

/// One request of one client and what came of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    /// The client that issued it.
    pub client: ClientId,
    /// When the request was sent (monotonic nanoseconds).
    pub invoke: u64,
    /// When the answer arrived; `None` when no answer came (the outcome is
    /// then [`Outcome::Unknown`]).
    pub return_time: Option<u64>,
    /// What was asked.
    pub request: Request,
    /// What the server said.
    pub outcome: Outcome,
}

impl Operation {
    /// Whether the server's answer is known (a response or a definite error).
    pub fn is_known(&self) -> bool {
        !matches!(self.outcome, Outcome::Unknown)
    }

    /// The return time the checker uses: `u64::MAX` (infinity) for unknown
    /// outcomes and for known ones recorded without a time.
    pub fn effective_return(&self) -> u64 {
        match (&self.outcome, self.return_time) {
            (Outcome::Unknown, _) | (_, None) => u64::MAX,
            (_, Some(t)) => t,
        }
    }
}

/// A request, as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Range of one key.
    Get {
        /// The key.
        key: String,
        /// `0` for the current revision, otherwise a past revision to read at.
        #[serde(default)]
        revision: i64,
        /// Served by the member locally, without a quorum read (may be stale).
        #[serde(default)]
        serializable: bool,
    },
    /// Range of every key starting with `prefix`, sorted by key.
    Range {
        /// The prefix (etcd's `range_end` = prefix + 1).
        prefix: String,
        /// `0` for the current revision, otherwise a past revision.
        #[serde(default)]
        revision: i64,
        /// As for [`Request::Get`].
        #[serde(default)]
        serializable: bool,
    },
    /// Put of one key.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// The lease to attach the key to, `0` for none.
        #[serde(default)]
        lease: i64,
    },
    /// Delete of one key.
    Delete {
        /// The key.
        key: String,
    },
    /// A transaction: if every compare holds, `success` runs, else `failure`.
    Txn {
        /// The conditions, all of which must hold.
        compares: Vec<Compare>,
        /// The ops run when they do.
        success: Vec<TxnOp>,
        /// The ops run when they do not.
        failure: Vec<TxnOp>,
    },
    /// Grant of a lease.
    LeaseGrant {
        /// Time to live in seconds.
        ttl: i64,
        /// The id asked for, `0` to let the server choose. Traffic that may
        /// lose the answer should choose ids itself: the model cannot apply
        /// a grant of unknown outcome whose id it does not know.
        #[serde(default)]
        id: i64,
    },
    /// Revoke of a lease: the keys attached to it are deleted.
    LeaseRevoke {
        /// The lease.
        id: i64,
    },
    /// One keep-alive of a lease. For the model, a check of whether the
    /// lease exists (answered TTL > 0) or not (TTL 0, etcd's answer for an
    /// unknown or expired lease); renewal times are [`crate::lease`]'s.
    LeaseKeepAlive {
        /// The lease.
        id: i64,
    },
    /// The registry's own revoke of a lease whose TTL ran out. Never sent:
    /// the run adds one of unknown outcome (invoked when the lease was
    /// granted, client [`REGISTRY`]) for every lease that could expire
    /// during the history, which the watch may pin to the revision that
    /// deleted its keys ([`crate::pin`]). The model applies it as a revoke.
    LeaseExpire {
        /// The lease.
        id: i64,
    },
}

/// The client of the synthetic [`Request::LeaseExpire`] operations: the
/// registry itself.
pub const REGISTRY: ClientId = u32::MAX;

impl Request {
    /// Whether the request can never change the store (reads, keep-alives).
    pub fn is_read_only(&self) -> bool {
        match self {
            Request::Get { .. } | Request::Range { .. } | Request::LeaseKeepAlive { .. } => true,
            Request::Txn {
                success, failure, ..
            } => success
                .iter()
                .chain(failure)
                .all(|op| matches!(op, TxnOp::Get { .. })),
            _ => false,
        }
    }
}

/// One condition of a transaction: `target(key) op against`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Compare {
    /// The key compared.
    pub key: String,
    /// The comparison.
    pub op: CompareOp,
    /// What of the key is compared, and with what.
    pub target: CompareTarget,
}

/// etcd's compare result (`EQUAL`, `NOT_EQUAL`, `LESS`, `GREATER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompareOp {
    /// `=`
    Equal,
    /// `!=`
    NotEqual,
    /// `<`
    Less,
    /// `>`
    Greater,
}

/// The field compared and the value it is compared against.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompareTarget {
    /// The value (bytewise). Always false for a missing key, as in etcd.
    Value(String),
    /// The version (`0` for a missing key).
    Version(i64),
    /// The modification revision (`0` for a missing key).
    ModRevision(i64),
    /// The creation revision (`0` for a missing key).
    CreateRevision(i64),
}

/// One operation inside a transaction branch.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TxnOp {
    /// Read one key (sees the earlier writes of the same transaction).
    Get {
        /// The key.
        key: String,
    },
    /// Put one key.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// The lease, `0` for none.
        #[serde(default)]
        lease: i64,
    },
    /// Delete one key.
    Delete {
        /// The key.
        key: String,
    },
}

/// What came of a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outcome {
    /// The server answered.
    Response(Response),
    /// The server refused the request: it definitely did not change state.
    Error(EtcdError),
    /// No answer (timeout, connection error): it may or may not have
    /// happened.
    Unknown,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Response {
    /// The header revision: the store's revision after the request (the new
    /// revision for a write that changed something).
    pub revision: i64,
    /// The request-specific part.
    pub body: ResponseBody,
}

/// The request-specific part of a [`Response`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseBody {
    /// Answer to [`Request::Get`].
    Get {
        /// The key-value, `None` when the key does not exist.
        kv: Option<KeyValue>,
    },
    /// Answer to [`Request::Range`].
    Range {
        /// The key-values, sorted by key.
        kvs: Vec<KeyValue>,
    },
    /// Answer to [`Request::Put`] (its revision is the header's).
    Put,
    /// Answer to [`Request::Delete`].
    Delete {
        /// How many keys were deleted (0 or 1).
        deleted: i64,
    },
    /// Answer to [`Request::Txn`].
    Txn {
        /// Whether the compares held (the success branch ran).
        succeeded: bool,
        /// One result per op of the branch that ran.
        results: Vec<TxnOpResult>,
    },
    /// Answer to [`Request::LeaseGrant`].
    LeaseGrant {
        /// The id of the granted lease.
        id: i64,
    },
    /// Answer to [`Request::LeaseRevoke`].
    LeaseRevoke,
    /// Answer to [`Request::LeaseKeepAlive`].
    LeaseKeepAlive {
        /// The TTL the lease was renewed to; `0`: the lease does not exist
        /// (etcd answers so, without an error, for an unknown or expired
        /// lease).
        #[serde(default)]
        ttl: i64,
    },
}

/// The result of one op inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TxnOpResult {
    /// Result of [`TxnOp::Get`].
    Get {
        /// The key-value, `None` when missing.
        kv: Option<KeyValue>,
    },
    /// Result of [`TxnOp::Put`].
    Put,
    /// Result of [`TxnOp::Delete`].
    Delete {
        /// How many keys were deleted (0 or 1).
        deleted: i64,
    },
}

/// A key-value as etcd returns it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
    /// Revision of the put that created the key (since its last delete).
    pub create_revision: i64,
    /// Revision of its last modification.
    pub mod_revision: i64,
    /// Number of puts since creation (1 after the first).
    pub version: i64,
    /// The lease it is attached to, `0` for none.
    pub lease: i64,
}

/// A definite failure: the server answered with an error, so the request
/// did not change state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EtcdError {
    /// `requested lease not found`: the model checks the lease is indeed
    /// absent.
    LeaseNotFound,
    /// `required revision has been compacted`: compaction is not modelled,
    /// so this is accepted anywhere.
    Compacted,
    /// `required revision is a future revision`: the model checks the
    /// revision is indeed ahead of the store.
    FutureRevision,
    /// Any other definite error (its message), accepted as a no-op.
    Other(String),
}

impl History {
    /// Reads a history from JSON (as written by [`History::to_json`]).
    pub fn from_json(json: &str) -> Result<History, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// The history as pretty-printed JSON, for `history.json`.
    pub fn to_json(&self) -> String {
        // Serializing these plain data types cannot fail (string keys only).
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Problems that make the history unusable (a return before its
    /// invocation), one line each. A known outcome without a return time is
    /// allowed: it is what a history patched from watch events holds (the
    /// request happened, its answer was lost), and it returns at infinity.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (i, op) in self.operations.iter().enumerate() {
            if let Some(ret) = op.return_time
                && ret < op.invoke
            {
                problems.push(format!(
                    "operation {i}: returns at {ret} before its invocation at {}",
                    op.invoke
                ));
            }
        }
        problems
    }
}
