//! `muster bench` as a real process against an in-memory `muster serve`:
//! every workload runs and reports; a dead endpoint is one readable error
//! line and a non-zero exit, not a panic.

use crate::common;

use std::ffi::OsStr;
use std::process::{Command, Output};

use common::{Serve, free_port};
use serde_json::Value;

fn serve(port: u16) -> Serve {
    common::serve(port, &[OsStr::new("--in-memory")])
}

fn bench(port: u16, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_muster"))
        .args(["bench", "--endpoints", &format!("127.0.0.1:{port}")])
        .args(args)
        .output()
        .expect("muster bench runs")
}

/// Runs a workload with `-o json` and returns its one-line report.
fn json(port: u16, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = bench(port, &all);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "one JSON line: {stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The integer under `name` in a report.
fn field(report: &Value, name: &str) -> i64 {
    report[name]
        .as_i64()
        .unwrap_or_else(|| panic!("no integer {name} in {report}"))
}

#[test]
fn every_workload_runs_against_muster_serve() {
    let port = free_port();
    let _server = serve(port);
    let small = ["--clients", "4", "--duration", "300ms", "--keys", "300"];

    let report = json(port, &["populate", "--keys", "300", "--clients", "4"]);
    assert_eq!(field(&report, "keys"), 300);
    assert_eq!(field(&report, "txns"), 3);

    for workload in ["put", "range", "txn"] {
        let mut args = vec![workload];
        args.extend(small);
        let report = json(port, &args);
        assert!(field(&report, "ops") > 0, "{report}");
        assert_eq!(field(&report, "errors"), 0, "{report}");
        assert!(report["seed"].is_u64(), "the seed is reported: {report}");
    }
    let report = json(port, &["range", "--keys", "300", "--duration", "200ms"]);
    assert_eq!(field(&report, "misses"), 0, "every key was populated");
    let report = json(port, &["txn", "--keys", "300", "--duration", "200ms"]);
    assert_eq!(
        field(&report, "compare_failed"),
        0,
        "versions are read first"
    );

    let keepalive = [
        "keepalive",
        "--leases",
        "8",
        "--clients",
        "4",
        "--duration",
        "300ms",
    ];
    let report = json(port, &keepalive);
    assert!(field(&report, "ops") > 0, "{report}");
    let report = json(port, &[&keepalive[..], &["--rate", "200"]].concat());
    assert!(field(&report, "ops") > 20, "{report}");

    let report = json(
        port,
        &[
            "watch",
            "--watchers",
            "20",
            "--watch-streams",
            "3",
            "--puts",
            "5",
            "--put-interval",
            "5ms",
        ],
    );
    assert_eq!(field(&report, "notifications"), 100, "{report}");
    assert_eq!(field(&report, "expected"), 100, "{report}");

    let report = json(port, &["ready", "--ready-timeout", "5s"]);
    assert_eq!(report["found"], true, "{report}");

    // Text output: summary lines, no JSON.
    let out = bench(
        port,
        &[
            "put",
            "--duration",
            "100ms",
            "--clients",
            "2",
            "--seed",
            "7",
        ],
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("put: "), "{text}");
    assert!(text.contains("ops/s") && text.contains("p99"), "{text}");
    assert!(
        text.contains("put: seed 7 (repeat with --seed 7)"),
        "{text}"
    );
}

#[test]
fn a_dead_endpoint_is_one_readable_error() {
    let port = free_port(); // nothing listens there
    let out = bench(port, &["put", "--duration", "1s"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot connect") && stderr.contains("refused"),
        "{stderr}"
    );

    let out = bench(port, &["ready", "--ready-timeout", "200ms"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no successful Range"), "{stderr}");

    let out = bench(port, &["put", "--duration", "10"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no unit"));
}

/// Runs etcdctl against `endpoint`; panics unless it succeeds.
fn etcdctl(endpoint: &str, args: &[&str]) {
    muster_testkit::etcdctl_ok(endpoint, args, "");
}

/// `muster bench` with `--user` against a registry with auth enabled
/// (set up with etcdctl, as `bench-compare.sh AUTH=1` does): it logs in
/// and measures; a wrong password, or none, fails before measuring, in
/// the server's words.
fn bench_with_auth(backend: muster_testkit::Backend) {
    let Some(registry) = muster_testkit::registry(backend) else {
        return;
    };
    let endpoint = registry.endpoint();
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["role", "add", "bench"],
        &[
            "role",
            "grant-permission",
            "bench",
            "--prefix=true",
            "readwrite",
            "bench/",
        ],
        &["user", "add", "bench:benchpw"],
        &["user", "grant-role", "bench", "bench"],
        &["auth", "enable"],
    ] {
        etcdctl(&endpoint, args);
    }
    let port = registry.client_port();
    let user = ["--user", "bench:benchpw"];

    let put = [
        "put",
        "--clients",
        "4",
        "--duration",
        "500ms",
        "--keys",
        "300",
    ];
    let report = json(port, &[&user[..], &put].concat());
    assert!(field(&report, "ops") > 0, "{report}");
    assert_eq!(field(&report, "errors"), 0, "{report}");
    assert!(report.get("relogins").is_none(), "{report}");
    // The watched key and the restart probe are in the keyspace too.
    let watch = [
        "watch",
        "--watchers",
        "10",
        "--puts",
        "3",
        "--put-interval",
        "5ms",
    ];
    let report = json(port, &[&user[..], &watch].concat());
    assert_eq!(field(&report, "notifications"), 30, "{report}");
    let report = json(
        port,
        &[&user[..], &["ready", "--ready-timeout", "5s"]].concat(),
    );
    assert!(report["found"].is_boolean(), "{report}");

    for workload in [&put[..], &["ready", "--ready-timeout", "20s"]] {
        let out = bench(port, &[&["--user", "bench:wrong"][..], workload].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{workload:?} {stderr}");
        assert!(
            stderr.contains("cannot log in") && stderr.contains("authentication failed"),
            "{workload:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "no report: nothing was measured");
    }
    let out = bench(port, &put);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--user name:password"), "{stderr}");
    assert!(out.stdout.is_empty(), "no report: nothing was measured");
}

#[test]
fn bench_logs_in_to_the_embedded_registry() {
    bench_with_auth(muster_testkit::Backend::Embedded);
}

#[test]
fn bench_logs_in_to_etcd() {
    bench_with_auth(muster_testkit::Backend::Etcd);
}

/// `bench propagation --caller-processes`: the callers live in child
/// processes (this binary run again with the hidden `--caller-child`),
/// each printing its sightings on the wall clock; every change reaches
/// every caller, and a sweep writes one report per value.
fn propagation_callers_in_child_processes(backend: &common::Backend) {
    let out = backend.run(&[
        "bench",
        "propagation",
        "--callers",
        "2,5",
        "--rounds",
        "3",
        "--caller-processes",
        "2",
        "-o",
        "json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    for (report, callers) in rows.iter().zip([2, 5]) {
        assert_eq!(field(report, "callers"), callers, "{report}");
        assert_eq!(field(report, "caller_processes"), 2, "{report}");
        assert_eq!(report["clock"], "wall", "{report}");
        assert_eq!(field(report, "expected"), callers * 6, "{report}");
        assert_eq!(field(report, "sightings"), callers * 6, "{report}");
        assert_eq!(
            field(&report["last_caller_latency_ms"], "samples"),
            6,
            "{report}"
        );
        assert!(
            report["last_caller_latency_ms"]["p99"].is_number(),
            "{report}"
        );
        assert!(report.get("failure").is_none(), "{report}");
    }
}

crate::on_both!(propagation_callers_in_child_processes);

/// Runs `muster bench robustness ARGS --out DIR -o json`, asserting that it
/// succeeds with a clean verdict; its JSON report.
fn robustness_report(args: &[&str], dir: &std::path::Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_muster"))
        .args(["bench", "robustness"])
        .args(args)
        .arg("--out")
        .arg(dir)
        .args(["-o", "json"])
        .output()
        .expect("muster bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(
        report["verdict"], "linearizable: yes, watch: ok, leases: ok",
        "{report}"
    );
    report
}

/// `muster bench robustness` starts its own registry (this binary's serve,
/// or etcd), breaks it, checks it, says so on one line, and exits non-zero
/// on a malformed fault list; everything stays in the directory it names.
fn robustness_runs_and_leaves_its_evidence(registry: &str) {
    if registry == "etcd" && !std::path::Path::new("/usr/bin/etcd").exists() {
        eprintln!("skipping: no /usr/bin/etcd");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let report = robustness_report(
        &[
            "--registry",
            registry,
            "--etcd-binary",
            "/usr/bin/etcd",
            "--duration",
            "6s",
            // Faults that leave no write's outcome unknown, so that the
            // check stays short on a loaded machine: the CLI is what is
            // tested here; kill and cut are in muster-robustness's own test.
            "--fault-every",
            "1s",
            "--faults",
            "compact,drop-watch",
            "--seed",
            "5",
            "--traffic-rate",
            "500",
        ],
        dir.path(),
    );
    assert_eq!(report["seed"], 5, "{report}");
    assert!(field(&report, "operations") > 100, "{report}");
    assert!(
        !report["faults"].as_array().unwrap().is_empty(),
        "no fault injected: {report}"
    );
    for file in ["history.json", "watches.json", "report.json"] {
        assert!(dir.path().join(file).exists(), "{file} missing");
    }

    let bad = Command::new(env!("CARGO_BIN_EXE_muster"))
        .args(["bench", "robustness", "--faults", "kill,explode"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("unknown fault \"explode\""), "{err}");
}

/// The suite also drives the fault injection users get: `muster serve
/// --faults`, counted from the registry's own /metrics; a fault the model
/// cannot judge, or a registry without `--faults`, is refused.
#[test]
fn robustness_with_the_registrys_own_faults() {
    let dir = tempfile::tempdir().unwrap();
    let report = robustness_report(
        &[
            "--duration",
            "6s",
            "--fault-every",
            "2s",
            "--faults",
            "compact",
            "--serve-faults",
            "drop-watch=2/s,latency=1ms±1ms,unavailable=100ms/2s,seed=3",
            "--seed",
            "6",
            "--traffic-rate",
            "500",
        ],
        dir.path(),
    );
    let injected = &report["serve_faults_injected"];
    for fault in ["drop-watch", "latency"] {
        assert!(
            injected[fault].as_u64().is_some_and(|n| n >= 1),
            "{fault} never acted: {report}"
        );
    }

    for (args, says) in [
        (
            vec!["--serve-faults", "lease-expire-early=5%"],
            "lease-expire-early cannot be checked",
        ),
        (
            vec!["--registry", "etcd", "--serve-faults", "latency=1ms"],
            "etcd has none",
        ),
    ] {
        let refused = Command::new(env!("CARGO_BIN_EXE_muster"))
            .args(["bench", "robustness", "--duration", "1s"])
            .args(args)
            .arg("--out")
            .arg(dir.path().join("refused"))
            .output()
            .unwrap();
        assert!(!refused.status.success());
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(err.contains(says), "{err}");
    }
}

#[test]
fn robustness_on_muster_serve() {
    robustness_runs_and_leaves_its_evidence("muster");
}

#[test]
fn robustness_on_etcd() {
    robustness_runs_and_leaves_its_evidence("etcd");
}
