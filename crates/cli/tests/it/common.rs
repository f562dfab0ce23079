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

/// Runs etcdctl against `endpoint`, expecting success; its stdout.
pub fn etcdctl(endpoint: &str, args: &[&str]) -> String {
    muster_testkit::etcdctl_ok(endpoint, args, "")
}

/// Turns auth on with `root` (password `rootpw`); `dash` (`dashpw`), who
/// may read the whole default prefix; and `alice` (`alicepw`), who may
/// read the `web` service only.
pub fn enable_auth(endpoint: &str) {
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "dash"],
        &[
            "role",
            "grant-permission",
            "dash",
            "read",
            "/muster/services/",
            "--prefix=true",
        ],
        &["user", "add", "dash:dashpw"],
        &["user", "grant-role", "dash", "dash"],
        &["role", "add", "web-reader"],
        &[
            "role",
            "grant-permission",
            "web-reader",
            "read",
            "/muster/services/web/",
            "--prefix=true",
        ],
        &["user", "add", "alice:alicepw"],
        &["user", "grant-role", "alice", "web-reader"],
        &["auth", "enable"],
    ] {
        etcdctl(endpoint, args);
    }
}

/// An HTTP/1.1 answer read in full.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    /// Header lines, lowercased names: `name: value`.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    /// The values of header `name` (lowercase).
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {} {}", self.status, self.body))
    }

    /// The `muster_session=...` pair of its `Set-Cookie`, if any.
    pub fn session_cookie(&self) -> Option<String> {
        self.header_values("set-cookie")
            .into_iter()
            .find(|c| c.starts_with("muster_session=") && !c.starts_with("muster_session=;"))
            .and_then(|c| c.split(';').next())
            .map(str::to_string)
    }
}

/// A raw HTTP/1.1 request to `addr` (`host:port`), `Connection: close`.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpAnswer {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {response}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    HttpAnswer {
        status,
        headers,
        body: if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    }
}

/// The body of a chunked response.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
