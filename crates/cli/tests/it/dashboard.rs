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
