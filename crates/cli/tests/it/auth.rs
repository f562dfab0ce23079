//! `muster user`, `muster role` and `muster auth` as real processes against
//! a real etcd and the embedded registry (which fails these until its auth
//! store lands): users and roles, permissions on a prefix, enabling auth
//! (etcdctl's way: root gets the root role), what a restricted user may and
//! may not do, the hints on errors, and disabling auth again. Also the
//! auth flags of `muster serve`.

use crate::common;

use std::io::Write;
use std::process::{Output, Stdio};

use common::{Backend, text};

const ROOT: &str = "root:root-pw";

/// `muster ARGS` with `stdin` as its standard input.
fn with_stdin(backend: &Backend, args: &[&str], stdin: &str) -> Output {
    let mut child = backend
        .muster()
        .args(args)
        .env_remove("MUSTER_NEW_PASSWORD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("muster runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Expects success; stdout.
fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        text(&out.stderr),
        text(&out.stdout)
    );
    text(&out.stdout)
}

/// Expects a failure of one line on stderr; that line.
fn fails(out: Output, what: &str) -> String {
    assert!(
        !out.status.success(),
        "{what} should fail: {}",
        text(&out.stdout)
    );
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("muster: ")).collect();
    assert_eq!(lines.len(), 1, "{what}: one error line: {err:?}");
    assert!(!err.contains("panicked"), "{what}: {err:?}");
    lines[0].to_string()
}

/// The library as user `user`, for the writes the CLI has no command for.
struct Lib {
    rt: tokio::runtime::Runtime,
    etcd: muster::Etcd,
}

impl Lib {
    fn as_user(backend: &Backend, user: &str, password: &str) -> Lib {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let etcd = {
            let _guard = rt.enter();
            muster::Etcd::connect(
                muster::Config::new([backend.endpoint()]).with_credentials(user, password),
            )
            .unwrap()
        };
        Lib { rt, etcd }
    }

    fn put(&self, key: &str) -> muster::Result<()> {
        self.rt
            .block_on(self.etcd.put(muster_proto::PutRequest {
                key: key.into(),
                value: b"v".to_vec(),
                ..Default::default()
            }))
            .map(drop)
    }
}

fn users_roles_and_auth_enable(backend: &Backend) {
    // Users: password on stdin, from the environment, on the command line.
    let out = with_stdin(backend, &["user", "add", "root"], "root-pw\n");
    assert_eq!(ok(out, "user add root"), "user root added\n");
    let err = fails(
        with_stdin(backend, &["user", "add", "root"], "again\n"),
        "user add root again",
    );
    assert!(
        err.contains("etcdserver: user name already exists"),
        "{err}"
    );
    let out = backend
        .muster()
        .args(["user", "add", "alice"])
        .env("MUSTER_NEW_PASSWORD", "alice-pw")
        .output()
        .unwrap();
    ok(out, "user add alice");
    ok(
        backend.run(&["user", "add", "bob:bob-pw"]),
        "user add bob:PASSWORD",
    );
    // No password anywhere: refused, not prompted.
    let err = fails(
        with_stdin(backend, &["user", "add", "carol"], ""),
        "user add carol",
    );
    assert!(err.contains("the password is empty"), "{err}");
    let err = fails(
        backend.run(&["user", "add", "dave:pw", "--no-password"]),
        "--no-password with a password",
    );
    assert!(err.contains("contradict"), "{err}");
    ok(
        backend.run(&["user", "add", "cert-only", "--no-password"]),
        "user add --no-password",
    );
    assert_eq!(
        backend.json(&["user", "list"])["users"],
        serde_json::json!(["alice", "bob", "cert-only", "root"])
    );

    // A role with a prefix, granted to alice.
    assert_eq!(
        ok(backend.run(&["role", "add", "app"]), "role add"),
        "role app added\n"
    );
    let out = backend.run(&[
        "role",
        "grant-permission",
        "app",
        "readwrite",
        "/app/",
        "--as-prefix",
    ]);
    assert_eq!(
        ok(out, "grant-permission"),
        "role app granted readwrite [/app/, /app0) (prefix /app/)\n"
    );
    let out = backend.run(&["role", "grant-permission", "app", "read", "/config"]);
    ok(out, "grant-permission read /config");
    // A usage error, from the command line parser.
    let out = backend.run(&["role", "grant-permission", "app", "all", "/x"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("read, write or readwrite"), "{err}");
    assert_eq!(
        ok(backend.run(&["role", "get", "app"]), "role get"),
        "Role app\nKV Read:\n\t[/app/, /app0) (prefix /app/)\n\t/config\n\
         KV Write:\n\t[/app/, /app0) (prefix /app/)\n"
    );
    let role = backend.json(&["role", "get", "app"]);
    assert_eq!(role["permissions"][0]["type"], "readwrite");
    assert_eq!(role["permissions"][0]["prefix"], "/app/");
    assert_eq!(role["permissions"][1]["range_end"], "");
    let out = backend.run(&["user", "grant-role", "alice", "app"]);
    assert_eq!(ok(out, "grant-role"), "role app granted to user alice\n");
    let err = fails(
        backend.run(&["user", "grant-role", "alice", "nope"]),
        "grant-role nope",
    );
    assert!(
        err.contains("etcdserver: role name not found; see muster role list"),
        "{err}"
    );
    let out = backend.run(&["user", "get", "alice", "--detail"]);
    let shown = ok(out, "user get --detail");
    assert!(
        shown.starts_with("User: alice\nRoles: app\nRole app\n"),
        "{shown}"
    );

    // Enabling auth gives root the root role first, as etcdctl does.
    let enabled = backend.json(&["auth", "enable"]);
    assert_eq!(enabled["granted_root_role"], true, "{enabled}");
    let status = ok(backend.run(&["auth", "status"]), "auth status");
    assert!(
        status.starts_with("Authentication Status: true\n"),
        "{status}"
    );
    assert!(
        backend.json(&["--user", ROOT, "user", "get", "root"])["roles"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("root"))
    );

    // Without credentials: refused, with a hint.
    let err = fails(backend.run(&["user", "list"]), "user list without --user");
    assert!(err.contains("--user"), "{err}");
    let err = fails(backend.run(&["ls"]), "ls without --user");
    assert!(err.contains("give --user NAME:PASSWORD"), "{err}");
    // Wrong password.
    let err = fails(
        backend.run(&["--user", "alice:nope", "role", "list"]),
        "a wrong password",
    );
    assert!(err.contains("authentication failed"), "{err}");
    // A user without the root role may not manage.
    let err = fails(
        backend.run(&["--user", "alice:alice-pw", "role", "list"]),
        "alice role list",
    );
    assert!(err.contains("etcdserver: permission denied"), "{err}");
    assert!(
        err.contains("user \"alice\" may not")
            && err.contains("needs the root role")
            && err.contains("--user root:"),
        "{err}"
    );

    // alice writes inside /app/, nowhere else.
    let alice = Lib::as_user(backend, "alice", "alice-pw");
    alice.put("/app/x").expect("a put inside alice's prefix");
    for key in ["/apple", "/config", "/elsewhere"] {
        let err = alice.put(key).unwrap_err();
        assert!(
            err.to_string().contains("etcdserver: permission denied"),
            "{key}: {err}"
        );
    }
    let bob = Lib::as_user(backend, "bob", "bob-pw");
    let err = bob.put("/app/x").unwrap_err();
    assert!(
        err.to_string().contains("etcdserver: permission denied"),
        "{err}"
    );

    // Revoking the prefix takes it away.
    let out = backend.run(&[
        "--user",
        ROOT,
        "role",
        "revoke-permission",
        "app",
        "/app/",
        "--as-prefix",
    ]);
    assert_eq!(
        ok(out, "revoke-permission"),
        "role app: permission on [/app/, /app0) (prefix /app/) revoked\n"
    );
    let err = fails(
        backend.run(&[
            "--user",
            ROOT,
            "role",
            "revoke-permission",
            "app",
            "/app/",
            "--as-prefix",
        ]),
        "revoking it twice",
    );
    assert!(
        err.contains("etcdserver: permission is not granted to the role"),
        "{err}"
    );
    let err = Lib::as_user(backend, "alice", "alice-pw")
        .put("/app/y")
        .unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");

    // A new password from stdin; the old one no longer works.
    let out = with_stdin(
        backend,
        &["--user", ROOT, "user", "passwd", "alice"],
        "new-pw\n",
    );
    assert_eq!(ok(out, "user passwd"), "password of user alice changed\n");
    let err = fails(
        backend.run(&["--user", "alice:alice-pw", "user", "get", "alice"]),
        "old pw",
    );
    assert!(err.contains("authentication failed"), "{err}");
    ok(
        backend.run(&["--user", "alice:new-pw", "user", "get", "alice"]),
        "new password",
    );

    // root keeps its role while auth is on.
    let err = fails(
        backend.run(&["--user", ROOT, "user", "revoke-role", "root", "root"]),
        "revoking root from root",
    );
    assert!(err.contains("etcdserver: invalid auth management"), "{err}");
    ok(
        backend.run(&["--user", ROOT, "user", "revoke-role", "alice", "app"]),
        "revoke-role",
    );
    ok(
        backend.run(&["--user", ROOT, "user", "delete", "bob"]),
        "user delete",
    );
    ok(
        backend.run(&["--user", ROOT, "role", "delete", "app"]),
        "role delete",
    );
    assert_eq!(
        backend.json(&["--user", ROOT, "role", "list"])["roles"],
        serde_json::json!(["root"])
    );

    let out = backend.run(&["--user", ROOT, "auth", "disable"]);
    assert_eq!(ok(out, "auth disable"), "authentication disabled\n");
    assert_eq!(backend.json(&["auth", "status"])["enabled"], false);
    ok(backend.run(&["ls"]), "ls without --user once auth is off");
}

/// `role grant-service` grants a service's least privilege: its processes
/// register (through the CLI's sidecar) and discover, and may not touch
/// other services.
fn grant_service_is_least_privilege(backend: &Backend) {
    ok(
        with_stdin(backend, &["user", "add", "root"], "root-pw\n"),
        "user add root",
    );
    ok(backend.run(&["role", "add", "web"]), "role add web");
    let granted = backend.json(&["role", "grant-service", "web", "web"]);
    let texts: Vec<&str> = granted["granted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        [
            "[/muster/services/web/, /muster/services/web0) (prefix /muster/services/web/)",
            "[/muster/services/, /muster/services0) (prefix /muster/services/)",
        ]
    );
    ok(backend.run(&["user", "add", "web:web-pw"]), "user add web");
    ok(
        backend.run(&["user", "grant-role", "web", "web"]),
        "grant-role",
    );
    ok(backend.run(&["auth", "enable"]), "auth enable");

    let web = ["--user", "web:web-pw"];
    let mut sidecar = common::KillOnDrop(
        backend
            .muster()
            .args(web)
            .args([
                "register",
                "web",
                "w-1",
                "http://127.0.0.1:9",
                "--ttl",
                "3s",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    common::wait_for("web/w-1 registered", || {
        let out = backend.run(&[&web[..], &["get", "web", "-o", "json"]].concat());
        out.status.success().then_some(())
    });
    let ls = backend.json(&[&web[..], &["ls"]].concat());
    assert_eq!(ls["services"][0]["service"], "web", "{ls}");
    // Another service's instance may not be removed (nor anything else written).
    let err = fails(
        backend.run(&[&web[..], &["deregister", "db", "d-1"]].concat()),
        "deregister another service",
    );
    assert!(err.contains("etcdserver: permission denied"), "{err}");
    assert!(err.contains("muster role grant-service"), "{err}");
    // Its own it may.
    ok(
        backend.run(&[&web[..], &["deregister", "web", "w-1"]].concat()),
        "deregister own",
    );
    let _ = sidecar.0.kill();
    let _ = sidecar.0.wait();
}

crate::on_both!(
    users_roles_and_auth_enable,
    grant_service_is_least_privilege
);

#[test]
fn serve_refuses_bad_auth_flags() {
    for (flags, words) in [
        (&["--bcrypt-cost", "3"][..], "3 is not in 4..=31"),
        (&["--bcrypt-cost", "32"], "32 is not in 4..=31"),
        (&["--auth-token-ttl", "0"], "at least 1 second"),
        (&["--auth-token-ttl", "5m"], "not a whole number of seconds"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_muster"))
            .args(["serve", "--in-memory"])
            .args(flags)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flags:?} accepted");
        let err = text(&out.stderr);
        assert!(err.contains(words), "{flags:?}: {err}");
    }
}
