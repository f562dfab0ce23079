//! etcd's Auth service on [`Etcd`]: enabling auth, users, roles and their
//! permissions (types in [`crate::auth`]).
//!
//! Every call goes through the handle's usual path (its credentials'
//! token, timeout, failover). Reads fail over like any read; changes are
//! sent again to another endpoint only when they provably never left, so a
//! change is never applied twice. Management calls need a user with the
//! `root` role once auth is enabled; anyone else gets etcd's "permission
//! denied".

use muster_proto as pb;
use muster_proto::auth_client::AuthClient;

use super::{Etcd, Retry};
use crate::auth::{AuthStatus, Permission, Role, User};
use crate::error::{Error, Result};

impl Etcd {
    /// Turns auth on (etcd's `AuthEnable`): from now on every request must
    /// carry a user's token. etcd requires a user `root` with the role
    /// `root` first ([`AuthError::RootUserMissing`],
    /// [`AuthError::RootRoleNotGranted`]); enabling it twice is no error.
    pub async fn auth_enable(&self) -> Result<()> {
        self.call(
            Retry::IfNotSent,
            pb::AuthEnableRequest {},
            |ch, r| async move { AuthClient::new(ch).auth_enable(r).await },
        )
        .await
        .map(drop)
    }

    /// Turns auth off (etcd's `AuthDisable`); needs the `root` role.
    pub async fn auth_disable(&self) -> Result<()> {
        self.call(
            Retry::IfNotSent,
            pb::AuthDisableRequest {},
            |ch, r| async move { AuthClient::new(ch).auth_disable(r).await },
        )
        .await
        .map(drop)
    }

    /// Whether auth is enabled, and the auth store's revision.
    ///
    /// Servers without etcd 3.5's `AuthStatus` call (etcd 3.4) are asked
    /// otherwise: an `Authenticate` with an empty user name, which such a
    /// server refuses with "authentication is not enabled" when auth is off
    /// and with "authentication failed" when it is on (so it shows as one
    /// failed login in etcd's log). The revision is then `None`.
    ///
    /// While auth is on, etcd 3.5 answers `AuthStatus` to the root role
    /// only: a refusal says that auth is on, again without the revision.
    pub async fn auth_status(&self) -> Result<AuthStatus> {
        let status = self
            .call(
                Retry::Idempotent,
                pb::AuthStatusRequest {},
                |ch, r| async move { AuthClient::new(ch).auth_status(r).await },
            )
            .await;
        match status {
            Ok(resp) => Ok(AuthStatus {
                enabled: resp.enabled,
                auth_revision: Some(resp.auth_revision),
            }),
            Err(Error::Grpc(status)) if status.code() == tonic::Code::Unimplemented => {
                self.auth_status_by_login().await
            }
            Err(Error::PermissionDenied { .. }) => Ok(AuthStatus {
                enabled: true,
                auth_revision: None,
            }),
            Err(e) => Err(e),
        }
    }

    /// [`Etcd::auth_status`] on a server without `AuthStatus`: a login
    /// with an empty name, sent without this handle's token (etcd would
    /// check, and refuse, a stale one).
    async fn auth_status_by_login(&self) -> Result<AuthStatus> {
        let enabled = match self.authenticate_as("", "").await {
            Ok(None) => false,
            // No user has an empty name: a token would be a surprise, but
            // it says auth is on.
            Ok(Some(_)) => true,
            // "etcdserver: authentication failed, invalid user ID or
            // password".
            Err(Error::AuthFailed(msg)) if msg.contains("authentication failed") => true,
            Err(e) => return Err(e),
        };
        Ok(AuthStatus {
            enabled,
            auth_revision: None,
        })
    }

    /// Adds user `name` with `password` (etcd hashes it with bcrypt).
    pub async fn user_add(&self, name: &str, password: &str) -> Result<()> {
        self.user_add_request(pb::AuthUserAddRequest {
            name: name.to_string(),
            password: password.to_string(),
            options: Some(pb::authpb::UserAddOptions { no_password: false }),
        })
        .await
    }

    /// Adds user `name` without a password (etcd 3.4's `--no-password`):
    /// it cannot log in with a password, only be named by a TLS client
    /// certificate's common name (etcd's `--client-cert-auth`).
    pub async fn user_add_no_password(&self, name: &str) -> Result<()> {
        self.user_add_request(pb::AuthUserAddRequest {
            name: name.to_string(),
            password: String::new(),
            options: Some(pb::authpb::UserAddOptions { no_password: true }),
        })
        .await
    }

    async fn user_add_request(&self, req: pb::AuthUserAddRequest) -> Result<()> {
        self.call(Retry::IfNotSent, req, |ch, r| async move {
            AuthClient::new(ch).user_add(r).await
        })
        .await
        .map(drop)
    }

    /// User `name` and its roles. A user may read itself; anyone else
    /// needs the `root` role.
    pub async fn user_get(&self, name: &str) -> Result<User> {
        let resp = self
            .call(
                Retry::Idempotent,
                pb::AuthUserGetRequest {
                    name: name.to_string(),
                },
                |ch, r| async move { AuthClient::new(ch).user_get(r).await },
            )
            .await?;
        Ok(User {
            name: name.to_string(),
            roles: resp.roles,
        })
    }

    /// Every user's name, sorted.
    pub async fn user_list(&self) -> Result<Vec<String>> {
        let resp = self
            .call(
                Retry::Idempotent,
                pb::AuthUserListRequest {},
                |ch, r| async move { AuthClient::new(ch).user_list(r).await },
            )
            .await?;
        Ok(resp.users)
    }

    /// Deletes user `name` (etcd refuses to delete `root` while auth is
    /// enabled: [`AuthError::InvalidManagement`]).
    pub async fn user_delete(&self, name: &str) -> Result<()> {
        self.call(
            Retry::IfNotSent,
            pb::AuthUserDeleteRequest {
                name: name.to_string(),
            },
            |ch, r| async move { AuthClient::new(ch).user_delete(r).await },
        )
        .await
        .map(drop)
    }

    /// Sets user `name`'s password. Tokens already issued stay valid until
    /// they expire.
    pub async fn user_change_password(&self, name: &str, password: &str) -> Result<()> {
        self.call(
            Retry::IfNotSent,
            pb::AuthUserChangePasswordRequest {
                name: name.to_string(),
                password: password.to_string(),
            },
            |ch, r| async move { AuthClient::new(ch).user_change_password(r).await },
        )
        .await
        .map(drop)
    }

    /// Grants `role` to `user` (both must exist; granting it twice is no
    /// error).
    pub async fn user_grant_role(&self, user: &str, role: &str) -> Result<()> {
        self.call(
            Retry::IfNotSent,
            pb::AuthUserGrantRoleRequest {
                user: user.to_string(),
                role: role.to_string(),
            },
            |ch, r| async move { AuthClient::new(ch).user_grant_role(r).await },
        )
        .await
        .map(drop)
    }

    /// Takes `role` from `user` ([`AuthError::RoleNotGranted`] when it does
    /// not have it).
    pub async fn user_revoke_role(&self, user: &str, role: &str) -> Result<()> {
        self.call(
            Retry::IfNotSent,
            pb::AuthUserRevokeRoleRequest {
                name: user.to_string(),
                role: role.to_string(),
            },
            |ch, r| async move { AuthClient::new(ch).user_revoke_role(r).await },
        )
        .await
        .map(drop)
    }

    /// Adds role `name`, granting nothing yet.
    pub async fn role_add(&self, name: &str) -> Result<()> {
        self.call(
            Retry::IfNotSent,
            pb::AuthRoleAddRequest {
                name: name.to_string(),
            },
            |ch, r| async move { AuthClient::new(ch).role_add(r).await },
        )
        .await
        .map(drop)
    }

    /// Role `name` and its permissions. Permissions of a type this client
    /// does not know are left out. The `root` role lists none: it may do
    /// anything.
    pub async fn role_get(&self, name: &str) -> Result<Role> {
        let resp = self
            .call(
                Retry::Idempotent,
                pb::AuthRoleGetRequest {
                    role: name.to_string(),
                },
                |ch, r| async move { AuthClient::new(ch).role_get(r).await },
            )
            .await?;
        Ok(Role {
            name: name.to_string(),
            permissions: resp
                .perm
                .into_iter()
                .filter_map(Permission::from_proto)
                .collect(),
        })
    }

    /// Every role's name, sorted.
    pub async fn role_list(&self) -> Result<Vec<String>> {
        let resp = self
            .call(
                Retry::Idempotent,
                pb::AuthRoleListRequest {},
                |ch, r| async move { AuthClient::new(ch).role_list(r).await },
            )
            .await?;
        Ok(resp.roles)
    }

    /// Deletes role `name`, taking it from every user that has it.
    pub async fn role_delete(&self, name: &str) -> Result<()> {
        self.call(
            Retry::IfNotSent,
            pb::AuthRoleDeleteRequest {
                role: name.to_string(),
            },
            |ch, r| async move { AuthClient::new(ch).role_delete(r).await },
        )
        .await
        .map(drop)
    }

    /// Grants `permission` to `role`. A permission on the same range
    /// replaces the old one's kind (etcd keeps one per range).
    pub async fn role_grant_permission(&self, role: &str, permission: Permission) -> Result<()> {
        self.call(
            Retry::IfNotSent,
            pb::AuthRoleGrantPermissionRequest {
                name: role.to_string(),
                perm: Some(permission.to_proto()),
            },
            |ch, r| async move { AuthClient::new(ch).role_grant_permission(r).await },
        )
        .await
        .map(drop)
    }

    /// Takes from `role` the permission on exactly `[key, range_end)` (an
    /// empty `range_end`: the single key), whatever its kind: pass a
    /// [`Permission`]'s `key` and `range_end`.
    /// [`AuthError::PermissionNotGranted`] when the role has none on that
    /// range.
    pub async fn role_revoke_permission(
        &self,
        role: &str,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<()> {
        self.call(
            Retry::IfNotSent,
            pb::AuthRoleRevokePermissionRequest {
                role: role.to_string(),
                key: key.to_vec(),
                range_end: range_end.to_vec(),
            },
            |ch, r| async move { AuthClient::new(ch).role_revoke_permission(r).await },
        )
        .await
        .map(drop)
    }
}
