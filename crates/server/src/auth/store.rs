//! Users, roles and the enabled flag, with etcd 3.4's rules for changing
//! them (`auth/store.go`) and for checking requests against them
//! (`isOpPermitted`, `IsAdminPermitted`).
//!
//! The store lives inside the server's state, under the same lock as the
//! keys: a permission check and the write it guards see one state. Each
//! change returns the records storage must persist ([`Change`]s), which
//! the apply layer commits with the write path's durability.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use muster_proto as pb;
use pb::authpb;

use super::error::AuthError;
use super::perms::{Access, UserPermissions};
use crate::storage::{Change, RecoveredAuth};

/// The user every admin operation needs (with the `root` role).
pub const ROOT_USER: &str = "root";
/// The role with every permission.
pub const ROOT_ROLE: &str = "root";

/// Who sends a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// No token and no certificate name.
    Anonymous,
    /// A user, by token or by client certificate.
    User(Arc<str>),
    /// The server itself (lease expiry, auto-compaction): never checked.
    System,
}

impl Caller {
    /// The user's name, if any.
    pub fn user(&self) -> Option<&str> {
        match self {
            Caller::User(u) => Some(u),
            _ => None,
        }
    }
}

/// The auth store.
#[derive(Debug, Default)]
pub struct AuthStore {
    enabled: bool,
    revision: u64,
    users: BTreeMap<String, authpb::User>,
    roles: BTreeMap<String, authpb::Role>,
    /// Per user, the union of its roles' permissions (etcd's
    /// `rangePermCache`), rebuilt on every change.
    perms: HashMap<String, UserPermissions>,
}

/// The result of a change: what it answers and what storage must keep.
pub type Changed<R> = Result<(R, Vec<Change>), AuthError>;

fn user_name(u: &authpb::User) -> String {
    String::from_utf8_lossy(&u.name).into_owned()
}

fn role_name(r: &authpb::Role) -> String {
    String::from_utf8_lossy(&r.name).into_owned()
}

fn has_root_role(u: &authpb::User) -> bool {
    u.roles
        .binary_search_by(|r| r.as_str().cmp(ROOT_ROLE))
        .is_ok()
}

impl AuthStore {
    /// The store as storage recovered it.
    pub fn restore(recovered: RecoveredAuth) -> AuthStore {
        let mut store = AuthStore {
            enabled: recovered.enabled,
            // A new etcd's auth store starts at revision 1.
            revision: recovered.revision.max(1),
            users: recovered
                .users
                .into_iter()
                .map(|u| (user_name(&u), u))
                .collect(),
            roles: recovered
                .roles
                .into_iter()
                .map(|r| (role_name(&r), r))
                .collect(),
            perms: HashMap::new(),
        };
        store.refresh();
        store
    }

    /// Whether authentication is on.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The auth revision: raised by every change.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// How many users and roles exist.
    pub fn counts(&self) -> (usize, usize) {
        (self.users.len(), self.roles.len())
    }

    fn refresh(&mut self) {
        let roles = &self.roles;
        self.perms = self
            .users
            .iter()
            .map(|(name, u)| {
                let perms = UserPermissions::merge(u.roles.iter().filter_map(|r| roles.get(r)));
                (name.clone(), perms)
            })
            .collect();
    }

    /// Ends a change: bumps the revision, rebuilds the permission cache
    /// and adds the new state record to `changes`.
    fn commit(&mut self, mut changes: Vec<Change>) -> Vec<Change> {
        self.revision += 1;
        self.refresh();
        changes.push(self.state_change());
        changes
    }

    fn state_change(&self) -> Change {
        Change::AuthState {
            enabled: self.enabled,
            revision: self.revision,
        }
    }

    fn put_user(&mut self, user: authpb::User) -> Change {
        let name = user_name(&user);
        self.users.insert(name.clone(), user.clone());
        Change::AuthUser {
            name,
            user: Some(user),
        }
    }

    fn put_role(&mut self, role: authpb::Role) -> Change {
        let name = role_name(&role);
        self.roles.insert(name.clone(), role.clone());
        Change::AuthRole {
            name,
            role: Some(role),
        }
    }

    // ---- checks -------------------------------------------------------

    /// etcd's `isOpPermitted`: anything while auth is off; otherwise a
    /// user is needed ([`AuthError::UserEmpty`]), one that exists and
    /// either has the root role or whose permissions cover the range.
    pub fn check(
        &self,
        caller: &Caller,
        access: Access,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        let user = match caller {
            Caller::System => return Ok(()),
            Caller::Anonymous => return Err(AuthError::UserEmpty),
            Caller::User(u) => u,
        };
        let Some(u) = self.users.get(&**user) else {
            return Err(AuthError::PermissionDenied);
        };
        if has_root_role(u) {
            return Ok(());
        }
        match self.perms.get(&**user) {
            Some(p) if p.allows(access, key, range_end) => Ok(()),
            _ => Err(AuthError::PermissionDenied),
        }
    }

    /// etcd's `IsAdminPermitted`: a user with the root role, while auth is
    /// on.
    pub fn check_admin(&self, caller: &Caller) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        let user = match caller {
            Caller::System => return Ok(()),
            Caller::Anonymous => return Err(AuthError::UserEmpty),
            Caller::User(u) => u,
        };
        match self.users.get(&**user) {
            None => Err(AuthError::UserNotFound),
            Some(u) if !has_root_role(u) => Err(AuthError::PermissionDenied),
            Some(_) => Ok(()),
        }
    }

    /// Whether `user` has `role`.
    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.users
            .get(user)
            .is_some_and(|u| u.roles.iter().any(|r| r == role))
    }

    /// For Authenticate: the user's bcrypt hash, or why there is none to
    /// check (auth off, no such user, a user without a password).
    pub fn password_hash(&self, name: &str) -> Result<Vec<u8>, AuthError> {
        if !self.enabled {
            return Err(AuthError::AuthNotEnabled);
        }
        let user = self.users.get(name).ok_or(AuthError::AuthFailed)?;
        if user.options.is_some_and(|o| o.no_password) {
            return Err(AuthError::AuthFailed);
        }
        Ok(user.password.clone())
    }

    // ---- changes ------------------------------------------------------

    /// AuthEnable: needs `root` with the root role. Enabling twice is fine.
    pub fn enable(&mut self) -> Changed<()> {
        if self.enabled {
            return Ok(((), Vec::new()));
        }
        let root = self
            .users
            .get(ROOT_USER)
            .ok_or(AuthError::RootUserNotExist)?;
        if !has_root_role(root) {
            return Err(AuthError::RootRoleNotExist);
        }
        self.enabled = true;
        // etcd 3.4 does not raise the revision on enable, only on disable.
        self.refresh();
        Ok(((), vec![self.state_change()]))
    }

    /// AuthDisable. Disabling twice is fine.
    pub fn disable(&mut self) -> Changed<()> {
        if !self.enabled {
            return Ok(((), Vec::new()));
        }
        self.enabled = false;
        Ok(((), self.commit(Vec::new())))
    }

    /// UserAdd, with the password already hashed (`None`: no password).
    pub fn user_add(
        &mut self,
        name: &str,
        hash: Option<Vec<u8>>,
        options: Option<authpb::UserAddOptions>,
    ) -> Changed<()> {
        if name.is_empty() {
            return Err(AuthError::UserEmpty);
        }
        if self.users.contains_key(name) {
            return Err(AuthError::UserAlreadyExist);
        }
        let user = authpb::User {
            name: name.as_bytes().to_vec(),
            password: hash.unwrap_or_default(),
            roles: Vec::new(),
            options: Some(options.unwrap_or_default()),
        };
        let change = self.put_user(user);
        Ok(((), self.commit(vec![change])))
    }

    /// UserDelete (not `root` while auth is on).
    pub fn user_delete(&mut self, name: &str) -> Changed<()> {
        if self.enabled && name == ROOT_USER {
            return Err(AuthError::InvalidAuthMgmt);
        }
        if self.users.remove(name).is_none() {
            return Err(AuthError::UserNotFound);
        }
        let change = Change::AuthUser {
            name: name.to_string(),
            user: None,
        };
        Ok(((), self.commit(vec![change])))
    }

    /// UserChangePassword, with the new password already hashed.
    pub fn user_change_password(&mut self, name: &str, hash: Vec<u8>) -> Changed<()> {
        let mut user = self.users.get(name).ok_or(AuthError::UserNotFound)?.clone();
        user.password = hash;
        let change = self.put_user(user);
        Ok(((), self.commit(vec![change])))
    }

    /// UserGrantRole (the root role need not exist as a role). Granting a
    /// role the user has changes nothing.
    pub fn user_grant_role(&mut self, name: &str, role: &str) -> Changed<()> {
        let mut user = self.users.get(name).ok_or(AuthError::UserNotFound)?.clone();
        if role != ROOT_ROLE && !self.roles.contains_key(role) {
            return Err(AuthError::RoleNotFound);
        }
        let Err(at) = user.roles.binary_search_by(|r| r.as_str().cmp(role)) else {
            return Ok(((), Vec::new()));
        };
        user.roles.insert(at, role.to_string());
        let change = self.put_user(user);
        Ok(((), self.commit(vec![change])))
    }

    /// UserGet: the user's roles.
    pub fn user_get(&self, name: &str) -> Result<Vec<String>, AuthError> {
        Ok(self
            .users
            .get(name)
            .ok_or(AuthError::UserNotFound)?
            .roles
            .clone())
    }

    /// UserList: every user name, sorted.
    pub fn user_list(&self) -> Vec<String> {
        self.users.keys().cloned().collect()
    }

    /// UserRevokeRole (not root's root role while auth is on).
    pub fn user_revoke_role(&mut self, name: &str, role: &str) -> Changed<()> {
        if self.enabled && name == ROOT_USER && role == ROOT_ROLE {
            return Err(AuthError::InvalidAuthMgmt);
        }
        let mut user = self.users.get(name).ok_or(AuthError::UserNotFound)?.clone();
        let before = user.roles.len();
        user.roles.retain(|r| r != role);
        if user.roles.len() == before {
            return Err(AuthError::RoleNotGranted);
        }
        let change = self.put_user(user);
        Ok(((), self.commit(vec![change])))
    }

    /// RoleAdd.
    pub fn role_add(&mut self, name: &str) -> Changed<()> {
        if name.is_empty() {
            return Err(AuthError::RoleEmpty);
        }
        if self.roles.contains_key(name) {
            return Err(AuthError::RoleAlreadyExist);
        }
        let change = self.put_role(authpb::Role {
            name: name.as_bytes().to_vec(),
            key_permission: Vec::new(),
        });
        Ok(((), self.commit(vec![change])))
    }

    /// RoleGet: the role's permissions, in key order.
    pub fn role_get(&self, name: &str) -> Result<Vec<authpb::Permission>, AuthError> {
        Ok(self
            .roles
            .get(name)
            .ok_or(AuthError::RoleNotFound)?
            .key_permission
            .clone())
    }

    /// RoleList: every role name, sorted.
    pub fn role_list(&self) -> Vec<String> {
        self.roles.keys().cloned().collect()
    }

    /// RoleDelete (not the root role while auth is on): also revokes it
    /// from every user.
    pub fn role_delete(&mut self, name: &str) -> Changed<()> {
        if self.enabled && name == ROOT_ROLE {
            return Err(AuthError::InvalidAuthMgmt);
        }
        if self.roles.remove(name).is_none() {
            return Err(AuthError::RoleNotFound);
        }
        let mut changes = vec![Change::AuthRole {
            name: name.to_string(),
            role: None,
        }];
        let holders: Vec<authpb::User> = self
            .users
            .values()
            .filter(|u| u.roles.iter().any(|r| r == name))
            .cloned()
            .collect();
        for mut user in holders {
            user.roles.retain(|r| r != name);
            changes.push(self.put_user(user));
        }
        Ok(((), self.commit(changes)))
    }

    /// RoleGrantPermission: adds the permission, or changes the type of
    /// one over the same key and range end. Permissions stay in key order.
    pub fn role_grant_permission(
        &mut self,
        name: &str,
        perm: Option<authpb::Permission>,
    ) -> Changed<()> {
        let mut role = self.roles.get(name).ok_or(AuthError::RoleNotFound)?.clone();
        let perm = perm.ok_or(AuthError::PermissionNotGiven)?;
        match role
            .key_permission
            .iter_mut()
            .find(|p| p.key == perm.key && p.range_end == perm.range_end)
        {
            Some(existing) => existing.perm_type = perm.perm_type,
            None => {
                let at = role.key_permission.partition_point(|p| p.key <= perm.key);
                role.key_permission.insert(at, perm);
            }
        }
        let change = self.put_role(role);
        Ok(((), self.commit(vec![change])))
    }

    /// RoleRevokePermission of the permission over exactly `key` and
    /// `range_end`.
    pub fn role_revoke_permission(
        &mut self,
        name: &str,
        key: &[u8],
        range_end: &[u8],
    ) -> Changed<()> {
        let mut role = self.roles.get(name).ok_or(AuthError::RoleNotFound)?.clone();
        let before = role.key_permission.len();
        role.key_permission
            .retain(|p| !(p.key == key && p.range_end == range_end));
        if role.key_permission.len() == before {
            return Err(AuthError::PermissionNotGranted);
        }
        let change = self.put_role(role);
        Ok(((), self.commit(vec![change])))
    }
}

impl AuthStore {
    /// The whole store as storage keeps it (users with their bcrypt
    /// hashes, in name order), for snapshots.
    pub fn export(&self) -> RecoveredAuth {
        RecoveredAuth {
            enabled: self.enabled,
            revision: self.revision,
            users: self.users.values().cloned().collect(),
            roles: self.roles.values().cloned().collect(),
        }
    }
}
