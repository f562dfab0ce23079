//! `muster user`, `muster role` and `muster auth`: etcd's users, roles and
//! permissions, and switching auth on and off, as etcdctl's commands of the
//! same names, against etcd or the embedded registry.
//!
//! Passwords are never prompted for, echoed or logged. A new password
//! (`user add`, `user passwd`) comes from `NAME:PASSWORD` on the command
//! line (visible to other local users in `ps`: prefer the next two), else
//! from `MUSTER_NEW_PASSWORD`, else from the first line of stdin when it is
//! not a terminal (`printf '%s\n' "$PW" | muster user add alice`). The
//! password of the user running the command is the global `--user`'s.

use std::io::{BufRead, IsTerminal};

use anyhow::{Context, bail};
use muster::auth::{AuthError, Permission, PermissionKind, Role};
use muster::{Error, Etcd};

use crate::global::{GlobalArgs, Output};
use crate::output::{Needs, auth_message, print, print_json, registry_error};

/// The environment variable a new password is read from.
pub const NEW_PASSWORD_ENV: &str = "MUSTER_NEW_PASSWORD";

const PASSWORD_HELP: &str = "A new password is taken from NAME:PASSWORD, else from \
    MUSTER_NEW_PASSWORD, else from the first line of stdin (when it is not a terminal); \
    it is never prompted for or echoed. NAME:PASSWORD shows in `ps`: prefer the others.\n\n\
    Examples:\n  \
    printf '%s\\n' \"$ROOT_PW\" | muster user add root\n  \
    MUSTER_NEW_PASSWORD=\"$PW\" muster --user root:\"$ROOT_PW\" user add billing\n  \
    muster --user root:\"$ROOT_PW\" user grant-role billing billing";

/// `muster user ...`.
#[derive(Debug, clap::Subcommand)]
pub enum UserCommand {
    /// Add a user (NAME, NAME:PASSWORD, or NAME --no-password).
    #[command(after_help = PASSWORD_HELP)]
    Add {
        /// NAME or NAME:PASSWORD.
        #[arg(value_name = "NAME[:PASSWORD]")]
        spec: String,
        /// A user without a password, that only a TLS client certificate
        /// with this common name can act as (etcd's --client-cert-auth).
        #[arg(long)]
        no_password: bool,
    },
    /// Delete a user.
    Delete {
        /// The user's name.
        name: String,
    },
    /// Show a user's roles.
    Get {
        /// The user's name.
        name: String,
        /// Show the permissions of each role too.
        #[arg(long)]
        detail: bool,
    },
    /// List every user.
    List,
    /// Change a user's password (from MUSTER_NEW_PASSWORD or stdin).
    #[command(after_help = PASSWORD_HELP)]
    Passwd {
        /// The user's name.
        name: String,
    },
    /// Grant a role to a user.
    GrantRole {
        /// The user's name.
        name: String,
        /// The role.
        role: String,
    },
    /// Revoke a role from a user.
    RevokeRole {
        /// The user's name.
        name: String,
        /// The role.
        role: String,
    },
}

/// Where a permission's range comes from on the command line: etcdctl's
/// `KEY [RANGE_END] [--prefix | --from-key]`, with `--as-prefix` for
/// etcdctl's `--prefix` (muster's `--prefix` is the services' key prefix).
#[derive(Debug, clap::Args)]
pub struct RangeArgs {
    /// The key, or the start of the range.
    #[arg(id = "perm_key", value_name = "KEY")]
    key: String,
    /// The exclusive end of the range (without it: KEY alone).
    #[arg(conflicts_with_all = ["as_prefix", "from_key"])]
    range_end: Option<String>,
    /// Every key starting with KEY (an empty KEY: every key); etcdctl's
    /// --prefix.
    #[arg(long, conflicts_with = "from_key")]
    as_prefix: bool,
    /// Every key from KEY on.
    #[arg(long)]
    from_key: bool,
}

impl RangeArgs {
    /// The permission of `kind` on this range, as etcdctl builds it.
    fn permission(&self, kind: PermissionKind) -> Permission {
        let key = self.key.as_bytes();
        if self.as_prefix {
            Permission::prefix(kind, key)
        } else if self.from_key {
            Permission::from_key(kind, key)
        } else if let Some(end) = &self.range_end {
            Permission::range(kind, key, end.as_bytes())
        } else {
            Permission::key(kind, key)
        }
    }
}

/// `muster role ...`.
#[derive(Debug, clap::Subcommand)]
pub enum RoleCommand {
    /// Add a role (it grants nothing until given permissions).
    Add {
        /// The role's name.
        name: String,
    },
    /// Delete a role, taking it from every user that has it.
    Delete {
        /// The role's name.
        name: String,
    },
    /// Show a role's permissions.
    Get {
        /// The role's name.
        name: String,
    },
    /// List every role.
    List,
    /// Grant read, write or readwrite on a key, a range or a prefix.
    #[command(after_help = "Examples:\n  \
        muster role grant-permission billing readwrite /muster/services/billing/ --as-prefix\n  \
        muster role grant-permission ops read '' --as-prefix     # every key\n  \
        muster role grant-permission ops write /a /b             # [/a, /b)\n  \
        muster role grant-permission ops read /logs/ --from-key  # /logs/ and every key after\n\n\
        --as-prefix is etcdctl's --prefix: muster's --prefix is the services' key prefix.")]
    GrantPermission {
        /// The role's name.
        name: String,
        /// read, write or readwrite.
        #[arg(value_parser = parse_kind)]
        kind: PermissionKind,
        #[command(flatten)]
        range: RangeArgs,
    },
    /// Revoke the permission on exactly this key, range or prefix.
    RevokePermission {
        /// The role's name.
        name: String,
        #[command(flatten)]
        range: RangeArgs,
    },
    /// Grant what a process of SERVICE needs: readwrite on its own
    /// instances, read on every service (discovery).
    #[command(
        after_help = "The least-privilege recipe for a service's processes:\n  \
        muster role add billing\n  \
        muster role grant-service billing billing\n  \
        muster user add billing          # password from MUSTER_NEW_PASSWORD or stdin\n  \
        muster user grant-role billing billing\n\
        (with --user root:PASSWORD once auth is enabled). The keys follow the global --prefix."
    )]
    GrantService {
        /// The role's name.
        name: String,
        /// The service its users register.
        service: String,
    },
}

/// `muster auth ...`.
#[derive(Debug, clap::Subcommand)]
pub enum AuthCommand {
    /// Turn authentication on (needs a user root; gives it the root role
    /// if it lacks it, as etcdctl does).
    Enable,
    /// Turn authentication off.
    Disable,
    /// Show whether authentication is on.
    Status,
}

fn parse_kind(s: &str) -> Result<PermissionKind, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

/// A failed call `what`, worded for the terminal: etcd's words, then what
/// to do about them.
fn failed(etcd: &Etcd, what: &str, error: Error) -> anyhow::Error {
    if matches!(error, Error::Unavailable(_) | Error::Timeout(_)) {
        return registry_error(etcd, error).context(what.to_string());
    }
    if let Some(message) = auth_message(&error, Needs::Root) {
        return anyhow::anyhow!("{what}: {message}");
    }
    let hint = match &error {
        Error::Auth(AuthError::RootUserMissing) => Some("add it first: muster user add root"),
        Error::Auth(AuthError::RootRoleNotGranted) => {
            Some("grant it: muster user grant-role root root")
        }
        Error::Auth(AuthError::UserNotFound) => Some("see muster user list"),
        Error::Auth(AuthError::RoleNotFound) => Some("see muster role list"),
        Error::Auth(AuthError::InvalidManagement) => Some(
            "etcd keeps the root user and its root role while auth is enabled \
             (muster auth disable first)",
        ),
        _ => None,
    };
    match hint {
        Some(hint) => anyhow::anyhow!("{what}: {error}; {hint}"),
        None => anyhow::anyhow!("{what}: {error}"),
    }
}

/// A user name or role name given on the command line: not empty.
fn check_name(what: &str, name: &str) -> anyhow::Result<()> {
    if name.is_empty() {
        bail!("the {what} name is empty");
    }
    Ok(())
}

/// The new password: `given`, else `MUSTER_NEW_PASSWORD`, else stdin's
/// first line (not from a terminal). Never empty.
fn new_password(given: Option<String>) -> anyhow::Result<String> {
    let password = match given {
        Some(password) => password,
        None => match std::env::var(NEW_PASSWORD_ENV) {
            Ok(password) => password,
            Err(_) => {
                let stdin = std::io::stdin();
                if stdin.is_terminal() {
                    bail!(
                        "no password given: write NAME:PASSWORD, set {NEW_PASSWORD_ENV}, or \
                         pipe it on stdin (muster does not prompt)"
                    );
                }
                let mut line = String::new();
                stdin
                    .lock()
                    .read_line(&mut line)
                    .context("cannot read the password from stdin")?;
                line.trim_end_matches(['\n', '\r']).to_string()
            }
        },
    };
    if password.is_empty() {
        bail!("the password is empty (a user without one: --no-password)");
    }
    Ok(password)
}

/// A permission in JSON.
fn permission_json(p: &Permission) -> serde_json::Value {
    serde_json::json!({
        "type": p.kind.as_str(),
        "key": String::from_utf8_lossy(&p.key),
        "range_end": String::from_utf8_lossy(&p.range_end),
        "prefix": p.as_prefix().map(String::from_utf8_lossy),
        "text": p.keys(),
    })
}

fn role_json(role: &Role) -> serde_json::Value {
    serde_json::json!({
        "role": role.name,
        "permissions": role.permissions.iter().map(permission_json).collect::<Vec<_>>(),
    })
}

/// Prints `value` as JSON, or `text` (a line is added).
fn done(global: &GlobalArgs, text: &str, value: serde_json::Value) -> anyhow::Result<()> {
    match global.output {
        Output::Json => print_json(&value),
        Output::Table => print(&format!("{text}\n")),
    }
}

/// Runs `muster user ...`.
pub async fn run_user(global: &GlobalArgs, command: UserCommand) -> anyhow::Result<()> {
    let etcd = global.connect()?;
    match command {
        UserCommand::Add { spec, no_password } => {
            let (name, given) = match spec.split_once(':') {
                Some((name, password)) => (name.to_string(), Some(password.to_string())),
                None => (spec, None),
            };
            check_name("user", &name)?;
            let what = format!("user add {name}");
            if no_password {
                if given.is_some() {
                    bail!("{what}: --no-password and NAME:PASSWORD contradict each other");
                }
                etcd.user_add_no_password(&name).await
            } else {
                etcd.user_add(&name, &new_password(given)?).await
            }
            .map_err(|e| failed(&etcd, &what, e))?;
            done(
                global,
                &format!("user {name} added"),
                serde_json::json!({"user": name, "no_password": no_password}),
            )
        }
        UserCommand::Delete { name } => {
            check_name("user", &name)?;
            etcd.user_delete(&name)
                .await
                .map_err(|e| failed(&etcd, &format!("user delete {name}"), e))?;
            done(
                global,
                &format!("user {name} deleted"),
                serde_json::json!({"user": name, "deleted": true}),
            )
        }
        UserCommand::Get { name, detail } => {
            check_name("user", &name)?;
            let user = etcd
                .user_get(&name)
                .await
                .map_err(|e| failed(&etcd, &format!("user get {name}"), e))?;
            let mut roles = Vec::new();
            if detail {
                for role in &user.roles {
                    roles.push(etcd.role_get(role).await.map_err(|e| {
                        failed(&etcd, &format!("user get {name}: role get {role}"), e)
                    })?);
                }
            }
            match global.output {
                Output::Json => {
                    let mut value = serde_json::json!({"user": user.name, "roles": user.roles});
                    if detail {
                        value["role_permissions"] = roles.iter().map(role_json).collect();
                    }
                    print_json(&value)
                }
                Output::Table => {
                    let mut text = format!("{user}\n");
                    for role in &roles {
                        text.push_str(&format!("{role}\n"));
                    }
                    print(&text)
                }
            }
        }
        UserCommand::List => {
            let users = etcd
                .user_list()
                .await
                .map_err(|e| failed(&etcd, "user list", e))?;
            list(global, "users", users)
        }
        UserCommand::Passwd { name } => {
            check_name("user", &name)?;
            let password = new_password(None)?;
            etcd.user_change_password(&name, &password)
                .await
                .map_err(|e| failed(&etcd, &format!("user passwd {name}"), e))?;
            done(
                global,
                &format!("password of user {name} changed"),
                serde_json::json!({"user": name, "password_changed": true}),
            )
        }
        UserCommand::GrantRole { name, role } => {
            check_name("user", &name)?;
            check_name("role", &role)?;
            etcd.user_grant_role(&name, &role)
                .await
                .map_err(|e| failed(&etcd, &format!("user grant-role {name} {role}"), e))?;
            done(
                global,
                &format!("role {role} granted to user {name}"),
                serde_json::json!({"user": name, "granted": role}),
            )
        }
        UserCommand::RevokeRole { name, role } => {
            check_name("user", &name)?;
            check_name("role", &role)?;
            etcd.user_revoke_role(&name, &role)
                .await
                .map_err(|e| failed(&etcd, &format!("user revoke-role {name} {role}"), e))?;
            done(
                global,
                &format!("role {role} revoked from user {name}"),
                serde_json::json!({"user": name, "revoked": role}),
            )
        }
    }
}

/// Prints names one per line, or `{"<key>": [...]}`.
fn list(global: &GlobalArgs, key: &str, names: Vec<String>) -> anyhow::Result<()> {
    match global.output {
        Output::Json => print_json(&serde_json::json!({ key: names })),
        Output::Table => {
            if names.is_empty() {
                eprintln!("no {key}");
                return Ok(());
            }
            print(&names.iter().map(|n| format!("{n}\n")).collect::<String>())
        }
    }
}

/// Runs `muster role ...`.
pub async fn run_role(global: &GlobalArgs, command: RoleCommand) -> anyhow::Result<()> {
    let etcd = global.connect()?;
    match command {
        RoleCommand::Add { name } => {
            check_name("role", &name)?;
            etcd.role_add(&name)
                .await
                .map_err(|e| failed(&etcd, &format!("role add {name}"), e))?;
            done(
                global,
                &format!("role {name} added"),
                serde_json::json!({"role": name}),
            )
        }
        RoleCommand::Delete { name } => {
            check_name("role", &name)?;
            etcd.role_delete(&name)
                .await
                .map_err(|e| failed(&etcd, &format!("role delete {name}"), e))?;
            done(
                global,
                &format!("role {name} deleted"),
                serde_json::json!({"role": name, "deleted": true}),
            )
        }
        RoleCommand::Get { name } => {
            check_name("role", &name)?;
            let role = etcd
                .role_get(&name)
                .await
                .map_err(|e| failed(&etcd, &format!("role get {name}"), e))?;
            match global.output {
                Output::Json => print_json(&role_json(&role)),
                Output::Table => print(&format!("{role}\n")),
            }
        }
        RoleCommand::List => {
            let roles = etcd
                .role_list()
                .await
                .map_err(|e| failed(&etcd, "role list", e))?;
            list(global, "roles", roles)
        }
        RoleCommand::GrantPermission { name, kind, range } => {
            check_name("role", &name)?;
            let permission = range.permission(kind);
            grant(global, &etcd, &name, &[permission]).await
        }
        RoleCommand::RevokePermission { name, range } => {
            check_name("role", &name)?;
            let permission = range.permission(PermissionKind::ReadWrite);
            etcd.role_revoke_permission(&name, &permission.key, &permission.range_end)
                .await
                .map_err(|e| {
                    failed(
                        &etcd,
                        &format!("role revoke-permission {name} {}", permission.keys()),
                        e,
                    )
                })?;
            let mut value = permission_json(&permission);
            if let Some(map) = value.as_object_mut() {
                map.remove("type");
            }
            done(
                global,
                &format!("role {name}: permission on {} revoked", permission.keys()),
                serde_json::json!({"role": name, "revoked": value}),
            )
        }
        RoleCommand::GrantService { name, service } => {
            check_name("role", &name)?;
            let permissions = muster::auth::service_permissions_under(global.prefix(), &service)
                .with_context(|| format!("role grant-service {name} {service}"))?;
            grant(global, &etcd, &name, &permissions).await
        }
    }
}

/// Grants `permissions` to `role` and says so.
async fn grant(
    global: &GlobalArgs,
    etcd: &Etcd,
    role: &str,
    permissions: &[Permission],
) -> anyhow::Result<()> {
    for p in permissions {
        etcd.role_grant_permission(role, p.clone())
            .await
            .map_err(|e| failed(etcd, &format!("role {role}: grant {p}"), e))?;
    }
    done(
        global,
        &permissions
            .iter()
            .map(|p| format!("role {role} granted {p}"))
            .collect::<Vec<_>>()
            .join("\n"),
        serde_json::json!({
            "role": role,
            "granted": permissions.iter().map(permission_json).collect::<Vec<_>>(),
        }),
    )
}

/// Runs `muster auth ...`.
pub async fn run_auth(global: &GlobalArgs, command: AuthCommand) -> anyhow::Result<()> {
    let etcd = global.connect()?;
    match command {
        AuthCommand::Enable => {
            let granted_root_role = enable(&etcd).await?;
            done(
                global,
                "authentication enabled",
                serde_json::json!({"enabled": true, "granted_root_role": granted_root_role}),
            )
        }
        AuthCommand::Disable => {
            etcd.auth_disable()
                .await
                .map_err(|e| failed(&etcd, "auth disable", e))?;
            done(
                global,
                "authentication disabled",
                serde_json::json!({"enabled": false}),
            )
        }
        AuthCommand::Status => {
            let status = etcd
                .auth_status()
                .await
                .map_err(|e| failed(&etcd, "auth status", e))?;
            match global.output {
                Output::Json => print_json(&serde_json::json!({
                    "enabled": status.enabled,
                    "auth_revision": status.auth_revision,
                })),
                Output::Table => {
                    let mut text = format!("Authentication Status: {}\n", status.enabled);
                    if let Some(revision) = status.auth_revision {
                        text.push_str(&format!("AuthRevision: {revision}\n"));
                    }
                    print(&text)
                }
            }
        }
    }
}

/// Enables auth as etcdctl 3.4 does: when etcd says the root user lacks
/// the root role, adds the role (if missing), grants it and tries again.
/// Whether it granted the role.
async fn enable(etcd: &Etcd) -> anyhow::Result<bool> {
    match etcd.auth_enable().await {
        Ok(()) => return Ok(false),
        Err(Error::Auth(AuthError::RootRoleNotGranted)) => {}
        Err(e) => return Err(failed(etcd, "auth enable", e)),
    }
    tracing::info!("user root lacks the root role: adding it");
    match etcd.role_add("root").await {
        Ok(()) | Err(Error::Auth(AuthError::RoleExists)) => {}
        Err(e) => return Err(failed(etcd, "auth enable: role add root", e)),
    }
    etcd.user_grant_role("root", "root")
        .await
        .map_err(|e| failed(etcd, "auth enable: user grant-role root root", e))?;
    etcd.auth_enable()
        .await
        .map_err(|e| failed(etcd, "auth enable", e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(key: &str, end: Option<&str>, as_prefix: bool, from_key: bool) -> RangeArgs {
        RangeArgs {
            key: key.into(),
            range_end: end.map(String::from),
            as_prefix,
            from_key,
        }
    }

    #[test]
    fn ranges_as_etcdctl_builds_them() {
        let kind = PermissionKind::Read;
        let p = range("/a/", None, true, false).permission(kind);
        assert_eq!((p.key, p.range_end), (b"/a/".to_vec(), b"/a0".to_vec()));
        let every = range("", None, true, false).permission(kind);
        assert_eq!(
            (every.key, every.range_end),
            (b"\0".to_vec(), b"\0".to_vec())
        );
        let from = range("/x", None, false, true).permission(kind);
        assert_eq!(from.range_end, b"\0");
        let r = range("a", Some("z"), false, false).permission(kind);
        assert_eq!(r.range_end, b"z");
        let one = range("k", None, false, false).permission(kind);
        assert!(one.is_single_key());
    }

    #[test]
    fn kinds_parse() {
        assert_eq!(parse_kind("readwrite"), Ok(PermissionKind::ReadWrite));
        assert!(
            parse_kind("rw")
                .unwrap_err()
                .contains("read, write or readwrite")
        );
    }
}
