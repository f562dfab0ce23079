//! The seed scenario end to end, all real processes: two `user-service`
//! example instances (5 s leases kept alive) behind `muster gateway`, on
//! both backends. Traffic reaches both; one instance is stopped gracefully
//! mid-traffic and no request fails; the gateway itself shuts down cleanly
//! on SIGTERM.
//!
//! The example binary is built with the `cargo` that runs this test (a
//! no-op when `cargo test --workspace` already built it). It is built with
//! the workspace's whole selection (`--workspace --examples`): building only
//! `-p muster` resolves dependency features differently and would compile the
//! whole dependency tree a second time.

use crate::common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::Instant;

use common::{Backend, DEADLINE, free_port, text, wait_for};
use muster_testkit::http_get;

/// `target/<profile>/examples/user-service`, built once per test binary.
fn user_service() -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "--workspace", "--examples"]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("cargo runs");
        assert!(
            out.status.success(),
            "building the user-service example failed: {}",
            text(&out.stderr)
        );
    });
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/it-<hash> -> target/<profile>/examples/
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in target/<profile>/deps")
        .join("examples")
        .join(format!("user-service{}", std::env::consts::EXE_SUFFIX))
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn term(&self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(start.elapsed() < DEADLINE, "process did not exit");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Starts one user-service instance and waits for its ready line.
fn start_instance(endpoint: &str, id: &str) -> Proc {
    let mut child = Command::new(user_service())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--id",
            id,
            "--endpoints",
            endpoint,
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("user-service starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("user-service prints its ready line");
    assert!(line.starts_with("listening on "), "{line}");
    Proc(child)
}

/// `GET /` through the gateway: the body when it answered 200.
fn get(port: u16) -> Result<String, String> {
    let response = http_get(port, "/").ok_or("no answer")?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("no header end")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(response);
    }
    Ok(body.trim().to_string())
}

/// `muster gateway` routing `/` to `user` on a free port (with `extra`
/// flags), once it answers /healthz; and its port.
fn start_gateway(backend: &Backend, extra: &[&str]) -> (Proc, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let gateway = Proc(
        backend
            .muster()
            .args(["gateway", "--listen", &listen, "--route", "/=user"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("muster gateway starts"),
    );
    wait_for("the gateway answers /healthz", || {
        http_get(port, "/healthz").filter(|r| r.starts_with("HTTP/1.1 200"))
    });
    (gateway, port)
}

fn user_service_behind_the_gateway(backend: &Backend) {
    let endpoint = backend.endpoint();
    let mut a = start_instance(&endpoint, "user-a");
    let _b = start_instance(&endpoint, "user-b");

    let (mut gateway, port) = start_gateway(backend, &[]);

    // Traffic reaches both instances.
    let mut seen = BTreeSet::new();
    wait_for("both instances answer through the gateway", || {
        seen.insert(get(port).expect("no request fails"));
        (seen.len() == 2).then_some(())
    });
    assert_eq!(
        seen,
        BTreeSet::from([
            "hello from user-a".to_string(),
            "hello from user-b".to_string()
        ])
    );

    // A graceful stop mid-traffic: draining, then gone, no failed request.
    a.term();
    let start = Instant::now();
    let mut sent = 0;
    loop {
        get(port).unwrap_or_else(|e| panic!("request {sent} failed during the drain: {e}"));
        sent += 1;
        if let Some(status) = a.0.try_wait().unwrap() {
            assert!(status.success(), "user-a exited with {status}");
            break;
        }
        assert!(start.elapsed() < DEADLINE, "user-a did not exit");
    }
    assert!(sent > 0);
    wait_for("only user-b answers", || {
        (get(port).expect("no request fails") == "hello from user-b").then_some(())
    });
    for _ in 0..20 {
        assert_eq!(get(port).unwrap(), "hello from user-b");
    }

    gateway.term();
    assert!(
        gateway.wait_exit().success(),
        "the gateway exits 0 on SIGTERM"
    );
}

/// A plain HTTP server on a free port answering every request with
/// `body` (keep-alive), standing in for a Go instance; its port.
fn http_responder(body: &'static str) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buf.drain(..end);
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if conn.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// One gateway route over a mixed fleet: a muster instance (the example,
/// registering itself in muster's layout) and a "Go" instance registered
/// in kratos's layout, found through `--also kratos`.
fn a_gateway_route_over_a_mixed_fleet(backend: &Backend) {
    let endpoint = backend.endpoint();
    let _rust = start_instance(&endpoint, "user-a");
    let go_port = http_responder("hello from kratos-1");
    let mut go = Proc(
        backend
            .muster()
            .args([
                "--layout",
                "kratos",
                "register",
                "user",
                "kratos-1",
                &format!("http://127.0.0.1:{go_port}"),
                "--grace",
                "200ms",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("muster register starts"),
    );
    let (mut gateway, port) = start_gateway(backend, &["--also", "kratos"]);
    let mut seen = BTreeSet::new();
    wait_for("both layouts' instances answer through one route", || {
        if let Ok(body) = get(port) {
            seen.insert(body);
        }
        (seen.len() == 2).then_some(())
    });
    assert_eq!(
        seen,
        BTreeSet::from([
            "hello from kratos-1".to_string(),
            "hello from user-a".to_string()
        ])
    );
    // The kratos instance leaves (its sidecar deregisters it): only the
    // muster one answers.
    go.term();
    assert!(go.wait_exit().success());
    wait_for("only user-a answers", || {
        (get(port).ok()? == "hello from user-a").then_some(())
    });
    for _ in 0..20 {
        assert_eq!(get(port).unwrap(), "hello from user-a");
    }
    gateway.term();
    assert!(gateway.wait_exit().success());
}

on_both!(
    user_service_behind_the_gateway,
    a_gateway_route_over_a_mixed_fleet
);
