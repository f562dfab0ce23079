//! Acting for someone else over the same connections: checking a user's
//! password and getting their token ([`Etcd::authenticate_as`]), and a
//! handle that sends that token ([`Etcd::with_token`]) or none at all
//! ([`Etcd::anonymous`]).
//!
//! For a front end with its own logins, such as the dashboard: it holds one
//! [`Etcd`] for itself and asks the registry, with each logged-in user's
//! token, what that user may read. The handles share the connections, so a
//! thousand users are not a thousand connections.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use muster_proto as pb;
use muster_proto::auth_client::AuthClient;
use tonic::metadata::AsciiMetadataValue;

use super::{AuthState, Etcd, Inner, Retry, token_value};
use crate::error::{Error, Result, is_auth_not_enabled};

impl Etcd {
    /// Checks `password` for the etcd user `name` with `Auth.Authenticate`
    /// and returns the simple token etcd hands out, without touching this
    /// handle's own authentication. `Ok(None)`: the registry has
    /// authentication disabled (nobody needs to log in).
    ///
    /// A wrong name or password is [`Error::AuthFailed`] with etcd's words
    /// (`etcdserver: authentication failed, invalid user ID or password`);
    /// an unreachable registry is [`Error::Unavailable`] or
    /// [`Error::Timeout`]. The password is sent to the registry only; it is
    /// neither kept nor logged. Brute force is the registry's to slow down
    /// (muster's embedded registry delays repeated failures per peer).
    pub async fn authenticate_as(&self, name: &str, password: &str) -> Result<Option<String>> {
        let msg = pb::AuthenticateRequest {
            name: name.to_string(),
            password: password.to_string(),
        };
        // Without a token, as for the handle's own logins: etcd would
        // check (and refuse) a stale one.
        let result = self
            .call_unchecked(Retry::Idempotent, msg, None, |ch, req| async move {
                AuthClient::new(ch).authenticate(req).await
            })
            .await;
        match result {
            Ok(resp) => {
                // A token that cannot go in metadata is of no use to anyone.
                AsciiMetadataValue::try_from(resp.token.as_str())
                    .map_err(|_| Error::AuthFailed("etcd returned an unusable token".into()))?;
                Ok(Some(resp.token))
            }
            Err(Error::Grpc(status)) if is_auth_not_enabled(&status) => Ok(None),
            Err(e @ (Error::Unavailable(_) | Error::Timeout(_) | Error::Tls(_))) => Err(e),
            Err(Error::Grpc(status)) => match Error::from_status(status) {
                e @ (Error::Unavailable(_) | Error::Tls(_)) => Err(e),
                Error::Grpc(status) => Err(Error::AuthFailed(status.message().to_string())),
                Error::AuthFailed(msg) => Err(Error::AuthFailed(msg)),
                other => Err(Error::AuthFailed(other.to_string())),
            },
            Err(other) => Err(Error::AuthFailed(other.to_string())),
        }
    }

    /// A handle on this one's connections that sends `token` (from
    /// [`Etcd::authenticate_as`]) with every request and has no
    /// credentials: it acts as the token's user, never refreshes the token,
    /// and fails with [`Error::AuthFailed`] once etcd no longer knows it
    /// (expired after `--auth-token-ttl` of idleness, user deleted,
    /// password changed, auth disabled, member restarted). Its watches, if
    /// any, go on a stream of their own. Fails only for a token that is
    /// not printable ASCII.
    pub fn with_token(&self, token: &str) -> Result<Etcd> {
        let value = token_value(token)?;
        let mut config = self.inner.config.clone();
        config.token = Some(token.to_string());
        Ok(self.acting(config, Some(value)))
    }

    /// A handle on this one's connections that sends no token and has no
    /// credentials: the registry sees an anonymous client (or, with
    /// `--client-cert-auth`, the user its client certificate names). With
    /// authentication enabled, etcd refuses its requests with `user name is
    /// empty` ([`Error::PermissionDenied`]), which tells whether
    /// authentication is on without a login attempt.
    pub fn anonymous(&self) -> Etcd {
        let mut config = self.inner.config.clone();
        config.token = None;
        self.acting(config, None)
    }

    fn acting(&self, mut config: crate::client::Config, token: Option<AsciiMetadataValue>) -> Etcd {
        config.credentials = None;
        let inner = &self.inner;
        Etcd {
            inner: Arc::new(Inner {
                channels: inner.channels.clone(),
                plain: inner.plain.clone(),
                current: AtomicUsize::new(inner.current.load(Ordering::Relaxed)),
                config,
                auth: ArcSwap::from_pointee(AuthState {
                    token,
                    disabled: false,
                }),
                auth_lock: tokio::sync::Mutex::new(()),
                authentications: AtomicU64::new(0),
                watch_hub: OnceLock::new(),
            }),
        }
    }
}
