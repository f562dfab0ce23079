//! End to end: the `user-service` and `caller` examples against a real etcd.
//!
//! Two user-service instances register on free ports; the caller discovers
//! both and calls them round-robin; one instance gets SIGTERM, exits 0, and
//! its key is gone from etcd at once (revoked, not left to expire); a caller
//! that was running meanwhile logged it going draining, then removed, and
//! kept calling the other instance without a failed call.
//!
//! The example binaries are the ones cargo builds next to this test
//! (`target/<profile>/examples/`): `cargo test -p muster` builds them.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use muster_testkit::EtcdNode;

/// A generous deadline for anything that should happen "soon".
const DEADLINE: Duration = Duration::from_secs(30);
/// The user-service's lease TTL (its default), which a clean shutdown must
/// beat by far.
const TTL: Duration = Duration::from_secs(5);

/// The path of an example binary built by cargo next to this test binary.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/it-<hash> -> target/<profile>/examples/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps");
    let path = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    const HOW: &str = "cargo builds the examples only when it runs a package's whole test \
         suite: run `cargo test -p muster`, or build them first \
         (`cargo build -p muster --examples && cargo test -p muster --test it examples::`)";
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("example binary {} not found: {HOW}", path.display()));
    // `cargo test --test it examples::` alone does not rebuild the examples: refuse to
    // test a binary older than its sources.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = manifest.join("examples").join(format!("{name}.rs"));
    if let Some(newer) = std::iter::once(source)
        .chain(rust_files(&manifest.join("src")))
        .find(|f| {
            std::fs::metadata(f)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > built)
        })
    {
        panic!(
            "example binary {} is older than {}: {HOW}",
            path.display(),
            newer.display()
        );
    }
    path
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}

/// A child process whose stdout lines and stderr are collected by threads;
/// killed (and reaped) on drop, so a failing test leaves nothing running.
struct Proc {
    name: String,
    child: Child,
    /// Stdout lines not consumed by `wait_line` yet.
    lines: mpsc::Receiver<String>,
    /// Every stdout line so far.
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    fn spawn(name: &str, bin: &Path, args: &[&str]) -> Proc {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let (tx, lines) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().expect("piped stdout");
        let all = stdout.clone();
        let out_reader = thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                all.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let mut err = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        let err_reader = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Proc {
            name: name.to_string(),
            child,
            lines,
            stdout,
            stderr,
            readers: vec![out_reader, err_reader],
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process printed so far, for failure messages.
    fn transcript(&self) -> String {
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            self.stdout.lock().unwrap().join("\n"),
            self.name,
            self.stderr.lock().unwrap()
        )
    }

    /// Every stdout line so far.
    fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Consumes stdout lines until one satisfies `pred` and returns it;
    /// panics if none does before the deadline or the output ends.
    fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let left = DEADLINE.saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: timed out after {DEADLINE:?} waiting for {what}\n{}",
                    self.name,
                    self.transcript()
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "{}: output ended while waiting for {what}\n{}",
                    self.name,
                    self.transcript()
                ),
            }
        }
    }

    /// Waits (polling) for the process to exit, then for its output to be
    /// read to the end.
    fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{} did not exit within {DEADLINE:?}\n{}",
                self.name,
                self.transcript()
            );
            thread::sleep(Duration::from_millis(20));
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a user-service instance on a free port and waits until it says it
/// is registered; returns it with its address.
fn start_user_service(bin: &Path, endpoint: &str, id: &str) -> (Proc, String) {
    let proc = Proc::spawn(
        id,
        bin,
        &[
            "--listen",
            "127.0.0.1:0",
            "--id",
            id,
            "--grace",
            "500ms",
            "--endpoints",
            endpoint,
        ],
    );
    let line = proc.wait_line("the `listening on` line", |l| {
        l.starts_with("listening on ")
    });
    let expected_suffix = format!(" as {id}");
    let addr = line
        .strip_prefix("listening on ")
        .and_then(|rest| rest.strip_suffix(&expected_suffix))
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .to_string();
    assert!(addr.starts_with("http://127.0.0.1:"), "{line:?}");
    (proc, addr)
}

/// The keys under the `user` service, as etcdctl lists them.
fn user_keys(node: &EtcdNode) -> String {
    let out = node
        .etcdctl(&["get", "--prefix", "--keys-only", "/muster/services/user/"])
        .expect("run etcdctl");
    assert!(
        out.status.success(),
        "etcdctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn responses_from(lines: &[String], id: &str) -> usize {
    let expected = format!("{id} -> hello from {id}");
    lines.iter().filter(|l| **l == expected).count()
}

#[test]
fn user_service_and_caller_end_to_end() {
    let Some(()) = muster_testkit::require_etcd() else {
        return;
    };
    let user_service = example("user-service");
    let caller = example("caller");
    let node = EtcdNode::start().expect("start etcd");
    let endpoint = node.endpoint();

    let (mut a, addr_a) = start_user_service(&user_service, &endpoint, "user-a");
    let (b, addr_b) = start_user_service(&user_service, &endpoint, "user-b");
    assert_ne!(addr_a, addr_b);
    let keys = user_keys(&node);
    for id in ["user-a", "user-b"] {
        assert!(
            keys.contains(&format!("/muster/services/user/{id}")),
            "{id} is not registered:\n{keys}"
        );
    }

    // A caller that makes six calls: both instances answer, in turn.
    let mut calls = Proc::spawn(
        "caller --count 6",
        &caller,
        &[
            "--count",
            "6",
            "--interval",
            "100ms",
            "--endpoints",
            &endpoint,
        ],
    );
    let status = calls.wait_exit();
    assert!(
        status.success(),
        "caller failed: {status}\n{}",
        calls.transcript()
    );
    let lines = calls.stdout_lines();
    assert!(
        lines
            .iter()
            .any(|l| l == "service user: 2 instance(s)"
                || l.starts_with("service user: 2 instance(s) ")),
        "the caller did not list both instances\n{}",
        calls.transcript()
    );
    for (id, addr) in [("user-a", &addr_a), ("user-b", &addr_b)] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(id) && l.contains(addr.as_str()) && l.ends_with("serving")),
            "{id} at {addr} missing from the listing\n{}",
            calls.transcript()
        );
    }
    let (from_a, from_b) = (
        responses_from(&lines, "user-a"),
        responses_from(&lines, "user-b"),
    );
    assert_eq!(
        from_a + from_b,
        6,
        "six successful calls\n{}",
        calls.transcript()
    );
    assert!(
        from_a >= 1 && from_b >= 1,
        "round-robin should reach both instances (a: {from_a}, b: {from_b})\n{}",
        calls.transcript()
    );

    // A caller that keeps running while user-a shuts down.
    let watching = Proc::spawn(
        "caller (running)",
        &caller,
        &["--interval", "100ms", "--endpoints", &endpoint],
    );
    watching.wait_line("a first response", |l| l.contains(" -> hello from "));

    // SIGTERM: user-a drains, deregisters and exits 0, long before its TTL.
    let sent = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &a.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success(), "kill -TERM failed: {kill}");
    let status = a.wait_exit();
    let took = sent.elapsed();
    assert!(
        status.success(),
        "user-a did not exit 0 on SIGTERM: {status}\n{}",
        a.transcript()
    );
    let keys = user_keys(&node);
    assert!(
        !keys.contains("/muster/services/user/user-a"),
        "user-a's key is still in etcd right after a clean exit ({took:?} after SIGTERM):\n{keys}\n{}",
        a.transcript()
    );
    assert!(
        keys.contains("/muster/services/user/user-b"),
        "user-b's key vanished:\n{keys}"
    );
    assert!(
        took < TTL,
        "shutdown took {took:?}, not clearly a revoke rather than TTL expiry\n{}",
        a.transcript()
    );
    let log = a.transcript();
    assert!(
        log.contains("draining"),
        "user-a did not log draining\n{log}"
    );

    // The running caller saw it go draining, then removed, and from then on
    // only user-b answers; no call failed along the way.
    watching.wait_line("user-a going draining", |l| {
        l.starts_with("~ updated user-a: serving -> draining")
    });
    watching.wait_line("user-a removed", |l| l.starts_with("- removed user-a"));
    for _ in 0..3 {
        let line = watching.wait_line("a response", |l| l.contains(" -> "));
        assert_eq!(
            line,
            "user-b -> hello from user-b",
            "only user-b is left\n{}",
            watching.transcript()
        );
    }
    let lines = watching.stdout_lines();
    assert!(
        !lines.iter().any(|l| l.contains("error calling")),
        "a call failed while user-a was draining\n{}",
        watching.transcript()
    );
    drop(watching);
    drop(b);
}
