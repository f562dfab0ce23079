//! The Auth service's operations on the core: changes go through the write
//! path (durable before they are answered, in order with key writes),
//! reads take the read lock, and password hashing runs off the async
//! threads.

use std::net::IpAddr;

use muster_proto as pb;
use tonic::Status;

use super::{Applied, Core, State};
use crate::auth::store::Changed;
use crate::auth::{AuthError, Caller, hash_password, verify_password};

/// Runs bcrypt (tens of milliseconds at cost 10) on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("etcdserver: password hashing failed: {e}")))
}

impl Core {
    /// One change of the auth store by `caller`: admin permission first
    /// (when `admin`), then `f`; durable before it returns.
    async fn auth_change<R>(
        &self,
        caller: &Caller,
        admin: bool,
        f: impl FnOnce(&mut State) -> Changed<R>,
    ) -> Result<R, Status> {
        let (result, _) = self
            .write(|st| {
                if admin {
                    st.auth.check_admin(caller)?;
                }
                let (result, extra) = f(st)?;
                self.auth_enabled
                    .store(st.auth.is_enabled(), std::sync::atomic::Ordering::Release);
                Ok(Applied {
                    result,
                    revision: st.store.revision(),
                    events: Vec::new(),
                    extra,
                })
            })
            .await?;
        Ok(result)
    }

    /// A header at the committed revision, for auth responses.
    fn auth_header(&self) -> Option<pb::ResponseHeader> {
        self.header(self.committed())
    }

    fn hash(&self, password: String) -> impl Future<Output = Result<Vec<u8>, Status>> + use<> {
        let cost = self.auth_config().effective_bcrypt_cost();
        async move {
            blocking(move || hash_password(&password, cost))
                .await?
                .map_err(|e| Status::internal(format!("etcdserver: cannot hash the password: {e}")))
        }
    }

    /// `Auth.AuthEnable`.
    pub async fn auth_enable(&self, caller: &Caller) -> Result<pb::AuthEnableResponse, Status> {
        self.auth_change(caller, true, |st| st.auth.enable())
            .await?;
        tracing::info!("authentication enabled");
        Ok(pb::AuthEnableResponse {
            header: self.auth_header(),
        })
    }

    /// `Auth.AuthDisable`: every token is dropped.
    pub async fn auth_disable(&self, caller: &Caller) -> Result<pb::AuthDisableResponse, Status> {
        self.auth_change(caller, true, |st| st.auth.disable())
            .await?;
        self.tokens().clear();
        tracing::info!("authentication disabled");
        Ok(pb::AuthDisableResponse {
            header: self.auth_header(),
        })
    }

    /// `Auth.AuthStatus` (etcd 3.5's; 3.4 lacks it): an admin call like
    /// the others, so while auth is on only the root role may ask.
    pub fn auth_status(&self, caller: &Caller) -> Result<pb::AuthStatusResponse, Status> {
        self.read().auth.check_admin(caller)?;
        let (enabled, revision, _, _) = self.auth_summary();
        Ok(pb::AuthStatusResponse {
            header: self.auth_header(),
            enabled,
            auth_revision: revision,
        })
    }

    /// `Auth.Authenticate`: checks the password (after the peer's
    /// throttling delay) and hands out a simple token.
    pub async fn authenticate(
        &self,
        name: &str,
        password: &str,
        peer: Option<IpAddr>,
    ) -> Result<pb::AuthenticateResponse, Status> {
        self.check_alive()?;
        let wait = self.throttle().reserve(peer);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        loop {
            let (hash, revision) = {
                let st = self.read();
                (st.auth.password_hash(name), st.auth.revision())
            };
            let matches = match hash {
                Ok(hash) => {
                    let password = password.to_string();
                    blocking(move || verify_password(&password, &hash)).await?
                }
                Err(AuthError::AuthNotEnabled) => return Err(AuthError::AuthNotEnabled.into()),
                Err(_) => false,
            };
            if !matches {
                self.throttle().failed(peer);
                tracing::warn!(user = name, peer = ?peer, "authentication failed");
                return Err(AuthError::AuthFailed.into());
            }
            let st = self.read();
            if st.auth.revision() != revision {
                // The user changed while its password was checked: again.
                continue;
            }
            // Assigned under the read lock: a user deleted or a password
            // changed after this drops the token with the others.
            let token = self.tokens().assign(name).map_err(|e| {
                Status::internal(format!("etcdserver: no randomness for a token: {e}"))
            })?;
            drop(st);
            self.throttle().succeeded(peer);
            tracing::debug!(user = name, "authenticated");
            return Ok(pb::AuthenticateResponse {
                header: self.auth_header(),
                token,
            });
        }
    }

    /// `Auth.UserAdd`.
    pub async fn user_add(
        &self,
        caller: &Caller,
        req: pb::AuthUserAddRequest,
    ) -> Result<pb::AuthUserAddResponse, Status> {
        if req.name.is_empty() {
            return Err(AuthError::UserEmpty.into());
        }
        // Refuse early what would be refused anyway, before hashing.
        self.read().auth.check_admin(caller)?;
        let no_password = req.options.is_some_and(|o| o.no_password);
        let hash = if no_password {
            None
        } else {
            Some(self.hash(req.password).await?)
        };
        self.auth_change(caller, true, |st| {
            st.auth.user_add(&req.name, hash, req.options)
        })
        .await?;
        Ok(pb::AuthUserAddResponse {
            header: self.auth_header(),
        })
    }

    /// `Auth.UserGet`: root, or the user itself.
    pub fn user_get(
        &self,
        caller: &Caller,
        req: &pb::AuthUserGetRequest,
    ) -> Result<pb::AuthUserGetResponse, Status> {
        let st = self.read();
        if let Err(e) = st.auth.check_admin(caller)
            && caller.user() != Some(req.name.as_str())
        {
            return Err(e.into());
        }
        let roles = st.auth.user_get(&req.name)?;
        Ok(pb::AuthUserGetResponse {
            header: self.auth_header(),
            roles,
        })
    }

    /// `Auth.UserList`.
    pub fn user_list(&self, caller: &Caller) -> Result<pb::AuthUserListResponse, Status> {
        let st = self.read();
        st.auth.check_admin(caller)?;
        Ok(pb::AuthUserListResponse {
            header: self.auth_header(),
            users: st.auth.user_list(),
        })
    }

    /// `Auth.UserDelete`: the user's tokens are dropped.
    pub async fn user_delete(
        &self,
        caller: &Caller,
        req: pb::AuthUserDeleteRequest,
    ) -> Result<pb::AuthUserDeleteResponse, Status> {
        self.auth_change(caller, true, |st| {
            let changed = st.auth.user_delete(&req.name)?;
            self.tokens().invalidate_user(&req.name);
            Ok(changed)
        })
        .await?;
        Ok(pb::AuthUserDeleteResponse {
            header: self.auth_header(),
        })
    }

    /// `Auth.UserChangePassword`: the user's tokens are dropped.
    pub async fn user_change_password(
        &self,
        caller: &Caller,
        req: pb::AuthUserChangePasswordRequest,
    ) -> Result<pb::AuthUserChangePasswordResponse, Status> {
        {
            let st = self.read();
            st.auth.check_admin(caller)?;
            st.auth.user_get(&req.name)?;
        }
        let hash = self.hash(req.password).await?;
        self.auth_change(caller, true, |st| {
            let changed = st.auth.user_change_password(&req.name, hash)?;
            self.tokens().invalidate_user(&req.name);
            Ok(changed)
        })
        .await?;
        Ok(pb::AuthUserChangePasswordResponse {
            header: self.auth_header(),
        })
    }

    /// `Auth.UserGrantRole`.
    pub async fn user_grant_role(
        &self,
        caller: &Caller,
        req: pb::AuthUserGrantRoleRequest,
    ) -> Result<pb::AuthUserGrantRoleResponse, Status> {
        self.auth_change(caller, true, |st| {
            st.auth.user_grant_role(&req.user, &req.role)
        })
        .await?;
        Ok(pb::AuthUserGrantRoleResponse {
            header: self.auth_header(),
        })
    }

    /// `Auth.UserRevokeRole`.
    pub async fn user_revoke_role(
        &self,
        caller: &Caller,
        req: pb::AuthUserRevokeRoleRequest,
    ) -> Result<pb::AuthUserRevokeRoleResponse, Status> {
        self.auth_change(caller, true, |st| {
            st.auth.user_revoke_role(&req.name, &req.role)
        })
        .await?;
        Ok(pb::AuthUserRevokeRoleResponse {
            header: self.auth_header(),
        })
    }

    /// `Auth.RoleAdd`.
    pub async fn role_add(
        &self,
        caller: &Caller,
        req: pb::AuthRoleAddRequest,
    ) -> Result<pb::AuthRoleAddResponse, Status> {
        self.auth_change(caller, true, |st| st.auth.role_add(&req.name))
            .await?;
        Ok(pb::AuthRoleAddResponse {
            header: self.auth_header(),
        })
    }

    /// `Auth.RoleGet`: root, or a user holding the role.
    pub fn role_get(
        &self,
        caller: &Caller,
        req: &pb::AuthRoleGetRequest,
    ) -> Result<pb::AuthRoleGetResponse, Status> {
        let st = self.read();
        if let Err(e) = st.auth.check_admin(caller)
            && !caller
                .user()
                .is_some_and(|u| st.auth.has_role(u, &req.role))
        {
            return Err(e.into());
        }
        let perm = st.auth.role_get(&req.role)?;
        Ok(pb::AuthRoleGetResponse {
            header: self.auth_header(),
            perm,
        })
    }

    /// `Auth.RoleList`.
    pub fn role_list(&self, caller: &Caller) -> Result<pb::AuthRoleListResponse, Status> {
        let st = self.read();
        st.auth.check_admin(caller)?;
        Ok(pb::AuthRoleListResponse {
            header: self.auth_header(),
            roles: st.auth.role_list(),
        })
    }

    /// `Auth.RoleDelete`.
    pub async fn role_delete(
        &self,
        caller: &Caller,
        req: pb::AuthRoleDeleteRequest,
    ) -> Result<pb::AuthRoleDeleteResponse, Status> {
        self.auth_change(caller, true, |st| st.auth.role_delete(&req.role))
            .await?;
        Ok(pb::AuthRoleDeleteResponse {
            header: self.auth_header(),
        })
    }

    /// `Auth.RoleGrantPermission`.
    pub async fn role_grant_permission(
        &self,
        caller: &Caller,
        req: pb::AuthRoleGrantPermissionRequest,
    ) -> Result<pb::AuthRoleGrantPermissionResponse, Status> {
        self.auth_change(caller, true, |st| {
            st.auth.role_grant_permission(&req.name, req.perm)
        })
        .await?;
        Ok(pb::AuthRoleGrantPermissionResponse {
            header: self.auth_header(),
        })
    }

    /// `Auth.RoleRevokePermission`.
    pub async fn role_revoke_permission(
        &self,
        caller: &Caller,
        req: pb::AuthRoleRevokePermissionRequest,
    ) -> Result<pb::AuthRoleRevokePermissionResponse, Status> {
        self.auth_change(caller, true, |st| {
            st.auth
                .role_revoke_permission(&req.role, &req.key, &req.range_end)
        })
        .await?;
        Ok(pb::AuthRoleRevokePermissionResponse {
            header: self.auth_header(),
        })
    }
}
