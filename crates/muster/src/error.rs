//! Typed errors for everything the library does.
//!
//! etcd's gRPC statuses are mapped to variants a caller can act on
//! (compacted history, future revision, lost lease, unavailable registry,
//! failed authentication); anything else keeps its [`tonic::Status`].

use std::time::Duration;

/// A `Result` with muster's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in muster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Input rejected before anything was sent: a bad service name, id,
    /// address, weight or configuration.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was invalid ("service name", "instance id", ...).
        what: &'static str,
        /// Why, in words a user can act on.
        reason: String,
    },
    /// The requested revision has been compacted away; history before
    /// `compact_revision` is gone.
    #[error(
        "etcdserver: mvcc: required revision has been compacted (compact revision {compact_revision})"
    )]
    Compacted {
        /// The oldest revision still available, when the server said so.
        compact_revision: i64,
    },
    /// The requested revision is newer than the store's current revision.
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    /// The lease does not exist (expired, revoked, or the registry was wiped).
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    /// No endpoint of the registry could be reached, or it has no leader.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// TLS could not be set up: unreadable or mismatched certificate files
    /// (at construction), or a handshake the server or we refused (the
    /// message names the peer and the reason). Not transient: the same
    /// certificates fail the same way until they are fixed.
    #[error("{0}")]
    Tls(String),
    /// Authentication failed or the token could not be refreshed: wrong
    /// user or password (or the user was deleted). Not transient: the same
    /// credentials fail the same way until they are fixed.
    #[error("authentication failed: {0}")]
    AuthFailed(String),
    /// etcd has auth enabled and refused the request: the user (or, for a
    /// client without credentials, the anonymous client) has no role
    /// granting it. Not transient: grant a role, or use another user.
    #[error("{}", permission_denied(.user.as_deref(), .request))]
    PermissionDenied {
        /// The etcd user the client authenticates as; `None` for a client
        /// without credentials.
        user: Option<String>,
        /// What was refused, naming its key range when known (`watch
        /// prefix /muster/services/web/`, `read key /a`); empty when etcd
        /// did not say.
        request: String,
    },
    /// A request did not complete within its timeout.
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    /// The registry stayed unreachable for the whole wait a registrar was
    /// given ([`crate::RegistrarConfig::wait`]); `last` is the last
    /// attempt's error.
    #[error("the registry stayed unavailable for {waited:?} (retrying with backoff): {last}")]
    Outage {
        /// How long it was retried.
        waited: Duration,
        /// The last attempt's error.
        last: Box<Error>,
    },
    /// Another live instance already holds this service/id.
    #[error(
        "instance {service}/{id} is already registered by another live instance (lease {holder_lease:x})"
    )]
    AlreadyRegistered {
        /// The service name.
        service: String,
        /// The instance id.
        id: String,
        /// The lease of the current holder.
        holder_lease: i64,
    },
    /// The named registration is not held by this registrar.
    #[error("instance {service}/{id} is not registered here")]
    NotRegistered {
        /// The service name.
        service: String,
        /// The instance id.
        id: String,
    },
    /// A value read from the registry could not be decoded.
    #[error("malformed value at {key}: {reason}")]
    Malformed {
        /// The key holding the bad value.
        key: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The component was shut down and no longer accepts requests.
    #[error("{0} has shut down")]
    Closed(&'static str),
    /// etcd refused an auth request: a user or role that exists or does
    /// not, enabling auth without a `root` user that has the `root` role,
    /// revoking what was not granted, ... Displayed in etcd's words.
    #[error("{0}")]
    Auth(crate::auth::AuthError),
    /// Any other gRPC status from the registry.
    #[error("etcd: {0}")]
    Grpc(#[from] tonic::Status),
}

impl Error {
    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Error::Invalid {
            what,
            reason: reason.into(),
        }
    }

    /// Maps a gRPC status from etcd to the variant a caller can act on.
    pub fn from_status(status: tonic::Status) -> Self {
        use tonic::Code;
        if let Some(found) = speaks_tls(&status) {
            return if found.certain {
                Error::Tls(found.to_string())
            } else {
                Error::Unavailable(found.to_string())
            };
        }
        let msg = status.message();
        if let Some(refused) = crate::auth::AuthError::from_message(msg) {
            return Error::Auth(refused);
        }
        match status.code() {
            Code::OutOfRange if msg.contains("compacted") => Error::Compacted {
                compact_revision: 0,
            },
            Code::OutOfRange if msg.contains("future revision") => Error::FutureRevision,
            Code::NotFound if msg.contains("lease not found") => Error::LeaseNotFound,
            Code::Unavailable if msg.contains("TLS handshake") => Error::Tls(msg.to_string()),
            Code::Unavailable | Code::Cancelled => Error::Unavailable(msg.to_string()),
            // A connection that broke mid-stream surfaces as Unknown.
            Code::Unknown
                if msg.contains("transport error")
                    || msg.contains("h2 protocol error")
                    || msg.contains("broken pipe") =>
            {
                Error::Unavailable(msg.to_string())
            }
            Code::PermissionDenied => Error::PermissionDenied {
                user: None,
                request: String::new(),
            },
            // etcd's answer to a request without a token while auth is on.
            Code::InvalidArgument if msg.contains(USER_EMPTY) => Error::PermissionDenied {
                user: None,
                request: String::new(),
            },
            Code::Unauthenticated => Error::AuthFailed(msg.to_string()),
            _ => Error::Grpc(status),
        }
    }

    /// Whether retrying the same call later (or on another endpoint) may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Unavailable(_) | Error::Timeout(_) | Error::Outage { .. }
        )
    }
}

/// etcd's words (`rpctypes`) for a request its auth store refused; the
/// same words are a watch create's `cancel_reason`.
const INVALID_TOKEN: &str = "invalid auth token";
const OLD_REVISION: &str = "revision of auth store is old";
const USER_EMPTY: &str = "user name is empty";
const DENIED: &str = "permission denied";
const NOT_ENABLED: &str = "authentication is not enabled";

/// Why etcd's auth store refused a request (the cases clientv3's
/// `shouldRefreshToken` and `shouldRetryWatch` tell apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthRefusal {
    /// The token is unknown: it expired (`--auth-token-ttl` of idleness),
    /// was dropped (user deleted, password changed, auth disabled) or the
    /// member restarted (simple tokens live in memory).
    InvalidToken,
    /// The token predates a change of the auth store (users, roles).
    OldRevision,
    /// The request carried no token while auth is enabled.
    UserEmpty,
    /// The user lacks the permission.
    Denied,
}

impl AuthRefusal {
    /// The refusal a watch create's `cancel_reason` states, if any.
    pub(crate) fn from_reason(reason: &str) -> Option<AuthRefusal> {
        if reason.contains(INVALID_TOKEN) {
            Some(AuthRefusal::InvalidToken)
        } else if reason.contains(OLD_REVISION) {
            Some(AuthRefusal::OldRevision)
        } else if reason.contains(USER_EMPTY) {
            Some(AuthRefusal::UserEmpty)
        } else if reason.contains(DENIED) {
            Some(AuthRefusal::Denied)
        } else {
            None
        }
    }

    /// The refusal a unary call's status states, if any.
    pub(crate) fn from_status(status: &tonic::Status) -> Option<AuthRefusal> {
        use tonic::Code;
        match status.code() {
            Code::Unauthenticated => Some(AuthRefusal::InvalidToken),
            Code::PermissionDenied => Some(AuthRefusal::Denied),
            Code::InvalidArgument => match AuthRefusal::from_reason(status.message()) {
                Some(AuthRefusal::Denied) => None,
                other => other,
            },
            _ => None,
        }
    }
}

/// Whether `status` is etcd saying auth is off (an `Authenticate` answer).
pub(crate) fn is_auth_not_enabled(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition && status.message().contains(NOT_ENABLED)
}

/// A key range in words: `key /a`, `prefix /a/`, `keys from /a`, or
/// `range [/a, /b)`.
pub(crate) fn describe_range(key: &[u8], range_end: &[u8]) -> String {
    let k = String::from_utf8_lossy(key);
    if range_end.is_empty() {
        format!("key {k}")
    } else if range_end == [0] {
        format!("keys from {k}")
    } else if range_end == crate::instance::prefix_range_end(key).as_slice() {
        format!("prefix {k}")
    } else {
        format!("range [{k}, {})", String::from_utf8_lossy(range_end))
    }
}

fn permission_denied(user: Option<&str>, request: &str) -> String {
    let what = if request.is_empty() {
        "do this".to_string()
    } else {
        request.to_string()
    };
    match user {
        Some(user) => format!(
            "etcdserver: permission denied: user {user:?} may not {what}; grant one of its roles \
             that permission (etcdctl role grant-permission), or use another user"
        ),
        None => format!(
            "etcdserver: permission denied: etcd has authentication enabled and this client, \
             without credentials, may not {what}; configure a user and password"
        ),
    }
}

/// The sentence of a plaintext connection that found a TLS server, if the
/// status (a transport error) comes from one.
fn speaks_tls(status: &tonic::Status) -> Option<&muster_tls::ServerSpeaksTls> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(found) = e.downcast_ref::<muster_tls::ServerSpeaksTls>() {
            return Some(found);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(found) = io
                .get_ref()
                .and_then(|i| i.downcast_ref::<muster_tls::ServerSpeaksTls>())
        {
            return Some(found);
        }
        source = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    /// etcd's refusals as its servers word them (3.4's rpctypes), told
    /// apart as clientv3 does: the three that a new token cures, and the
    /// one it does not.
    #[test]
    fn refusals_are_told_apart_as_clientv3_does() {
        let cases = [
            (
                Status::unauthenticated("etcdserver: invalid auth token"),
                Some(AuthRefusal::InvalidToken),
            ),
            (
                Status::invalid_argument("etcdserver: revision of auth store is old"),
                Some(AuthRefusal::OldRevision),
            ),
            (
                Status::invalid_argument("etcdserver: user name is empty"),
                Some(AuthRefusal::UserEmpty),
            ),
            (
                Status::permission_denied("etcdserver: permission denied"),
                Some(AuthRefusal::Denied),
            ),
            (
                Status::invalid_argument("etcdserver: key is not provided"),
                None,
            ),
            (Status::new(Code::Unavailable, "connection refused"), None),
        ];
        for (status, want) in cases {
            assert_eq!(AuthRefusal::from_status(&status), want, "{status:?}");
        }
        // A watch's cancel_reason carries the same words.
        assert_eq!(
            AuthRefusal::from_reason(
                "rpc error: code = InvalidArgument desc = etcdserver: revision of auth store is old"
            ),
            Some(AuthRefusal::OldRevision)
        );
    }
}
