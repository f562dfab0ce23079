//! `muster serve` over TLS and mutual TLS, as etcd's clients and operators
//! use it: etcdctl with `--cacert/--cert/--key`, curl on /health and
//! /metrics, the dashboard inside `muster serve`, `muster dashboard
//! --tls-cert`, and a certificate rotated under an open watch.

use crate::common;

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{DEADLINE, KillOnDrop, Lines, free_port, text, wait_for};
use muster_proto as pb;
use muster_testkit::TestPki;
use muster_tls::{ClientTls, Pem};
use pb::kv_client::KvClient;
use pb::watch_client::WatchClient;
use tonic::codegen::tokio_stream::{self, StreamExt};

/// A `muster serve` child with TLS flags, killed when dropped.
struct TlsServe {
    _child: KillOnDrop,
    /// Its log, drained (the child is never blocked on a full pipe).
    _log: Lines,
    /// The gRPC endpoint from the ready line.
    endpoint: String,
    /// The HTTP(S) URL from the ready line.
    http: String,
    /// The gRPC port.
    port: u16,
}

impl TlsServe {
    fn http_port(&self) -> u16 {
        self.http.rsplit(':').next().unwrap().parse().unwrap()
    }
}

/// `--cert-file --key-file --trusted-ca-file --client-cert-auth` of `pki`.
fn mtls_flags(pki: &TestPki) -> Vec<OsString> {
    vec![
        "--cert-file".into(),
        pki.server_cert().into(),
        "--key-file".into(),
        pki.server_key().into(),
        "--trusted-ca-file".into(),
        pki.ca().into(),
        "--client-cert-auth".into(),
    ]
}

/// `muster serve --in-memory` on free ports with `flags`, as a command.
fn serve_command(port: u16, flags: &[OsString]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_muster"));
    cmd.args([
        "serve",
        "--in-memory",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--http-listen",
        "127.0.0.1:0",
        "--tls-reload-interval",
        "100ms",
    ])
    .args(flags)
    .env("RUST_LOG", "info")
    .env_remove("MUSTER_ENDPOINTS")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    cmd
}

/// Starts `muster serve` with `flags` and waits for its ready line.
fn serve(flags: &[OsString]) -> TlsServe {
    let port = free_port();
    let mut child = serve_command(port, flags)
        .spawn()
        .expect("muster serve starts");
    let lines = Lines::stderr(&mut child);
    let child = KillOnDrop(child);
    let ready = lines.find("the ready line", |l| l.contains("muster serve ready"));
    let field = |name: &str| {
        ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {ready}"))
            .to_string()
    };
    TlsServe {
        endpoint: field("endpoint="),
        http: field("http="),
        _child: child,
        _log: lines,
        port,
    }
}

/// `etcdctl --endpoints ENDPOINT --cacert CA [--cert --key of client] ARGS`.
fn etcdctl(
    endpoint: &str,
    pki: &TestPki,
    client: Option<(&Path, &Path)>,
    args: &[&str],
) -> Command {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .env_remove("ETCDCTL_ENDPOINTS")
        .env_remove("ETCDCTL_CACERT")
        .env_remove("ETCDCTL_CERT")
        .env_remove("ETCDCTL_KEY")
        .args([
            "--endpoints",
            endpoint,
            "--dial-timeout",
            "3s",
            "--command-timeout",
            "10s",
        ])
        .arg("--cacert")
        .arg(pki.ca());
    if let Some((cert, key)) = client {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    cmd.args(args).stdin(Stdio::null());
    cmd
}

fn run(mut cmd: Command) -> Output {
    cmd.output().expect("the command runs")
}

/// `curl -sS --cacert CA [--cert --key] URL`: the body, or the failure.
fn curl(url: &str, ca: &Path, client: Option<(&Path, &Path)>) -> Result<String, String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail", "--max-time", "10", "--cacert"])
        .arg(ca);
    if let Some((cert, key)) = client {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    cmd.arg(url);
    let out = run(cmd);
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(text(&out.stderr))
    }
}

fn have_etcdctl() -> bool {
    muster_testkit::require_tool(
        "etcdctl",
        "version",
        "the etcdctl test",
        "apt-get install etcd-client",
    )
}

fn have_curl() -> bool {
    muster_testkit::require_tool("curl", "--version", "the curl test", "apt-get install curl")
}

#[test]
fn etcdctl_put_get_watch_over_mutual_tls() {
    if !have_etcdctl() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let serve = serve(&mtls_flags(&pki));
    assert_eq!(serve.endpoint, format!("https://127.0.0.1:{}", serve.port));
    assert!(
        serve.http.starts_with("https://127.0.0.1:"),
        "{}",
        serve.http
    );
    let (cert, key) = (pki.client_cert(), pki.client_key());
    let client = Some((cert.as_path(), key.as_path()));

    let put = run(etcdctl(
        &serve.endpoint,
        &pki,
        client,
        &["put", "/tls/a", "one"],
    ));
    assert!(put.status.success(), "{}", text(&put.stderr));
    assert_eq!(text(&put.stdout).trim(), "OK");
    let get = run(etcdctl(&serve.endpoint, &pki, client, &["get", "/tls/a"]));
    assert!(get.status.success(), "{}", text(&get.stderr));
    assert_eq!(text(&get.stdout), "/tls/a\none\n");
    // `endpoint status` with an https:// endpoint, through the TLS stream's
    // `:authority` wrapper (etcdctl 3.4 sends a URL as `:authority` over
    // plaintext, see serve.rs; over TLS it sends `host:port`).
    let status = run(etcdctl(
        &serve.endpoint,
        &pki,
        client,
        &["endpoint", "status", "-w", "json"],
    ));
    assert!(status.status.success(), "{}", text(&status.stderr));
    assert!(
        text(&status.stdout).contains(&format!("\"Endpoint\":\"{}\"", serve.endpoint)),
        "{}",
        text(&status.stdout)
    );

    // From revision 1: the watch sees the put above whenever it starts.
    let mut watch = etcdctl(
        &serve.endpoint,
        &pki,
        client,
        &["watch", "--rev", "1", "/tls/a"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let lines = Lines::stdout(&mut watch);
    let _watch = KillOnDrop(watch);
    lines.find("the first value", |l| l == "one");
    let put = run(etcdctl(
        &serve.endpoint,
        &pki,
        client,
        &["put", "/tls/a", "two"],
    ));
    assert!(put.status.success(), "{}", text(&put.stderr));
    lines.find("the second value", |l| l == "two");

    // Without a client certificate, or with one from another CA: refused.
    let anonymous = run(etcdctl(&serve.endpoint, &pki, None, &["get", "/tls/a"]));
    assert!(!anonymous.status.success(), "{}", text(&anonymous.stdout));
    assert!(!text(&anonymous.stdout).contains("one"));
    let (other, other_key) = (pki.other_client_cert(), pki.other_client_key());
    let stranger = run(etcdctl(
        &serve.endpoint,
        &pki,
        Some((other.as_path(), other_key.as_path())),
        &["get", "/tls/a"],
    ));
    assert!(!stranger.status.success(), "{}", text(&stranger.stdout));

    // Plaintext on the TLS port gets nowhere either.
    let plain = run({
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3").args([
            "--endpoints",
            &format!("http://127.0.0.1:{}", serve.port),
            "--dial-timeout",
            "2s",
            "--command-timeout",
            "3s",
            "get",
            "/tls/a",
        ]);
        cmd
    });
    assert!(!plain.status.success(), "{}", text(&plain.stdout));
}

#[test]
fn a_trusted_ca_alone_requires_client_certificates_as_in_etcd() {
    if !have_etcdctl() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let mut flags = mtls_flags(&pki);
    flags.pop(); // no --client-cert-auth
    let serve = serve(&flags);
    let anonymous = run(etcdctl(&serve.endpoint, &pki, None, &["put", "/k", "v"]));
    assert!(
        !anonymous.status.success(),
        "etcd 3.4 refuses clients without a certificate once --trusted-ca-file is given"
    );
    let (cert, key) = (pki.client_cert(), pki.client_key());
    let put = run(etcdctl(
        &serve.endpoint,
        &pki,
        Some((cert.as_path(), key.as_path())),
        &["put", "/k", "v"],
    ));
    assert!(put.status.success(), "{}", text(&put.stderr));
}

#[test]
fn server_tls_without_a_trusted_ca_takes_any_client() {
    if !have_etcdctl() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let flags: Vec<OsString> = mtls_flags(&pki).into_iter().take(4).collect();
    let serve = serve(&flags);
    let put = run(etcdctl(&serve.endpoint, &pki, None, &["put", "/k", "v"]));
    assert!(put.status.success(), "{}", text(&put.stderr));
    if have_curl() {
        // The dashboard inside reached the registry (without a CA to
        // verify it by, it does not verify its own listener).
        let status = curl(&format!("{}/api/status", serve.http), &pki.ca(), None)
            .expect("the dashboard is on and answers");
        assert!(status.trim_start().starts_with('{'), "{status}");
    }
}

#[test]
fn health_and_metrics_over_https_need_a_client_certificate() {
    if !have_curl() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let serve = serve(&mtls_flags(&pki));
    let (cert, key) = (pki.client_cert(), pki.client_key());
    let client = Some((cert.as_path(), key.as_path()));

    let health = curl(&format!("{}/health", serve.http), &pki.ca(), client).unwrap();
    assert_eq!(health, r#"{"health":"true"}"#);
    let metrics = curl(&format!("{}/metrics", serve.http), &pki.ca(), client).unwrap();
    for name in [
        "muster_registry_revision ",
        "muster_tls_reloads_total{listener=\"grpc\"} 0",
        "muster_tls_reloads_total{listener=\"http\"} 0",
        "muster_tls_reload_failures_total{listener=\"grpc\"} 0",
    ] {
        assert!(metrics.contains(name), "{name} in {metrics}");
    }

    let refused = curl(&format!("{}/health", serve.http), &pki.ca(), None);
    assert!(
        refused.is_err(),
        "/health without a client certificate: {refused:?}"
    );
    let plain = curl(
        &format!("http://127.0.0.1:{}/health", serve.http_port()),
        &pki.ca(),
        client,
    );
    assert!(plain.is_err(), "plaintext on the HTTPS port: {plain:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_inside_serve_reads_the_registry_over_mutual_tls() {
    if !have_curl() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let serve = serve(&mtls_flags(&pki));
    let (cert, key) = (pki.client_cert(), pki.client_key());
    let client = Some((cert.as_path(), key.as_path()));
    let status = curl(&format!("{}/api/status", serve.http), &pki.ca(), client)
        .expect("the dashboard is on and answers");
    assert!(status.trim_start().starts_with('{'), "{status}");

    // A registration written to the registry shows on the page: the
    // dashboard follows the registry over its own mutual-TLS connection.
    put_instance(&pki, serve.port, "user", "u-1").await;
    wait_for_body(&pki, format!("{}/api/services", serve.http), true, "u-1").await;
}

/// Puts `service`/`id` into the registry as an instance, over mutual TLS.
async fn put_instance(pki: &TestPki, port: u16, service: &str, id: &str) {
    let instance = muster::Instance::new(service, id, "http://127.0.0.1:9");
    KvClient::new(mtls_channel(pki, port).await)
        .put(pb::PutRequest {
            key: instance.key(muster::instance::DEFAULT_PREFIX).into_bytes(),
            value: instance.encode().unwrap(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Polls `url` (with the client certificate) until its body contains
/// `needle`, off the async runtime.
async fn wait_for_body(pki: &TestPki, url: String, client_cert: bool, needle: &'static str) {
    let ca = pki.ca();
    let (cert, key) = (pki.client_cert(), pki.client_key());
    tokio::task::spawn_blocking(move || {
        let client = client_cert.then_some((cert.as_path(), key.as_path()));
        wait_for(&format!("{needle} at {url}"), || {
            curl(&url, &ca, client).ok()?.contains(needle).then_some(())
        })
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn muster_dashboard_serves_https_and_reads_a_registry_over_mutual_tls() {
    if !have_curl() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let registry = serve(&mtls_flags(&pki));
    let port = free_port();
    // The registry connection from the global client flags, the page's
    // own certificate from --tls-cert/--tls-key.
    let mut dashboard = Command::new(env!("CARGO_BIN_EXE_muster"))
        .args(["--endpoints", &registry.endpoint])
        .arg("--cacert")
        .arg(pki.ca())
        .arg("--cert")
        .arg(pki.client_cert())
        .arg("--key")
        .arg(pki.client_key())
        .args(["dashboard", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--tls-cert")
        .arg(pki.server_cert())
        .arg("--tls-key")
        .arg(pki.server_key())
        .env("RUST_LOG", "info")
        .env_remove("MUSTER_ENDPOINTS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Lines::stderr(&mut dashboard);
    let _dashboard = KillOnDrop(dashboard);
    let ready = lines.find("the ready line", |l| l.contains("muster dashboard ready"));
    let url = format!("https://127.0.0.1:{port}");
    assert!(ready.contains(&format!("{url}/")), "{ready}");

    // No client certificate needed for the page itself.
    let status = curl(&format!("{url}/api/status"), &pki.ca(), None).unwrap();
    assert!(status.trim_start().starts_with('{'), "{status}");
    put_instance(&pki, registry.port, "user", "u-1").await;
    wait_for_body(&pki, format!("{url}/api/services"), false, "u-1").await;

    let plain = curl(
        &format!("http://127.0.0.1:{port}/api/status"),
        &pki.ca(),
        None,
    );
    assert!(plain.is_err(), "plaintext on the HTTPS port: {plain:?}");
}

/// The leaf certificate in a PEM file.
fn leaf_of(path: &Path) -> Vec<u8> {
    let pem = Pem::file(path);
    let bytes = pem.read().unwrap();
    muster_tls::pem::parse_certs(&bytes, "certificate", &pem).unwrap()[0].to_vec()
}

/// The leaf certificate a new connection to `port` is shown (ALPN `alpn`).
async fn served_leaf(tls: &ClientTls, port: u16, alpn: &[u8]) -> Vec<u8> {
    let conn = tls
        .connector(&[alpn])
        .unwrap()
        .connect("127.0.0.1", port)
        .await
        .unwrap();
    conn.peer_certificates().unwrap()[0].to_vec()
}

/// The TLS of `etcdctl --cacert --cert --key` with the client certificate.
fn client_tls(pki: &TestPki) -> ClientTls {
    ClientTls::new()
        .with_ca(pki.ca())
        .with_identity(pki.client_cert(), pki.client_key())
}

/// A tonic channel to the gRPC port through muster-tls's connector (the
/// URI says http: the connector does the TLS and ignores the scheme).
async fn mtls_channel(pki: &TestPki, port: u16) -> tonic::transport::Channel {
    let connector = client_tls(pki)
        .connector(&[muster_tls::ALPN_H2])
        .unwrap()
        .await_server_first(Duration::from_secs(5));
    tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_with_connector(connector)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_while_a_watch_stays_open() {
    let pki = TestPki::generate().unwrap();
    let serve = serve(&mtls_flags(&pki));
    let tls = client_tls(&pki);
    let old = leaf_of(&pki.server_cert());
    assert_eq!(served_leaf(&tls, serve.port, b"h2").await, old);

    let channel = mtls_channel(&pki, serve.port).await;
    let create = pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: b"/rotate".to_vec(),
                ..Default::default()
            },
        )),
    };
    let requests = tokio_stream::iter([create]).chain(tokio_stream::pending());
    let mut events = WatchClient::new(channel.clone())
        .watch(requests)
        .await
        .unwrap()
        .into_inner();
    // Only once the watcher exists are later puts sure to reach it.
    let created = events.message().await.unwrap().unwrap();
    assert!(created.created, "{created:?}");
    let next_value = async |events: &mut tonic::Streaming<pb::WatchResponse>| loop {
        let resp = tokio::time::timeout(DEADLINE, events.message())
            .await
            .expect("an event in time")
            .expect("the watch stream is healthy")
            .expect("the watch stream is open");
        assert!(!resp.canceled, "{resp:?}");
        if let Some(event) = resp.events.into_iter().next() {
            return String::from_utf8(event.kv.unwrap().value).unwrap();
        }
    };
    let mut kv = KvClient::new(channel);
    let put = |value: &str| pb::PutRequest {
        key: b"/rotate".to_vec(),
        value: value.as_bytes().to_vec(),
        ..Default::default()
    };
    kv.put(put("before")).await.unwrap();
    assert_eq!(next_value(&mut events).await, "before");

    pki.issue_server("server").unwrap();
    let new = leaf_of(&pki.server_cert());
    assert_ne!(new, old);
    let deadline = Instant::now() + DEADLINE;
    while served_leaf(&tls, serve.port, b"h2").await != new {
        assert!(
            Instant::now() < deadline,
            "the gRPC port serves the new certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while served_leaf(&tls, serve.http_port(), b"http/1.1").await != new {
        assert!(
            Instant::now() < deadline,
            "the HTTP port serves the new certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The stream opened before the rotation goes on.
    kv.put(put("after")).await.unwrap();
    assert_eq!(next_value(&mut events).await, "after");
    if have_etcdctl() {
        let (cert, key) = (pki.client_cert(), pki.client_key());
        let put = run(etcdctl(
            &serve.endpoint,
            &pki,
            Some((cert.as_path(), key.as_path())),
            &["put", "/rotate", "etcdctl"],
        ));
        assert!(put.status.success(), "{}", text(&put.stderr));
        assert_eq!(next_value(&mut events).await, "etcdctl");
    }
    if have_curl() {
        let (cert, key) = (pki.client_cert(), pki.client_key());
        let metrics = curl(
            &format!("{}/metrics", serve.http),
            &pki.ca(),
            Some((cert.as_path(), key.as_path())),
        )
        .unwrap();
        assert!(
            metrics.contains("muster_tls_reloads_total{listener=\"grpc\"} 1"),
            "{metrics}"
        );
    }
}

/// Runs `cmd` to its exit, killing it (and failing) if it is still running
/// after [`DEADLINE`]: a `muster serve` that should refuse to start must
/// not hang the test when it does start.
fn exit_of(mut cmd: Command) -> Output {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::SIGKILL,
            );
            panic!("muster serve kept running: {cmd:?}");
        }
    }
}

#[test]
fn tls_flags_are_checked() {
    let pki = TestPki::generate().unwrap();
    let os = |s: &str| OsString::from(s);
    let (cert, key, ca) = (
        pki.server_cert().into_os_string(),
        pki.server_key().into_os_string(),
        pki.ca().into_os_string(),
    );
    for (args, missing) in [
        (vec![os("--cert-file"), cert.clone()], "--key-file"),
        (vec![os("--key-file"), key.clone()], "--cert-file"),
        (vec![os("--trusted-ca-file"), ca.clone()], "--cert-file"),
        (
            vec![
                os("--cert-file"),
                cert.clone(),
                os("--key-file"),
                key.clone(),
                os("--client-cert-auth"),
            ],
            "--trusted-ca-file",
        ),
    ] {
        let out = exit_of(serve_command(free_port(), &args));
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("required") && err.contains(missing),
            "{args:?}: {err}"
        );
    }

    // A broken key file stops `muster serve`, naming the file.
    let broken = pki.dir().join("broken-key.pem");
    std::fs::write(&broken, "not a key").unwrap();
    let out = exit_of(serve_command(
        free_port(),
        &[
            os("--cert-file"),
            cert,
            os("--key-file"),
            broken.clone().into(),
        ],
    ));
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&broken.display().to_string()), "{err}");
}

/// Over HTTPS the dashboard's session cookie is `Secure` (the browser
/// sends it over HTTPS only).
#[test]
fn the_dashboard_session_cookie_is_secure_over_https() {
    if !have_etcdctl() || !have_curl() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let flags: Vec<OsString> = mtls_flags(&pki).into_iter().take(4).collect();
    let serve = serve(&flags);
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "grant-role", "root", "root"],
        &["user", "add", "alice:alicepw"],
        &["auth", "enable"],
    ] {
        let out = run(etcdctl(&serve.endpoint, &pki, None, args));
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-i", "--max-time", "10", "--cacert"])
        .arg(pki.ca())
        .args([
            "-H",
            "Content-Type: application/json",
            "--data",
            r#"{"name":"alice","password":"alicepw"}"#,
        ])
        .arg(format!("{}/api/login", serve.http));
    let out = run(cmd);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let response = text(&out.stdout);
    let cookie = response
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no cookie: {response}"));
    let attributes: Vec<&str> = cookie.split(';').map(str::trim).collect();
    for wanted in ["Secure", "HttpOnly", "SameSite=Strict"] {
        assert!(attributes.contains(&wanted), "{wanted} in {cookie}");
    }
}
