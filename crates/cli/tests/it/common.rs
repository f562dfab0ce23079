//! Running `muster serve` as a child process in tests.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub use muster_testkit::free_port;

/// A `muster serve` child, killed when dropped, and its HTTP address.
pub struct Serve(pub Child, pub String);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `muster serve` on `port` with `storage` flags (`--in-memory` or
/// `--data-dir DIR`) and waits for its ready line.
pub fn serve(port: u16, storage: &[&std::ffi::OsStr]) -> Serve {
    let mut child = Command::new(env!("CARGO_BIN_EXE_muster"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(storage)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("muster serve starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("muster serve ready") {
                let http = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("http=http://"))
                    .unwrap_or_default()
                    .to_string();
                let _ = tx.send(http);
            }
        }
    });
    let http = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("muster serve prints its ready line");
    Serve(child, http)
}

/// A generous deadline for anything that should happen "soon".
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The registry a CLI test runs against: `muster serve --in-memory` as a
/// child process, or a real etcd.
pub enum Backend {
    /// The embedded registry's gRPC endpoint, and its process (stopped when
    /// dropped).
    Embedded(
        String,
        #[allow(dead_code, reason = "held for its Drop")] Serve,
    ),
    /// A real etcd (boxed: it is much larger than the other variant).
    Etcd(Box<muster_testkit::EtcdNode>),
}

impl Backend {
    /// `muster serve --in-memory --bcrypt-cost 4` on a free port.
    pub fn embedded() -> Backend {
        let port = free_port();
        // bcrypt's lowest cost, as every test registry (etcd's too).
        let flags = ["--in-memory", "--bcrypt-cost", "4"].map(std::ffi::OsStr::new);
        let serve = serve(port, &flags);
        Backend::Embedded(format!("http://127.0.0.1:{port}"), serve)
    }

    /// A real etcd, or `None` (skipped loudly) when it is not installed.
    pub fn etcd() -> Option<Backend> {
        muster_testkit::require_etcd()?;
        Some(Backend::Etcd(Box::new(
            muster_testkit::EtcdNode::start().expect("start etcd"),
        )))
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        match self {
            Backend::Embedded(endpoint, _) => endpoint.clone(),
            Backend::Etcd(node) => node.endpoint(),
        }
    }

    /// The `muster` binary pointed at this registry.
    pub fn muster(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_muster"));
        cmd.env("MUSTER_ENDPOINTS", self.endpoint())
            .env_remove("MUSTER_PREFIX")
            .env_remove("MUSTER_USER")
            .env_remove("MUSTER_PASSWORD")
            .env_remove("MUSTER_NEW_PASSWORD")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `muster ARGS` to completion.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        self.muster().args(args).output().expect("muster runs")
    }

    /// Runs `muster ARGS -o json`, expects success, parses stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.run(&[args, &["-o", "json"]].concat());
        assert!(
            out.status.success(),
            "muster {args:?}: {}",
            text(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("muster {args:?}: {e}: {}", text(&out.stdout)))
    }

    /// `get SERVICE -o json`'s instances by id, or `None` when the service
    /// has none (the command fails).
    pub fn instances(&self, service: &str) -> Option<Vec<serde_json::Value>> {
        let out = self.run(&["get", service, "-o", "json"]);
        if !out.status.success() {
            let err = text(&out.stderr);
            assert!(err.contains("no service named"), "get {service}: {err}");
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        Some(v["instances"].as_array().cloned().unwrap_or_default())
    }

    /// The status of `service`/`id` as `get` shows it, `None` when absent.
    pub fn status(&self, service: &str, id: &str) -> Option<String> {
        self.instances(service)?
            .into_iter()
            .find(|i| i["id"] == id)
            .map(|i| i["status"].as_str().unwrap_or_default().to_string())
    }
}

/// Runs each named `fn(&Backend)` as two tests, `<name>::embedded` and
/// `<name>::etcd` (skipped loudly without etcd unless MUSTER_REQUIRE_ETCD=1).
#[macro_export]
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn embedded() {
                    super::$name(&$crate::common::Backend::embedded())
                }
                #[test]
                fn etcd() {
                    if let Some(backend) = $crate::common::Backend::etcd() {
                        super::$name(&backend)
                    }
                }
            }
        )*
    };
}

/// Bytes as text, for messages.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Polls `f` until it returns `Some`, panicking with `what` after [`DEADLINE`].
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child's stdout read line by line on a thread; `next_line` waits with a
/// deadline.
pub struct Lines(pub std::sync::mpsc::Receiver<String>);

impl Lines {
    /// Reads `child`'s stdout (which must be piped).
    pub fn stdout(child: &mut Child) -> Lines {
        Lines::of(child.stdout.take().expect("stdout is piped"))
    }

    /// Reads `child`'s stderr (which must be piped).
    pub fn stderr(child: &mut Child) -> Lines {
        Lines::of(child.stderr.take().expect("stderr is piped"))
    }

    /// Reads lines from `reader` on a thread.
    pub fn of(reader: impl std::io::Read + Send + 'static) -> Lines {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines(rx)
    }

    /// The next line that satisfies `pred`, skipping others; panics after
    /// [`DEADLINE`] or when the stream ends.
    pub fn find(&self, what: &str, mut pred: impl FnMut(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.0.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(_) => {}
                Err(e) => panic!("no line with {what}: {e}"),
            }
        }
    }
}

/// Kills a child process when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
