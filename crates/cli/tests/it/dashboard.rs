//! The dashboard as users start it: `muster dashboard` in front of either
//! backend, and `muster serve`'s own HTTP address. (The page itself is
//! tested in crates/dashboard, including in headless Chromium.)

use crate::common;

use std::process::Stdio;

use common::{Backend, KillOnDrop, Lines, free_port, wait_for};
use muster_testkit::http_get;

/// The body of `GET path` when it answered 200.
fn get_ok(port: u16, path: &str) -> Option<String> {
    let response = http_get(port, path)?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The instance ids of `service` in `/api/services`.
fn ids(port: u16, service: &str) -> Option<Vec<String>> {
    let body = get_ok(port, "/api/services")?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let services = v["services"].as_array()?;
    let svc = services.iter().find(|s| s["name"] == service)?;
    Some(
        svc["instances"]
            .as_array()?
            .iter()
            .filter_map(|i| i["id"].as_str().map(String::from))
            .collect(),
    )
}

fn dashboard_follows_the_registry(backend: &Backend) {
    let port = free_port();
    let mut dashboard = backend
        .muster()
        .args(["dashboard", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("muster dashboard starts");
    let lines = Lines::stderr(&mut dashboard);
    let _dashboard = KillOnDrop(dashboard);
    lines.find("the ready line", |l| l.contains("muster dashboard ready"));

    let page = get_ok(port, "/").expect("the page is served");
    assert!(
        page.contains("<html") || page.contains("<!doctype html"),
        "{page}"
    );
    assert!(get_ok(port, "/api/status").is_some(), "status answers");
    assert_eq!(ids(port, "user"), None, "nothing registered yet");

    let sidecar = backend
        .muster()
        .args([
            "register",
            "user",
            "u-1",
            "http://127.0.0.1:9",
            "--ttl",
            "2s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("muster register starts");
    let sidecar = KillOnDrop(sidecar);
    wait_for("the registration shows", || {
        ids(port, "user").filter(|ids| ids == &["u-1"])
    });
    drop(sidecar);
    // SIGKILL: the lease expires, the instance goes.
    wait_for("the expired instance goes", || {
        ids(port, "user").is_none().then_some(())
    });
}

on_both!(dashboard_follows_the_registry);

/// `muster serve` answers the dashboard next to /metrics and /health.
#[test]
fn serve_shows_the_dashboard_on_its_http_address() {
    let serve = common::serve(free_port(), &[std::ffi::OsStr::new("--in-memory")]);
    let port: u16 = serve
        .1
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the HTTP port");
    let page = get_ok(port, "/").expect("the page is served");
    assert!(page.contains("muster"), "{page}");
    assert!(get_ok(port, "/api/services").is_some());
    assert!(get_ok(port, "/metrics").is_some_and(|m| m.contains("# TYPE")));
    assert!(get_ok(port, "/health").is_some());
    // DNS rebinding: a page whose name resolves to 127.0.0.1 cannot read it.
    let refused = get_with_host(port, "/api/services", "evil.example");
    assert!(refused.starts_with("HTTP/1.1 421"), "{refused}");
    assert!(get_with_host(port, "/", &format!("localhost:{port}")).starts_with("HTTP/1.1 200"));
}

/// A raw GET with the given Host header; the whole response.
fn get_with_host(port: u16, path: &str, host: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

/// Logs in on the dashboard at `addr`; the session's `Cookie` value.
fn login(addr: &str, name: &str, password: &str) -> common::HttpAnswer {
    let body = serde_json::json!({ "name": name, "password": password }).to_string();
    common::http(
        addr,
        "POST",
        "/api/login",
        &[("Content-Type", "application/json")],
        &body,
    )
}

/// The service names `/api/services` lists with `cookie`.
fn service_names(addr: &str, cookie: &str) -> Vec<String> {
    let answer = common::http(addr, "GET", "/api/services", &[("Cookie", cookie)], "");
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.json()["services"]
        .as_array()
        .expect("services")
        .iter()
        .filter_map(|s| s["name"].as_str().map(String::from))
        .collect()
}

/// Registers `web/web-1` and `billing/billing-1` as root (no lease).
fn register_as_root(endpoint: &str) {
    for (service, id, addr) in [
        ("web", "web-1", "http://127.0.0.1:8001"),
        ("billing", "billing-1", "10.0.0.9:9000"),
    ] {
        let instance = muster::Instance::new(service, id, addr);
        let key = instance.key(muster::instance::DEFAULT_PREFIX);
        let value = String::from_utf8(instance.encode().unwrap()).unwrap();
        common::etcdctl(endpoint, &["--user=root:rootpw", "put", &key, &value]);
    }
}

/// The whole login flow over HTTP on `addr`, where `web` and `billing`
/// are registered and alice may read `web` only.
fn login_flow(addr: &str) {
    let anonymous = common::http(addr, "GET", "/api/services", &[], "");
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    assert_eq!(common::http(addr, "GET", "/", &[], "").status, 200);
    let wrong = login(addr, "alice", "wrong");
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    assert!(
        wrong.body.contains("authentication failed"),
        "{}",
        wrong.body
    );
    assert_eq!(wrong.session_cookie(), None);

    let ok = login(addr, "alice", "alicepw");
    assert_eq!(ok.status, 200, "{}", ok.body);
    let set = ok.header_values("set-cookie").join(" | ");
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let alice = ok.session_cookie().expect("a session cookie");
    wait_for("web listed for alice", || {
        (service_names(addr, &alice) == ["web"]).then_some(())
    });
    let root = login(addr, "root", "rootpw")
        .session_cookie()
        .expect("root's session");
    wait_for("both listed for root", || {
        (service_names(addr, &root) == ["billing", "web"]).then_some(())
    });

    let out = common::http(addr, "POST", "/api/logout", &[("Cookie", &alice)], "");
    assert_eq!(out.status, 200);
    let after = common::http(addr, "GET", "/api/services", &[("Cookie", &alice)], "");
    assert_eq!(after.status, 401, "{}", after.body);
}

/// `muster serve` with auth on: its dashboard (reading with the server's
/// internal token) asks for a login and shows each user what that user may
/// read; /health stays open.
#[test]
fn serve_dashboard_asks_for_a_login_when_auth_is_on() {
    let grpc = free_port();
    let serve = common::serve(grpc, &[std::ffi::OsStr::new("--in-memory")]);
    let endpoint = format!("127.0.0.1:{grpc}");
    common::enable_auth(&endpoint);
    register_as_root(&endpoint);
    login_flow(&serve.1);
    let health = common::http(&serve.1, "GET", "/health", &[], "");
    assert_eq!(health.status, 200, "{}", health.body);
}

/// `muster --user dash:... dashboard` (a reader of the prefix) in front of
/// a registry with auth on: the same login flow.
fn dashboard_with_a_reader_user_asks_for_a_login(backend: &Backend) {
    common::enable_auth(&backend.endpoint());
    register_as_root(&backend.endpoint());
    let port = free_port();
    let mut dashboard = backend
        .muster()
        .args([
            "--user",
            "dash:dashpw",
            "dashboard",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("muster dashboard starts");
    let lines = Lines::stderr(&mut dashboard);
    let _dashboard = KillOnDrop(dashboard);
    lines.find("the ready line", |l| l.contains("muster dashboard ready"));
    login_flow(&format!("127.0.0.1:{port}"));
}

on_both!(dashboard_with_a_reader_user_asks_for_a_login);
