//! The auth store's errors, with etcd's messages and gRPC codes
//! (etcd 3.4's `rpctypes`: `ErrGRPCUserEmpty`, `ErrGRPCPermissionDenied`, ...).

use tonic::Status;

/// An error of authentication or access control. `Display` is etcd's exact
/// message; [`AuthError::status`] gives etcd's gRPC code with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum AuthError {
    /// AuthEnable without a `root` user.
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    /// AuthEnable while `root` lacks the `root` role.
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    /// UserAdd of a name in use.
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    /// An empty user name, or a request without a user while auth is on.
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    /// No such user.
    #[error("etcdserver: user name not found")]
    UserNotFound,
    /// RoleAdd of a name in use.
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    /// No such role.
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    /// An empty role name.
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    /// Wrong user or password (or a user without a password).
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    /// The user may not do this.
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    /// UserRevokeRole of a role the user does not have.
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    /// RoleRevokePermission of a permission the role does not have.
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    /// Authenticate while auth is off.
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    /// An unknown or expired token.
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    /// Deleting `root`, deleting the `root` role, or revoking `root`'s
    /// root role while auth is on.
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    /// A role grant with no permission in it.
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
}

impl AuthError {
    /// etcd's gRPC status for this error.
    pub fn status(self) -> Status {
        let msg = self.to_string();
        match self {
            AuthError::UserEmpty
            | AuthError::RoleEmpty
            | AuthError::AuthFailed
            | AuthError::InvalidAuthMgmt
            | AuthError::PermissionNotGiven => Status::invalid_argument(msg),
            AuthError::PermissionDenied => Status::permission_denied(msg),
            AuthError::InvalidAuthToken => Status::unauthenticated(msg),
            AuthError::RootUserNotExist
            | AuthError::RootRoleNotExist
            | AuthError::UserAlreadyExist
            | AuthError::UserNotFound
            | AuthError::RoleAlreadyExist
            | AuthError::RoleNotFound
            | AuthError::RoleNotGranted
            | AuthError::PermissionNotGranted
            | AuthError::AuthNotEnabled => Status::failed_precondition(msg),
        }
    }
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Status {
        e.status()
    }
}
