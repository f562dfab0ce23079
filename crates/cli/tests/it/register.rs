//! `muster register` as a real process against the embedded registry and a
//! real etcd: health checks that drain, withdraw and restore the instance;
//! a child command's exit code and signal forwarding; graceful shutdown.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{Backend, KillOnDrop, text, wait_for};

/// A tiny HTTP server answering 200 or 503 on every path, as told.
struct Health {
    port: u16,
    healthy: Arc<AtomicBool>,
}

impl Health {
    fn start() -> Health {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let healthy = Arc::new(AtomicBool::new(true));
        let flag = healthy.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut request = Vec::new();
                let mut buf = [0; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let status = if flag.load(Ordering::SeqCst) {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                );
            }
        });
        Health { port, healthy }
    }

    fn set(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/healthz", self.port)
    }
}

fn spawn(backend: &Backend, args: &[&str]) -> KillOnDrop {
    KillOnDrop(
        backend
            .muster()
            .arg("register")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

fn wait_status(backend: &Backend, service: &str, id: &str, want: Option<&str>) {
    wait_for(&format!("{service}/{id} to be {want:?}"), || {
        (backend.status(service, id).as_deref() == want).then_some(())
    });
}

fn wait_exit(child: &mut KillOnDrop) -> std::process::ExitStatus {
    wait_for("muster register to exit", || child.0.try_wait().unwrap())
}

fn health_check_drains_then_restores(backend: &Backend) {
    let health = Health::start();
    let url = health.url();
    let addr = format!("127.0.0.1:{}", health.port);
    let mut sidecar = spawn(
        backend,
        &[
            "web",
            "w-1",
            &addr,
            "--ttl",
            "5s",
            "--grace",
            "300ms",
            "--zone",
            "eu-1",
            "--version",
            "2.0.0",
            "--weight",
            "5",
            "--tag",
            "canary",
            "--meta",
            "git=abc",
            "--check",
            &url,
            "--check-interval",
            "200ms",
            "--check-timeout",
            "1s",
            "--failures",
            "2",
            "--successes",
            "2",
        ],
    );
    wait_status(backend, "web", "w-1", Some("serving"));
    let got = backend.instances("web").unwrap();
    assert_eq!(got[0]["zone"], "eu-1");
    assert_eq!(got[0]["version"], "2.0.0");
    assert_eq!(got[0]["weight"], 5);
    assert_eq!(got[0]["tags"], serde_json::json!(["canary"]));
    assert_eq!(got[0]["metadata"], serde_json::json!({"git": "abc"}));

    // The id is taken: a second sidecar for it fails with one line.
    let out = backend.run(&["register", "web", "w-1", &addr]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("muster: ") && last.contains("already registered"),
        "{err}"
    );

    health.set(false);
    wait_status(backend, "web", "w-1", Some("draining"));
    health.set(true);
    wait_status(backend, "web", "w-1", Some("serving"));

    // SIGTERM: drained for the grace period, then removed; exit 0.
    signal(&sidecar.0, nix::sys::signal::SIGTERM);
    let status = wait_exit(&mut sidecar);
    assert!(status.success(), "{status}");
    assert_eq!(backend.status("web", "w-1"), None);
}

fn withdraws_after_failures_and_returns(backend: &Backend) {
    let health = Health::start();
    let url = health.url();
    let mut sidecar = spawn(
        backend,
        &[
            "web",
            "w-2",
            "127.0.0.1:1",
            "--ttl",
            "5s",
            "--check",
            &url,
            "--check-interval",
            "200ms",
            "--failures",
            "1",
            "--withdraw-after",
            "3",
        ],
    );
    wait_status(backend, "web", "w-2", Some("serving"));
    health.set(false);
    wait_status(backend, "web", "w-2", None);
    assert!(sidecar.0.try_wait().unwrap().is_none(), "still running");
    health.set(true);
    wait_status(backend, "web", "w-2", Some("serving"));
    signal(&sidecar.0, nix::sys::signal::SIGINT);
    assert!(wait_exit(&mut sidecar).success());
    assert_eq!(backend.status("web", "w-2"), None);
}

/// `sh -c SCRIPT DIR`: the script sees the directory as `$0`.
fn sh<'a>(script: &'a str, dir: &'a Path) -> [&'a str; 4] {
    ["sh", "-c", script, dir.to_str().unwrap()]
}

fn child_exit_code_becomes_ours(backend: &Backend) {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"while [ ! -e "$0/go" ]; do sleep 0.05; done; exit 3"#;
    let mut sidecar = spawn(
        backend,
        &[
            &["job", "j-1", "127.0.0.1:1", "--"][..],
            &sh(script, dir.path()),
        ]
        .concat(),
    );
    wait_status(backend, "job", "j-1", Some("serving"));
    std::fs::write(dir.path().join("go"), "").unwrap();
    assert_eq!(wait_exit(&mut sidecar).code(), Some(3));
    assert_eq!(backend.status("job", "j-1"), None);

    // Killed by a signal: 128 + the signal; a command that cannot run: 127.
    let out = backend.run(&[
        "register",
        "job",
        "j-2",
        "h:1",
        "--",
        "sh",
        "-c",
        "kill -KILL $$",
    ]);
    assert_eq!(out.status.code(), Some(128 + 9), "{}", text(&out.stderr));
    let out = backend.run(&[
        "register",
        "job",
        "j-3",
        "h:1",
        "--",
        "/nonexistent/muster-test",
    ]);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("muster: cannot run /nonexistent/muster-test"));
    assert_eq!(backend.status("job", "j-2"), None);
    assert_eq!(backend.status("job", "j-3"), None);
}

fn signals_are_forwarded_to_the_child(backend: &Backend) {
    let health = Health::start();
    let check = format!("tcp://127.0.0.1:{}", health.port);
    let dir = tempfile::tempdir().unwrap();
    // On TERM: say so, wait to be told to go, exit 7.
    let script = r#"trap 'touch "$0/term"; while [ ! -e "$0/go" ]; do sleep 0.05; done; exit 7' TERM
        while :; do sleep 0.05; done"#;
    let mut sidecar = spawn(
        backend,
        &[
            &[
                "job",
                "j-4",
                "127.0.0.1:1",
                "--check",
                &check,
                "--check-interval",
                "200ms",
                "--",
            ][..],
            &sh(script, dir.path()),
        ]
        .concat(),
    );
    wait_status(backend, "job", "j-4", Some("serving"));
    signal(&sidecar.0, nix::sys::signal::SIGTERM);
    wait_for("the child to get SIGTERM", || {
        dir.path().join("term").exists().then_some(())
    });
    // While the child shuts down, the instance is draining.
    wait_status(backend, "job", "j-4", Some("draining"));
    assert!(
        sidecar.0.try_wait().unwrap().is_none(),
        "waits for the child"
    );
    std::fs::write(dir.path().join("go"), "").unwrap();
    assert_eq!(wait_exit(&mut sidecar).code(), Some(7));
    assert_eq!(backend.status("job", "j-4"), None);
}

on_both!(
    health_check_drains_then_restores,
    withdraws_after_failures_and_returns,
    child_exit_code_becomes_ours,
    signals_are_forwarded_to_the_child,
);
