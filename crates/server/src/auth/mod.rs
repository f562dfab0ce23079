//! Authentication and role-based access control, as etcd's auth store
//! (etcd 3.4's `auth/store.go`, `auth/simple_token.go` and
//! `etcdserver/apply_auth.go`).
//!
//! - [`store`]: users, roles and the enabled flag, their changes and the
//!   permission checks (a user passes when the union of its roles'
//!   intervals covers the whole key range, [`perms`]);
//! - [`tokens`]: etcd's "simple" tokens, in memory, each living
//!   [`AuthConfig::token_ttl`] after its last use;
//! - [`guard`]: what each KV and lease request needs (etcd's auth
//!   applier); failed logins from one peer are slowed down by
//!   [`Throttle`] (muster-tls's, shared with the dashboard);
//! - [`error`]: etcd's messages and codes.
//!
//! Passwords are kept only as bcrypt hashes ([`hash_password`]), persisted
//! with the users in storage; they are never logged.

pub mod error;
pub mod guard;
pub mod perms;
pub mod store;
pub mod tokens;

use std::time::Duration;

pub use error::AuthError;
pub use muster_tls::Throttle;
pub use perms::Access;
pub use store::{AuthStore, Caller, ROOT_ROLE, ROOT_USER};
pub use tokens::Tokens;

/// How the auth store runs (etcd's `--auth-token-ttl` and `--bcrypt-cost`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthConfig {
    /// How long a simple token lives without use (etcd: 300 s); every use
    /// starts it again.
    pub token_ttl: Duration,
    /// bcrypt cost of stored password hashes, 4 to 31 (etcd: 10).
    pub bcrypt_cost: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            token_ttl: Duration::from_secs(300),
            bcrypt_cost: DEFAULT_BCRYPT_COST,
        }
    }
}

/// etcd's default bcrypt cost.
pub const DEFAULT_BCRYPT_COST: u32 = 10;
/// The bcrypt costs etcd accepts.
pub const BCRYPT_COSTS: std::ops::RangeInclusive<u32> = 4..=31;

impl AuthConfig {
    /// The cost to hash with: [`AuthConfig::bcrypt_cost`], or etcd's
    /// default when it is out of [`BCRYPT_COSTS`] (etcd warns and does the
    /// same).
    pub fn effective_bcrypt_cost(&self) -> u32 {
        if BCRYPT_COSTS.contains(&self.bcrypt_cost) {
            self.bcrypt_cost
        } else {
            tracing::warn!(
                cost = self.bcrypt_cost,
                "bcrypt cost out of 4..=31; using the default 10"
            );
            DEFAULT_BCRYPT_COST
        }
    }
}

/// Hashes `password` with bcrypt at `cost` (CPU-heavy: run it off the
/// async threads). Passwords past bcrypt's 72 bytes are cut there, as Go's
/// bcrypt in etcd 3.4 did.
pub fn hash_password(password: &str, cost: u32) -> Result<Vec<u8>, bcrypt::BcryptError> {
    bcrypt::hash(password, cost).map(String::into_bytes)
}

/// Whether `password` matches a stored bcrypt `hash` (Go's `$2a$` hashes
/// as well as our `$2b$` ones). A malformed hash matches nothing.
pub fn verify_password(password: &str, hash: &[u8]) -> bool {
    std::str::from_utf8(hash)
        .ok()
        .and_then(|h| bcrypt::verify(password, h).ok())
        .unwrap_or(false)
}
