//! Authentication and role-based access control, as etcd's auth store
//! (etcd 3.4's `auth/store.go` and `etcdserver/apply_auth.go`).

use std::time::Duration;

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
            bcrypt_cost: 10,
        }
    }
}
