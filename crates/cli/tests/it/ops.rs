//! The operator subcommands as real processes, against the embedded
//! registry (`muster serve --in-memory`) and a real etcd: `ls`, `get`,
//! `watch`, `deregister`, `completions`, and their errors.

use crate::common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use muster::{Etcd, Instance, Registrar, RegistrarConfig, Status};
use muster_proto as pb;

use common::{Backend, KillOnDrop, Lines, text, wait_for};

/// The library, for making registrations the commands then show.
struct Lib {
    rt: tokio::runtime::Runtime,
    etcd: Etcd,
}

impl Lib {
    fn new(backend: &Backend) -> Lib {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let etcd = {
            let _guard = rt.enter();
            Etcd::connect_to(backend.endpoint()).unwrap()
        };
        Lib { rt, etcd }
    }

    fn registrar(&self) -> Registrar {
        self.rt
            .block_on(Registrar::start(
                self.etcd.clone(),
                RegistrarConfig::default().with_grace(Duration::ZERO),
            ))
            .unwrap()
    }

    /// Writes a value the way a non-muster client would: no lease, no
    /// registration time.
    fn put_raw(&self, key: &str, value: &str) {
        self.rt
            .block_on(self.etcd.put(pb::PutRequest {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            }))
            .unwrap();
    }
}

fn u1() -> Instance {
    Instance::new("user", "u-1", "http://127.0.0.1:8001")
        .with_zone("eu-1")
        .with_version("1.2.3")
        .with_weight(7)
        .with_tag("canary")
}

fn u2() -> Instance {
    Instance::new("user", "u-2", "http://127.0.0.1:8002")
}

/// Three services: `user` (u-1 serving, u-2 draining, both under a lease),
/// `billing` (serving) and `legacy` (a Go naming value with no lease).
fn populate(lib: &Lib) -> Registrar {
    let registrar = lib.registrar();
    lib.rt.block_on(async {
        registrar.register(u1()).await.unwrap();
        registrar.register(u2()).await.unwrap();
        registrar.set_status(u2(), Status::Draining).await.unwrap();
        registrar
            .register(Instance::new("billing", "b-1", "10.0.0.1:9000"))
            .await
            .unwrap();
    });
    lib.put_raw(
        "/muster/services/legacy/l-1",
        r#"{"Op":0,"Addr":"10.0.0.9:50051"}"#,
    );
    registrar
}

fn stdout_ok(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        text(&out.stderr),
        text(&out.stdout)
    );
    text(&out.stdout)
}

/// The row of a table whose first cell is `first`, split on whitespace.
fn row(table: &str, first: &str) -> Vec<String> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        .find(|cells| cells.first().is_some_and(|c| c == first))
        .unwrap_or_else(|| panic!("no row {first} in:\n{table}"))
}

/// A failed command's stderr: exactly one line, `muster: ...`.
fn one_line_error(out: &std::process::Output, what: &str) -> String {
    assert!(!out.status.success(), "{what} should fail");
    let err = text(&out.stderr);
    assert_eq!(
        err.lines().count(),
        1,
        "{what}: one line on stderr: {err:?}"
    );
    assert!(err.starts_with("muster: "), "{what}: {err:?}");
    assert!(!err.contains("panicked"), "{what}: {err:?}");
    err
}

fn ls_and_get_show_serving_and_draining(backend: &Backend) {
    let lib = Lib::new(backend);
    let _registrar = populate(&lib);

    let table = stdout_ok(&backend.run(&["ls"]), "ls");
    assert_eq!(
        row(&table, "SERVICE"),
        ["SERVICE", "INSTANCES", "SERVING", "DRAINING"]
    );
    assert_eq!(row(&table, "user"), ["user", "2", "1", "1"]);
    assert_eq!(row(&table, "billing"), ["billing", "1", "1", "0"]);
    assert_eq!(row(&table, "legacy"), ["legacy", "1", "1", "0"]);

    let json = backend.json(&["ls"]);
    assert!(json["revision"].as_i64().unwrap() > 0, "{json}");
    let services = json["services"].as_array().unwrap();
    let names: Vec<_> = services
        .iter()
        .map(|s| s["service"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["billing", "legacy", "user"]);
    assert_eq!(services[2]["instances"], 2);
    assert_eq!(services[2]["serving"], 1);
    assert_eq!(services[2]["draining"], 1);

    let table = stdout_ok(&backend.run(&["get", "user"]), "get user");
    assert_eq!(
        row(&table, "ID"),
        [
            "ID", "ADDRESS", "ZONE", "VERSION", "WEIGHT", "STATUS", "LEASE", "AGE"
        ]
    );
    let r1 = row(&table, "u-1");
    assert_eq!(
        r1[..6],
        [
            "u-1",
            "http://127.0.0.1:8001",
            "eu-1",
            "1.2.3",
            "7",
            "serving"
        ]
    );
    assert!(r1[6].ends_with('s'), "lease time left: {r1:?}");
    assert!(r1[7].ends_with('s'), "age: {r1:?}");
    let r2 = row(&table, "u-2");
    assert_eq!(
        r2[..6],
        ["u-2", "http://127.0.0.1:8002", "-", "-", "100", "draining"]
    );

    let legacy = stdout_ok(&backend.run(&["get", "legacy"]), "get legacy");
    assert_eq!(
        row(&legacy, "l-1"),
        [
            "l-1",
            "10.0.0.9:50051",
            "-",
            "-",
            "100",
            "serving",
            "-",
            "-"
        ]
    );

    let json = backend.json(&["get", "user"]);
    assert_eq!(json["service"], "user");
    let instances = json["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2);
    let (i1, i2) = (&instances[0], &instances[1]);
    assert_eq!(i1["id"], "u-1");
    assert_eq!(i1["addr"], "http://127.0.0.1:8001");
    assert_eq!(i1["zone"], "eu-1");
    assert_eq!(i1["version"], "1.2.3");
    assert_eq!(i1["weight"], 7);
    assert_eq!(i1["status"], "serving");
    assert_eq!(i1["tags"], serde_json::json!(["canary"]));
    assert!(i1["lease"].as_i64().unwrap() != 0);
    assert!(i1["lease_left_secs"].as_u64().unwrap() <= 10, "{i1}");
    assert!(i1["registered_at"].as_str().unwrap().ends_with('Z'), "{i1}");
    assert!(i1["age_secs"].as_u64().unwrap() < 600, "{i1}");
    assert_eq!(i2["id"], "u-2");
    assert_eq!(i2["status"], "draining");

    let json = backend.json(&["get", "legacy"]);
    let l1 = &json["instances"][0];
    assert_eq!(l1["lease"], 0);
    assert!(l1["lease_left_secs"].is_null(), "{l1}");
    assert!(l1["registered_at"].is_null(), "{l1}");
}

fn get_of_an_unknown_service_fails(backend: &Backend) {
    let out = backend.run(&["get", "nope"]);
    let err = one_line_error(&out, "get nope");
    assert_eq!(err, "muster: no service named nope\n");
    // `user` must not match `user_admin`.
    let lib = Lib::new(backend);
    lib.put_raw(
        "/muster/services/user_admin/a-1",
        r#"{"schema":1,"addr":"a:1"}"#,
    );
    one_line_error(&backend.run(&["get", "user"]), "get user");
    let out = backend.run(&["get", "nope", "-o", "json"]);
    one_line_error(&out, "get nope -o json");
    assert!(out.stdout.is_empty());
}

fn watch_prints_registration_drain_and_removal(backend: &Backend) {
    let lib = Lib::new(backend);
    let mut table = KillOnDrop(
        backend
            .muster()
            .args(["watch", "user"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut json = KillOnDrop(
        backend
            .muster()
            .args(["watch", "-o", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let table_lines = Lines::stdout(&mut table.0);
    let json_lines = Lines::stdout(&mut json.0);
    // Changes made after the "watching" line are seen.
    Lines::stderr(&mut table.0).find("watching", |l| l.contains("watching"));
    Lines::stderr(&mut json.0).find("watching", |l| l.contains("watching"));

    let registrar = lib.registrar();
    lib.rt.block_on(async {
        registrar
            .register(Instance::new("other", "o-1", "10.0.0.2:1"))
            .await
            .unwrap();
        registrar.register(u1()).await.unwrap();
        registrar.set_status(u1(), Status::Draining).await.unwrap();
        registrar.deregister("user", "u-1").await.unwrap();
    });

    let mut seen = Vec::new();
    for kind in ["registered", "draining", "deregistered"] {
        let line = table_lines.find(kind, |l| {
            seen.push(l.to_string());
            l.split_whitespace().nth(1) == Some(kind)
        });
        let cells: Vec<_> = line.split_whitespace().collect();
        assert_eq!(
            cells[1..],
            [kind, "user", "u-1", "http://127.0.0.1:8001"],
            "{line}"
        );
        assert!(
            cells[0].ends_with('Z') && cells[0].contains('T'),
            "timestamp: {line}"
        );
    }
    assert!(
        seen.iter().all(|l| !l.contains("other")),
        "`watch user` shows only user: {seen:?}"
    );

    let other = json_lines.find("other registered", |l| l.contains("\"o-1\""));
    let other: serde_json::Value = serde_json::from_str(&other).unwrap();
    assert_eq!(other["kind"], "registered");
    assert_eq!(other["service"], "other");
    for kind in ["registered", "draining", "deregistered"] {
        let line = json_lines.find(kind, |l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("one JSON object per line");
            v["id"] == "u-1" && v["kind"] == kind
        });
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["service"], "user");
        assert_eq!(v["addr"], "http://127.0.0.1:8001");
        assert!(v["revision"].as_i64().unwrap() > 0);
        assert!(v["at"].as_str().unwrap().ends_with('Z'));
    }

    // Ctrl-C ends it promptly and cleanly.
    for child in [&mut table, &mut json] {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.0.id() as i32),
            nix::sys::signal::SIGINT,
        )
        .unwrap();
        let status = wait_for("watch to exit on SIGINT", || child.0.try_wait().unwrap());
        assert!(status.success(), "{status}");
    }
}

fn deregister_removes_and_fails_on_a_missing_instance(backend: &Backend) {
    let lib = Lib::new(backend);
    let _registrar = populate(&lib);

    let out = stdout_ok(&backend.run(&["deregister", "legacy", "l-1"]), "deregister");
    assert_eq!(out, "deregistered instance l-1 of service legacy\n");
    one_line_error(
        &backend.run(&["get", "legacy"]),
        "get legacy after deregister",
    );

    let err = one_line_error(&backend.run(&["deregister", "legacy", "l-1"]), "again");
    assert_eq!(err, "muster: no instance l-1 of service legacy\n");
    let err = one_line_error(&backend.run(&["deregister", "user", "u-9"]), "u-9");
    assert_eq!(err, "muster: no instance u-9 of service user\n");

    // A key under a live lease whose process is gone (no registrar to put
    // it back): deleted, the rest remain.
    let lease = lib.rt.block_on(lib.etcd.lease_grant(60)).unwrap().id;
    lib.rt
        .block_on(lib.etcd.put(pb::PutRequest {
            key: "/muster/services/billing/b-2".into(),
            value: r#"{"schema":1,"addr":"10.0.0.1:9001"}"#.into(),
            lease,
            ..Default::default()
        }))
        .unwrap();
    let json = backend.json(&["deregister", "billing", "b-2"]);
    assert_eq!(json["service"], "billing");
    assert_eq!(json["lease"], lease);
    assert_eq!(backend.status("billing", "b-2"), None);
    assert_eq!(backend.status("billing", "b-1").as_deref(), Some("serving"));
    assert_eq!(backend.status("user", "u-1").as_deref(), Some("serving"));
}

/// `--layout`: the Go registries' entries listed and shown, each layout
/// under its library's default prefix, `auto` under any prefix, a value
/// no layout reads skipped; deregister in a layout.
fn ls_get_and_deregister_in_go_layouts(backend: &Backend) {
    let lib = Lib::new(backend);
    lib.put_raw("user.rpc/101", "10.0.0.1:8080");
    lib.put_raw(
        "/microservices/helloworld/6f2b",
        r#"{"id":"6f2b","name":"helloworld","version":"v1","metadata":{"zone":"sh"},"endpoints":["grpc://10.0.0.5:9000"]}"#,
    );
    lib.put_raw("/fleet/user/a", "10.0.0.2:8080");
    lib.put_raw(
        "/fleet/user/b",
        r#"{"Op":0,"Addr":"10.0.0.3:8080","Metadata":null}"#,
    );
    lib.put_raw("/fleet/user/c", "not an instance");

    let gz = backend.json(&["--layout", "go-zero", "get", "user.rpc"]);
    assert_eq!(gz["instances"][0]["addr"], "10.0.0.1:8080", "{gz}");
    assert_eq!(gz["instances"][0]["id"], "101", "{gz}");
    let kratos = stdout_ok(&backend.run(&["--layout", "kratos", "ls"]), "ls kratos");
    assert_eq!(row(&kratos, "helloworld"), ["helloworld", "1", "1", "0"]);
    let hw = backend.json(&["--layout", "kratos", "get", "helloworld"]);
    assert_eq!(
        (
            hw["instances"][0]["addr"].as_str(),
            hw["instances"][0]["zone"].as_str()
        ),
        (Some("grpc://10.0.0.5:9000"), Some("sh")),
        "{hw}"
    );
    let auto = backend.json(&["--layout", "auto", "--prefix", "/fleet", "get", "user"]);
    let mut addrs: Vec<&str> = auto["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["addr"].as_str().unwrap())
        .collect();
    addrs.sort();
    assert_eq!(addrs, ["10.0.0.2:8080", "10.0.0.3:8080"], "{auto}");
    stdout_ok(
        &backend.run(&["--layout", "go-zero", "deregister", "user.rpc", "101"]),
        "deregister go-zero",
    );
    let out = backend.run(&["--layout", "go-zero", "get", "user.rpc"]);
    assert!(!out.status.success(), "gone after deregister");
    let out = backend.run(&["--layout", "consul", "ls"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("etcd-naming"),
        "{}",
        text(&out.stderr)
    );
}

on_both!(
    ls_and_get_show_serving_and_draining,
    get_of_an_unknown_service_fails,
    watch_prints_registration_drain_and_removal,
    deregister_removes_and_fails_on_a_missing_instance,
    ls_get_and_deregister_in_go_layouts,
);

/// `muster ARGS` pointed at `endpoint`, with the default log settings.
fn muster_at(endpoint: &str, args: &[&str]) -> (std::process::Output, Duration) {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_muster"))
        .args(args)
        .env("MUSTER_ENDPOINTS", endpoint)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out, start.elapsed())
}

#[test]
fn invalid_names_are_rejected_with_the_library_message() {
    // No registry at all: names are checked before connecting.
    let endpoint = format!("127.0.0.1:{}", common::free_port());
    for (args, message) in [
        (
            &["get", "bad/name"][..],
            "invalid service name: \"bad/name\" contains '/'",
        ),
        (&["get", ""], "invalid service name: must not be empty"),
        (&["watch", "sp ace"], "invalid service name"),
        (&["deregister", "user", "a b"], "invalid instance id"),
        (
            &["deregister", "..", "x"],
            "invalid service name: \"..\" is reserved",
        ),
        (&["register", "user", "u/1", "h:1"], "invalid instance id"),
        (
            &["register", "user", "u-1", ""],
            "invalid address: must not be empty",
        ),
        (
            &["register", "user", "u-1", "h:1", "--weight", "0"],
            "invalid weight",
        ),
    ] {
        let (out, _) = muster_at(&endpoint, args);
        let err = one_line_error(&out, &format!("{args:?}"));
        assert!(err.contains(message), "{args:?}: {err}");
    }
    for args in [
        &["register", "user", "u-1", "h:1", "--check", "https://h:1/"][..],
        &["register", "user", "u-1", "h:1", "--check", "tcp://h"],
        &["register", "user", "u-1", "h:1", "--failures", "2"],
        &["register", "user", "u-1", "h:1", "--meta", "novalue"],
        &["get"],
        &["completions", "powershell"],
    ] {
        let (out, _) = muster_at(&endpoint, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: usage error");
        assert!(!text(&out.stderr).contains("panicked"), "{args:?}");
    }
}

#[test]
fn an_unreachable_registry_is_one_line_naming_the_endpoints() {
    let port = common::free_port();
    let endpoint = format!("127.0.0.1:{port}");
    for args in [
        &["ls"][..],
        &["get", "user"],
        &["watch"],
        &["deregister", "user", "u-1"],
        &["register", "user", "u-1", "h:1"],
        &["register", "user", "u-1", "h:1", "--", "true"],
    ] {
        let (out, took) = muster_at(&endpoint, args);
        let err = one_line_error(&out, &format!("{args:?}"));
        assert!(
            err.starts_with(&format!(
                "muster: cannot reach the registry at http://{endpoint}"
            )),
            "{args:?}: {err}"
        );
        assert!(took < Duration::from_secs(10), "{args:?} took {took:?}");
    }
}

#[test]
fn completions_print_a_script() {
    for (shell, marker) in [
        ("bash", "_muster()"),
        ("zsh", "#compdef muster"),
        ("fish", "complete -c muster"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_muster"))
            .args(["completions", shell])
            .output()
            .unwrap();
        let script = stdout_ok(&out, shell);
        assert!(
            script.contains(marker),
            "{shell}: {}",
            &script[..script.len().min(300)]
        );
        for sub in ["register", "deregister", "watch"] {
            assert!(script.contains(sub), "{shell} completes {sub}");
        }
    }
}
