//! The CLI's client TLS flags (`--cacert`, `--cert`, `--key`,
//! `--insecure-skip-tls-verify`, and `MUSTER_CACERT`/`MUSTER_CERT`/
//! `MUSTER_KEY`) against a real etcd with `--client-cert-auth`: the
//! commands work with a client certificate and say what is missing
//! without one.

use std::process::{Command, Output};

use muster_testkit::{EtcdNode, TestPki};

use crate::common::{KillOnDrop, Lines, text, wait_for};

fn muster(endpoint: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_muster"));
    cmd.env("MUSTER_ENDPOINTS", endpoint)
        .env_remove("MUSTER_CACERT")
        .env_remove("MUSTER_CERT")
        .env_remove("MUSTER_KEY")
        .env_remove("MUSTER_USER")
        .args(args)
        // Long: a refusal that were not reported at once would end as a
        // timeout, not as the refusal the assertions look for.
        .args(["--timeout", "60s"]);
    cmd
}

fn run(mut cmd: Command) -> Output {
    cmd.output().expect("muster runs")
}

fn path(p: std::path::PathBuf) -> String {
    p.display().to_string()
}

#[test]
fn commands_work_over_mutual_tls_and_refusals_say_what_to_fix() {
    let Some(()) = muster_testkit::require_etcd() else {
        return;
    };
    let pki = TestPki::generate().unwrap();
    let etcd = EtcdNode::start_tls(&pki, true).unwrap();
    let https = etcd.endpoint();
    let (ca, cert, key) = (
        path(pki.ca()),
        path(pki.client_cert()),
        path(pki.client_key()),
    );

    // Flags, like etcdctl's.
    let out = run(muster(
        &https,
        &["ls", "--cacert", &ca, "--cert", &cert, "--key", &key],
    ));
    assert!(out.status.success(), "ls over mTLS: {}", text(&out.stderr));

    // The same from the environment, with a bare host:port.
    let bare = https.trim_start_matches("https://").to_string();
    let mut cmd = muster(&bare, &["get", "nothing-here", "-o", "json"]);
    cmd.env("MUSTER_CACERT", &ca)
        .env("MUSTER_CERT", &cert)
        .env("MUSTER_KEY", &key);
    let out = run(cmd);
    assert!(
        text(&out.stderr).contains("no service named"),
        "get reached etcd over TLS: {}",
        text(&out.stderr)
    );

    // Encrypted without verifying the server.
    let out = run(muster(
        &https,
        &[
            "ls",
            "--insecure-skip-tls-verify",
            "--cert",
            &cert,
            "--key",
            &key,
        ],
    ));
    assert!(out.status.success(), "{}", text(&out.stderr));

    // No client certificate: refused at once, saying what to pass.
    let out = run(muster(&https, &["ls", "--cacert", &ca]));
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("requires a client certificate") && err.contains("--cert"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // No CA: the system's roots do not know the test CA.
    let out = run(muster(&https, &["ls", "--cert", &cert, "--key", &key]));
    let err = text(&out.stderr);
    assert!(
        err.contains("not signed by") && err.contains("--cacert"),
        "{err}"
    );

    // --cert without --key is a usage error.
    let out = run(muster(&https, &["ls", "--cacert", &ca, "--cert", &cert]));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--key"), "{}", text(&out.stderr));

    // Plaintext to the TLS port points at https.
    let http = https.replacen("https://", "http://", 1);
    let out = run(muster(&http, &["ls"]));
    let err = text(&out.stderr);
    assert!(err.contains("https://"), "{err}");
    assert!(!err.contains("timed out"), "{err}");

    // An unreadable CA bundle names the file.
    let out = run(muster(&https, &["ls", "--cacert", "/nonexistent/ca.pem"]));
    assert!(
        text(&out.stderr).contains("/nonexistent/ca.pem"),
        "{}",
        text(&out.stderr)
    );

    // muster bench over mTLS.
    let out = run(muster(
        &https,
        &[
            "bench",
            "--cacert",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "put",
            "--clients",
            "2",
            "--duration",
            "200ms",
            "--keys",
            "50",
            "-o",
            "json",
        ],
    ));
    assert!(
        out.status.success(),
        "bench over mTLS: {}",
        text(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["ops"].as_i64().unwrap_or(0) > 0 || report["requests"].as_i64().unwrap_or(0) > 0,
        "{report}"
    );
}

/// `muster certs` writes what a real etcd with `--client-cert-auth` and the
/// CLI accept; it does not overwrite without `--force`.
#[test]
fn muster_certs_are_accepted_by_etcd_and_the_cli() {
    let Some(()) = muster_testkit::require_etcd() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let run_certs = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_muster"))
            .args(["certs", "--dir"])
            .arg(&certs)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run_certs(&["--host", "registry.internal"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("--cert-file"),
        "{}",
        text(&out.stdout)
    );
    let again = run_certs(&[]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("--force"),
        "{}",
        text(&again.stderr)
    );
    assert!(run_certs(&["--force"]).status.success());

    let file = |name: &str| certs.join(name);
    let tls = muster_testkit::EtcdTls {
        cert_file: file("server.pem"),
        key_file: file("server-key.pem"),
        trusted_ca_file: Some(file("ca.pem")),
        client_cert_auth: true,
        etcdctl_cacert: file("ca.pem"),
        etcdctl_client: Some((file("client.pem"), file("client-key.pem"))),
    };
    let etcd = EtcdNode::start_with(muster_testkit::EtcdOptions {
        tls: Some(tls),
        ..Default::default()
    })
    .unwrap();
    let out = run(muster(
        &etcd.endpoint(),
        &[
            "ls",
            "--cacert",
            &path(file("ca.pem")),
            "--cert",
            &path(file("client.pem")),
            "--key",
            &path(file("client-key.pem")),
        ],
    ));
    assert!(out.status.success(), "{}", text(&out.stderr));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(file("client-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "keys are private to their owner: {mode:o}");
}

/// The long-running commands over mutual TLS from the environment:
/// `register` keeps an instance alive, `watch` streams it, `gateway`
/// routes to it, `deregister` removes it.
#[test]
fn register_watch_gateway_and_deregister_over_mutual_tls() {
    let Some(()) = muster_testkit::require_etcd() else {
        return;
    };
    let pki = TestPki::generate().unwrap();
    let etcd = EtcdNode::start_tls(&pki, true).unwrap();
    let with_tls = |args: &[&str]| {
        let mut cmd = muster(&etcd.endpoint(), args);
        cmd.env("MUSTER_CACERT", pki.ca())
            .env("MUSTER_CERT", pki.client_cert())
            .env("MUSTER_KEY", pki.client_key())
            .stdin(std::process::Stdio::null());
        cmd
    };
    // An upstream for the gateway to reach: answers any request with 200.
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut conn in upstream.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
            );
        }
    });

    let mut watch = with_tls(&["watch", "-o", "json"]);
    watch
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut watch = KillOnDrop(watch.spawn().unwrap());
    let events = Lines::stdout(&mut watch.0);
    // Changes made after the "watching" line are seen.
    Lines::stderr(&mut watch.0).find("watching", |l| l.contains("watching"));

    let mut register = with_tls(&[
        "register",
        "user",
        "u-1",
        &format!("http://{upstream_addr}"),
        "--ttl",
        "2s",
    ]);
    register
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _register = KillOnDrop(register.spawn().unwrap());
    events.find("the registration, watched over TLS", |l| l.contains("u-1"));

    let port = crate::common::free_port();
    let mut gateway = with_tls(&[
        "gateway",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--route",
        "/=user",
    ]);
    gateway
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _gateway = KillOnDrop(gateway.spawn().unwrap());
    wait_for(
        "the gateway routes to the instance it discovered over TLS",
        || muster_testkit::http_get(port, "/").filter(|body| body.contains("hello")),
    );

    let out = run(with_tls(&["deregister", "user", "u-1"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
}
