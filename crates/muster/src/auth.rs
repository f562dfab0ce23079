//! etcd's authentication and role-based access control, typed.
//!
//! etcd (and muster's embedded registry) keeps users, roles and key
//! permissions: a user has roles, a role grants [`Permission`]s (read,
//! write or both) on single keys or key ranges, and once auth is enabled
//! every request must carry a user's token (see
//! [`Config::credentials`](crate::Config::credentials)) and is checked
//! against that user's roles. The `root` role may do anything, including
//! managing users and roles; enabling auth requires a `root` user with it.
//!
//! The calls themselves are methods of [`Etcd`](crate::Etcd):
//! [`auth_enable`](crate::Etcd::auth_enable),
//! [`user_add`](crate::Etcd::user_add),
//! [`role_grant_permission`](crate::Etcd::role_grant_permission), ... This
//! module has their types and the least-privilege recipe for a service:
//!
//! ```no_run
//! # async fn recipe(root: muster::Etcd) -> muster::Result<()> {
//! use muster::auth::service_permissions;
//!
//! // A role that may register instances of `billing` and discover every
//! // service, and a user for billing's processes with only that role.
//! root.role_add("billing").await?;
//! for permission in service_permissions("billing")? {
//!     root.role_grant_permission("billing", permission).await?;
//! }
//! root.user_add("billing", "s3cret").await?;
//! root.user_grant_role("billing", "billing").await?;
//! # Ok(()) }
//! ```
//!
//! etcd's refusals of these calls come back as
//! [`Error::Auth`] with an [`AuthError`], in etcd's
//! words. A user without the `root` role gets etcd's "permission denied"
//! for every management call, and wrong credentials are
//! [`Error::AuthFailed`].

use std::fmt;

use muster_proto::authpb;

use crate::error::{Error, Result};
use crate::instance;

/// What a [`Permission`] allows on its keys (etcd's `authpb.Permission.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PermissionKind {
    /// Range (get) and watch.
    Read,
    /// Put and delete (and revoking a lease that holds the keys).
    Write,
    /// Both.
    ReadWrite,
}

impl PermissionKind {
    /// `read`, `write` or `readwrite`, as etcdctl spells them.
    pub fn as_str(self) -> &'static str {
        match self {
            PermissionKind::Read => "read",
            PermissionKind::Write => "write",
            PermissionKind::ReadWrite => "readwrite",
        }
    }

    /// Whether it allows reading.
    pub fn allows_read(self) -> bool {
        matches!(self, PermissionKind::Read | PermissionKind::ReadWrite)
    }

    /// Whether it allows writing.
    pub fn allows_write(self) -> bool {
        matches!(self, PermissionKind::Write | PermissionKind::ReadWrite)
    }

    /// The wire value.
    pub fn to_proto(self) -> authpb::permission::Type {
        match self {
            PermissionKind::Read => authpb::permission::Type::Read,
            PermissionKind::Write => authpb::permission::Type::Write,
            PermissionKind::ReadWrite => authpb::permission::Type::Readwrite,
        }
    }

    /// From the wire value; `None` for a value etcd does not define.
    pub fn from_proto(value: i32) -> Option<PermissionKind> {
        match authpb::permission::Type::try_from(value).ok()? {
            authpb::permission::Type::Read => Some(PermissionKind::Read),
            authpb::permission::Type::Write => Some(PermissionKind::Write),
            authpb::permission::Type::Readwrite => Some(PermissionKind::ReadWrite),
        }
    }
}

impl fmt::Display for PermissionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PermissionKind {
    type Err = Error;

    /// `read`, `write` or `readwrite` (any case), as etcdctl's
    /// `role grant-permission` takes them.
    fn from_str(s: &str) -> Result<PermissionKind> {
        match s.to_ascii_lowercase().as_str() {
            "read" => Ok(PermissionKind::Read),
            "write" => Ok(PermissionKind::Write),
            "readwrite" => Ok(PermissionKind::ReadWrite),
            _ => Err(Error::invalid(
                "permission type",
                format!("{s:?}: expected read, write or readwrite"),
            )),
        }
    }
}

/// The key etcd's permissions use for "from the first key": an empty key
/// is written as `\0` (etcdctl does the same).
const FIRST_KEY: &[u8] = b"\0";
/// A range end of `\0` means "to the end of the key space".
const OPEN_END: &[u8] = b"\0";

/// Read and/or write access to one key or a range of keys, as a role
/// grants it (etcd's `authpb.Permission`).
///
/// The range is etcd's: `key` alone (`range_end` empty) is that one key;
/// otherwise it is `[key, range_end)`, and a `range_end` of `\0` means
/// every key from `key` on. Build one with [`Permission::key`],
/// [`Permission::prefix`], [`Permission::from_key`] or
/// [`Permission::range`]. It displays as etcdctl's `role get` lists it,
/// after the kind: `readwrite [/a/, /a0) (prefix /a/)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Permission {
    /// Read, write or both.
    pub kind: PermissionKind,
    /// The key, or the start of the range.
    pub key: Vec<u8>,
    /// The exclusive end of the range; empty for the single key `key`,
    /// `\0` for every key from `key` on.
    pub range_end: Vec<u8>,
}

impl Permission {
    /// `kind` on the single key `key`. An empty key is written as `\0`, as
    /// etcdctl does.
    pub fn key(kind: PermissionKind, key: impl Into<Vec<u8>>) -> Permission {
        let key = key.into();
        Permission {
            kind,
            key: if key.is_empty() {
                FIRST_KEY.to_vec()
            } else {
                key
            },
            range_end: Vec::new(),
        }
    }

    /// `kind` on every key starting with `prefix` (etcdctl's `--prefix`):
    /// `[prefix, prefix_range_end(prefix))`. An empty prefix is every key:
    /// `["\0", "\0")`, as etcdctl writes it.
    pub fn prefix(kind: PermissionKind, prefix: impl Into<Vec<u8>>) -> Permission {
        let prefix = prefix.into();
        if prefix.is_empty() {
            return Permission::all_keys(kind);
        }
        let range_end = instance::prefix_range_end(&prefix);
        Permission {
            kind,
            key: prefix,
            range_end,
        }
    }

    /// `kind` on every key from `key` on (etcdctl's `--from-key`): range end
    /// `\0`. An empty key is every key.
    pub fn from_key(kind: PermissionKind, key: impl Into<Vec<u8>>) -> Permission {
        let key = key.into();
        Permission {
            kind,
            key: if key.is_empty() {
                FIRST_KEY.to_vec()
            } else {
                key
            },
            range_end: OPEN_END.to_vec(),
        }
    }

    /// `kind` on the keys in `[key, end)`, exactly as given (an empty `end`
    /// is the single key `key`, `\0` every key from `key` on).
    pub fn range(
        kind: PermissionKind,
        key: impl Into<Vec<u8>>,
        end: impl Into<Vec<u8>>,
    ) -> Permission {
        Permission {
            kind,
            key: key.into(),
            range_end: end.into(),
        }
    }

    /// `kind` on every key.
    pub fn all_keys(kind: PermissionKind) -> Permission {
        Permission {
            kind,
            key: FIRST_KEY.to_vec(),
            range_end: OPEN_END.to_vec(),
        }
    }

    /// Whether it covers a single key.
    pub fn is_single_key(&self) -> bool {
        self.range_end.is_empty()
    }

    /// Whether it runs to the end of the key space (range end `\0`).
    pub fn is_open_ended(&self) -> bool {
        self.range_end == OPEN_END
    }

    /// The prefix it covers, when it is exactly the keys with one prefix
    /// (an empty prefix for every key).
    pub fn as_prefix(&self) -> Option<&[u8]> {
        if self.key == FIRST_KEY && self.is_open_ended() {
            return Some(&[]);
        }
        (!self.is_single_key() && instance::prefix_range_end(&self.key) == self.range_end)
            .then_some(self.key.as_slice())
    }

    /// Whether it grants `kind`'s access to `key`.
    pub fn covers(&self, kind: PermissionKind, key: &[u8]) -> bool {
        let allowed = (!kind.allows_read() || self.kind.allows_read())
            && (!kind.allows_write() || self.kind.allows_write());
        let inside = if self.is_single_key() {
            key == self.key
        } else if self.is_open_ended() {
            key >= self.key.as_slice()
        } else {
            key >= self.key.as_slice() && key < self.range_end.as_slice()
        };
        allowed && inside
    }

    /// Its keys as etcdctl's `role get` shows them: `key` alone,
    /// `[key, end)`, `[key, <open ended>`, followed by `(prefix P)` when
    /// the range is a prefix. Bytes that are not printable are escaped.
    pub fn keys(&self) -> String {
        if self.is_single_key() {
            return printable(&self.key);
        }
        let mut out = if self.is_open_ended() {
            format!("[{}, <open ended>", printable(&self.key))
        } else {
            format!("[{}, {})", printable(&self.key), printable(&self.range_end))
        };
        if instance::prefix_range_end(&self.key) == self.range_end {
            out.push_str(&format!(" (prefix {})", printable(&self.key)));
        }
        out
    }

    /// The wire form.
    pub fn to_proto(&self) -> authpb::Permission {
        authpb::Permission {
            perm_type: self.kind.to_proto() as i32,
            key: self.key.clone(),
            range_end: self.range_end.clone(),
        }
    }

    /// From the wire form; `None` for a permission type etcd does not
    /// define.
    pub fn from_proto(permission: authpb::Permission) -> Option<Permission> {
        Some(Permission {
            kind: PermissionKind::from_proto(permission.perm_type)?,
            key: permission.key,
            range_end: permission.range_end,
        })
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.keys())
    }
}

/// Bytes as text: UTF-8 as is, control characters and invalid UTF-8
/// escaped (`\x00`), so that a terminal shows every key.
fn printable(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s
            .chars()
            .map(|c| {
                if c.is_ascii_control() {
                    format!("\\x{:02x}", u32::from(c))
                } else if c.is_control() {
                    c.escape_unicode().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
        Err(_) => bytes.escape_ascii().to_string(),
    }
}

/// A role and what it grants ([`Etcd::role_get`](crate::Etcd::role_get)).
///
/// It displays as etcdctl's `role get` (each permission line starts with
/// a tab):
///
/// ```text
/// Role billing
/// KV Read:
///     [/muster/services/, /muster/services0) (prefix /muster/services/)
///     [/muster/services/billing/, /muster/services/billing0) (prefix /muster/services/billing/)
/// KV Write:
///     [/muster/services/billing/, /muster/services/billing0) (prefix /muster/services/billing/)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// The role's name.
    pub name: String,
    /// Its permissions, in etcd's order (by key).
    pub permissions: Vec<Permission>,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Role {}", self.name)?;
        writeln!(f, "KV Read:")?;
        for p in self.permissions.iter().filter(|p| p.kind.allows_read()) {
            writeln!(f, "\t{}", p.keys())?;
        }
        write!(f, "KV Write:")?;
        for p in self.permissions.iter().filter(|p| p.kind.allows_write()) {
            write!(f, "\n\t{}", p.keys())?;
        }
        Ok(())
    }
}

/// A user and its roles ([`Etcd::user_get`](crate::Etcd::user_get)).
///
/// It displays as etcdctl's `user get`: `User: NAME` and `Roles: A B`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The user's name.
    pub name: String,
    /// The roles granted to it.
    pub roles: Vec<String>,
}

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "User: {}\nRoles:", self.name)?;
        for role in &self.roles {
            write!(f, " {role}")?;
        }
        Ok(())
    }
}

/// Whether auth is on ([`Etcd::auth_status`](crate::Etcd::auth_status)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthStatus {
    /// Whether requests must carry a user's token.
    pub enabled: bool,
    /// The auth store's revision (raised by every change to users, roles,
    /// permissions or the enabled flag). `None` from servers without the
    /// `AuthStatus` call (etcd before 3.5), whose status is found out
    /// otherwise (see [`Etcd::auth_status`](crate::Etcd::auth_status)).
    pub auth_revision: Option<u64>,
}

/// etcd's refusals of auth requests (its `rpctypes` errors), each
/// displayed in etcd's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuthError {
    /// Auth is off (the answer to a login while it is).
    NotEnabled,
    /// Enabling auth needs a `root` user: add it first.
    RootUserMissing,
    /// Enabling auth needs the `root` user to have the `root` role.
    RootRoleNotGranted,
    /// A user of that name exists.
    UserExists,
    /// No user of that name.
    UserNotFound,
    /// A role of that name exists.
    RoleExists,
    /// No role of that name.
    RoleNotFound,
    /// The role name is empty.
    RoleEmpty,
    /// The user does not have that role (revoking it).
    RoleNotGranted,
    /// The role has no such permission (revoking it).
    PermissionNotGranted,
    /// The grant carried no permission.
    PermissionNotGiven,
    /// Refused to keep auth consistent, e.g. revoking `root` from the
    /// `root` user or deleting it while auth is enabled.
    InvalidManagement,
    /// The token's auth revision is older than the store's (users or
    /// roles changed meanwhile): authenticate again.
    OldRevision,
}

impl AuthError {
    const ALL: [AuthError; 13] = [
        AuthError::NotEnabled,
        AuthError::RootUserMissing,
        AuthError::RootRoleNotGranted,
        AuthError::UserExists,
        AuthError::UserNotFound,
        AuthError::RoleExists,
        AuthError::RoleNotFound,
        AuthError::RoleEmpty,
        AuthError::RoleNotGranted,
        AuthError::PermissionNotGranted,
        AuthError::PermissionNotGiven,
        AuthError::InvalidManagement,
        AuthError::OldRevision,
    ];

    /// etcd's message for it.
    pub fn message(self) -> &'static str {
        match self {
            AuthError::NotEnabled => "etcdserver: authentication is not enabled",
            AuthError::RootUserMissing => "etcdserver: root user does not exist",
            AuthError::RootRoleNotGranted => "etcdserver: root user does not have root role",
            AuthError::UserExists => "etcdserver: user name already exists",
            AuthError::UserNotFound => "etcdserver: user name not found",
            AuthError::RoleExists => "etcdserver: role name already exists",
            AuthError::RoleNotFound => "etcdserver: role name not found",
            AuthError::RoleEmpty => "etcdserver: role name is empty",
            AuthError::RoleNotGranted => "etcdserver: role is not granted to the user",
            AuthError::PermissionNotGranted => "etcdserver: permission is not granted to the role",
            AuthError::PermissionNotGiven => "etcdserver: permission not given",
            AuthError::InvalidManagement => "etcdserver: invalid auth management",
            AuthError::OldRevision => "etcdserver: revision of auth store is old",
        }
    }

    /// The error whose message `message` is (a gRPC status's message from
    /// etcd or the embedded registry).
    pub fn from_message(message: &str) -> Option<AuthError> {
        let message = message.trim();
        AuthError::ALL.into_iter().find(|e| message == e.message())
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for AuthError {}

/// The least privilege of a process of `service` under the default prefix
/// ([`instance::DEFAULT_PREFIX`]): see [`service_permissions_under`].
pub fn service_permissions(service: &str) -> Result<Vec<Permission>> {
    service_permissions_under(instance::DEFAULT_PREFIX, service)
}

/// The least privilege of a process of `service` whose instances live
/// under `prefix`, for a role of its own:
///
/// * read and write on its own instances (`{prefix}/{service}/`): a
///   [`Registrar`](crate::Registrar) claims, refreshes and deletes them, and
///   etcd lets a lease be revoked only by a user that may write every key
///   attached to it;
/// * read on every service (`{prefix}/`): discovery and the catalog of the
///   services it calls, and the registrar's check of who holds a key.
///
/// Leases need no permission of their own (etcd checks the keys attached).
/// A registrar that registers instances of several services needs the
/// permissions of each (grant the user one such role per service).
pub fn service_permissions_under(prefix: &str, service: &str) -> Result<Vec<Permission>> {
    instance::validate_prefix(prefix)?;
    instance::validate_name("service name", service)?;
    Ok(vec![
        Permission::prefix(
            PermissionKind::ReadWrite,
            instance::service_prefix(prefix, service),
        ),
        Permission::prefix(PermissionKind::Read, instance::prefix_dir(prefix)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_write_ranges_as_etcdctl() {
        let p = Permission::prefix(PermissionKind::Read, "/a/");
        assert_eq!(
            (p.key.as_slice(), p.range_end.as_slice()),
            (&b"/a/"[..], &b"/a0"[..])
        );
        assert_eq!(p.as_prefix(), Some(&b"/a/"[..]));
        let all = Permission::prefix(PermissionKind::Read, "");
        assert_eq!(
            (all.key.as_slice(), all.range_end.as_slice()),
            (&b"\0"[..], &b"\0"[..])
        );
        assert_eq!(all, Permission::from_key(PermissionKind::Read, ""));
        assert_eq!(all.as_prefix(), Some(&b""[..]));
        let from = Permission::from_key(PermissionKind::Write, "/x");
        assert_eq!(from.range_end, b"\0");
        assert!(from.is_open_ended() && from.as_prefix().is_none());
        let one = Permission::key(PermissionKind::Write, "k1");
        assert!(one.is_single_key());
        assert_eq!(Permission::key(PermissionKind::Read, "").key, b"\0");
        let range = Permission::range(PermissionKind::Read, "a", "z");
        assert_eq!(range.as_prefix(), None);
    }

    #[test]
    fn display_follows_etcdctl_role_get() {
        assert_eq!(
            Permission::prefix(PermissionKind::ReadWrite, "/a/").to_string(),
            "readwrite [/a/, /a0) (prefix /a/)"
        );
        assert_eq!(
            Permission::key(PermissionKind::Write, "k1").to_string(),
            "write k1"
        );
        assert_eq!(
            Permission::from_key(PermissionKind::Read, "/x").keys(),
            "[/x, <open ended>"
        );
        assert_eq!(
            Permission::all_keys(PermissionKind::Read).keys(),
            "[\\x00, <open ended>"
        );
        assert_eq!(
            Permission::range(PermissionKind::Read, "a", "z").keys(),
            "[a, z)"
        );
        assert_eq!(
            Permission::key(PermissionKind::Read, &b"\xff\x01"[..]).keys(),
            "\\xff\\x01"
        );
        let role = Role {
            name: "r".into(),
            permissions: vec![
                Permission::prefix(PermissionKind::Read, "/m/"),
                Permission::prefix(PermissionKind::ReadWrite, "/m/a/"),
                Permission::key(PermissionKind::Write, "k1"),
            ],
        };
        assert_eq!(
            role.to_string(),
            "Role r\nKV Read:\n\t[/m/, /m0) (prefix /m/)\n\t[/m/a/, /m/a0) (prefix /m/a/)\n\
             KV Write:\n\t[/m/a/, /m/a0) (prefix /m/a/)\n\tk1"
        );
        let empty = Role {
            name: "e".into(),
            permissions: vec![],
        };
        assert_eq!(empty.to_string(), "Role e\nKV Read:\nKV Write:");
        let user = User {
            name: "u".into(),
            roles: vec!["a".into(), "b".into()],
        };
        assert_eq!(user.to_string(), "User: u\nRoles: a b");
    }

    #[test]
    fn coverage() {
        let p = Permission::prefix(PermissionKind::Read, "/a/");
        assert!(p.covers(PermissionKind::Read, b"/a/x"));
        assert!(!p.covers(PermissionKind::Write, b"/a/x"));
        assert!(!p.covers(PermissionKind::Read, b"/ab"));
        let all = Permission::all_keys(PermissionKind::ReadWrite);
        assert!(all.covers(PermissionKind::ReadWrite, b"anything"));
        let one = Permission::key(PermissionKind::Write, "k");
        assert!(
            one.covers(PermissionKind::Write, b"k") && !one.covers(PermissionKind::Write, b"k2")
        );
    }

    #[test]
    fn kinds_round_trip() {
        for kind in [
            PermissionKind::Read,
            PermissionKind::Write,
            PermissionKind::ReadWrite,
        ] {
            assert_eq!(kind.as_str().parse::<PermissionKind>().unwrap(), kind);
            assert_eq!(
                PermissionKind::from_proto(kind.to_proto() as i32),
                Some(kind)
            );
        }
        assert_eq!(
            "READWRITE".parse::<PermissionKind>().unwrap(),
            PermissionKind::ReadWrite
        );
        assert!("all".parse::<PermissionKind>().is_err());
        assert_eq!(PermissionKind::from_proto(7), None);
    }

    #[test]
    fn etcd_messages_map_back() {
        for e in AuthError::ALL {
            assert_eq!(AuthError::from_message(e.message()), Some(e));
        }
        assert_eq!(
            AuthError::from_message("etcdserver: permission denied"),
            None
        );
    }

    #[test]
    fn service_recipe() {
        let perms = service_permissions("billing").unwrap();
        assert_eq!(
            perms,
            [
                Permission::prefix(PermissionKind::ReadWrite, "/muster/services/billing/"),
                Permission::prefix(PermissionKind::Read, "/muster/services/"),
            ]
        );
        assert!(perms[0].covers(PermissionKind::ReadWrite, b"/muster/services/billing/b-1"));
        assert!(
            !perms
                .iter()
                .any(|p| p.covers(PermissionKind::Write, b"/muster/services/billing_x/1"))
        );
        assert!(service_permissions("a/b").is_err());
        assert!(service_permissions_under("/x/", "a").is_err());
    }
}
